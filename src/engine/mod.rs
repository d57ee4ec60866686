//! Sequences, sampling and (later) scheduling over the paged KV cache.

pub mod sampler;
pub mod solo;

pub use sampler::{SampledToken, Sampler, SamplingParams};
pub use solo::{generate_solo, FinishReason};
