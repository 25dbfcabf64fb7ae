//! Command-line parsing (the contract in DESIGN.md §1), the choice of progress renderer, the
//! one error printer (`error:` + cause chain + hint) and exit codes: 0 success, 1 a failed
//! build, 2 a usage or recipe error.

mod build;
mod cache;
mod call;
mod devloop;
mod diff;
mod limits;
mod output;
mod platform;
mod release;
mod secrets;
mod security;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use clap::{Parser, Subcommand, ValueEnum};

use kiln::distribution;
use kiln::image::{Platform, platform_names};
use kiln::recipe;
use kiln::registry::reference::Reference;
use kiln::registry::{Client, ClientOptions};
use kiln::store::{self, Store, StoredImage, StoredRef};

use self::build::{BuildArgs, build_cmd};
use self::diff::{DiffArgs, diff_cmd};
use self::platform::parse_platform;

/// Writes a line of data to stdout; a closed pipe (`kiln parse F | head`) ends output quietly
/// instead of panicking as `println!` would.
macro_rules! emit {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let mut out = std::io::stdout().lock();
        if let Err(e) = writeln!(out, $($arg)*).and_then(|()| out.flush()) {
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                std::process::exit(0);
            }
        }
    }};
}
pub(crate) use emit;

/// Set by SIGINT/SIGTERM; builds stop at the next check and clean up.
pub(crate) static CANCEL: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    CANCEL.store(true, Ordering::SeqCst);
}

#[derive(Parser)]
#[command(
    name = "kiln",
    version,
    about = "Build OCI images from Dockerfiles: daemonless, reproducible, fast"
)]
struct Cli {
    /// Store location (default: $KILN_ROOT, else /var/lib/kiln as root, else $XDG_DATA_HOME/kiln).
    #[arg(long, global = true, value_name = "DIR")]
    root: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Build an image from a Dockerfile.
    Build(Box<BuildArgs>),
    /// Run the build checks on a recipe without building it.
    Check(call::CheckArgs),
    /// Compare two images: config fields, then layer by layer the files added, removed and
    /// changed (exit status 0 identical, 1 different).
    Diff(Box<DiffArgs>),
    /// Print the parsed recipe.
    Parse {
        /// Output format: `json` (typed instructions) or `dump` (BuildKit parser-test format).
        #[arg(long, value_enum, default_value_t = ParseFormat::Json)]
        format: ParseFormat,
        /// The recipe file.
        file: PathBuf,
    },
    /// Load an OCI layout dir, OCI archive or docker-archive into the store.
    Import {
        /// The layout directory or archive.
        path: PathBuf,
        /// The name to give it, NAME[:TAG].
        name: String,
    },
    /// List local images.
    Images,
    /// Print an image's config (JSON); for an image index, the index, listing its platforms.
    Inspect {
        /// Name or image id.
        image: String,
        /// From an index, print this platform's image config instead.
        #[arg(long, value_name = "P")]
        platform: Option<String>,
    },
    /// Give an image another name.
    Tag {
        /// Existing name or image id.
        src: String,
        /// New name.
        dst: String,
    },
    /// Remove image names.
    Rmi {
        /// Names to remove.
        #[arg(required = true)]
        images: Vec<String>,
    },
    /// Remove unreferenced blobs, unpacked layers and cache records.
    Prune,
    /// Pull an image from a registry into the store.
    Pull {
        /// The image reference.
        reference: String,
        /// From an image index, pull this platform's image (default: the host's).
        #[arg(long, value_name = "P")]
        platform: Option<String>,
        /// Verify TLS (false also allows plain http).
        #[arg(long, value_name = "BOOL", default_value_t = true, action = clap::ArgAction::Set)]
        tls_verify: bool,
    },
    /// Push a stored image to a registry.
    Push {
        /// Name or image id in the store.
        image: String,
        /// Where to push (default: the image's name).
        reference: Option<String>,
        /// Verify TLS (false also allows plain http).
        #[arg(long, value_name = "BOOL", default_value_t = true, action = clap::ArgAction::Set)]
        tls_verify: bool,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum ParseFormat {
    Json,
    Dump,
}

/// An error for the printer: the error, an exit status and an optional hint.
pub(crate) struct Failure {
    pub(crate) error: Box<dyn std::error::Error>,
    pub(crate) code: i32,
    pub(crate) hint: Option<String>,
}

impl Failure {
    pub(crate) fn usage(message: impl Into<String>) -> Failure {
        Failure {
            error: message.into().into(),
            code: 2,
            hint: None,
        }
    }
    pub(crate) fn runtime(error: impl std::error::Error + 'static) -> Failure {
        Failure {
            error: Box::new(error),
            code: 1,
            hint: None,
        }
    }
    pub(crate) fn input(error: impl std::error::Error + 'static) -> Failure {
        Failure {
            error: Box::new(error),
            code: 2,
            hint: None,
        }
    }
    pub(crate) fn hint(mut self, hint: impl Into<String>) -> Failure {
        self.hint = Some(hint.into());
        self
    }
}

impl From<kiln::store::StoreError> for Failure {
    fn from(e: kiln::store::StoreError) -> Failure {
        Failure::runtime(e)
    }
}

/// Runs the CLI; returns the exit status.
pub fn main() -> i32 {
    let mut cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() { 2 } else { 0 };
        }
    };
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe {
            libc::signal(sig, on_signal as *const () as libc::sighandler_t);
        }
    }
    // Before entering a user namespace, where every user is root.
    let root = store_root(cli.root.take());
    if needs_user_namespace(&cli.command)
        && let Err(e) = kiln::sandbox::userns::enter()
    {
        print_error(&Failure::runtime(e).hint(
            "kiln builds as a normal user in a user namespace; see README, \"Rootless kiln\"",
        ));
        return 1;
    }
    match run(cli.command, &root) {
        Ok(code) => code,
        Err(f) => {
            print_error(&f);
            f.code
        }
    }
}

fn print_error(f: &Failure) {
    let mut err = std::io::stderr().lock();
    let top = f.error.to_string();
    let _ = writeln!(err, "error: {top}");
    // Causes whose text the message above already shows are not repeated.
    let mut shown = top;
    let mut source = f.error.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !shown.contains(&text) {
            let _ = writeln!(err, "  caused by: {text}");
            shown = text;
        }
        source = s.source();
    }
    if let Some(h) = &f.hint {
        let _ = writeln!(err, "hint: {h}");
    }
}

fn store_root(cli_root: Option<PathBuf>) -> PathBuf {
    if let Some(r) = cli_root {
        return r;
    }
    if let Some(r) = std::env::var_os("KILN_ROOT").filter(|r| !r.is_empty()) {
        return PathBuf::from(r);
    }
    if nix::unistd::geteuid().is_root() {
        return PathBuf::from("/var/lib/kiln");
    }
    let data = std::env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share")))
        .unwrap_or_else(|| PathBuf::from("."));
    data.join("kiln")
}

/// Whether `command` must run in a user namespace when kiln is not root: everything that
/// touches the store, whose layers hold files of many owners.
fn needs_user_namespace(command: &Command) -> bool {
    !nix::unistd::geteuid().is_root() && !matches!(command, Command::Parse { .. })
}

/// Runs a command; returns its exit status.
fn run(command: Command, root: &Path) -> Result<i32, Failure> {
    let done: Result<(), Failure> = match command {
        Command::Diff(args) => return diff_cmd(root, *args),
        Command::Parse { format, file } => parse(&file, format),
        Command::Build(args) => build_cmd(root, *args),
        Command::Check(args) => call::check_cmd(root, args),
        Command::Import { path, name } => {
            let name = normalize(&name)?;
            let store = Store::open(root)?;
            let item = store::import(&store, &path).map_err(Failure::input)?;
            store.tag(&name, item.descriptor())?;
            emit!("{}", item.id());
            Ok(())
        }
        Command::Images => {
            let store = Store::open(root)?;
            let mut out = std::io::stdout().lock();
            let _ = writeln!(
                out,
                "{:<50} {:<15} {:<19} {:>10}  {:<20}  PLATFORMS",
                "NAME", "TAG", "IMAGE ID", "SIZE", "CREATED"
            );
            for img in store.images()? {
                let _ = writeln!(
                    out,
                    "{:<50} {:<15} {:<19} {:>10}  {:<20}  {}",
                    img.name,
                    img.tag,
                    &img.id.hex()[..12],
                    human_size(img.size),
                    img.created.as_deref().unwrap_or("-"),
                    match img.platforms.is_empty() {
                        true => "-".to_string(),
                        false => platform_names(&img.platforms).replace(", ", ","),
                    }
                );
            }
            Ok(())
        }
        Command::Inspect { image, platform } => {
            let store = Store::open(root)?;
            let item = find(&store, &image)?;
            let value = match (&item, platform) {
                (StoredRef::Image(img), None) => serde_json::to_value(&img.config),
                (StoredRef::Index(x), None) => serde_json::to_value(&x.body),
                (_, Some(p)) => {
                    let wanted = parse_platform(&p)?;
                    let img = image_for(&store, &item, &wanted, &image)?;
                    serde_json::to_value(&img.config)
                }
            }
            .map_err(Failure::runtime)?;
            emit!(
                "{}",
                serde_json::to_string_pretty(&value).map_err(Failure::runtime)?
            );
            Ok(())
        }
        Command::Tag { src, dst } => {
            let store = Store::open(root)?;
            let item = find(&store, &src)?;
            store.tag(&normalize(&dst)?, item.descriptor())?;
            Ok(())
        }
        Command::Rmi { images } => {
            let store = Store::open(root)?;
            for name in images {
                let full = normalize(&name)?;
                if !store.untag(&full)? {
                    return Err(Failure::input(NotFound(name)));
                }
                eprintln!("untagged {full}");
            }
            Ok(())
        }
        Command::Pull {
            reference,
            platform,
            tls_verify,
        } => {
            let r = Reference::parse(&reference).map_err(Failure::input)?;
            let platform = platform.as_deref().map(parse_platform).transpose()?;
            let store = Store::open(root)?;
            let (item, img) =
                distribution::pull(&store, &client(tls_verify), &r, platform.as_ref())
                    .map_err(transfer_failure)?;
            let own = img.config.platform().normalized();
            if let Some(wanted) = &platform
                && !own.is_unknown()
                && !own.matches(wanted)
            {
                return Err(Failure::runtime(PlatformMismatch {
                    reference: r.to_string(),
                    wanted: wanted.clone(),
                    found: own,
                }));
            }
            match &item {
                StoredRef::Index(_) => eprintln!("pulled {r} (an image index; its {own} image)"),
                StoredRef::Image(_) => eprintln!("pulled {r}"),
            }
            emit!("{}", item.id());
            Ok(())
        }
        Command::Push {
            image,
            reference,
            tls_verify,
        } => {
            let store = open_store(root, tls_verify)?;
            let item = find(&store, &image)?;
            let target =
                Reference::parse(reference.as_deref().unwrap_or(&image)).map_err(Failure::input)?;
            let digest = distribution::push(&store, &client(tls_verify), &item, &target)
                .map_err(transfer_failure)?;
            eprintln!("pushed {target}");
            emit!("{digest}");
            Ok(())
        }
        Command::Prune => {
            let store = Store::open(root)?;
            let report = store.prune()?;
            eprintln!(
                "removed {} images, {} blobs ({}), {} unpacked layers, {} cache records",
                report.images_removed,
                report.blobs_removed,
                human_size(report.bytes_freed),
                report.layer_dirs_removed,
                report.cache_records_removed
            );
            Ok(())
        }
    };
    done.map(|()| 0)
}

/// Opens the store able to fetch the layers shared caches promised (with these registry
/// settings).
pub(crate) fn open_store(root: &Path, tls_verify: bool) -> Result<Store, Failure> {
    let origins = kiln::cache::origin::Origins::new(client(tls_verify));
    Ok(Store::open(root)?.with_blob_source(std::sync::Arc::new(origins)))
}

pub(crate) fn client(tls_verify: bool) -> Client {
    Client::new(ClientOptions {
        tls_verify,
        ..Default::default()
    })
}

pub(crate) fn transfer_failure(e: distribution::TransferError) -> Failure {
    let hint = match &e {
        distribution::TransferError::Registry(kiln::registry::RegistryError::Auth { .. }) => {
            Some("check the credentials in ~/.docker/config.json or $REGISTRY_AUTH_FILE")
        }
        _ => None,
    };
    let mut f = Failure::runtime(e);
    f.hint = hint.map(str::to_string);
    f
}

#[derive(Debug, thiserror::Error)]
#[error("image {0:?} not found in the local store")]
struct NotFound(String);

#[derive(Debug, thiserror::Error)]
#[error("{reference} is an image for {found}, not {wanted}")]
struct PlatformMismatch {
    reference: String,
    wanted: Platform,
    found: Platform,
}

pub(crate) fn normalize(name: &str) -> Result<String, Failure> {
    Reference::parse(name)
        .map(|r| r.to_string())
        .map_err(Failure::input)
}

/// The image or index a name or id stands for in the store.
fn find(store: &Store, name: &str) -> Result<StoredRef, Failure> {
    if let Some(item) = store.lookup(name)? {
        return Ok(item);
    }
    if let Ok(r) = Reference::parse(name)
        && let Some(item) = store.lookup(&r.to_string())?
    {
        return Ok(item);
    }
    Err(Failure::input(NotFound(name.to_string())).hint("`kiln images` lists what the store holds"))
}

/// The image of `item` for `wanted`: the index's entry, or the image itself if it is for it.
fn image_for(
    store: &Store,
    item: &StoredRef,
    wanted: &Platform,
    name: &str,
) -> Result<StoredImage, Failure> {
    let (found, available) = match item {
        StoredRef::Image(img) => {
            let own = img.config.platform().normalized();
            (own.matches(wanted).then(|| img.clone()), vec![own])
        }
        StoredRef::Index(x) => (store.image_in(x, wanted)?, x.body.platforms()),
    };
    found.ok_or_else(|| {
        let hint = match available.iter().any(|p| p.matches(wanted)) {
            true => {
                format!("its {wanted} image was not pulled: kiln pull --platform {wanted} {name}")
            }
            false => format!("it is for {}", platform_names(&available)),
        };
        Failure::input(NotFound(format!("{name} for {wanted}"))).hint(hint)
    })
}

fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "kB", "MB", "GB", "TB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1000.0 && u < UNITS.len() - 1 {
        v /= 1000.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes}B")
    } else {
        format!("{v:.1}{}", UNITS[u])
    }
}

pub(crate) fn read_file(path: &Path) -> Result<Vec<u8>, Failure> {
    std::fs::read(path).map_err(|e| Failure::usage(format!("reading {}: {e}", path.display())))
}

fn parse(file: &Path, format: ParseFormat) -> Result<(), Failure> {
    let bytes = read_file(file)?;
    let name = file.display().to_string();
    let text = match format {
        ParseFormat::Dump => {
            recipe::dump(&recipe::parse_syntax(&bytes, &name).map_err(Failure::input)?)
        }
        ParseFormat::Json => {
            let recipe = recipe::parse(&bytes, &name).map_err(Failure::input)?;
            serde_json::to_string_pretty(&recipe).map_err(Failure::runtime)?
        }
    };
    emit!("{text}");
    Ok(())
}

pub(crate) fn key_value(s: &str, what: &str) -> Result<(String, String), Failure> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| Failure::usage(format!("{what} {s:?}: expected KEY=VALUE")))
}
