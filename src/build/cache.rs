//! The build cache and layer commits: looking a step up, explaining a miss, recording a
//! result, turning an upper dir into a stored layer, and the unpacked layer dirs of base images.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::{Condvar, Mutex};

use serde::{Deserialize, Serialize};

use super::record::CacheState;
use super::{BuildError, Engine, Layer, StageState, StepPlace, scratch_state};
use crate::digest::Digest;
use crate::image::{self, Descriptor, Platform};
use crate::plan::{self, StepInputs};
use crate::registry::reference::Reference;
use crate::snapshot::{self, Compression, LayerOptions};
use crate::store::StoredRef;

/// What a cache record holds.
#[derive(Serialize, Deserialize)]
struct CacheRecord {
    layer: Option<Layer>,
    created: Option<String>,
}

/// What the last build of a step saw (for miss explanations).
#[derive(Serialize, Deserialize)]
struct StepRecord {
    parent: Digest,
    inputs: StepInputs,
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

impl Engine<'_> {
    /// The identity of a step across builds (its recipe, stage, position and platform), under
    /// which its latest inputs are kept to explain the next miss.
    fn identity(&self, stage: usize, n: usize, platform: &Platform) -> Digest {
        Digest::of(
            format!(
                "kiln-step-identity\n{}\n{stage}\n{n}\n{platform}",
                self.recipe_id
            )
            .as_bytes(),
        )
    }

    /// Looks the step up in the cache and returns the record of a hit. On a miss, tells the
    /// progress view why, comparing with the step's last build (whose `parent` is the key the
    /// step was built on).
    #[allow(clippy::too_many_arguments)]
    fn try_cache(
        &self,
        stage: usize,
        n: usize,
        platform: &Platform,
        parent: &Digest,
        key: &Digest,
        inputs: &StepInputs,
        step: &crate::progress::Step<'_>,
    ) -> Result<Option<CacheRecord>, BuildError> {
        let cached = match self.opts.no_cache && !self.steps.built_here(key) {
            true => None,
            false => self.store.cache_get(key)?,
        };
        let mut other_encoding = false;
        if let Some(record) = cached.and_then(|v| serde_json::from_value::<CacheRecord>(v).ok()) {
            // A record whose layer blob was pruned, or that is encoded differently from what
            // this build asks for (`--compression`), is a miss.
            let usable = match &record.layer {
                Some(l) => {
                    other_encoding = l.desc.media_type != self.layer_media_type();
                    self.store.has_blob(&l.desc.digest) && !other_encoding
                }
                None => true,
            };
            if usable {
                return Ok(Some(record));
            }
        }
        let reason = if self.opts.no_cache {
            Some("--no-cache".to_string())
        } else if other_encoding {
            Some("the cached layer has another compression".to_string())
        } else {
            // A step never built before needs no explanation.
            self.store
                .cache_get(&self.identity(stage, n, platform))?
                .and_then(|v| serde_json::from_value::<StepRecord>(v).ok())
                .map(|old| plan::explain_difference(&old.inputs, inputs, old.parent != *parent))
        };
        if let Some(reason) = reason {
            step.rebuild_reason(&reason);
        }
        Ok(None)
    }

    fn apply_record(
        &self,
        st: &mut StageState,
        key: Digest,
        record: CacheRecord,
        created_by: String,
    ) -> Result<(), BuildError> {
        st.created = record.created.clone();
        match record.layer {
            Some(layer) => {
                st.config.rootfs.diff_ids.push(layer.diff_id);
                st.layers.push(layer);
                self.history(st, created_by, false);
            }
            None => self.history(st, created_by, true),
        }
        st.key = key;
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn remember(
        &self,
        stage: usize,
        n: usize,
        platform: &Platform,
        parent: Digest,
        key: &Digest,
        inputs: StepInputs,
        record: &CacheRecord,
    ) -> Result<(), BuildError> {
        let value = serde_json::to_value(record).unwrap_or_default();
        self.store.cache_put(key, &value)?;
        self.steps.record_built(*key);
        if n != usize::MAX {
            let id = serde_json::to_value(StepRecord { parent, inputs }).unwrap_or_default();
            self.store
                .cache_put(&self.identity(stage, n, platform), &id)?;
        }
        Ok(())
    }

    fn record_step(&self, place: &StepPlace, cache: CacheState, layer: Option<Digest>) {
        let stage = (place.stage, self.stage_name(place.stage));
        let text = &place.created_by;
        self.recorder
            .step(stage, place.n, place.line, text, cache, layer);
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
        let platform = st.platform.clone();
        match self.try_cache(
            place.stage,
            place.n,
            &platform,
            &parent,
            &key,
            inputs,
            &step,
        )? {
            Some(record) => {
                drop(claim);
                let layer = record.layer.as_ref().map(|l| l.desc.digest);
                self.apply_record(st, key, record, place.created_by.clone())?;
                self.record_step(place, CacheState::Hit, layer);
                step.cached();
                Ok(None)
            }
            None => Ok(Some((step, claim))),
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

    /// Records a step's result (its layer, if it made one) in the cache and applies it.
    pub(super) fn commit_layer(
        &self,
        st: &mut StageState,
        place: StepPlace,
        (parent, key): (Digest, Digest),
        inputs: StepInputs,
        layer: Option<Layer>,
        step: crate::progress::Step<'_>,
    ) -> Result<(), BuildError> {
        let record = CacheRecord {
            layer,
            created: Some(self.now_created()),
        };
        let platform = st.platform.clone();
        self.remember(
            place.stage,
            place.n,
            &platform,
            parent,
            &key,
            inputs,
            &record,
        )?;
        let layer = record.layer.as_ref().map(|l| l.desc.digest);
        self.record_step(&place, CacheState::Miss, layer);
        self.apply_record(st, key, record, place.created_by)?;
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
        st.layers
            .iter()
            .rev()
            .map(|l| self.ensure_layer_dir(l))
            .collect()
    }

    /// The unpacked dir of a layer, unpacking its blob once if needed.
    fn ensure_layer_dir(&self, layer: &Layer) -> Result<PathBuf, BuildError> {
        if let Some(dir) = self.store.layer_dir(&layer.diff_id) {
            return Ok(dir);
        }
        let scratch = self.store.scratch_dir()?;
        let dir = scratch.path().join("layer");
        std::fs::create_dir(&dir).map_err(|e| {
            BuildError::Image(format!("unpacking layer {}: {e}", layer.desc.digest))
        })?;
        let blob = self.store.open_blob(&layer.desc.digest)?;
        let diff_id = snapshot::unpack_layer(std::io::BufReader::new(blob), &dir).map_err(|e| {
            BuildError::Image(format!("unpacking layer {}: {e}", layer.desc.digest))
        })?;
        if diff_id != layer.diff_id {
            return Err(BuildError::Image(format!(
                "layer {} has diff_id {diff_id}, but the image config says {}",
                layer.desc.digest, layer.diff_id
            )));
        }
        Ok(self.store.install_layer_dir(&layer.diff_id, &dir)?)
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
        let image = {
            let _one_pull_at_a_time = self.pulls.lock().unwrap_or_else(|e| e.into_inner());
            let (image, available) = match self.store.lookup(&name)? {
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
            match image {
                Some(image) => image,
                None => {
                    self.progress
                        .info(&format!("pulling {normalized} for {platform}"));
                    let pulled = crate::distribution::pull(
                        self.store,
                        &self.client,
                        &normalized,
                        Some(platform),
                    );
                    match pulled {
                        Ok((_, image)) => image,
                        Err(source) if !available.is_empty() => {
                            let have: Vec<String> =
                                available.iter().map(Platform::to_string).collect();
                            return Err(BuildError::Image(format!(
                                "{normalized} has no {platform} image in the store (it has {}), and pulling one failed: {source}",
                                have.join(", ")
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
        let own = image.config.platform();
        if !own.is_unknown() && !own.matches(platform) {
            return Err(BuildError::Image(format!(
                "{normalized} is an image for {}, not {platform}",
                own.normalized()
            )));
        }
        self.recorder
            .image(normalized.to_string(), image.manifest.digest);
        let diff_ids = &image.config.rootfs.diff_ids;
        if diff_ids.len() != image.manifest_body.layers.len() {
            return Err(BuildError::Image(format!(
                "{normalized}: manifest and config disagree on the number of layers"
            )));
        }
        let mut st = scratch_state(platform);
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
