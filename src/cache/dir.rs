//! A cache in an OCI layout directory (`--cache-to type=local,dest=DIR`, `--cache-from
//! type=local,src=DIR`), for CI systems that keep a directory between jobs. The layout holds
//! one cache artifact, named `latest`; an export replaces it under a lock on the directory and
//! then removes the blobs nothing references any more.

use std::collections::BTreeSet;
use std::fs::{self, File};
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use serde::Deserialize;
use tempfile::NamedTempFile;

use super::record::{self, CONFIG_LIMIT, CONFIG_TYPE, CacheDoc, RecordSet};
use super::{CacheBackend, CacheError, Hit, Lookup, Miss, Record, origin};
use crate::digest::{Digest, HashingReader};
use crate::image::{ANNOTATION_REF_NAME, Descriptor, MEDIA_INDEX, MEDIA_MANIFEST, canonical_json};
use crate::store::Store;

/// Largest `index.json` or manifest read.
const DOC_LIMIT: u64 = 4 << 20;

/// A cache in an OCI layout directory.
pub struct DirCache<'a> {
    store: &'a Store,
    dir: PathBuf,
    name: String,
    records: RecordSet,
}

#[derive(Deserialize)]
struct IndexWire {
    #[serde(default)]
    manifests: Vec<EntryWire>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct EntryWire {
    #[serde(default)]
    media_type: String,
    digest: Digest,
    #[serde(default)]
    artifact_type: Option<String>,
}

impl<'a> DirCache<'a> {
    /// The cache in `dir`, to export to.
    pub fn new(store: &'a Store, dir: PathBuf) -> DirCache<'a> {
        DirCache {
            store,
            name: dir.display().to_string(),
            dir,
            records: RecordSet::default(),
        }
    }

    /// The cache in `dir` with its records loaded; what is wrong with it comes back as
    /// warnings (see [`RegistryCache::open`](super::RegistryCache::open)).
    pub fn open(store: &'a Store, dir: PathBuf) -> (DirCache<'a>, Vec<String>) {
        let mut cache = DirCache::new(store, dir);
        let (records, warnings) = super::loaded(&cache.name, cache.load());
        cache.records = records;
        (cache, warnings)
    }

    fn blob_path(&self, d: &Digest) -> PathBuf {
        self.dir.join("blobs/sha256").join(d.hex())
    }

    /// Reads a small blob of the layout, verifying its digest.
    fn read_blob(&self, d: &Digest, limit: u64) -> Result<Vec<u8>, String> {
        let path = self.blob_path(d);
        let bytes = read_limited(&path, limit)?;
        if Digest::of(&bytes) != *d {
            return Err(format!("{} does not match its digest", path.display()));
        }
        Ok(bytes)
    }

    fn load(&self) -> Result<(RecordSet, Vec<String>), String> {
        let index_path = self.dir.join("index.json");
        if !index_path.is_file() {
            return Err("not found (nothing was exported there yet?)".into());
        }
        let index: IndexWire = serde_json::from_slice(&read_limited(&index_path, DOC_LIMIT)?)
            .map_err(|e| format!("{}: {e}", index_path.display()))?;
        let entry = index
            .manifests
            .iter()
            .find(|m| m.artifact_type.as_deref() == Some(record::ARTIFACT_TYPE))
            .or_else(|| {
                index
                    .manifests
                    .iter()
                    .find(|m| m.media_type == MEDIA_MANIFEST)
            })
            .ok_or("index.json lists no manifest")?;
        let manifest = self.read_blob(&entry.digest, DOC_LIMIT)?;
        match record::classify(&manifest)? {
            CacheDoc::Artifact { config, layers } => {
                RecordSet::parse(&self.read_blob(&config.digest, CONFIG_LIMIT)?, &layers)
            }
            CacheDoc::Inline { records, layers } => RecordSet::parse(records.as_bytes(), &layers),
            CacheDoc::Other => Err("not a kiln cache".into()),
        }
    }

    /// Writes blob `d` into the layout unless it is there: copied from the store (which
    /// fetches a promised blob first), verified on the way.
    fn put_blob(&self, d: &Descriptor) -> Result<(), CacheError> {
        let dest = self.blob_path(&d.digest);
        if fs::metadata(&dest).is_ok_and(|m| m.len() == d.size) {
            return Ok(());
        }
        let src = self.store.open_blob(&d.digest)?;
        self.write_verified(&d.digest, src)
    }

    fn write_verified(&self, d: &Digest, src: impl Read) -> Result<(), CacheError> {
        let blobs = self.dir.join("blobs/sha256");
        let io_err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| CacheError::Io { path, source }
        };
        let mut tmp = NamedTempFile::new_in(&blobs).map_err(io_err(&blobs))?;
        let mut reader = HashingReader::new(src);
        io::copy(&mut reader, tmp.as_file_mut()).map_err(io_err(tmp.path()))?;
        let (_, actual, _) = reader.finish();
        if actual != *d {
            return Err(CacheError::Invalid {
                name: self.name.clone(),
                reason: format!("blob {d} hashes to {actual}"),
            });
        }
        let dest = self.blob_path(d);
        tmp.persist(&dest)
            .map_err(|e| CacheError::Io {
                path: dest.clone(),
                source: e.error,
            })
            .map(drop)
    }

    /// Replaces `path` with `bytes` by rename.
    fn write_atomic(&self, path: &Path, bytes: &[u8]) -> Result<(), CacheError> {
        let io_err = |source| CacheError::Io {
            path: path.to_path_buf(),
            source,
        };
        let mut tmp = NamedTempFile::new_in(&self.dir).map_err(io_err)?;
        io::Write::write_all(&mut tmp, bytes).map_err(io_err)?;
        tmp.persist(path).map_err(|e| io_err(e.error)).map(drop)
    }
}

impl CacheBackend for DirCache<'_> {
    fn name(&self) -> &str {
        &self.name
    }

    fn lookup(&self, key: &Digest) -> Lookup {
        let Some(r) = self.records.get(key) else {
            return Lookup::Miss;
        };
        if let Some(l) = &r.layer
            && !self.store.has_blob(&l.desc.digest)
            && !fs::metadata(self.blob_path(&l.desc.digest)).is_ok_and(|m| m.len() == l.desc.size)
        {
            return Lookup::Unusable(format!(
                "cache {}: layer {} of a record is missing",
                self.name, l.desc.digest
            ));
        }
        let dir = fs::canonicalize(&self.dir).unwrap_or_else(|_| self.dir.clone());
        Lookup::Hit(Box::new(Hit {
            layer: r.layer.clone(),
            created: r.created.clone(),
            linked: r.linked,
            origin: Some(origin::dir_origin(&dir)),
        }))
    }

    fn explain(&self, miss: &Miss<'_>) -> Option<String> {
        self.records.explain(&miss.parent, miss.basis, miss.inputs)
    }

    fn store(&self, records: &[Record]) -> Result<(), CacheError> {
        let blobs = self.dir.join("blobs/sha256");
        fs::create_dir_all(&blobs).map_err(|source| CacheError::Io {
            path: blobs.clone(),
            source,
        })?;
        // One exporter at a time; readers never need the lock (files appear by rename).
        let lock = File::open(&self.dir).map_err(|source| CacheError::Io {
            path: self.dir.clone(),
            source,
        })?;
        lock.lock().map_err(|source| CacheError::Io {
            path: self.dir.clone(),
            source,
        })?;
        let (config, layers) = record::encode(records, true);
        for l in &layers {
            self.put_blob(l)?;
        }
        let config_desc = Descriptor::new(CONFIG_TYPE, Digest::of(&config), config.len() as u64);
        self.write_verified(&config_desc.digest, &config[..])?;
        let mut keep: BTreeSet<Digest> = layers.iter().map(|l| l.digest).collect();
        keep.insert(config_desc.digest);
        let manifest = record::artifact_manifest(config_desc, layers);
        let manifest_digest = Digest::of(&manifest);
        self.write_verified(&manifest_digest, &manifest[..])?;
        keep.insert(manifest_digest);
        let layout = self.dir.join("oci-layout");
        if !layout.is_file() {
            self.write_atomic(&layout, br#"{"imageLayoutVersion":"1.0.0"}"#)?;
        }
        let mut entry = Descriptor::new(MEDIA_MANIFEST, manifest_digest, manifest.len() as u64);
        entry
            .annotations
            .insert(ANNOTATION_REF_NAME.to_string(), "latest".to_string());
        let mut entry = serde_json::to_value(entry).unwrap_or_default();
        entry["artifactType"] = record::ARTIFACT_TYPE.into();
        let index = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": MEDIA_INDEX,
            "manifests": [entry],
        });
        self.write_atomic(&self.dir.join("index.json"), &canonical_json(&index))?;
        // The previous export's blobs that this one does not use.
        let entries = fs::read_dir(&blobs).map_err(|source| CacheError::Io {
            path: blobs.clone(),
            source,
        })?;
        for e in entries.flatten() {
            let name = e.file_name();
            let used = name
                .to_str()
                .and_then(|n| Digest::from_hex(n).ok())
                .is_some_and(|d| keep.contains(&d));
            if !used {
                let _ = fs::remove_file(e.path());
            }
        }
        Ok(())
    }
}

/// Reads at most `limit` bytes of `path`.
fn read_limited(path: &Path, limit: u64) -> Result<Vec<u8>, String> {
    let f = File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut bytes = Vec::new();
    f.take(limit + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if bytes.len() as u64 > limit {
        return Err(format!("{} is larger than {limit} bytes", path.display()));
    }
    Ok(bytes)
}
