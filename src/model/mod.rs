//! Model architectures (one file each: `llama.rs`), their hyper-parameters and dummy shapes, and
//! the paged KV cache they compute against (the flat batch they are given is `backend/`'s). The
//! kernels they compute with are `cpu/`'s; reading a model path into a backend is `loader/`'s.

pub mod config;
pub mod dump;
pub mod kv_cache;
pub mod llama;
pub mod presets;

pub use config::ModelConfig;
pub use kv_cache::KvCache;
pub use llama::Llama;
