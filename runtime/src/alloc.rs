//! Process-wide allocator tuning for the command-line tools.
//!
//! Tensor programs allocate and free many large buffers (activations, gradients, logits) every step. glibc's
//! malloc serves every block above its mmap threshold (128 KiB, growing to at most 32 MiB) with a fresh `mmap`
//! and unmaps it on free, so each step pays page faults and kernel zeroing for memory it just released: on
//! SmolLM2-DLO training that was ~40% of the wall time as system time. Raising the thresholds keeps freed
//! blocks in the heap for reuse. Libraries must not change the process's allocator behind a host program's
//! back, so only the binaries call this.

/// Keep blocks up to 1 GiB in the heap and never trim it back to the OS between allocations (glibc only; a
/// no-op elsewhere). Returns whether the settings were accepted.
pub fn tune_for_large_tensors() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        const LARGE: libc::c_int = 1 << 30;
        // SAFETY: mallopt only adjusts malloc parameters; it is called before any other thread exists.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, LARGE) == 1
                && libc::mallopt(libc::M_TRIM_THRESHOLD, LARGE) == 1
                && libc::mallopt(libc::M_TOP_PAD, 64 << 20) == 1
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}
