//! libdlo: the C ABI of the DLO runtime (`include/dlo.h`, generated from this crate by cbindgen).
//!
//! Shape (after llama.cpp's `llama.h` and tract's `api/ffi`):
//! - opaque handles (`dlo_engine`, `dlo_session`) created by `dlo_<noun>_load/new` and released by
//!   `dlo_<noun>_free(&handle)`, which also sets the caller's variable to NULL;
//! - every function returns a [`dlo_status`]; on error, [`dlo_last_error`] holds a message for the calling
//!   thread; panics are caught at the boundary ([`dlo_status::DLO_ERR_PANIC`]), nothing aborts;
//! - parameter and output structs start with `size_t struct_size` so that they can grow;
//! - outputs into caller buffers take `(buf, cap, *n_out)` and report the size needed when `cap` is short;
//! - every pointer argument is checked for NULL, and handles are checked against a registry of live
//!   handles, so a freed or foreign handle is an error ([`dlo_status::DLO_ERR_INVALID_HANDLE`]).
//!
//! Threads: an engine is immutable and may be shared by many threads and sessions; a session is used by
//! one thread at a time (a concurrent call on the same session returns [`dlo_status::DLO_ERR_BUSY`]).
//!
//! Pointer arguments must point to what the header says (valid, readable or writable for the given
//! length, NUL-terminated strings); only NULL is detected, not dangling pointers.

// C names for C types (`dlo_engine`, `DLO_OK`); safety contracts are stated once, above.
#![allow(non_camel_case_types, clippy::missing_safety_doc)]

mod engine;
mod ffi;
mod handles;
mod session;
mod status;

pub use engine::{
    dlo_chat_message, dlo_chat_render, dlo_detokenize, dlo_dtype, dlo_engine, dlo_engine_default_params,
    dlo_engine_free, dlo_engine_get_info, dlo_engine_info, dlo_engine_load, dlo_engine_params, dlo_engine_weights,
    dlo_tokenize,
};
pub use session::{
    dlo_generate, dlo_generate_text, dlo_generation_result, dlo_session, dlo_session_default_params, dlo_session_free,
    dlo_session_last_logits, dlo_session_layer_rates, dlo_session_new, dlo_session_params, dlo_session_stats,
    dlo_stats, dlo_stop_reason, dlo_token_callback,
};
pub use status::{dlo_last_error, dlo_status, dlo_status_name};

/// The library version, e.g. "0.1.0". Ownership: a static string; never free it. Never NULL.
#[no_mangle]
pub extern "C" fn dlo_version() -> *const std::ffi::c_char {
    concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr().cast()
}

#[cfg(test)]
mod tests {
    #[test]
    fn version_is_the_crate_version() {
        let v = unsafe { std::ffi::CStr::from_ptr(super::dlo_version()) };
        assert_eq!(v.to_str().unwrap(), env!("CARGO_PKG_VERSION"));
    }
}
