//! Promised blobs: layers a build took from a shared cache without downloading them. A promise
//! (`ROOT/remote/<hex>`) records where the blob can be fetched, as an origin string that the
//! installed [`BlobSource`] understands; the blob is fetched, verified against its digest and
//! stored the first time anything reads it, and the promise is then dropped.

use std::fs;
use std::io::{self, Write};
use std::path::PathBuf;

use super::{IoContext, Store, StoreError, remove_if_present};
use crate::digest::Digest;

/// Fetches promised blobs. The store calls it with the origin a promise recorded; it knows
/// nothing of what an origin means.
pub trait BlobSource: Send + Sync {
    /// Streams blob `digest` from `origin` into `out` (the store verifies the digest).
    fn fetch(&self, origin: &str, digest: &Digest, out: &mut dyn Write) -> Result<(), String>;
}

/// Longest origin string a promise may hold.
const ORIGIN_LIMIT: u64 = 4096;

impl Store {
    /// Installs the fetcher of promised blobs (without one, reading a promised blob fails).
    pub fn with_blob_source(mut self, source: std::sync::Arc<dyn BlobSource>) -> Store {
        self.blob_source = Some(source);
        self
    }

    fn promise_path(&self, d: &Digest) -> PathBuf {
        self.root.join("remote").join(d.hex())
    }

    /// Records that blob `d`, not in the store, can be fetched from `origin`; images may then
    /// reference it. A no-op when the blob is here already.
    pub fn promise_blob(&self, d: &Digest, origin: &str) -> Result<(), StoreError> {
        if self.has_blob(d) || self.blob_origin(d).as_deref() == Some(origin) {
            return Ok(());
        }
        self.write_atomic(&self.promise_path(d), origin.as_bytes())
    }

    /// Where the promised blob `d` comes from, when it is promised and not stored yet.
    pub fn blob_origin(&self, d: &Digest) -> Option<String> {
        let path = self.promise_path(d);
        let bytes = fs::read(&path).ok()?;
        if bytes.len() as u64 > ORIGIN_LIMIT || self.has_blob(d) {
            return None;
        }
        String::from_utf8(bytes).ok()
    }

    /// Whether blob `d` is stored or promised.
    pub fn has_blob_or_promise(&self, d: &Digest) -> bool {
        self.has_blob(d) || self.promise_path(d).is_file()
    }

    /// Drops the promise of blob `d` (its origin turned out not to serve it).
    pub fn forget_promise(&self, d: &Digest) -> Result<(), StoreError> {
        remove_if_present(&self.promise_path(d))
    }

    /// Makes blob `d` present: a no-op when it is stored; fetches it from its promised origin
    /// (verifying its digest) when it is promised; else [`StoreError::BlobNotFound`].
    pub fn fetch_promised(&self, d: &Digest) -> Result<(), StoreError> {
        if self.has_blob(d) {
            return Ok(());
        }
        let Some(origin) = self.blob_origin(d) else {
            return Err(StoreError::BlobNotFound {
                digest: *d,
                root: self.root.clone(),
            });
        };
        let failed = |reason: String| StoreError::Fetch {
            digest: *d,
            origin: origin.clone(),
            reason,
        };
        let source = self
            .blob_source
            .clone()
            .ok_or_else(|| failed("this command cannot fetch blobs".into()))?;
        // One fetch at a time: two steps needing one layer download it once.
        let _one = self.fetching.lock().unwrap_or_else(|e| e.into_inner());
        if self.has_blob(d) {
            return Ok(());
        }
        let mut writer = self.blob_writer()?;
        source.fetch(&origin, d, &mut writer).map_err(failed)?;
        writer.flush().at(&self.root)?;
        writer
            .commit_expecting(d)
            .map_err(|e| failed(e.to_string()))?;
        self.forget_promise(d)
    }

    /// Runs `open` on blob `d`, fetching it first when it is only promised.
    pub(super) fn read_or_fetch<T>(
        &self,
        d: &Digest,
        open: impl Fn() -> io::Result<T>,
    ) -> Result<Result<T, io::Error>, StoreError> {
        match open() {
            Err(e) if e.kind() == io::ErrorKind::NotFound && self.promise_path(d).is_file() => {
                self.fetch_promised(d)?;
                Ok(open())
            }
            other => Ok(other),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::Arc;

    use super::*;
    use crate::image::{Descriptor, ImageConfig, MEDIA_LAYER_GZIP};

    /// Serves blobs from memory by origin and digest; counts fetches.
    #[derive(Default)]
    struct Memory {
        blobs: BTreeMap<(String, Digest), Vec<u8>>,
        fetches: std::sync::Mutex<usize>,
    }

    impl BlobSource for Memory {
        fn fetch(&self, origin: &str, d: &Digest, out: &mut dyn Write) -> Result<(), String> {
            *self.fetches.lock().unwrap() += 1;
            let bytes = self
                .blobs
                .get(&(origin.to_string(), *d))
                .ok_or_else(|| format!("{origin} has no {d}"))?;
            out.write_all(bytes).map_err(|e| e.to_string())
        }
    }

    #[test]
    fn promised_blobs_are_fetched_once_on_first_read_and_verified() {
        let dir = tempfile::tempdir().unwrap();
        let good = b"layer bytes".to_vec();
        let d = Digest::of(&good);
        let liar = Digest::of(b"what the liar claims");
        let mut mem = Memory::default();
        mem.blobs.insert(("reg/a".into(), d), good.clone());
        mem.blobs
            .insert(("reg/b".into(), liar), b"other bytes".to_vec());
        let mem = Arc::new(mem);
        let store = Store::open(dir.path())
            .unwrap()
            .with_blob_source(mem.clone());

        store.promise_blob(&d, "reg/a").unwrap();
        assert!(!store.has_blob(&d) && store.has_blob_or_promise(&d));
        assert_eq!(store.blob_origin(&d).as_deref(), Some("reg/a"));
        // An image may reference it before any byte is here.
        let layer = Descriptor::new(MEDIA_LAYER_GZIP, d, good.len() as u64);
        let img = store
            .put_image(&ImageConfig::default(), std::slice::from_ref(&layer))
            .unwrap();
        store.tag("t", &img.manifest).unwrap();
        assert!(store.fsck().unwrap().is_clean());
        assert_eq!(*mem.fetches.lock().unwrap(), 0);

        let mut bytes = Vec::new();
        std::io::Read::read_to_end(&mut store.open_blob(&d).unwrap(), &mut bytes).unwrap();
        assert_eq!(bytes, good);
        assert_eq!(store.read_blob(&d).unwrap(), good);
        assert_eq!(*mem.fetches.lock().unwrap(), 1, "fetched once");
        assert!(store.has_blob(&d) && store.blob_origin(&d).is_none());

        // Content that does not hash to the digest is never stored.
        store.promise_blob(&liar, "reg/b").unwrap();
        let err = store.open_blob(&liar).unwrap_err();
        assert!(matches!(err, StoreError::Fetch { .. }), "{err}");
        assert!(err.to_string().contains("reg/b"), "{err}");
        assert!(!store.has_blob(&liar));
        // Prune drops promises nothing references.
        store.prune().unwrap();
        assert!(store.blob_origin(&liar).is_none());
        assert!(!store.has_blob_or_promise(&liar));
    }

    #[test]
    fn without_a_source_a_promise_cannot_be_read() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let d = Digest::of(b"x");
        store.promise_blob(&d, "somewhere").unwrap();
        let err = store.read_blob(&d).unwrap_err();
        assert!(err.to_string().contains("somewhere"), "{err}");
    }
}
