//! A Hugging Face folder's tokenizer and chat template: `tokenizer.json` (the `tokenizers`
//! crate), `tokenizer_config.json` (special tokens, `add_bos_token`, the chat template),
//! `chat_template.jinja` (where transformers 5 writes the template) and
//! `generation_config.json` (the end-of-sequence ids and default sampling).

use std::path::Path;

use serde_json::Value;
use tokenizers::Tokenizer;

use super::safetensors::bad_file;
use crate::gguf::ModelError;
use crate::tokenizer::{ChatTemplate, TextTokenizer};

/// `generation_config.json`'s sampling defaults, where it gives them.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GenerationDefaults {
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<usize>,
    pub repetition_penalty: Option<f32>,
}

/// A JSON file of the folder, `None` if absent.
pub fn read_json(dir: &Path, name: &str) -> Result<Option<Value>, ModelError> {
    let path = dir.join(name);
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&path).map_err(|source| ModelError::Io { path: path.clone(), source })?;
    serde_json::from_str(&text).map(Some).map_err(|e| bad_file(&path, format!("not JSON: {e}")))
}

/// A special token as tokenizer_config.json writes it: a string or `{"content": ...}`.
fn token_text(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_string),
        _ => None,
    }
}

/// `eos_token_id` as an int or a list of ints.
fn ids(v: Option<&Value>, file: &str) -> Result<Vec<u32>, ModelError> {
    let bad = |v: &Value| ModelError::Invalid(format!("{file} eos_token_id is {v}, expected an id or a list of ids"));
    match v {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(a)) => a.iter().map(|x| x.as_u64().map(|n| n as u32).ok_or_else(|| bad(x))).collect(),
        Some(x) => x.as_u64().map(|n| vec![n as u32]).ok_or_else(|| bad(x)),
    }
}

/// The chat template: tokenizer_config.json's `chat_template` (a string, or a list of named
/// templates of which braid takes "default"), else `chat_template.jinja`, else
/// `chat_template.json`.
fn chat_template_source(dir: &Path, tok_config: Option<&Value>) -> Result<Option<String>, ModelError> {
    if let Some(t) = tok_config.and_then(|c| c.get("chat_template")) {
        match t {
            Value::String(s) => return Ok(Some(s.clone())),
            Value::Array(list) => {
                let named = |n: &str| {
                    list.iter()
                        .find(|e| e.get("name").and_then(Value::as_str) == Some(n))
                        .and_then(|e| e.get("template"))
                };
                return match named("default").and_then(Value::as_str) {
                    Some(s) => Ok(Some(s.to_string())),
                    None => Err(ModelError::Invalid(
                        "tokenizer_config.json lists chat templates but none named 'default'".into(),
                    )),
                };
            }
            Value::Null => {}
            other => return Err(ModelError::Invalid(format!("tokenizer_config.json chat_template is {other}"))),
        }
    }
    let jinja = dir.join("chat_template.jinja");
    if jinja.is_file() {
        return std::fs::read_to_string(&jinja).map(Some).map_err(|source| ModelError::Io { path: jinja, source });
    }
    Ok(read_json(dir, "chat_template.json")?
        .and_then(|j| j.get("chat_template").and_then(Value::as_str).map(str::to_string)))
}

/// What the folder's tokenizer files give.
pub struct FolderTokenizer {
    pub tokenizer: TextTokenizer,
    pub chat_template: Option<ChatTemplate>,
    pub generation: GenerationDefaults,
}

/// Reads the tokenizer files of `dir`; `config` is config.json (its `eos_token_id` is a last
/// resort for the stop ids).
pub fn load(dir: &Path, config: &Value) -> Result<FolderTokenizer, ModelError> {
    let path = dir.join("tokenizer.json");
    if !path.is_file() {
        return Err(ModelError::Invalid(format!(
            "{} has no tokenizer.json (braid reads the fast tokenizer's file)",
            dir.display()
        )));
    }
    let inner = Tokenizer::from_file(&path).map_err(|e| bad_file(&path, format!("not a tokenizer.json: {e}")))?;
    let tok_config = read_json(dir, "tokenizer_config.json")?;
    let generation = read_json(dir, "generation_config.json")?;
    let field = |name: &str| tok_config.as_ref().and_then(|c| c.get(name));
    let bos_text = token_text(field("bos_token"));
    let eos_text = token_text(field("eos_token"));
    let id_of = |t: &Option<String>| t.as_deref().and_then(|t| inner.token_to_id(t));
    let bos_id = match id_of(&bos_text) {
        Some(id) => Some(id),
        None => config.get("bos_token_id").and_then(Value::as_u64).map(|n| n as u32),
    };
    // Stop ids: generation_config.json's (what `generate` stops at), then the tokenizer's eos
    // token, then config.json's.
    let mut eos_ids = ids(generation.as_ref().and_then(|g| g.get("eos_token_id")), "generation_config.json")?;
    eos_ids.extend(id_of(&eos_text));
    eos_ids.extend(ids(config.get("eos_token_id"), "config.json")?);
    let mut seen = Vec::new();
    eos_ids.retain(|id| {
        let new = !seen.contains(id);
        seen.push(*id);
        new
    });
    let add_bos = match field("add_bos_token") {
        Some(Value::Bool(b)) => *b,
        // Not said: whatever the tokenizer's own post-processor does.
        _ => match (bos_id, inner.encode("a", true)) {
            (Some(bos), Ok(e)) => e.get_ids().first() == Some(&bos),
            _ => false,
        },
    };
    let vocab_size = inner.get_vocab_size(true);
    if let Some(bad) = eos_ids.iter().chain(bos_id.iter()).find(|&&id| id as usize >= vocab_size) {
        return Err(ModelError::Invalid(format!("special token id {bad} is outside the vocabulary of {vocab_size}")));
    }
    let tokenizer = TextTokenizer::from_tokenizer(inner, bos_id, eos_ids, add_bos);
    let name = |id: Option<u32>| id.and_then(|i| tokenizer.token_text(i)).unwrap_or_default();
    let chat_template = match chat_template_source(dir, tok_config.as_ref())? {
        Some(source) => {
            let bos = bos_text.clone().unwrap_or_else(|| name(tokenizer.bos_id));
            let eos = eos_text.clone().unwrap_or_else(|| name(tokenizer.eos_ids.first().copied()));
            Some(ChatTemplate::new(&source, &bos, &eos).map_err(|e| ModelError::Invalid(e.to_string()))?)
        }
        None => None,
    };
    let g = |k: &str| generation.as_ref().and_then(|g| g.get(k));
    let generation = GenerationDefaults {
        temperature: g("temperature").and_then(Value::as_f64).map(|v| v as f32),
        top_p: g("top_p").and_then(Value::as_f64).map(|v| v as f32),
        top_k: g("top_k").and_then(Value::as_u64).map(|v| v as usize),
        repetition_penalty: g("repetition_penalty").and_then(Value::as_f64).map(|v| v as f32),
    };
    Ok(FolderTokenizer { tokenizer, chat_template, generation })
}
