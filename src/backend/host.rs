//! Host memory for batch tensors: page-aligned, fixed-size f32 buffers that are page-locked
//! ("pinned") with the CUDA runtime when the model runs on a GPU.
//!
//! A copy from pageable memory to the GPU goes through a driver staging buffer, one chunk at a
//! time; from page-locked memory it is one DMA transfer. ONNX Runtime sees these buffers as
//! ordinary CPU tensors: the CUDA driver recognises page-locked memory (`cudaHostAlloc`) by
//! address, so ONNX Runtime's own host→device copy takes the fast path with no change on its side.
//!
//! The CUDA runtime is not linked: it is looked up at run time (ONNX Runtime's CUDA execution
//! provider has already loaded it). Where it cannot be found, or allocation fails, buffers are
//! pageable and one warning says so.

use std::alloc::{Layout, alloc_zeroed, dealloc};
use std::ffi::{CStr, c_int, c_uint, c_void};
use std::ptr::NonNull;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};

const PAGE: usize = 4096;

/// Whether host buffers should be page-locked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HostMemory {
    /// Ordinary (pageable) memory: CPU inference, or pinning turned off.
    #[default]
    Pageable,
    /// Page-locked with the CUDA runtime, falling back to pageable where that fails.
    Pinned,
}

impl HostMemory {
    /// Page-locked on CUDA when `pinned` (`--pinned-buffers`), else pageable.
    pub fn for_device(device: super::Device, pinned: bool) -> Self {
        match device {
            super::Device::Cuda(_) if pinned => HostMemory::Pinned,
            _ => HostMemory::Pageable,
        }
    }
}

/// A zeroed, page-aligned `[f32]` of fixed length, page-locked if asked and possible.
pub struct HostBuffer {
    ptr: NonNull<f32>,
    len: usize,
    /// Bytes allocated (whole pages).
    bytes: usize,
    /// Allocated by `cudaHostAlloc` (freed by `cudaFreeHost`), else by the global allocator.
    pinned: bool,
}

// SAFETY: the buffer owns its allocation exclusively, like a `Box<[f32]>`.
unsafe impl Send for HostBuffer {}
unsafe impl Sync for HostBuffer {}

impl HostBuffer {
    /// `len` zeroed values.
    pub fn new(len: usize, memory: HostMemory) -> Self {
        let bytes = (len.max(1) * size_of::<f32>()).next_multiple_of(PAGE);
        if memory == HostMemory::Pinned
            && let Some(ptr) = cuda_host_alloc(bytes)
        {
            // SAFETY: `bytes` writable bytes at `ptr`, just allocated.
            unsafe { std::ptr::write_bytes(ptr.as_ptr().cast::<u8>(), 0, bytes) };
            metrics::gauge!(crate::metrics::PINNED_HOST_BYTES).increment(bytes as f64);
            return HostBuffer {
                ptr,
                len,
                bytes,
                pinned: true,
            };
        }
        let layout = Self::layout(bytes);
        // SAFETY: `layout` has a non-zero size.
        let raw = unsafe { alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(raw.cast::<f32>()) else {
            std::alloc::handle_alloc_error(layout)
        };
        HostBuffer {
            ptr,
            len,
            bytes,
            pinned: false,
        }
    }

    fn layout(bytes: usize) -> Layout {
        Layout::from_size_align(bytes, PAGE).expect("buffer size overflows")
    }

    /// Whether the CUDA runtime page-locked this buffer.
    pub fn is_pinned(&self) -> bool {
        self.pinned
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn as_ptr(&self) -> *mut f32 {
        self.ptr.as_ptr()
    }
}

impl std::ops::Deref for HostBuffer {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        // SAFETY: `len` initialised (zeroed) values, owned by `self`.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl std::ops::DerefMut for HostBuffer {
    fn deref_mut(&mut self) -> &mut [f32] {
        // SAFETY: as above, exclusively through `&mut self`.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for HostBuffer {
    fn drop(&mut self) {
        if self.pinned {
            cuda_free_host(self.ptr.as_ptr().cast());
            metrics::gauge!(crate::metrics::PINNED_HOST_BYTES).decrement(self.bytes as f64);
        } else {
            // SAFETY: allocated in `new` with this layout.
            unsafe { dealloc(self.ptr.as_ptr().cast(), Self::layout(self.bytes)) }
        }
    }
}

impl std::fmt::Debug for HostBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostBuffer")
            .field("len", &self.len)
            .field("pinned", &self.pinned)
            .finish()
    }
}

type HostAlloc = unsafe extern "C" fn(*mut *mut c_void, usize, c_uint) -> c_int;
type FreeHost = unsafe extern "C" fn(*mut c_void) -> c_int;
type GetErrorString = unsafe extern "C" fn(c_int) -> *const std::ffi::c_char;

struct CudaRuntime {
    alloc: HostAlloc,
    free: FreeHost,
    error_string: GetErrorString,
}

/// The CUDA runtime's sonames, newest first (ONNX Runtime 1.27+ is built on CUDA 13, 1.26 on 12).
const CUDART: [&CStr; 3] = [c"libcudart.so.13", c"libcudart.so.12", c"libcudart.so"];

fn cuda_runtime() -> Option<&'static CudaRuntime> {
    static RUNTIME: OnceLock<Option<CudaRuntime>> = OnceLock::new();
    RUNTIME
        .get_or_init(|| {
            let found = CUDART.iter().find_map(|name| {
                // SAFETY: dlopen/dlsym with NUL-terminated names; the handle is never closed, so
                // the symbols stay valid for the life of the process.
                unsafe {
                    let handle = libc::dlopen(name.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL);
                    if handle.is_null() {
                        return None;
                    }
                    let alloc = libc::dlsym(handle, c"cudaHostAlloc".as_ptr());
                    let free = libc::dlsym(handle, c"cudaFreeHost".as_ptr());
                    let error_string = libc::dlsym(handle, c"cudaGetErrorString".as_ptr());
                    if alloc.is_null() || free.is_null() || error_string.is_null() {
                        return None;
                    }
                    Some((
                        *name,
                        CudaRuntime {
                            alloc: std::mem::transmute::<*mut c_void, HostAlloc>(alloc),
                            free: std::mem::transmute::<*mut c_void, FreeHost>(free),
                            error_string: std::mem::transmute::<*mut c_void, GetErrorString>(
                                error_string,
                            ),
                        },
                    ))
                }
            });
            match found {
                Some((name, runtime)) => {
                    tracing::info!(library = ?name, "page-locking batch buffers with the CUDA runtime");
                    Some(runtime)
                }
                None => {
                    tracing::warn!(
                        "pinned batch buffers asked for, but no CUDA runtime (libcudart.so.13/.12) could be \
                         loaded: batch buffers stay pageable (host-to-GPU copies are slower)"
                    );
                    None
                }
            }
        })
        .as_ref()
}

/// `bytes` of page-locked memory (`cudaHostAllocPortable`: pinned for every CUDA context); `None`
/// (with one warning per process) where there is none.
fn cuda_host_alloc(bytes: usize) -> Option<NonNull<f32>> {
    static WARNED: AtomicBool = AtomicBool::new(false);
    let cuda = cuda_runtime()?;
    let mut ptr = std::ptr::null_mut();
    // SAFETY: `ptr` is a valid out-pointer; flags 1 = cudaHostAllocPortable.
    let code = unsafe { (cuda.alloc)(&mut ptr, bytes, 1) };
    if code == 0 {
        // cudaHostAlloc returns page-aligned memory.
        return NonNull::new(ptr.cast());
    }
    if !WARNED.swap(true, Ordering::Relaxed) {
        // SAFETY: cudaGetErrorString returns a static NUL-terminated string for any code.
        let message = unsafe { CStr::from_ptr((cuda.error_string)(code)) };
        tracing::warn!(
            code,
            error = %message.to_string_lossy(),
            bytes,
            "cudaHostAlloc failed: batch buffers fall back to pageable memory"
        );
    }
    None
}

fn cuda_free_host(ptr: *mut c_void) {
    if let Some(cuda) = cuda_runtime() {
        // SAFETY: `ptr` came from `cuda_host_alloc` and is freed once.
        let code = unsafe { (cuda.free)(ptr) };
        if code != 0 {
            tracing::warn!(code, "cudaFreeHost failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_zeroed_page_aligned_and_writable() {
        for len in [0, 1, 1023, 1024, 1025, 196_608] {
            let mut b = HostBuffer::new(len, HostMemory::Pageable);
            assert_eq!(b.len(), len);
            assert!(b.iter().all(|&v| v == 0.0));
            assert_eq!(b.as_ptr() as usize % PAGE, 0, "len {len}");
            b.iter_mut().enumerate().for_each(|(i, v)| *v = i as f32);
            assert!(b.iter().enumerate().all(|(i, &v)| v == i as f32));
            assert!(!b.is_pinned());
        }
    }

    /// Without a CUDA runtime (every CI machine) pinning falls back to pageable memory that works
    /// the same; on a GPU machine the buffer is page-locked.
    #[test]
    fn pinning_falls_back_without_a_cuda_runtime() {
        let mut b = HostBuffer::new(4096, HostMemory::Pinned);
        assert_eq!(b.is_pinned(), cuda_runtime().is_some());
        b[4095] = 1.5;
        assert_eq!(b[4095], 1.5);
    }
}
