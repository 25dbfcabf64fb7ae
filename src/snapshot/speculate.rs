//! Compressing a step's big output files while the step still runs, on CPU time it leaves idle.
//!
//! A RUN step often keeps one core busy (a download, a single-threaded tool) while the others
//! wait for the snapshot, which then spends most of its time in deflate. [`Speculation`] uses
//! that idle time: a thread at `SCHED_IDLE` priority (it never takes CPU from the step) watches
//! the upper dir, and each regular file of at least `ALIGN_MIN` bytes that has not changed for
//! a moment is compressed, block by block, exactly as the layer writer would compress it (such
//! files get blocks of their own, see `pgzip`). The compressed blocks go to a spool file; only
//! their positions and checksums stay in memory.
//!
//! At snapshot time ([`Precompressed`]) a file's blocks are used only if the file still has the
//! identity it had when it was read (device, inode, size, mtime, ctime), and each block only if
//! its bytes, read again for the layer's sha256, have the same CRC-32 and 128-bit xxh3 as the
//! bytes that were compressed (and every block before it was used too, since a block's
//! dictionary is the end of the previous one). Anything else is compressed as usual, so the
//! layer's bytes never depend on what was done ahead of time.

use std::collections::HashMap;
use std::fs::{File, Metadata};
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime};

use super::pgzip::{ALIGN_MIN, BLOCK_SIZE, WINDOW, compress_block};
use crate::rootfs::RootDir;

/// How long a file must have stayed unmodified before it is compressed ahead of time.
const SETTLED: Duration = Duration::from_millis(300);
/// Pause between two looks at the upper dir (longer when a look itself takes long).
const POLL: Duration = Duration::from_millis(200);

/// What identifies a file's content without reading it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Identity {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl From<&Metadata> for Identity {
    fn from(md: &Metadata) -> Identity {
        Identity {
            dev: md.dev(),
            ino: md.ino(),
            size: md.size(),
            mtime: (md.mtime(), md.mtime_nsec()),
            ctime: (md.ctime(), md.ctime_nsec()),
        }
    }
}

/// One block compressed ahead of time.
#[derive(Clone, Copy, Debug)]
struct Block {
    /// Where its compressed bytes start in the spool file, and how many there are.
    offset: u64,
    compressed_len: usize,
    /// Its input length, CRC-32 and xxh3-128.
    len: usize,
    crc: u32,
    hash: u128,
}

/// A file's blocks compressed ahead of time (a prefix of them, if the step ended first).
#[derive(Debug)]
struct FileBlocks {
    identity: Identity,
    spool: PathBuf,
    blocks: Vec<Block>,
}

/// Files compressed ahead of time, by their path in the layer.
#[derive(Debug, Default)]
pub struct Precompressed {
    files: HashMap<Vec<u8>, FileBlocks>,
}

impl Precompressed {
    /// The blocks of the file at layer path `rel` with stat data `md`, if it is unchanged.
    pub(super) fn blocks_for(&self, rel: &[u8], md: &Metadata) -> Option<PrecompressedFile<'_>> {
        let f = self.files.get(rel)?;
        (f.identity == Identity::from(md)).then_some(PrecompressedFile { file: f })
    }
}

/// An unchanged file's blocks, checked one by one against the bytes read for the layer.
pub(super) struct PrecompressedFile<'a> {
    file: &'a FileBlocks,
}

impl PrecompressedFile<'_> {
    /// Opens the spool holding the compressed blocks.
    pub(super) fn open(&self) -> io::Result<File> {
        File::open(&self.file.spool)
    }

    /// Block `i`'s compressed bytes if `input` (the file's bytes for that block, read now, with
    /// CRC-32 `crc`) is what was compressed; `None` if there is no such block or the bytes differ.
    pub(super) fn block(
        &self,
        spool: &File,
        i: usize,
        input: &[u8],
        crc: u32,
    ) -> io::Result<Option<Vec<u8>>> {
        let Some(b) = self.file.blocks.get(i) else {
            return Ok(None);
        };
        if b.len != input.len() || b.crc != crc || b.hash != xxh3(input) {
            return Ok(None);
        }
        let mut out = vec![0; b.compressed_len];
        spool.read_exact_at(&mut out, b.offset)?;
        Ok(Some(out))
    }
}

fn xxh3(data: &[u8]) -> u128 {
    xxhash_rust::xxh3::xxh3_128(data)
}

/// The watcher thread of one running step.
pub struct Speculation {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Precompressed>>,
}

impl Speculation {
    /// Starts watching `upper`, spooling compressed blocks into files under `spool` (an
    /// existing directory that must outlive the snapshot).
    pub fn start(upper: &Path, spool: &Path) -> io::Result<Speculation> {
        let stop = Arc::new(AtomicBool::new(false));
        let (upper, spool, flag) = (upper.to_path_buf(), spool.to_path_buf(), stop.clone());
        let thread = std::thread::Builder::new()
            .name("kiln-speculate".into())
            .spawn(move || {
                // SAFETY: plain syscall on the calling thread with a valid param struct.
                let param = libc::sched_param { sched_priority: 0 };
                unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) };
                watch(&upper, &spool, &flag)
            })?;
        Ok(Speculation {
            stop,
            thread: Some(thread),
        })
    }

    /// Stops at the next block and returns what was compressed (the step has ended, so
    /// nothing changes any more).
    pub fn finish(mut self) -> Precompressed {
        self.stop_thread().unwrap_or_default()
    }

    /// Tells the thread to stop, wakes it and waits for it.
    fn stop_thread(&mut self) -> Option<Precompressed> {
        self.stop.store(true, Ordering::SeqCst);
        let t = self.thread.take()?;
        t.thread().unpark();
        t.join().ok()
    }
}

impl Drop for Speculation {
    fn drop(&mut self) {
        self.stop_thread();
    }
}

/// The watcher: looks at `upper` every [`POLL`] until `stop`, compressing settled big files.
fn watch(upper: &Path, spool: &Path, stop: &AtomicBool) -> Precompressed {
    let mut done = Precompressed::default();
    let Ok(root) = RootDir::open_host(upper) else {
        return done;
    };
    let mut spooled = 0usize;
    while !stop.load(Ordering::SeqCst) {
        let started = std::time::Instant::now();
        for entry in walkdir::WalkDir::new(upper).same_file_system(true) {
            if stop.load(Ordering::SeqCst) {
                break;
            }
            let Ok(entry) = entry else { continue };
            let Ok(md) = entry.metadata() else { continue };
            if !md.is_file() || md.len() < ALIGN_MIN || md.nlink() != 1 || !settled(&md) {
                continue;
            }
            let Ok(rel) = entry.path().strip_prefix(upper) else {
                continue;
            };
            let key = rel.as_os_str().as_bytes().to_vec();
            let identity = Identity::from(&md);
            if done.files.get(&key).is_some_and(|f| f.identity == identity) {
                continue;
            }
            spooled += 1;
            let target = spool.join(format!("{spooled}.z"));
            match compress_file(&root, rel, identity, &target, stop) {
                Some(blocks) => {
                    done.files.insert(key, blocks);
                }
                None => {
                    done.files.remove(&key);
                    let _ = std::fs::remove_file(&target);
                }
            }
        }
        // `finish` unparks this thread, so a step that ends does not wait for the pause.
        let until = std::time::Instant::now() + POLL.max(started.elapsed() * 10);
        while !stop.load(Ordering::SeqCst) {
            let Some(left) = until.checked_duration_since(std::time::Instant::now()) else {
                break;
            };
            std::thread::park_timeout(left);
        }
    }
    done
}

/// Whether `md` was last modified at least [`SETTLED`] ago.
fn settled(md: &Metadata) -> bool {
    md.modified()
        .ok()
        .and_then(|m| SystemTime::now().duration_since(m).ok())
        .is_some_and(|age| age >= SETTLED)
}

/// Compresses the file `rel` of `upper` into `target` block by block, as the layer writer would;
/// stops early (keeping the blocks done) when `stop` is set. `None` if the file changed while
/// it was read or could not be read.
fn compress_file(
    upper: &RootDir,
    rel: &Path,
    identity: Identity,
    target: &Path,
    stop: &AtomicBool,
) -> Option<FileBlocks> {
    // Resolved inside the upper dir and opened only if it is a regular file: the step may be
    // swapping paths around while this runs. The identity check then pins the very file seen.
    let mut src = upper.open_read(rel).ok()?;
    if Identity::from(&src.metadata().ok()?) != identity {
        return None;
    }
    let mut out = io::BufWriter::new(File::create(target).ok()?);
    let mut buf = vec![0u8; BLOCK_SIZE];
    let mut dict: Vec<u8> = Vec::new();
    let mut blocks = Vec::new();
    let (mut offset, mut left) = (0u64, identity.size);
    while left > 0 && !stop.load(Ordering::SeqCst) {
        let len = (left as usize).min(BLOCK_SIZE);
        src.read_exact(&mut buf[..len]).ok()?;
        let input = &buf[..len];
        let compressed = compress_block(input, &dict, false).ok()?;
        out.write_all(&compressed).ok()?;
        blocks.push(Block {
            offset,
            compressed_len: compressed.len(),
            len,
            crc: crc32fast::hash(input),
            hash: xxh3(input),
        });
        offset += compressed.len() as u64;
        left -= len as u64;
        dict.clear();
        dict.extend_from_slice(&input[len.saturating_sub(WINDOW)..]);
    }
    out.flush().ok()?;
    // Changed while it was read: what was compressed may be a mix of old and new bytes.
    if Identity::from(&src.metadata().ok()?) != identity {
        return None;
    }
    Some(FileBlocks {
        identity,
        spool: target.to_path_buf(),
        blocks,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::{Compression, LayerOptions, write_layer, write_layer_with};

    const OPTS: LayerOptions = LayerOptions {
        source_date_epoch: Some(0),
        compression: Compression::Gzip,
    };

    /// A layer dir with a small file and a 10.5 MiB text file `big` (11 blocks).
    fn upper() -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let upper = dir.path().join("upper");
        std::fs::create_dir(&upper).unwrap();
        std::fs::write(upper.join("a-small"), "small\n").unwrap();
        let mut text = Vec::new();
        let mut i = 0u64;
        while text.len() < 10 * BLOCK_SIZE + BLOCK_SIZE / 2 {
            text.extend_from_slice(format!("{i} {}\n", i * i % 977).as_bytes());
            i += 1;
        }
        std::fs::write(upper.join("big"), &text).unwrap();
        (dir, upper)
    }

    fn compressed(upper: &Path, spool: &Path) -> Precompressed {
        let identity = Identity::from(&std::fs::metadata(upper.join("big")).unwrap());
        let root = RootDir::open_host(upper).unwrap();
        let stop = AtomicBool::new(false);
        let blocks = compress_file(&root, Path::new("big"), identity, spool, &stop).unwrap();
        assert_eq!(blocks.blocks.len(), 11);
        let mut pre = Precompressed::default();
        pre.files.insert(b"big".to_vec(), blocks);
        pre
    }

    /// Overwrites the spool's bytes of blocks `from..` with garbage of the same length.
    fn spoil(pre: &Precompressed, from: usize) {
        let f = &pre.files[b"big".as_slice()];
        let spool = File::options().write(true).open(&f.spool).unwrap();
        for b in &f.blocks[from..] {
            spool
                .write_all_at(&vec![0x5a; b.compressed_len], b.offset)
                .unwrap();
        }
    }

    #[test]
    fn spliced_blocks_give_the_same_layer_and_are_really_used() {
        let (dir, upper) = upper();
        let reference = write_layer(&upper, &OPTS, Vec::new()).unwrap().0;
        let pre = compressed(&upper, &dir.path().join("spool"));
        let (with, _) = write_layer_with(&upper, &OPTS, Vec::new(), &pre).unwrap();
        assert_eq!(with, reference);
        // The layer really takes its bytes from the spool.
        spoil(&pre, 0);
        let (spoiled, _) = write_layer_with(&upper, &OPTS, Vec::new(), &pre).unwrap();
        assert_ne!(spoiled, reference);
    }

    #[test]
    fn blocks_stop_being_used_at_the_first_changed_one() {
        let (dir, upper) = upper();
        let mut pre = compressed(&upper, &dir.path().join("spool"));
        // Block 5 changes; the identity is made to match anyway (as a write within the same
        // timestamp tick could), so only the checksums can tell.
        let big = upper.join("big");
        let f = File::options().write(true).open(&big).unwrap();
        f.write_all_at(b"CHANGED", 5 * BLOCK_SIZE as u64 + 100)
            .unwrap();
        drop(f);
        let entry = pre.files.get_mut(b"big".as_slice()).unwrap();
        entry.identity = Identity::from(&std::fs::metadata(&big).unwrap());
        // Blocks 5.. must not be used: garbage there would show.
        spoil(&pre, 5);
        let reference = write_layer(&upper, &OPTS, Vec::new()).unwrap().0;
        let (with, _) = write_layer_with(&upper, &OPTS, Vec::new(), &pre).unwrap();
        assert_eq!(with, reference);
    }

    #[test]
    fn a_running_step_s_settled_big_files_are_compressed() {
        let dir = tempfile::tempdir().unwrap();
        let upper = dir.path().join("upper");
        let spool = dir.path().join("spool");
        std::fs::create_dir(&upper).unwrap();
        std::fs::create_dir(&spool).unwrap();
        let watching = Speculation::start(&upper, &spool).unwrap();
        std::fs::create_dir(upper.join("data")).unwrap();
        std::fs::write(upper.join("data/big"), vec![b'x'; ALIGN_MIN as usize]).unwrap();
        std::fs::write(upper.join("data/small"), b"small").unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while std::fs::read_dir(&spool).unwrap().count() == 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "nothing was compressed"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        std::thread::sleep(Duration::from_millis(300));
        let pre = watching.finish();
        assert_eq!(pre.files.len(), 1);
        let reference = write_layer(&upper, &OPTS, Vec::new()).unwrap().0;
        assert_eq!(
            write_layer_with(&upper, &OPTS, Vec::new(), &pre).unwrap().0,
            reference
        );
    }
}
