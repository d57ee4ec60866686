//! Builds a Hugging Face `tokenizers` tokenizer from the vocabulary stored in GGUF metadata
//! (`tokenizer.ggml.*`), matching llama.cpp's handling of each `tokenizer.ggml.pre` kind.

use ahash::AHashMap as HashMap;

use candle_core::quantized::gguf_file::Value;
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::replace::Replace;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::metaspace::{Metaspace, PrependScheme};
use tokenizers::pre_tokenizers::sequence::Sequence as PreSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, DecoderWrapper, PreTokenizerWrapper, SplitDelimiterBehavior, Tokenizer};

use crate::gguf::{GgufFile, ModelError};

/// llama.cpp's token types (`llama_token_type`).
const TOKEN_TYPE_CONTROL: i64 = 3;
const TOKEN_TYPE_USER_DEFINED: i64 = 4;

/// Llama 3's pre-tokenizer split (llama.cpp `LLAMA_VOCAB_PRE_TYPE_LLAMA3`).
pub const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen2's pre-tokenizer split: like Llama 3's but single digits.
pub const QWEN2_SPLIT: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

fn strings(file: &GgufFile, key: &str) -> Result<Vec<String>, ModelError> {
    file.get_array(key)?
        .iter()
        .map(|v| match v {
            Value::String(s) => Ok(s.clone()),
            other => Err(ModelError::WrongType {
                key: key.into(),
                reason: format!("expected strings, found {:?}", other.value_type()),
            }),
        })
        .collect()
}

fn numbers(file: &GgufFile, key: &str) -> Result<Option<Vec<f64>>, ModelError> {
    let Some(values) = file.opt_array(key)? else { return Ok(None) };
    values
        .iter()
        .map(|v| match v {
            Value::F32(x) => Ok(*x as f64),
            Value::F64(x) => Ok(*x),
            Value::I32(x) => Ok(*x as f64),
            Value::U32(x) => Ok(*x as f64),
            Value::I8(x) => Ok(*x as f64),
            Value::U8(x) => Ok(*x as f64),
            other => Err(ModelError::WrongType {
                key: key.into(),
                reason: format!("expected numbers, found {:?}", other.value_type()),
            }),
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
}

fn tokenizer_error(e: impl std::fmt::Display) -> ModelError {
    ModelError::Invalid(format!("cannot build tokenizer: {e}"))
}

/// The tokenizer of a GGUF file.
pub fn tokenizer_from_gguf(file: &GgufFile) -> Result<Tokenizer, ModelError> {
    let model = file.get_str("tokenizer.ggml.model")?;
    let tokens = strings(file, "tokenizer.ggml.tokens")?;
    let types = numbers(file, "tokenizer.ggml.token_type")?;
    if let Some(t) = &types
        && t.len() != tokens.len()
    {
        return Err(ModelError::Invalid(format!(
            "tokenizer.ggml.token_type has {} entries for {} tokens",
            t.len(),
            tokens.len()
        )));
    }
    let vocab: HashMap<String, u32> = tokens.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();
    let mut tokenizer = match model {
        "gpt2" => {
            let merges = strings(file, "tokenizer.ggml.merges")?
                .iter()
                .map(|m| {
                    m.split_once(' ')
                        .map(|(a, b)| (a.to_string(), b.to_string()))
                        .ok_or_else(|| ModelError::Invalid(format!("malformed merge '{m}'")))
                })
                .collect::<Result<Vec<_>, _>>()?;
            let bpe = BPE::builder().vocab_and_merges(vocab, merges).build().map_err(tokenizer_error)?;
            let pre = file.opt_str("tokenizer.ggml.pre")?.unwrap_or("default");
            let mut t = Tokenizer::new(bpe);
            t.with_pre_tokenizer(Some(gpt2_pre_tokenizer(pre)?));
            t.with_decoder(Some(DecoderWrapper::ByteLevel(ByteLevel::default())));
            t
        }
        "llama" => {
            let scores = numbers(file, "tokenizer.ggml.scores")?
                .ok_or_else(|| ModelError::MissingKey("tokenizer.ggml.scores".into()))?;
            let merges = merges_from_scores(&tokens, &scores, &vocab);
            let unk = file.opt_usize("tokenizer.ggml.unknown_token_id")?.and_then(|i| tokens.get(i)).cloned();
            let mut builder = BPE::builder().vocab_and_merges(vocab, merges).byte_fallback(true).fuse_unk(true);
            if let Some(unk) = unk {
                builder = builder.unk_token(unk);
            }
            let bpe = builder.build().map_err(tokenizer_error)?;
            let add_space_prefix = file.opt_bool("tokenizer.ggml.add_space_prefix")?.unwrap_or(true);
            let scheme = if add_space_prefix { PrependScheme::First } else { PrependScheme::Never };
            let mut t = Tokenizer::new(bpe);
            t.with_pre_tokenizer(Some(PreTokenizerWrapper::Metaspace(Metaspace::new('▁', scheme, false))));
            let mut decoders = vec![
                DecoderWrapper::Replace(Replace::new("▁", " ").map_err(tokenizer_error)?),
                DecoderWrapper::ByteFallback(ByteFallback::new()),
                DecoderWrapper::Fuse(Fuse::new()),
            ];
            if add_space_prefix {
                decoders.push(DecoderWrapper::Strip(Strip::new(' ', 1, 0)));
            }
            t.with_decoder(Some(DecoderWrapper::Sequence(DecoderSequence::new(decoders))));
            t
        }
        other => return Err(ModelError::Unsupported(format!("tokenizer model '{other}' (supported: gpt2, llama)"))),
    };
    // Control and user-defined tokens are matched whole in prompt text, before the model runs.
    if let Some(types) = &types {
        let special: Vec<AddedToken> = tokens
            .iter()
            .zip(types)
            .filter(|(_, ty)| matches!(**ty as i64, TOKEN_TYPE_CONTROL | TOKEN_TYPE_USER_DEFINED))
            .map(|(tok, _)| AddedToken::from(tok.clone(), true))
            .collect();
        tokenizer.add_special_tokens(&special);
    }
    Ok(tokenizer)
}

fn split(pattern: &str) -> Result<PreTokenizerWrapper, ModelError> {
    let regex = SplitPattern::Regex(pattern.to_string());
    Ok(PreTokenizerWrapper::Split(Split::new(regex, SplitDelimiterBehavior::Isolated, false).map_err(tokenizer_error)?))
}

/// The pre-tokenizer llama.cpp uses for each `tokenizer.ggml.pre` value.
fn gpt2_pre_tokenizer(pre: &str) -> Result<PreTokenizerWrapper, ModelError> {
    let byte_level_regex = PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, true));
    let byte_level_plain = PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, false));
    Ok(match pre {
        "default" | "gpt-2" | "gpt2" => byte_level_regex,
        // SmolLM and StarCoder: every digit alone, then GPT-2's split.
        "smollm" | "starcoder" => PreTokenizerWrapper::Sequence(PreSequence::new(vec![
            PreTokenizerWrapper::Digits(Digits::new(true)),
            byte_level_regex,
        ])),
        "llama-bpe" | "llama3" => {
            PreTokenizerWrapper::Sequence(PreSequence::new(vec![split(LLAMA3_SPLIT)?, byte_level_plain]))
        }
        "qwen2" => PreTokenizerWrapper::Sequence(PreSequence::new(vec![split(QWEN2_SPLIT)?, byte_level_plain])),
        other => {
            return Err(ModelError::Unsupported(format!(
                "pre-tokenizer '{other}' (supported: default, smollm, llama-bpe, qwen2)"
            )));
        }
    })
}

/// SentencePiece vocabularies store scores instead of merges. Any split of a piece into two
/// pieces of the vocabulary is a merge, ranked by the merged piece's score (higher first), which
/// is how SentencePiece's BPE picks merges.
fn merges_from_scores(tokens: &[String], scores: &[f64], vocab: &HashMap<String, u32>) -> Vec<(String, String)> {
    let mut ranked: Vec<(f64, u32, u32, String, String)> = Vec::new();
    for (id, piece) in tokens.iter().enumerate() {
        let score = scores.get(id).copied().unwrap_or(0.0);
        for (i, _) in piece.char_indices().skip(1) {
            let (left, right) = piece.split_at(i);
            if let (Some(&l), Some(&r)) = (vocab.get(left), vocab.get(right)) {
                ranked.push((score, l, r, left.to_string(), right.to_string()));
            }
        }
    }
    ranked.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
    ranked.into_iter().map(|(_, _, _, l, r)| (l, r)).collect()
}
