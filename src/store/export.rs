//! Writing a stored image or index out: an OCI image layout directory, the same layout as one
//! tar (OCI archive), or (an image only) a docker-archive (`docker load` format, which kiln
//! writes as an OCI layout plus `manifest.json`, the way Docker 25+ does). Archives are
//! deterministic: entries sorted, mtime 0, uid/gid 0, fixed modes.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::{self, BufWriter, Read, Write};
use std::path::Path;

use tempfile::NamedTempFile;

use super::writeback::WritebackFile;
use super::{IoContext, Store, StoreError, StoredImage, StoredRef};
use crate::digest::{Digest, HashingReader};
use crate::image::docker_archive::{self, ArchiveEntry};
use crate::image::{ANNOTATION_REF_NAME, Descriptor, Index, canonical_json, is_attestation};

/// The `oci-layout` file's content.
pub(super) const OCI_LAYOUT: &[u8] = br#"{"imageLayoutVersion":"1.0.0"}"#;

/// The annotation containerd and Docker use for the full image name in an archive's index.
const ANNOTATION_IMAGE_NAME: &str = "io.containerd.image.name";

/// The layout index entry for `item`: its descriptor (an image's with its platform) and
/// `annotations`.
fn index_entry(item: &StoredRef, annotations: BTreeMap<String, String>) -> Descriptor {
    let mut d = match item {
        StoredRef::Image(img) => img.index_entry(),
        StoredRef::Index(x) => x.desc.clone(),
    };
    d.annotations = annotations;
    d
}

fn ref_annotations(ref_name: Option<&str>) -> BTreeMap<String, String> {
    ref_name
        .map(|n| BTreeMap::from([(ANNOTATION_REF_NAME.to_string(), n.to_string())]))
        .unwrap_or_default()
}

/// Writes `bytes` to `dest` through a temp file in the same directory and a rename.
fn write_file_atomic(dest: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    let dir = dest.parent().unwrap_or(Path::new("."));
    let mut tmp = NamedTempFile::new_in(dir).at(dir)?;
    tmp.write_all(bytes).at(tmp.path())?;
    super::persist_synced(tmp, dest)
}

/// Copies blob `d` from the store into `blobs_dir`, verifying its digest on the way unless
/// this `Store` wrote (and hashed) the blob itself. Those are hard-linked when `blobs_dir` is
/// on the store's filesystem (blobs are immutable: nothing ever writes to one in place), else
/// copied in the kernel.
fn copy_blob(store: &Store, d: &Digest, blobs_dir: &Path) -> Result<(), StoreError> {
    let dest = blobs_dir.join(d.hex());
    if dest.is_file() {
        return Ok(());
    }
    if store.wrote_blob(d) && fs::hard_link(store.blob_path(d), &dest).is_ok() {
        return Ok(());
    }
    let tmp = NamedTempFile::new_in(blobs_dir).at(blobs_dir)?;
    let mut src = store.open_blob(d)?;
    if store.wrote_blob(d) {
        let mut out = WritebackFile::new(tmp);
        out.copy_from(&mut src).at(&dest)?;
        return super::persist_synced(out.into_inner(), &dest);
    }
    let mut reader = HashingReader::new(src);
    // Through a 1 MiB buffer: io::copy reads straight into it (8 KiB chunks otherwise).
    let mut buffered = io::BufWriter::with_capacity(1 << 20, WritebackFile::new(tmp));
    io::copy(&mut reader, &mut buffered).at(&dest)?;
    let tmp = buffered
        .into_inner()
        .map_err(|e| StoreError::Io {
            path: dest.clone(),
            source: e.into_error(),
        })?
        .into_inner();
    let (_, actual, _) = reader.finish();
    if actual != *d {
        return Err(StoreError::DigestMismatch {
            what: format!("blob {}", store.blob_path(d).display()),
            expected: *d,
            actual,
        });
    }
    super::persist_synced(tmp, &dest)
}

/// Writes `item` (an image, or an index with all its images) into the OCI image layout
/// directory `dest` (created if missing; an existing layout is added to). With `ref_name`, the
/// index entry is named by it (replacing an entry of that name).
pub fn export_oci_dir(
    store: &Store,
    item: &StoredRef,
    dest: &Path,
    ref_name: Option<&str>,
) -> Result<(), StoreError> {
    let blobs = store.blobs_of(item)?;
    let blobs_dir = dest.join("blobs/sha256");
    fs::create_dir_all(&blobs_dir).at(&blobs_dir)?;
    for d in blobs {
        copy_blob(store, &d, &blobs_dir)?;
    }
    write_file_atomic(&dest.join("oci-layout"), OCI_LAYOUT)?;
    let index_path = dest.join("index.json");
    let mut idx = match fs::read(&index_path) {
        Ok(bytes) => Index::from_json(&bytes).map_err(|source| StoreError::Format {
            what: index_path.display().to_string(),
            source,
        })?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => Index::default(),
        Err(e) => {
            return Err(StoreError::Io {
                path: index_path,
                source: e,
            });
        }
    };
    let entries = layout_entries(item, ref_annotations(ref_name));
    idx.manifests.retain(|d| {
        let named_alike = match (ref_name, d.ref_name()) {
            (Some(want), Some(have)) => want == have,
            (None, None) => d.digest == entries[0].digest,
            _ => false,
        };
        !named_alike && !entries.iter().any(|e| e.digest == d.digest)
    });
    idx.manifests.extend(entries);
    write_file_atomic(&index_path, &canonical_json(&idx))
}

/// The entries of a layout directory's `index.json` for `item`, named by `annotations`: one
/// entry for an image or an index, except for an index of one image and its attestations,
/// whose entries are listed directly (the image named) — the layout's `index.json` is itself
/// an image index, and tools that unpack one image by name (umoci) find exactly one under it.
fn layout_entries(item: &StoredRef, annotations: BTreeMap<String, String>) -> Vec<Descriptor> {
    if let StoredRef::Index(x) = item {
        let (attestations, images): (Vec<&Descriptor>, Vec<&Descriptor>) =
            x.body.manifests.iter().partition(|d| is_attestation(d));
        if let [image] = images.as_slice()
            && !attestations.is_empty()
        {
            let mut named = (*image).clone();
            named.annotations.extend(annotations);
            let mut out = vec![named];
            out.extend(attestations.into_iter().cloned());
            return out;
        }
    }
    vec![index_entry(item, annotations)]
}

/// Writes `item` as an OCI archive: a tar of an OCI image layout holding just this image (or
/// index, with all its images).
pub fn export_oci_archive(
    store: &Store,
    item: &StoredRef,
    dest: &Path,
    ref_name: Option<&str>,
) -> Result<(), StoreError> {
    // One entry (the index itself), so that readers taking "the image in the archive" find one.
    let idx = Index::of(vec![index_entry(item, ref_annotations(ref_name))]);
    let files = layout_files(store.blobs_of(item)?, &idx);
    write_tar(store, dest, files)
}

/// Writes `img` as a docker-archive loadable by `docker load`, tagged with `tags`
/// (`name:tag`; `docker.io/library/` prefixes are shortened the way Docker writes them). The
/// format holds images of one platform each, so an index cannot be written as one.
pub fn export_docker_archive(
    store: &Store,
    img: &StoredImage,
    dest: &Path,
    tags: &[String],
) -> Result<(), StoreError> {
    let familiar: Vec<String> = tags
        .iter()
        .map(|t| docker_archive::familiar_name(t).to_string())
        .collect();
    let mut manifests: Vec<Descriptor> = tags
        .iter()
        .map(|t| {
            let mut ann = BTreeMap::from([(ANNOTATION_IMAGE_NAME.to_string(), t.clone())]);
            let (_, tag) = super::split_name(t);
            if tag != "<none>" {
                ann.insert(ANNOTATION_REF_NAME.to_string(), tag);
            }
            let mut d = img.index_entry();
            d.annotations = ann;
            d
        })
        .collect();
    if manifests.is_empty() {
        manifests.push(img.index_entry());
    }
    let idx = Index::of(manifests);
    let item = StoredRef::Image(img.clone());
    let mut files = layout_files(store.blobs_of(&item)?, &idx);
    let blob_path = |d: &Digest| format!("blobs/sha256/{}", d.hex());
    let entry = ArchiveEntry {
        config: blob_path(&img.manifest_body.config.digest),
        repo_tags: familiar,
        layers: img
            .manifest_body
            .layers
            .iter()
            .map(|l| blob_path(&l.digest))
            .collect(),
    };
    files.insert(
        docker_archive::MANIFEST_FILE.to_string(),
        Source::Bytes(docker_archive::write_manifest(&[entry])),
    );
    write_tar(store, dest, files)
}

/// What an archive entry holds.
enum Source {
    Bytes(Vec<u8>),
    Blob(Digest),
}

/// The files of an OCI layout holding `blobs`, with `idx` as its index.
fn layout_files(blobs: BTreeSet<Digest>, idx: &Index) -> BTreeMap<String, Source> {
    let mut files: BTreeMap<String, Source> = blobs
        .into_iter()
        .map(|d| (format!("blobs/sha256/{}", d.hex()), Source::Blob(d)))
        .collect();
    files.insert("oci-layout".into(), Source::Bytes(OCI_LAYOUT.to_vec()));
    files.insert("index.json".into(), Source::Bytes(canonical_json(idx)));
    files
}

fn tar_header(kind: tar::EntryType, size: u64, mode: u32) -> tar::Header {
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(kind);
    h.set_size(size);
    h.set_mode(mode);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    h
}

/// Writes `files` (sorted by path, parent directories first) as a tar at `dest`, atomically.
fn write_tar(
    store: &Store,
    dest: &Path,
    files: BTreeMap<String, Source>,
) -> Result<(), StoreError> {
    let dir = match dest.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let tmp = NamedTempFile::new_in(dir).at(dir)?;
    let tmp_path = tmp.path().to_path_buf();
    let mut builder = tar::Builder::new(BufWriter::new(tmp));
    let mut dirs_done = BTreeSet::new();
    for (path, source) in &files {
        for (i, _) in path.match_indices('/') {
            let parent = &path[..=i];
            if dirs_done.insert(parent.to_string()) {
                let mut h = tar_header(tar::EntryType::Directory, 0, 0o755);
                builder
                    .append_data(&mut h, parent, io::empty())
                    .at(&tmp_path)?;
            }
        }
        match source {
            Source::Bytes(bytes) => {
                let mut h = tar_header(tar::EntryType::Regular, bytes.len() as u64, 0o644);
                builder
                    .append_data(&mut h, path, bytes.as_slice())
                    .at(&tmp_path)?;
            }
            Source::Blob(d) => {
                let file = store.open_blob(d)?;
                let blob_path = store.blob_path(d);
                let size = file.metadata().at(&blob_path)?.len();
                let mut reader = HashingReader::new(file.take(size));
                let mut h = tar_header(tar::EntryType::Regular, size, 0o644);
                builder
                    .append_data(&mut h, path, &mut reader)
                    .at(&tmp_path)?;
                let (_, actual, _) = reader.finish();
                if actual != *d {
                    return Err(StoreError::DigestMismatch {
                        what: format!("blob {}", blob_path.display()),
                        expected: *d,
                        actual,
                    });
                }
            }
        }
    }
    let buffered = builder.into_inner().at(&tmp_path)?;
    let tmp = buffered.into_inner().map_err(|e| StoreError::Io {
        path: tmp_path.clone(),
        source: e.into_error(),
    })?;
    super::persist_synced(tmp, dest)
}
