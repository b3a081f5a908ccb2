//! Allocations, counted by a wrapping global allocator in this test binary (its own process).
//!
//! Once warm, serving allocates no tensor-sized memory: images are preprocessed into rows of pooled
//! batch buffers, and batches run from those rows. The first test counts every allocation whose
//! size is a whole number of the model's input tensors (what a `Vec<f32>` per image, or a batch
//! concatenated from them, would allocate) while single-image gRPC calls from 8 concurrent clients
//! are served by the real tiny ONNX model.
//!
//! Hostile DICOM files are refused before dicom-rs allocates what they declare: the second test
//! records the largest allocation made while each file of `fuzz/regressions/dicom/prescan-*` is
//! decoded.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use common::*;

/// Bytes of one input tensor of the tiny model: 3 × 32 × 32 f32.
const TENSOR_BYTES: usize = 3 * 32 * 32 * 4;

static COUNTING: AtomicBool = AtomicBool::new(false);
static TENSOR_SIZED: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    /// Whether this thread records its largest allocation, and that allocation's size.
    static TRACKING: Cell<bool> = const { Cell::new(false) };
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

struct Counting;

// SAFETY: delegates every call to the system allocator unchanged; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

fn note(size: usize) {
    // `try_with`: allocations during a thread's teardown find no thread-locals.
    if TRACKING.try_with(Cell::get).unwrap_or(false) {
        let _ = LARGEST.try_with(|l| l.set(l.get().max(size)));
    }
    if size >= TENSOR_BYTES && size.is_multiple_of(TENSOR_BYTES) && COUNTING.load(Ordering::Relaxed)
    {
        TENSOR_SIZED.fetch_add(1, Ordering::Relaxed);
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// `clients` concurrent clients each make `calls` single-image calls (32×32 raw pixels: no
/// resize, so no intermediate image near a tensor's size).
async fn load(t: &TestServer, clients: usize, calls: usize) {
    let mut tasks = Vec::new();
    for c in 0..clients {
        let mut client = t.client.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..calls {
                let value = ((c * calls + i) % 200) as u8;
                client
                    .classify(request(vec![flat_image("x", 32, 32, 3, value)]))
                    .await
                    .expect("classified");
            }
        }));
    }
    for task in tasks {
        bounded("the load's calls", task).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serving_allocates_no_tensor_sized_memory_once_warm() {
    let t = serve(
        args(
            &fixture_model("tiny"),
            &["--max-queue-delay-us", "500", "--max-batch-size", "8"],
        ),
        None,
    )
    .await;
    // Warm: the buffer pool grows to what this load keeps in flight.
    load(&t, 8, 40).await;
    COUNTING.store(true, Ordering::SeqCst);
    load(&t, 8, 50).await;
    COUNTING.store(false, Ordering::SeqCst);
    let images = 8 * 50;
    let counted = TENSOR_SIZED.load(Ordering::SeqCst);
    let (_, text) = http_get(t.metrics_addr(), "/metrics").await;
    let batches = metric_value(&text, "brainai_batch_assembly_total", &[]);
    let in_place = metric_value(
        &text,
        "brainai_batch_assembly_total",
        &["path=\"in_place\""],
    );
    println!(
        "{counted} tensor-sized allocations over {images} images; {in_place} of {batches} \
         batches ran in place"
    );
    // A tensor per image (the old path) would be 400 at least, plus one per batch. What is
    // allowed: the pool growing by a buffer or two, or an unrelated allocation that happens to be
    // a multiple of 12 KiB.
    assert!(
        counted < images / 20,
        "{counted} tensor-sized allocations while serving {images} images"
    );
    assert!(batches > 0.0 && in_place > 0.0, "assembly metrics exported");
}

/// What `f` returns and the largest single allocation it made on this thread.
fn largest_allocation<T>(f: impl FnOnce() -> T) -> (T, usize) {
    LARGEST.with(|l| l.set(0));
    TRACKING.with(|t| t.set(true));
    let out = f();
    TRACKING.with(|t| t.set(false));
    (out, LARGEST.with(Cell::get))
}

/// Each file of `fuzz/regressions/dicom/prescan-*` (written by `fuzz/make_prescan_regressions.py`)
/// and the length its refusal must name: one dicom-rs would have tried to allocate.
const PRESCAN_REGRESSIONS: &[(&str, &str)] = &[
    (
        "prescan-unknown-vr",
        "element (0010,0010) declares 1852796481 bytes",
    ),
    (
        "prescan-unknown-vr-big-endian",
        "element (0010,0010) declares 1097756526 bytes",
    ),
    (
        "prescan-unknown-vr-in-item",
        "element (0010,0010) declares 1852796481 bytes",
    ),
    (
        "prescan-unknown-vr-deflated",
        "element (0010,0010) declares 1852796481 bytes",
    ),
    (
        "prescan-unknown-vr-in-meta",
        "file meta element (0002,0010) declares 775040561 bytes",
    ),
    (
        "prescan-meta-group-length-short",
        "element (0002,0099) declares 1073763404 bytes",
    ),
    (
        "prescan-group-fffe-element",
        "element (FFFE,0001) declares 536890960 bytes",
    ),
    (
        "prescan-pixel-data-sequence",
        "element (0010,0010) declares 1879048192 bytes",
    ),
];

#[test]
fn hostile_dicom_lengths_are_refused_before_anything_large_is_allocated() {
    use brainai::input::dicom;
    use brainai::input::{Encoding, InputLimits};
    const LIMITS: InputLimits = InputLimits {
        max_image_bytes: 64 << 20,
        max_pixels: 1 << 26,
    };
    let dir = repo().join("fuzz/regressions/dicom");
    let mut listed: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("prescan-"))
        .collect();
    listed.sort();
    let mut expected: Vec<&str> = PRESCAN_REGRESSIONS.iter().map(|(f, _)| *f).collect();
    expected.sort();
    assert_eq!(
        listed, expected,
        "every prescan regression has its reason here"
    );
    for (file, reason) in PRESCAN_REGRESSIONS {
        let bytes = std::fs::read(dir.join(file)).unwrap();
        // Byte 0 is the fuzz target's selector; the file follows.
        let data = &bytes[1..];
        let (refused, largest) = largest_allocation(|| dicom::prescan(data, &LIMITS).map(|_| ()));
        let err = refused.expect_err(file).to_string();
        assert!(err.contains(reason), "{file}: {err}");
        assert!(
            largest < 1 << 20,
            "{file}: the pre-scan allocated {largest} bytes"
        );
        // Every entry point refuses it the same way, without a large allocation.
        let (decoded, largest) = largest_allocation(|| dicom::decode(data, &LIMITS).map(|_| ()));
        let err = decoded.expect_err(file).to_string();
        assert!(err.contains(reason), "{file}: decode: {err}");
        assert!(
            largest < 1 << 20,
            "{file}: decoding allocated {largest} bytes"
        );
        let (size, largest) =
            largest_allocation(|| brainai::input::decoded_size(data, Encoding::Detect, &LIMITS));
        assert!(size.is_err(), "{file}: {size:?}");
        assert!(
            largest < 1 << 20,
            "{file}: the size check allocated {largest} bytes"
        );
    }
}
