//! Moving images between the local store and registries: pull into the store (choosing the
//! host platform from an index, verifying every blob), push from it (blobs first, in
//! parallel, skipping what the registry has, mounting what a shared cache promised, the
//! manifest last).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use crate::digest::Digest;
use crate::image::{self, Descriptor, Manifest};
use crate::registry::reference::Reference;
use crate::registry::{Client, RegistryError, select_platform};
use crate::store::{Store, StoreError, StoredImage};

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

/// Pulls `reference` into the store and names it there by its normalised name.
pub fn pull(
    store: &Store,
    client: &Client,
    reference: &Reference,
) -> Result<StoredImage, TransferError> {
    let (mut media_type, mut bytes, mut digest) = client.get_manifest(reference)?;
    if image::is_index_type(&media_type) {
        let host = image::Platform::host();
        let (_, chosen) = select_platform(
            &bytes,
            &host.os,
            &host.architecture,
            host.variant.as_deref(),
        )?;
        let mut pinned = reference.clone();
        pinned.digest = Some(chosen);
        (media_type, bytes, digest) = client.get_manifest(&pinned)?;
    }
    if !image::is_manifest_type(&media_type) {
        return Err(invalid(
            reference,
            format!("unsupported manifest type {media_type}"),
        ));
    }
    let manifest = Manifest::from_json(&bytes).map_err(|e| invalid(reference, e.to_string()))?;
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
    let (stored, size) = store.put_blob(&bytes)?;
    if stored != digest {
        return Err(invalid(
            reference,
            format!("manifest digest {stored} does not match {digest}"),
        ));
    }
    let desc = Descriptor::new(&media_type, digest, size);
    store.tag(&reference.to_string(), &desc)?;
    store
        .resolve(&reference.to_string())?
        .ok_or_else(|| invalid(reference, "pulled image not found in the store"))
}

/// Pushes a stored image to `reference`; returns the manifest digest. A layer a shared cache
/// promised (not in the store) is mounted from the cache's repository when that is on the
/// same registry, and fetched otherwise.
pub fn push(
    store: &Store,
    client: &Client,
    img: &StoredImage,
    reference: &Reference,
) -> Result<Digest, TransferError> {
    let mut blobs: Vec<&Descriptor> = img.manifest_body.layers.iter().collect();
    blobs.push(&img.manifest_body.config);
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
    let bytes = store.read_blob(&img.manifest.digest)?;
    Ok(client.put_manifest(reference, &img.manifest.media_type, &bytes)?)
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
