//! Where a build's inputs come from: the build context directory (`context`) and `ADD <url>`
//! downloads (`fetch`).

pub mod context;
pub mod fetch;
