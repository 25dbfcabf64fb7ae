//! SLSA provenance v1 for a build, as the predicate of an in-toto statement: the build type, the
//! recipe and its digest, the build arguments (names and the sha256 of each value: build
//! arguments often carry tokens, and values never reach the image), the target, the images
//! read by digest, the context digest, downloads, kiln's version; with `mode=max` every step
//! with its cache state and layer. No wall-clock time when SOURCE_DATE_EPOCH is set.

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::{Value, json};

use crate::build::BuildOptions;
use crate::build::record::BuildRecord;
use crate::build::report::{Cached, StepKind, StepReport};
use crate::digest::Digest;
use crate::image::Platform;

/// The predicate type of SLSA provenance v1.
pub const PREDICATE_TYPE: &str = "https://slsa.dev/provenance/v1";

/// What this provenance's `buildType` names: a Dockerfile built by kiln, with the parameters
/// below (documented in the README, "Attestations").
pub const BUILD_TYPE: &str = "urn:kiln:build-type:dockerfile:v1";

/// The builder's id.
pub const BUILDER_ID: &str = "urn:kiln:builder";

/// How much the provenance says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Inputs and dependencies only.
    Min,
    /// Also every step, its cache state and its layer.
    Max,
}

/// When the build ran, for builds without SOURCE_DATE_EPOCH (RFC 3339).
pub struct Times {
    /// When it started.
    pub started: String,
    /// When it ended.
    pub finished: String,
}

/// The digest of what the build read from its context: sha256 over the sorted list of
/// (path, content digest) of every context file COPY and ADD read.
pub fn context_digest(record: &BuildRecord) -> Digest {
    let mut text = String::new();
    for (path, digest) in &record.context_files {
        text.push_str(&format!("{digest}  {path}\n"));
    }
    Digest::of(text.as_bytes())
}

/// One step as `mode=max` lists it.
#[derive(Serialize)]
struct StepEntry<'a> {
    stage: &'a str,
    line: usize,
    instruction: &'a str,
    /// `hit` (from the local store or a shared cache), `miss` (run here) or `none`
    /// (metadata-only: nothing to look up).
    cache: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    layer: Option<Digest>,
}

/// The steps of `platform`'s build as `mode=max` lists them, in recipe order, from the build's
/// step reports. FROM lines are left out (the base is among the resolved dependencies), and so
/// are durations and miss reasons (they differ from run to run and from store to store).
pub fn steps(reports: &[StepReport], platform: &Platform) -> Value {
    let entries: Vec<StepEntry> = reports
        .iter()
        .filter(|s| s.platform == *platform && s.kind != StepKind::From)
        .map(|s| StepEntry {
            stage: &s.stage,
            line: s.line,
            instruction: &s.instruction,
            cache: match (s.kind, &s.cached) {
                (StepKind::Lookup, Cached::No) => "miss",
                (StepKind::Lookup, Cached::Local | Cached::Shared(_)) => "hit",
                _ => "none",
            },
            layer: s.layer,
        })
        .collect();
    json!(entries)
}

fn digest_set(d: &Digest) -> Value {
    json!({ "sha256": d.hex() })
}

/// The recipe's name as the provenance shows it: its path relative to the context when it is
/// inside it, else its file name (absolute host paths would make the document depend on where
/// the build ran).
fn recipe_name(opts: &BuildOptions) -> String {
    let context = std::fs::canonicalize(&opts.context_dir).ok();
    let recipe = std::fs::canonicalize(&opts.recipe_path).ok();
    if let (Some(c), Some(r)) = (&context, &recipe)
        && let Ok(rel) = r.strip_prefix(c)
    {
        return rel.display().to_string();
    }
    opts.recipe_path
        .file_name()
        .map_or_else(|| "Dockerfile".into(), |n| n.to_string_lossy().into_owned())
}

/// The SLSA provenance v1 predicate of one platform's image: `record` is what its build read,
/// `steps` its steps ([`steps`]), listed with `mode=max`.
pub fn predicate(
    opts: &BuildOptions,
    (record, steps): (&BuildRecord, Value),
    platform: &str,
    mode: Mode,
    times: Option<&Times>,
) -> Value {
    let recipe_digest = Digest::of(&opts.recipe_bytes);
    let recipe = recipe_name(opts);
    let args: BTreeMap<&String, Value> = opts
        .build_args
        .iter()
        .map(|(k, v)| (k, digest_set(&Digest::of(v.as_bytes()))))
        .collect();
    let mut external = json!({
        "recipe": { "path": recipe, "digest": digest_set(&recipe_digest) },
        "context": { "digest": digest_set(&context_digest(record)) },
        "buildArgs": args,
        "platform": platform,
    });
    if let Some(t) = &opts.target {
        external["target"] = json!(t);
    }
    if !opts.labels.is_empty() {
        external["labels"] = json!(opts.labels);
    }
    if !opts.secrets.is_empty() {
        // Which secrets the build was given, never what they hold.
        external["secrets"] = json!(opts.secrets.keys().collect::<Vec<_>>());
    }
    let mut internal = json!({
        "sourceDateEpoch": opts.source_date_epoch,
        "noCache": opts.no_cache,
        "compression": format!("{:?}", opts.compression).to_lowercase(),
        "network": format!("{:?}", opts.network).to_lowercase(),
    });
    if mode == Mode::Max {
        internal["steps"] = steps;
    }
    let mut dependencies = vec![json!({
        "name": "recipe",
        "uri": format!("file:{recipe}"),
        "digest": digest_set(&recipe_digest),
    })];
    dependencies.push(json!({
        "name": "context",
        "uri": "context:.",
        "digest": digest_set(&context_digest(record)),
    }));
    for (reference, manifest) in &record.images {
        dependencies.push(json!({
            "name": reference,
            "uri": format!("docker-image://{reference}"),
            "digest": digest_set(&manifest.digest),
            "mediaType": crate::image::MEDIA_MANIFEST,
        }));
    }
    for (url, sha256) in &record.downloads {
        dependencies.push(json!({ "uri": url, "digest": { "sha256": sha256 } }));
    }
    let mut metadata = json!({});
    if let Some(t) = times {
        metadata = json!({ "startedOn": t.started, "finishedOn": t.finished });
    }
    json!({
        "buildDefinition": {
            "buildType": BUILD_TYPE,
            "externalParameters": external,
            "internalParameters": internal,
            "resolvedDependencies": dependencies,
        },
        "runDetails": {
            "builder": {
                "id": BUILDER_ID,
                "version": { "kiln": env!("CARGO_PKG_VERSION") },
            },
            "metadata": metadata,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(instruction: &str, kind: StepKind, cached: Cached, arch: &str) -> StepReport {
        StepReport {
            stage: "build".into(),
            line: 1,
            instruction: instruction.into(),
            cached,
            reason: Some("differs".into()),
            duration_s: 1.5,
            layer: (kind == StepKind::Lookup).then(|| Digest::of(instruction.as_bytes())),
            kind,
            platform: Platform {
                os: "linux".into(),
                architecture: arch.into(),
                ..Default::default()
            },
        }
    }

    #[test]
    fn steps_of_one_platform_with_shared_cache_hits_as_hits() {
        let reports = [
            report("FROM busybox", StepKind::From, Cached::No, "amd64"),
            report("RUN a", StepKind::Lookup, Cached::Local, "amd64"),
            report(
                "RUN b",
                StepKind::Lookup,
                Cached::Shared("r/c:1".into()),
                "amd64",
            ),
            report(
                "ENV X=1",
                StepKind::Metadata,
                Cached::Shared("r/c:1".into()),
                "amd64",
            ),
            report("RUN c", StepKind::Lookup, Cached::No, "amd64"),
            report("RUN a", StepKind::Lookup, Cached::No, "arm64"),
        ];
        let amd64 = &reports[0].platform;
        let v = steps(&reports, amd64);
        let cache: Vec<&str> = v
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["cache"].as_str().unwrap())
            .collect();
        assert_eq!(cache, ["hit", "hit", "none", "miss"]);
        assert_eq!(v[0]["instruction"], "RUN a");
        assert_eq!(v[0]["layer"], json!(Digest::of(b"RUN a")));
        assert!(v[2].get("layer").is_none(), "{v}");
        // Nothing that differs from run to run.
        assert!(v[0].get("duration_s").is_none() && v[0].get("reason").is_none());
    }
}
