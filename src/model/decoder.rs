//! The decoder every architecture braid serves is an instance of: token embeddings, blocks of
//! (norm → attention → optional norm → residual, norm → feed-forward → optional norm →
//! residual), a final norm and the output projection. What varies by architecture — biases,
//! Q/K norms, post norms, sliding windows, rope bases, the activation, experts — is in the
//! config (`config.rs`, `arch/`). Forward takes a flat batch and reads/writes the paged cache.

use std::sync::Arc;

use super::arch::names::{self, Layer as Names};
use super::config::ModelConfig;
use super::dump;
use super::kv_cache::KvCache;
use super::layers::{Attention, FeedForward, Linear, Mlp, Moe, add_into, rms_norm_rows};
use super::weights::{Embedding, WeightSource};
use crate::backend::FlatBatch;
use crate::cpu::attention::{AttentionPlan, AttentionShape};
use crate::cpu::linear::QLinear;
use crate::cpu::rope::Rope;
use crate::gguf::ModelError;

struct Block {
    /// Which of the decoder's ropes this block's attention rotates with.
    rope: usize,
    attn_norm: Vec<f32>,
    attention: Attention,
    post_attn_norm: Option<Vec<f32>>,
    ffn_norm: Vec<f32>,
    ffn: FeedForward,
    post_ffn_norm: Option<Vec<f32>>,
}

pub struct Decoder {
    pub config: ModelConfig,
    embeddings: Embedding,
    blocks: Vec<Block>,
    /// The global rope, then the local layers' where it differs (Gemma 3): their cos/sin tables
    /// are made once a step, not once a layer.
    ropes: Vec<Rope>,
    norm: Vec<f32>,
    output: Arc<QLinear>,
    vocab_size: usize,
}

impl Decoder {
    /// Reads the model's tensors from `src` by their GGUF names.
    pub fn load(src: &mut dyn WeightSource, config: ModelConfig) -> Result<Self, ModelError> {
        let c = &config;
        let (h, hd) = (c.hidden_size, c.head_dim);
        let (q_out, kv_out) = (c.n_head * hd, c.n_kv_head * hd);
        let vocab_size = src
            .dims(names::TOKEN_EMBD)
            .and_then(|d| d.first().copied())
            .ok_or_else(|| ModelError::MissingTensor(names::TOKEN_EMBD.into()))?;
        let embeddings = src.embedding(names::TOKEN_EMBD, vocab_size, h)?;
        let output = match (&embeddings, src.has(names::OUTPUT)) {
            (_, true) => Arc::new(src.linear(names::OUTPUT, vocab_size, h)?),
            // Tied embeddings: the output projection is the embedding table.
            (Embedding::Rows(table), false) => Arc::clone(table),
            (Embedding::Table(_), false) => Arc::new(src.linear(names::TOKEN_EMBD, vocab_size, h)?),
        };
        let longrope = if c.rope_long_factors { names::ROPE_FACTORS_LONG } else { names::ROPE_FACTORS_SHORT };
        let freq_factors = if src.has(names::ROPE_FREQS) {
            Some(src.vector(names::ROPE_FREQS, c.rope_dim / 2)?)
        } else if src.has(longrope) {
            Some(src.vector(longrope, c.rope_dim / 2)?)
        } else {
            None
        };
        let ropes: Vec<Rope> = std::iter::once(c.rope(freq_factors.as_deref())).chain(c.local_rope()).collect();
        let mut blocks = Vec::with_capacity(c.n_layer);
        for l in 0..c.n_layer {
            let t = Names::new(l);
            let linear = |src: &mut dyn WeightSource, name: &str, bias: &str, out: usize, inp: usize| {
                let weight = src.linear(name, out, inp)?;
                let bias = if src.has(bias) { Some(src.vector(bias, out)?) } else { None };
                Ok::<_, ModelError>(Linear { weight, bias })
            };
            let qkv = if src.has(&t.qkv) {
                linear(src, &t.qkv, "", q_out + 2 * kv_out, h)?
            } else {
                Linear::stack(vec![
                    linear(src, &t.q, &t.q_bias, q_out, h)?,
                    linear(src, &t.k, &t.k_bias, kv_out, h)?,
                    linear(src, &t.v, &t.v_bias, kv_out, h)?,
                ])
            };
            if c.qkv_bias && qkv.bias.is_none() {
                return Err(ModelError::MissingTensor(t.q_bias));
            }
            let (q_norm, k_norm) = if c.qk_norm {
                (Some(src.vector(&t.q_norm, hd)?), Some(src.vector(&t.k_norm, hd)?))
            } else {
                (None, None)
            };
            let attention = Attention {
                qkv,
                o: src.linear(&t.o, h, q_out)?.into(),
                q_norm,
                k_norm,
                shape: AttentionShape {
                    n_head: c.n_head,
                    n_kv_head: c.n_kv_head,
                    head_dim: hd,
                    scale: c.attention_scale,
                    window: c.layer_windows[l],
                },
                rms_eps: c.rms_eps,
            };
            let ffn = match &c.moe {
                Some(m) if !m.dense_layers.contains(&l) => {
                    let n = m.n_expert;
                    let gates = src.experts(&t.gate_exps, n, m.expert_ffn_size, h)?;
                    let ups = src.experts(&t.up_exps, n, m.expert_ffn_size, h)?;
                    let downs = src.experts(&t.down_exps, n, h, m.expert_ffn_size)?;
                    let experts = gates
                        .into_iter()
                        .zip(ups)
                        .zip(downs)
                        .map(|((gate, up), down)| Mlp {
                            gate_up: Linear::stack(vec![gate.into(), up.into()]),
                            down: down.into(),
                            activation: c.activation,
                        })
                        .collect();
                    let router = src.floats(&t.router, &[n, h])?;
                    FeedForward::Moe(Moe { router, experts, top_k: m.n_expert_used, norm_top_k: m.norm_top_k })
                }
                _ => {
                    let gate_up = if src.has(&t.gate) {
                        Linear::stack(vec![
                            src.linear(&t.gate, c.ffn_size, h)?.into(),
                            src.linear(&t.up, c.ffn_size, h)?.into(),
                        ])
                    } else {
                        // Gate and up in one matrix (Phi-3).
                        src.linear(&t.up, 2 * c.ffn_size, h)?.into()
                    };
                    FeedForward::Dense(Box::new(Mlp {
                        gate_up,
                        down: src.linear(&t.down, h, c.ffn_size)?.into(),
                        activation: c.activation,
                    }))
                }
            };
            let post = |src: &mut dyn WeightSource, name: &str| {
                if c.post_norms { src.vector(name, h).map(Some) } else { Ok(None) }
            };
            blocks.push(Block {
                rope: usize::from(c.uses_local_rope(l)),
                attn_norm: src.vector(&t.attn_norm, h)?,
                attention,
                post_attn_norm: post(src, &t.post_attn_norm)?,
                ffn_norm: src.vector(&t.ffn_norm, h)?,
                ffn,
                post_ffn_norm: post(src, &t.post_ffn_norm)?,
            });
        }
        let norm = src.vector(names::OUTPUT_NORM, h)?;
        Ok(Self { config, embeddings, blocks, ropes, norm, output, vocab_size })
    }

    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// One forward pass over a flat batch. Returns the f32 logits of each of `batch.logit_rows`.
    ///
    /// Activations stay in plain row-major vectors between braid's kernels: no tensor
    /// allocations or extra thread pools per step.
    pub fn forward(&self, batch: &FlatBatch, kv: &mut KvCache) -> candle_core::Result<Vec<Vec<f32>>> {
        let c = &self.config;
        let n_tokens = batch.tokens.len();
        let hidden = c.hidden_size;
        let mut x = self.embeddings.lookup(&batch.tokens)?;
        if let Some(scale) = c.embedding_scale {
            x.iter_mut().for_each(|v| *v *= scale);
        }
        let plan = AttentionPlan::new(batch, kv.block_size);
        let tables: Vec<(Vec<f32>, Vec<f32>)> = self.ropes.iter().map(|r| r.tables(&batch.positions)).collect();
        let step = dump::next_step();
        dump::tensor(step, || "embd".into(), &x);
        for (l, (block, layer_kv)) in self.blocks.iter().zip(kv.layers.iter_mut()).enumerate() {
            let h = rms_norm_rows(&x, &block.attn_norm, c.rms_eps);
            dump::tensor(step, || format!("attn_norm-{l}"), &h);
            let (rope, (cos, sin)) = (&self.ropes[block.rope], &tables[block.rope]);
            let mut attn = block.attention.forward(&h, batch, &plan, layer_kv, rope, (cos, sin))?;
            if let Some(w) = &block.post_attn_norm {
                attn = rms_norm_rows(&attn, w, c.rms_eps);
            }
            add_into(&mut x, &attn);
            dump::tensor(step, || format!("ffn_inp-{l}"), &x);
            let h = rms_norm_rows(&x, &block.ffn_norm, c.rms_eps);
            let mut ffn = block.ffn.forward(&h, n_tokens)?;
            if let Some(w) = &block.post_ffn_norm {
                ffn = rms_norm_rows(&ffn, w, c.rms_eps);
            }
            add_into(&mut x, &ffn);
            dump::tensor(step, || format!("l_out-{l}"), &x);
        }
        let mut last = Vec::with_capacity(batch.logit_rows.len() * hidden);
        for &r in &batch.logit_rows {
            last.extend_from_slice(&x[r * hidden..(r + 1) * hidden]);
        }
        let last = rms_norm_rows(&last, &self.norm, c.rms_eps);
        let logits = self.output.forward_rows(&last, batch.logit_rows.len())?;
        dump::tensor(step, || "result_output".into(), &logits);
        Ok(logits.chunks_exact(self.vocab_size).map(<[f32]>::to_vec).collect())
    }
}
