//! HTTP handlers: OpenAI's chat and legacy completions (JSON and SSE), models, tokenize,
//! health and metrics. Handlers parse the wire types and queue; a `Run` (run.rs) answers or
//! streams; the engine thread does the work.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::{HeaderMap, header};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use tokio_stream::wrappers::ReceiverStream;

use super::AppState;
use super::choice::ChoiceText;
use super::engine_thread::Release;
use super::error::ApiError;
use super::metrics as m;
use super::openai::{
    self, DetokenizeResponse, GenerationOptions, Health, HealthError, HealthFailure, HealthOk, ListObject, ModelCard,
    ModelList, ModelObject, PromptField, TokenizeResponse,
};
use super::prompt;
use super::run::{Clock, Endpoint, Run};
use super::session;
use crate::engine::{Request, Retention, RetentionPlan};

fn now_secs() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn request_id(prefix: &str) -> String {
    format!("{prefix}-{:032x}", rand::random::<u128>())
}

pub async fn chat_completions(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = prompt::body(body, state.max_request_bytes)?;
    let shared = state.clone();
    let (ids, plan, options) = prompt::off_worker(move || prepare_chat(&shared, &headers, &body)).await?;
    generate(state, vec![ids], vec![plan], options, Endpoint::Chat).await
}

/// Everything a chat request needs before it is queued (parsing included: it grows with the
/// body), run off the async workers.
fn prepare_chat(
    state: &AppState,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<(Vec<u32>, RetentionPlan, GenerationOptions), ApiError> {
    let request = openai::parse_chat(body)?;
    state.check_model(&request.model)?;
    let options = request.options(state.vocab_size)?;
    let session = session::session_id(headers, options.user.as_deref())?;
    prompt::check_messages(&request.messages)?;
    let messages = request.template_messages()?;
    let chat = prompt::chat(state, &messages, true, true, session.is_some())?;
    if state.log_prompts {
        tracing::info!("chat prompt: {:?}", chat.text);
    }
    let plan = match &session {
        Some(_) => session::chat_plan(&messages, chat.turn_ends.as_deref(), chat.ids.len()),
        None => RetentionPlan::default(),
    };
    Ok((chat.ids, plan, options))
}

pub async fn completions(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = prompt::body(body, state.max_request_bytes)?;
    let shared = state.clone();
    let (prompts, plans, options) = prompt::off_worker(move || prepare_completion(&shared, &headers, &body)).await?;
    generate(state, prompts, plans, options, Endpoint::Completion).await
}

type Prepared = (Vec<Vec<u32>>, Vec<RetentionPlan>, GenerationOptions);

fn prepare_completion(state: &AppState, headers: &HeaderMap, body: &[u8]) -> Result<Prepared, ApiError> {
    let request = openai::parse_completion(body)?;
    state.check_model(&request.model)?;
    let options = request.options(state.vocab_size)?;
    let session = session::session_id(headers, options.user.as_deref())?;
    let encode = |text: &str| {
        if !state.tokenizer.has_vocabulary() {
            return Err(ApiError::invalid_param(
                "prompt",
                "this model has no vocabulary (dummy weights): send the prompt as token ids",
            ));
        }
        prompt::check_text_fits(state, "prompt", text)?;
        state.tokenizer.encode_prompt(text).map_err(ApiError::internal)
    };
    let prompts = match &request.prompt {
        PromptField::Text(t) => vec![encode(t)?],
        PromptField::Texts(ts) => {
            prompt::check_prompt_count(ts.len())?;
            ts.iter().map(|t| encode(t)).collect::<Result<_, _>>()?
        }
        PromptField::Ids(ids) => vec![ids.clone()],
        PromptField::IdLists(lists) => {
            prompt::check_prompt_count(lists.len())?;
            lists.clone()
        }
    };
    if prompts.is_empty() {
        return Err(ApiError::invalid_param("prompt", "'prompt' must not be an empty list"));
    }
    if state.log_prompts {
        tracing::info!("completion prompts: {:?}", request.prompt);
    }
    // A raw prompt has no roles: within a session, all of it is kept like a user turn.
    let class = if session.is_some() { Retention::User } else { Retention::Anonymous };
    let plans = prompts.iter().map(|p| RetentionPlan::uniform(p.len(), class)).collect();
    Ok((prompts, plans, options))
}

/// Makes the engine's requests, one per prompt and choice (each checked against the engine's
/// limits: vocabulary, context), then queues them.
async fn generate(
    state: Arc<AppState>,
    prompts: Vec<Vec<u32>>,
    plans: Vec<RetentionPlan>,
    options: GenerationOptions,
    endpoint: Endpoint,
) -> Result<Response, ApiError> {
    let start = Instant::now();
    let param = if endpoint == Endpoint::Chat { "messages" } else { "prompt" };
    let limits = state.limits();
    let mut requests = Vec::new();
    for (ids, plan) in prompts.iter().zip(&plans) {
        // Without max_tokens, up to the end of the context (at least one token, so a prompt
        // that fills it is refused as too long).
        let max_tokens = options.max_tokens.unwrap_or_else(|| limits.max_context.saturating_sub(ids.len()).max(1));
        for i in 0..options.n {
            let mut params = options.params.clone();
            params.max_tokens = max_tokens;
            params.seed = params.seed.map(|s| s.wrapping_add(i as u64));
            let request = Request::new(ids.clone(), params, &limits).map_err(|e| ApiError::request(param, e))?;
            requests.push(request.with_retention(plan.clone()));
        }
    }

    // One deadline for the whole wait, from here until the engine starts the request: for a
    // slot, then in the engine's queue (for KV blocks). The prefill is work, not waiting: a
    // long prompt that has begun is never cut off by it.
    let deadline = start + state.admission.queue_timeout();
    let permit = state.admission.acquire(prompts.len() * options.n, deadline).await?;
    let receivers: Vec<_> = requests.into_iter().map(|r| Some(state.engine.submit(r))).collect();
    let choices = receivers.len();
    let mut run = Run {
        state: state.clone(),
        endpoint,
        id: request_id(if endpoint == Endpoint::Chat { "chatcmpl" } else { "cmpl" }),
        created: now_secs(),
        prompt_tokens: prompts.iter().map(Vec::len).sum(),
        choices: (0..receivers.len()).map(|_| ChoiceText::new(options.stop.clone())).collect(),
        logprobs: vec![Vec::new(); receivers.len()],
        options,
        receivers,
        buffered: VecDeque::new(),
        start,
        first_token: None,
        clocks: vec![Clock::default(); choices],
        ending: Release::ClientGone,
        counted: false,
    };
    // A stream's response (and its status) starts only once every choice has begun, so a
    // request past its deadline is answered 503 rather than with an empty stream.
    run.wait_started(deadline).await?;
    if run.options.stream {
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<SseEvent, Infallible>>(64);
        tokio::spawn(async move {
            let _permit = permit;
            run.stream(tx).await;
        });
        Ok(Sse::new(ReceiverStream::new(rx)).keep_alive(KeepAlive::default()).into_response())
    } else {
        let body = run.complete().await;
        drop(permit);
        body.map(|b| Json(b).into_response())
    }
}

pub async fn models(State(state): State<Arc<AppState>>) -> Json<ModelList> {
    Json(ModelList {
        object: ListObject::Tag,
        data: vec![ModelCard {
            id: state.model_name.clone(),
            object: ModelObject::Tag,
            created: state.created,
            owned_by: "braid".into(),
            max_model_len: state.max_context,
        }],
    })
}

/// 200 while the engine thread serves; 503 with the reason once it has stopped (the process is
/// then shutting down), so a load balancer or supervisor acts on it.
pub async fn health(State(state): State<Arc<AppState>>) -> Response {
    if let Some(reason) = state.engine.failure() {
        let body = HealthFailure { status: HealthError::Tag, reason, replica: state.replica().to_string() };
        return (axum::http::StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response();
    }
    let s = state.engine.stats();
    Json(Health {
        status: HealthOk::Tag,
        running: s.running,
        waiting: s.waiting + state.admission.queued(),
        replica: state.replica().to_string(),
    })
    .into_response()
}

pub async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    m::record_waiting(state.admission.queued(), state.engine.stats().waiting);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], m::render()).into_response()
}

pub async fn tokenize(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<TokenizeResponse>, ApiError> {
    let body = prompt::body(body, state.max_request_bytes)?;
    prompt::off_worker(move || {
        let request: openai::TokenizeRequest =
            openai::parse_body(&body, &[], &[&["model", "prompt", "messages", "add_generation_prompt"]])?;
        if let Some(model) = &request.model {
            state.check_model(model)?;
        }
        let tokens = match (request.prompt, request.messages) {
            (Some(_), None) if !state.tokenizer.has_vocabulary() => {
                return Err(ApiError::invalid_param(
                    "prompt",
                    "this model has no vocabulary (dummy weights): there is no text to tokenize",
                ));
            }
            (Some(p), None) => {
                prompt::check_text_fits(&state, "prompt", &p)?;
                state.tokenizer.encode(&p).map_err(ApiError::internal)?
            }
            (None, Some(messages)) => {
                prompt::check_messages(&messages)?;
                let chat = openai::ChatRequest {
                    model: String::new(),
                    messages,
                    max_completion_tokens: None,
                    logprobs: None,
                    top_logprobs: None,
                    common: Default::default(),
                };
                prompt::chat(
                    &state,
                    &chat.template_messages()?,
                    request.add_generation_prompt.unwrap_or(true),
                    false,
                    false,
                )?
                .ids
            }
            _ => return Err(ApiError::bad_request("Give exactly one of 'prompt' and 'messages'")),
        };
        Ok(Json(TokenizeResponse { count: tokens.len(), tokens, max_model_len: state.max_context }))
    })
    .await
}

pub async fn detokenize(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<DetokenizeResponse>, ApiError> {
    let body = prompt::body(body, state.max_request_bytes)?;
    prompt::off_worker(move || {
        let request: openai::DetokenizeRequest = openai::parse_body(&body, &[], &[&["model", "tokens"]])?;
        if let Some(model) = &request.model {
            state.check_model(model)?;
        }
        state.limits().check_tokens(&request.tokens).map_err(|e| ApiError::invalid_param("tokens", e.to_string()))?;
        Ok(Json(DetokenizeResponse { prompt: state.tokenizer.decode(&request.tokens) }))
    })
    .await
}

pub async fn fallback(uri: axum::http::Uri) -> ApiError {
    ApiError::not_found(uri.path())
}
