//! HTTP handlers: OpenAI's chat and legacy completions (JSON and SSE), models, tokenize,
//! health and metrics. Handlers convert wire types and stream; the engine thread does the work.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::future::poll_fn;
use std::sync::Arc;
use std::task::Poll;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::{header, HeaderMap};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};
use tokio_stream::wrappers::ReceiverStream;

use super::choice::{ChoiceText, Delta};
use super::engine_thread::{Release, SeqEvent, SeqReceiver};
use super::error::ApiError;
use super::metrics as m;
use super::openai::{self, GenerationOptions, PromptField};
use super::prompt;
use super::session;
use super::AppState;
use crate::engine::{Request, Retention, RetentionPlan, SampledToken};

#[derive(Clone, Copy, PartialEq, Eq)]
enum Endpoint {
    Chat,
    Completion,
}

fn now_secs() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn request_id(prefix: &str) -> String {
    format!("{prefix}-{:032x}", rand::random::<u128>())
}

pub async fn chat_completions(State(state): State<Arc<AppState>>, headers: HeaderMap, body: Result<Bytes, BytesRejection>) -> Result<Response, ApiError> {
    let body = prompt::body(body, state.max_request_bytes)?;
    let shared = state.clone();
    let (ids, plan, options) = prompt::off_worker(move || prepare_chat(&shared, &headers, &body)).await?;
    generate(state, vec![ids], vec![plan], options, Endpoint::Chat).await
}

/// Everything a chat request needs before it is queued (parsing included: it grows with the
/// body), run off the async workers.
fn prepare_chat(state: &AppState, headers: &HeaderMap, body: &[u8]) -> Result<(Vec<u32>, RetentionPlan, GenerationOptions), ApiError> {
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

pub async fn completions(State(state): State<Arc<AppState>>, headers: HeaderMap, body: Result<Bytes, BytesRejection>) -> Result<Response, ApiError> {
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
            return Err(ApiError::invalid_param("prompt", "this model has no vocabulary (dummy weights): send the prompt as token ids"));
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
async fn generate(state: Arc<AppState>, prompts: Vec<Vec<u32>>, plans: Vec<RetentionPlan>, options: GenerationOptions, endpoint: Endpoint) -> Result<Response, ApiError> {
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

/// When one choice's tokens came, for its time per output token.
#[derive(Clone, Default)]
struct Clock {
    first: Option<Instant>,
    last: Option<Instant>,
    tokens: usize,
}

impl Clock {
    /// Mean time between this choice's tokens after its first.
    fn per_token(&self) -> Option<f64> {
        let (first, last) = (self.first?, self.last?);
        (self.tokens > 1).then(|| (last - first).as_secs_f64() / (self.tokens - 1) as f64)
    }
}

/// One request in flight: its choices' receivers and text. Its metrics are recorded when it
/// is dropped, however it ends (answered, client gone, failed), unless it was refused.
struct Run {
    state: Arc<AppState>,
    endpoint: Endpoint,
    id: String,
    created: u64,
    prompt_tokens: usize,
    options: GenerationOptions,
    receivers: Vec<Option<SeqReceiver>>,
    /// Events taken while waiting for every choice to start, not yet applied.
    buffered: VecDeque<(usize, SeqEvent)>,
    choices: Vec<ChoiceText>,
    logprobs: Vec<Vec<SampledToken>>,
    start: Instant,
    first_token: Option<Instant>,
    clocks: Vec<Clock>,
    /// Why the choices still running are let go of if the run ends now: the client went away,
    /// unless the server gave up (deadline, error).
    ending: Release,
    /// Metrics already taken care of (a refused request is counted as a rejection).
    counted: bool,
}

impl Drop for Run {
    fn drop(&mut self) {
        if !self.counted {
            self.record_metrics();
        }
        for rx in self.receivers.iter_mut().filter_map(Option::take) {
            rx.release(self.ending);
        }
    }
}

impl Run {
    /// Waits, until the request's deadline, for every choice to start (the engine scheduled
    /// it, or it ended at once); events that came with it stay buffered for `next`. Past the deadline: 503 `queue_timeout`, and the
    /// sequences are dropped from the engine. A choice the engine refused: that error, before
    /// any part of a response is sent.
    async fn wait_started(&mut self, deadline: Instant) -> Result<(), ApiError> {
        let mut started = vec![false; self.receivers.len()];
        let all_started = poll_fn(|cx| {
            let mut waiting = false;
            for (i, slot) in self.receivers.iter_mut().enumerate() {
                let Some(rx) = slot.as_mut().filter(|_| !started[i]) else { continue };
                match rx.poll_recv(cx) {
                    Poll::Ready(Some(SeqEvent::Started)) => started[i] = true,
                    Poll::Ready(Some(e)) => {
                        started[i] = true;
                        self.buffered.push_back((i, e));
                    }
                    Poll::Ready(None) => started[i] = true,
                    Poll::Pending => waiting = true,
                }
            }
            if waiting { Poll::Pending } else { Poll::Ready(()) }
        });
        if tokio::time::timeout_at(deadline.into(), all_started).await.is_err() {
            self.ending = Release::Cancelled;
            self.counted = true;
            return Err(self.state.admission.timed_out());
        }
        let refused = self.buffered.iter().find_map(|(_, e)| match e {
            SeqEvent::Rejected(message) => Some(message.clone()),
            _ => None,
        });
        if let Some(message) = refused {
            self.ending = Release::Cancelled;
            return Err(ApiError::internal(message));
        }
        Ok(())
    }

    /// The next event of any live choice; None once all have ended. A choice ended by a stop
    /// string lets go of its receiver, which makes the engine stop that sequence.
    async fn next(&mut self) -> Option<(usize, SeqEvent)> {
        if let Some(event) = self.buffered.pop_front() {
            return Some(event);
        }
        poll_fn(|cx| {
            let mut live = false;
            for (i, slot) in self.receivers.iter_mut().enumerate() {
                let Some(rx) = slot else { continue };
                live = true;
                match rx.poll_recv(cx) {
                    Poll::Ready(Some(e)) => return Poll::Ready(Some((i, e))),
                    Poll::Ready(None) => *slot = None,
                    Poll::Pending => {}
                }
            }
            if live { Poll::Pending } else { Poll::Ready(None) }
        })
        .await
    }

    /// Applies one engine event to its choice; returns the text delta, or an error.
    fn apply(&mut self, i: usize, event: SeqEvent) -> Result<Delta, ApiError> {
        let tokenizer = &self.state.tokenizer;
        let delta = match event {
            SeqEvent::Token { token, cached_tokens, ends } => {
                let now = Instant::now();
                self.first_token.get_or_insert(now);
                let clock = &mut self.clocks[i];
                clock.first.get_or_insert(now);
                clock.last = Some(now);
                clock.tokens += 1;
                self.choices[i].cached_tokens = cached_tokens;
                if ends {
                    self.choices[i].push_stop_token();
                    return Ok(Delta::default());
                }
                if self.options.logprobs.is_some() {
                    self.logprobs[i].push(token.clone());
                }
                self.choices[i].push(tokenizer, token)
            }
            SeqEvent::Started => Delta::default(),
            SeqEvent::Finished(reason) => self.choices[i].finish(tokenizer, reason),
            SeqEvent::Rejected(message) => {
                self.ending = Release::Cancelled;
                return Err(ApiError::internal(message));
            }
        };
        if delta.finish.is_some()
            && let Some(rx) = self.receivers[i].take()
        {
            rx.release(Release::Finished);
        }
        Ok(delta)
    }

    fn usage(&self) -> Value {
        let completion: usize = self.choices.iter().map(|c| c.completion_tokens).sum();
        // Choices come n per prompt; count each prompt's cached tokens once.
        let cached: usize = self.choices.iter().step_by(self.options.n).map(|c| c.cached_tokens).sum();
        json!({
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": self.prompt_tokens + completion,
            "prompt_tokens_details": { "cached_tokens": cached },
        })
    }

    /// Counts each choice by its own finish reason ("abort": its client went away; "error":
    /// the engine failed it), and, for a request answered in full, its latencies: time to the
    /// first token and end to end once per request, time per output token once per choice
    /// (choices decode side by side, so dividing by all their tokens would understate it).
    fn record_metrics(&self) {
        let unfinished = if self.ending == Release::ClientGone { "abort" } else { "error" };
        for c in &self.choices {
            m::record_choice(c.finish.unwrap_or(unfinished));
        }
        if self.choices.iter().all(|c| c.finish.is_some()) {
            let ttft = self.first_token.map(|t| (t - self.start).as_secs_f64());
            let tpot: Vec<f64> = self.clocks.iter().filter_map(Clock::per_token).collect();
            m::record_request(ttft, &tpot, self.start.elapsed().as_secs_f64());
        }
    }

    fn logprobs_json(&self, tokens: &[SampledToken], text_offset: usize) -> Value {
        let tokenizer = &self.state.tokenizer;
        let text = |id: u32| tokenizer.decode(&[id]);
        match self.endpoint {
            Endpoint::Chat => json!({
                "content": tokens.iter().map(|t| {
                    let s = text(t.id);
                    json!({
                        "token": s, "logprob": t.logprob, "bytes": s.as_bytes(),
                        "top_logprobs": t.top.iter().map(|&(id, lp)| {
                            let a = text(id);
                            json!({"token": a, "logprob": lp, "bytes": a.as_bytes()})
                        }).collect::<Vec<_>>(),
                    })
                }).collect::<Vec<_>>()
            }),
            Endpoint::Completion => {
                let mut offset = text_offset;
                let mut offsets = Vec::new();
                for t in tokens {
                    offsets.push(offset);
                    offset += text(t.id).len();
                }
                json!({
                    "tokens": tokens.iter().map(|t| text(t.id)).collect::<Vec<_>>(),
                    "token_logprobs": tokens.iter().map(|t| t.logprob).collect::<Vec<_>>(),
                    "top_logprobs": tokens.iter().map(|t| t.top.iter().map(|&(id, lp)| (text(id), json!(lp))).collect::<serde_json::Map<_, _>>()).collect::<Vec<_>>(),
                    "text_offset": offsets,
                })
            }
        }
    }

    fn object(&self, chunk: bool) -> &'static str {
        match (self.endpoint, chunk) {
            (Endpoint::Chat, false) => "chat.completion",
            (Endpoint::Chat, true) => "chat.completion.chunk",
            (Endpoint::Completion, _) => "text_completion",
        }
    }

    fn envelope(&self, chunk: bool, choices: Vec<Value>) -> Value {
        json!({
            "id": self.id,
            "object": self.object(chunk),
            "created": self.created,
            "model": self.state.model_name,
            "system_fingerprint": super::SYSTEM_FINGERPRINT,
            "choices": choices,
        })
    }

    async fn complete(mut self) -> Result<Value, ApiError> {
        while let Some((i, event)) = self.next().await {
            self.apply(i, event)?;
        }
        let choices = (0..self.choices.len())
            .map(|i| {
                let c = &self.choices[i];
                let logprobs = if self.options.logprobs.is_some() { self.logprobs_json(&self.logprobs[i], 0) } else { Value::Null };
                let finish = c.finish.unwrap_or("abort");
                match self.endpoint {
                    Endpoint::Chat => json!({"index": i, "message": {"role": "assistant", "content": c.text()}, "logprobs": logprobs, "finish_reason": finish}),
                    Endpoint::Completion => json!({"index": i, "text": c.text(), "logprobs": logprobs, "finish_reason": finish}),
                }
            })
            .collect();
        let mut body = self.envelope(false, choices);
        body["usage"] = self.usage();
        Ok(body)
    }

    fn chunk(&mut self, i: usize, delta: &Delta) -> Value {
        let logprobs = if self.options.logprobs.is_some() && !delta.tokens.is_empty() {
            let offset = self.choices[i].logprob_offset;
            self.choices[i].logprob_offset += delta.tokens.iter().map(|t| self.state.tokenizer.decode(&[t.id]).len()).sum::<usize>();
            self.logprobs_json(&delta.tokens, offset)
        } else {
            Value::Null
        };
        let choice = match self.endpoint {
            Endpoint::Chat => json!({"index": i, "delta": {"content": delta.text}, "logprobs": logprobs, "finish_reason": delta.finish}),
            Endpoint::Completion => json!({"index": i, "text": delta.text, "logprobs": logprobs, "finish_reason": delta.finish}),
        };
        let mut body = self.envelope(true, vec![choice]);
        if self.options.include_usage {
            body["usage"] = Value::Null;
        }
        body
    }

    async fn stream(mut self, tx: tokio::sync::mpsc::Sender<Result<SseEvent, Infallible>>) {
        let send = |v: Value| {
            let tx = tx.clone();
            async move { tx.send(Ok(SseEvent::default().data(v.to_string()))).await.is_ok() }
        };
        if self.endpoint == Endpoint::Chat {
            for i in 0..self.choices.len() {
                let mut first = self.envelope(true, vec![json!({"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null})]);
                if self.options.include_usage {
                    first["usage"] = Value::Null;
                }
                if !send(first).await {
                    return;
                }
            }
        }
        loop {
            let next = tokio::select! {
                // The client went away: dropping `self` drops the receivers, which aborts.
                _ = tx.closed() => return,
                next = self.next() => next,
            };
            let Some((i, event)) = next else { break };
            let delta = match self.apply(i, event) {
                Ok(d) => d,
                Err(e) => {
                    let _ = send(e.body()).await;
                    return;
                }
            };
            // Tokens held back (an unfinished character or a possible stop string) send nothing,
            // unless their logprobs were asked for.
            let quiet = delta.text.is_empty() && delta.finish.is_none();
            if quiet && (self.options.logprobs.is_none() || delta.tokens.is_empty()) {
                continue;
            }
            let chunk = self.chunk(i, &delta);
            if !send(chunk).await {
                return;
            }
        }
        if self.options.include_usage {
            let mut last = self.envelope(true, Vec::new());
            last["usage"] = self.usage();
            if !send(last).await {
                return;
            }
        }
        let _ = tx.send(Ok(SseEvent::default().data("[DONE]"))).await;
    }
}

pub async fn models(State(state): State<Arc<AppState>>) -> Json<Value> {
    Json(json!({
        "object": "list",
        "data": [{
            "id": state.model_name,
            "object": "model",
            "created": state.created,
            "owned_by": "braid",
            "max_model_len": state.max_context,
        }]
    }))
}

/// 200 while the engine thread serves; 503 with the reason once it has stopped (the process is
/// then shutting down), so a load balancer or supervisor acts on it.
pub async fn health(State(state): State<Arc<AppState>>) -> Response {
    if let Some(reason) = state.engine.failure() {
        let body = json!({"status": "error", "reason": reason, "replica": state.replica()});
        return (axum::http::StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response();
    }
    let s = state.engine.stats();
    Json(json!({"status": "ok", "running": s.running, "waiting": s.waiting + state.admission.queued(), "replica": state.replica()})).into_response()
}

pub async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    m::record_waiting(state.admission.queued(), state.engine.stats().waiting);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], m::render()).into_response()
}

#[derive(serde::Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct TokenizeRequest {
    model: Option<String>,
    prompt: Option<String>,
    messages: Option<Vec<openai::Message>>,
    add_generation_prompt: Option<bool>,
}

pub async fn tokenize(State(state): State<Arc<AppState>>, body: Result<Bytes, BytesRejection>) -> Result<Json<Value>, ApiError> {
    let body = prompt::body(body, state.max_request_bytes)?;
    prompt::off_worker(move || {
        let request: TokenizeRequest = openai::parse_body(&body, &[], &[&["model", "prompt", "messages", "add_generation_prompt"]])?;
        if let Some(model) = &request.model {
            state.check_model(model)?;
        }
        let tokens = match (request.prompt, request.messages) {
            (Some(_), None) if !state.tokenizer.has_vocabulary() => {
                return Err(ApiError::invalid_param("prompt", "this model has no vocabulary (dummy weights): there is no text to tokenize"));
            }
            (Some(p), None) => {
                prompt::check_text_fits(&state, "prompt", &p)?;
                state.tokenizer.encode(&p).map_err(ApiError::internal)?
            }
            (None, Some(messages)) => {
                prompt::check_messages(&messages)?;
                let chat = openai::ChatRequest { model: String::new(), messages, max_completion_tokens: None, logprobs: None, top_logprobs: None, common: Default::default() };
                prompt::chat(&state, &chat.template_messages()?, request.add_generation_prompt.unwrap_or(true), false, false)?.ids
            }
            _ => return Err(ApiError::bad_request("Give exactly one of 'prompt' and 'messages'")),
        };
        Ok(Json(json!({"tokens": tokens, "count": tokens.len(), "max_model_len": state.max_context})))
    })
    .await
}

#[derive(serde::Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct DetokenizeRequest {
    model: Option<String>,
    tokens: Vec<u32>,
}

pub async fn detokenize(State(state): State<Arc<AppState>>, body: Result<Bytes, BytesRejection>) -> Result<Json<Value>, ApiError> {
    let body = prompt::body(body, state.max_request_bytes)?;
    prompt::off_worker(move || {
        let request: DetokenizeRequest = openai::parse_body(&body, &[], &[&["model", "tokens"]])?;
        if let Some(model) = &request.model {
            state.check_model(model)?;
        }
        state.limits().check_tokens(&request.tokens).map_err(|e| ApiError::invalid_param("tokens", e.to_string()))?;
        Ok(Json(json!({"prompt": state.tokenizer.decode(&request.tokens)})))
    })
    .await
}

pub async fn fallback(uri: axum::http::Uri) -> ApiError {
    ApiError::not_found(uri.path())
}
