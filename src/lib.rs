//! braid: an LLM inference server that serves one model to many people at once.

pub mod backend;
pub mod bench;
pub mod cli;
pub mod convert;
pub mod cpu;
pub mod engine;
pub mod gguf;
#[cfg(feature = "cuda")]
pub mod gpu;
pub mod loader;
pub mod model;
pub mod server;
pub mod tokenizer;
pub mod util;
