//! Sequences, scheduling, KV-block ownership and sampling: the batching engine.

pub mod block_manager;
pub mod core;
pub mod sampler;
pub mod scheduler;
pub mod sequence;
pub mod solo;

pub use self::core::{Engine, EngineConfig, EngineError, EngineStats, Event};
pub use sampler::{SampledToken, Sampler, SamplingParams};
pub use sequence::RequestId;
pub use solo::{generate_solo, FinishReason};
