//! OpenAI wire format: request bodies parsed strictly (an unknown or unsupported field is a
//! 400 naming it, never silently ignored) into braid's own `GenerationRequest`.

use std::collections::HashMap;

use serde::Deserialize;

use super::error::ApiError;
use crate::engine::SamplingParams;

/// Fields of OpenAI's API that braid does not implement yet.
const UNSUPPORTED_CHAT: &[&str] = &[
    "tools", "tool_choice", "functions", "function_call", "parallel_tool_calls", "response_format", "audio",
    "modalities", "prediction", "store", "metadata", "service_tier", "reasoning_effort", "web_search_options",
];
const UNSUPPORTED_COMPLETION: &[&str] = &["echo", "suffix", "best_of", "response_format"];

/// Fields of `CommonFields` (serde cannot refuse unknown fields through `flatten`, so the
/// known ones are listed and checked by hand).
const COMMON: &[&str] = &[
    "max_tokens", "temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
    "repetition_penalty", "logit_bias", "seed", "stop", "n", "ignore_eos", "user", "stream", "stream_options",
];
const CHAT: &[&str] = &["model", "messages", "max_completion_tokens", "logprobs", "top_logprobs"];
const COMPLETION: &[&str] = &["model", "prompt", "logprobs"];

/// Most choices per request, and most alternatives per token.
pub const MAX_N: usize = 16;
pub const MAX_TOP_LOGPROBS: usize = 20;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamOptions {
    pub include_usage: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum StopField {
    One(String),
    Many(Vec<String>),
}

/// Sampling fields common to both endpoints.
#[derive(Debug, Default, Deserialize)]
pub struct CommonFields {
    pub max_tokens: Option<i64>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub top_k: Option<i64>,
    pub min_p: Option<f64>,
    pub presence_penalty: Option<f64>,
    pub frequency_penalty: Option<f64>,
    pub repetition_penalty: Option<f64>,
    pub logit_bias: Option<HashMap<String, f64>>,
    pub seed: Option<i64>,
    pub stop: Option<StopField>,
    pub n: Option<i64>,
    pub ignore_eos: Option<bool>,
    pub user: Option<String>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    pub text: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Message {
    pub role: String,
    pub content: Option<Content>,
    pub name: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct ChatRequest {
    pub model: String,
    pub messages: Vec<Message>,
    pub max_completion_tokens: Option<i64>,
    pub logprobs: Option<bool>,
    pub top_logprobs: Option<i64>,
    #[serde(flatten)]
    pub common: CommonFields,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum PromptField {
    Text(String),
    Texts(Vec<String>),
    Ids(Vec<u32>),
    IdLists(Vec<Vec<u32>>),
}

#[derive(Debug, Deserialize)]
pub struct CompletionRequest {
    pub model: String,
    pub prompt: PromptField,
    pub logprobs: Option<i64>,
    #[serde(flatten)]
    pub common: CommonFields,
}

/// A validated request, ready for tokenization and the engine.
#[derive(Debug, Clone)]
pub struct GenerationOptions {
    /// None: up to the end of the context.
    pub max_tokens: Option<usize>,
    pub params: SamplingParams,
    pub n: usize,
    pub stop: Vec<String>,
    /// Some(k): report each token's logprob with k alternatives.
    pub logprobs: Option<usize>,
    pub stream: bool,
    pub include_usage: bool,
    pub user: Option<String>,
}

/// Parses a JSON body: malformed JSON, a non-object, an unsupported or unknown field all give
/// a 400 that names the problem.
pub fn parse_body<T: serde::de::DeserializeOwned>(body: &[u8], unsupported: &[&str], known: &[&[&str]]) -> Result<T, ApiError> {
    let value: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| ApiError::bad_request(format!("The request body is not valid JSON: {e}")))?;
    let Some(object) = value.as_object() else {
        return Err(ApiError::bad_request("The request body must be a JSON object"));
    };
    if let Some(field) = unsupported.iter().find(|f| object.get(**f).is_some_and(|v| !v.is_null())) {
        return Err(ApiError::invalid_param(field, format!("'{field}' is not supported by braid")));
    }
    if let Some(field) = object.keys().find(|k| !known.iter().any(|list| list.contains(&k.as_str())) && !unsupported.contains(&k.as_str())) {
        return Err(ApiError::invalid_param(field, format!("Unknown field '{field}'")));
    }
    serde_json::from_value(value).map_err(|e| {
        let message = e.to_string();
        let param = message.split('`').nth(1).filter(|_| message.starts_with("unknown field")).map(str::to_string);
        ApiError { param, ..ApiError::bad_request(format!("Invalid request: {message}")) }
    })
}

pub fn parse_chat(body: &[u8]) -> Result<ChatRequest, ApiError> {
    parse_body(body, UNSUPPORTED_CHAT, &[CHAT, COMMON])
}

pub fn parse_completion(body: &[u8]) -> Result<CompletionRequest, ApiError> {
    parse_body(body, UNSUPPORTED_COMPLETION, &[COMPLETION, COMMON])
}

fn float(param: &str, value: Option<f64>, default: f32, range: std::ops::RangeInclusive<f64>) -> Result<f32, ApiError> {
    match value {
        None => Ok(default),
        Some(v) if v.is_finite() && range.contains(&v) => Ok(v as f32),
        Some(v) => Err(ApiError::invalid_param(param, format!("'{param}' must be between {} and {}, got {v}", range.start(), range.end()))),
    }
}

impl CommonFields {
    /// Checks every field; `max_tokens` is the endpoint's own (chat also accepts
    /// `max_completion_tokens`), `logprobs` its reading of the logprobs fields.
    pub fn options(&self, max_tokens: Option<i64>, logprobs: Option<usize>) -> Result<GenerationOptions, ApiError> {
        let max_tokens = match max_tokens {
            None => None,
            Some(v) if v >= 1 => Some(v as usize),
            Some(v) => return Err(ApiError::invalid_param("max_tokens", format!("'max_tokens' must be at least 1, got {v}"))),
        };
        let n = match self.n {
            None => 1,
            Some(v) if (1..=MAX_N as i64).contains(&v) => v as usize,
            Some(v) => return Err(ApiError::invalid_param("n", format!("'n' must be between 1 and {MAX_N}, got {v}"))),
        };
        let temperature = float("temperature", self.temperature, 1.0, 0.0..=2.0)?;
        let top_p = float("top_p", self.top_p, 1.0, 0.0..=1.0)?;
        if top_p == 0.0 {
            return Err(ApiError::invalid_param("top_p", "'top_p' must be greater than 0"));
        }
        let top_k = match self.top_k {
            None | Some(-1) | Some(0) => 0,
            Some(v) if v > 0 => v as usize,
            Some(v) => return Err(ApiError::invalid_param("top_k", format!("'top_k' must be -1, 0 or positive, got {v}"))),
        };
        let min_p = float("min_p", self.min_p, 0.0, 0.0..=1.0)?;
        let presence_penalty = float("presence_penalty", self.presence_penalty, 0.0, -2.0..=2.0)?;
        let frequency_penalty = float("frequency_penalty", self.frequency_penalty, 0.0, -2.0..=2.0)?;
        let repetition_penalty = float("repetition_penalty", self.repetition_penalty, 1.0, 0.01..=10.0)?;
        let mut logit_bias = Vec::new();
        for (token, bias) in self.logit_bias.iter().flatten() {
            let id: u32 = token.parse().map_err(|_| ApiError::invalid_param("logit_bias", format!("logit_bias key '{token}' is not a token id")))?;
            if !(-100.0..=100.0).contains(bias) {
                return Err(ApiError::invalid_param("logit_bias", format!("logit_bias values must be between -100 and 100, got {bias}")));
            }
            logit_bias.push((id, *bias as f32));
        }
        logit_bias.sort_by_key(|b| b.0);
        let stop = match &self.stop {
            None => Vec::new(),
            Some(StopField::One(s)) => vec![s.clone()],
            Some(StopField::Many(v)) => v.clone(),
        };
        if stop.len() > 16 || stop.iter().any(String::is_empty) {
            return Err(ApiError::invalid_param("stop", "'stop' takes at most 16 non-empty strings"));
        }
        let seed = self.seed.map(|s| s as u64);
        let stream = self.stream.unwrap_or(false);
        if self.stream_options.is_some() && !stream {
            return Err(ApiError::invalid_param("stream_options", "'stream_options' is only allowed with 'stream': true"));
        }
        let params = SamplingParams {
            temperature,
            top_k,
            top_p,
            min_p,
            repetition_penalty,
            presence_penalty,
            frequency_penalty,
            logit_bias,
            seed,
            max_tokens: max_tokens.unwrap_or(1),
            stop_token_ids: Vec::new(),
            ignore_eos: self.ignore_eos.unwrap_or(false),
            top_logprobs: logprobs.unwrap_or(0),
        };
        Ok(GenerationOptions {
            max_tokens,
            params,
            n,
            stop,
            logprobs,
            stream,
            include_usage: self.stream_options.as_ref().and_then(|o| o.include_usage).unwrap_or(false),
            user: self.user.clone(),
        })
    }
}

impl ChatRequest {
    pub fn options(&self) -> Result<GenerationOptions, ApiError> {
        if self.common.max_tokens.is_some() && self.max_completion_tokens.is_some() {
            return Err(ApiError::invalid_param("max_completion_tokens", "give only one of 'max_tokens' and 'max_completion_tokens'"));
        }
        let top = match (self.logprobs, self.top_logprobs) {
            (_, Some(k)) if !(0..=MAX_TOP_LOGPROBS as i64).contains(&k) => {
                return Err(ApiError::invalid_param("top_logprobs", format!("'top_logprobs' must be between 0 and {MAX_TOP_LOGPROBS}, got {k}")));
            }
            (Some(true), k) => Some(k.unwrap_or(0) as usize),
            (_, Some(_)) => return Err(ApiError::invalid_param("top_logprobs", "'top_logprobs' requires 'logprobs': true")),
            _ => None,
        };
        self.common.options(self.max_completion_tokens.or(self.common.max_tokens), top)
    }

    /// The messages as the chat template sees them: roles checked, text parts joined.
    pub fn template_messages(&self) -> Result<Vec<serde_json::Value>, ApiError> {
        if self.messages.is_empty() {
            return Err(ApiError::invalid_param("messages", "'messages' must hold at least one message"));
        }
        self.messages
            .iter()
            .enumerate()
            .map(|(i, m)| {
                let role = match m.role.as_str() {
                    "system" | "user" | "assistant" => m.role.as_str(),
                    "developer" => "system",
                    other => {
                        return Err(ApiError::invalid_param(&format!("messages[{i}].role"), format!("role '{other}' is not supported (system, user, assistant)")));
                    }
                };
                let content = match &m.content {
                    None => return Err(ApiError::invalid_param(&format!("messages[{i}].content"), "message content is missing")),
                    Some(Content::Text(t)) => t.clone(),
                    Some(Content::Parts(parts)) => {
                        let mut text = String::new();
                        for part in parts {
                            match (part.kind.as_str(), &part.text) {
                                ("text", Some(t)) => text.push_str(t),
                                (kind, _) => {
                                    return Err(ApiError::invalid_param(&format!("messages[{i}].content"), format!("content part of type '{kind}' is not supported (text only)")));
                                }
                            }
                        }
                        text
                    }
                };
                let mut message = serde_json::json!({ "role": role, "content": content });
                if let Some(name) = &m.name {
                    message["name"] = serde_json::json!(name);
                }
                Ok(message)
            })
            .collect()
    }
}

impl CompletionRequest {
    pub fn options(&self) -> Result<GenerationOptions, ApiError> {
        let top = match self.logprobs {
            None => None,
            Some(k) if (0..=MAX_TOP_LOGPROBS as i64).contains(&k) => Some(k as usize),
            Some(k) => return Err(ApiError::invalid_param("logprobs", format!("'logprobs' must be between 0 and {MAX_TOP_LOGPROBS}, got {k}"))),
        };
        // Legacy completions default to 16 tokens, as OpenAI's do.
        let mut options = self.common.options(self.common.max_tokens.or(Some(16)), top)?;
        if self.common.max_tokens.is_none() {
            options.max_tokens = Some(16);
        }
        Ok(options)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat(body: &str) -> Result<ChatRequest, ApiError> {
        parse_chat(body.as_bytes())
    }

    #[test]
    fn malformed_json_and_non_objects_are_400() {
        let e = chat("{\"model\": ").unwrap_err();
        assert_eq!(e.status, 400);
        assert!(e.message.contains("not valid JSON"));
        assert_eq!(chat("[1]").unwrap_err().status, 400);
    }

    #[test]
    fn unknown_and_unsupported_fields_are_named() {
        let e = chat(r#"{"model": "m", "messages": [], "frobnicate": 1}"#).unwrap_err();
        assert_eq!((e.status.as_u16(), e.param.as_deref()), (400, Some("frobnicate")));
        let e = chat(r#"{"model": "m", "messages": [], "tools": [{"type": "function"}]}"#).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("tools"));
        assert!(e.message.contains("not supported"));
        let e = chat(r#"{"model": "m", "messages": [{"role": "user", "content": "x", "mood": 1}]}"#).unwrap_err();
        assert!(e.message.contains("mood"), "{}", e.message);
    }

    #[test]
    fn ranges_are_checked() {
        let opts = |extra: &str| chat(&format!(r#"{{"model": "m", "messages": [{{"role": "user", "content": "x"}}] {extra}}}"#)).unwrap().options();
        assert_eq!(opts(r#", "max_tokens": -1"#).unwrap_err().param.as_deref(), Some("max_tokens"));
        assert_eq!(opts(r#", "temperature": -0.5"#).unwrap_err().param.as_deref(), Some("temperature"));
        assert_eq!(opts(r#", "n": 0"#).unwrap_err().param.as_deref(), Some("n"));
        assert_eq!(opts(r#", "top_logprobs": 3"#).unwrap_err().param.as_deref(), Some("top_logprobs"));
        assert_eq!(opts(r#", "logit_bias": {"abc": 1}"#).unwrap_err().param.as_deref(), Some("logit_bias"));
        let ok = opts(r#", "max_tokens": 5, "temperature": 0, "stop": "\n", "n": 2, "logprobs": true, "top_logprobs": 3, "seed": 7"#).unwrap();
        assert_eq!((ok.max_tokens, ok.n, ok.logprobs, ok.params.seed), (Some(5), 2, Some(3), Some(7)));
        assert_eq!(ok.stop, vec!["\n".to_string()]);
    }

    #[test]
    fn messages_become_template_input() {
        let r = chat(r#"{"model": "m", "messages": [{"role": "developer", "content": "be brief"}, {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]}"#).unwrap();
        let m = r.template_messages().unwrap();
        assert_eq!(m[0]["role"], "system");
        assert_eq!(m[1]["content"], "ab");
        let empty = chat(r#"{"model": "m", "messages": []}"#).unwrap();
        assert_eq!(empty.template_messages().unwrap_err().param.as_deref(), Some("messages"));
        let image = chat(r#"{"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}"#).unwrap();
        assert!(image.template_messages().is_err());
    }

    #[test]
    fn completion_prompts_take_every_form() {
        for body in [r#""hi""#, r#"["a", "b"]"#, "[1, 2, 3]", "[[1], [2, 3]]"] {
            let r = parse_completion(format!(r#"{{"model": "m", "prompt": {body}}}"#).as_bytes()).unwrap();
            assert_eq!(r.options().unwrap().max_tokens, Some(16));
        }
        assert_eq!(parse_completion(br#"{"model": "m", "prompt": "x", "echo": true}"#).unwrap_err().param.as_deref(), Some("echo"));
    }
}
