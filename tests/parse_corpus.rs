//! BuildKit parser conformance: the `testfiles` dumps, the negative cases and line spans.

use std::fs;
use std::path::{Path, PathBuf};

use kiln::recipe::{dump, parse_syntax};

fn corpus(sub: &str) -> PathBuf {
    Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../shared/corpus/buildkit/parser"
    ))
    .join(sub)
}

fn case_dirs(sub: &str) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = fs::read_dir(corpus(sub))
        .expect("corpus directory")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.is_dir())
        .collect();
    dirs.sort();
    dirs
}

#[test]
fn testfiles_dump_matches_byte_for_byte() {
    let dirs = case_dirs("testfiles");
    let mut failures = Vec::new();
    for dir in &dirs {
        let src = fs::read(dir.join("Dockerfile")).expect("Dockerfile");
        let want = fs::read_to_string(dir.join("result")).expect("result");
        match parse_syntax(&src, "Dockerfile") {
            Ok(ast) => {
                let got = dump(&ast) + "\n";
                if got != want {
                    failures.push(format!(
                        "{}:\n--- want\n{want}--- got\n{got}",
                        dir.display()
                    ));
                }
            }
            Err(e) => failures.push(format!("{}: error {e}", dir.display())),
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} failed:\n{}",
        failures.len(),
        dirs.len(),
        failures.join("\n")
    );
    assert_eq!(dirs.len(), 33, "expected 33 parser cases");
}

#[test]
fn negative_cases_error() {
    let dirs = case_dirs("testfiles-negative");
    assert_eq!(dirs.len(), 4, "expected 4 negative cases");
    for dir in &dirs {
        let src = fs::read(dir.join("Dockerfile")).expect("Dockerfile");
        assert!(
            parse_syntax(&src, "Dockerfile").is_err(),
            "{} parsed",
            dir.display()
        );
    }
}

#[test]
fn line_numbers() {
    let src = fs::read(corpus("testfile-line/Dockerfile")).expect("Dockerfile");
    let ast = parse_syntax(&src, "Dockerfile").expect("parses");
    assert_eq!((ast.start_line, ast.end_line), (5, 31));
    let spans: Vec<(usize, usize)> = ast
        .nodes
        .iter()
        .map(|n| (n.start_line, n.end_line))
        .collect();
    assert_eq!(spans, vec![(5, 5), (11, 12), (17, 31)]);
}
