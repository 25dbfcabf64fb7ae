//! What a platform's build read, for provenance and `--verify`: the images (by manifest
//! digest), the context files and the downloads its steps read. What each step did (its cache
//! state and layer) is in the build's step reports ([`super::report`]), not here.

use std::collections::BTreeMap;

use super::Engine;
use crate::digest::Digest;
use crate::image::Descriptor;

/// Everything one platform's build read.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BuildRecord {
    /// Images read (FROM, COPY --from, RUN --mount from=): normalised reference → manifest
    /// of the image taken for the platform.
    pub images: BTreeMap<String, Descriptor>,
    /// Context files COPY/ADD read: path → content digest (mode, owner, size, content).
    pub context_files: BTreeMap<String, String>,
    /// `ADD <url>` downloads: URL → sha256 of the content.
    pub downloads: BTreeMap<String, String>,
}

impl Engine<'_> {
    /// Runs `f` on this attempt's record.
    fn with_record(&self, f: impl FnOnce(&mut BuildRecord)) {
        f(&mut self.outcomes.lock().unwrap_or_else(|e| e.into_inner()).read);
    }

    /// Records that the build read image `reference` (normalised) as `manifest`.
    pub(super) fn read_image(&self, reference: String, manifest: Descriptor) {
        self.with_record(|r| {
            r.images.insert(reference, manifest);
        });
    }

    /// Records context files a COPY/ADD read, with their content digests.
    pub(super) fn read_context_files(&self, files: &BTreeMap<String, String>) {
        self.with_record(|r| r.context_files.extend(files.clone()));
    }

    /// Records an `ADD <url>` download.
    pub(super) fn read_download(&self, url: &str, digest: &Digest) {
        self.with_record(|r| {
            r.downloads.insert(url.to_string(), digest.hex());
        });
    }
}
