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
fn prescan() {
    fuzz("prescan");
}

#[test]
fn segment_request() {
    fuzz("segment_request");
}

#[test]
fn study() {
    fuzz("study");
}

#[test]
fn dicom_association() {
    fuzz("dicom_association");
}

#[test]
fn dimse_command() {
    fuzz("dimse_command");
}

#[test]
fn dicom_association_seeds_do_what_they_say() {
    // The seeds of `dicom_association` (fuzz/make_corpus.py) must reach the node's deep states
    // (instances filed, refusals answered, releases and aborts), or mutating them explores little.
    use brainai::fuzzing::run_associations;
    use brainai::node::scp::End;
    let dir = repo().join("fuzz/corpus/dicom_association");
    // (seed, released, echoes, stored, refused) for each association.
    type Association = (bool, u64, usize, u64);
    let expected: &[(&str, &[Association])] = &[
        ("echo-release", &[(true, 1, 0, 0)]),
        ("echo-split-release", &[(true, 2, 0, 0)]),
        ("echo-on-storage-context", &[(true, 0, 0, 0)]),
        ("response-to-the-node", &[(false, 0, 0, 0)]),
        ("find-release", &[(true, 0, 0, 0)]),
        ("store-release", &[(true, 0, 1, 0)]),
        ("store-one-pdu-release", &[(true, 0, 1, 0)]),
        ("store-two-echo-release", &[(true, 1, 2, 0)]),
        ("store-two-studies-release", &[(true, 0, 2, 0)]),
        ("store-explicit-release", &[(true, 0, 1, 0)]),
        ("store-explicit-context1-release", &[(true, 0, 1, 0)]),
        ("store-deflated-release", &[(true, 0, 1, 0)]),
        ("store-padded-uids", &[(true, 0, 1, 0)]),
        ("store-again-release", &[(true, 0, 2, 0)]),
        ("store-abort", &[(false, 0, 1, 0)]),
        ("store-again-abort", &[(false, 0, 2, 0)]),
        ("store-cut", &[(false, 0, 0, 0)]),
        ("store-release-mid-data-set", &[(false, 0, 0, 0)]),
        ("two-associations", &[(true, 0, 1, 0), (false, 0, 2, 0)]),
        ("store-draining", &[(true, 0, 0, 1)]),
        ("store-spool-full", &[(true, 0, 0, 2)]),
        ("store-rejected-context", &[(false, 0, 0, 0)]),
        ("store-verification-context", &[(true, 0, 0, 1)]),
        ("store-instance-mismatch", &[(true, 0, 0, 1)]),
        ("store-data-on-other-context", &[(false, 0, 0, 0)]),
        ("associate-rq-mid-association", &[(false, 0, 0, 0)]),
    ];
    for (seed, associations) in expected {
        let input = std::fs::read(dir.join(format!("seed-{seed}"))).unwrap();
        let outcomes: Vec<(bool, u64, usize, u64)> = run_associations(&input)
            .into_iter()
            .map(|(end, t)| (end == End::Released, t.echoes, t.stored.len(), t.refused))
            .collect();
        assert_eq!(&outcomes, associations, "seed-{seed}");
    }
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
            "upload",
            "prescan",
            "segment_request",
            "study",
            "dicom_association",
            "dimse_command"
        ]
    );
}

/// Protobuf wire-format writer for the generated pre-scan inputs.
fn varint(out: &mut Vec<u8>, mut n: u64) {
    loop {
        let byte = (n & 0x7F) as u8;
        n >>= 7;
        out.push(byte | if n == 0 { 0 } else { 0x80 });
        if n == 0 {
            return;
        }
    }
}

fn bytes_field(out: &mut Vec<u8>, number: u64, value: &[u8]) {
    varint(out, number << 3 | 2);
    varint(out, value.len() as u64);
    out.extend_from_slice(value);
}

/// A field nobody declared, of a random wire type: varint, fixed64, bytes, fixed32, or a group
/// (start and end, with fields and maybe a nested group inside), which prost skips.
fn unknown_field(rng: &mut Rng, out: &mut Vec<u8>, depth: usize) {
    let number = 20 + rng.below(20) as u64;
    match rng.below(if depth < 3 { 5 } else { 4 }) {
        0 => {
            varint(out, number << 3);
            varint(out, rng.next() >> rng.below(64));
        }
        1 => {
            varint(out, number << 3 | 1);
            out.extend_from_slice(&rng.next().to_le_bytes());
        }
        2 => bytes_field(out, number, &vec![0xAB; rng.below(5)]),
        3 => {
            varint(out, number << 3 | 5);
            out.extend_from_slice(&(rng.next() as u32).to_le_bytes());
        }
        _ => {
            varint(out, number << 3 | 3);
            for _ in 0..rng.below(3) {
                unknown_field(rng, out, depth + 1);
            }
            varint(out, number << 3 | 4);
        }
    }
}

/// `n` elements of a repeated field made by `element`, with unknown fields between them.
fn repeated(
    rng: &mut Rng,
    out: &mut Vec<u8>,
    n: usize,
    mut element: impl FnMut(&mut Rng, &mut Vec<u8>),
) {
    for _ in 0..n {
        if rng.below(3) == 0 {
            unknown_field(rng, out, 0);
        }
        element(rng, out);
    }
    if rng.below(2) == 0 {
        unknown_field(rng, out, 0);
    }
}

/// A `Classify`/`ClassifySeries` message around the target's limit of 3 images.
fn generated_images(rng: &mut Rng) -> Vec<u8> {
    let mut out = Vec::new();
    let n = rng.below(7);
    repeated(rng, &mut out, n, |rng, out| {
        let mut image = Vec::new();
        bytes_field(&mut image, 1, b"id");
        if rng.below(2) == 0 {
            unknown_field(rng, &mut image, 0);
        }
        bytes_field(out, 1, &image);
    });
    out
}

/// A `ModelInfer` message around its limits: shapes packed or not, contents split over several
/// occurrences (which prost merges), parameters, outputs.
fn generated_infer(rng: &mut Rng) -> Vec<u8> {
    let mut out = Vec::new();
    let n = 1 + rng.below(2);
    repeated(rng, &mut out, n, |rng, out| {
        let mut input = Vec::new();
        bytes_field(&mut input, 2, b"BYTES");
        let dims = 6 + rng.below(5);
        if rng.below(2) == 0 {
            let mut shape = Vec::new();
            for _ in 0..dims {
                varint(&mut shape, 1);
            }
            bytes_field(&mut input, 3, &shape);
        } else {
            repeated(rng, &mut input, dims, |_, input| {
                varint(input, 3 << 3);
                varint(input, 1);
            });
        }
        for _ in 0..rng.below(3) {
            let mut contents = Vec::new();
            let n = rng.below(4);
            repeated(rng, &mut contents, n, |_, c| bytes_field(c, 8, b"x"));
            bytes_field(&mut input, 5, &contents);
        }
        bytes_field(out, 5, &input);
    });
    for _ in 0..rng.below(3) {
        let mut entry = Vec::new();
        bytes_field(&mut entry, 1, b"k");
        bytes_field(&mut out, 4, &entry);
    }
    out
}

#[test]
fn prescan_agrees_with_prost_on_generated_messages() {
    // The differential target (`fuzzing::prescan`) on well-formed messages built to sit around
    // its limits, with unknown fields of every wire type (groups included) between the elements
    // and contents split over several occurrences: the inputs where a scan that reads the wire
    // format differently from prost would count differently. The target panics on a difference.
    let target = TARGETS.iter().find(|(n, _)| *n == "prescan").unwrap().1;
    let mut rng = Rng(0x05EE_D0F9_E5CA_1100);
    for case in 0..600 {
        let method = (case % 3) as u8;
        let message = if method == 2 {
            generated_infer(&mut rng)
        } else {
            generated_images(&mut rng)
        };
        let mut input = vec![method, rng.next() as u8];
        input.extend_from_slice(&message);
        run(
            "prescan",
            target,
            &input,
            &format!("generated message {case}"),
        );
    }
}
