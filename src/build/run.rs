//! RUN steps: the argv (shell form, exec form, heredocs), the environment a step sees, its
//! `--mount`s, and running it in the sandbox.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::config::{DEFAULT_PATH, command_argv, get_env, set_env};
use super::named::NamedFiles;
use super::{BuildError, Engine, StageState, StepPlace, copy};
use crate::plan::{self, CopySource, StepInputs};
use crate::recipe::instructions::{CommandLine, Instruction, Run};
use crate::rootfs::RootDir;
use crate::sandbox::{self, BindMount, BindSource, NetworkMode, RunSpec, Security, TreeSource};
use crate::snapshot;
use crate::sources::context::Context;
use crate::store::CacheRoot;

/// Where a `--secret` comes from.
#[derive(Clone, PartialEq, Eq)]
pub enum SecretSource {
    /// A file on the host (`src=PATH`), read when a step uses it.
    File(PathBuf),
    /// A value taken from the environment (`env=VAR`) when the build started.
    Value(Vec<u8>),
}

impl std::fmt::Debug for SecretSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SecretSource::File(p) => f.debug_tuple("File").field(p).finish(),
            SecretSource::Value(_) => f.write_str("Value(<redacted>)"),
        }
    }
}

/// Largest secret a step may get (BuildKit's limit).
pub const MAX_SECRET_BYTES: u64 = 500 * 1024;

/// A RUN mount, as the sandbox gets it.
enum RunMount<'a> {
    /// A bind mount of a host directory (a cache dir, a tmpfs's scratch dir).
    Bind(BindMount),
    /// Files of a stage, an image or a context, made ready only if the step runs (unpacking
    /// layers, fetching those a shared cache promised, copying a context through its ignore
    /// file): the cache lookup needs only `identity`, which names their content (another
    /// stage's key, the context files' digest) for the step's cache key.
    Files {
        mount: FilesMount<'a>,
        identity: Option<String>,
    },
    /// A cache mount's persistent directory, made (and locked, as `sharing=` asks) only if
    /// the step runs.
    Cache(CacheMount),
    /// A forwarded ssh-agent socket; the step's `SSH_AUTH_SOCK` names the first one.
    Agent(BindMount),
    /// A secret: a private copy of it bound as a file, and/or an environment variable of the
    /// step.
    Secret {
        bind: Option<BindMount>,
        env: Option<(String, String)>,
    },
    /// An optional mount whose source was not given (`type=ssh` without `--ssh`).
    Skipped,
}

impl RunMount<'_> {
    fn host(source: PathBuf, target: String, readonly: bool) -> RunMount<'static> {
        RunMount::Bind(BindMount {
            source: BindSource::Host(source),
            target,
            readonly,
        })
    }
}

/// A mount of files named by `from=` (or of the context), before they are made ready.
enum FilesMount<'a> {
    /// `type=bind`: `path` inside the files at `target`.
    Bind {
        files: MountFiles<'a>,
        path: String,
        target: String,
        readonly: bool,
    },
    /// `type=cache,from=…`: the cache dir of `id`, seeded on first use with a copy of `source`
    /// inside the files.
    SeededCache {
        files: MountFiles<'a>,
        id: String,
        source: String,
        target: String,
        readonly: bool,
    },
}

/// `RUN --mount=type=cache` without `from=`.
struct CacheMount {
    id: String,
    /// The owner and mode of the directory when it is created.
    root: CacheRoot,
    sharing: Sharing,
    target: String,
    readonly: bool,
}

/// How steps share a cache mount (`sharing=`), as in BuildKit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Sharing {
    /// Any number of steps use the directory at once (the default).
    Shared,
    /// A step that finds the directory in use gets an empty one of its own, thrown away after.
    Private,
    /// A step waits until no other step uses the directory.
    Locked,
}

/// A number of a mount option (`uid=`, `gid=`, `mode=`), `default` when absent.
fn mount_number(
    fields: &BTreeMap<&str, &str>,
    key: &str,
    default: u32,
    radix: u32,
) -> Result<u32, String> {
    match fields.get(key) {
        None => Ok(default),
        Some(v) => u32::from_str_radix(v, radix).map_err(|_| format!("invalid {key}={v}")),
    }
}

impl Engine<'_> {
    /// The environment a RUN step sees: image env, ARGs in scope (ENV wins), proxy build args.
    fn run_env(&self, st: &StageState) -> Vec<(String, String)> {
        let mut env: Vec<String> = st.config.config.env.clone();
        for (k, v) in &st.args {
            if get_env(&env, k).is_none() {
                set_env(&mut env, k, v);
            }
        }
        for k in plan::PROXY_ARGS {
            if let Some(v) = self.opts.build_args.get(k)
                && get_env(&env, k).is_none()
            {
                set_env(&mut env, k, v);
            }
        }
        if get_env(&env, "PATH").is_none() {
            set_env(&mut env, "PATH", DEFAULT_PATH);
        }
        let user = st.config.config.user.as_deref().unwrap_or("");
        if get_env(&env, "HOME").is_none()
            && matches!(user.split(':').next(), Some("" | "root" | "0"))
        {
            set_env(&mut env, "HOME", "/root");
        }
        env.into_iter()
            .filter_map(|e| {
                e.split_once('=')
                    .map(|(k, v)| (k.to_string(), v.to_string()))
            })
            .collect()
    }

    /// What a RUN's result depends on besides its parent: the command, the image env, the
    /// ARGs in scope (a RUN sees them all), user, workdir and shell.
    fn run_inputs(&self, st: &StageState, instruction: String) -> StepInputs {
        StepInputs {
            instruction,
            env: st
                .config
                .config
                .env
                .iter()
                .filter_map(|e| {
                    e.split_once('=')
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                })
                .collect(),
            args: st.args.clone(),
            user: st.config.config.user.clone().unwrap_or_default(),
            workdir: st.config.config.working_dir.clone().unwrap_or_default(),
            shell: st.shell.clone(),
            ..Default::default()
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn run_step(
        &self,
        stage: usize,
        n: usize,
        st: &mut StageState,
        instr: &Instruction,
        run: &Run,
        step: crate::progress::Step<'_>,
        deps: &BTreeMap<usize, Arc<StageState>>,
    ) -> Result<(), BuildError> {
        let line = instr.span.start_line;
        let (argv, stdin) = run_argv(run, &st.shell);
        let mut network = self.opts.network;
        if let Some(net) = &run.network {
            network = match net.as_str() {
                "none" => NetworkMode::None,
                "host" | "default" => NetworkMode::Host,
                other => {
                    return Err(self.invalid(line, format!("unsupported RUN --network={other}")));
                }
            };
        }
        let security = match run.security.as_deref() {
            None | Some("sandbox") => Security::Sandbox(self.opts.seccomp.clone()),
            Some("insecure") if self.opts.allow_insecure => Security::Insecure,
            Some("insecure") => {
                return Err(self.invalid(
                    line,
                    "RUN --security=insecure is not allowed: pass --allow security.insecure to \
                     let it run with every capability and no seccomp filter",
                ));
            }
            Some(other) => {
                return Err(self.invalid(
                    line,
                    format!("RUN --security={other}: expected sandbox or insecure"),
                ));
            }
        };
        let vars = self.vars(st);
        let mut mounts = Vec::new();
        let mut identities: Vec<String> = Vec::new();
        let mut _mount_scratch = Vec::new();
        let mut agents = 0;
        let workdir = st.config.config.working_dir.clone().unwrap_or_default();
        for m in &run.mounts {
            let expanded = self.expand(m, &vars, line)?;
            let at = (agents, workdir.as_str());
            let (mount, scratch) = self.run_mount(stage, m, &expanded, line, deps, at)?;
            _mount_scratch.extend(scratch);
            match &mount {
                RunMount::Files { identity, .. } => identities.extend(identity.clone()),
                RunMount::Agent(_) => agents += 1,
                _ => {}
            }
            mounts.push(mount);
        }
        let mut inputs = self.run_inputs(
            st,
            format!("RUN {}", serde_json::to_string(&argv).unwrap_or_default()),
        );
        if !run.mounts.is_empty() {
            inputs
                .instruction
                .push_str(&format!(" mounts={:?}", run.mounts));
        }
        inputs.from = identities.join("\n");
        if security == Security::Insecure {
            inputs.instruction.push_str(" security=insecure");
        }
        let parent = st.key;
        let key = self.step_key(&parent, &inputs);
        let used_args: Vec<&str> = st.args.keys().map(String::as_str).collect();
        let created_by = if used_args.is_empty() {
            format!("RUN {}", argv.join(" "))
        } else {
            format!(
                "RUN |{} {} {}",
                used_args.len(),
                used_args.join(" "),
                argv.join(" ")
            )
        };
        let place = StepPlace {
            stage,
            n,
            line,
            created_by,
        };
        let Some((mut step, _claim)) =
            self.reuse_cached(st, &place, (parent, key), &inputs, step)?
        else {
            return Ok(());
        };
        // The step runs: its mounts' files are made ready now, in their order.
        let mut binds = Vec::new();
        let mut agent_sockets: Vec<String> = Vec::new();
        let mut secret_env = Vec::new();
        let mut _cache_locks = Vec::new();
        for mount in mounts {
            match mount {
                RunMount::Bind(bind) => binds.push(bind),
                RunMount::Files { mount, .. } => {
                    let (bind, scratch) = self.ready_mount(mount, stage, line)?;
                    binds.push(bind);
                    _mount_scratch.extend(scratch);
                }
                RunMount::Secret { bind, env } => {
                    binds.extend(bind);
                    secret_env.extend(env);
                }
                RunMount::Agent(bind) => {
                    agent_sockets.push(bind.target.clone());
                    binds.push(bind);
                }
                RunMount::Cache(cache) => {
                    let (bind, scratch, lock) = self.ready_cache(cache)?;
                    binds.push(bind);
                    _mount_scratch.extend(scratch);
                    _cache_locks.extend(lock);
                }
                RunMount::Skipped => {}
            }
        }
        let (scratch, upper, work) = self.scratch_upper(stage, line)?;
        let speculation = self.speculate(&upper, scratch.path());
        let spec = RunSpec {
            lower_dirs: self.lowers(st)?,
            upper_dir: upper.clone(),
            work_dir: work,
            argv: argv.clone(),
            env: {
                let mut env = self.run_env(st);
                if let Some(sock) = agent_sockets.first() {
                    env.push(("SSH_AUTH_SOCK".to_string(), sock.clone()));
                }
                for (name, value) in secret_env {
                    env.retain(|(k, _)| *k != name);
                    env.push((name, value));
                }
                env
            },
            cwd: st
                .config
                .config
                .working_dir
                .clone()
                .filter(|w| !w.is_empty())
                .unwrap_or_else(|| "/".to_string()),
            user: st.config.config.user.clone().unwrap_or_default(),
            hostname: "kiln".to_string(),
            network,
            stdin,
            binds,
            security,
            extra_hosts: self.opts.add_hosts.clone(),
        };
        let result = self
            .sandbox
            .run(&spec, &mut |bytes| step.output(bytes), self.cancel);
        let pre = speculation.map(snapshot::Speculation::finish);
        let code = match result {
            Ok(code) => code,
            Err(sandbox::SandboxError::Cancelled) => {
                step.failed();
                return Err(BuildError::Cancelled);
            }
            Err(sandbox::SandboxError::LimitReached(hit)) => {
                step.failed();
                return Err(BuildError::StepKilled {
                    stage: self.stage_name(stage),
                    file: self.file.clone(),
                    line,
                    command: instr.text.clone(),
                    cause: hit.to_string(),
                });
            }
            Err(e) => {
                step.failed();
                return Err(self.step_error(stage, line, e));
            }
        };
        if code != 0 {
            step.failed();
            return Err(BuildError::StepFailed {
                stage: self.stage_name(stage),
                file: self.file.clone(),
                line,
                command: instr.text.clone(),
                code,
            });
        }
        let pre = pre.unwrap_or_default();
        self.commit_step(st, place, parent, key, inputs, (&upper, &pre), step)
    }

    /// Starts compressing the step's big output files on idle CPU while it runs (gzip layers,
    /// several cores); `None` when that cannot help or cannot start.
    fn speculate(&self, upper: &Path, scratch: &Path) -> Option<snapshot::Speculation> {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        if self.opts.compression != snapshot::Compression::Gzip || cores < 2 {
            return None;
        }
        let spool = scratch.join("spool");
        std::fs::create_dir(&spool).ok()?;
        snapshot::Speculation::start(upper, &spool).ok()
    }

    /// One `RUN --mount=…` as a bind mount for the sandbox. Supported types:
    /// `secret` (a `--secret` file, read-only, default target `/run/secrets/ID`), `cache` (a
    /// directory kept in the store across builds, by `id`, default the target), `tmpfs` (an
    /// empty directory discarded after the step), `bind` (a context path, read-only, or a
    /// stage's or image's files) and `ssh` (an `--ssh` agent socket, default target
    /// `/run/buildkit/ssh_agent.N` with N = `index`, skipped when not given unless `required`).
    /// A relative target is relative to `workdir`. The returned scratch dir, if any, must live
    /// until the step ends.
    fn run_mount(
        &self,
        stage: usize,
        raw: &str,
        spec: &str,
        line: usize,
        deps: &BTreeMap<usize, Arc<StageState>>,
        (index, workdir): (usize, &str),
    ) -> Result<(RunMount<'_>, Vec<tempfile::TempDir>), BuildError> {
        let mut fields: BTreeMap<&str, &str> = BTreeMap::new();
        for field in spec.split(',').filter(|f| !f.is_empty()) {
            let (k, v) = field.split_once('=').unwrap_or((field, ""));
            let k = match k {
                "dst" | "destination" => "target",
                "src" => "source",
                "readonly" => "ro",
                k => k,
            };
            fields.insert(k, v);
        }
        let kind = fields.get("type").copied().unwrap_or("bind");
        let target = fields.get("target").map(|t| match t.starts_with('/') {
            true => t.to_string(),
            false => format!("{}/{t}", workdir.trim_end_matches('/')),
        });
        let need_target = || {
            target
                .clone()
                .filter(|t| t.starts_with('/'))
                .ok_or_else(|| {
                    self.invalid(
                        line,
                        format!("RUN --mount type={kind} needs an absolute target="),
                    )
                })
        };
        match kind {
            "secret" => self.secret_mount(&fields, target, line),
            "ssh" => {
                if let Some(opt) = ["uid", "gid", "mode"]
                    .iter()
                    .find(|o| fields.contains_key(**o))
                {
                    return Err(self.invalid(
                        line,
                        format!(
                            "RUN --mount=type=ssh,{opt}= is not supported: the agent socket is \
                             bound as it is (reachable by root in the step)"
                        ),
                    ));
                }
                let id = fields.get("id").copied().unwrap_or("default");
                let required = fields
                    .get("required")
                    .is_some_and(|v| v.is_empty() || *v == "true");
                let target = target.unwrap_or_else(|| format!("/run/buildkit/ssh_agent.{index}"));
                match self.opts.ssh.get(id) {
                    Some(socket) => Ok((
                        RunMount::Agent(BindMount {
                            source: BindSource::Host(socket.clone()),
                            target,
                            readonly: false,
                        }),
                        Vec::new(),
                    )),
                    None if required => Err(self.invalid(
                        line,
                        format!("ssh agent {id:?} was not forwarded: pass --ssh {id}[=SOCKET]"),
                    )),
                    None => Ok((RunMount::Skipped, Vec::new())),
                }
            }
            "cache" => {
                let target = need_target()?;
                let id = fields
                    .get("id")
                    .map(|s| s.to_string())
                    .unwrap_or_else(|| target.clone());
                let readonly = fields.contains_key("ro");
                if !has_from(&fields) {
                    let number = |key, default, radix| {
                        mount_number(&fields, key, default, radix)
                            .map_err(|m| self.invalid(line, format!("RUN --mount=type=cache: {m}")))
                    };
                    let root = CacheRoot {
                        uid: number("uid", 0, 10)?,
                        gid: number("gid", 0, 10)?,
                        mode: number("mode", 0o755, 8)?,
                    };
                    let sharing = match fields.get("sharing").copied().unwrap_or("shared") {
                        "shared" => Sharing::Shared,
                        "private" => Sharing::Private,
                        "locked" => Sharing::Locked,
                        other => {
                            return Err(self.invalid(
                                line,
                                format!(
                                    "RUN --mount=type=cache: sharing={other} is not one of shared, private, locked"
                                ),
                            ));
                        }
                    };
                    let cache = CacheMount {
                        id,
                        root,
                        sharing,
                        target,
                        readonly,
                    };
                    return Ok((RunMount::Cache(cache), Vec::new()));
                }
                let mount = FilesMount::SeededCache {
                    files: self.mount_files(stage, raw, &fields, line, deps)?,
                    id,
                    source: fields.get("source").copied().unwrap_or("/").to_string(),
                    target,
                    readonly,
                };
                let identity = None;
                Ok((RunMount::Files { mount, identity }, Vec::new()))
            }
            "tmpfs" => {
                let target = need_target()?;
                let scratch = self.store.scratch_dir()?;
                Ok((
                    RunMount::host(scratch.path().to_path_buf(), target, false),
                    vec![scratch],
                ))
            }
            "bind" => {
                let target = need_target()?;
                let readonly = !fields
                    .get("rw")
                    .is_some_and(|v| v.is_empty() || *v == "true");
                let source = fields.get("source").copied().unwrap_or("/");
                // The files of a stage, an image or the context: `source` is resolved inside
                // them by the sandbox, and a writable bind gets a throwaway upper layer.
                let files = self.mount_files(stage, raw, &fields, line, deps)?;
                let identity = match &files {
                    MountFiles::State(state) => state.key.to_string(),
                    MountFiles::Dir(ctx) => self.context_identity(ctx, source, line)?,
                };
                let mount = FilesMount::Bind {
                    files,
                    path: source.to_string(),
                    target,
                    readonly,
                };
                let identity = Some(identity);
                Ok((RunMount::Files { mount, identity }, Vec::new()))
            }
            other => Err(self.invalid(
                line,
                format!(
                    "RUN --mount type={other} is not supported (secret, ssh, cache, tmpfs, bind)"
                ),
            )),
        }
    }

    /// The files a mount's `from=` names: a stage's, an image's or a named context's; the
    /// build context without one (or with an empty one, which names the context).
    fn mount_files(
        &self,
        stage: usize,
        raw: &str,
        fields: &BTreeMap<&str, &str>,
        line: usize,
        deps: &BTreeMap<usize, Arc<StageState>>,
    ) -> Result<MountFiles<'_>, BuildError> {
        let (Some(raw_from), true) = (plan::mount_from(raw), has_from(fields)) else {
            return Ok(MountFiles::Dir(&self.context));
        };
        let platform = &self.plan.stages[stage].platform;
        match self.plan.stages[stage].copy_sources.get(raw_from) {
            Some(CopySource::Stage(i)) => Ok(MountFiles::State(Box::new((*deps[i]).clone()))),
            Some(CopySource::Image(r)) => self
                .load_image(r, line, platform)
                .map(|st| MountFiles::State(Box::new(st))),
            Some(CopySource::Context(name)) => match self.named_files(name, line, platform)? {
                NamedFiles::Image(st) => Ok(MountFiles::State(st)),
                NamedFiles::Dir(ctx) => Ok(MountFiles::Dir(ctx)),
            },
            None => Err(self.invalid(line, format!("unresolved from={raw_from}"))),
        }
    }

    /// The identity of the context files a bind mount shows (`source` resolved inside the
    /// context, then every entry below it), so that the step re-runs when they change.
    fn context_identity(
        &self,
        context: &Context,
        source: &str,
        line: usize,
    ) -> Result<String, BuildError> {
        let not_found = |e: &dyn std::fmt::Display| {
            self.invalid(
                line,
                format!("RUN --mount=type=bind,source={source}: not found in the context ({e})"),
            )
        };
        let root = RootDir::open_host(context.root()).map_err(|e| not_found(&e))?;
        let root_path = root.resolve(".").map_err(|e| not_found(&e))?;
        let resolved = root.resolve(source).map_err(|e| not_found(&e))?;
        let rel = resolved
            .strip_prefix(&root_path)
            .map_err(|e| not_found(&e))?
            .to_str()
            .ok_or_else(|| not_found(&"the path is not UTF-8"))?;
        let entries = context.walk(rel).map_err(|e| not_found(&e))?;
        let digests = context
            .digest_entries(&entries)
            .map_err(self.context_err(line))?;
        let json = serde_json::to_vec(&digests).unwrap_or_default();
        Ok(format!("context {}", crate::digest::Digest::of(&json)))
    }

    /// A cache mount's directory, created with its owner and mode on first use, and locked
    /// as its `sharing=` asks: the bind, a throwaway directory (`private`, when the cache is in
    /// use), the lock to hold until the step ends.
    fn ready_cache(
        &self,
        cache: CacheMount,
    ) -> Result<(BindMount, Option<tempfile::TempDir>, Option<std::fs::File>), BuildError> {
        let dir = self.store.cache_mount_dir(&cache.id, cache.root)?;
        let (dir, scratch, lock) = match cache.sharing {
            Sharing::Shared => (dir, None, None),
            Sharing::Locked => {
                let lock = self.store.lock_cache_mount(&dir, true)?;
                (dir, None, lock)
            }
            Sharing::Private => match self.store.lock_cache_mount(&dir, false)? {
                Some(lock) => (dir, None, Some(lock)),
                None => {
                    let own = self.store.scratch_dir()?;
                    cache.root.apply(own.path())?;
                    (own.path().to_path_buf(), Some(own), None)
                }
            },
        };
        let bind = BindMount {
            source: BindSource::Host(dir),
            target: cache.target,
            readonly: cache.readonly,
        };
        Ok((bind, scratch, lock))
    }

    /// Makes a mount's files ready for its step, which is about to run: the bind of a tree
    /// (the stage's layers unpacked, a context through its ignore file), or the seeded cache
    /// dir. The scratch dirs returned must live until the step ends.
    fn ready_mount(
        &self,
        mount: FilesMount<'_>,
        stage: usize,
        line: usize,
    ) -> Result<(BindMount, Vec<tempfile::TempDir>), BuildError> {
        match mount {
            FilesMount::Bind {
                files,
                path,
                target,
                readonly,
            } => {
                let (layers, view) = self.mount_layers(&files, stage, line)?;
                let scratch = self.store.scratch_dir()?;
                let bind = BindMount {
                    source: BindSource::Tree(TreeSource {
                        layers,
                        path,
                        scratch: scratch.path().to_path_buf(),
                    }),
                    target,
                    readonly,
                };
                Ok((bind, std::iter::once(scratch).chain(view).collect()))
            }
            FilesMount::SeededCache {
                files,
                id,
                source,
                target,
                readonly,
            } => {
                let dir = self.seeded_cache_dir(&id, &files, &source, stage, line)?;
                let bind = BindMount {
                    source: BindSource::Host(dir),
                    target,
                    readonly,
                };
                Ok((bind, Vec::new()))
            }
        }
    }

    /// The layer dirs of a mount's files, top first: a stage's or an image's (unpacked, and
    /// fetched first where a shared cache promised them), or a view of a context directory
    /// (with the scratch dir holding it while it is used).
    fn mount_layers(
        &self,
        files: &MountFiles<'_>,
        stage: usize,
        line: usize,
    ) -> Result<(Vec<PathBuf>, Option<tempfile::TempDir>), BuildError> {
        match files {
            MountFiles::State(state) => Ok((self.lowers(state)?, None)),
            MountFiles::Dir(ctx) => {
                let (view, scratch) = self.dir_mount_view(ctx, stage, line)?;
                Ok((vec![view], scratch))
            }
        }
    }

    /// The directory of a `type=cache` mount seeded `from=` a stage, an image or a context: on
    /// first use, a copy of `source` in those files (owners and modes kept); kept across
    /// builds like any cache, under an id that also names the seed.
    fn seeded_cache_dir(
        &self,
        id: &str,
        files: &MountFiles<'_>,
        source: &str,
        stage: usize,
        line: usize,
    ) -> Result<PathBuf, BuildError> {
        let seed_key = match files {
            MountFiles::State(state) => state.key.to_string(),
            MountFiles::Dir(ctx) => self.context_identity(ctx, source, line)?,
        };
        let id = format!("{id}\nfrom={seed_key}\nsource={source}");
        if let Some(dir) = self.store.existing_cache_mount_dir(&id) {
            return Ok(dir);
        }
        let (lowers, _view) = self.mount_layers(files, stage, line)?;
        let scratch = self.store.scratch_dir()?;
        let seed = scratch.path().join("seed");
        let failed = |e: &dyn std::fmt::Display| {
            self.step_error(
                stage,
                line,
                format!("seeding the cache mount from {source}: {e}"),
            )
        };
        std::fs::create_dir(&seed).map_err(|e| failed(&e))?;
        let (_view_scratch, upper, work) = self.scratch_upper(stage, line)?;
        sandbox::with_rootfs(&lowers, &upper, &work, |merged| {
            let src = RootDir::open_host(merged).map_err(|e| failed(&e))?;
            let meta = src.metadata(source).map_err(|e| failed(&e))?;
            if !meta.is_dir() {
                return Err(failed(&"not a directory"));
            }
            let dest = RootDir::open_host(&seed).map_err(|e| failed(&e))?;
            let job = copy::CopyJob::tree(copy::SourceFs::Rootfs(&src), source);
            copy::run(&dest, &job).map_err(|e| failed(&e))?;
            use std::os::unix::fs::{MetadataExt, PermissionsExt};
            std::os::unix::fs::lchown(&seed, Some(meta.uid()), Some(meta.gid()))
                .and_then(|()| {
                    std::fs::set_permissions(&seed, std::fs::Permissions::from_mode(meta.mode()))
                })
                .map_err(|e| failed(&e))
        })
        .map_err(|e| failed(&e))??;
        Ok(self.store.adopt_cache_mount_dir(&id, &seed)?)
    }
}

impl Engine<'_> {
    /// `RUN --mount=type=secret`: the `--secret` named by `id=` (else `source=`, else the
    /// target's file name) as a private read-only copy at `target` (default
    /// `/run/secrets/ID`, none when only `env=` is given; mode `0400` and owner `0:0` unless
    /// `mode=`/`uid=`/`gid=`), and/or as the environment variable `env=` of this step only.
    /// A secret that was not given is skipped unless `required=true` (as in BuildKit).
    fn secret_mount(
        &self,
        fields: &BTreeMap<&str, &str>,
        target: Option<String>,
        line: usize,
    ) -> Result<(RunMount<'static>, Vec<tempfile::TempDir>), BuildError> {
        let id = fields
            .get("id")
            .or_else(|| fields.get("source"))
            .map(|s| s.to_string())
            .or_else(|| {
                target
                    .as_ref()
                    .and_then(|t| t.rsplit('/').next().map(str::to_string))
            })
            .filter(|id| !id.is_empty())
            .ok_or_else(|| self.invalid(line, "RUN --mount=type=secret needs id= or target="))?;
        let env = fields
            .get("env")
            .filter(|e| !e.is_empty())
            .map(|e| e.to_string());
        let target = match (target, &env) {
            (Some(t), _) => Some(t),
            (None, Some(_)) => None,
            (None, None) => Some(format!(
                "/run/secrets/{}",
                id.rsplit('/').next().unwrap_or(&id)
            )),
        };
        let required = fields
            .get("required")
            .is_some_and(|v| v.is_empty() || *v == "true");
        let number = |key, default, radix| {
            mount_number(fields, key, default, radix)
                .map_err(|m| self.invalid(line, format!("RUN --mount=type=secret: {m}")))
        };
        let (mode, uid, gid) = (
            number("mode", 0o400, 8)?,
            number("uid", 0, 10)?,
            number("gid", 0, 10)?,
        );
        let Some(source) = self.opts.secrets.get(&id) else {
            if required {
                return Err(self.invalid(
                    line,
                    format!(
                        "secret {id:?} is required but was not given: pass --secret id={id},src=PATH (or env=VAR)"
                    ),
                ));
            }
            self.progress.warn(&format!(
                "{}:{line}: secret {id:?} was not given; the step runs without it",
                self.file
            ));
            return Ok((RunMount::Skipped, Vec::new()));
        };
        let value = match source {
            SecretSource::Value(v) => v.clone(),
            SecretSource::File(path) => {
                let too_big = std::fs::metadata(path).is_ok_and(|m| m.len() > MAX_SECRET_BYTES);
                if too_big {
                    return Err(self.invalid(
                        line,
                        format!("secret {id:?} is bigger than {MAX_SECRET_BYTES} bytes"),
                    ));
                }
                std::fs::read(path).map_err(|e| {
                    self.invalid(
                        line,
                        format!("reading secret {id:?} from {}: {e}", path.display()),
                    )
                })?
            }
        };
        let env = env.map(|name| (name, String::from_utf8_lossy(&value).into_owned()));
        let Some(target) = target else {
            return Ok((RunMount::Secret { bind: None, env }, Vec::new()));
        };
        // A copy only root can reach (the scratch dir is private), with the owner and mode the
        // step is to see, whatever the host file's.
        let scratch = self.store.scratch_dir()?;
        let file = scratch.path().join("secret");
        let write = || -> std::io::Result<()> {
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&file)?;
            f.write_all(&value)?;
            std::os::unix::fs::fchown(&f, Some(uid), Some(gid))?;
            f.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(mode & 0o7777))
        };
        write().map_err(|e| self.invalid(line, format!("preparing secret {id:?}: {e}")))?;
        let bind = BindMount {
            source: BindSource::Host(file),
            target,
            readonly: true,
        };
        Ok((
            RunMount::Secret {
                bind: Some(bind),
                env,
            },
            vec![scratch],
        ))
    }
}

/// The argv and stdin for a RUN: exec form as is; shell form through the SHELL, with heredoc
/// bodies appended for the shell to read; a lone `<<EOF` runs its body as the script (through
/// its `#!` interpreter when it has one).
fn run_argv(run: &Run, shell: &[String]) -> (Vec<String>, Option<Vec<u8>>) {
    match &run.command {
        CommandLine::Exec(v) => (v.clone(), None),
        CommandLine::Shell(s) => {
            if run.heredocs.is_empty() {
                return (command_argv(&run.command, shell), None);
            }
            let lone = run.heredocs.len() == 1 && run.heredocs[0].fd.is_none() && {
                let t = s.trim();
                t.starts_with("<<") && !t.contains(char::is_whitespace)
            };
            if lone {
                let body = &run.heredocs[0].content;
                if let Some(first) = body.strip_prefix("#!") {
                    let interp: Vec<String> = first
                        .lines()
                        .next()
                        .unwrap_or("")
                        .split_whitespace()
                        .map(str::to_string)
                        .collect();
                    if !interp.is_empty() {
                        let mut argv = interp;
                        argv.push("/dev/stdin".to_string());
                        return (argv, Some(body.as_bytes().to_vec()));
                    }
                }
                let mut argv = shell.to_vec();
                argv.push(body.clone());
                return (argv, None);
            }
            let mut script = s.clone();
            script.push('\n');
            for h in &run.heredocs {
                script.push_str(&h.content);
                if !h.content.is_empty() && !h.content.ends_with('\n') {
                    script.push('\n');
                }
                script.push_str(&h.name);
                script.push('\n');
            }
            let mut argv = shell.to_vec();
            argv.push(script);
            (argv, None)
        }
    }
}

/// The files a RUN mount's `from=` names.
enum MountFiles<'a> {
    /// A stage's or an image's layers.
    State(Box<StageState>),
    /// A directory context (the build context, or a named one), through its ignore file.
    Dir(&'a Context),
}

/// Whether a mount names a non-empty `from=` (an empty one names the context, as none does).
fn has_from(fields: &BTreeMap<&str, &str>) -> bool {
    fields.get("from").is_some_and(|f| !f.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::build::config::default_shell;
    use crate::recipe::instructions::Heredoc;

    fn heredoc(name: &str, content: &str) -> Heredoc {
        Heredoc {
            name: name.into(),
            content: content.into(),
            expand: true,
            fd: None,
        }
    }

    fn shell_run(command: &str, heredocs: Vec<Heredoc>) -> Run {
        Run {
            command: CommandLine::Shell(command.into()),
            heredocs,
            mounts: vec![],
            network: None,
            security: None,
        }
    }
    #[test]
    fn lone_heredoc_runs_its_body() {
        let run = shell_run("<<EOF", vec![heredoc("EOF", "echo hi\n")]);
        let (argv, stdin) = run_argv(&run, &default_shell());
        assert_eq!(argv, vec!["/bin/sh", "-c", "echo hi\n"]);
        assert!(stdin.is_none());
    }

    #[test]
    fn shebang_heredoc_uses_interpreter() {
        let run = shell_run(
            "<<EOF",
            vec![heredoc("EOF", "#!/bin/busybox sh\necho hi\n")],
        );
        let (argv, stdin) = run_argv(&run, &default_shell());
        assert_eq!(argv, vec!["/bin/busybox", "sh", "/dev/stdin"]);
        assert_eq!(stdin.unwrap(), b"#!/bin/busybox sh\necho hi\n");
    }

    #[test]
    fn heredoc_bodies_follow_the_command() {
        let run = shell_run(
            "cat <<A >a && cat <<B >b",
            vec![heredoc("A", "1\n"), heredoc("B", "2\n")],
        );
        let (argv, _) = run_argv(&run, &default_shell());
        assert_eq!(argv[2], "cat <<A >a && cat <<B >b\n1\nA\n2\nB\n");
    }
}
