//! Raw syntax tree to the typed [`Recipe`]: instruction and flag validation, stage splitting.
//!
//! Every error points at the instruction's keyword or at the offending flag or word.

use super::error::{LineIndex, RecipeError};
use super::instructions::{
    ArgDecl, CommandLine, Copy, Healthcheck, Heredoc, Instruction, InstructionKind, Recipe, Run,
    Span, Stage,
};
use super::parser::{Arg, Ast, Node, RawHeredoc, check_text, parse_syntax};

/// Parses recipe bytes into the typed model: stages split at `FROM`, `ARG`s before the first
/// `FROM` in `meta_args`, every instruction and flag validated. `file` is used in messages.
pub fn parse(src: &[u8], file: &str) -> Result<Recipe, RecipeError> {
    let ast = parse_syntax(src, file)?;
    let text = check_text(src, file)?;
    let index = LineIndex::new(text);
    Lowerer {
        file,
        index: &index,
    }
    .recipe(&ast)
}

/// What a flag takes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum FlagKind {
    /// `--name=value`, at most once.
    Value,
    /// `--name=value`, repeatable.
    List,
    /// `--name` or `--name=true|false`.
    Bool,
}

/// A flag as given on an instruction, after checking it against the allowed set.
struct GivenFlag {
    name: String,
    value: String,
}

/// Flag values of one instruction, by name.
#[derive(Default)]
struct Flags(Vec<GivenFlag>);

impl Flags {
    fn value(&self, name: &str) -> Option<String> {
        self.0
            .iter()
            .find(|f| f.name == name)
            .map(|f| f.value.clone())
    }
    fn list(&self, name: &str) -> Vec<String> {
        self.0
            .iter()
            .filter(|f| f.name == name)
            .map(|f| f.value.clone())
            .collect()
    }
    fn bool(&self, name: &str) -> Option<bool> {
        self.value(name).map(|v| v == "true")
    }
}

/// A Go-syntax duration flag of HEALTHCHECK.
const HEALTH_DURATIONS: [&str; 4] = ["interval", "timeout", "start-period", "start-interval"];

struct Lowerer<'a> {
    file: &'a str,
    index: &'a LineIndex<'a>,
}

impl Lowerer<'_> {
    /// An error at `offset` of `node`'s logical line.
    fn err(&self, node: &Node, offset: usize, msg: impl Into<String>) -> RecipeError {
        let (line, byte) = node.locate(offset);
        RecipeError::at(self.file, self.index, line, byte, msg)
    }

    fn span(&self, node: &Node) -> Span {
        let (line, byte) = node.locate(node.offset);
        let col = RecipeError::at(self.file, self.index, line, byte, "").col;
        Span {
            start_line: node.start_line,
            start_col: col,
            end_line: node.end_line,
        }
    }

    fn recipe(&self, ast: &Ast) -> Result<Recipe, RecipeError> {
        let mut recipe = Recipe {
            directives: ast.directives.clone(),
            meta_args: Vec::new(),
            stages: Vec::new(),
        };
        for node in &ast.nodes {
            if node.keyword.eq_ignore_ascii_case("from") {
                let stage = self.stage(node)?;
                recipe.stages.push(stage);
                continue;
            }
            let inst = self.instruction(node, &node.heredocs, false)?;
            match recipe.stages.last_mut() {
                Some(stage) => stage.instructions.push(inst),
                None if matches!(inst.kind, InstructionKind::Arg(_)) => recipe.meta_args.push(inst),
                None => {
                    let msg = format!(
                        "{} before the first FROM: only ARG may come before FROM",
                        node.keyword.to_uppercase()
                    );
                    return Err(self.err(node, node.offset, msg));
                }
            }
        }
        Ok(recipe)
    }

    fn stage(&self, node: &Node) -> Result<Stage, RecipeError> {
        let flags = self.flags(node, &[("platform", FlagKind::Value)])?;
        let args: Vec<(&str, usize)> = node.words().collect();
        let name = match args.as_slice() {
            [_] => None,
            [_, (as_kw, _), (name, at)] if as_kw.eq_ignore_ascii_case("as") => {
                let lower = name.to_lowercase();
                if !valid_stage_name(&lower) {
                    let msg = format!(
                        "invalid name for build stage: {}, name can't start with a number or contain symbols",
                        super::dump::go_quote(name)
                    );
                    return Err(self.err(node, *at, msg));
                }
                // Reserved names (`scratch`, `context`) are the ReservedStageName check's.
                Some(lower)
            }
            [] => return Err(self.err(node, node.offset, "FROM requires an image name")),
            [_, (w, at), ..] => {
                let msg = if args.len() == 3 {
                    format!("FROM expects `AS` before the stage name, found {w:?}")
                } else {
                    "FROM requires either one or three arguments (FROM image [AS name])".into()
                };
                return Err(self.err(node, *at, msg));
            }
        };
        Ok(Stage {
            name,
            base: args[0].0.to_string(),
            platform: flags.value("platform"),
            span: self.span(node),
            text: node.original.clone(),
            instructions: Vec::new(),
        })
    }

    /// Lowers one non-FROM instruction; `nested` is true inside ONBUILD.
    fn instruction(
        &self,
        node: &Node,
        heredocs: &[RawHeredoc],
        nested: bool,
    ) -> Result<Instruction, RecipeError> {
        let kw = node.keyword.to_ascii_lowercase();
        let upper = node.keyword.to_uppercase();
        let args: Vec<(&str, usize)> = node.words().collect();
        let kw_at = node.offset;
        let none: &[(&str, FlagKind)] = &[];
        let kind = match kw.as_str() {
            "run" => {
                let flags = self.flags(
                    node,
                    &[
                        ("mount", FlagKind::List),
                        ("network", FlagKind::Value),
                        ("security", FlagKind::Value),
                    ],
                )?;
                if args.is_empty() && !node.json {
                    return Err(self.err(node, kw_at, "RUN requires at least one argument"));
                }
                InstructionKind::Run(Run {
                    command: command_line(node, &args),
                    heredocs: heredocs.iter().map(|h| typed_heredoc(h, true)).collect(),
                    mounts: flags.list("mount"),
                    network: flags.value("network"),
                    security: flags.value("security"),
                })
            }
            "cmd" => {
                self.flags(node, none)?;
                InstructionKind::Cmd(command_line(node, &args))
            }
            "entrypoint" => {
                self.flags(node, none)?;
                InstructionKind::Entrypoint(command_line(node, &args))
            }
            "shell" => {
                self.flags(node, none)?;
                if !node.json && !args.is_empty() {
                    let msg = "SHELL requires the arguments to be in JSON form, e.g. SHELL [\"/bin/sh\", \"-c\"]";
                    return Err(self.err(node, args[0].1, msg));
                }
                if args.is_empty() {
                    return Err(self.err(node, kw_at, "SHELL requires at least one argument"));
                }
                InstructionKind::Shell(args.iter().map(|a| a.0.to_string()).collect())
            }
            "env" | "label" => {
                self.flags(node, none)?;
                if args.is_empty() {
                    let msg = format!("{upper} requires at least one argument");
                    return Err(self.err(node, kw_at, msg));
                }
                let mut pairs = Vec::new();
                for triple in args.chunks(3) {
                    let [(k, at), (v, _), _] = triple else {
                        return Err(self.err(node, kw_at, format!("{upper} has a malformed pair")));
                    };
                    if k.is_empty() {
                        let msg = format!("{upper} names can not be blank");
                        return Err(self.err(node, *at, msg));
                    }
                    pairs.push((k.to_string(), v.to_string()));
                }
                if kw == "env" {
                    InstructionKind::Env(pairs)
                } else {
                    InstructionKind::Label(pairs)
                }
            }
            "expose" => {
                self.flags(node, none)?;
                self.at_least(node, &args, 1)?;
                InstructionKind::Expose(strings(&args))
            }
            "add" => InstructionKind::Add(self.copy(node, &kw, &args, heredocs)?),
            "copy" => InstructionKind::Copy(self.copy(node, &kw, &args, heredocs)?),
            "volume" => {
                self.flags(node, none)?;
                self.at_least(node, &args, 1)?;
                let mut vols = Vec::new();
                for (v, at) in &args {
                    let v = v.trim();
                    if v.is_empty() {
                        let msg = "VOLUME specified can not be an empty string";
                        return Err(self.err(node, *at, msg));
                    }
                    vols.push(v.to_string());
                }
                InstructionKind::Volume(vols)
            }
            "user" | "workdir" | "stopsignal" => {
                self.flags(node, none)?;
                let value = self.exactly_one_word(node, &args)?;
                match kw.as_str() {
                    "user" => InstructionKind::User(value),
                    "workdir" => InstructionKind::Workdir(value),
                    _ => InstructionKind::Stopsignal(value),
                }
            }
            "maintainer" => {
                self.flags(node, none)?;
                self.at_least(node, &args, 1)?;
                InstructionKind::Maintainer(args[0].0.to_string())
            }
            "arg" => {
                self.flags(node, none)?;
                self.at_least(node, &args, 1)?;
                let mut decls = Vec::new();
                for (w, at) in &args {
                    let decl = match w.split_once('=') {
                        Some((k, v)) => ArgDecl {
                            name: k.to_string(),
                            default: Some(v.into()),
                        },
                        None => ArgDecl {
                            name: w.to_string(),
                            default: None,
                        },
                    };
                    if decl.name.is_empty() {
                        return Err(self.err(node, *at, "ARG names can not be blank"));
                    }
                    decls.push(decl);
                }
                InstructionKind::Arg(decls)
            }
            "healthcheck" => InstructionKind::Healthcheck(self.healthcheck(node, &args)?),
            "onbuild" => {
                self.flags(node, none)?;
                let Some(Arg::Nested(child)) = node.args.first() else {
                    return Err(self.err(node, kw_at, "ONBUILD requires at least one argument"));
                };
                let trigger = child.keyword.to_uppercase();
                if nested || trigger == "ONBUILD" {
                    let msg = "Chaining ONBUILD via `ONBUILD ONBUILD` isn't allowed";
                    return Err(self.err(node, child.offset, msg));
                }
                if trigger == "FROM" || trigger == "MAINTAINER" {
                    let msg = format!("{trigger} isn't allowed as an ONBUILD trigger");
                    return Err(self.err(node, child.offset, msg));
                }
                let parsed = self.instruction(child, heredocs, true)?;
                InstructionKind::Onbuild {
                    trigger: child.original.clone(),
                    parsed: Box::new(parsed),
                }
            }
            "from" => {
                let msg = "FROM isn't allowed here";
                return Err(self.err(node, kw_at, msg));
            }
            "" => return Err(self.err(node, kw_at, "empty instruction")),
            _ => {
                let msg = format!("unknown instruction: {upper} (line {})", node.start_line);
                return Err(self.err(node, kw_at, msg));
            }
        };
        Ok(Instruction {
            span: self.span(node),
            text: node.original.clone(),
            kind,
        })
    }

    fn copy(
        &self,
        node: &Node,
        kw: &str,
        args: &[(&str, usize)],
        heredocs: &[RawHeredoc],
    ) -> Result<Copy, RecipeError> {
        let common = [
            ("chown", FlagKind::Value),
            ("chmod", FlagKind::Value),
            ("link", FlagKind::Bool),
            ("exclude", FlagKind::List),
        ];
        let extra: &[(&str, FlagKind)] = if kw == "copy" {
            &[("from", FlagKind::Value), ("parents", FlagKind::Bool)]
        } else {
            &[
                ("checksum", FlagKind::Value),
                ("keep-git-dir", FlagKind::Bool),
                ("unpack", FlagKind::Bool),
            ]
        };
        let allowed: Vec<(&str, FlagKind)> = common.iter().chain(extra).copied().collect();
        let flags = self.flags(node, &allowed)?;
        if args.len() < 2 {
            let msg = format!(
                "{} requires at least two arguments, but only {} provided. Destination could not be determined.",
                kw.to_uppercase(),
                if args.is_empty() {
                    "none was"
                } else {
                    "one was"
                }
            );
            let at = args.first().map(|a| a.1).unwrap_or(node.offset);
            return Err(self.err(node, at, msg));
        }
        let (dest, sources) = args.split_last().map(|(d, s)| (d.0, s)).unwrap_or_default();
        Ok(Copy {
            sources: strings(sources),
            dest: dest.to_string(),
            heredocs: heredocs.iter().map(|h| typed_heredoc(h, false)).collect(),
            from: flags.value("from"),
            chown: flags.value("chown"),
            chmod: flags.value("chmod"),
            link: flags.bool("link").unwrap_or(false),
            parents: flags.bool("parents").unwrap_or(false),
            exclude: flags.list("exclude"),
            checksum: flags.value("checksum"),
            keep_git_dir: flags.bool("keep-git-dir").unwrap_or(false),
            unpack: flags.bool("unpack"),
        })
    }

    fn healthcheck(&self, node: &Node, args: &[(&str, usize)]) -> Result<Healthcheck, RecipeError> {
        let mut allowed: Vec<(&str, FlagKind)> = HEALTH_DURATIONS
            .iter()
            .map(|n| (*n, FlagKind::Value))
            .collect();
        allowed.push(("retries", FlagKind::Value));
        let flags = self.flags(node, &allowed)?;
        let Some(&(typ, typ_at)) = args.first() else {
            return Err(self.err(
                node,
                node.offset,
                "HEALTHCHECK requires at least one argument",
            ));
        };
        match typ.to_uppercase().as_str() {
            "NONE" => {
                if args.len() > 1 || !node.flags.is_empty() {
                    let at = args.get(1).map(|a| a.1).unwrap_or(typ_at);
                    return Err(self.err(node, at, "HEALTHCHECK NONE takes no arguments"));
                }
                return Ok(Healthcheck::None);
            }
            "CMD" => {}
            other => {
                let msg = format!("Unknown type {other:?} in HEALTHCHECK (try CMD)");
                return Err(self.err(node, typ_at, msg));
            }
        }
        let rest = &args[1..];
        if rest.is_empty() {
            return Err(self.err(node, typ_at, "Missing command after HEALTHCHECK CMD"));
        }
        let mut durations = [0u64; 4];
        for (slot, name) in durations.iter_mut().zip(HEALTH_DURATIONS) {
            let Some(v) = flags.value(name) else { continue };
            let at = self.flag_offset(node, name);
            let ns = parse_go_duration(&v).ok_or_else(|| {
                self.err(node, at, format!("invalid duration {v:?} for --{name}"))
            })?;
            if ns != 0 && ns < 1_000_000 {
                let msg = format!("Interval {name:?} cannot be less than 1ms");
                return Err(self.err(node, at, msg));
            }
            *slot = u64::try_from(ns)
                .map_err(|_| self.err(node, at, format!("Interval {name:?} cannot be negative")))?;
        }
        let retries = match flags.value("retries") {
            None => 0,
            Some(v) => {
                let at = self.flag_offset(node, "retries");
                let n: i64 = v
                    .parse()
                    .map_err(|_| self.err(node, at, format!("invalid --retries value {v:?}")))?;
                u32::try_from(n)
                    .map_err(|_| self.err(node, at, "--retries cannot be negative or that large"))?
            }
        };
        let [interval_ns, timeout_ns, start_period_ns, start_interval_ns] = durations;
        Ok(Healthcheck::Check {
            command: command_line(node, rest),
            interval_ns,
            timeout_ns,
            start_period_ns,
            start_interval_ns,
            retries,
        })
    }

    fn at_least(&self, node: &Node, args: &[(&str, usize)], n: usize) -> Result<(), RecipeError> {
        if args.len() >= n {
            return Ok(());
        }
        let msg = format!(
            "{} requires at least one argument",
            node.keyword.to_uppercase()
        );
        Err(self.err(node, node.offset, msg))
    }

    /// USER / WORKDIR / STOPSIGNAL: the rest of the line must be one (quote-aware) word.
    fn exactly_one_word(&self, node: &Node, args: &[(&str, usize)]) -> Result<String, RecipeError> {
        let msg = format!(
            "{} requires exactly one argument",
            node.keyword.to_uppercase()
        );
        let Some(&(value, at)) = args.first() else {
            return Err(self.err(node, node.offset, msg));
        };
        if let Some(extra) = second_word(value) {
            return Err(self.err(node, at + extra, msg));
        }
        Ok(value.to_string())
    }

    /// Offset of the first flag named `name` on `node`.
    fn flag_offset(&self, node: &Node, name: &str) -> usize {
        node.flags
            .iter()
            .find(|f| flag_name(&f.text) == name)
            .map(|f| f.offset)
            .unwrap_or(node.offset)
    }

    /// Checks `node`'s flags against `allowed` and collects their values.
    fn flags(&self, node: &Node, allowed: &[(&str, FlagKind)]) -> Result<Flags, RecipeError> {
        let upper = node.keyword.to_uppercase();
        let mut out = Flags::default();
        for f in &node.flags {
            let body = &f.text[2..];
            let (name, value) = match body.split_once('=') {
                Some((n, v)) => (n, Some(v)),
                None => (body, None),
            };
            let Some(&(_, kind)) = allowed.iter().find(|(n, _)| *n == name) else {
                let msg = format!(
                    "unknown flag: --{name} (for {upper}, line {})",
                    node.locate(f.offset).0
                );
                return Err(self.err(node, f.offset, msg));
            };
            if kind != FlagKind::List && out.0.iter().any(|g| g.name == name) {
                let msg = format!("duplicate flag specified: --{name}");
                return Err(self.err(node, f.offset, msg));
            }
            let value = match (kind, value) {
                (FlagKind::Bool, None) => "true".to_string(),
                (FlagKind::Bool, Some(v)) => match v.to_ascii_lowercase().as_str() {
                    "true" => "true".into(),
                    "false" => "false".into(),
                    _ => {
                        let msg = format!("expecting boolean value for flag --{name}, not: {v}");
                        return Err(self.err(node, f.offset, msg));
                    }
                },
                (_, Some(v)) => v.to_string(),
                (_, None) => {
                    let msg = format!("missing a value on flag: --{name}");
                    return Err(self.err(node, f.offset, msg));
                }
            };
            out.0.push(GivenFlag {
                name: name.to_string(),
                value,
            });
        }
        Ok(out)
    }
}

/// The name part of a `--name[=value]` flag text.
fn flag_name(text: &str) -> &str {
    let body = text.get(2..).unwrap_or("");
    body.split_once('=').map(|(n, _)| n).unwrap_or(body)
}

/// Byte offset of a second shell word in `s` (unquoted white space followed by more text).
fn second_word(s: &str) -> Option<usize> {
    let mut quote: Option<char> = None;
    let mut escaped = false;
    let mut gap = false;
    for (i, c) in s.char_indices() {
        if escaped {
            escaped = false;
        } else if let Some(q) = quote {
            if c == q {
                quote = None;
            } else if c == '\\' && q == '"' {
                escaped = true;
            }
        } else if c.is_whitespace() {
            gap = true;
            continue;
        } else if gap {
            return Some(i);
        } else if c == '\\' || c == '`' {
            escaped = true;
        } else if c == '"' || c == '\'' {
            quote = Some(c);
        }
    }
    None
}

/// `^[a-z][a-z0-9-_.]*$`.
fn valid_stage_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_lowercase())
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "-_.".contains(c))
}

fn strings(args: &[(&str, usize)]) -> Vec<String> {
    args.iter().map(|a| a.0.to_string()).collect()
}

/// Exec form for JSON arguments, otherwise the one shell-form string.
fn command_line(node: &Node, args: &[(&str, usize)]) -> CommandLine {
    if node.json {
        CommandLine::Exec(strings(args))
    } else if let Some((s, _)) = args.first() {
        CommandLine::Shell(s.to_string())
    } else {
        CommandLine::Exec(Vec::new())
    }
}

/// The typed heredoc: body chomped for `<<-`; the fd is kept for RUN only.
fn typed_heredoc(h: &RawHeredoc, keep_fd: bool) -> Heredoc {
    let content = if h.chomp {
        h.content
            .split_inclusive('\n')
            .map(|l| l.trim_start_matches('\t'))
            .collect()
    } else {
        h.content.clone()
    };
    Heredoc {
        name: h.name.clone(),
        content,
        expand: h.expand,
        fd: if keep_fd { h.fd } else { None },
    }
}

/// Go `time.ParseDuration`, in nanoseconds (`None` when malformed or out of range).
fn parse_go_duration(s: &str) -> Option<i128> {
    let (neg, mut rest) = match s.as_bytes().first() {
        Some(b'-') => (true, &s[1..]),
        Some(b'+') => (false, &s[1..]),
        _ => (false, s),
    };
    if rest == "0" {
        return Some(0);
    }
    if rest.is_empty() {
        return None;
    }
    let mut total: i128 = 0;
    while !rest.is_empty() {
        let int_len = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        let (int, after) = rest.split_at(int_len);
        let (frac, after) = match after.strip_prefix('.') {
            Some(a) => {
                let n = a.find(|c: char| !c.is_ascii_digit()).unwrap_or(a.len());
                a.split_at(n)
            }
            None => ("", after),
        };
        if int.is_empty() && frac.is_empty() {
            return None;
        }
        let unit_len = after
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(after.len());
        let (unit, after) = after.split_at(unit_len);
        let scale: i128 = match unit {
            "ns" => 1,
            "us" | "µs" | "μs" => 1_000,
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60_000_000_000,
            "h" => 3_600_000_000_000,
            _ => return None,
        };
        let whole: i128 = if int.is_empty() { 0 } else { int.parse().ok()? };
        let mut part = whole.checked_mul(scale)?;
        let mut div = scale;
        for d in frac.bytes().take(18) {
            div /= 10;
            part += i128::from(d - b'0') * div;
            if div == 0 {
                break;
            }
        }
        total = total.checked_add(part)?;
        if total > i128::from(i64::MAX) {
            return None;
        }
        rest = after;
    }
    Some(if neg { -total } else { total })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(src: &str) -> Recipe {
        match parse(src.as_bytes(), "Dockerfile") {
            Ok(r) => r,
            Err(e) => panic!("{e}"),
        }
    }

    fn err(src: &str) -> RecipeError {
        match parse(src.as_bytes(), "Dockerfile") {
            Ok(r) => panic!("expected an error, got {r:?}"),
            Err(e) => e,
        }
    }

    fn first(src: &str) -> InstructionKind {
        let r = ok(src);
        r.stages[0].instructions[0].kind.clone()
    }

    #[test]
    fn stages_and_meta_args() {
        let r = ok("ARG V=1\nFROM --platform=$P img:$V AS Build\nRUN x\nfrom build as Two\n");
        assert_eq!(r.meta_args.len(), 1);
        assert_eq!(r.stages.len(), 2);
        assert_eq!(r.stages[0].name.as_deref(), Some("build"));
        assert_eq!(r.stages[0].platform.as_deref(), Some("$P"));
        assert_eq!(r.stages[0].base, "img:$V");
        assert_eq!(r.stages[1].name.as_deref(), Some("two"));
        assert_eq!(
            r.stages[0].span,
            Span {
                start_line: 2,
                start_col: 1,
                end_line: 2
            }
        );
    }

    #[test]
    fn add_and_copy_stay_distinct() {
        assert!(matches!(
            first("FROM a\nADD x.tar /d/\n"),
            InstructionKind::Add(_)
        ));
        assert!(matches!(
            first("FROM a\nCOPY x.tar /d/\n"),
            InstructionKind::Copy(_)
        ));
    }

    #[test]
    fn stage_name_rules() {
        assert!(err("FROM a AS 1x\n").message.contains("invalid name"));
        // A reserved name is the ReservedStageName check's, not an error.
        assert!(ok("FROM a AS scratch\n").stages[0].name.is_some());
        // A repeated name is the plan's concern (a warning there), not an error.
        let r = ok("FROM a AS x\nFROM b AS X\n");
        assert_eq!(r.stages[1].name.as_deref(), Some("x"));
        assert!(err("FROM a b\n").message.contains("one or three"));
        assert!(
            err("RUN x\nFROM a\n")
                .message
                .contains("before the first FROM")
        );
    }

    #[test]
    fn run_forms_and_flags() {
        let k = first(
            "FROM a\nRUN --mount=type=cache,target=/c --mount=type=tmpfs,target=/t --network=none echo hi\n",
        );
        let InstructionKind::Run(r) = k else {
            panic!("not run")
        };
        assert_eq!(r.command, CommandLine::Shell("echo hi".into()));
        assert_eq!(r.mounts.len(), 2);
        assert_eq!(r.network.as_deref(), Some("none"));
        let InstructionKind::Run(r) = first("FROM a\nRUN [\"a\", \"b c\"]\n") else {
            panic!()
        };
        assert_eq!(r.command, CommandLine::Exec(vec!["a".into(), "b c".into()]));
        let InstructionKind::Run(r) = first("FROM a\nRUN [\"a\", 'b']\n") else {
            panic!()
        };
        assert_eq!(r.command, CommandLine::Shell("[\"a\", 'b']".into()));
    }

    #[test]
    fn run_heredocs() {
        let InstructionKind::Run(r) =
            first("FROM a\nRUN <<-EOF 3<<'X'\n\techo $a\n\tEOF\nraw $b\nX\n")
        else {
            panic!()
        };
        assert_eq!(r.command, CommandLine::Shell("<<-EOF 3<<'X'".into()));
        assert_eq!(r.heredocs[0].content, "echo $a\n");
        assert!(r.heredocs[0].expand && r.heredocs[0].fd.is_none());
        assert_eq!(
            r.heredocs[1],
            Heredoc {
                name: "X".into(),
                content: "raw $b\n".into(),
                expand: false,
                fd: Some(3)
            }
        );
    }

    #[test]
    fn copy_heredocs_and_flags() {
        let k = first(
            "FROM a\nCOPY --chmod=755 --link --exclude=*.md --exclude=x <<A <<\"B\" /dest/\na\nA\nb\nB\n",
        );
        let InstructionKind::Copy(c) = k else {
            panic!()
        };
        assert_eq!(c.sources, vec!["<<A", "<<\"B\""]);
        assert_eq!(c.dest, "/dest/");
        assert_eq!(c.heredocs.len(), 2);
        assert!(!c.heredocs[1].expand);
        assert!(c.link);
        assert_eq!(c.exclude, vec!["*.md", "x"]);
        assert_eq!(c.chmod.as_deref(), Some("755"));
        let InstructionKind::Add(c) =
            first("FROM a\nADD --checksum=sha256:x --unpack=false --keep-git-dir=true u /d\n")
        else {
            panic!()
        };
        assert_eq!(c.unpack, Some(false));
        assert!(c.keep_git_dir);
        let InstructionKind::Copy(c) =
            first("FROM a\nCOPY --from=b --parents --chown=1:2 [\"a b\", \"/c\"]\n")
        else {
            panic!()
        };
        assert_eq!(
            (c.from.as_deref(), c.parents, c.sources[0].as_str()),
            (Some("b"), true, "a b")
        );
    }

    #[test]
    fn flag_errors_are_located() {
        let e = err("FROM a\nCOPY --doit=true a b\n");
        assert_eq!((e.line, e.col), (2, 6));
        assert!(
            e.message.contains("--doit")
                && e.message.contains("COPY")
                && e.message.contains("line 2")
        );
        assert!(
            err("FROM a\nADD --from=x a b\n")
                .message
                .contains("unknown flag")
        );
        assert!(
            err("FROM a\nCOPY --link=maybe a b\n")
                .message
                .contains("boolean")
        );
        assert!(
            err("FROM a\nCOPY --from a b\n")
                .message
                .contains("missing a value")
        );
        assert!(
            err("FROM a\nCOPY --from=a --from=b a b\n")
                .message
                .contains("duplicate")
        );
        assert!(
            err("FROM a\nENV --x=1 a=b\n")
                .message
                .contains("unknown flag")
        );
    }

    #[test]
    fn arity_errors() {
        let e = err("FROM a\nCOPY a\n");
        assert_eq!((e.line, e.col), (2, 6));
        assert!(err("FROM a\nWORKDIR a b\n").message.contains("exactly one"));
        let e = err("FROM a\nWORKDIR a b\n");
        assert_eq!(e.col, 11);
        assert!(err("FROM a\nUSER\n").message.contains("exactly one"));
        assert!(err("FROM a\nEXPOSE\n").message.contains("at least one"));
        assert!(err("FROM a\nENV PATH\n").message.contains("two arguments"));
        assert!(err("FROM a\nSHELL sh -c\n").message.contains("JSON"));
        assert!(err("FROM a\nARG =x\n").message.contains("blank"));
        assert!(err("FROM a\nVOLUME [\"\"]\n").message.contains("empty"));
        let InstructionKind::Workdir(w) = first("FROM a\nWORKDIR \"/a b\"\n") else {
            panic!()
        };
        assert_eq!(w, "\"/a b\"");
    }

    #[test]
    fn unknown_instruction() {
        let e = err("FROM a\n  FOO bar\n");
        assert_eq!((e.line, e.col), (2, 3));
        assert!(e.message.contains("unknown instruction: FOO"));
    }

    #[test]
    fn env_label_arg_expose_volume_user() {
        let k = first("FROM a\nENV a=1 b=\"x y\"\n");
        assert!(
            matches!(k, InstructionKind::Env(ref p) if p == &vec![("a".into(), "1".into()), ("b".into(), "\"x y\"".into())])
        );
        let k = first("FROM a\nENV PATH /usr/bin:$PATH\n");
        assert!(matches!(k, InstructionKind::Env(ref p) if p[0].1 == "/usr/bin:$PATH"));
        let k = first("FROM a\nLABEL a=b\n");
        assert!(matches!(k, InstructionKind::Label(ref p) if p.len() == 1));
        let k = first("FROM a\nARG a b=2\n");
        assert!(
            matches!(k, InstructionKind::Arg(ref d) if d[1] == ArgDecl { name: "b".into(), default: Some("2".into()) } && d[0].default.is_none())
        );
        assert!(
            matches!(first("FROM a\nEXPOSE 80 443/tcp\n"), InstructionKind::Expose(ref p) if p.len() == 2)
        );
        assert!(
            matches!(first("FROM a\nVOLUME /a /b\n"), InstructionKind::Volume(ref v) if v.len() == 2)
        );
        assert!(
            matches!(first("FROM a\nUSER me:grp\n"), InstructionKind::User(ref u) if u == "me:grp")
        );
        assert!(matches!(
            first("FROM a\nSTOPSIGNAL SIGKILL\n"),
            InstructionKind::Stopsignal(_)
        ));
        assert!(
            matches!(first("FROM a\nMAINTAINER Me <me@x>\n"), InstructionKind::Maintainer(ref m) if m == "Me <me@x>")
        );
        assert!(
            matches!(first("FROM a\nSHELL [\"bash\", \"-c\"]\n"), InstructionKind::Shell(ref s) if s.len() == 2)
        );
        assert!(matches!(
            first("FROM a\nCMD [\"a\"]\n"),
            InstructionKind::Cmd(CommandLine::Exec(_))
        ));
        assert!(matches!(
            first("FROM a\nENTRYPOINT a b\n"),
            InstructionKind::Entrypoint(CommandLine::Shell(_))
        ));
    }

    #[test]
    fn healthcheck() {
        let k = first(
            "FROM a\nHEALTHCHECK --interval=1m30s --timeout=500ms --start-period=0s --retries=3 CMD curl -f x\n",
        );
        let InstructionKind::Healthcheck(Healthcheck::Check {
            command,
            interval_ns,
            timeout_ns,
            start_period_ns,
            retries,
            ..
        }) = k
        else {
            panic!()
        };
        assert_eq!(command, CommandLine::Shell("curl -f x".into()));
        assert_eq!(
            (interval_ns, timeout_ns, start_period_ns, retries),
            (90_000_000_000, 500_000_000, 0, 3)
        );
        assert!(matches!(
            first("FROM a\nHEALTHCHECK NONE\n"),
            InstructionKind::Healthcheck(Healthcheck::None)
        ));
        assert!(
            err("FROM a\nHEALTHCHECK --interval=10us CMD x\n")
                .message
                .contains("less than 1ms")
        );
        assert!(
            err("FROM a\nHEALTHCHECK --interval=abc CMD x\n")
                .message
                .contains("invalid duration")
        );
        assert!(
            err("FROM a\nHEALTHCHECK --retries=-1 CMD x\n")
                .message
                .contains("retries")
        );
        assert!(
            err("FROM a\nHEALTHCHECK CONNECT x\n")
                .message
                .contains("Unknown type")
        );
        assert!(
            err("FROM a\nHEALTHCHECK CMD\n")
                .message
                .contains("Missing command")
        );
        assert!(
            err("FROM a\nHEALTHCHECK NONE x\n")
                .message
                .contains("no arguments")
        );
        assert_eq!(parse_go_duration("1.5h"), Some(5_400_000_000_000));
        assert_eq!(
            parse_go_duration("1h2m3s4ms5us6ns"),
            Some(3_723_004_005_006)
        );
        assert_eq!(parse_go_duration("-1s"), Some(-1_000_000_000));
        assert_eq!(parse_go_duration("1"), None);
        assert_eq!(parse_go_duration(".s"), None);
    }

    #[test]
    fn onbuild() {
        let k = first("FROM a\nONBUILD RUN echo hi\n");
        let InstructionKind::Onbuild { trigger, parsed } = k else {
            panic!()
        };
        assert_eq!(trigger, "RUN echo hi");
        assert!(matches!(parsed.kind, InstructionKind::Run(_)));
        let k = first("FROM a\nonbuild copy <<EOF /x\nhi\nEOF\n");
        let InstructionKind::Onbuild { parsed, .. } = k else {
            panic!()
        };
        assert!(
            matches!(parsed.kind, InstructionKind::Copy(ref c) if c.heredocs[0].content == "hi\n")
        );
        let e = err("FROM a\nONBUILD ONBUILD RUN x\n");
        assert_eq!((e.line, e.col), (2, 9));
        assert!(
            err("FROM a\nONBUILD FROM b\n")
                .message
                .contains("isn't allowed")
        );
        assert!(
            err("FROM a\nONBUILD MAINTAINER b\n")
                .message
                .contains("isn't allowed")
        );
        assert!(err("FROM a\nONBUILD\n").message.contains("at least one"));
    }

    #[test]
    fn bom_crlf_backtick_and_text() {
        let r = ok("\u{FEFF}# escape=`\r\nFROM a\r\nRUN echo \\ `\r\n  more\r\n");
        let i = &r.stages[0].instructions[0];
        assert_eq!(i.text, "RUN echo \\   more");
        assert_eq!(
            i.span,
            Span {
                start_line: 3,
                start_col: 1,
                end_line: 4
            }
        );
        assert_eq!(r.directives.escape, '`');
    }

    #[test]
    fn error_display() {
        let e = err("FROM a\nCOPY --nope a b\n");
        assert_eq!(
            e.to_string(),
            "Dockerfile:2:6: unknown flag: --nope (for COPY, line 2)\n   2 | COPY --nope a b\n     |      ^"
        );
    }
}
