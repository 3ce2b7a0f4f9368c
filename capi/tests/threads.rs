//! One engine, many threads: each thread with its own session gets what a single-threaded run gets.

use crate::support::tiny::Tiny;
use crate::support::*;
use dlo::*;

#[test]
fn sessions_on_many_threads_share_one_engine() {
    let (_d, path) = tiny_checkpoint(Tiny {
        layer_skip: true,
        ..Default::default()
    });
    let e = load(&path);
    let prompts: Vec<Vec<i32>> = (0..6)
        .map(|k| (0..5 + k).map(|i| (i * 13 + k * 29 + 3) % 97).collect())
        .collect();
    // Single-threaded, one session after the other.
    let alone: Vec<Vec<i32>> = prompts
        .iter()
        .map(|p| {
            let s = session(e, |q| q.max_tokens = 16);
            let (col, _) = generate(s, p, None);
            let mut s = s;
            expect(unsafe { dlo_session_free(&mut s) }, dlo_status::DLO_OK);
            col.tokens
        })
        .collect();
    // All at once, each thread creating, using and freeing its own session; some with private pools.
    let e_addr = e as usize;
    let together: Vec<Vec<i32>> = std::thread::scope(|sc| {
        let handles: Vec<_> = prompts
            .iter()
            .enumerate()
            .map(|(k, p)| {
                sc.spawn(move || {
                    let s = session(e_addr as *mut dlo_engine, |q| {
                        q.max_tokens = 16;
                        q.n_threads = (k % 3) as i32;
                    });
                    let mut out = Vec::new();
                    for _ in 0..2 {
                        out.push(generate(s, p, None).0.tokens);
                    }
                    let mut s = s;
                    expect(unsafe { dlo_session_free(&mut s) }, dlo_status::DLO_OK);
                    assert_eq!(out[0], out[1]);
                    out.swap_remove(0)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(together, alone);
    assert!(alone.iter().any(|t| t.len() == 16));
    let mut e = e;
    expect(unsafe { dlo_engine_free(&mut e) }, dlo_status::DLO_OK);
}
