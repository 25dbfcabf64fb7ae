//! Steps that change files through the mounted rootfs: COPY, ADD (local files, archives,
//! URLs, heredocs) and WORKDIR; each is cached and snapshotted like a RUN.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use super::copy;
use super::{BuildError, Engine, StageState, StepPlace};
use crate::digest::Digest;
use crate::plan::{self, CopySource, StepInputs};
use crate::recipe::instructions::{Copy, Instruction};
use crate::rootfs::RootDir;
use crate::sandbox;

impl Engine<'_> {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn copy_step(
        &self,
        stage: usize,
        n: usize,
        st: &mut StageState,
        instr: &Instruction,
        c: &Copy,
        is_add: bool,
        step: crate::progress::Step<'_>,
        deps: &BTreeMap<usize, Arc<StageState>>,
    ) -> Result<(), BuildError> {
        let line = instr.span.start_line;
        let vars = self.vars(st);
        let workdir = st
            .config
            .config
            .working_dir
            .clone()
            .unwrap_or_else(|| "/".to_string());
        let dest_raw = self.expand(&c.dest, &vars, line)?;
        let dest = if dest_raw.starts_with('/') {
            dest_raw.clone()
        } else {
            format!("{}/{}", workdir.trim_end_matches('/'), dest_raw)
        };
        let dest_slash = dest_raw.ends_with('/') || dest_raw == "." || dest_raw.ends_with("/.");
        let chmod = match &c.chmod {
            Some(m) => {
                let m = self.expand(m, &vars, line)?;
                Some(copy::parse_chmod(&m).ok_or_else(|| {
                    self.invalid(line, format!("invalid --chmod={m}: expected an octal mode"))
                })?)
            }
            None => None,
        };
        let chown = match &c.chown {
            Some(o) => Some(self.expand(o, &vars, line)?),
            None => None,
        };
        let exclude = c
            .exclude
            .iter()
            .map(|p| {
                let p = self.expand(p, &vars, line)?;
                globset::GlobBuilder::new(&p)
                    .literal_separator(true)
                    .build()
                    .map(|g| g.compile_matcher())
                    .map_err(|e| self.invalid(line, format!("invalid --exclude={p}: {e}")))
            })
            .collect::<Result<Vec<_>, _>>()?;

        // A copy's result depends on its expanded words, its sources and the chown/chmod, not on
        // the env or ARGs (those are already expanded into the words).
        let mut inputs = StepInputs::default();
        let mut items = Vec::new();
        let mut source_words = Vec::new();
        // Scratch dirs holding downloads; they live until the copy is done.
        let mut downloads = Vec::new();
        let from = c
            .from
            .as_ref()
            .map(|raw| self.plan.stages[stage].copy_sources.get(raw).cloned());
        let from_state: Option<StageState> = match from {
            Some(Some(CopySource::Stage(i))) => Some((*deps[&i]).clone()),
            Some(Some(CopySource::Image(r))) => Some(self.load_image(&r, line)?),
            Some(None) => return Err(self.invalid(line, "unresolved --from")),
            None => None,
        };
        for raw in &c.sources {
            if let Some(name) = raw.strip_prefix("<<") {
                let name = name
                    .trim_start_matches('-')
                    .trim_matches(|ch| ch == '"' || ch == '\'');
                let h = c
                    .heredocs
                    .iter()
                    .find(|h| h.name == name)
                    .ok_or_else(|| self.invalid(line, format!("heredoc {name} has no body")))?;
                let content = if h.expand {
                    expand_heredoc(&h.content, &vars)
                } else {
                    h.content.clone()
                };
                inputs
                    .files
                    .insert(format!("<<{name}"), Digest::of(content.as_bytes()).hex());
                items.push(copy::SourceItem::Inline {
                    name: name.to_string(),
                    content: content.into_bytes(),
                });
                source_words.push(format!("<<{name}"));
                continue;
            }
            let word = self.expand(raw, &vars, line)?;
            if word.starts_with("http://") || word.starts_with("https://") {
                if !is_add || from_state.is_some() {
                    return Err(self.invalid(line, format!("only ADD can download a URL ({word})")));
                }
                let checksum = match &c.checksum {
                    Some(raw) => Some(self.expand(raw, &vars, line)?),
                    None => None,
                };
                let dir = self.store.scratch_dir()?;
                let fetched = crate::fetch::fetch(&word, dir.path(), checksum.as_deref())
                    .map_err(|e| self.step_error(stage, line, e))?;
                inputs.files.insert(word.clone(), fetched.digest.hex());
                items.push(copy::SourceItem::Download {
                    name: fetched.file_name,
                    path: fetched.path,
                    mtime: fetched.mtime,
                });
                source_words.push(word);
                downloads.push(dir);
                continue;
            }
            source_words.push(word.clone());
            match &from_state {
                None => {
                    let rels = self
                        .context
                        .resolve(&word)
                        .map_err(self.context_err(line))?;
                    for rel in rels {
                        let entries = self.context.walk(&rel).map_err(self.context_err(line))?;
                        let digests = self
                            .context
                            .digest_entries(&entries)
                            .map_err(self.context_err(line))?;
                        inputs.files.extend(digests);
                        let keep = c.parents.then(|| copy::kept_path(&word, &rel));
                        items.push(copy::SourceItem::Path { rel, keep });
                    }
                }
                Some(_) => {
                    let rel = crate::context::clean_relative(&word).ok_or_else(|| {
                        self.invalid(line, format!("source {word:?} is outside the root"))
                    })?;
                    let keep = c.parents.then(|| copy::kept_path(&word, &rel));
                    items.push(copy::SourceItem::Path { rel, keep });
                }
            }
        }
        if let Some(fs) = &from_state {
            inputs.from = fs.key.to_string();
        }
        let dest_is_dir = dest_slash || items.len() > 1;
        inputs.instruction = format!(
            "{} {:?} -> {dest} dir={dest_is_dir} chown={chown:?} chmod={chmod:?} exclude={:?} parents={} unpack={:?}",
            if is_add { "ADD" } else { "COPY" },
            source_words,
            c.exclude,
            c.parents,
            c.unpack
        );
        let copy_into = |root: &RootDir, src: Option<&RootDir>| -> Result<(), BuildError> {
            let owner = match &chown {
                Some(spec) => Some(resolve_owner(root, spec).map_err(|m| self.invalid(line, m))?),
                None => None,
            };
            let job = copy::CopyJob {
                from: match src {
                    Some(src) => copy::SourceFs::Rootfs(src),
                    None => copy::SourceFs::Context(&self.context),
                },
                items,
                dest: dest.clone(),
                dest_is_dir,
                chown: owner,
                chmod,
                extract_archives: is_add && c.unpack != Some(false),
                exclude,
                parents: c.parents,
            };
            copy::run(root, &job).map_err(|e| self.step_error(stage, line, e))
        };
        let step_ctx = StepPlace {
            stage,
            n,
            line,
            created_by: instr.text.clone(),
        };
        self.rootfs_step(st, step_ctx, inputs, step, from_state.as_ref(), copy_into)
    }

    /// `WORKDIR`: records the directory and creates it (owned by the current USER) when the
    /// image does not have it yet, as Docker does.
    pub(super) fn workdir_step(
        &self,
        stage: usize,
        n: usize,
        st: &mut StageState,
        instr: &Instruction,
        step: crate::progress::Step<'_>,
    ) -> Result<(), BuildError> {
        let line = instr.span.start_line;
        let dir = st
            .config
            .config
            .working_dir
            .clone()
            .unwrap_or_else(|| "/".to_string());
        let user = st.config.config.user.clone().unwrap_or_default();
        let inputs = StepInputs {
            instruction: format!("WORKDIR {dir}"),
            user: user.clone(),
            ..Default::default()
        };
        let create = |root: &RootDir, _: Option<&RootDir>| -> Result<(), BuildError> {
            if root.metadata(&dir).is_ok() {
                return Ok(());
            }
            let (uid, gid) = match user.as_str() {
                "" => (0, 0),
                spec => resolve_owner(root, spec).map_err(|m| self.invalid(line, m))?,
            };
            root.mkdir_all(&dir, 0o755, uid, gid)
                .map_err(|e| self.step_error(stage, line, format!("creating WORKDIR {dir}: {e}")))
        };
        let step_ctx = StepPlace {
            stage,
            n,
            line,
            created_by: instr.text.clone(),
        };
        self.rootfs_step(st, step_ctx, inputs, step, None, create)
    }

    /// A step that changes files through the mounted rootfs (COPY, ADD, WORKDIR): cache lookup,
    /// then `f` on the mounted rootfs (and on the mounted `--from` source), then the snapshot.
    fn rootfs_step(
        &self,
        st: &mut StageState,
        ctx: StepPlace,
        inputs: StepInputs,
        step: crate::progress::Step<'_>,
        source: Option<&StageState>,
        f: impl FnOnce(&RootDir, Option<&RootDir>) -> Result<(), BuildError> + Send,
    ) -> Result<(), BuildError> {
        let (stage, line) = (ctx.stage, ctx.line);
        let parent = st.key;
        let key = plan::cache_key(&parent, &inputs);
        let Some(step) = self.reuse_cached(st, &ctx, key, &inputs, step)? else {
            return Ok(());
        };
        let (scratch, upper, work) = self.scratch_upper(stage, line)?;
        let lowers: Vec<PathBuf> = st.lower_dirs.iter().rev().cloned().collect();
        let in_dest = |src: Option<&RootDir>| -> Result<(), BuildError> {
            sandbox::with_rootfs(&lowers, &upper, &work, |merged| {
                let root =
                    RootDir::open_host(merged).map_err(|e| self.step_error(stage, line, e))?;
                f(&root, src)
            })
            .map_err(|e| self.step_error(stage, line, e))?
        };
        let result = match source {
            None => in_dest(None),
            Some(fs) => {
                let (_src_scratch, su, sw) = self.scratch_upper(stage, line)?;
                let src_lowers: Vec<PathBuf> = fs.lower_dirs.iter().rev().cloned().collect();
                sandbox::with_rootfs(&src_lowers, &su, &sw, |src_root| {
                    let src = RootDir::open_host(src_root)
                        .map_err(|e| self.step_error(stage, line, e))?;
                    in_dest(Some(&src))
                })
                .map_err(|e| self.step_error(stage, line, e))?
            }
        };
        if let Err(e) = result {
            step.failed();
            return Err(e);
        }
        let result = self.commit_step(st, ctx, parent, key, inputs, &upper, step);
        drop(scratch);
        result
    }

    /// A fresh scratch dir in the store with empty `upper` and `work` dirs for an overlay.
    pub(super) fn scratch_upper(
        &self,
        stage: usize,
        line: usize,
    ) -> Result<(tempfile::TempDir, PathBuf, PathBuf), BuildError> {
        let scratch = self.store.scratch_dir()?;
        let upper = scratch.path().join("upper");
        let work = scratch.path().join("work");
        for d in [&upper, &work] {
            std::fs::create_dir(d).map_err(|e| {
                self.step_error(stage, line, format!("creating {}: {e}", d.display()))
            })?;
        }
        Ok((scratch, upper, work))
    }
}

/// `$NAME` and `${NAME}` substitution for heredoc bodies (quotes are content, not syntax).
fn expand_heredoc(body: &str, vars: &BTreeMap<String, String>) -> String {
    let mut out = String::with_capacity(body.len());
    let mut chars = body.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        if c == '\\' {
            if let Some(&(_, '$')) = chars.peek() {
                out.push('$');
                chars.next();
                continue;
            }
            out.push(c);
            continue;
        }
        if c != '$' {
            out.push(c);
            continue;
        }
        let rest = &body[i + 1..];
        let (name, consumed) = if let Some(inner) = rest.strip_prefix('{') {
            match inner.find('}') {
                Some(end) => (&inner[..end], end + 2),
                None => ("", 0),
            }
        } else {
            let end = rest
                .find(|ch: char| !(ch.is_ascii_alphanumeric() || ch == '_'))
                .unwrap_or(rest.len());
            (&rest[..end], end)
        };
        if name.is_empty() || consumed == 0 {
            out.push('$');
            continue;
        }
        out.push_str(vars.get(name).map(String::as_str).unwrap_or(""));
        for _ in 0..consumed {
            chars.next();
        }
    }
    out
}

/// Resolves `--chown=user[:group]` against the rootfs's own /etc/passwd and /etc/group.
fn resolve_owner(root: &RootDir, spec: &str) -> Result<(u32, u32), String> {
    let read = |p: &str| {
        root.open_read(p).ok().and_then(|mut f| {
            let mut s = String::new();
            std::io::Read::read_to_string(&mut f, &mut s)
                .ok()
                .map(|_| s)
        })
    };
    let passwd = read("/etc/passwd");
    let group = read("/etc/group");
    let (user, grp) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    let resolved = sandbox::users::resolve(user, passwd.as_deref(), group.as_deref())
        .map_err(|e| format!("--chown={spec}: {e}"))?;
    let gid = match grp {
        Some(g) => sandbox::users::resolve_group(g, group.as_deref())
            .map_err(|e| format!("--chown={spec}: {e}"))?,
        // A user alone gives gid = uid when the user is numeric, else the user's primary group.
        None => resolved.gid,
    };
    Ok((resolved.uid, gid))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heredoc_expansion() {
        let vars: BTreeMap<String, String> = [("A".to_string(), "x".to_string())].into();
        assert_eq!(
            expand_heredoc("$A ${A} \\$A $B '$A' $", &vars),
            "x x $A  'x' $"
        );
    }
}
