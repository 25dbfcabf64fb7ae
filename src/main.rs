//! The `kiln` binary: dispatches the hidden sandbox entry point, else runs the CLI.

mod cli;

fn main() {
    if std::env::args_os()
        .nth(1)
        .is_some_and(|a| a == kiln::sandbox::INIT_ARG)
    {
        kiln::sandbox::init_main();
    }
    std::process::exit(cli::main());
}
