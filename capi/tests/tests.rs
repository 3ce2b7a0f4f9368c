//! Integration tests of the C ABI, calling the exported functions as C would (one test binary).

mod c_example;
mod engine_files;
mod generation;
mod misuse;
mod support;
mod threads;
