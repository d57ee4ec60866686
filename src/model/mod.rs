//! Model architectures: one shared decoder (`decoder.rs`) built from common layers
//! (`layers.rs`), what sets each architecture apart (`arch/`), their hyper-parameters and dummy
//! shapes, where weights come from (`weights.rs`), and the paged KV cache they compute against
//! (the flat batch they are given is `backend/`'s). The kernels they compute with are `cpu/`'s;
//! reading a model path into a backend is `loader/`'s.

pub mod arch;
pub mod config;
pub mod decoder;
pub mod dump;
pub mod kv_cache;
pub mod layers;
pub mod presets;
pub mod weights;

pub use config::ModelConfig;
pub use decoder::Decoder;
pub use kv_cache::KvCache;
