//! One request's state inside the engine, how it ends, and what a step tells of it.

use super::retention::RetentionPlan;
use super::sampler::{SampledToken, Sampler, SamplingParams};
use crate::backend::{BlockId, Window};

pub type RequestId = u64;

/// Why a generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FinishReason {
    Stop,
    Length,
    Abort,
}

/// What a step produced for one request.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub id: RequestId,
    pub token: Option<SampledToken>,
    pub finish: Option<FinishReason>,
    /// Prompt tokens this request took from the prefix cache.
    pub cached_tokens: usize,
}

/// Whether `token` ends a request sampled with `params`: one of its stop tokens, or one of the
/// model's end-of-sequence tokens (`eos_ids`) unless it ignores them.
pub fn is_stop(params: &SamplingParams, eos_ids: &[u32], token: u32) -> bool {
    params.stop_token_ids.contains(&token) || (!params.ignore_eos && eos_ids.contains(&token))
}

pub struct Sequence {
    pub id: RequestId,
    /// Prompt followed by the tokens generated so far.
    pub tokens: Vec<u32>,
    pub prompt_len: usize,
    /// Leading tokens whose K/V are in the cache (cached prefix + computed so far).
    pub num_computed: usize,
    pub block_table: Vec<BlockId>,
    /// Hashes of the full blocks known so far: the prompt's, then generated ones as they fill.
    pub block_hashes: Vec<u64>,
    pub sampler: Sampler,
    /// Prompt tokens taken from the prefix cache at the first admission (a readmission after
    /// preemption finds the blocks it computed itself: not a cache hit for its usage).
    pub cached_tokens: usize,
    /// Whether it has been admitted before (it is waiting again after a preemption).
    pub admitted: bool,
    /// Steps it has waited at admission because its prompt did not fit the free blocks.
    pub unfit_steps: u32,
    /// Attention window (`--max-kv-size`): blocks it has moved past are released.
    pub window: Option<Window>,
    /// How long its blocks are worth keeping once it lets go of them.
    pub retention: RetentionPlan,
}

impl Sequence {
    pub fn new(id: RequestId, prompt: Vec<u32>, params: SamplingParams, block_size: usize) -> Self {
        let block_hashes = super::block_manager::prefix_hashes(&prompt, block_size);
        let sampler = Sampler::new(params, &prompt);
        Self {
            id,
            prompt_len: prompt.len(),
            tokens: prompt,
            num_computed: 0,
            block_table: Vec::new(),
            block_hashes,
            sampler,
            cached_tokens: 0,
            admitted: false,
            unfit_steps: 0,
            window: None,
            retention: RetentionPlan::default(),
        }
    }

    pub fn params(&self) -> &SamplingParams {
        self.sampler.params()
    }

    pub fn output(&self) -> &[u32] {
        &self.tokens[self.prompt_len..]
    }

    /// Tokens not yet in the cache.
    pub fn remaining(&self) -> usize {
        self.tokens.len() - self.num_computed
    }

    /// Still working through its prompt (or, after preemption, its prompt and output).
    pub fn is_prefilling(&self) -> bool {
        self.remaining() > 1
    }

    /// Why the sequence ends with the token it just generated, if it does: a stop token, or
    /// its length (its `max_tokens`, or the model's context of `context_length` tokens).
    pub fn finish_reason(&self, eos_ids: &[u32], context_length: usize) -> Option<FinishReason> {
        let params = self.params();
        let &token = self.tokens.last().expect("a sequence holds its prompt");
        if is_stop(params, eos_ids, token) {
            Some(FinishReason::Stop)
        } else if self.output().len() >= params.max_tokens || self.tokens.len() >= context_length {
            Some(FinishReason::Length)
        } else {
            None
        }
    }
}
