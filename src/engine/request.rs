//! A request the engine can run, checked once, when it is made, against the engine's limits
//! (`Limits`): the server and the CLI make one from what they were given, and the engine takes
//! it without checking again (it only asserts, in debug builds).

use super::retention::RetentionPlan;
use super::sampler::SamplingParams;

/// What one request may hold on an engine (`Engine::limits`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Token ids run from 0 to `vocab_size - 1`.
    pub vocab_size: usize,
    /// Prompt plus output tokens: the model's context, and never more than the whole KV pool.
    pub max_context: usize,
}

impl Limits {
    /// Checks token ids against the vocabulary.
    pub fn check_tokens(&self, ids: &[u32]) -> Result<(), RequestError> {
        match ids.iter().find(|&&id| id as usize >= self.vocab_size) {
            Some(&id) => Err(RequestError::BadToken { id, vocab: self.vocab_size }),
            None => Ok(()),
        }
    }
}

/// Why a request cannot run. The messages are the API's (the server sends them as they are).
#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum RequestError {
    #[error("the prompt is empty")]
    EmptyPrompt,
    #[error("token id {id} is outside the vocabulary (size {vocab})")]
    BadToken { id: u32, vocab: usize },
    #[error("max_tokens must be at least 1")]
    NoTokens,
    #[error(
        "This model's maximum context length is {limit} tokens, but the prompt has {prompt} tokens and {max_tokens} more were requested"
    )]
    TooLong { prompt: usize, max_tokens: usize, limit: usize },
    /// A sampling parameter out of its range (the message names it).
    #[error("{0}")]
    BadParams(String),
}

/// A prompt of token ids, how to sample its continuation, and how long its blocks are worth
/// keeping once it is done. Made only by `new`, which checks it.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    prompt: Vec<u32>,
    params: SamplingParams,
    retention: RetentionPlan,
}

impl Request {
    /// A request on an engine of `limits`: a non-empty prompt of known tokens, sampling
    /// parameters in range, at least one token to generate, all within the context. Its
    /// blocks are kept as an anonymous request's (see `with_retention`).
    pub fn new(prompt: Vec<u32>, params: SamplingParams, limits: &Limits) -> Result<Self, RequestError> {
        check(&prompt, &params, limits)?;
        Ok(Self { prompt, params, retention: RetentionPlan::default() })
    }

    /// The same request, its blocks kept by the given retention classes (a session's
    /// conversation outlives anonymous requests in memory).
    pub fn with_retention(self, retention: RetentionPlan) -> Self {
        Self { retention, ..self }
    }

    pub fn prompt(&self) -> &[u32] {
        &self.prompt
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Whether it is still valid on an engine of `limits` (for the engine's debug assertions).
    pub(super) fn fits(&self, limits: &Limits) -> bool {
        check(&self.prompt, &self.params, limits).is_ok()
    }

    pub(super) fn into_parts(self) -> (Vec<u32>, SamplingParams, RetentionPlan) {
        (self.prompt, self.params, self.retention)
    }
}

fn check(prompt: &[u32], params: &SamplingParams, limits: &Limits) -> Result<(), RequestError> {
    if prompt.is_empty() {
        return Err(RequestError::EmptyPrompt);
    }
    limits.check_tokens(prompt)?;
    if params.max_tokens == 0 {
        return Err(RequestError::NoTokens);
    }
    params.validate().map_err(RequestError::BadParams)?;
    if prompt.len() + params.max_tokens > limits.max_context {
        return Err(RequestError::TooLong {
            prompt: prompt.len(),
            max_tokens: params.max_tokens,
            limit: limits.max_context,
        });
    }
    Ok(())
}
