//! The OpenAPI 3.1 document of the HTTP API, served at GET /openapi.json. Request and response
//! bodies come from the wire types' `ToSchema` derives (openai/request.rs, openai/response.rs),
//! so the document accepts what the parsers accept and describes what the handlers send.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use serde_json::Value;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use super::AppState;
use super::openai::{
    ChatCompletion, ChatCompletionChunk, ChatRequest, CompletionRequest, DetokenizeRequest, DetokenizeResponse,
    ErrorBody, Health, HealthFailure, ModelList, TOKEN_ID, TextCompletion, TextCompletionChunk, TokenizeRequest,
    TokenizeResponse,
};

// The operations: bodiless functions carrying each route's description (the handlers are in
// routes.rs, registered in mod.rs).

#[utoipa::path(post, path = "/v1/chat/completions", tag = "OpenAI", request_body = ChatRequest,
    responses(
        (status = 200, description = "A `chat.completion` object; with `stream: true`, server-sent events each holding a `chat.completion.chunk`, ending with `data: [DONE]`",
            content((ChatCompletion = "application/json"), (ChatCompletionChunk = "text/event-stream"))),
        (status = 400, description = "A field is invalid (`param` names it), or the prompt and `max_tokens` exceed the context", body = ErrorBody),
        (status = 401, description = "The API key is missing or wrong (when the server has one)", body = ErrorBody),
        (status = 404, description = "No such model", body = ErrorBody),
        (status = 429, description = "The queue is full (Retry-After)", body = ErrorBody),
        (status = 503, description = "Queue timeout, or the server is shutting down", body = ErrorBody),
    ),
    security((), ("api_key" = []))
)]
#[allow(dead_code)]
fn chat_completions() {}

#[utoipa::path(post, path = "/v1/completions", tag = "OpenAI", request_body = CompletionRequest,
    responses(
        (status = 200, description = "A `text_completion` object; with `stream: true`, server-sent events each holding a `text_completion` chunk, ending with `data: [DONE]`",
            content((TextCompletion = "application/json"), (TextCompletionChunk = "text/event-stream"))),
        (status = 400, description = "A field is invalid (`param` names it), or the prompt and `max_tokens` exceed the context", body = ErrorBody),
        (status = 401, description = "The API key is missing or wrong (when the server has one)", body = ErrorBody),
        (status = 404, description = "No such model", body = ErrorBody),
        (status = 429, description = "The queue is full (Retry-After)", body = ErrorBody),
        (status = 503, description = "Queue timeout, or the server is shutting down", body = ErrorBody),
    ),
    security((), ("api_key" = []))
)]
#[allow(dead_code)]
fn completions() {}

#[utoipa::path(get, path = "/v1/models", tag = "OpenAI",
    responses(
        (status = 200, description = "The served model", body = ModelList),
        (status = 401, description = "The API key is missing or wrong (when the server has one)", body = ErrorBody),
    ),
    security((), ("api_key" = []))
)]
#[allow(dead_code)]
fn models() {}

#[utoipa::path(get, path = "/health", tag = "Operations",
    responses(
        (status = 200, description = "The engine serves", body = Health),
        (status = 503, description = "The engine has stopped (why, in `reason`); the server is shutting down", body = HealthFailure),
    )
)]
#[allow(dead_code)]
fn health() {}

#[utoipa::path(get, path = "/metrics", tag = "Operations",
    responses((status = 200, description = "Prometheus text format (braid_* and vLLM's vllm:* names)", body = String, content_type = "text/plain"))
)]
#[allow(dead_code)]
fn metrics() {}

#[utoipa::path(post, path = "/tokenize", tag = "Tokenizer", request_body(content = TokenizeRequest, description = "Exactly one of `prompt` and `messages`"),
    responses(
        (status = 200, description = "The prompt's token ids", body = TokenizeResponse),
        (status = 400, description = "A field is invalid", body = ErrorBody),
        (status = 404, description = "No such model", body = ErrorBody),
    )
)]
#[allow(dead_code)]
fn tokenize() {}

#[utoipa::path(post, path = "/detokenize", tag = "Tokenizer", request_body = DetokenizeRequest,
    responses(
        (status = 200, description = "The tokens' text", body = DetokenizeResponse),
        (status = 400, description = "A field is invalid (a token outside the vocabulary)", body = ErrorBody),
        (status = 404, description = "No such model", body = ErrorBody),
    )
)]
#[allow(dead_code)]
fn detokenize() {}

#[utoipa::path(get, path = "/openapi.json", tag = "Operations", responses((status = 200, description = "This document", body = Object)))]
#[allow(dead_code)]
fn openapi_json() {}

/// `Authorization: Bearer KEY` on /v1/* when the server is started with --api-key.
struct ApiKey;

impl Modify for ApiKey {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "api_key",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

#[derive(OpenApi)]
#[openapi(
    info(title = "braid", description = "braid's OpenAI-compatible HTTP API"),
    paths(chat_completions, completions, models, health, metrics, tokenize, detokenize, openapi_json),
    components(schemas(ErrorBody)),
    modifiers(&ApiKey)
)]
struct ApiDoc;

/// Request types whose fields include another's through `#[serde(flatten)]` (utoipa writes
/// `allOf`): each becomes one object refusing other fields, as `openai::parse_body` does.
const FLATTENED: &[&str] = &["ChatRequest", "CompletionRequest"];

/// `then` applies where `if` holds: a field given (not null) with the value that `if` describes.
fn when(field: &str, is: Value, then: Value) -> Value {
    serde_json::json!({"if": {"required": [field], "properties": {field: is}}, "then": then})
}

/// The rules between fields that `options` checks and types cannot say.
fn cross_field_rules(schema: &str) -> Vec<Value> {
    use serde_json::json;
    let given = |field: &str| json!({"required": [field], "properties": {field: {"const": true}}});
    let mut rules = vec![when("stream_options", json!({"type": "object"}), given("stream"))];
    if schema == "ChatRequest" {
        rules.push(when("top_logprobs", json!({"type": "integer"}), given("logprobs")));
        rules.push(when(
            "max_tokens",
            json!({"type": "integer"}),
            json!({"properties": {"max_completion_tokens": {"type": "null"}}}),
        ));
    }
    rules
}

/// The document for a server of this model: its name the only `model`, its vocabulary bounding
/// token ids.
pub fn document(model_name: &str, vocab_size: usize) -> Value {
    let mut doc = serde_json::to_value(ApiDoc::openapi()).unwrap_or_default();
    // (utoipa names the crate's license, which is none.)
    if let Some(info) = doc["info"].as_object_mut() {
        info.remove("license");
    }
    let schemas = doc["components"]["schemas"].clone();
    let mut flattened = Vec::new();
    for name in FLATTENED {
        let schema = &mut doc["components"]["schemas"][*name];
        let Some(parts) = schema.get("allOf").and_then(Value::as_array).cloned() else { continue };
        let mut properties = serde_json::Map::new();
        let mut required = Vec::new();
        for part in parts {
            // A part is an object, or a reference to one in the components (which only the
            // flattened types used: it goes).
            let part =
                match part.get("$ref").and_then(Value::as_str).and_then(|r| r.strip_prefix("#/components/schemas/")) {
                    Some(target) => {
                        flattened.push(target.to_string());
                        schemas[target].clone()
                    }
                    None => part,
                };
            properties.extend(part["properties"].as_object().cloned().unwrap_or_default());
            required.extend(part["required"].as_array().cloned().unwrap_or_default());
        }
        let description = schema.get("description").cloned();
        *schema = serde_json::json!({"type": "object", "properties": properties, "required": required, "additionalProperties": false});
        if let Some(d) = description {
            schema["description"] = d;
        }
        schema["properties"]["model"]["enum"] = serde_json::json!([model_name]);
        schema["allOf"] = cross_field_rules(name).into();
    }
    if let Some(components) = doc["components"]["schemas"].as_object_mut() {
        for name in flattened {
            components.remove(&name);
        }
    }
    // /tokenize: exactly one of `prompt` and `messages` (a null is as good as none).
    doc["components"]["schemas"]["TokenizeRequest"]["oneOf"] = serde_json::json!([
        {"required": ["prompt"], "properties": {"prompt": {"type": "string"}, "messages": {"type": "null"}}},
        {"required": ["messages"], "properties": {"messages": {"type": "array"}, "prompt": {"type": "null"}}},
    ]);
    bound_token_ids(&mut doc, vocab_size.saturating_sub(1));
    doc
}

/// Sets the maximum of every schema marked as a token id.
fn bound_token_ids(value: &mut Value, max: usize) {
    match value {
        Value::Object(map) => {
            if map.get("description").and_then(Value::as_str) == Some(TOKEN_ID) {
                map.insert("maximum".into(), max.into());
            }
            map.values_mut().for_each(|v| bound_token_ids(v, max));
        }
        Value::Array(items) => items.iter_mut().for_each(|v| bound_token_ids(v, max)),
        _ => {}
    }
}

/// GET /openapi.json.
pub async fn serve(State(state): State<Arc<AppState>>) -> Json<Value> {
    Json(document(&state.model_name, state.vocab_size))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::openai::{CHAT, COMMON, COMPLETION, MAX_N, MAX_STOP_BYTES, MAX_STOPS, MAX_TOP_LOGPROBS};

    fn properties(doc: &Value, schema: &str) -> Vec<String> {
        let mut names: Vec<String> = doc["components"]["schemas"][schema]["properties"]
            .as_object()
            .expect("an object schema")
            .keys()
            .cloned()
            .collect();
        names.sort();
        names
    }

    fn sorted(lists: &[&[&str]]) -> Vec<String> {
        let mut names: Vec<String> = lists.concat().iter().map(|s| s.to_string()).collect();
        names.sort();
        names
    }

    #[test]
    fn request_bodies_hold_exactly_the_fields_the_parsers_know() {
        let doc = document("m", 1000);
        assert_eq!(doc["openapi"], "3.1.0");
        assert_eq!(properties(&doc, "ChatRequest"), sorted(&[CHAT, COMMON]));
        assert_eq!(properties(&doc, "CompletionRequest"), sorted(&[COMPLETION, COMMON]));
        for name in [
            "ChatRequest",
            "CompletionRequest",
            "TokenizeRequest",
            "DetokenizeRequest",
            "Message",
            "ContentPart",
            "StreamOptions",
        ] {
            assert_eq!(doc["components"]["schemas"][name]["additionalProperties"], false, "{name}");
        }
        assert!(doc["components"]["schemas"].get("CommonFields").is_none(), "no dangling flattened type");
        let chat = &doc["components"]["schemas"]["ChatRequest"]["properties"];
        assert_eq!(chat["model"]["enum"], serde_json::json!(["m"]));
        // The literals in the derives are the limits `options` checks.
        assert_eq!(chat["n"]["maximum"], MAX_N);
        assert_eq!(chat["top_logprobs"]["maximum"], MAX_TOP_LOGPROBS);
        assert_eq!(
            doc["components"]["schemas"]["CompletionRequest"]["properties"]["logprobs"]["maximum"],
            MAX_TOP_LOGPROBS
        );
        assert_eq!(chat["stop"]["oneOf"][0]["maxLength"], MAX_STOP_BYTES);
        assert_eq!(chat["stop"]["oneOf"][1]["maxItems"], MAX_STOPS);
        let ids = &doc["components"]["schemas"]["CompletionRequest"]["properties"]["prompt"]["oneOf"][2]["items"];
        assert_eq!((ids["minimum"].as_u64(), ids["maximum"].as_u64()), (Some(0), Some(999)));
    }

    #[test]
    fn every_route_is_described() {
        let doc = document("m", 1000);
        for (path, method) in [
            ("/v1/chat/completions", "post"),
            ("/v1/completions", "post"),
            ("/v1/models", "get"),
            ("/health", "get"),
            ("/metrics", "get"),
            ("/tokenize", "post"),
            ("/detokenize", "post"),
            ("/openapi.json", "get"),
        ] {
            assert!(doc["paths"][path][method].is_object(), "{method} {path}");
        }
        assert_eq!(
            doc["paths"]["/v1/chat/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]["$ref"],
            "#/components/schemas/ChatRequest"
        );
    }
}
