//! Process-wide allocator tuning for the command-line tools.
//!
//! Tensor programs allocate and free many large buffers (activations, gradients, logits) every step. glibc's
//! malloc serves every block above its mmap threshold (128 KiB, growing to at most 32 MiB) with a fresh `mmap`
//! and unmaps it on free, and trims the heap's free top back to the OS, so each step pays page faults and kernel
//! zeroing for memory it just released: on SmolLM2-DLO training that was ~40% of the wall time as system time.
//! Libraries must not change the process's allocator behind a host program's back, so only the binaries call
//! this.

/// Serve every block from the heap and never give freed memory back to the OS (glibc only; a no-op
/// elsewhere): the process keeps its peak footprint, and later steps reuse it without faulting pages in again.
/// Returns whether the settings were accepted.
pub fn tune_for_large_tensors() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only adjusts malloc parameters; it is called before any other thread exists.
        unsafe {
            // no mmap'd blocks (freed mmap blocks are unmapped at once), no trimming of the heap's top
            libc::mallopt(libc::M_MMAP_MAX, 0) == 1
                && libc::mallopt(libc::M_TRIM_THRESHOLD, -1) == 1
                && libc::mallopt(libc::M_TOP_PAD, 64 << 20) == 1
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}
