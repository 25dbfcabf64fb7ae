//! The local store as a cache backend: a record per cache key (`ROOT/cache/<key>.json`), and
//! per step of a recipe on this machine what its last build saw, for miss explanations.

use serde::{Deserialize, Serialize};

use super::{CacheBackend, CacheError, Hit, Layer, Lookup, Miss, Record};
use crate::digest::Digest;
use crate::plan::{KeyBasis, StepInputs, explain_difference};
use crate::store::Store;

/// What the store holds under a cache key.
#[derive(Serialize, Deserialize)]
struct KeyRecord {
    layer: Option<Layer>,
    created: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    linked: Option<Digest>,
}

/// What the last build of a step saw (under the step's id).
#[derive(Serialize, Deserialize)]
struct StepRecord {
    parent: Digest,
    inputs: StepInputs,
    #[serde(default)]
    basis: Option<KeyBasis>,
}

/// The local store's cache records.
pub struct LocalCache<'a> {
    store: &'a Store,
}

impl<'a> LocalCache<'a> {
    /// The cache of `store`.
    pub fn new(store: &'a Store) -> LocalCache<'a> {
        LocalCache { store }
    }
}

impl CacheBackend for LocalCache<'_> {
    fn name(&self) -> &str {
        "local"
    }

    fn lookup(&self, key: &Digest) -> Lookup {
        let value = match self.store.cache_get(key) {
            Ok(Some(v)) => v,
            Ok(None) => return Lookup::Miss,
            Err(e) => return Lookup::Unusable(format!("local cache record: {e}")),
        };
        let Ok(record) = serde_json::from_value::<KeyRecord>(value) else {
            return Lookup::Unusable(format!("local cache record {key} is malformed"));
        };
        // A record whose layer blob was pruned is a miss.
        match &record.layer {
            Some(l) if !self.store.has_blob(&l.desc.digest) => Lookup::Miss,
            _ => Lookup::Hit(Box::new(Hit {
                layer: record.layer,
                created: record.created,
                linked: record.linked,
                origin: None,
            })),
        }
    }

    fn explain(&self, miss: &Miss<'_>) -> Option<String> {
        let old = self.store.cache_get(&miss.step_id).ok()??;
        let old = serde_json::from_value::<StepRecord>(old).ok()?;
        Some(explain_difference(
            &old.inputs,
            miss.inputs,
            (old.basis.as_ref(), miss.basis),
            old.parent != miss.parent,
        ))
    }

    fn store(&self, records: &[Record]) -> Result<(), CacheError> {
        for r in records {
            let value = serde_json::to_value(KeyRecord {
                layer: r.layer.clone(),
                created: r.created.clone(),
                linked: r.linked,
            })
            .unwrap_or_default();
            self.store.cache_put(&r.key, &value)?;
            if let (Some(id), Some(inputs)) = (r.step_id, &r.inputs) {
                let step = serde_json::to_value(StepRecord {
                    parent: r.parent,
                    inputs: inputs.clone(),
                    basis: r.basis.clone(),
                })
                .unwrap_or_default();
                self.store.cache_put(&id, &step)?;
            }
        }
        Ok(())
    }
}
