//! CPU paged attention over a flat batch, computed in llama.cpp's order.
//!
//! Every query row runs llama.cpp's one-pass flash attention (`ggml_compute_forward_flash_attn_
//! ext_f16_one_chunk`, the path it takes for decode and for prompts of under 64 tokens) with
//! the same roundings: the query rounded to f16, each score a dot product of f16 values summed
//! in the order of ggml's AVX-512 `ggml_vec_dot_f16`, an online softmax over keys in order with
//! libm's `expf` (inlined: `vmath::expf`), and the weighted sum of values kept in f16. This
//! small model is chaotic enough that any other order moves its greedy output (see the golden
//! tests). The f16 operations themselves are in `f16_ops.rs`.
//!
//! A row's arithmetic depends only on its own query and the keys it sees, never on the tile,
//! the batch or the thread that runs it (batch invariance).

use half::slice::HalfFloatSliceExt;
use rayon::prelude::*;

use super::f16_ops;
use super::vmath;
use crate::backend::{FlatBatch, SeqSlice};

/// K and V of one layer: `[num_blocks, block_size, n_kv_head, head_dim]` each, stored as f16
/// (half the memory of f32, and what llama.cpp keeps by default). The model's `KvCache` holds
/// one per layer.
pub struct LayerKv {
    pub k: Vec<half::f16>,
    pub v: Vec<half::f16>,
}

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

/// Query tokens per tile: a tile's rows score each block of keys after one conversion, and run
/// their weighted sums together over each value.
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
    /// The factor on scores (1/sqrt(head_dim) for most models).
    pub scale: f32,
    /// The layer's sliding window: a token at position j sees positions i with j - i < window.
    /// Applies on top of the sequence's own window (`SeqSlice::window`).
    pub window: Option<usize>,
}

impl AttentionShape {
    /// A layer seeing everything, with the usual 1/sqrt(head_dim) scale.
    pub fn global(n_head: usize, n_kv_head: usize, head_dim: usize) -> Self {
        Self { n_head, n_kv_head, head_dim, scale: 1.0 / (head_dim as f32).sqrt(), window: None }
    }
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
    let AttentionShape { n_head, n_kv_head, head_dim, .. } = *shape;
    let group = n_head / n_kv_head;
    let tasks: Vec<(Tile, usize)> =
        plan.tiles.iter().flat_map(|&tile| (0..n_kv_head).map(move |g| (tile, g))).collect();
    let level = f16_ops::detect();
    let results: Vec<Vec<f32>> = tasks
        .par_iter()
        .map_init(Scratch::default, |scratch, &(tile, g)| {
            let seq = &batch.seqs[tile.seq];
            let mut out = vec![0f32; tile.len * group * head_dim];
            let job = TileJob { plan, seq, layer, q, shape, tile, g };
            match level {
                // SAFETY: `detect` found the features.
                #[cfg(target_arch = "x86_64")]
                f16_ops::AVX512 => unsafe { attend_tile_avx512(&job, scratch, &mut out) },
                #[cfg(target_arch = "x86_64")]
                f16_ops::AVX2 => unsafe { attend_tile_avx2(&job, scratch, &mut out) },
                _ => attend_tile::<{ f16_ops::PLAIN }>(&job, scratch, &mut out),
            }
            out
        })
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

#[derive(Default)]
struct Scratch {
    /// Where each key position's row (of the tile's KV head) starts in the layer's cache
    /// (usize::MAX: seen by no row of the tile).
    slots: Vec<usize>,
    /// The tile's query rows, rounded to f16.
    queries: Vec<f32>,
    /// Per query row, its scores and then its softmax steps over the keys it sees.
    steps: Vec<Vec<f16_ops::Step>>,
    /// Under a window, per token of the tile, the cache offsets of the keys it sees.
    token_keys: Vec<Vec<usize>>,
    /// A block of keys as f32, transposed (`f16_ops::transpose_keys`), and one key row.
    keys_t: Vec<f32>,
    key_row: Vec<f32>,
    /// One row's softmax exponents.
    exponents: Vec<f32>,
}

/// One task: a tile of one sequence's query tokens against that sequence's cache, for the
/// query heads of KV head `g`.
struct TileJob<'a> {
    plan: &'a AttentionPlan,
    seq: &'a SeqSlice,
    layer: &'a LayerKv,
    q: &'a [f32],
    shape: &'a AttentionShape,
    tile: Tile,
    g: usize,
}

/// `attend_tile` compiled for AVX2, FMA and F16C (the same operations, in vector registers).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn attend_tile_avx2(job: &TileJob, scratch: &mut Scratch, out: &mut [f32]) {
    attend_tile::<{ f16_ops::AVX2 }>(job, scratch, out)
}

/// `attend_tile` compiled for AVX-512 (16 lanes; the same operations again).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512dq,avx512vl")]
unsafe fn attend_tile_avx512(job: &TileJob, scratch: &mut Scratch, out: &mut [f32]) {
    attend_tile::<{ f16_ops::AVX512 }>(job, scratch, out)
}

/// Attention of a tile's tokens (the query heads of KV head `g`) over their sequence's cache.
/// `out` is `[tile.len, group, head_dim]`.
#[inline(always)]
fn attend_tile<const S: u8>(job: &TileJob, scratch: &mut Scratch, out: &mut [f32]) {
    let TileJob { plan, seq, layer, q, shape, tile, g } = *job;
    let AttentionShape { n_head, n_kv_head, head_dim, scale, window: layer_window } = *shape;
    let group = n_head / n_kv_head;
    let width = n_kv_head * head_dim;
    // The last token sees the most: positions 0..=pos + len - 1.
    let n_ctx = tile.pos + tile.len;
    let Scratch { slots, queries, steps, token_keys, key_row, keys_t, exponents } = scratch;
    // Keys some row of the tile sees: all, or under a window the kept ones and the recent ones.
    // Each is the offset of its row (KV head `g`) in the layer's cache.
    let needed = |i: usize| {
        seq.window.is_none_or(|w| i < w.keep || i >= w.first_visible(tile.pos))
            && layer_window.is_none_or(|w| i + w > tile.pos)
    };
    slots.clear();
    slots.extend((0..n_ctx).map(|i| {
        if needed(i) { slot_of(&seq.block_table, plan.block_size, i) * width + g * head_dim } else { usize::MAX }
    }));
    let rows = tile.len * group;
    queries.clear();
    queries.resize(rows * head_dim, 0.0);
    // (Plain loops, not iterator closures: everything here must inline into the vector builds,
    // or each fused multiply-add becomes a call to libm's `fmaf`.)
    for token in 0..tile.len {
        let q_token = &q[((tile.first + token) * n_head + g * group) * head_dim..][..group * head_dim];
        for (h, &x) in queries[token * group * head_dim..(token + 1) * group * head_dim].iter_mut().zip(q_token) {
            *h = f16_ops::round(x);
        }
    }
    steps.resize_with(rows, Vec::new);
    for row_steps in steps[..rows].iter_mut() {
        row_steps.clear();
    }
    // Scores (into each step's `ms` for now): row r = (token r / group, head r % group) scores
    // the keys it sees, in order.
    let windowed = seq.window.is_some() || layer_window.is_some();
    if S == f16_ops::AVX512 && rows >= KEY_BLOCK_ROWS && !windowed {
        // Many rows (a prefill tile): keys in blocks of 16, each block converted once for all
        // rows and scored 16 keys to a register.
        for i0 in (0..n_ctx).step_by(f16_ops::KEYS) {
            let nk = f16_ops::KEYS.min(n_ctx - i0);
            f16_ops::transpose_keys(&layer.k, &slots[i0..i0 + nk], head_dim, key_row, keys_t);
            for token in i0.saturating_sub(tile.pos)..tile.len {
                let seen = nk.min(tile.pos + token + 1 - i0);
                for r in token * group..(token + 1) * group {
                    let scores = f16_ops::dot_keys::<S>(keys_t, &queries[r * head_dim..(r + 1) * head_dim]);
                    steps[r].extend(scores[..seen].iter().map(|&score| f16_ops::Step { ms: score * scale, vs: 0.0 }));
                }
            }
        }
    } else {
        // Few rows (decode), or a window: key by key, each key row read once for the tile.
        // Under a window each token keeps the list of the keys it sees.
        token_keys.resize_with(tile.len, Vec::new);
        for keys in token_keys[..tile.len].iter_mut() {
            keys.clear();
        }
        for (i, &slot) in slots.iter().enumerate() {
            if slot == usize::MAX {
                continue;
            }
            let key = &layer.k[slot..slot + head_dim];
            for (token, keys) in token_keys[..tile.len].iter_mut().enumerate().skip(i.saturating_sub(tile.pos)) {
                let j = tile.pos + token;
                if seq.window.is_some_and(|w| !w.sees(j, i)) || layer_window.is_some_and(|w| i + w <= j) {
                    continue;
                }
                if windowed {
                    keys.push(slot);
                }
                for r in token * group..(token + 1) * group {
                    let s = f16_ops::dot::<S>(key, &queries[r * head_dim..(r + 1) * head_dim]) * scale;
                    steps[r].push(f16_ops::Step { ms: s, vs: 0.0 });
                }
            }
        }
    }
    // Softmax steps of every row, then the weighted sums: of all the tile's rows at once
    // (without a window every token sees keys 0..=its position), or under a window a token's
    // query heads at a time (they see the same keys).
    let mut totals = vec![0f32; rows];
    for (row_steps, total) in steps[..rows].iter_mut().zip(totals.iter_mut()) {
        *total = online_softmax_steps::<S>(row_steps, exponents);
    }
    if windowed {
        for (token, token_out) in out.chunks_exact_mut(group * head_dim).enumerate() {
            f16_ops::weighted_sums::<S>(
                &steps[token * group..(token + 1) * group],
                &token_keys[token],
                &layer.v,
                head_dim,
                token_out,
            );
        }
    } else {
        f16_ops::weighted_sums::<S>(&steps[..rows], &slots[..n_ctx], &layer.v, head_dim, out);
    }
    for (row, &total) in out.chunks_exact_mut(head_dim).zip(totals.iter()) {
        let inv = if total == 0.0 { 0.0 } else { 1.0 / total };
        for o in row.iter_mut() {
            *o *= inv;
        }
    }
}

/// Rows from which a tile scores keys a block at a time (`f16_ops::dot_keys`).
const KEY_BLOCK_ROWS: usize = 8;

/// llama.cpp's online softmax over a row's keys in order, on steps holding each key's score
/// (in `ms`): at a new maximum the running sum is to be rescaled by `ms = exp(old - new)` and
/// the key weighs `vs = 1`; otherwise `ms = 1` and it weighs `vs = exp(s - max)`. Returns the
/// total weight, accumulated as `S = S * ms + vs` (fused, as the compiler fuses it there).
#[inline(always)]
fn online_softmax_steps<const S: u8>(steps: &mut [f16_ops::Step], exponents: &mut Vec<f32>) -> f32 {
    let mut max = f32::NEG_INFINITY;
    // The exponents, with `vs` marking a new maximum (1) or not (0)...
    exponents.clear();
    exponents.resize(steps.len(), 0.0);
    for (step, exponent) in steps.iter_mut().zip(exponents.iter_mut()) {
        let s = step.ms;
        if s > max {
            step.vs = 1.0;
            *exponent = max - s;
            max = s;
        } else {
            step.vs = 0.0;
            *exponent = s - max;
        }
    }
    // ...then the exponentials, independent of each other, and the running total.
    vmath::expf_in_place::<S>(exponents);
    let mut total = 0f32;
    for (step, &e) in steps.iter_mut().zip(exponents.iter()) {
        (step.ms, step.vs) = if step.vs == 1.0 { (e, 1.0) } else { (1.0, e) };
        total = total.mul_add(step.ms, step.vs);
    }
    total
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

    /// A token's output is the same bits whether it is decoded alone (a tile of few rows) or
    /// computed inside a prefill chunk (a tile of many rows).
    #[test]
    fn a_token_computes_the_same_alone_and_inside_a_chunk() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(8);
        let (n_head, n_kv, hd, bs) = (6usize, 2usize, 24usize, 4usize);
        let width = n_kv * hd;
        let total = 37usize;
        let table: Vec<u32> = (0..total.div_ceil(bs) as u32).rev().collect();
        let mut layer = LayerKv { k: vec![f16::ZERO; 16 * bs * width], v: vec![f16::ZERO; 16 * bs * width] };
        let kv: Vec<f32> = (0..total * width).map(|_| rng.random_range(-1.0f32..1.0)).collect();
        let q: Vec<f32> = (0..total * n_head * hd).map(|_| rng.random_range(-2.0f32..2.0)).collect();
        let shape = AttentionShape::global(n_head, n_kv, hd);
        let mut all = FlatBatch::default();
        all.push(&vec![0; total], total, table.clone(), true);
        let plan = AttentionPlan::new(&all, bs);
        write_kv(&plan, &mut layer, &kv, &kv, width);
        for new in [1usize, 2, 7, 20] {
            let mut batch = FlatBatch::default();
            batch.push(&vec![0; new], total, table.clone(), true);
            let plan = AttentionPlan::new(&batch, bs);
            let got = paged_attention(&batch, &plan, &layer, &q[(total - new) * n_head * hd..], &shape);
            let whole = paged_attention(&all, &AttentionPlan::new(&all, bs), &layer, &q, &shape);
            let last = |out: &[f32]| out[out.len() - n_head * hd..].iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(last(&got), last(&whole), "last token with {new} new tokens");
        }
    }

    /// The AVX2 and AVX-512 builds of the kernel give the plain build's bits on odd shapes.
    #[test]
    fn vector_and_plain_kernels_agree_bit_for_bit() {
        #[cfg(target_arch = "x86_64")]
        {
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(12);
            for &(n_head, n_kv, hd) in &[(6usize, 2usize, 13usize), (4, 1, 64), (2, 2, 80)] {
                let (bs, total) = (4usize, 23usize);
                let width = n_kv * hd;
                let table: Vec<u32> = (0..total.div_ceil(bs) as u32).collect();
                let mut layer = LayerKv {
                    k: vec![f16::ZERO; total.div_ceil(bs) * bs * width],
                    v: vec![f16::ZERO; total.div_ceil(bs) * bs * width],
                };
                let kv: Vec<f32> = (0..total * width).map(|_| rng.random_range(-1.0f32..1.0)).collect();
                let q: Vec<f32> = (0..total * n_head * hd).map(|_| rng.random_range(-2.0f32..2.0)).collect();
                let mut batch = FlatBatch::default();
                batch.push(&vec![0; total], total, table, true);
                let plan = AttentionPlan::new(&batch, bs);
                write_kv(&plan, &mut layer, &kv, &kv, width);
                let shape = AttentionShape::global(n_head, n_kv, hd);
                let group = n_head / n_kv;
                for (tile, g) in plan.tiles.iter().flat_map(|&t| (0..n_kv).map(move |g| (t, g))) {
                    let run = |level: u8| {
                        let mut out = vec![0f32; tile.len * group * hd];
                        let job =
                            TileJob { plan: &plan, seq: &batch.seqs[0], layer: &layer, q: &q, shape: &shape, tile, g };
                        let scratch = &mut Scratch::default();
                        match level {
                            f16_ops::AVX512 => unsafe { attend_tile_avx512(&job, scratch, &mut out) },
                            f16_ops::AVX2 => unsafe { attend_tile_avx2(&job, scratch, &mut out) },
                            _ => attend_tile::<{ f16_ops::PLAIN }>(&job, scratch, &mut out),
                        }
                        out.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
                    };
                    let plain = run(f16_ops::PLAIN);
                    for level in (f16_ops::AVX2..=f16_ops::detect()).rev() {
                        assert_eq!(run(level), plain, "level {level}, head_dim {hd}");
                    }
                }
            }
        }
    }

    #[test]
    fn paged_attention_matches_reference_on_odd_shapes() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        for &(n_head, n_kv, hd, bs) in &[(6usize, 2usize, 13usize, 3usize), (3, 3, 8, 5), (4, 1, 17, 16)] {
            let width = n_kv * hd;
            let num_blocks = 40;
            let mut layer =
                LayerKv { k: vec![f16::ZERO; num_blocks * bs * width], v: vec![f16::ZERO; num_blocks * bs * width] };
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
            let got = paged_attention(&batch, &plan, &layer, &q, &AttentionShape::global(n_head, n_kv, hd));
            let mut t = 0;
            for (s, &(past, new)) in shapes.iter().enumerate() {
                for j in past..past + new {
                    let qt = &q[t * n_head * hd..(t + 1) * n_head * hd];
                    let want = reference(qt, &full_k[s][..=j], &full_v[s][..=j], n_head, n_kv, hd);
                    let row = &got[t * n_head * hd..(t + 1) * n_head * hd];
                    for (a, b) in row.iter().zip(&want) {
                        // The running weighted sum is kept in f16, as llama.cpp keeps it.
                        assert!((a - b).abs() < 4e-3, "seq {s} token {j}: {a} vs {b}");
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
        use crate::backend::{RELEASED_BLOCK, Window};
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
        for (b, entry) in table.iter_mut().enumerate().skip(1) {
            if (b + 1) * bs <= first {
                *entry = RELEASED_BLOCK;
            }
        }
        assert!(table.contains(&RELEASED_BLOCK));
        let mut batch = FlatBatch::default();
        batch.push(&vec![0; new], total, table, true);
        batch.seqs[0].window = Some(window);
        // The new tokens' own blocks are present, so planning their writes is fine.
        let plan = AttentionPlan::new(&batch, bs);
        let q: Vec<f32> = (0..new * n_head * hd).map(|_| rng.random_range(-2.0f32..2.0)).collect();
        let got = paged_attention(&batch, &plan, &layer, &q, &AttentionShape::global(n_head, n_kv, hd));
        for t in 0..new {
            let j = past + t;
            let seen: Vec<usize> = (0..=j).filter(|&i| window.sees(j, i)).collect();
            let k: Vec<Vec<f32>> = seen.iter().map(|&i| ks[i].clone()).collect();
            let v: Vec<Vec<f32>> = seen.iter().map(|&i| vs[i].clone()).collect();
            let want = reference(&q[t * n_head * hd..(t + 1) * n_head * hd], &k, &v, n_head, n_kv, hd);
            for (a, b) in got[t * n_head * hd..(t + 1) * n_head * hd].iter().zip(&want) {
                assert!((a - b).abs() < 4e-3, "token {j}: {a} vs {b}");
            }
        }
    }

    /// A layer's own sliding window (Gemma 3's local layers, Mistral), alone and on top of a
    /// sequence's rotating window, with a score scale other than 1/sqrt(head_dim): every
    /// token of a prefill sees exactly the keys within both windows.
    #[test]
    fn layer_window_and_scale_match_reference() {
        use crate::backend::Window;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
        let (n_head, n_kv, hd, bs) = (6usize, 3usize, 16usize, 4usize);
        let width = n_kv * hd;
        let total = 29usize;
        let new = 19usize;
        let past = total - new;
        let mut value = || f16::from_f32(rng.random_range(-1.0..1.0)).to_f32();
        let ks: Vec<Vec<f32>> = (0..total).map(|_| (0..width).map(|_| value()).collect()).collect();
        let vs: Vec<Vec<f32>> = (0..total).map(|_| (0..width).map(|_| value()).collect()).collect();
        let table: Vec<u32> = (0..total.div_ceil(bs) as u32).map(|b| 2 * b + 1).collect();
        let mut layer = LayerKv { k: vec![f16::ZERO; 64 * bs * width], v: vec![f16::ZERO; 64 * bs * width] };
        for j in 0..total {
            let slot = slot_of(&table, bs, j);
            layer.k[slot * width..(slot + 1) * width].convert_from_f32_slice(&ks[j]);
            layer.v[slot * width..(slot + 1) * width].convert_from_f32_slice(&vs[j]);
        }
        let q: Vec<f32> = (0..new * n_head * hd).map(|_| rng.random_range(-2.0f32..2.0)).collect();
        for seq_window in [None, Some(Window { keep: 2, size: 12 })] {
            let mut batch = FlatBatch::default();
            batch.push(&vec![0; new], total, table.clone(), true);
            batch.seqs[0].window = seq_window;
            let plan = AttentionPlan::new(&batch, bs);
            let shape = AttentionShape { scale: 0.3, window: Some(5), ..AttentionShape::global(n_head, n_kv, hd) };
            let got = paged_attention(&batch, &plan, &layer, &q, &shape);
            for t in 0..new {
                let j = past + t;
                let seen: Vec<usize> =
                    (0..=j).filter(|&i| j - i < 5 && seq_window.is_none_or(|w| w.sees(j, i))).collect();
                let k: Vec<Vec<f32>> =
                    seen.iter().map(|&i| ks[i].iter().map(|x| x * 0.3 * (hd as f32).sqrt()).collect()).collect();
                let v: Vec<Vec<f32>> = seen.iter().map(|&i| vs[i].clone()).collect();
                let want = reference(&q[t * n_head * hd..(t + 1) * n_head * hd], &k, &v, n_head, n_kv, hd);
                for (a, b) in got[t * n_head * hd..(t + 1) * n_head * hd].iter().zip(&want) {
                    assert!((a - b).abs() < 4e-3, "{seq_window:?} token {j}: {a} vs {b}");
                }
            }
        }
    }
}
