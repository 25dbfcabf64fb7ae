//! The executor: walks the plan, runs independent stages in parallel, and for each step asks
//! the cache, the sandbox (RUN), the copier (COPY/ADD), the snapshotter and the store, while
//! emitting progress events. Knows nothing of parsing or of the terminal.

pub mod config;
pub mod copy;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use serde::{Deserialize, Serialize};

use crate::context::{Context, ContextError};
use crate::digest::Digest;
use crate::image::{self, Descriptor, History, ImageConfig};
use crate::plan::{self, Base, CopySource, Plan, PlanError, PlanOptions, StepInputs};
use crate::progress::{Progress, StepLabel};
use crate::recipe::instructions::{CommandLine, Copy, Instruction, InstructionKind, Recipe, Run};
use crate::recipe::shell::Lexer;
use crate::recipe::{self, RecipeError};
use crate::registry::reference::Reference;
use crate::registry::{Client, ClientOptions};
use crate::rootfs::RootDir;
use crate::sandbox::{self, BindMount, NetworkMode, RunSpec, Sandbox};
use crate::snapshot::{self, Compression, LayerOptions};
use crate::store::{Store, StoreError, StoredImage};

use self::config::{
    DEFAULT_PATH, command_argv, default_shell, expose_ports, get_env, set_env, set_healthcheck,
};

/// Everything a build is asked to do, from the command line.
#[derive(Clone, Debug)]
pub struct BuildOptions {
    /// The context directory.
    pub context_dir: PathBuf,
    /// The recipe's path (for messages, `.dockerignore` lookup and step identities).
    pub recipe_path: PathBuf,
    /// The recipe's bytes.
    pub recipe_bytes: Vec<u8>,
    /// `--build-arg` values.
    pub build_args: BTreeMap<String, String>,
    /// `--target`.
    pub target: Option<String>,
    /// `--no-cache`.
    pub no_cache: bool,
    /// `--label` values added to the final image.
    pub labels: BTreeMap<String, String>,
    /// `--network` for RUN steps.
    pub network: NetworkMode,
    /// `--secret id=ID,src=PATH` values.
    pub secrets: BTreeMap<String, PathBuf>,
    /// SOURCE_DATE_EPOCH.
    pub source_date_epoch: Option<i64>,
    /// Stages built at once.
    pub jobs: usize,
    /// The kiln executable, re-executed as the sandbox init.
    pub helper_exe: PathBuf,
    /// Registries: verify TLS (false also allows plain http).
    pub tls_verify: bool,
    /// `--compression` of the layers this build writes.
    pub compression: Compression,
}

/// Why a build stopped.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// The recipe does not parse.
    #[error(transparent)]
    Recipe(#[from] RecipeError),
    /// The plan cannot be made (unknown target, bad FROM).
    #[error("{file}: {source}")]
    Plan {
        /// The recipe file.
        file: String,
        /// The cause.
        source: PlanError,
    },
    /// The context cannot be read, or a source is missing or outside it.
    #[error("{file}:{line}: {source}")]
    Context {
        /// The recipe file.
        file: String,
        /// The instruction's line.
        line: usize,
        /// The cause.
        source: ContextError,
    },
    /// The context directory itself is unusable.
    #[error(transparent)]
    ContextDir(ContextError),
    /// An instruction's arguments are invalid once expanded.
    #[error("{file}:{line}: {message}")]
    Invalid {
        /// The recipe file.
        file: String,
        /// The instruction's line.
        line: usize,
        /// What is wrong.
        message: String,
    },
    /// A RUN step exited non-zero.
    #[error("stage {stage}, {file}:{line}: `{command}` exited with code {code}")]
    StepFailed {
        /// The stage's name or index.
        stage: String,
        /// The recipe file.
        file: String,
        /// The step's line.
        line: usize,
        /// The command.
        command: String,
        /// Its exit code.
        code: i32,
    },
    /// A step could not be carried out.
    #[error("stage {stage}, {file}:{line}: {message}")]
    Step {
        /// The stage's name or index.
        stage: String,
        /// The recipe file.
        file: String,
        /// The step's line.
        line: usize,
        /// What went wrong.
        message: String,
    },
    /// The base image is not available.
    #[error("image {0}")]
    Image(String),
    /// Pulling a base image failed.
    #[error("pulling {reference}: {source}")]
    Pull {
        /// The reference.
        reference: String,
        /// The cause.
        source: Box<crate::distribution::TransferError>,
    },
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The build was interrupted.
    #[error("build interrupted")]
    Cancelled,
}

impl BuildError {
    /// True for errors in what the user gave (exit status 2), false for failed builds (1).
    pub fn is_input_error(&self) -> bool {
        matches!(
            self,
            BuildError::Recipe(_)
                | BuildError::Plan { .. }
                | BuildError::Context { .. }
                | BuildError::ContextDir(_)
                | BuildError::Invalid { .. }
                | BuildError::Image(_)
        )
    }
}

/// A layer of an image being built.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Layer {
    desc: Descriptor,
    diff_id: Digest,
}

/// What a cache record holds.
#[derive(Serialize, Deserialize)]
struct CacheRecord {
    layer: Option<Layer>,
    created: Option<String>,
}

/// What the last build of a step saw (for miss explanations).
#[derive(Serialize, Deserialize)]
struct StepRecord {
    parent: Digest,
    inputs: StepInputs,
}

/// A stage's state as its steps run, and its result.
#[derive(Clone)]
struct StageState {
    config: ImageConfig,
    layers: Vec<Layer>,
    /// Unpacked layer dirs, bottom first.
    lower_dirs: Vec<PathBuf>,
    key: Digest,
    created: Option<String>,
    args: BTreeMap<String, String>,
    shell: Vec<String>,
    cmd_set: bool,
}

/// Builds the recipe; returns the final image, stored (not yet tagged).
pub fn build(
    store: &Store,
    opts: &BuildOptions,
    progress: &Progress,
    cancel: &AtomicBool,
) -> Result<StoredImage, BuildError> {
    let file = opts.recipe_path.display().to_string();
    let recipe = recipe::parse(&opts.recipe_bytes, &file)?;
    let (os, arch, variant) = image::host_platform();
    let platform = match &variant {
        Some(v) => format!("{os}/{arch}/{v}"),
        None => format!("{os}/{arch}"),
    };
    let mut platform_args = BTreeMap::new();
    for prefix in ["TARGET", "BUILD"] {
        platform_args.insert(format!("{prefix}PLATFORM"), platform.clone());
        platform_args.insert(format!("{prefix}OS"), os.clone());
        platform_args.insert(format!("{prefix}ARCH"), arch.clone());
        platform_args.insert(
            format!("{prefix}VARIANT"),
            variant.clone().unwrap_or_default(),
        );
    }
    let plan_opts = PlanOptions {
        build_args: opts.build_args.clone(),
        target: opts.target.clone(),
        platform_args,
    };
    let plan = plan::plan(&recipe, &plan_opts).map_err(|source| BuildError::Plan {
        file: file.clone(),
        source,
    })?;
    for unused in &plan.unused_build_args {
        progress.warn(&format!(
            "build arg {unused:?} was given but no stage declares it"
        ));
    }
    let recipe_abs = std::fs::canonicalize(&opts.recipe_path).ok();
    let context =
        Context::open(&opts.context_dir, recipe_abs.as_deref()).map_err(BuildError::ContextDir)?;
    let _lease = store.build_lease()?;
    let engine = Engine {
        store,
        opts,
        recipe: &recipe,
        plan: &plan,
        progress,
        cancel,
        sandbox: Sandbox::new(opts.helper_exe.clone()),
        client: Client::new(ClientOptions {
            tls_verify: opts.tls_verify,
            ..Default::default()
        }),
        pulls: Mutex::new(()),
        lexer: Lexer::new(recipe.directives.escape),
        context,
        file,
        recipe_id: std::fs::canonicalize(&opts.recipe_path)
            .unwrap_or_else(|_| opts.recipe_path.clone())
            .display()
            .to_string(),
    };
    let state = engine.run_stages()?;
    engine.finish(state)
}

/// A RUN mount, as the sandbox gets it.
enum RunMount {
    /// A host path bound as it is (secrets, cache dirs, tmpfs scratch, read-only context paths).
    Host(BindMount),
    /// A path of a tree mounted for the step.
    Tree(MountedTree),
}

/// A tree (a stage's or image's layers, or the context) mounted as an overlay over a scratch
/// upper for one RUN step, of which `source` is bound at `target`; writes are discarded.
struct MountedTree {
    /// Overlay lower dirs, top first.
    lowers: Vec<PathBuf>,
    /// The path bound, inside the tree.
    source: String,
    /// Where it appears in the step.
    target: String,
    /// Read-only bind.
    readonly: bool,
    /// Identity of the tree's content, for the cache key.
    key: String,
}

/// Where a layer step is: for messages, step identities and history.
struct StepPlace {
    stage: usize,
    n: usize,
    line: usize,
    created_by: String,
}

struct Engine<'a> {
    store: &'a Store,
    opts: &'a BuildOptions,
    recipe: &'a Recipe,
    plan: &'a Plan,
    progress: &'a Progress,
    cancel: &'a AtomicBool,
    sandbox: Sandbox,
    client: Client,
    /// Serialises pulls so parallel stages do not fetch one image twice.
    pulls: Mutex<()>,
    lexer: Lexer,
    context: Context,
    file: String,
    recipe_id: String,
}

/// Shared scheduler state for parallel stages.
struct Schedule {
    state: Mutex<Slots>,
    changed: Condvar,
}

/// What the stage threads share: finished stages, the first error, free job slots.
struct Slots {
    done: Vec<Option<Arc<StageState>>>,
    error: Option<BuildError>,
    free: usize,
}

impl Engine<'_> {
    fn run_stages(&self) -> Result<StageState, BuildError> {
        let n = self.recipe.stages.len();
        let schedule = Schedule {
            state: Mutex::new(Slots {
                done: vec![None; n],
                error: None,
                free: self.opts.jobs.max(1),
            }),
            changed: Condvar::new(),
        };
        std::thread::scope(|scope| {
            for &index in &self.plan.needed {
                let schedule = &schedule;
                scope.spawn(move || {
                    let deps = {
                        let mut guard = schedule.state.lock().unwrap_or_else(|e| e.into_inner());
                        loop {
                            if guard.error.is_some() {
                                return;
                            }
                            let deps = &self.plan.stages[index].deps;
                            let ready: Option<BTreeMap<usize, Arc<StageState>>> = deps
                                .iter()
                                .map(|d| guard.done[*d].clone().map(|s| (*d, s)))
                                .collect();
                            if let (Some(ready), true) = (ready, guard.free > 0) {
                                guard.free -= 1;
                                break ready;
                            }
                            guard = schedule
                                .changed
                                .wait(guard)
                                .unwrap_or_else(|e| e.into_inner());
                        }
                    };
                    let result = self.build_stage(index, &deps);
                    let mut guard = schedule.state.lock().unwrap_or_else(|e| e.into_inner());
                    guard.free += 1;
                    match result {
                        Ok(state) => guard.done[index] = Some(Arc::new(state)),
                        Err(e) => {
                            if guard.error.is_none() {
                                guard.error = Some(e);
                            }
                            self.cancel.store(true, Ordering::SeqCst);
                        }
                    }
                    schedule.changed.notify_all();
                });
            }
        });
        let Slots {
            mut done, error, ..
        } = schedule
            .state
            .into_inner()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(e) = error {
            return Err(e);
        }
        done[self.plan.target]
            .take()
            .map(|s| Arc::try_unwrap(s).unwrap_or_else(|a| (*a).clone()))
            .ok_or(BuildError::Cancelled)
    }

    fn stage_name(&self, index: usize) -> String {
        self.recipe.stages[index]
            .name
            .clone()
            .unwrap_or_else(|| format!("stage-{index}"))
    }

    fn build_stage(
        &self,
        index: usize,
        deps: &BTreeMap<usize, Arc<StageState>>,
    ) -> Result<StageState, BuildError> {
        let stage = &self.recipe.stages[index];
        let name = self.stage_name(index);
        let total = stage.instructions.len() + 1;
        let label = |number: usize, text: &str, line: usize| StepLabel {
            stage: name.clone(),
            number,
            total,
            text: text.to_string(),
            line,
        };
        let step = self
            .progress
            .step(label(1, &stage.text, stage.span.start_line));
        let mut st = match &self.plan.stages[index].base {
            Base::Scratch => scratch_state(),
            Base::Stage(i) => (*deps[i]).clone(),
            Base::Image(r) => self.load_image(r, stage.span.start_line)?,
        };
        step.ready();
        st.args = BTreeMap::new();
        st.shell = st.config.config.shell.clone().unwrap_or_else(default_shell);
        st.cmd_set = false;
        let triggers = st.config.config.on_build.take().unwrap_or_default();
        for trigger in triggers {
            let instr = self.parse_trigger(&trigger, stage.span.start_line)?;
            let step = self.progress.step(label(
                1,
                &format!("ONBUILD {trigger}"),
                stage.span.start_line,
            ));
            self.execute(index, usize::MAX, &mut st, &instr, step, deps)?;
        }
        for (n, instr) in stage.instructions.iter().enumerate() {
            if self.cancel.load(Ordering::SeqCst) {
                return Err(BuildError::Cancelled);
            }
            let step = self
                .progress
                .step(label(n + 2, &instr.text, instr.span.start_line));
            self.execute(index, n, &mut st, instr, step, deps)?;
        }
        Ok(st)
    }

    fn parse_trigger(&self, trigger: &str, line: usize) -> Result<Instruction, BuildError> {
        let text = format!("FROM scratch\n{trigger}\n");
        let parsed = recipe::parse(text.as_bytes(), "ONBUILD trigger")?;
        parsed
            .stages
            .into_iter()
            .next()
            .and_then(|s| s.instructions.into_iter().next())
            .ok_or_else(|| self.invalid(line, format!("invalid ONBUILD trigger {trigger:?}")))
    }

    fn invalid(&self, line: usize, message: impl Into<String>) -> BuildError {
        BuildError::Invalid {
            file: self.file.clone(),
            line,
            message: message.into(),
        }
    }

    fn step_error(&self, stage: usize, line: usize, message: impl std::fmt::Display) -> BuildError {
        BuildError::Step {
            stage: self.stage_name(stage),
            file: self.file.clone(),
            line,
            message: message.to_string(),
        }
    }

    /// Variables visible to expansion: ARGs in scope, overridden by ENV.
    fn vars(&self, st: &StageState) -> BTreeMap<String, String> {
        let mut vars = st.args.clone();
        for e in &st.config.config.env {
            if let Some((k, v)) = e.split_once('=') {
                vars.insert(k.to_string(), v.to_string());
            }
        }
        vars
    }

    fn expand(
        &self,
        word: &str,
        vars: &BTreeMap<String, String>,
        line: usize,
    ) -> Result<String, BuildError> {
        self.lexer
            .process_word(word, vars)
            .map(|e| e.value)
            .map_err(|e| self.invalid(line, e.to_string()))
    }

    fn expand_words(
        &self,
        word: &str,
        vars: &BTreeMap<String, String>,
        line: usize,
    ) -> Result<Vec<String>, BuildError> {
        self.lexer
            .process_words(word, vars)
            .map(|e| e.value)
            .map_err(|e| self.invalid(line, e.to_string()))
    }

    fn history(&self, st: &mut StageState, created_by: String, empty_layer: bool) {
        st.config.history.push(History {
            created: st.created.clone(),
            created_by: Some(created_by),
            comment: None,
            empty_layer,
        });
    }

    fn execute(
        &self,
        stage: usize,
        n: usize,
        st: &mut StageState,
        instr: &Instruction,
        step: crate::progress::Step<'_>,
        deps: &BTreeMap<usize, Arc<StageState>>,
    ) -> Result<(), BuildError> {
        let line = instr.span.start_line;
        let vars = self.vars(st);
        let cfg = &mut st.config.config;
        match &instr.kind {
            InstructionKind::Run(run) => {
                return self.run_step(stage, n, st, instr, run, step, deps);
            }
            InstructionKind::Copy(c) => {
                return self.copy_step(stage, n, st, instr, c, false, step, deps);
            }
            InstructionKind::Add(c) => {
                return self.copy_step(stage, n, st, instr, c, true, step, deps);
            }
            InstructionKind::Env(pairs) => {
                for (k, v) in pairs {
                    let k = self.expand(k, &vars, line)?;
                    let v = self.expand(v, &vars, line)?;
                    set_env(&mut cfg.env, &k, &v);
                }
            }
            InstructionKind::Label(pairs) => {
                for (k, v) in pairs {
                    let k = self.expand(k, &vars, line)?;
                    let v = self.expand(v, &vars, line)?;
                    cfg.labels.insert(k, v);
                }
            }
            InstructionKind::Arg(decls) => {
                for d in decls {
                    let value = match (self.opts.build_args.get(&d.name), &d.default) {
                        (Some(v), _) => Some(v.clone()),
                        (None, Some(raw)) => Some(self.expand(raw, &vars, line)?),
                        (None, None) => self.plan.meta_args.get(&d.name).cloned(),
                    };
                    if let Some(v) = value {
                        st.args.insert(d.name.clone(), v);
                    }
                }
            }
            InstructionKind::Workdir(w) => {
                let w = self.expand(w, &vars, line)?;
                let joined = if w.starts_with('/') {
                    w
                } else {
                    format!("{}/{w}", cfg.working_dir.as_deref().unwrap_or(""))
                };
                cfg.working_dir = Some(format!(
                    "/{}",
                    crate::context::clean_relative(&joined).unwrap_or_default()
                ));
                return self.workdir_step(stage, n, st, instr, step);
            }
            InstructionKind::User(u) => cfg.user = Some(self.expand(u, &vars, line)?),
            InstructionKind::Cmd(c) => {
                cfg.cmd = Some(command_argv(c, &st.shell));
                st.cmd_set = true;
            }
            InstructionKind::Entrypoint(c) => {
                cfg.entrypoint = Some(command_argv(c, &st.shell));
                if !st.cmd_set {
                    cfg.cmd = None;
                }
            }
            InstructionKind::Shell(v) => {
                cfg.shell = Some(v.clone());
                st.shell = v.clone();
            }
            InstructionKind::Expose(words) => {
                for w in words {
                    for w in self.expand_words(w, &vars, line)? {
                        for port in expose_ports(&w).map_err(|m| self.invalid(line, m))? {
                            cfg.exposed_ports.insert(port, Default::default());
                        }
                    }
                }
            }
            InstructionKind::Volume(words) => {
                for w in words {
                    for v in self.expand_words(w, &vars, line)? {
                        cfg.volumes.insert(v, Default::default());
                    }
                }
            }
            InstructionKind::Stopsignal(s) => cfg.stop_signal = Some(self.expand(s, &vars, line)?),
            InstructionKind::Healthcheck(hc) => set_healthcheck(&mut st.config, hc),
            InstructionKind::Onbuild { trigger, .. } => {
                cfg.on_build
                    .get_or_insert_with(Vec::new)
                    .push(trigger.clone());
            }
            InstructionKind::Maintainer(m) => st.config.author = Some(m.clone()),
        }
        self.history(st, instr.text.clone(), true);
        step.done();
        Ok(())
    }

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

    fn identity(&self, stage: usize, n: usize) -> Digest {
        Digest::of(format!("kiln-step-identity\n{}\n{stage}\n{n}", self.recipe_id).as_bytes())
    }

    /// Looks the step up in the cache; on a hit applies it and returns true. On a miss, tells
    /// the progress view why.
    fn try_cache(
        &self,
        stage: usize,
        n: usize,
        st: &mut StageState,
        key: &Digest,
        inputs: &StepInputs,
        step: &crate::progress::Step<'_>,
    ) -> Result<Option<CacheRecord>, BuildError> {
        let cached = match self.opts.no_cache {
            true => None,
            false => self.store.cache_get(key)?,
        };
        let mut other_encoding = false;
        if let Some(record) = cached.and_then(|v| serde_json::from_value::<CacheRecord>(v).ok()) {
            // A record whose layer blob was pruned, or that is encoded differently from what
            // this build asks for (`--compression`), is a miss.
            let usable = match &record.layer {
                Some(l) => {
                    other_encoding = l.desc.media_type != self.layer_media_type();
                    self.store.has_blob(&l.desc.digest) && !other_encoding
                }
                None => true,
            };
            if usable {
                return Ok(Some(record));
            }
        }
        let reason = if self.opts.no_cache {
            Some("--no-cache".to_string())
        } else if other_encoding {
            Some("the cached layer has another compression".to_string())
        } else {
            // A step never built before needs no explanation.
            self.store
                .cache_get(&self.identity(stage, n))?
                .and_then(|v| serde_json::from_value::<StepRecord>(v).ok())
                .map(|old| plan::explain_difference(&old.inputs, inputs, old.parent != st.key))
        };
        if let Some(reason) = reason {
            step.rebuild_reason(&reason);
        }
        Ok(None)
    }

    fn apply_record(
        &self,
        st: &mut StageState,
        key: Digest,
        record: CacheRecord,
        created_by: String,
    ) -> Result<(), BuildError> {
        st.created = record.created.clone();
        match record.layer {
            Some(layer) => {
                let dir = self.ensure_layer_dir(&layer)?;
                st.lower_dirs.push(dir);
                st.config.rootfs.diff_ids.push(layer.diff_id);
                st.layers.push(layer);
                self.history(st, created_by, false);
            }
            None => self.history(st, created_by, true),
        }
        st.key = key;
        Ok(())
    }

    fn remember(
        &self,
        stage: usize,
        n: usize,
        parent: Digest,
        key: &Digest,
        inputs: StepInputs,
        record: &CacheRecord,
    ) -> Result<(), BuildError> {
        let value = serde_json::to_value(record).unwrap_or_default();
        self.store.cache_put(key, &value)?;
        if n != usize::MAX {
            let id = serde_json::to_value(StepRecord { parent, inputs }).unwrap_or_default();
            self.store.cache_put(&self.identity(stage, n), &id)?;
        }
        Ok(())
    }

    fn now_created(&self) -> String {
        let secs = self.opts.source_date_epoch.unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs() as i64)
                .unwrap_or(0)
        });
        image::rfc3339(secs)
    }

    #[allow(clippy::too_many_arguments)]
    fn run_step(
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
        match run.security.as_deref() {
            None | Some("sandbox") => {}
            Some(other) => {
                return Err(self.invalid(
                    line,
                    format!(
                        "RUN --security={other} is not supported: RUN steps always run sandboxed"
                    ),
                ));
            }
        }
        let vars = self.vars(st);
        let mut binds = Vec::new();
        let mut trees: Vec<MountedTree> = Vec::new();
        let mut _mount_scratch = Vec::new();
        for m in &run.mounts {
            let expanded = self.expand(m, &vars, line)?;
            match self.run_mount(stage, m, &expanded, line, deps)? {
                (RunMount::Host(bind), scratch) => {
                    binds.push(bind);
                    _mount_scratch.extend(scratch);
                }
                (RunMount::Tree(tree), _) => trees.push(tree),
            }
        }
        if trees.len() > 1 {
            return Err(self.invalid(
                line,
                "only one --mount=type=bind with from= or rw per RUN is supported",
            ));
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
        if let Some(tree) = trees.first() {
            inputs.from = tree.key.clone();
        }
        let parent = st.key;
        let key = plan::cache_key(&parent, &inputs);
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
        let Some(mut step) = self.reuse_cached(st, &place, key, &inputs, step)? else {
            return Ok(());
        };
        let (_scratch, upper, work) = self.scratch_upper(stage, line)?;
        let spec = RunSpec {
            lower_dirs: st.lower_dirs.iter().rev().cloned().collect(),
            upper_dir: upper.clone(),
            work_dir: work,
            argv: argv.clone(),
            env: self.run_env(st),
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
        };
        let result = match trees.pop() {
            None => self
                .sandbox
                .run(&spec, &mut |bytes| step.output(bytes), self.cancel),
            Some(tree) => {
                let (_tree_scratch, tree_upper, tree_work) = self.scratch_upper(stage, line)?;
                let step = &mut step;
                sandbox::with_rootfs(&tree.lowers, &tree_upper, &tree_work, move |merged| {
                    let root = RootDir::open_host(merged)
                        .map_err(|e| sandbox::SandboxError::Setup(e.to_string()))?;
                    let source = root
                        .resolve(&tree.source)
                        .map_err(|e| sandbox::SandboxError::Setup(e.to_string()))?;
                    let mut spec = spec;
                    spec.binds.push(BindMount {
                        source,
                        target: tree.target,
                        readonly: tree.readonly,
                    });
                    self.sandbox
                        .run(&spec, &mut |bytes| step.output(bytes), self.cancel)
                })
                .and_then(|r| r)
            }
        };
        let code = match result {
            Ok(code) => code,
            Err(sandbox::SandboxError::Cancelled) => {
                step.failed();
                return Err(BuildError::Cancelled);
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
        self.commit_step(st, place, parent, key, inputs, &upper, step)
    }

    /// One `RUN --mount=…` as a bind mount for the sandbox. Supported types:
    /// `secret` (a `--secret` file, read-only, default target `/run/secrets/ID`), `cache` (a
    /// directory kept in the store across builds, by `id`, default the target), `tmpfs` (an
    /// empty directory discarded after the step) and `bind` (a context path, read-only).
    /// The returned scratch dir, if any, must live until the step ends.
    fn run_mount(
        &self,
        stage: usize,
        raw: &str,
        spec: &str,
        line: usize,
        deps: &BTreeMap<usize, Arc<StageState>>,
    ) -> Result<(RunMount, Option<tempfile::TempDir>), BuildError> {
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
        let target = fields.get("target").map(|t| t.to_string());
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
            "secret" => {
                let id = fields
                    .get("id")
                    .map(|s| s.to_string())
                    .or_else(|| {
                        target
                            .as_ref()
                            .and_then(|t| t.rsplit('/').next().map(str::to_string))
                    })
                    .ok_or_else(|| {
                        self.invalid(line, "RUN --mount=type=secret needs id= or target=")
                    })?;
                let target = target.unwrap_or_else(|| format!("/run/secrets/{id}"));
                match self.opts.secrets.get(&id) {
                    Some(src) => Ok((
                        RunMount::Host(BindMount {
                            source: src.clone(),
                            target,
                            readonly: true,
                        }),
                        None,
                    )),
                    None => Err(self.invalid(
                        line,
                        format!("secret {id:?} was not given: pass --secret id={id},src=PATH"),
                    )),
                }
            }
            "cache" => {
                let target = need_target()?;
                let id = fields
                    .get("id")
                    .map(|s| s.to_string())
                    .unwrap_or_else(|| target.clone());
                let dir = self.store.cache_mount_dir(&id)?;
                let readonly = fields.contains_key("ro");
                Ok((
                    RunMount::Host(BindMount {
                        source: dir,
                        target,
                        readonly,
                    }),
                    None,
                ))
            }
            "tmpfs" => {
                let target = need_target()?;
                let scratch = self.store.scratch_dir()?;
                Ok((
                    RunMount::Host(BindMount {
                        source: scratch.path().to_path_buf(),
                        target,
                        readonly: false,
                    }),
                    Some(scratch),
                ))
            }
            "bind" => {
                let target = need_target()?;
                let readonly = !fields
                    .get("rw")
                    .is_some_and(|v| v.is_empty() || *v == "true");
                let source = fields.get("source").copied().unwrap_or("/");
                let from_raw = plan::mount_from(raw);
                if from_raw.is_none() && readonly {
                    let rel =
                        self.context
                            .resolve(source)
                            .map_err(|source| BuildError::Context {
                                file: self.file.clone(),
                                line,
                                source,
                            })?;
                    let rel = rel.into_iter().next().unwrap_or_default();
                    let bind = BindMount {
                        source: self.context.host_path(&rel),
                        target,
                        readonly: true,
                    };
                    return Ok((RunMount::Host(bind), None));
                }
                // A stage's or image's files, or context files that may be written: mounted for
                // the step over a scratch upper, so whatever the step writes there is discarded.
                let (lowers, key) = match from_raw {
                    None => (
                        vec![self.context.root().to_path_buf()],
                        "context".to_string(),
                    ),
                    Some(raw_from) => {
                        let state = match self.plan.stages[stage].copy_sources.get(raw_from) {
                            Some(CopySource::Stage(i)) => (*deps[i]).clone(),
                            Some(CopySource::Image(r)) => self.load_image(r, line)?,
                            None => {
                                return Err(
                                    self.invalid(line, format!("unresolved from={raw_from}"))
                                );
                            }
                        };
                        (
                            state.lower_dirs.iter().rev().cloned().collect(),
                            state.key.to_string(),
                        )
                    }
                };
                let tree = MountedTree {
                    lowers,
                    source: source.to_string(),
                    target,
                    readonly,
                    key,
                };
                Ok((RunMount::Tree(tree), None))
            }
            other => Err(self.invalid(
                line,
                format!("RUN --mount type={other} is not supported (secret, cache, tmpfs, bind)"),
            )),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn copy_step(
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
                    let rels =
                        self.context
                            .resolve(&word)
                            .map_err(|source| BuildError::Context {
                                file: self.file.clone(),
                                line,
                                source,
                            })?;
                    for rel in rels {
                        let entries =
                            self.context
                                .walk(&rel)
                                .map_err(|source| BuildError::Context {
                                    file: self.file.clone(),
                                    line,
                                    source,
                                })?;
                        let digests = self.context.digest_entries(&entries).map_err(|source| {
                            BuildError::Context {
                                file: self.file.clone(),
                                line,
                                source,
                            }
                        })?;
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
    fn workdir_step(
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

    /// On a cache hit applies the cached result and closes the step (None); on a miss returns
    /// the step to run, having said why it is rebuilt.
    fn reuse_cached<'p>(
        &self,
        st: &mut StageState,
        place: &StepPlace,
        key: Digest,
        inputs: &StepInputs,
        step: crate::progress::Step<'p>,
    ) -> Result<Option<crate::progress::Step<'p>>, BuildError> {
        match self.try_cache(place.stage, place.n, st, &key, inputs, &step)? {
            Some(record) => {
                self.apply_record(st, key, record, place.created_by.clone())?;
                step.cached();
                Ok(None)
            }
            None => Ok(Some(step)),
        }
    }

    /// Snapshots a finished step's upper dir into a layer, records it in the cache (and as the
    /// step's latest build, for explanations) and applies it to the stage.
    #[allow(clippy::too_many_arguments)]
    fn commit_step(
        &self,
        st: &mut StageState,
        place: StepPlace,
        parent: Digest,
        key: Digest,
        inputs: StepInputs,
        upper: &Path,
        step: crate::progress::Step<'_>,
    ) -> Result<(), BuildError> {
        let layer = self
            .commit_upper(upper)
            .map_err(|e| self.step_error(place.stage, place.line, e))?;
        let record = CacheRecord {
            layer,
            created: Some(self.now_created()),
        };
        self.remember(place.stage, place.n, parent, &key, inputs, &record)?;
        self.apply_record(st, key, record, place.created_by)?;
        step.done();
        Ok(())
    }

    /// A fresh scratch dir in the store with empty `upper` and `work` dirs for an overlay.
    fn scratch_upper(
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

    /// The media type of the layers this build writes.
    fn layer_media_type(&self) -> &'static str {
        match self.opts.compression {
            Compression::Gzip => image::MEDIA_LAYER_GZIP,
            Compression::Zstd => image::MEDIA_LAYER_ZSTD,
            Compression::None => image::MEDIA_LAYER_TAR,
        }
    }

    /// Turns a step's upper dir into a stored layer and keeps the dir as that layer's
    /// unpacked form; None when the step changed nothing.
    fn commit_upper(&self, upper: &Path) -> Result<Option<Layer>, String> {
        if !snapshot::upper_has_changes(upper).map_err(|e| e.to_string())? {
            return Ok(None);
        }
        let opts = LayerOptions {
            source_date_epoch: self.opts.source_date_epoch,
            compression: self.opts.compression,
        };
        let media_type = self.layer_media_type();
        let writer = self.store.blob_writer().map_err(|e| e.to_string())?;
        let (writer, summary) =
            snapshot::write_layer(upper, &opts, writer).map_err(|e| e.to_string())?;
        let (digest, size) = writer.commit().map_err(|e| e.to_string())?;
        self.store
            .install_layer_dir(&summary.diff_id, upper)
            .map_err(|e| e.to_string())?;
        Ok(Some(Layer {
            desc: Descriptor::new(media_type, digest, size),
            diff_id: summary.diff_id,
        }))
    }

    /// The unpacked dir of a layer, unpacking its blob once if needed.
    fn ensure_layer_dir(&self, layer: &Layer) -> Result<PathBuf, BuildError> {
        if let Some(dir) = self.store.layer_dir(&layer.diff_id) {
            return Ok(dir);
        }
        let scratch = self.store.scratch_dir()?;
        let dir = scratch.path().join("layer");
        std::fs::create_dir(&dir).map_err(|e| {
            BuildError::Image(format!("unpacking layer {}: {e}", layer.desc.digest))
        })?;
        let blob = self.store.open_blob(&layer.desc.digest)?;
        let diff_id = snapshot::unpack_layer(std::io::BufReader::new(blob), &dir).map_err(|e| {
            BuildError::Image(format!("unpacking layer {}: {e}", layer.desc.digest))
        })?;
        if diff_id != layer.diff_id {
            return Err(BuildError::Image(format!(
                "layer {} has diff_id {diff_id}, but the image config says {}",
                layer.desc.digest, layer.diff_id
            )));
        }
        Ok(self.store.install_layer_dir(&layer.diff_id, &dir)?)
    }

    fn load_image(&self, reference: &str, line: usize) -> Result<StageState, BuildError> {
        let normalized =
            Reference::parse(reference).map_err(|e| self.invalid(line, e.to_string()))?;
        let image = {
            let _one_pull_at_a_time = self.pulls.lock().unwrap_or_else(|e| e.into_inner());
            match self.store.resolve(&normalized.to_string())? {
                Some(image) => image,
                None => {
                    self.progress.info(&format!("pulling {normalized}"));
                    crate::distribution::pull(self.store, &self.client, &normalized).map_err(
                        |source| BuildError::Pull {
                            reference: normalized.to_string(),
                            source: Box::new(source),
                        },
                    )?
                }
            }
        };
        let diff_ids = &image.config.rootfs.diff_ids;
        if diff_ids.len() != image.manifest_body.layers.len() {
            return Err(BuildError::Image(format!(
                "{normalized}: manifest and config disagree on the number of layers"
            )));
        }
        let mut st = scratch_state();
        st.config = image.config.clone();
        st.created = image.config.created.clone();
        st.key = Digest::of(format!("image\n{}", image.manifest.digest).as_bytes());
        for (desc, diff_id) in image.manifest_body.layers.iter().zip(diff_ids) {
            // The result is an OCI manifest: a Docker base's layers get OCI media types.
            let mut desc = desc.clone();
            desc.media_type = image::oci_layer_type(&desc.media_type).to_string();
            let layer = Layer {
                desc,
                diff_id: *diff_id,
            };
            st.lower_dirs.push(self.ensure_layer_dir(&layer)?);
            st.layers.push(layer);
        }
        Ok(st)
    }

    fn finish(&self, mut st: StageState) -> Result<StoredImage, BuildError> {
        if let Some(epoch) = self.opts.source_date_epoch {
            st.created = Some(image::rfc3339(epoch));
        }
        let created = st.created.clone().unwrap_or_else(|| self.now_created());
        st.config.created = Some(created);
        for (k, v) in &self.opts.labels {
            st.config.config.labels.insert(k.clone(), v.clone());
        }
        let layers: Vec<Descriptor> = st.layers.iter().map(|l| l.desc.clone()).collect();
        Ok(self.store.put_image(&st.config, &layers)?)
    }
}

fn scratch_state() -> StageState {
    let (os, arch, variant) = image::host_platform();
    let mut config = ImageConfig {
        os,
        architecture: arch,
        variant,
        ..Default::default()
    };
    config.config.env.push(format!("PATH={DEFAULT_PATH}"));
    StageState {
        config,
        layers: Vec::new(),
        lower_dirs: Vec::new(),
        key: Digest::of(b"scratch"),
        created: None,
        args: BTreeMap::new(),
        shell: default_shell(),
        cmd_set: false,
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

    #[test]
    fn heredoc_expansion() {
        let vars: BTreeMap<String, String> = [("A".to_string(), "x".to_string())].into();
        assert_eq!(
            expand_heredoc("$A ${A} \\$A $B '$A' $", &vars),
            "x x $A  'x' $"
        );
    }
}
