//! Response bodies, as sent: completions and their stream chunks (OpenAI's), models, tokenize
//! (vLLM's), health and the error body. Fields are in OpenAI's order; a field that OpenAI sends
//! as `null` is an `Option` here and is sent as `null`, never left out (`usage` in stream
//! chunks is the one field that may also be absent: see `ChatCompletionChunk::usage`).
//!
//! Log-probabilities are f32 in the engine and f64 here: the f32 widened exactly, as the JSON
//! always carried them (a logprob of -inf, which JSON cannot write, is sent as `null`).

use std::collections::BTreeMap;

use serde::Serialize;
use utoipa::ToSchema;

/// A type of one value, for a field that always holds that value (`"object"`, `"role"`,
/// `"status"`): the schema lists it as the field's only value.
macro_rules! tag {
    // (`tt`, not `literal`: the derive must see the literal itself to name the value.)
    ($(#[$doc:meta])* $name:ident = $value:tt) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
        pub enum $name {
            #[serde(rename = $value)]
            Tag,
        }
    };
}

tag!(/// `"chat.completion"`.
    ChatCompletionObject = "chat.completion");
tag!(/// `"chat.completion.chunk"`.
    ChatCompletionChunkObject = "chat.completion.chunk");
tag!(/// `"text_completion"` (responses and stream chunks alike).
    TextCompletionObject = "text_completion");
tag!(/// `"list"`.
    ListObject = "list");
tag!(/// `"model"`.
    ModelObject = "model");
tag!(/// `"assistant"`: the role of every generated message.
    AssistantRole = "assistant");
tag!(/// `"ok"`.
    HealthOk = "ok");
tag!(/// `"error"`.
    HealthError = "error");

/// Why a choice ended: `stop` (an end-of-sequence token or a stop string), `length`
/// (`max_tokens` or the context), `abort` (the server let go of it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum FinishReason {
    Stop,
    Length,
    Abort,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stop => "stop",
            Self::Length => "length",
            Self::Abort => "abort",
        }
    }
}

impl From<crate::engine::FinishReason> for FinishReason {
    fn from(reason: crate::engine::FinishReason) -> Self {
        match reason {
            crate::engine::FinishReason::Stop => Self::Stop,
            crate::engine::FinishReason::Length => Self::Length,
            crate::engine::FinishReason::Abort => Self::Abort,
        }
    }
}

/// Tokens a request used.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Usage {
    /// Of every prompt (a completions request may hold several).
    pub prompt_tokens: usize,
    /// Of every choice, end-of-sequence tokens included.
    pub completion_tokens: usize,
    pub total_tokens: usize,
    pub prompt_tokens_details: PromptTokensDetails,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct PromptTokensDetails {
    /// Prompt tokens served from the prefix cache (memory or disk), counted once per prompt.
    pub cached_tokens: usize,
}

/// One alternative to a chat token.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct TopLogprob {
    pub token: String,
    pub logprob: f64,
    /// The token's text as UTF-8 bytes.
    pub bytes: Vec<u8>,
}

/// One generated chat token, with its alternatives.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct TokenLogprob {
    pub token: String,
    pub logprob: f64,
    /// The token's text as UTF-8 bytes.
    pub bytes: Vec<u8>,
    /// The most likely tokens at this position, most likely first (`top_logprobs` of them).
    pub top_logprobs: Vec<TopLogprob>,
}

/// A chat choice's log-probabilities (`logprobs: true`).
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ChatLogprobs {
    pub content: Vec<TokenLogprob>,
}

/// A completions choice's log-probabilities (`logprobs: k`), one entry per token in each list.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct CompletionLogprobs {
    pub tokens: Vec<String>,
    pub token_logprobs: Vec<f64>,
    /// The k most likely tokens at each position: text to logprob (tokens of the same text
    /// share one entry).
    pub top_logprobs: Vec<BTreeMap<String, f64>>,
    /// Each token's byte offset in the choice's text.
    pub text_offset: Vec<usize>,
}

/// The generated message of a chat choice.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct AssistantMessage {
    pub role: AssistantRole,
    pub content: String,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ChatChoice {
    pub index: usize,
    pub message: AssistantMessage,
    #[schema(required = true)]
    pub logprobs: Option<ChatLogprobs>,
    pub finish_reason: FinishReason,
}

/// POST /v1/chat/completions (without `stream`).
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ChatCompletion {
    pub id: String,
    pub object: ChatCompletionObject,
    /// Unix time in seconds.
    pub created: u64,
    pub model: String,
    pub system_fingerprint: String,
    pub choices: Vec<ChatChoice>,
    pub usage: Usage,
}

/// A piece of a streamed chat message: the first chunk of each choice carries the role and
/// empty content, later ones only content.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ChatDelta {
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = AssistantRole)]
    pub role: Option<AssistantRole>,
    pub content: String,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ChatChunkChoice {
    pub index: usize,
    pub delta: ChatDelta,
    /// The logprobs of this chunk's tokens.
    #[schema(required = true)]
    pub logprobs: Option<ChatLogprobs>,
    /// Set in the choice's last chunk.
    #[schema(required = true)]
    pub finish_reason: Option<FinishReason>,
}

/// One server-sent event of a streamed chat completion (`stream: true`); the stream ends with
/// `data: [DONE]`.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ChatCompletionChunk {
    pub id: String,
    pub object: ChatCompletionChunkObject,
    pub created: u64,
    pub model: String,
    pub system_fingerprint: String,
    /// One choice's piece; empty in the usage chunk.
    pub choices: Vec<ChatChunkChoice>,
    /// Only with `stream_options.include_usage`: null in every chunk but the last, whose
    /// `choices` are empty and which carries the request's usage. Absent otherwise.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Usage>)]
    pub usage: Option<Option<Usage>>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct CompletionChoice {
    /// Choices come `n` per prompt, prompt by prompt.
    pub index: usize,
    pub text: String,
    #[schema(required = true)]
    pub logprobs: Option<CompletionLogprobs>,
    pub finish_reason: FinishReason,
}

/// POST /v1/completions (without `stream`).
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct TextCompletion {
    pub id: String,
    pub object: TextCompletionObject,
    /// Unix time in seconds.
    pub created: u64,
    pub model: String,
    pub system_fingerprint: String,
    pub choices: Vec<CompletionChoice>,
    pub usage: Usage,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct CompletionChunkChoice {
    pub index: usize,
    /// This chunk's piece of the choice's text.
    pub text: String,
    /// The logprobs of this chunk's tokens (`text_offset` counts from the choice's start).
    #[schema(required = true)]
    pub logprobs: Option<CompletionLogprobs>,
    /// Set in the choice's last chunk.
    #[schema(required = true)]
    pub finish_reason: Option<FinishReason>,
}

/// One server-sent event of a streamed completion (`stream: true`); the stream ends with
/// `data: [DONE]`.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct TextCompletionChunk {
    pub id: String,
    pub object: TextCompletionObject,
    pub created: u64,
    pub model: String,
    pub system_fingerprint: String,
    /// One choice's piece; empty in the usage chunk.
    pub choices: Vec<CompletionChunkChoice>,
    /// As in `ChatCompletionChunk`: null, then the usage in the last chunk, with
    /// `stream_options.include_usage`; absent otherwise.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Usage>)]
    pub usage: Option<Option<Usage>>,
}

/// The served model.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ModelCard {
    /// The name to send as `model`.
    pub id: String,
    pub object: ModelObject,
    /// Unix time in seconds when the server started.
    pub created: u64,
    pub owned_by: String,
    /// The context length: prompt and output tokens together.
    pub max_model_len: usize,
}

/// GET /v1/models.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ModelList {
    pub object: ListObject,
    pub data: Vec<ModelCard>,
}

/// POST /tokenize.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct TokenizeResponse {
    pub tokens: Vec<u32>,
    pub count: usize,
    pub max_model_len: usize,
}

/// POST /detokenize.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct DetokenizeResponse {
    /// The tokens' text.
    pub prompt: String,
}

/// GET /health while the engine serves.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Health {
    pub status: HealthOk,
    /// Requests the engine is running.
    pub running: usize,
    /// Requests waiting: for a slot, and in the engine's queue.
    pub waiting: usize,
    /// This replica's name (`--replica-id`, else the listening address).
    pub replica: String,
}

/// GET /health (503) once the engine has stopped: the server is shutting down.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct HealthFailure {
    pub status: HealthError,
    /// Why the engine stopped.
    pub reason: String,
    pub replica: String,
}

/// The body of every 4xx and 5xx answer, and the last event of a stream that fails.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ErrorDetail {
    pub message: String,
    /// `invalid_request_error`, `rate_limit_error` or `server_error`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The request field at fault, if one is.
    #[schema(required = true)]
    pub param: Option<String>,
    /// A machine-readable reason, for some errors (`model_not_found`, `invalid_api_key`,
    /// `queue_full`, `queue_timeout`).
    #[schema(required = true)]
    pub code: Option<String>,
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn usage() -> Usage {
        Usage {
            prompt_tokens: 7,
            completion_tokens: 3,
            total_tokens: 10,
            prompt_tokens_details: PromptTokensDetails { cached_tokens: 4 },
        }
    }

    /// A logprob as the engine makes it: an f32.
    const LP: f32 = -0.1;

    #[test]
    fn a_chat_completion_is_openais_shape() {
        let body = ChatCompletion {
            id: "chatcmpl-1".into(),
            object: ChatCompletionObject::Tag,
            created: 1700000000,
            model: "m".into(),
            system_fingerprint: "braid-0".into(),
            choices: vec![ChatChoice {
                index: 0,
                message: AssistantMessage { role: AssistantRole::Tag, content: "Hi".into() },
                logprobs: Some(ChatLogprobs {
                    content: vec![TokenLogprob {
                        token: "Hi".into(),
                        logprob: LP.into(),
                        bytes: b"Hi".to_vec(),
                        top_logprobs: vec![TopLogprob {
                            token: "Hi".into(),
                            logprob: LP.into(),
                            bytes: b"Hi".to_vec(),
                        }],
                    }],
                }),
                finish_reason: FinishReason::Length,
            }],
            usage: usage(),
        };
        // (As the body was built by hand before it was typed: the f32 logprob widened.)
        let expected = json!({
            "id": "chatcmpl-1", "object": "chat.completion", "created": 1700000000, "model": "m", "system_fingerprint": "braid-0",
            "choices": [{
                "index": 0, "message": {"role": "assistant", "content": "Hi"},
                "logprobs": {"content": [{"token": "Hi", "logprob": LP, "bytes": [72, 105], "top_logprobs": [{"token": "Hi", "logprob": LP, "bytes": [72, 105]}]}]},
                "finish_reason": "length",
            }],
            "usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10, "prompt_tokens_details": {"cached_tokens": 4}},
        });
        assert_eq!(serde_json::to_value(&body).unwrap(), expected);
        // The field order is OpenAI's, and the number the same text.
        let text = serde_json::to_string(&body).unwrap();
        assert!(
            text.starts_with(r#"{"id":"chatcmpl-1","object":"chat.completion","created":1700000000,"model":"m","#),
            "{text}"
        );
        assert!(text.contains(r#""logprob":-0.10000000149011612,"#), "{text}");
        // A logprob JSON cannot write is null, as before.
        assert_eq!(
            serde_json::to_string(&TopLogprob {
                token: String::new(),
                logprob: f32::NEG_INFINITY.into(),
                bytes: vec![]
            })
            .unwrap(),
            r#"{"token":"","logprob":null,"bytes":[]}"#
        );
    }

    #[test]
    fn stream_chunks_keep_their_nulls_and_leave_out_usage_unless_asked() {
        let chunk = |role, finish, usage| ChatCompletionChunk {
            id: "c".into(),
            object: ChatCompletionChunkObject::Tag,
            created: 1,
            model: "m".into(),
            system_fingerprint: "f".into(),
            choices: vec![ChatChunkChoice {
                index: 0,
                delta: ChatDelta { role, content: String::new() },
                logprobs: None,
                finish_reason: finish,
            }],
            usage,
        };
        assert_eq!(
            serde_json::to_string(&chunk(Some(AssistantRole::Tag), None, None)).unwrap(),
            r#"{"id":"c","object":"chat.completion.chunk","created":1,"model":"m","system_fingerprint":"f","choices":[{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}]}"#
        );
        // With include_usage: `"usage": null` until the last chunk.
        let value = serde_json::to_value(chunk(None, Some(FinishReason::Stop), Some(None))).unwrap();
        assert_eq!(value["usage"], serde_json::Value::Null);
        assert!(value.as_object().unwrap().contains_key("usage"));
        assert_eq!(
            value["choices"][0],
            json!({"index": 0, "delta": {"content": ""}, "logprobs": null, "finish_reason": "stop"})
        );

        let text = TextCompletionChunk {
            id: "cmpl-1".into(),
            object: TextCompletionObject::Tag,
            created: 1,
            model: "m".into(),
            system_fingerprint: "f".into(),
            choices: vec![CompletionChunkChoice {
                index: 1,
                text: " world".into(),
                logprobs: Some(CompletionLogprobs {
                    tokens: vec![" world".into()],
                    token_logprobs: vec![LP.into()],
                    top_logprobs: vec![BTreeMap::from([
                        (" world".to_string(), LP.into()),
                        (" there".to_string(), (-2.5f32).into()),
                    ])],
                    text_offset: vec![5],
                }),
                finish_reason: None,
            }],
            usage: None,
        };
        assert_eq!(
            serde_json::to_value(&text).unwrap(),
            json!({
                "id": "cmpl-1", "object": "text_completion", "created": 1, "model": "m", "system_fingerprint": "f",
                "choices": [{"index": 1, "text": " world", "finish_reason": null,
                    "logprobs": {"tokens": [" world"], "token_logprobs": [LP], "top_logprobs": [{" there": -2.5, " world": LP}], "text_offset": [5]}}],
            })
        );
        let last = TextCompletionChunk { choices: Vec::new(), usage: Some(Some(usage())), ..text };
        assert_eq!(serde_json::to_value(&last).unwrap()["usage"]["prompt_tokens_details"], json!({"cached_tokens": 4}));
    }

    #[test]
    fn the_small_bodies() {
        let models = ModelList {
            object: ListObject::Tag,
            data: vec![ModelCard {
                id: "m".into(),
                object: ModelObject::Tag,
                created: 5,
                owned_by: "braid".into(),
                max_model_len: 8192,
            }],
        };
        assert_eq!(
            serde_json::to_value(models).unwrap(),
            json!({"object": "list", "data": [{"id": "m", "object": "model", "created": 5, "owned_by": "braid", "max_model_len": 8192}]})
        );
        let health = Health { status: HealthOk::Tag, running: 1, waiting: 2, replica: "r".into() };
        assert_eq!(
            serde_json::to_value(health).unwrap(),
            json!({"status": "ok", "running": 1, "waiting": 2, "replica": "r"})
        );
        let failure = HealthFailure { status: HealthError::Tag, reason: "boom".into(), replica: "r".into() };
        assert_eq!(
            serde_json::to_value(failure).unwrap(),
            json!({"status": "error", "reason": "boom", "replica": "r"})
        );
        let error = ErrorBody {
            error: ErrorDetail { message: "no".into(), kind: "invalid_request_error".into(), param: None, code: None },
        };
        assert_eq!(
            serde_json::to_value(error).unwrap(),
            json!({"error": {"message": "no", "type": "invalid_request_error", "param": null, "code": null}})
        );
        assert_eq!(
            serde_json::to_value(TokenizeResponse { tokens: vec![1, 2], count: 2, max_model_len: 9 }).unwrap(),
            json!({"tokens": [1, 2], "count": 2, "max_model_len": 9})
        );
        assert_eq!(serde_json::to_value(DetokenizeResponse { prompt: "x".into() }).unwrap(), json!({"prompt": "x"}));
    }
}
