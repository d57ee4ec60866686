//! Prompt building for the handlers: request limits, the chat prompt (contents never become
//! control tokens), and a small pool that runs parsing, rendering and tokenizing off the two
//! async workers, which only route, queue and stream (so /health answers while a 10,000-message
//! conversation is tokenized).

use std::sync::LazyLock;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::http::StatusCode;
use serde_json::Value;
use tokio::sync::Semaphore;

use super::AppState;
use super::error::ApiError;
use super::openai::{Content, Message};
use crate::tokenizer::{self, ChatPrompt, ChatPromptError, ChatPromptOptions};

/// Most messages in one conversation.
pub const MAX_MESSAGES: usize = 10_000;
/// Most content parts across a request's messages.
pub const MAX_CONTENT_PARTS: usize = 10_000;
/// Longest `name` of a message, in characters.
pub const MAX_NAME_CHARS: usize = 256;
/// Most prompts in one legacy completions request.
pub const MAX_PROMPTS: usize = 1_024;
/// Default of `--max-request-bytes`.
pub const DEFAULT_MAX_REQUEST_BYTES: usize = 32 << 20;

/// Prompt jobs running at once: one per core (at least two), so a burst of huge requests
/// queues here instead of taking every core from the workers and the engine.
static SLOTS: LazyLock<Semaphore> =
    LazyLock::new(|| Semaphore::new(std::thread::available_parallelism().map_or(2, |n| n.get().max(2))));

/// Runs `work` (parsing, rendering, tokenizing: anything that grows with the request) on
/// tokio's blocking pool, at most `SLOTS` at once. If the client goes away while it waits for a
/// slot, it never starts.
pub async fn off_worker<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    let permit = SLOTS.acquire().await.map_err(|_| ApiError::shutting_down())?;
    let result = tokio::task::spawn_blocking(move || {
        let _permit = permit;
        work()
    })
    .await;
    result.map_err(|e| ApiError::internal(format!("preparing the prompt failed: {e}")))?
}

/// The request body, or an OpenAI-shaped error: 413 past `--max-request-bytes`.
pub fn body(body: Result<Bytes, BytesRejection>, limit: usize) -> Result<Bytes, ApiError> {
    body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError {
                status: StatusCode::PAYLOAD_TOO_LARGE,
                code: Some("request_too_large"),
                ..ApiError::bad_request(format!(
                    "The request body is larger than {limit} bytes (the server's --max-request-bytes)"
                ))
            }
        } else {
            ApiError::bad_request(format!("Cannot read the request body: {}", rejection.body_text()))
        }
    })
}

/// Limits on a conversation, checked before any of it is rendered.
pub fn check_messages(messages: &[Message]) -> Result<(), ApiError> {
    if messages.len() > MAX_MESSAGES {
        return Err(ApiError::invalid_param(
            "messages",
            format!("'messages' holds {} messages; at most {MAX_MESSAGES} are accepted", messages.len()),
        ));
    }
    let mut parts = 0;
    for (i, m) in messages.iter().enumerate() {
        if let Some(name) = &m.name
            && name.chars().count() > MAX_NAME_CHARS
        {
            return Err(ApiError::invalid_param(
                &format!("messages[{i}].name"),
                format!("a message's name must be at most {MAX_NAME_CHARS} characters"),
            ));
        }
        if let Some(Content::Parts(p)) = &m.content {
            parts += p.len();
            if parts > MAX_CONTENT_PARTS {
                return Err(ApiError::invalid_param(
                    &format!("messages[{i}].content"),
                    format!("the messages hold more than {MAX_CONTENT_PARTS} content parts"),
                ));
            }
        }
    }
    Ok(())
}

pub fn check_prompt_count(count: usize) -> Result<(), ApiError> {
    if count > MAX_PROMPTS {
        return Err(ApiError::invalid_param(
            "prompt",
            format!("'prompt' holds {count} prompts; at most {MAX_PROMPTS} are accepted"),
        ));
    }
    Ok(())
}

/// Bytes of prompt text past which it cannot fit the context, whatever it tokenizes to.
fn max_prompt_bytes(state: &AppState) -> Option<usize> {
    state.tokenizer.max_token_bytes().map(|m| m.saturating_mul(state.max_context))
}

fn too_long(param: &str, state: &AppState, bytes: usize) -> ApiError {
    let tokens = bytes / state.tokenizer.max_token_bytes().unwrap_or(1).max(1);
    ApiError::invalid_param(
        param,
        format!(
            "This model's maximum context length is {} tokens, but the prompt has at least {tokens} tokens ({bytes} bytes of text)",
            state.max_context
        ),
    )
}

/// Refuses a text prompt too long for the context before it is tokenized: tokenizing takes
/// memory many times the text's size (8 MiB: 1.3 GB and 20 s), and the body limit alone
/// allows 32 MiB. /tokenize too: no prompt this long can be run.
pub fn check_text_fits(state: &AppState, param: &str, text: &str) -> Result<(), ApiError> {
    match max_prompt_bytes(state) {
        Some(limit) if text.len() > limit => Err(too_long(param, state, text.len())),
        _ => Ok(()),
    }
}

/// Renders and tokenizes a conversation (`template_messages`' output) with the model's
/// template; special-token text in contents stays text unless the server allows it. A
/// rendering too long for the context is refused before it is tokenized.
pub fn chat(
    state: &AppState,
    messages: &[Value],
    add_generation_prompt: bool,
    bos: bool,
    turn_ends: bool,
) -> Result<ChatPrompt, ApiError> {
    let template = state
        .template
        .as_ref()
        .ok_or_else(|| ApiError::bad_request("This model has no chat template; use /v1/completions"))?;
    if !state.tokenizer.has_vocabulary() {
        return Err(ApiError::bad_request(
            "This model has no vocabulary (dummy weights); use /v1/completions with token ids",
        ));
    }
    let options = ChatPromptOptions {
        add_generation_prompt,
        bos,
        allow_special_in_content: state.allow_special_in_content,
        turn_ends,
        max_text_bytes: max_prompt_bytes(state),
    };
    tokenizer::chat_prompt(template, &state.tokenizer, messages, options).map_err(|e| match e {
        ChatPromptError::Template(e) => ApiError::invalid_param("messages", e.to_string()),
        ChatPromptError::SpecialText { message, field, .. } => {
            ApiError::invalid_param(&format!("messages[{message}].{field}"), e.to_string())
        }
        ChatPromptError::TooLong { bytes } => too_long("messages", state, bytes),
        ChatPromptError::Tokenizer(e) => ApiError::internal(e),
    })
}
