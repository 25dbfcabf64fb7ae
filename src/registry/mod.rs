//! The OCI distribution client: references, auth, pull, push, retries.

pub mod reference;
