//! A cache in an OCI registry: reading a kiln cache artifact (or an image that carries its
//! records inline) and pushing the artifact. Layers a hit needs stay in the registry until a
//! step or an output reads them (see [`origin`](super::origin)); pushing skips what the
//! registry has and mounts what another repository of the same registry has.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::sync::Mutex;

use super::record::{self, CONFIG_LIMIT, CONFIG_TYPE, CacheDoc, RecordSet};
use super::{CacheBackend, CacheError, Hit, Lookup, Miss, Record, origin};
use crate::digest::Digest;
use crate::image::{self, Descriptor, MEDIA_MANIFEST};
use crate::registry::{Client, Reference, RegistryError, select_platform};
use crate::store::Store;

/// A cache at a registry reference.
pub struct RegistryCache<'a> {
    store: &'a Store,
    client: &'a Client,
    reference: Reference,
    name: String,
    records: RecordSet,
    /// What HEAD said about layer blobs so far.
    present: Mutex<BTreeMap<Digest, bool>>,
}

impl<'a> RegistryCache<'a> {
    /// The cache at `reference`, to export to.
    pub fn new(store: &'a Store, client: &'a Client, reference: Reference) -> RegistryCache<'a> {
        RegistryCache {
            store,
            client,
            name: reference.to_string(),
            reference,
            records: RecordSet::default(),
            present: Mutex::new(BTreeMap::new()),
        }
    }

    /// The cache at `reference` with its records loaded. Whatever is wrong with it is
    /// returned as warnings: a missing or malformed cache serves nothing, a record naming
    /// what the cache does not hold is left out.
    pub fn open(
        store: &'a Store,
        client: &'a Client,
        reference: Reference,
    ) -> (RegistryCache<'a>, Vec<String>) {
        let mut cache = RegistryCache::new(store, client, reference);
        let (records, warnings) = super::loaded(&cache.name, cache.load());
        cache.records = records;
        (cache, warnings)
    }

    fn load(&self) -> Result<(RecordSet, Vec<String>), String> {
        let r = &self.reference;
        let (mut media_type, mut bytes, _) = self.client.get_manifest(r).map_err(|e| match e {
            RegistryError::NotFound { .. } => "not found (nothing was exported there yet?)".into(),
            e => e.to_string(),
        })?;
        if image::is_index_type(&media_type) {
            let host = image::Platform::host();
            let (_, chosen) = select_platform(
                &bytes,
                &host.os,
                &host.architecture,
                host.variant.as_deref(),
            )
            .map_err(|e| e.to_string())?;
            let mut pinned = r.clone();
            pinned.digest = Some(chosen);
            (media_type, bytes, _) = self
                .client
                .get_manifest(&pinned)
                .map_err(|e| e.to_string())?;
        }
        if !image::is_manifest_type(&media_type) {
            return Err(format!("unexpected manifest type {media_type}"));
        }
        match record::classify(&bytes)? {
            CacheDoc::Artifact { config, layers } => {
                let mut buf = Limited::new(CONFIG_LIMIT);
                self.client
                    .get_blob(r, &config.digest, &mut buf)
                    .map_err(|e| format!("records config: {e}"))?;
                RecordSet::parse(&buf.bytes, &layers)
            }
            CacheDoc::Inline { records, layers } => RecordSet::parse(records.as_bytes(), &layers),
            CacheDoc::Other => {
                Err("neither a kiln cache nor an image carrying cache records inline".into())
            }
        }
    }

    /// Whether the registry has blob `d` in this repository (asked once per blob).
    fn has_layer(&self, d: &Digest) -> Result<bool, RegistryError> {
        if let Some(&known) = self
            .present
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(d)
        {
            return Ok(known);
        }
        let found = self.client.blob_exists(&self.reference, d)?;
        self.present
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(*d, found);
        Ok(found)
    }

    /// Uploads a stored (or promised) blob unless the repository has it, mounting it when
    /// its promise names another repository of the same registry.
    fn push_blob(&self, d: &Descriptor) -> Result<(), CacheError> {
        let mount = self
            .store
            .blob_origin(&d.digest)
            .and_then(|o| origin::mount_source(&o, &self.reference.registry));
        let open = || -> io::Result<Box<dyn Read>> {
            let f = self.store.open_blob(&d.digest).map_err(io::Error::other)?;
            Ok(Box::new(io::BufReader::with_capacity(1 << 20, f)))
        };
        self.client
            .push_blob(&self.reference, &d.digest, d.size, &open, mount.as_deref())?;
        Ok(())
    }
}

impl CacheBackend for RegistryCache<'_> {
    fn name(&self) -> &str {
        &self.name
    }

    fn lookup(&self, key: &Digest) -> Lookup {
        let Some(r) = self.records.get(key) else {
            return Lookup::Miss;
        };
        if let Some(l) = &r.layer
            && !self.store.has_blob(&l.desc.digest)
        {
            match self.has_layer(&l.desc.digest) {
                Ok(true) => {}
                Ok(false) => {
                    return Lookup::Unusable(format!(
                        "cache {}: layer {} of a record is not in the registry",
                        self.name, l.desc.digest
                    ));
                }
                Err(e) => return Lookup::Unusable(format!("cache {}: {e}", self.name)),
            }
        }
        Lookup::Hit(Box::new(Hit {
            layer: r.layer.clone(),
            created: r.created.clone(),
            linked: r.linked,
            origin: Some(origin::registry_origin(&self.reference)),
        }))
    }

    fn explain(&self, miss: &Miss<'_>) -> Option<String> {
        self.records.explain(&miss.parent, miss.basis, miss.inputs)
    }

    fn store(&self, records: &[Record]) -> Result<(), CacheError> {
        let (config, layers) = record::encode(records, true);
        for l in &layers {
            self.push_blob(l)?;
        }
        let config_desc = Descriptor::new(CONFIG_TYPE, Digest::of(&config), config.len() as u64);
        let open =
            || -> io::Result<Box<dyn Read>> { Ok(Box::new(io::Cursor::new(config.clone()))) };
        self.client.push_blob(
            &self.reference,
            &config_desc.digest,
            config_desc.size,
            &open,
            None,
        )?;
        let manifest = record::artifact_manifest(config_desc, layers);
        self.client
            .put_manifest(&self.reference, MEDIA_MANIFEST, &manifest)?;
        Ok(())
    }
}

/// A writer into memory that refuses more than its limit.
struct Limited {
    bytes: Vec<u8>,
    limit: u64,
}

impl Limited {
    fn new(limit: u64) -> Limited {
        Limited {
            bytes: Vec::new(),
            limit,
        }
    }
}

impl Write for Limited {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.bytes.len() as u64 + buf.len() as u64 > self.limit {
            return Err(io::Error::other(format!("more than {} bytes", self.limit)));
        }
        self.bytes.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
