//! Multi-platform builds end to end: `--platform linux/amd64,linux/arm64` over a busybox base
//! that is itself a two-platform index (its arm64 busybox from Debian's busybox-static:arm64),
//! arm64 RUN steps through the host's binfmt_misc QEMU handler, the index in the store, in OCI
//! outputs (read by skopeo and umoci) and in a real registry (push, pull --platform, FROM).
//! Run as root, after ./test.sh has installed qemu-user-static and fetched the arm64 busybox.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use common::registry::{Registry, skopeo};
use common::{
    Kiln, assert_success, context, kiln_bin, oci_index, oci_json, stderr, stdout_line, umoci_unpack,
};
use kiln::store::Store;

const BOTH: &str = "linux/amd64,linux/arm64";

/// A recipe whose layer records the machine each platform's RUN ran on, and checks that the
/// emulator is nowhere in the step's root filesystem.
const UNAME: &str = "FROM busybox\n\
    RUN uname -m > /arch && test ! -e /usr/bin/qemu-aarch64-static && test ! -e /usr/libexec/qemu-binfmt\n";

fn json(bytes: &[u8]) -> serde_json::Value {
    serde_json::from_slice(bytes).unwrap()
}

/// The image index an OCI layout's only entry names: (its digest, its body).
fn layout_index(layout: &Path) -> (String, serde_json::Value) {
    let top = oci_index(layout);
    let entries = top["manifests"].as_array().unwrap();
    assert_eq!(entries.len(), 1, "{top}");
    assert_eq!(
        entries[0]["mediaType"], "application/vnd.oci.image.index.v1+json",
        "{top}"
    );
    let digest = entries[0]["digest"].as_str().unwrap().to_string();
    let body = oci_json(layout, &digest);
    (digest, body)
}

/// The architectures an index lists, in order.
fn architectures(index: &serde_json::Value) -> Vec<String> {
    index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["platform"]["architecture"].as_str().unwrap().to_string())
        .collect()
}

/// Unpacks each image of a layout's index with umoci (each manifest given a tag of its own
/// architecture in the layout, as umoci unpacks tags of manifests); returns the rootfs by
/// architecture.
fn unpack_each(layout: &Path, into: &Path) -> Vec<(String, PathBuf)> {
    let (_, index) = layout_index(layout);
    let mut top = oci_index(layout);
    let mut out = Vec::new();
    for m in index["manifests"].as_array().unwrap() {
        let arch = m["platform"]["architecture"].as_str().unwrap().to_string();
        let mut entry = m.clone();
        entry["annotations"] = serde_json::json!({"org.opencontainers.image.ref.name": arch});
        top["manifests"].as_array_mut().unwrap().push(entry);
        out.push(arch);
    }
    std::fs::write(layout.join("index.json"), top.to_string()).unwrap();
    out.into_iter()
        .map(|arch| {
            let rootfs = umoci_unpack(layout, &arch, &into.join(&arch));
            (arch, rootfs)
        })
        .collect()
}

/// Every path under `dir` whose name mentions qemu.
fn qemu_files(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if e.file_name().to_string_lossy().contains("qemu") {
                found.push(p.clone());
            }
            if e.file_type().unwrap().is_dir() {
                todo.push(p);
            }
        }
    }
    found
}

#[test]
fn two_platforms_make_one_index_and_each_runs_its_own_architecture() {
    let k = Kiln::multiarch();
    let work = tempfile::tempdir().unwrap();
    let layout = work.path().join("layout");
    let out_arg = format!("type=oci,dest={}", layout.display());
    let id = k.build_ok(
        UNAME,
        &[],
        &["--platform", BOTH, "-t", "app:1", "-o", &out_arg],
    );

    // The layout holds one index, whose digest is the id kiln printed, with an image for each
    // platform in the order given.
    let (digest, index) = layout_index(&layout);
    assert_eq!(digest, id);
    assert_eq!(architectures(&index), ["amd64", "arm64"]);

    // skopeo picks each platform's image from the index.
    let oci = format!("oci:{}:1", layout.display());
    for (arch, skopeo_arch) in [("amd64", None), ("arm64", Some("arm64"))] {
        let mut args = vec!["inspect"];
        if let Some(a) = skopeo_arch {
            args.extend(["--override-arch", a]);
        }
        args.push(&oci);
        let info = json(&skopeo(&args));
        assert_eq!(info["Architecture"], arch, "{info}");
        assert_eq!(info["Os"], "linux");
    }

    // umoci reads each manifest; the RUN ran natively on amd64 and through QEMU on arm64, and
    // the emulator is in neither image.
    for (arch, rootfs) in unpack_each(&layout, &work.path().join("bundles")) {
        let machine = std::fs::read_to_string(rootfs.join("arch")).unwrap();
        let want = if arch == "arm64" {
            "aarch64\n"
        } else {
            "x86_64\n"
        };
        assert_eq!(machine, want, "{arch}");
        assert!(qemu_files(&rootfs).is_empty(), "{:?}", qemu_files(&rootfs));
        let busybox = std::fs::read(rootfs.join("bin/busybox")).unwrap();
        let e_machine = u16::from_le_bytes([busybox[18], busybox[19]]);
        assert_eq!(e_machine, if arch == "arm64" { 183 } else { 62 }, "{arch}");
    }

    // The store names the index; `images` lists its platforms, `inspect` the index, and
    // `inspect --platform` one platform's config.
    let listing = String::from_utf8_lossy(&k.run(&["images"]).stdout).into_owned();
    let line = listing
        .lines()
        .find(|l| l.starts_with("docker.io/library/app "))
        .unwrap_or_else(|| panic!("{listing}"));
    assert!(line.contains("linux/amd64,linux/arm64"), "{listing}");
    assert!(line.contains(&id["sha256:".len()..][..12]), "{listing}");
    let out = k.run(&["inspect", "app:1"]);
    assert_success(&out);
    assert_eq!(architectures(&json(&out.stdout)), ["amd64", "arm64"]);
    let out = k.run(&["inspect", "--platform", "linux/arm64", "app:1"]);
    assert_success(&out);
    assert_eq!(json(&out.stdout)["architecture"], "arm64");
    let missing = k.run(&["inspect", "--platform", "linux/s390x", "app:1"]);
    assert_eq!(missing.status.code(), Some(2), "{}", stderr(&missing));
    assert!(
        stderr(&missing).contains("linux/arm64"),
        "{}",
        stderr(&missing)
    );

    // An index is an image to build on: FROM app:1 takes each platform's image.
    let again = k.build_ok(
        "FROM app:1\nRUN cat /arch > /from-base\n",
        &[],
        &["--platform", BOTH, "-t", "child:1"],
    );
    assert_ne!(again, id);
    let report = Store::open(k.root.path()).unwrap().fsck().unwrap();
    assert!(report.is_clean(), "{:?}", report.problems);
}

#[test]
fn each_platform_and_the_index_are_reproducible() {
    let archives: Vec<(String, Vec<u8>)> = (0..2)
        .map(|_| {
            let k = Kiln::multiarch();
            let dir = tempfile::tempdir().unwrap();
            let file = dir.path().join("out.tar");
            let out_arg = format!("type=oci-archive,dest={}", file.display());
            let id = k.build_ok(
                "FROM busybox\nRUN uname -m > /arch && touch /now\nLABEL a=1 b=2\n",
                &[],
                &[
                    "--platform",
                    BOTH,
                    "--source-date-epoch",
                    "1700000000",
                    "-o",
                    &out_arg,
                ],
            );
            (id, std::fs::read(&file).unwrap())
        })
        .collect();
    assert_eq!(archives[0].0, archives[1].0, "index digests differ");
    assert!(archives[0].1 == archives[1].1, "the archives differ");
}

#[test]
fn cross_compilation_pattern_sees_the_platform_args_buildkit_sets() {
    let k = Kiln::multiarch();
    let recipe = "FROM --platform=$BUILDPLATFORM busybox AS build\n\
        ARG TARGETPLATFORM TARGETOS TARGETARCH TARGETVARIANT BUILDPLATFORM BUILDOS BUILDARCH\n\
        RUN echo \"$(uname -m) $TARGETPLATFORM $TARGETOS $TARGETARCH [$TARGETVARIANT] $BUILDPLATFORM $BUILDOS $BUILDARCH\" > /built\n\
        FROM --platform=$BUILDPLATFORM busybox AS tools\n\
        RUN echo tools-step-ran && date > /tools\n\
        FROM busybox\n\
        COPY --from=build /built /built\n\
        COPY --from=tools /tools /tools\n\
        RUN uname -m >> /built\n";
    let work = tempfile::tempdir().unwrap();
    let layout = work.path().join("layout");
    let out_arg = format!("type=oci,dest={}", layout.display());
    let (out, _ctx) = k.build(
        recipe,
        &[],
        &["--platform", BOTH, "--no-cache", "-o", &out_arg],
    );
    assert_success(&out);
    // The stage pinned to the build platform that does not depend on the target ran once for
    // both (the other platform's build waited for it and took its result).
    let log = stderr(&out);
    let ran = log
        .lines()
        .filter(|l| l.ends_with("  tools-step-ran"))
        .count();
    assert_eq!(ran, 1, "{log}");
    let mut tools = Vec::new();
    for (arch, rootfs) in unpack_each(&layout, &work.path().join("bundles")) {
        let built = std::fs::read_to_string(rootfs.join("built")).unwrap();
        let want = match arch.as_str() {
            "arm64" => "x86_64 linux/arm64 linux arm64 [] linux/amd64 linux amd64\naarch64\n",
            _ => "x86_64 linux/amd64 linux amd64 [] linux/amd64 linux amd64\nx86_64\n",
        };
        assert_eq!(built, want, "{arch}");
        tools.push(std::fs::read(rootfs.join("tools")).unwrap());
    }
    assert_eq!(tools[0], tools[1], "the pinned stage was built twice");
}

#[test]
fn the_images_are_for_the_platforms_asked_even_from_a_build_platform_stage() {
    // A last stage pinned to the build platform (e.g. packaging files made elsewhere): each
    // image still says the platform it was built for, as BuildKit writes it.
    let k = Kiln::multiarch();
    k.build_ok(
        "FROM --platform=$BUILDPLATFORM busybox\nARG TARGETARCH\nRUN echo $TARGETARCH > /for\n",
        &[],
        &["--platform", BOTH, "-t", "pinned:1"],
    );
    let out = k.run(&["inspect", "pinned:1"]);
    assert_success(&out);
    assert_eq!(architectures(&json(&out.stdout)), ["amd64", "arm64"]);
    let out = k.run(&["inspect", "--platform", "linux/arm64", "pinned:1"]);
    assert_eq!(json(&out.stdout)["architecture"], "arm64");
}

#[test]
fn the_shared_cache_and_the_metadata_file_carry_every_platform() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let meta = dir.path().join("meta.json");
    let recipe = "FROM busybox\nRUN uname -m > /arch\n";
    let a = Kiln::multiarch();
    let id = a.build_ok(
        recipe,
        &[],
        &[
            "--platform",
            BOTH,
            "--cache-to",
            &format!("type=local,dest={}", cache.display()),
            "--metadata-file",
            meta.to_str().unwrap(),
        ],
    );
    let doc = json(&std::fs::read(&meta).unwrap());
    assert_eq!(doc["containerimage.digest"], id.as_str(), "{doc}");
    assert_eq!(
        doc["containerimage.descriptor"]["mediaType"],
        "application/vnd.oci.image.index.v1+json"
    );
    let stages: Vec<&str> = doc["kiln.steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["stage"].as_str().unwrap())
        .collect();
    assert!(stages.contains(&"linux/arm64 stage-0"), "{stages:?}");
    // Another store builds both platforms from that cache alone: no step runs.
    let b = Kiln::multiarch();
    let (out, _ctx) = b.build(
        recipe,
        &[],
        &[
            "--platform",
            BOTH,
            "--cache-from",
            &format!("type=local,src={}", cache.display()),
        ],
    );
    assert_success(&out);
    assert_eq!(stdout_line(&out), id);
    assert!(
        stderr(&out).contains("0 steps run, 2 from cache"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn cache_keys_include_the_platform() {
    let k = Kiln::multiarch();
    let ctx = context("FROM scratch\nCOPY f /f\n", &[("f", b"same bytes")]);
    let build = |platform: &str| {
        let out = k.run(&[
            "build",
            "--progress",
            "plain",
            "--platform",
            platform,
            ctx.path().to_str().unwrap(),
        ]);
        assert_success(&out);
        stderr(&out).contains("CACHED")
    };
    assert!(!build("linux/amd64"));
    assert!(!build("linux/arm64"), "arm64 took the amd64 build's step");
    assert!(build("linux/amd64"));
    assert!(build("linux/arm64"));
}

#[test]
fn one_foreign_platform_gives_an_image_and_a_docker_archive() {
    let k = Kiln::multiarch();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("docker.tar");
    let out_arg = format!("type=docker-archive,dest={}", file.display());
    let id = k.build_ok(
        "FROM busybox\nRUN uname -m > /arch\n",
        &[],
        &["--platform", "linux/arm64", "-t", "arm:1", "-o", &out_arg],
    );
    let config = json(&k.run(&["inspect", "arm:1"]).stdout);
    assert_eq!(config["architecture"], "arm64", "{config}");
    assert_eq!(config["os"], "linux");
    assert!(id.starts_with("sha256:"));
    let info = json(&skopeo(&[
        "inspect",
        "--override-arch",
        "arm64",
        &format!("docker-archive:{}", file.display()),
    ]));
    assert_eq!(info["Architecture"], "arm64", "{info}");
    assert_eq!(
        json(&skopeo(&[
            "inspect",
            "--config",
            "--override-arch",
            "arm64",
            &format!("docker-archive:{}", file.display())
        ]))["architecture"],
        "arm64"
    );
}

#[test]
fn a_docker_archive_of_several_platforms_is_refused_before_the_build() {
    let k = Kiln::multiarch();
    let dir = tempfile::tempdir().unwrap();
    let out_arg = format!(
        "type=docker-archive,dest={}",
        dir.path().join("d.tar").display()
    );
    let (out, _ctx) = k.build(
        "FROM busybox\nRUN echo must-not-run\n",
        &[],
        &["--platform", BOTH, "-o", &out_arg],
    );
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("docker-archive") && err.contains("linux/amd64, linux/arm64"),
        "{err}"
    );
    assert!(err.contains("oci-archive"), "{err}");
    assert!(!err.contains("must-not-run"), "{err}");
}

#[test]
fn bad_platforms_are_usage_errors_naming_them() {
    let k = Kiln::new();
    let (out, _ctx) = k.build(
        "FROM busybox\n",
        &[],
        &["--platform", "linux/amd64,linux/sparc"],
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("linux/sparc"), "{}", stderr(&out));
    let (out, _ctx) = k.build("FROM --platform=linux/nope busybox\n", &[], &[]);
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(
        err.contains("Dockerfile") && err.contains("line 1") && err.contains("nope"),
        "{err}"
    );
    // A single-platform base for another platform is not silently used.
    let (out, _ctx) = k.build("FROM busybox\n", &[], &["--platform", "linux/arm64"]);
    assert_ne!(out.status.code(), Some(0));
    assert!(stderr(&out).contains("linux/arm64"), "{}", stderr(&out));
}

/// Runs kiln in a private mount namespace whose binfmt_misc directory is a fresh tmpfs holding
/// `files`: the host's handlers are out of sight for this one process, nobody else's.
fn without_handlers(k: &Kiln, files: &[(&str, &str)], args: &[&str]) -> Output {
    let mut script = String::from("mount -t tmpfs kiln-test /proc/sys/fs/binfmt_misc && ");
    for (name, content) in files {
        script += &format!("printf '{content}' > /proc/sys/fs/binfmt_misc/{name} && ");
    }
    script += "exec \"$@\"";
    Command::new("unshare")
        .args(["-m", "sh", "-c", &script, "sh", kiln_bin(), "--root"])
        .arg(k.root.path())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

#[test]
fn without_an_emulator_a_foreign_run_fails_before_the_build_saying_what_to_install() {
    let k = Kiln::multiarch();
    let ctx = context(
        "FROM busybox\nCOPY Dockerfile /\nRUN echo must-not-run\n",
        &[],
    );
    let ctx_path = ctx.path().to_str().unwrap();
    let build = ["build", "--progress", "plain", "--platform", BOTH, ctx_path];
    for (files, state) in [
        (
            vec![("status", "enabled\\n"), ("register", "")],
            "no binfmt_misc handler",
        ),
        (vec![], "not mounted"),
    ] {
        let out = without_handlers(&k, &files, &build);
        assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
        let err = stderr(&out);
        assert!(err.contains(state), "{err}");
        assert!(
            err.contains("linux/arm64") && err.contains("qemu-user-static"),
            "{err}"
        );
        assert!(err.contains("Dockerfile:1"), "{err}");
        assert!(!err.contains("COPY Dockerfile"), "a step ran: {err}");
    }
    // Stages without RUN steps need no emulator.
    let out = without_handlers(
        &k,
        &[],
        &[
            "build",
            "--platform",
            BOTH,
            "-f",
            &format!("{ctx_path}/Copy"),
            ctx_path,
        ],
    );
    assert_eq!(
        out.status.code(),
        Some(2),
        "no such recipe: {}",
        stderr(&out)
    );
    std::fs::write(ctx.path().join("Copy"), "FROM busybox\nCOPY Dockerfile /\n").unwrap();
    let out = without_handlers(
        &k,
        &[],
        &[
            "build",
            "--platform",
            BOTH,
            "-f",
            &format!("{ctx_path}/Copy"),
            ctx_path,
        ],
    );
    assert_success(&out);
}

/// kiln on `k`'s store with no registry credentials from the developer's own config.
fn kiln_reg(k: &Kiln, args: &[&str]) -> Output {
    Command::new(kiln_bin())
        .arg("--root")
        .arg(k.root.path())
        .args(args)
        .env("REGISTRY_AUTH_FILE", "/nonexistent/kiln-test-auth.json")
        .env("DOCKER_CONFIG", "/nonexistent/kiln-test-docker-config")
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

#[test]
fn an_index_is_pushed_pulled_by_platform_and_built_from() {
    let reg = Registry::start();
    let k = Kiln::multiarch();
    let r = format!("{}/multi/app:1", reg.host());
    let ctx = context(UNAME, &[]);
    let out = kiln_reg(
        &k,
        &[
            "build",
            "--progress",
            "plain",
            "--platform",
            BOTH,
            "-t",
            &r,
            "--push",
            ctx.path().to_str().unwrap(),
        ],
    );
    assert_success(&out);
    let id = stdout_line(&out);

    // The registry has the index under the tag (pushed last, after its manifests) and serves
    // each platform's image.
    let url = format!("docker://{r}");
    let raw = json(&skopeo(&["inspect", "--tls-verify=false", "--raw", &url]));
    assert_eq!(raw["mediaType"], "application/vnd.oci.image.index.v1+json");
    assert_eq!(architectures(&raw), ["amd64", "arm64"]);
    let info = json(&skopeo(&[
        "inspect",
        "--tls-verify=false",
        "--override-arch",
        "arm64",
        &url,
    ]));
    assert_eq!(info["Architecture"], "arm64", "{info}");
    let amd = json(&skopeo(&["inspect", "--tls-verify=false", &url]));
    assert_eq!(amd["Architecture"], "amd64");

    // Pulling one platform: the index keeps its digest, only arm64's content comes.
    let p = Kiln::empty();
    let out = kiln_reg(&p, &["pull", "--platform", "linux/arm64", &r]);
    assert_success(&out);
    assert_eq!(stdout_line(&out), id);
    let out = kiln_reg(&p, &["inspect", "--platform", "linux/arm64", &r]);
    assert_success(&out);
    assert_eq!(json(&out.stdout)["architecture"], "arm64");
    let out = kiln_reg(&p, &["inspect", "--platform", "linux/amd64", &r]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("not pulled"), "{}", stderr(&out));
    let listing = String::from_utf8_lossy(&kiln_reg(&p, &["images"]).stdout).into_owned();
    assert!(listing.contains("linux/amd64,linux/arm64"), "{listing}");
    let report = Store::open(p.root.path()).unwrap().fsck().unwrap();
    assert!(report.is_clean(), "{:?}", report.problems);
    // Pushing needs every platform's content, and says which is missing.
    let copy = format!("{}/multi/copy:1", reg.host());
    let out = kiln_reg(&p, &["push", &r, &copy]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("linux/amd64"), "{}", stderr(&out));
    let out = kiln_reg(&p, &["pull", "--platform", "linux/s390x", &r]);
    assert_ne!(out.status.code(), Some(0));
    assert!(stderr(&out).contains("linux/s390x"), "{}", stderr(&out));

    // FROM the index for both platforms fetches the missing one; then the index is complete
    // and pushes as it came.
    let child = context(&format!("FROM {r}\nRUN cat /arch > /parent-arch\n"), &[]);
    let out = kiln_reg(
        &p,
        &[
            "build",
            "--progress",
            "plain",
            "--platform",
            BOTH,
            child.path().to_str().unwrap(),
        ],
    );
    assert_success(&out);
    assert!(stderr(&out).contains("for linux/amd64"), "{}", stderr(&out));
    let out = kiln_reg(&p, &["push", &r, &copy]);
    assert_success(&out);
    assert_eq!(stdout_line(&out), id);
    let report = Store::open(p.root.path()).unwrap().fsck().unwrap();
    assert!(report.is_clean(), "{:?}", report.problems);
}
