//! Fuzzes the recipe parser: any bytes must give a recipe or an error, never a panic or hang.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(ast) = kiln::recipe::parse_syntax(data, "Dockerfile") {
        let _ = kiln::recipe::dump(&ast);
    }
    let _ = kiln::recipe::parse(data, "Dockerfile");
});
