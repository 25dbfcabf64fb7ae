//! The sandbox a build's RUN steps get: how kiln runs (as root, or as a normal user in a user
//! namespace), which snapshotter makes rootfses, which limits apply and how; said once at the
//! start of the build in progress output, with warnings for what cannot be done here.

use super::{BuildError, BuildOptions};
use crate::progress::Progress;
use crate::sandbox::{Sandbox, snapshotter, userns};
use crate::store::Store;

/// Sets up the build's sandbox and tells progress how it runs; returns it with the kind of
/// layers its snapshotter makes steps write ([`Snapshotter::layer_kind`]).
///
/// [`Snapshotter::layer_kind`]: snapshotter::Snapshotter::layer_kind
pub(super) fn prepare(
    opts: &BuildOptions,
    store: &Store,
    progress: &Progress,
) -> Result<(Sandbox, &'static str), BuildError> {
    if let Some(rootless) = userns::entered() {
        progress.info(&rootless.describe());
        if let Some(w) = &rootless.warning {
            progress.warn(w);
        }
    }
    let probe_dir = store.scratch_dir()?;
    let choice = snapshotter::choose(probe_dir.path()).map_err(BuildError::Sandbox)?;
    drop(probe_dir);
    progress.info(&choice.describe());
    if let Some(w) = &choice.warning {
        progress.warn(w);
    }
    if matches!(choice.snapshotter, snapshotter::Snapshotter::Copy) {
        progress.warn("no overlay filesystem can be mounted here: every step copies its rootfs");
    }
    let plan = opts.limits.plan().map_err(BuildError::Sandbox)?;
    for note in &plan.notes {
        progress.info(note);
    }
    for w in &plan.warnings {
        progress.warn(w);
    }
    let sandbox = Sandbox::new(opts.helper_exe.clone()).with_limits(plan);
    Ok((sandbox, choice.snapshotter.layer_kind()))
}
