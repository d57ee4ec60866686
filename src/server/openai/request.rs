//! Request bodies, parsed strictly (an unknown or unsupported field is a 400 naming it, never
//! silently ignored) into braid's own `GenerationOptions`. The types' `ToSchema` derives (with
//! the ranges `options` checks) make the OpenAPI document's request bodies (openapi.rs).

use std::collections::HashMap;

use serde::Deserialize;
use utoipa::ToSchema;
use utoipa::openapi::RefOr;
use utoipa::openapi::schema::{
    AdditionalProperties, ArrayBuilder, ObjectBuilder, OneOfBuilder, Schema, SchemaType, Type,
};

use crate::engine::SamplingParams;
use crate::server::ApiError;

/// Fields of OpenAI's API that braid does not implement yet.
const UNSUPPORTED_CHAT: &[&str] = &[
    "tools",
    "tool_choice",
    "functions",
    "function_call",
    "parallel_tool_calls",
    "response_format",
    "audio",
    "modalities",
    "prediction",
    "store",
    "metadata",
    "service_tier",
    "reasoning_effort",
    "web_search_options",
];
const UNSUPPORTED_COMPLETION: &[&str] = &["echo", "suffix", "best_of", "response_format"];

/// Fields of `CommonFields` (serde cannot refuse unknown fields through `flatten`, so the
/// known ones are listed and checked by hand).
pub(in crate::server) const COMMON: &[&str] = &[
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "logit_bias",
    "seed",
    "stop",
    "n",
    "ignore_eos",
    "user",
    "stream",
    "stream_options",
];
pub(in crate::server) const CHAT: &[&str] = &["model", "messages", "max_completion_tokens", "logprobs", "top_logprobs"];
pub(in crate::server) const COMPLETION: &[&str] = &["model", "prompt", "logprobs"];

/// Most choices per request, and most alternatives per token (the schemas' `maximum`s are
/// these numbers as literals: `openapi::tests` checks they agree).
pub const MAX_N: usize = 16;
pub const MAX_TOP_LOGPROBS: usize = 20;
/// Most stop strings, and the longest one in bytes (each is looked for in the text after every
/// token: a long one costs every token of the request).
pub const MAX_STOPS: usize = 16;
pub const MAX_STOP_BYTES: usize = 256;

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StreamOptions {
    /// Send one last chunk with the usage (its `choices` empty) before `[DONE]`.
    pub include_usage: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum StopField {
    One(String),
    Many(Vec<String>),
}

/// Sampling fields common to both endpoints.
#[derive(Debug, Default, Deserialize, ToSchema)]
pub struct CommonFields {
    /// Most tokens to generate (the prompt and these must fit the context). Default: up to the
    /// end of the context (chat), 16 (completions).
    #[schema(minimum = 1)]
    pub max_tokens: Option<i64>,
    /// Below 1e-5 (0 included) the most likely token is taken (greedy). Default 1.
    #[schema(minimum = 0, maximum = 2)]
    pub temperature: Option<f64>,
    /// Keep the most likely tokens whose probabilities reach this much. Default 1 (off).
    #[schema(exclusive_minimum = 0, maximum = 1)]
    pub top_p: Option<f64>,
    /// Keep the k most likely tokens; -1 or 0 is off.
    #[schema(minimum = -1)]
    pub top_k: Option<i64>,
    /// Keep tokens at least this likely relative to the most likely one. Default 0 (off).
    #[schema(minimum = 0, maximum = 1)]
    pub min_p: Option<f64>,
    #[schema(minimum = -2, maximum = 2)]
    pub presence_penalty: Option<f64>,
    #[schema(minimum = -2, maximum = 2)]
    pub frequency_penalty: Option<f64>,
    /// Above 1 discourages tokens of the prompt and output (vLLM's). Default 1 (off).
    #[schema(minimum = 0.01, maximum = 10)]
    pub repetition_penalty: Option<f64>,
    #[schema(schema_with = logit_bias_schema)]
    pub logit_bias: Option<HashMap<String, f64>>,
    /// Makes sampling reproducible (choice i of `n` uses seed + i).
    pub seed: Option<i64>,
    #[schema(schema_with = stop_schema)]
    pub stop: Option<StopField>,
    /// Choices to generate.
    #[schema(minimum = 1, maximum = 16)]
    pub n: Option<i64>,
    /// Keep generating past the model's end-of-sequence tokens.
    pub ignore_eos: Option<bool>,
    /// A session id: the conversation's KV blocks are kept for its next turn.
    pub user: Option<String>,
    /// Answer with server-sent events, one chunk per piece of text, then `data: [DONE]`.
    pub stream: Option<bool>,
    /// Only with `stream: true`.
    pub stream_options: Option<StreamOptions>,
}

/// `logit_bias`: token id (decimal, inside the vocabulary) to a bias added to its logit.
fn logit_bias_schema() -> impl Into<RefOr<Schema>> {
    let bias = ObjectBuilder::new().schema_type(Type::Number).minimum(Some(-100)).maximum(Some(100));
    ObjectBuilder::new()
        .schema_type(SchemaType::Array(vec![Type::Object, Type::Null]))
        .property_names(Some(ObjectBuilder::new().schema_type(Type::String).pattern(Some("^[0-9]{1,10}$"))))
        .additional_properties(Some(AdditionalProperties::RefOr(RefOr::T(bias.into()))))
        .description(Some(
            "Token id (a decimal string, below the vocabulary size) to a bias from -100 to 100 added to its logit",
        ))
}

/// `stop`: one string or a list of them, each non-empty and at most `MAX_STOP_BYTES` bytes.
fn stop_schema() -> impl Into<RefOr<Schema>> {
    let one = || ObjectBuilder::new().schema_type(Type::String).min_length(Some(1)).max_length(Some(MAX_STOP_BYTES));
    OneOfBuilder::new()
        .item(one())
        .item(ArrayBuilder::new().items(one()).max_items(Some(MAX_STOPS)))
        .item(ObjectBuilder::new().schema_type(Type::Null))
        .description(Some(format!(
            "Text that ends a choice (not included in it): one string or up to {MAX_STOPS}, each at most {MAX_STOP_BYTES} bytes of UTF-8"
        )))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ContentPart {
    /// Only `text` parts are supported.
    #[serde(rename = "type")]
    #[schema(pattern = "^text$")]
    pub kind: String,
    #[schema(value_type = String, required = true)]
    pub text: Option<String>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Message {
    /// `system`, `user`, `assistant`, or `developer` (a system message).
    #[schema(pattern = "^(system|user|assistant|developer)$")]
    pub role: String,
    #[schema(value_type = Content, required = true)]
    pub content: Option<Content>,
    pub name: Option<String>,
}

/// POST /v1/chat/completions.
#[derive(Debug, Deserialize, ToSchema)]
pub struct ChatRequest {
    /// The served model's name (GET /v1/models).
    pub model: String,
    #[schema(min_items = 1)]
    pub messages: Vec<Message>,
    /// The same as `max_tokens` (give only one).
    #[schema(minimum = 1)]
    pub max_completion_tokens: Option<i64>,
    /// Report each token's log-probability.
    pub logprobs: Option<bool>,
    /// Alternatives to report with each token (needs `logprobs: true`).
    #[schema(minimum = 0, maximum = 20)]
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

/// Marks a token id's schema: the served document bounds it by the model's vocabulary.
pub const TOKEN_ID: &str = "A token id (below the vocabulary size)";

fn token_id_schema() -> ObjectBuilder {
    ObjectBuilder::new().schema_type(Type::Integer).minimum(Some(0)).maximum(Some(u32::MAX)).description(Some(TOKEN_ID))
}

/// `prompt`: text, texts, token ids, or lists of token ids (one choice group per prompt).
fn prompt_schema() -> impl Into<RefOr<Schema>> {
    let text = || ObjectBuilder::new().schema_type(Type::String).min_length(Some(1));
    let ids = || ArrayBuilder::new().items(token_id_schema()).min_items(Some(1));
    OneOfBuilder::new()
        .item(text())
        .item(ArrayBuilder::new().items(text()).min_items(Some(1)))
        .item(ids())
        .item(ArrayBuilder::new().items(ids()).min_items(Some(1)))
        .description(Some("A text, a list of texts, a list of token ids, or a list of such lists"))
}

/// POST /v1/completions.
#[derive(Debug, Deserialize, ToSchema)]
pub struct CompletionRequest {
    /// The served model's name (GET /v1/models).
    pub model: String,
    #[schema(schema_with = prompt_schema, required = true)]
    pub prompt: PromptField,
    /// Report each token's log-probability with this many alternatives.
    #[schema(minimum = 0, maximum = 20)]
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
pub fn parse_body<T: serde::de::DeserializeOwned>(
    body: &[u8],
    unsupported: &[&str],
    known: &[&[&str]],
) -> Result<T, ApiError> {
    let mut value: serde_json::Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("The request body is not valid JSON: {e}")))?;
    integral_floats_as_integers(&mut value);
    let Some(object) = value.as_object() else {
        return Err(ApiError::bad_request("The request body must be a JSON object"));
    };
    if let Some(field) = unsupported.iter().find(|f| object.get(**f).is_some_and(|v| !v.is_null())) {
        return Err(ApiError::invalid_param(field, format!("'{field}' is not supported by braid")));
    }
    if let Some(field) = object
        .keys()
        .find(|k| !known.iter().any(|list| list.contains(&k.as_str())) && !unsupported.contains(&k.as_str()))
    {
        return Err(ApiError::invalid_param(field, format!("Unknown field '{field}'")));
    }
    serde_path_to_error::deserialize(&value).map_err(|e| {
        let message = e.inner().to_string();
        let path = e.path().to_string();
        // (An unknown field's path ends with its name.)
        let param = if path != "." {
            Some(path)
        } else {
            // Fields read through `#[serde(flatten)]` lose their path: read the common ones alone.
            let common: serde_json::Map<String, serde_json::Value> = object
                .iter()
                .filter(|(k, _)| COMMON.contains(&k.as_str()))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            serde_path_to_error::deserialize::<_, CommonFields>(&serde_json::Value::Object(common))
                .err()
                .map(|e| e.path().to_string())
                .filter(|p| p != ".")
        };
        let at = param.as_ref().map_or(String::new(), |p| format!("'{p}': "));
        ApiError { param, ..ApiError::bad_request(format!("Invalid request: {at}{message}")) }
    })
}

/// Numbers such as `16.0` as the integers they are: JSON (and JSON Schema's `integer`) does not
/// tell `16.0` from `16`, and serde refuses a float where an integer is due. (Float fields take
/// integers as they are.)
fn integral_floats_as_integers(value: &mut serde_json::Value) {
    match value {
        serde_json::Value::Number(n) if n.is_f64() => {
            let f = n.as_f64().unwrap_or(f64::NAN);
            // (i64's range, ends excluded: `as` saturates; beyond it the float stays, a 400.)
            if f.fract() == 0.0 && f > -9.2e18 && f < 9.2e18 {
                *value = serde_json::Value::from(f as i64);
            }
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(integral_floats_as_integers),
        serde_json::Value::Object(map) => map.values_mut().for_each(integral_floats_as_integers),
        _ => {}
    }
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
        Some(v) => Err(ApiError::invalid_param(
            param,
            format!("'{param}' must be between {} and {}, got {v}", range.start(), range.end()),
        )),
    }
}

impl CommonFields {
    /// Checks every field; `max_tokens` is the endpoint's own (chat also accepts
    /// `max_completion_tokens`) with the field's name, `logprobs` its reading of the logprobs
    /// fields; `vocab_size` bounds `logit_bias`'s token ids.
    pub fn options(
        &self,
        max_tokens: Option<(&str, i64)>,
        logprobs: Option<usize>,
        vocab_size: usize,
    ) -> Result<GenerationOptions, ApiError> {
        let max_tokens = match max_tokens {
            None => None,
            // (Past the context, which the prompt's length decides: a 400 there.)
            Some((_, v)) if v >= 1 => Some(usize::try_from(v).unwrap_or(usize::MAX)),
            Some((param, v)) => {
                return Err(ApiError::invalid_param(param, format!("'{param}' must be at least 1, got {v}")));
            }
        };
        let n = match self.n {
            None => 1,
            Some(v) if (1..=MAX_N as i64).contains(&v) => v as usize,
            Some(v) => return Err(ApiError::invalid_param("n", format!("'n' must be between 1 and {MAX_N}, got {v}"))),
        };
        // (Below the sampler's floor, 1e-5, a temperature is greedy.)
        let temperature = float("temperature", self.temperature, 1.0, 0.0..=2.0)?;
        if self.top_p.is_some_and(|v| v <= 0.0) {
            return Err(ApiError::invalid_param("top_p", "'top_p' must be greater than 0"));
        }
        // A positive top-p below f32's range keeps only the best tokens, as the smallest one does.
        let top_p = float("top_p", self.top_p, 1.0, 0.0..=1.0)?.max(f32::MIN_POSITIVE);
        let top_k = match self.top_k {
            None | Some(-1) | Some(0) => 0,
            Some(v) if v > 0 => v as usize,
            Some(v) => {
                return Err(ApiError::invalid_param("top_k", format!("'top_k' must be -1, 0 or positive, got {v}")));
            }
        };
        let min_p = float("min_p", self.min_p, 0.0, 0.0..=1.0)?;
        let presence_penalty = float("presence_penalty", self.presence_penalty, 0.0, -2.0..=2.0)?;
        let frequency_penalty = float("frequency_penalty", self.frequency_penalty, 0.0, -2.0..=2.0)?;
        let repetition_penalty = float("repetition_penalty", self.repetition_penalty, 1.0, 0.01..=10.0)?;
        let mut logit_bias = Vec::new();
        for (token, bias) in self.logit_bias.iter().flatten() {
            let id: u32 = token.parse().map_err(|_| {
                ApiError::invalid_param("logit_bias", format!("logit_bias key '{token}' is not a token id"))
            })?;
            if id as usize >= vocab_size {
                return Err(ApiError::invalid_param(
                    "logit_bias",
                    format!("logit_bias key '{token}' is outside the vocabulary (size {vocab_size})"),
                ));
            }
            if !(-100.0..=100.0).contains(bias) {
                return Err(ApiError::invalid_param(
                    "logit_bias",
                    format!("logit_bias values must be between -100 and 100, got {bias}"),
                ));
            }
            logit_bias.push((id, *bias as f32));
        }
        logit_bias.sort_by_key(|b| b.0);
        // Keys such as "7" and "07" name one token: its bias would count twice.
        if let Some(pair) = logit_bias.windows(2).find(|p| p[0].0 == p[1].0) {
            return Err(ApiError::invalid_param(
                "logit_bias",
                format!("logit_bias names token {} more than once", pair[0].0),
            ));
        }
        let stop = match &self.stop {
            None => Vec::new(),
            Some(StopField::One(s)) => vec![s.clone()],
            Some(StopField::Many(v)) => v.clone(),
        };
        if stop.len() > MAX_STOPS || stop.iter().any(String::is_empty) {
            return Err(ApiError::invalid_param("stop", format!("'stop' takes at most {MAX_STOPS} non-empty strings")));
        }
        if let Some(long) = stop.iter().find(|s| s.len() > MAX_STOP_BYTES) {
            return Err(ApiError::invalid_param(
                "stop",
                format!("each 'stop' string may be at most {MAX_STOP_BYTES} bytes, got one of {}", long.len()),
            ));
        }
        let seed = self.seed.map(|s| s as u64);
        let stream = self.stream.unwrap_or(false);
        if self.stream_options.is_some() && !stream {
            return Err(ApiError::invalid_param(
                "stream_options",
                "'stream_options' is only allowed with 'stream': true",
            ));
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
    pub fn options(&self, vocab_size: usize) -> Result<GenerationOptions, ApiError> {
        if self.common.max_tokens.is_some() && self.max_completion_tokens.is_some() {
            return Err(ApiError::invalid_param(
                "max_completion_tokens",
                "give only one of 'max_tokens' and 'max_completion_tokens'",
            ));
        }
        let top = match (self.logprobs, self.top_logprobs) {
            (_, Some(k)) if !(0..=MAX_TOP_LOGPROBS as i64).contains(&k) => {
                return Err(ApiError::invalid_param(
                    "top_logprobs",
                    format!("'top_logprobs' must be between 0 and {MAX_TOP_LOGPROBS}, got {k}"),
                ));
            }
            (Some(true), k) => Some(k.unwrap_or(0) as usize),
            (_, Some(_)) => {
                return Err(ApiError::invalid_param("top_logprobs", "'top_logprobs' requires 'logprobs': true"));
            }
            _ => None,
        };
        let max_tokens = match (self.max_completion_tokens, self.common.max_tokens) {
            (Some(v), _) => Some(("max_completion_tokens", v)),
            (None, v) => v.map(|v| ("max_tokens", v)),
        };
        self.common.options(max_tokens, top, vocab_size)
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
                        return Err(ApiError::invalid_param(
                            &format!("messages[{i}].role"),
                            format!("role '{other}' is not supported (system, user, assistant)"),
                        ));
                    }
                };
                let content = match &m.content {
                    None => {
                        return Err(ApiError::invalid_param(
                            &format!("messages[{i}].content"),
                            "message content is missing",
                        ));
                    }
                    Some(Content::Text(t)) => t.clone(),
                    Some(Content::Parts(parts)) => {
                        let mut text = String::new();
                        for part in parts {
                            match (part.kind.as_str(), &part.text) {
                                ("text", Some(t)) => text.push_str(t),
                                (kind, _) => {
                                    return Err(ApiError::invalid_param(
                                        &format!("messages[{i}].content"),
                                        format!("content part of type '{kind}' is not supported (text only)"),
                                    ));
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
    pub fn options(&self, vocab_size: usize) -> Result<GenerationOptions, ApiError> {
        let top = match self.logprobs {
            None => None,
            Some(k) if (0..=MAX_TOP_LOGPROBS as i64).contains(&k) => Some(k as usize),
            Some(k) => {
                return Err(ApiError::invalid_param(
                    "logprobs",
                    format!("'logprobs' must be between 0 and {MAX_TOP_LOGPROBS}, got {k}"),
                ));
            }
        };
        // Legacy completions default to 16 tokens, as OpenAI's do.
        let mut options =
            self.common.options(Some(("max_tokens", self.common.max_tokens.unwrap_or(16))), top, vocab_size)?;
        if self.common.max_tokens.is_none() {
            options.max_tokens = Some(16);
        }
        Ok(options)
    }
}

/// POST /tokenize (vLLM's): a text, or messages rendered by the chat template.
#[derive(serde::Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TokenizeRequest {
    pub model: Option<String>,
    pub prompt: Option<String>,
    pub messages: Option<Vec<Message>>,
    pub add_generation_prompt: Option<bool>,
}

/// POST /detokenize (vLLM's).
#[derive(serde::Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DetokenizeRequest {
    pub model: Option<String>,
    pub tokens: Vec<u32>,
}
