//! Image indexes in the store: one name for the images of several platforms (and whatever
//! else an index lists, such as attestation manifests). An index is stored as its blob, like a
//! manifest, and named in `index.json` the same way.
//!
//! An index pulled from a registry may list manifests whose content was never fetched (the
//! platforms nobody asked for); those entries are kept as they are, so the index keeps its
//! digest, and count as absent: prune and fsck skip them, and exporting or pushing the index
//! names them as missing.

use std::collections::BTreeSet;

use super::{Store, StoreError, StoredImage};
use crate::digest::Digest;
use crate::image::{Descriptor, Index, MEDIA_INDEX, Platform, canonical_json};

/// An image index in the store.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredIndex {
    /// The index's descriptor (media type, digest, size; no annotations).
    pub desc: Descriptor,
    /// The parsed index.
    pub body: Index,
}

/// What a name or id in the store stands for: one image, or an index of images.
// A handful are made per command; boxing the image would only complicate every match.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoredRef {
    /// An image manifest.
    Image(StoredImage),
    /// An image index.
    Index(StoredIndex),
}

impl StoredRef {
    /// The manifest's or index's descriptor: what a tag points at.
    pub fn descriptor(&self) -> &Descriptor {
        match self {
            StoredRef::Image(img) => &img.manifest,
            StoredRef::Index(x) => &x.desc,
        }
    }

    /// The id `kiln` prints for it: an image's config digest, an index's own digest (as Docker
    /// does for an index).
    pub fn id(&self) -> Digest {
        match self {
            StoredRef::Image(img) => img.config_digest,
            StoredRef::Index(x) => x.desc.digest,
        }
    }
}

impl From<StoredImage> for StoredRef {
    fn from(img: StoredImage) -> StoredRef {
        StoredRef::Image(img)
    }
}

impl StoredImage {
    /// Config plus layer blob sizes, in bytes.
    pub fn size(&self) -> u64 {
        self.manifest_body.config.size
            + self
                .manifest_body
                .layers
                .iter()
                .map(|l| l.size)
                .sum::<u64>()
    }

    /// The image's entry in an index: its manifest descriptor with the platform of its config
    /// (none when the config names no platform).
    pub fn index_entry(&self) -> Descriptor {
        let mut d = Descriptor::new(
            &self.manifest.media_type,
            self.manifest.digest,
            self.manifest.size,
        );
        let platform = self.config.platform().normalized();
        if !platform.is_unknown() {
            d.platform = Some(platform);
        }
        d
    }
}

impl Store {
    /// Saves `body` as an index blob (canonical JSON) and records it untagged, like
    /// [`put_image`](Self::put_image), in place of the untagged records of the manifests it
    /// lists (they are reached through it now). Every manifest it lists must be stored.
    pub fn put_index(&self, body: &Index) -> Result<StoredIndex, StoreError> {
        for d in &body.manifests {
            if !self.has_blob(&d.digest) {
                return Err(StoreError::BlobNotFound {
                    digest: d.digest,
                    root: self.root.clone(),
                });
            }
        }
        let (digest, size) = self.put_blob(&canonical_json(body))?;
        let desc = Descriptor::new(MEDIA_INDEX, digest, size);
        let listed: BTreeSet<Digest> = body.manifests.iter().map(|d| d.digest).collect();
        self.update_index(|idx| {
            let before = idx.manifests.clone();
            idx.manifests
                .retain(|d| d.ref_name().is_some() || !listed.contains(&d.digest));
            if !idx.manifests.iter().any(|d| d.digest == digest) {
                idx.manifests.push(desc.clone());
            }
            idx.manifests != before
        })?;
        Ok(StoredIndex {
            desc,
            body: body.clone(),
        })
    }

    /// The image in `index` for `platform`; `None` when the index lists none, or lists one
    /// whose content is not in the store (not pulled).
    pub fn image_in(
        &self,
        index: &StoredIndex,
        platform: &Platform,
    ) -> Result<Option<StoredImage>, StoreError> {
        match index.body.select(platform) {
            Some(d) if !d.is_index() && self.has_blob(&d.digest) => self.load_image(d).map(Some),
            _ => Ok(None),
        }
    }

    /// The images `index` lists whose content is in the store, in its order (nested indexes
    /// are not followed).
    pub fn present_images(&self, index: &StoredIndex) -> Result<Vec<StoredImage>, StoreError> {
        index
            .body
            .manifests
            .iter()
            .filter(|d| !d.is_index() && self.has_blob(&d.digest))
            .map(|d| self.load_image(d))
            .collect()
    }

    /// Everything `index` lists, loaded; each must be in the store (an index pulled for some
    /// platforms lacks the others, and the error says which).
    pub fn children(&self, index: &StoredIndex) -> Result<Vec<StoredRef>, StoreError> {
        index
            .body
            .manifests
            .iter()
            .map(|d| {
                if !self.has_blob(&d.digest) {
                    let what = d
                        .platform
                        .as_ref()
                        .map_or_else(|| "an entry".to_string(), |p| p.to_string());
                    return Err(StoreError::Invalid {
                        path: self.blob_path(&index.desc.digest),
                        reason: format!(
                            "the index lists {what} ({}), whose content is not in the store \
                             (only other platforms were pulled)",
                            d.digest
                        ),
                    });
                }
                match d.is_index() {
                    true => self.load(d),
                    false => self.load_image(d).map(StoredRef::Image),
                }
            })
            .collect()
    }

    /// Every blob `item` needs, itself included, checking that all are here (or promised): an
    /// index's manifests (nested indexes followed) with their configs and layers.
    pub fn blobs_of(&self, item: &StoredRef) -> Result<BTreeSet<Digest>, StoreError> {
        let mut out = BTreeSet::new();
        match item {
            StoredRef::Image(img) => {
                out.insert(img.manifest.digest);
                out.insert(img.manifest_body.config.digest);
                out.extend(img.manifest_body.layers.iter().map(|l| l.digest));
            }
            StoredRef::Index(x) => {
                out.insert(x.desc.digest);
                for child in self.children(x)? {
                    out.extend(self.blobs_of(&child)?);
                }
            }
        }
        for d in &out {
            if !self.has_blob_or_promise(d) {
                return Err(StoreError::BlobNotFound {
                    digest: *d,
                    root: self.root.clone(),
                });
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::{ImageConfig, MEDIA_MANIFEST};

    fn image(store: &Store, arch: &str) -> StoredImage {
        let config = ImageConfig {
            architecture: arch.into(),
            os: "linux".into(),
            ..Default::default()
        };
        store.put_image(&config, &[]).unwrap()
    }

    #[test]
    fn an_index_names_images_by_platform() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let (amd, arm) = (image(&store, "amd64"), image(&store, "arm64"));
        let body = Index::of(vec![amd.index_entry(), arm.index_entry()]);
        let x = store.put_index(&body).unwrap();
        store.tag("multi:1", &x.desc).unwrap();
        let Some(StoredRef::Index(found)) = store.lookup("multi:1").unwrap() else {
            panic!("not an index");
        };
        assert_eq!(found, x);
        let arm64 = Platform::parse("linux/arm64").unwrap();
        assert_eq!(store.image_in(&x, &arm64).unwrap(), Some(arm.clone()));
        let s390x = Platform::parse("linux/s390x").unwrap();
        assert_eq!(store.image_in(&x, &s390x).unwrap(), None);
        assert_eq!(store.present_images(&x).unwrap().len(), 2);
        let all = store.blobs_of(&StoredRef::Index(x.clone())).unwrap();
        assert_eq!(all.len(), 5, "index, 2 manifests, 2 configs");
        // By id: the index's own digest.
        let hex = x.desc.digest.hex();
        assert!(matches!(
            store.lookup(&hex[..12]).unwrap(),
            Some(StoredRef::Index(_))
        ));
        let listed = store.images().unwrap();
        assert_eq!(
            listed.len(),
            1,
            "the images are listed through the index only"
        );
        let entry = &listed[0];
        assert_eq!(entry.id, x.desc.digest);
        let names: Vec<String> = entry.platforms.iter().map(|p| p.to_string()).collect();
        assert_eq!(names, ["linux/amd64", "linux/arm64"]);
    }

    #[test]
    fn entries_never_pulled_are_absent_not_broken() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let host = Platform::host();
        let amd = image(&store, &host.architecture);
        let elsewhere = Descriptor {
            platform: Some(Platform::parse("linux/s390x").unwrap()),
            ..Descriptor::new(MEDIA_MANIFEST, Digest::of(b"not pulled"), 10)
        };
        let body = Index::of(vec![amd.index_entry(), elsewhere]);
        // As a pull stores it: the index blob and the one image fetched.
        let (digest, size) = store.put_blob(&canonical_json(&body)).unwrap();
        let desc = Descriptor::new(MEDIA_INDEX, digest, size);
        store.tag("pulled:1", &desc).unwrap();
        let x = StoredIndex { desc, body };
        let s390x = Platform::parse("linux/s390x").unwrap();
        assert_eq!(store.image_in(&x, &s390x).unwrap(), None);
        assert_eq!(store.present_images(&x).unwrap(), vec![amd.clone()]);
        let e = store
            .blobs_of(&StoredRef::Index(x))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("linux/s390x") && e.contains("not in the store"),
            "{e}"
        );
        assert!(store.fsck().unwrap().is_clean());
        let report = store.prune().unwrap();
        assert_eq!(report.blobs_removed, 0, "{report:?}");
        assert_eq!(store.resolve("pulled:1").unwrap(), Some(amd));
    }
}
