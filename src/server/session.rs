//! Sessions: a conversation named by the client (`X-Session-ID`, or OpenAI's `user` field)
//! keeps its cached blocks longer than anonymous requests, and within it, the system prompt
//! longest, then user turns, then assistant turns. The same header lets a load balancer keep a
//! conversation on the replica that holds its cache.

use axum::http::HeaderMap;
use serde_json::Value;

use super::error::ApiError;
use crate::engine::{Retention, RetentionPlan};
use crate::tokenizer::{ChatTemplate, TextTokenizer};

pub const SESSION_HEADER: &str = "x-session-id";
/// Longest session id accepted (longer ones are refused, not cut: two would collide).
pub const MAX_SESSION_ID: usize = 256;

/// The request's session id: the header if present, else a non-empty `user` field.
pub fn session_id(headers: &HeaderMap, user: Option<&str>) -> Result<Option<String>, ApiError> {
    let (id, param) = match headers.get(SESSION_HEADER) {
        Some(v) => (v.to_str().map_err(|_| ApiError::invalid_param("X-Session-ID", "X-Session-ID must be visible ASCII text"))?, "X-Session-ID"),
        None => match user {
            Some(u) if !u.is_empty() => (u, "user"),
            _ => return Ok(None),
        },
    };
    if id.is_empty() || id.chars().count() > MAX_SESSION_ID {
        return Err(ApiError::invalid_param(param, format!("a session id must be 1 to {MAX_SESSION_ID} characters, not {}", id.chars().count())));
    }
    Ok(Some(id.to_string()))
}

fn class_of_role(role: &str) -> Retention {
    match role {
        "system" => Retention::System,
        "user" => Retention::User,
        _ => Retention::Assistant,
    }
}

/// Retention classes for a chat prompt of `prompt_len` tokens: each message's tokens take its
/// role's class. Message boundaries come from rendering and tokenizing each prefix of the
/// conversation; a template that cannot render a prefix gives the whole prompt the user class.
pub fn chat_plan(template: &ChatTemplate, tokenizer: &TextTokenizer, messages: &[Value], prompt_len: usize) -> RetentionPlan {
    let mut spans = Vec::with_capacity(messages.len() + 1);
    for i in 0..messages.len() {
        let Ok(text) = template.render(&messages[..=i].to_vec(), false) else {
            return RetentionPlan::uniform(prompt_len, Retention::User);
        };
        let Ok(ids) = tokenizer.encode_prompt(&text) else {
            return RetentionPlan::uniform(prompt_len, Retention::User);
        };
        let role = messages[i]["role"].as_str().unwrap_or("user");
        spans.push((ids.len().min(prompt_len), class_of_role(role)));
    }
    // The generation prompt opens the assistant's turn.
    spans.push((prompt_len, Retention::Assistant));
    RetentionPlan { spans, generated: Retention::Assistant }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_header_wins_and_long_ids_are_refused() {
        let mut headers = HeaderMap::new();
        assert_eq!(session_id(&headers, None).unwrap(), None);
        assert_eq!(session_id(&headers, Some("")).unwrap(), None);
        assert_eq!(session_id(&headers, Some("alice")).unwrap().as_deref(), Some("alice"));
        headers.insert(SESSION_HEADER, "conv-1".parse().unwrap());
        assert_eq!(session_id(&headers, Some("alice")).unwrap().as_deref(), Some("conv-1"));
        headers.insert(SESSION_HEADER, "x".repeat(257).parse().unwrap());
        assert_eq!(session_id(&headers, None).unwrap_err().body()["error"]["param"], "X-Session-ID");
        assert_eq!(session_id(&HeaderMap::new(), Some(&"u".repeat(300))).unwrap_err().body()["error"]["param"], "user");
    }
}
