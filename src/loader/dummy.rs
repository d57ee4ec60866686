//! Dummy weights of a preset's shape (`model/presets.rs`), for measuring without weight files.

use std::path::PathBuf;

use super::{LoadedModel, Placement};
use crate::gguf::ModelError;
use crate::model::{Decoder, presets};
use crate::tokenizer::TextTokenizer;

/// A model of a preset's shape with dummy weights drawn from `seed` (`presets.rs`); it has no
/// vocabulary, so prompts are token ids. `path` names the preset.
pub fn load_dummy(name: &str, seed: u64, placement: &Placement) -> Result<LoadedModel, ModelError> {
    let preset = presets::preset(name).ok_or_else(|| {
        ModelError::Unsupported(format!("model config '{name}' (known: {})", presets::PRESETS.join(", ")))
    })?;
    let model = match placement {
        Placement::Cpu => {
            let mut source = presets::DummySource { preset: &preset, seed };
            std::sync::Arc::new(Decoder::load(&mut source, preset.config.clone())?).into()
        }
        #[cfg(feature = "cuda")]
        Placement::Cuda(gpu) => crate::engine::ModelHandle::Cuda(std::sync::Arc::new(
            crate::gpu::CudaWeights::dummy(gpu.clone(), &preset, seed)
                .map_err(|e| ModelError::Invalid(e.to_string()))?,
        )),
    };
    Ok(LoadedModel {
        model,
        tokenizer: TextTokenizer::ids_only(preset.vocab_size),
        chat_template: None,
        path: PathBuf::from(name),
        dummy_seed: Some(seed),
    })
}
