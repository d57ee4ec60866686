//! What a backend is given and gives back: the bottom of the engine's interface to the places a
//! forward pass runs (braid's CPU model, the CUDA runner). The engine builds `FlatBatch`es and
//! reads `RowOutput`s; a backend keeps its KV cache in blocks the engine names (`BlockId`) and
//! lends them to the disk tier as a `BlockStore`. Everything here is plain data and traits, so
//! `model/`, `cpu/` and `gpu/` import it and nothing of `engine/`.

pub mod batch;
pub mod blocks;
pub mod choice;

pub use batch::{FlatBatch, RELEASED_BLOCK, SeqSlice, Window};
pub use blocks::{BlockId, BlockStore, push_f16_bytes, read_f16_bytes};
pub use choice::{DrawParams, MIN_TEMPERATURE, RowChoice, is_greedy};

/// A step's output for one row whose logits were asked for.
pub enum RowOutput {
    /// The logits, for the host's sampler.
    Logits(Vec<f32>),
    /// The token and its log-probability, chosen where the logits are.
    Chosen(u32, f32),
}
