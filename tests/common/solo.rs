//! The test oracle: one sequence at a time, straight through the model, the simplest correct
//! generator. The batching engine must agree with it token for token. It uses only the
//! engine's public pieces: a backend from the model handle, the sampler, the stop-token rule.

use braid::backend::{FlatBatch, RowOutput};
use braid::engine::sequence::is_stop;
use braid::engine::{Backend, FinishReason, ModelHandle, SampledToken, Sampler, SamplingParams};

/// A backend whose KV cache just fits one sequence of `tokens` tokens (blocks in order), for
/// steps of up to `step_tokens` tokens, every one of which may ask for logits.
pub fn solo_backend(
    model: &ModelHandle,
    tokens: usize,
    step_tokens: usize,
) -> candle_core::Result<(Backend, Vec<u32>)> {
    const BLOCK: usize = 16;
    let blocks = tokens.div_ceil(BLOCK).max(1);
    let backend = model.backend(blocks, BLOCK, step_tokens, step_tokens).map_err(candle_core::Error::Msg)?;
    Ok((backend, (0..blocks as u32).collect()))
}

fn logits_rows(backend: &mut Backend, batch: &FlatBatch) -> candle_core::Result<Vec<Vec<f32>>> {
    backend
        .forward(batch, None)?
        .into_iter()
        .map(|row| match row {
            RowOutput::Logits(row) => Ok(row),
            RowOutput::Chosen(..) => candle_core::bail!("the backend chose tokens where logits were asked for"),
        })
        .collect()
}

/// Generates up to `params.max_tokens` tokens after `prompt`.
pub fn generate_solo(
    model: &ModelHandle,
    prompt: &[u32],
    params: SamplingParams,
    eos_ids: &[u32],
) -> candle_core::Result<(Vec<SampledToken>, FinishReason)> {
    let (mut backend, table) = solo_backend(model, prompt.len() + params.max_tokens, prompt.len())?;
    let mut sampler = Sampler::new(params.clone(), prompt);
    let mut out = Vec::new();
    let mut pending: Vec<u32> = prompt.to_vec();
    let mut context = 0;
    while out.len() < params.max_tokens {
        context += pending.len();
        let mut batch = FlatBatch::default();
        batch.push(&pending, context, table.clone(), true);
        let mut logits = logits_rows(&mut backend, &batch)?.remove(0);
        let token = sampler.sample(&mut logits);
        sampler.observe(token.id);
        let id = token.id;
        out.push(token);
        if is_stop(&params, eos_ids, id) {
            return Ok((out, FinishReason::Stop));
        }
        pending = vec![id];
    }
    Ok((out, FinishReason::Length))
}

/// The logits at every position of `ids` (teacher forcing, one forward pass), one row per token.
pub fn logits_all_positions(model: &ModelHandle, ids: &[u32]) -> candle_core::Result<Vec<Vec<f32>>> {
    let (mut backend, table) = solo_backend(model, ids.len(), ids.len())?;
    let mut batch = FlatBatch::default();
    batch.push(ids, ids.len(), table, false);
    batch.logit_rows = (0..ids.len()).collect();
    logits_rows(&mut backend, &batch)
}

/// Log-softmax of the logits at every position of `ids` (teacher forcing), one row per token.
pub fn logprobs_all_positions(model: &ModelHandle, ids: &[u32]) -> candle_core::Result<Vec<Vec<f32>>> {
    let rows = logits_all_positions(model, ids)?;
    let vocab = model.vocab_size();
    let logits = candle_core::Tensor::from_vec(rows.concat(), (ids.len(), vocab), &candle_core::Device::Cpu)?;
    let logprobs = candle_nn::ops::log_softmax(&logits, 1)?;
    logprobs.to_vec2::<f32>()
}
