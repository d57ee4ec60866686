//! Sessions: a conversation named by the client (`X-Session-ID`, or OpenAI's `user` field)
//! keeps its cached blocks longer than anonymous requests, and within it, the system prompt
//! longest, then user turns, then assistant turns. The same header lets a load balancer keep a
//! conversation on the replica that holds its cache.

use axum::http::HeaderMap;
use serde_json::Value;

use super::error::ApiError;
use crate::engine::{Retention, RetentionPlan};

pub const SESSION_HEADER: &str = "x-session-id";
/// Longest session id accepted (longer ones are refused, not cut: two would collide).
pub const MAX_SESSION_ID: usize = 256;

/// The request's session id: the header if present, else a non-empty `user` field.
pub fn session_id(headers: &HeaderMap, user: Option<&str>) -> Result<Option<String>, ApiError> {
    let (id, param) = match headers.get(SESSION_HEADER) {
        Some(v) => (
            v.to_str()
                .map_err(|_| ApiError::invalid_param("X-Session-ID", "X-Session-ID must be visible ASCII text"))?,
            "X-Session-ID",
        ),
        None => match user {
            Some(u) if !u.is_empty() => (u, "user"),
            _ => return Ok(None),
        },
    };
    if id.is_empty() || id.chars().count() > MAX_SESSION_ID {
        return Err(ApiError::invalid_param(
            param,
            format!("a session id must be 1 to {MAX_SESSION_ID} characters, not {}", id.chars().count()),
        ));
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
/// role's class. `turn_ends` (from `tokenizer::chat_prompt`: one rendering, one tokenization)
/// gives where each message's turn ends; without them (a template that changes contents) the
/// whole prompt takes the user class.
pub fn chat_plan(messages: &[Value], turn_ends: Option<&[usize]>, prompt_len: usize) -> RetentionPlan {
    let Some(ends) = turn_ends.filter(|e| e.len() == messages.len()) else {
        return RetentionPlan::uniform(prompt_len, Retention::User);
    };
    let mut spans: Vec<(usize, Retention)> = Vec::with_capacity(messages.len() + 1);
    // Runs of one class are one span (the engine walks the spans for each block).
    let mut push = |end: usize, class| match spans.last_mut() {
        Some((last_end, last_class)) if *last_class == class => *last_end = end,
        _ => spans.push((end, class)),
    };
    for (message, &end) in messages.iter().zip(ends) {
        push(end.min(prompt_len), class_of_role(message["role"].as_str().unwrap_or("user")));
    }
    // The generation prompt opens the assistant's turn.
    push(prompt_len, Retention::Assistant);
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
        assert_eq!(session_id(&headers, None).unwrap_err().body().error.param.as_deref(), Some("X-Session-ID"));
        assert_eq!(
            session_id(&HeaderMap::new(), Some(&"u".repeat(300))).unwrap_err().body().error.param.as_deref(),
            Some("user")
        );
    }

    #[test]
    fn plans_follow_the_turns() {
        let messages = [
            serde_json::json!({"role": "system"}),
            serde_json::json!({"role": "user"}),
            serde_json::json!({"role": "assistant"}),
        ];
        let plan = chat_plan(&messages, Some(&[10, 20, 30]), 35);
        assert_eq!(plan.spans, vec![(10, Retention::System), (20, Retention::User), (35, Retention::Assistant)]);
        assert_eq!(chat_plan(&messages, None, 35).spans, RetentionPlan::uniform(35, Retention::User).spans);
        assert_eq!(chat_plan(&messages, Some(&[10, 40, 50]), 35).spans[1], (35, Retention::User));
        let users = [
            serde_json::json!({"role": "user"}),
            serde_json::json!({"role": "user"}),
            serde_json::json!({"role": "assistant"}),
        ];
        assert_eq!(
            chat_plan(&users, Some(&[10, 20, 30]), 35).spans,
            vec![(20, Retention::User), (35, Retention::Assistant)]
        );
        assert_eq!(
            chat_plan(&users[..2], Some(&[10, 20]), 35).spans,
            vec![(20, Retention::User), (35, Retention::Assistant)]
        );
    }
}
