//! What `--call targets` and `--call outline` print: the recipe's stages with their
//! descriptions, and what a target takes from the command line (build args, secrets, ssh
//! agents). Descriptions are the comment lines right above a `FROM` or `ARG` that start with
//! the stage's or arg's name, as in BuildKit (`# build compiles the binary`). Pure.

use std::collections::BTreeMap;

use serde::Serialize;

use super::error::LineIndex;
use super::instructions::{InstructionKind, Recipe};
use super::shell::Lexer;

/// One stage, as `--call targets` lists it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Target {
    /// The stage's name, or its index when it has none.
    pub name: String,
    /// The description from the comment above its FROM.
    pub description: Option<String>,
    /// The FROM line's line number.
    pub line: usize,
    /// Built when no `--target` is given (the last stage).
    pub default: bool,
}

/// A build arg a target uses.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct OutlineArg {
    /// Its name.
    pub name: String,
    /// Its value: the `--build-arg` given, else the default; None when unset.
    pub value: Option<String>,
    /// The description from the comment above its ARG.
    pub description: Option<String>,
    /// Where it is declared.
    pub line: usize,
}

/// A secret or ssh agent a target's RUN steps mount.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct MountUse {
    /// The id (`--secret id=…`, `--ssh ID`).
    pub id: String,
    /// The step fails when it is not given.
    pub required: bool,
    /// The RUN's line.
    pub line: usize,
}

/// What a target takes from the command line.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Outline {
    /// The target stage.
    pub target: Target,
    /// Build args, global ones first, in recipe order.
    pub args: Vec<OutlineArg>,
    /// Secrets mounted by RUN steps.
    pub secrets: Vec<MountUse>,
    /// ssh agents mounted by RUN steps.
    pub ssh: Vec<MountUse>,
}

/// The description above line `line`: the comment lines right above it, when the first starts
/// with `name` (which is left out).
fn description(index: &LineIndex<'_>, line: usize, name: &str) -> Option<String> {
    let mut lines = Vec::new();
    let mut n = line;
    while n > 1 {
        n -= 1;
        let text = index.line_text(n).trim();
        let Some(comment) = text.strip_prefix('#') else {
            break;
        };
        lines.push(comment.trim().to_string());
    }
    lines.reverse();
    let first = lines.first()?;
    let rest = first.strip_prefix(name)?;
    if !(rest.is_empty() || rest.starts_with(char::is_whitespace)) {
        return None;
    }
    let mut text = rest.trim().to_string();
    for l in &lines[1..] {
        if !text.is_empty() {
            text.push(' ');
        }
        text.push_str(l);
    }
    (!text.is_empty()).then_some(text)
}

/// Every stage of the recipe.
pub fn targets(recipe: &Recipe, text: &str) -> Vec<Target> {
    let index = LineIndex::new(text);
    let last = recipe.stages.len().saturating_sub(1);
    recipe
        .stages
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let name = s.name.clone().unwrap_or_else(|| i.to_string());
            Target {
                description: description(&index, s.span.start_line, &name),
                name,
                line: s.span.start_line,
                default: i == last,
            }
        })
        .collect()
}

/// The outline of `target`, built from the stages in `needed` (the target and what it
/// depends on, from the plan), with `build_args` given on the command line.
pub fn outline(
    recipe: &Recipe,
    text: &str,
    needed: &[usize],
    target: usize,
    build_args: &BTreeMap<String, String>,
) -> Outline {
    let index = LineIndex::new(text);
    let lexer = Lexer::new(recipe.directives.escape);
    let mut meta: BTreeMap<String, String> = BTreeMap::new();
    let mut global_args = Vec::new();
    for instr in &recipe.meta_args {
        if let InstructionKind::Arg(decls) = &instr.kind {
            for d in decls {
                let value = match (build_args.get(&d.name), &d.default) {
                    (Some(v), _) => Some(v.clone()),
                    (None, Some(raw)) => lexer.process_word(raw, &meta).ok().map(|e| e.value),
                    (None, None) => None,
                };
                if let Some(v) = &value {
                    meta.insert(d.name.clone(), v.clone());
                }
                global_args.push(OutlineArg {
                    name: d.name.clone(),
                    value,
                    description: description(&index, instr.span.start_line, &d.name),
                    line: instr.span.start_line,
                });
            }
        }
    }
    // Global args count when a needed stage's FROM uses them or a needed stage redeclares them.
    let mut used_globals = std::collections::BTreeSet::new();
    let mut args = Vec::new();
    let (mut secrets, mut ssh) = (Vec::new(), Vec::new());
    for &i in needed {
        let stage = &recipe.stages[i];
        for word in std::iter::once(&stage.base).chain(stage.platform.iter()) {
            if let Ok(e) = lexer.process_word(word, &meta) {
                used_globals.extend(e.used);
            }
        }
        for instr in &stage.instructions {
            match &instr.kind {
                InstructionKind::Arg(decls) => {
                    for d in decls {
                        if global_args.iter().any(|g| g.name == d.name) && d.default.is_none() {
                            used_globals.insert(d.name.clone());
                            continue;
                        }
                        let value = match (build_args.get(&d.name), &d.default) {
                            (Some(v), _) => Some(v.clone()),
                            (None, Some(raw)) => {
                                lexer.process_word(raw, &meta).ok().map(|e| e.value)
                            }
                            (None, None) => None,
                        };
                        args.push(OutlineArg {
                            name: d.name.clone(),
                            value,
                            description: description(&index, instr.span.start_line, &d.name),
                            line: instr.span.start_line,
                        });
                    }
                }
                InstructionKind::Run(run) => {
                    for m in &run.mounts {
                        if let Some(used) = mount_use(m, instr.span.start_line) {
                            match used {
                                (true, u) => secrets.push(u),
                                (false, u) => ssh.push(u),
                            }
                        }
                    }
                }
                _ => {}
            }
        }
    }
    let mut all: Vec<OutlineArg> = global_args
        .into_iter()
        .filter(|g| used_globals.contains(&g.name))
        .collect();
    for a in args {
        if !all.iter().any(|b| b.name == a.name) {
            all.push(a);
        }
    }
    for list in [&mut secrets, &mut ssh] {
        let mut seen = std::collections::BTreeSet::new();
        list.retain(|u: &MountUse| seen.insert(u.id.clone()));
    }
    let mut target_entry = targets(recipe, text).swap_remove(target);
    target_entry.default = target + 1 == recipe.stages.len();
    Outline {
        target: target_entry,
        args: all,
        secrets,
        ssh,
    }
}

/// A `--mount` of type secret (true) or ssh (false), with its id and whether it is required.
fn mount_use(spec: &str, line: usize) -> Option<(bool, MountUse)> {
    let mut fields: BTreeMap<&str, &str> = BTreeMap::new();
    for f in spec.split(',') {
        let (k, v) = f.split_once('=').unwrap_or((f, ""));
        fields.insert(k.trim(), v.trim());
    }
    let required = |default: bool| {
        fields
            .get("required")
            .map_or(default, |v| v.is_empty() || *v == "true")
    };
    match fields.get("type").copied() {
        Some("secret") => {
            let id = fields.get("id").map(|s| s.to_string()).or_else(|| {
                fields
                    .get("target")
                    .or_else(|| fields.get("dst"))
                    .and_then(|t| t.rsplit('/').next())
                    .map(str::to_string)
            })?;
            Some((
                true,
                MountUse {
                    id,
                    required: required(false),
                    line,
                },
            ))
        }
        Some("ssh") => Some((
            false,
            MountUse {
                id: fields.get("id").unwrap_or(&"default").to_string(),
                required: required(false),
                line,
            },
        )),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SRC: &str = "\
# VERSION the release to build
ARG VERSION=1.0
ARG UNUSED=x

# base the common base
FROM busybox AS base

FROM base AS build
# MODE how to build
# (debug or release)
ARG MODE=release
RUN --mount=type=secret,id=npmrc,required=true --mount=type=ssh true
RUN echo $VERSION

# lint checks the code
FROM build AS lint
";

    #[test]
    fn lists_targets_with_descriptions() {
        let recipe = crate::recipe::parse(SRC.as_bytes(), "Dockerfile").unwrap();
        let t = targets(&recipe, SRC);
        let names: Vec<(&str, Option<&str>, bool)> = t
            .iter()
            .map(|t| (t.name.as_str(), t.description.as_deref(), t.default))
            .collect();
        assert_eq!(
            names,
            [
                ("base", Some("the common base"), false),
                ("build", None, false),
                ("lint", Some("checks the code"), true)
            ]
        );
    }

    #[test]
    fn outline_of_a_target() {
        let recipe = crate::recipe::parse(SRC.as_bytes(), "Dockerfile").unwrap();
        let args: BTreeMap<String, String> = [("MODE".to_string(), "debug".to_string())].into();
        let o = outline(&recipe, SRC, &[0, 1], 1, &args);
        assert_eq!(o.target.name, "build");
        let shown: Vec<(&str, Option<&str>, Option<&str>)> = o
            .args
            .iter()
            .map(|a| {
                (
                    a.name.as_str(),
                    a.value.as_deref(),
                    a.description.as_deref(),
                )
            })
            .collect();
        assert_eq!(
            shown,
            [(
                "MODE",
                Some("debug"),
                Some("how to build (debug or release)")
            )]
        );
        assert_eq!(o.secrets[0].id, "npmrc");
        assert!(o.secrets[0].required);
        assert_eq!(o.ssh[0].id, "default");
    }
}
