//! Named contexts (`--build-context NAME=VALUE`): extra inputs a recipe reaches by name in
//! `FROM NAME`, `COPY --from=NAME` and `RUN --mount=…,from=NAME`. A value is a directory (read
//! like the main context, through its own `.dockerignore`), `docker-image://REF`,
//! `oci-layout://DIR[:TAG][@DIGEST]` (an OCI image layout on disk) or `target:STAGE` (a stage of the
//! same recipe).

use std::path::PathBuf;

use crate::digest::Digest;

/// What a named context is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NamedSource {
    /// A directory of files.
    Dir(PathBuf),
    /// An image reference (the store first, else the registry).
    Image(String),
    /// The image of an OCI layout directory, chosen by digest or tag when given.
    OciLayout {
        /// The layout directory.
        dir: PathBuf,
        /// The `org.opencontainers.image.ref.name` to pick.
        tag: Option<String>,
        /// The manifest or index to pick (listed in `index.json` or only a blob of the layout).
        digest: Option<Digest>,
    },
    /// A stage of the recipe, by name or index.
    Stage(String),
}

/// A `--build-context` value that cannot be used; names the value.
#[derive(Debug, thiserror::Error)]
pub enum NamedError {
    /// Not `NAME=VALUE`, or an empty part.
    #[error("--build-context {0:?}: expected NAME=VALUE")]
    Syntax(String),
    /// A scheme kiln does not read.
    #[error(
        "--build-context {spec:?}: {scheme}:// is not supported (a directory, docker-image://, oci-layout:// or target:)"
    )]
    Scheme {
        /// The whole value.
        spec: String,
        /// The scheme.
        scheme: String,
    },
    /// The directory does not exist.
    #[error("--build-context {spec:?}: {path} is not a directory")]
    NotADirectory {
        /// The whole value.
        spec: String,
        /// The path.
        path: PathBuf,
    },
}

/// Parses one `--build-context NAME=VALUE`.
pub fn parse(spec: &str) -> Result<(String, NamedSource), NamedError> {
    let syntax = || NamedError::Syntax(spec.to_string());
    let (name, value) = spec.split_once('=').ok_or_else(syntax)?;
    let (name, value) = (name.trim(), value.trim());
    if name.is_empty() || value.is_empty() {
        return Err(syntax());
    }
    let source = if let Some(reference) = value.strip_prefix("docker-image://") {
        if reference.is_empty() {
            return Err(syntax());
        }
        NamedSource::Image(reference.to_string())
    } else if let Some(layout) = value.strip_prefix("oci-layout://") {
        // A digest ends the value (`@sha256:…`); the tag follows the last `:` after the last
        // `/` before it (a path may hold `:` elsewhere).
        let (layout, digest) = match layout.rsplit_once('@') {
            Some((layout, d)) if d.starts_with("sha256:") => {
                (layout, Some(d.parse::<Digest>().map_err(|_| syntax())?))
            }
            _ => (layout, None),
        };
        let slash = layout.rfind('/').map_or(0, |i| i + 1);
        let (dir, tag) = match layout[slash..].rfind(':') {
            Some(i) => (&layout[..slash + i], Some(&layout[slash + i + 1..])),
            None => (layout, None),
        };
        if dir.is_empty() || tag == Some("") {
            return Err(syntax());
        }
        NamedSource::OciLayout {
            dir: PathBuf::from(dir),
            tag: tag.map(str::to_string),
            digest,
        }
    } else if let Some(stage) = value.strip_prefix("target:") {
        if stage.is_empty() {
            return Err(syntax());
        }
        NamedSource::Stage(stage.to_string())
    } else if let Some((scheme, _)) = value.split_once("://") {
        return Err(NamedError::Scheme {
            spec: spec.to_string(),
            scheme: scheme.to_string(),
        });
    } else {
        let path = PathBuf::from(value);
        if !path.is_dir() {
            return Err(NamedError::NotADirectory {
                spec: spec.to_string(),
                path,
            });
        }
        NamedSource::Dir(path)
    };
    Ok((name.to_string(), source))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_four_kinds() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().display().to_string();
        assert_eq!(
            parse(&format!("src={d}")).unwrap(),
            ("src".into(), NamedSource::Dir(dir.path().to_path_buf()))
        );
        assert_eq!(
            parse("alpine=docker-image://busybox:1.36").unwrap().1,
            NamedSource::Image("busybox:1.36".into())
        );
        assert_eq!(
            parse("base=oci-layout:///srv/oci:v2").unwrap().1,
            NamedSource::OciLayout {
                dir: "/srv/oci".into(),
                tag: Some("v2".into()),
                digest: None
            }
        );
        assert_eq!(
            parse("base=oci-layout://./a:b/layout").unwrap().1,
            NamedSource::OciLayout {
                dir: "./a:b/layout".into(),
                tag: None,
                digest: None
            }
        );
        let hex = "a".repeat(64);
        assert_eq!(
            parse(&format!("base=oci-layout:///srv/oci:v2@sha256:{hex}"))
                .unwrap()
                .1,
            NamedSource::OciLayout {
                dir: "/srv/oci".into(),
                tag: Some("v2".into()),
                digest: Some(format!("sha256:{hex}").parse().unwrap())
            }
        );
        assert!(parse("base=oci-layout:///srv/oci@sha256:short").is_err());
        assert_eq!(
            parse("base=target:builder").unwrap().1,
            NamedSource::Stage("builder".into())
        );
    }

    #[test]
    fn bad_values_are_named() {
        for bad in ["nope", "=x", "a=", "a=docker-image://", "a=target:"] {
            assert!(matches!(parse(bad), Err(NamedError::Syntax(_))), "{bad}");
        }
        assert!(matches!(
            parse("a=https://example.com/x.tar"),
            Err(NamedError::Scheme { .. })
        ));
        let e = parse("a=/no/such/dir").unwrap_err().to_string();
        assert!(e.contains("/no/such/dir"), "{e}");
    }
}
