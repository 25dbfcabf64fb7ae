//! `kiln build --verify`: after a build, build the same recipe a second time in a separate,
//! fresh store — from a copy of the context at another path, in another working directory,
//! under another umask and TZ, at least a second later by the wall clock — and compare the two
//! results with [`image::diff`](crate::image::diff).
//!
//! The second build is a child kiln process given the same command line, so every flag carries
//! over as the user wrote it; [`REBUILD_ENV`] tells the child where its store, context copy,
//! recipe and working directory are, and that it only builds (no tags, outputs or pushes).
//! The images the first build read (FROM, COPY --from, RUN --mount from=) are copied into the
//! fresh store by digest: they are inputs, not part of what is verified. A name read as
//! several images (one per platform of a multi-platform build) names an index of them there.
//! The second build asks no shared cache (`--cache-from`) and exports none: it builds every
//! step itself.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fs;
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::attest::provenance;
use crate::build::{BuildOptions, PlatformBuilt};
use crate::compare::{self, CompareError};
use crate::digest::Digest;
use crate::image::diff::Report;
use crate::image::{Descriptor, Index};
use crate::store::{Store, StoreError, StoredImage, StoredRef};

/// The environment variable that makes a `kiln build` the second build of a verification; its
/// value is a JSON [`RebuildSpec`].
pub const REBUILD_ENV: &str = "KILN_VERIFY_REBUILD";

/// The name the second build gives its result in its store.
pub const REBUILD_TAG: &str = "docker.io/library/kiln-verify:latest";

/// How long after the first build the second one starts, at least: any clock reading with a
/// resolution of a second a step takes differs between the two.
const CLOCK_GAP: Duration = Duration::from_millis(1100);

/// Where the second build of a verification runs.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RebuildSpec {
    /// Its fresh store.
    pub root: PathBuf,
    /// The copy of the context.
    pub context: PathBuf,
    /// The copy of the recipe.
    pub recipe: PathBuf,
    /// The working directory it builds in (after reading its command line where the first
    /// build read it).
    pub cwd: PathBuf,
}

impl RebuildSpec {
    /// The spec in [`REBUILD_ENV`], if this process is a second build.
    pub fn from_env() -> Option<Result<RebuildSpec, VerifyError>> {
        let raw = std::env::var_os(REBUILD_ENV)?;
        Some(
            serde_json::from_slice(raw.as_encoded_bytes())
                .map_err(|e| VerifyError::Spec(e.to_string())),
        )
    }
}

/// Why a verification could not be carried out (a difference is not an error: see
/// [`Outcome`]).
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// Preparing the second build failed.
    #[error("preparing the second build: {0}")]
    Prepare(String),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The second build failed.
    #[error("the second build failed ({0}); its messages are above")]
    Rebuild(String),
    /// The spec in the environment is unreadable.
    #[error("{REBUILD_ENV}: {0}")]
    Spec(String),
    /// Comparing the two results failed.
    #[error(transparent)]
    Compare(#[from] CompareError),
}

/// What a verification found.
pub enum Outcome {
    /// Both builds gave this image (manifest digest).
    Reproducible(Digest),
    /// Both builds gave the same images and attestations but for the steps' cache states in
    /// the provenance (the first build took steps from a cache; the second, in a fresh store,
    /// ran them all); the digest is the first build's result.
    SameButCacheStates(Digest),
    /// They differ.
    Differs(Box<Report>),
}

/// The conditions the second build runs under, chosen to differ from this process's.
#[derive(Debug)]
pub struct Conditions {
    /// Its umask.
    pub umask: u32,
    /// Its TZ.
    pub tz: String,
}

impl Conditions {
    /// A umask and a TZ other than this process's.
    pub fn other_than_ours() -> Conditions {
        // SAFETY: umask only swaps the process's mask; it is put back at once.
        let ours = unsafe {
            let old = libc::umask(0o022);
            libc::umask(old);
            old
        } as u32;
        let umask = if ours & 0o077 == 0o077 { 0o002 } else { 0o077 };
        let tz = match std::env::var("TZ").ok().as_deref() {
            Some("KLN-13:45") => "KLN+11:15",
            _ => "KLN-13:45",
        };
        Conditions {
            umask,
            tz: tz.to_string(),
        }
    }
}

/// Builds again and compares. `first` is the result of the build just made into `store` (with
/// its attestations, if any; finished at `finished`), `platforms` what that build read;
/// `command_line` is this process's arguments after the program name, passed to the child as
/// they are.
#[allow(clippy::too_many_arguments)]
pub fn verify(
    store: &Store,
    first: &StoredRef,
    platforms: &[PlatformBuilt],
    opts: &BuildOptions,
    command_line: Vec<OsString>,
    finished: Instant,
    report: &dyn Fn(&str),
) -> Result<Outcome, VerifyError> {
    let prepare = |what: &str, e: io::Error| VerifyError::Prepare(format!("{what}: {e}"));
    let work = store.scratch_dir()?;
    let elsewhere = work.path().join("elsewhere");
    let context = elsewhere.join("context");
    copy_tree(&opts.context_dir, &context).map_err(|e| prepare("copying the context", e))?;
    let recipe = place_recipe(opts, &context, &elsewhere.join("recipe"))
        .map_err(|e| prepare("copying the recipe", e))?;
    let cwd = work.path().join("cwd");
    fs::create_dir(&cwd).map_err(|e| prepare("making a working directory", e))?;
    let root = work.path().join("store");
    let second = Store::open(&root)?;
    let mut inputs: BTreeMap<&str, BTreeMap<Digest, &Descriptor>> = BTreeMap::new();
    for part in platforms {
        for (reference, manifest) in &part.record.images {
            inputs
                .entry(reference)
                .or_default()
                .insert(manifest.digest, manifest);
        }
    }
    for (reference, manifests) in inputs {
        copy_input(store, &second, reference, &manifests)?;
    }
    drop(second);

    let conditions = Conditions::other_than_ours();
    let spec = RebuildSpec {
        root: root.clone(),
        context,
        recipe,
        cwd,
    };
    if let Some(wait) = CLOCK_GAP.checked_sub(finished.elapsed()) {
        std::thread::sleep(wait);
    }
    report(&format!(
        "verify: building again in a fresh store ({}), context at {}, working directory {}, umask {:04o}, TZ={}",
        root.display(),
        spec.context.display(),
        spec.cwd.display(),
        conditions.umask,
        conditions.tz
    ));
    let json = serde_json::to_string(&spec).map_err(|e| VerifyError::Spec(e.to_string()))?;
    let umask = conditions.umask as libc::mode_t;
    let mut child = Command::new(&opts.helper_exe);
    child
        .args(command_line)
        .env(REBUILD_ENV, json)
        .env("TZ", &conditions.tz)
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    // SAFETY: umask is async-signal-safe and touches only the child's own mask.
    unsafe {
        child.pre_exec(move || {
            libc::umask(umask);
            Ok(())
        });
    }
    let status = child
        .status()
        .map_err(|e| VerifyError::Rebuild(format!("{}: {e}", opts.helper_exe.display())))?;
    if !status.success() {
        return Err(VerifyError::Rebuild(status.to_string()));
    }

    let second = Store::open(&root)?;
    let rebuilt = second
        .lookup(REBUILD_TAG)?
        .ok_or_else(|| VerifyError::Rebuild(format!("its result is not in {}", root.display())))?;
    let scratch = work.path().join("compare");
    fs::create_dir(&scratch).map_err(|e| prepare("making a scratch directory", e))?;
    let mut report = compare::compare_refs(
        (store, first, "first build"),
        (&second, &rebuilt, "second build"),
        &scratch,
    )?;
    let runs_differ = drop_cache_states(&mut report);
    let digest = first.descriptor().digest;
    Ok(match (report.identical, runs_differ) {
        (true, false) => Outcome::Reproducible(digest),
        (true, true) => Outcome::SameButCacheStates(digest),
        (false, _) => Outcome::Differs(Box::new(report)),
    })
}

/// Leaves out of `report` the steps' cache states a `mode=max` provenance lists: the second
/// build runs in a fresh store, so its steps are all misses whatever the first build took from
/// a cache; they say how each build went, not what it made. Returns whether there were any.
fn drop_cache_states(report: &mut Report) -> bool {
    let steps = format!(
        "[{}].predicate.buildDefinition.internalParameters.steps[",
        serde_json::Value::from(provenance::PREDICATE_TYPE)
    );
    let before = report.index.len();
    report.index.retain(|c| {
        !(c.field.starts_with("attestations[")
            && c.field.contains(&steps)
            && c.field.ends_with("].cache"))
    });
    report.settle();
    report.index.len() != before
}

/// Copies the recipe where the second build reads it: at the same place in the context copy
/// when it is inside the context, else into `dir` (with its `.dockerignore`, if it has one).
fn place_recipe(opts: &BuildOptions, context: &Path, dir: &Path) -> io::Result<PathBuf> {
    let real_context = fs::canonicalize(&opts.context_dir)?;
    if let Ok(real) = fs::canonicalize(&opts.recipe_path)
        && let Ok(rel) = real.strip_prefix(&real_context)
    {
        return Ok(context.join(rel));
    }
    fs::create_dir_all(dir)?;
    let name = opts
        .recipe_path
        .file_name()
        .filter(|_| opts.recipe_path.is_file())
        .map_or_else(|| OsString::from("Dockerfile"), OsString::from);
    let dest = dir.join(&name);
    fs::write(&dest, &opts.recipe_bytes)?;
    let mut ignore = opts.recipe_path.clone().into_os_string();
    ignore.push(".dockerignore");
    if Path::new(&ignore).is_file() {
        let mut dest_ignore = dest.clone().into_os_string();
        dest_ignore.push(".dockerignore");
        fs::copy(&ignore, &dest_ignore)?;
    }
    Ok(dest)
}

/// Copies the images read as `reference` from one store to another and names them there: the
/// image, or an index of the images when the platforms built read several.
fn copy_input(
    from: &Store,
    to: &Store,
    reference: &str,
    manifests: &BTreeMap<Digest, &Descriptor>,
) -> Result<(), VerifyError> {
    let images = manifests
        .values()
        .map(|m| copy_image(from, to, reference, m))
        .collect::<Result<Vec<_>, _>>()?;
    match images.as_slice() {
        [one] => to.tag(reference, &one.manifest)?,
        _ => {
            let entries = images.iter().map(StoredImage::index_entry).collect();
            let index = to.put_index(&Index::of(entries))?;
            to.tag(reference, &index.desc)?;
        }
    }
    Ok(())
}

/// Copies an image (manifest, config, layers) from one store to another.
fn copy_image(
    from: &Store,
    to: &Store,
    reference: &str,
    manifest: &Descriptor,
) -> Result<StoredImage, VerifyError> {
    if !from.has_blob(&manifest.digest) {
        return Err(VerifyError::Prepare(format!(
            "{reference} ({}) is no longer in the store",
            manifest.digest
        )));
    }
    let image = from.load_image(manifest)?;
    let body = &image.manifest_body;
    let blobs = std::iter::once(&image.manifest.digest)
        .chain(std::iter::once(&body.config.digest))
        .chain(body.layers.iter().map(|l| &l.digest));
    for d in blobs {
        if to.has_blob(d) {
            continue;
        }
        let mut w = to.blob_writer()?;
        let mut src = from.open_blob(d)?;
        io::copy(&mut src, &mut w).map_err(|e| VerifyError::Prepare(format!("blob {d}: {e}")))?;
        w.commit_expecting(d)?;
    }
    Ok(image)
}

/// Copies a directory tree faithfully (modes, owners, mtimes, xattrs, symlinks, hard links);
/// sockets, FIFOs and devices are left out. Access times are not kept: nothing may depend on
/// them.
pub fn copy_tree(src: &Path, dest: &Path) -> io::Result<()> {
    let mut links: std::collections::BTreeMap<(u64, u64), PathBuf> = Default::default();
    let mut dirs = Vec::new();
    for entry in walkdir::WalkDir::new(src).sort_by_file_name() {
        let entry = entry.map_err(io::Error::other)?;
        let rel = entry.path().strip_prefix(src).map_err(io::Error::other)?;
        let target = dest.join(rel);
        let meta = entry.path().symlink_metadata()?;
        let kind = meta.file_type();
        if kind.is_dir() {
            fs::create_dir_all(&target)?;
            dirs.push((target, meta));
            continue;
        }
        if kind.is_symlink() {
            std::os::unix::fs::symlink(fs::read_link(entry.path())?, &target)?;
        } else if kind.is_file() {
            let key = (meta.dev(), meta.ino());
            if meta.nlink() > 1
                && let Some(first) = links.get(&key)
            {
                fs::hard_link(first, &target)?;
                continue;
            }
            fs::copy(entry.path(), &target)?;
            links.insert(key, target.clone());
        } else {
            continue;
        }
        copy_metadata(entry.path(), &target, &meta)?;
    }
    // Directories last, deepest first: filling them changed their mtimes.
    for (dir, meta) in dirs.iter().rev() {
        let original = src.join(dir.strip_prefix(dest).map_err(io::Error::other)?);
        copy_metadata(&original, dir, meta)?;
    }
    Ok(())
}

fn copy_metadata(src: &Path, dest: &Path, meta: &fs::Metadata) -> io::Result<()> {
    let symlink = meta.file_type().is_symlink();
    std::os::unix::fs::lchown(dest, Some(meta.uid()), Some(meta.gid()))?;
    if !symlink {
        // After chown, which clears setuid bits.
        fs::set_permissions(dest, fs::Permissions::from_mode(meta.mode() & 0o7777))?;
        if let Ok(names) = xattr::list(src) {
            for name in names {
                if let Ok(Some(value)) = xattr::get(src, &name) {
                    xattr::set(dest, &name, &value)?;
                }
            }
        }
    }
    let times = [
        libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_NOW,
        },
        libc::timespec {
            tv_sec: meta.mtime(),
            tv_nsec: meta.mtime_nsec(),
        },
    ];
    let c =
        std::ffi::CString::new(dest.as_os_str().as_encoded_bytes()).map_err(io::Error::other)?;
    // SAFETY: a valid NUL-terminated path and two timespecs, as utimensat expects.
    let rc = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c.as_ptr(),
            times.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_tree_keeps_what_a_build_can_see() {
        let src = tempfile::tempdir().unwrap();
        let dest = tempfile::tempdir().unwrap();
        let s = src.path();
        fs::create_dir(s.join("d")).unwrap();
        fs::write(s.join("d/f"), b"content").unwrap();
        fs::set_permissions(s.join("d/f"), fs::Permissions::from_mode(0o751)).unwrap();
        fs::hard_link(s.join("d/f"), s.join("h")).unwrap();
        std::os::unix::fs::symlink("d/f", s.join("l")).unwrap();
        let _ = xattr::set(s.join("d/f"), "user.kiln", b"x");
        let old = libc::timespec {
            tv_sec: 1_000_000,
            tv_nsec: 5,
        };
        for p in ["d/f", "d"] {
            let c = std::ffi::CString::new(s.join(p).to_str().unwrap()).unwrap();
            unsafe { libc::utimensat(libc::AT_FDCWD, c.as_ptr(), [old, old].as_ptr(), 0) };
        }
        let out = dest.path().join("copy");
        copy_tree(s, &out).unwrap();
        let m = fs::metadata(out.join("d/f")).unwrap();
        assert_eq!(m.mode() & 0o7777, 0o751);
        assert_eq!((m.mtime(), m.mtime_nsec()), (1_000_000, 5));
        assert_eq!(fs::metadata(out.join("d")).unwrap().mtime(), 1_000_000);
        assert_eq!(fs::read(out.join("d/f")).unwrap(), b"content");
        assert_eq!(fs::read_link(out.join("l")).unwrap(), Path::new("d/f"));
        assert_eq!(m.ino(), fs::metadata(out.join("h")).unwrap().ino());
        if xattr::get(s.join("d/f"), "user.kiln")
            .ok()
            .flatten()
            .is_some()
        {
            assert_eq!(
                xattr::get(out.join("d/f"), "user.kiln").unwrap().as_deref(),
                Some(&b"x"[..])
            );
        }
    }

    #[test]
    fn conditions_differ_from_ours() {
        let c = Conditions::other_than_ours();
        let ours = unsafe {
            let old = libc::umask(0o022);
            libc::umask(old);
            old
        } as u32;
        assert_ne!(c.umask, ours);
        assert_ne!(Some(c.tz), std::env::var("TZ").ok());
    }
}
