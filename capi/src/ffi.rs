//! Checked conversions of C arguments: strings, paths, slices, versioned structs, output buffers.
//!
//! Every helper names the function and the argument in its error, so `dlo_last_error()` says which pointer
//! was NULL or which string was not UTF-8.

use crate::status::{dlo_status, Failure, Result};
use std::ffi::{c_char, CStr};
use std::path::PathBuf;

/// The handle value of a non-NULL handle pointer.
pub(crate) fn id_of<T>(p: *const T, arg: &str, func: &str) -> Result<usize> {
    if p.is_null() {
        return Err(Failure::null(arg, func));
    }
    Ok(p as usize)
}

/// A NUL-terminated UTF-8 string argument.
///
/// # Safety
/// `p` is NULL or points to a NUL-terminated string that outlives `'a`.
pub(crate) unsafe fn c_str<'a>(p: *const c_char, arg: &str, func: &str) -> Result<&'a str> {
    if p.is_null() {
        return Err(Failure::null(arg, func));
    }
    CStr::from_ptr(p).to_str().map_err(|e| {
        Failure::new(
            dlo_status::DLO_ERR_UTF8,
            format!(
                "{func}: `{arg}` is not valid UTF-8 (invalid byte at offset {})",
                e.valid_up_to()
            ),
        )
    })
}

/// A NUL-terminated file-system path (any bytes on Unix; UTF-8 elsewhere).
///
/// # Safety
/// As [`c_str`].
pub(crate) unsafe fn c_path(p: *const c_char, arg: &str, func: &str) -> Result<PathBuf> {
    if p.is_null() {
        return Err(Failure::null(arg, func));
    }
    #[cfg(unix)]
    {
        use std::os::unix::ffi::OsStrExt;
        Ok(PathBuf::from(std::ffi::OsStr::from_bytes(CStr::from_ptr(p).to_bytes())))
    }
    #[cfg(not(unix))]
    {
        c_str(p, arg, func).map(PathBuf::from)
    }
}

/// A `(pointer, length)` array argument; the pointer may be NULL only when `n == 0`.
///
/// # Safety
/// `p` is NULL or points to `n` valid `T`s that outlive `'a`.
pub(crate) unsafe fn slice<'a, T>(p: *const T, n: usize, arg: &str, func: &str) -> Result<&'a [T]> {
    if n == 0 {
        return Ok(&[]);
    }
    if p.is_null() {
        return Err(Failure::null(arg, func));
    }
    Ok(std::slice::from_raw_parts(p, n))
}

/// A struct whose first field is `size_t struct_size`: reads the caller's size first and rejects one smaller
/// than this library's struct (an older or uninitialised struct).
///
/// # Safety
/// `p` is NULL or points to at least `struct_size` readable bytes.
unsafe fn check_size<T>(p: *const T, arg: &str, func: &str) -> Result<()> {
    if p.is_null() {
        return Err(Failure::null(arg, func));
    }
    let size = p.cast::<usize>().read_unaligned();
    let want = std::mem::size_of::<T>();
    if size < want {
        return Err(Failure::invalid(format!(
            "{func}: `{arg}->struct_size` is {size}, expected at least {want} (initialise it from the \
             library's default_params function or with sizeof)"
        )));
    }
    Ok(())
}

/// Reads a versioned parameter struct (plain data: every bit pattern is a valid value).
///
/// # Safety
/// As [`check_size`].
pub(crate) unsafe fn read_params<T: Copy>(p: *const T, arg: &str, func: &str) -> Result<T> {
    check_size(p, arg, func)?;
    Ok(p.read_unaligned())
}

/// Writes a versioned output struct whose `struct_size` the caller has set.
///
/// # Safety
/// `p` is NULL or points to at least `struct_size` writable bytes.
pub(crate) unsafe fn write_out<T>(p: *mut T, value: T, arg: &str, func: &str) -> Result<()> {
    check_size(p, arg, func)?;
    p.write_unaligned(value);
    Ok(())
}

/// Checks a `(buf, cap, n_out)` output triple before any work: `n_out` is required, `buf` may be NULL
/// only when `cap == 0` (a size query).
pub(crate) fn check_out<T>(buf: *mut T, cap: usize, n_out: *mut usize, buf_name: &str, func: &str) -> Result<()> {
    if n_out.is_null() {
        return Err(Failure::null("n_out", func));
    }
    if buf.is_null() && cap > 0 {
        return Err(Failure::null(buf_name, func));
    }
    Ok(())
}

/// Writes `text` and a NUL into a caller's buffer of `cap` bytes; `*n_out` = text length.
///
/// # Safety
/// `buf` is NULL or points to `cap` writable bytes; `n_out` is NULL or writable.
pub(crate) unsafe fn write_text(text: &str, buf: *mut c_char, cap: usize, n_out: *mut usize, func: &str) -> Result<()> {
    check_out(buf, cap, n_out, "buf", func)?;
    *n_out = text.len();
    if text.len() >= cap {
        return Err(Failure::new(
            dlo_status::DLO_ERR_BUFFER_TOO_SMALL,
            format!(
                "{func}: {} bytes of text and a NUL do not fit in cap = {cap}",
                text.len()
            ),
        ));
    }
    std::ptr::copy_nonoverlapping(text.as_ptr(), buf.cast::<u8>(), text.len());
    *buf.add(text.len()) = 0;
    Ok(())
}
