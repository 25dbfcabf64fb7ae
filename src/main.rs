//! The kiln command line (for now only the hidden sandbox helper entry point).

fn main() {
    if std::env::args_os().nth(1).as_deref() == Some(std::ffi::OsStr::new(kiln::sandbox::INIT_ARG))
    {
        kiln::sandbox::init_main();
    }
}
