//! Moving images between the local store and registries: pull into the store (one platform's
//! image from an index, verifying every blob), push from it (blobs first, in parallel,
//! skipping what the registry has, mounting what a shared cache promised; an index's manifests
//! next; the tagged manifest or index last).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use crate::digest::Digest;
use crate::image::{self, Descriptor, Manifest, Platform};
use crate::registry::reference::Reference;
use crate::registry::{Client, RegistryError, select_platform};
use crate::store::{Store, StoreError, StoredImage, StoredRef};

/// Layers uploaded or downloaded at once.
const PARALLEL_BLOBS: usize = 3;

/// A failed transfer.
#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    /// The registry failed.
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// What the registry sent is not a usable image.
    #[error("{reference}: {message}")]
    Invalid {
        /// The reference.
        reference: String,
        /// What is wrong.
        message: String,
    },
}

fn invalid(r: &Reference, message: impl Into<String>) -> TransferError {
    TransferError::Invalid {
        reference: r.to_string(),
        message: message.into(),
    }
}

/// Pulls `reference` into the store and names it there by its normalised name; returns what
/// the name now stands for and the image pulled. From an index, only the image for `platform`
/// (default: the host's) is fetched; the index itself is stored as it is, so it keeps its
/// digest, listing the other platforms without their content. A single image is taken as it
/// is, whatever its platform.
pub fn pull(
    store: &Store,
    client: &Client,
    reference: &Reference,
    platform: Option<&Platform>,
) -> Result<(StoredRef, StoredImage), TransferError> {
    let (media_type, bytes, digest) = client.get_manifest(reference)?;
    let top = Descriptor::new(&media_type, digest, bytes.len() as u64);
    let image = if image::is_index_type(&media_type) {
        let host = Platform::host();
        let wanted = platform.unwrap_or(&host);
        let (_, chosen) = select_platform(
            &bytes,
            &wanted.os,
            &wanted.architecture,
            wanted.variant.as_deref(),
        )?;
        let mut pinned = reference.clone();
        pinned.digest = Some(chosen);
        let (media_type, bytes, digest) = client.get_manifest(&pinned)?;
        pull_image(store, client, reference, &media_type, &bytes, digest)?
    } else {
        pull_image(store, client, reference, &media_type, &bytes, digest)?
    };
    // The index last: it never names a manifest the store does not have yet.
    if top.is_index() {
        store_checked(store, reference, &bytes, &digest)?;
    }
    store.tag(&reference.to_string(), &top)?;
    let item = store
        .lookup(&reference.to_string())?
        .ok_or_else(|| invalid(reference, "pulled image not found in the store"))?;
    Ok((item, image))
}

/// Stores a manifest or index document the registry sent for `digest`.
fn store_checked(
    store: &Store,
    reference: &Reference,
    bytes: &[u8],
    digest: &Digest,
) -> Result<u64, TransferError> {
    let (stored, size) = store.put_blob(bytes)?;
    if stored != *digest {
        return Err(invalid(
            reference,
            format!("manifest digest {stored} does not match {digest}"),
        ));
    }
    Ok(size)
}

/// Fetches the config and layers of one image manifest, then stores the manifest.
fn pull_image(
    store: &Store,
    client: &Client,
    reference: &Reference,
    media_type: &str,
    bytes: &[u8],
    digest: Digest,
) -> Result<StoredImage, TransferError> {
    if !image::is_manifest_type(media_type) {
        return Err(invalid(
            reference,
            format!("unsupported manifest type {media_type}"),
        ));
    }
    let manifest = Manifest::from_json(bytes).map_err(|e| invalid(reference, e.to_string()))?;
    let mut blobs: Vec<&Descriptor> = vec![&manifest.config];
    blobs.extend(manifest.layers.iter());
    let fetch = |d: &&Descriptor| -> Result<(), TransferError> {
        if store.has_blob(&d.digest) {
            return Ok(());
        }
        let mut writer = store.blob_writer()?;
        client.get_blob(reference, &d.digest, &mut writer)?;
        writer.commit_expecting(&d.digest)?;
        Ok(())
    };
    for_each_parallel(&blobs, fetch)?;
    let config_bytes = store.read_blob(&manifest.config.digest)?;
    let config = image::ImageConfig::from_json(&config_bytes)
        .map_err(|e| invalid(reference, e.to_string()))?;
    let size = store_checked(store, reference, bytes, &digest)?;
    Ok(StoredImage {
        manifest: Descriptor::new(media_type, digest, size),
        config_digest: manifest.config.digest,
        manifest_body: manifest,
        config,
    })
}

/// Pushes a stored image, or an index with all its images, to `reference`; returns the
/// digest of the manifest (or index) the tag names. Blobs go first, in parallel; then an
/// index's manifests, by digest; the manifest or index the tag names last. A layer a shared
/// cache promised (not in the store) is mounted from the cache's repository when that is on
/// the same registry, and fetched otherwise.
pub fn push(
    store: &Store,
    client: &Client,
    item: &StoredRef,
    reference: &Reference,
) -> Result<Digest, TransferError> {
    let mut manifests = Vec::new();
    collect_manifests(store, item, &mut manifests)?;
    let mut blobs: Vec<&Descriptor> = Vec::new();
    let mut seen = std::collections::BTreeSet::new();
    for img in &manifests {
        for d in img
            .manifest_body
            .layers
            .iter()
            .chain([&img.manifest_body.config])
        {
            if seen.insert(d.digest) {
                blobs.push(d);
            }
        }
    }
    let upload = |d: &&Descriptor| -> Result<(), TransferError> {
        let open = || -> std::io::Result<Box<dyn std::io::Read>> {
            let f = store.open_blob(&d.digest).map_err(std::io::Error::other)?;
            Ok(Box::new(std::io::BufReader::with_capacity(1 << 20, f)))
        };
        let mount = store
            .blob_origin(&d.digest)
            .and_then(|o| crate::cache::origin::mount_source(&o, &reference.registry));
        client.push_blob(reference, &d.digest, d.size, &open, mount.as_deref())?;
        Ok(())
    };
    for_each_parallel(&blobs, upload)?;
    let top = item.descriptor();
    for d in manifests
        .iter()
        .map(|img| &img.manifest)
        .chain(nested_indexes(store, item)?.iter())
        .filter(|d| d.digest != top.digest)
    {
        let mut by_digest = reference.clone();
        by_digest.tag = None;
        by_digest.digest = Some(d.digest);
        let bytes = store.read_blob(&d.digest)?;
        client.put_manifest(&by_digest, &d.media_type, &bytes)?;
    }
    let bytes = store.read_blob(&top.digest)?;
    Ok(client.put_manifest(reference, &top.media_type, &bytes)?)
}

/// The images below `item` (itself, if it is one), depth first.
fn collect_manifests(
    store: &Store,
    item: &StoredRef,
    out: &mut Vec<StoredImage>,
) -> Result<(), TransferError> {
    match item {
        StoredRef::Image(img) => out.push(img.clone()),
        StoredRef::Index(x) => {
            for child in store.children(x)? {
                collect_manifests(store, &child, out)?;
            }
        }
    }
    Ok(())
}

/// The indexes nested below `item` (not itself), innermost first, so each is pushed after
/// what it lists.
fn nested_indexes(store: &Store, item: &StoredRef) -> Result<Vec<Descriptor>, TransferError> {
    let mut out = Vec::new();
    if let StoredRef::Index(x) = item {
        for child in store.children(x)? {
            if let StoredRef::Index(inner) = &child {
                out.extend(nested_indexes(store, &child)?);
                out.push(inner.desc.clone());
            }
        }
    }
    Ok(out)
}

/// Runs `f` over `items` on [`PARALLEL_BLOBS`] workers that each take the next item as soon
/// as they are done (one large blob does not hold back the rest); after an error no new item
/// is started, and that error is returned.
fn for_each_parallel<T: Sync>(
    items: &[T],
    f: impl Fn(&T) -> Result<(), TransferError> + Sync,
) -> Result<(), TransferError> {
    let next = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    let worker = || -> Result<(), TransferError> {
        while !failed.load(Ordering::SeqCst) {
            let Some(item) = items.get(next.fetch_add(1, Ordering::SeqCst)) else {
                break;
            };
            f(item).inspect_err(|_| failed.store(true, Ordering::SeqCst))?;
        }
        Ok(())
    };
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..PARALLEL_BLOBS.min(items.len()))
            .map(|_| s.spawn(worker))
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join().unwrap_or_else(|_| {
                    Err(TransferError::Invalid {
                        reference: String::new(),
                        message: "transfer thread panicked".into(),
                    })
                })
            })
            .collect::<Result<Vec<()>, _>>()
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn every_item_once_and_no_new_work_after_an_error() {
        let seen: Vec<AtomicUsize> = (0..20).map(|_| AtomicUsize::new(0)).collect();
        let items: Vec<usize> = (0..20).collect();
        for_each_parallel(&items, |&i| {
            seen[i].fetch_add(1, Ordering::SeqCst);
            Ok(())
        })
        .unwrap();
        assert!(seen.iter().all(|n| n.load(Ordering::SeqCst) == 1));

        let started = AtomicUsize::new(0);
        let err = for_each_parallel(&items, |&i| {
            started.fetch_add(1, Ordering::SeqCst);
            if i == 0 {
                return Err(TransferError::Invalid {
                    reference: "r".into(),
                    message: "boom".into(),
                });
            }
            std::thread::sleep(Duration::from_millis(50));
            Ok(())
        })
        .unwrap_err();
        assert!(err.to_string().contains("boom"), "{err}");
        assert!(
            started.load(Ordering::SeqCst) <= PARALLEL_BLOBS,
            "{started:?}"
        );
    }
}
