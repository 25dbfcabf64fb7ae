//! `kiln diff A B [--format json]`: its flags; finding and comparing are asked of the library.

use std::path::Path;

use clap::ValueEnum;

use kiln::compare::{CompareError, Finder};
use kiln::store::Store;

use super::{Failure, client, emit};

#[derive(Clone, Copy, ValueEnum)]
enum DiffFormat {
    Text,
    Json,
}

#[derive(clap::Args)]
pub(crate) struct DiffArgs {
    /// The first image: a name or id in the store, an OCI layout dir, an OCI archive, a
    /// docker-archive, or a registry reference.
    a: String,
    /// The second image, named the same ways.
    b: String,
    /// Output format.
    #[arg(long, value_enum, default_value_t = DiffFormat::Text)]
    format: DiffFormat,
    /// Registries: verify TLS (false also allows plain http).
    #[arg(long, value_name = "BOOL", default_value_t = true, action = clap::ArgAction::Set)]
    tls_verify: bool,
}

fn compare_failure(e: CompareError) -> Failure {
    let hint = matches!(e, CompareError::NotFound { .. })
        .then(|| "`kiln images` lists what the store holds".to_string());
    let mut f = if e.is_input_error() {
        Failure::input(e)
    } else {
        Failure::runtime(e)
    };
    f.hint = hint;
    f
}

/// Prints the comparison; exits 0 when the images are identical, 1 when they differ (as
/// diff(1) does), 2 when one cannot be found.
pub(crate) fn diff_cmd(root: &Path, args: DiffArgs) -> Result<i32, Failure> {
    let store = Store::open(root)?;
    let client = client(args.tls_verify);
    let finder = Finder::new(&store, &client).map_err(compare_failure)?;
    let a = finder.find(&args.a).map_err(compare_failure)?;
    let b = finder.find(&args.b).map_err(compare_failure)?;
    let report = finder.compare(&a, &b).map_err(compare_failure)?;
    let text = match args.format {
        DiffFormat::Text => report.to_text(),
        DiffFormat::Json => report.to_json(),
    };
    emit!("{}", text.trim_end());
    Ok(if report.identical { 0 } else { 1 })
}
