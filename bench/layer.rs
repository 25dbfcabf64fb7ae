//! Throughput of `write_layer`: 512 MiB (half text-like, half random) into a sink: gzip, zstd, plain.
//!
//! `cargo bench --bench layer -- DIR [RUNS]` writes DIR as the layer instead of the generated
//! fixture (e.g. the directory of `bench-cases/bigrun/gen.sh --data`) and prints one line per run
//! (`bench/run.sh` uses this to compare with sha256sum, gzip and pigz on the same bytes).

use std::fs;
use std::io::{self, Write};
use std::path::Path;
use std::time::Instant;

use kiln::snapshot::{Compression, LayerOptions, write_layer};

const MIB: usize = 1 << 20;
const FILE_SIZE: usize = 8 * MIB;

/// xorshift64*: fast, deterministic pseudo-random bytes.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

fn text_file(rng: &mut Rng) -> Vec<u8> {
    const WORDS: &[&str] = &[
        "the", "layer", "image", "build", "kiln", "overlay", "return", "fn", "let", "mut",
        "struct", "impl", "self", "error", "path", "file", "data", "0x1f", "digest", "{", "}", "(",
        ")", ";", "if", "else", "match", "config", "value", "string",
    ];
    let mut out = Vec::with_capacity(FILE_SIZE);
    while out.len() < FILE_SIZE {
        let r = rng.next();
        out.extend_from_slice(WORDS[(r % WORDS.len() as u64) as usize].as_bytes());
        out.push(if r >> 60 == 0 { b'\n' } else { b' ' });
    }
    out.truncate(FILE_SIZE);
    out
}

fn random_file(rng: &mut Rng) -> Vec<u8> {
    let mut out = Vec::with_capacity(FILE_SIZE);
    while out.len() < FILE_SIZE {
        out.extend_from_slice(&rng.next().to_le_bytes());
    }
    out
}

fn fixture(dir: &Path) -> io::Result<u64> {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let n = 256 * MIB / FILE_SIZE;
    fs::create_dir_all(dir.join("text"))?;
    fs::create_dir_all(dir.join("random"))?;
    for i in 0..n {
        fs::File::create(dir.join(format!("text/{i:03}")))?.write_all(&text_file(&mut rng))?;
        fs::File::create(dir.join(format!("random/{i:03}")))?.write_all(&random_file(&mut rng))?;
    }
    Ok((2 * n * FILE_SIZE) as u64)
}

/// Total size of the regular files under `dir`.
fn payload(dir: &Path) -> io::Result<u64> {
    let mut n = 0;
    for e in fs::read_dir(dir)? {
        let e = e?;
        let md = e.metadata()?;
        n += if md.is_dir() {
            payload(&e.path())?
        } else {
            md.len()
        };
    }
    Ok(n)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // `cargo bench` passes `--bench`; everything else is ours.
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let t = tempfile::tempdir()?;
    let (dir, total, runs) = match args.first() {
        Some(d) => {
            let dir = Path::new(d).to_path_buf();
            let total = payload(&dir)?;
            let runs = args.get(1).map_or(Ok(1), |r| r.parse())?;
            (dir, total, runs)
        }
        None => (t.path().to_path_buf(), fixture(t.path())?, 1),
    };
    for (name, compression) in [
        ("gzip", Compression::Gzip),
        ("zstd", Compression::Zstd),
        ("none", Compression::None),
    ] {
        let opts = LayerOptions {
            source_date_epoch: Some(0),
            compression,
        };
        // One warm-up pass so the page cache holds the files.
        write_layer(&dir, &opts, io::sink())?;
        for _ in 0..runs {
            let start = Instant::now();
            let (out, sum) = write_layer(&dir, &opts, Counter(0))?;
            let secs = start.elapsed().as_secs_f64();
            println!(
                "write_layer {name:>4}: {} MiB in {secs:.2} s = {:.0} MB/s, ratio {:.3} ({} entries, diff_id {})",
                total / MIB as u64,
                total as f64 / secs / 1e6,
                out.0 as f64 / sum.uncompressed_size as f64,
                sum.entries,
                sum.diff_id
            );
        }
    }
    Ok(())
}

/// A sink that counts what it is given.
struct Counter(u64);

impl Write for Counter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0 += buf.len() as u64;
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
