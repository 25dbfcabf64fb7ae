//! Evaluating a recipe without building it: `kiln build --call check|outline|targets`,
//! `kiln build --check` and `kiln check`. Results go to stdout (text, or JSON with
//! `--call METHOD,format=json` / `kiln check --format json`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Serialize;

use kiln::build::lint::{self, LintInput};
use kiln::image::Platform;
use kiln::plan::{self, PlanOptions};
use kiln::recipe::{self, outline};
use kiln::sources::named::NamedSource;
use kiln::store::Store;

use super::{Failure, emit};

/// `--call` / `--check` on `kiln build`.
#[derive(clap::Args)]
pub(crate) struct CallArgs {
    /// What to do instead of building: check (the build checks), outline (what the target
    /// takes: build args, secrets, ssh), targets (the stages); `,format=json` for JSON.
    #[arg(long, value_name = "build|check|outline|targets[,format=json]")]
    call: Option<String>,
    /// Shorthand for --call=check.
    #[arg(long)]
    check: bool,
}

/// What `--call` asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Method {
    Check,
    Outline,
    Targets,
}

/// How results are printed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Format {
    Text,
    Json,
}

impl CallArgs {
    /// The method and format asked for; None to build.
    pub(crate) fn method(&self) -> Result<Option<(Method, Format)>, Failure> {
        let spec = match (&self.call, self.check) {
            (None, false) => return Ok(None),
            (None, true) => "check",
            (Some(c), _) => c.as_str(),
        };
        let mut parts = spec.split(',');
        let method = match parts.next().unwrap_or("").trim() {
            "build" if !self.check => return Ok(None),
            "build" => Method::Check,
            "check" | "lint" => Method::Check,
            "outline" => Method::Outline,
            "targets" => Method::Targets,
            other => {
                return Err(Failure::usage(format!(
                    "--call {other:?}: expected build, check, outline or targets"
                )));
            }
        };
        let mut format = Format::Text;
        for opt in parts {
            match opt.trim().split_once('=') {
                Some(("format", "json")) => format = Format::Json,
                Some(("format", "text")) => format = Format::Text,
                _ => {
                    return Err(Failure::usage(format!(
                        "--call {spec:?}: unknown option {opt:?} (format=text|json)"
                    )));
                }
            }
        }
        Ok(Some((method, format)))
    }
}

/// The recipe and what the command line says about it.
pub(crate) struct CallInput<'a> {
    pub(crate) recipe_path: &'a Path,
    pub(crate) recipe_bytes: &'a [u8],
    pub(crate) context_dir: Option<&'a Path>,
    pub(crate) build_args: &'a BTreeMap<String, String>,
    pub(crate) target: Option<&'a str>,
    pub(crate) named_contexts: &'a BTreeMap<String, NamedSource>,
}

/// Runs `method` and prints its result. A check with findings fails (exit status 1).
pub(crate) fn run(
    root: &Path,
    input: &CallInput<'_>,
    method: Method,
    format: Format,
) -> Result<(), Failure> {
    match method {
        Method::Check => check(root, input, format),
        Method::Targets | Method::Outline => {
            let file = input.recipe_path.display().to_string();
            let parsed = recipe::parse(input.recipe_bytes, &file).map_err(Failure::input)?;
            let text = String::from_utf8_lossy(input.recipe_bytes);
            if method == Method::Targets {
                let targets = outline::targets(&parsed, &text);
                return print(format, &targets, || targets_text(&targets));
            }
            let plan = plan::plan(
                &parsed,
                &PlanOptions {
                    build_args: input.build_args.clone(),
                    target: input.target.map(str::to_string),
                    target_platform: Platform::host(),
                    platform_args: plan::platform_args(&Platform::host(), &Platform::host()),
                    named_contexts: plan::NamedContext::all_of(input.named_contexts),
                },
            )
            .map_err(|e| Failure::usage(format!("{file}: {e}")))?;
            let o = outline::outline(&parsed, &text, &plan.needed, plan.target, input.build_args);
            print(format, &o, || outline_text(&o))
        }
    }
}

fn print<T: Serialize>(
    format: Format,
    value: &T,
    text: impl FnOnce() -> String,
) -> Result<(), Failure> {
    match format {
        Format::Json => emit!(
            "{}",
            serde_json::to_string_pretty(value).map_err(Failure::runtime)?
        ),
        Format::Text => {
            let text = text();
            if !text.is_empty() {
                emit!("{}", text.trim_end());
            }
        }
    }
    Ok(())
}

/// Runs the build checks and prints the findings; exit status 1 when there are some.
pub(crate) fn check(root: &Path, input: &CallInput<'_>, format: Format) -> Result<(), Failure> {
    // Base images already in the store tell which variables they define; nothing is pulled.
    let store = Store::open(root).ok();
    let result = lint::lint(
        store.as_ref(),
        &LintInput {
            recipe_path: input.recipe_path,
            recipe_bytes: input.recipe_bytes,
            context_dir: input.context_dir,
            build_args: input.build_args,
            named_contexts: input.named_contexts.keys().cloned().collect(),
        },
    )
    .map_err(|e| {
        let code = if e.is_input_error() { 2 } else { 1 };
        Failure {
            error: Box::new(e),
            code,
            hint: None,
        }
    })?;
    let findings = &result.findings;
    #[derive(Serialize)]
    struct Report<'a> {
        warnings: &'a [recipe::checks::Finding],
    }
    print(format, &Report { warnings: findings }, || {
        findings
            .iter()
            .map(|f| f.render())
            .collect::<Vec<_>>()
            .join("\n")
    })?;
    match findings.len() {
        0 => {
            eprintln!("check complete, no warnings found");
            Ok(())
        }
        n => Err(Failure {
            error: format!(
                "check complete, {n} warning{} found",
                if n == 1 { "" } else { "s" }
            )
            .into(),
            code: 1,
            hint: Some("`# check=skip=RULE` at the top of the recipe turns a rule off".into()),
        }),
    }
}

fn targets_text(targets: &[outline::Target]) -> String {
    let rows: Vec<(String, String)> = targets
        .iter()
        .map(|t| {
            let name = if t.default {
                format!("{} (default)", t.name)
            } else {
                t.name.clone()
            };
            (name, t.description.clone().unwrap_or_default())
        })
        .collect();
    table(&["TARGET", "DESCRIPTION"], &rows)
}

fn outline_text(o: &outline::Outline) -> String {
    let mut out = format!("TARGET:      {}\n", o.target.name);
    if let Some(d) = &o.target.description {
        out.push_str(&format!("DESCRIPTION: {d}\n"));
    }
    if !o.args.is_empty() {
        let rows: Vec<(String, String, String)> = o
            .args
            .iter()
            .map(|a| {
                (
                    a.name.clone(),
                    a.value.clone().unwrap_or_else(|| "<unset>".into()),
                    a.description.clone().unwrap_or_default(),
                )
            })
            .collect();
        out.push('\n');
        out.push_str(&table3(&["BUILD ARG", "VALUE", "DESCRIPTION"], &rows));
    }
    for (title, list) in [("SECRET", &o.secrets), ("SSH", &o.ssh)] {
        if list.is_empty() {
            continue;
        }
        let rows: Vec<(String, String)> = list
            .iter()
            .map(|u| (u.id.clone(), u.required.to_string()))
            .collect();
        out.push('\n');
        out.push_str(&table(&[title, "REQUIRED"], &rows));
    }
    out
}

/// Two columns, aligned.
fn table(header: &[&str; 2], rows: &[(String, String)]) -> String {
    let w = rows
        .iter()
        .map(|r| r.0.chars().count())
        .chain([header[0].len()])
        .max()
        .unwrap_or(0);
    let mut out = format!("{:<w$}  {}\n", header[0], header[1]);
    for (a, b) in rows {
        out.push_str(format!("{a:<w$}  {b}").trim_end());
        out.push('\n');
    }
    out
}

/// Three columns, aligned.
fn table3(header: &[&str; 3], rows: &[(String, String, String)]) -> String {
    let w0 = rows
        .iter()
        .map(|r| r.0.chars().count())
        .chain([header[0].len()])
        .max()
        .unwrap_or(0);
    let w1 = rows
        .iter()
        .map(|r| r.1.chars().count())
        .chain([header[1].len()])
        .max()
        .unwrap_or(0);
    let mut out = format!("{:<w0$}  {:<w1$}  {}\n", header[0], header[1], header[2]);
    for (a, b, c) in rows {
        out.push_str(format!("{a:<w0$}  {b:<w1$}  {c}").trim_end());
        out.push('\n');
    }
    out
}

/// `kiln check [-f FILE] [CONTEXT]`.
#[derive(clap::Args)]
pub(crate) struct CheckArgs {
    /// The build context directory (its ignore file is checked against COPY sources).
    #[arg(default_value = ".")]
    context: PathBuf,
    /// The recipe (default CONTEXT/Dockerfile, else CONTEXT/Containerfile; "-" = stdin).
    #[arg(short = 'f', long = "file", value_name = "PATH")]
    file: Option<PathBuf>,
    /// A build argument (only BUILDKIT_DOCKERFILE_CHECK changes what is checked).
    #[arg(long = "build-arg", value_name = "KEY[=VALUE]")]
    build_args: Vec<String>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Text)]
    format: Format,
}

/// Runs `kiln check`.
pub(crate) fn check_cmd(root: &Path, args: CheckArgs) -> Result<(), Failure> {
    let (recipe_path, recipe_bytes) =
        super::build::read_recipe(&args.context, args.file.as_deref())?;
    let build_args = super::build::parse_build_args(&args.build_args);
    let input = CallInput {
        recipe_path: &recipe_path,
        recipe_bytes: &recipe_bytes,
        context_dir: Some(&args.context),
        build_args: &build_args,
        target: None,
        named_contexts: &BTreeMap::new(),
    };
    check(root, &input, args.format)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn method(call: Option<&str>, check: bool) -> Option<(Method, Format)> {
        CallArgs {
            call: call.map(str::to_string),
            check,
        }
        .method()
        .ok()
        .flatten()
    }

    #[test]
    fn call_methods() {
        assert_eq!(method(None, false), None);
        assert_eq!(method(Some("build"), false), None);
        assert_eq!(method(None, true), Some((Method::Check, Format::Text)));
        assert_eq!(
            method(Some("outline,format=json"), false),
            Some((Method::Outline, Format::Json))
        );
        assert_eq!(
            method(Some("targets"), false),
            Some((Method::Targets, Format::Text))
        );
        assert!(
            CallArgs {
                call: Some("nope".into()),
                check: false
            }
            .method()
            .is_err()
        );
    }
}
