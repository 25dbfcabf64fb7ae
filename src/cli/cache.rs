//! `--cache-to`, `--cache-from` and `--metadata-file`: the shared build cache's flags, turned
//! into [`kiln::cache`] imports and exports, and writing the metadata file.

use std::collections::BTreeMap;
use std::path::PathBuf;

use kiln::build::Built;
use kiln::cache::{Export, ExportTarget, Import, Mode};
use kiln::registry::Reference;

use super::Failure;

/// BuildKit options of cache exports that change nothing in kiln's (it always writes an OCI
/// image manifest with OCI media types, its layers as built).
const IGNORED: [&str; 6] = [
    "image-manifest",
    "oci-mediatypes",
    "compression",
    "compression-level",
    "force-compression",
    "tag",
];

#[derive(clap::Args)]
pub(crate) struct CacheArgs {
    /// Export the build cache (repeatable): type=registry,ref=REF[,mode=min|max]
    /// [,ignore-error=BOOL] | type=local,dest=DIR[,mode=min|max] | type=inline.
    #[arg(long = "cache-to", value_name = "SPEC")]
    cache_to: Vec<String>,
    /// Import a build cache, asked after the local store, in order (repeatable):
    /// type=registry,ref=REF | type=local,src=DIR | REF.
    #[arg(long = "cache-from", value_name = "SPEC")]
    cache_from: Vec<String>,
    /// Write the build's metadata (JSON: image digests, names, and every step) to FILE.
    #[arg(long = "metadata-file", value_name = "FILE")]
    metadata_file: Option<PathBuf>,
}

/// The cache flags, parsed.
pub(crate) struct CacheFlags {
    pub(crate) imports: Vec<Import>,
    pub(crate) exports: Vec<Export>,
    pub(crate) metadata_file: Option<PathBuf>,
}

impl CacheArgs {
    /// Forgets the shared caches and the metadata file, for the second build of `--verify`:
    /// it builds every step itself (a shared cache would hand it the first build's layers)
    /// and writes nothing but its image.
    pub(crate) fn clear(&mut self) {
        self.cache_to.clear();
        self.cache_from.clear();
        self.metadata_file = None;
    }

    pub(crate) fn parse(&self) -> Result<CacheFlags, Failure> {
        Ok(CacheFlags {
            imports: self
                .cache_from
                .iter()
                .map(|s| parse_cache_from(s))
                .collect::<Result<_, _>>()?,
            exports: self
                .cache_to
                .iter()
                .map(|s| parse_cache_to(s))
                .collect::<Result<_, _>>()?,
            metadata_file: self.metadata_file.clone(),
        })
    }
}

/// `key=value,…` fields of a spec; unknown keys are an error.
fn fields<'s>(
    flag: &str,
    spec: &'s str,
    known: &[&str],
) -> Result<BTreeMap<&'s str, &'s str>, Failure> {
    let mut out = BTreeMap::new();
    for part in spec.split(',').filter(|p| !p.is_empty()) {
        let (k, v) = part
            .split_once('=')
            .ok_or_else(|| Failure::usage(format!("{flag} {spec:?}: expected key=value pairs")))?;
        if IGNORED.contains(&k) {
            continue;
        }
        if !known.contains(&k) {
            return Err(Failure::usage(format!(
                "{flag} {spec:?}: unknown option {k:?} (known: {})",
                known.join(", ")
            )));
        }
        out.insert(k, v);
    }
    Ok(out)
}

fn reference(flag: &str, spec: &str, r: Option<&&str>) -> Result<Reference, Failure> {
    let r = r.ok_or_else(|| Failure::usage(format!("{flag} {spec:?}: ref= is required")))?;
    Reference::parse(r).map_err(Failure::input)
}

fn dir(flag: &str, spec: &str, key: &str, d: Option<&&str>) -> Result<PathBuf, Failure> {
    d.filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .ok_or_else(|| Failure::usage(format!("{flag} {spec:?}: {key}= is required")))
}

fn boolean(flag: &str, spec: &str, v: &str) -> Result<bool, Failure> {
    match v {
        "true" | "1" => Ok(true),
        "false" | "0" => Ok(false),
        _ => Err(Failure::usage(format!(
            "{flag} {spec:?}: {v:?} is not true or false"
        ))),
    }
}

fn unsupported(flag: &str, spec: &str, t: Option<&str>) -> Failure {
    Failure::usage(format!(
        "{flag} {spec:?}: unsupported cache type {:?} (registry, local{})",
        t.unwrap_or(""),
        if flag == "--cache-to" { ", inline" } else { "" }
    ))
}

/// One `--cache-from`: `type=registry,ref=REF`, `type=local,src=DIR` or a bare `REF`.
pub(crate) fn parse_cache_from(spec: &str) -> Result<Import, Failure> {
    const FLAG: &str = "--cache-from";
    if !spec.contains('=') {
        return Reference::parse(spec)
            .map(Import::Registry)
            .map_err(Failure::input);
    }
    let f = fields(FLAG, spec, &["type", "ref", "src"])?;
    match f.get("type").copied() {
        Some("registry") => Ok(Import::Registry(reference(FLAG, spec, f.get("ref"))?)),
        Some("local") => Ok(Import::Dir(dir(FLAG, spec, "src", f.get("src"))?)),
        t => Err(unsupported(FLAG, spec, t)),
    }
}

/// One `--cache-to`: `type=registry,ref=REF[,mode=…][,ignore-error=…]`,
/// `type=local,dest=DIR[,mode=…]` or `type=inline`.
pub(crate) fn parse_cache_to(spec: &str) -> Result<Export, Failure> {
    const FLAG: &str = "--cache-to";
    let f = fields(FLAG, spec, &["type", "ref", "dest", "mode", "ignore-error"])?;
    let mode = match f.get("mode").copied() {
        None | Some("min") => Mode::Min,
        Some("max") => Mode::Max,
        Some(m) => {
            return Err(Failure::usage(format!(
                "{FLAG} {spec:?}: mode={m} (min or max)"
            )));
        }
    };
    let ignore_error = match f.get("ignore-error") {
        Some(v) => boolean(FLAG, spec, v)?,
        None => true,
    };
    let target = match f.get("type").copied() {
        Some("registry") => ExportTarget::Registry(reference(FLAG, spec, f.get("ref"))?),
        Some("local") => ExportTarget::Dir(dir(FLAG, spec, "dest", f.get("dest"))?),
        Some("inline") if mode == Mode::Max => {
            return Err(Failure::usage(format!(
                "{FLAG} {spec:?}: inline records are the image's own steps (mode=min); \
                 use type=registry or type=local for mode=max"
            )));
        }
        Some("inline") => ExportTarget::Inline,
        t => return Err(unsupported(FLAG, spec, t)),
    };
    Ok(Export {
        target,
        mode,
        ignore_error,
    })
}

/// Writes the `--metadata-file` document.
pub(crate) fn write_metadata(
    path: &PathBuf,
    built: &Built,
    names: &[String],
) -> Result<(), Failure> {
    let doc = kiln::build::report::metadata(&built.image, names, &built.steps);
    let mut bytes = serde_json::to_vec_pretty(&doc).map_err(Failure::runtime)?;
    bytes.push(b'\n');
    std::fs::write(path, bytes)
        .map_err(|e| Failure::usage(format!("writing {}: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_from_specs() {
        let r = |s: &str| Import::Registry(Reference::parse(s).unwrap());
        assert_eq!(
            parse_cache_from("127.0.0.1:5000/c:main").ok(),
            Some(r("127.0.0.1:5000/c:main"))
        );
        assert_eq!(
            parse_cache_from("type=registry,ref=reg.io/c").ok(),
            Some(r("reg.io/c"))
        );
        assert_eq!(
            parse_cache_from("type=local,src=/tmp/c").ok(),
            Some(Import::Dir("/tmp/c".into()))
        );
        for bad in [
            "type=gha",
            "type=registry",
            "type=local",
            "type=local,dest=/x",
            "type=registry,ref=UPPER/Case",
            "not a reference",
        ] {
            let f = parse_cache_from(bad)
                .err()
                .unwrap_or_else(|| panic!("{bad} parsed"));
            assert_eq!(f.code, 2, "{bad}");
        }
    }

    #[test]
    fn cache_to_specs() {
        let e = parse_cache_to("type=registry,ref=r.io/c:1,mode=max,ignore-error=false").ok();
        assert_eq!(
            e,
            Some(Export {
                target: ExportTarget::Registry(Reference::parse("r.io/c:1").unwrap()),
                mode: Mode::Max,
                ignore_error: false,
            })
        );
        let e = parse_cache_to("type=local,dest=/c,image-manifest=true,oci-mediatypes=true").ok();
        assert_eq!(
            e,
            Some(Export {
                target: ExportTarget::Dir("/c".into()),
                mode: Mode::Min,
                ignore_error: true,
            })
        );
        assert_eq!(
            parse_cache_to("type=inline").ok().map(|e| e.target),
            Some(ExportTarget::Inline)
        );
        for bad in [
            "type=inline,mode=max",
            "type=registry,ref=r.io/c,mode=all",
            "type=registry,ref=r.io/c,ignore-error=maybe",
            "type=local",
            "type=s3,bucket=x",
            "type=registry,ref=r.io/c,colour=blue",
        ] {
            let f = parse_cache_to(bad)
                .err()
                .unwrap_or_else(|| panic!("{bad} parsed"));
            assert_eq!(f.code, 2, "{bad}");
        }
    }
}
