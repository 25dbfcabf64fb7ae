//! The executor: walks the plan, runs independent stages in parallel, and for each step asks
//! the cache, the sandbox (RUN), the copier (COPY/ADD), the snapshotter and the store, while
//! emitting progress events. Knows nothing of parsing or of the terminal.

mod cache;
pub mod config;
pub mod copy;
mod listed;
pub mod record;
mod run;
mod steps;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use serde::{Deserialize, Serialize};

use crate::digest::Digest;
use crate::image::{self, Descriptor, History, ImageConfig};
use crate::plan::{self, Base, Plan, PlanError, PlanOptions};
use crate::progress::{Progress, StepLabel};
use crate::recipe::instructions::{Instruction, InstructionKind, Recipe};
use crate::recipe::shell::Lexer;
use crate::recipe::{self, RecipeError};
use crate::registry::{Client, ClientOptions};
use crate::sandbox::{NetworkMode, Sandbox};
use crate::snapshot::Compression;
use crate::sources::context::{Context, ContextError};
use crate::store::{Store, StoreError, StoredImage};

use self::config::{
    DEFAULT_PATH, command_argv, default_shell, expose_ports, set_env, set_healthcheck,
};
use self::record::{BuildRecord, CacheState, Recorder};

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
    /// ssh-agent sockets for RUN --mount=type=ssh, by id (`--ssh`).
    pub ssh: BTreeMap<String, PathBuf>,
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

/// A stage's state as its steps run, and its result.
#[derive(Clone)]
struct StageState {
    config: ImageConfig,
    /// The stage's layers, bottom first; unpacked only when a step needs the rootfs
    /// ([`Engine::lowers`]).
    layers: Vec<Layer>,
    key: Digest,
    created: Option<String>,
    args: BTreeMap<String, String>,
    shell: Vec<String>,
    cmd_set: bool,
}

/// A finished build: the final image, stored (not yet tagged), and what the build read and did.
pub struct Built {
    /// The final image.
    pub image: StoredImage,
    /// The images, context files and downloads it read, and its steps.
    pub record: BuildRecord,
}

/// Builds the recipe.
pub fn build(
    store: &Store,
    opts: &BuildOptions,
    progress: &Progress,
    cancel: &AtomicBool,
) -> Result<Built, BuildError> {
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
        recorder: Recorder::default(),
    };
    let state = engine.run_stages()?;
    let image = engine.finish(state)?;
    Ok(Built {
        image,
        record: engine.recorder.finish(),
    })
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
    recorder: Recorder,
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

    /// Maps a context error to one located at `line` of the recipe.
    fn context_err(&self, line: usize) -> impl Fn(ContextError) -> BuildError + '_ {
        move |source| BuildError::Context {
            file: self.file.clone(),
            line,
            source,
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
                    crate::sources::context::clean_relative(&joined).unwrap_or_default()
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
        let stage_id = (stage, self.stage_name(stage));
        self.recorder
            .step(stage_id, n, line, &instr.text, CacheState::None, None);
        step.done();
        Ok(())
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
        key: Digest::of(b"scratch"),
        created: None,
        args: BTreeMap::new(),
        shell: default_shell(),
        cmd_set: false,
    }
}
