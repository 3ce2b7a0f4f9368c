//! Shared helpers: tiny checkpoints, handle helpers, a collecting callback (assets: `dlo_runtime::testing`).

pub mod tiny;

use dlo::*;
use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::path::{Path, PathBuf};
use std::ptr::null_mut;

/// The calling thread's `dlo_last_error()`.
pub fn last_error() -> String {
    unsafe { CStr::from_ptr(dlo_last_error()) }
        .to_string_lossy()
        .into_owned()
}

/// Asserts a status, printing the message on mismatch.
#[track_caller]
pub fn expect(s: dlo_status, want: dlo_status) {
    assert_eq!(s, want, "dlo_last_error: {}", last_error());
}

pub fn c(s: &str) -> CString {
    CString::new(s).unwrap()
}

/// A tiny checkpoint in a fresh temporary directory (kept alive by the returned guard).
pub fn tiny_checkpoint(t: tiny::Tiny) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny");
    tiny::write(&path, t).unwrap();
    (dir, path)
}

/// Loads an engine with default parameters.
pub fn load(path: &Path) -> *mut dlo_engine {
    let p = dlo_engine_default_params();
    let mut e = null_mut();
    let cpath = c(path.to_str().unwrap());
    expect(
        unsafe { dlo_engine_load(cpath.as_ptr(), &p, &mut e) },
        dlo_status::DLO_OK,
    );
    assert!(!e.is_null());
    e
}

/// A session with `edit` applied to the default parameters.
pub fn session(e: *mut dlo_engine, edit: impl FnOnce(&mut dlo_session_params)) -> *mut dlo_session {
    let mut p = dlo_session_default_params();
    edit(&mut p);
    let mut s = null_mut();
    expect(unsafe { dlo_session_new(e, &p, &mut s) }, dlo_status::DLO_OK);
    s
}

/// What a generation streamed.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Collected {
    pub tokens: Vec<i32>,
    pub text: Vec<u8>,
    /// Stop (return 1) once this many tokens have been seen.
    pub stop_after: Option<usize>,
    /// Every piece arrived NUL-terminated at `piece_len`.
    pub nul_terminated: bool,
}

pub unsafe extern "C" fn collect(token: i32, piece: *const c_char, len: usize, ud: *mut c_void) -> c_int {
    let c = &mut *(ud as *mut Collected);
    if c.tokens.is_empty() {
        c.nul_terminated = true;
    }
    c.tokens.push(token);
    let bytes = std::slice::from_raw_parts(piece.cast::<u8>(), len + 1);
    c.nul_terminated &= bytes[len] == 0;
    c.text.extend_from_slice(&bytes[..len]);
    c_int::from(c.stop_after.is_some_and(|n| c.tokens.len() >= n))
}

pub fn new_result() -> dlo_generation_result {
    dlo_generation_result {
        struct_size: std::mem::size_of::<dlo_generation_result>(),
        n_prompt_tokens: 0,
        n_generated: 0,
        stop_reason: dlo_stop_reason::DLO_STOP_NONE,
    }
}

/// Generates from ids, collecting the stream.
pub fn generate(s: *mut dlo_session, prompt: &[i32], stop_after: Option<usize>) -> (Collected, dlo_generation_result) {
    let mut col = Collected {
        stop_after,
        ..Default::default()
    };
    let mut res = new_result();
    let st = unsafe {
        dlo_generate(
            s,
            prompt.as_ptr(),
            prompt.len(),
            Some(collect),
            &mut col as *mut Collected as *mut c_void,
            &mut res,
        )
    };
    expect(st, dlo_status::DLO_OK);
    (col, res)
}

/// Frees a session and an engine, asserting success.
pub fn free(mut s: *mut dlo_session, mut e: *mut dlo_engine) {
    expect(unsafe { dlo_session_free(&mut s) }, dlo_status::DLO_OK);
    expect(unsafe { dlo_engine_free(&mut e) }, dlo_status::DLO_OK);
    assert!(s.is_null() && e.is_null());
}
