//! Status codes, the per-thread last-error message, and the guard every exported function runs in.
//!
//! Every exported function body runs inside [`guard`]: it clears the thread's message, catches panics
//! (→ [`dlo_status::DLO_ERR_PANIC`]) and turns a [`Failure`] into its status code plus a message that
//! [`dlo_last_error`] returns.

use std::cell::RefCell;
use std::ffi::{c_char, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};

/// The result of every `dlo_*` call. `DLO_OK` is 0; every error is positive, and `dlo_last_error()` then
/// holds a message naming the problem.
#[repr(C)]
#[allow(non_camel_case_types, clippy::upper_case_acronyms)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum dlo_status {
    /// Success.
    DLO_OK = 0,
    /// A required pointer argument was NULL.
    DLO_ERR_NULL_ARG = 1,
    /// An argument is out of range (negative token id, top_p outside (0, 1], bad struct_size, ...).
    DLO_ERR_INVALID_ARG = 2,
    /// A handle that this library did not create, or that was already freed.
    DLO_ERR_INVALID_HANDLE = 3,
    /// The output buffer is too small; the `n_out` argument holds the size needed.
    DLO_ERR_BUFFER_TOO_SMALL = 4,
    /// A string argument is not valid UTF-8.
    DLO_ERR_UTF8 = 5,
    /// A file could not be read.
    DLO_ERR_IO = 6,
    /// A file is not a checkpoint or engine, or is corrupt or inconsistent.
    DLO_ERR_FORMAT = 7,
    /// The operation needs a tokenizer (or chat template) and the model has none.
    DLO_ERR_NO_TOKENIZER = 8,
    /// Tokenization or detokenization failed.
    DLO_ERR_TOKENIZER = 9,
    /// Chat-template rendering failed.
    DLO_ERR_TEMPLATE = 10,
    /// The prompt does not fit in the model's context length.
    DLO_ERR_CONTEXT_FULL = 11,
    /// The session is in use by another thread (a session is for one thread at a time).
    DLO_ERR_BUSY = 12,
    /// A bug: a panic inside the library was caught at the boundary.
    DLO_ERR_PANIC = 13,
    /// A failure inside the runtime (tensor operation, thread pool, ...).
    DLO_ERR_INTERNAL = 14,
}

/// An error on its way to the C caller: a status code and a message.
#[derive(Debug)]
pub(crate) struct Failure {
    pub status: dlo_status,
    pub message: String,
}

impl Failure {
    pub fn new(status: dlo_status, message: impl Into<String>) -> Self {
        Failure {
            status,
            message: message.into(),
        }
    }
    pub fn invalid(message: impl Into<String>) -> Self {
        Failure::new(dlo_status::DLO_ERR_INVALID_ARG, message)
    }
    pub fn null(arg: &str, func: &str) -> Self {
        Failure::new(dlo_status::DLO_ERR_NULL_ARG, format!("{func}: `{arg}` is NULL"))
    }
}

impl From<dlo_runtime::Error> for Failure {
    fn from(e: dlo_runtime::Error) -> Self {
        use dlo_runtime::Error as E;
        let status = match &e {
            E::Io { .. } => dlo_status::DLO_ERR_IO,
            E::Config(_)
            | E::Format { .. }
            | E::MissingTensor { .. }
            | E::ShapeMismatch { .. }
            | E::Tensors { .. }
            | E::UnsupportedDtype { .. }
            | E::LayerCount { .. } => dlo_status::DLO_ERR_FORMAT,
            // NaN or infinite logits come from the model's weights or settings, not from the call.
            E::NonFiniteLogits { .. } => dlo_status::DLO_ERR_FORMAT,
            E::Tokenizer { .. } => dlo_status::DLO_ERR_TOKENIZER,
            E::NoTokenizer { .. } => dlo_status::DLO_ERR_NO_TOKENIZER,
            E::Template(_) => dlo_status::DLO_ERR_TEMPLATE,
            E::InvalidArgument(_) => dlo_status::DLO_ERR_INVALID_ARG,
            E::Candle(_) => dlo_status::DLO_ERR_INTERNAL,
            // Variants added later (the enum is non-exhaustive) are about files unless proven otherwise.
            _ => dlo_status::DLO_ERR_FORMAT,
        };
        Failure::new(status, e.to_string())
    }
}

pub(crate) type Result<T, E = Failure> = std::result::Result<T, E>;

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn set_last_error(msg: &str) {
    // Interior NULs would truncate the message in C; show them instead.
    let c = CString::new(msg.replace('\0', "\\0")).unwrap_or_default();
    LAST_ERROR.with(|e| *e.borrow_mut() = c);
}

/// Runs an exported function body: clears the thread's message, maps errors and panics to status codes.
pub(crate) fn guard(f: impl FnOnce() -> Result<()>) -> dlo_status {
    set_last_error("");
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => dlo_status::DLO_OK,
        Ok(Err(fail)) => {
            set_last_error(&fail.message);
            fail.status
        }
        Err(payload) => {
            let what = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic payload".into());
            set_last_error(&format!("internal error (panic caught at the C boundary): {what}"));
            dlo_status::DLO_ERR_PANIC
        }
    }
}

/// The message of the last failed `dlo_*` call on this thread ("" after a successful call).
///
/// Ownership: the string belongs to the library; it stays valid until the next `dlo_*` call on the same
/// thread (`dlo_last_error`, `dlo_status_name` and `dlo_version` excepted). Never NULL. Copy it to keep it.
#[no_mangle]
pub extern "C" fn dlo_last_error() -> *const c_char {
    LAST_ERROR.with(|e| e.borrow().as_ptr())
}

/// The name of a status code, e.g. "DLO_ERR_NULL_ARG" ("DLO_UNKNOWN_STATUS" for a value that is not one).
///
/// Ownership: a static string; never free it. Never NULL. Takes an `int` so that any value is safe to pass.
#[no_mangle]
pub extern "C" fn dlo_status_name(status: i32) -> *const c_char {
    let s: &'static [u8] = match status {
        0 => b"DLO_OK\0",
        1 => b"DLO_ERR_NULL_ARG\0",
        2 => b"DLO_ERR_INVALID_ARG\0",
        3 => b"DLO_ERR_INVALID_HANDLE\0",
        4 => b"DLO_ERR_BUFFER_TOO_SMALL\0",
        5 => b"DLO_ERR_UTF8\0",
        6 => b"DLO_ERR_IO\0",
        7 => b"DLO_ERR_FORMAT\0",
        8 => b"DLO_ERR_NO_TOKENIZER\0",
        9 => b"DLO_ERR_TOKENIZER\0",
        10 => b"DLO_ERR_TEMPLATE\0",
        11 => b"DLO_ERR_CONTEXT_FULL\0",
        12 => b"DLO_ERR_BUSY\0",
        13 => b"DLO_ERR_PANIC\0",
        14 => b"DLO_ERR_INTERNAL\0",
        _ => b"DLO_UNKNOWN_STATUS\0",
    };
    s.as_ptr().cast()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::CStr;

    fn last() -> String {
        unsafe { CStr::from_ptr(dlo_last_error()) }
            .to_str()
            .unwrap()
            .to_string()
    }

    #[test]
    fn panics_become_a_status_and_a_message() {
        let s = guard(|| panic!("boom {}", 42));
        assert_eq!(s, dlo_status::DLO_ERR_PANIC);
        assert!(last().contains("boom 42"), "{}", last());
        // The next successful call clears the message.
        assert_eq!(guard(|| Ok(())), dlo_status::DLO_OK);
        assert_eq!(last(), "");
        let s = guard(|| Err(Failure::invalid("bad \0 thing")));
        assert_eq!(s, dlo_status::DLO_ERR_INVALID_ARG);
        assert_eq!(last(), "bad \\0 thing");
    }

    #[test]
    fn every_status_has_its_name() {
        for (s, name) in [
            (dlo_status::DLO_OK, "DLO_OK"),
            (dlo_status::DLO_ERR_BUSY, "DLO_ERR_BUSY"),
            (dlo_status::DLO_ERR_INTERNAL, "DLO_ERR_INTERNAL"),
        ] {
            let got = unsafe { CStr::from_ptr(dlo_status_name(s as i32)) };
            assert_eq!(got.to_str().unwrap(), name);
        }
        let got = unsafe { CStr::from_ptr(dlo_status_name(-7)) };
        assert_eq!(got.to_str().unwrap(), "DLO_UNKNOWN_STATUS");
    }
}
