//! CPU paged attention over a flat batch.
//!
//! Each (token, kv-head) pair is one independent task whose reductions run in a fixed order, so
//! a token's output never depends on what else is in the batch (batch invariance).

use half::slice::HalfFloatSliceExt;
use rayon::prelude::*;

use super::batch::FlatBatch;
use super::kv_cache::LayerKv;

/// Per-token facts every layer needs, computed once per forward.
pub struct AttentionPlan {
    /// Cache slot (block * block_size + offset) each new token is written to.
    pub slots: Vec<usize>,
    /// For each token: its sequence's index in `batch.seqs` and its logical index there.
    pub token_seq: Vec<(usize, usize)>,
    pub block_size: usize,
}

impl AttentionPlan {
    pub fn new(batch: &FlatBatch, block_size: usize) -> Self {
        let mut slots = Vec::with_capacity(batch.tokens.len());
        let mut token_seq = Vec::with_capacity(batch.tokens.len());
        for (s, seq) in batch.seqs.iter().enumerate() {
            for j in seq.context_len - seq.query_len..seq.context_len {
                slots.push(slot_of(&seq.block_table, block_size, j));
                token_seq.push((s, j));
            }
        }
        Self { slots, token_seq, block_size }
    }
}

#[inline]
fn slot_of(block_table: &[u32], block_size: usize, j: usize) -> usize {
    block_table[j / block_size] as usize * block_size + j % block_size
}

pub struct AttentionShape {
    pub n_head: usize,
    pub n_kv_head: usize,
    pub head_dim: usize,
}

/// Writes this step's K/V rows (`[T, n_kv_head * head_dim]`, rope already applied) into the
/// cache slots named by the plan.
pub fn write_kv(plan: &AttentionPlan, layer: &mut LayerKv, k: &[f32], v: &[f32], width: usize) {
    for (t, &slot) in plan.slots.iter().enumerate() {
        layer.k[slot * width..(slot + 1) * width].convert_from_f32_slice(&k[t * width..(t + 1) * width]);
        layer.v[slot * width..(slot + 1) * width].convert_from_f32_slice(&v[t * width..(t + 1) * width]);
    }
}

/// Causal attention of every new token over its sequence's cached tokens 0..=j.
/// `q` is `[T, n_head * head_dim]`; returns the same shape.
pub fn paged_attention(
    batch: &FlatBatch,
    plan: &AttentionPlan,
    layer: &LayerKv,
    q: &[f32],
    shape: &AttentionShape,
) -> Vec<f32> {
    let AttentionShape { n_head, n_kv_head, head_dim } = *shape;
    let group = n_head / n_kv_head;
    let width = n_kv_head * head_dim;
    let scale = 1.0 / (head_dim as f32).sqrt();
    let mut out = vec![0f32; q.len()];
    out.par_chunks_mut(group * head_dim).enumerate().for_each_init(
        || (Vec::new(), Vec::new(), vec![0f32; head_dim]),
        |(scores, slots, row), (task, out_group)| {
            let (t, g) = (task / n_kv_head, task % n_kv_head);
            let (s, j) = plan.token_seq[t];
            let table = &batch.seqs[s].block_table;
            let n_ctx = j + 1;
            slots.clear();
            slots.extend((0..n_ctx).map(|i| slot_of(table, plan.block_size, i)));
            scores.resize(group * n_ctx, 0f32);
            for h in 0..group {
                let qh = &q[(t * n_head + g * group + h) * head_dim..][..head_dim];
                for (i, &slot) in slots.iter().enumerate() {
                    layer.k[slot * width + g * head_dim..][..head_dim].convert_to_f32_slice(row);
                    scores[h * n_ctx + i] = dot(qh, row) * scale;
                }
                softmax_in_place(&mut scores[h * n_ctx..(h + 1) * n_ctx]);
            }
            out_group.fill(0.0);
            for (i, &slot) in slots.iter().enumerate() {
                layer.v[slot * width + g * head_dim..][..head_dim].convert_to_f32_slice(row);
                for h in 0..group {
                    let p = scores[h * n_ctx + i];
                    let acc = &mut out_group[h * head_dim..(h + 1) * head_dim];
                    for (a, &x) in acc.iter_mut().zip(row.iter()) {
                        *a += p * x;
                    }
                }
            }
        },
    );
    out
}

/// Dot product with eight independent accumulators (vectorises, fixed summation order).
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let chunks = a.len() / 8;
    for c in 0..chunks {
        for l in 0..8 {
            acc[l] += a[c * 8 + l] * b[c * 8 + l];
        }
    }
    let mut sum = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for i in chunks * 8..a.len() {
        sum += a[i] * b[i];
    }
    sum
}

pub fn softmax_in_place(row: &mut [f32]) {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0f32;
    for x in row.iter_mut() {
        *x = (*x - max).exp();
        sum += *x;
    }
    let inv = 1.0 / sum;
    for x in row.iter_mut() {
        *x *= inv;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::f16;
    use rand::{Rng, SeedableRng};

    /// Plain attention over contiguous per-sequence K/V, the definition the kernel must meet.
    fn reference(q: &[f32], k: &[Vec<f32>], v: &[Vec<f32>], n_head: usize, n_kv: usize, hd: usize) -> Vec<f32> {
        let group = n_head / n_kv;
        let mut out = vec![0f32; n_head * hd];
        for h in 0..n_head {
            let g = h / group;
            let mut w: Vec<f64> = k
                .iter()
                .map(|kr| (0..hd).map(|d| (q[h * hd + d] * kr[g * hd + d]) as f64).sum::<f64>() / (hd as f64).sqrt())
                .collect();
            let m = w.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let z: f64 = w.iter().map(|x| (x - m).exp()).sum();
            for x in w.iter_mut() {
                *x = (*x - m).exp() / z;
            }
            for d in 0..hd {
                out[h * hd + d] = w.iter().zip(v).map(|(p, vr)| p * vr[g * hd + d] as f64).sum::<f64>() as f32;
            }
        }
        out
    }

    #[test]
    fn paged_attention_matches_reference_on_odd_shapes() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        for &(n_head, n_kv, hd, bs) in &[(6usize, 2usize, 13usize, 3usize), (3, 3, 8, 5), (4, 1, 17, 16)] {
            let width = n_kv * hd;
            let num_blocks = 40;
            let mut layer = LayerKv { k: vec![f16::ZERO; num_blocks * bs * width], v: vec![f16::ZERO; num_blocks * bs * width] };
            // Three sequences: (cached, new) token counts; blocks handed out shuffled.
            let shapes = [(0usize, 7usize), (11, 1), (4, 9)];
            let mut free: Vec<u32> = (0..num_blocks as u32).rev().collect();
            free.swap(0, 5);
            let mut batch = FlatBatch::default();
            let mut full_k = Vec::new();
            let mut full_v = Vec::new();
            let mut q = Vec::new();
            let mut kn = Vec::new();
            let mut vn = Vec::new();
            for &(past, new) in &shapes {
                let total = past + new;
                let table: Vec<u32> = (0..total.div_ceil(bs)).map(|_| free.pop().unwrap()).collect();
                // Values exactly representable in f16, so the cache stores them unchanged.
                let mut value = || f16::from_f32(rng.random_range(-1.0..1.0)).to_f32();
                let ks: Vec<Vec<f32>> = (0..total).map(|_| (0..width).map(|_| value()).collect()).collect();
                let vs: Vec<Vec<f32>> = (0..total).map(|_| (0..width).map(|_| value()).collect()).collect();
                for j in 0..past {
                    let slot = slot_of(&table, bs, j);
                    layer.k[slot * width..(slot + 1) * width].convert_from_f32_slice(&ks[j]);
                    layer.v[slot * width..(slot + 1) * width].convert_from_f32_slice(&vs[j]);
                }
                for j in past..total {
                    kn.extend_from_slice(&ks[j]);
                    vn.extend_from_slice(&vs[j]);
                    q.extend((0..n_head * hd).map(|_| rng.random_range(-2.0f32..2.0)));
                }
                batch.push(&vec![0; new], total, table, true);
                full_k.push(ks);
                full_v.push(vs);
            }
            let plan = AttentionPlan::new(&batch, bs);
            write_kv(&plan, &mut layer, &kn, &vn, width);
            let got = paged_attention(&batch, &plan, &layer, &q, &AttentionShape { n_head, n_kv_head: n_kv, head_dim: hd });
            let mut t = 0;
            for (s, &(past, new)) in shapes.iter().enumerate() {
                for j in past..past + new {
                    let qt = &q[t * n_head * hd..(t + 1) * n_head * hd];
                    let want = reference(qt, &full_k[s][..=j], &full_v[s][..=j], n_head, n_kv, hd);
                    let row = &got[t * n_head * hd..(t + 1) * n_head * hd];
                    for (a, b) in row.iter().zip(&want) {
                        assert!((a - b).abs() < 1e-5, "seq {s} token {j}: {a} vs {b}");
                    }
                    t += 1;
                }
            }
        }
    }

    #[test]
    fn dot_matches_plain_sum_on_odd_lengths() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        for n in [1usize, 7, 8, 9, 63, 64, 65, 129] {
            let a: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
            let b: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
            let want: f64 = a.iter().zip(&b).map(|(x, y)| (*x as f64) * (*y as f64)).sum();
            assert!((dot(&a, &b) as f64 - want).abs() < 1e-5);
        }
    }
}
