//! Sequences, scheduling, KV-block ownership and sampling: the batching engine.

pub mod block_manager;
pub mod core;
pub mod device;
pub mod disk;
pub mod draw;
pub mod request;
pub mod retention;
pub mod sampler;
pub mod scheduler;
pub mod sequence;
pub mod tiering;

pub use self::core::{panic_message, Engine, EngineConfig, EngineError, EngineStats, StepError, StepFault};
pub use self::device::{Backend, ModelHandle};
pub use crate::backend::{BlockStore, FlatBatch, RowOutput};
pub use disk::{DiskCache, DiskStats};
pub use request::{Limits, Request, RequestError};
pub use retention::{Retention, RetentionPlan};
pub use sampler::{SampledToken, Sampler, SamplingParams};
pub use sequence::{Event, FinishReason, RequestId};
