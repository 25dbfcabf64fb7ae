//! `kiln build`: its flags, and turning them into [`BuildOptions`]; the build itself and its
//! outputs are asked of the library.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Read};
use std::path::{Path, PathBuf};

use clap::ValueEnum;

use kiln::build::{self, BuildError, BuildOptions, export};
use kiln::distribution;
use kiln::image::platform_names;
use kiln::progress::{Mode, Progress};
use kiln::registry::reference::Reference;
use kiln::sandbox::NetworkMode;
use kiln::store::{self, StoredRef};

use super::cache::CacheArgs;
use super::limits::LimitArgs;
use super::output::{Output, parse_output};
use super::platform::PlatformArgs;
use super::release;
use super::{
    CANCEL, Failure, call, client, devloop, emit, key_value, normalize, open_store, read_file,
    secrets, security, transfer_failure,
};

#[derive(Clone, Copy, ValueEnum, PartialEq)]
enum ProgressArg {
    Auto,
    Tty,
    Plain,
    Quiet,
    /// One JSON event a line on stderr.
    Rawjson,
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
pub(crate) struct BuildArgs {
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
    /// type=docker-archive,dest=FILE | type=registry | type=local,dest=DIR (the final stage's
    /// files) | type=tar,dest=FILE|- ; a plain DIR is type=local, `-` a tar on stdout.
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
    /// A secret for RUN --mount=type=secret: id=ID,src=PATH (a file) or id=ID,env=VAR (an
    /// environment variable of kiln's), repeatable.
    #[arg(long = "secret", value_name = "id=ID,src=PATH|env=VAR")]
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
    #[command(flatten)]
    call: call::CallArgs,
    #[command(flatten)]
    devloop: devloop::DevLoopArgs,
    #[command(flatten)]
    cache: CacheArgs,
    #[command(flatten)]
    limits: LimitArgs,
    #[command(flatten)]
    release: release::ReleaseArgs,
    #[command(flatten)]
    platform: PlatformArgs,
    #[command(flatten)]
    security: security::SecurityArgs,
}

/// Reads the recipe: `file` ("-" = stdin), else CONTEXT/Dockerfile, else
/// CONTEXT/Containerfile. Returns its path (for messages) and bytes.
pub(crate) fn read_recipe(
    context_dir: &Path,
    file: Option<&Path>,
) -> Result<(PathBuf, Vec<u8>), Failure> {
    if !context_dir.is_dir() {
        return Err(Failure::usage(format!(
            "build context {} is not a directory",
            context_dir.display()
        )));
    }
    match file {
        Some(p) if p.as_os_str() == "-" => {
            let mut buf = Vec::new();
            std::io::stdin()
                .read_to_end(&mut buf)
                .map_err(|e| Failure::usage(format!("reading the recipe from stdin: {e}")))?;
            Ok((PathBuf::from("<stdin>"), buf))
        }
        Some(p) => Ok((p.to_path_buf(), read_file(p)?)),
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
            Ok((found.clone(), read_file(found)?))
        }
    }
}

/// `--build-arg` values: KEY=VALUE, or KEY alone for the value in the environment (skipped
/// when unset there).
pub(crate) fn parse_build_args(given: &[String]) -> BTreeMap<String, String> {
    let mut build_args = BTreeMap::new();
    for a in given {
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
    build_args
}

pub(crate) fn build_cmd(root: &Path, mut args: BuildArgs) -> Result<(), Failure> {
    let rebuild = release::rebuild_spec()?;
    if let Some(spec) = &rebuild {
        // The second build of a verification: its own store, context and recipe; it only builds.
        args.context = spec.context.clone();
        args.file = Some(spec.recipe.clone());
        args.tags.push(kiln::verify::REBUILD_TAG.to_string());
        args.outputs.clear();
        args.push = false;
        args.iidfile = None;
        args.release.verify = false;
        args.cache.clear();
    }
    let root = rebuild.as_ref().map_or(root, |s| s.root.as_path());
    let context_dir = args.context.clone();
    let (recipe_path, recipe_bytes) = read_recipe(&context_dir, args.file.as_deref())?;
    let mut build_args = parse_build_args(&args.build_args);
    let named_contexts = args.devloop.named_contexts()?;
    if let Some((method, format)) = args.call.method()? {
        let input = call::CallInput {
            recipe_path: &recipe_path,
            recipe_bytes: &recipe_bytes,
            context_dir: Some(&context_dir),
            build_args: &build_args,
            target: args.target.as_deref(),
            named_contexts: &named_contexts,
        };
        return call::run(root, &input, method, format);
    }
    let labels = args
        .labels
        .iter()
        .map(|l| key_value(l, "--label"))
        .collect::<Result<BTreeMap<_, _>, _>>()?;
    let secrets = secrets::parse_secrets(&args.secrets)?;
    let ssh = secrets::parse_ssh(&args.ssh)?;
    // As in BuildKit, the build arg SOURCE_DATE_EPOCH sets the epoch too, and an `ARG
    // SOURCE_DATE_EPOCH` sees the epoch however it was given.
    let from_arg_or_env = build_args
        .get("SOURCE_DATE_EPOCH")
        .cloned()
        .or_else(|| std::env::var("SOURCE_DATE_EPOCH").ok());
    let source_date_epoch = match (args.source_date_epoch, from_arg_or_env) {
        (Some(n), _) => Some(n),
        (None, Some(v)) if !v.is_empty() => Some(v.parse::<i64>().map_err(|_| {
            Failure::usage(format!(
                "SOURCE_DATE_EPOCH={v:?} is not a number of seconds"
            ))
        })?),
        _ => None,
    };
    if let Some(epoch) = source_date_epoch {
        build_args.insert("SOURCE_DATE_EPOCH".to_string(), epoch.to_string());
    }
    let mut outputs = args
        .outputs
        .iter()
        .map(|o| parse_output(o))
        .collect::<Result<Vec<_>, _>>()?;
    if args.push {
        outputs.push(Output::Registry);
    }
    if args.devloop.load {
        outputs.push(Output::Load);
    }
    let to_stdout = outputs
        .iter()
        .filter(|o| **o == Output::Files(export::FilesDest::TarStdout))
        .count();
    if to_stdout > 1 {
        return Err(Failure::usage(
            "only one --output can write to stdout (`-`)",
        ));
    }
    let platforms = args.platform.platforms()?;
    let one_platform_only = outputs.iter().find_map(|o| match o {
        Output::DockerArchive(_) => Some("--output type=docker-archive"),
        Output::Load => Some("--load"),
        Output::Files(export::FilesDest::TarFile(_) | export::FilesDest::TarStdout) => {
            Some("--output type=tar")
        }
        _ => None,
    });
    if let (true, Some(what)) = (platforms.len() > 1, one_platform_only) {
        return Err(Failure::usage(format!(
            "{what} holds one platform's image, and this build is for {}: {}",
            platforms.len(),
            platform_names(&platforms)
        ))
        .hint("use type=oci-archive (or type=oci) for an image index, or build one --platform at a time"));
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
    let cache = args.cache.parse()?;
    let mode = match (args.quiet, args.progress) {
        (true, _) | (_, ProgressArg::Quiet) => Mode::Quiet,
        (_, ProgressArg::Plain) => Mode::Plain,
        (_, ProgressArg::Rawjson) => Mode::RawJson,
        (_, ProgressArg::Tty) => Mode::Tty,
        (_, ProgressArg::Auto) if std::io::stderr().is_terminal() => Mode::Tty,
        (_, ProgressArg::Auto) => Mode::Plain,
    };
    let mut opts = BuildOptions {
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
        named_contexts,
        no_cache_filter: args.devloop.no_cache_filter.clone(),
        pull: args.devloop.pull,
        add_hosts: args.devloop.extra_hosts()?,
        limits: args.limits.limits()?,
        seccomp: args.security.seccomp()?,
        allow_insecure: args.security.allow_insecure()?,
        helper_exe: std::env::current_exe()
            .map_err(|e| Failure::usage(format!("locating the kiln executable: {e}")))?,
        cache_from: cache.imports.clone(),
        inline_cache: cache
            .exports
            .iter()
            .any(|e| e.target == kiln::cache::ExportTarget::Inline),
        // Registries can mount a shared cache's layers; every other output needs the bytes.
        lazy_layers: outputs.iter().all(|o| matches!(o, Output::Registry)),
        platforms,
    };
    if let Some(spec) = &rebuild {
        release::enter_rebuild(spec, &mut opts)?;
    }
    let store = open_store(root, args.tls_verify)?;
    let progress = Progress::new(mode);
    let attestations = args.release.attestations()?;
    let started = std::time::SystemTime::now();
    let mut built = build::build(&store, &opts, &progress, &CANCEL).map_err(|e| {
        let code = if matches!(e, BuildError::Cancelled) {
            130
        } else if e.is_input_error() {
            2
        } else {
            1
        };
        let hint = match &e {
            BuildError::Pull { .. } => Some(
                "FROM looks in the local store first (`kiln images`), then pulls; `kiln import` loads an image offline",
            ),
            BuildError::Sandbox(kiln::sandbox::SandboxError::LimitsUnavailable(_)) => {
                Some("--limits=best-effort builds without the limits that cannot be applied")
            }
            BuildError::Emulation { .. } => Some(
                "install Debian's qemu-user-static (apt-get install qemu-user-static): it registers static QEMU handlers with the F flag (through systemd-binfmt or update-binfmts); see /proc/sys/fs/binfmt_misc",
            ),
            _ => None,
        }
        .map(str::to_string);
        Failure {
            error: Box::new(e),
            code,
            hint,
        }
    })?;
    if attestations.any() {
        let began = std::time::Instant::now();
        built.image = release::attach(&store, &built, &opts, attestations, (&tags, started))?;
        progress.info(&format!(
            "attestations attached in {:.2}s: index {}",
            began.elapsed().as_secs_f64(),
            built.image.descriptor().digest
        ));
    }
    if args.release.verify {
        release::run_verify(
            &store,
            (&built.image, &built.platforms),
            &opts,
            &progress,
            std::time::Instant::now(),
        )?;
    }
    let image = &built.image;
    for t in &tags {
        store.tag(t, image.descriptor())?;
    }
    // An OCI layout names its image by tag (`latest`), as BuildKit's exporter does.
    let ref_name = tags
        .first()
        .and_then(|t| Reference::parse(t).ok())
        .and_then(|r| r.tag)
        .unwrap_or_else(|| "latest".to_string());
    let first_tag = Some(ref_name.as_str());
    let registry = client(args.tls_verify);
    for o in &outputs {
        match o {
            Output::OciDir(d) => store::export_oci_dir(&store, image, d, first_tag)?,
            Output::OciArchive(f) => store::export_oci_archive(&store, image, f, first_tag)?,
            Output::DockerArchive(f) => match release::single_image(image, &store)? {
                Some(img) => store::export_docker_archive(&store, &img, f, &tags)?,
                None => {
                    return Err(Failure::usage(
                        "--output type=docker-archive cannot hold an image index",
                    ));
                }
            },
            Output::Registry => {
                for t in &tags {
                    let r = Reference::parse(t).map_err(Failure::input)?;
                    let digest = distribution::push(&store, &registry, image, &r)
                        .map_err(transfer_failure)?;
                    progress.info(&format!("pushed {r}@{digest}"));
                }
            }
            Output::Load => match release::single_image(image, &store)? {
                Some(img) => devloop::load(&store, &img, &tags, &progress)?,
                None => return Err(Failure::usage("--load cannot take an image index")),
            },
            Output::Files(dest) => match release::single_image(image, &store)? {
                Some(img) => export::export_files(&store, &img, dest, source_date_epoch)
                    .map_err(Failure::runtime)?,
                // Several platforms: a directory of each's files, named as BuildKit does
                // (`linux_arm64`).
                None => {
                    let (StoredRef::Index(index), export::FilesDest::Dir(dir)) = (image, dest)
                    else {
                        return Err(Failure::usage(
                            "--output type=tar cannot hold an image index",
                        ));
                    };
                    let attestations: Vec<_> = (index.body.manifests.iter())
                        .filter(|d| kiln::image::is_attestation(d))
                        .map(|d| d.digest)
                        .collect();
                    for img in store.present_images(index)? {
                        if attestations.contains(&img.manifest.digest) {
                            continue;
                        }
                        let sub = img.config.platform().to_string().replace('/', "_");
                        let dest = export::FilesDest::Dir(dir.join(sub));
                        export::export_files(&store, &img, &dest, source_date_epoch)
                            .map_err(Failure::runtime)?;
                    }
                }
            },
        }
    }
    for export in &cache.exports {
        match kiln::cache::export(&store, &registry, export, &built.records) {
            Ok(n) => progress.info(&format!("exported {n} cache records to {}", export.target)),
            Err(e) if export.ignore_error => progress.warn(&format!(
                "exporting the build cache to {} failed: {e}",
                export.target
            )),
            Err(e) => {
                return Err(Failure::runtime(e).hint(
                    "with ignore-error=true (the default) a failed cache export is only a warning",
                ));
            }
        }
    }
    if let Some(path) = &cache.metadata_file {
        super::cache::write_metadata(path, &built, &tags)?;
    }
    // A tar on stdout is all that stdout carries.
    let stdout_taken = to_stdout > 0;
    let id = image.id().to_string();
    if let Some(path) = &args.iidfile {
        std::fs::write(path, &id)
            .map_err(|e| Failure::usage(format!("writing {}: {e}", path.display())))?;
    }
    progress.finish(&id);
    if !stdout_taken {
        emit!("{id}");
    }
    Ok(())
}
