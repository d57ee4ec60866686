//! One sequence at a time, straight through the model: the simplest correct generator. The
//! batching engine must agree with it token for token.

use crate::model::{FlatBatch, KvCache, Llama};

use super::sampler::{SampledToken, Sampler, SamplingParams};

/// Why a generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FinishReason {
    Stop,
    Length,
    Abort,
}

/// A KV cache just big enough for one sequence of `tokens` tokens, blocks in order.
pub fn solo_cache(model: &Llama, tokens: usize, block_size: usize) -> (KvCache, Vec<u32>) {
    let blocks = tokens.div_ceil(block_size).max(1);
    (KvCache::new(&model.config, blocks, block_size), (0..blocks as u32).collect())
}

/// Generates up to `params.max_tokens` tokens after `prompt`.
pub fn generate_solo(
    model: &Llama,
    prompt: &[u32],
    params: SamplingParams,
    eos_ids: &[u32],
) -> candle_core::Result<(Vec<SampledToken>, FinishReason)> {
    let (mut kv, table) = solo_cache(model, prompt.len() + params.max_tokens, 16);
    let mut sampler = Sampler::new(params.clone(), prompt);
    let mut out = Vec::new();
    let mut pending: Vec<u32> = prompt.to_vec();
    let mut context = 0;
    while out.len() < params.max_tokens {
        context += pending.len();
        let mut batch = FlatBatch::default();
        batch.push(&pending, context, table.clone(), true);
        let mut logits = model.forward(&batch, &mut kv)?.squeeze(0)?.to_vec1::<f32>()?;
        let token = sampler.sample(&mut logits);
        sampler.observe(token.id);
        let id = token.id;
        out.push(token);
        let is_stop = params.stop_token_ids.contains(&id) || (!params.ignore_eos && eos_ids.contains(&id));
        if is_stop {
            return Ok((out, FinishReason::Stop));
        }
        pending = vec![id];
    }
    Ok((out, FinishReason::Length))
}

/// Log-softmax of the logits at every position of `ids` (teacher forcing), one row per token.
pub fn logprobs_all_positions(model: &Llama, ids: &[u32]) -> candle_core::Result<Vec<Vec<f32>>> {
    let (mut kv, table) = solo_cache(model, ids.len(), 16);
    let mut batch = FlatBatch::default();
    batch.push(ids, ids.len(), table, false);
    batch.logit_rows = (0..ids.len()).collect();
    let logits = model.forward(&batch, &mut kv)?;
    let logprobs = candle_nn::ops::log_softmax(&logits, 1)?;
    logprobs.to_vec2::<f32>()
}
