//! Streaming check in its own test binary (so no other test shares the process): writing a layer
//! with a 1 GiB sparse file must not grow peak RSS (VmHWM) with the file size.

use std::fs;
use std::io;

use kiln::snapshot::{Compression, LayerOptions, write_layer};

/// Peak resident set size of this process in KiB.
fn vm_hwm_kib() -> u64 {
    let status = fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[test]
fn one_gib_file_streams_in_flat_memory() {
    let t = tempfile::tempdir().unwrap();
    let f = fs::File::create(t.path().join("big")).unwrap();
    f.set_len(1 << 30).unwrap();
    drop(f);
    let before = vm_hwm_kib();
    let opts = LayerOptions {
        source_date_epoch: Some(0),
        compression: Compression::Gzip,
    };
    let (_, sum) = write_layer(t.path(), &opts, io::sink()).unwrap();
    let after = vm_hwm_kib();
    eprintln!(
        "layer of a 1 GiB file: uncompressed {} bytes; VmHWM before {before} KiB, after {after} KiB, growth {} KiB",
        sum.uncompressed_size,
        after - before
    );
    assert!(sum.uncompressed_size > 1 << 30);
    // What the pipeline holds by design: per gzip thread two 1 MiB blocks in flight, each an
    // input and an output buffer; plus the block being filled, the hashing queue, the tar
    // buffer and the compressors' state (16 MiB on 2 cores).
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()) as u64;
    let bound_kib = 8 * 1024 + threads * 4 * 1024;
    assert!(
        after - before < bound_kib,
        "peak RSS grew by {} KiB (bound {bound_kib} KiB)",
        after - before
    );
}
