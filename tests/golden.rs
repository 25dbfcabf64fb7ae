//! Golden files under `testdata/recipes/<case>/`: `kiln parse` of each `Dockerfile` must print
//! exactly `parse.json` (typed instructions), or for bad recipes exit 2 with exactly
//! `error.txt` on stderr. `UPDATE_GOLDEN=1 cargo test --test golden` rewrites them.

use std::path::Path;
use std::process::Command;

#[test]
fn recipes_match_their_golden_files() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/recipes");
    let update = std::env::var_os("UPDATE_GOLDEN").is_some();
    let mut cases: Vec<_> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    cases.sort();
    assert!(
        cases.len() >= 4,
        "golden cases missing under {}",
        root.display()
    );
    for case in cases {
        // Run from the case directory so file names in messages are stable.
        let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
            .args(["parse", "Dockerfile"])
            .current_dir(&case)
            .output()
            .unwrap();
        let (file, got) = if out.status.success() {
            ("parse.json", out.stdout)
        } else {
            assert_eq!(out.status.code(), Some(2), "{}", case.display());
            ("error.txt", out.stderr)
        };
        let golden = case.join(file);
        if update {
            std::fs::write(&golden, &got).unwrap();
            continue;
        }
        let want = std::fs::read(&golden)
            .unwrap_or_else(|e| panic!("{}: {e} (UPDATE_GOLDEN=1 writes it)", golden.display()));
        assert_eq!(
            String::from_utf8_lossy(&got),
            String::from_utf8_lossy(&want),
            "{} differs from its golden file",
            case.display()
        );
    }
}
