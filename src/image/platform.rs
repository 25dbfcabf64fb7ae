//! Platforms (`linux/arm64`, `linux/arm/v7`): the OCI platform object of index entries and
//! image configs, parsing and printing the `os/arch[/variant]` form users write, the names
//! other tools use for the same thing (`aarch64`, `x86_64`, `armhf`), and deciding whether an
//! index entry is for a wanted platform.

use std::fmt;

use serde::{Deserialize, Serialize};

use super::null_default;

/// The architectures kiln builds for, by their OCI (Go) names, each with the variant it
/// implies when none is written (`arm` is `arm/v7`).
pub const ARCHITECTURES: [(&str, Option<&str>); 9] = [
    ("amd64", None),
    ("arm64", None),
    ("arm", Some("v7")),
    ("386", None),
    ("ppc64le", None),
    ("s390x", None),
    ("riscv64", None),
    ("mips64le", None),
    ("loong64", None),
];

/// The platform an image or index entry is for.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Platform {
    /// CPU architecture (`amd64`, `arm64`, ...).
    pub architecture: String,
    /// Operating system (`linux`).
    pub os: String,
    /// CPU variant (`v7`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
    /// OS version (Windows).
    #[serde(
        rename = "os.version",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub os_version: Option<String>,
    /// OS features (Windows).
    #[serde(
        rename = "os.features",
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub os_features: Vec<String>,
}

/// A platform string that is not `os/arch[/variant]` for an architecture kiln knows.
#[derive(Debug, thiserror::Error)]
#[error("invalid platform {given:?}: {reason}")]
pub struct PlatformError {
    /// What was given.
    pub given: String,
    /// What is wrong with it.
    pub reason: String,
}

/// The OCI name of an architecture other tools name differently (`uname -m`, Debian).
fn oci_arch(arch: &str) -> (&str, Option<&'static str>) {
    match arch {
        "x86_64" | "x86-64" => ("amd64", None),
        "aarch64" => ("arm64", None),
        "i386" | "i486" | "i586" | "i686" | "x86" => ("386", None),
        "armhf" | "armv7l" | "armv7" => ("arm", Some("v7")),
        "armel" | "armv6l" | "armv6" => ("arm", Some("v6")),
        "powerpc64le" | "ppc64el" => ("ppc64le", None),
        "loongarch64" => ("loong64", None),
        other => (other, None),
    }
}

impl Platform {
    /// A platform with no OS version or features.
    pub fn new(os: &str, architecture: &str, variant: Option<&str>) -> Platform {
        Platform {
            architecture: architecture.to_string(),
            os: os.to_string(),
            variant: variant.map(str::to_string),
            os_version: None,
            os_features: Vec::new(),
        }
    }

    /// Parses `os/arch[/variant]` (as `--platform` and `FROM --platform=` take it), or a bare
    /// `arch` meaning `linux/arch`; other tools' names are accepted (`linux/aarch64`,
    /// `linux/x86_64`, `linux/armhf`) and the result is [`normalized`](Self::normalized).
    pub fn parse(s: &str) -> Result<Platform, PlatformError> {
        let err = |reason: &str| PlatformError {
            given: s.to_string(),
            reason: reason.to_string(),
        };
        let parts: Vec<&str> = s.trim().split('/').collect();
        let (os, arch, variant) = match parts.as_slice() {
            [arch] => ("linux", *arch, None),
            [os, arch] => (*os, *arch, None),
            [os, arch, variant] => (*os, *arch, Some(*variant)),
            _ => return Err(err("expected os/arch[/variant], e.g. linux/arm64")),
        };
        let lower = |p: &str| p.to_ascii_lowercase();
        let (os, arch, variant) = (lower(os), lower(arch), variant.map(lower));
        if os.is_empty() || arch.is_empty() || variant.as_deref() == Some("") {
            return Err(err("expected os/arch[/variant], e.g. linux/arm64"));
        }
        if os != "linux" {
            return Err(err("kiln builds linux images only"));
        }
        let (arch, implied) = oci_arch(&arch);
        if !ARCHITECTURES.iter().any(|(a, _)| *a == arch) {
            let known: Vec<&str> = ARCHITECTURES.iter().map(|(a, _)| *a).collect();
            return Err(err(&format!(
                "unknown architecture {arch:?} (known: {})",
                known.join(", ")
            )));
        }
        let variant = variant.or(implied.map(str::to_string));
        Ok(Platform::new(&os, arch, variant.as_deref()).normalized())
    }

    /// The host's platform, e.g. `linux/amd64`.
    pub fn host() -> Platform {
        let (arch, variant) = oci_arch(std::env::consts::ARCH);
        let arch = match arch {
            "powerpc64" if cfg!(target_endian = "little") => "ppc64le",
            "mips64" if cfg!(target_endian = "little") => "mips64le",
            other => other,
        };
        Platform::new(std::env::consts::OS, arch, variant).normalized()
    }

    /// The canonical spelling: OCI architecture names, the variant an architecture implies
    /// made explicit (`arm` → `arm/v7`) and the one that says nothing dropped (`arm64/v8` →
    /// `arm64`, as BuildKit and containerd write it).
    pub fn normalized(&self) -> Platform {
        let (arch, implied) = oci_arch(&self.architecture);
        let mut variant = self.variant.clone().filter(|v| !v.is_empty()).or_else(|| {
            ARCHITECTURES
                .iter()
                .find(|(a, _)| *a == arch)
                .and_then(|(_, v)| *v)
                .or(implied)
                .map(str::to_string)
        });
        if arch == "arm64" && matches!(variant.as_deref(), Some("v8" | "8" | "v8.0")) {
            variant = None;
        }
        if arch == "arm"
            && let Some(v) = &variant
            && !v.starts_with('v')
        {
            variant = Some(format!("v{v}"));
        }
        Platform {
            architecture: arch.to_string(),
            os: self.os.clone(),
            variant,
            os_version: self.os_version.clone(),
            os_features: self.os_features.clone(),
        }
    }

    /// Whether an image for this platform serves `wanted`: same OS and architecture, and the
    /// same variant once both are [`normalized`](Self::normalized).
    pub fn matches(&self, wanted: &Platform) -> bool {
        let (a, b) = (self.normalized(), wanted.normalized());
        a.os == b.os && a.architecture == b.architecture && a.variant == b.variant
    }

    /// True for the `unknown/unknown` entries BuildKit gives non-image manifests
    /// (attestations) in an index, and for an empty platform.
    pub fn is_unknown(&self) -> bool {
        self.os.is_empty()
            || self.architecture.is_empty()
            || self.os == "unknown"
            || self.architecture == "unknown"
    }
}

/// `linux/amd64, linux/arm64` (`none` for no platform), for messages.
pub fn platform_names(platforms: &[Platform]) -> String {
    if platforms.is_empty() {
        return "none".to_string();
    }
    let names: Vec<String> = platforms.iter().map(Platform::to_string).collect();
    names.join(", ")
}

/// `os/arch[/variant]`.
impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        match &self.variant {
            Some(v) if !v.is_empty() => write!(f, "/{v}"),
            _ => Ok(()),
        }
    }
}

impl std::str::FromStr for Platform {
    type Err = PlatformError;
    fn from_str(s: &str) -> Result<Platform, PlatformError> {
        Platform::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> String {
        Platform::parse(s).unwrap().to_string()
    }

    #[test]
    fn parses_and_normalizes_the_usual_spellings() {
        assert_eq!(p("linux/amd64"), "linux/amd64");
        assert_eq!(p("linux/x86_64"), "linux/amd64");
        assert_eq!(p("linux/arm64"), "linux/arm64");
        assert_eq!(p("linux/arm64/v8"), "linux/arm64");
        assert_eq!(p("linux/aarch64"), "linux/arm64");
        assert_eq!(p("linux/arm"), "linux/arm/v7");
        assert_eq!(p("linux/arm/v6"), "linux/arm/v6");
        assert_eq!(p("linux/arm/7"), "linux/arm/v7");
        assert_eq!(p("linux/armhf"), "linux/arm/v7");
        assert_eq!(p("linux/386"), "linux/386");
        assert_eq!(p("linux/i386"), "linux/386");
        assert_eq!(p("Linux/PPC64LE"), "linux/ppc64le");
        assert_eq!(p("s390x"), "linux/s390x");
        assert_eq!(p("linux/riscv64"), "linux/riscv64");
        for bad in [
            "",
            "linux/",
            "/amd64",
            "linux/amd64/",
            "linux/sparc",
            "a/b/c/d",
        ] {
            assert!(Platform::parse(bad).is_err(), "{bad:?}");
        }
        let e = Platform::parse("windows/amd64").unwrap_err().to_string();
        assert!(e.contains("windows/amd64") && e.contains("linux"), "{e}");
        let e = Platform::parse("linux/amd46").unwrap_err().to_string();
        assert!(e.contains("amd46") && e.contains("arm64"), "{e}");
    }

    #[test]
    fn matching_ignores_implied_variants() {
        let entry = |a: &str, v: Option<&str>| Platform::new("linux", a, v);
        let want = |s: &str| Platform::parse(s).unwrap();
        assert!(entry("arm64", Some("v8")).matches(&want("linux/arm64")));
        assert!(entry("arm64", None).matches(&want("linux/arm64/v8")));
        assert!(entry("arm", None).matches(&want("linux/arm/v7")));
        assert!(!entry("arm", Some("v6")).matches(&want("linux/arm/v7")));
        assert!(!entry("amd64", None).matches(&want("linux/arm64")));
        assert!(!Platform::new("windows", "amd64", None).matches(&want("linux/amd64")));
        assert!(Platform::host().matches(&Platform::host()));
        assert!(Platform::new("unknown", "unknown", None).is_unknown());
        assert!(!want("linux/s390x").is_unknown());
    }

    #[test]
    fn host_is_named_the_oci_way() {
        let host = Platform::host();
        assert_eq!(host.os, "linux");
        assert_ne!(host.architecture, "x86_64");
        assert_ne!(host.architecture, "aarch64");
        assert_eq!(Platform::parse(&host.to_string()).unwrap(), host);
    }
}
