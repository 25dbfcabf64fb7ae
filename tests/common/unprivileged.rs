//! A real unprivileged user for end-to-end tests of rootless kiln: made with `useradd` (with
//! the subordinate id ranges Debian's useradd gives, or with none) and removed with `userdel`.
//! The kiln binary and the busybox base are hard-linked (else copied) into its home, so the
//! user can reach them whatever the permissions of the checkout (`/root` is 0700).

use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};

use super::{assert_success, base_archive, kiln_bin};

/// A user made for one test, removed (with its home) on drop.
pub struct TestUser {
    /// The login name.
    pub name: String,
    /// Its uid.
    pub uid: u32,
    /// Its primary gid.
    pub gid: u32,
    /// Its home directory.
    pub home: PathBuf,
    /// Its own link to the kiln binary.
    kiln: PathBuf,
}

static NEXT: AtomicUsize = AtomicUsize::new(0);

/// Runs a user-management command, retrying while another one holds /etc/passwd's lock.
fn manage(program: &str, args: &[&str]) -> Output {
    for _ in 0..100 {
        let out = Command::new(program).args(args).output().unwrap();
        // "cannot lock /etc/passwd; try again later": another test (or anyone) is at it.
        if out.status.success() || !String::from_utf8_lossy(&out.stderr).contains("lock") {
            return out;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    panic!("{program} {args:?}: /etc/passwd stayed locked");
}

/// Hard-links `src` to `dst`, or copies it where it is on another file system.
fn link_or_copy(src: &Path, dst: &Path) {
    if std::fs::hard_link(src, dst).is_err() {
        std::fs::copy(src, dst).unwrap();
    }
}

fn chown_tree(path: &Path, uid: u32, gid: u32) {
    for entry in walkdir::WalkDir::new(path) {
        let entry = entry.unwrap();
        std::os::unix::fs::lchown(entry.path(), Some(uid), Some(gid)).unwrap();
    }
}

impl TestUser {
    /// A new user; `ranges`: with subordinate uid/gid ranges in /etc/subuid and /etc/subgid
    /// (as useradd gives by default), else with none.
    pub fn new(ranges: bool) -> TestUser {
        let name = format!(
            "kiln-rl-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let mut args = vec!["-m", "-s", "/bin/sh"];
        if !ranges {
            args.extend(["-K", "SUB_UID_COUNT=0", "-K", "SUB_GID_COUNT=0"]);
        }
        args.push(&name);
        let out = manage("useradd", &args);
        assert_success(&out);
        let home = PathBuf::from(format!("/home/{name}"));
        let md = std::fs::metadata(&home).unwrap();
        let kiln = home.join("kiln");
        link_or_copy(Path::new(kiln_bin()), &kiln);
        let user = TestUser {
            name,
            uid: md.uid(),
            gid: md.gid(),
            home,
            kiln,
        };
        if ranges {
            let subuid = std::fs::read_to_string("/etc/subuid").unwrap();
            assert!(
                subuid
                    .lines()
                    .any(|l| l.starts_with(&format!("{}:", user.name))),
                "useradd gave {} no /etc/subuid range",
                user.name
            );
        }
        user
    }

    /// A kiln command run as this user, with a login-like environment and nothing else.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(&self.kiln);
        cmd.args(args)
            .env_clear()
            .env("HOME", &self.home)
            .env("USER", &self.name)
            .env("LOGNAME", &self.name)
            .env("PATH", "/usr/local/bin:/usr/bin:/bin")
            .current_dir(&self.home)
            .stdin(Stdio::null())
            .uid(self.uid)
            .gid(self.gid);
        cmd
    }

    /// Runs kiln as this user.
    pub fn kiln(&self, args: &[&str]) -> Output {
        self.command(args).output().unwrap()
    }

    /// A build context in the user's home holding a Dockerfile and `files`, owned by the user.
    pub fn context(&self, dockerfile: &str, files: &[(&str, &[u8])]) -> PathBuf {
        let dir = self
            .home
            .join(format!("ctx-{}", NEXT.fetch_add(1, Ordering::Relaxed)));
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(dir.join("Dockerfile"), dockerfile).unwrap();
        for (name, content) in files {
            let p = dir.join(name);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, content).unwrap();
        }
        chown_tree(&dir, self.uid, self.gid);
        dir
    }

    /// Imports the busybox base into the user's default store (`~/.local/share/kiln`).
    pub fn import_busybox(&self) {
        let archive = self.home.join("busybox.tar");
        link_or_copy(base_archive(), &archive);
        let out = self.kiln(&["import", archive.to_str().unwrap(), "busybox"]);
        assert_success(&out);
    }

    /// The user's default store.
    pub fn store(&self) -> PathBuf {
        self.home.join(".local/share/kiln")
    }

    /// Paths under `dir` owned by this user or one of its subordinate ids (the first few).
    pub fn owned_under(&self, dir: &Path) -> Vec<PathBuf> {
        let subordinate = |id: u32| {
            std::fs::read_to_string("/etc/subuid")
                .unwrap_or_default()
                .lines()
                .filter_map(|l| {
                    let mut f = l.split(':');
                    (f.next()? == self.name).then_some(())?;
                    Some((
                        f.next()?.parse::<u32>().ok()?,
                        f.next()?.parse::<u32>().ok()?,
                    ))
                })
                .any(|(first, count)| id >= first && id - first < count)
        };
        let Ok(entries) = std::fs::read_dir(dir) else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter(|e| {
                e.metadata()
                    .is_ok_and(|m| m.uid() == self.uid || subordinate(m.uid()))
            })
            .map(|e| e.path())
            .take(10)
            .collect()
    }
}

impl Drop for TestUser {
    fn drop(&mut self) {
        let out = manage("userdel", &["-r", &self.name]);
        if !out.status.success() {
            eprintln!(
                "userdel {}: {}",
                self.name,
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}
