//! The pieces every architecture's blocks are made of: linear layers with optional biases,
//! attention over the paged cache, and the gated feed-forward network, dense or as a mixture of
//! experts. They compute on plain row-major vectors with `cpu/`'s kernels; whatever a row
//! gets depends on that row alone, never on the rest of the batch.

use rayon::prelude::*;

use crate::backend::FlatBatch;
use crate::cpu::attention::{AttentionPlan, AttentionShape, LayerKv, paged_attention, write_kv};
use crate::cpu::linear::QLinear;
use crate::cpu::norm::rms_norm_row;
use crate::cpu::rope::Rope;
use crate::cpu::vmath::{gelu_tanh_mul, silu_mul};

use super::config::Activation;

/// A linear layer with an optional bias.
pub struct Linear {
    pub weight: QLinear,
    pub bias: Option<Vec<f32>>,
}

impl Linear {
    pub fn forward(&self, x: &[f32], rows: usize) -> candle_core::Result<Vec<f32>> {
        let mut y = self.weight.forward_rows(x, rows)?;
        if let Some(b) = &self.bias {
            for row in y.chunks_exact_mut(b.len()) {
                for (v, bi) in row.iter_mut().zip(b) {
                    *v += bi;
                }
            }
        }
        Ok(y)
    }

    /// Several layers that read the same input, as one (outputs side by side).
    pub fn stack(parts: Vec<Linear>) -> Linear {
        let bias = if parts.iter().any(|p| p.bias.is_some()) {
            Some(
                parts
                    .iter()
                    .flat_map(|p| p.bias.clone().unwrap_or_else(|| vec![0.0; p.weight.out_features()]))
                    .collect(),
            )
        } else {
            None
        };
        Linear { weight: QLinear::stack(parts.into_iter().map(|p| p.weight).collect()), bias }
    }
}

impl From<QLinear> for Linear {
    fn from(weight: QLinear) -> Self {
        Linear { weight, bias: None }
    }
}

/// RMS-normalises each `weight.len()`-wide row of `x` into a new vector.
pub fn rms_norm_rows(x: &[f32], weight: &[f32], eps: f32) -> Vec<f32> {
    let mut out = x.to_vec();
    for row in out.chunks_exact_mut(weight.len()) {
        rms_norm_row(row, weight, eps);
    }
    out
}

pub fn add_into(x: &mut [f32], y: &[f32]) {
    for (a, b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

/// One layer's self-attention: projections, optional per-head Q/K norms, rope, the paged cache.
pub struct Attention {
    /// Q, K and V projections stacked: each output row is [q | k | v].
    pub qkv: Linear,
    pub o: Linear,
    /// RMS-norm weights over each head's Q and K (`head_dim` wide), where the model has them.
    pub q_norm: Option<Vec<f32>>,
    pub k_norm: Option<Vec<f32>>,
    pub shape: AttentionShape,
    pub rms_eps: f32,
}

impl Attention {
    /// Attention of the batch's new tokens `h` (`[T, hidden]`, normalised) over their sequences'
    /// caches, this step's K/V written first, rotated by `rope` with its tables for the batch's
    /// positions (made once a step for all the layers that share the rope). Returns `[T, hidden]`
    /// after the output projection.
    pub fn forward(
        &self,
        h: &[f32],
        batch: &FlatBatch,
        plan: &AttentionPlan,
        kv: &mut LayerKv,
        rope: &Rope,
        (cos, sin): (&[f32], &[f32]),
    ) -> candle_core::Result<Vec<f32>> {
        let n_tokens = batch.tokens.len();
        let AttentionShape { n_head, n_kv_head, head_dim, .. } = self.shape;
        let (qw, kw) = (n_head * head_dim, n_kv_head * head_dim);
        let qkv = self.qkv.forward(h, n_tokens)?;
        let half = rope.half_dim();
        let mut q = vec![0f32; n_tokens * qw];
        let mut k = vec![0f32; n_tokens * kw];
        let mut v = vec![0f32; n_tokens * kw];
        for (t, row) in qkv.chunks_exact(qw + 2 * kw).enumerate() {
            let (ct, st) = (&cos[t * half..(t + 1) * half], &sin[t * half..(t + 1) * half]);
            let (qt, kt) = (&mut q[t * qw..(t + 1) * qw], &mut k[t * kw..(t + 1) * kw]);
            qt.copy_from_slice(&row[..qw]);
            kt.copy_from_slice(&row[qw..qw + kw]);
            v[t * kw..(t + 1) * kw].copy_from_slice(&row[qw + kw..]);
            if let (Some(qn), Some(kn)) = (&self.q_norm, &self.k_norm) {
                qt.chunks_exact_mut(head_dim).for_each(|head| rms_norm_row(head, qn, self.rms_eps));
                kt.chunks_exact_mut(head_dim).for_each(|head| rms_norm_row(head, kn, self.rms_eps));
            }
            rope.apply(qt, ct, st);
            rope.apply(kt, ct, st);
        }
        write_kv(plan, kv, &k, &v, kw);
        let attn = paged_attention(batch, plan, kv, &q, &self.shape);
        self.o.forward(&attn, n_tokens)
    }
}

/// A gated feed-forward network: `down(act(gate(x)) * up(x))`.
pub struct Mlp {
    /// Gate and up projections stacked: each output row is [gate | up].
    pub gate_up: Linear,
    pub down: Linear,
    pub activation: Activation,
}

impl Mlp {
    pub fn forward(&self, h: &[f32], rows: usize) -> candle_core::Result<Vec<f32>> {
        let width = self.gate_up.weight.out_features() / 2;
        let gate_up = self.gate_up.forward(h, rows)?;
        let mut act = vec![0f32; rows * width];
        let activate = |(row, out): (&[f32], &mut [f32])| {
            let (gate, up) = row.split_at(width);
            match self.activation {
                Activation::Silu => silu_mul(gate, up, out),
                Activation::GeluTanh => gelu_tanh_mul(gate, up, out),
            }
        };
        // Row by row (each row's values depend on that row alone), in parallel when there are
        // several: a decode of one sequence is not worth waking the other threads for.
        if rows > 1 {
            gate_up.par_chunks_exact(2 * width).zip(act.par_chunks_exact_mut(width)).for_each(activate);
        } else {
            gate_up.chunks_exact(2 * width).zip(act.chunks_exact_mut(width)).for_each(activate);
        }
        self.down.forward(&act, rows)
    }
}

/// A mixture of experts: a router picks `top_k` experts per token, whose outputs are summed
/// with the router's (softmax) weights.
pub struct Moe {
    /// Router weights `[n_expert, hidden]`, in f32 (small, and its choices must be stable).
    pub router: Vec<f32>,
    pub experts: Vec<Mlp>,
    pub top_k: usize,
    /// Whether the chosen experts' weights are renormalised to sum to 1.
    pub norm_top_k: bool,
}

impl Moe {
    /// Per token, its experts and their weights, best first (ties: the lower expert).
    pub fn route(&self, h: &[f32], rows: usize) -> Vec<Vec<(usize, f32)>> {
        let hidden = h.len() / rows.max(1);
        h.chunks_exact(hidden)
            .map(|x| {
                let logits: Vec<f32> = self
                    .router
                    .chunks_exact(hidden)
                    .map(|w| w.iter().zip(x).map(|(a, b)| a * b).sum::<f32>())
                    .collect();
                let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let exps: Vec<f32> = logits.iter().map(|&l| (l - max).exp()).collect();
                let total: f32 = exps.iter().sum();
                let mut order: Vec<usize> = (0..exps.len()).collect();
                order.sort_by(|&a, &b| exps[b].total_cmp(&exps[a]).then(a.cmp(&b)));
                let chosen: Vec<(usize, f32)> = order[..self.top_k].iter().map(|&e| (e, exps[e] / total)).collect();
                let sum: f32 = chosen.iter().map(|c| c.1).sum();
                if self.norm_top_k { chosen.into_iter().map(|(e, w)| (e, w / sum)).collect() } else { chosen }
            })
            .collect()
    }

    /// Each expert runs once over the tokens routed to it; a token's outputs are added in
    /// expert order, so its result does not depend on which other tokens share the step.
    pub fn forward(&self, h: &[f32], rows: usize) -> candle_core::Result<Vec<f32>> {
        let hidden = h.len() / rows.max(1);
        let routes = self.route(h, rows);
        let mut out = vec![0f32; rows * hidden];
        for (e, expert) in self.experts.iter().enumerate() {
            let tokens: Vec<(usize, f32)> =
                routes.iter().enumerate().filter_map(|(t, r)| r.iter().find(|c| c.0 == e).map(|c| (t, c.1))).collect();
            if tokens.is_empty() {
                continue;
            }
            let mut x = Vec::with_capacity(tokens.len() * hidden);
            for &(t, _) in &tokens {
                x.extend_from_slice(&h[t * hidden..(t + 1) * hidden]);
            }
            let y = expert.forward(&x, tokens.len())?;
            for (&(t, weight), row) in tokens.iter().zip(y.chunks_exact(hidden)) {
                for (o, v) in out[t * hidden..(t + 1) * hidden].iter_mut().zip(row) {
                    *o += weight * v;
                }
            }
        }
        Ok(out)
    }
}

/// A block's feed-forward network.
pub enum FeedForward {
    Dense(Box<Mlp>),
    Moe(Moe),
}

impl FeedForward {
    pub fn forward(&self, h: &[f32], rows: usize) -> candle_core::Result<Vec<f32>> {
        match self {
            FeedForward::Dense(m) => m.forward(h, rows),
            FeedForward::Moe(m) => m.forward(h, rows),
        }
    }
}
