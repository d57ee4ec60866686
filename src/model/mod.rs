//! Model architectures, weight loading and the KV-cache layout they compute against.

pub mod batch;
pub mod config;
pub mod dump;
pub mod kv_cache;
pub mod llama;
pub mod presets;

use std::path::{Path, PathBuf};


pub use batch::{FlatBatch, SeqSlice};
pub use config::ModelConfig;
pub use crate::gguf::{GgufFile, ModelError};
pub use kv_cache::KvCache;
pub use llama::Llama;

use crate::tokenizer::{ChatTemplate, TextTokenizer};

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
    pub fn cuda(batch_invariant: bool) -> Result<Self, ModelError> {
        let kind = if batch_invariant { crate::gpu::GemmKind::BatchInvariant } else { crate::gpu::GemmKind::Cublas };
        crate::gpu::Gpu::new(0, kind).map(|g| Placement::Cuda(std::sync::Arc::new(g))).map_err(|e| ModelError::Invalid(e.to_string()))
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

/// The files of a model path: a GGUF file, or a folder holding one GGUF file and optionally
/// `tokenizer.json` (which then takes precedence over the GGUF vocabulary).
fn resolve(path: &Path) -> Result<(PathBuf, Option<PathBuf>), ModelError> {
    if !path.is_dir() {
        return Ok((path.to_path_buf(), None));
    }
    let io_err = |source| ModelError::Io { path: path.to_path_buf(), source };
    let mut ggufs: Vec<PathBuf> = std::fs::read_dir(path)
        .map_err(io_err)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "gguf"))
        .collect();
    ggufs.sort();
    let gguf = match ggufs.len() {
        1 => ggufs.remove(0),
        0 => return Err(ModelError::Invalid(format!("{} holds no .gguf file", path.display()))),
        n => return Err(ModelError::Invalid(format!("{} holds {n} .gguf files; name one", path.display()))),
    };
    let tokenizer_json = path.join("tokenizer.json");
    Ok((gguf, tokenizer_json.is_file().then_some(tokenizer_json)))
}

pub fn load(path: &Path, placement: &Placement) -> Result<LoadedModel, ModelError> {
    let (gguf_path, tokenizer_json) = resolve(path)?;
    let mut file = GgufFile::open(&gguf_path)?;
    let config = ModelConfig::from_gguf(&file)?;
    let tokenizer = TextTokenizer::from_gguf(&file, tokenizer_json.as_deref())?;
    let chat_template = match file.opt_str("tokenizer.chat_template")? {
        Some(source) => {
            let name = |id: Option<u32>| id.and_then(|i| tokenizer.token_text(i)).unwrap_or_default();
            let eos = name(tokenizer.eos_ids.first().copied());
            Some(ChatTemplate::new(source, &name(tokenizer.bos_id), &eos).map_err(|e| ModelError::Invalid(e.to_string()))?)
        }
        None => None,
    };
    tracing::info!(
        "loading {} ({}, {} layers, hidden {}, {} heads / {} kv heads, context {})",
        gguf_path.display(),
        config.architecture,
        config.n_layer,
        config.hidden_size,
        config.n_head,
        config.n_kv_head,
        config.context_length
    );
    let model = match placement {
        Placement::Cpu => std::sync::Arc::new(Llama::load(&mut file, config, &candle_core::Device::Cpu)?).into(),
        #[cfg(feature = "cuda")]
        Placement::Cuda(gpu) => crate::engine::ModelHandle::Cuda(std::sync::Arc::new(crate::gpu::CudaWeights::from_gguf(gpu.clone(), &mut file, config)?)),
    };
    Ok(LoadedModel { model, tokenizer, chat_template, path: gguf_path, dummy_seed: None })
}

/// A model of a preset's shape with dummy weights drawn from `seed` (`presets.rs`); it has no
/// vocabulary, so prompts are token ids. `path` names the preset.
pub fn load_dummy(name: &str, seed: u64, placement: &Placement) -> Result<LoadedModel, ModelError> {
    let preset = presets::preset(name)
        .ok_or_else(|| ModelError::Unsupported(format!("model config '{name}' (known: {})", presets::PRESETS.join(", "))))?;
    let model = match placement {
        Placement::Cpu => std::sync::Arc::new(Llama::dummy(&preset, seed)).into(),
        #[cfg(feature = "cuda")]
        Placement::Cuda(gpu) => crate::engine::ModelHandle::Cuda(std::sync::Arc::new(
            crate::gpu::CudaWeights::dummy(gpu.clone(), &preset, seed).map_err(|e| ModelError::Invalid(e.to_string()))?,
        )),
    };
    Ok(LoadedModel { model, tokenizer: TextTokenizer::ids_only(preset.vocab_size), chat_template: None, path: PathBuf::from(name), dummy_seed: Some(seed) })
}

/// The model path to use: the flag, else `BRAID_MODEL`, else the default model.
pub fn model_path(flag: Option<PathBuf>) -> PathBuf {
    flag.or_else(|| std::env::var_os("BRAID_MODEL").map(PathBuf::from)).unwrap_or_else(|| PathBuf::from(DEFAULT_MODEL))
}
