//! Batch buffers: images are preprocessed straight into a row ("slot") of a buffer that holds a
//! whole batch in the model's layout, so a batch whose images sit in consecutive rows of one buffer
//! runs from that memory as it is, with no copy and no allocation. Buffers are pooled per model
//! version and reused once every slot of theirs is gone; once warm, serving allocates no
//! tensor-sized memory. A batch whose rows are scattered (images that finished preprocessing out
//! of order, a batch straddling two buffers, priorities mixed) is gathered into the instance's own
//! scratch buffer, allocated once.
//!
//! Each priority fills its own buffer, because the queue takes the highest priority first.

use std::sync::{Arc, Mutex};

use crate::backend::host::{HostBuffer, HostMemory};
use crate::metrics::ModelMetrics;
use crate::priority::Priority;

/// The rows of one batch buffer.
struct Buffer {
    /// `rows × row_len` values (page-locked on CUDA). Only ever accessed through its pointer,
    /// row by row (see [`Slot`]): rows are handed out once per use of the buffer (the pool takes a
    /// buffer back only when no slot of it is left: `Arc::get_mut`), so a row is written by one
    /// `Slot` at a time, and read only through shared references to the slots that own it.
    storage: HostBuffer,
    row_len: usize,
    /// Which filling this is (pool-wide, increasing): orders slots across buffers by claim.
    seq: u64,
}

impl Buffer {
    fn new(rows: usize, row_len: usize, memory: HostMemory) -> Self {
        Buffer {
            storage: HostBuffer::new(rows * row_len, memory),
            row_len,
            seq: 0,
        }
    }

    fn rows(&self) -> usize {
        self.storage.len() / self.row_len.max(1)
    }

    /// Row `row`'s first value; `storage` never moves, so the pointer is the same for every slot.
    fn row_ptr(&self, row: usize) -> *mut f32 {
        // SAFETY: `row` is below `rows()` (slots are handed out only for existing rows).
        unsafe { self.storage.as_ptr().add(row * self.row_len) }
    }
}

/// The exclusive right to one row of a batch buffer: one image's tensor, in the model's layout.
pub struct Slot {
    buffer: Arc<Buffer>,
    row: usize,
}

impl Slot {
    /// The row, to write the image's tensor into.
    pub fn as_mut_slice(&mut self) -> &mut [f32] {
        let len = self.buffer.row_len;
        // SAFETY: this slot is the only owner of row `row` (see `Buffer`), and `&mut self`
        // guarantees no other reference to it through this slot.
        unsafe { std::slice::from_raw_parts_mut(self.buffer.row_ptr(self.row), len) }
    }

    /// The row's values.
    pub fn as_slice(&self) -> &[f32] {
        let len = self.buffer.row_len;
        // SAFETY: as above; shared access through `&self`.
        unsafe { std::slice::from_raw_parts(self.buffer.row_ptr(self.row), len) }
    }

    /// Whether both are rows of the same buffer.
    pub fn same_buffer(&self, other: &Slot) -> bool {
        Arc::ptr_eq(&self.buffer, &other.buffer)
    }

    fn buffer_id(&self) -> *const Buffer {
        Arc::as_ptr(&self.buffer)
    }

    /// Sort key: the order slots were claimed in (per priority), which puts the slots of one
    /// buffer together, by row.
    pub fn order(&self) -> (u64, usize) {
        (self.buffer.seq, self.row)
    }
}

impl std::fmt::Debug for Slot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Slot")
            .field("buffer", &self.buffer_id())
            .field("row", &self.row)
            .finish()
    }
}

/// The batch's tensor as one slice of a buffer, when the slots (sorted by [`Slot::order`]) are
/// consecutive rows of one buffer; `None` when they must be gathered.
pub(super) fn in_place<'a>(sorted: impl Iterator<Item = &'a Slot> + Clone) -> Option<&'a [f32]> {
    let first = sorted.clone().next()?;
    let mut n = 0;
    for (i, s) in sorted.enumerate() {
        if !Arc::ptr_eq(&s.buffer, &first.buffer) || s.row != first.row + i {
            return None;
        }
        n += 1;
    }
    let len = first.buffer.row_len;
    // SAFETY: rows `first.row .. first.row + n` are owned by the slots borrowed for `'a`, and
    // none of them can be written while those shared borrows last.
    Some(unsafe { std::slice::from_raw_parts(first.buffer.row_ptr(first.row), n * len) })
}

struct PoolState {
    /// Every buffer the pool knows; a buffer is free when the pool holds its only reference.
    buffers: Vec<Arc<Buffer>>,
    /// Per priority: the buffer being filled, and its next free row.
    filling: [Option<(Arc<Buffer>, usize)>; 2],
    /// Sequence number of the next buffer to be filled.
    next_seq: u64,
}

/// The batch buffers of one model version.
pub(crate) struct BufferPool {
    rows: usize,
    row_len: usize,
    /// Free buffers beyond this many are released (memory goes back after a burst).
    keep: usize,
    /// Page-locked (CUDA) or ordinary memory.
    memory: HostMemory,
    state: Mutex<PoolState>,
    metrics: crate::metrics::ModelMetrics,
}

impl BufferPool {
    pub fn new(
        rows: usize,
        row_len: usize,
        keep: usize,
        memory: HostMemory,
        metrics: crate::metrics::ModelMetrics,
    ) -> Self {
        BufferPool {
            rows: rows.max(1),
            row_len,
            keep: keep.max(1),
            memory,
            state: Mutex::new(PoolState {
                buffers: Vec::new(),
                filling: [None, None],
                next_seq: 0,
            }),
            metrics,
        }
    }

    /// The next free row of `priority`'s buffer; a free buffer is taken (or one allocated) when it
    /// is full.
    pub fn claim(&self, priority: Priority) -> Slot {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let i = priority.index();
        if let Some((buffer, next)) = &mut state.filling[i]
            && *next < buffer.rows()
        {
            let slot = Slot {
                buffer: buffer.clone(),
                row: *next,
            };
            *next += 1;
            return slot;
        }
        state.filling[i] = None;
        let buffer = self.free_buffer(&mut state);
        state.filling[i] = Some((buffer.clone(), 1));
        Slot { buffer, row: 0 }
    }

    /// Stops filling `priority`'s buffer if `slot` is the last row claimed from it: the next
    /// claim starts a fresh buffer at row 0.
    pub fn seal_if_last(&self, priority: Priority, slot: &Slot) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let filling = &mut state.filling[priority.index()];
        if let Some((buffer, next)) = filling
            && Arc::ptr_eq(buffer, &slot.buffer)
            && *next == slot.row + 1
        {
            *filling = None;
        }
    }

    /// A buffer nobody else holds, reused if there is one; releases free buffers over `keep`.
    fn free_buffer(&self, state: &mut PoolState) -> Arc<Buffer> {
        let seq = state.next_seq;
        state.next_seq += 1;
        let mut found = None;
        let mut free = 0;
        state.buffers.retain_mut(|b| {
            // `get_mut` succeeds only for the pool's own, last reference (and synchronises with
            // the drop of every other one, so the last reader's reads happen before our writes).
            let Some(buffer) = Arc::get_mut(b) else {
                return true;
            };
            if found.is_none() {
                buffer.seq = seq;
                found = Some(b.clone());
                return true;
            }
            free += 1;
            free <= self.keep
        });
        let buffer = found.unwrap_or_else(|| {
            let mut buffer = Buffer::new(self.rows, self.row_len, self.memory);
            buffer.seq = seq;
            let buffer = Arc::new(buffer);
            state.buffers.push(buffer.clone());
            self.metrics.buffer_allocated();
            buffer
        });
        self.metrics
            .buffers_pooled(state.buffers.len(), self.rows * self.row_len * 4);
        buffer
    }

    /// Buffers the pool holds now (free or in use).
    #[cfg(test)]
    pub fn buffers(&self) -> usize {
        self.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .buffers
            .len()
    }
}

/// The batches' output buffers of one model version: a batch's output is written into a buffer
/// taken from here ([`crate::backend::Backend::run_into`]) and shared by the batch's images
/// ([`super::OutputRows`]); when the last of them is done with it, it comes back. Each holds a
/// full batch (`max_batch × output_len`), so it never grows once made; at most `keep` wait here.
/// Once warm, a segmentation model (a megabyte of output per slice) allocates no output memory.
pub(crate) struct OutputPool {
    free: Mutex<Vec<Vec<f32>>>,
    capacity: usize,
    keep: usize,
    metrics: ModelMetrics,
}

impl OutputPool {
    pub(crate) fn new(
        max_batch: usize,
        output_len: usize,
        keep: usize,
        metrics: ModelMetrics,
    ) -> Arc<Self> {
        Arc::new(OutputPool {
            free: Mutex::new(Vec::new()),
            capacity: max_batch * output_len,
            keep,
            metrics,
        })
    }

    /// A buffer for one batch's output: a pooled one, or a new one while none is free.
    pub(crate) fn take(self: &Arc<Self>) -> PooledOutput {
        let data = self
            .free
            .lock()
            .expect("the output pool's lock is never poisoned")
            .pop()
            .unwrap_or_else(|| {
                self.metrics.output_buffer_allocated();
                Vec::with_capacity(self.capacity)
            });
        PooledOutput {
            data,
            pool: self.clone(),
        }
    }
}

/// One batch's output values, back to their [`OutputPool`] when dropped.
pub(crate) struct PooledOutput {
    pub(crate) data: Vec<f32>,
    pool: Arc<OutputPool>,
}

impl Drop for PooledOutput {
    fn drop(&mut self) {
        let data = std::mem::take(&mut self.data);
        // A buffer a backend replaced or grew (more values than a full batch: the batcher refuses
        // them) is not the pool's size: dropped rather than kept.
        if data.capacity() != self.pool.capacity {
            return;
        }
        let mut free = self
            .pool
            .free
            .lock()
            .expect("the output pool's lock is never poisoned");
        if free.len() < self.pool.keep {
            free.push(data);
        }
    }
}

impl std::fmt::Debug for PooledOutput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PooledOutput")
            .field("len", &self.data.len())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(rows: usize, row_len: usize) -> BufferPool {
        BufferPool::new(
            rows,
            row_len,
            2,
            HostMemory::Pageable,
            crate::metrics::ModelMetrics::new("test", "1"),
        )
    }

    fn filled(pool: &BufferPool, priority: Priority, value: f32) -> Slot {
        let mut slot = pool.claim(priority);
        slot.as_mut_slice().fill(value);
        slot
    }

    #[test]
    fn consecutive_rows_of_one_buffer_run_in_place() {
        let pool = pool(4, 3);
        let slots: Vec<Slot> = (0..4)
            .map(|v| filled(&pool, Priority::Routine, v as f32))
            .collect();
        // Submitted out of order: sorted back into rows 1, 2, 3.
        let mut batch: Vec<&Slot> = vec![&slots[3], &slots[1], &slots[2]];
        assert!(in_place(batch.iter().copied()).is_none(), "unsorted");
        batch.sort_by_key(|s| s.order());
        let tensor = in_place(batch.iter().copied()).expect("rows 1..4 are consecutive");
        assert_eq!(tensor, [1., 1., 1., 2., 2., 2., 3., 3., 3.]);
    }

    #[test]
    fn scattered_rows_and_two_buffers_are_not_in_place() {
        let pool = pool(2, 1);
        let slots: Vec<Slot> = (0..4)
            .map(|v| filled(&pool, Priority::Routine, v as f32))
            .collect();
        assert_eq!(pool.buffers(), 2);
        let mut gap: Vec<&Slot> = vec![&slots[0], &slots[2]];
        gap.sort_by_key(|s| s.order());
        assert!(in_place(gap.iter().copied()).is_none());
        let mut straddling: Vec<&Slot> = vec![&slots[1], &slots[2]];
        straddling.sort_by_key(|s| s.order());
        assert!(in_place(straddling.iter().copied()).is_none());
        let mut whole: Vec<&Slot> = vec![&slots[3], &slots[2]];
        whole.sort_by_key(|s| s.order());
        assert_eq!(in_place(whole.iter().copied()), Some(&[2.0, 3.0][..]));
    }

    #[test]
    fn slots_sort_in_claim_order_across_buffers() {
        let pool = pool(2, 1);
        let slots: Vec<Slot> = (0..5)
            .map(|v| filled(&pool, Priority::Routine, v as f32))
            .collect();
        let mut batch: Vec<&Slot> = slots.iter().rev().collect();
        batch.sort_by_key(|s| s.order());
        let values: Vec<f32> = batch.iter().map(|s| s.as_slice()[0]).collect();
        assert_eq!(values, [0.0, 1.0, 2.0, 3.0, 4.0]);
    }

    #[test]
    fn sealing_after_the_last_claimed_row_starts_the_next_claim_at_row_0() {
        let pool = pool(8, 1);
        let a = filled(&pool, Priority::Routine, 1.0);
        let b = filled(&pool, Priority::Routine, 2.0);
        // Not the last row: nothing happens.
        pool.seal_if_last(Priority::Routine, &a);
        let c = filled(&pool, Priority::Routine, 3.0);
        assert_eq!((c.buffer_id(), c.row), (a.buffer_id(), 2));
        // The other priority's buffer is left alone.
        pool.seal_if_last(Priority::Stat, &c);
        pool.seal_if_last(Priority::Routine, &c);
        let d = filled(&pool, Priority::Routine, 4.0);
        assert_ne!(d.buffer_id(), a.buffer_id());
        assert_eq!(d.row, 0);
        assert!(d.order() > c.order(), "claim order holds across the seal");
        drop(b);
    }

    #[test]
    fn priorities_fill_their_own_buffers() {
        let pool = pool(4, 1);
        let routine = filled(&pool, Priority::Routine, 1.0);
        let stat = filled(&pool, Priority::Stat, 2.0);
        assert_ne!(routine.buffer_id(), stat.buffer_id());
        assert_eq!((routine.row, stat.row), (0, 0));
    }

    #[test]
    fn buffers_are_reused_once_every_slot_is_gone() {
        let pool = pool(2, 8);
        for round in 0..10 {
            let a = filled(&pool, Priority::Routine, round as f32);
            let b = filled(&pool, Priority::Routine, round as f32);
            assert_eq!(a.as_slice(), b.as_slice());
            // A third image needs a second buffer while the first is still held.
            let c = filled(&pool, Priority::Routine, -1.0);
            assert_eq!(a.as_slice(), [round as f32; 8], "not overwritten by c");
            drop((a, b, c));
        }
        // Two buffers served every round; nothing was allocated after the first.
        assert_eq!(pool.buffers(), 2);
    }

    #[test]
    fn a_buffer_still_read_is_not_handed_out_again() {
        let pool = pool(1, 4);
        let held = filled(&pool, Priority::Routine, 7.0);
        let other = filled(&pool, Priority::Routine, 9.0);
        assert_ne!(held.buffer_id(), other.buffer_id());
        assert_eq!(held.as_slice(), [7.0; 4]);
    }

    #[test]
    fn free_buffers_over_the_limit_are_released() {
        let pool = pool(1, 4);
        let slots: Vec<Slot> = (0..6).map(|_| pool.claim(Priority::Routine)).collect();
        assert_eq!(pool.buffers(), 6);
        drop(slots);
        let _one = pool.claim(Priority::Routine);
        // One in use, `keep` = 2 free kept.
        assert_eq!(pool.buffers(), 3);
    }
}
