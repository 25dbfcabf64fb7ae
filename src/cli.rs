//! Command-line parsing (the contract in DESIGN.md §1), the choice of progress renderer, the
//! one error printer (`error:` + cause chain + hint) and exit codes: 0 success, 1 a failed
//! build, 2 a usage or recipe error.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use clap::{Parser, Subcommand, ValueEnum};

use kiln::build::{self, BuildError, BuildOptions};
use kiln::distribution;
use kiln::progress::{Mode, Progress};
use kiln::recipe;
use kiln::registry::reference::Reference;
use kiln::registry::{Client, ClientOptions};
use kiln::sandbox::NetworkMode;
use kiln::store::{self, Store, StoredImage};

/// Writes a line of data to stdout; a closed pipe (`kiln parse F | head`) ends output quietly
/// instead of panicking as `println!` would.
macro_rules! emit {
    ($($arg:tt)*) => {{
        let mut out = std::io::stdout().lock();
        if let Err(e) = writeln!(out, $($arg)*).and_then(|()| out.flush()) {
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                std::process::exit(0);
            }
        }
    }};
}

/// Set by SIGINT/SIGTERM; builds stop at the next check and clean up.
static CANCEL: AtomicBool = AtomicBool::new(false);

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
    /// Print an image's config (JSON).
    Inspect {
        /// Name or image id.
        image: String,
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

#[derive(Clone, Copy, ValueEnum, PartialEq)]
enum ProgressArg {
    Auto,
    Tty,
    Plain,
    Quiet,
}

#[derive(Clone, Copy, ValueEnum)]
enum NetworkArg {
    Host,
    None,
}

#[derive(Clone, Copy, ValueEnum, PartialEq)]
enum CompressionArg {
    Gzip,
    Zstd,
}

#[derive(clap::Args)]
struct BuildArgs {
    /// The build context directory.
    #[arg(default_value = ".")]
    context: PathBuf,
    /// The recipe (default CONTEXT/Dockerfile, else CONTEXT/Containerfile; "-" = stdin).
    #[arg(short = 'f', long = "file", value_name = "PATH")]
    file: Option<PathBuf>,
    /// Name the result in the local store (repeatable).
    #[arg(short = 't', long = "tag", value_name = "NAME[:TAG]")]
    tags: Vec<String>,
    /// A build argument, KEY=VALUE, or KEY to take the value from the environment.
    #[arg(long = "build-arg", value_name = "KEY[=VALUE]")]
    build_args: Vec<String>,
    /// Build up to this stage (name or index).
    #[arg(long)]
    target: Option<String>,
    /// Build every step.
    #[arg(long)]
    no_cache: bool,
    /// A label for the final image, KEY=VALUE (repeatable).
    #[arg(long = "label", value_name = "KEY=VALUE")]
    labels: Vec<String>,
    /// Where to write the result: type=oci,dest=DIR | type=oci-archive,dest=FILE |
    /// type=docker-archive,dest=FILE | type=registry.
    #[arg(long = "output", short = 'o', value_name = "SPEC")]
    outputs: Vec<String>,
    /// Push every -t tag (same as --output type=registry).
    #[arg(long)]
    push: bool,
    /// Progress output.
    #[arg(long, value_enum, default_value_t = ProgressArg::Auto)]
    progress: ProgressArg,
    /// Print only the image id on stdout.
    #[arg(short, long)]
    quiet: bool,
    /// Write the image id (sha256:<config digest>) to this file.
    #[arg(long, value_name = "FILE")]
    iidfile: Option<PathBuf>,
    /// Network for RUN steps.
    #[arg(long, value_enum, default_value_t = NetworkArg::Host)]
    network: NetworkArg,
    /// A secret for RUN --mount=type=secret: id=ID,src=PATH (repeatable).
    #[arg(long = "secret", value_name = "id=ID,src=PATH")]
    secrets: Vec<String>,
    /// An ssh-agent socket for RUN --mount=type=ssh: ID (the socket in $SSH_AUTH_SOCK) or
    /// ID=SOCKET (repeatable; the usual ID is `default`).
    #[arg(long = "ssh", value_name = "ID[=SOCKET]")]
    ssh: Vec<String>,
    /// Clamp timestamps to this time (also read from $SOURCE_DATE_EPOCH).
    #[arg(long, value_name = "N")]
    source_date_epoch: Option<i64>,
    /// Registries: verify TLS (false also allows plain http).
    #[arg(long, value_name = "BOOL", default_value_t = true, action = clap::ArgAction::Set)]
    tls_verify: bool,
    /// Stages built at once (default: the number of cores).
    #[arg(long, value_name = "N")]
    jobs: Option<usize>,
    /// Layer compression.
    #[arg(long, value_enum, default_value_t = CompressionArg::Gzip)]
    compression: CompressionArg,
}

/// An error for the printer: the error, an exit status and an optional hint.
struct Failure {
    error: Box<dyn std::error::Error>,
    code: i32,
    hint: Option<String>,
}

impl Failure {
    fn usage(message: impl Into<String>) -> Failure {
        Failure {
            error: message.into().into(),
            code: 2,
            hint: None,
        }
    }
    fn runtime(error: impl std::error::Error + 'static) -> Failure {
        Failure {
            error: Box::new(error),
            code: 1,
            hint: None,
        }
    }
    fn input(error: impl std::error::Error + 'static) -> Failure {
        Failure {
            error: Box::new(error),
            code: 2,
            hint: None,
        }
    }
    fn hint(mut self, hint: impl Into<String>) -> Failure {
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
    let cli = match Cli::try_parse() {
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
    match run(cli) {
        Ok(()) => 0,
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

fn run(cli: Cli) -> Result<(), Failure> {
    let root = store_root(cli.root);
    match cli.command {
        Command::Parse { format, file } => parse(&file, format),
        Command::Build(args) => build_cmd(&root, *args),
        Command::Import { path, name } => {
            let name = normalize(&name)?;
            let store = Store::open(&root)?;
            let image = store::import(&store, &path).map_err(Failure::input)?;
            store.tag(&name, &image.manifest)?;
            emit!("{}", image.config_digest);
            Ok(())
        }
        Command::Images => {
            let store = Store::open(&root)?;
            let mut out = std::io::stdout().lock();
            let _ = writeln!(
                out,
                "{:<50} {:<15} {:<19} {:>10}  CREATED",
                "NAME", "TAG", "IMAGE ID", "SIZE"
            );
            for img in store.images()? {
                let _ = writeln!(
                    out,
                    "{:<50} {:<15} {:<19} {:>10}  {}",
                    img.name,
                    img.tag,
                    &img.id.hex()[..12],
                    human_size(img.size),
                    img.created.as_deref().unwrap_or("-")
                );
            }
            Ok(())
        }
        Command::Inspect { image } => {
            let store = Store::open(&root)?;
            let img = find_image(&store, &image)?;
            let value = serde_json::to_value(&img.config).map_err(Failure::runtime)?;
            emit!(
                "{}",
                serde_json::to_string_pretty(&value).map_err(Failure::runtime)?
            );
            Ok(())
        }
        Command::Tag { src, dst } => {
            let store = Store::open(&root)?;
            let img = find_image(&store, &src)?;
            store.tag(&normalize(&dst)?, &img.manifest)?;
            Ok(())
        }
        Command::Rmi { images } => {
            let store = Store::open(&root)?;
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
            tls_verify,
        } => {
            let r = Reference::parse(&reference).map_err(Failure::input)?;
            let store = Store::open(&root)?;
            let img =
                distribution::pull(&store, &client(tls_verify), &r).map_err(transfer_failure)?;
            eprintln!("pulled {r}");
            emit!("{}", img.config_digest);
            Ok(())
        }
        Command::Push {
            image,
            reference,
            tls_verify,
        } => {
            let store = Store::open(&root)?;
            let img = find_image(&store, &image)?;
            let target =
                Reference::parse(reference.as_deref().unwrap_or(&image)).map_err(Failure::input)?;
            let digest = distribution::push(&store, &client(tls_verify), &img, &target)
                .map_err(transfer_failure)?;
            eprintln!("pushed {target}");
            emit!("{digest}");
            Ok(())
        }
        Command::Prune => {
            let store = Store::open(&root)?;
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
    }
}

fn client(tls_verify: bool) -> Client {
    Client::new(ClientOptions {
        tls_verify,
        ..Default::default()
    })
}

fn transfer_failure(e: distribution::TransferError) -> Failure {
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

fn normalize(name: &str) -> Result<String, Failure> {
    Reference::parse(name)
        .map(|r| r.to_string())
        .map_err(Failure::input)
}

fn find_image(store: &Store, name: &str) -> Result<StoredImage, Failure> {
    if let Some(img) = store.resolve(name)? {
        return Ok(img);
    }
    if let Ok(r) = Reference::parse(name)
        && let Some(img) = store.resolve(&r.to_string())?
    {
        return Ok(img);
    }
    Err(Failure::input(NotFound(name.to_string())).hint("`kiln images` lists what the store holds"))
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

fn read_file(path: &Path) -> Result<Vec<u8>, Failure> {
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

/// One `--output` destination.
enum Output {
    OciDir(PathBuf),
    OciArchive(PathBuf),
    DockerArchive(PathBuf),
    Registry,
}

fn parse_output(spec: &str) -> Result<Output, Failure> {
    let mut fields: BTreeMap<&str, &str> = BTreeMap::new();
    for part in spec.split(',') {
        let (k, v) = part.split_once('=').ok_or_else(|| {
            Failure::usage(format!("--output {spec:?}: expected key=value pairs"))
        })?;
        fields.insert(k, v);
    }
    let dest = || {
        fields
            .get("dest")
            .map(PathBuf::from)
            .ok_or_else(|| Failure::usage(format!("--output {spec:?}: dest= is required")))
    };
    match fields.get("type").copied() {
        Some("oci") => Ok(Output::OciDir(dest()?)),
        Some("oci-archive") => Ok(Output::OciArchive(dest()?)),
        Some("docker-archive") | Some("docker") => Ok(Output::DockerArchive(dest()?)),
        Some("registry") | Some("image") => Ok(Output::Registry),
        other => Err(Failure::usage(format!(
            "--output {spec:?}: unknown type {other:?} (oci, oci-archive, docker-archive, registry)"
        ))),
    }
}

fn key_value(s: &str, what: &str) -> Result<(String, String), Failure> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| Failure::usage(format!("{what} {s:?}: expected KEY=VALUE")))
}

fn build_cmd(root: &Path, args: BuildArgs) -> Result<(), Failure> {
    let context_dir = args.context.clone();
    if !context_dir.is_dir() {
        return Err(Failure::usage(format!(
            "build context {} is not a directory",
            context_dir.display()
        )));
    }
    let (recipe_path, recipe_bytes) = match &args.file {
        Some(p) if p.as_os_str() == "-" => {
            let mut buf = Vec::new();
            std::io::stdin()
                .read_to_end(&mut buf)
                .map_err(|e| Failure::usage(format!("reading the recipe from stdin: {e}")))?;
            (PathBuf::from("<stdin>"), buf)
        }
        Some(p) => (p.clone(), read_file(p)?),
        None => {
            let candidates = [
                context_dir.join("Dockerfile"),
                context_dir.join("Containerfile"),
            ];
            let found = candidates.iter().find(|p| p.is_file()).ok_or_else(|| {
                Failure::usage(format!(
                    "no Dockerfile or Containerfile in {}",
                    context_dir.display()
                ))
                .hint("name the recipe with -f PATH")
            })?;
            (found.clone(), read_file(found)?)
        }
    };
    let mut build_args = BTreeMap::new();
    for a in &args.build_args {
        match a.split_once('=') {
            Some((k, v)) => {
                build_args.insert(k.to_string(), v.to_string());
            }
            None => {
                if let Ok(v) = std::env::var(a) {
                    build_args.insert(a.clone(), v);
                }
            }
        }
    }
    let labels = args
        .labels
        .iter()
        .map(|l| key_value(l, "--label"))
        .collect::<Result<BTreeMap<_, _>, _>>()?;
    let mut secrets = BTreeMap::new();
    for s in &args.secrets {
        let mut id = None;
        let mut src = None;
        for part in s.split(',') {
            match part.split_once('=') {
                Some(("id", v)) => id = Some(v.to_string()),
                Some(("src" | "source", v)) => src = Some(PathBuf::from(v)),
                _ => {
                    return Err(Failure::usage(format!(
                        "--secret {s:?}: expected id=ID,src=PATH"
                    )));
                }
            }
        }
        match (id, src) {
            (Some(id), Some(src)) if src.is_file() => {
                secrets.insert(id, src);
            }
            (Some(_), Some(src)) => {
                return Err(Failure::usage(format!(
                    "--secret {s:?}: {} is not a file",
                    src.display()
                )));
            }
            _ => {
                return Err(Failure::usage(format!(
                    "--secret {s:?}: expected id=ID,src=PATH"
                )));
            }
        }
    }
    let mut ssh = BTreeMap::new();
    for spec in &args.ssh {
        let (id, socket) = match spec.split_once('=') {
            Some((id, path)) => (id, PathBuf::from(path)),
            None => match std::env::var_os("SSH_AUTH_SOCK").filter(|s| !s.is_empty()) {
                Some(sock) => (spec.as_str(), PathBuf::from(sock)),
                None => {
                    return Err(Failure::usage(format!(
                        "--ssh {spec}: SSH_AUTH_SOCK is not set; start ssh-agent or pass \
                         --ssh {spec}=SOCKET"
                    )));
                }
            },
        };
        let is_socket = std::fs::metadata(&socket)
            .is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()));
        if id.is_empty() || !is_socket {
            return Err(Failure::usage(format!(
                "--ssh {spec}: {} is not an ssh-agent socket (kiln forwards a running agent; \
                 load keys into it with ssh-add)",
                socket.display()
            )));
        }
        ssh.insert(id.to_string(), socket);
    }
    let source_date_epoch = match args.source_date_epoch {
        Some(n) => Some(n),
        None => match std::env::var("SOURCE_DATE_EPOCH") {
            Ok(v) if !v.is_empty() => Some(v.parse::<i64>().map_err(|_| {
                Failure::usage(format!(
                    "SOURCE_DATE_EPOCH={v:?} is not a number of seconds"
                ))
            })?),
            _ => None,
        },
    };
    let mut outputs = args
        .outputs
        .iter()
        .map(|o| parse_output(o))
        .collect::<Result<Vec<_>, _>>()?;
    if args.push {
        outputs.push(Output::Registry);
    }
    if outputs.iter().any(|o| matches!(o, Output::Registry)) && args.tags.is_empty() {
        return Err(Failure::usage(
            "pushing needs at least one -t NAME[:TAG] to push to",
        ));
    }
    let tags = args
        .tags
        .iter()
        .map(|t| normalize(t))
        .collect::<Result<Vec<_>, _>>()?;
    let mode = match (args.quiet, args.progress) {
        (true, _) | (_, ProgressArg::Quiet) => Mode::Quiet,
        (_, ProgressArg::Plain) => Mode::Plain,
        (_, ProgressArg::Tty) => Mode::Tty,
        (_, ProgressArg::Auto) if std::io::stderr().is_terminal() => Mode::Tty,
        (_, ProgressArg::Auto) => Mode::Plain,
    };
    let opts = BuildOptions {
        context_dir,
        recipe_path,
        recipe_bytes,
        build_args,
        target: args.target.clone(),
        no_cache: args.no_cache,
        labels,
        network: match args.network {
            NetworkArg::Host => NetworkMode::Host,
            NetworkArg::None => NetworkMode::None,
        },
        secrets,
        ssh,
        source_date_epoch,
        jobs: args.jobs.unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        }),
        tls_verify: args.tls_verify,
        compression: match args.compression {
            CompressionArg::Gzip => kiln::snapshot::Compression::Gzip,
            CompressionArg::Zstd => kiln::snapshot::Compression::Zstd,
        },
        helper_exe: std::env::current_exe()
            .map_err(|e| Failure::usage(format!("locating the kiln executable: {e}")))?,
    };
    let store = Store::open(root)?;
    let progress = Progress::new(mode);
    let image = build::build(&store, &opts, &progress, &CANCEL).map_err(|e| {
        let code = if matches!(e, BuildError::Cancelled) {
            130
        } else if e.is_input_error() {
            2
        } else {
            1
        };
        let hint = matches!(e, BuildError::Pull { .. }).then(|| {
            "FROM looks in the local store first (`kiln images`), then pulls; `kiln import` loads an image offline"
                .to_string()
        });
        Failure {
            error: Box::new(e),
            code,
            hint,
        }
    })?;
    for t in &tags {
        store.tag(t, &image.manifest)?;
    }
    // An OCI layout names its image by tag (`latest`), as BuildKit's exporter does.
    let ref_name = tags
        .first()
        .and_then(|t| Reference::parse(t).ok())
        .and_then(|r| r.tag)
        .unwrap_or_else(|| "latest".to_string());
    let first_tag = Some(ref_name.as_str());
    for o in &outputs {
        match o {
            Output::OciDir(d) => store::export_oci_dir(&store, &image, d, first_tag)?,
            Output::OciArchive(f) => store::export_oci_archive(&store, &image, f, first_tag)?,
            Output::DockerArchive(f) => store::export_docker_archive(&store, &image, f, &tags)?,
            Output::Registry => {
                for t in &tags {
                    let r = Reference::parse(t).map_err(Failure::input)?;
                    let digest = distribution::push(&store, &client(args.tls_verify), &image, &r)
                        .map_err(transfer_failure)?;
                    progress.info(&format!("pushed {r}@{digest}"));
                }
            }
        }
    }
    let id = image.config_digest.to_string();
    if let Some(path) = &args.iidfile {
        std::fs::write(path, &id)
            .map_err(|e| Failure::usage(format!("writing {}: {e}", path.display())))?;
    }
    progress.finish(&id);
    emit!("{id}");
    Ok(())
}
