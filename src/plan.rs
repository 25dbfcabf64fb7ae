//! The build plan: stages as a DAG, global-ARG resolution for FROM lines, `--target` pruning,
//! the order stages may run in, and cache-key derivation. Pure: no filesystem, no clock.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use crate::digest::Digest;
use crate::image::Platform;
use crate::recipe::instructions::{InstructionKind, Recipe, Span};
use crate::recipe::shell::Lexer;
use crate::sources::named::NamedSource;

/// Bumped whenever the cache-key encoding changes, so old records can never match.
pub const CACHE_KEY_VERSION: u32 = 3;

/// Build args usable without an ARG declaration, kept out of history and cache keys.
pub const PROXY_ARGS: [&str; 10] = [
    "HTTP_PROXY",
    "http_proxy",
    "HTTPS_PROXY",
    "https_proxy",
    "FTP_PROXY",
    "ftp_proxy",
    "NO_PROXY",
    "no_proxy",
    "ALL_PROXY",
    "all_proxy",
];

/// What a stage starts from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Base {
    /// `FROM scratch`: the empty image.
    Scratch,
    /// An earlier stage, by index.
    Stage(usize),
    /// An image reference (looked up in the store, else pulled).
    Image(String),
    /// A `--build-context` of this name (a directory, an image or an OCI layout).
    Context(String),
}

/// Where a `COPY --from` reads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CopySource {
    /// Another stage's final filesystem.
    Stage(usize),
    /// An image's filesystem.
    Image(String),
    /// A `--build-context` of this name.
    Context(String),
}

/// What the plan needs to know of a `--build-context`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NamedContext {
    /// `target:STAGE`: another name for a stage of the recipe.
    Stage(String),
    /// Anything else (a directory, an image, an OCI layout): resolved by the builder.
    External,
}

impl NamedContext {
    /// The plan's view of a build's named contexts.
    pub fn all_of(named: &BTreeMap<String, NamedSource>) -> BTreeMap<String, NamedContext> {
        named
            .iter()
            .map(|(name, source)| {
                let seen = match source {
                    NamedSource::Stage(s) => NamedContext::Stage(s.clone()),
                    _ => NamedContext::External,
                };
                (name.clone(), seen)
            })
            .collect()
    }
}

/// One stage of the plan.
#[derive(Clone, Debug)]
pub struct StagePlan {
    /// Index in the recipe.
    pub index: usize,
    /// Name from `AS`.
    pub name: Option<String>,
    /// The resolved base.
    pub base: Base,
    /// Stages this stage needs finished first (base and `COPY --from`), sorted.
    pub deps: Vec<usize>,
    /// `COPY --from` and `RUN --mount=…,from=` values resolved, keyed by the raw value.
    pub copy_sources: BTreeMap<String, CopySource>,
    /// The platform the stage is for (its images, its RUN steps): `FROM --platform=`, else
    /// its base stage's, else the build's target platform.
    pub platform: Platform,
    /// A `--build-context` of the stage's name replaces it: its instructions are not run.
    pub replaced: bool,
}

/// The whole plan for one build.
#[derive(Clone, Debug)]
pub struct Plan {
    /// Every stage of the recipe (only those in `needed` are built).
    pub stages: Vec<StagePlan>,
    /// The target stage.
    pub target: usize,
    /// Stages the target needs (itself included), ascending.
    pub needed: Vec<usize>,
    /// Global ARG values (after build args), usable by stages that redeclare them.
    pub meta_args: BTreeMap<String, String>,
    /// Build args given that no stage declares (for a warning).
    pub unused_build_args: Vec<String>,
}

/// A planning error, located in the recipe where it has a location.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    /// `--target` names no stage.
    #[error("target stage {0:?} not found in the recipe")]
    UnknownTarget(String),
    /// A `--build-context NAME=target:STAGE` names no stage defined before its use.
    #[error("line {line}: --build-context target:{name} names no stage defined before this one")]
    NamedStage {
        /// The stage asked for.
        name: String,
        /// The line of the stage that uses it.
        line: usize,
    },
    /// A FROM line expanded to nothing usable.
    #[error("line {line}: {message}")]
    Invalid {
        /// The recipe line.
        line: usize,
        /// What is wrong.
        message: String,
    },
}

/// Inputs that come from the command line.
#[derive(Clone, Debug, Default)]
pub struct PlanOptions {
    /// `--build-arg` values.
    pub build_args: BTreeMap<String, String>,
    /// `--target`.
    pub target: Option<String>,
    /// The platform this plan builds for (TARGETPLATFORM).
    pub target_platform: Platform,
    /// Values of the predefined platform ARGs.
    pub platform_args: BTreeMap<String, String>,
    /// `--build-context` names.
    pub named_contexts: BTreeMap<String, NamedContext>,
}

fn invalid(span: Span, message: impl Into<String>) -> PlanError {
    PlanError::Invalid {
        line: span.start_line,
        message: message.into(),
    }
}

/// Resolves stages, bases, `COPY --from` sources and the target; prunes unneeded stages.
pub fn plan(recipe: &Recipe, opts: &PlanOptions) -> Result<Plan, PlanError> {
    let lexer = Lexer::new(recipe.directives.escape);
    let mut meta: BTreeMap<String, String> = opts.platform_args.clone();
    let mut declared: BTreeSet<String> = BTreeSet::new();
    for instr in &recipe.meta_args {
        if let InstructionKind::Arg(decls) = &instr.kind {
            for d in decls {
                declared.insert(d.name.clone());
                let value = match (opts.build_args.get(&d.name), &d.default) {
                    (Some(v), _) => Some(v.clone()),
                    (None, Some(raw)) => Some(
                        lexer
                            .process_word(raw, &meta)
                            .map_err(|e| invalid(instr.span, e.to_string()))?
                            .value,
                    ),
                    (None, None) => None,
                };
                if let Some(v) = value {
                    meta.insert(d.name.clone(), v);
                }
            }
        }
    }

    let find_stage = |value: &str, before: usize| find_stage(recipe, value, before);
    // `target:STAGE`: the stage must come before the one that uses it, as for any reference.
    let named_stage = |wanted: &str, before: usize| -> Result<usize, PlanError> {
        find_stage(wanted, before).ok_or_else(|| PlanError::NamedStage {
            name: wanted.to_string(),
            line: recipe.stages[before].span.start_line,
        })
    };
    let defined_later = |value: &str, index: usize| {
        let lower = value.to_ascii_lowercase();
        recipe.stages[index..]
            .iter()
            .any(|s| s.name.as_deref() == Some(lower.as_str()))
    };

    let mut stages: Vec<StagePlan> = Vec::with_capacity(recipe.stages.len());
    for (index, stage) in recipe.stages.iter().enumerate() {
        let base_text = lexer
            .process_word(&stage.base, &meta)
            .map_err(|e| invalid(stage.span, e.to_string()))?
            .value;
        // A value that expands to nothing (an unset ARG) leaves the stage's default.
        let explicit =
            match &stage.platform {
                Some(raw) => {
                    let wanted = lexer
                        .process_word(raw, &meta)
                        .map_err(|e| invalid(stage.span, e.to_string()))?
                        .value;
                    match wanted.is_empty() {
                        true => None,
                        false => Some(Platform::parse(&wanted).map_err(|e| {
                            invalid(stage.span, format!("FROM --platform={raw}: {e}"))
                        })?),
                    }
                }
                None => None,
            };
        if base_text.is_empty() {
            return Err(invalid(
                stage.span,
                format!("FROM {:?} expands to an empty name", stage.base),
            ));
        }
        let own_context = stage
            .name
            .as_deref()
            .and_then(|n| opts.named_contexts.get_key_value(n));
        let base = if let Some((name, named)) = own_context {
            // The stage is replaced by the context of its name.
            match named {
                NamedContext::External => Base::Context(name.clone()),
                NamedContext::Stage(s) => Base::Stage(named_stage(s, index)?),
            }
        } else if let Some((name, named)) = named_context(&opts.named_contexts, &base_text) {
            match named {
                NamedContext::External => Base::Context(name.clone()),
                NamedContext::Stage(s) => Base::Stage(named_stage(s, index)?),
            }
        } else if base_text.eq_ignore_ascii_case("scratch") {
            Base::Scratch
        } else if let Some(i) = find_stage(&base_text, index) {
            // `FROM 0` names stage 0, as in buildah.
            Base::Stage(i)
        } else if defined_later(&base_text, index) {
            return Err(invalid(
                stage.span,
                format!("stage {base_text:?} is used before it is defined"),
            ));
        } else {
            Base::Image(base_text)
        };
        let mut deps = BTreeSet::new();
        if let Base::Stage(i) = base {
            deps.insert(i);
        }
        let mut copy_sources = BTreeMap::new();
        let replaced = own_context.is_some();
        let instructions = if replaced {
            &[][..]
        } else {
            &stage.instructions[..]
        };
        for instr in instructions {
            let froms: Vec<&str> = match &instr.kind {
                InstructionKind::Copy(c) | InstructionKind::Add(c) => {
                    c.from.iter().map(String::as_str).collect()
                }
                InstructionKind::Run(r) => r.mounts.iter().filter_map(|m| mount_from(m)).collect(),
                _ => Vec::new(),
            };
            for raw in froms {
                let value = lexer
                    .process_word(raw, &meta)
                    .map_err(|e| invalid(instr.span, e.to_string()))?
                    .value;
                if value.is_empty() && matches!(instr.kind, InstructionKind::Run(_)) {
                    // `RUN --mount=type=bind,from=` names the context, as no `from` does.
                    continue;
                }
                let source = match named_context(&opts.named_contexts, &value) {
                    Some((name, NamedContext::External)) => CopySource::Context(name.clone()),
                    Some((_, NamedContext::Stage(s))) => {
                        let i = named_stage(s, index)?;
                        deps.insert(i);
                        CopySource::Stage(i)
                    }
                    None => match find_stage(&value, index) {
                        Some(i) => {
                            deps.insert(i);
                            CopySource::Stage(i)
                        }
                        None if value.parse::<usize>().is_ok() => {
                            return Err(invalid(
                                instr.span,
                                format!("--from={value}: no earlier stage has that index"),
                            ));
                        }
                        None => CopySource::Image(value),
                    },
                };
                copy_sources.insert(raw.to_string(), source);
            }
        }
        let platform = match (explicit, &base) {
            (Some(p), _) => p,
            (None, Base::Stage(i)) => stages[*i].platform.clone(),
            (None, _) => opts.target_platform.clone(),
        };
        stages.push(StagePlan {
            index,
            name: stage.name.clone(),
            base,
            deps: deps.into_iter().collect(),
            copy_sources,
            platform,
            replaced,
        });
    }

    let target = match &opts.target {
        None => stages
            .len()
            .checked_sub(1)
            .ok_or_else(|| PlanError::UnknownTarget(String::new()))?,
        Some(t) => {
            find_stage(t, stages.len()).ok_or_else(|| PlanError::UnknownTarget(t.clone()))?
        }
    };
    let mut needed = BTreeSet::new();
    let mut todo = vec![target];
    while let Some(i) = todo.pop() {
        if needed.insert(i) {
            todo.extend(stages[i].deps.iter().copied());
        }
    }

    for stage in &recipe.stages {
        for instr in &stage.instructions {
            if let InstructionKind::Arg(decls) = &instr.kind {
                declared.extend(decls.iter().map(|d| d.name.clone()));
            }
        }
    }
    let unused_build_args = opts
        .build_args
        .keys()
        .filter(|k| {
            !declared.contains(*k)
                && !PROXY_ARGS.contains(&k.as_str())
                && k.as_str() != "SOURCE_DATE_EPOCH"
        })
        .cloned()
        .collect();

    Ok(Plan {
        stages,
        target,
        needed: needed.into_iter().collect(),
        meta_args: meta,
        unused_build_args,
    })
}

/// The stage a `--from`, `--target` or `target:` value names before stage `before`: the
/// latest stage of that name (any case) defined before it (a name defined twice means the
/// second one from there on, as in BuildKit), or the stage of that index.
pub fn find_stage(recipe: &Recipe, value: &str, before: usize) -> Option<usize> {
    let lower = value.to_ascii_lowercase();
    let named = recipe.stages[..before.min(recipe.stages.len())]
        .iter()
        .rposition(|s| s.name.as_deref() == Some(lower.as_str()));
    named.or_else(|| value.parse::<usize>().ok().filter(|&i| i < before))
}

/// The predefined platform ARGs for a build for `target` on `build`, as BuildKit sets them:
/// `TARGETPLATFORM` (`linux/arm/v7`), `TARGETOS`, `TARGETARCH`, `TARGETVARIANT` (empty when
/// none), and the same four `BUILD*` ones.
pub fn platform_args(target: &Platform, build: &Platform) -> BTreeMap<String, String> {
    let mut args = BTreeMap::new();
    for (prefix, p) in [("TARGET", target), ("BUILD", build)] {
        args.insert(format!("{prefix}PLATFORM"), p.to_string());
        args.insert(format!("{prefix}OS"), p.os.clone());
        args.insert(format!("{prefix}ARCH"), p.architecture.clone());
        args.insert(
            format!("{prefix}VARIANT"),
            p.variant.clone().unwrap_or_default(),
        );
    }
    args
}

/// The raw `from=` value of a `RUN --mount` spec (`type=bind,from=build,source=/out,...`).
pub fn mount_from(spec: &str) -> Option<&str> {
    spec.split(',').find_map(|f| f.strip_prefix("from="))
}

/// Everything that determines a step's result besides its parent. Serialised canonically
/// (sorted keys) and hashed together with the parent key.
#[derive(Clone, Debug, Default, Serialize, serde::Deserialize, PartialEq)]
pub struct StepInputs {
    /// The instruction after expansion (e.g. `RUN ["/bin/sh","-c","make"]`, `COPY a b /dst`).
    pub instruction: String,
    /// Environment in effect (from ENV).
    pub env: BTreeMap<String, String>,
    /// ARGs in scope and their values (a RUN sees them; proxy args excluded).
    pub args: BTreeMap<String, String>,
    /// USER in effect.
    pub user: String,
    /// WORKDIR in effect.
    pub workdir: String,
    /// SHELL in effect.
    pub shell: Vec<String>,
    /// Content of COPY/ADD sources: path → digest of (mode, size, content, link target).
    pub files: BTreeMap<String, String>,
    /// Identity of a `--from` source (the source stage's key or the image's manifest digest).
    pub from: String,
}

/// What every step's layer depends on besides the step itself: settings of the whole build
/// that change the bytes of the layers it writes (and the times it records). Part of every
/// key ([`cache_key`]), so no kind of step can leave it out.
#[derive(Clone, Debug, Default, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct KeyBasis {
    /// SOURCE_DATE_EPOCH, however it was given (`--source-date-epoch`, the build arg, the
    /// environment variable): layers clamp file times to it and steps record it as their time.
    /// No epoch (None) is a value of its own: such layers keep the files' times.
    pub source_date_epoch: Option<i64>,
    /// The kind of layers the snapshotter writes for a step (`overlay`: the kernel's overlayfs
    /// and the copying snapshotter; `fuse-overlayfs`), which differ in corner cases.
    pub snapshotter: String,
}

impl KeyBasis {
    /// What differs from `old`, in words (`SOURCE_DATE_EPOCH changed (0 -> unset)`).
    fn differences(&self, old: &KeyBasis) -> Vec<String> {
        let epoch = |e: Option<i64>| e.map_or("unset".to_string(), |e| e.to_string());
        let mut reasons = Vec::new();
        if old.source_date_epoch != self.source_date_epoch {
            reasons.push(format!(
                "SOURCE_DATE_EPOCH changed ({} -> {})",
                epoch(old.source_date_epoch),
                epoch(self.source_date_epoch)
            ));
        }
        if old.snapshotter != self.snapshotter {
            reasons.push(format!(
                "snapshotter layers changed ({} -> {})",
                old.snapshotter, self.snapshotter
            ));
        }
        reasons
    }
}

/// The cache key of a step: sha256 over the key version, the parent key, the build's basis and
/// the step's inputs.
pub fn cache_key(parent: &Digest, basis: &KeyBasis, inputs: &StepInputs) -> Digest {
    let mut buf = format!("kiln-cache-v{CACHE_KEY_VERSION}\n{parent}\n").into_bytes();
    buf.extend(serde_json::to_vec(basis).unwrap_or_default());
    buf.push(b'\n');
    buf.extend(serde_json::to_vec(inputs).unwrap_or_default());
    Digest::of(&buf)
}

/// Explains, in a few words, what differs between the inputs of a previous build of a step and
/// this one (`files`: "1 file changed: app/main.py"). `bases` are the old build's key basis
/// (None for records that do not say) and this one's.
pub fn explain_difference(
    old: &StepInputs,
    new: &StepInputs,
    bases: (Option<&KeyBasis>, &KeyBasis),
    parent_changed: bool,
) -> String {
    let mut reasons = match bases {
        (Some(old_basis), basis) => basis.differences(old_basis),
        (None, _) => Vec::new(),
    };
    // A changed basis changes every key: that earlier steps changed too says nothing more.
    let parent_changed = parent_changed && reasons.is_empty();
    if old.instruction != new.instruction {
        reasons.push("instruction changed".to_string());
    }
    for (k, v) in &new.args {
        match old.args.get(k) {
            Some(o) if o == v => {}
            Some(_) => reasons.push(format!("build arg {k} changed")),
            None => reasons.push(format!("build arg {k} added")),
        }
    }
    for k in old.args.keys().filter(|k| !new.args.contains_key(*k)) {
        reasons.push(format!("build arg {k} removed"));
    }
    let env_changed: Vec<&String> = new
        .env
        .iter()
        .filter(|(k, v)| old.env.get(*k) != Some(v))
        .map(|(k, _)| k)
        .chain(old.env.keys().filter(|k| !new.env.contains_key(*k)))
        .collect();
    if !env_changed.is_empty() {
        reasons.push(format!("env {} changed", join_names(&env_changed)));
    }
    if old.user != new.user {
        reasons.push("user changed".to_string());
    }
    if old.workdir != new.workdir {
        reasons.push("workdir changed".to_string());
    }
    if old.shell != new.shell {
        reasons.push("shell changed".to_string());
    }
    let mut changed: Vec<&String> = Vec::new();
    let (mut added, mut removed) = (Vec::new(), Vec::new());
    for (path, d) in &new.files {
        match old.files.get(path) {
            Some(o) if o == d => {}
            Some(_) => changed.push(path),
            None => added.push(path),
        }
    }
    for path in old.files.keys().filter(|p| !new.files.contains_key(*p)) {
        removed.push(path);
    }
    for (what, list) in [
        ("changed", &changed),
        ("added", &added),
        ("removed", &removed),
    ] {
        if !list.is_empty() {
            let noun = if list.len() == 1 { "file" } else { "files" };
            reasons.push(format!(
                "{} {noun} {what}: {}",
                list.len(),
                join_names(list)
            ));
        }
    }
    if old.from != new.from {
        reasons.push("--from source changed".to_string());
    }
    if parent_changed {
        reasons.push("an earlier step changed".to_string());
    }
    if reasons.is_empty() {
        reasons.push("the cached result is gone".to_string());
    }
    reasons.join(", ")
}

fn join_names(names: &[&String]) -> String {
    const SHOWN: usize = 3;
    let mut s = names
        .iter()
        .take(SHOWN)
        .map(|n| n.as_str())
        .collect::<Vec<_>>()
        .join(", ");
    if names.len() > SHOWN {
        s.push_str(&format!(" and {} more", names.len() - SHOWN));
    }
    s
}

/// The `--build-context` an image name in `FROM` or `--from=` stands for: the context of that
/// exact name, else of its short form, as BuildKit looks them up (`docker.io/library/alpine:latest`
/// finds a context named `alpine`, `docker.io/library/alpine:3.19` one named `alpine:3.19`).
fn named_context<'a>(
    named: &'a BTreeMap<String, NamedContext>,
    image: &str,
) -> Option<(&'a String, &'a NamedContext)> {
    named
        .get_key_value(image)
        .or_else(|| named.get_key_value(&familiar_name(image)))
}

/// An image name in Docker's short ("familiar") form: without `docker.io/`, `library/` and
/// `:latest`.
fn familiar_name(image: &str) -> String {
    let mut name = image;
    for registry in ["docker.io/", "index.docker.io/"] {
        name = name.strip_prefix(registry).unwrap_or(name);
    }
    if let Some(official) = name.strip_prefix("library/")
        && !official.contains('/')
    {
        name = official;
    }
    let last = name.rsplit('/').next().unwrap_or(name);
    match last.contains('@') {
        true => name.to_string(),
        false => name.strip_suffix(":latest").unwrap_or(name).to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::recipe::parse;

    fn plan_of(src: &str, target: Option<&str>, args: &[(&str, &str)]) -> Plan {
        let recipe = parse(src.as_bytes(), "Dockerfile").unwrap();
        let opts = PlanOptions {
            build_args: args
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            target: target.map(str::to_string),
            ..Default::default()
        };
        plan(&recipe, &opts).unwrap()
    }

    #[test]
    fn prunes_stages_the_target_does_not_need() {
        let p = plan_of(
            "FROM scratch AS a\nFROM scratch AS b\nFROM a AS c\nCOPY --from=0 / /\nFROM scratch\n",
            Some("c"),
            &[],
        );
        assert_eq!(p.target, 2);
        assert_eq!(p.needed, vec![0, 2]);
        assert_eq!(p.stages[2].base, Base::Stage(0));
        assert_eq!(
            p.stages[2].copy_sources.get("0"),
            Some(&CopySource::Stage(0))
        );
    }

    #[test]
    fn global_args_resolve_from_lines() {
        let src = "ARG IMG=base\nARG TAG\nFROM ${IMG}:${TAG:-1}\n";
        assert_eq!(
            plan_of(src, None, &[]).stages[0].base,
            Base::Image("base:1".into())
        );
        assert_eq!(
            plan_of(src, None, &[("TAG", "2")]).stages[0].base,
            Base::Image("base:2".into())
        );
    }

    #[test]
    fn copy_from_image_and_unused_args() {
        let p = plan_of(
            "FROM scratch\nCOPY --from=alpine:3 /x /x\n",
            None,
            &[("NOPE", "1"), ("HTTP_PROXY", "p")],
        );
        assert_eq!(
            p.stages[0].copy_sources.get("alpine:3"),
            Some(&CopySource::Image("alpine:3".into()))
        );
        assert_eq!(p.unused_build_args, vec!["NOPE".to_string()]);
    }

    #[test]
    fn run_mount_sources_are_dependencies() {
        let p = plan_of(
            "FROM scratch AS build\nFROM scratch\nRUN --mount=type=bind,from=build,target=/b true\n",
            None,
            &[],
        );
        assert_eq!(p.stages[1].deps, vec![0]);
        assert_eq!(p.needed, vec![0, 1]);
        assert_eq!(
            p.stages[1].copy_sources.get("build"),
            Some(&CopySource::Stage(0))
        );
    }

    #[test]
    fn stages_take_the_platform_of_from_then_their_base_then_the_target() {
        let src = "ARG ARCH=arm64\nFROM --platform=$BUILDPLATFORM scratch AS build\n\
                   FROM build AS more\nFROM --platform=linux/${ARCH} scratch AS arm\n\
                   FROM scratch\nCOPY --from=more / /\nCOPY --from=arm / /\n";
        let recipe = parse(src.as_bytes(), "Dockerfile").unwrap();
        let opts = PlanOptions {
            target_platform: Platform::parse("linux/s390x").unwrap(),
            platform_args: [("BUILDPLATFORM".to_string(), "linux/amd64".to_string())].into(),
            ..Default::default()
        };
        let p = plan(&recipe, &opts).unwrap();
        let names: Vec<String> = p.stages.iter().map(|s| s.platform.to_string()).collect();
        assert_eq!(
            names,
            ["linux/amd64", "linux/amd64", "linux/arm64", "linux/s390x"]
        );
        let unset = parse(b"ARG P\nFROM --platform=$P scratch\n", "Dockerfile").unwrap();
        assert_eq!(
            plan(&unset, &opts).unwrap().stages[0].platform.to_string(),
            "linux/s390x"
        );
        let bad = parse(b"FROM --platform=linux/nope scratch\n", "Dockerfile").unwrap();
        let e = plan(&bad, &opts).unwrap_err().to_string();
        assert!(e.contains("line 1") && e.contains("nope"), "{e}");
    }

    #[test]
    fn platform_args_are_set_as_buildkit_sets_them() {
        let arm = Platform::parse("linux/arm/v7").unwrap();
        let amd = Platform::parse("linux/amd64").unwrap();
        let args = platform_args(&arm, &amd);
        let get = |k: &str| args[k].as_str();
        assert_eq!(get("TARGETPLATFORM"), "linux/arm/v7");
        assert_eq!(get("TARGETOS"), "linux");
        assert_eq!(get("TARGETARCH"), "arm");
        assert_eq!(get("TARGETVARIANT"), "v7");
        assert_eq!(get("BUILDPLATFORM"), "linux/amd64");
        assert_eq!(get("BUILDARCH"), "amd64");
        assert_eq!(get("BUILDVARIANT"), "");
        let arm64 = platform_args(&Platform::parse("linux/arm64/v8").unwrap(), &amd);
        assert_eq!(arm64["TARGETPLATFORM"], "linux/arm64");
        assert_eq!(arm64["TARGETVARIANT"], "");
    }

    #[test]
    fn duplicate_stage_names_resolve_to_the_latest_definition() {
        let src = "FROM scratch AS x\nFROM x AS a\nFROM scratch AS x\nFROM x\nCOPY --from=x / /\n";
        let p = plan_of(src, None, &[]);
        assert_eq!(p.stages[1].base, Base::Stage(0));
        assert_eq!(p.stages[3].base, Base::Stage(2));
        assert_eq!(p.stages[3].copy_sources["x"], CopySource::Stage(2));
        assert_eq!(plan_of(src, Some("x"), &[]).target, 2);
    }

    #[test]
    fn from_an_index_names_an_earlier_stage() {
        let p = plan_of("FROM scratch\nFROM 0\nFROM 7\n", None, &[]);
        assert_eq!(p.stages[1].base, Base::Stage(0));
        assert_eq!(p.stages[2].base, Base::Image("7".into()));
    }

    #[test]
    fn named_contexts_resolve_bases_and_sources() {
        let recipe = parse(
            b"FROM base AS a\nCOPY --from=lib / /\nRUN --mount=from=lib,target=/l true\nFROM deps\nFROM alias\nCOPY --from=alias / /\n",
            "Dockerfile",
        )
        .unwrap();
        let named: BTreeMap<String, NamedContext> = [
            ("base", NamedContext::External),
            ("lib", NamedContext::External),
            ("alias", NamedContext::Stage("a".into())),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let opts = PlanOptions {
            named_contexts: named.clone(),
            ..Default::default()
        };
        let p = plan(&recipe, &opts).unwrap();
        assert_eq!(p.stages[0].base, Base::Context("base".into()));
        assert_eq!(
            p.stages[0].copy_sources.get("lib"),
            Some(&CopySource::Context("lib".into()))
        );
        assert_eq!(p.stages[1].base, Base::Image("deps".into()));
        assert_eq!(p.stages[2].base, Base::Stage(0));
        assert_eq!(
            p.stages[2].copy_sources.get("alias"),
            Some(&CopySource::Stage(0))
        );
        assert_eq!(p.stages[2].deps, vec![0]);
        assert!(!p.stages[0].replaced);

        // A context named like a stage replaces it: no dependencies, nothing of its own.
        let recipe = parse(
            b"FROM busybox AS deps\nCOPY --from=0 / /\nFROM deps\n",
            "Dockerfile",
        )
        .unwrap();
        let opts = PlanOptions {
            named_contexts: [("deps".to_string(), NamedContext::External)].into(),
            ..Default::default()
        };
        let p = plan(&recipe, &opts).unwrap();
        assert!(p.stages[0].replaced);
        assert_eq!(p.stages[0].base, Base::Context("deps".into()));
        assert!(p.stages[0].copy_sources.is_empty());

        // target: must name an earlier stage.
        let recipe = parse(b"FROM alias\nFROM busybox AS a\n", "Dockerfile").unwrap();
        let opts = PlanOptions {
            named_contexts: named,
            ..Default::default()
        };
        assert!(matches!(
            plan(&recipe, &opts),
            Err(PlanError::NamedStage { .. })
        ));
    }

    #[test]
    fn unknown_target_is_an_error() {
        let recipe = parse(b"FROM scratch AS a\n", "Dockerfile").unwrap();
        let opts = PlanOptions {
            target: Some("zzz".into()),
            ..Default::default()
        };
        assert!(matches!(
            plan(&recipe, &opts),
            Err(PlanError::UnknownTarget(_))
        ));
    }

    #[test]
    fn keys_depend_on_parent_and_inputs() {
        let a = StepInputs {
            instruction: "RUN x".into(),
            ..Default::default()
        };
        let mut b = a.clone();
        b.args.insert("V".into(), "1".into());
        let p = Digest::of(b"parent");
        let basis = KeyBasis::default();
        assert_ne!(cache_key(&p, &basis, &a), cache_key(&p, &basis, &b));
        assert_ne!(
            cache_key(&p, &basis, &a),
            cache_key(&Digest::of(b"other"), &basis, &a)
        );
        assert_eq!(cache_key(&p, &basis, &a), cache_key(&p, &basis, &a.clone()));
    }

    #[test]
    fn keys_depend_on_the_epoch_set_or_not_and_the_snapshotter_layers() {
        let step = StepInputs {
            instruction: "COPY a /a".into(),
            ..Default::default()
        };
        let p = Digest::of(b"parent");
        let with = |epoch: Option<i64>, snapshotter: &str| {
            let basis = KeyBasis {
                source_date_epoch: epoch,
                snapshotter: snapshotter.into(),
            };
            cache_key(&p, &basis, &step)
        };
        let keys = [
            with(None, "overlay"),
            with(Some(0), "overlay"),
            with(Some(1), "overlay"),
            with(None, "fuse-overlayfs"),
        ];
        let distinct: BTreeSet<&Digest> = keys.iter().collect();
        assert_eq!(distinct.len(), keys.len(), "{keys:?}");
        assert_eq!(with(Some(0), "overlay"), keys[1]);
    }

    #[test]
    fn explains_differences() {
        let mut old = StepInputs {
            instruction: "COPY app/ /app".into(),
            ..Default::default()
        };
        old.files.insert("app/main.py".into(), "1".into());
        old.files.insert("app/util.py".into(), "2".into());
        let mut new = old.clone();
        new.files.insert("app/main.py".into(), "3".into());
        let basis = KeyBasis {
            source_date_epoch: None,
            snapshotter: "overlay".into(),
        };
        let same = (Some(&basis), &basis);
        assert_eq!(
            explain_difference(&old, &new, same, false),
            "1 file changed: app/main.py"
        );
        let mut new2 = old.clone();
        new2.args.insert("VERSION".into(), "2".into());
        old.args.insert("VERSION".into(), "1".into());
        assert_eq!(
            explain_difference(&old, &new2, same, false),
            "build arg VERSION changed"
        );
        assert_eq!(
            explain_difference(&old, &old, same, true),
            "an earlier step changed"
        );
        let epoch = KeyBasis {
            source_date_epoch: Some(0),
            snapshotter: "fuse-overlayfs".into(),
        };
        assert_eq!(
            explain_difference(&old, &old, (Some(&epoch), &basis), true),
            "SOURCE_DATE_EPOCH changed (0 -> unset), snapshotter layers changed (fuse-overlayfs -> overlay)"
        );
        // A record that does not say its basis.
        assert_eq!(
            explain_difference(&old, &old, (None, &epoch), false),
            "the cached result is gone"
        );
    }

    #[test]
    fn image_names_find_contexts_by_their_short_form() {
        for (image, short) in [
            ("docker.io/library/alpine:latest", "alpine"),
            ("docker.io/library/alpine:3.19", "alpine:3.19"),
            ("library/alpine", "alpine"),
            ("index.docker.io/org/app:latest", "org/app"),
            ("alpine", "alpine"),
            ("ghcr.io/org/app:latest", "ghcr.io/org/app"),
            ("docker.io/library/x/y", "library/x/y"),
            ("alpine@sha256:abc", "alpine@sha256:abc"),
            ("localhost:5000/app", "localhost:5000/app"),
        ] {
            assert_eq!(familiar_name(image), short, "{image}");
        }
        let named: BTreeMap<String, NamedContext> =
            [("alpine".to_string(), NamedContext::External)].into();
        let found = named_context(&named, "docker.io/library/alpine:latest");
        assert_eq!(found.map(|(n, _)| n.as_str()), Some("alpine"));
        assert!(named_context(&named, "docker.io/library/alpine:3.19").is_none());
    }
}
