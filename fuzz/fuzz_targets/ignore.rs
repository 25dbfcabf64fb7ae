//! Fuzzes `.dockerignore` parsing and matching: the first line-separated half of the input is
//! the ignore file, the rest are paths to test against it (and each path's parents).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let (rules, paths) = text.split_once("\n---\n").unwrap_or((text, "a/b/c\n.git\nx.key"));
    let Ok(ignore) = kiln::recipe::ignore::IgnoreRules::parse(rules) else { return };
    for path in paths.lines() {
        let _ = ignore.is_excluded(path);
        let mut parent = path;
        while let Some((p, _)) = parent.rsplit_once('/') {
            let _ = ignore.is_excluded(p);
            parent = p;
        }
    }
});
