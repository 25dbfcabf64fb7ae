//! `--security-opt` and `--allow`: the seccomp profile RUN steps run under, and the
//! entitlements a recipe may ask for.

use std::path::Path;

use kiln::sandbox::SeccompFilter;

use super::Failure;

/// How RUN steps are fenced in, beyond their namespaces.
#[derive(clap::Args)]
pub(crate) struct SecurityArgs {
    /// seccomp=unconfined (no filter) or seccomp=FILE (a profile in Docker's JSON format);
    /// the default is Docker's default profile.
    #[arg(long = "security-opt", value_name = "seccomp=unconfined|FILE")]
    security_opt: Vec<String>,
    /// An entitlement the recipe may use: security.insecure (RUN --security=insecure runs
    /// with every capability and no seccomp filter); network.host is always granted.
    #[arg(long = "allow", value_name = "ENTITLEMENT")]
    allow: Vec<String>,
}

impl SecurityArgs {
    /// The seccomp filter for RUN steps (`None`: unconfined).
    pub(crate) fn seccomp(&self) -> Result<Option<SeccompFilter>, Failure> {
        let mut choice = None;
        for opt in &self.security_opt {
            let Some(value) = opt
                .strip_prefix("seccomp=")
                .or(opt.strip_prefix("seccomp:"))
            else {
                return Err(Failure::usage(format!(
                    "--security-opt {opt:?}: only seccomp=unconfined|FILE is supported"
                )));
            };
            choice = Some(value);
        }
        match choice {
            None => SeccompFilter::docker_default()
                .map(Some)
                .map_err(Failure::runtime),
            Some("unconfined") => Ok(None),
            Some(file) => {
                let bad = |e: &dyn std::fmt::Display| {
                    Failure::usage(format!("--security-opt seccomp={file}: {e}"))
                };
                let bytes = std::fs::read(Path::new(file)).map_err(|e| bad(&e))?;
                SeccompFilter::from_profile(&bytes)
                    .map(Some)
                    .map_err(|e| bad(&e))
            }
        }
    }

    /// Whether `RUN --security=insecure` is allowed.
    pub(crate) fn allow_insecure(&self) -> Result<bool, Failure> {
        let mut insecure = false;
        for entitlement in self.allow.iter().flat_map(|a| a.split(',')) {
            match entitlement.trim() {
                "security.insecure" => insecure = true,
                "network.host" => {}
                other => {
                    return Err(Failure::usage(format!(
                        "--allow {other:?}: expected security.insecure or network.host"
                    )));
                }
            }
        }
        Ok(insecure)
    }
}
