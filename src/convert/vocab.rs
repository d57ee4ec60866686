//! The tokenizer metadata (`tokenizer.ggml.*`) from a Hugging Face folder's tokenizer.json,
//! tokenizer_config.json and config.json, as llama.cpp's `convert_hf_to_gguf.py` writes it for a
//! byte-level BPE vocabulary (`_set_vocab_gpt2` and gguf-py's `SpecialVocab`), and as braid reads
//! it back (`tokenizer/gguf_vocab.rs`).

use anyhow::{Context, bail};
use candle_core::quantized::gguf_file::Value;
use serde_json::Value as Json;

use super::hf::{HfFolder, read_json};
use crate::tokenizer::gguf_vocab::{LLAMA3_SPLIT, QWEN2_SPLIT};

/// llama.cpp's token types (`llama_token_type`).
const NORMAL: i32 = 1;
const CONTROL: i32 = 3;
const USER_DEFINED: i32 = 4;
const UNUSED: i32 = 5;

/// The `tokenizer.ggml.pre` name llama.cpp gives a tokenizer.json pre-tokenizer. llama.cpp's
/// converter recognises a pre-tokenizer by hashing how it splits a test text; braid recognises
/// the structure of the few it implements, and refuses the rest rather than tokenize wrongly.
pub fn pre_tokenizer_name(pre: &Json) -> anyhow::Result<&'static str> {
    let ty = |v: &Json| v.get("type").and_then(Json::as_str).unwrap_or_default().to_string();
    let byte_level_regex = |v: &Json| ty(v) == "ByteLevel" && v.get("use_regex").and_then(Json::as_bool) != Some(false);
    let byte_level_plain = |v: &Json| ty(v) == "ByteLevel" && v.get("use_regex").and_then(Json::as_bool) == Some(false);
    let split_regex = |v: &Json| -> Option<String> {
        (ty(v) == "Split").then(|| v.get("pattern")?.get("Regex")?.as_str().map(str::to_string)).flatten()
    };
    if byte_level_regex(pre) {
        return Ok("gpt-2");
    }
    if ty(pre) == "Sequence" {
        let parts = pre.get("pretokenizers").and_then(Json::as_array).cloned().unwrap_or_default();
        match parts.as_slice() {
            [digits, bl]
                if ty(digits) == "Digits"
                    && digits.get("individual_digits").and_then(Json::as_bool) == Some(true)
                    && byte_level_regex(bl) =>
            {
                return Ok("smollm");
            }
            [split, bl] if byte_level_plain(bl) => match split_regex(split).as_deref() {
                Some(r) if r == LLAMA3_SPLIT => return Ok("llama-bpe"),
                Some(r) if r == QWEN2_SPLIT => return Ok("qwen2"),
                _ => {}
            },
            _ => {}
        }
    }
    bail!(
        "tokenizer.json's pre-tokenizer is not one braid knows (GPT-2 byte-level, SmolLM's digits + byte-level, \
         Llama 3's or Qwen 2's split): {}",
        pre.to_string().chars().take(300).collect::<String>()
    )
}

/// The content of a special-token entry of tokenizer_config.json (a string or `{content}`).
fn token_content(v: Option<&Json>) -> Option<String> {
    match v? {
        Json::String(s) => Some(s.clone()),
        Json::Object(o) => o.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

/// The tokenizer metadata; `vocab_size` is config.json's (rows of the embedding table), which
/// may exceed the tokenizer's: the rest are padding entries as llama.cpp writes them.
pub fn tokenizer_metadata(hf: &HfFolder, vocab_size: usize) -> anyhow::Result<Vec<(String, Value)>> {
    let path = hf.dir.join("tokenizer.json");
    if !path.is_file() {
        bail!(
            "{} has no tokenizer.json (braid convert reads the fast tokenizer's file; a SentencePiece \
             tokenizer.model alone is not supported)",
            hf.dir.display()
        );
    }
    let tok = read_json(&path)?;
    let model = tok.get("model").context("tokenizer.json has no model")?;
    let model_type = model.get("type").and_then(Json::as_str).unwrap_or_default();
    if model_type != "BPE" || model.get("byte_fallback").and_then(Json::as_bool) == Some(true) {
        bail!(
            "tokenizer.json holds a {model_type} model{}; braid convert writes byte-level BPE vocabularies only",
            if model_type == "BPE" { " with byte fallback (SentencePiece-style)" } else { "" }
        );
    }
    let pre = pre_tokenizer_name(tok.get("pre_tokenizer").unwrap_or(&Json::Null))?;
    let vocab = model.get("vocab").and_then(Json::as_object).context("tokenizer.json has no model.vocab")?;
    let added: Vec<&Json> =
        tok.get("added_tokens").and_then(Json::as_array).map(|a| a.iter().collect()).unwrap_or_default();

    let mut tokens: Vec<Option<(String, i32)>> = Vec::new();
    let mut put = |id: usize, text: &str, ty: i32| {
        if tokens.len() <= id {
            tokens.resize(id + 1, None);
        }
        tokens[id] = Some((text.to_string(), ty));
    };
    for (text, id) in vocab {
        let id = id.as_u64().with_context(|| format!("tokenizer.json: token {text:?} has no integer id"))?;
        put(id as usize, text, NORMAL);
    }
    for a in &added {
        let (Some(id), Some(text)) = (a.get("id").and_then(Json::as_u64), a.get("content").and_then(Json::as_str))
        else {
            bail!("tokenizer.json: malformed added token {a}");
        };
        let special = a.get("special").and_then(Json::as_bool).unwrap_or(false);
        put(id as usize, text, if special { CONTROL } else { USER_DEFINED });
    }
    if tokens.len() > vocab_size {
        bail!("the tokenizer has {} tokens but the model's vocabulary is {vocab_size}", tokens.len());
    }
    tokens.resize(vocab_size, None);
    let (texts, types): (Vec<Value>, Vec<Value>) = tokens
        .into_iter()
        .enumerate()
        .map(|(i, t)| match t {
            Some((text, ty)) => (Value::String(text), Value::I32(ty)),
            None => (Value::String(format!("[PAD{i}]")), Value::I32(UNUSED)),
        })
        .unzip();
    let token_id = |content: &str| -> Option<u32> {
        added
            .iter()
            .find(|a| a.get("content").and_then(Json::as_str) == Some(content))
            .and_then(|a| a.get("id")?.as_u64())
            .or_else(|| vocab.get(content)?.as_u64())
            .map(|i| i as u32)
    };

    // Merges: "a b" strings, or (tokenizers >= 0.20) pairs, whose spaces GGUF spells as U+0120.
    let merges = model.get("merges").and_then(Json::as_array).cloned().unwrap_or_default();
    let merges: Vec<Value> = merges
        .iter()
        .map(|m| match m {
            Json::String(s) => Ok(Value::String(s.clone())),
            Json::Array(pair) if pair.len() == 2 => {
                let part = |v: &Json| -> anyhow::Result<String> {
                    let s = v.as_str().context("a merge part is not a string")?;
                    Ok(s.chars().map(|c| if c == ' ' { '\u{120}' } else { c }).collect())
                };
                Ok(Value::String(format!("{} {}", part(&pair[0])?, part(&pair[1])?)))
            }
            other => bail!("tokenizer.json: malformed merge {other}"),
        })
        .collect::<anyhow::Result<_>>()?;

    let config_path = hf.dir.join("tokenizer_config.json");
    let tcfg = if config_path.is_file() { read_json(&config_path)? } else { Json::Null };

    let mut md: Vec<(String, Value)> = vec![
        ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
        ("tokenizer.ggml.pre".into(), Value::String(pre.into())),
        ("tokenizer.ggml.tokens".into(), Value::Array(texts)),
        ("tokenizer.ggml.token_type".into(), Value::Array(types)),
        ("tokenizer.ggml.merges".into(), Value::Array(merges)),
    ];

    // Special tokens: tokenizer_config.json's names, else config.json's ids (SpecialVocab's order).
    for (kind, key) in
        [("bos", "bos_token_id"), ("eos", "eos_token_id"), ("unk", "unknown_token_id"), ("pad", "padding_token_id")]
    {
        let from_tcfg = token_content(tcfg.get(format!("{kind}_token"))).and_then(|c| token_id(&c));
        let from_config = match hf.get(&format!("{kind}_token_id")) {
            Some(Json::Number(n)) => n.as_u64().map(|i| i as u32),
            // A list of ids (some configs list several EOS): the first.
            Some(Json::Array(a)) => a.first().and_then(Json::as_u64).map(|i| i as u32),
            _ => None,
        };
        if let Some(id) = from_tcfg.or(from_config).filter(|&i| (i as usize) < vocab_size) {
            md.push((format!("tokenizer.ggml.{key}"), Value::U32(id)));
        }
    }

    // Whether BOS/EOS are added: the post-processor decides, else tokenizer_config.json.
    let mut add_bos = None;
    let mut add_eos = None;
    if let Some(post) = tok.get("post_processor").filter(|p| !p.is_null()) {
        let procs: Vec<&Json> = match post.get("processors").and_then(Json::as_array) {
            Some(list) => list.iter().collect(),
            None => vec![post],
        };
        for p in procs {
            match p.get("type").and_then(Json::as_str) {
                Some("ByteLevel") => {
                    add_bos.get_or_insert(false);
                    add_eos.get_or_insert(false);
                }
                Some("TemplateProcessing") => {
                    let single = p.get("single").and_then(Json::as_array).cloned().unwrap_or_default();
                    let special =
                        |v: Option<&Json>| v.and_then(|v| v.get("SpecialToken")?.get("id")?.as_str()).is_some();
                    if single.len() > 1 {
                        add_bos = Some(special(single.first()));
                        add_eos = Some(special(single.last()));
                    }
                }
                _ => {}
            }
        }
    }
    let add_bos = add_bos.or_else(|| tcfg.get("add_bos_token").and_then(Json::as_bool));
    let add_eos = add_eos.or_else(|| tcfg.get("add_eos_token").and_then(Json::as_bool));
    if let Some(b) = add_bos {
        md.push(("tokenizer.ggml.add_bos_token".into(), Value::Bool(b)));
    }
    if let Some(b) = add_eos {
        md.push(("tokenizer.ggml.add_eos_token".into(), Value::Bool(b)));
    }

    if let Some(template) = chat_template(hf, &tcfg)? {
        md.push(("tokenizer.chat_template".into(), Value::String(template)));
    }
    Ok(md)
}

/// The chat template: tokenizer_config.json's, else chat_template.jinja, else chat_template.json.
/// Of a list of named templates, the default one.
fn chat_template(hf: &HfFolder, tcfg: &Json) -> anyhow::Result<Option<String>> {
    let pick = |v: &Json| -> Option<String> {
        match v {
            Json::String(s) => Some(s.clone()),
            Json::Array(list) => list
                .iter()
                .find(|t| t.get("name").and_then(Json::as_str) == Some("default"))
                .or_else(|| list.first())
                .and_then(|t| t.get("template")?.as_str().map(str::to_string)),
            _ => None,
        }
    };
    if let Some(t) = tcfg.get("chat_template").and_then(pick) {
        return Ok(Some(t));
    }
    let jinja = hf.dir.join("chat_template.jinja");
    if jinja.is_file() {
        return Ok(Some(std::fs::read_to_string(&jinja).with_context(|| format!("cannot read {}", jinja.display()))?));
    }
    let json = hf.dir.join("chat_template.json");
    if json.is_file() {
        return Ok(read_json(&json)?.get("chat_template").and_then(pick));
    }
    Ok(None)
}
