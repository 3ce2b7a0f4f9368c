//! Sampling and the generation loop.
