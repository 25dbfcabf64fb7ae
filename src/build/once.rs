//! Work done once however many threads ask for it: the first caller for a key computes the
//! value, callers arriving meanwhile wait for it, later ones get it at once.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// Values computed once per key. A computation that fails is not kept: the next caller for
/// that key tries again (and so gets its own error).
pub(super) struct OnceMap<K, V> {
    slots: Mutex<BTreeMap<K, Arc<Mutex<Option<V>>>>>,
}

impl<K, V> Default for OnceMap<K, V> {
    fn default() -> Self {
        OnceMap {
            slots: Mutex::new(BTreeMap::new()),
        }
    }
}

impl<K: Ord + Clone, V: Clone> OnceMap<K, V> {
    /// The value for `key`, computed by `compute` unless it was (or is being) computed already.
    pub(super) fn get_or_try<E>(
        &self,
        key: &K,
        compute: impl FnOnce() -> Result<V, E>,
    ) -> Result<V, E> {
        let slot = {
            let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
            Arc::clone(slots.entry(key.clone()).or_default())
        };
        let mut value = slot.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(v) = &*value {
            return Ok(v.clone());
        }
        let v = compute()?;
        *value = Some(v.clone());
        Ok(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    #[test]
    fn concurrent_callers_share_one_computation_and_errors_are_not_kept() {
        let map: OnceMap<&str, usize> = OnceMap::default();
        let runs = AtomicUsize::new(0);
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    let v = map.get_or_try(&"k", || {
                        runs.fetch_add(1, Ordering::SeqCst);
                        std::thread::sleep(Duration::from_millis(30));
                        Ok::<_, ()>(7)
                    });
                    assert_eq!(v, Ok(7));
                });
            }
        });
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        assert_eq!(map.get_or_try(&"e", || Err::<usize, _>("no")), Err("no"));
        assert_eq!(map.get_or_try(&"e", || Ok::<_, &str>(1)), Ok(1));
    }
}
