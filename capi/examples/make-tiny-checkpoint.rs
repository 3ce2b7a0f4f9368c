//! Writes a tiny random DLO checkpoint (HF directory) for the C/Python example checks and valgrind:
//! `cargo run --release -p dlo-capi --example make-tiny-checkpoint -- DIR [--layer-skip] [--ctx N]`.

#[path = "../tests/support/tiny.rs"]
mod tiny;

fn main() -> std::process::ExitCode {
    let mut args = std::env::args().skip(1);
    let mut dir = None;
    let mut t = tiny::Tiny::default();
    while let Some(a) = args.next() {
        match a.as_str() {
            "--layer-skip" => t.layer_skip = true,
            "--ctx" => match args.next().and_then(|v| v.parse().ok()) {
                Some(n) => t.ctx = n,
                None => {
                    eprintln!("error: --ctx needs a positive integer");
                    return std::process::ExitCode::FAILURE;
                }
            },
            _ if dir.is_none() => dir = Some(std::path::PathBuf::from(a)),
            _ => {
                eprintln!("error: unexpected argument `{a}`");
                return std::process::ExitCode::FAILURE;
            }
        }
    }
    let Some(dir) = dir else {
        eprintln!("usage: make-tiny-checkpoint DIR [--layer-skip] [--ctx N]");
        return std::process::ExitCode::FAILURE;
    };
    if let Err(e) = tiny::write(&dir, t) {
        eprintln!("error: writing {}: {e}", dir.display());
        return std::process::ExitCode::FAILURE;
    }
    std::process::ExitCode::SUCCESS
}
