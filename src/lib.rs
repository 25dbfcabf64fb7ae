//! kiln: build OCI images from Dockerfiles without a daemon.
//!
//! Modules, from the top of the pipeline down (DESIGN.md §3); a module only uses those below it.

pub mod attest;
pub mod build;
pub mod cache;
pub mod compare;
pub mod digest;
pub mod distribution;
pub mod image;
pub mod plan;
pub mod progress;
pub mod recipe;
pub mod registry;
pub mod rootfs;
pub mod sandbox;
pub mod snapshot;
pub mod sources;
pub mod store;
pub mod verify;
