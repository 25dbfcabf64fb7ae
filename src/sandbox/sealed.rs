//! The sandbox helper runs from a sealed in-memory copy of the kiln binary, never from the
//! host's file (the runc CVE-2019-5736 class). A step can make its first process re-execute
//! whatever the sandbox init is running (a base whose `/bin/sh` is a `#!/proc/self/exe`
//! script), and `/proc/PID/exe` of that process leads to the file behind it even across mount
//! namespaces: with the host binary there, a process of the step could open it and write to it
//! once it stopped running. The copy is a memfd sealed against writing, growing and shrinking,
//! so what a step can reach is a copy no one can change, and the host binary is never the
//! executable of any process in a step.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// An executable copy of a binary in sealed memory, kept open for the life of the process.
#[derive(Debug)]
pub(super) struct SealedExe {
    fd: OwnedFd,
}

/// The lowest fd number the copy is kept at, above the fds the helper is handed (0 to 5)
/// and the ones the spawning code duplicates them to.
const HIGH_FD: RawFd = 100;

impl SealedExe {
    /// The sealed copy of `exe`, made on the first call for that path in this process and
    /// shared after (one copy however many sandboxes and steps use it).
    pub(super) fn shared(exe: &Path) -> io::Result<Arc<SealedExe>> {
        static COPIES: Mutex<Vec<(PathBuf, Arc<SealedExe>)>> = Mutex::new(Vec::new());
        let mut copies = COPIES.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, copy)) = copies.iter().find(|(p, _)| p == exe) {
            return Ok(copy.clone());
        }
        let copy = Arc::new(SealedExe::copy_of(exe)?);
        copies.push((exe.to_path_buf(), copy.clone()));
        Ok(copy)
    }

    /// Copies `exe` into a sealed memfd.
    pub(super) fn copy_of(exe: &Path) -> io::Result<SealedExe> {
        // SAFETY: a NUL-terminated name and valid flags; the kernel returns a new fd we own.
        let raw = unsafe {
            libc::memfd_create(
                c"kiln-sandbox".as_ptr(),
                libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
            )
        };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the fd was just created and is owned by nobody else.
        let mut memfd = File::from(unsafe { OwnedFd::from_raw_fd(raw) });
        let mut source = File::open(exe)?;
        io::copy(&mut source, &mut memfd)?;
        let seals =
            libc::F_SEAL_SEAL | libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_WRITE;
        // SAFETY: fcntl on a valid fd.
        if unsafe { libc::fcntl(memfd.as_raw_fd(), libc::F_ADD_SEALS, seals) } < 0 {
            return Err(io::Error::last_os_error());
        }
        // Out of the way of the fds the helper is handed at spawn (dup2'ed to 3, 4, 5).
        // SAFETY: fcntl on a valid fd; the duplicate is a new fd we own.
        let high = unsafe { libc::fcntl(memfd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, HIGH_FD) };
        if high < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the kernel just returned this fd.
        let fd = unsafe { OwnedFd::from_raw_fd(high) };
        Ok(SealedExe { fd })
    }

    /// A path that executes the copy (`/proc/self/fd/N`, valid in this process and in the
    /// children it forks before they exec).
    pub(super) fn path(&self) -> PathBuf {
        PathBuf::from(format!("/proc/self/fd/{}", self.fd.as_raw_fd()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn the_copy_runs_and_cannot_be_changed() {
        let sealed = SealedExe::copy_of(Path::new("/bin/true")).unwrap();
        let status = std::process::Command::new(sealed.path()).status().unwrap();
        assert!(status.success());
        let written = File::options()
            .append(true)
            .open(sealed.path())
            .and_then(|mut f| f.write_all(b"x"));
        assert!(written.is_err(), "the sealed copy took a write");
        assert!(sealed.fd.as_raw_fd() >= HIGH_FD);
    }
}
