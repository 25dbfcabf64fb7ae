//! Fuzzes layer unpacking (gzip, zstd or plain tar, whiteouts, links, devices) into a temp
//! root that already holds a link pointing out of it, and checks that nothing was created
//! outside the root: the sibling directory stays empty and the temp dir holds nothing else.
#![no_main]

use std::path::Path;

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    let outside = tmp.path().join("outside");
    std::fs::create_dir(&root).unwrap();
    std::fs::create_dir(&outside).unwrap();
    std::os::unix::fs::symlink("../outside", root.join("escape")).unwrap();
    std::os::unix::fs::symlink(&outside, root.join("escape-abs")).unwrap();
    let _ = kiln::snapshot::unpack_layer(data, &root);
    assert!(names(&outside).is_empty(), "wrote outside the root: {:?}", names(&outside));
    assert_eq!(names(tmp.path()), ["outside", "root"]);
});
