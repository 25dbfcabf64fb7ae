//! Compression: the layer encoder (pluggable by [`Compression`]) and content-sniffing decoders.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::thread::JoinHandle;

use flate2::read::MultiGzDecoder;

use super::Compression;
use super::pgzip::ParGzWriter;

/// The zstd level for layers: libzstd's default, ~0.16 on text at several hundred MB/s on one
/// core. Single-threaded on purpose: one frame, no checksum, no content size, no dictionary id,
/// so the bytes depend only on the input (zstdmt would change them and gains little on 2 cores).
const ZSTD_LEVEL: i32 = 3;

/// A layer compressor writing into `W`.
pub(super) enum Encoder<W: Write> {
    /// Block-parallel gzip with a fixed header, identical bytes on any number of threads.
    Gzip(Box<ParGzWriter<W>>),
    /// zstd, one frame at a fixed level.
    Zstd(Box<zstd::stream::write::Encoder<'static, W>>),
    /// No compression.
    Plain(W),
}

impl<W: Write> Encoder<W> {
    /// A compressor for `c` writing into `out`.
    pub(super) fn new(out: W, c: Compression) -> io::Result<Self> {
        Ok(match c {
            Compression::Gzip => Encoder::Gzip(Box::new(ParGzWriter::new(out)?)),
            Compression::Zstd => {
                let mut z = zstd::stream::write::Encoder::new(out, ZSTD_LEVEL)?;
                z.include_checksum(false)?;
                z.include_contentsize(false)?;
                z.include_dictid(false)?;
                Encoder::Zstd(Box::new(z))
            }
            Compression::None => Encoder::Plain(out),
        })
    }

    /// Starts a new block here for a big file's data (gzip only; see `pgzip`), with no
    /// dictionary if `fresh`.
    pub(super) fn align(&mut self, fresh: bool) -> io::Result<()> {
        match self {
            Encoder::Gzip(g) => g.align(fresh),
            Encoder::Zstd(_) | Encoder::Plain(_) => Ok(()),
        }
    }

    /// The gzip writer, for splicing blocks compressed ahead of time; `None` for the others.
    pub(super) fn gzip(&mut self) -> Option<&mut ParGzWriter<W>> {
        match self {
            Encoder::Gzip(g) => Some(g),
            Encoder::Zstd(_) | Encoder::Plain(_) => None,
        }
    }

    /// Writes any trailer and returns the inner writer.
    pub(super) fn finish(self) -> io::Result<W> {
        match self {
            Encoder::Gzip(g) => g.finish(),
            Encoder::Zstd(z) => {
                let mut w = z.finish()?;
                w.flush()?;
                Ok(w)
            }
            Encoder::Plain(mut w) => {
                w.flush()?;
                Ok(w)
            }
        }
    }
}

impl<W: Write> Write for Encoder<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Encoder::Gzip(g) => g.write(buf),
            Encoder::Zstd(z) => z.write(buf),
            Encoder::Plain(w) => w.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Encoder::Gzip(g) => g.flush(),
            Encoder::Zstd(z) => z.flush(),
            Encoder::Plain(w) => w.flush(),
        }
    }
}

/// A stream format recognised by its first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Format {
    /// `1f 8b`
    Gzip,
    /// `BZh`
    Bzip2,
    /// `fd 37 7a 58 5a 00`
    Xz,
    /// `28 b5 2f fd`
    Zstd,
    /// Anything else: taken as a plain tar.
    Plain,
}

impl Format {
    /// A human name for messages.
    pub(super) fn name(self) -> &'static str {
        match self {
            Format::Gzip => "gzip",
            Format::Bzip2 => "bzip2",
            Format::Xz => "xz",
            Format::Zstd => "zstd",
            Format::Plain => "plain",
        }
    }
}

/// Looks at the first bytes of `r` without consuming them.
pub(super) fn sniff<R: BufRead>(r: &mut R) -> io::Result<Format> {
    let b = r.fill_buf()?;
    Ok(if b.starts_with(&[0x1f, 0x8b]) {
        Format::Gzip
    } else if b.starts_with(b"BZh") {
        Format::Bzip2
    } else if b.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0]) {
        Format::Xz
    } else if b.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Format::Zstd
    } else {
        Format::Plain
    })
}

/// A decompressing reader for `fmt` over `r`.
pub(super) fn decoder<R: BufRead + Send + 'static>(
    r: R,
    fmt: Format,
) -> io::Result<Box<dyn Read + Send>> {
    Ok(match fmt {
        Format::Gzip => Box::new(MultiGzDecoder::new(r)),
        Format::Bzip2 => Box::new(bzip2::read::MultiBzDecoder::new(r)),
        Format::Xz => Box::new(XzReader::spawn(r)?),
        Format::Plain => Box::new(r),
        Format::Zstd => Box::new(zstd::stream::read::Decoder::with_buffer(r)?),
    })
}

/// An xz decoder as a `Read`: lzma-rs only decodes from a reader into a writer, so a thread
/// decodes into a bounded channel of chunks (memory stays flat; no OS pipe, so no SIGPIPE).
struct XzReader {
    rx: Option<Receiver<Vec<u8>>>,
    chunk: Vec<u8>,
    pos: usize,
    worker: Option<JoinHandle<io::Result<()>>>,
}

/// Chunk size and number of chunks in flight between the xz thread and the reader.
const XZ_CHUNK: usize = 64 * 1024;
const XZ_CHUNKS_IN_FLIGHT: usize = 4;

/// The writing half: collects output into chunks and sends them.
struct ChunkWriter {
    tx: SyncSender<Vec<u8>>,
    buf: Vec<u8>,
}

impl Write for ChunkWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = data.len().min(XZ_CHUNK - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == XZ_CHUNK {
            self.flush()?;
        }
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let full = std::mem::replace(&mut self.buf, Vec::with_capacity(XZ_CHUNK));
        self.tx
            .send(full)
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "xz reader went away"))
    }
}

impl XzReader {
    fn spawn<R: BufRead + Send + 'static>(mut input: R) -> io::Result<Self> {
        let (tx, rx) = sync_channel(XZ_CHUNKS_IN_FLIGHT);
        let worker = std::thread::Builder::new()
            .name("kiln-xz".into())
            .spawn(move || {
                let mut out = ChunkWriter {
                    tx,
                    buf: Vec::with_capacity(XZ_CHUNK),
                };
                lzma_rs::xz_decompress(&mut input, &mut out)
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("xz: {e}")))?;
                out.flush()
            })?;
        Ok(XzReader {
            rx: Some(rx),
            chunk: Vec::new(),
            pos: 0,
            worker: Some(worker),
        })
    }

    fn join(&mut self) -> io::Result<()> {
        match self.worker.take() {
            Some(h) => h
                .join()
                .map_err(|_| io::Error::other("xz decoder thread panicked"))?,
            None => Ok(()),
        }
    }
}

impl Read for XzReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.chunk.len() {
            let Some(rx) = self.rx.as_ref() else {
                return Ok(0);
            };
            match rx.recv() {
                Ok(c) => {
                    self.chunk = c;
                    self.pos = 0;
                }
                Err(_) => {
                    // The decoder finished: surface its error instead of a silent truncation.
                    self.rx = None;
                    self.join()?;
                    return Ok(0);
                }
            }
        }
        let n = buf.len().min(self.chunk.len() - self.pos);
        buf[..n].copy_from_slice(&self.chunk[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

impl Drop for XzReader {
    fn drop(&mut self) {
        // Dropping the receiver makes the thread's next send fail, so it ends.
        self.rx = None;
        let _ = self.join();
    }
}

/// A buffered reader with room to sniff magic numbers.
pub(super) fn buffered<R: Read>(r: R) -> BufReader<R> {
    BufReader::with_capacity(256 * 1024, r)
}
