//! kiln: build OCI images from Dockerfiles without a daemon.
//!
//! Modules, from the top of the pipeline down (DESIGN.md §3); a module only uses those below it.

pub mod recipe;
pub mod plan;
pub mod context;
pub mod build;
pub mod distribution;
pub mod sandbox;
pub mod rootfs;
pub mod snapshot;
pub mod store;
pub mod image;
pub mod registry;
pub mod progress;
pub mod digest;
