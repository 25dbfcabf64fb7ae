//! The OCI distribution client: references, auth, pull, push, retries. It moves bytes
//! between a registry and `Read`/`Write` handles; storing them is the caller's business.

mod auth;
mod client;
mod document;
mod error;
mod platform;
pub mod reference;

pub use client::{
    Client, ClientOptions, MEDIA_DOCKER_LIST, MEDIA_DOCKER_MANIFEST, MEDIA_OCI_INDEX,
    MEDIA_OCI_MANIFEST, PushOutcome,
};
pub use document::manifest_media_type;
pub use error::RegistryError;
pub use platform::select_platform;
pub use reference::Reference;
