//! The registry of live handles.
//!
//! A handle given to C is an opaque, never-reused token (a counter value shaped like an aligned pointer),
//! not the address of Rust memory, so a freed, forged or foreign handle is recognised by a registry lookup
//! instead of being dereferenced. Each lookup clones the object's `Arc` under the registry lock, so freeing
//! a handle while another thread is still inside a call on it only drops the registry's reference: the
//! object lives until that call returns.

use crate::status::{dlo_status, Failure, Result};
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

/// Something a handle can stand for.
pub(crate) enum Object {
    Engine(Arc<crate::engine::EngineInner>),
    Session(Arc<crate::session::SessionInner>),
}

fn registry() -> MutexGuard<'static, HashMap<usize, Object>> {
    static REG: OnceLock<Mutex<HashMap<usize, Object>>> = OnceLock::new();
    // A panic never happens while the lock is held (only map operations run under it); recover anyway.
    REG.get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner())
}

/// Handle values: multiples of 16 starting at 16, so they look like aligned pointers and are never NULL.
fn next_id() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed) << 4
}

/// Registers `obj` and returns its handle value.
pub(crate) fn insert(obj: Object) -> usize {
    let id = next_id();
    registry().insert(id, obj);
    id
}

fn kind(o: &Object) -> &'static str {
    match o {
        Object::Engine(_) => "dlo_engine",
        Object::Session(_) => "dlo_session",
    }
}

fn invalid(id: usize, want: &str, func: &str, found: Option<&Object>) -> Failure {
    let msg = match found {
        Some(o) => format!("{func}: handle {id:#x} is a {}, not a {want}", kind(o)),
        None => format!("{func}: {id:#x} is not a live {want} handle (already freed, or not created by libdlo)"),
    };
    Failure::new(dlo_status::DLO_ERR_INVALID_HANDLE, msg)
}

/// The engine behind handle `id`.
pub(crate) fn engine(id: usize, func: &str) -> Result<Arc<crate::engine::EngineInner>> {
    match registry().get(&id) {
        Some(Object::Engine(e)) => Ok(e.clone()),
        other => Err(invalid(id, "dlo_engine", func, other)),
    }
}

/// The session behind handle `id`.
pub(crate) fn session(id: usize, func: &str) -> Result<Arc<crate::session::SessionInner>> {
    match registry().get(&id) {
        Some(Object::Session(s)) => Ok(s.clone()),
        other => Err(invalid(id, "dlo_session", func, other)),
    }
}

/// Frees the table when no handle is left, so that a program that freed everything holds no memory of
/// ours at exit (leak checkers then report nothing).
fn release_if_empty(reg: &mut HashMap<usize, Object>) {
    if reg.is_empty() {
        reg.shrink_to_fit();
    }
}

/// Unregisters an engine handle; the engine is dropped when its last session goes too.
pub(crate) fn remove_engine(id: usize, func: &str) -> Result<()> {
    let mut reg = registry();
    match reg.get(&id) {
        Some(Object::Engine(_)) => {
            let obj = reg.remove(&id);
            release_if_empty(&mut reg);
            drop(reg);
            drop(obj);
            Ok(())
        }
        other => Err(invalid(id, "dlo_engine", func, other)),
    }
}

/// Unregisters a session handle.
pub(crate) fn remove_session(id: usize, func: &str) -> Result<()> {
    let mut reg = registry();
    match reg.get(&id) {
        Some(Object::Session(_)) => {
            let obj = reg.remove(&id);
            release_if_empty(&mut reg);
            // Drop outside the lock: dropping a session may drop its engine and a thread pool.
            drop(reg);
            drop(obj);
            Ok(())
        }
        other => Err(invalid(id, "dlo_session", func, other)),
    }
}
