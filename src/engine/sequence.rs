//! One request's state inside the engine.

use super::retention::RetentionPlan;
use super::sampler::{Sampler, SamplingParams};
use super::FinishReason;
use crate::backend::{BlockId, Window};

pub type RequestId = u64;

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
    pub finish: Option<FinishReason>,
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
            finish: None,
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
}
