//! Build checks on a real recipe: gathers what the pure rules of [`crate::recipe::checks`] need
//! (the context's ignore rules, the env of base images already in the store, reference
//! validation) and runs them, for `kiln check`, `kiln build --check` and every build.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use super::BuildError;
use crate::image;
use crate::recipe::checks::{self, CheckConfig, CheckInput, Finding};
use crate::recipe::{self, ignore::IgnoreRules};
use crate::registry::reference::Reference;
use crate::sources::context::Context;
use crate::store::Store;

/// What a check run looks at.
pub struct LintInput<'a> {
    /// The recipe's path (messages, ignore-file lookup).
    pub recipe_path: &'a Path,
    /// The recipe's bytes.
    pub recipe_bytes: &'a [u8],
    /// The context directory, if there is one.
    pub context_dir: Option<&'a Path>,
    /// `--build-arg` values (only `BUILDKIT_DOCKERFILE_CHECK` matters).
    pub build_args: &'a BTreeMap<String, String>,
    /// Names given with `--build-context`.
    pub named_contexts: BTreeSet<String>,
}

/// The findings of a check run and the configuration that chose them.
#[derive(Debug)]
pub struct Lint {
    /// Findings of the enabled rules, by position.
    pub findings: Vec<Finding>,
    /// The `# check=` configuration in effect.
    pub config: CheckConfig,
}

impl Lint {
    /// The error a build stops with when the configuration makes findings errors.
    pub fn as_error(&self, file: &str) -> Option<BuildError> {
        if !self.config.error || self.findings.is_empty() {
            return None;
        }
        let rules: BTreeSet<&str> = self.findings.iter().map(|f| f.rule).collect();
        Some(BuildError::Checks {
            file: file.to_string(),
            count: self.findings.len(),
            rules: rules.into_iter().collect::<Vec<_>>().join(", "),
        })
    }
}

/// Runs the build checks. `store` gives the env of base images it holds (UndefinedVar skips
/// stages whose base is not there); nothing is pulled.
pub fn lint(store: Option<&Store>, input: &LintInput<'_>) -> Result<Lint, BuildError> {
    let file = input.recipe_path.display().to_string();
    let ast = recipe::parse_syntax(input.recipe_bytes, &file)?;
    let parsed = recipe::parse(input.recipe_bytes, &file)?;
    let text = String::from_utf8_lossy(input.recipe_bytes);
    let config = CheckConfig::for_build(
        parsed.directives.check.as_deref(),
        input
            .build_args
            .get(checks::CHECK_BUILD_ARG)
            .map(String::as_str),
    )
    .map_err(|message| BuildError::Invalid {
        file: file.clone(),
        line: 1,
        message: format!("build checks configuration: {message}"),
    })?;
    let ignore: Option<IgnoreRules> = match input.context_dir {
        Some(dir) => {
            let recipe_abs = std::fs::canonicalize(input.recipe_path).ok();
            Some(
                Context::open(dir, recipe_abs.as_deref())
                    .map_err(BuildError::ContextDir)?
                    .ignore_rules()
                    .clone(),
            )
        }
        None => None,
    };
    let image_env = |reference: &str| -> Option<Vec<String>> {
        let store = store?;
        let name = Reference::parse(reference).ok()?.to_string();
        let image = store.resolve(&name).ok()??;
        Some(
            image
                .config
                .config
                .env
                .iter()
                .map(|e| e.split_once('=').map_or(e.as_str(), |(k, _)| k).to_string())
                .collect(),
        )
    };
    let valid_image = |reference: &str| Reference::parse(reference).is_ok();
    let host = image::Platform::host();
    let platform_args = crate::plan::platform_args(&host, &host);
    let check_input = CheckInput {
        file: &file,
        text: &text,
        ast: &ast,
        recipe: &parsed,
        platform_args: &platform_args,
        ignore: ignore.as_ref(),
        named_contexts: &input.named_contexts,
        image_env: &image_env,
        valid_image: &valid_image,
    };
    Ok(Lint {
        findings: checks::check(&check_input, &config),
        config,
    })
}
