//! The `docker buildx build` flags of the everyday inner loop: `--build-context`, `--load`,
//! `--pull`, `--add-host`, `--no-cache-filter`; each turned into build options here.

use std::collections::BTreeMap;

use kiln::sources::named::{self, NamedSource};

use super::Failure;

/// The inner-loop flags of `kiln build`.
#[derive(clap::Args)]
pub(crate) struct DevLoopArgs {
    /// A named context for FROM NAME, COPY --from=NAME and RUN --mount=…,from=NAME:
    /// NAME=DIR | NAME=docker-image://REF | NAME=oci-layout://DIR[:TAG] | NAME=target:STAGE
    /// (repeatable).
    #[arg(long = "build-context", value_name = "NAME=VALUE")]
    pub(crate) build_contexts: Vec<String>,
}

impl DevLoopArgs {
    /// The `--build-context` values, by name.
    pub(crate) fn named_contexts(&self) -> Result<BTreeMap<String, NamedSource>, Failure> {
        let mut out = BTreeMap::new();
        for spec in &self.build_contexts {
            let (name, source) = named::parse(spec).map_err(Failure::input)?;
            if out.insert(name.clone(), source).is_some() {
                return Err(Failure::usage(format!(
                    "--build-context {name:?} is given twice"
                )));
            }
        }
        Ok(out)
    }
}
