//! Fuzzes the shell-word expander with both escape characters and a small environment.
#![no_main]

use std::collections::BTreeMap;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Ok(word) = std::str::from_utf8(data) else { return };
    let vars: BTreeMap<String, String> = [
        ("A".to_string(), "a b".to_string()),
        ("EMPTY".to_string(), String::new()),
        ("PWD".to_string(), "/home".to_string()),
    ]
    .into();
    for escape in ['\\', '`'] {
        let lexer = kiln::recipe::shell::Lexer::new(escape);
        let _ = lexer.process_word(word, &vars);
        let _ = lexer.process_words(word, &vars);
    }
});
