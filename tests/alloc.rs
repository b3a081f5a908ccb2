//! Once warm, serving allocates no tensor-sized memory: images are preprocessed into rows of pooled
//! batch buffers, and batches run from those rows. This test binary (its own process) counts, with
//! a wrapping global allocator, every allocation whose size is a whole number of the model's input
//! tensors (what a `Vec<f32>` per image, or a batch concatenated from them, would allocate) while
//! single-image gRPC calls from 8 concurrent clients are served by the real tiny ONNX model.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use common::*;

/// Bytes of one input tensor of the tiny model: 3 × 32 × 32 f32.
const TENSOR_BYTES: usize = 3 * 32 * 32 * 4;

static COUNTING: AtomicBool = AtomicBool::new(false);
static TENSOR_SIZED: AtomicUsize = AtomicUsize::new(0);

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
