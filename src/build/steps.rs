//! Steps that change files through the mounted rootfs: COPY, ADD (local files, archives,
//! URLs, heredocs) and WORKDIR; each is cached and snapshotted like a RUN.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use super::named::{self, NamedFiles};
use super::{BuildError, Engine, StageState, StepPlace};
use super::{copy, listed};
use crate::digest::Digest;
use crate::plan::{CopySource, StepInputs};
use crate::recipe::instructions::{Copy, Instruction};
use crate::rootfs::RootDir;
use crate::sandbox;
use crate::snapshot::{self, ListedEntry};

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
                Some(
                    super::chmod::Chmod::parse(&m)
                        .map_err(|e| self.invalid(line, format!("--chmod={m}: {e}")))?,
                )
            }
            None => None,
        };
        // `--chown=${USER}:${GROUP}` with both unset means no --chown at all.
        let chown = match &c.chown {
            Some(o) => Some(self.expand(o, &vars, line)?).filter(|o| !matches!(o.trim(), "" | ":")),
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
        // A named directory context is read like the main context.
        let mut named_dir = None;
        let from_state: Option<StageState> = match from {
            Some(Some(CopySource::Stage(i))) => Some((*deps[&i]).clone()),
            Some(Some(CopySource::Image(r))) => {
                Some(self.load_image(&r, line, &self.plan.stages[stage].platform)?)
            }
            Some(Some(CopySource::Context(name))) => {
                match self.named_files(&name, line, &self.plan.stages[stage].platform)? {
                    NamedFiles::Dir(ctx) => {
                        named_dir = Some(ctx);
                        None
                    }
                    NamedFiles::Image(st) => Some(*st),
                }
            }
            Some(None) => return Err(self.invalid(line, "unresolved --from")),
            None => None,
        };
        let source_ctx = named_dir.unwrap_or(&self.context);
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
                    crate::recipe::shell::Lexer::process_heredoc(&h.content, &vars)
                        .map_err(|e| self.invalid(line, e.to_string()))?
                        .value
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
                let fetched = crate::sources::fetch::fetch(&word, dir.path(), checksum.as_deref())
                    .map_err(|e| self.step_error(stage, line, e))?;
                self.read_download(&word, &fetched.digest);
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
                    // A wildcard that matches nothing copies nothing (BuildKit).
                    let found = match source_ctx.resolve_sources(&word) {
                        Err(crate::sources::context::ContextError::NotFound(_))
                            if copy::has_wildcard(&word) =>
                        {
                            Vec::new()
                        }
                        r => r.map_err(self.context_err(line))?,
                    };
                    for crate::sources::context::Source { matched, rel } in found {
                        // A symlink is copied under its own name (BuildKit follows it and
                        // keeps the name), which is then part of the result.
                        let own_name = matched.rsplit('/').next().unwrap_or(&matched);
                        let name = (rel.rsplit('/').next() != Some(own_name))
                            .then(|| own_name.to_string());
                        if let Some(n) = &name {
                            inputs
                                .files
                                .insert(format!("{matched} -> {rel}"), n.clone());
                        }
                        let digests = match named_dir {
                            Some(ctx) => named::dir_digests(ctx, &rel),
                            // Hashed once for all the platforms built (and all the steps).
                            None => self.context_digests.get_or_try(&rel, || {
                                let entries = self.context.walk(&rel)?;
                                self.context.digest_entries(&entries)
                            }),
                        }
                        .map_err(self.context_err(line))?;
                        self.read_context_files(&digests);
                        inputs.files.extend(digests);
                        let keep = c.parents.then(|| copy::kept_path(&word, &rel));
                        items.push(copy::SourceItem::Path { rel, name, keep });
                    }
                }
                Some(_) => {
                    let rel = crate::sources::context::clean_relative(&word).ok_or_else(|| {
                        self.invalid(line, format!("source {word:?} is outside the root"))
                    })?;
                    if copy::has_wildcard(&rel) {
                        items.push(copy::SourceItem::Pattern {
                            pattern: rel,
                            word: word.clone(),
                        });
                        continue;
                    }
                    let keep = c.parents.then(|| copy::kept_path(&word, &rel));
                    items.push(copy::SourceItem::Path {
                        rel,
                        name: None,
                        keep,
                    });
                }
            }
        }
        if let Some(fs) = &from_state {
            inputs.from = fs.key.to_string();
        }
        // What a `COPY --link` takes from the stage below: looked at only when its cache key
        // needs it (see `rootfs_step`), and then used by the copy.
        let link_base: OnceLock<LinkBase> = OnceLock::new();
        let probe = |below: &StageState| -> Result<String, BuildError> {
            let l = self.probe_link_base(below, &dest, chown.as_deref(), stage, line)?;
            // All that ties the linked layer to the layers below.
            let words = format!(" dirs={:?} owner={:?}", l.dirs, l.owner);
            let _ = link_base.set(l);
            Ok(words)
        };
        // Several sources make the destination a directory even without a trailing slash (as
        // buildah; Docker's classic builder refuses, BuildKit copies each onto the same path).
        let dest_is_dir_here = dest_slash || c.sources.len() > 1 || items.len() > 1;
        let dest_is_dir = || dest_is_dir_here || link_base.get().is_some_and(LinkBase::dest_is_dir);
        inputs.instruction = format!(
            "{} {:?} -> {dest} dir={dest_is_dir_here} chown={chown:?} chmod={chmod:?} exclude={:?} parents={} unpack={:?} link={}",
            if is_add { "ADD" } else { "COPY" },
            source_words,
            c.exclude,
            c.parents,
            c.unpack,
            c.link
        );
        let job_for = |root: &RootDir| -> Result<copy::CopyJob, BuildError> {
            let owner = match (link_base.get(), &chown) {
                (Some(l), _) => l.owner,
                (None, Some(spec)) => {
                    Some(resolve_owner(root, spec).map_err(|m| self.invalid(line, m))?)
                }
                (None, None) => None,
            };
            Ok(copy::CopyJob {
                from: copy::SourceFs::Context(source_ctx),
                items: items.clone(),
                dest: dest.clone(),
                dest_is_dir: dest_is_dir(),
                chown: owner,
                chmod: chmod.clone(),
                extract_archives: is_add && c.unpack != Some(false),
                exclude: exclude.clone(),
                parents: c.parents,
            })
        };
        let copy_into = |root: &RootDir, src: Option<&RootDir>| -> Result<(), BuildError> {
            let job = job_for(root)?.reading_from(src);
            copy::run(root, &job).map_err(|e| self.step_error(stage, line, e))?;
            if let Some(l) = link_base.get() {
                l.restore_dirs(root)
                    .map_err(|e| self.step_error(stage, line, e))?;
            }
            Ok(())
        };
        // When nothing after this step reads the stage's files, a copy can be written into its
        // layer straight from its sources, without creating the files.
        let list = |root: &RootDir,
                    src: Option<&RootDir>,
                    now: i64|
         -> Result<Option<Vec<ListedEntry>>, BuildError> {
            let job = job_for(root)?.reading_from(src);
            listed::listed_copy(root, &job, now).map_err(|e| self.step_error(stage, line, e))
        };
        // (A listed layer reads its files from the main context or the --from source.)
        let listable = !c.link && named_dir.is_none() && self.files_unused_after(stage, n);
        let step_ctx = StepPlace {
            stage,
            n,
            line,
            created_by: instr.text.clone(),
        };
        let layering = match c.link {
            true => Layering::Linked(&probe),
            false => Layering::Stacked,
        };
        let lister: Option<&Lister> = if listable { Some(&list) } else { None };
        self.rootfs_step(
            st,
            step_ctx,
            inputs,
            step,
            (from_state.as_ref(), layering, lister),
            copy_into,
        )
    }

    /// Whether no step after step `n` of `stage` reads or changes the stage's files: the stage
    /// is the build's target (so no other stage builds on it) and only config instructions
    /// follow.
    fn files_unused_after(&self, stage: usize, n: usize) -> bool {
        use crate::recipe::instructions::InstructionKind as K;
        stage == self.plan.target
            && n != usize::MAX
            && self.recipe.stages[stage].instructions[n + 1..]
                .iter()
                .all(|i| {
                    matches!(
                        i.kind,
                        K::Cmd(_)
                            | K::Entrypoint(_)
                            | K::Shell(_)
                            | K::Env(_)
                            | K::Label(_)
                            | K::Expose(_)
                            | K::Volume(_)
                            | K::User(_)
                            | K::Arg(_)
                            | K::Onbuild { .. }
                            | K::Stopsignal(_)
                            | K::Healthcheck(_)
                            | K::Maintainer(_)
                    )
                })
    }

    /// Runs `f` on a view of the stage's files that it must only read.
    fn with_stage_view<T: Send>(
        &self,
        st: &StageState,
        stage: usize,
        line: usize,
        f: impl FnOnce(&RootDir) -> Result<T, BuildError> + Send,
    ) -> Result<T, BuildError> {
        let (_scratch, upper, work) = self.scratch_upper(stage, line)?;
        let lowers = self.lowers(st)?;
        sandbox::with_rootfs(&lowers, &upper, &work, |merged| {
            let root = RootDir::open_host(merged).map_err(|e| self.step_error(stage, line, e))?;
            f(&root)
        })
        .map_err(|e| self.step_error(stage, line, e))?
    }

    /// What a `COPY --link` to `dest` needs from the stage it lands on: the mode and owner of
    /// each directory on the way to `dest` that the stage already has (so the layer does not
    /// reset them, e.g. /tmp's 1777), whether `dest` is a directory there, and `--chown`'s
    /// names as numbers. Looked up once on a read-only view of the stage; nothing else of it
    /// reaches the layer.
    fn probe_link_base(
        &self,
        st: &StageState,
        dest: &str,
        chown: Option<&str>,
        stage: usize,
        line: usize,
    ) -> Result<LinkBase, BuildError> {
        self.with_stage_view(st, stage, line, |root| {
            let mut dirs = Vec::new();
            let mut path = String::new();
            for part in dest.split('/').filter(|p| !p.is_empty() && *p != ".") {
                path.push('/');
                path.push_str(part);
                let found = root.symlink_metadata(&path).ok().map(|m| {
                    use std::os::unix::fs::MetadataExt;
                    let kind = match m.file_type() {
                        t if t.is_dir() => BaseKind::Dir,
                        t if t.is_symlink() => BaseKind::Symlink,
                        _ => BaseKind::Other,
                    };
                    (kind, m.mode() & 0o7777, m.uid(), m.gid())
                });
                dirs.push((path.clone(), found));
            }
            let owner = match chown {
                Some(spec) => Some(resolve_owner(root, spec).map_err(|m| self.invalid(line, m))?),
                None => None,
            };
            Ok(LinkBase { dirs, owner })
        })
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
        self.rootfs_step(
            st,
            step_ctx,
            inputs,
            step,
            (None, Layering::Stacked, None),
            create,
        )
    }

    /// A step that changes files through the mounted rootfs (COPY, ADD, WORKDIR): cache lookup,
    /// then `f` on the mounted rootfs (and on the mounted `--from` source), then the snapshot.
    /// A [`Layering::Linked`] step has `f` write into an empty directory instead, which becomes
    /// the layer as it is.
    pub(super) fn rootfs_step(
        &self,
        st: &mut StageState,
        ctx: StepPlace,
        inputs: StepInputs,
        step: crate::progress::Step<'_>,
        (source, layering, lister): (Option<&StageState>, Layering<'_>, Option<&Lister>),
        f: impl FnOnce(&RootDir, Option<&RootDir>) -> Result<(), BuildError> + Send,
    ) -> Result<(), BuildError> {
        let Layering::Linked(probe) = layering else {
            let key = self.step_key(&st.key, &inputs);
            let found = (st.key, key);
            return self.rootfs_step_at(
                st,
                ctx,
                found,
                inputs,
                step,
                (source, layering, lister),
                f,
            );
        };
        // A linked layer is found by its own inputs, whatever lies below it; but those include
        // what the copy takes from the stage below, which must be looked at (its layers
        // unpacked, fetched where a shared cache only promised them). So the step is first
        // looked up by its alias: its inputs on the stage's key, which fix that look's result.
        // The alias is also the key later steps build on.
        let (below, alias) = (st.key, self.step_key(&st.key, &inputs));
        if self.reuse_if_cached(st, &ctx, (below, alias), &inputs)? {
            step.cached();
            return Ok(());
        }
        let mut own = inputs.clone();
        own.instruction += &probe(st)?;
        let none = Digest::of(super::cache::LINKED_PARENT);
        let found = (none, self.step_key(&none, &own));
        let layers_before = st.layers.len();
        let place = ctx.clone();
        self.rootfs_step_at(st, ctx, found, own, step, (source, layering, lister), f)?;
        let keys = (below, alias, found.1);
        self.record_alias(st, &place, keys, &inputs, layers_before)?;
        st.key = alias;
        Ok(())
    }

    /// [`Engine::rootfs_step`] under the cache key `key` derived from `parent`.
    #[allow(clippy::too_many_arguments)]
    fn rootfs_step_at(
        &self,
        st: &mut StageState,
        ctx: StepPlace,
        (parent, key): (Digest, Digest),
        inputs: StepInputs,
        step: crate::progress::Step<'_>,
        (source, layering, lister): (Option<&StageState>, Layering<'_>, Option<&Lister>),
        f: impl FnOnce(&RootDir, Option<&RootDir>) -> Result<(), BuildError> + Send,
    ) -> Result<(), BuildError> {
        let (stage, line) = (ctx.stage, ctx.line);
        let Some((step, _claim)) = self.reuse_cached(st, &ctx, (parent, key), &inputs, step)?
        else {
            return Ok(());
        };
        if let Some(list) = lister {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs() as i64);
            let origin = match source {
                None => self.context.host_path(""),
                Some(_) => PathBuf::from("the --from source"),
            };
            // The layer is written while the stage (and the source) are still mounted: the
            // listed files are read from there.
            let write = |src: Option<&RootDir>| {
                self.with_stage_view(st, stage, line, |root| match list(root, src, now)? {
                    Some(entries) => self
                        .commit_listed(entries, &origin)
                        .map(Some)
                        .map_err(|e| self.step_error(stage, line, e)),
                    None => Ok(None),
                })
            };
            let written = match source {
                None => write(None),
                Some(fs) => self.with_stage_view(fs, stage, line, |src| write(Some(src))),
            };
            match written {
                Ok(Some(layer)) => {
                    return self.commit_layer(st, ctx, (parent, key), inputs, layer, step);
                }
                Ok(None) => {}
                Err(e) => {
                    step.failed();
                    return Err(e);
                }
            }
        }
        let (scratch, upper, work) = self.scratch_upper(stage, line)?;
        let in_dest = |src: Option<&RootDir>| -> Result<(), BuildError> {
            match layering {
                Layering::Stacked => {
                    let lowers = self.lowers(st)?;
                    sandbox::with_rootfs(&lowers, &upper, &work, |merged| {
                        let root = RootDir::open_host(merged)
                            .map_err(|e| self.step_error(stage, line, e))?;
                        f(&root, src)
                    })
                    .map_err(|e| self.step_error(stage, line, e))?
                }
                Layering::Linked(_) => {
                    let root =
                        RootDir::open_host(&upper).map_err(|e| self.step_error(stage, line, e))?;
                    f(&root, src)
                }
            }
        };
        let result = match source {
            None => in_dest(None),
            Some(fs) => self.with_stage_view(fs, stage, line, |src| in_dest(Some(src))),
        };
        if let Err(e) = result {
            step.failed();
            return Err(e);
        }
        let none = snapshot::Precompressed::default();
        let result = self.commit_step(st, ctx, parent, key, inputs, (&upper, &none), step);
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

/// Tells a step's layer as a list of entries, given read-only views of the stage and of the
/// `--from` source (if any) and the time of the step; `None` when the step must be run to
/// know.
type Lister<'a> = dyn Fn(&RootDir, Option<&RootDir>, i64) -> Result<Option<Vec<ListedEntry>>, BuildError>
    + Sync
    + 'a;

/// What a `COPY --link` takes from the stage below it, looked at on a read-only view of the
/// stage: returned as the words its own cache key adds to the step's inputs.
type LinkProbe<'a> = dyn Fn(&StageState) -> Result<String, BuildError> + Sync + 'a;

/// How a rootfs step's changes become a layer.
#[derive(Clone, Copy)]
pub(super) enum Layering<'a> {
    /// Written over the stage's rootfs (overlayfs); the layer is the overlay's upper dir.
    Stacked,
    /// `COPY --link`: written into an empty directory, which is the layer, cached by the step's
    /// own inputs and what the probe takes from the stage below, whatever else lies there.
    Linked(&'a LinkProbe<'a>),
}

/// What a path on the way to a `COPY --link` destination is in the stage below.
#[derive(Clone, Copy, Debug, PartialEq)]
enum BaseKind {
    Dir,
    Symlink,
    Other,
}

/// A path's kind, mode, uid and gid in the stage below a `COPY --link`.
type BaseEntry = (BaseKind, u32, u32, u32);

/// What a `COPY --link` takes from the stage it lands on (see `probe_link_base`).
struct LinkBase {
    /// Each path from the root to the destination, with what the stage has there.
    dirs: Vec<(String, Option<BaseEntry>)>,
    /// `--chown`, resolved against the stage's /etc/passwd and /etc/group.
    owner: Option<(u32, u32)>,
}

impl LinkBase {
    /// The destination is a directory in the stage.
    fn dest_is_dir(&self) -> bool {
        matches!(self.dirs.last(), Some((_, Some((BaseKind::Dir, ..)))))
    }

    /// Gives the directories the copy created on the way to the destination the mode and owner
    /// the stage has for them, so stacking the layer leaves them as they were.
    fn restore_dirs(&self, root: &RootDir) -> Result<(), crate::rootfs::RootfsError> {
        for (path, found) in &self.dirs {
            if let Some((BaseKind::Dir, mode, uid, gid)) = found
                && root.symlink_metadata(path).is_ok_and(|m| m.is_dir())
            {
                root.lchown(path, *uid, *gid)?;
                root.chmod(path, *mode)?;
            }
        }
        Ok(())
    }
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
        Some((u, g)) if !g.is_empty() => (u, Some(g)),
        Some((u, _)) => (u, None),
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
