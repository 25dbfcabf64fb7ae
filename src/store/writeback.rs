//! Early write-back for big files the store fsyncs: the kernel is asked to start writing each
//! window of the file to disk as soon as it is complete, so disk writes overlap with whatever
//! produces the bytes (compression, copying) and the final `fsync` only waits for the tail.

use std::io::{self, Write};
use std::os::fd::{AsFd, AsRawFd};

use tempfile::NamedTempFile;

/// Bytes written between two write-back requests.
const WINDOW: u64 = 8 << 20;

/// A temporary file whose written data is handed to the disk window by window. The data is not
/// durable until the caller fsyncs; this only moves the waiting earlier and off the end.
pub(super) struct WritebackFile {
    file: NamedTempFile,
    written: u64,
    requested: u64,
}

impl WritebackFile {
    /// Wraps `file`, positioned at its start.
    pub(super) fn new(file: NamedTempFile) -> WritebackFile {
        WritebackFile {
            file,
            written: 0,
            requested: 0,
        }
    }

    /// The file, to fsync and persist.
    pub(super) fn into_inner(self) -> NamedTempFile {
        self.file
    }

    /// Appends all of `src` (from its current position) with in-kernel copies
    /// (`copy_file_range` where the filesystems allow it), one window at a time.
    pub(super) fn copy_from(&mut self, src: &mut std::fs::File) -> io::Result<u64> {
        let mut total = 0;
        loop {
            let n = io::copy(
                &mut io::Read::take(&mut *src, WINDOW),
                self.file.as_file_mut(),
            )?;
            if n == 0 {
                return Ok(total);
            }
            total += n;
            self.written += n;
            self.request_writeback();
        }
    }

    /// Asks the kernel to start writing `[requested, written)` out, without waiting for it.
    fn request_writeback(&mut self) {
        let fd = self.file.as_file().as_fd().as_raw_fd();
        let (offset, len) = (
            self.requested as i64,
            (self.written - self.requested) as i64,
        );
        // SAFETY: a plain syscall on an fd this struct owns; no memory is passed. A failure
        // (e.g. a filesystem without support) only loses the head start: fsync still runs.
        unsafe { libc::sync_file_range(fd, offset, len, libc::SYNC_FILE_RANGE_WRITE) };
        self.requested = self.written;
    }
}

impl Write for WritebackFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.file.write(buf)?;
        self.written += n as u64;
        if self.written - self.requested >= WINDOW {
            self.request_writeback();
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn bytes_pass_through_unchanged_across_windows() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = WritebackFile::new(NamedTempFile::new_in(dir.path()).unwrap());
        let data: Vec<u8> = (0..(WINDOW as usize * 2 + 12_345))
            .map(|i| (i % 251) as u8)
            .collect();
        for chunk in data.chunks(1 << 20) {
            w.write_all(chunk).unwrap();
        }
        assert_eq!(w.requested, 2 * WINDOW);
        let mut back = Vec::new();
        w.into_inner()
            .reopen()
            .unwrap()
            .read_to_end(&mut back)
            .unwrap();
        assert_eq!(back, data);
    }
}
