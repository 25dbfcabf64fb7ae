//! Exporting a built image's files rather than the image: `--output type=local,dest=DIR`
//! (`-o DIR`) writes them into a host directory through the COPY code ([`copy::run`] on a
//! [`RootDir`]), so nothing lands outside DIR whatever symlinks the image holds, owned by the
//! user running kiln; `--output type=tar,dest=FILE|-` writes them as one plain tar.

use std::io::Write;
use std::path::{Path, PathBuf};

use super::copy::{self, CopyJob, SourceFs};
use super::{BuildError, Layer};
use crate::image;
use crate::rootfs::RootDir;
use crate::sandbox;
use crate::snapshot::{self, Compression, LayerOptions};
use crate::store::{Store, StoredImage};

/// Where an image's files go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FilesDest {
    /// Into this directory (created if missing).
    Dir(PathBuf),
    /// As a tar written to this file.
    TarFile(PathBuf),
    /// As a tar written to stdout.
    TarStdout,
}

/// Why writing an image's files failed; names the destination.
#[derive(Debug, thiserror::Error)]
#[error("writing the image's files to {place}: {message}")]
pub struct ExportError {
    /// The directory, the tar file, or `stdout`.
    pub place: String,
    /// What went wrong.
    pub message: String,
}

fn export_error(dest: &FilesDest, e: impl std::fmt::Display) -> ExportError {
    let place = match dest {
        FilesDest::Dir(d) | FilesDest::TarFile(d) => d.display().to_string(),
        FilesDest::TarStdout => "stdout".to_string(),
    };
    ExportError {
        place,
        message: e.to_string(),
    }
}

/// Writes the files of `image` to `dest`. `source_date_epoch` clamps the tar's mtimes.
pub fn export_files(
    store: &Store,
    image: &StoredImage,
    dest: &FilesDest,
    source_date_epoch: Option<i64>,
) -> Result<(), ExportError> {
    // Prune waits until the layers are read.
    let _lease = store.build_lease().map_err(|e| export_error(dest, e))?;
    let lowers = image
        .manifest_body
        .layers
        .iter()
        .zip(&image.config.rootfs.diff_ids)
        .rev()
        .map(|(desc, diff_id)| {
            let mut desc = desc.clone();
            desc.media_type = image::oci_layer_type(&desc.media_type).to_string();
            unpacked_layer(
                store,
                &Layer {
                    desc,
                    diff_id: *diff_id,
                },
            )
        })
        .collect::<Result<Vec<_>, BuildError>>()
        .map_err(|e| export_error(dest, e))?;
    let scratch = store.scratch_dir().map_err(|e| export_error(dest, e))?;
    let (upper, work) = (scratch.path().join("upper"), scratch.path().join("work"));
    for d in [&upper, &work] {
        std::fs::create_dir(d).map_err(|e| export_error(dest, e))?;
    }
    sandbox::with_rootfs(&lowers, &upper, &work, |merged| {
        write_tree(merged, dest, source_date_epoch)
    })
    .map_err(|e| export_error(dest, e))?
}

/// Writes the tree at `merged` (a read-only view of the image) to `dest`.
fn write_tree(
    merged: &Path,
    dest: &FilesDest,
    source_date_epoch: Option<i64>,
) -> Result<(), ExportError> {
    let opts = LayerOptions {
        source_date_epoch,
        compression: Compression::None,
    };
    match dest {
        FilesDest::Dir(dir) => {
            std::fs::create_dir_all(dir).map_err(|e| export_error(dest, e))?;
            let source = RootDir::open_host(merged).map_err(|e| export_error(dest, e))?;
            let target = RootDir::open_host(dir).map_err(|e| export_error(dest, e))?;
            let job = CopyJob {
                chown: Some((
                    nix::unistd::geteuid().as_raw(),
                    nix::unistd::getegid().as_raw(),
                )),
                ..CopyJob::tree(SourceFs::Rootfs(&source), "")
            };
            copy::run(&target, &job).map_err(|e| export_error(dest, e))
        }
        FilesDest::TarFile(path) => {
            let file = std::fs::File::create(path).map_err(|e| export_error(dest, e))?;
            let (mut out, _) = snapshot::write_layer(merged, &opts, std::io::BufWriter::new(file))
                .map_err(|e| export_error(dest, e))?;
            out.flush().map_err(|e| export_error(dest, e))
        }
        FilesDest::TarStdout => {
            let stdout = std::io::stdout().lock();
            let (mut out, _) =
                snapshot::write_layer(merged, &opts, std::io::BufWriter::new(stdout))
                    .map_err(|e| export_error(dest, e))?;
            out.flush().map_err(|e| export_error(dest, e))
        }
    }
}

/// The unpacked dir of a layer of a stored image, unpacking its blob once if needed.
fn unpacked_layer(store: &Store, layer: &Layer) -> Result<PathBuf, BuildError> {
    if let Some(dir) = store.layer_dir(&layer.diff_id) {
        return Ok(dir);
    }
    let failed = |e: &dyn std::fmt::Display| {
        BuildError::Image(format!("unpacking layer {}: {e}", layer.desc.digest))
    };
    let scratch = store.scratch_dir()?;
    let dir = scratch.path().join("layer");
    std::fs::create_dir(&dir).map_err(|e| failed(&e))?;
    let blob = store.open_blob(&layer.desc.digest)?;
    // (Ownership notes of a user namespace matter to RUN steps, not to the exported files.)
    let diff_id = snapshot::unpack_layer(std::io::BufReader::new(blob), &dir)
        .map_err(|e| failed(&e))?
        .diff_id;
    if diff_id != layer.diff_id {
        return Err(failed(&format!(
            "its diff_id is {diff_id}, but the image config says {}",
            layer.diff_id
        )));
    }
    Ok(store.install_layer_dir(&layer.diff_id, &dir)?)
}
