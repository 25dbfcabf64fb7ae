//! Release flags of `kiln build`: `--attest` / `--provenance` / `--sbom` (attestations) and
//! `--verify` (build a second time and compare). A build run as the second build of a
//! verification (see [`kiln::verify`]) is adjusted here too.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Instant, SystemTime};

use kiln::attest::{self, AttestOptions, provenance};
use kiln::build::{BuildOptions, Built, PlatformBuilt};
use kiln::progress::Progress;
use kiln::store::{Store, StoredImage, StoredRef};
use kiln::verify::{self, Outcome, RebuildSpec};

use super::Failure;

#[derive(clap::Args)]
pub(crate) struct ReleaseArgs {
    /// Attach an attestation: type=provenance[,mode=min|max] or type=sbom (repeatable).
    #[arg(long = "attest", value_name = "SPEC")]
    attest: Vec<String>,
    /// Shorthand for --attest type=provenance: true (mode=min), false, mode=min or mode=max.
    #[arg(long, value_name = "VALUE", num_args = 0..=1, default_missing_value = "true")]
    provenance: Option<String>,
    /// Shorthand for --attest type=sbom: true or false.
    #[arg(long, value_name = "BOOL", num_args = 0..=1, default_missing_value = "true")]
    sbom: Option<String>,
    /// Build a second time in a fresh store (another context path, working directory, umask,
    /// TZ and time) and compare: exit 1 naming the first difference.
    #[arg(long)]
    pub(crate) verify: bool,
}

impl ReleaseArgs {
    /// The attestations asked for.
    pub(crate) fn attestations(&self) -> Result<AttestOptions, Failure> {
        let mut which = AttestOptions::default();
        for spec in &self.attest {
            let mut fields = BTreeMap::new();
            for part in spec.split(',') {
                let (k, v) = part.split_once('=').ok_or_else(|| {
                    Failure::usage(format!(
                        "--attest {spec:?}: expected key=value pairs (type=provenance[,mode=min|max] or type=sbom)"
                    ))
                })?;
                fields.insert(k, v);
            }
            let disabled = match fields.remove("disabled") {
                None | Some("false") => false,
                Some("true") => true,
                Some(other) => {
                    return Err(Failure::usage(format!(
                        "--attest {spec:?}: disabled={other:?} is not true or false"
                    )));
                }
            };
            match fields.remove("type") {
                Some("provenance") => {
                    let mode = match fields.remove("mode") {
                        None | Some("min") => provenance::Mode::Min,
                        Some("max") => provenance::Mode::Max,
                        Some(other) => {
                            return Err(Failure::usage(format!(
                                "--attest {spec:?}: mode={other:?} is not min or max"
                            )));
                        }
                    };
                    which.provenance = (!disabled).then_some(mode);
                }
                Some("sbom") => which.sbom = !disabled,
                other => {
                    return Err(Failure::usage(format!(
                        "--attest {spec:?}: unknown type {other:?} (provenance, sbom)"
                    )));
                }
            }
            if let Some(k) = fields.keys().next() {
                return Err(Failure::usage(format!(
                    "--attest {spec:?}: unknown key {k:?}"
                )));
            }
        }
        if let Some(v) = &self.provenance {
            which.provenance = match v.as_str() {
                "true" | "1" | "mode=min" => Some(provenance::Mode::Min),
                "mode=max" => Some(provenance::Mode::Max),
                "false" | "0" => None,
                other => {
                    return Err(Failure::usage(format!(
                        "--provenance={other:?}: expected true, false, mode=min or mode=max"
                    )));
                }
            };
        }
        if let Some(v) = &self.sbom {
            which.sbom = match v.as_str() {
                "true" | "1" => true,
                "false" | "0" => false,
                other => {
                    return Err(Failure::usage(format!(
                        "--sbom={other:?}: expected true or false"
                    )));
                }
            };
        }
        Ok(which)
    }
}

/// Attaches the attestations asked for to a build's result: an index of its images, each
/// with an attestation manifest. `tags` name the image (the first that is not the second
/// build's own name is the one the statements show).
pub(crate) fn attach(
    store: &Store,
    built: &Built,
    opts: &BuildOptions,
    which: AttestOptions,
    (tags, started): (&[String], SystemTime),
) -> Result<StoredRef, Failure> {
    let times = opts.source_date_epoch.is_none().then(|| {
        let secs = |t: SystemTime| {
            t.duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs() as i64)
        };
        provenance::Times {
            started: kiln::image::rfc3339(secs(started)),
            finished: kiln::image::rfc3339(secs(SystemTime::now())),
        }
    });
    let name = tags.iter().find(|t| *t != verify::REBUILD_TAG);
    let build = attest::Build {
        opts,
        built,
        name: name.map(String::as_str),
        times,
    };
    let index = attest::attest_images(store, &build, which).map_err(Failure::runtime)?;
    Ok(StoredRef::Index(store.put_index(&index)?))
}

/// The one image a docker-archive can hold from a result: the image itself, or the single
/// image of an index that adds only attestations (which a docker-archive cannot carry).
pub(crate) fn single_image(
    item: &StoredRef,
    store: &Store,
) -> Result<Option<StoredImage>, Failure> {
    Ok(match item {
        StoredRef::Image(img) => Some(img.clone()),
        StoredRef::Index(x) => {
            let images: Vec<_> = x
                .body
                .manifests
                .iter()
                .filter(|d| !kiln::image::is_attestation(d))
                .collect();
            match images.as_slice() {
                [only] => store
                    .present_images(x)?
                    .into_iter()
                    .find(|i| i.manifest.digest == only.digest),
                _ => None,
            }
        }
    })
}

/// The spec of the second build of a verification, when this process is one.
pub(crate) fn rebuild_spec() -> Result<Option<RebuildSpec>, Failure> {
    RebuildSpec::from_env()
        .transpose()
        .map_err(Failure::runtime)
}

/// Makes a second build's relative paths absolute (they were given relative to the first
/// build's working directory) and moves into its own working directory.
pub(crate) fn enter_rebuild(spec: &RebuildSpec, opts: &mut BuildOptions) -> Result<(), Failure> {
    let absolute = |p: &mut PathBuf| -> Result<(), Failure> {
        *p = std::path::absolute(&*p)
            .map_err(|e| Failure::usage(format!("{}: {e}", p.display())))?;
        Ok(())
    };
    let secret_files = opts.secrets.values_mut().filter_map(|s| match s {
        kiln::build::SecretSource::File(p) => Some(p),
        kiln::build::SecretSource::Value(_) => None,
    });
    for p in secret_files.chain(opts.ssh.values_mut()) {
        absolute(p)?;
    }
    std::env::set_current_dir(&spec.cwd)
        .map_err(|e| Failure::usage(format!("{}: {e}", spec.cwd.display())))
}

/// Builds again and compares; Ok when both builds gave the same image.
pub(crate) fn run_verify(
    store: &Store,
    (first, platforms): (&StoredRef, &[PlatformBuilt]),
    opts: &BuildOptions,
    progress: &Progress,
    finished: Instant,
) -> Result<(), Failure> {
    if opts.source_date_epoch.is_none() {
        progress.warn(
            "--verify without SOURCE_DATE_EPOCH: the two builds record the times they ran, so they differ",
        );
    }
    let command_line = std::env::args_os().skip(1).collect();
    let info = |s: &str| progress.info(s);
    let outcome = verify::verify(store, first, platforms, opts, command_line, finished, &info)
        .map_err(Failure::runtime)?;
    match outcome {
        Outcome::Reproducible(digest) => {
            progress.info(&format!("verify: reproducible, both builds gave {digest}"));
            Ok(())
        }
        Outcome::SameButCacheStates(digest) => {
            progress.info(&format!(
                "verify: reproducible, both builds gave the same images and attestations but for the provenance's cache states (the second build ran every step); this build gave {digest}"
            ));
            Ok(())
        }
        Outcome::Differs(report) => {
            for line in report.to_text().lines() {
                progress.info(&format!("verify: {line}"));
            }
            let first = report.first_difference().unwrap_or_default();
            let mut f = Failure::runtime(NotReproducible(first));
            if opts.source_date_epoch.is_none() {
                f = f.hint("pass --source-date-epoch N (or set SOURCE_DATE_EPOCH), e.g. the time of the last commit: git log -1 --format=%ct");
            }
            Err(f)
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("the build is not reproducible: {0}")]
struct NotReproducible(String);
