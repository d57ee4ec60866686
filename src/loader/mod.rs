//! From a model path (or a dummy preset) to what serving needs: the weights placed on their
//! device as the engine's backend (`engine::ModelHandle`), the tokenizer and the chat template.
//! GGUF files (`gguf.rs`), Hugging Face folders (`hf/`) and dummy weights (`dummy.rs`).
//! The architectures themselves are `model/`'s, which knows nothing of engines or devices.

mod dummy;
mod gguf;
pub mod hf;

use std::path::{Path, PathBuf};

use crate::tokenizer::{ChatTemplate, TextTokenizer};

pub use dummy::load_dummy;

/// Loads a model path: a GGUF file, a folder holding one GGUF file, or a Hugging Face folder
/// (config.json and safetensors weights).
pub fn load(path: &Path, placement: &Placement) -> Result<LoadedModel, crate::gguf::ModelError> {
    load_with(path, placement, None)
}

/// `load`, serving at most `max_context` tokens a sequence when that is less than the model's
/// context (`--max-model-len`). The context also picks Phi-3 longrope's factor set, in both
/// formats as llama.cpp does.
pub fn load_with(
    path: &Path,
    placement: &Placement,
    max_context: Option<usize>,
) -> Result<LoadedModel, crate::gguf::ModelError> {
    if hf::is_hf_folder(path) {
        return hf::load(path, placement, &hf::HfOptions { max_context, ..hf::HfOptions::default() });
    }
    gguf::load(path, placement, max_context)
}

/// Where braid finds its default model, relative to the working directory, unless
/// `BRAID_MODEL` says otherwise. `scripts/install-model` puts it there.
pub const DEFAULT_MODEL: &str = "models/SmolLM2-135M-Instruct.Q4_1.gguf";

/// Where a model's weights go.
#[derive(Clone)]
pub enum Placement {
    Cpu,
    #[cfg(feature = "cuda")]
    Cuda(std::sync::Arc<crate::gpu::Gpu>),
}

impl Placement {
    /// The first CUDA device; `batch_invariant` selects braid's batch-invariant matrix
    /// products over cuBLAS (`gpu::GemmKind`).
    #[cfg(feature = "cuda")]
    pub fn cuda(batch_invariant: bool) -> Result<Self, crate::gguf::ModelError> {
        let kind = if batch_invariant { crate::gpu::GemmKind::BatchInvariant } else { crate::gpu::GemmKind::Cublas };
        crate::gpu::Gpu::new(0, kind)
            .map(|g| Placement::Cuda(std::sync::Arc::new(g)))
            .map_err(|e| crate::gguf::ModelError::Invalid(e.to_string()))
    }
}

/// Everything loaded from one model path.
pub struct LoadedModel {
    pub model: crate::engine::ModelHandle,
    pub tokenizer: TextTokenizer,
    /// None when the model ships no chat template.
    pub chat_template: Option<ChatTemplate>,
    pub path: PathBuf,
    /// The seed of dummy weights (`path` then names their preset).
    pub dummy_seed: Option<u64>,
}

/// The model path to use: the flag, else `BRAID_MODEL`, else the default model.
pub fn model_path(flag: Option<PathBuf>) -> PathBuf {
    flag.or_else(|| std::env::var_os("BRAID_MODEL").map(PathBuf::from)).unwrap_or_else(|| PathBuf::from(DEFAULT_MODEL))
}
