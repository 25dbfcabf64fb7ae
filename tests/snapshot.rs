//! Layer round trips, determinism, overlay whiteout translation and hostile-archive tests for
//! `kiln::snapshot` (needs root: mknod, chown, trusted.* xattrs, overlay mounts).

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::{Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::process::Command;

use kiln::rootfs::RootDir;
use kiln::snapshot::{
    Compression, LayerOptions, SnapshotError, extract_archive, is_archive, unpack_layer,
    upper_has_changes, write_layer,
};

const GZ: LayerOptions = LayerOptions {
    source_date_epoch: None,
    compression: Compression::Gzip,
};

fn mknod(p: &Path, kind: libc::mode_t, mode: u32, major: u32, minor: u32) {
    let c = std::ffi::CString::new(p.as_os_str().as_bytes()).unwrap();
    let r = unsafe { libc::mknod(c.as_ptr(), kind | mode, libc::makedev(major, minor)) };
    assert_eq!(
        r,
        0,
        "mknod {}: {}",
        p.display(),
        std::io::Error::last_os_error()
    );
}

fn lchown(p: &Path, uid: u32, gid: u32) {
    std::os::unix::fs::lchown(p, Some(uid), Some(gid)).unwrap();
}

fn set_mtime(p: &Path, secs: i64) {
    let c = std::ffi::CString::new(p.as_os_str().as_bytes()).unwrap();
    let ts = libc::timespec {
        tv_sec: secs,
        tv_nsec: 0,
    };
    let r = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c.as_ptr(),
            [ts, ts].as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    assert_eq!(r, 0);
}

/// A valid VFS_CAP_REVISION_2 `security.capability` value granting cap_net_raw (+ep).
fn cap_net_raw() -> Vec<u8> {
    let mut v = Vec::new();
    for w in [0x0200_0001u32, 1 << 13, 0, 0, 0] {
        v.extend_from_slice(&w.to_le_bytes());
    }
    v
}

/// Builds an overlay-style upper dir by hand covering every rule; `mtime` for all entries.
fn build_upper(dir: &Path, mtime: i64) {
    // A file deleted from a lower layer: whiteout char 0/0.
    mknod(&dir.join("gone"), libc::S_IFCHR, 0, 0, 0);
    // A directory removed and recreated: opaque.
    fs::create_dir(dir.join("opq")).unwrap();
    xattr::set(dir.join("opq"), "trusted.overlay.opaque", b"y").unwrap();
    fs::write(dir.join("opq/new.txt"), b"fresh").unwrap();
    // A hardlink pair.
    fs::create_dir(dir.join("hl")).unwrap();
    fs::write(dir.join("hl/a"), b"linked content").unwrap();
    fs::hard_link(dir.join("hl/a"), dir.join("hl/b")).unwrap();
    // Symlinks: relative, absolute, dangling.
    symlink("hl/a", dir.join("rel")).unwrap();
    symlink("/etc/passwd", dir.join("abs")).unwrap();
    symlink("nowhere/at/all", dir.join("dangling")).unwrap();
    // setuid binary with a capability, sticky dir.
    fs::create_dir(dir.join("bin")).unwrap();
    fs::write(dir.join("bin/su"), b"#!/bin/true\n").unwrap();
    fs::set_permissions(dir.join("bin/su"), fs::Permissions::from_mode(0o4755)).unwrap();
    fs::write(dir.join("bin/ping"), vec![7u8; 70_000]).unwrap();
    xattr::set(dir.join("bin/ping"), "security.capability", &cap_net_raw()).unwrap();
    xattr::set(dir.join("bin/ping"), "user.note", b"kept").unwrap();
    xattr::set(dir.join("bin/ping"), "user.empty", b"").unwrap();
    fs::create_dir(dir.join("tmp")).unwrap();
    fs::set_permissions(dir.join("tmp"), fs::Permissions::from_mode(0o1777)).unwrap();
    // Owned by uid 1000.
    fs::create_dir_all(dir.join("home/u")).unwrap();
    fs::write(dir.join("home/u/file"), b"mine").unwrap();
    lchown(&dir.join("home/u"), 1000, 1000);
    lchown(&dir.join("home/u/file"), 1000, 1001);
    lchown(&dir.join("rel"), 1000, 1000);
    // A long path (> 100 bytes) and a long symlink target.
    let long = "d".repeat(60);
    fs::create_dir_all(dir.join(&long).join(&long)).unwrap();
    fs::write(dir.join(&long).join(&long).join("f"), b"deep").unwrap();
    symlink("t".repeat(150), dir.join("longlink")).unwrap();
    // Devices and a FIFO.
    fs::create_dir(dir.join("dev")).unwrap();
    mknod(&dir.join("dev/null"), libc::S_IFCHR, 0o666, 1, 3);
    mknod(&dir.join("dev/loopx"), libc::S_IFBLK, 0o660, 7, 200);
    mknod(&dir.join("dev/fifo"), libc::S_IFIFO, 0o644, 0, 0);
    // A socket is skipped.
    let _l = std::os::unix::net::UnixListener::bind(dir.join("sock")).unwrap();
    for e in walk(dir) {
        set_mtime(&dir.join(e), mtime);
    }
}

/// All paths under `dir`, sorted, relative.
fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in walkdir::WalkDir::new(dir).min_depth(1).sort_by_file_name() {
        out.push(e.unwrap().path().strip_prefix(dir).unwrap().to_path_buf());
    }
    out
}

/// One line per entry: type, path, mode, owner, size, link target/device, xattrs, mtime,
/// hardlink group. Sockets are left out (layers skip them).
fn listing(dir: &Path, with_whiteout_mtime: bool) -> Vec<String> {
    let mut groups: HashMap<u64, String> = HashMap::new();
    let mut out = Vec::new();
    for rel in walk(dir) {
        let p = dir.join(&rel);
        let md = fs::symlink_metadata(&p).unwrap();
        let ft = md.file_type();
        if ft.is_socket() {
            continue;
        }
        let ty = if ft.is_dir() {
            'd'
        } else if ft.is_symlink() {
            'l'
        } else if ft.is_char_device() {
            'c'
        } else if ft.is_block_device() {
            'b'
        } else if ft.is_fifo() {
            'p'
        } else {
            '-'
        };
        let extra = if ft.is_symlink() {
            fs::read_link(&p).unwrap().display().to_string()
        } else if ft.is_char_device() || ft.is_block_device() {
            format!("{}:{}", libc::major(md.rdev()), libc::minor(md.rdev()))
        } else {
            String::new()
        };
        let mut xa: Vec<String> = xattr::list(&p)
            .unwrap()
            .filter_map(|n| {
                let v = xattr::get(&p, &n).unwrap().unwrap_or_default();
                (!v.is_empty()).then(|| format!("{}={}", n.to_string_lossy(), hex(&v)))
            })
            .collect();
        xa.sort();
        let whiteout = ft.is_char_device() && md.rdev() == 0;
        let mtime = if whiteout && !with_whiteout_mtime {
            0
        } else {
            md.mtime()
        };
        let group = if ft.is_file() && md.nlink() > 1 {
            groups
                .entry(md.ino())
                .or_insert_with(|| rel.display().to_string())
                .clone()
        } else {
            String::new()
        };
        let size = if ft.is_file() { md.len() } else { 0 };
        out.push(format!(
            "{ty} {} {:o} {}:{} {size} [{extra}] {xa:?} {mtime} {group}",
            rel.display(),
            md.mode() & 0o7777,
            md.uid(),
            md.gid(),
        ));
    }
    out
}

fn hex(v: &[u8]) -> String {
    v.iter().map(|b| format!("{b:02x}")).collect()
}

fn tar_entries(tarball: &[u8]) -> Vec<(String, char)> {
    let mut ar = tar::Archive::new(flate2::read::GzDecoder::new(tarball));
    ar.entries()
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                String::from_utf8(e.path_bytes().into_owned()).unwrap(),
                char::from(e.header().entry_type().as_byte()),
            )
        })
        .collect()
}

#[test]
fn round_trip_keeps_the_tree_and_the_diff_id() {
    let t = tempfile::tempdir().unwrap();
    let upper = t.path().join("upper");
    fs::create_dir(&upper).unwrap();
    build_upper(&upper, 1_600_000_000);
    assert!(upper_has_changes(&upper).unwrap());

    let (blob, sum) = write_layer(&upper, &GZ, Vec::new()).unwrap();
    assert!(sum.entries > 20, "{sum:?}");

    let dest = t.path().join("unpacked");
    fs::create_dir(&dest).unwrap();
    let diff_id = unpack_layer(&blob[..], &dest).unwrap().diff_id;
    assert_eq!(diff_id, sum.diff_id);

    let want: Vec<String> = listing(&upper, false)
        .into_iter()
        .map(|l| l.replace("\"user.empty=\", ", ""))
        .collect();
    assert_eq!(listing(&dest, false), want);
    // The capability survived the chown.
    assert_eq!(
        xattr::get(dest.join("bin/ping"), "security.capability")
            .unwrap()
            .unwrap(),
        cap_net_raw()
    );
    // The unpacked dir is in overlay-native form.
    let wh = fs::symlink_metadata(dest.join("gone")).unwrap();
    assert!(wh.file_type().is_char_device() && wh.rdev() == 0);
    assert_eq!(
        xattr::get(dest.join("opq"), "trusted.overlay.opaque").unwrap(),
        Some(b"y".to_vec())
    );

    // Rewriting the unpacked dir with the same epoch gives the same bytes.
    let opts = LayerOptions {
        source_date_epoch: Some(1_500_000_000),
        compression: Compression::Gzip,
    };
    let (a, sa) = write_layer(&upper, &opts, Vec::new()).unwrap();
    let (b, sb) = write_layer(&dest, &opts, Vec::new()).unwrap();
    assert_eq!(sa, sb);
    assert!(a == b, "re-written layer differs");

    // Uncompressed: the diff_id is the digest of the bytes written.
    let plain = LayerOptions {
        compression: Compression::None,
        ..GZ
    };
    let (raw, sraw) = write_layer(&upper, &plain, Vec::new()).unwrap();
    assert_eq!(kiln::digest::Digest::of(&raw), sraw.diff_id);
    assert_eq!(raw.len() as u64, sraw.uncompressed_size);
    assert_eq!(sraw.diff_id, sum.diff_id);
    let dest2 = t.path().join("unpacked-plain");
    fs::create_dir(&dest2).unwrap();
    assert_eq!(unpack_layer(&raw[..], &dest2).unwrap().diff_id, sum.diff_id);

    // zstd: a zstd frame, same diff_id, same bytes every time, unpacked by magic.
    let zst = LayerOptions {
        compression: Compression::Zstd,
        ..GZ
    };
    let (z, sz) = write_layer(&upper, &zst, Vec::new()).unwrap();
    assert!(z.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]));
    assert_eq!(sz.diff_id, sum.diff_id);
    assert!(write_layer(&upper, &zst, Vec::new()).unwrap().0 == z);
    let dest3 = t.path().join("unpacked-zstd");
    fs::create_dir(&dest3).unwrap();
    assert_eq!(unpack_layer(&z[..], &dest3).unwrap().diff_id, sum.diff_id);
    assert_eq!(listing(&dest3, false), listing(&dest, false));
}

#[test]
fn layer_entries_are_ordered_and_translated() {
    let t = tempfile::tempdir().unwrap();
    build_upper(t.path(), 1_600_000_000);
    let (blob, _) = write_layer(t.path(), &GZ, Vec::new()).unwrap();
    let entries = tar_entries(&blob);
    let names: Vec<&str> = entries.iter().map(|(n, _)| n.as_str()).collect();
    // Parents before children; the opaque marker right after its directory.
    let i = names.iter().position(|n| *n == "opq/").unwrap();
    assert_eq!(names[i + 1], "opq/.wh..wh..opq");
    assert!(names.contains(&".wh.gone"));
    assert!(!names.iter().any(|n| n.contains("sock")));
    let hl_b = entries.iter().find(|(n, _)| n == "hl/b").unwrap();
    assert_eq!(hl_b.1, '1', "second link is a hardlink entry");
    let mut sorted = names.clone();
    sorted.sort_by(|a, b| {
        let ka: Vec<&str> = a.trim_end_matches('/').split('/').collect();
        let kb: Vec<&str> = b.trim_end_matches('/').split('/').collect();
        ka.cmp(&kb)
    });
    // The opaque marker is placed right after its directory, so compare without markers.
    let strip = |v: &[&str]| -> Vec<String> {
        v.iter()
            .filter(|n| !n.ends_with(".wh..wh..opq"))
            .map(|s| s.to_string())
            .collect()
    };
    assert_eq!(strip(&names), strip(&sorted));
    for (a, b) in names.iter().zip(names.iter().skip(1)) {
        if let Some(parent) = b.trim_end_matches('/').rsplit_once('/').map(|p| p.0) {
            assert!(names.contains(&format!("{parent}/").as_str()), "{b}");
            assert!(
                names
                    .iter()
                    .position(|n| *n == format!("{parent}/"))
                    .unwrap()
                    < names.iter().position(|n| n == b).unwrap(),
                "{a} {b}"
            );
        }
    }
}

#[test]
fn gnu_tar_reads_the_layer() {
    let t = tempfile::tempdir().unwrap();
    let upper = t.path().join("u");
    fs::create_dir(&upper).unwrap();
    build_upper(&upper, 1_600_000_000);
    let opts = LayerOptions {
        source_date_epoch: Some(1_000_000_000),
        compression: Compression::Gzip,
    };
    let (blob, _) = write_layer(&upper, &opts, Vec::new()).unwrap();
    let f = t.path().join("layer.tar.gz");
    fs::write(&f, &blob).unwrap();
    let out = Command::new("tar")
        .args(["--numeric-owner", "-tzvf"])
        .arg(&f)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("{text}");
    assert!(text.contains("-rwsr-xr-x 0/0"), "{text}");
    assert!(text.contains("drwxrwxrwt 0/0"), "{text}");
    assert!(text.contains("-rw-r--r-- 1000/1001"), "{text}");
    assert!(text.contains("hl/b link to hl/a"), "{text}");
    assert!(text.contains("abs -> /etc/passwd"), "{text}");
    assert!(text.contains("2001-09-09"), "mtimes clamped: {text}");
    assert!(text.contains(&format!("{}/f", "d".repeat(60))), "{text}");
    assert!(text.contains("1,3 ") && text.contains("dev/null"), "{text}");
    assert!(
        text.contains("7,200 ") && text.contains("dev/loopx"),
        "{text}"
    );
    // The xattrs GNU tar sees in the PAX records.
    let out = Command::new("tar")
        .args(["--xattrs", "--xattrs-include=*", "-xzf"])
        .arg(&f)
        .arg("-C")
        .arg(t.path().join("u").parent().unwrap())
        .arg("bin/ping")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        xattr::get(t.path().join("bin/ping"), "security.capability")
            .unwrap()
            .unwrap(),
        cap_net_raw()
    );
}

#[test]
fn same_tree_newer_than_epoch_gives_identical_bytes() {
    let t = tempfile::tempdir().unwrap();
    let (a, b) = (t.path().join("a"), t.path().join("b"));
    fs::create_dir(&a).unwrap();
    fs::create_dir(&b).unwrap();
    build_upper(&a, 1_700_000_000);
    build_upper(&b, 1_710_000_000);
    let opts = LayerOptions {
        source_date_epoch: Some(1_600_000_000),
        compression: Compression::Gzip,
    };
    let (la, sa) = write_layer(&a, &opts, Vec::new()).unwrap();
    let (lb, sb) = write_layer(&b, &opts, Vec::new()).unwrap();
    assert_eq!(sa, sb);
    assert!(la == lb);
    // gzip header: no name, mtime 0, OS 255.
    assert_eq!(&la[..10], &[0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 255]);
    // Without the epoch the mtimes differ, and so do the digests.
    let (_, sa) = write_layer(&a, &GZ, Vec::new()).unwrap();
    let (_, sb) = write_layer(&b, &GZ, Vec::new()).unwrap();
    assert_ne!(sa.diff_id, sb.diff_id);
}

#[test]
fn reserved_names_and_redirects_are_refused() {
    let t = tempfile::tempdir().unwrap();
    fs::create_dir(t.path().join("etc")).unwrap();
    fs::write(t.path().join("etc/.wh.passwd"), b"").unwrap();
    let e = write_layer(t.path(), &GZ, Vec::new()).unwrap_err();
    assert!(matches!(e, SnapshotError::ReservedName { .. }), "{e}");
    assert!(e.to_string().contains("etc/.wh.passwd"), "{e}");

    let t = tempfile::tempdir().unwrap();
    fs::create_dir(t.path().join("moved")).unwrap();
    xattr::set(t.path().join("moved"), "trusted.overlay.redirect", b"/old").unwrap();
    let e = write_layer(t.path(), &GZ, Vec::new()).unwrap_err();
    assert!(e.to_string().contains("redirect_dir=off"), "{e}");
    assert!(e.to_string().contains("moved"), "{e}");

    let t = tempfile::tempdir().unwrap();
    assert!(!upper_has_changes(t.path()).unwrap());
}

fn mount_overlay(lowers: &[&Path], upper: &Path, work: &Path, target: &Path) {
    let lower = lowers
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(":");
    let opts = format!(
        "lowerdir={lower},upperdir={},workdir={},redirect_dir=off,metacopy=off,index=off",
        upper.display(),
        work.display()
    );
    nix::mount::mount(
        Some("overlay"),
        target,
        Some("overlay"),
        nix::mount::MsFlags::empty(),
        Some(opts.as_str()),
    )
    .unwrap();
}

fn mount_overlay_ro(lowers: &[&Path], target: &Path) {
    let lower = lowers
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(":");
    nix::mount::mount(
        Some("overlay"),
        target,
        Some("overlay"),
        nix::mount::MsFlags::MS_RDONLY,
        Some(format!("lowerdir={lower}").as_str()),
    )
    .unwrap();
}

#[test]
fn real_overlay_upper_round_trips_through_overlay_again() {
    let t = tempfile::tempdir().unwrap();
    let d = |n: &str| {
        let p = t.path().join(n);
        fs::create_dir_all(&p).unwrap();
        p
    };
    let (lower, upper, work, merged) = (d("lower"), d("upper"), d("work"), d("merged"));
    fs::write(lower.join("old"), b"old").unwrap();
    fs::write(lower.join("keep"), b"keep").unwrap();
    fs::create_dir(lower.join("dir")).unwrap();
    fs::write(lower.join("dir/x"), b"x").unwrap();
    fs::create_dir(lower.join("etc")).unwrap();
    fs::write(lower.join("etc/conf"), b"a").unwrap();

    mount_overlay(&[&lower], &upper, &work, &merged);
    let run = || -> std::io::Result<()> {
        fs::remove_file(merged.join("old"))?;
        fs::remove_dir_all(merged.join("dir"))?;
        fs::create_dir(merged.join("dir"))?;
        fs::write(merged.join("dir/y"), b"y")?;
        fs::write(merged.join("etc/conf"), b"b")?;
        fs::write(merged.join("new"), b"n")?;
        fs::hard_link(merged.join("new"), merged.join("new2"))?;
        Ok(())
    };
    let r = run();
    nix::mount::umount(&merged).unwrap();
    r.unwrap();

    let (blob, _) = write_layer(&upper, &GZ, Vec::new()).unwrap();
    let names: Vec<String> = tar_entries(&blob).into_iter().map(|e| e.0).collect();
    assert_eq!(
        names,
        [
            ".wh.old",
            "dir/",
            "dir/.wh..wh..opq",
            "dir/y",
            "etc/",
            "etc/conf",
            "new",
            "new2"
        ]
    );

    // Unpack and stack it on the same lower: the merged view shows the changes.
    let layer = d("layer");
    unpack_layer(&blob[..], &layer).unwrap();
    let view = d("view");
    mount_overlay_ro(&[&layer, &lower], &view);
    let seen = walk(&view);
    let conf = fs::read(view.join("etc/conf"));
    nix::mount::umount(&view).unwrap();
    let seen: Vec<String> = seen.iter().map(|p| p.display().to_string()).collect();
    assert_eq!(
        seen,
        ["dir", "dir/y", "etc", "etc/conf", "keep", "new", "new2"]
    );
    assert_eq!(conf.unwrap(), b"b");
}

// ---- hostile archives ----

/// A tar entry with a raw (unchecked) name, built with the tar crate's raw header API.
enum Raw<'a> {
    File(&'a str, &'a [u8]),
    Symlink(&'a str, &'a str),
    Hardlink(&'a str, &'a str),
    Dir(&'a str),
    Fifo(&'a str),
    Char(&'a str),
}

fn raw_tar(entries: &[Raw]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for e in entries {
        let mut h = tar::Header::new_gnu();
        let (name, ty, data, link): (&str, tar::EntryType, &[u8], Option<&str>) = match e {
            Raw::File(n, d) => (n, tar::EntryType::Regular, d, None),
            Raw::Symlink(n, l) => (n, tar::EntryType::Symlink, b"", Some(l)),
            Raw::Hardlink(n, l) => (n, tar::EntryType::Link, b"", Some(l)),
            Raw::Dir(n) => (n, tar::EntryType::Directory, b"", None),
            Raw::Fifo(n) => (n, tar::EntryType::Fifo, b"", None),
            Raw::Char(n) => (n, tar::EntryType::Char, b"", None),
        };
        let old = h.as_old_mut();
        old.name[..name.len()].copy_from_slice(name.as_bytes());
        if let Some(l) = link {
            old.linkname[..l.len()].copy_from_slice(l.as_bytes());
        }
        h.set_entry_type(ty);
        h.set_mode(if ty == tar::EntryType::Directory {
            0o755
        } else {
            0o644
        });
        h.set_uid(1000);
        h.set_gid(1000);
        h.set_mtime(1_234_567_890);
        h.set_size(data.len() as u64);
        h.set_cksum();
        b.append(&h, data).unwrap();
    }
    b.into_inner().unwrap()
}

/// Everything in `sandbox` outside `inside`, with contents, to prove nothing was written there.
fn outside_snapshot(sandbox: &Path, inside: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut m = BTreeMap::new();
    for e in walkdir::WalkDir::new(sandbox)
        .into_iter()
        .filter_entry(|e| e.path() != inside)
    {
        let e = e.unwrap();
        let data = if e.file_type().is_file() {
            fs::read(e.path()).unwrap()
        } else {
            Vec::new()
        };
        m.insert(e.path().to_path_buf(), data);
    }
    m
}

type Attack = (&'static str, Vec<u8>);

fn attacks() -> Vec<Attack> {
    vec![
        ("dotdot", raw_tar(&[Raw::File("../evil", b"pwn")])),
        ("deep-dotdot", raw_tar(&[Raw::File("a/../../evil", b"pwn")])),
        ("absolute", raw_tar(&[Raw::File("/abs", b"abs")])),
        (
            "symlink-root",
            raw_tar(&[Raw::Symlink("link", "/"), Raw::File("link/etc/x", b"pwn")]),
        ),
        (
            "symlink-up",
            raw_tar(&[
                Raw::Symlink("up", "../../../.."),
                Raw::Dir("up/made/"),
                Raw::File("up/evil", b"pwn"),
            ]),
        ),
        (
            "hardlink-out",
            raw_tar(&[Raw::Hardlink("hl", "../../outside")]),
        ),
        (
            "hardlink-via-symlink",
            raw_tar(&[Raw::Symlink("s", "../.."), Raw::Hardlink("hl", "s/outside")]),
        ),
        (
            "symlink-then-overwrite",
            raw_tar(&[Raw::Symlink("f", "../outside"), Raw::File("f", b"replaced")]),
        ),
    ]
}

fn sandbox() -> (tempfile::TempDir, PathBuf) {
    let t = tempfile::tempdir().unwrap();
    fs::write(t.path().join("outside"), b"precious").unwrap();
    let inner = t.path().join("inner");
    fs::create_dir(&inner).unwrap();
    (t, inner)
}

#[test]
fn unpack_layer_stays_inside() {
    for (name, tarball) in attacks() {
        let (t, inner) = sandbox();
        let dest = inner.join("dest");
        fs::create_dir(&dest).unwrap();
        let before = outside_snapshot(t.path(), &dest);
        let r = unpack_layer(&tarball[..], &dest);
        assert_eq!(outside_snapshot(t.path(), &dest), before, "{name}: {r:?}");
        match name {
            "dotdot" | "deep-dotdot" | "hardlink-out" => {
                let e = r.unwrap_err().to_string();
                assert!(e.contains(".."), "{name}: {e}");
            }
            "absolute" => {
                r.unwrap();
                assert_eq!(fs::read(dest.join("abs")).unwrap(), b"abs");
            }
            "symlink-root" => {
                r.unwrap();
                assert_eq!(fs::read(dest.join("etc/x")).unwrap(), b"pwn");
            }
            "symlink-up" => {
                r.unwrap();
                assert!(dest.join("made").is_dir() && dest.join("evil").is_file());
            }
            "symlink-then-overwrite" => {
                r.unwrap();
                assert_eq!(fs::read(dest.join("f")).unwrap(), b"replaced");
            }
            _ => {
                // hardlink-via-symlink: resolves to dest/outside, which does not exist.
                let e = r.unwrap_err().to_string();
                assert!(e.contains("hl"), "{name}: {e}");
            }
        }
    }
}

#[test]
fn extract_archive_stays_inside() {
    for (name, tarball) in attacks() {
        let (t, inner) = sandbox();
        let rootfs = inner.join("rootfs");
        fs::create_dir_all(rootfs.join("opt")).unwrap();
        let archive = t.path().join("a.tar");
        fs::write(&archive, &tarball).unwrap();
        let before = outside_snapshot(t.path(), &rootfs);
        let root = RootDir::open_host(&rootfs).unwrap();
        let r = extract_archive(&archive, &root, "/opt/app", None);
        assert_eq!(outside_snapshot(t.path(), &rootfs), before, "{name}: {r:?}");
        match name {
            "dotdot" | "deep-dotdot" | "hardlink-out" => {
                let e = r.unwrap_err().to_string();
                assert!(e.contains(".."), "{name}: {e}");
            }
            "absolute" => {
                r.unwrap();
                assert_eq!(fs::read(rootfs.join("opt/app/abs")).unwrap(), b"abs");
            }
            "symlink-root" => {
                // link -> / is the rootfs root, as in the container.
                r.unwrap();
                assert_eq!(fs::read(rootfs.join("etc/x")).unwrap(), b"pwn");
            }
            _ => {
                let _ = r;
            }
        }
    }
}

#[test]
fn extract_refuses_whiteouts_and_special_files() {
    let t = tempfile::tempdir().unwrap();
    let rootfs = t.path().join("rootfs");
    fs::create_dir(&rootfs).unwrap();
    let root = RootDir::open_host(&rootfs).unwrap();
    let cases: [(&str, Vec<u8>, &str); 3] = [
        (
            "wh",
            raw_tar(&[Raw::Dir("etc/"), Raw::File("etc/.wh.passwd", b"")]),
            "etc/.wh.passwd",
        ),
        ("fifo", raw_tar(&[Raw::Fifo("pipe")]), "FIFO"),
        ("chr", raw_tar(&[Raw::Char("dev/mem")]), "character device"),
    ];
    for (n, tarball, needle) in cases {
        let a = t.path().join(format!("{n}.tar"));
        fs::write(&a, tarball).unwrap();
        let e = extract_archive(&a, &root, "/", None)
            .unwrap_err()
            .to_string();
        assert!(e.contains(needle), "{n}: {e}");
    }
    assert!(!rootfs.join("pipe").exists());
    assert!(!rootfs.join("dev/mem").exists());
}

/// 300 KB of varied bytes, so compressed streams span several chunks.
fn big_content() -> Vec<u8> {
    (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect()
}

fn sample_archive() -> Vec<u8> {
    let big = big_content();
    raw_tar(&[
        Raw::Dir("pkg/"),
        Raw::File("pkg/bin", b"binary"),
        Raw::File("pkg/big", &big),
        Raw::Symlink("pkg/latest", "bin"),
        Raw::Hardlink("pkg/bin2", "pkg/bin"),
    ])
}

fn check_extracted(rootfs: &Path, uid: u32) {
    let bin = rootfs.join("srv/pkg/bin");
    assert_eq!(fs::read(&bin).unwrap(), b"binary");
    assert!(fs::read(rootfs.join("srv/pkg/big")).unwrap() == big_content());
    let md = fs::metadata(&bin).unwrap();
    assert_eq!((md.uid(), md.gid(), md.mtime()), (uid, uid, 1_234_567_890));
    assert_eq!(md.nlink(), 2);
    assert_eq!(
        fs::read_link(rootfs.join("srv/pkg/latest")).unwrap(),
        Path::new("bin")
    );
    assert_eq!(
        fs::metadata(rootfs.join("srv/pkg")).unwrap().mtime(),
        1_234_567_890
    );
}

#[test]
fn compressed_archives_extract() {
    let t = tempfile::tempdir().unwrap();
    let plain = sample_archive();
    let gz = {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(&plain).unwrap();
        e.finish().unwrap()
    };
    let bz = {
        let mut e = bzip2::write::BzEncoder::new(Vec::new(), bzip2::Compression::default());
        e.write_all(&plain).unwrap();
        e.finish().unwrap()
    };
    let xz = {
        let mut out = Vec::new();
        lzma_rs::xz_compress(&mut &plain[..], &mut out).unwrap();
        out
    };
    for (n, bytes) in [("tar", plain.clone()), ("gz", gz), ("bz2", bz), ("xz", xz)] {
        let a = t.path().join(format!("a.{n}"));
        fs::write(&a, &bytes).unwrap();
        assert!(is_archive(&a).unwrap(), "{n}");
        let rootfs = t.path().join(format!("root-{n}"));
        fs::create_dir(&rootfs).unwrap();
        let root = RootDir::open_host(&rootfs).unwrap();
        extract_archive(&a, &root, "/srv", None).unwrap();
        check_extracted(&rootfs, 1000);
        let rootfs = t.path().join(format!("root-{n}-chown"));
        fs::create_dir(&rootfs).unwrap();
        let root = RootDir::open_host(&rootfs).unwrap();
        extract_archive(&a, &root, "srv", Some((5, 5))).unwrap();
        check_extracted(&rootfs, 5);
    }
    // Not archives: text, a gzip of text, an empty file, a truncated xz.
    let text = t.path().join("text");
    fs::write(&text, "hello world\n".repeat(100)).unwrap();
    assert!(!is_archive(&text).unwrap());
    let gztext = t.path().join("text.gz");
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(&"hello\n".repeat(200).into_bytes()).unwrap();
    fs::write(&gztext, e.finish().unwrap()).unwrap();
    assert!(!is_archive(&gztext).unwrap());
    let empty = t.path().join("empty");
    fs::write(&empty, b"").unwrap();
    assert!(!is_archive(&empty).unwrap());
    let badxz = t.path().join("bad.xz");
    fs::write(&badxz, [0xfd, b'7', b'z', b'X', b'Z', 0, 1, 2, 3]).unwrap();
    assert!(!is_archive(&badxz).unwrap());
}

#[test]
fn layer_cannot_set_overlay_xattrs() {
    let mut b = tar::Builder::new(Vec::new());
    b.append_pax_extensions([
        ("SCHILY.xattr.trusted.overlay.redirect", b"/etc".as_slice()),
        ("SCHILY.xattr.trusted.overlay.opaque", b"y".as_slice()),
        ("SCHILY.xattr.user.ok", b"1".as_slice()),
    ])
    .unwrap();
    let mut h = tar::Header::new_ustar();
    h.set_path("d/").unwrap();
    h.set_entry_type(tar::EntryType::Directory);
    h.set_mode(0o755);
    h.set_size(0);
    h.set_cksum();
    b.append(&h, &b""[..]).unwrap();
    let tarball = b.into_inner().unwrap();
    let t = tempfile::tempdir().unwrap();
    unpack_layer(&tarball[..], t.path()).unwrap();
    let d = t.path().join("d");
    assert_eq!(xattr::get(&d, "user.ok").unwrap(), Some(b"1".to_vec()));
    assert_eq!(xattr::get(&d, "trusted.overlay.opaque").unwrap(), None);
    assert_eq!(xattr::get(&d, "trusted.overlay.redirect").unwrap(), None);
}

#[test]
fn corrupt_layers_fail_cleanly() {
    let t = tempfile::tempdir().unwrap();
    let mut gz = vec![0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 255];
    gz.extend_from_slice(&[0xde, 0xad, 0xbe, 0xef]);
    let e = unpack_layer(&gz[..], t.path()).unwrap_err();
    assert!(e.to_string().contains("layer"), "{e}");
    let mut junk = Vec::new();
    std::io::repeat(b'x')
        .take(2048)
        .read_to_end(&mut junk)
        .unwrap();
    assert!(unpack_layer(&junk[..], t.path()).is_err());
}
