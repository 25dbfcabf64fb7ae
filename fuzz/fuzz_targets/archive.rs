//! Fuzzes `ADD` archive detection (plain, gzip, bzip2, xz or zstd tar, by content) and, for
//! what it calls an archive, the extraction into a temp root as ADD does it, checking that
//! nothing lands outside the root.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("input");
    std::fs::write(&file, data).unwrap();
    let Ok(true) = kiln::snapshot::is_archive(&file) else { return };
    let root_dir = tmp.path().join("root");
    let outside = tmp.path().join("outside");
    std::fs::create_dir(&root_dir).unwrap();
    std::fs::create_dir(&outside).unwrap();
    std::fs::create_dir(root_dir.join("dest")).unwrap();
    std::os::unix::fs::symlink("../../outside", root_dir.join("dest/escape")).unwrap();
    std::os::unix::fs::symlink(&outside, root_dir.join("dest/escape-abs")).unwrap();
    let root = kiln::rootfs::RootDir::open_host(&root_dir).unwrap();
    let _ = kiln::snapshot::extract_archive(&file, &root, "/dest", None);
    let mut names: Vec<String> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["input", "outside", "root"], "extraction wrote beside its root");
    assert!(
        std::fs::read_dir(&outside).unwrap().next().is_none(),
        "extraction wrote outside its root"
    );
});
