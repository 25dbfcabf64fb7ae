//! Finding the images `kiln diff` compares wherever they are — an OCI layout directory, an OCI
//! archive or docker-archive (loaded with the store's importer), a name or id in the local
//! store, or a registry reference (pulled) — and comparing two stored images with
//! [`image::diff`](crate::image::diff). Images that are not in the local store are loaded into a
//! throwaway store, so `kiln diff` leaves the local one as it was.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;

use serde_json::Value;

use crate::digest::Digest;
use crate::distribution::{self, TransferError};
use crate::image::diff::{self, DiffError, FieldChange, Report, Side};
use crate::image::{ANNOTATION_REFERENCE_DIGEST, Descriptor, Manifest, is_attestation};
use crate::registry::Client;
use crate::registry::reference::Reference;
use crate::store::{self, Store, StoreError, StoredImage, StoredRef};

/// Why an image could not be found or compared.
#[derive(Debug, thiserror::Error)]
pub enum CompareError {
    /// The argument names nothing kiln can find.
    #[error(
        "{name:?} is not a file or directory, not an image in the local store, and not an image reference ({reason})"
    )]
    NotFound {
        /// The argument.
        name: String,
        /// Why it is not a reference either.
        reason: String,
    },
    /// A layout or archive could not be loaded.
    #[error("loading {path}: {source}")]
    Import {
        /// The path given.
        path: String,
        /// The cause.
        source: StoreError,
    },
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Pulling from the registry failed.
    #[error("pulling {reference}: {source}")]
    Pull {
        /// The reference.
        reference: String,
        /// The cause.
        source: Box<TransferError>,
    },
    /// A layer or document could not be read.
    #[error(transparent)]
    Diff(#[from] DiffError),
}

impl CompareError {
    /// True for errors in what the user named (exit status 2).
    pub fn is_input_error(&self) -> bool {
        use crate::registry::RegistryError;
        match self {
            CompareError::NotFound { .. } | CompareError::Import { .. } => true,
            CompareError::Pull { source, .. } => matches!(
                **source,
                TransferError::Registry(RegistryError::NotFound { .. })
            ),
            _ => false,
        }
    }
}

/// Finds images by the names `kiln diff` accepts.
pub struct Finder<'a> {
    local: &'a Store,
    client: &'a Client,
    /// Holds what is not in the local store; dropped before its directory.
    scratch: Store,
    _scratch_dir: tempfile::TempDir,
}

/// An image found by a [`Finder`]: in the local store or in the finder's own.
pub struct Found {
    /// The name it was found by.
    pub name: String,
    /// The image or index.
    pub image: StoredRef,
    in_scratch: bool,
}

impl<'a> Finder<'a> {
    /// A finder that looks in `local` and pulls with `client`.
    pub fn new(local: &'a Store, client: &'a Client) -> Result<Finder<'a>, CompareError> {
        let dir = local.scratch_dir()?;
        let scratch = Store::open(&dir.path().join("store"))?;
        Ok(Finder {
            local,
            client,
            scratch,
            _scratch_dir: dir,
        })
    }

    /// The store a found image is in.
    pub fn store_of(&self, found: &Found) -> &Store {
        if found.in_scratch {
            &self.scratch
        } else {
            self.local
        }
    }

    /// Finds `name`: an existing path is loaded as a layout or archive; otherwise a name or id
    /// in the local store; otherwise a registry reference, pulled.
    pub fn find(&self, name: &str) -> Result<Found, CompareError> {
        let found = |image, in_scratch| Found {
            name: name.to_string(),
            image,
            in_scratch,
        };
        if Path::new(name).exists() {
            let image = store::import(&self.scratch, Path::new(name)).map_err(|source| {
                CompareError::Import {
                    path: name.to_string(),
                    source,
                }
            })?;
            return Ok(found(image, true));
        }
        if let Some(image) = self.local.lookup(name)? {
            return Ok(found(image, false));
        }
        let reference = Reference::parse(name).map_err(|e| CompareError::NotFound {
            name: name.to_string(),
            reason: e.to_string(),
        })?;
        if let Some(image) = self.local.lookup(&reference.to_string())? {
            return Ok(found(image, false));
        }
        let (image, _) =
            distribution::pull(&self.scratch, self.client, &reference, None).map_err(|e| {
                CompareError::Pull {
                    reference: reference.to_string(),
                    source: Box::new(e),
                }
            })?;
        Ok(found(image, true))
    }

    /// Compares two found images.
    pub fn compare(&self, a: &Found, b: &Found) -> Result<Report, CompareError> {
        let scratch = self.local.scratch_dir()?;
        compare_refs(
            (self.store_of(a), &a.image, &a.name),
            (self.store_of(b), &b.image, &b.name),
            scratch.path(),
        )
    }
}

/// The images and attestations an image or index holds (those whose content is here).
struct Parts {
    /// Images by platform (`os/arch[/variant]`), in index order.
    images: Vec<(String, StoredImage)>,
    /// Attestation manifests by the manifest digest of the image they are about.
    attestations: BTreeMap<Digest, Descriptor>,
    /// Every platform the index lists, present or not.
    listed: Vec<String>,
}

fn platform_name(img: &StoredImage) -> String {
    img.config.platform().to_string()
}

fn parts(store: &Store, item: &StoredRef) -> Result<Parts, StoreError> {
    let mut parts = Parts {
        images: Vec::new(),
        attestations: BTreeMap::new(),
        listed: Vec::new(),
    };
    match item {
        StoredRef::Image(img) => {
            let p = platform_name(img);
            parts.listed.push(p.clone());
            parts.images.push((p, img.clone()));
        }
        StoredRef::Index(x) => {
            for d in &x.body.manifests {
                if is_attestation(d) {
                    if let Some(target) = d
                        .annotations
                        .get(ANNOTATION_REFERENCE_DIGEST)
                        .and_then(|t| t.parse().ok())
                    {
                        parts.attestations.insert(target, d.clone());
                    }
                } else if let Some(p) = &d.platform {
                    parts.listed.push(p.to_string());
                }
            }
            for img in store.present_images(x)? {
                if !x
                    .body
                    .manifests
                    .iter()
                    .any(|d| d.digest == img.manifest.digest && is_attestation(d))
                {
                    parts.images.push((platform_name(&img), img));
                }
            }
        }
    }
    Ok(parts)
}

/// The statements of an attestation manifest: predicate type → statement; None when its
/// content is not in the store (an index pulled for one platform).
fn statements(
    store: &Store,
    d: &Descriptor,
) -> Result<Option<BTreeMap<String, Value>>, StoreError> {
    if !store.has_blob(&d.digest) {
        return Ok(None);
    }
    let manifest =
        Manifest::from_json(&store.read_blob(&d.digest)?).map_err(|source| StoreError::Format {
            what: format!("attestation manifest {}", d.digest),
            source,
        })?;
    let mut out = BTreeMap::new();
    for l in &manifest.layers {
        if !store.has_blob(&l.digest) {
            return Ok(None);
        }
        let value: Value =
            serde_json::from_slice(&store.read_blob(&l.digest)?).unwrap_or(Value::Null);
        let kind = value["predicateType"]
            .as_str()
            .unwrap_or("unknown")
            .to_string();
        out.insert(kind, value);
    }
    Ok(Some(out))
}

/// Compares two images or indexes, each in its store: the images platform by platform, then
/// the platforms listed and the attestations attached.
pub fn compare_refs(
    (store_a, ref_a, name_a): (&Store, &StoredRef, &str),
    (store_b, ref_b, name_b): (&Store, &StoredRef, &str),
    scratch: &Path,
) -> Result<Report, CompareError> {
    let (pa, pb) = (parts(store_a, ref_a)?, parts(store_b, ref_b)?);
    let indexed = matches!(ref_a, StoredRef::Index(_)) || matches!(ref_b, StoredRef::Index(_));
    let mut reports = Vec::new();
    let mut index = Vec::new();
    if pa.listed != pb.listed {
        index.push(FieldChange {
            field: "platforms".into(),
            a: Some(Value::from(pa.listed.clone())),
            b: Some(Value::from(pb.listed.clone())),
        });
    }
    for (platform, img_a) in &pa.images {
        let Some((_, img_b)) = pb.images.iter().find(|(p, _)| p == platform) else {
            continue;
        };
        let mut r = compare_stored((store_a, img_a, name_a), (store_b, img_b, name_b), scratch)?;
        if indexed {
            r.platform = Some(platform.clone());
        }
        reports.push(r);
        // None: no attestation attached; Some(None): attached, but its content is not here
        // (an index pulled for one platform), so it cannot be compared.
        let att = |parts: &Parts, store: &Store, img: &StoredImage| match parts
            .attestations
            .get(&img.manifest.digest)
        {
            Some(d) => statements(store, d).map(Some),
            None => Ok(None),
        };
        let (sa, sb) = match (att(&pa, store_a, img_a)?, att(&pb, store_b, img_b)?) {
            (Some(None), _) | (_, Some(None)) => continue,
            (a, b) => (a.flatten(), b.flatten()),
        };
        let to_value = |s: &Option<BTreeMap<String, Value>>| {
            s.as_ref()
                .map(|m| Value::Object(m.clone().into_iter().collect()))
        };
        let prefix = format!("attestations[{}]", Value::String(platform.clone()));
        match (to_value(&sa), to_value(&sb)) {
            (Some(a), Some(b)) => diff::diff_values(&prefix, &a, &b, &mut index),
            (None, None) => {}
            (a, b) => index.push(FieldChange {
                field: prefix,
                a: a.map(|_| Value::from("attached")),
                b: b.map(|_| Value::from("attached")),
            }),
        }
    }
    let mut report = if reports.is_empty() {
        Report {
            a: name_a.to_string(),
            b: name_b.to_string(),
            identical: false,
            manifest: Vec::new(),
            config: Vec::new(),
            layers: Vec::new(),
            platform: None,
            index: Vec::new(),
            more: Vec::new(),
        }
    } else {
        reports.remove(0)
    };
    report.more = reports;
    report.index = index;
    report.settle();
    Ok(report)
}

/// Compares two images, each in its store, naming them `name`; `scratch` is an empty
/// directory for spooled file versions.
pub fn compare_stored(
    (store_a, image_a, name_a): (&Store, &StoredImage, &str),
    (store_b, image_b, name_b): (&Store, &StoredImage, &str),
    scratch: &Path,
) -> Result<Report, CompareError> {
    let config_a = store_a.read_blob(&image_a.config_digest)?;
    let config_b = store_b.read_blob(&image_b.config_digest)?;
    let open_a = blob_opener(store_a);
    let open_b = blob_opener(store_b);
    let a = Side {
        name: name_a.to_string(),
        manifest: &image_a.manifest_body,
        config: &config_a,
        open: &open_a,
    };
    let b = Side {
        name: name_b.to_string(),
        manifest: &image_b.manifest_body,
        config: &config_b,
        open: &open_b,
    };
    Ok(diff::compare(&a, &b, scratch)?)
}

fn blob_opener(store: &Store) -> impl Fn(&Descriptor) -> std::io::Result<Box<dyn Read>> + '_ {
    move |d: &Descriptor| -> std::io::Result<Box<dyn Read>> {
        let f = store.open_blob(&d.digest).map_err(std::io::Error::other)?;
        Ok(Box::new(f))
    }
}
