//! The executor: walks the plan of each target platform, runs independent stages (of every
//! platform) in parallel, and for each step asks the cache, the sandbox (RUN), the copier
//! (COPY/ADD), the snapshotter and the store, while emitting progress events; several
//! platforms end in an image index. Knows nothing of parsing or of the terminal.

mod cache;
pub mod chmod;
pub mod config;
pub mod copy;
pub mod export;
pub mod lint;
mod listed;
mod named;
mod once;
pub mod record;
pub mod report;
mod run;
mod sandboxing;
mod steps;

pub use run::{MAX_SECRET_BYTES, SecretSource};

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

use crate::cache::{
    BuiltRecord, CacheBackend, Import, Layer, LocalCache, inline_annotation, open_imports,
};
use crate::digest::Digest;
use crate::image::{self, Descriptor, History, ImageConfig, Platform};
use crate::plan::{self, Base, KeyBasis, Plan, PlanError, PlanOptions};
use crate::progress::{Progress, StepLabel};
use crate::recipe::instructions::{Instruction, InstructionKind, Recipe};
use crate::recipe::shell::Lexer;
use crate::recipe::{self, RecipeError};
use crate::registry::{Client, ClientOptions};
use crate::sandbox::binfmt::{self, EmulationError};
use crate::sandbox::limits::Limits;
use crate::sandbox::{NetworkMode, SandboxError};
use crate::snapshot::Compression;
use crate::sources::context::{Context, ContextError};
use crate::sources::named::NamedSource;
use crate::store::{Store, StoreError, StoredImage, StoredRef};

use self::cache::image_stages;
use self::config::{
    DEFAULT_PATH, command_argv, default_shell, expose_ports, set_env, set_healthcheck,
};
use self::record::BuildRecord;
use self::report::{Cached, Outcomes, StepReport};

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
    /// `--secret` values, by id.
    pub secrets: BTreeMap<String, SecretSource>,
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
    /// Resource limits of RUN steps (`--memory`, `--pids-limit`, ...).
    pub limits: Limits,
    /// `--cache-from`: shared caches asked after the local store, in order.
    pub cache_from: Vec<Import>,
    /// `--cache-to type=inline`: the image's manifest carries its cache records.
    pub inline_cache: bool,
    /// Leave layers taken from a shared cache where they are unless a step needs their files
    /// (true when the image only goes to registries, which can mount them); else the final
    /// image's layers are all fetched before the build ends.
    pub lazy_layers: bool,
    /// `--platform`: the platforms to build for (none: the host's). Several give an index.
    pub platforms: Vec<Platform>,
    /// `--security-opt seccomp=…`: the filter RUN steps run under (`None`: unconfined).
    pub seccomp: Option<crate::sandbox::SeccompFilter>,
    /// `--allow security.insecure`: `RUN --security=insecure` may run with every capability.
    pub allow_insecure: bool,
    /// `--build-context` values, by name.
    pub named_contexts: BTreeMap<String, NamedSource>,
    /// `--no-cache-filter`: stages (names or indices) built without the cache.
    pub no_cache_filter: Vec<String>,
    /// `--pull`: ask the registry for every base image, even those in the store.
    pub pull: bool,
    /// `--add-host`: extra `/etc/hosts` entries for RUN steps, (host, ip).
    pub add_hosts: Vec<(String, String)>,
}

/// A finished build.
pub struct Built {
    /// The image, stored (not yet tagged); for several platforms, an index of one image each.
    pub image: StoredRef,
    /// What each step of the stages built did, by stage and step (platform after platform).
    pub steps: Vec<StepReport>,
    /// The cache records of the build, for `--cache-to`.
    pub records: Vec<BuiltRecord>,
    /// Each platform's image and what its build read, in the order given (for provenance and
    /// `--verify`).
    pub platforms: Vec<PlatformBuilt>,
}

/// One platform's part of a build.
pub struct PlatformBuilt {
    /// The platform built for (`--platform`, else the host's); its [`StepReport`]s name it.
    pub platform: Platform,
    /// The image made for it.
    pub image: StoredImage,
    /// The images, context files and downloads its build read.
    pub record: BuildRecord,
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
    /// A RUN step was killed for hitting a resource limit.
    #[error("stage {stage}, {file}:{line}: `{command}` was killed: {cause}")]
    StepKilled {
        /// The stage's name or index.
        stage: String,
        /// The recipe file.
        file: String,
        /// The step's line.
        line: usize,
        /// The command.
        command: String,
        /// The limit, in words.
        cause: String,
    },
    /// The sandbox cannot run steps as asked (limits that cannot be applied, ...).
    #[error(transparent)]
    Sandbox(SandboxError),
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
    /// A layer a shared cache pointed at cannot be had or is not what the record said; the
    /// build is run again without it.
    #[error("layer {digest} from cache {cache}: {reason}")]
    CacheLayer {
        /// The layer blob.
        digest: Digest,
        /// The cache it came from.
        cache: String,
        /// What is wrong.
        reason: String,
    },
    /// A stage runs binaries of a platform the host can neither run nor emulate.
    #[error("{file}:{line}: stage {stage} is for {platform}: {source}")]
    Emulation {
        /// The recipe file.
        file: String,
        /// The stage's FROM line.
        line: usize,
        /// The stage's name or index.
        stage: String,
        /// The stage's platform.
        platform: String,
        /// What is missing.
        source: Box<EmulationError>,
    },
    /// A `--build-context` cannot be used.
    #[error("--build-context {name}: {message}")]
    NamedContext {
        /// The context's name.
        name: String,
        /// What is wrong.
        message: String,
    },
    /// Build checks found problems and the recipe's `# check=error=true` makes them errors.
    #[error("{file}: {count} build check finding(s) with error=true: {rules}")]
    Checks {
        /// The recipe file.
        file: String,
        /// How many findings.
        count: usize,
        /// The rules that found something.
        rules: String,
    },
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
                | BuildError::Sandbox(SandboxError::InvalidInput(_))
                | BuildError::Checks { .. }
                | BuildError::NamedContext { .. }
        )
    }
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
    /// Where the last step's result came from, and why it was rebuilt (for reports;
    /// metadata-only steps keep the state of the step before them).
    cached: Cached,
    /// Why the current step was rebuilt.
    reason: Option<String>,
    /// Whether the current step was looked up in the caches (not a metadata-only step).
    looked_up: bool,
}

impl StageState {
    /// Forgets what the previous step's cache lookup said, before the next step.
    fn begin_step(&mut self) {
        self.reason = None;
        self.looked_up = false;
    }
}

/// Builds the recipe; returns the final image, stored (not yet tagged), and what each step did:
/// one image, or for several platforms an index of one image per platform, in the order given.
///
/// The platforms are built at once, their stages on threads of their own; a step whose cache
/// key another platform's build is computing (the same work: a stage pinned to
/// `$BUILDPLATFORM`) waits for that result instead of running again.
pub fn build(
    store: &Store,
    opts: &BuildOptions,
    progress: &Progress,
    cancel: &AtomicBool,
) -> Result<Built, BuildError> {
    let file = opts.recipe_path.display().to_string();
    let recipe = recipe::parse(&opts.recipe_bytes, &file)?;
    // The build checks; their DuplicateStageName is the warning for repeated stage names.
    let checked = lint::lint(
        Some(store),
        &lint::LintInput {
            recipe_path: &opts.recipe_path,
            recipe_bytes: &opts.recipe_bytes,
            context_dir: Some(&opts.context_dir),
            build_args: &opts.build_args,
            named_contexts: opts.named_contexts.keys().cloned().collect(),
        },
    )?;
    for finding in &checked.findings {
        progress.warn(&finding.to_string());
    }
    if let Some(e) = checked.as_error(&file) {
        return Err(e);
    }
    let build_platform = Platform::host();
    let targets = match opts.platforms.is_empty() {
        true => vec![build_platform.clone()],
        false => opts.platforms.clone(),
    };
    let plans = targets
        .iter()
        .map(|target| {
            let plan_opts = PlanOptions {
                build_args: opts.build_args.clone(),
                target: opts.target.clone(),
                target_platform: target.clone(),
                platform_args: plan::platform_args(target, &build_platform),
                named_contexts: plan::NamedContext::all_of(&opts.named_contexts),
            };
            plan::plan(&recipe, &plan_opts).map_err(|source| BuildError::Plan {
                file: file.clone(),
                source,
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    for wanted in &opts.no_cache_filter {
        if plan::find_stage(&recipe, wanted, recipe.stages.len()).is_none() {
            return Err(BuildError::Plan {
                file: file.clone(),
                source: PlanError::UnknownTarget(format!("{wanted} (--no-cache-filter)")),
            });
        }
    }
    for unused in &plans[0].unused_build_args {
        progress.warn(&format!(
            "build arg {unused:?} was given but no stage declares it"
        ));
    }
    let recipe_abs = std::fs::canonicalize(&opts.recipe_path).ok();
    let context =
        Context::open(&opts.context_dir, recipe_abs.as_deref()).map_err(BuildError::ContextDir)?;
    let _lease = store.build_lease()?;
    let named = named::open_named(store, &opts.named_contexts)?;
    let (sandbox, layer_kind) = sandboxing::prepare(opts, store, progress)?;
    let client = Client::new(ClientOptions {
        tls_verify: opts.tls_verify,
        ..Default::default()
    });
    let mut caches: Vec<Box<dyn CacheBackend + '_>> = vec![Box::new(LocalCache::new(store))];
    if !opts.cache_from.is_empty() && !opts.no_cache {
        let (shared, warnings) = open_imports(store, &client, &opts.cache_from);
        for w in warnings {
            progress.warn(&w);
        }
        caches.extend(shared);
    }
    let shared = Shared {
        store,
        opts,
        recipe: &recipe,
        progress,
        cancel,
        sandbox,
        client: &client,
        pulls: Mutex::new(BTreeSet::new()),
        lexer: Lexer::new(recipe.directives.escape),
        context,
        named,
        file,
        recipe_id: std::fs::canonicalize(&opts.recipe_path)
            .unwrap_or_else(|_| opts.recipe_path.clone())
            .display()
            .to_string(),
        caches,
        key_basis: KeyBasis {
            source_date_epoch: opts.source_date_epoch,
            snapshotter: layer_kind.to_string(),
        },
        rejected: Mutex::default(),
        warned: Mutex::default(),
        stopped_others: AtomicBool::new(false),
        steps: cache::StepClaims::default(),
        context_digests: once::OnceMap::default(),
    };
    let several = targets.len() > 1;
    let engines: Vec<Engine> = targets
        .into_iter()
        .zip(plans)
        .map(|(target, plan)| Engine {
            shared: &shared,
            label: several.then(|| target.to_string()),
            target,
            image_stages: image_stages(&plan),
            plan,
            outcomes: Mutex::default(),
        })
        .collect();
    for engine in &engines {
        engine.check_emulation()?;
    }
    cache::build_attempts(&shared, &engines)
}

/// Where a layer step is: for messages, step identities and history.
#[derive(Clone)]
struct StepPlace {
    stage: usize,
    n: usize,
    line: usize,
    created_by: String,
}

/// What the builds of all platforms share: the store, the options, the context, the sandbox,
/// the caches, and what keeps them from doing one piece of work twice.
struct Shared<'a> {
    store: &'a Store,
    opts: &'a BuildOptions,
    recipe: &'a Recipe,
    progress: &'a Progress,
    cancel: &'a AtomicBool,
    sandbox: crate::sandbox::Sandbox,
    client: &'a Client,
    /// Serialises pulls so parallel stages do not fetch one image twice; holds what `--pull`
    /// asked the registry for in this build.
    pulls: Mutex<BTreeSet<String>>,
    lexer: Lexer,
    context: Context,
    /// The `--build-context`s (but `target:` ones, which the plan resolved).
    named: BTreeMap<String, named::Named>,
    file: String,
    recipe_id: String,
    /// The local store's cache first, then the `--cache-from` caches in order.
    caches: Vec<Box<dyn CacheBackend + 'a>>,
    /// What every step's cache key includes besides the step ([`Engine::step_key`]).
    key_basis: KeyBasis,
    /// Layers of shared caches found unusable in an earlier attempt.
    rejected: Mutex<BTreeSet<Digest>>,
    /// Warnings given once.
    warned: Mutex<BTreeSet<String>>,
    /// Set when a failed stage (not the user) raised `cancel` to stop the others.
    stopped_others: AtomicBool,
    /// The cache keys of the steps running now, so a step another platform's build is running
    /// is waited for, not run twice.
    steps: cache::StepClaims,
    /// COPY sources' content digests by context path, computed once for all platforms.
    context_digests: once::OnceMap<String, BTreeMap<String, String>>,
}

/// The build for one target platform: its plan (the platform ARGs differ, and so may FROM
/// lines that use them) and what its steps did, over what all platforms share (reached
/// through `Deref`, so a field of [`Shared`] reads as one of the engine).
struct Engine<'a> {
    shared: &'a Shared<'a>,
    /// The platform built for (TARGETPLATFORM).
    target: Platform,
    plan: Plan,
    /// The platform shown before each stage's name when several are built.
    label: Option<String>,
    /// The stages whose steps make the image's layers (`--cache-to mode=min`).
    image_stages: BTreeSet<usize>,
    /// What the steps did (reset for each attempt).
    outcomes: Mutex<Outcomes>,
}

impl<'a> std::ops::Deref for Engine<'a> {
    type Target = Shared<'a>;
    fn deref(&self) -> &Shared<'a> {
        self.shared
    }
}

/// Shared scheduler state for parallel stages.
struct Schedule {
    state: Mutex<Slots>,
    changed: Condvar,
}

/// What the stage threads share: finished stages (by engine, then stage), the first error,
/// free job slots.
struct Slots {
    done: Vec<Vec<Option<Arc<StageState>>>>,
    error: Option<BuildError>,
    free: usize,
}

/// Builds the target stage of every engine: each stage of each platform on a thread of its
/// own, started when the stages it needs are done and a job slot is free (`--jobs` slots per
/// platform, so a slow emulated platform never waits for the others' slots); the first error
/// cancels the rest.
fn run_stages(shared: &Shared, engines: &[Engine]) -> Result<Vec<StageState>, BuildError> {
    let n = shared.recipe.stages.len();
    let schedule = Schedule {
        state: Mutex::new(Slots {
            done: vec![vec![None; n]; engines.len()],
            error: None,
            free: shared.opts.jobs.max(1) * engines.len(),
        }),
        changed: Condvar::new(),
    };
    std::thread::scope(|scope| {
        for (e, engine) in engines.iter().enumerate() {
            for &index in &engine.plan.needed {
                let schedule = &schedule;
                scope.spawn(move || {
                    let deps = {
                        let mut guard = schedule.state.lock().unwrap_or_else(|e| e.into_inner());
                        loop {
                            if guard.error.is_some() {
                                return;
                            }
                            let deps = &engine.plan.stages[index].deps;
                            let ready: Option<BTreeMap<usize, Arc<StageState>>> = deps
                                .iter()
                                .map(|d| guard.done[e][*d].clone().map(|s| (*d, s)))
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
                    let result = engine.build_stage(index, &deps);
                    let mut guard = schedule.state.lock().unwrap_or_else(|e| e.into_inner());
                    guard.free += 1;
                    match result {
                        Ok(state) => guard.done[e][index] = Some(Arc::new(state)),
                        Err(err) => {
                            if guard.error.is_none() {
                                guard.error = Some(err);
                            }
                            // Stop the other stages; remember whether it was us.
                            if !engine.cancel.swap(true, Ordering::SeqCst) {
                                engine.stopped_others.store(true, Ordering::SeqCst);
                            }
                        }
                    }
                    schedule.changed.notify_all();
                });
            }
        }
    });
    let Slots { done, error, .. } = schedule
        .state
        .into_inner()
        .unwrap_or_else(|e| e.into_inner());
    if let Some(e) = error {
        return Err(e);
    }
    engines
        .iter()
        .zip(done)
        .map(|(engine, mut done)| {
            done[engine.plan.target]
                .take()
                .map(|s| Arc::try_unwrap(s).unwrap_or_else(|a| (*a).clone()))
                .ok_or(BuildError::Cancelled)
        })
        .collect()
}

impl Engine<'_> {
    /// Fails unless every needed stage with RUN steps is for a platform the host runs, natively
    /// or through a registered emulator; checked before anything is built.
    fn check_emulation(&self) -> Result<(), BuildError> {
        for &index in &self.plan.needed {
            let stage = &self.recipe.stages[index];
            let platform = &self.plan.stages[index].platform;
            let runs = stage
                .instructions
                .iter()
                .any(|i| matches!(i.kind, InstructionKind::Run(_)));
            if !runs {
                continue;
            }
            binfmt::emulator_for(&platform.architecture).map_err(|source| {
                BuildError::Emulation {
                    file: self.file.clone(),
                    line: stage.span.start_line,
                    stage: self.stage_name(index),
                    platform: platform.to_string(),
                    source: Box::new(source),
                }
            })?;
        }
        Ok(())
    }

    /// Whether `--no-cache-filter` names the stage.
    fn no_cache_stage(&self, index: usize) -> bool {
        self.opts
            .no_cache_filter
            .iter()
            .any(|f| plan::find_stage(self.recipe, f, self.recipe.stages.len()) == Some(index))
    }

    /// The stage's name (or `stage-N`), after its platform when several are built
    /// (`linux/arm64 build`, as BuildKit shows it).
    fn stage_name(&self, index: usize) -> String {
        let name = self.recipe.stages[index]
            .name
            .clone()
            .unwrap_or_else(|| format!("stage-{index}"));
        match &self.label {
            Some(platform) => format!("{platform} {name}"),
            None => name,
        }
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
        let started = Instant::now();
        let platform = &self.plan.stages[index].platform;
        let mut st = match &self.plan.stages[index].base {
            Base::Scratch => scratch_state(platform),
            Base::Stage(i) => (*deps[i]).clone(),
            Base::Image(r) => self.load_image(r, stage.span.start_line, platform)?,
            Base::Context(name) => self.named_base(
                name,
                index,
                stage.span.start_line,
                label(1, &format!("build context {name}"), stage.span.start_line),
            )?,
        };
        step.ready();
        st.begin_step();
        self.report(
            index,
            0,
            &st,
            &stage.text,
            stage.span.start_line,
            started,
            None,
        );
        if self.plan.stages[index].replaced {
            // A build context of the stage's name stands for the whole stage.
            return Ok(st);
        }
        st.args = BTreeMap::new();
        st.shell = st.config.config.shell.clone().unwrap_or_else(default_shell);
        st.cmd_set = false;
        let triggers = st.config.config.on_build.take().unwrap_or_default();
        for (t, trigger) in triggers.iter().enumerate() {
            let instr = self.parse_trigger(trigger, stage.span.start_line)?;
            let text = format!("ONBUILD {trigger}");
            let step = self.progress.step(label(1, &text, stage.span.start_line));
            let (started, below) = (Instant::now(), st.layers.len());
            st.begin_step();
            self.execute(index, usize::MAX, &mut st, &instr, step, deps)?;
            self.check_config_size(&st, &instr)?;
            let line = stage.span.start_line;
            self.report(index, 1 + t, &st, &text, line, started, Some(below));
        }
        for (n, instr) in stage.instructions.iter().enumerate() {
            if self.cancel.load(Ordering::SeqCst) {
                return Err(BuildError::Cancelled);
            }
            let step = self
                .progress
                .step(label(n + 2, &instr.text, instr.span.start_line));
            let (started, below) = (Instant::now(), st.layers.len());
            st.begin_step();
            self.execute(index, n, &mut st, instr, step, deps)?;
            self.check_config_size(&st, instr)?;
            let (order, line) = (1 + triggers.len() + n, instr.span.start_line);
            self.report(index, order, &st, &instr.text, line, started, Some(below));
        }
        Ok(st)
    }

    /// Fails, at `instr`, once the stage's image config and the build args in scope together
    /// grow past [`image::MAX_CONFIG_LEN`] (a recipe could otherwise grow them without bound, one
    /// capped value at a time).
    fn check_config_size(&self, st: &StageState, instr: &Instruction) -> Result<(), BuildError> {
        let args: usize = st.args.iter().map(|(k, v)| k.len() + v.len()).sum();
        let config = serde_json::to_vec(&st.config).map_or(0, |j| j.len());
        let size = config + args;
        if size <= image::MAX_CONFIG_LEN {
            return Ok(());
        }
        let keyword = instr.text.split_whitespace().next().unwrap_or("");
        Err(BuildError::Recipe(RecipeError::in_word(
            &self.file,
            &self.opts.recipe_bytes,
            instr.span.start_line,
            keyword,
            0,
            format!(
                "the stage's image config and build args grow to {size} bytes here, over the \
                 limit of {} MiB",
                image::MAX_CONFIG_LEN >> 20
            ),
        )))
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
            .map_err(|e| self.expansion_error(line, word, &e))
    }

    /// An expansion error, located at the construct that failed in the recipe.
    fn expansion_error(
        &self,
        line: usize,
        word: &str,
        e: &crate::recipe::shell::ShellError,
    ) -> BuildError {
        BuildError::Recipe(RecipeError::in_word(
            &self.file,
            &self.opts.recipe_bytes,
            line,
            word,
            e.offset(),
            e.to_string(),
        ))
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
            .map_err(|e| self.expansion_error(line, word, &e))
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
        if !self.opts.platforms.is_empty() {
            // Asked for by name, the platform is the image's, whatever stage it ends with
            // (a final stage pinned to $BUILDPLATFORM), as BuildKit does.
            let config = &mut st.config;
            let same =
                config.os == self.target.os && config.architecture == self.target.architecture;
            config.os = self.target.os.clone();
            config.architecture = self.target.architecture.clone();
            if self.target.variant.is_some() || !same {
                config.variant = self.target.variant.clone();
            }
        }
        if !self.opts.lazy_layers {
            for l in &st.layers {
                self.fetch_layer(l)?;
            }
        }
        let layers: Vec<Descriptor> = st.layers.iter().map(|l| l.desc.clone()).collect();
        let mut annotations = BTreeMap::new();
        if self.opts.inline_cache {
            let outcomes = self.outcomes.lock().unwrap_or_else(|e| e.into_inner());
            let (k, v) = inline_annotation(&outcomes.records, &layers);
            annotations.insert(k, v);
        }
        Ok(self
            .store
            .put_image_annotated(&st.config, &layers, annotations)?)
    }
}

/// The state of a stage `FROM scratch` for `platform`; its cache key names the platform, as
/// every key derived from it then does.
fn scratch_state(platform: &Platform) -> StageState {
    let mut config = ImageConfig {
        os: platform.os.clone(),
        architecture: platform.architecture.clone(),
        variant: platform.variant.clone(),
        ..Default::default()
    };
    config.config.env.push(format!("PATH={DEFAULT_PATH}"));
    StageState {
        config,
        layers: Vec::new(),
        key: Digest::of(format!("scratch\n{platform}").as_bytes()),
        created: None,
        args: BTreeMap::new(),
        shell: default_shell(),
        cmd_set: false,
        cached: Cached::Local,
        reason: None,
        looked_up: false,
    }
}
