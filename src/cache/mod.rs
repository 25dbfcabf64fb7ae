//! The build cache as backends behind one trait ([`CacheBackend`]): the local store, an OCI
//! registry (a cache artifact, or the records an image carries inline) and an OCI layout
//! directory. The executor asks the backends in order for a step's cache key; the build's
//! records are exported to shared caches afterwards.
//!
//! A shared cache is an OCI 1.1 artifact: an image manifest with `artifactType`
//! [`ARTIFACT_TYPE`], whose layers are the step layers (the same blobs as the images') and
//! whose config ([`CONFIG_TYPE`]) lists the records. Nothing in it is trusted beyond what can
//! be checked: digests are parsed strictly, every record's layer must be one of the artifact's
//! layers, a layer must exist where the cache lives, and its bytes are verified when fetched.
//! Layers are fetched lazily through promises in the store (see [`origin`]).

mod dir;
mod local;
pub mod origin;
mod record;
mod registry;

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::digest::Digest;
use crate::image::Descriptor;
use crate::plan::{KeyBasis, StepInputs};
use crate::registry::{Client, Reference, RegistryError};
use crate::store::{Store, StoreError};

pub use dir::DirCache;
pub use local::LocalCache;
pub use record::{ARTIFACT_TYPE, CONFIG_TYPE, INLINE_ANNOTATION, RecordSet};
pub use registry::RegistryCache;

/// A layer as an image lists it: the blob's descriptor and the digest of its uncompressed tar.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Layer {
    /// The blob.
    pub desc: Descriptor,
    /// The uncompressed tar's digest (the image config's `rootfs.diff_ids` entry).
    pub diff_id: Digest,
}

/// What a step produced, under its cache key.
#[derive(Clone, Debug, PartialEq)]
pub struct Record {
    /// The step's cache key.
    pub key: Digest,
    /// The key the step's key was derived from (the previous step's, or a constant).
    pub parent: Digest,
    /// The step's inputs, build-arg values replaced by digests ([`shareable`]); for miss
    /// explanations. Absent in inline caches.
    pub inputs: Option<StepInputs>,
    /// The build's key basis (SOURCE_DATE_EPOCH, snapshotter), for miss explanations; absent
    /// in inline caches and in records of older kilns.
    pub basis: Option<KeyBasis>,
    /// The layer the step made (none when it changed no file).
    pub layer: Option<Layer>,
    /// The step's time (the history entry's `created`).
    pub created: Option<String>,
    /// In the alias record of a `COPY --link` (found by the step's inputs on the stage's key):
    /// the step's own key (found by its inputs, whatever lies below), so that a build taking
    /// the alias exports the own record too.
    pub linked: Option<Digest>,
    /// The step's place in this recipe on this machine (local explanations only; never
    /// exported).
    pub step_id: Option<Digest>,
}

/// A record found for a key.
#[derive(Clone, Debug)]
pub struct Hit {
    /// The layer, if the step made one.
    pub layer: Option<Layer>,
    /// The step's time.
    pub created: Option<String>,
    /// The record's [`Record::linked`].
    pub linked: Option<Digest>,
    /// Where the layer's blob can be fetched when the store does not hold it (an origin for
    /// [`Store::promise_blob`](crate::store::Store::promise_blob)); None for the local store.
    pub origin: Option<String>,
}

/// The answer of [`CacheBackend::lookup`].
#[derive(Debug)]
pub enum Lookup {
    /// A usable record.
    Hit(Box<Hit>),
    /// No record under the key.
    Miss,
    /// A record that cannot be used (its layer is gone, or it is malformed): a warning.
    Unusable(String),
}

/// A step that missed, for [`CacheBackend::explain`].
pub struct Miss<'a> {
    /// The step's place in this recipe on this machine.
    pub step_id: Digest,
    /// The key the step's key derives from.
    pub parent: Digest,
    /// The step's inputs, as [`shareable`] makes them.
    pub inputs: &'a StepInputs,
    /// The build's key basis.
    pub basis: &'a KeyBasis,
}

/// A place build cache records are looked up in and stored to.
pub trait CacheBackend: Send + Sync {
    /// How messages and `--metadata-file` name this cache: `local`, a reference, a directory.
    fn name(&self) -> &str;
    /// The record under `key`, if there is one whose layer this cache can deliver.
    fn lookup(&self, key: &Digest) -> Lookup;
    /// Why a step missed: how the nearest record this cache has differs from it.
    fn explain(&self, miss: &Miss<'_>) -> Option<String>;
    /// Stores `records` (the local store: a step's result as it is made; a shared cache: the
    /// export after the build, replacing what it held).
    fn store(&self, records: &[Record]) -> Result<(), CacheError>;
}

/// The records a shared cache's load found, and what was wrong with it as warnings: a cache
/// that cannot be read serves nothing, a record that cannot be used is left out.
fn loaded(name: &str, load: Result<(RecordSet, Vec<String>), String>) -> (RecordSet, Vec<String>) {
    match load {
        Ok((records, problems)) => {
            let warnings = problems
                .into_iter()
                .map(|p| format!("cache {name}: ignoring {p}"))
                .collect();
            (records, warnings)
        }
        Err(why) => (
            RecordSet::default(),
            vec![format!("cache {name} ignored: {why}")],
        ),
    }
}

/// A failed cache import or export.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// The registry failed.
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A cache directory could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// What a cache holds is unusable.
    #[error("cache {name}: {reason}")]
    Invalid {
        /// The cache's name.
        name: String,
        /// What is wrong.
        reason: String,
    },
}

/// Where `--cache-from` reads.
#[derive(Clone, Debug, PartialEq)]
pub enum Import {
    /// A registry reference: a cache artifact, or an image carrying its records inline.
    Registry(Reference),
    /// An OCI layout directory a `type=local` export wrote.
    Dir(PathBuf),
}

/// Which steps an export carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// The steps of the exported image (its stage and the stages it is built `FROM`).
    Min,
    /// Every step of every stage built, intermediate stages included.
    Max,
}

/// Where `--cache-to` writes.
#[derive(Clone, Debug, PartialEq)]
pub enum ExportTarget {
    /// A cache artifact pushed to this reference.
    Registry(Reference),
    /// A cache artifact in an OCI layout directory.
    Dir(PathBuf),
    /// The records, inside the image itself (a manifest annotation).
    Inline,
}

impl std::fmt::Display for ExportTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExportTarget::Registry(r) => write!(f, "{r}"),
            ExportTarget::Dir(d) => write!(f, "{}", d.display()),
            ExportTarget::Inline => f.write_str("the image (inline)"),
        }
    }
}

/// One `--cache-to`.
#[derive(Clone, Debug, PartialEq)]
pub struct Export {
    /// Where.
    pub target: ExportTarget,
    /// Which steps.
    pub mode: Mode,
    /// A failed export is a warning (true, the default) or fails the build.
    pub ignore_error: bool,
}

/// A record a build made or reused, for exports.
#[derive(Clone, Debug)]
pub struct BuiltRecord {
    /// The record.
    pub record: Record,
    /// Whether the step's stage is the exported image's (or one it is built `FROM`).
    pub in_image: bool,
}

/// The records an export in `mode` carries: one per key, sorted by key.
pub fn select(built: &[BuiltRecord], mode: Mode) -> Vec<Record> {
    let mut by_key = std::collections::BTreeMap::new();
    for b in built {
        if mode == Mode::Max || b.in_image {
            by_key.entry(b.record.key).or_insert_with(|| {
                let mut r = b.record.clone();
                r.step_id = None;
                r
            });
        }
    }
    by_key.into_values().collect()
}

/// Opens the `--cache-from` caches, in order, loading their records; what is wrong with them
/// comes back as warnings (a cache that cannot be read serves nothing).
pub fn open_imports<'a>(
    store: &'a Store,
    client: &'a Client,
    imports: &[Import],
) -> (Vec<Box<dyn CacheBackend + 'a>>, Vec<String>) {
    let mut caches: Vec<Box<dyn CacheBackend + 'a>> = Vec::new();
    let mut warnings = Vec::new();
    for import in imports {
        let (cache, problems): (Box<dyn CacheBackend + 'a>, _) = match import {
            Import::Registry(r) => {
                let (c, w) = RegistryCache::open(store, client, r.clone());
                (Box::new(c), w)
            }
            Import::Dir(d) => {
                let (c, w) = DirCache::open(store, d.clone());
                (Box::new(c), w)
            }
        };
        caches.push(cache);
        warnings.extend(problems);
    }
    (caches, warnings)
}

/// Writes a build's records to a `--cache-to` target, replacing what it held; returns how
/// many. Inline records travel in the image ([`inline_annotation`]) and need nothing here.
pub fn export(
    store: &Store,
    client: &Client,
    export: &Export,
    built: &[BuiltRecord],
) -> Result<usize, CacheError> {
    let records = select(built, export.mode);
    match &export.target {
        ExportTarget::Registry(r) => {
            RegistryCache::new(store, client, r.clone()).store(&records)?
        }
        ExportTarget::Dir(d) => DirCache::new(store, d.clone()).store(&records)?,
        ExportTarget::Inline => {}
    }
    Ok(records.len())
}

/// The image-manifest annotation carrying `built`'s image records inline (without inputs),
/// those whose layer is one of the image's `layers`.
pub fn inline_annotation(built: &[BuiltRecord], layers: &[Descriptor]) -> (String, String) {
    let records: Vec<Record> = select(built, Mode::Min)
        .into_iter()
        .filter(|r| {
            r.layer
                .as_ref()
                .is_none_or(|l| layers.iter().any(|d| d.digest == l.desc.digest))
        })
        .collect();
    let (config, _) = record::encode(&records, false);
    (
        INLINE_ANNOTATION.to_string(),
        String::from_utf8_lossy(&config).into_owned(),
    )
}

/// A step's inputs as shared caches may hold them: build-arg values (which may be tokens)
/// replaced by a digest of the value, still enough to tell that one changed.
pub fn shareable(inputs: &StepInputs) -> StepInputs {
    let mut out = inputs.clone();
    for v in out.args.values_mut() {
        *v = Digest::of(format!("kiln build arg\n{v}").as_bytes()).to_string();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_inputs_never_hold_build_arg_values() {
        let mut i = StepInputs::default();
        i.args.insert("TOKEN".into(), "s3cret".into());
        let s = shareable(&i);
        assert!(!serde_json::to_string(&s).unwrap().contains("s3cret"));
        let mut j = i.clone();
        j.args.insert("TOKEN".into(), "other".into());
        assert_ne!(s.args, shareable(&j).args);
        assert_eq!(s.args, shareable(&i).args);
    }

    #[test]
    fn min_exports_the_image_steps_max_all_once_each() {
        let rec = |n: u8| Record {
            key: Digest::of(&[n]),
            parent: Digest::of(b"p"),
            inputs: None,
            basis: None,
            layer: None,
            created: None,
            linked: None,
            step_id: Some(Digest::of(b"here")),
        };
        let built = vec![
            BuiltRecord {
                record: rec(1),
                in_image: false,
            },
            BuiltRecord {
                record: rec(2),
                in_image: true,
            },
            BuiltRecord {
                record: rec(2),
                in_image: true,
            },
        ];
        let min = select(&built, Mode::Min);
        assert_eq!(min.len(), 1);
        assert_eq!(min[0].key, Digest::of(&[2]));
        assert!(min[0].step_id.is_none(), "never exported");
        assert_eq!(select(&built, Mode::Max).len(), 2);
    }
}
