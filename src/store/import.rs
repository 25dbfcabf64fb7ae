//! Loading images into the store from an OCI layout directory, an OCI archive or a
//! docker-archive (detected from the content; archives may be gzip-compressed).
//!
//! Every blob is verified against its digest before it is stored; imported indexes, manifests
//! and configs are stored byte for byte, so digests survive the round trip. A docker-archive
//! has no manifest, so kiln writes an OCI one over the archive's config and layer files as
//! they are.

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File};
use std::io::{self, BufRead, BufReader, Read};
use std::path::{Component, Path, PathBuf};

use flate2::read::GzDecoder;

use super::{IoContext, Store, StoreError, StoredImage, StoredIndex, StoredRef, read_limited};
use crate::digest::{Digest, HashingReader};
use crate::image::docker_archive::{self, ArchiveEntry};
use crate::image::{
    Descriptor, ImageConfig, Index, MEDIA_LAYER_GZIP, MEDIA_LAYER_TAR, MEDIA_LAYER_ZSTD,
    MEDIA_MANIFEST, Manifest, Platform, is_index_type, is_manifest_type,
};

/// The largest JSON document (index, manifest, config, manifest.json) read into memory.
const JSON_LIMIT: u64 = 64 << 20;

/// Imports the image at `path` (an OCI layout directory, an OCI archive or a docker-archive)
/// into `store` and records it untagged; returns it. A layout or archive naming several images
/// must have exactly one for the host platform; an image index is imported whole (every
/// manifest it lists must be there).
pub fn import(store: &Store, path: &Path) -> Result<StoredRef, StoreError> {
    let _lease = store.build_lease()?;
    let meta = fs::metadata(path).at(path)?;
    if meta.is_dir() {
        import_oci_dir(store, path, None, None)
    } else {
        import_archive(store, path)
    }
}

/// Imports the image (or index) of the OCI layout directory `dir` named `tag` (its
/// `org.opencontainers.image.ref.name`), or with no tag as [`import`] chooses.
pub fn import_layout(
    store: &Store,
    dir: &Path,
    tag: Option<&str>,
    digest: Option<&Digest>,
) -> Result<StoredRef, StoreError> {
    let _lease = store.build_lease()?;
    import_oci_dir(store, dir, tag, digest)
}

fn invalid(path: &Path, reason: impl Into<String>) -> StoreError {
    StoreError::Invalid {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// Chooses the image among the entries of a layout's `index.json`: the only one (entries
/// naming one manifest under several tags count once), else the one for the host platform.
fn choose(entries: &[Descriptor], path: &Path) -> Result<Descriptor, StoreError> {
    if let [only] = distinct(entries.iter().collect()).as_slice() {
        return Ok((*only).clone());
    }
    let host = Platform::host();
    let for_host = distinct(
        entries
            .iter()
            .filter(|d| d.platform.as_ref().is_some_and(|p| p.matches(&host)))
            .collect(),
    );
    match for_host.as_slice() {
        [d] => Ok((*d).clone()),
        _ => {
            let names: Vec<String> = entries
                .iter()
                .map(|d| {
                    d.ref_name()
                        .map_or_else(|| d.digest.to_string(), str::to_string)
                })
                .collect();
            Err(invalid(
                path,
                format!(
                    "holds {} images and none or several for the host platform {host}: {}",
                    entries.len(),
                    names.join(", ")
                ),
            ))
        }
    }
}

/// Where an import reads blobs from.
trait Source {
    /// A (small) blob's bytes, verified against its digest.
    fn read(&self, d: &Digest) -> Result<Vec<u8>, StoreError>;
    /// Makes sure a (large) blob is in the store.
    fn store_blob(&self, d: &Digest) -> Result<(), StoreError>;
}

/// Imports the manifest or index `desc` names, and everything below it, from `source`;
/// `path` is for messages. Stores manifests and indexes byte for byte; records nothing.
fn import_tree(
    store: &Store,
    source: &dyn Source,
    desc: &Descriptor,
    path: &Path,
    depth: usize,
) -> Result<StoredRef, StoreError> {
    if depth > 4 {
        return Err(invalid(path, "indexes nested too deeply"));
    }
    let bytes = source.read(&desc.digest)?;
    let media_type = if desc.media_type.is_empty() {
        Manifest::declared_media_type(&bytes).unwrap_or_else(|| MEDIA_MANIFEST.to_string())
    } else {
        desc.media_type.clone()
    };
    let stored_desc = Descriptor::new(&media_type, desc.digest, bytes.len() as u64);
    if is_index_type(&media_type) {
        let body = Index::from_json(&bytes).map_err(|source| StoreError::Format {
            what: format!("{}: index {}", path.display(), desc.digest),
            source,
        })?;
        for child in &body.manifests {
            import_tree(store, source, child, path, depth + 1)?;
        }
        store.put_blob(&bytes)?;
        return Ok(StoredRef::Index(StoredIndex {
            desc: stored_desc,
            body,
        }));
    }
    if !is_manifest_type(&media_type) {
        return Err(invalid(
            path,
            format!("{} has unsupported media type {media_type:?}", desc.digest),
        ));
    }
    let manifest_body = Manifest::from_json(&bytes).map_err(|source| StoreError::Format {
        what: format!("{}: manifest {}", path.display(), desc.digest),
        source,
    })?;
    let config_bytes = source.read(&manifest_body.config.digest)?;
    let config = parse_config(&config_bytes, &manifest_body.config.digest, path)?;
    for l in &manifest_body.layers {
        source.store_blob(&l.digest)?;
    }
    store.put_blob(&config_bytes)?;
    store.put_blob(&bytes)?;
    Ok(StoredRef::Image(StoredImage {
        config_digest: manifest_body.config.digest,
        manifest: stored_desc,
        manifest_body,
        config,
    }))
}

/// Parses a config blob.
fn parse_config(bytes: &[u8], d: &Digest, path: &Path) -> Result<ImageConfig, StoreError> {
    ImageConfig::from_json(bytes).map_err(|source| StoreError::Format {
        what: format!("{}: config {d}", path.display()),
        source,
    })
}

/// An OCI image layout directory, read in place.
struct LayoutDir<'a> {
    store: &'a Store,
    dir: &'a Path,
}

impl LayoutDir<'_> {
    fn blob_file(&self, d: &Digest) -> PathBuf {
        self.dir.join("blobs/sha256").join(d.hex())
    }
}

impl Source for LayoutDir<'_> {
    fn read(&self, d: &Digest) -> Result<Vec<u8>, StoreError> {
        let path = self.blob_file(d);
        let bytes = read_limited(File::open(&path).at(&path)?, JSON_LIMIT, &path)?;
        let actual = Digest::of(&bytes);
        if actual != *d {
            return Err(StoreError::DigestMismatch {
                what: path.display().to_string(),
                expected: *d,
                actual,
            });
        }
        Ok(bytes)
    }

    fn store_blob(&self, d: &Digest) -> Result<(), StoreError> {
        if self.store.has_blob(d) {
            return Ok(());
        }
        let path = self.blob_file(d);
        let mut w = self.store.blob_writer()?;
        io::copy(&mut File::open(&path).at(&path)?, &mut w).at(&path)?;
        w.commit_expecting(d)?;
        Ok(())
    }
}

fn import_oci_dir(
    store: &Store,
    dir: &Path,
    tag: Option<&str>,
    digest: Option<&Digest>,
) -> Result<StoredRef, StoreError> {
    let index_path = dir.join("index.json");
    if !index_path.is_file() || !dir.join("oci-layout").is_file() {
        return Err(invalid(
            dir,
            "not an OCI image layout (no index.json or oci-layout)",
        ));
    }
    let idx_bytes = read_limited(
        File::open(&index_path).at(&index_path)?,
        JSON_LIMIT,
        &index_path,
    )?;
    let idx = Index::from_json(&idx_bytes).map_err(|source| StoreError::Format {
        what: index_path.display().to_string(),
        source,
    })?;
    let top = match (digest, tag) {
        (Some(digest), _) => by_digest(&idx, dir, digest, tag)?,
        (None, None) => choose(&idx.manifests, dir)?,
        (None, Some(tag)) => {
            let tagged: Vec<Descriptor> = idx
                .manifests
                .iter()
                .filter(|d| d.ref_name() == Some(tag))
                .cloned()
                .collect();
            if tagged.is_empty() {
                return Err(invalid(dir, format!("has no image tagged {tag:?}")));
            }
            choose(&tagged, dir)?
        }
    };
    let item = import_tree(store, &LayoutDir { store, dir }, &top, dir, 0)?;
    store.record(item.descriptor())?;
    Ok(item)
}

/// The manifest or index `digest` of a layout: its `index.json` entry (tagged `tag`, when
/// given), else a blob of the layout (a platform's manifest inside an index), described by the
/// media type it declares.
fn by_digest(
    idx: &Index,
    dir: &Path,
    digest: &Digest,
    tag: Option<&str>,
) -> Result<Descriptor, StoreError> {
    let listed = idx
        .manifests
        .iter()
        .find(|d| d.digest == *digest && (tag.is_none() || d.ref_name() == tag));
    if let Some(d) = listed {
        return Ok(d.clone());
    }
    if let Some(tag) = tag {
        return Err(invalid(
            dir,
            format!("has no image tagged {tag:?} of digest {digest}"),
        ));
    }
    let path = dir.join("blobs/sha256").join(digest.hex());
    let bytes = match File::open(&path) {
        Ok(f) => read_limited(f, JSON_LIMIT, &path)?,
        Err(_) => return Err(invalid(dir, format!("has no manifest or index {digest}"))),
    };
    if Digest::of(&bytes) != *digest {
        return Err(invalid(&path, format!("does not hash to {digest}")));
    }
    let media_type = Manifest::declared_media_type(&bytes)
        .filter(|t| is_manifest_type(t) || is_index_type(t))
        .ok_or_else(|| invalid(&path, "is not an image manifest or index"))?;
    Ok(Descriptor::new(&media_type, *digest, bytes.len() as u64))
}

/// `list` with later entries for a digest already listed left out.
fn distinct(list: Vec<&Descriptor>) -> Vec<&Descriptor> {
    let mut seen = std::collections::BTreeSet::new();
    list.into_iter().filter(|d| seen.insert(d.digest)).collect()
}

/// A tar entry's path made relative and clean; `None` for paths that escape (`..`).
fn clean_path(p: &Path) -> Option<String> {
    let mut parts = Vec::new();
    for c in p.components() {
        match c {
            Component::Normal(s) => parts.push(s.to_str()?),
            Component::CurDir | Component::RootDir => {}
            Component::ParentDir => {
                parts.pop()?;
            }
            Component::Prefix(_) => return None,
        }
    }
    Some(parts.join("/"))
}

/// What a scan of an archive found.
#[derive(Default)]
struct Scan {
    /// Regular files stored as blobs: path → (digest, size).
    files: HashMap<String, (Digest, u64)>,
    /// Small table-of-contents files kept in memory: path → bytes.
    docs: HashMap<String, Vec<u8>>,
    /// Symlinks and hard links: path → target path.
    links: HashMap<String, String>,
}

impl Scan {
    /// The stored blob for archive path `p`, following links.
    fn file(&self, p: &str, archive: &Path) -> Result<(Digest, u64), StoreError> {
        let mut p = p.trim_start_matches("./").to_string();
        for _ in 0..16 {
            if let Some(found) = self.files.get(&p) {
                return Ok(*found);
            }
            match self.links.get(&p) {
                Some(target) => p = target.clone(),
                None => break,
            }
        }
        Err(invalid(archive, format!("has no file {p:?}")))
    }
}

const DOC_NAMES: [&str; 4] = ["index.json", "oci-layout", "manifest.json", "repositories"];

/// Streams the archive once: every regular file goes into the store as a blob (files under
/// `blobs/sha256/` verified against their names), the table-of-contents files into memory.
fn scan_archive(store: &Store, path: &Path) -> Result<Scan, StoreError> {
    let mut reader = BufReader::new(File::open(path).at(path)?);
    let magic = reader.fill_buf().at(path)?;
    let gz = magic.starts_with(&[0x1f, 0x8b]);
    let stream: Box<dyn Read> = if gz {
        Box::new(GzDecoder::new(reader))
    } else {
        Box::new(reader)
    };
    let mut archive = tar::Archive::new(stream);
    let mut scan = Scan::default();
    for entry in archive.entries().at(path)? {
        let mut entry = entry.at(path)?;
        let raw = entry.path().at(path)?.into_owned();
        let Some(name) = clean_path(&raw) else {
            return Err(invalid(
                path,
                format!("entry {} escapes the archive", raw.display()),
            ));
        };
        let kind = entry.header().entry_type();
        if kind.is_symlink() || kind.is_hard_link() {
            let Some(target) = entry.link_name().at(path)? else {
                continue;
            };
            let base = if kind.is_symlink() {
                Path::new(&name)
                    .parent()
                    .map(Path::to_path_buf)
                    .unwrap_or_default()
            } else {
                PathBuf::new()
            };
            if let Some(t) = clean_path(&base.join(target)) {
                scan.links.insert(name, t);
            }
            continue;
        }
        if !kind.is_file() {
            continue;
        }
        if DOC_NAMES.contains(&name.as_str()) {
            let bytes = read_limited(&mut entry, JSON_LIMIT, &path.join(&name))?;
            scan.docs.insert(name, bytes);
            continue;
        }
        // Legacy docker-archive metadata next to each layer.tar: not needed.
        if name.ends_with("/json") || name.ends_with("/VERSION") {
            continue;
        }
        let named = name
            .strip_prefix("blobs/sha256/")
            .and_then(|h| Digest::from_hex(h).ok());
        if let Some(d) = named
            && store.has_blob(&d)
        {
            scan.files
                .insert(name, (d, entry.header().size().at(path)?));
            continue;
        }
        let mut w = store.blob_writer()?;
        io::copy(&mut entry, &mut w).at(&path.join(&name))?;
        let stored = match named {
            Some(d) => w.commit_expecting(&d).map_err(|e| match e {
                StoreError::DigestMismatch {
                    expected, actual, ..
                } => StoreError::DigestMismatch {
                    what: format!("{}: {name}", path.display()),
                    expected,
                    actual,
                },
                other => other,
            })?,
            None => w.commit()?,
        };
        scan.files.insert(name, stored);
    }
    Ok(scan)
}

/// The blobs of an OCI archive, stored while it was scanned.
struct ScannedArchive<'a> {
    store: &'a Store,
    scan: &'a Scan,
    path: &'a Path,
}

impl Source for ScannedArchive<'_> {
    fn read(&self, d: &Digest) -> Result<Vec<u8>, StoreError> {
        self.store_blob(d)?;
        self.store.read_blob(d)
    }

    fn store_blob(&self, d: &Digest) -> Result<(), StoreError> {
        self.scan
            .file(&format!("blobs/sha256/{}", d.hex()), self.path)
            .map(drop)
    }
}

fn import_archive(store: &Store, path: &Path) -> Result<StoredRef, StoreError> {
    let scan = scan_archive(store, path)?;
    if let Some(idx_bytes) = scan.docs.get("index.json") {
        let idx = Index::from_json(idx_bytes).map_err(|source| StoreError::Format {
            what: format!("{}: index.json", path.display()),
            source,
        })?;
        let top = choose(&idx.manifests, path)?;
        let source = ScannedArchive {
            store,
            scan: &scan,
            path,
        };
        let item = import_tree(store, &source, &top, path, 0)?;
        store.record(item.descriptor())?;
        return Ok(item);
    }
    let Some(toc) = scan.docs.get(docker_archive::MANIFEST_FILE) else {
        return Err(invalid(
            path,
            "neither an OCI archive (no index.json) nor a docker-archive (no manifest.json)",
        ));
    };
    let entries = docker_archive::parse_manifest(toc).map_err(|source| StoreError::Format {
        what: format!("{}: manifest.json", path.display()),
        source,
    })?;
    let entry: &ArchiveEntry = match entries.as_slice() {
        [one] => one,
        _ => {
            return Err(invalid(
                path,
                format!(
                    "holds {} images; kiln imports archives of one",
                    entries.len()
                ),
            ));
        }
    };
    let (config_digest, config_size) = scan.file(&entry.config, path)?;
    let config_bytes = store.read_blob(&config_digest)?;
    let config = parse_config(&config_bytes, &config_digest, path)?;
    if config.rootfs.diff_ids.len() != entry.layers.len() {
        return Err(invalid(
            path,
            format!(
                "manifest.json lists {} layers but the config has {} diff_ids",
                entry.layers.len(),
                config.rootfs.diff_ids.len()
            ),
        ));
    }
    let mut layers = Vec::new();
    for (layer_path, diff_id) in entry.layers.iter().zip(&config.rootfs.diff_ids) {
        let (digest, size) = scan.file(layer_path, path)?;
        let media_type = layer_media_type(store, &digest, diff_id, &path.join(layer_path))?;
        layers.push(Descriptor::new(media_type, digest, size));
    }
    store
        .put_manifest(config_digest, config_size, config, layers, BTreeMap::new())
        .map(StoredRef::Image)
}

/// Checks a docker-archive layer against its diff_id and returns its media type: uncompressed
/// tar (its digest is the diff_id), or gzip or zstd (its decompressed digest is).
fn layer_media_type(
    store: &Store,
    digest: &Digest,
    diff_id: &Digest,
    what: &Path,
) -> Result<&'static str, StoreError> {
    let mut file = BufReader::new(store.open_blob(digest)?);
    let magic = file.fill_buf().at(what)?;
    let zstd = magic.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]);
    if !zstd && !magic.starts_with(&[0x1f, 0x8b]) {
        return if digest == diff_id {
            Ok(MEDIA_LAYER_TAR)
        } else {
            Err(StoreError::DigestMismatch {
                what: format!("layer {}", what.display()),
                expected: *diff_id,
                actual: *digest,
            })
        };
    }
    let (media_type, decoded): (_, Box<dyn io::Read>) = if zstd {
        let z = zstd::stream::read::Decoder::with_buffer(file).at(what)?;
        (MEDIA_LAYER_ZSTD, Box::new(z))
    } else {
        (MEDIA_LAYER_GZIP, Box::new(GzDecoder::new(file)))
    };
    let mut reader = HashingReader::new(decoded);
    io::copy(&mut reader, &mut io::sink()).at(what)?;
    let (_, actual, _) = reader.finish();
    if actual != *diff_id {
        return Err(StoreError::DigestMismatch {
            what: format!("uncompressed layer {}", what.display()),
            expected: *diff_id,
            actual,
        });
    }
    Ok(media_type)
}
