//! SHA-256 content digests (`sha256:<hex>`) and the hashing reader/writer adapters that
//! compute them while data streams past, so no blob is ever read twice.

use std::fmt;
use std::io::{self, Read, Write};
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::{Digest as _, Sha256};

/// A SHA-256 digest; displays and serialises as `sha256:<64 lower-case hex digits>`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest([u8; 32]);

/// A string that is not a valid `sha256:<hex>` digest.
#[derive(Debug, thiserror::Error)]
#[error("invalid digest {0:?}: expected sha256:<64 hex digits>")]
pub struct DigestParseError(pub String);

impl Digest {
    /// Wraps raw digest bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Digest(bytes)
    }

    /// The digest of a byte slice.
    pub fn of(data: &[u8]) -> Self {
        Digest(Sha256::digest(data).into())
    }

    /// The 64 hex digits, without the algorithm prefix.
    pub fn hex(&self) -> String {
        hex::encode(self.0)
    }

    /// The raw digest bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Parses bare hex (64 digits) without the `sha256:` prefix.
    pub fn from_hex(s: &str) -> Result<Self, DigestParseError> {
        let mut out = [0u8; 32];
        if s.len() != 64
            || !s
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(DigestParseError(s.to_string()));
        }
        hex::decode_to_slice(s, &mut out).map_err(|_| DigestParseError(s.to_string()))?;
        Ok(Digest(out))
    }
}

impl FromStr for Digest {
    type Err = DigestParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let hex = s
            .strip_prefix("sha256:")
            .ok_or_else(|| DigestParseError(s.to_string()))?;
        Digest::from_hex(hex).map_err(|_| DigestParseError(s.to_string()))
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.hex())
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.hex())
    }
}

impl Serialize for Digest {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Digest {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A writer that hashes and counts everything written through it.
pub struct HashingWriter<W> {
    inner: W,
    hasher: Sha256,
    len: u64,
}

impl<W: Write> HashingWriter<W> {
    /// Wraps `inner`.
    pub fn new(inner: W) -> Self {
        HashingWriter {
            inner,
            hasher: Sha256::new(),
            len: 0,
        }
    }

    /// Returns the inner writer, the digest and the byte count of what passed through.
    pub fn finish(self) -> (W, Digest, u64) {
        (self.inner, Digest(self.hasher.finalize().into()), self.len)
    }

    /// The inner writer.
    pub fn get_mut(&mut self) -> &mut W {
        &mut self.inner
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Chunks a [`BackgroundHashingWriter`] may have queued for its hashing thread.
const QUEUED_CHUNKS: usize = 8;

/// A writer like [`HashingWriter`] whose hashing runs on a thread of its own, so a big stream
/// costs the writing thread a copy instead of the hash (SHA-256 is often the slowest stage of a
/// layer's pipeline). At most [`QUEUED_CHUNKS`] written chunks wait for the hasher. If the
/// thread cannot be started, it hashes inline.
pub struct BackgroundHashingWriter<W> {
    inner: W,
    hasher: Hasher,
    len: u64,
}

/// Where a [`BackgroundHashingWriter`] hashes.
enum Hasher {
    Thread {
        chunks: std::sync::mpsc::SyncSender<Vec<u8>>,
        /// Chunk buffers handed back for reuse.
        spare: std::sync::mpsc::Receiver<Vec<u8>>,
        thread: std::thread::JoinHandle<Sha256>,
    },
    Inline(Sha256),
}

impl<W: Write> BackgroundHashingWriter<W> {
    /// Wraps `inner`.
    pub fn new(inner: W) -> Self {
        let (chunks, queue) = std::sync::mpsc::sync_channel::<Vec<u8>>(QUEUED_CHUNKS);
        let (give_back, spare) = std::sync::mpsc::channel();
        let spawned = std::thread::Builder::new()
            .name("kiln-sha256".into())
            .spawn(move || {
                let mut h = Sha256::new();
                for chunk in queue {
                    h.update(&chunk);
                    let _ = give_back.send(chunk);
                }
                h
            });
        let hasher = match spawned {
            Ok(thread) => Hasher::Thread {
                chunks,
                spare,
                thread,
            },
            Err(_) => Hasher::Inline(Sha256::new()),
        };
        BackgroundHashingWriter {
            inner,
            hasher,
            len: 0,
        }
    }

    /// Hashes and counts `data` that reaches the inner writer another way, as if it had been
    /// written through.
    pub fn account(&mut self, data: &[u8]) {
        self.len += data.len() as u64;
        match &mut self.hasher {
            Hasher::Thread { chunks, spare, .. } => {
                let mut chunk = spare.try_recv().unwrap_or_default();
                chunk.clear();
                chunk.extend_from_slice(data);
                if let Err(back) = chunks.send(chunk) {
                    // The hasher is gone (it panicked): `finish` reports it.
                    drop(back);
                }
            }
            Hasher::Inline(h) => h.update(data),
        }
    }

    /// Returns the inner writer, the digest and the byte count of what passed through.
    pub fn finish(self) -> io::Result<(W, Digest, u64)> {
        let h = match self.hasher {
            Hasher::Thread { chunks, thread, .. } => {
                drop(chunks);
                thread
                    .join()
                    .map_err(|_| io::Error::other("the hashing thread failed"))?
            }
            Hasher::Inline(h) => h,
        };
        Ok((self.inner, Digest(h.finalize().into()), self.len))
    }

    /// The inner writer.
    pub fn get_mut(&mut self) -> &mut W {
        &mut self.inner
    }
}

impl<W: Write> Write for BackgroundHashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.account(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// A reader that hashes and counts everything read through it.
pub struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
    len: u64,
}

impl<R: Read> HashingReader<R> {
    /// Wraps `inner`.
    pub fn new(inner: R) -> Self {
        HashingReader {
            inner,
            hasher: Sha256::new(),
            len: 0,
        }
    }

    /// The digest and byte count of what has been read so far.
    pub fn finish(self) -> (R, Digest, u64) {
        (self.inner, Digest(self.hasher.finalize().into()), self.len)
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_digest_round_trips() {
        let d = Digest::of(b"");
        let s = d.to_string();
        assert_eq!(
            s,
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(s.parse::<Digest>().unwrap(), d);
    }

    #[test]
    fn rejects_malformed() {
        for bad in [
            "",
            "sha256:",
            "sha256:xyz",
            "md5:00",
            "sha256:E3B0C44298FC1C149AFBF4C8996FB92427AE41E4649B934CA495991B7852B855",
        ] {
            assert!(bad.parse::<Digest>().is_err(), "{bad}");
        }
    }

    #[test]
    fn hashing_writer_matches_one_shot() {
        let mut w = HashingWriter::new(Vec::new());
        w.write_all(b"hello ").unwrap();
        w.write_all(b"world").unwrap();
        let (buf, d, n) = w.finish();
        assert_eq!(buf, b"hello world");
        assert_eq!(n, 11);
        assert_eq!(d, Digest::of(b"hello world"));
    }
}
