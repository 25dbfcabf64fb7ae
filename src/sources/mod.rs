//! Where a build's inputs come from: the build context directory (`context`), `ADD <url>`
//! downloads (`fetch`) and the named contexts of `--build-context` (`named`).

pub mod context;
pub mod fetch;
pub mod named;
