//! End-to-end checks that hostile contexts, recipes and base images cannot reach the host or
//! run away with the builder's resources.

mod common;

use common::*;

/// A context link whose target runs through another link out of the context
/// (`chain -> x/secret`, `x -> /host/dir`): COPY finds nothing rather than the host's file.
#[test]
fn copy_through_a_chain_of_context_links_stays_inside() {
    let k = Kiln::new();
    let host = tempfile::tempdir().unwrap();
    std::fs::write(host.path().join("secret"), "host secret").unwrap();
    let ctx = context("FROM busybox\nCOPY chain /got\nRUN cat /got\n", &[]);
    std::os::unix::fs::symlink(host.path(), ctx.path().join("x")).unwrap();
    std::os::unix::fs::symlink("x/secret", ctx.path().join("chain")).unwrap();
    let out = k.run(&["build", "--progress", "plain", ctx.path().to_str().unwrap()]);
    let err = stderr(&out);
    assert!(!err.contains("host secret"), "{err}");
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("chain"), "{err}");
}

/// `ENV A1=$A0$A0$A0$A0` chains (each value four times the last) stop at the first value over
/// 1 MiB, located at the `$` that went over, as an input error.
#[test]
fn expansion_chains_stop_at_the_value_limit() {
    let k = Kiln::empty();
    let mut recipe = String::from("FROM scratch\nENV A0=xxxx\n");
    for i in 1..=20 {
        let p = i - 1;
        recipe.push_str(&format!("ENV A{i}=$A{p}$A{p}$A{p}$A{p}\n"));
    }
    let start = std::time::Instant::now();
    let (out, _ctx) = k.build(&recipe, &[], &[]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    // A9 is exactly 1 MiB (it fits); A10, on line 12, goes over at its second `$A9`.
    assert!(err.contains("Dockerfile:12:12:"), "{err}");
    assert!(err.contains("1 MiB"), "{err}");
    assert!(
        start.elapsed() < std::time::Duration::from_secs(30),
        "{err}"
    );
    // The same through ARG defaults.
    let args = recipe.replace("ENV ", "ARG ");
    let (out, _ctx) = k.build(&args, &[], &[]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains(":12:12:"), "{err}");
}

/// Many values under the value limit still cannot grow one stage's config past 16 MiB.
#[test]
fn the_config_has_a_size_limit() {
    let k = Kiln::empty();
    let mut recipe = String::from("FROM scratch\nENV A0=xxxx\n");
    for i in 1..=9 {
        let p = i - 1;
        recipe.push_str(&format!("ENV A{i}=$A{p}$A{p}$A{p}$A{p}\n"));
    }
    // A9 is exactly 1 MiB; A0..A9 hold 1.33 MiB, so the 15th copy passes 16 MiB.
    for i in 1..=20 {
        recipe.push_str(&format!("LABEL copy{i}=$A9\n"));
    }
    let (out, _ctx) = k.build(&recipe, &[], &[]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("16 MiB"), "{err}");
    assert!(err.contains("Dockerfile:26:1:"), "{err}");
}
