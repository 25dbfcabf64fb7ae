//! Fuzzes what kiln reads from registries: the manifest/index classifier (with each kind of
//! Content-Type), platform selection from an index, and the manifest, index and config
//! parsers. A document the classifier accepts as a manifest or an index must not have both
//! kinds of fields.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    for content_type in [
        None,
        Some("application/json"),
        Some(kiln::registry::MEDIA_OCI_MANIFEST),
        Some(kiln::registry::MEDIA_OCI_INDEX),
        Some(kiln::registry::MEDIA_DOCKER_MANIFEST),
        Some(kiln::registry::MEDIA_DOCKER_LIST),
    ] {
        if let Ok(media_type) = kiln::registry::manifest_media_type(content_type, data) {
            let value: serde_json::Value = serde_json::from_slice(data).unwrap();
            let index_fields = value.get("manifests").is_some();
            let manifest_fields = value.get("layers").is_some() || value.get("config").is_some();
            assert!(!(index_fields && manifest_fields), "{media_type} accepted with both");
        }
    }
    for (os, arch, variant) in [("linux", "amd64", None), ("linux", "arm64", Some("v8"))] {
        let _ = kiln::registry::select_platform(data, os, arch, variant);
    }
    let _ = kiln::image::Manifest::from_json(data);
    let _ = kiln::image::Index::from_json(data);
    let _ = kiln::image::ImageConfig::from_json(data);
});
