//! Robustness: large and malformed inputs give a result or a clear error, quickly, never a panic.

use std::time::{Duration, Instant};

use kiln::recipe::{parse, parse_syntax};

/// A bound against hangs and quadratic blow-ups on a loaded debug build, not a speed target.
const LIMIT: Duration = Duration::from_secs(20);

fn timed<T>(f: impl FnOnce() -> T) -> T {
    let t = Instant::now();
    let out = f();
    assert!(t.elapsed() < LIMIT, "took {:?}", t.elapsed());
    out
}

#[test]
fn one_mib_single_line() {
    let mut src = String::from("FROM a\nRUN echo ");
    src.push_str(&"x \\\\ 'q' \"d\" ".repeat(1 << 16));
    src.truncate(1 << 20);
    let r = timed(|| parse(src.as_bytes(), "Dockerfile")).expect("parses");
    assert_eq!(r.stages[0].instructions.len(), 1);
}

#[test]
fn pathological_lines() {
    for body in [
        " ".repeat(1 << 20),
        "\\ ".repeat(1 << 18),
        "\r".repeat(1 << 20),
        "[".repeat(1 << 20),
    ] {
        let src = format!("FROM a\nCMD {body}x\n");
        let _ = timed(|| parse_syntax(src.as_bytes(), "Dockerfile"));
    }
    let src = format!("FROM a\nENV {}\n", "a=\"b ".repeat(1 << 15));
    let _ = timed(|| parse(src.as_bytes(), "Dockerfile"));
    let src = format!("FROM a\n{}RUN x\n", "ONBUILD ".repeat(1 << 17));
    assert!(timed(|| parse(src.as_bytes(), "Dockerfile")).is_err());
}

#[test]
fn hundred_thousand_lines() {
    let mut src = String::from("FROM a\n");
    // A realistic mix: long continued RUN scripts, comments, blank lines, a few short lines.
    for i in 0..100_000 {
        src.push_str(match i % 10 {
            0 => "RUN apt-get update \\\n",
            1..=6 => "    && apt-get install -y some-package another-one \\\n",
            7 => "    # a comment inside the script\n",
            8 => "    && rm -rf /var/lib/apt/lists/*\n",
            _ => "\n",
        });
    }
    let ast = timed(|| parse_syntax(src.as_bytes(), "Dockerfile")).expect("parses");
    assert_eq!((ast.nodes.len(), ast.end_line), (10_001, 100_000));
    timed(|| parse(src.as_bytes(), "Dockerfile")).expect("parses");
}

#[test]
fn long_heredoc_is_linear() {
    let src = format!(
        "FROM a\nRUN <<EOF\n{}EOF\n",
        "line of text\n".repeat(100_000)
    );
    let r = timed(|| parse(src.as_bytes(), "Dockerfile")).expect("parses");
    assert_eq!(r.stages[0].instructions[0].span.end_line, 100_003);
    let unterminated = format!("FROM a\nRUN <<EOF\n{}", "x\n".repeat(100_000));
    let e = timed(|| parse(unterminated.as_bytes(), "Dockerfile")).expect_err("unterminated");
    assert_eq!(e.line, 2);
}

#[test]
fn invalid_utf8_and_nul() {
    let e = parse(b"FROM a\nRUN \xc3\x28\n", "Dockerfile").expect_err("invalid utf-8");
    assert_eq!((e.line, e.col), (2, 5));
    assert!(e.message.contains("UTF-8"));
    let e = parse(b"FROM a\0\n", "Dockerfile").expect_err("nul");
    assert_eq!((e.line, e.col), (1, 7));
    let e = parse(b"\xff", "Dockerfile").expect_err("lone byte");
    assert_eq!((e.line, e.col), (1, 1));
    assert!(!e.to_string().is_empty());
}
