//! End-to-end tests: real checkpoints through the libraries and the command-line tools.
//! One test binary (candle links once); each module is one area.

mod smollm2;
