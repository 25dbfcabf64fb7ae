//! Release flags of `kiln build`: `--verify` (build a second time and compare). A build run as
//! the second build of a verification (see [`kiln::verify`]) is adjusted here too.

use std::path::{Path, PathBuf};
use std::time::Instant;

use kiln::build::BuildOptions;
use kiln::build::record::BuildRecord;
use kiln::progress::Progress;
use kiln::store::{Store, StoredRef};
use kiln::verify::{self, Outcome, RebuildSpec};

use super::Failure;

#[derive(clap::Args)]
pub(crate) struct ReleaseArgs {
    /// Build a second time in a fresh store (another context path, working directory, umask,
    /// TZ and time) and compare: exit 1 naming the first difference.
    #[arg(long)]
    pub(crate) verify: bool,
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
    for p in opts.secrets.values_mut().chain(opts.ssh.values_mut()) {
        absolute(p)?;
    }
    std::env::set_current_dir(&spec.cwd)
        .map_err(|e| Failure::usage(format!("{}: {e}", spec.cwd.display())))
}

/// Builds again and compares; Ok when both builds gave the same image.
pub(crate) fn run_verify(
    store: &Store,
    (first, record): (&StoredRef, &BuildRecord),
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
    let outcome = verify::verify(store, first, record, opts, command_line, finished, &info)
        .map_err(Failure::runtime)?;
    match outcome {
        Outcome::Reproducible(digest) => {
            progress.info(&format!("verify: reproducible, both builds gave {digest}"));
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

/// The recipe a second build reads.
pub(crate) fn rebuild_recipe(spec: &RebuildSpec) -> Result<(PathBuf, Vec<u8>), Failure> {
    let bytes = super::read_file(&spec.recipe)?;
    Ok((spec.recipe.clone(), bytes))
}

/// The context a second build reads.
pub(crate) fn rebuild_context(spec: &RebuildSpec) -> &Path {
    &spec.context
}
