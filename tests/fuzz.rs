//! The short fuzzing run of `make test`, on the stable toolchain: every target of
//! `brainai::fuzzing` replays its committed corpus (`fuzz/corpus/<target>/`) and every past crash
//! (`fuzz/regressions/<target>/`), then runs a fixed number of deterministic mutations of the
//! corpus (byte flips, interesting values, inserts, deletes, splices, PNG checksums repaired so
//! mutations get past the CRC check). A panic fails the test and saves the input under
//! `target/fuzz-failures/`. The long, coverage-guided run is `make fuzz` (AFL++; docs/FUZZING.md).

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;
use std::time::{Duration, Instant};

use brainai::fuzzing::TARGETS;

mod common;
use common::{crc32, repo};

/// Mutations per target (fewer for the decoding targets, whose runs cost milliseconds).
const MUTATIONS: usize = 200_000;
const IMAGE_MUTATIONS: usize = 40_000;
const DICOM_MUTATIONS: usize = 10_000;
/// Upper bound on one target's mutation phase, whatever the machine's speed.
const BUDGET: Duration = Duration::from_secs(60);

fn files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out: Vec<(String, Vec<u8>)> = entries
        .filter_map(Result::ok)
        .filter(|e| e.path().is_file())
        .map(|e| {
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect();
    out.sort();
    out
}

/// xorshift64*: deterministic, seeded per target.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

const INTERESTING: [u8; 8] = [0x00, 0x01, 0x7F, 0x80, 0xFF, 0xFE, 0x10, 0x40];

fn mutate(rng: &mut Rng, input: &[u8], corpus: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut out = input.to_vec();
    for _ in 0..1 + rng.below(4) {
        let len = out.len();
        match rng.below(7) {
            0 if len > 0 => {
                let i = rng.below(len);
                out[i] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let i = rng.below(len);
                out[i] = INTERESTING[rng.below(INTERESTING.len())];
            }
            2 => {
                let at = rng.below(len + 1);
                let n = 1 + rng.below(16);
                let bytes: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
                out.splice(at..at, bytes);
            }
            3 if len > 1 => {
                let at = rng.below(len);
                let n = 1 + rng.below((len - at).min(64));
                out.drain(at..at + n);
            }
            4 if !corpus.is_empty() => {
                let other = &corpus[rng.below(corpus.len())].1;
                let cut = rng.below(len + 1);
                let from = rng.below(other.len() + 1);
                out.truncate(cut);
                out.extend_from_slice(&other[from..]);
            }
            5 if len > 8 => {
                // Overwrite 2 or 4 bytes with a big or small number (sizes, lengths, dimensions).
                let at = rng.below(len - 4);
                let value: u32 = [0, 1, 0xFFFF, 0xFFFF_FFFF, 0x7FFF_FFFF, 65536][rng.below(6)];
                let bytes = value.to_be_bytes();
                let n = if rng.below(2) == 0 { 2 } else { 4 };
                out[at..at + n].copy_from_slice(&bytes[4 - n..]);
            }
            _ => {
                let at = rng.below(len + 1);
                out.truncate(at);
            }
        }
    }
    if rng.below(2) == 0 {
        fix_png_crcs(&mut out);
    }
    out
}

/// Recomputes the CRC of every PNG chunk found after the signature (wherever it starts), so a
/// mutated PNG is not simply refused for its checksum.
fn fix_png_crcs(data: &mut [u8]) {
    let Some(start) = data
        .windows(8)
        .position(|w| w == b"\x89PNG\r\n\x1a\n")
        .map(|p| p + 8)
    else {
        return;
    };
    let mut at = start;
    while at + 12 <= data.len() {
        let len = u32::from_be_bytes(data[at..at + 4].try_into().unwrap()) as usize;
        let Some(end) = at.checked_add(8 + len) else {
            return;
        };
        if end + 4 > data.len() {
            return;
        }
        let crc = crc32(&data[at + 4..end]);
        data[end..end + 4].copy_from_slice(&crc.to_be_bytes());
        at = end + 4;
    }
}

/// Runs `target` on `input`; a panic saves the input and fails the test.
fn run(name: &str, target: fn(&[u8]), input: &[u8], origin: &str) {
    if catch_unwind(AssertUnwindSafe(|| target(input))).is_err() {
        let dir = repo().join("target/fuzz-failures");
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(format!(
            "{name}-{:016x}",
            crc32(input) as u64 ^ input.len() as u64
        ));
        std::fs::write(&path, input).unwrap();
        panic!(
            "fuzz target {name} panicked on {origin}; input saved to {} (add it to fuzz/regressions/{name}/)",
            path.display()
        );
    }
}

fn fuzz(name: &str) {
    let target = TARGETS
        .iter()
        .find(|(n, _)| *n == name)
        .expect("a known target")
        .1;
    let corpus = files(&repo().join("fuzz/corpus").join(name));
    assert!(
        !corpus.is_empty(),
        "fuzz/corpus/{name}/ is empty: run fuzz/make_corpus.py"
    );
    for (file, input) in &corpus {
        run(name, target, input, &format!("corpus file {file}"));
    }
    for (file, input) in files(&repo().join("fuzz/regressions").join(name)) {
        run(name, target, &input, &format!("regression {file}"));
    }
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ crc32(name.as_bytes()) as u64);
    let count = if name == "image" {
        IMAGE_MUTATIONS
    } else if name == "dicom" {
        DICOM_MUTATIONS
    } else {
        MUTATIONS
    };
    let started = Instant::now();
    let mut done = 0;
    while done < count && started.elapsed() < BUDGET {
        let seed = &corpus[rng.below(corpus.len())].1;
        let input = mutate(&mut rng, seed, &corpus);
        run(name, target, &input, &format!("mutation {done}"));
        done += 1;
    }
    eprintln!(
        "{name}: {} corpus files, {done} mutations in {:.1} s",
        corpus.len(),
        started.elapsed().as_secs_f64()
    );
}

#[test]
fn image() {
    fuzz("image");
}

#[test]
fn dicom() {
    fuzz("dicom");
}

#[test]
fn model_toml() {
    fuzz("model_toml");
}

#[test]
fn classify_request() {
    fuzz("classify_request");
}

#[test]
fn stream_request() {
    fuzz("stream_request");
}

#[test]
fn grpc_timeout() {
    fuzz("grpc_timeout");
}

#[test]
fn oip_grpc_request() {
    fuzz("oip_grpc_request");
}

#[test]
fn oip_http_request() {
    fuzz("oip_http_request");
}

#[test]
fn upload() {
    fuzz("upload");
}

#[test]
fn every_target_has_a_test_here() {
    let names: Vec<&str> = TARGETS.iter().map(|(n, _)| *n).collect();
    assert_eq!(
        names,
        [
            "image",
            "dicom",
            "model_toml",
            "classify_request",
            "stream_request",
            "grpc_timeout",
            "oip_grpc_request",
            "oip_http_request",
            "upload"
        ]
    );
}
