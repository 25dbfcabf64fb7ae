//! Build checks through the binary. Each rule has `testdata/checks/<Rule>/`: `kiln check` of
//! `trigger.Dockerfile` must find exactly that rule and print exactly `trigger.txt`, and
//! `pass.Dockerfile` must give no finding. `UPDATE_GOLDEN=1 cargo test --test checks` rewrites
//! the golden files. Also: the warnings of a build, `--check`, `# check=error=true`, and
//! `--call outline|targets`.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::{Kiln, assert_success, context};

fn kiln_check(dir: &Path, file: &str, store: &Path) -> Output {
    Command::new(common::kiln_bin())
        .arg("--root")
        .arg(store)
        .args(["check", "-f", file, "."])
        .current_dir(dir)
        .output()
        .unwrap()
}

#[test]
fn each_rule_triggers_on_its_recipe_and_not_on_the_fixed_one() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/checks");
    let update = std::env::var_os("UPDATE_GOLDEN").is_some();
    let store = tempfile::tempdir().unwrap();
    let mut rules: Vec<String> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    rules.sort();
    let mut want_rules: Vec<String> = kiln::recipe::checks::RULES
        .iter()
        .map(|r| r.to_string())
        .collect();
    want_rules.sort();
    assert_eq!(rules, want_rules, "one case directory per rule");
    for rule in &rules {
        let dir = root.join(rule);
        let out = kiln_check(&dir, "trigger.Dockerfile", store.path());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{rule}: {stderr}");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let found: Vec<&str> = stdout
            .lines()
            .filter(|l| l.starts_with("trigger.Dockerfile:"))
            .map(|l| l.split(": ").nth(1).unwrap_or(""))
            .collect();
        assert!(
            !found.is_empty() && found.iter().all(|f| f == rule),
            "{rule}: the trigger found {found:?}:\n{stdout}"
        );
        let golden = dir.join("trigger.txt");
        if update {
            std::fs::write(&golden, &out.stdout).unwrap();
        } else {
            let want = std::fs::read_to_string(&golden).unwrap_or_else(|e| {
                panic!("{}: {e} (UPDATE_GOLDEN=1 writes it)", golden.display())
            });
            assert_eq!(stdout, want, "{rule}: output differs from trigger.txt");
        }
        let out = kiln_check(&dir, "pass.Dockerfile", store.path());
        assert_eq!(
            out.status.code(),
            Some(0),
            "{rule}: the fixed recipe has findings:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.stdout.is_empty());
    }
}

#[test]
fn a_build_prints_the_warnings_and_check_builds_nothing() {
    let k = Kiln::new();
    let recipe = "FROM busybox as base\nENV GREETING hello\nRUN echo $GREETING > /g\n";
    let (out, _ctx) = k.build(recipe, &[], &[]);
    assert_success(&out);
    let stderr = String::from_utf8_lossy(&out.stderr);
    for rule in ["FromAsCasing", "LegacyKeyValueFormat"] {
        assert!(
            stderr.contains("WARNING: ") && stderr.contains(&format!(": {rule}: ")),
            "no {rule} warning in:\n{stderr}"
        );
    }
    // --check: the same findings, on stdout, exit 1, and nothing built.
    let images_before = k.run(&["images"]).stdout;
    let ctx = context("FROM busybox\nMAINTAINER me\nRUN touch /never\n", &[]);
    let out = k.run(&["build", "--check", ctx.path().to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("MaintainerDeprecated"), "{stdout}");
    assert!(!String::from_utf8_lossy(&out.stderr).contains("RUN touch"));
    assert_eq!(k.run(&["images"]).stdout, images_before);
    // --call check,format=json gives the findings as JSON.
    let out = k.run(&[
        "build",
        "--call",
        "check,format=json",
        ctx.path().to_str().unwrap(),
    ]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["warnings"][0]["rule"], "MaintainerDeprecated");
    assert_eq!(v["warnings"][0]["line"], 2);
    // A clean recipe passes.
    let ctx = context("FROM busybox\nRUN true\n", &[]);
    let out = k.run(&["build", "--check", ctx.path().to_str().unwrap()]);
    assert_success(&out);
}

#[test]
fn check_directive_error_fails_the_build_and_skip_silences() {
    let k = Kiln::new();
    let (out, _ctx) = k.build(
        "# check=error=true\nFROM busybox\nMAINTAINER me\nRUN touch /x\n",
        &[],
        &[],
    );
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("MaintainerDeprecated"), "{stderr}");
    assert!(!stderr.contains("RUN touch"), "the build ran: {stderr}");
    let (out, _ctx) = k.build(
        "# check=skip=MaintainerDeprecated;error=true\nFROM busybox\nMAINTAINER me\n",
        &[],
        &[],
    );
    assert_success(&out);
    assert!(!String::from_utf8_lossy(&out.stderr).contains("MaintainerDeprecated"));
    // The build arg overrides the directive.
    let (out, _ctx) = k.build(
        "# check=error=true\nFROM busybox\nMAINTAINER me\n",
        &[],
        &["--build-arg", "BUILDKIT_DOCKERFILE_CHECK=skip=all"],
    );
    assert_success(&out);
    // A bad directive is a recipe error.
    let (out, _ctx) = k.build("# check=skip=Nope\nFROM busybox\n", &[], &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("Nope"));
}

const OUTLINE_RECIPE: &str = "\
# VERSION the release to build
ARG VERSION=1.0

# base the common base
FROM busybox:${VERSION} AS base

FROM base AS build
# MODE how to build
ARG MODE=release
RUN --mount=type=secret,id=npmrc true

# test runs the tests
FROM build AS test
";

#[test]
fn call_targets_and_outline() {
    let k = Kiln::empty();
    let ctx = context(OUTLINE_RECIPE, &[]);
    let dir = ctx.path().to_str().unwrap();
    let out = k.run(&["build", "--call", "targets", dir]);
    assert_success(&out);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "TARGET          DESCRIPTION\nbase            the common base\nbuild\ntest (default)  runs the tests\n"
    );
    let out = k.run(&[
        "build",
        "--call",
        "outline",
        "--target",
        "build",
        "--build-arg",
        "MODE=debug",
        dir,
    ]);
    assert_success(&out);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "TARGET:      build\n\nBUILD ARG  VALUE  DESCRIPTION\nVERSION    1.0    the release to build\nMODE       debug  how to build\n\nSECRET  REQUIRED\nnpmrc   false\n"
    );
    let out = k.run(&["build", "--call", "outline,format=json", dir]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["target"]["name"], "test");
    assert_eq!(v["args"][1]["name"], "MODE");
    // Nothing was built or pulled: the store was never even opened.
    assert!(!k.root.path().join("index.json").exists());
}
