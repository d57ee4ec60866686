//! Text <-> token ids, and the chat template, taken from the model's own metadata.

pub mod chat_prompt;
pub mod chat_template;
pub mod detokenizer;
pub mod gguf_vocab;

use std::ops::Range;
use std::path::Path;

use tokenizers::normalizer::Range as TextRange;
use tokenizers::{
    Model, Normalizer, OffsetReferential, OffsetType, PreTokenizedString, PreTokenizer, Token, Tokenizer,
};

use crate::gguf::{GgufFile, ModelError};
pub use chat_prompt::{ChatPrompt, ChatPromptError, ChatPromptOptions, chat_prompt};
pub use chat_template::{ChatTemplate, RenderedChat, TemplateError};
pub use detokenizer::IncrementalDecoder;

/// The tokenizer's own steps (split at added tokens, normalise, pre-tokenise, model), with the
/// split at added tokens made here: at `kept` only. The text between two kept special tokens is
/// then one piece, exactly as `encode` would see it had the others been ordinary text (offsets
/// stay relative to the whole text, so SentencePiece's "prefix the first word" still applies
/// only at its start). Non-special added tokens are not looked for (GGUF vocabularies have none).
fn encode_split(
    inner: &Tokenizer,
    text: &str,
    kept: &[(Range<usize>, u32)],
    offsets: bool,
) -> Result<(Vec<u32>, Option<Vec<usize>>), String> {
    let mut pretokenized = PreTokenizedString::from(text);
    pretokenized
        .split(|_, whole| {
            let mut pieces = Vec::with_capacity(2 * kept.len() + 1);
            let mut at = 0;
            let slice =
                |r: Range<usize>| whole.slice(TextRange::Normalized(r)).ok_or("a special token outside the text");
            for (r, id) in kept {
                if at < r.start {
                    pieces.push((slice(at..r.start)?, None));
                }
                pieces
                    .push((slice(r.clone())?, Some(vec![Token::new(*id, text[r.clone()].to_string(), (0, r.len()))])));
                at = r.end;
            }
            if at < text.len() {
                pieces.push((slice(at..text.len())?, None));
            }
            Ok(pieces)
        })
        .map_err(|e| e.to_string())?;
    if let Some(normalizer) = inner.get_normalizer() {
        pretokenized.normalize(|n| normalizer.normalize(n)).map_err(|e| e.to_string())?;
    }
    if let Some(pre) = inner.get_pre_tokenizer() {
        pre.pre_tokenize(&mut pretokenized).map_err(|e| e.to_string())?;
    }
    pretokenized.tokenize(|n| inner.get_model().tokenize(n.get())).map_err(|e| e.to_string())?;
    let encoding = pretokenized
        .into_encoding(None, 0, if offsets { OffsetType::Byte } else { OffsetType::None })
        .map_err(|e| e.to_string())?;
    let starts = offsets.then(|| encoding.get_offsets().iter().map(|o| o.0).collect());
    Ok((encoding.get_ids().to_vec(), starts))
}

/// Token ids with, when asked, the byte offset in the text where each starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encoded {
    pub ids: Vec<u32>,
    pub starts: Option<Vec<usize>>,
    /// Special-token texts inside opaque ranges, encoded as plain text.
    pub disarmed: usize,
}

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
    /// The most bytes of text one token stands for, where that is known (no normaliser).
    max_token_bytes: Option<usize>,
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
        Ok(Self::with_specials(inner, bos_id, eos_ids, add_bos))
    }

    /// A `tokenizer.json` tokenizer (Hugging Face folders) with the special tokens its folder's
    /// other files name.
    pub fn from_tokenizer(inner: Tokenizer, bos_id: Option<u32>, eos_ids: Vec<u32>, add_bos: bool) -> Self {
        Self::with_specials(inner, bos_id, eos_ids, add_bos && bos_id.is_some())
    }

    fn with_specials(inner: Tokenizer, bos_id: Option<u32>, eos_ids: Vec<u32>, add_bos: bool) -> Self {
        // A token's vocabulary string is at least as long as the text it stands for: byte-level
        // BPE spells each byte as one 1- or 2-byte character, SentencePiece spells a space as
        // `▁` (3 bytes) and a byte as `<0xAB>`. A normaliser could shrink text before it is
        // matched, so then there is no bound.
        let max_token_bytes = match inner.get_normalizer() {
            Some(_) => None,
            None => {
                (0..inner.get_vocab_size(true) as u32).filter_map(|id| inner.id_to_token(id)).map(|t| t.len()).max()
            }
        };
        Self { inner: Some(inner), ids_only_vocab: 0, bos_id, eos_ids, add_bos, max_token_bytes }
    }

    /// The stand-in of a model with no vocabulary (dummy weights): no text encoding, no
    /// end-of-sequence tokens, ids decoded as `<id>`.
    pub fn ids_only(vocab: usize) -> Self {
        Self {
            inner: None,
            ids_only_vocab: vocab,
            bos_id: None,
            eos_ids: Vec::new(),
            add_bos: false,
            max_token_bytes: None,
        }
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
        self.add_bos_to(&mut ids);
        Ok(ids)
    }

    /// Puts BOS in front of `ids` where the model wants it; returns whether it did.
    pub fn add_bos_to(&self, ids: &mut Vec<u32>) -> bool {
        if let (true, Some(bos)) = (self.add_bos, self.bos_id)
            && ids.first() != Some(&bos)
        {
            ids.insert(0, bos);
            return true;
        }
        false
    }

    /// The most tokens `text_bytes` bytes of text can encode to is at least
    /// `text_bytes / max_token_bytes()`: a prompt longer than the context times this is too long
    /// without tokenizing it (which takes memory many times the text's size). None where
    /// unknown (a tokenizer with a normaliser, or no vocabulary).
    pub fn max_token_bytes(&self) -> Option<usize> {
        self.max_token_bytes
    }

    /// Byte ranges of `text` that `encode` turns into special (control) tokens, in order.
    /// Found by the tokenizer's own matcher, so they are exactly the ones `encode` would take.
    pub fn special_matches(&self, text: &str) -> Vec<(Range<usize>, u32)> {
        let Some(inner) = &self.inner else { return Vec::new() };
        let added = inner.get_added_vocabulary();
        let decoder = added.get_added_tokens_decoder();
        let pretokenized = added.extract_and_normalize(inner.get_normalizer(), text);
        pretokenized
            .get_splits(OffsetReferential::Original, OffsetType::Byte)
            .into_iter()
            .filter_map(|(_, (start, end), tokens)| match tokens.as_deref() {
                Some([token]) if decoder.get(&token.id).is_some_and(|t| t.special) => Some((start..end, token.id)),
                _ => None,
            })
            .collect()
    }

    /// Token ids of `text` in which special-token text inside the `opaque` byte ranges (sorted,
    /// not overlapping, not empty: message contents) is plain text; special tokens elsewhere (the chat
    /// template's own markers) are parsed as `encode` parses them. When no special token touches
    /// an opaque range, the ids are exactly `encode`'s. With `offsets`, also the byte offset in
    /// `text` where each token starts. `disarmed` counts the special-token texts kept as text.
    pub fn encode_opaque(&self, text: &str, opaque: &[Range<usize>], offsets: bool) -> Result<Encoded, String> {
        let Some(inner) = &self.inner else {
            return Err("this model has no vocabulary (dummy weights): give prompts as token ids".into());
        };
        let specials = self.special_matches(text);
        let touches = |r: &Range<usize>| {
            // The first opaque range that ends after r starts; r touches it if it starts before r ends.
            let i = opaque.partition_point(|o| o.end <= r.start);
            opaque.get(i).is_some_and(|o| o.start < r.end)
        };
        let disarmed = specials.iter().filter(|(r, _)| touches(r)).count();
        if disarmed == 0 {
            let encoding = if offsets { inner.encode(text, false) } else { inner.encode_fast(text, false) }
                .map_err(|e| e.to_string())?;
            let starts = offsets.then(|| encoding.get_offsets().iter().map(|o| o.0).collect());
            return Ok(Encoded { ids: encoding.get_ids().to_vec(), starts, disarmed });
        }
        let kept: Vec<_> = specials.into_iter().filter(|(r, _)| !touches(r)).collect();
        let (ids, starts) = encode_split(inner, text, &kept, offsets)?;
        Ok(Encoded { ids, starts, disarmed })
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
