//! The SPDX 2.3 SBOM of an image, as the predicate of an in-toto statement: the image itself,
//! the OS packages its final filesystem's package databases record (see [`packages`]), and the
//! regular files each layer adds, with their SHA-256 and the layer they come from.
//!
//! Every layer is read once, in parallel (each a stream: memory holds the file list and the
//! package databases, never a layer).

use std::collections::BTreeMap;
use std::io::{self, Read};

use serde_json::{Value, json};

use super::packages::{self, Package};
use crate::digest::{Digest, HashingReader};
use crate::image::diff::decompressed;

/// The predicate type of an SPDX document.
pub const PREDICATE_TYPE: &str = "https://spdx.dev/Document";

/// The most bytes of one package database kept in memory.
const DATABASE_LIMIT: u64 = 64 << 20;

/// What one layer holds, for the SBOM.
#[derive(Default)]
pub struct LayerContents {
    /// Regular files it adds: path → SHA-256.
    pub files: Vec<(String, Digest)>,
    /// Package databases and `os-release` files it adds: path → content.
    pub databases: BTreeMap<String, Vec<u8>>,
    /// Paths it deletes (`.wh.NAME`) and directories it makes opaque (`.wh..wh..opq`).
    pub deleted: Vec<String>,
    /// Directories whose lower contents it hides.
    pub opaque: Vec<String>,
}

impl LayerContents {
    /// The contents as a store cache record about the layer blob `layer` (named in it, so the
    /// record goes when the blob is pruned).
    pub fn to_record(&self, layer: &Digest) -> Value {
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::STANDARD;
        json!({
            "layer": layer,
            "files": self.files,
            "databases": self
                .databases
                .iter()
                .map(|(k, v)| (k.clone(), b64.encode(v)))
                .collect::<BTreeMap<_, _>>(),
            "deleted": self.deleted,
            "opaque": self.opaque,
        })
    }

    /// The contents from a record made by [`to_record`](Self::to_record); None if it is not
    /// one.
    pub fn from_record(v: &Value) -> Option<LayerContents> {
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::STANDARD;
        let strings =
            |key: &str| -> Option<Vec<String>> { serde_json::from_value(v.get(key)?.clone()).ok() };
        let encoded: BTreeMap<String, String> =
            serde_json::from_value(v.get("databases")?.clone()).ok()?;
        let mut databases = BTreeMap::new();
        for (k, e) in encoded {
            databases.insert(k, b64.decode(e).ok()?);
        }
        Some(LayerContents {
            files: serde_json::from_value(v.get("files")?.clone()).ok()?,
            databases,
            deleted: strings("deleted")?,
            opaque: strings("opaque")?,
        })
    }
}

/// Reads one layer blob.
pub fn read_layer(blob: impl Read) -> io::Result<LayerContents> {
    let mut archive = tar::Archive::new(decompressed(blob)?);
    let mut out = LayerContents::default();
    for entry in archive.entries()? {
        let mut entry = entry?;
        let raw = entry.path_bytes();
        let path = String::from_utf8_lossy(&raw)
            .trim_start_matches("./")
            .trim_start_matches('/')
            .trim_end_matches('/')
            .to_string();
        let (dir, name) = match path.rsplit_once('/') {
            Some((d, n)) => (d.to_string(), n.to_string()),
            None => (String::new(), path.clone()),
        };
        if name == ".wh..wh..opq" {
            out.opaque.push(dir);
            continue;
        }
        if let Some(gone) = name.strip_prefix(".wh.") {
            out.deleted.push(join(&dir, gone));
            continue;
        }
        if !matches!(
            entry.header().entry_type(),
            tar::EntryType::Regular | tar::EntryType::Continuous
        ) {
            continue;
        }
        let keep = packages::is_database(&path) && entry.size() <= DATABASE_LIMIT;
        let mut hashing = HashingReader::new(&mut entry);
        if keep {
            let mut content = Vec::new();
            hashing.read_to_end(&mut content)?;
            out.databases.insert(path.clone(), content);
        } else {
            io::copy(&mut hashing, &mut io::sink())?;
        }
        out.files.push((path, hashing.finish().1));
    }
    Ok(out)
}

fn join(dir: &str, name: &str) -> String {
    if dir.is_empty() {
        name.to_string()
    } else {
        format!("{dir}/{name}")
    }
}

fn under(path: &str, dir: &str) -> bool {
    dir.is_empty() || path == dir || path.strip_prefix(dir).is_some_and(|r| r.starts_with('/'))
}

/// The package databases of the final filesystem: each layer's whiteouts applied to the layers
/// below it, its own files laid over them.
pub fn final_databases(layers: &[LayerContents]) -> BTreeMap<String, Vec<u8>> {
    let mut merged: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    for l in layers {
        merged.retain(|path, _| {
            !l.deleted.iter().any(|d| under(path, d))
                && !l.opaque.iter().any(|d| path != d && under(path, d))
        });
        merged.extend(l.databases.clone());
    }
    merged
}

/// An SPDX id from free text: letters, digits, `.` and `-` only.
fn spdx_id(prefix: &str, parts: &[&str]) -> String {
    let mut s = prefix.to_string();
    for p in parts {
        s.push('-');
        s.extend(p.chars().map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' {
                c
            } else {
                '-'
            }
        }));
    }
    s
}

fn package_json(p: &Package, index: usize) -> Value {
    let mut v = json!({
        "SPDXID": spdx_id("SPDXRef-Package", &[p.kind, &p.name, &index.to_string()]),
        "name": p.name,
        "versionInfo": p.version,
        "downloadLocation": "NOASSERTION",
        "filesAnalyzed": false,
        "licenseConcluded": "NOASSERTION",
        "licenseDeclared": p.license.clone().unwrap_or_else(|| "NOASSERTION".into()),
        "copyrightText": "NOASSERTION",
        "primaryPackagePurpose": "LIBRARY",
        "sourceInfo": format!("acquired package info from {}", p.source),
        "externalRefs": [{
            "referenceCategory": "PACKAGE-MANAGER",
            "referenceType": "purl",
            "referenceLocator": p.purl,
        }],
    });
    if let Some(recorded) = &p.license_recorded
        && p.license.as_deref() != Some(recorded.as_str())
    {
        v["licenseComments"] = json!(format!("recorded as: {recorded}"));
    }
    if let Some(s) = &p.supplier {
        v["supplier"] = json!(format!("Person: {s}"));
    }
    if let Some(h) = &p.homepage {
        v["homepage"] = json!(h);
    }
    if let Some(s) = &p.summary {
        v["summary"] = json!(s);
    }
    v
}

/// The image the SBOM is about.
pub struct Subject<'a> {
    /// Its name (first tag), if it has one.
    pub name: Option<&'a str>,
    /// Its manifest digest.
    pub manifest: Digest,
    /// Its layers' diff_ids, bottom first (as many as `layers` given to [`document`]).
    pub diff_ids: &'a [Digest],
}

/// The SPDX 2.3 document for an image whose layers hold `layers`; `created` is RFC 3339.
pub fn document(subject: &Subject<'_>, layers: &[LayerContents], created: &str) -> Value {
    let name = subject
        .name
        .map_or_else(|| subject.manifest.to_string(), str::to_string);
    let pkgs = packages::packages(&final_databases(layers));
    let mut packages_json = vec![json!({
        "SPDXID": "SPDXRef-Image",
        "name": name,
        "downloadLocation": "NOASSERTION",
        "filesAnalyzed": false,
        "primaryPackagePurpose": "CONTAINER",
        "checksums": [{"algorithm": "SHA256", "checksumValue": subject.manifest.hex()}],
        "licenseConcluded": "NOASSERTION",
        "licenseDeclared": "NOASSERTION",
        "copyrightText": "NOASSERTION",
    })];
    let mut relationships = vec![json!({
        "spdxElementId": "SPDXRef-DOCUMENT",
        "relationshipType": "DESCRIBES",
        "relatedSpdxElement": "SPDXRef-Image",
    })];
    for (i, p) in pkgs.iter().enumerate() {
        let v = package_json(p, i);
        relationships.push(json!({
            "spdxElementId": "SPDXRef-Image",
            "relationshipType": "CONTAINS",
            "relatedSpdxElement": v["SPDXID"],
        }));
        packages_json.push(v);
    }
    let mut files = Vec::new();
    for (n, layer) in layers.iter().enumerate() {
        let layer_id = subject
            .diff_ids
            .get(n)
            .map_or_else(|| format!("layer {}", n + 1), Digest::to_string);
        for (i, (path, digest)) in layer.files.iter().enumerate() {
            let id = format!("SPDXRef-File-{}-{}", n + 1, i + 1);
            files.push(json!({
                "SPDXID": id,
                "fileName": format!("/{path}"),
                "checksums": [{"algorithm": "SHA256", "checksumValue": digest.hex()}],
                "licenseConcluded": "NOASSERTION",
                "copyrightText": "NOASSERTION",
                "comment": format!("layerID: {layer_id}"),
            }));
        }
    }
    json!({
        "spdxVersion": "SPDX-2.3",
        "dataLicense": "CC0-1.0",
        "SPDXID": "SPDXRef-DOCUMENT",
        "name": name,
        "documentNamespace": format!("urn:kiln:sbom:{}", subject.manifest.hex()),
        "creationInfo": {
            "created": created,
            "creators": [format!("Tool: kiln-{}", env!("CARGO_PKG_VERSION"))],
        },
        "documentDescribes": ["SPDXRef-Image"],
        "packages": packages_json,
        "files": files,
        "relationships": relationships,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(entries: &[(&str, &[u8])]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (path, content) in entries {
            let mut h = tar::Header::new_ustar();
            h.set_size(content.len() as u64);
            h.set_mode(0o644);
            h.set_entry_type(tar::EntryType::Regular);
            b.append_data(&mut h, path, *content).unwrap();
        }
        b.into_inner().unwrap()
    }

    #[test]
    fn whiteouts_and_opaque_dirs_hide_lower_databases() {
        let l1 = read_layer(
            &layer(&[
                ("etc/os-release", b"ID=debian\n"),
                ("var/lib/dpkg/status", b"Package: a\nVersion: 1\n"),
                ("lib/apk/db/installed", b"P:x\nV:1\n"),
                ("bin/tool", b"#!"),
            ])[..],
        )
        .unwrap();
        let l2 = read_layer(
            &layer(&[
                ("lib/apk/db/.wh..wh..opq", b""),
                ("var/lib/dpkg/.wh.status", b""),
            ])[..],
        )
        .unwrap();
        let l3 = read_layer(&layer(&[("var/lib/dpkg/status", b"Package: b\nVersion: 2\n")])[..])
            .unwrap();
        assert_eq!(l1.files.len(), 4);
        assert_eq!(l1.files[3], ("bin/tool".to_string(), Digest::of(b"#!")));
        let again = LayerContents::from_record(&l2.to_record(&Digest::of(b"l2"))).unwrap();
        assert_eq!(
            (again.deleted.clone(), again.opaque.clone()),
            (l2.deleted.clone(), l2.opaque.clone())
        );
        let back = LayerContents::from_record(&l1.to_record(&Digest::of(b"l1"))).unwrap();
        assert_eq!(
            (back.files.clone(), back.databases.clone()),
            (l1.files.clone(), l1.databases.clone())
        );
        let merged = final_databases(&[l1, l2, l3]);
        assert_eq!(
            merged.keys().collect::<Vec<_>>(),
            ["etc/os-release", "var/lib/dpkg/status"]
        );
        assert_eq!(merged["var/lib/dpkg/status"], b"Package: b\nVersion: 2\n");
    }
}
