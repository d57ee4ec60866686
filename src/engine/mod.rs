//! The batching engine: checked requests in, one batched forward pass per step, tokens out.
//!
//! - `core.rs`: `Engine`: builds each step's flat batch from the schedule, runs the forward
//!   pass, samples, calls the disk tier, and contains a failed step.
//! - `request.rs`: `Request`, checked once against the engine's `Limits`.
//! - `scheduler.rs`: owns the waiting and running sequences: `schedule` and the after-step
//!   `update_from_output`. `sequence.rs`: one request's state, how it finishes, its events.
//! - `block_manager.rs` (the KV block pool and prefix index), `retention.rs` (what to keep).
//! - `sampler.rs`: logits to tokens (the draw itself is `cpu::draw`). `device.rs`: where the
//!   forward pass runs.
//! - `disk/`, `tiering.rs`: the prompt cache's disk tier and moving blocks to and from it.
//!
//! What a backend is given and gives back (`FlatBatch`, `RowOutput`, `BlockStore`) is the
//! bottom module `crate::backend`'s, so backends import nothing from here.

pub mod block_manager;
pub mod core;
pub mod device;
pub mod disk;
pub mod request;
pub mod retention;
pub mod sampler;
pub mod scheduler;
pub mod sequence;
pub mod tiering;

pub use self::core::{Engine, EngineConfig, EngineError, EngineStats, StepError, StepFault, panic_message};
pub use self::device::{Backend, ModelHandle};
pub use crate::backend::{BlockStore, FlatBatch, RowOutput};
pub use disk::{DiskCache, DiskStats};
pub use request::{Limits, Request, RequestError};
pub use retention::{Retention, RetentionPlan};
pub use sampler::{SampledToken, Sampler, SamplingParams};
pub use sequence::{Event, FinishReason, RequestId};
