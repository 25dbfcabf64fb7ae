//! Managing the local store through the CLI: images, inspect, tag, rmi, prune, import of the
//! three archive formats. Run as root.

mod common;

use common::*;

fn stdout(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn images_tag_rmi_prune() {
    let k = Kiln::new();
    let id = k.build_ok(
        "FROM busybox\nRUN echo payload > /p\n",
        &[],
        &["-t", "app:1"],
    );
    let listing = stdout(&k.run(&["images"]));
    assert!(
        listing.contains("docker.io/library/app") && listing.contains(" 1 "),
        "{listing}"
    );
    assert!(
        listing.contains(&id["sha256:".len().."sha256:".len() + 12]),
        "{listing}"
    );

    assert_success(&k.run(&["tag", "app:1", "localhost:5000/team/app:v2"]));
    let listing = stdout(&k.run(&["images"]));
    assert!(listing.contains("localhost:5000/team/app"), "{listing}");
    let by_id = inspect(&k, &id);
    assert_eq!(by_id, inspect(&k, "localhost:5000/team/app:v2"));

    // rmi removes names; the image stays while another name holds it.
    assert_success(&k.run(&["rmi", "app:1"]));
    assert!(!stdout(&k.run(&["images"])).contains("docker.io/library/app"));
    let missing = k.run(&["rmi", "app:1"]);
    assert_eq!(missing.status.code(), Some(2));
    assert!(stderr(&missing).contains("app:1"), "{}", stderr(&missing));
    assert_success(&k.run(&["inspect", "localhost:5000/team/app:v2"]));

    // prune keeps what a name reaches and removes the rest.
    let blobs = || {
        std::fs::read_dir(k.root.path().join("blobs/sha256"))
            .unwrap()
            .count()
    };
    assert_success(&k.run(&["rmi", "localhost:5000/team/app:v2"]));
    let before = blobs();
    let out = k.run(&["prune"]);
    assert_success(&out);
    assert!(blobs() < before, "prune removed nothing: {}", stderr(&out));
    assert_success(&k.run(&["inspect", "busybox"]));
    let gone = k.run(&["inspect", &id]);
    assert_eq!(gone.status.code(), Some(2));
    // The base still builds after a prune: its layers and blobs were kept.
    k.build_ok("FROM busybox\nRUN true\n", &[], &[]);
}

#[test]
fn import_takes_all_three_formats() {
    let k = Kiln::new();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let outputs = [
        format!("type=oci,dest={}", d.join("layout").display()),
        format!("type=oci-archive,dest={}", d.join("oci.tar").display()),
        format!(
            "type=docker-archive,dest={}",
            d.join("docker.tar").display()
        ),
    ];
    let mut args = vec!["-t", "src:1"];
    for o in &outputs {
        args.push("-o");
        args.push(o);
    }
    let id = k.build_ok("FROM busybox\nRUN echo x > /x\n", &[], &args);
    let other = Kiln::empty();
    for (path, name) in [("layout", "a"), ("oci.tar", "b"), ("docker.tar", "c")] {
        let out = other.run(&["import", d.join(path).to_str().unwrap(), name]);
        assert_success(&out);
        assert_eq!(
            stdout_line(&out),
            id,
            "{path}: the image id changed on import"
        );
    }
    let bad = other.run(&["import", "/nonexistent", "x"]);
    assert_eq!(bad.status.code(), Some(2));
}
