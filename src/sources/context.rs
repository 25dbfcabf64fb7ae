//! The build context: resolving COPY/ADD source patterns inside the context directory (never
//! outside it), honouring `.dockerignore`, and content digests of sources for cache keys (mode,
//! size, content, link target; never owners or mtimes, which differ from checkout to checkout
//! and never reach the image: COPY gives context files to root). Reads only.

use std::collections::BTreeMap;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::Relaxed;

use globset::{GlobBuilder, GlobMatcher};
use sha2::{Digest as _, Sha256};

use crate::recipe::ignore::{IgnoreRules, ignore_file_for};

/// An error reading the context; names the path.
#[derive(Debug, thiserror::Error)]
pub enum ContextError {
    /// The context directory is unusable.
    #[error("build context {path}: {source}")]
    Open {
        /// The context path.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The ignore file is invalid.
    #[error("{path}: {message}")]
    Ignore {
        /// The ignore file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A source would resolve outside the context.
    #[error("source {0:?} is outside the build context")]
    Outside(String),
    /// A source matches nothing.
    #[error("source {0:?} not found in the build context")]
    NotFound(String),
    /// A source pattern is not a valid glob.
    #[error("invalid source pattern {pattern:?}: {message}")]
    Pattern {
        /// The pattern.
        pattern: String,
        /// What is wrong.
        message: String,
    },
    /// Reading a file failed.
    #[error("reading {path} in the build context: {source}")]
    Read {
        /// Context-relative path.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
}

/// An opened build context.
pub struct Context {
    root: PathBuf,
    ignore: IgnoreRules,
}

/// A COPY source found in the context.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Source {
    /// The path as the pattern matched it (a symlink's own path).
    pub matched: String,
    /// The path copied: `matched` with symlinks followed (inside the context).
    pub rel: String,
}

/// One file, directory or symlink of the context, by its context-relative path.
#[derive(Clone, Debug)]
pub struct Entry {
    /// Context-relative path with `/` separators ("" is the root).
    pub rel: String,
    /// `lstat` of the entry.
    pub meta: std::fs::Metadata,
}

impl Context {
    /// Opens `dir`, loading `<dockerfile>.dockerignore` or `dir/.dockerignore`.
    pub fn open(dir: &Path, dockerfile: Option<&Path>) -> Result<Context, ContextError> {
        let root = dir.canonicalize().map_err(|source| ContextError::Open {
            path: dir.to_path_buf(),
            source,
        })?;
        if !root.is_dir() {
            return Err(ContextError::Open {
                path: dir.to_path_buf(),
                source: std::io::Error::new(std::io::ErrorKind::NotADirectory, "not a directory"),
            });
        }
        let ignore = match ignore_file_for(&root, dockerfile) {
            Some(path) => {
                let text = std::fs::read_to_string(&path).map_err(|source| ContextError::Open {
                    path: path.clone(),
                    source,
                })?;
                IgnoreRules::parse(&text).map_err(|e| ContextError::Ignore {
                    path: path.clone(),
                    message: e.to_string(),
                })?
            }
            None => IgnoreRules::empty(),
        };
        Ok(Context { root, ignore })
    }

    /// The ignore rules in effect (from `.dockerignore` or the recipe's own ignore file).
    pub fn ignore_rules(&self) -> &IgnoreRules {
        &self.ignore
    }

    /// The context directory (canonical).
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The host path of a context-relative path that [`Context::resolve`] returned.
    pub fn host_path(&self, rel: &str) -> PathBuf {
        if rel.is_empty() {
            self.root.clone()
        } else {
            self.root.join(rel)
        }
    }

    /// Expands one COPY source (a path or a glob, relative to the context root) into the
    /// matching context-relative paths, sorted. A top-level symlink is followed, but only inside
    /// the context.
    pub fn resolve(&self, pattern: &str) -> Result<Vec<String>, ContextError> {
        Ok(self
            .resolve_sources(pattern)?
            .into_iter()
            .map(|s| s.rel)
            .collect())
    }

    /// [`Context::resolve`], keeping for each match the path it was matched as: a symlink
    /// named by the instruction is copied under its own name with its target's content.
    pub fn resolve_sources(&self, pattern: &str) -> Result<Vec<Source>, ContextError> {
        let cleaned =
            clean_relative(pattern).ok_or_else(|| ContextError::Outside(pattern.to_string()))?;
        let mut current = vec![String::new()];
        for component in cleaned.split('/').filter(|c| !c.is_empty()) {
            let mut next = Vec::new();
            let has_meta = component.contains(['*', '?', '[', '\\']);
            for base in &current {
                let base = self.follow_symlinks(base, pattern)?;
                if has_meta {
                    let glob = component_matcher(component).map_err(|e| ContextError::Pattern {
                        pattern: pattern.to_string(),
                        message: e.to_string(),
                    })?;
                    for n in matching_names(&self.host_path(&base), &glob) {
                        let rel = join(&base, &n);
                        if !self.ignore.is_excluded(&rel) {
                            next.push(rel);
                        }
                    }
                } else {
                    next.push(join(&base, component));
                }
            }
            current = next;
        }
        let mut out = Vec::new();
        for matched in current {
            let rel = self.follow_symlinks(&matched, pattern)?;
            let source = Source {
                matched,
                rel: rel.clone(),
            };
            if rel.is_empty() {
                out.push(source);
                continue;
            }
            // What .dockerignore excludes is not in the context, unless it is a directory
            // with re-included entries below (as BuildKit sends it).
            let Ok(meta) = std::fs::symlink_metadata(self.host_path(&rel)) else {
                continue;
            };
            if !self.ignore.is_excluded(&rel)
                || (meta.is_dir() && self.ignore.may_reinclude_under(&rel))
            {
                out.push(source);
            }
        }
        if out.is_empty() {
            return Err(ContextError::NotFound(pattern.to_string()));
        }
        Ok(out)
    }

    /// Resolves every symlink in `rel` (each component in turn, the last one too) with targets
    /// taken inside the context. Only link-free prefixes are ever looked up on the host, so a
    /// link further down a link's target (`l -> x/secret`, `x -> /etc`) cannot lead out.
    fn follow_symlinks(&self, rel: &str, pattern: &str) -> Result<String, ContextError> {
        let mut todo: Vec<String> = rel
            .split('/')
            .filter(|c| !c.is_empty())
            .rev()
            .map(str::to_string)
            .collect();
        let mut done = String::new();
        let mut links = 0;
        while let Some(component) = todo.pop() {
            let candidate = join(&done, &component);
            let host = self.host_path(&candidate);
            match std::fs::symlink_metadata(&host) {
                Ok(m) if m.file_type().is_symlink() => {
                    links += 1;
                    if links > 40 {
                        return Err(ContextError::Outside(pattern.to_string()));
                    }
                    let target =
                        std::fs::read_link(&host).map_err(|source| ContextError::Read {
                            path: candidate.clone(),
                            source,
                        })?;
                    let target = target.to_string_lossy();
                    let joined = if target.starts_with('/') {
                        target.to_string()
                    } else {
                        join(&done, &target)
                    };
                    let cleaned = clean_relative(&joined)
                        .ok_or_else(|| ContextError::Outside(pattern.to_string()))?;
                    todo.extend(
                        cleaned
                            .split('/')
                            .filter(|c| !c.is_empty())
                            .rev()
                            .map(str::to_string),
                    );
                    done = String::new();
                }
                _ => done = candidate,
            }
        }
        Ok(done)
    }

    /// Every entry at and under `rel` that `.dockerignore` keeps, parents before children,
    /// sorted by path; symlinks are listed, never followed.
    pub fn walk(&self, rel: &str) -> Result<Vec<Entry>, ContextError> {
        let mut out = Vec::new();
        let host = self.host_path(rel);
        let meta = std::fs::symlink_metadata(&host).map_err(|source| ContextError::Read {
            path: rel.to_string(),
            source,
        })?;
        let is_dir = meta.is_dir();
        out.push(Entry {
            rel: rel.to_string(),
            meta,
        });
        if is_dir {
            self.walk_dir(rel, &mut out)?;
        }
        Ok(out)
    }

    fn walk_dir(&self, rel: &str, out: &mut Vec<Entry>) -> Result<(), ContextError> {
        let read = std::fs::read_dir(self.host_path(rel)).map_err(|source| ContextError::Read {
            path: rel.to_string(),
            source,
        })?;
        let mut names: Vec<String> = Vec::new();
        for e in read {
            let e = e.map_err(|source| ContextError::Read {
                path: rel.to_string(),
                source,
            })?;
            names.push(e.file_name().to_string_lossy().into_owned());
        }
        names.sort();
        for n in names {
            let child = join(rel, &n);
            let meta = std::fs::symlink_metadata(self.host_path(&child)).map_err(|source| {
                ContextError::Read {
                    path: child.clone(),
                    source,
                }
            })?;
            let excluded = self.ignore.is_excluded(&child);
            if meta.is_dir() {
                if excluded && !self.ignore.may_reinclude_under(&child) {
                    continue;
                }
                // An excluded directory is listed when something below it is re-included,
                // so that its entries have their directory (with its own mode and owner).
                let at = out.len();
                out.push(Entry {
                    rel: child.clone(),
                    meta,
                });
                self.walk_dir(&child, out)?;
                if excluded && out.len() == at + 1 {
                    out.pop();
                }
            } else if !excluded {
                out.push(Entry { rel: child, meta });
            }
        }
        Ok(())
    }

    /// Content digests of entries for cache keys: path → short hex digest of (type, mode,
    /// size, link target, content). Big contexts are hashed on every core.
    pub fn digest_entries(
        &self,
        entries: &[Entry],
    ) -> Result<BTreeMap<String, String>, ContextError> {
        let bytes: u64 = entries.iter().map(|e| e.meta.len()).sum();
        let threads = std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .min(entries.len());
        if threads < 2 || bytes < PARALLEL_DIGEST_MIN_BYTES {
            return entries.iter().map(|e| self.digest_entry(e)).collect();
        }
        let next = std::sync::atomic::AtomicUsize::new(0);
        std::thread::scope(|scope| {
            let workers: Vec<_> = (0..threads)
                .map(|_| {
                    scope.spawn(|| {
                        let mut out = Vec::new();
                        while let Some(e) = entries.get(next.fetch_add(1, Relaxed)) {
                            out.push(self.digest_entry(e)?);
                        }
                        Ok::<_, ContextError>(out)
                    })
                })
                .collect();
            let mut all = BTreeMap::new();
            for w in workers {
                let part = w.join().unwrap_or_else(|p| std::panic::resume_unwind(p))?;
                all.extend(part);
            }
            Ok(all)
        })
    }

    /// The digest of one entry (see [`Context::digest_entries`]).
    fn digest_entry(&self, e: &Entry) -> Result<(String, String), ContextError> {
        let read_err = |source| ContextError::Read {
            path: e.rel.clone(),
            source,
        };
        let m = &e.meta;
        let mut h = Sha256::new();
        h.update(format!("{:o} {}\n", m.mode(), m.len()).as_bytes());
        let host = self.host_path(&e.rel);
        if m.file_type().is_symlink() {
            let t = std::fs::read_link(&host).map_err(read_err)?;
            h.update(t.as_os_str().as_encoded_bytes());
        } else if m.is_file() {
            let mut f = std::fs::File::open(&host).map_err(read_err)?;
            let mut buf = vec![0u8; (m.len() as usize).clamp(1, 256 * 1024)];
            loop {
                let n = f.read(&mut buf).map_err(read_err)?;
                if n == 0 {
                    break;
                }
                h.update(&buf[..n]);
            }
        }
        Ok((e.rel.clone(), hex::encode(&h.finalize()[..16])))
    }
}

/// Below this many bytes in total, a context is hashed on the calling thread.
const PARALLEL_DIGEST_MIN_BYTES: u64 = 8 << 20;

fn join(base: &str, name: &str) -> String {
    if base.is_empty() {
        name.to_string()
    } else {
        format!("{base}/{name}")
    }
}

/// Cleans a path lexically relative to a root: drops leading `/`, `.` and empty components,
/// applies `..`; None when it would climb above the root.
pub fn clean_relative(path: &str) -> Option<String> {
    let mut parts: Vec<&str> = Vec::new();
    for c in path.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                parts.pop()?;
            }
            c => parts.push(c),
        }
    }
    Some(parts.join("/"))
}

/// One path component of a COPY source pattern as a matcher: `*`, `?` and `[…]` match within
/// the component and `\` escapes (Go's `filepath.Match`, as BuildKit).
pub fn component_matcher(component: &str) -> Result<GlobMatcher, globset::Error> {
    Ok(GlobBuilder::new(component)
        .literal_separator(true)
        .backslash_escape(true)
        .build()?
        .compile_matcher())
}

/// The names in the host directory `dir` that `glob` matches, sorted; none when `dir` cannot
/// be read (a pattern may match nothing).
pub fn matching_names(dir: &Path, glob: &GlobMatcher) -> Vec<String> {
    let Ok(read) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut names: Vec<String> = read
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| glob.is_match(n))
        .collect();
    names.sort();
    names
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn ctx() -> (tempfile::TempDir, Context) {
        let d = tempfile::tempdir().unwrap();
        let p = d.path();
        std::fs::create_dir_all(p.join("app/sub")).unwrap();
        std::fs::write(p.join("app/main.py"), "print(1)").unwrap();
        std::fs::write(p.join("app/sub/x.txt"), "x").unwrap();
        std::fs::write(p.join("a.md"), "a").unwrap();
        std::fs::write(p.join("b.md"), "b").unwrap();
        std::fs::write(p.join("secret.key"), "k").unwrap();
        std::fs::write(p.join(".dockerignore"), "*.key\n").unwrap();
        symlink("/etc", p.join("abs")).unwrap();
        symlink("../../..", p.join("up")).unwrap();
        symlink("app", p.join("applink")).unwrap();
        let c = Context::open(p, None).unwrap();
        (d, c)
    }

    #[test]
    fn clean_relative_never_climbs() {
        assert_eq!(clean_relative("/a/./b/../c").as_deref(), Some("a/c"));
        assert_eq!(clean_relative("a/.."), Some(String::new()));
        assert_eq!(clean_relative("../x"), None);
        assert_eq!(clean_relative("a/../../x"), None);
    }

    #[test]
    fn globs_and_ignore() {
        let (_d, c) = ctx();
        assert_eq!(c.resolve("*.md").unwrap(), vec!["a.md", "b.md"]);
        assert!(matches!(c.resolve("*.key"), Err(ContextError::NotFound(_))));
        assert!(matches!(
            c.resolve("secret.key"),
            Err(ContextError::NotFound(_))
        ));
        assert_eq!(c.resolve("app/*.py").unwrap(), vec!["app/main.py"]);
        assert_eq!(c.resolve(".").unwrap(), vec![""]);
        let all: Vec<String> = c.walk("").unwrap().into_iter().map(|e| e.rel).collect();
        assert!(!all.contains(&"secret.key".to_string()));
        assert!(all.contains(&"app/sub/x.txt".to_string()));
    }

    #[test]
    fn sources_stay_inside() {
        let (_d, c) = ctx();
        assert!(matches!(
            c.resolve("../etc/passwd"),
            Err(ContextError::Outside(_))
        ));
        assert!(matches!(c.resolve("up"), Err(ContextError::Outside(_))));
        // An absolute symlink resolves inside the context, where /etc does not exist.
        assert!(matches!(
            c.resolve("abs/passwd"),
            Err(ContextError::NotFound(_))
        ));
        assert_eq!(c.resolve("applink").unwrap(), vec!["app"]);
        // A link whose target goes through another link: both resolve inside the context.
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("secret"), "host").unwrap();
        let p = c.root().to_path_buf();
        symlink(outside.path(), p.join("x")).unwrap();
        symlink("x/secret", p.join("chain")).unwrap();
        symlink("applink/sub/x.txt", p.join("inner")).unwrap();
        assert!(matches!(c.resolve("chain"), Err(ContextError::NotFound(_))));
        assert_eq!(c.resolve("inner").unwrap(), vec!["app/sub/x.txt"]);
        assert_eq!(c.resolve("applink/sub").unwrap(), vec!["app/sub"]);
    }

    #[test]
    fn big_contexts_hash_in_parallel_to_the_same_digests() {
        let (d, c) = ctx();
        for i in 0..12 {
            std::fs::write(d.path().join(format!("big{i}")), vec![i as u8; 1 << 20]).unwrap();
        }
        let e = c.walk("").unwrap();
        let all = c.digest_entries(&e).unwrap();
        assert_eq!(all.len(), e.len());
        for entry in &e {
            let (rel, h) = c.digest_entry(entry).unwrap();
            assert_eq!(all[&rel], h);
        }
    }

    #[test]
    fn digests_ignore_mtime_and_owner_but_see_content() {
        let (d, c) = ctx();
        let e = c.walk("app/main.py").unwrap();
        let a = c.digest_entries(&e).unwrap();
        let f = std::fs::File::options()
            .write(true)
            .open(d.path().join("app/main.py"))
            .unwrap();
        f.set_modified(std::time::SystemTime::UNIX_EPOCH).unwrap();
        let e = c.walk("app/main.py").unwrap();
        assert_eq!(a, c.digest_entries(&e).unwrap());
        // The owner a checkout gave the file never reaches the image (COPY makes it root's).
        std::os::unix::fs::lchown(d.path().join("app/main.py"), Some(1234), Some(5678)).unwrap();
        let e = c.walk("app/main.py").unwrap();
        assert_eq!(a, c.digest_entries(&e).unwrap());
        std::fs::write(d.path().join("app/main.py"), "print(2)").unwrap();
        let e = c.walk("app/main.py").unwrap();
        assert_ne!(a, c.digest_entries(&e).unwrap());
    }
}
