//! The shared cache's documents: the artifact manifest, the config listing the records, the
//! inline annotation; parsing them strictly (a record is only kept when everything it names
//! checks out) and finding the record nearest to a step that missed.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use super::{Layer, Record};
use crate::digest::Digest;
use crate::image::{
    Descriptor, MEDIA_LAYER_GZIP, MEDIA_LAYER_TAR, MEDIA_LAYER_ZSTD, MEDIA_MANIFEST, canonical_json,
};
use crate::plan::{KeyBasis, StepInputs, explain_difference};

/// The `artifactType` of a kiln cache manifest.
pub const ARTIFACT_TYPE: &str = "application/vnd.kiln.cache.v1";
/// The media type of the config blob listing the records.
pub const CONFIG_TYPE: &str = "application/vnd.kiln.cache.config.v1+json";
/// The image-manifest annotation holding inline records (`--cache-to type=inline`).
pub const INLINE_ANNOTATION: &str = "dev.kiln.cache.v1";
/// The largest records config accepted.
pub const CONFIG_LIMIT: u64 = 64 << 20;
/// The config format's version.
const VERSION: u32 = 1;

/// The config blob (and the inline annotation's value).
#[derive(Serialize, Deserialize)]
struct ConfigWire {
    version: u32,
    records: Vec<RecordWire>,
}

#[derive(Serialize, Deserialize)]
struct RecordWire {
    key: Digest,
    parent: Digest,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    inputs: Option<StepInputs>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    basis: Option<KeyBasis>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    layer: Option<LayerRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    created: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    linked: Option<Digest>,
}

/// A record's layer: one of the manifest's layers, by digest.
#[derive(Serialize, Deserialize)]
struct LayerRef {
    digest: Digest,
    #[serde(rename = "diffID")]
    diff_id: Digest,
}

/// The manifest of a cache artifact (and enough of an image manifest to find inline records).
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ManifestWire {
    schema_version: u32,
    #[serde(default)]
    media_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    artifact_type: Option<String>,
    config: Descriptor,
    #[serde(default)]
    layers: Vec<Descriptor>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    annotations: BTreeMap<String, String>,
}

/// What a manifest holds, as far as the cache is concerned.
pub enum CacheDoc {
    /// A kiln cache artifact: its config lists the records.
    Artifact {
        /// The records config blob.
        config: Descriptor,
        /// The layers it lists.
        layers: Vec<Descriptor>,
    },
    /// An image carrying its records inline.
    Inline {
        /// The annotation's value.
        records: String,
        /// The image's layers.
        layers: Vec<Descriptor>,
    },
    /// Something else.
    Other,
}

/// Tells what a manifest is.
pub fn classify(manifest: &[u8]) -> Result<CacheDoc, String> {
    let m: ManifestWire =
        serde_json::from_slice(manifest).map_err(|e| format!("invalid manifest: {e}"))?;
    if m.schema_version != 2 {
        return Err(format!("manifest schemaVersion {}", m.schema_version));
    }
    if m.artifact_type.as_deref() == Some(ARTIFACT_TYPE) || m.config.media_type == CONFIG_TYPE {
        if m.config.media_type != CONFIG_TYPE {
            return Err(format!("config media type {:?}", m.config.media_type));
        }
        if m.config.size > CONFIG_LIMIT {
            return Err(format!("records config of {} bytes", m.config.size));
        }
        return Ok(CacheDoc::Artifact {
            config: m.config,
            layers: m.layers,
        });
    }
    match m.annotations.get(INLINE_ANNOTATION) {
        Some(records) => Ok(CacheDoc::Inline {
            records: records.clone(),
            layers: m.layers,
        }),
        None => Ok(CacheDoc::Other),
    }
}

/// Whether kiln can use a layer blob of this media type.
fn is_layer_type(media_type: &str) -> bool {
    [MEDIA_LAYER_GZIP, MEDIA_LAYER_ZSTD, MEDIA_LAYER_TAR].contains(&media_type)
}

/// The records of one shared cache, indexed for lookups and explanations.
#[derive(Default)]
pub struct RecordSet {
    records: BTreeMap<Digest, Record>,
    by_parent: BTreeMap<Digest, Vec<Digest>>,
    by_instruction: BTreeMap<String, Vec<Digest>>,
}

impl RecordSet {
    /// Parses a records config whose layers must be among `layers`. Records naming anything
    /// else are left out, and the returned list says why; a config that is not valid JSON of
    /// this format is an error.
    pub fn parse(config: &[u8], layers: &[Descriptor]) -> Result<(RecordSet, Vec<String>), String> {
        let wire: ConfigWire =
            serde_json::from_slice(config).map_err(|e| format!("invalid records: {e}"))?;
        if wire.version != VERSION {
            return Err(format!(
                "records version {} (kiln reads {VERSION})",
                wire.version
            ));
        }
        let blobs: BTreeMap<Digest, &Descriptor> = layers.iter().map(|d| (d.digest, d)).collect();
        let mut set = RecordSet::default();
        let mut problems = Vec::new();
        for r in wire.records {
            let layer = match r.layer {
                None => None,
                Some(l) => match blobs.get(&l.digest) {
                    Some(desc) if is_layer_type(&desc.media_type) => Some(Layer {
                        desc: Descriptor::new(&desc.media_type, desc.digest, desc.size),
                        diff_id: l.diff_id,
                    }),
                    Some(desc) => {
                        problems.push(format!(
                            "record {} has a layer of media type {:?}",
                            r.key, desc.media_type
                        ));
                        continue;
                    }
                    None => {
                        problems.push(format!(
                            "record {} names layer {}, which the cache does not list",
                            r.key, l.digest
                        ));
                        continue;
                    }
                },
            };
            set.insert(Record {
                key: r.key,
                parent: r.parent,
                inputs: r.inputs,
                basis: r.basis,
                layer,
                created: r.created,
                linked: r.linked,
                step_id: None,
            });
        }
        Ok((set, problems))
    }

    fn insert(&mut self, r: Record) {
        self.by_parent.entry(r.parent).or_default().push(r.key);
        if let Some(i) = &r.inputs {
            self.by_instruction
                .entry(i.instruction.clone())
                .or_default()
                .push(r.key);
        }
        self.records.insert(r.key, r);
    }

    /// The record under `key`.
    pub fn get(&self, key: &Digest) -> Option<&Record> {
        self.records.get(key)
    }

    /// How many records there are.
    pub fn len(&self) -> usize {
        self.records.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// How the record nearest to a step differs from it: records built on the same parent
    /// first, then records of the same instruction; the one with the fewest differences.
    pub fn explain(
        &self,
        parent: &Digest,
        basis: &KeyBasis,
        inputs: &StepInputs,
    ) -> Option<String> {
        let same_parent = self.by_parent.get(parent).into_iter().flatten();
        let same_instruction = self.by_instruction.get(&inputs.instruction);
        let candidates: BTreeSet<&Digest> = same_parent
            .chain(same_instruction.into_iter().flatten())
            .collect();
        let nearest = candidates
            .into_iter()
            .filter_map(|k| self.records.get(k))
            .filter_map(|r| r.inputs.as_ref().map(|i| (r, i)))
            .min_by_key(|(r, old)| {
                let other_basis = usize::from(r.basis.as_ref() != Some(basis));
                let far = distance(old, inputs) + other_basis;
                (r.parent != *parent, far, r.key)
            })?;
        let (r, old) = nearest;
        let bases = (r.basis.as_ref(), basis);
        Some(explain_difference(old, inputs, bases, r.parent != *parent))
    }
}

/// How many of a step's inputs differ (the instruction weighs most).
fn distance(a: &StepInputs, b: &StepInputs) -> usize {
    fn map_diff(a: &BTreeMap<String, String>, b: &BTreeMap<String, String>) -> usize {
        let keys: BTreeSet<&String> = a.keys().chain(b.keys()).collect();
        keys.into_iter().filter(|k| a.get(*k) != b.get(*k)).count()
    }
    10 * usize::from(a.instruction != b.instruction)
        + map_diff(&a.env, &b.env)
        + map_diff(&a.args, &b.args)
        + map_diff(&a.files, &b.files)
        + usize::from(a.user != b.user)
        + usize::from(a.workdir != b.workdir)
        + usize::from(a.shell != b.shell)
        + usize::from(a.from != b.from)
}

/// The records config for `records` (sorted by key) and the distinct layers they name, in
/// that order. `with_inputs: false` leaves the inputs out (inline records).
pub fn encode(records: &[Record], with_inputs: bool) -> (Vec<u8>, Vec<Descriptor>) {
    let mut sorted: Vec<&Record> = records.iter().collect();
    sorted.sort_by_key(|r| r.key);
    let mut layers = Vec::new();
    let mut seen = BTreeSet::new();
    let wire = ConfigWire {
        version: VERSION,
        records: sorted
            .into_iter()
            .map(|r| {
                if let Some(l) = &r.layer
                    && seen.insert(l.desc.digest)
                {
                    layers.push(Descriptor::new(
                        &l.desc.media_type,
                        l.desc.digest,
                        l.desc.size,
                    ));
                }
                RecordWire {
                    key: r.key,
                    parent: r.parent,
                    inputs: r.inputs.clone().filter(|_| with_inputs),
                    basis: r.basis.clone().filter(|_| with_inputs),
                    layer: r.layer.as_ref().map(|l| LayerRef {
                        digest: l.desc.digest,
                        diff_id: l.diff_id,
                    }),
                    created: r.created.clone(),
                    linked: r.linked,
                }
            })
            .collect(),
    };
    (canonical_json(&wire), layers)
}

/// The manifest of a cache artifact with this config and these layers (canonical JSON).
pub fn artifact_manifest(config: Descriptor, layers: Vec<Descriptor>) -> Vec<u8> {
    canonical_json(&ManifestWire {
        schema_version: 2,
        media_type: Some(MEDIA_MANIFEST.to_string()),
        artifact_type: Some(ARTIFACT_TYPE.to_string()),
        config,
        layers,
        annotations: BTreeMap::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(n: u8) -> Layer {
        Layer {
            desc: Descriptor::new(MEDIA_LAYER_GZIP, Digest::of(&[n]), 10 + n as u64),
            diff_id: Digest::of(&[n, n]),
        }
    }

    fn basis() -> KeyBasis {
        KeyBasis {
            source_date_epoch: Some(0),
            snapshotter: "overlay".into(),
        }
    }

    fn record(n: u8, parent: u8, instruction: &str, files: &[(&str, &str)]) -> Record {
        Record {
            key: Digest::of(&[100 + n]),
            parent: Digest::of(&[200 + parent]),
            inputs: Some(StepInputs {
                instruction: instruction.into(),
                files: files
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                ..Default::default()
            }),
            basis: Some(basis()),
            layer: Some(layer(n)),
            created: Some("1970-01-01T00:00:00Z".into()),
            linked: None,
            step_id: None,
        }
    }

    fn round_trip(records: &[Record]) -> (RecordSet, Vec<String>) {
        let (config, layers) = encode(records, true);
        let cfg = Descriptor::new(CONFIG_TYPE, Digest::of(&config), config.len() as u64);
        let manifest = artifact_manifest(cfg, layers);
        let CacheDoc::Artifact { layers, .. } = classify(&manifest).unwrap() else {
            panic!("not an artifact")
        };
        RecordSet::parse(&config, &layers).unwrap()
    }

    #[test]
    fn records_round_trip_and_encoding_is_deterministic() {
        let a = record(1, 0, "COPY a /a", &[("a", "1")]);
        let b = record(2, 1, "RUN x", &[]);
        let (set, problems) = round_trip(&[b.clone(), a.clone()]);
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(set.len(), 2);
        assert_eq!(set.get(&a.key), Some(&a));
        assert_eq!(encode(&[a.clone(), b.clone()], true), encode(&[b, a], true));
    }

    #[test]
    fn a_cache_names_only_its_own_layers() {
        let good = record(1, 0, "RUN a", &[]);
        let (config, _) = encode(std::slice::from_ref(&good), true);
        // The manifest lists another layer: the record points at a blob it does not own.
        let (set, problems) = RecordSet::parse(&config, &[layer(9).desc]).unwrap();
        assert!(set.is_empty());
        assert!(problems[0].contains("does not list"), "{problems:?}");
        // A layer of a type kiln does not unpack.
        let mut odd = good.layer.clone().unwrap().desc;
        odd.media_type = "application/x-anything".into();
        let (set, problems) = RecordSet::parse(&config, &[odd]).unwrap();
        assert!(
            set.is_empty() && problems[0].contains("media type"),
            "{problems:?}"
        );
    }

    #[test]
    fn malformed_configs_are_errors() {
        for bad in [
            &b"{"[..],
            br#"{"version":1,"records":[{"key":"../../etc/passwd","parent":"sha256:00"}]}"#,
            br#"{"version":1,"records":[{"key":"sha256:../x","parent":"x"}]}"#,
            br#"{"version":9,"records":[]}"#,
            br#"[]"#,
        ] {
            assert!(
                RecordSet::parse(bad, &[]).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        assert!(classify(b"{\"schemaVersion\":2}").is_err());
        assert!(classify(b"not json").is_err());
    }

    #[test]
    fn images_without_records_are_not_caches() {
        let plain = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json",
            "config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:0000000000000000000000000000000000000000000000000000000000000000","size":2},"layers":[]}"#;
        assert!(matches!(classify(plain).unwrap(), CacheDoc::Other));
    }

    #[test]
    fn explains_with_the_nearest_record() {
        let copy = record(1, 0, "COPY app /app", &[("app/x", "1"), ("app/y", "2")]);
        let run = record(2, 1, "RUN make", &[]);
        let other = record(3, 0, "RUN unrelated", &[]);
        let (set, _) = round_trip(&[copy.clone(), run.clone(), other]);
        let mut changed = copy.inputs.clone().unwrap();
        changed.files.insert("app/x".into(), "9".into());
        let b = basis();
        assert_eq!(
            set.explain(&copy.parent, &b, &changed).as_deref(),
            Some("1 file changed: app/x")
        );
        // The next step sits on a new parent: same instruction, an earlier step changed.
        let next = run.inputs.clone().unwrap();
        assert_eq!(
            set.explain(&Digest::of(b"new parent"), &b, &next)
                .as_deref(),
            Some("an earlier step changed")
        );
        // A build without the records' epoch.
        let unset = KeyBasis {
            source_date_epoch: None,
            ..basis()
        };
        assert_eq!(
            set.explain(&copy.parent, &unset, &copy.inputs.clone().unwrap())
                .as_deref(),
            Some("SOURCE_DATE_EPOCH changed (0 -> unset)")
        );
        let unknown = StepInputs {
            instruction: "RUN new".into(),
            ..Default::default()
        };
        assert_eq!(set.explain(&Digest::of(b"elsewhere"), &b, &unknown), None);
    }
}
