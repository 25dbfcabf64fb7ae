//! OS packages from the package databases of a root filesystem: dpkg's `status` (and the
//! `status.d/` stanzas distroless images carry), apk's `installed`, with the distribution from
//! `os-release`, licences where the database or Debian's machine-readable `copyright` files
//! record them, and package URLs (purls).

use std::collections::BTreeMap;

/// The files this module reads, as paths in the image (no leading `/`).
pub fn is_database(path: &str) -> bool {
    path == DPKG_STATUS
        || path.starts_with("var/lib/dpkg/status.d/")
        || path == APK_INSTALLED
        || path == "etc/os-release"
        || path == "usr/lib/os-release"
        || (path.starts_with("usr/share/doc/") && path.ends_with("/copyright"))
}

const DPKG_STATUS: &str = "var/lib/dpkg/status";
const APK_INSTALLED: &str = "lib/apk/db/installed";

/// One installed package.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Package {
    /// `deb` or `apk`.
    pub kind: &'static str,
    /// Package name.
    pub name: String,
    /// Version as the package manager writes it.
    pub version: String,
    /// Architecture, when recorded.
    pub arch: Option<String>,
    /// The licence as an SPDX expression, when recorded.
    pub license: Option<String>,
    /// The licence as recorded, when it had to be translated.
    pub license_recorded: Option<String>,
    /// Maintainer or packager.
    pub supplier: Option<String>,
    /// Project home page.
    pub homepage: Option<String>,
    /// Short description.
    pub summary: Option<String>,
    /// The package URL.
    pub purl: String,
    /// The database it was read from.
    pub source: &'static str,
}

/// `ID` and `VERSION_ID` of `os-release`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OsRelease {
    /// `debian`, `ubuntu`, `alpine`, …
    pub id: Option<String>,
    /// `12`, `3.19.1`, …
    pub version_id: Option<String>,
}

fn parse_os_release(text: &str) -> OsRelease {
    let mut os = OsRelease::default();
    for line in text.lines() {
        if let Some((k, v)) = line.split_once('=') {
            let v = v.trim().trim_matches('"').trim_matches('\'').to_string();
            match k.trim() {
                "ID" => os.id = Some(v),
                "VERSION_ID" => os.version_id = Some(v),
                _ => {}
            }
        }
    }
    os
}

/// Stanzas of `Key: value` lines (continuation lines start with a space), separated by blank
/// lines, as dpkg writes them.
fn dpkg_stanzas(text: &str) -> Vec<BTreeMap<String, String>> {
    let mut out = Vec::new();
    let mut cur: BTreeMap<String, String> = BTreeMap::new();
    let mut last: Option<String> = None;
    for line in text.lines() {
        if line.trim().is_empty() {
            if !cur.is_empty() {
                out.push(std::mem::take(&mut cur));
            }
            last = None;
        } else if line.starts_with([' ', '\t']) {
            if let Some(v) = last.as_ref().and_then(|k| cur.get_mut(k)) {
                v.push('\n');
                v.push_str(line.trim());
            }
        } else if let Some((k, v)) = line.split_once(':') {
            cur.insert(k.trim().to_string(), v.trim().to_string());
            last = Some(k.trim().to_string());
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// Percent-encodes a purl component (everything but unreserved characters).
fn purl_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'.' | b'-' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn purl(kind: &str, os: &OsRelease, name: &str, version: &str, arch: Option<&str>) -> String {
    let namespace = os.id.clone().unwrap_or_else(|| match kind {
        "apk" => "alpine".into(),
        _ => "debian".into(),
    });
    let mut qualifiers = Vec::new();
    if let Some(a) = arch {
        qualifiers.push(format!("arch={}", purl_encode(a)));
    }
    if let Some(v) = &os.version_id {
        let distro = match kind {
            "deb" => format!("{namespace}-{v}"),
            _ => v.clone(),
        };
        qualifiers.push(format!("distro={}", purl_encode(&distro)));
    }
    let mut s = format!(
        "pkg:{kind}/{}/{}@{}",
        purl_encode(&namespace),
        purl_encode(name),
        purl_encode(version)
    );
    if !qualifiers.is_empty() {
        s.push('?');
        s.push_str(&qualifiers.join("&"));
    }
    s
}

/// SPDX identifiers for the licence names distributions use most (Debian's short names,
/// apk's mostly-SPDX ones); others become `LicenseRef-…`.
const LICENSE_NAMES: &[(&str, &str)] = &[
    ("gpl-1+", "GPL-1.0-or-later"),
    ("gpl-2", "GPL-2.0-only"),
    ("gpl-2+", "GPL-2.0-or-later"),
    ("gpl-2.0", "GPL-2.0-only"),
    ("gpl-2.0-only", "GPL-2.0-only"),
    ("gpl-2.0-or-later", "GPL-2.0-or-later"),
    ("gpl-3", "GPL-3.0-only"),
    ("gpl-3+", "GPL-3.0-or-later"),
    ("gpl-3.0-only", "GPL-3.0-only"),
    ("gpl-3.0-or-later", "GPL-3.0-or-later"),
    ("lgpl-2", "LGPL-2.0-only"),
    ("lgpl-2+", "LGPL-2.0-or-later"),
    ("lgpl-2.1", "LGPL-2.1-only"),
    ("lgpl-2.1+", "LGPL-2.1-or-later"),
    ("lgpl-2.1-only", "LGPL-2.1-only"),
    ("lgpl-2.1-or-later", "LGPL-2.1-or-later"),
    ("lgpl-3", "LGPL-3.0-only"),
    ("lgpl-3+", "LGPL-3.0-or-later"),
    ("mit", "MIT"),
    ("expat", "MIT"),
    ("isc", "ISC"),
    ("zlib", "Zlib"),
    ("apache-2.0", "Apache-2.0"),
    ("bsd-2-clause", "BSD-2-Clause"),
    ("bsd-3-clause", "BSD-3-Clause"),
    ("bsd-4-clause", "BSD-4-Clause"),
    ("mpl-2.0", "MPL-2.0"),
    ("artistic", "Artistic-1.0"),
    ("artistic-2.0", "Artistic-2.0"),
    ("openssl", "OpenSSL"),
    ("curl", "curl"),
    ("psf-2.0", "PSF-2.0"),
    ("0bsd", "0BSD"),
    ("cc0-1.0", "CC0-1.0"),
];

/// A recorded licence (`GPL-2+`, `MIT AND BSD-3-Clause`, `GPL-2.0-only OR MIT`) as an SPDX
/// expression: known names mapped, others as `LicenseRef-…`, operators kept.
pub fn spdx_expression(recorded: &str) -> Option<String> {
    let mut out = Vec::new();
    for word in recorded.split_whitespace() {
        let word = word.trim_matches(|c| c == ',' || c == ';');
        let upper = word.to_ascii_uppercase();
        if matches!(upper.as_str(), "AND" | "OR" | "WITH") {
            out.push(upper);
            continue;
        }
        if word.is_empty() || word == "(" || word == ")" {
            continue;
        }
        let known = LICENSE_NAMES
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(word))
            .map(|(_, v)| v.to_string());
        out.push(known.unwrap_or_else(|| {
            let id: String = word
                .chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                        c
                    } else {
                        '-'
                    }
                })
                .collect();
            format!("LicenseRef-{id}")
        }));
    }
    while matches!(out.last().map(String::as_str), Some("AND" | "OR" | "WITH")) {
        out.pop();
    }
    (!out.is_empty()).then(|| out.join(" "))
}

/// The licences a Debian machine-readable `copyright` file names (its `License:` fields).
fn dep5_licenses(text: &str) -> Vec<String> {
    let mut names: Vec<String> = Vec::new();
    for stanza in dpkg_stanzas(text) {
        if let Some(l) = stanza.get("License") {
            let first = l.lines().next().unwrap_or("").trim().to_string();
            if !first.is_empty() && !names.contains(&first) {
                names.push(first);
            }
        }
    }
    names
}

/// The packages recorded in `files` (path in the image → content), sorted by kind and name.
pub fn packages(files: &BTreeMap<String, Vec<u8>>) -> Vec<Package> {
    let text = |p: &str| {
        files
            .get(p)
            .map(|b| String::from_utf8_lossy(b).into_owned())
    };
    let os = text("etc/os-release")
        .or_else(|| text("usr/lib/os-release"))
        .map(|t| parse_os_release(&t))
        .unwrap_or_default();
    let mut out = Vec::new();
    let mut dpkg: Vec<(&'static str, String)> = Vec::new();
    if let Some(t) = text(DPKG_STATUS) {
        dpkg.push(("dpkg status: var/lib/dpkg/status", t));
    }
    for (path, bytes) in files.range("var/lib/dpkg/status.d/".to_string()..) {
        if !path.starts_with("var/lib/dpkg/status.d/") {
            break;
        }
        dpkg.push((
            "dpkg status: var/lib/dpkg/status.d",
            String::from_utf8_lossy(bytes).into_owned(),
        ));
    }
    for (source, t) in dpkg {
        for s in dpkg_stanzas(&t) {
            let installed = s
                .get("Status")
                .is_none_or(|st| st.split_whitespace().last() == Some("installed"));
            let (Some(name), Some(version)) = (s.get("Package"), s.get("Version")) else {
                continue;
            };
            if !installed {
                continue;
            }
            let arch = s.get("Architecture").cloned();
            let recorded = text(&format!("usr/share/doc/{name}/copyright"))
                .map(|c| dep5_licenses(&c).join(" AND "))
                .filter(|l| !l.is_empty());
            out.push(Package {
                kind: "deb",
                purl: purl("deb", &os, name, version, arch.as_deref()),
                name: name.clone(),
                version: version.clone(),
                arch,
                license: recorded.as_deref().and_then(spdx_expression),
                license_recorded: recorded,
                supplier: s.get("Maintainer").cloned(),
                homepage: s.get("Homepage").cloned(),
                summary: s
                    .get("Description")
                    .and_then(|d| d.lines().next().map(str::to_string)),
                source,
            });
        }
    }
    if let Some(t) = text(APK_INSTALLED) {
        for block in t.split("\n\n") {
            let mut f: BTreeMap<&str, &str> = BTreeMap::new();
            for line in block.lines() {
                if let Some((k, v)) = line.split_once(':') {
                    f.entry(k).or_insert(v);
                }
            }
            let (Some(name), Some(version)) = (f.get("P"), f.get("V")) else {
                continue;
            };
            let arch = f.get("A").map(|a| a.to_string());
            let recorded = f.get("L").map(|l| l.to_string());
            out.push(Package {
                kind: "apk",
                purl: purl("apk", &os, name, version, arch.as_deref()),
                name: name.to_string(),
                version: version.to_string(),
                arch,
                license: recorded.as_deref().and_then(spdx_expression),
                license_recorded: recorded,
                supplier: f.get("m").map(|m| m.to_string()),
                homepage: f.get("U").map(|u| u.to_string()),
                summary: f.get("T").map(|t| t.to_string()),
                source: "apk database: lib/apk/db/installed",
            });
        }
    }
    out.sort_by(|a, b| (a.kind, &a.name, &a.version).cmp(&(b.kind, &b.name, &b.version)));
    out.dedup_by(|a, b| a.kind == b.kind && a.name == b.name && a.version == b.version);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(entries: &[(&str, &str)]) -> BTreeMap<String, Vec<u8>> {
        entries
            .iter()
            .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
            .collect()
    }

    #[test]
    fn dpkg_status_with_licences_and_purls() {
        let status = "Package: libc6\nStatus: install ok installed\nArchitecture: amd64\nVersion: 2.36-9+deb12u4\nMaintainer: GNU Libc Maintainers <debian-glibc@lists.debian.org>\nDescription: GNU C Library: Shared libraries\n Contains the standard libraries.\n\nPackage: removed\nStatus: deinstall ok config-files\nVersion: 1\n\nPackage: tzdata\nStatus: install ok installed\nArchitecture: all\nVersion: 2024a-0+deb12u1\n";
        let copyright = "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\n\nFiles: *\nLicense: LGPL-2.1+\n\nFiles: debian/*\nLicense: GPL-2+\n Some text.\n";
        let f = files(&[
            ("var/lib/dpkg/status", status),
            ("usr/share/doc/libc6/copyright", copyright),
            ("etc/os-release", "ID=debian\nVERSION_ID=\"12\"\n"),
        ]);
        let p = packages(&f);
        assert_eq!(p.len(), 2, "{p:?}");
        assert_eq!(p[0].name, "libc6");
        assert_eq!(
            p[0].purl,
            "pkg:deb/debian/libc6@2.36-9%2Bdeb12u4?arch=amd64&distro=debian-12"
        );
        assert_eq!(
            p[0].license.as_deref(),
            Some("LGPL-2.1-or-later AND GPL-2.0-or-later")
        );
        assert_eq!(
            p[0].summary.as_deref(),
            Some("GNU C Library: Shared libraries")
        );
        assert_eq!(p[1].name, "tzdata");
        assert_eq!(p[1].license, None);
    }

    #[test]
    fn apk_installed() {
        let db = "C:Q1abc=\nP:musl\nV:1.2.4-r2\nA:x86_64\nL:MIT\nT:the musl c library\n\nP:busybox\nV:1.36.1-r15\nA:x86_64\nL:GPL-2.0-only\n";
        let f = files(&[
            ("lib/apk/db/installed", db),
            ("etc/os-release", "ID=alpine\nVERSION_ID=3.19.1\n"),
        ]);
        let p = packages(&f);
        assert_eq!(p.len(), 2);
        assert_eq!(p[0].name, "busybox");
        assert_eq!(
            p[0].purl,
            "pkg:apk/alpine/busybox@1.36.1-r15?arch=x86_64&distro=3.19.1"
        );
        assert_eq!(p[1].license.as_deref(), Some("MIT"));
    }

    #[test]
    fn licence_expressions() {
        assert_eq!(
            spdx_expression("GPL-2.0-only OR MIT").unwrap(),
            "GPL-2.0-only OR MIT"
        );
        assert_eq!(
            spdx_expression("public-domain and Custom/odd").unwrap(),
            "LicenseRef-public-domain AND LicenseRef-Custom-odd"
        );
        assert_eq!(spdx_expression("  "), None);
    }
}
