//! The CI examples in examples/ci/ parse (with a real YAML parser, PyYAML), run `kiln build`
//! with flags kiln has, share the cache through a registry, and say what privileges kiln
//! needs there.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

use serde_json::Value;

const EXAMPLES: [&str; 3] = ["github-actions.yml", "gitlab-ci.yml", "kubernetes-job.yaml"];

/// The YAML file as JSON, parsed by PyYAML.
fn load(path: &Path) -> Value {
    let out = Command::new("python3")
        .args([
            "-c",
            "import json, sys, yaml; json.dump(yaml.safe_load(open(sys.argv[1])), sys.stdout, default=str)",
        ])
        .arg(path)
        .output()
        .expect("python3 is installed");
    common::assert_success(&out);
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Every string in a document.
fn strings<'v>(v: &'v Value, out: &mut Vec<&'v str>) {
    match v {
        Value::String(s) => out.push(s),
        Value::Array(a) => a.iter().for_each(|x| strings(x, out)),
        Value::Object(m) => m.values().for_each(|x| strings(x, out)),
        _ => {}
    }
}

/// The words of every `kiln build` command in a shell script (continuation lines joined).
fn kiln_builds(script: &str) -> Vec<Vec<String>> {
    let joined = script.replace("\\\n", " ");
    joined
        .lines()
        .filter_map(|line| line.split_once("kiln build").map(|(_, rest)| rest))
        .map(|rest| {
            rest.split_whitespace()
                .map(|w| w.trim_matches('"').to_string())
                .collect()
        })
        .collect()
}

/// The long flags `kiln build --help` lists.
fn build_flags() -> BTreeSet<String> {
    let out = Command::new(common::kiln_bin())
        .args(["build", "--help"])
        .output()
        .unwrap();
    common::assert_success(&out);
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter(|w| w.starts_with("--"))
        .map(|w| {
            w.trim_end_matches(',')
                .split('=')
                .next()
                .unwrap()
                .to_string()
        })
        .chain(["--root".to_string()])
        .collect()
}

#[test]
fn ci_examples_parse_and_use_real_kiln_flags() {
    let known = build_flags();
    assert!(known.contains("--cache-to") && known.contains("--metadata-file"));
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/ci");
    for name in EXAMPLES {
        let path = dir.join(name);
        let doc = load(&path);
        let mut all = Vec::new();
        strings(&doc, &mut all);
        let builds: Vec<Vec<String>> = all.iter().flat_map(|s| kiln_builds(s)).collect();
        assert!(!builds.is_empty(), "{name}: no `kiln build`");
        let mut used = BTreeSet::new();
        for words in &builds {
            for w in words.iter().filter(|w| w.starts_with("--")) {
                let flag = w.split('=').next().unwrap();
                assert!(known.contains(flag), "{name}: kiln build has no {flag}");
                used.insert(flag.to_string());
            }
            for pair in words.windows(2).filter(|p| p[0] == "--cache-to") {
                assert!(
                    pair[1].starts_with("type=registry,ref="),
                    "{name}: {}",
                    pair[1]
                );
            }
        }
        for needed in ["--cache-from", "--cache-to", "--push"] {
            assert!(used.contains(needed), "{name}: never uses {needed}");
        }
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            text.contains("# Privileges:"),
            "{name}: says nothing of privileges"
        );
        assert!(
            text.contains("poison"),
            "{name}: says nothing of cache trust"
        );
    }
}
