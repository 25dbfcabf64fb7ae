//! Running another architecture's binaries: which CPU architectures the kernel runs natively,
//! and, for the others, finding the binfmt_misc handler (a static QEMU, as Debian's
//! `qemu-user-static` registers them) that the kernel hands such binaries to.
//!
//! Only a handler registered with the fix-binary (`F`) flag works in a sandbox: the kernel
//! opened its interpreter when it was registered, so the interpreter is taken from the host
//! and never looked up in, or made visible in, the step's root filesystem. A step for such an
//! architecture is then run exactly like a native one.
//!
//! Architectures are named as OCI names them (`amd64`, `arm64`, `arm`, `386`, ...).

use std::fs;
use std::path::{Path, PathBuf};

/// Where the kernel's binfmt_misc handlers are listed.
const BINFMT_DIR: &str = "/proc/sys/fs/binfmt_misc";

/// The handler the kernel uses for an architecture's binaries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Handler {
    /// Its name in binfmt_misc (`qemu-aarch64`).
    pub name: String,
    /// The interpreter registered (`/usr/libexec/qemu-binfmt/aarch64-binfmt-P`).
    pub interpreter: PathBuf,
}

/// Why binaries of an architecture cannot be run here.
#[derive(Debug, thiserror::Error)]
pub enum EmulationError {
    /// kiln does not know how that architecture's binaries look.
    #[error("kiln cannot run {arch} binaries: unknown architecture")]
    UnknownArchitecture {
        /// The architecture.
        arch: String,
    },
    /// binfmt_misc is not mounted, or is disabled.
    #[error(
        "running {arch} binaries needs an emulator registered with binfmt_misc, and {} is {state}{}",
        dir.display(),
        if *state == "not mounted" { format!(" (mount -t binfmt_misc binfmt_misc {})", dir.display()) } else { String::new() }
    )]
    Unavailable {
        /// The architecture.
        arch: String,
        /// The binfmt_misc directory.
        dir: PathBuf,
        /// "not mounted" or "disabled".
        state: &'static str,
    },
    /// No enabled handler takes the architecture's binaries.
    #[error(
        "running {arch} binaries needs an emulator: no binfmt_misc handler for them is registered in {dir}"
    )]
    NoHandler {
        /// The architecture.
        arch: String,
        /// The binfmt_misc directory.
        dir: PathBuf,
    },
    /// A handler exists but would have to find its interpreter inside the step's root.
    #[error(
        "the binfmt_misc handler {name} for {arch} binaries is registered without the F (fix-binary) flag, so its interpreter {} cannot be used inside a build's root filesystem",
        interpreter.display()
    )]
    NotFixed {
        /// The architecture.
        arch: String,
        /// The handler's name.
        name: String,
        /// Its interpreter.
        interpreter: PathBuf,
    },
}

/// An ELF class, byte order and machine: what binfmt_misc handlers match on.
struct Elf {
    class64: bool,
    little_endian: bool,
    machine: u16,
}

/// How the binaries of an OCI architecture start.
fn elf_of(arch: &str) -> Option<Elf> {
    let (class64, little_endian, machine) = match arch {
        "amd64" => (true, true, 62),
        "386" => (false, true, 3),
        "arm64" => (true, true, 183),
        "arm" => (false, true, 40),
        "ppc64le" => (true, true, 21),
        "s390x" => (true, false, 22),
        "riscv64" => (true, true, 243),
        "mips64le" => (true, true, 8),
        "loong64" => (true, true, 258),
        _ => return None,
    };
    Some(Elf {
        class64,
        little_endian,
        machine,
    })
}

impl Elf {
    /// The first 20 bytes of an executable of this kind (e_ident, e_type = ET_EXEC, e_machine).
    fn header(&self) -> [u8; 20] {
        let mut h = [0u8; 20];
        h[..4].copy_from_slice(b"\x7fELF");
        h[4] = if self.class64 { 2 } else { 1 };
        h[5] = if self.little_endian { 1 } else { 2 };
        h[6] = 1;
        let (e_type, machine) = if self.little_endian {
            (2u16.to_le_bytes(), self.machine.to_le_bytes())
        } else {
            (2u16.to_be_bytes(), self.machine.to_be_bytes())
        };
        h[16..18].copy_from_slice(&e_type);
        h[18..20].copy_from_slice(&machine);
        h
    }
}

/// Whether the host kernel runs `arch` binaries itself (the host's architecture, and 32-bit
/// x86 on x86-64).
pub fn runs_natively(arch: &str) -> bool {
    let host = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "arm" => "arm",
        "powerpc64" => "ppc64le",
        "s390x" => "s390x",
        "riscv64" => "riscv64",
        "loongarch64" => "loong64",
        other => other,
    };
    arch == host || (host == "amd64" && arch == "386")
}

/// The handler that runs `arch` binaries here, or why there is none usable; `None` when the
/// host runs them natively.
pub fn emulator_for(arch: &str) -> Result<Option<Handler>, EmulationError> {
    if runs_natively(arch) {
        return Ok(None);
    }
    find_handler(Path::new(BINFMT_DIR), arch).map(Some)
}

/// Looks for an enabled handler with the F flag for `arch` binaries among the entries of a
/// binfmt_misc directory.
fn find_handler(dir: &Path, arch: &str) -> Result<Handler, EmulationError> {
    let elf = elf_of(arch).ok_or_else(|| EmulationError::UnknownArchitecture {
        arch: arch.to_string(),
    })?;
    let header = elf.header();
    let unavailable = |state| EmulationError::Unavailable {
        arch: arch.to_string(),
        dir: dir.to_path_buf(),
        state,
    };
    match fs::read_to_string(dir.join("status")) {
        Ok(s) if s.trim() == "enabled" => {}
        Ok(_) => return Err(unavailable("disabled")),
        Err(_) => return Err(unavailable("not mounted")),
    }
    let mut unfixed = None;
    let mut entries: Vec<(String, String)> = fs::read_dir(dir)
        .map_err(|_| unavailable("not mounted"))?
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_str()?.to_string();
            if name == "status" || name == "register" {
                return None;
            }
            Some((name, fs::read_to_string(e.path()).ok()?))
        })
        .collect();
    entries.sort();
    for (name, text) in entries {
        let Some(entry) = Entry::parse(&text) else {
            continue;
        };
        if !entry.enabled || !entry.matches(&header) {
            continue;
        }
        let handler = Handler {
            name,
            interpreter: entry.interpreter,
        };
        if entry.flags.contains('F') {
            return Ok(handler);
        }
        unfixed.get_or_insert(handler);
    }
    match unfixed {
        Some(h) => Err(EmulationError::NotFixed {
            arch: arch.to_string(),
            name: h.name,
            interpreter: h.interpreter,
        }),
        None => Err(EmulationError::NoHandler {
            arch: arch.to_string(),
            dir: dir.to_path_buf(),
        }),
    }
}

/// One binfmt_misc entry, as its file in the directory shows it.
struct Entry {
    enabled: bool,
    interpreter: PathBuf,
    flags: String,
    offset: usize,
    magic: Vec<u8>,
    mask: Option<Vec<u8>>,
}

impl Entry {
    /// Parses a magic-type entry; `None` for extension-type entries and unreadable ones.
    fn parse(text: &str) -> Option<Entry> {
        let mut entry = Entry {
            enabled: false,
            interpreter: PathBuf::new(),
            flags: String::new(),
            offset: 0,
            magic: Vec::new(),
            mask: None,
        };
        for line in text.lines() {
            let (key, value) = line.split_once(' ').unwrap_or((line, ""));
            match key {
                "enabled" => entry.enabled = true,
                "interpreter" => entry.interpreter = PathBuf::from(value),
                "flags:" => entry.flags = value.to_string(),
                "offset" => entry.offset = value.parse().ok()?,
                "magic" => entry.magic = hex::decode(value).ok()?,
                "mask" => entry.mask = Some(hex::decode(value).ok()?),
                _ => {}
            }
        }
        (!entry.magic.is_empty()).then_some(entry)
    }

    /// Whether a file starting with `header` is this entry's.
    fn matches(&self, header: &[u8]) -> bool {
        let Some(window) = header.get(self.offset..self.offset + self.magic.len()) else {
            return false;
        };
        window.iter().enumerate().all(|(i, b)| {
            let m = self
                .mask
                .as_ref()
                .map_or(0xff, |m| m.get(i).copied().unwrap_or(0xff));
            b & m == self.magic[i] & m
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the kernel shows for Debian's qemu-user-static handlers.
    const AARCH64: &str = "enabled\ninterpreter /usr/libexec/qemu-binfmt/aarch64-binfmt-P\nflags: POF\noffset 0\nmagic 7f454c460201010000000000000000000200b700\nmask ffffffffffffff00fffffffffffffffffeffffff\n";
    const S390X: &str = "enabled\ninterpreter /usr/libexec/qemu-binfmt/s390x-binfmt-P\nflags: P\noffset 0\nmagic 7f454c4602020100000000000000000000020016\nmask ffffffffffffff00fffffffffffffffffffeffff\n";

    fn binfmt_dir(entries: &[(&str, &str)], status: Option<&str>) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        if let Some(s) = status {
            fs::write(dir.path().join("status"), s).unwrap();
            fs::write(dir.path().join("register"), "").unwrap();
        }
        for (name, text) in entries {
            fs::write(dir.path().join(name), text).unwrap();
        }
        dir
    }

    #[test]
    fn headers_match_the_handlers_debian_registers() {
        let aarch64 = Entry::parse(AARCH64).unwrap();
        assert!(aarch64.matches(&elf_of("arm64").unwrap().header()));
        assert!(!aarch64.matches(&elf_of("amd64").unwrap().header()));
        assert!(!aarch64.matches(&elf_of("arm").unwrap().header()));
        let s390x = Entry::parse(S390X).unwrap();
        assert!(s390x.matches(&elf_of("s390x").unwrap().header()));
        assert!(!s390x.matches(&elf_of("ppc64le").unwrap().header()));
    }

    #[test]
    fn finds_only_enabled_fixed_handlers() {
        let dir = binfmt_dir(
            &[("qemu-aarch64", AARCH64), ("qemu-s390x", S390X)],
            Some("enabled\n"),
        );
        let h = find_handler(dir.path(), "arm64").unwrap();
        assert_eq!(h.name, "qemu-aarch64");
        let e = find_handler(dir.path(), "s390x").unwrap_err().to_string();
        assert!(
            e.contains("F (fix-binary)") && e.contains("qemu-s390x"),
            "{e}"
        );
        let e = find_handler(dir.path(), "riscv64").unwrap_err();
        assert!(matches!(e, EmulationError::NoHandler { .. }), "{e}");
        let disabled = AARCH64.replacen("enabled", "disabled", 1);
        let dir = binfmt_dir(&[("qemu-aarch64", &disabled)], Some("enabled\n"));
        assert!(find_handler(dir.path(), "arm64").is_err());
        let off = binfmt_dir(&[("qemu-aarch64", AARCH64)], Some("disabled\n"));
        let e = find_handler(off.path(), "arm64").unwrap_err().to_string();
        assert!(e.contains("disabled"), "{e}");
        let unmounted = binfmt_dir(&[], None);
        let e = find_handler(unmounted.path(), "arm64")
            .unwrap_err()
            .to_string();
        assert!(e.contains("not mounted"), "{e}");
        assert!(find_handler(dir.path(), "sparc").is_err());
    }

    #[test]
    #[cfg(target_arch = "x86_64")]
    fn x86_64_runs_amd64_and_386_itself() {
        assert!(runs_natively("amd64") && runs_natively("386"));
        assert!(!runs_natively("arm64"));
        assert_eq!(emulator_for("amd64").unwrap(), None);
    }
}
