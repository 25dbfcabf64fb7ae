//! kiln: build OCI images from Dockerfiles without a daemon.
//!
//! Modules, from the top of the pipeline down (DESIGN.md §3); a module only uses those below it.

pub mod digest;
pub mod recipe;
pub mod sandbox;
