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
