//! What a build did, step by step, and the `--metadata-file` document: BuildKit's keys
//! (`containerimage.digest`, `containerimage.config.digest`, `containerimage.descriptor`,
//! `image.name`) and kiln's `kiln.steps`.

use std::time::Instant;

use serde::{Serialize, Serializer};
use serde_json::{Value, json};

use super::record::BuildRecord;
use super::{Engine, StageState};
use crate::cache::BuiltRecord;
use crate::digest::Digest;
use crate::image::Platform;
use crate::store::StoredRef;

/// Where a step's result came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Cached {
    /// The local store's cache (or, for FROM, an image or stage at hand).
    Local,
    /// A shared cache, by its name (the reference or directory given to `--cache-from`).
    Shared(String),
    /// The step was run (or, for FROM, the image pulled).
    No,
}

impl Serialize for Cached {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(match self {
            Cached::Local => "local",
            Cached::Shared(name) => name,
            Cached::No => "no",
        })
    }
}

/// What a step is, as provenance tells steps apart.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StepKind {
    /// The stage's FROM (its base image or stage).
    From,
    /// A step looked up in the caches (RUN, COPY, ADD, WORKDIR).
    Lookup,
    /// A metadata-only step (ENV, LABEL, ARG, …): nothing to look up.
    Metadata,
}

/// One step of a build, as `kiln.steps` lists it.
#[derive(Clone, Debug, Serialize)]
pub struct StepReport {
    /// The stage's name (or `stage-N`).
    pub stage: String,
    /// The instruction's line in the recipe.
    pub line: usize,
    /// The instruction as written.
    pub instruction: String,
    /// Where its result came from; a metadata-only step (ENV, LABEL, …) takes the state of
    /// the step before it.
    pub cached: Cached,
    /// Why it was rebuilt, when it was and a reason is known.
    pub reason: Option<String>,
    /// How long it took.
    pub duration_s: f64,
    /// The layer it added, if any.
    pub layer: Option<Digest>,
    /// What kind of step it is (not in `kiln.steps`).
    #[serde(skip)]
    pub kind: StepKind,
    /// The platform of the build it is part of (not in `kiln.steps`, whose stage names show
    /// it when several are built).
    #[serde(skip)]
    pub platform: Platform,
}

/// What the steps of one attempt at the build did.
#[derive(Default)]
pub(super) struct Outcomes {
    /// Step reports by (stage, step number).
    pub(super) steps: Vec<((usize, usize), StepReport)>,
    /// Cache records made or reused.
    pub(super) records: Vec<BuiltRecord>,
    /// The images, context files and downloads the steps read.
    pub(super) read: BuildRecord,
}

impl Engine<'_> {
    /// Records what a step did for the build's report: `below` is how many layers the stage
    /// had before it (None for FROM, which adds none of its own).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn report(
        &self,
        stage: usize,
        order: usize,
        st: &StageState,
        instruction: &str,
        line: usize,
        started: Instant,
        below: Option<usize>,
    ) {
        let layer = below
            .filter(|&b| st.layers.len() > b)
            .and_then(|_| st.layers.last())
            .map(|l| l.desc.digest);
        let kind = match (below, st.looked_up) {
            (None, _) => StepKind::From,
            (Some(_), true) => StepKind::Lookup,
            (Some(_), false) => StepKind::Metadata,
        };
        let report = StepReport {
            stage: self.stage_name(stage),
            line,
            instruction: instruction.to_string(),
            cached: st.cached.clone(),
            reason: st.reason.clone(),
            duration_s: started.elapsed().as_secs_f64(),
            layer,
            kind,
            platform: self.target.clone(),
        };
        self.outcomes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .steps
            .push(((stage, order), report));
    }
}

/// The `--metadata-file` document for `image`, named `names` (none: no `image.name`). For an
/// index (several platforms) the digest and descriptor are the index's and, as BuildKit
/// writes it, there is no single config digest.
pub fn metadata(image: &StoredRef, names: &[String], steps: &[StepReport]) -> Value {
    let desc = image.descriptor();
    let mut doc = json!({
        "containerimage.digest": desc.digest,
        "containerimage.descriptor": {
            "mediaType": desc.media_type,
            "digest": desc.digest,
            "size": desc.size,
        },
        "kiln.steps": steps,
    });
    if let StoredRef::Image(img) = image {
        doc["containerimage.config.digest"] = json!(img.config_digest);
    }
    if !names.is_empty() {
        doc["image.name"] = names.join(",").into();
    }
    doc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cached_states_serialise_as_strings() {
        let step = |cached| StepReport {
            stage: "build".into(),
            line: 2,
            instruction: "RUN x".into(),
            cached,
            reason: None,
            duration_s: 0.5,
            layer: None,
            kind: StepKind::Lookup,
            platform: Platform::default(),
        };
        let v = serde_json::to_value([
            step(Cached::Local),
            step(Cached::Shared("r/c:1".into())),
            step(Cached::No),
        ])
        .unwrap();
        assert_eq!(v[0]["cached"], "local");
        assert_eq!(v[1]["cached"], "r/c:1");
        assert_eq!(v[2]["cached"], "no");
        assert_eq!(v[0]["reason"], Value::Null);
        assert_eq!(v[0]["layer"], Value::Null);
        // What provenance reads of a step stays out of `kiln.steps`.
        assert_eq!(v[0].as_object().unwrap().len(), 7, "{v}");
    }
}
