//! `--platform`: which platforms to build for (`kiln build`), or which image of an index to
//! take (`kiln pull`, `kiln inspect`).

use kiln::image::Platform;

use super::Failure;

/// `kiln build --platform P[,P…]`.
#[derive(clap::Args)]
pub(crate) struct PlatformArgs {
    /// The platforms to build for, os/arch[/variant] (linux/amd64, linux/arm64, linux/arm/v7,
    /// linux/ppc64le, linux/s390x, linux/riscv64, linux/386), comma-separated or repeated;
    /// default: the host's. Several give an OCI image index with one image per platform.
    #[arg(long = "platform", value_name = "P[,P...]", value_delimiter = ',')]
    platforms: Vec<String>,
}

impl PlatformArgs {
    /// The platforms asked for, in order, each once; empty for the host's.
    pub(crate) fn platforms(&self) -> Result<Vec<Platform>, Failure> {
        let mut out: Vec<Platform> = Vec::new();
        for p in self.platforms.iter().filter(|p| !p.trim().is_empty()) {
            let p = parse_platform(p)?;
            if !out.contains(&p) {
                out.push(p);
            }
        }
        Ok(out)
    }
}

/// Parses one `--platform` value; a bad one is a usage error naming it.
pub(crate) fn parse_platform(s: &str) -> Result<Platform, Failure> {
    Platform::parse(s)
        .map_err(|e| Failure::usage(format!("--platform: {e}")))
        .map_err(|f| f.hint("platforms are written os/arch[/variant], e.g. linux/arm64"))
}
