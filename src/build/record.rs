//! What a build records about itself for provenance and `--verify`: the images it read (by
//! manifest digest), the context files and downloads its COPY/ADD steps read (by digest), and
//! every step with its cache state and layer. Steps are kept in recipe order whatever order
//! parallel stages finished in, so the record is the same from run to run.

use std::collections::BTreeMap;
use std::sync::Mutex;

use serde::Serialize;

use crate::digest::Digest;

/// Whether a step's result came from the cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CacheState {
    /// Reused from the cache.
    Hit,
    /// Run (or copied) in this build.
    Miss,
    /// A metadata-only step (ENV, CMD, …): nothing to look up.
    None,
}

/// One step of the build.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct StepRecord {
    /// The stage's name (or `stage-N`).
    pub stage: String,
    /// The instruction's line in the recipe.
    pub line: usize,
    /// The instruction as written.
    pub instruction: String,
    /// Whether it came from the cache.
    pub cache: CacheState,
    /// The layer it made, if any (blob digest).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub layer: Option<Digest>,
    /// Position in the recipe: stage index, then step (ONBUILD triggers first).
    #[serde(skip)]
    order: (usize, usize),
}

/// Everything a build read and did, for attestations.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct BuildRecord {
    /// Images read (FROM, COPY --from, RUN --mount from=): normalised reference → manifest
    /// digest.
    pub images: BTreeMap<String, Digest>,
    /// Context files COPY/ADD read: path → content digest (mode, owner, size, content).
    pub context_files: BTreeMap<String, String>,
    /// `ADD <url>` downloads: URL → sha256 of the content.
    pub downloads: BTreeMap<String, String>,
    /// Every step, in recipe order.
    pub steps: Vec<StepRecord>,
}

/// Collects a [`BuildRecord`] from the stage threads.
#[derive(Default)]
pub(super) struct Recorder {
    record: Mutex<BuildRecord>,
}

impl Recorder {
    fn with(&self, f: impl FnOnce(&mut BuildRecord)) {
        f(&mut self.record.lock().unwrap_or_else(|e| e.into_inner()));
    }

    pub(super) fn image(&self, reference: String, manifest: Digest) {
        self.with(|r| {
            r.images.insert(reference, manifest);
        });
    }

    pub(super) fn context_files(&self, files: &BTreeMap<String, String>) {
        self.with(|r| r.context_files.extend(files.clone()));
    }

    pub(super) fn download(&self, url: &str, digest: &Digest) {
        self.with(|r| {
            r.downloads.insert(url.to_string(), digest.hex());
        });
    }

    /// Records a finished step; `n` is its index in the stage (`usize::MAX` for an ONBUILD
    /// trigger, which runs before the stage's own steps).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn step(
        &self,
        (stage_index, stage): (usize, String),
        n: usize,
        line: usize,
        instruction: &str,
        cache: CacheState,
        layer: Option<Digest>,
    ) {
        let order = (stage_index, if n == usize::MAX { 0 } else { n + 1 });
        self.with(|r| {
            r.steps.push(StepRecord {
                stage,
                line,
                instruction: instruction.to_string(),
                cache,
                layer,
                order,
            })
        });
    }

    /// The record, steps in recipe order.
    pub(super) fn finish(self) -> BuildRecord {
        let mut r = self.record.into_inner().unwrap_or_else(|e| e.into_inner());
        // Stable: ONBUILD triggers of one stage keep the order they ran in.
        r.steps.sort_by_key(|s| s.order);
        r
    }
}
