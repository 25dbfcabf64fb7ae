//! The error type of the registry client. Every message names the registry host and the
//! image reference involved, so a failed pull or push can be acted on without a debugger.

use crate::digest::Digest;

/// Why a registry operation failed.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The registry could not be reached or the connection failed (after retries).
    #[error("cannot reach registry {host} for {reference}: {detail}")]
    Transport {
        /// Registry host.
        host: String,
        /// Image reference.
        reference: String,
        /// What the HTTP stack reported.
        detail: String,
    },
    /// The registry (or its token service) refused our credentials or lack of them.
    #[error("authentication to {host} failed for {reference}: {detail}")]
    Auth {
        /// Registry host.
        host: String,
        /// Image reference.
        reference: String,
        /// What went wrong.
        detail: String,
    },
    /// The registry has no manifest or blob under this name.
    #[error("{what} of {reference} not found on registry {host}")]
    NotFound {
        /// Registry host.
        host: String,
        /// Image reference.
        reference: String,
        /// `manifest` or `blob sha256:…`.
        what: String,
    },
    /// The registry answered with an unexpected HTTP status (after retries).
    #[error("registry {host} answered {status} for {reference}: {detail}")]
    Status {
        /// Registry host.
        host: String,
        /// Image reference.
        reference: String,
        /// HTTP status code.
        status: u16,
        /// The registry's error message, if any.
        detail: String,
    },
    /// Content did not hash to the digest it was requested or announced by.
    #[error(
        "digest mismatch from registry {host} for {reference}: expected {expected}, got {actual}"
    )]
    DigestMismatch {
        /// Registry host.
        host: String,
        /// Image reference.
        reference: String,
        /// The digest asked for.
        expected: Digest,
        /// The digest of what arrived.
        actual: Digest,
    },
    /// The registry's answer broke the protocol (missing header, oversized manifest, …).
    #[error("bad response from registry {host} for {reference}: {detail}")]
    Protocol {
        /// Registry host.
        host: String,
        /// Image reference.
        reference: String,
        /// What was wrong.
        detail: String,
    },
    /// A manifest document that does not say unambiguously what it is.
    #[error("refusing the manifest of {reference} from registry {host}: {detail}")]
    AmbiguousManifest {
        /// Registry host.
        host: String,
        /// Image reference.
        reference: String,
        /// What disagrees.
        detail: String,
    },
    /// A request would have used plain http where policy forbids it.
    #[error(
        "refusing plain http to {url} for {reference} (registry {host}): only loopback registries or --tls-verify=false allow it"
    )]
    InsecureRefused {
        /// Registry host.
        host: String,
        /// Image reference.
        reference: String,
        /// The http URL that was refused.
        url: String,
    },
    /// The credentials configuration could not be read.
    #[error("credentials for registry {host}: {detail}")]
    Credentials {
        /// Registry host.
        host: String,
        /// What went wrong, naming the file or helper.
        detail: String,
    },
    /// Reading the local source or writing the local destination failed.
    #[error("local I/O while transferring {reference} with registry {host}: {source}")]
    Io {
        /// Registry host.
        host: String,
        /// Image reference.
        reference: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// An index or manifest list could not be parsed.
    #[error("invalid image index: {0}")]
    BadIndex(String),
    /// No entry of an index matches the wanted platform.
    #[error("no manifest for platform {wanted} in the image index (available: {available})")]
    NoMatchingPlatform {
        /// `os/arch[/variant]` asked for.
        wanted: String,
        /// The platforms the index lists.
        available: String,
    },
}
