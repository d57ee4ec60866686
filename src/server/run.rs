//! One generation request in flight (`Run`): its choices' events from the engine thread turned
//! into a response body (`complete`) or server-sent chunks (`stream`), stop strings applied,
//! metrics recorded however it ends.

use std::collections::{BTreeMap, VecDeque};
use std::convert::Infallible;
use std::future::poll_fn;
use std::sync::Arc;
use std::task::Poll;
use std::time::Instant;

use axum::response::sse::Event as SseEvent;
use serde::Serialize;
use tokio::sync::mpsc::Sender;

use super::AppState;
use super::choice::{ChoiceText, Delta};
use super::engine_thread::{Release, SeqEvent, SeqReceiver};
use super::error::ApiError;
use super::metrics as m;
use super::openai::{
    AssistantMessage, AssistantRole, ChatChoice, ChatChunkChoice, ChatCompletion, ChatCompletionChunk,
    ChatCompletionChunkObject, ChatCompletionObject, ChatDelta, ChatLogprobs, CompletionChoice, CompletionChunkChoice,
    CompletionLogprobs, FinishReason, GenerationOptions, PromptTokensDetails, TextCompletion, TextCompletionChunk,
    TextCompletionObject, TokenLogprob, TopLogprob, Usage,
};
use crate::engine::SampledToken;

#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Endpoint {
    Chat,
    Completion,
}

/// A whole response: what `complete` answers.
#[derive(Serialize)]
#[serde(untagged)]
pub(super) enum Completion {
    Chat(ChatCompletion),
    Text(TextCompletion),
}

/// One event of a stream.
#[derive(Serialize)]
#[serde(untagged)]
enum Chunk {
    Chat(ChatCompletionChunk),
    Text(TextCompletionChunk),
}

/// Sends one event; false once the client has gone.
async fn send(tx: &Sender<Result<SseEvent, Infallible>>, data: &impl Serialize) -> bool {
    match SseEvent::default().json_data(data) {
        Ok(event) => tx.send(Ok(event)).await.is_ok(),
        // (The bodies are plain data: they always serialize.)
        Err(_) => false,
    }
}

/// When one choice's tokens came, for its time per output token.
#[derive(Clone, Default)]
pub(super) struct Clock {
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
pub(super) struct Run {
    pub(super) state: Arc<AppState>,
    pub(super) endpoint: Endpoint,
    pub(super) id: String,
    pub(super) created: u64,
    pub(super) prompt_tokens: usize,
    pub(super) options: GenerationOptions,
    pub(super) receivers: Vec<Option<SeqReceiver>>,
    /// Events taken while waiting for every choice to start, not yet applied.
    pub(super) buffered: VecDeque<(usize, SeqEvent)>,
    pub(super) choices: Vec<ChoiceText>,
    pub(super) logprobs: Vec<Vec<SampledToken>>,
    pub(super) start: Instant,
    pub(super) first_token: Option<Instant>,
    pub(super) clocks: Vec<Clock>,
    /// Why the choices still running are let go of if the run ends now: the client went away,
    /// unless the server gave up (deadline, error).
    pub(super) ending: Release,
    /// Metrics already taken care of (a refused request is counted as a rejection).
    pub(super) counted: bool,
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
    pub(super) async fn wait_started(&mut self, deadline: Instant) -> Result<(), ApiError> {
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

    fn usage(&self) -> Usage {
        let completion: usize = self.choices.iter().map(|c| c.completion_tokens).sum();
        // Choices come n per prompt; count each prompt's cached tokens once.
        let cached: usize = self.choices.iter().step_by(self.options.n).map(|c| c.cached_tokens).sum();
        Usage {
            prompt_tokens: self.prompt_tokens,
            completion_tokens: completion,
            total_tokens: self.prompt_tokens + completion,
            prompt_tokens_details: PromptTokensDetails { cached_tokens: cached },
        }
    }

    /// Counts each choice by its own finish reason ("abort": its client went away; "error":
    /// the engine failed it), and, for a request answered in full, its latencies: time to the
    /// first token and end to end once per request, time per output token once per choice
    /// (choices decode side by side, so dividing by all their tokens would understate it).
    fn record_metrics(&self) {
        let unfinished = if self.ending == Release::ClientGone { "abort" } else { "error" };
        for c in &self.choices {
            m::record_choice(c.finish.map_or(unfinished, FinishReason::as_str));
        }
        if self.choices.iter().all(|c| c.finish.is_some()) {
            let ttft = self.first_token.map(|t| (t - self.start).as_secs_f64());
            let tpot: Vec<f64> = self.clocks.iter().filter_map(Clock::per_token).collect();
            m::record_request(ttft, &tpot, self.start.elapsed().as_secs_f64());
        }
    }

    fn chat_logprobs(&self, tokens: &[SampledToken]) -> ChatLogprobs {
        let text = |id: u32| self.state.tokenizer.decode(&[id]);
        let content = tokens
            .iter()
            .map(|t| {
                let token = text(t.id);
                let top_logprobs = (t.top.iter())
                    .map(|&(id, lp)| {
                        let token = text(id);
                        TopLogprob { bytes: token.as_bytes().to_vec(), token, logprob: lp.into() }
                    })
                    .collect();
                TokenLogprob { bytes: token.as_bytes().to_vec(), token, logprob: t.logprob.into(), top_logprobs }
            })
            .collect();
        ChatLogprobs { content }
    }

    /// `text_offset`: the bytes of the choice's text before the first of `tokens`.
    fn text_logprobs(&self, tokens: &[SampledToken], text_offset: usize) -> CompletionLogprobs {
        let text = |id: u32| self.state.tokenizer.decode(&[id]);
        let texts: Vec<String> = tokens.iter().map(|t| text(t.id)).collect();
        let offsets = texts.iter().scan(text_offset, |offset, t| {
            let at = *offset;
            *offset += t.len();
            Some(at)
        });
        CompletionLogprobs {
            text_offset: offsets.collect(),
            tokens: texts,
            token_logprobs: tokens.iter().map(|t| t.logprob.into()).collect(),
            // (Tokens of the same text share an entry: the later one's.)
            top_logprobs: tokens
                .iter()
                .map(|t| t.top.iter().map(|&(id, lp)| (text(id), lp.into())).collect::<BTreeMap<_, _>>())
                .collect(),
        }
    }

    /// `usage` of a stream chunk: left out, unless asked for (then null but in the last chunk).
    fn chunk_usage(&self) -> Option<Option<Usage>> {
        self.options.include_usage.then_some(None)
    }

    fn chat_chunk(&self, choices: Vec<ChatChunkChoice>, usage: Option<Option<Usage>>) -> Chunk {
        let (id, created, model, system_fingerprint) = self.head();
        Chunk::Chat(ChatCompletionChunk {
            id,
            object: ChatCompletionChunkObject::Tag,
            created,
            model,
            system_fingerprint,
            choices,
            usage,
        })
    }

    fn text_chunk(&self, choices: Vec<CompletionChunkChoice>, usage: Option<Option<Usage>>) -> Chunk {
        let (id, created, model, system_fingerprint) = self.head();
        Chunk::Text(TextCompletionChunk {
            id,
            object: TextCompletionObject::Tag,
            created,
            model,
            system_fingerprint,
            choices,
            usage,
        })
    }

    /// What every response and chunk of this request starts with: id, created, model, system
    /// fingerprint.
    fn head(&self) -> (String, u64, String, String) {
        (self.id.clone(), self.created, self.state.model_name.clone(), super::SYSTEM_FINGERPRINT.to_string())
    }

    pub(super) async fn complete(mut self) -> Result<Completion, ApiError> {
        while let Some((i, event)) = self.next().await {
            self.apply(i, event)?;
        }
        let want_logprobs = self.options.logprobs.is_some();
        let (id, created, model, system_fingerprint) = self.head();
        let usage = self.usage();
        let finish = |c: &ChoiceText| c.finish.unwrap_or(FinishReason::Abort);
        Ok(match self.endpoint {
            Endpoint::Chat => {
                let choices = (self.choices.iter().enumerate())
                    .map(|(i, c)| ChatChoice {
                        index: i,
                        message: AssistantMessage { role: AssistantRole::Tag, content: c.text().to_string() },
                        logprobs: want_logprobs.then(|| self.chat_logprobs(&self.logprobs[i])),
                        finish_reason: finish(c),
                    })
                    .collect();
                Completion::Chat(ChatCompletion {
                    id,
                    object: ChatCompletionObject::Tag,
                    created,
                    model,
                    system_fingerprint,
                    choices,
                    usage,
                })
            }
            Endpoint::Completion => {
                let choices = (self.choices.iter().enumerate())
                    .map(|(i, c)| CompletionChoice {
                        index: i,
                        text: c.text().to_string(),
                        logprobs: want_logprobs.then(|| self.text_logprobs(&self.logprobs[i], 0)),
                        finish_reason: finish(c),
                    })
                    .collect();
                Completion::Text(TextCompletion {
                    id,
                    object: TextCompletionObject::Tag,
                    created,
                    model,
                    system_fingerprint,
                    choices,
                    usage,
                })
            }
        })
    }

    fn chunk(&mut self, i: usize, delta: &Delta) -> Chunk {
        let tokens = (self.options.logprobs.is_some() && !delta.tokens.is_empty()).then_some(&delta.tokens);
        let offset = self.choices[i].logprob_offset;
        if let Some(tokens) = tokens {
            self.choices[i].logprob_offset +=
                tokens.iter().map(|t| self.state.tokenizer.decode(&[t.id]).len()).sum::<usize>();
        }
        let usage = self.chunk_usage();
        match self.endpoint {
            Endpoint::Chat => {
                let logprobs = tokens.map(|t| self.chat_logprobs(t));
                let choice = ChatChunkChoice {
                    index: i,
                    delta: ChatDelta { role: None, content: delta.text.clone() },
                    logprobs,
                    finish_reason: delta.finish,
                };
                self.chat_chunk(vec![choice], usage)
            }
            Endpoint::Completion => {
                let logprobs = tokens.map(|t| self.text_logprobs(t, offset));
                let choice =
                    CompletionChunkChoice { index: i, text: delta.text.clone(), logprobs, finish_reason: delta.finish };
                self.text_chunk(vec![choice], usage)
            }
        }
    }

    pub(super) async fn stream(mut self, tx: Sender<Result<SseEvent, Infallible>>) {
        if self.endpoint == Endpoint::Chat {
            for i in 0..self.choices.len() {
                let role = ChatChunkChoice {
                    index: i,
                    delta: ChatDelta { role: Some(AssistantRole::Tag), content: String::new() },
                    logprobs: None,
                    finish_reason: None,
                };
                if !send(&tx, &self.chat_chunk(vec![role], self.chunk_usage())).await {
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
                    let _ = send(&tx, &e.body()).await;
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
            if !send(&tx, &chunk).await {
                return;
            }
        }
        if self.options.include_usage {
            // The last chunk: no choices, the usage.
            let usage = Some(Some(self.usage()));
            let last = match self.endpoint {
                Endpoint::Chat => self.chat_chunk(Vec::new(), usage),
                Endpoint::Completion => self.text_chunk(Vec::new(), usage),
            };
            if !send(&tx, &last).await {
                return;
            }
        }
        let _ = tx.send(Ok(SseEvent::default().data("[DONE]"))).await;
    }
}
