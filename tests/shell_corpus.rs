//! Runs BuildKit's shell-lexer conformance vectors (`envVarTest`, `wordsTest`) against
//! `kiln::recipe::shell`, following the harness rules of `shared/corpus/buildkit/README.md`.

use std::collections::BTreeMap;

use kiln::recipe::shell::Lexer;

const ENV_VAR_TEST: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../shared/corpus/buildkit/shell/envVarTest"
);
const WORDS_TEST: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../shared/corpus/buildkit/shell/wordsTest"
);

fn read(path: &str) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {path}: {e}"))
}

#[test]
fn env_var_test() {
    let text = read(ENV_VAR_TEST);
    let env: BTreeMap<String, String> = [
        ("PWD", "/home"),
        ("SHELL", "bash"),
        ("KOREAN", "한국어"),
        ("NULL", ""),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    let lexer = Lexer::new('\\');
    let (mut run, mut skipped) = (0, 0);
    let mut failures = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if line.starts_with('#') {
            continue;
        }
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let fields: Vec<&str> = line.split('|').collect();
        assert_eq!(fields.len(), 3, "line {}: need 3 fields: {line:?}", n + 1);
        let (platform, source, expected) = (fields[0].trim(), fields[1].trim(), fields[2].trim());
        match platform {
            "A" | "U" => {}
            "W" => {
                skipped += 1;
                continue;
            }
            other => panic!("line {}: bad platform {other:?}", n + 1),
        }
        run += 1;
        let got = lexer.process_word(source, &env);
        let ok = match (&got, expected) {
            (Err(_), "error") => true,
            (Ok(e), exp) => exp != "error" && e.value == exp,
            (Err(_), _) => false,
        };
        if !ok {
            failures.push(format!(
                "line {}: {source:?}: expected {expected:?}, got {got:?}",
                n + 1
            ));
        }
    }
    eprintln!(
        "envVarTest: {} run, {} passed, {skipped} skipped (W)",
        run,
        run - failures.len()
    );
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert!(run >= 228, "only {run} envVarTest vectors ran");
}

#[test]
fn words_test() {
    let text = read(WORDS_TEST);
    let mut env: BTreeMap<String, String> = BTreeMap::new();
    let lexer = Lexer::new('\\');
    let mut run = 0;
    let mut failures = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if line.starts_with('#') {
            continue;
        }
        if let Some(rest) = line.strip_prefix("ENV ") {
            let rest = rest.trim_start_matches(' ');
            let (k, v) = rest.split_once('=').unwrap_or((rest, ""));
            env.insert(k.to_owned(), v.to_owned());
            continue;
        }
        let fields: Vec<&str> = line.split('|').collect();
        assert_eq!(
            fields.len(),
            2,
            "line {}: need exactly one '|': {line:?}",
            n + 1
        );
        let source = fields[0].trim();
        let expected: Vec<&str> = fields[1].trim_start_matches(' ').split(',').collect();
        run += 1;
        let got = match lexer.process_words(source, &env) {
            Ok(e) => e.value,
            Err(_) => vec!["error".to_owned()],
        };
        if got != expected {
            failures.push(format!(
                "line {}: {source:?}: expected {expected:?}, got {got:?}",
                n + 1
            ));
        }
    }
    eprintln!("wordsTest: {} run, {} passed", run, run - failures.len());
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert!(run >= 24, "only {run} wordsTest vectors ran");
}
