//! Named contexts in the executor: opening them before the build (a directory with its own
//! ignore file, an OCI layout imported into the store), and what `FROM NAME`,
//! `COPY --from=NAME` and `RUN --mount=…,from=NAME` get from them. A directory's files are
//! digested like the main context's for cache keys.

use std::collections::BTreeMap;
use std::path::PathBuf;

use super::copy::{self, CopyJob, SourceFs};
use super::report::Cached;
use super::{BuildError, Engine, StageState, StepPlace, scratch_state};
use crate::image::Platform;
use crate::plan::StepInputs;
use crate::progress::StepLabel;
use crate::rootfs::RootDir;
use crate::sources::context::Context;
use crate::sources::named::NamedSource;
use crate::store::{self, Store, StoredRef};

/// A named context, ready to use.
pub(super) enum Named {
    /// A directory, read like the main context.
    Dir(Context),
    /// An image reference, loaded (or pulled) when first used.
    Image(String),
    /// An OCI layout's image, imported into the store.
    Layout(Box<StoredRef>),
}

/// What a `--from` or mount source naming a context reads.
pub(super) enum NamedFiles<'a> {
    /// A directory's files.
    Dir(&'a Context),
    /// An image's files.
    Image(Box<StageState>),
}

/// Opens the named contexts of a build (`target:` ones are the plan's and skipped).
pub(super) fn open_named(
    store: &Store,
    named: &BTreeMap<String, NamedSource>,
) -> Result<BTreeMap<String, Named>, BuildError> {
    let mut out = BTreeMap::new();
    for (name, source) in named {
        let opened = match source {
            NamedSource::Stage(_) => continue,
            NamedSource::Dir(dir) => {
                Named::Dir(Context::open(dir, None).map_err(BuildError::ContextDir)?)
            }
            NamedSource::Image(reference) => Named::Image(reference.clone()),
            NamedSource::OciLayout { dir, tag, digest } => Named::Layout(Box::new(
                store::import_layout(store, dir, tag.as_deref(), digest.as_ref()).map_err(|e| {
                    BuildError::NamedContext {
                        name: name.clone(),
                        message: e.to_string(),
                    }
                })?,
            )),
        };
        out.insert(name.clone(), opened);
    }
    Ok(out)
}

impl Engine<'_> {
    /// The named context `name`, for `COPY --from` and `RUN --mount from=`.
    /// `platform` is the one of the stage that uses it.
    pub(super) fn named_files(
        &self,
        name: &str,
        line: usize,
        platform: &Platform,
    ) -> Result<NamedFiles<'_>, BuildError> {
        match self.named.get(name) {
            Some(Named::Dir(ctx)) => Ok(NamedFiles::Dir(ctx)),
            Some(Named::Image(reference)) => Ok(NamedFiles::Image(Box::new(
                self.load_image(reference, line, platform)?,
            ))),
            Some(Named::Layout(item)) => {
                let image = match &**item {
                    StoredRef::Image(image) => Some(image.clone()),
                    StoredRef::Index(index) => self.store.image_in(index, platform)?,
                }
                .ok_or_else(|| BuildError::NamedContext {
                    name: name.to_string(),
                    message: format!("the OCI layout has no image for {platform}"),
                })?;
                Ok(NamedFiles::Image(Box::new(self.image_state(
                    &image,
                    name,
                    platform,
                    Cached::Local,
                )?)))
            }
            None => Err(self.invalid(line, format!("unknown build context {name:?}"))),
        }
    }

    /// `FROM NAME` of a named context: the image, or for a directory a stage holding its files
    /// as one layer (cached by their content, like `COPY . /` from the main context).
    pub(super) fn named_base(
        &self,
        name: &str,
        stage: usize,
        line: usize,
        label: StepLabel,
    ) -> Result<StageState, BuildError> {
        let platform = &self.plan.stages[stage].platform;
        let ctx = match self.named_files(name, line, platform)? {
            NamedFiles::Image(st) => return Ok(*st),
            NamedFiles::Dir(ctx) => ctx,
        };
        let mut st = scratch_state(platform);
        let inputs = StepInputs {
            instruction: format!("FROM context {name}"),
            files: dir_digests(ctx, "").map_err(self.context_err(line))?,
            ..Default::default()
        };
        let place = StepPlace {
            stage,
            n: usize::MAX,
            line,
            // No host path: the image must not depend on where the directory is.
            created_by: format!("FROM {name} (a build context directory)"),
        };
        let copy_all = |root: &RootDir, _: Option<&RootDir>| -> Result<(), BuildError> {
            let job = CopyJob::tree(SourceFs::Context(ctx), "");
            copy::run(root, &job).map_err(|e| self.step_error(stage, line, e))
        };
        let step = self.progress.step(label);
        self.rootfs_step(
            &mut st,
            place,
            inputs,
            step,
            (None, super::steps::Layering::Stacked, None),
            copy_all,
        )?;
        Ok(st)
    }
}

/// Content digests of a directory context at and under `rel`, as COPY keys them.
pub(super) fn dir_digests(
    ctx: &Context,
    rel: &str,
) -> Result<BTreeMap<String, String>, crate::sources::context::ContextError> {
    ctx.digest_entries(&ctx.walk(rel)?)
}

impl Engine<'_> {
    /// What a `RUN --mount=…,from=NAME` of a directory context mounts: the directory itself, or
    /// when its ignore file excludes something, a copy of what the ignore file keeps (in a
    /// scratch dir that must live until the step ends).
    pub(super) fn dir_mount_view(
        &self,
        ctx: &Context,
        stage: usize,
        line: usize,
    ) -> Result<(PathBuf, Option<tempfile::TempDir>), BuildError> {
        if ctx.ignore_rules().is_empty() {
            return Ok((ctx.root().to_path_buf(), None));
        }
        let scratch = self.store.scratch_dir()?;
        let view = scratch.path().join("view");
        std::fs::create_dir(&view).map_err(|e| self.step_error(stage, line, e))?;
        let root = RootDir::open_host(&view).map_err(|e| self.step_error(stage, line, e))?;
        let job = CopyJob::tree(SourceFs::Context(ctx), "");
        copy::run(&root, &job).map_err(|e| self.step_error(stage, line, e))?;
        Ok((view, Some(scratch)))
    }
}
