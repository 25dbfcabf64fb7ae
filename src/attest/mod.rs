//! Build attestations — SLSA provenance v1 ([`provenance`]) and an SPDX 2.3 SBOM ([`sbom`]) —
//! as in-toto statements, attached the way BuildKit attaches them: for each image, an
//! attestation manifest (config `unknown/unknown`, one `application/vnd.in-toto+json` layer per
//! statement, annotated with its `in-toto.io/predicate-type`), listed in the image index after
//! the images with platform `unknown/unknown` and the annotations
//! `vnd.docker.reference.type: attestation-manifest` and `vnd.docker.reference.digest: <the
//! image's manifest digest>`. Every document is canonical JSON with no wall-clock time when
//! SOURCE_DATE_EPOCH is set, so the index digest is reproducible.

pub mod packages;
pub mod provenance;
pub mod sbom;

use std::collections::BTreeMap;

use serde_json::{Value, json};

use crate::build::{BuildOptions, Built, PlatformBuilt};
use crate::digest::Digest;
use crate::image::{
    self, Descriptor, ImageConfig, Index, MEDIA_CONFIG, MEDIA_MANIFEST, Manifest, Platform,
    canonical_json,
};
use crate::registry::reference::Reference;
use crate::store::{Store, StoreError, StoredImage};

/// The media type of an in-toto statement blob.
pub const MEDIA_IN_TOTO: &str = "application/vnd.in-toto+json";
/// The layer annotation naming a statement's predicate type.
pub const ANNOTATION_PREDICATE_TYPE: &str = "in-toto.io/predicate-type";
pub use crate::image::{
    ANNOTATION_REFERENCE_DIGEST, ANNOTATION_REFERENCE_TYPE, ATTESTATION_MANIFEST,
};
/// The in-toto statement type.
pub const STATEMENT_TYPE: &str = "https://in-toto.io/Statement/v1";

/// Which attestations to make.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AttestOptions {
    /// SLSA provenance, and how much it says.
    pub provenance: Option<provenance::Mode>,
    /// An SPDX SBOM.
    pub sbom: bool,
}

impl AttestOptions {
    /// True when any attestation is asked for.
    pub fn any(&self) -> bool {
        self.provenance.is_some() || self.sbom
    }
}

/// Why attestations could not be made.
#[derive(Debug, thiserror::Error)]
pub enum AttestError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A layer could not be read for the SBOM.
    #[error("reading layer {digest} for the SBOM: {source}")]
    Layer {
        /// The layer blob.
        digest: Digest,
        /// The read error.
        source: std::io::Error,
    },
}

/// What the attestations describe and when.
pub struct Build<'a> {
    /// The build's options.
    pub opts: &'a BuildOptions,
    /// The build: each platform's image and what its build read, and the steps.
    pub built: &'a Built,
    /// The image's name (its first tag), if it has one.
    pub name: Option<&'a str>,
    /// When the build started and ended (RFC 3339), for builds without SOURCE_DATE_EPOCH.
    pub times: Option<provenance::Times>,
}

/// The index of the build's images (one per platform) with an attestation manifest for each,
/// stored (statements, attestation configs and manifests, the index); returns the index body.
pub fn attest_images(
    store: &Store,
    build: &Build<'_>,
    which: AttestOptions,
) -> Result<Index, AttestError> {
    let mut index = Index::default();
    let mut attestations = Vec::new();
    for part in &build.built.platforms {
        let entry = image_entry(&part.image);
        let statements = statements(store, part, build, which)?;
        attestations.push(attestation_manifest(store, &entry, &statements)?);
        index.manifests.push(entry);
    }
    index.manifests.extend(attestations);
    Ok(index)
}

/// An image's index entry: its manifest descriptor with the platform its config names.
fn image_entry(img: &StoredImage) -> Descriptor {
    let mut d = Descriptor::new(
        &img.manifest.media_type,
        img.manifest.digest,
        img.manifest.size,
    );
    if !img.config.os.is_empty() && !img.config.architecture.is_empty() {
        d.platform = Some(img.config.platform());
    }
    d
}

/// The package URL of an image: `pkg:docker/library/busybox@latest?platform=linux%2Famd64`,
/// with `repository_url` for registries other than Docker Hub.
fn docker_purl(r: &Reference, platform: &str) -> String {
    let version = r.tag.clone().unwrap_or_else(|| "latest".into());
    let mut s = format!("pkg:docker/{}@{version}?", r.repository);
    if r.registry != "docker.io" {
        s.push_str(&format!("repository_url={}&", r.name()));
    }
    s.push_str(&format!("platform={}", platform.replace('/', "%2F")));
    s
}

/// The in-toto statement around `predicate`, about the image `img` (named `name`).
fn statement(
    img: &StoredImage,
    name: Option<&str>,
    predicate_type: &str,
    predicate: Value,
) -> Value {
    let subject_name = match name.and_then(|n| Reference::parse(n).ok()) {
        Some(r) => docker_purl(&r, &img.config.platform().to_string()),
        None => "_".to_string(),
    };
    json!({
        "_type": STATEMENT_TYPE,
        "subject": [{ "name": subject_name, "digest": { "sha256": img.manifest.digest.hex() } }],
        "predicateType": predicate_type,
        "predicate": predicate,
    })
}

/// The statements for one platform's image: (predicate type, statement).
fn statements(
    store: &Store,
    part: &PlatformBuilt,
    build: &Build<'_>,
    which: AttestOptions,
) -> Result<Vec<(&'static str, Value)>, AttestError> {
    let img = &part.image;
    let mut out = Vec::new();
    if let Some(mode) = which.provenance {
        let platform = img.config.platform().to_string();
        let steps = provenance::steps(&build.built.steps, &part.platform);
        let predicate = provenance::predicate(
            build.opts,
            (&part.record, steps),
            &platform,
            mode,
            build.times.as_ref(),
        );
        out.push((
            provenance::PREDICATE_TYPE,
            statement(img, build.name, provenance::PREDICATE_TYPE, predicate),
        ));
    }
    if which.sbom {
        let layers = read_layers(store, img)?;
        let created = match (build.opts.source_date_epoch, &build.times) {
            (Some(epoch), _) => image::rfc3339(epoch),
            (None, Some(t)) => t.finished.clone(),
            (None, None) => image::rfc3339(0),
        };
        let subject = sbom::Subject {
            name: build.name,
            manifest: img.manifest.digest,
            diff_ids: &img.config.rootfs.diff_ids,
        };
        let predicate = sbom::document(&subject, &layers, &created);
        out.push((
            sbom::PREDICATE_TYPE,
            statement(img, build.name, sbom::PREDICATE_TYPE, predicate),
        ));
    }
    Ok(out)
}

/// What one layer holds for the SBOM: from the store's cache when a build read it before (a
/// layer blob never changes), else read from the blob and remembered.
fn layer_contents(store: &Store, layer: &Digest) -> Result<sbom::LayerContents, AttestError> {
    let key = Digest::of(format!("kiln-sbom-layer-v1\n{layer}").as_bytes());
    if let Some(found) = store
        .cache_get(&key)?
        .as_ref()
        .and_then(sbom::LayerContents::from_record)
    {
        return Ok(found);
    }
    let blob = store.open_blob(layer)?;
    let contents =
        sbom::read_layer(std::io::BufReader::with_capacity(1 << 20, blob)).map_err(|source| {
            AttestError::Layer {
                digest: *layer,
                source,
            }
        })?;
    store.cache_put(&key, &contents.to_record(layer))?;
    Ok(contents)
}

/// Every layer of `img` read for the SBOM, on as many threads as there are cores.
fn read_layers(store: &Store, img: &StoredImage) -> Result<Vec<sbom::LayerContents>, AttestError> {
    let layers = &img.manifest_body.layers;
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, layers.len().max(1));
    let next = std::sync::atomic::AtomicUsize::new(0);
    let results: Vec<(usize, Result<sbom::LayerContents, AttestError>)> =
        std::thread::scope(|scope| {
            let workers: Vec<_> = (0..threads)
                .map(|_| {
                    scope.spawn(|| {
                        let mut out = Vec::new();
                        loop {
                            let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            let Some(d) = layers.get(i) else { break };
                            out.push((i, layer_contents(store, &d.digest)));
                        }
                        out
                    })
                })
                .collect();
            workers
                .into_iter()
                .flat_map(|w| w.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
                .collect()
        });
    let mut ordered: BTreeMap<usize, sbom::LayerContents> = BTreeMap::new();
    for (i, r) in results {
        ordered.insert(i, r?);
    }
    Ok(ordered.into_values().collect())
}

/// Stores the statements and an attestation manifest over them; returns its index entry.
fn attestation_manifest(
    store: &Store,
    image: &Descriptor,
    statements: &[(&'static str, Value)],
) -> Result<Descriptor, AttestError> {
    let mut layers = Vec::new();
    for (predicate_type, st) in statements {
        let (digest, size) = store.put_blob(&image::canonical_json_value(st))?;
        let mut d = Descriptor::new(MEDIA_IN_TOTO, digest, size);
        d.annotations
            .insert(ANNOTATION_PREDICATE_TYPE.into(), predicate_type.to_string());
        layers.push(d);
    }
    let mut config = ImageConfig {
        architecture: "unknown".into(),
        os: "unknown".into(),
        ..Default::default()
    };
    config.rootfs.diff_ids = layers.iter().map(|l| l.digest).collect();
    let (config_digest, config_size) = store.put_blob(&canonical_json(&config))?;
    let manifest = Manifest {
        config: Descriptor::new(MEDIA_CONFIG, config_digest, config_size),
        layers,
        annotations: BTreeMap::new(),
    };
    let (digest, size) = store.put_blob(&canonical_json(&manifest))?;
    let mut d = Descriptor::new(MEDIA_MANIFEST, digest, size);
    d.annotations
        .insert(ANNOTATION_REFERENCE_DIGEST.into(), image.digest.to_string());
    d.annotations.insert(
        ANNOTATION_REFERENCE_TYPE.into(),
        ATTESTATION_MANIFEST.into(),
    );
    d.platform = Some(Platform {
        architecture: "unknown".into(),
        os: "unknown".into(),
        ..Default::default()
    });
    Ok(d)
}
