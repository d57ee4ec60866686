//! Hugging Face folders: `config.json` (`config.rs`), safetensors weights (`safetensors.rs`),
//! `tokenizer.json` with `tokenizer_config.json` and `generation_config.json` (`tokenizer.rs`).
//! The weights go through the same decoder as GGUF files; only the names differ.

pub mod config;
pub mod safetensors;
pub mod tokenizer;

use std::path::Path;

use super::{LoadedModel, Placement};
use crate::gguf::ModelError;
use crate::model::arch::names;
use crate::model::weights::WeightSource;
use crate::model::{Decoder, KvCache};
pub use safetensors::{MatrixFormat, SafetensorsSource};
pub use tokenizer::GenerationDefaults;

/// Whether `dir` is a Hugging Face folder: a config.json beside safetensors weights.
pub fn is_hf_folder(dir: &Path) -> bool {
    let has_weights = || {
        dir.join("model.safetensors").is_file()
            || dir.join("model.safetensors.index.json").is_file()
            || std::fs::read_dir(dir).is_ok_and(|entries| {
                entries.filter_map(Result::ok).any(|e| e.path().extension().is_some_and(|x| x == "safetensors"))
            })
    };
    dir.is_dir() && dir.join("config.json").is_file() && has_weights()
}

/// How a folder is loaded.
#[derive(Debug, Clone)]
pub struct HfOptions {
    pub format: MatrixFormat,
    /// The most context braid will serve, when less than the model's
    /// (`max_position_embeddings`). It also picks Phi-3 longrope's factors: the short ones when
    /// it is at most `original_max_position_embeddings`, as llama.cpp does.
    pub max_context: Option<usize>,
}

impl Default for HfOptions {
    fn default() -> Self {
        Self { format: MatrixFormat::Native, max_context: None }
    }
}

/// Loads a Hugging Face folder onto `placement` (the CPU; CUDA reads GGUF files only so far).
pub fn load(dir: &Path, placement: &Placement, options: &HfOptions) -> Result<LoadedModel, ModelError> {
    let json = tokenizer::read_json(dir, "config.json")?
        .ok_or_else(|| ModelError::Invalid(format!("{} has no config.json", dir.display())))?;
    let hf = config::parse(&json, options.max_context)?;
    let folder = tokenizer::load(dir, &json)?;
    let mut source = SafetensorsSource::open(
        dir,
        hf.config.architecture,
        options.format,
        hf.rope_freqs.clone(),
        hf.tied_embeddings,
    )?;
    if let Some(v) = hf.vocab_size
        && folder.tokenizer.vocab_size() > v
    {
        return Err(ModelError::Invalid(format!(
            "the tokenizer has {} tokens but the model only {v} (vocab_size)",
            folder.tokenizer.vocab_size()
        )));
    }
    // Untied models must have their own output projection: the decoder would otherwise take
    // the embedding table for it, silently.
    if !hf.tied_embeddings && !source.has(names::OUTPUT) {
        return Err(ModelError::MissingTensor("lm_head.weight (config.json says tie_word_embeddings: false)".into()));
    }
    let config = hf.config;
    let stored = source.dtype_summary();
    let compute = match (options.format, stored.as_str()) {
        (MatrixFormat::Native, "bf16") => "bf16 products",
        _ => "f32 products",
    };
    tracing::info!(
        "loading {} ({}, {} layers, hidden {}, {} heads / {} kv heads, {:.1}M parameters, {stored} weights, \
         {compute}, context {}, {} KV bytes per token)",
        dir.display(),
        config.architecture.name(),
        config.n_layer,
        config.hidden_size,
        config.n_head,
        config.n_kv_head,
        source.parameter_count() as f64 / 1e6,
        config.context_length,
        KvCache::bytes_per_block(&config, 1),
    );
    if folder.generation != GenerationDefaults::default() {
        tracing::info!(
            "generation_config.json suggests {:?} (not applied: requests say how to sample)",
            folder.generation
        );
    }
    let model = match placement {
        Placement::Cpu => std::sync::Arc::new(Decoder::load(&mut source, config)?).into(),
        #[cfg(feature = "cuda")]
        Placement::Cuda(_) => {
            return Err(ModelError::Unsupported(
                "Hugging Face folders run on the CPU for now (--device cpu); the CUDA path reads GGUF files".into(),
            ));
        }
    };
    Ok(LoadedModel {
        model,
        tokenizer: folder.tokenizer,
        chat_template: folder.chat_template,
        path: dir.to_path_buf(),
        dummy_seed: None,
    })
}
