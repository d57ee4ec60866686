//! A GGUF model: its config, vocabulary and chat template from the metadata, its weights onto
//! the CPU (`model::Decoder`) or a CUDA device (`gpu::CudaWeights`).

use std::path::{Path, PathBuf};

use super::{LoadedModel, Placement};
use crate::gguf::{GgufFile, ModelError};
use crate::model::weights::GgufSource;
use crate::model::{Decoder, ModelConfig};
use crate::tokenizer::{ChatTemplate, TextTokenizer};

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
        0 => {
            return Err(ModelError::Invalid(format!(
                "{} holds no .gguf file, nor a Hugging Face model (config.json beside .safetensors weights)",
                path.display()
            )));
        }
        n => return Err(ModelError::Invalid(format!("{} holds {n} .gguf files; name one", path.display()))),
    };
    let tokenizer_json = path.join("tokenizer.json");
    Ok((gguf, tokenizer_json.is_file().then_some(tokenizer_json)))
}

pub fn load(path: &Path, placement: &Placement, max_context: Option<usize>) -> Result<LoadedModel, ModelError> {
    let (gguf_path, tokenizer_json) = resolve(path)?;
    let mut file = GgufFile::open(&gguf_path)?;
    let mut config = ModelConfig::from_gguf(&file)?;
    if let Some(max) = max_context {
        config.cap_context(max);
    }
    let tokenizer = TextTokenizer::from_gguf(&file, tokenizer_json.as_deref())?;
    let chat_template = match file.opt_str("tokenizer.chat_template")? {
        Some(source) => {
            let name = |id: Option<u32>| id.and_then(|i| tokenizer.token_text(i)).unwrap_or_default();
            let eos = name(tokenizer.eos_ids.first().copied());
            Some(
                ChatTemplate::new(source, &name(tokenizer.bos_id), &eos)
                    .map_err(|e| ModelError::Invalid(e.to_string()))?,
            )
        }
        None => None,
    };
    let (parameters, types) = file.summary();
    tracing::info!(
        "loading {} ({}, {} layers, hidden {}, {} heads / {} kv heads, {:.1}M parameters, tensors {types}, \
         context {}, {} KV bytes per token)",
        gguf_path.display(),
        config.architecture.name(),
        config.n_layer,
        config.hidden_size,
        config.n_head,
        config.n_kv_head,
        parameters as f64 / 1e6,
        config.context_length,
        crate::model::KvCache::bytes_per_block(&config, 1),
    );
    let model = match placement {
        Placement::Cpu => std::sync::Arc::new(Decoder::load(&mut GgufSource { file: &mut file }, config)?).into(),
        #[cfg(feature = "cuda")]
        Placement::Cuda(gpu) => crate::engine::ModelHandle::Cuda(std::sync::Arc::new(
            crate::gpu::CudaWeights::from_gguf(gpu.clone(), &mut file, config)?,
        )),
    };
    Ok(LoadedModel { model, tokenizer, chat_template, path: gguf_path, dummy_seed: None })
}
