//! Image references with Docker's normalisation: `busybox` is
//! `docker.io/library/busybox:latest`, `localhost:5000/app` keeps its registry, a digest
//! (`name@sha256:…`) pins the content.

use std::fmt;

use crate::digest::Digest;

/// The registry that short names resolve to.
pub const DEFAULT_REGISTRY: &str = "docker.io";
/// The tag used when none is given.
pub const DEFAULT_TAG: &str = "latest";

/// A parsed, normalised image reference.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Reference {
    /// Registry host (with port), e.g. `docker.io` or `127.0.0.1:5000`.
    pub registry: String,
    /// Repository path, e.g. `library/busybox`.
    pub repository: String,
    /// Tag; `latest` when neither tag nor digest was given.
    pub tag: Option<String>,
    /// Digest, when the reference pins one.
    pub digest: Option<Digest>,
}

/// A string that is not a valid image reference.
#[derive(Debug, thiserror::Error)]
#[error("invalid image reference {reference:?}: {reason}")]
pub struct ReferenceError {
    /// The reference as given.
    pub reference: String,
    /// What is wrong with it.
    pub reason: &'static str,
}

impl Reference {
    /// Parses and normalises `s`.
    pub fn parse(s: &str) -> Result<Reference, ReferenceError> {
        let err = |reason| ReferenceError {
            reference: s.to_string(),
            reason,
        };
        if s.is_empty() || s.len() > 4096 {
            return Err(err("empty or too long"));
        }
        let (rest, digest) = match s.split_once('@') {
            Some((r, d)) => (r, Some(d.parse::<Digest>().map_err(|_| err("bad digest"))?)),
            None => (s, None),
        };
        // A tag is after the last ':' that comes after the last '/'.
        let last_slash = rest.rfind('/').map_or(0, |i| i + 1);
        let (name, tag) = match rest[last_slash..].rfind(':') {
            Some(i) => (&rest[..last_slash + i], Some(&rest[last_slash + i + 1..])),
            None => (rest, None),
        };
        if let Some(t) = tag {
            let ok = !t.is_empty()
                && t.len() <= 128
                && t.chars()
                    .next()
                    .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
                && t.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c));
            if !ok {
                return Err(err("bad tag"));
            }
        }
        let (registry, repository) = match name.split_once('/') {
            Some((first, path))
                if first.contains('.') || first.contains(':') || first == "localhost" =>
            {
                (first.to_string(), path.to_string())
            }
            _ => (DEFAULT_REGISTRY.to_string(), name.to_string()),
        };
        let registry = if registry == "index.docker.io" {
            DEFAULT_REGISTRY.to_string()
        } else {
            registry
        };
        let repository = if registry == DEFAULT_REGISTRY && !repository.contains('/') {
            format!("library/{repository}")
        } else {
            repository
        };
        if repository.is_empty()
            || !repository.split('/').all(|c| {
                !c.is_empty()
                    && c.chars().all(|ch| {
                        ch.is_ascii_lowercase() || ch.is_ascii_digit() || "._-".contains(ch)
                    })
                    && c.chars()
                        .next()
                        .is_some_and(|ch| ch.is_ascii_alphanumeric())
            })
        {
            return Err(err(
                "repository names are lower-case letters, digits and separators",
            ));
        }
        let tag = match (tag, &digest) {
            (Some(t), _) => Some(t.to_string()),
            (None, Some(_)) => None,
            (None, None) => Some(DEFAULT_TAG.to_string()),
        };
        Ok(Reference {
            registry,
            repository,
            tag,
            digest,
        })
    }

    /// `registry/repository` without tag or digest.
    pub fn name(&self) -> String {
        format!("{}/{}", self.registry, self.repository)
    }

    /// The short form people type: `busybox:latest` for Docker Hub library images.
    pub fn familiar(&self) -> String {
        let full = self.to_string();
        match full.strip_prefix("docker.io/") {
            Some(rest) => rest.strip_prefix("library/").unwrap_or(rest).to_string(),
            None => full,
        }
    }
}

/// True when `authority` (`host` or `host:port`) names the loopback interface: `localhost`,
/// `127.0.0.0/8` or `[::1]`.
pub fn is_loopback_host(authority: &str) -> bool {
    let host = match authority.rsplit_once(':') {
        Some((h, port)) if port.chars().all(|c| c.is_ascii_digit()) => h,
        _ => authority,
    };
    let host = host.to_ascii_lowercase();
    host == "localhost"
        || host == "[::1]"
        || host
            .parse::<std::net::Ipv4Addr>()
            .is_ok_and(|ip| ip.is_loopback())
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalises_like_docker() {
        let cases = [
            ("busybox", "docker.io/library/busybox:latest"),
            ("busybox:1.36", "docker.io/library/busybox:1.36"),
            ("user/app", "docker.io/user/app:latest"),
            ("index.docker.io/user/app:v1", "docker.io/user/app:v1"),
            ("localhost:5000/app", "localhost:5000/app:latest"),
            ("127.0.0.1:5000/a/b:t", "127.0.0.1:5000/a/b:t"),
            ("quay.io/x/y", "quay.io/x/y:latest"),
            ("localhost/app", "localhost/app:latest"),
        ];
        for (input, want) in cases {
            assert_eq!(
                Reference::parse(input).unwrap().to_string(),
                want,
                "{input}"
            );
        }
    }

    #[test]
    fn familiar_form() {
        assert_eq!(
            Reference::parse("busybox").unwrap().familiar(),
            "busybox:latest"
        );
        assert_eq!(Reference::parse("a/b:1").unwrap().familiar(), "a/b:1");
        assert_eq!(
            Reference::parse("localhost:5000/a").unwrap().familiar(),
            "localhost:5000/a:latest"
        );
    }

    #[test]
    fn digests() {
        let d = Digest::of(b"x");
        let r = Reference::parse(&format!("busybox@{d}")).unwrap();
        assert_eq!(r.tag, None);
        assert_eq!(r.digest, Some(d));
        assert_eq!(r.to_string(), format!("docker.io/library/busybox@{d}"));
    }

    #[test]
    fn rejects_bad() {
        for bad in [
            "",
            "Busybox",
            "a:",
            "a:-x",
            "a@sha256:zz",
            "a//b",
            "/a",
            "a/",
        ] {
            assert!(Reference::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn loopback() {
        assert!(is_loopback_host(
            &Reference::parse("127.0.0.1:5000/a").unwrap().registry
        ));
        assert!(is_loopback_host(
            &Reference::parse("localhost:1/a").unwrap().registry
        ));
        assert!(!is_loopback_host(
            &Reference::parse("quay.io/a").unwrap().registry
        ));
        assert!(!is_loopback_host(
            &Reference::parse("127.example.com/a").unwrap().registry
        ));
        assert!(is_loopback_host("[::1]:5000"));
        assert!(is_loopback_host("127.1.2.3"));
        assert!(!is_loopback_host("[::2]:5000"));
    }
}
