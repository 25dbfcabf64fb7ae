//! Comparing two images: the manifest and config field by field, then layer by layer the files
//! each layer adds, removes and changes (type, link target, content with the first differing
//! byte, mode, owner, mtime, xattrs, other PAX records) and the order of its entries; a text
//! and a JSON rendering of the result, and the first difference as one sentence.
//!
//! Pure: the caller hands in the documents and a way to open each layer blob (gzip, zstd or
//! plain tar, told apart by their first bytes). Layers are streamed, never held in memory; to
//! find where two versions of a file first differ, the older version of each changed file is
//! spooled into a scratch directory the caller names and compared with the newer one as it
//! streams past.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use serde::Serialize;
use serde_json::Value;

use super::{Descriptor, ImageConfig, Manifest};
use crate::digest::{Digest, HashingReader};

/// A layer or document that could not be read while comparing.
#[derive(Debug, thiserror::Error)]
#[error("{what}: {source}")]
pub struct DiffError {
    /// The layer or document ("layer 3 of A (sha256:…)").
    pub what: String,
    /// The read error.
    pub source: io::Error,
}

/// Opens a layer blob as stored (compressed or not).
pub type OpenBlob<'a> = dyn Fn(&Descriptor) -> io::Result<Box<dyn Read>> + 'a;

/// One of the two images compared.
pub struct Side<'a> {
    /// How the image was named on the command line.
    pub name: String,
    /// The image manifest.
    pub manifest: &'a Manifest,
    /// The config blob's bytes, as stored (every field, also those kiln does not model).
    pub config: &'a [u8],
    /// Opens a layer blob.
    pub open: &'a OpenBlob<'a>,
}

/// A JSON field that differs: its path (`config.Env[1]`) and both values (absent on one side
/// when missing there).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct FieldChange {
    /// Where the field is, JavaScript style: `history[2].created_by`, `Labels["a.b"]`.
    pub field: String,
    /// The value in A.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub a: Option<Value>,
    /// The value in B.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub b: Option<Value>,
}

/// One entry of a layer tar, as far as a comparison cares.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Entry {
    /// `file`, `dir`, `symlink`, `hardlink`, `char`, `block`, `fifo` or `other`.
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// Permission bits (with setuid, setgid, sticky), octal.
    pub mode: String,
    /// Numeric owner.
    pub uid: u64,
    /// Numeric group.
    pub gid: u64,
    /// Owner name, when the tar records one.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub uname: String,
    /// Group name, when the tar records one.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub gname: String,
    /// Modification time in seconds since the epoch, as recorded (PAX keeps fractions).
    pub mtime: String,
    /// Content size in bytes.
    pub size: u64,
    /// Symlink or hardlink target.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub link: Option<String>,
    /// `major:minor` of a device node.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    /// The content's digest (regular files).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub digest: Option<Digest>,
    /// Extended attributes (`SCHILY.xattr.*` records): name → value (text, or `0x…` hex).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub xattrs: BTreeMap<String, String>,
    /// Other PAX records (`atime`, `ctime`, vendor keys): key → value.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub pax: BTreeMap<String, String>,
}

impl Entry {
    /// A few words about the entry: `file, 12 bytes, 0644, 0:0`.
    pub fn summary(&self) -> String {
        let mut s = match self.kind {
            "file" => format!("file, {} bytes", self.size),
            kind => kind.to_string(),
        };
        if let Some(l) = &self.link {
            s.push_str(&format!(" -> {l}"));
        }
        s.push_str(&format!(", {}, {}:{}", self.mode, self.uid, self.gid));
        s
    }
}

/// The entries of one layer: by path, and the paths in the order the tar holds them.
#[derive(Clone, Debug, Default)]
pub struct Listing {
    /// Path (relative, no leading `./` or trailing `/`) → the entry (the last one, when the tar
    /// names a path twice).
    pub entries: BTreeMap<String, Entry>,
    /// Every path in tar order.
    pub order: Vec<String>,
}

/// One field of an entry that differs between A and B.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct EntryField {
    /// `type`, `link`, `device`, `content`, `mode`, `owner`, `mtime`, `xattr NAME` or `pax KEY`.
    pub field: String,
    /// The value in A (`-` when absent).
    pub a: String,
    /// The value in B.
    pub b: String,
    /// For `content`: the first byte at which the two differ.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub offset: Option<u64>,
}

/// What happened to a path in a layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ChangeKind {
    /// Only B's layer has it.
    Added,
    /// Only A's layer has it.
    Removed,
    /// Both have it, with differences.
    Changed,
}

/// A path that differs between the two versions of a layer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct FileChange {
    /// Added, removed or changed.
    pub change: ChangeKind,
    /// The path in the layer.
    pub path: String,
    /// The entry, for added (B's) and removed (A's) paths.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub entry: Option<Entry>,
    /// The fields that differ, for changed paths.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub fields: Vec<EntryField>,
}

/// Where the order of entries first differs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct OrderChange {
    /// The position (0-based) among the paths both layers hold.
    pub position: usize,
    /// A's path there.
    pub a: String,
    /// B's path there.
    pub b: String,
}

/// A layer as a manifest names it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct LayerId {
    /// The blob's digest.
    pub digest: Digest,
    /// The uncompressed tar's digest, from the config.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub diff_id: Option<Digest>,
    /// The blob's media type.
    pub media_type: String,
}

/// How the layers at one position differ.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct LayerChange {
    /// The position, 1 = the bottom layer.
    pub layer: usize,
    /// The history entry that made the layer (B's, else A's).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub created_by: Option<String>,
    /// A's layer here, if A has one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub a: Option<LayerId>,
    /// B's layer here, if B has one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub b: Option<LayerId>,
    /// Differences of the blob that are not in its files: its compression, media type or
    /// annotations, or a tar stream that differs only in how it encodes the same entries.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub blob: Vec<FieldChange>,
    /// Paths added, removed or changed, sorted by path.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub files: Vec<FileChange>,
    /// Where the entry order differs, if it does.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub order: Option<OrderChange>,
}

/// Everything that differs between two images.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Report {
    /// A's name.
    pub a: String,
    /// B's name.
    pub b: String,
    /// True when nothing differs.
    pub identical: bool,
    /// Differences of the manifests (media type, annotations, config descriptor type).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub manifest: Vec<FieldChange>,
    /// Differences of the configs (all fields but `rootfs`, whose layers are compared below).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub config: Vec<FieldChange>,
    /// The layers that differ, bottom first.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub layers: Vec<LayerChange>,
    /// The platform of the images compared, when they come from image indexes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub platform: Option<String>,
    /// Differences of the indexes: the platforms they list, and the attestations (in-toto
    /// statements, field by field) attached to the images.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub index: Vec<FieldChange>,
    /// The comparisons of the indexes' further platforms.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub more: Vec<Report>,
}

/// Compares two images; `scratch` is an empty directory for spooled file versions.
pub fn compare(a: &Side<'_>, b: &Side<'_>, scratch: &Path) -> Result<Report, DiffError> {
    let parse_config = |side: &Side<'_>| -> Result<(Value, ImageConfig), DiffError> {
        let err = |e: serde_json::Error| DiffError {
            what: format!("the config of {}", side.name),
            source: io::Error::new(io::ErrorKind::InvalidData, e),
        };
        let value: Value = serde_json::from_slice(side.config).map_err(err)?;
        let config = ImageConfig::from_json(side.config).unwrap_or_default();
        Ok((value, config))
    };
    let (mut value_a, config_a) = parse_config(a)?;
    let (mut value_b, config_b) = parse_config(b)?;

    let mut manifest = Vec::new();
    let manifest_value = |m: &Manifest| {
        serde_json::json!({
            "annotations": m.annotations,
            "config": {"mediaType": m.config.media_type, "annotations": m.config.annotations},
        })
    };
    diff_values(
        "",
        &manifest_value(a.manifest),
        &manifest_value(b.manifest),
        &mut manifest,
    );

    for v in [&mut value_a, &mut value_b] {
        if let Some(obj) = v.as_object_mut() {
            obj.remove("rootfs");
        }
    }
    let mut config = Vec::new();
    diff_values("", &value_a, &value_b, &mut config);

    let layers = compare_layers(a, b, (&config_a, &config_b), scratch)?;
    Ok(Report {
        a: a.name.clone(),
        b: b.name.clone(),
        identical: manifest.is_empty() && config.is_empty() && layers.is_empty(),
        manifest,
        config,
        layers,
        platform: None,
        index: Vec::new(),
        more: Vec::new(),
    })
}

/// The `created_by` of the history entries that made layers, bottom first.
fn layer_history(config: &ImageConfig) -> Vec<Option<String>> {
    config
        .history
        .iter()
        .filter(|h| !h.empty_layer)
        .map(|h| h.created_by.clone())
        .collect()
}

fn layer_id(m: &Manifest, config: &ImageConfig, i: usize) -> Option<LayerId> {
    let d = m.layers.get(i)?;
    let diff_id =
        (config.rootfs.diff_ids.len() == m.layers.len()).then(|| config.rootfs.diff_ids[i]);
    Some(LayerId {
        digest: d.digest,
        diff_id,
        media_type: d.media_type.clone(),
    })
}

fn compare_layers(
    a: &Side<'_>,
    b: &Side<'_>,
    (config_a, config_b): (&ImageConfig, &ImageConfig),
    scratch: &Path,
) -> Result<Vec<LayerChange>, DiffError> {
    let (history_a, history_b) = (layer_history(config_a), layer_history(config_b));
    let count = a.manifest.layers.len().max(b.manifest.layers.len());
    let mut out = Vec::new();
    for i in 0..count {
        let id_a = layer_id(a.manifest, config_a, i);
        let id_b = layer_id(b.manifest, config_b, i);
        let mut change = LayerChange {
            layer: i + 1,
            created_by: history_b
                .get(i)
                .cloned()
                .flatten()
                .or_else(|| history_a.get(i).cloned().flatten()),
            a: id_a.clone(),
            b: id_b.clone(),
            blob: Vec::new(),
            files: Vec::new(),
            order: None,
        };
        let what = |side: &Side<'_>, id: &LayerId| {
            format!("layer {} of {} ({})", i + 1, side.name, id.digest)
        };
        match (&id_a, &id_b) {
            (Some(la), Some(lb)) => {
                if la == lb && a.manifest.layers[i] == b.manifest.layers[i] {
                    continue;
                }
                let (da, db) = (&a.manifest.layers[i], &b.manifest.layers[i]);
                let blob_fields = |d: &Descriptor| {
                    serde_json::json!({
                        "digest": d.digest,
                        "mediaType": d.media_type,
                        "annotations": d.annotations,
                    })
                };
                let same_files = la.diff_id.is_some() && la.diff_id == lb.diff_id;
                if same_files {
                    diff_values("", &blob_fields(da), &blob_fields(db), &mut change.blob);
                    for f in &mut change.blob {
                        if f.field == "digest" {
                            f.field = "digest (the same tar, compressed differently)".into();
                        }
                    }
                } else {
                    let mut fields = Vec::new();
                    diff_values("", &blob_fields(da), &blob_fields(db), &mut fields);
                    // The digest differs with the files; only the rest is news.
                    change.blob = fields.into_iter().filter(|f| f.field != "digest").collect();
                    let listing_a = read_blob_listing(a, da, &what(a, la))?;
                    let listing_b = read_blob_listing(b, db, &what(b, lb))?;
                    change.files = diff_listings(&listing_a, &listing_b);
                    change.order = diff_order(&listing_a, &listing_b);
                    locate_content(&mut change.files, (a, da), (b, db), scratch, &what(a, la))?;
                    if change.files.is_empty() && change.order.is_none() {
                        change
                            .blob
                            .push(tar_difference(a, da, b, db, &what(a, la))?);
                    }
                }
            }
            (Some(la), None) => {
                let listing = read_blob_listing(a, &a.manifest.layers[i], &what(a, la))?;
                change.files = whole_layer(&listing, ChangeKind::Removed);
            }
            (None, Some(lb)) => {
                let listing = read_blob_listing(b, &b.manifest.layers[i], &what(b, lb))?;
                change.files = whole_layer(&listing, ChangeKind::Added);
            }
            (None, None) => continue,
        }
        out.push(change);
    }
    Ok(out)
}

fn whole_layer(listing: &Listing, change: ChangeKind) -> Vec<FileChange> {
    listing
        .entries
        .iter()
        .map(|(path, e)| FileChange {
            change,
            path: path.clone(),
            entry: Some(e.clone()),
            fields: Vec::new(),
        })
        .collect()
}

fn read_blob_listing(side: &Side<'_>, d: &Descriptor, what: &str) -> Result<Listing, DiffError> {
    let err = |source| DiffError {
        what: what.to_string(),
        source,
    };
    let blob = (side.open)(d).map_err(err)?;
    read_listing(blob).map_err(err)
}

/// A blob as its tar stream: gzip and zstd are recognised by their magic bytes.
pub fn decompressed<'a>(blob: impl Read + 'a) -> io::Result<Box<dyn Read + 'a>> {
    let mut r = BufReader::with_capacity(1 << 16, blob);
    let magic = r.fill_buf()?;
    Ok(if magic.starts_with(&[0x1f, 0x8b]) {
        Box::new(flate2::read::MultiGzDecoder::new(r))
    } else if magic.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Box::new(zstd::stream::read::Decoder::with_buffer(r)?)
    } else {
        Box::new(r)
    })
}

/// A tar path made comparable: no leading `./` or `/`, no trailing `/`.
fn clean(path: &[u8]) -> String {
    let s = String::from_utf8_lossy(path);
    let s = s.trim_start_matches("./").trim_start_matches('/');
    let s = s.trim_end_matches('/');
    if s.is_empty() { ".".into() } else { s.into() }
}

fn printable(value: &[u8]) -> String {
    match std::str::from_utf8(value) {
        Ok(s) if s.chars().all(|c| !c.is_control()) => s.to_string(),
        _ => format!("0x{}", hex::encode(value)),
    }
}

/// Reads a layer blob's entries (decompressing it), hashing each file's content.
pub fn read_listing(blob: impl Read) -> io::Result<Listing> {
    let mut archive = tar::Archive::new(decompressed(blob)?);
    let mut listing = Listing::default();
    for entry in archive.entries()? {
        let mut entry = entry?;
        let path = clean(&entry.path_bytes());
        let mut xattrs = BTreeMap::new();
        let mut pax = BTreeMap::new();
        if let Some(exts) = entry.pax_extensions()? {
            for ext in exts {
                let ext = ext?;
                let key = ext
                    .key()
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                let value = ext.value_bytes();
                if let Some(name) = key
                    .strip_prefix("SCHILY.xattr.")
                    .or_else(|| key.strip_prefix("LIBARCHIVE.xattr."))
                {
                    xattrs.insert(name.to_string(), printable(value));
                } else {
                    pax.insert(key.to_string(), printable(value));
                }
            }
        }
        // These PAX records override header fields; they are compared as those fields.
        let mut take = |k: &str| pax.remove(k);
        let mtime = take("mtime");
        let uid = take("uid");
        let gid = take("gid");
        let uname = take("uname");
        let gname = take("gname");
        for k in ["path", "linkpath", "size"] {
            take(k);
        }
        let h = entry.header();
        let kind = h.entry_type();
        let kind_name = match kind {
            tar::EntryType::Regular | tar::EntryType::Continuous => "file",
            tar::EntryType::Directory => "dir",
            tar::EntryType::Symlink => "symlink",
            tar::EntryType::Link => "hardlink",
            tar::EntryType::Char => "char",
            tar::EntryType::Block => "block",
            tar::EntryType::Fifo => "fifo",
            _ => "other",
        };
        let number = |v: Option<String>, header: io::Result<u64>| -> io::Result<u64> {
            match v {
                Some(s) => s
                    .parse()
                    .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "bad PAX id")),
                None => header,
            }
        };
        let name = |v: Option<String>, header: io::Result<Option<&str>>| {
            v.unwrap_or_else(|| header.ok().flatten().unwrap_or_default().to_string())
        };
        let device = matches!(kind, tar::EntryType::Char | tar::EntryType::Block).then(|| {
            format!(
                "{}:{}",
                h.device_major().ok().flatten().unwrap_or(0),
                h.device_minor().ok().flatten().unwrap_or(0)
            )
        });
        let link = match kind {
            tar::EntryType::Symlink => entry.link_name_bytes().map(|l| printable(&l)),
            tar::EntryType::Link => entry.link_name_bytes().map(|l| clean(&l)),
            _ => None,
        };
        let mut e = Entry {
            kind: kind_name,
            mode: format!("{:04o}", h.mode()? & 0o7777),
            uid: number(uid, h.uid())?,
            gid: number(gid, h.gid())?,
            uname: name(uname, h.username().map_err(io::Error::other)),
            gname: name(gname, h.groupname().map_err(io::Error::other)),
            mtime: match mtime {
                Some(m) => m,
                None => h.mtime()?.to_string(),
            },
            size: entry.size(),
            link,
            device,
            digest: None,
            xattrs,
            pax,
        };
        if kind_name == "file" {
            let mut hashing = HashingReader::new(&mut entry);
            io::copy(&mut hashing, &mut io::sink())?;
            e.digest = Some(hashing.finish().1);
        }
        listing.order.push(path.clone());
        listing.entries.insert(path, e);
    }
    Ok(listing)
}

/// The fields in which two entries of one path differ (content offsets filled in later).
fn diff_entries(a: &Entry, b: &Entry) -> Vec<EntryField> {
    let mut out = Vec::new();
    let mut field = |name: &str, va: String, vb: String| {
        if va != vb {
            out.push(EntryField {
                field: name.to_string(),
                a: va,
                b: vb,
                offset: None,
            });
        }
    };
    let opt = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
    field("type", a.kind.into(), b.kind.into());
    field("link", opt(&a.link), opt(&b.link));
    field("device", opt(&a.device), opt(&b.device));
    if a.digest != b.digest || a.size != b.size {
        // Same size, other bytes: say which.
        let content = |e: &Entry| match a.size == b.size {
            true => format!("{} bytes, {}", e.size, short(e.digest)),
            false => format!("{} bytes", e.size),
        };
        field("content", content(a), content(b));
    }
    field("mode", a.mode.clone(), b.mode.clone());
    let owner = |e: &Entry| {
        let mut s = format!("{}:{}", e.uid, e.gid);
        if !e.uname.is_empty() || !e.gname.is_empty() {
            s.push_str(&format!(" ({}:{})", e.uname, e.gname));
        }
        s
    };
    field("owner", owner(a), owner(b));
    field("mtime", a.mtime.clone(), b.mtime.clone());
    for (map_a, map_b, prefix) in [(&a.xattrs, &b.xattrs, "xattr"), (&a.pax, &b.pax, "pax")] {
        let keys: BTreeSet<&String> = map_a.keys().chain(map_b.keys()).collect();
        for k in keys {
            let get =
                |m: &BTreeMap<String, String>| m.get(k).cloned().unwrap_or_else(|| "-".into());
            field(&format!("{prefix} {k}"), get(map_a), get(map_b));
        }
    }
    out
}

fn short(d: Option<Digest>) -> String {
    d.map(|d| format!("sha256:{}", &d.hex()[..12]))
        .unwrap_or_default()
}

/// Paths added, removed or changed from `a` to `b`, sorted by path.
pub fn diff_listings(a: &Listing, b: &Listing) -> Vec<FileChange> {
    let paths: BTreeSet<&String> = a.entries.keys().chain(b.entries.keys()).collect();
    let mut out = Vec::new();
    for path in paths {
        let change = match (a.entries.get(path), b.entries.get(path)) {
            (Some(ea), Some(eb)) => {
                let fields = diff_entries(ea, eb);
                if fields.is_empty() {
                    continue;
                }
                FileChange {
                    change: ChangeKind::Changed,
                    path: path.clone(),
                    entry: None,
                    fields,
                }
            }
            (Some(ea), None) => FileChange {
                change: ChangeKind::Removed,
                path: path.clone(),
                entry: Some(ea.clone()),
                fields: Vec::new(),
            },
            (None, Some(eb)) => FileChange {
                change: ChangeKind::Added,
                path: path.clone(),
                entry: Some(eb.clone()),
                fields: Vec::new(),
            },
            (None, None) => continue,
        };
        out.push(change);
    }
    out
}

/// Where the order of the paths both layers hold first differs.
pub fn diff_order(a: &Listing, b: &Listing) -> Option<OrderChange> {
    let common = |x: &Listing, y: &Listing| -> Vec<String> {
        x.order
            .iter()
            .filter(|p| y.entries.contains_key(*p))
            .cloned()
            .collect()
    };
    let (oa, ob) = (common(a, b), common(b, a));
    let position = oa.iter().zip(&ob).position(|(x, y)| x != y)?;
    Some(OrderChange {
        position,
        a: oa[position].clone(),
        b: ob[position].clone(),
    })
}

/// Fills in the first differing byte of every changed content: A's versions of those files
/// are spooled into `scratch`, then B's are compared with them as B's layer streams past.
fn locate_content(
    files: &mut [FileChange],
    (a, da): (&Side<'_>, &Descriptor),
    (b, db): (&Side<'_>, &Descriptor),
    scratch: &Path,
    what: &str,
) -> Result<(), DiffError> {
    let wanted: BTreeSet<String> = files
        .iter()
        .filter(|f| f.fields.iter().any(|x| x.field == "content"))
        .map(|f| f.path.clone())
        .collect();
    if wanted.is_empty() {
        return Ok(());
    }
    let err = |source| DiffError {
        what: what.to_string(),
        source,
    };
    let spool = tempfile::Builder::new()
        .prefix("diff-")
        .tempdir_in(scratch)
        .map_err(err)?;
    let mut spooled: BTreeMap<String, PathBuf> = BTreeMap::new();
    for_each_file((a.open)(da).map_err(err)?, &wanted, |path, content| {
        let file = spool.path().join(spooled.len().to_string());
        io::copy(content, &mut File::create(&file)?)?;
        spooled.insert(path.to_string(), file);
        Ok(())
    })
    .map_err(err)?;
    let mut offsets = BTreeMap::new();
    for_each_file((b.open)(db).map_err(err)?, &wanted, |path, content| {
        if let Some(file) = spooled.get(path) {
            let old = BufReader::new(File::open(file)?);
            offsets.insert(path.to_string(), first_difference(old, content)?);
        }
        Ok(())
    })
    .map_err(err)?;
    for f in files.iter_mut() {
        if let Some(off) = offsets.get(&f.path)
            && let Some(field) = f.fields.iter_mut().find(|x| x.field == "content")
        {
            field.offset = *off;
        }
    }
    Ok(())
}

/// Calls `f` with the content of every regular file of the layer whose path is in `wanted`
/// (the last entry of a path is the one that counts).
fn for_each_file(
    blob: impl Read,
    wanted: &BTreeSet<String>,
    mut f: impl FnMut(&str, &mut dyn Read) -> io::Result<()>,
) -> io::Result<()> {
    let mut archive = tar::Archive::new(decompressed(blob)?);
    for entry in archive.entries()? {
        let mut entry = entry?;
        let path = clean(&entry.path_bytes());
        let regular = matches!(
            entry.header().entry_type(),
            tar::EntryType::Regular | tar::EntryType::Continuous
        );
        if regular && wanted.contains(&path) {
            f(&path, &mut entry)?;
        }
    }
    Ok(())
}

/// The first byte at which two streams differ (the shorter one's length if one is a prefix of
/// the other); None if they are equal.
pub fn first_difference(mut a: impl Read, mut b: impl Read) -> io::Result<Option<u64>> {
    let (mut ba, mut bb) = (vec![0u8; 1 << 16], vec![0u8; 1 << 16]);
    let mut offset = 0u64;
    loop {
        let na = read_up_to(&mut a, &mut ba)?;
        let nb = read_up_to(&mut b, &mut bb)?;
        let n = na.min(nb);
        if let Some(i) = ba[..n].iter().zip(&bb[..n]).position(|(x, y)| x != y) {
            return Ok(Some(offset + i as u64));
        }
        if na != nb {
            return Ok(Some(offset + n as u64));
        }
        if na == 0 {
            return Ok(None);
        }
        offset += n as u64;
    }
}

/// Fills `buf` as far as the stream allows; fewer bytes only at its end.
fn read_up_to(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match r.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// For two layers with the same entries, the same metadata and order but different tar
/// streams: where the uncompressed streams first differ (header encoding, padding).
fn tar_difference(
    a: &Side<'_>,
    da: &Descriptor,
    b: &Side<'_>,
    db: &Descriptor,
    what: &str,
) -> Result<FieldChange, DiffError> {
    let err = |source| DiffError {
        what: what.to_string(),
        source,
    };
    let ta = HashingReader::new(decompressed((a.open)(da).map_err(err)?).map_err(err)?);
    let tb = HashingReader::new(decompressed((b.open)(db).map_err(err)?).map_err(err)?);
    let offset = first_difference(ta, tb).map_err(err)?;
    Ok(FieldChange {
        field: "tar stream".into(),
        a: offset
            .map(|o| Value::String(format!("the same files, encoded differently from byte {o}"))),
        b: None,
    })
}

/// JSON path syntax for one more step into an object.
fn member(prefix: &str, key: &str) -> String {
    let plain = !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    match (plain, prefix.is_empty()) {
        (true, true) => key.to_string(),
        (true, false) => format!("{prefix}.{key}"),
        (false, _) => format!("{prefix}[{}]", Value::String(key.to_string())),
    }
}

/// Appends every difference between two JSON values, as paths and both values; objects are
/// compared key by key (sorted), arrays element by element.
pub fn diff_values(prefix: &str, a: &Value, b: &Value, out: &mut Vec<FieldChange>) {
    match (a, b) {
        (Value::Object(ma), Value::Object(mb)) => {
            let keys: BTreeSet<&String> = ma.keys().chain(mb.keys()).collect();
            for k in keys {
                let path = member(prefix, k);
                match (ma.get(k), mb.get(k)) {
                    (Some(va), Some(vb)) => diff_values(&path, va, vb, out),
                    (va, vb) => out.push(FieldChange {
                        field: path,
                        a: va.cloned(),
                        b: vb.cloned(),
                    }),
                }
            }
        }
        (Value::Array(va), Value::Array(vb)) => {
            for i in 0..va.len().max(vb.len()) {
                let path = format!("{prefix}[{i}]");
                match (va.get(i), vb.get(i)) {
                    (Some(x), Some(y)) => diff_values(&path, x, y, out),
                    (x, y) => out.push(FieldChange {
                        field: path,
                        a: x.cloned(),
                        b: y.cloned(),
                    }),
                }
            }
        }
        _ if a != b => out.push(FieldChange {
            field: if prefix.is_empty() {
                "(document)".into()
            } else {
                prefix.into()
            },
            a: Some(a.clone()),
            b: Some(b.clone()),
        }),
        _ => {}
    }
}

fn show(v: &Option<Value>) -> String {
    match v {
        Some(v) => v.to_string(),
        None => "(absent)".into(),
    }
}

fn layer_title(l: &LayerChange) -> String {
    let mut s = format!("layer {}", l.layer);
    if let Some(c) = &l.created_by {
        s.push_str(&format!(" ({c})"));
    }
    s
}

impl EntryField {
    fn sentence(&self) -> String {
        match (self.field.as_str(), self.offset) {
            ("content", Some(o)) => {
                format!("content differs at byte {o} ({} -> {})", self.a, self.b)
            }
            (f, _) => format!("{f} {} -> {}", self.a, self.b),
        }
    }
}

impl Report {
    /// The first difference as one sentence: the manifest or config field, else the layer, path
    /// and field; None when the images are identical.
    pub fn first_difference(&self) -> Option<String> {
        let image = self.first_image_difference();
        let image = match (&self.platform, image) {
            (Some(p), Some(d)) => Some(format!("{p}: {d}")),
            (_, d) => d,
        };
        image
            .or_else(|| self.more.iter().find_map(Report::first_difference))
            .or_else(|| {
                let f = self.index.first()?;
                Some(format!("{}: {} -> {}", f.field, show(&f.a), show(&f.b)))
            })
    }

    /// Sets `identical` from what was found.
    pub fn settle(&mut self) {
        self.identical = self.manifest.is_empty()
            && self.config.is_empty()
            && self.layers.is_empty()
            && self.index.is_empty()
            && self.more.iter().all(|r| r.identical);
    }

    fn first_image_difference(&self) -> Option<String> {
        if let Some(f) = self.manifest.first() {
            return Some(format!(
                "manifest {}: {} -> {}",
                f.field,
                show(&f.a),
                show(&f.b)
            ));
        }
        if let Some(f) = self.config.first() {
            return Some(format!(
                "config {}: {} -> {}",
                f.field,
                show(&f.a),
                show(&f.b)
            ));
        }
        let l = self.layers.first()?;
        let title = layer_title(l);
        if let Some(f) = l.files.first() {
            return Some(match f.change {
                ChangeKind::Added => format!("{title}, {}: only in {}", f.path, self.b),
                ChangeKind::Removed => format!("{title}, {}: only in {}", f.path, self.a),
                ChangeKind::Changed => {
                    format!("{title}, {}: {}", f.path, f.fields[0].sentence())
                }
            });
        }
        if let Some(o) = &l.order {
            return Some(format!(
                "{title}: entry order differs at position {}: {} -> {}",
                o.position, o.a, o.b
            ));
        }
        if let Some(f) = l.blob.first() {
            return Some(format!(
                "{title}: blob {}: {} -> {}",
                f.field,
                show(&f.a),
                show(&f.b)
            ));
        }
        Some(format!("{title} differs"))
    }

    /// The report as text: config fields, then each differing layer with its paths.
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        let mut line = |s: String| {
            out.push_str(&s);
            out.push('\n');
        };
        line(format!("--- {}", self.a));
        line(format!("+++ {}", self.b));
        if self.identical {
            line("identical".into());
        }
        if let Some(p) = &self.platform {
            line(format!("platform {p}:"));
        }
        for (title, fields) in [("manifest", &self.manifest), ("config", &self.config)] {
            if fields.is_empty() {
                continue;
            }
            line(format!("{title}:"));
            for f in fields {
                line(format!("  {}: {} -> {}", f.field, show(&f.a), show(&f.b)));
            }
        }
        for l in &self.layers {
            let id = |x: &Option<LayerId>| {
                x.as_ref()
                    .map_or_else(|| "(none)".to_string(), |x| x.digest.to_string())
            };
            line(format!("{}: {} -> {}", layer_title(l), id(&l.a), id(&l.b)));
            for f in &l.blob {
                line(format!(
                    "  blob {}: {} -> {}",
                    f.field,
                    show(&f.a),
                    show(&f.b)
                ));
            }
            for f in &l.files {
                match f.change {
                    ChangeKind::Added | ChangeKind::Removed => {
                        let sign = if f.change == ChangeKind::Added {
                            '+'
                        } else {
                            '-'
                        };
                        let summary = f.entry.as_ref().map(Entry::summary).unwrap_or_default();
                        line(format!("  {sign} {} ({summary})", f.path));
                    }
                    ChangeKind::Changed => {
                        let fields: Vec<String> =
                            f.fields.iter().map(EntryField::sentence).collect();
                        line(format!("  ~ {}: {}", f.path, fields.join("; ")));
                    }
                }
            }
            if let Some(o) = &l.order {
                line(format!(
                    "  entry order differs at position {}: {} -> {}",
                    o.position, o.a, o.b
                ));
            }
        }
        for r in &self.more {
            let text = r.to_text();
            // Without the --- / +++ header the first report printed.
            for l in text.lines().skip(2).filter(|l| *l != "identical") {
                line(l.to_string());
            }
        }
        if !self.index.is_empty() {
            line("index:".into());
            for f in &self.index {
                line(format!("  {}: {} -> {}", f.field, show(&f.a), show(&f.b)));
            }
        }
        out
    }

    /// The report as pretty-printed JSON (keys in a fixed order).
    pub fn to_json(&self) -> String {
        let value = serde_json::to_value(self).unwrap_or_default();
        let mut s = serde_json::to_string_pretty(&value).unwrap_or_default();
        s.push('\n');
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_difference_finds_the_byte() {
        let at = |a: &[u8], b: &[u8]| first_difference(a, b).unwrap();
        assert_eq!(at(b"same", b"same"), None);
        assert_eq!(at(b"abcd", b"abXd"), Some(2));
        assert_eq!(at(b"abc", b"abcdef"), Some(3));
        assert_eq!(at(b"", b"x"), Some(0));
        let long_a = vec![7u8; 200_000];
        let mut long_b = long_a.clone();
        long_b[150_001] = 8;
        assert_eq!(at(&long_a, &long_b), Some(150_001));
    }

    #[test]
    fn json_paths_name_the_field() {
        let a = serde_json::json!({"config": {"Env": ["A=1", "B=2"], "Labels": {"x.y": "1"}}, "os": "linux"});
        let b = serde_json::json!({"config": {"Env": ["A=1", "B=3"], "Labels": {"x.y": "2"}}, "created": "t"});
        let mut out = Vec::new();
        diff_values("", &a, &b, &mut out);
        let fields: Vec<&str> = out.iter().map(|f| f.field.as_str()).collect();
        assert_eq!(
            fields,
            ["config.Env[1]", "config.Labels[\"x.y\"]", "created", "os"]
        );
        assert_eq!(out[2].a, None);
        assert_eq!(out[3].b, None);
    }

    #[test]
    fn order_is_compared_over_common_paths() {
        let listing = |paths: &[&str]| {
            let mut l = Listing::default();
            for p in paths {
                l.order.push(p.to_string());
                l.entries.insert(
                    p.to_string(),
                    Entry {
                        kind: "dir",
                        mode: "0755".into(),
                        uid: 0,
                        gid: 0,
                        uname: String::new(),
                        gname: String::new(),
                        mtime: "0".into(),
                        size: 0,
                        link: None,
                        device: None,
                        digest: None,
                        xattrs: BTreeMap::new(),
                        pax: BTreeMap::new(),
                    },
                );
            }
            l
        };
        let a = listing(&["a", "new", "b", "c"]);
        let b = listing(&["a", "b", "c"]);
        assert_eq!(diff_order(&a, &b), None);
        let c = listing(&["a", "c", "b"]);
        assert_eq!(
            diff_order(&a, &c),
            Some(OrderChange {
                position: 1,
                a: "b".into(),
                b: "c".into()
            })
        );
        let changes = diff_listings(&a, &b);
        assert_eq!(changes.len(), 1);
        assert_eq!(changes[0].change, ChangeKind::Removed);
    }
}
