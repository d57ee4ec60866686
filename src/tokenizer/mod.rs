//! Text <-> token ids, and the chat template, taken from the model's own metadata.

pub mod chat_template;
pub mod detokenizer;
pub mod gguf_vocab;

use std::path::Path;

use tokenizers::Tokenizer;

use crate::gguf::{GgufFile, ModelError};
pub use chat_template::{ChatTemplate, TemplateError};
pub use detokenizer::IncrementalDecoder;

pub struct TextTokenizer {
    /// None for models without a vocabulary (dummy weights): prompts must be token ids, and
    /// ids are shown as `<id>`.
    inner: Option<Tokenizer>,
    ids_only_vocab: usize,
    pub bos_id: Option<u32>,
    /// Tokens that end generation (end-of-sequence and end-of-turn).
    pub eos_ids: Vec<u32>,
    /// Whether prompts start with BOS (`tokenizer.ggml.add_bos_token`).
    pub add_bos: bool,
}

impl TextTokenizer {
    /// The tokenizer of a GGUF file, or of `tokenizer.json` when one is given.
    pub fn from_gguf(file: &GgufFile, tokenizer_json: Option<&Path>) -> Result<Self, ModelError> {
        let inner = match tokenizer_json {
            Some(path) => Tokenizer::from_file(path)
                .map_err(|e| ModelError::Invalid(format!("cannot read {}: {e}", path.display())))?,
            None => gguf_vocab::tokenizer_from_gguf(file)?,
        };
        let bos_id = file.opt_usize("tokenizer.ggml.bos_token_id")?.map(|i| i as u32);
        let mut eos_ids = Vec::new();
        for key in ["tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"] {
            if let Some(id) = file.opt_usize(key)?
                && !eos_ids.contains(&(id as u32))
            {
                eos_ids.push(id as u32);
            }
        }
        // Llama-style vocabularies add BOS unless told otherwise; GPT-2-style ones do not.
        let default_bos = file.opt_str("tokenizer.ggml.model")? == Some("llama");
        let add_bos = file.opt_bool("tokenizer.ggml.add_bos_token")?.unwrap_or(default_bos) && bos_id.is_some();
        Ok(Self { inner: Some(inner), ids_only_vocab: 0, bos_id, eos_ids, add_bos })
    }

    /// The stand-in of a model with no vocabulary (dummy weights): no text encoding, no
    /// end-of-sequence tokens, ids decoded as `<id>`.
    pub fn ids_only(vocab: usize) -> Self {
        Self { inner: None, ids_only_vocab: vocab, bos_id: None, eos_ids: Vec::new(), add_bos: false }
    }

    /// Token ids of `text` with special-token text (e.g. `<|im_start|>`) parsed; no BOS added.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, String> {
        let Some(inner) = &self.inner else {
            return Err("this model has no vocabulary (dummy weights): give prompts as token ids".into());
        };
        inner.encode_fast(text, false).map(|e| e.get_ids().to_vec()).map_err(|e| e.to_string())
    }

    /// Token ids of a prompt: `encode`, with BOS in front where the model wants it.
    pub fn encode_prompt(&self, text: &str) -> Result<Vec<u32>, String> {
        let mut ids = self.encode(text)?;
        if let (true, Some(bos)) = (self.add_bos, self.bos_id)
            && ids.first() != Some(&bos)
        {
            ids.insert(0, bos);
        }
        Ok(ids)
    }

    /// Text of `ids`; special tokens are kept. Undecodable bytes become U+FFFD.
    pub fn decode(&self, ids: &[u32]) -> String {
        match &self.inner {
            Some(inner) => inner.decode(ids, false).unwrap_or_default(),
            None => ids.iter().map(|id| format!("<{id}>")).collect(),
        }
    }

    pub fn token_text(&self, id: u32) -> Option<String> {
        match &self.inner {
            Some(inner) => inner.id_to_token(id),
            None => ((id as usize) < self.ids_only_vocab).then(|| format!("<{id}>")),
        }
    }

    /// Whether text can be encoded (false for dummy models, which take token ids).
    pub fn has_vocabulary(&self) -> bool {
        self.inner.is_some()
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.as_ref().map_or(self.ids_only_vocab, |t| t.get_vocab_size(true))
    }

    pub fn is_eos(&self, id: u32) -> bool {
        self.eos_ids.contains(&id)
    }
}
