//! Build checks: BuildKit's lint rules over a parsed recipe (`kiln check`, `kiln build --check`,
//! and the warnings every build prints), and the `# check=skip=…;error=true` configuration.
//!
//! Pure: what the rules need from outside (the context's ignore rules, base images' env names,
//! whether a string is a valid image reference) is handed in by the caller. Each finding names
//! `file:line:col`, the rule, what is wrong and how to fix it.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::Serialize;

use super::error::LineIndex;
use super::ignore::IgnoreRules;
use super::instructions::{CommandLine, Instruction, InstructionKind, Recipe};
use super::parser::{Ast, Node};
use super::shell::{Lexer, Vars};

/// Every rule kiln checks, by BuildKit's names.
pub const RULES: [&str; 19] = [
    "StageNameCasing",
    "FromAsCasing",
    "ConsistentInstructionCasing",
    "DuplicateStageName",
    "ReservedStageName",
    "JSONArgsRecommended",
    "MaintainerDeprecated",
    "UndefinedVar",
    "UndefinedArgInFrom",
    "WorkdirRelativePath",
    "MultipleInstructionsDisallowed",
    "LegacyKeyValueFormat",
    "SecretsUsedInArgOrEnv",
    "InvalidDefaultArgInFrom",
    "CopyIgnoredFile",
    "FromPlatformFlagConstDisallowed",
    "RedundantTargetPlatform",
    "ExposeProtoCasing",
    "ExposeInvalidFormat",
];

/// The build arg that overrides the recipe's `# check=` directive, as in BuildKit.
pub const CHECK_BUILD_ARG: &str = "BUILDKIT_DOCKERFILE_CHECK";

/// Stage names with a meaning of their own.
const RESERVED_STAGE_NAMES: [&str; 2] = ["scratch", "context"];

/// Name parts that suggest a secret (split at `_`, compared without case).
const SECRET_WORDS: [&str; 10] = [
    "apikey",
    "auth",
    "credential",
    "credentials",
    "key",
    "password",
    "pword",
    "passwd",
    "secret",
    "token",
];

/// One rule violation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Finding {
    /// The rule's name (one of [`RULES`]).
    pub rule: &'static str,
    /// The recipe file.
    pub file: String,
    /// 1-based line.
    pub line: usize,
    /// 1-based column (in characters).
    pub col: usize,
    /// What is wrong.
    pub message: String,
    /// How to fix it.
    pub fix: String,
    /// The rule's documentation.
    pub url: String,
    /// The source line (for [`Finding::render`]).
    #[serde(skip)]
    pub source_line: String,
}

impl fmt::Display for Finding {
    /// One line: `file:line:col: Rule: message (fix: …)`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}: {} (fix: {})",
            self.file, self.line, self.col, self.rule, self.message, self.fix
        )
    }
}

impl Finding {
    /// Several lines: the location, rule and message, the source line with a caret under the
    /// column, and the fix.
    pub fn render(&self) -> String {
        format!(
            "{}:{}:{}: {}: {}\n{}\n   fix: {}\n",
            self.file,
            self.line,
            self.col,
            self.rule,
            self.message,
            super::error::quoted_line(self.line, self.col, &self.source_line),
            self.fix
        )
    }
}

/// Which rules run and whether findings fail the build: `skip=RULE,…|all;error=true|false`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CheckConfig {
    /// `skip=all`: no rule runs.
    pub skip_all: bool,
    /// Rules not run.
    pub skip: BTreeSet<String>,
    /// `error=true`: a build with findings fails.
    pub error: bool,
}

impl CheckConfig {
    /// Parses a `# check=` value (or the `BUILDKIT_DOCKERFILE_CHECK` build arg).
    pub fn parse(text: &str) -> Result<CheckConfig, String> {
        let mut config = CheckConfig::default();
        for part in text.split(';').map(str::trim).filter(|p| !p.is_empty()) {
            let (key, value) = part
                .split_once('=')
                .ok_or_else(|| format!("{part:?}: expected key=value"))?;
            match key.trim().to_ascii_lowercase().as_str() {
                "skip" => {
                    for rule in value.split(',').map(str::trim).filter(|r| !r.is_empty()) {
                        if rule.eq_ignore_ascii_case("all") {
                            config.skip_all = true;
                        } else if let Some(known) =
                            RULES.iter().find(|r| r.eq_ignore_ascii_case(rule))
                        {
                            config.skip.insert(known.to_string());
                        } else {
                            return Err(format!(
                                "unknown rule {rule:?} in skip= (rules: {})",
                                RULES.join(", ")
                            ));
                        }
                    }
                }
                "error" => {
                    config.error = match value.trim().to_ascii_lowercase().as_str() {
                        "true" | "1" => true,
                        "false" | "0" => false,
                        other => return Err(format!("error={other}: expected true or false")),
                    }
                }
                other => return Err(format!("unknown key {other:?} (skip, error)")),
            }
        }
        Ok(config)
    }

    /// The configuration of a build: the build arg if given, else the recipe's directive.
    pub fn for_build(directive: Option<&str>, build_arg: Option<&str>) -> Result<Self, String> {
        match build_arg.or(directive) {
            Some(text) => CheckConfig::parse(text),
            None => Ok(CheckConfig::default()),
        }
    }

    /// Whether `rule` runs.
    pub fn enabled(&self, rule: &str) -> bool {
        !self.skip_all && !self.skip.contains(rule)
    }
}

/// What the rules look at.
pub struct CheckInput<'a> {
    /// The recipe's file name, for findings.
    pub file: &'a str,
    /// The recipe's text.
    pub text: &'a str,
    /// Its syntax tree.
    pub ast: &'a Ast,
    /// Its typed form (from the same text).
    pub recipe: &'a Recipe,
    /// Values of the predefined platform ARGs (usable in FROM without a declaration).
    pub platform_args: &'a BTreeMap<String, String>,
    /// The main context's ignore rules (CopyIgnoredFile), when there is a context.
    pub ignore: Option<&'a IgnoreRules>,
    /// Names given with `--build-context` (a FROM of one is not an image reference).
    pub named_contexts: &'a BTreeSet<String>,
    /// The env variable names a base image sets, by reference as written after expansion;
    /// `None` when unknown (UndefinedVar then skips the stage).
    pub image_env: &'a dyn Fn(&str) -> Option<Vec<String>>,
    /// Whether a string is a valid image reference (InvalidDefaultArgInFrom).
    pub valid_image: &'a dyn Fn(&str) -> bool,
}

/// Runs every enabled rule; findings sorted by position.
pub fn check(input: &CheckInput<'_>, config: &CheckConfig) -> Vec<Finding> {
    let index = LineIndex::new(input.text);
    let mut w = Walker {
        input,
        index: &index,
        lexer: Lexer::new(input.recipe.directives.escape),
        findings: Vec::new(),
    };
    w.run();
    let mut findings: Vec<Finding> = w
        .findings
        .into_iter()
        .filter(|f| config.enabled(f.rule))
        .collect();
    findings.sort_by(|a, b| (a.line, a.col, a.rule).cmp(&(b.line, b.col, b.rule)));
    findings.dedup();
    findings
}

/// What a stage leaves to stages built on it.
#[derive(Clone, Default)]
struct StageEnd {
    /// Env names set (None: unknown, from an image whose config is not at hand).
    env: Option<BTreeSet<String>>,
    /// A SHELL instruction ran.
    shell_set: bool,
    /// An absolute WORKDIR was set.
    absolute_workdir: bool,
}

/// Looks up names in a set (all values empty).
struct NameSet<'a>(&'a BTreeSet<String>);

impl Vars for NameSet<'_> {
    fn get(&self, name: &str) -> Option<&str> {
        self.0.contains(name).then_some("")
    }
}

struct Walker<'a> {
    input: &'a CheckInput<'a>,
    index: &'a LineIndex<'a>,
    lexer: Lexer,
    findings: Vec<Finding>,
}

/// The `CMD`-like instructions a stage should have at most once.
const SINGLE_INSTRUCTIONS: [&str; 3] = ["CMD", "ENTRYPOINT", "HEALTHCHECK"];

impl Walker<'_> {
    /// Keywords in the minority casing (or in mixed case) of the recipe.
    fn instruction_casing(&mut self) {
        let nodes = &self.input.ast.nodes;
        let upper = |k: &str| k == k.to_ascii_uppercase();
        let lower = |k: &str| k == k.to_ascii_lowercase();
        let uppers = nodes.iter().filter(|n| upper(&n.keyword)).count();
        let lowers = nodes.iter().filter(|n| lower(&n.keyword)).count();
        let want_upper = uppers >= lowers;
        let majority = if want_upper { "upper" } else { "lower" };
        for node in nodes {
            let k = &node.keyword;
            let fine = if want_upper { upper(k) } else { lower(k) };
            if !fine {
                let wanted = if want_upper {
                    k.to_ascii_uppercase()
                } else {
                    k.to_ascii_lowercase()
                };
                self.add(
                    node,
                    node.offset,
                    "ConsistentInstructionCasing",
                    format!(
                        "'{k}' is not in the {majority} case most instructions of the recipe use"
                    ),
                    format!("write `{wanted}`"),
                );
            }
        }
    }

    fn run(&mut self) {
        self.instruction_casing();
        let input = self.input;
        let recipe = input.recipe;
        let mut meta_names: BTreeSet<String> = BTreeSet::new();
        let mut meta_defaults: BTreeMap<String, String> = input.platform_args.clone();
        let mut meta_i = 0;
        let mut stage_i: Option<usize> = None;
        let mut instr_i = 0;
        let mut ends: Vec<StageEnd> = Vec::new();
        let mut current: Option<StageState> = None;
        for node in &input.ast.nodes {
            if node.keyword.eq_ignore_ascii_case("from") {
                if let Some(done) = current.take() {
                    ends.push(self.end_stage(done));
                }
                let s = stage_i.map_or(0, |s| s + 1);
                stage_i = Some(s);
                instr_i = 0;
                let Some(stage) = recipe.stages.get(s) else {
                    return;
                };
                self.check_from(node, s, &meta_names, &meta_defaults);
                let base = self.base_end(s, &stage.base, &meta_defaults, &ends);
                current = Some(StageState {
                    env: base.env.clone(),
                    args: BTreeSet::new(),
                    shell_set: base.shell_set,
                    absolute_workdir: base.absolute_workdir,
                    singles: BTreeMap::new(),
                });
                continue;
            }
            match (stage_i, current.as_mut()) {
                (Some(s), Some(state)) => {
                    let Some(instr) = recipe.stages[s].instructions.get(instr_i) else {
                        return;
                    };
                    instr_i += 1;
                    self.instruction(node, instr, state);
                }
                _ => {
                    let Some(instr) = recipe.meta_args.get(meta_i) else {
                        return;
                    };
                    meta_i += 1;
                    if let InstructionKind::Arg(decls) = &instr.kind {
                        for d in decls {
                            self.secret_name(node, "ARG", &d.name);
                            meta_names.insert(d.name.clone());
                            match &d.default {
                                Some(raw) => {
                                    let value = self
                                        .lexer
                                        .process_word(raw, &meta_defaults)
                                        .map(|e| e.value)
                                        .unwrap_or_default();
                                    meta_defaults.insert(d.name.clone(), value);
                                }
                                None => {
                                    meta_defaults.remove(&d.name);
                                }
                            }
                        }
                    }
                }
            }
        }
        if let Some(done) = current.take() {
            self.end_stage(done);
        }
    }

    /// Adds a finding at `offset` of `node`'s logical line.
    fn add(
        &mut self,
        node: &Node,
        offset: usize,
        rule: &'static str,
        message: String,
        fix: String,
    ) {
        let (line, byte) = node.locate(offset);
        let text = self.index.line_text(line);
        let mut cut = byte.min(text.len());
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        self.findings.push(Finding {
            rule,
            file: self.input.file.to_string(),
            line,
            col: text[..cut].chars().count() + 1,
            message,
            fix,
            url: rule_url(rule),
            source_line: text.to_string(),
        });
    }

    /// The FROM line's own rules.
    fn check_from(
        &mut self,
        node: &Node,
        s: usize,
        meta_names: &BTreeSet<String>,
        meta_defaults: &BTreeMap<String, String>,
    ) {
        let stage = &self.input.recipe.stages[s];
        let words: Vec<(&str, usize)> = node.words().collect();
        if let [_, (as_kw, as_at), (name, name_at)] = words.as_slice() {
            let from = node.keyword.as_str();
            let upper = from == from.to_ascii_uppercase();
            let lower = from == from.to_ascii_lowercase();
            if (upper && *as_kw != as_kw.to_ascii_uppercase())
                || (lower && *as_kw != as_kw.to_ascii_lowercase())
            {
                let want = if upper { "AS" } else { "as" };
                self.add(
                    node,
                    *as_at,
                    "FromAsCasing",
                    format!("'{as_kw}' does not match the casing of '{from}'"),
                    format!("write `{want}`, in the case of `{from}`"),
                );
            }
            let lower_name = name.to_lowercase();
            if *name != lower_name {
                self.add(
                    node,
                    *name_at,
                    "StageNameCasing",
                    format!("stage name '{name}' should be lower case"),
                    format!("name the stage `{lower_name}`"),
                );
            }
            if RESERVED_STAGE_NAMES.contains(&lower_name.as_str()) {
                self.add(
                    node,
                    *name_at,
                    "ReservedStageName",
                    format!("'{lower_name}' is reserved and should not name a stage"),
                    format!("give the stage another name than `{lower_name}`"),
                );
            }
            if let Some(earlier) = self.input.recipe.stages[..s]
                .iter()
                .find(|e| e.name.as_deref() == Some(lower_name.as_str()))
            {
                self.add(
                    node,
                    *name_at,
                    "DuplicateStageName",
                    format!(
                        "stage name '{lower_name}' is already used by the stage on line {}",
                        earlier.span.start_line
                    ),
                    "give each stage a name of its own".to_string(),
                );
            }
        }
        let base_at = words.first().map_or(node.offset, |w| w.1);
        // ARGs usable in FROM: global ones and the platform ones.
        let mut from_names = meta_names.clone();
        from_names.extend(self.input.platform_args.keys().cloned());
        let mut used_in_from: Vec<(String, usize)> = Vec::new();
        let platform_flag = node
            .flags
            .iter()
            .find(|f| f.text.to_ascii_lowercase().starts_with("--platform="));
        if let Some(flag) = platform_flag {
            let value = &flag.text["--platform=".len()..];
            if matches!(value, "$TARGETPLATFORM" | "${TARGETPLATFORM}") {
                self.add(
                    node,
                    flag.offset,
                    "RedundantTargetPlatform",
                    format!("--platform={value} is what FROM uses anyway"),
                    "drop the --platform flag".to_string(),
                );
            }
            if !value.contains('$') {
                let plain = stage.name.as_deref().unwrap_or("");
                let parts: Vec<&str> = value.split('/').filter(|p| !p.is_empty()).collect();
                let named_after = !plain.is_empty()
                    && (plain.contains(&value.replace('/', "-"))
                        || plain.contains(&value.replace('/', "_"))
                        || parts.iter().any(|p| plain.contains(p)));
                if !named_after {
                    self.add(
                        node,
                        flag.offset,
                        "FromPlatformFlagConstDisallowed",
                        format!("FROM --platform should not be the constant {value:?}"),
                        "drop --platform (kiln builds for the host platform), use a variable such as $BUILDPLATFORM, or name the stage after the platform".to_string(),
                    );
                }
            }
            if let Ok(e) = self.lexer.process_word(value, &NameSet(&from_names)) {
                used_in_from.extend(e.used.into_iter().map(|n| (n, flag.offset)));
            }
        }
        if let Ok(e) = self.lexer.process_word(&stage.base, &NameSet(&from_names)) {
            used_in_from.extend(e.used.into_iter().map(|n| (n, base_at)));
        }
        for (name, at) in used_in_from {
            if from_names.contains(&name) || !is_variable_name(&name) {
                continue;
            }
            let fix = match closest(&name, &from_names) {
                Some(near) => {
                    format!("did you mean ${near}? Else declare `ARG {name}` before the first FROM")
                }
                None => format!("declare `ARG {name}` (with a default) before the first FROM"),
            };
            self.add(
                node,
                at,
                "UndefinedArgInFrom",
                format!("FROM uses ARG '{name}', which is not declared"),
                fix,
            );
        }
        let all_declared = self
            .lexer
            .process_word(&stage.base, &NameSet(&from_names))
            .is_ok_and(|e| e.used.iter().all(|n| from_names.contains(n)));
        if stage.base.contains('$') && all_declared {
            let expanded = self
                .lexer
                .process_word(&stage.base, meta_defaults)
                .map(|e| e.value);
            let valid = match &expanded {
                Ok(v) if v.is_empty() => false,
                Ok(v) => {
                    let lower = v.to_ascii_lowercase();
                    lower == "scratch"
                        || self.input.recipe.stages[..s]
                            .iter()
                            .any(|e| e.name.as_deref() == Some(lower.as_str()))
                        || self.input.named_contexts.contains(v)
                        || (self.input.valid_image)(v)
                }
                Err(_) => false,
            };
            if !valid {
                let no_default: Vec<String> = self
                    .lexer
                    .process_word(&stage.base, meta_defaults)
                    .map(|e| e.used)
                    .unwrap_or_default()
                    .into_iter()
                    .filter(|n| meta_names.contains(n) && !meta_defaults.contains_key(n))
                    .collect();
                let shown = expanded.unwrap_or_default();
                let fix = match no_default.first() {
                    Some(n) => format!(
                        "give `ARG {n}` a default that makes a valid image name, e.g. `ARG {n}=latest`"
                    ),
                    None => {
                        "change the ARG defaults so that the FROM names a valid image".to_string()
                    }
                };
                self.add(
                    node,
                    base_at,
                    "InvalidDefaultArgInFrom",
                    format!(
                        "with the ARG defaults, FROM {} gives {shown:?}, not a valid image name",
                        stage.base
                    ),
                    fix,
                );
            }
        }
    }

    /// What the stage starting at index `s` inherits from its base.
    fn base_end(
        &self,
        s: usize,
        base: &str,
        meta_defaults: &BTreeMap<String, String>,
        ends: &[StageEnd],
    ) -> StageEnd {
        let expanded = self
            .lexer
            .process_word(base, meta_defaults)
            .map(|e| e.value)
            .unwrap_or_else(|_| base.to_string());
        let lower = expanded.to_ascii_lowercase();
        if self.input.named_contexts.contains(&expanded) {
            return StageEnd::default();
        }
        if lower == "scratch" {
            return StageEnd {
                env: Some(["PATH".to_string()].into()),
                ..Default::default()
            };
        }
        if let Some(i) = self.input.recipe.stages[..s]
            .iter()
            .rposition(|e| e.name.as_deref() == Some(lower.as_str()))
        {
            return ends.get(i).cloned().unwrap_or_default();
        }
        StageEnd {
            env: (self.input.image_env)(&expanded).map(|v| v.into_iter().collect()),
            ..Default::default()
        }
    }

    fn end_stage(&mut self, state: StageState) -> StageEnd {
        for (kw, places) in &state.singles {
            let Some((last_line, _)) = places.last() else {
                continue;
            };
            for (_, node) in &places[..places.len() - 1] {
                self.add(
                    node,
                    node.offset,
                    "MultipleInstructionsDisallowed",
                    format!(
                        "only the last {kw} of a stage counts: this one is overridden by the {kw} on line {last_line}"
                    ),
                    format!("keep one {kw} per stage (merge them, or remove this one)"),
                );
            }
        }
        StageEnd {
            env: state.env,
            shell_set: state.shell_set,
            absolute_workdir: state.absolute_workdir,
        }
    }

    /// Reports variables of `word` not defined in `state` (UndefinedVar).
    fn undefined_vars(&mut self, node: &Node, at: usize, word: &str, state: &StageState) {
        let Some(env) = &state.env else {
            return;
        };
        let mut defined = env.clone();
        defined.extend(state.args.iter().cloned());
        let Ok(e) = self.lexer.process_word(word, &NameSet(&defined)) else {
            return;
        };
        for name in e.used {
            if defined.contains(&name) || !is_variable_name(&name) {
                continue;
            }
            let fix = match closest(&name, &defined) {
                Some(near) => format!("did you mean ${near}? Else declare it first (`ARG {name}`)"),
                None => format!("declare it first: `ARG {name}` or `ENV {name}=…`"),
            };
            let within = word
                .find(&format!("${{{name}"))
                .or_else(|| word.find(&format!("${name}")))
                .unwrap_or(0);
            self.add(
                node,
                at + within,
                "UndefinedVar",
                format!("${name} is used but not defined"),
                fix,
            );
        }
    }

    /// EXPOSE takes `PORT[/PROTO]` with a lower-case protocol, never an address or a mapping.
    fn expose_format(&mut self, node: &Node, at: usize, word: &str) {
        if word.contains('$') {
            return;
        }
        let (port, proto) = word.split_once('/').unwrap_or((word, ""));
        if let Some((_, container)) = port.rsplit_once(':') {
            self.add(
                node,
                at,
                "ExposeInvalidFormat",
                format!("EXPOSE {word} holds an address or a host port, which EXPOSE does not publish"),
                format!(
                    "expose the container port only: `EXPOSE {container}{}` (publish with `run -p`)",
                    if proto.is_empty() { String::new() } else { format!("/{}", proto.to_ascii_lowercase()) }
                ),
            );
        }
        if proto != proto.to_ascii_lowercase() {
            self.add(
                node,
                at,
                "ExposeProtoCasing",
                format!("protocol '{proto}' of EXPOSE {word} should be lower case"),
                format!("write `{port}/{}`", proto.to_ascii_lowercase()),
            );
        }
    }

    fn secret_name(&mut self, node: &Node, kw: &str, name: &str) {
        let parts: Vec<String> = name.split('_').map(str::to_ascii_lowercase).collect();
        let secret = parts.iter().any(|p| SECRET_WORDS.contains(&p.as_str()));
        if secret && !parts.iter().any(|p| p == "public") {
            self.add(
                node,
                node.offset,
                "SecretsUsedInArgOrEnv",
                format!("{kw} {name:?} looks like it holds a secret, which would stay in the image's history"),
                format!(
                    "pass it with `--secret id={id},src=FILE` and read it in `RUN --mount=type=secret,id={id}`",
                    id = name.to_ascii_lowercase()
                ),
            );
        }
    }

    fn instruction(&mut self, node: &Node, instr: &Instruction, state: &mut StageState) {
        let words: Vec<(&str, usize)> = node.words().collect();
        let first_at = words.first().map_or(node.offset, |w| w.1);
        match &instr.kind {
            InstructionKind::Arg(decls) => {
                for d in decls {
                    self.secret_name(node, "ARG", &d.name);
                    if let Some(raw) = &d.default {
                        self.undefined_vars(node, first_at, raw, state);
                    }
                    state.args.insert(d.name.clone());
                }
            }
            InstructionKind::Env(pairs) | InstructionKind::Label(pairs) => {
                let kw = if matches!(instr.kind, InstructionKind::Env(_)) {
                    "ENV"
                } else {
                    "LABEL"
                };
                if words.len() == 3 && words[2].0.is_empty() {
                    let (k, v) = (words[0].0, words[1].0);
                    let value = if v.contains(char::is_whitespace)
                        && !v.starts_with('"')
                        && !v.starts_with('\'')
                    {
                        format!("\"{v}\"")
                    } else {
                        v.to_string()
                    };
                    self.add(
                        node,
                        node.offset,
                        "LegacyKeyValueFormat",
                        format!("\"{kw} key value\" is a legacy form"),
                        format!("write `{kw} {k}={value}`"),
                    );
                }
                for (i, (k, v)) in pairs.iter().enumerate() {
                    let at = |n: usize| words.get(3 * i + n).map_or(first_at, |w| w.1);
                    if kw == "ENV" {
                        self.secret_name(node, "ENV", k);
                    } else {
                        self.undefined_vars(node, at(0), k, state);
                    }
                    self.undefined_vars(node, at(1), v, state);
                }
                if kw == "ENV"
                    && let Some(env) = state.env.as_mut()
                {
                    env.extend(pairs.iter().map(|(k, _)| k.clone()));
                }
            }
            InstructionKind::Maintainer(m) => self.add(
                node,
                node.offset,
                "MaintainerDeprecated",
                "MAINTAINER is deprecated".to_string(),
                format!("write `LABEL org.opencontainers.image.authors={m:?}`"),
            ),
            InstructionKind::Cmd(c) | InstructionKind::Entrypoint(c) => {
                let kw = if matches!(instr.kind, InstructionKind::Cmd(_)) {
                    "CMD"
                } else {
                    "ENTRYPOINT"
                };
                if let CommandLine::Shell(s) = c
                    && !state.shell_set
                {
                    let fix = match exec_form(s) {
                        Some(json) => format!(
                            "write `{kw} {json}`, or set SHELL explicitly if a shell is wanted"
                        ),
                        None => format!(
                            "write it in exec form (`{kw} [\"program\", \"arg\"]`), or set SHELL explicitly if a shell is wanted"
                        ),
                    };
                    self.add(
                        node,
                        node.offset,
                        "JSONArgsRecommended",
                        format!(
                            "{kw} in shell form runs under /bin/sh -c, which does not pass signals to the program"
                        ),
                        fix,
                    );
                }
                state.single(kw, node);
            }
            InstructionKind::Healthcheck(_) => state.single("HEALTHCHECK", node),
            InstructionKind::Shell(_) => state.shell_set = true,
            InstructionKind::Workdir(w) => {
                self.undefined_vars(node, first_at, w, state);
                let expanded = self
                    .lexer
                    .process_word(w, &NameSet(&BTreeSet::new()))
                    .map(|e| e.value)
                    .unwrap_or_else(|_| w.clone());
                if expanded.starts_with('/') || w.starts_with('$') {
                    state.absolute_workdir = true;
                } else if !state.absolute_workdir {
                    self.add(
                        node,
                        first_at,
                        "WorkdirRelativePath",
                        format!(
                            "relative WORKDIR '{w}' depends on the base image's working directory"
                        ),
                        format!(
                            "use an absolute path, e.g. `WORKDIR /{}`",
                            w.trim_start_matches("./")
                        ),
                    );
                }
            }
            InstructionKind::Copy(c) | InstructionKind::Add(c) => {
                for (word, at) in words.iter().filter(|(w, _)| !w.starts_with("<<")) {
                    self.undefined_vars(node, *at, word, state);
                }
                for flag in [&c.chown, &c.chmod, &c.from].into_iter().flatten() {
                    self.undefined_vars(node, node.offset, flag, state);
                }
                if c.from.is_none()
                    && let Some(ignore) = self.input.ignore
                {
                    let vars = state.vars_for_expansion();
                    for (word, at) in &words[..words.len().saturating_sub(1)] {
                        if word.starts_with("<<") || word.contains("://") {
                            continue;
                        }
                        let value = self
                            .lexer
                            .process_word(word, &vars)
                            .map(|e| e.value)
                            .unwrap_or_else(|_| word.to_string());
                        let Some(rel) = clean_relative(&value) else {
                            continue;
                        };
                        if !rel.is_empty() && ignore.is_excluded(&rel) {
                            let kw = node.keyword.to_ascii_uppercase();
                            self.add(
                                node,
                                *at,
                                "CopyIgnoredFile",
                                format!("{kw} source {value:?} is excluded by the ignore file, so it is not in the context"),
                                format!("remove it from the ignore file (or add `!{rel}`), or stop copying it"),
                            );
                        }
                    }
                }
            }
            InstructionKind::User(w) | InstructionKind::Stopsignal(w) => {
                self.undefined_vars(node, first_at, w, state)
            }
            InstructionKind::Expose(list) | InstructionKind::Volume(list) => {
                for (i, w) in list.iter().enumerate() {
                    let at = words.get(i).map_or(first_at, |w| w.1);
                    self.undefined_vars(node, at, w, state);
                    if matches!(instr.kind, InstructionKind::Expose(_)) {
                        self.expose_format(node, at, w);
                    }
                }
            }
            InstructionKind::Run(_) | InstructionKind::Onbuild { .. } => {}
        }
    }
}

/// A stage's state as its instructions are checked.
struct StageState {
    /// Env names (None: unknown).
    env: Option<BTreeSet<String>>,
    /// ARGs declared in the stage.
    args: BTreeSet<String>,
    shell_set: bool,
    absolute_workdir: bool,
    /// CMD / ENTRYPOINT / HEALTHCHECK occurrences: (line, node).
    singles: BTreeMap<&'static str, Vec<(usize, Node)>>,
}

impl StageState {
    fn single(&mut self, kw: &'static str, node: &Node) {
        debug_assert!(SINGLE_INSTRUCTIONS.contains(&kw));
        self.singles
            .entry(kw)
            .or_default()
            .push((node.start_line, node.clone()));
    }

    /// Names in scope with empty values, for expanding a path well enough to match it.
    fn vars_for_expansion(&self) -> BTreeMap<String, String> {
        self.env
            .iter()
            .flatten()
            .chain(self.args.iter())
            .map(|n| (n.clone(), String::new()))
            .collect()
    }
}

/// Whether a name `used` by the lexer is a variable (not `$1`, `$@` and the like).
fn is_variable_name(name: &str) -> bool {
    name.chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
}

/// The name among `names` nearest to `name` (at most 2 edits, fewer than half its length).
fn closest(name: &str, names: &BTreeSet<String>) -> Option<String> {
    names
        .iter()
        .map(|n| (edit_distance(name, n), n))
        .filter(|(d, _)| *d <= 2 && *d * 2 < name.chars().count().max(2))
        .min()
        .map(|(_, n)| n.clone())
}

/// Edit distance (insertions, deletions, substitutions and swaps of neighbours), ignoring case.
fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.to_lowercase().chars().collect();
    let b: Vec<char> = b.to_lowercase().chars().collect();
    let mut d = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for (i, row) in d.iter_mut().enumerate() {
        row[0] = i;
    }
    for (j, cell) in d[0].iter_mut().enumerate() {
        *cell = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let mut best = (d[i - 1][j] + 1)
                .min(d[i][j - 1] + 1)
                .min(d[i - 1][j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                best = best.min(d[i - 2][j - 2] + 1);
            }
            d[i][j] = best;
        }
    }
    d[a.len()][b.len()]
}

/// A shell-form command as an exec-form JSON array, when it is plain words.
fn exec_form(command: &str) -> Option<String> {
    let words: Vec<&str> = command.split_whitespace().collect();
    let plain = |w: &str| {
        w.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:@,+%".contains(c))
    };
    if words.is_empty() || !words.iter().all(|w| plain(w)) {
        return None;
    }
    serde_json::to_string(&words)
        .ok()
        .map(|j| j.replace(',', ", "))
}

/// A path made relative and clean (`./a/../b/` → `b`); None when it leaves the root.
fn clean_relative(path: &str) -> Option<String> {
    let mut parts: Vec<&str> = Vec::new();
    for p in path.split('/') {
        match p {
            "" | "." => {}
            ".." => {
                parts.pop()?;
            }
            p => parts.push(p),
        }
    }
    Some(parts.join("/"))
}

/// The rule's documentation page.
fn rule_url(rule: &str) -> String {
    let mut kebab = String::new();
    let chars: Vec<char> = rule.chars().collect();
    for (i, c) in chars.iter().enumerate() {
        let next_lower = chars.get(i + 1).is_some_and(|n| n.is_ascii_lowercase());
        let prev_lower = i > 0 && chars[i - 1].is_ascii_lowercase();
        if c.is_ascii_uppercase() && i > 0 && (prev_lower || next_lower) {
            kebab.push('-');
        }
        kebab.push(c.to_ascii_lowercase());
    }
    format!("https://docs.docker.com/go/dockerfile/rule/{kebab}/")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(src: &str, ignore: Option<&str>) -> Vec<Finding> {
        let ast = crate::recipe::parse_syntax(src.as_bytes(), "Dockerfile").unwrap();
        let recipe = crate::recipe::parse(src.as_bytes(), "Dockerfile").unwrap();
        let rules = ignore.map(|t| IgnoreRules::parse(t).unwrap());
        let platform: BTreeMap<String, String> = [
            ("TARGETPLATFORM", "linux/amd64"),
            ("TARGETARCH", "amd64"),
            ("BUILDPLATFORM", "linux/amd64"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let env = |r: &str| (r == "busybox").then(|| vec!["PATH".to_string()]);
        let valid = |r: &str| !r.is_empty() && !r.ends_with(':') && !r.contains("::");
        let input = CheckInput {
            file: "Dockerfile",
            text: src,
            ast: &ast,
            recipe: &recipe,
            platform_args: &platform,
            ignore: rules.as_ref(),
            named_contexts: &BTreeSet::new(),
            image_env: &env,
            valid_image: &valid,
        };
        let config = CheckConfig::for_build(recipe.directives.check.as_deref(), None).unwrap();
        check(&input, &config)
    }

    fn rules(src: &str) -> Vec<&'static str> {
        run(src, None).into_iter().map(|f| f.rule).collect()
    }

    #[test]
    fn clean_recipe_has_no_findings() {
        let src = "ARG TAG=1\nFROM busybox:${TAG} AS build\nWORKDIR /src\nENV A=1\nCOPY a b\nCMD [\"x\"]\n";
        assert!(rules(src).is_empty(), "{:?}", run(src, None));
    }

    #[test]
    fn stage_names() {
        assert_eq!(rules("FROM busybox AS Build\n"), ["StageNameCasing"]);
        assert_eq!(rules("FROM busybox as build\n"), ["FromAsCasing"]);
        assert_eq!(rules("from busybox AS build\n"), ["FromAsCasing"]);
        // A mixed-case FROM has no case for AS to match (but is itself inconsistent).
        assert_eq!(
            rules("From busybox as build\n"),
            ["ConsistentInstructionCasing"]
        );
    }

    #[test]
    fn undefined_variables_with_suggestions() {
        let f = run("FROM busybox\nENV PATH=$PAHT:/x\n", None);
        assert_eq!(f.len(), 1);
        assert_eq!(f[0].rule, "UndefinedVar");
        assert!(f[0].fix.contains("$PATH"), "{}", f[0].fix);
        assert_eq!((f[0].line, f[0].col), (2, 10));
        assert!(rules("FROM busybox\nARG foo\nCOPY $foo .\n").is_empty());
        // An image whose env is unknown: no guessing.
        assert!(rules("FROM other\nCOPY $foo .\n").is_empty());
        let f = rules("FROM busybox AS a\nENV X=1\nFROM a\nCOPY $X $Y /\n");
        assert_eq!(f, ["UndefinedVar"]);
    }

    #[test]
    fn from_arguments() {
        assert_eq!(rules("FROM busybox:${VARIANT}\n"), ["UndefinedArgInFrom"]);
        assert!(rules("FROM --platform=$BUILDPLATFORM busybox\n").is_empty());
        assert_eq!(
            rules("ARG TAG\nFROM busybox:${TAG}\n"),
            ["InvalidDefaultArgInFrom"]
        );
        assert!(rules("ARG TAG\nFROM busybox:${TAG:-1}\n").is_empty());
        assert_eq!(
            rules("FROM --platform=linux/amd64 busybox\n"),
            ["FromPlatformFlagConstDisallowed"]
        );
        assert!(rules("FROM --platform=linux/amd64 busybox AS build_amd64\n").is_empty());
    }

    #[test]
    fn directive_skips_and_errors() {
        assert!(rules("# check=skip=StageNameCasing\nFROM busybox AS Build\n").is_empty());
        assert!(rules("# check=skip=all\nFROM busybox AS Build\n").is_empty());
        let c = CheckConfig::parse("skip=JSONArgsRecommended,FromAsCasing;error=true").unwrap();
        assert!(c.error && !c.enabled("FromAsCasing") && c.enabled("UndefinedVar"));
        assert!(CheckConfig::parse("skip=NoSuchRule").is_err());
        assert!(CheckConfig::parse("error=maybe").is_err());
    }

    #[test]
    fn rule_urls_are_kebab_case() {
        assert_eq!(
            rule_url("JSONArgsRecommended"),
            "https://docs.docker.com/go/dockerfile/rule/json-args-recommended/"
        );
        assert_eq!(
            rule_url("UndefinedArgInFrom"),
            "https://docs.docker.com/go/dockerfile/rule/undefined-arg-in-from/"
        );
    }

    #[test]
    fn copy_of_ignored_files() {
        let f = run(
            "FROM busybox\nCOPY secret.txt app /\n",
            Some("secret.txt\n"),
        );
        assert_eq!(f.len(), 1);
        assert_eq!((f[0].rule, f[0].col), ("CopyIgnoredFile", 6));
        assert!(run("FROM busybox\nCOPY app /\n", Some("secret.txt\n")).is_empty());
    }

    #[test]
    fn exec_form_suggestion() {
        assert_eq!(
            exec_form("node index.js").as_deref(),
            Some("[\"node\", \"index.js\"]")
        );
        assert_eq!(exec_form("a && b"), None);
    }
}
