//! CPU paged attention over a flat batch.
//!
//! Each (token, kv-head) pair is one independent task whose reductions run in a fixed order, so
//! a token's output never depends on what else is in the batch (batch invariance).

use half::slice::HalfFloatSliceExt;
use rayon::prelude::*;

use super::batch::{FlatBatch, SeqSlice};
use super::kv_cache::LayerKv;

/// Per-token facts every layer needs, computed once per forward.
pub struct AttentionPlan {
    /// Cache slot (block * block_size + offset) each new token is written to.
    pub slots: Vec<usize>,
    /// Runs of consecutive new tokens of one sequence, attended together.
    tiles: Vec<Tile>,
    pub block_size: usize,
}

/// Query tokens `first..first + len` of the flat batch, all of sequence `seq`, the first at
/// logical position `pos` in it.
#[derive(Debug, Clone, Copy)]
struct Tile {
    seq: usize,
    first: usize,
    len: usize,
    pos: usize,
}

/// Query tokens per tile: each cached K/V row is converted once per tile, not once per token.
const TILE: usize = 16;

impl AttentionPlan {
    pub fn new(batch: &FlatBatch, block_size: usize) -> Self {
        let mut slots = Vec::with_capacity(batch.tokens.len());
        let mut tiles = Vec::new();
        let mut first = 0;
        for (s, seq) in batch.seqs.iter().enumerate() {
            let start = seq.context_len - seq.query_len;
            for j in start..seq.context_len {
                slots.push(slot_of(&seq.block_table, block_size, j));
            }
            for offset in (0..seq.query_len).step_by(TILE) {
                let len = TILE.min(seq.query_len - offset);
                tiles.push(Tile { seq: s, first: first + offset, len, pos: start + offset });
            }
            first += seq.query_len;
        }
        Self { slots, tiles, block_size }
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
    let tasks: Vec<(Tile, usize)> = plan.tiles.iter().flat_map(|&tile| (0..n_kv_head).map(move |g| (tile, g))).collect();
    #[cfg(target_arch = "x86_64")]
    let avx2 = std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") && std::is_x86_feature_detected!("f16c");
    let results: Vec<Vec<f32>> = tasks
        .par_iter()
        .map_init(
            || Scratch { scores: Vec::new(), slots: Vec::new(), row: vec![0f32; head_dim], keys: vec![0f32; head_dim * KEYS] },
            |scratch, &(tile, g)| {
                let seq = &batch.seqs[tile.seq];
                let mut out = vec![0f32; tile.len * group * head_dim];
                #[cfg(target_arch = "x86_64")]
                if avx2 {
                    // SAFETY: the features were just detected.
                    unsafe { attend_tile_avx2(plan, seq, layer, q, shape, tile, g, scratch, &mut out) };
                    return out;
                }
                attend_tile(plan, seq, layer, q, shape, tile, g, scratch, &mut out);
                out
            },
        )
        .collect();
    let mut out = vec![0f32; q.len()];
    let width = group * head_dim;
    for ((tile, g), values) in tasks.iter().zip(&results) {
        for (k, chunk) in values.chunks_exact(width).enumerate() {
            let t = tile.first + k;
            out[t * n_head * head_dim + g * width..][..width].copy_from_slice(chunk);
        }
    }
    out
}

struct Scratch {
    scores: Vec<f32>,
    slots: Vec<usize>,
    row: Vec<f32>,
    /// A block of KEYS keys, transposed: `[head_dim][KEYS]`.
    keys: Vec<f32>,
}

/// Keys scored together: each query row's dot products with them run as one vector of lanes.
const KEYS: usize = 8;

/// `attend_tile` compiled for AVX2 and FMA (the same operations, wider and fused in hardware).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
unsafe fn attend_tile_avx2(
    plan: &AttentionPlan,
    seq: &SeqSlice,
    layer: &LayerKv,
    q: &[f32],
    shape: &AttentionShape,
    tile: Tile,
    g: usize,
    scratch: &mut Scratch,
    out: &mut [f32],
) {
    attend_tile(plan, seq, layer, q, shape, tile, g, scratch, out)
}

/// Attention of a tile's tokens (the query heads of KV head `g`) over their sequence's cache.
/// `out` is `[tile.len, group, head_dim]`. Every query row's arithmetic is the same as if it
/// were alone: its scores in key order, its softmax, its weighted sum in key order.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn attend_tile(
    plan: &AttentionPlan,
    seq: &SeqSlice,
    layer: &LayerKv,
    q: &[f32],
    shape: &AttentionShape,
    tile: Tile,
    g: usize,
    scratch: &mut Scratch,
    out: &mut [f32],
) {
    let AttentionShape { n_head, n_kv_head, head_dim } = *shape;
    let group = n_head / n_kv_head;
    let width = n_kv_head * head_dim;
    let scale = 1.0 / (head_dim as f32).sqrt();
    // The last token sees the most: positions 0..=pos + len - 1.
    let n_ctx = tile.pos + tile.len;
    let rows = tile.len * group;
    let Scratch { scores, slots, row, keys } = scratch;
    // Keys some row of the tile sees: all, or under a window the kept ones and the recent ones.
    let needed = |i: usize| seq.window.is_none_or(|w| i < w.keep || i >= w.first_visible(tile.pos));
    slots.clear();
    slots.extend((0..n_ctx).map(|i| if needed(i) { slot_of(&seq.block_table, plan.block_size, i) } else { usize::MAX }));
    scores.clear();
    scores.resize(rows * n_ctx, 0f32);
    // Row r = (token k, head h) sees keys 0..=pos + k, within its window.
    let visible = |r: usize| tile.pos + r / group + 1;
    let sees = |r: usize, i: usize| i < visible(r) && seq.window.is_none_or(|w| w.sees(tile.pos + r / group, i));
    let query = |r: usize| &q[((tile.first + r / group) * n_head + g * group + r % group) * head_dim..][..head_dim];
    // Scores, KEYS keys at a time: lane l of a row's accumulator sums q[d] * k_l[d] over d in
    // order, with one fused multiply-add per step, whatever the tile or batch.
    for j0 in (0..n_ctx).step_by(KEYS) {
        let nk = KEYS.min(n_ctx - j0);
        keys.fill(0.0);
        for l in 0..nk {
            if slots[j0 + l] == usize::MAX {
                continue; // seen by no row here (its block may be gone)
            }
            layer.k[slots[j0 + l] * width + g * head_dim..][..head_dim].convert_to_f32_slice(row);
            for d in 0..head_dim {
                keys[d * KEYS + l] = row[d];
            }
        }
        for r in 0..rows {
            let seen = visible(r);
            if j0 >= seen {
                continue;
            }
            let qr = query(r);
            let mut acc = [0f32; KEYS];
            for d in 0..head_dim {
                let qd = qr[d];
                let kd = &keys[d * KEYS..(d + 1) * KEYS];
                for l in 0..KEYS {
                    acc[l] = qd.mul_add(kd[l], acc[l]);
                }
            }
            for l in 0..nk.min(seen - j0) {
                // Keys outside the window weigh nothing: exp(-inf) = 0.
                scores[r * n_ctx + j0 + l] = if sees(r, j0 + l) { acc[l] * scale } else { f32::NEG_INFINITY };
            }
        }
    }
    for r in 0..rows {
        softmax_in_place(&mut scores[r * n_ctx..r * n_ctx + visible(r)]);
    }
    out.fill(0.0);
    for (i, &slot) in slots.iter().enumerate() {
        if slot == usize::MAX {
            continue;
        }
        layer.v[slot * width + g * head_dim..][..head_dim].convert_to_f32_slice(row);
        for r in 0..rows {
            if sees(r, i) {
                let p = scores[r * n_ctx + i];
                for (a, &x) in out[r * head_dim..(r + 1) * head_dim].iter_mut().zip(row.iter()) {
                    *a = p.mul_add(x, *a);
                }
            }
        }
    }
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

    /// Under a window, a token attends to the kept tokens and the recent ones only, and blocks
    /// the window left behind are never read (their table entries are marked released).
    #[test]
    fn windowed_attention_matches_reference_and_skips_released_blocks() {
        use crate::model::batch::{Window, RELEASED_BLOCK};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(9);
        let (n_head, n_kv, hd, bs) = (4usize, 2usize, 8usize, 4usize);
        let width = n_kv * hd;
        let window = Window { keep: 2, size: 7 };
        let (past, new) = (20usize, 3usize);
        let total = past + new;
        let mut layer = LayerKv { k: vec![f16::ZERO; 64 * bs * width], v: vec![f16::ZERO; 64 * bs * width] };
        let mut value = || f16::from_f32(rng.random_range(-1.0..1.0)).to_f32();
        let ks: Vec<Vec<f32>> = (0..total).map(|_| (0..width).map(|_| value()).collect()).collect();
        let vs: Vec<Vec<f32>> = (0..total).map(|_| (0..width).map(|_| value()).collect()).collect();
        let mut table: Vec<u32> = (0..total.div_ceil(bs) as u32).map(|b| b * 3 + 1).collect();
        for j in 0..total {
            let slot = slot_of(&table, bs, j);
            layer.k[slot * width..(slot + 1) * width].convert_from_f32_slice(&ks[j]);
            layer.v[slot * width..(slot + 1) * width].convert_from_f32_slice(&vs[j]);
        }
        // Blocks wholly between the kept tokens and the window of the first new token.
        let first = window.first_visible(past);
        for b in 1..table.len() {
            if (b + 1) * bs <= first {
                table[b] = RELEASED_BLOCK;
            }
        }
        assert!(table.contains(&RELEASED_BLOCK));
        let mut batch = FlatBatch::default();
        batch.push(&vec![0; new], total, table, true);
        batch.seqs[0].window = Some(window);
        // The new tokens' own blocks are present, so planning their writes is fine.
        let plan = AttentionPlan::new(&batch, bs);
        let q: Vec<f32> = (0..new * n_head * hd).map(|_| rng.random_range(-2.0f32..2.0)).collect();
        let got = paged_attention(&batch, &plan, &layer, &q, &AttentionShape { n_head, n_kv_head: n_kv, head_dim: hd });
        for t in 0..new {
            let j = past + t;
            let seen: Vec<usize> = (0..=j).filter(|&i| window.sees(j, i)).collect();
            let k: Vec<Vec<f32>> = seen.iter().map(|&i| ks[i].clone()).collect();
            let v: Vec<Vec<f32>> = seen.iter().map(|&i| vs[i].clone()).collect();
            let want = reference(&q[t * n_head * hd..(t + 1) * n_head * hd], &k, &v, n_head, n_kv, hd);
            for (a, b) in got[t * n_head * hd..(t + 1) * n_head * hd].iter().zip(&want) {
                assert!((a - b).abs() < 1e-5, "token {j}: {a} vs {b}");
            }
        }
    }
}
