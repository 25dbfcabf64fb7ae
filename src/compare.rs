//! Finding the images `kiln diff` compares wherever they are — an OCI layout directory, an OCI
//! archive or docker-archive (loaded with the store's importer), a name or id in the local
//! store, or a registry reference (pulled) — and comparing two stored images with
//! [`image::diff`](crate::image::diff). Images that are not in the local store are loaded into a
//! throwaway store, so `kiln diff` leaves the local one as it was.

use std::io::Read;
use std::path::Path;

use crate::distribution::{self, TransferError};
use crate::image::Descriptor;
use crate::image::diff::{self, DiffError, Report, Side};
use crate::registry::Client;
use crate::registry::reference::Reference;
use crate::store::{self, Store, StoreError, StoredImage};

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
    /// The image.
    pub image: StoredImage,
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
        if let Some(image) = self.local.resolve(name)? {
            return Ok(found(image, false));
        }
        let reference = Reference::parse(name).map_err(|e| CompareError::NotFound {
            name: name.to_string(),
            reason: e.to_string(),
        })?;
        if let Some(image) = self.local.resolve(&reference.to_string())? {
            return Ok(found(image, false));
        }
        let image = distribution::pull(&self.scratch, self.client, &reference).map_err(|e| {
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
        compare_stored(
            (self.store_of(a), &a.image, &a.name),
            (self.store_of(b), &b.image, &b.name),
            scratch.path(),
        )
    }
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
