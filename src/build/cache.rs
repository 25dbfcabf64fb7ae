//! The executor's side of the build cache: looking a step up in the caches (local store
//! first, then `--cache-from`), explaining a miss, recording a result; turning an upper dir
//! into a stored layer; and the unpacked layer dirs of base images and cached layers.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Condvar, Mutex};

use super::report::{Cached, Outcomes};
use super::{
    BuildError, Built, Engine, PlatformBuilt, Shared, StageState, StepPlace, run_stages,
    scratch_state,
};
use crate::cache::{self, BuiltRecord, Hit, Layer, Lookup, Miss, Record};
use crate::digest::Digest;
use crate::image::{self, Descriptor, Index, Platform};
use crate::plan::{self, Base, Plan, StepInputs};
use crate::registry::reference::Reference;
use crate::snapshot::{self, Compression, LayerOptions};
use crate::store::StoredRef;

/// What the key of a `COPY --link` layer is derived from instead of a parent step's key.
pub(super) const LINKED_PARENT: &[u8] = b"kiln: linked layers have no parent";

/// The stages whose steps make the final image's layers: the target and those it is built
/// `FROM`, transitively (the steps `--cache-to mode=min` exports).
pub(super) fn image_stages(plan: &Plan) -> BTreeSet<usize> {
    let mut stages = BTreeSet::new();
    let mut at = Some(plan.target);
    while let Some(i) = at {
        stages.insert(i);
        at = match plan.stages[i].base {
            Base::Stage(b) => Some(b),
            _ => None,
        };
    }
    stages
}

/// The cache keys of the steps being built now, by the builds of all platforms, and those
/// built so far: a step whose key another thread is building waits for it and then finds it
/// in the cache, so the same work (a stage pinned to `$BUILDPLATFORM`) is done once.
#[derive(Default)]
pub(super) struct StepClaims {
    state: Mutex<Claims>,
    released: Condvar,
}

#[derive(Default)]
struct Claims {
    running: BTreeSet<Digest>,
    built: BTreeSet<Digest>,
}

/// A step being built under a cache key; the key is released when this is dropped, once the
/// step is committed or has failed.
pub(super) struct StepClaim<'a> {
    claims: &'a StepClaims,
    key: Digest,
}

impl StepClaims {
    fn lock(&self) -> std::sync::MutexGuard<'_, Claims> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Claims `key`, first waiting while another thread builds a step under it.
    fn claim(&self, key: Digest) -> StepClaim<'_> {
        let mut state = self.lock();
        while state.running.contains(&key) {
            state = self.released.wait(state).unwrap_or_else(|e| e.into_inner());
        }
        state.running.insert(key);
        StepClaim { claims: self, key }
    }

    /// Whether this build made the step of `key` (so `--no-cache` may use it).
    fn built_here(&self, key: &Digest) -> bool {
        self.lock().built.contains(key)
    }

    fn record_built(&self, key: Digest) {
        self.lock().built.insert(key);
    }
}

impl Drop for StepClaim<'_> {
    fn drop(&mut self) {
        self.claims.lock().running.remove(&self.key);
        self.claims.released.notify_all();
    }
}

/// Runs the build of every platform until it ends without a layer from a shared cache turning
/// out unusable. Such a layer (it cannot be had, or is not what its record says) is left out
/// and the build runs again: steps already done are local hits by then. Each round rejects one
/// more layer, so this ends. Several platforms' images end in an index.
pub(super) fn build_attempts(shared: &Shared, engines: &[Engine]) -> Result<Built, BuildError> {
    loop {
        for engine in engines {
            *engine.outcomes.lock().unwrap_or_else(|e| e.into_inner()) = Outcomes::default();
        }
        let result = run_stages(shared, engines).and_then(|states| {
            engines
                .iter()
                .zip(states)
                .map(|(engine, state)| engine.finish(state))
                .collect::<Result<Vec<_>, _>>()
        });
        match result {
            Err(BuildError::CacheLayer {
                digest,
                cache,
                reason,
            }) if shared.reject(digest) => {
                shared.progress.warn(&format!(
                    "cache {cache}: layer {digest} is unusable ({reason}); building again without it"
                ));
                shared.store.forget_promise(&digest)?;
                // A failed stage raised `cancel` to stop the others; the user did not.
                if shared.stopped_others.swap(false, Ordering::SeqCst) {
                    shared.cancel.store(false, Ordering::SeqCst);
                }
            }
            Err(e) => return Err(e),
            Ok(images) => {
                let (mut steps, mut records) = (Vec::new(), Vec::new());
                let mut platforms = Vec::new();
                for (engine, image) in engines.iter().zip(images) {
                    let Outcomes {
                        steps: mut done,
                        records: kept,
                        read,
                    } = std::mem::take(
                        &mut *engine.outcomes.lock().unwrap_or_else(|e| e.into_inner()),
                    );
                    done.sort_by_key(|(order, _)| *order);
                    steps.extend(done.into_iter().map(|(_, s)| s));
                    records.extend(kept);
                    platforms.push(PlatformBuilt {
                        platform: engine.target.clone(),
                        image,
                        record: read,
                    });
                }
                let image = match platforms.as_slice() {
                    [one] => StoredRef::Image(one.image.clone()),
                    _ => {
                        let entries = platforms.iter().map(|p| p.image.index_entry()).collect();
                        StoredRef::Index(shared.store.put_index(&Index::of(entries))?)
                    }
                };
                return Ok(Built {
                    image,
                    steps,
                    records,
                    platforms,
                });
            }
        }
    }
}

/// What the caches hold under a key.
enum Found {
    /// A usable record, from the cache of this index.
    Hit(Box<Hit>, usize),
    /// None: `--no-cache` or `--no-cache-filter` (named) forbids it.
    Refused(&'static str),
    /// None usable; `other_encoding` when one had a layer of another compression.
    Miss { other_encoding: bool },
}

impl Shared<'_> {
    /// Leaves a shared cache's layer out of later attempts; false if it already was.
    pub(super) fn reject(&self, layer: Digest) -> bool {
        self.rejected
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(layer)
    }
}

impl Engine<'_> {
    /// Keeps a record of this build for `--cache-to`.
    pub(super) fn keep_record(&self, stage: usize, record: Record) {
        let in_image = self.image_stages.contains(&stage);
        self.outcomes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .records
            .push(BuiltRecord { record, in_image });
    }

    /// Shows a warning, once per build.
    fn warn_once(&self, text: String) {
        let fresh = self
            .warned
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(text.clone());
        if fresh {
            self.progress.warn(&text);
        }
    }

    /// The identity of a step across builds (its recipe, stage, position and the platform
    /// built for), under which its latest inputs are kept to explain the next miss.
    fn identity(&self, stage: usize, n: usize) -> Digest {
        let id = format!(
            "kiln-step-identity-v2\n{}\n{stage}\n{n}\n{}",
            self.recipe_id, self.target
        );
        Digest::of(id.as_bytes())
    }

    /// The cache key of a step with `inputs` derived from `parent`: every kind of step's key
    /// comes from here, with the build's [`plan::KeyBasis`] in it.
    pub(super) fn step_key(&self, parent: &Digest, inputs: &StepInputs) -> Digest {
        plan::cache_key(parent, &self.key_basis, inputs)
    }

    /// Looks the step up in the caches in order and returns a hit and the cache's index. A
    /// shared cache's layer that the store does not hold is promised, not fetched. On a miss,
    /// returns why the step is rebuilt (when that can be told).
    fn try_cache(
        &self,
        place: &StepPlace,
        (parent, key): (&Digest, &Digest),
        inputs: &StepInputs,
    ) -> Result<Result<(Hit, usize), Option<String>>, BuildError> {
        let other_encoding = match self.find_cached(place, key)? {
            Found::Hit(hit, i) => return Ok(Ok((*hit, i))),
            Found::Refused(why) => return Ok(Err(Some(why.to_string()))),
            Found::Miss { other_encoding } => other_encoding,
        };
        if other_encoding {
            return Ok(Err(Some(
                "the cached layer has another compression".to_string(),
            )));
        }
        let shared = cache::shareable(inputs);
        let miss = Miss {
            step_id: self.identity(place.stage, place.n),
            parent: *parent,
            inputs: &shared,
            basis: &self.key_basis,
        };
        let (local, remote) = self.caches.split_at(1);
        if remote.is_empty() {
            // A step never built before needs no explanation.
            return Ok(Err(local[0].explain(&miss)));
        }
        let names: Vec<&str> = remote.iter().map(|c| c.name()).collect();
        let mut reason = format!("not in cache {}", names.join(", "));
        if let Some(why) = remote.iter().find_map(|c| c.explain(&miss)) {
            reason += &format!("; nearest record differs: {why}");
        } else if let Some(why) = local[0].explain(&miss) {
            reason += &format!("; last local build differs: {why}");
        }
        Ok(Err(Some(reason)))
    }

    /// The first usable record of `key` in the caches, in order, and the cache's index. A
    /// shared cache's layer that the store does not hold is promised, not fetched.
    fn find_cached(&self, place: &StepPlace, key: &Digest) -> Result<Found, BuildError> {
        // Under --no-cache only what this build made counts (another platform's result).
        if self.opts.no_cache && !self.steps.built_here(key) {
            return Ok(Found::Refused("--no-cache"));
        }
        if self.no_cache_stage(place.stage) && !self.steps.built_here(key) {
            return Ok(Found::Refused("--no-cache-filter"));
        }
        let mut other_encoding = false;
        for (i, cache) in self.caches.iter().enumerate() {
            let hit = match cache.lookup(key) {
                Lookup::Miss => continue,
                Lookup::Unusable(warning) => {
                    self.warn_once(warning);
                    continue;
                }
                Lookup::Hit(hit) => *hit,
            };
            if let Some(l) = &hit.layer {
                // A layer encoded otherwise than this build asks for (`--compression`) is a
                // miss, as is one found unusable in an earlier attempt.
                if l.desc.media_type != self.layer_media_type() {
                    other_encoding = true;
                    continue;
                }
                if self
                    .rejected
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .contains(&l.desc.digest)
                {
                    continue;
                }
                if let Some(origin) = &hit.origin {
                    self.store.promise_blob(&l.desc.digest, origin)?;
                }
            }
            return Ok(Found::Hit(Box::new(hit), i));
        }
        Ok(Found::Miss { other_encoding })
    }

    /// Applies a cached result to the stage, and keeps its record for exports.
    fn apply_record(&self, st: &mut StageState, place: &StepPlace, record: Record) {
        st.created = record.created.clone();
        match &record.layer {
            Some(layer) => {
                st.config.rootfs.diff_ids.push(layer.diff_id);
                st.layers.push(layer.clone());
                self.history(st, place.created_by.clone(), false);
            }
            None => self.history(st, place.created_by.clone(), true),
        }
        st.key = record.key;
        self.keep_record(place.stage, record);
    }

    /// The record of a step: `key` derived from `parent`, its inputs, layer and time.
    fn record(
        &self,
        place: &StepPlace,
        (parent, key): (Digest, Digest),
        inputs: &StepInputs,
        (layer, created): (Option<Layer>, Option<String>),
    ) -> Record {
        Record {
            key,
            parent,
            inputs: Some(cache::shareable(inputs)),
            basis: Some(self.key_basis.clone()),
            layer,
            created,
            linked: None,
            step_id: (place.n != usize::MAX).then(|| self.identity(place.stage, place.n)),
        }
    }

    pub(super) fn now_created(&self) -> String {
        let secs = self.opts.source_date_epoch.unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs() as i64)
                .unwrap_or(0)
        });
        image::rfc3339(secs)
    }

    /// Applies the hit of cache `i` to the stage.
    fn take_hit(
        &self,
        st: &mut StageState,
        place: &StepPlace,
        (parent, key): (Digest, Digest),
        inputs: &StepInputs,
        (hit, i): (Hit, usize),
    ) {
        st.cached = match i {
            0 => Cached::Local,
            _ => Cached::Shared(self.caches[i].name().to_string()),
        };
        st.looked_up = true;
        let mut record = self.record(place, (parent, key), inputs, (hit.layer, hit.created));
        record.linked = hit.linked;
        if let Some(own) = hit.linked {
            // A `COPY --link` found by its alias: its own record goes to the exports too.
            let mut own_record = record.clone();
            (own_record.key, own_record.parent) = (own, Digest::of(LINKED_PARENT));
            (own_record.inputs, own_record.linked, own_record.step_id) = (None, None, None);
            self.keep_record(place.stage, own_record);
        }
        self.apply_record(st, place, record);
    }

    /// Looks a step up under `key` and applies a hit (true); a miss is not explained. For a
    /// `COPY --link`'s alias, which is asked before its own key.
    pub(super) fn reuse_if_cached(
        &self,
        st: &mut StageState,
        place: &StepPlace,
        (parent, key): (Digest, Digest),
        inputs: &StepInputs,
    ) -> Result<bool, BuildError> {
        match self.find_cached(place, &key)? {
            Found::Hit(hit, i) => {
                self.take_hit(st, place, (parent, key), inputs, (*hit, i));
                Ok(true)
            }
            Found::Refused(_) | Found::Miss { .. } => Ok(false),
        }
    }

    /// Records the result just applied to the stage under `own` (its layer, if
    /// `layers_before` grew, and its time) under its alias `key` as well: a `COPY --link`'s,
    /// derived from `parent` (the stage's key below the step), so that the next build finds
    /// the step without looking at the stage's files. Exported with the build's other records.
    pub(super) fn record_alias(
        &self,
        st: &StageState,
        place: &StepPlace,
        (parent, key, own): (Digest, Digest, Digest),
        inputs: &StepInputs,
        layers_before: usize,
    ) -> Result<(), BuildError> {
        let layer = st.layers.get(layers_before).cloned();
        let mut record = self.record(place, (parent, key), inputs, (layer, st.created.clone()));
        record.linked = Some(own);
        // The step's own record explains its misses.
        record.step_id = None;
        self.caches[0]
            .store(std::slice::from_ref(&record))
            .map_err(|e| self.step_error(place.stage, place.line, e))?;
        self.steps.record_built(key);
        self.keep_record(place.stage, record);
        Ok(())
    }

    /// On a cache hit applies the cached result and closes the step (None); on a miss returns
    /// the step to run, having said why it is rebuilt, with the claim on its key to hold until
    /// it is committed. While another platform's build runs a step of the same key, this one
    /// waits for it and takes its result. `parent` is what the key was derived from (the
    /// stage's key, or a constant for a linked layer).
    pub(super) fn reuse_cached<'p>(
        &self,
        st: &mut StageState,
        place: &StepPlace,
        (parent, key): (Digest, Digest),
        inputs: &StepInputs,
        step: crate::progress::Step<'p>,
    ) -> Result<Option<(crate::progress::Step<'p>, StepClaim<'_>)>, BuildError> {
        let claim = self.steps.claim(key);
        match self.try_cache(place, (&parent, &key), inputs)? {
            Ok(found) => {
                drop(claim);
                self.take_hit(st, place, (parent, key), inputs, found);
                step.cached();
                Ok(None)
            }
            Err(reason) => {
                if let Some(reason) = &reason {
                    step.rebuild_reason(reason);
                }
                st.cached = Cached::No;
                st.looked_up = true;
                st.reason = reason;
                Ok(Some((step, claim)))
            }
        }
    }

    /// Snapshots a finished step's upper dir into a layer, records it in the cache (and as the
    /// step's latest build, for explanations) and applies it to the stage.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn commit_step(
        &self,
        st: &mut StageState,
        place: StepPlace,
        parent: Digest,
        key: Digest,
        inputs: StepInputs,
        (upper, pre): (&Path, &snapshot::Precompressed),
        step: crate::progress::Step<'_>,
    ) -> Result<(), BuildError> {
        let layer = self
            .commit_upper(upper, pre)
            .map_err(|e| self.step_error(place.stage, place.line, e))?;
        self.commit_layer(st, place, (parent, key), inputs, layer, step)
    }

    /// Records a step's result (its layer, if it made one) in the local cache and applies it.
    pub(super) fn commit_layer(
        &self,
        st: &mut StageState,
        place: StepPlace,
        (parent, key): (Digest, Digest),
        inputs: StepInputs,
        layer: Option<Layer>,
        step: crate::progress::Step<'_>,
    ) -> Result<(), BuildError> {
        let created = Some(self.now_created());
        let record = self.record(&place, (parent, key), &inputs, (layer, created));
        self.caches[0]
            .store(std::slice::from_ref(&record))
            .map_err(|e| self.step_error(place.stage, place.line, e))?;
        self.steps.record_built(key);
        self.apply_record(st, &place, record);
        step.done();
        Ok(())
    }

    /// The media type of the layers this build writes.
    fn layer_media_type(&self) -> &'static str {
        match self.opts.compression {
            Compression::Gzip => image::MEDIA_LAYER_GZIP,
            Compression::Zstd => image::MEDIA_LAYER_ZSTD,
            Compression::None => image::MEDIA_LAYER_TAR,
        }
    }

    /// Turns a step's upper dir into a stored layer (with the blocks of `pre`, compressed while
    /// the step ran) and keeps the dir as that layer's unpacked form; None when the step
    /// changed nothing.
    fn commit_upper(
        &self,
        upper: &Path,
        pre: &snapshot::Precompressed,
    ) -> Result<Option<Layer>, String> {
        if !snapshot::upper_has_changes(upper).map_err(|e| e.to_string())? {
            return Ok(None);
        }
        let layer =
            self.store_layer(|opts, out| snapshot::write_layer_with(upper, opts, out, pre))?;
        self.store
            .install_layer_dir(&layer.diff_id, upper)
            .map_err(|e| e.to_string())?;
        Ok(Some(layer))
    }

    /// Stores the layer of `entries` (read from `origin`), never unpacked until a step needs
    /// it; None when there are no entries.
    pub(super) fn commit_listed(
        &self,
        entries: Vec<snapshot::ListedEntry>,
        origin: &Path,
    ) -> Result<Option<Layer>, String> {
        if entries.is_empty() {
            return Ok(None);
        }
        self.store_layer(|opts, out| snapshot::write_listed_layer(entries, origin, opts, out))
            .map(Some)
    }

    /// Writes one layer blob into the store with `write` (this build's layer options).
    fn store_layer(
        &self,
        write: impl FnOnce(
            &LayerOptions,
            crate::store::BlobWriter,
        ) -> Result<
            (crate::store::BlobWriter, snapshot::LayerSummary),
            snapshot::SnapshotError,
        >,
    ) -> Result<Layer, String> {
        let opts = LayerOptions {
            source_date_epoch: self.opts.source_date_epoch,
            compression: self.opts.compression,
        };
        let media_type = self.layer_media_type();
        let writer = self.store.blob_writer().map_err(|e| e.to_string())?;
        let (writer, summary) = write(&opts, writer).map_err(|e| e.to_string())?;
        let (digest, size) = writer.commit().map_err(|e| e.to_string())?;
        Ok(Layer {
            desc: Descriptor::new(media_type, digest, size),
            diff_id: summary.diff_id,
        })
    }

    /// The overlay lower dirs of `st`'s rootfs, top first, unpacking any layer not unpacked yet
    /// (a layer written straight from its sources, or a base image's layer never needed before).
    pub(super) fn lowers(&self, st: &StageState) -> Result<Vec<PathBuf>, BuildError> {
        // A layer can occur twice in one image (two steps that wrote the same bytes, with
        // SOURCE_DATE_EPOCH; a pulled image with repeated layers), and overlayfs refuses a
        // lower dir given twice (ELOOP). The upper occurrence alone gives the same view: all
        // it holds already lies above the lower one.
        let mut seen = std::collections::BTreeSet::new();
        st.layers
            .iter()
            .rev()
            .filter(|l| seen.insert(l.diff_id))
            .map(|l| self.ensure_layer_dir(l))
            .collect()
    }

    /// The unpacked dir of a layer, unpacking its blob once if needed (fetching it first when
    /// a shared cache promised it).
    fn ensure_layer_dir(&self, layer: &Layer) -> Result<PathBuf, BuildError> {
        if let Some(dir) = self.store.layer_dir(&layer.diff_id) {
            return Ok(dir);
        }
        let shared = self.fetch_layer(layer)?;
        let scratch = self.store.scratch_dir()?;
        let dir = scratch.path().join("layer");
        let failed = |reason: String| match &shared {
            Some(cache) => BuildError::CacheLayer {
                digest: layer.desc.digest,
                cache: cache.clone(),
                reason,
            },
            None => BuildError::Image(format!("unpacking layer {}: {reason}", layer.desc.digest)),
        };
        std::fs::create_dir(&dir).map_err(|e| failed(e.to_string()))?;
        let blob = self.store.open_blob(&layer.desc.digest)?;
        let unpacked = snapshot::unpack_layer(std::io::BufReader::new(blob), &dir)
            .map_err(|e| failed(e.to_string()))?;
        let diff_id = unpacked.diff_id;
        if !unpacked.notes.is_empty() {
            self.progress
                .warn(&unpack_notes_warning(&layer.desc.digest, &unpacked.notes));
        }
        if diff_id != layer.diff_id {
            return Err(failed(format!(
                "its diff_id is {diff_id}, but the record says {}",
                layer.diff_id
            )));
        }
        Ok(self.store.install_layer_dir(&layer.diff_id, &dir)?)
    }

    /// Makes a layer's blob present, fetching it when a shared cache promised it; returns the
    /// origin it came from in that case. A fetch that fails is [`BuildError::CacheLayer`].
    pub(super) fn fetch_layer(&self, layer: &Layer) -> Result<Option<String>, BuildError> {
        let d = &layer.desc.digest;
        if self.store.has_blob(d) {
            return Ok(None);
        }
        let Some(origin) = self.store.blob_origin(d) else {
            return Err(crate::store::StoreError::BlobNotFound {
                digest: *d,
                root: self.store.root().to_path_buf(),
            }
            .into());
        };
        self.store
            .fetch_promised(d)
            .map_err(|e| BuildError::CacheLayer {
                digest: *d,
                cache: origin.clone(),
                reason: e.to_string(),
            })?;
        Ok(Some(origin))
    }

    /// The state of a stage starting from image `reference` for `platform`: from the store
    /// (an index there gives the image for the platform), else pulled.
    pub(super) fn load_image(
        &self,
        reference: &str,
        line: usize,
        platform: &Platform,
    ) -> Result<StageState, BuildError> {
        let normalized =
            Reference::parse(reference).map_err(|e| self.invalid(line, e.to_string()))?;
        let name = normalized.to_string();
        let (image, pulled) = {
            let mut pulled = self.pulls.lock().unwrap_or_else(|e| e.into_inner());
            // --pull asks the registry once per build and platform, even when the store has
            // the image.
            let asked = format!("{name} {platform}");
            let refresh = self.opts.pull && !pulled.contains(&asked);
            let (found, available) = match self.store.lookup(&name)? {
                _ if refresh => (None, Vec::new()),
                None => (None, Vec::new()),
                Some(StoredRef::Image(img)) => {
                    let own = img.config.platform();
                    match own.is_unknown() || own.matches(platform) {
                        true => (Some(img), Vec::new()),
                        false => (None, vec![own.normalized()]),
                    }
                }
                Some(StoredRef::Index(x)) => {
                    (self.store.image_in(&x, platform)?, x.body.platforms())
                }
            };
            match found {
                Some(image) => (image, false),
                None => {
                    pulled.insert(asked);
                    self.progress
                        .info(&format!("pulling {normalized} for {platform}"));
                    let pulled = crate::distribution::pull(
                        self.store,
                        self.client,
                        &normalized,
                        Some(platform),
                    );
                    match pulled {
                        Ok((_, image)) => (image, true),
                        Err(source) if !available.is_empty() => {
                            return Err(BuildError::Image(format!(
                                "{normalized} has no {platform} image in the store (it has {}), and pulling one failed: {source}",
                                image::platform_names(&available)
                            )));
                        }
                        Err(source) => {
                            return Err(BuildError::Pull {
                                reference: normalized.to_string(),
                                source: Box::new(source),
                            });
                        }
                    }
                }
            }
        };
        let cached = match pulled {
            true => Cached::No,
            false => Cached::Local,
        };
        self.image_state(&image, &normalized.to_string(), platform, cached)
    }

    /// The state of a stage starting from a stored image for `platform` (`name` for
    /// messages).
    pub(super) fn image_state(
        &self,
        image: &crate::store::StoredImage,
        name: &str,
        platform: &Platform,
        cached: Cached,
    ) -> Result<StageState, BuildError> {
        let own = image.config.platform();
        if !own.is_unknown() && !own.matches(platform) {
            return Err(BuildError::Image(format!(
                "{name} is an image for {}, not {platform}",
                own.normalized()
            )));
        }
        self.read_image(name.to_string(), image.manifest.clone());
        let diff_ids = &image.config.rootfs.diff_ids;
        if diff_ids.len() != image.manifest_body.layers.len() {
            return Err(BuildError::Image(format!(
                "{name}: manifest and config disagree on the number of layers"
            )));
        }
        let mut st = scratch_state(platform);
        st.cached = cached;
        st.config = image.config.clone();
        st.created = image.config.created.clone();
        st.key = Digest::of(format!("image\n{}\n{platform}", image.manifest.digest).as_bytes());
        for (desc, diff_id) in image.manifest_body.layers.iter().zip(diff_ids) {
            // The result is an OCI manifest: a Docker base's layers get OCI media types.
            let mut desc = desc.clone();
            desc.media_type = image::oci_layer_type(&desc.media_type).to_string();
            let layer = Layer {
                desc,
                diff_id: *diff_id,
            };
            st.layers.push(layer);
        }
        Ok(st)
    }
}

/// Says how an unpacked layer differs from its blob (a normal user's kiln cannot make some
/// entries); the layer blob and the digests built on it are unchanged.
fn unpack_notes_warning(layer: &Digest, notes: &snapshot::UnpackNotes) -> String {
    let mut parts = Vec::new();
    if notes.unmapped_owners > 0 {
        parts.push(format!(
            "{} entries are owned by ids the user namespace does not map and appear as root's",
            notes.unmapped_owners
        ));
    }
    if let Some(first) = notes.device_placeholders.first() {
        parts.push(format!(
            "{} device nodes (first: /{}) cannot be made without root and are empty files",
            notes.device_placeholders.len(),
            first.display()
        ));
    }
    if notes.skipped_xattrs > 0 {
        parts.push(format!(
            "{} trusted.* xattrs need root and were left out",
            notes.skipped_xattrs
        ));
    }
    format!("layer {layer}: {}", parts.join("; "))
}
