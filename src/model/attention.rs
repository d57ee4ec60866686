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
    let avx2 = super::quant_avx2::available();
    let results: Vec<Vec<f32>> = tasks
        .par_iter()
        .map_init(
            || Scratch {
                scores: Vec::new(),
                slots: Vec::new(),
                visible: Vec::new(),
                key_rows: vec![0f32; head_dim * PASS_KEYS],
                keys: vec![0f32; head_dim * PASS_KEYS],
                queries: Vec::new(),
                values: Vec::new(),
            },
            |scratch, &(tile, g)| {
                let seq = &batch.seqs[tile.seq];
                let mut out = vec![0f32; tile.len * group * head_dim];
                #[cfg(target_arch = "x86_64")]
                if avx2 {
                    // SAFETY: the features were just detected.
                    unsafe { attend_tile_avx2(plan, seq, layer, q, shape, tile, g, scratch, &mut out) };
                    return out;
                }
                attend_tile::<false>(plan, seq, layer, q, shape, tile, g, scratch, &mut out);
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
    /// Keys after the first `visible[r]` are beyond row r's token.
    visible: Vec<usize>,
    /// PASS_KEYS keys as f32, `[PASS_KEYS][head_dim]`, and transposed in blocks of KEYS,
    /// `[2][head_dim][KEYS]`.
    key_rows: Vec<f32>,
    keys: Vec<f32>,
    /// The tile's query rows, grouped and transposed for `score_rows`.
    queries: Vec<f32>,
    /// The tile's values as f32, `[n_ctx][head_dim]`.
    values: Vec<f32>,
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
    attend_tile::<true>(plan, seq, layer, q, shape, tile, g, scratch, out)
}

/// Attention of a tile's tokens (the query heads of KV head `g`) over their sequence's cache.
/// `out` is `[tile.len, group, head_dim]`. Every query row's arithmetic is the same as if it
/// were alone: its scores in key order, its softmax, its weighted sum in key order.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn attend_tile<const AVX2: bool>(
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
    let Scratch { scores, slots, visible, key_rows, keys, queries, values } = scratch;
    // Keys some row of the tile sees: all, or under a window the kept ones and the recent ones.
    let needed = |i: usize| seq.window.is_none_or(|w| i < w.keep || i >= w.first_visible(tile.pos));
    slots.clear();
    slots.extend((0..n_ctx).map(|i| if needed(i) { slot_of(&seq.block_table, plan.block_size, i) } else { usize::MAX }));
    scores.clear();
    scores.resize(rows * n_ctx, 0f32);
    // Row r = (token r / group, head r % group) sees keys 0..=pos + r / group, within its window.
    visible.clear();
    visible.extend((0..rows).map(|r| tile.pos + r / group + 1));
    let sees = |r: usize, i: usize| i < visible[r] && seq.window.is_none_or(|w| w.sees(visible[r] - 1, i));
    // Queries in groups of `lanes` rows, transposed (`[group][head_dim][lanes]`), the last
    // group padded with zero rows whose scores are never used. A decode tile has one row per
    // query head of the KV head (three here), so it goes in groups of 4 against twice as many
    // keys per pass instead of 8 mostly empty rows: the same number of independent chains.
    let lanes = if rows <= NARROW_ROWS { NARROW_ROWS } else { WIDE_ROWS };
    let groups = rows.div_ceil(lanes);
    queries.clear();
    queries.resize(groups * head_dim * lanes, 0.0);
    for r in 0..rows {
        let query = &q[((tile.first + r / group) * n_head + g * group + r % group) * head_dim..][..head_dim];
        let (gi, lane) = (r / lanes, r % lanes);
        for (d, &x) in query.iter().enumerate() {
            queries[(gi * head_dim + d) * lanes + lane] = x;
        }
    }
    // Scores, PASS_KEYS keys at a time: lane l of a row's accumulator sums q[d] * k_l[d] over
    // d in order, with one fused multiply-add per step, whatever the tile, the grouping of
    // rows or the batch.
    for j0 in (0..n_ctx).step_by(PASS_KEYS) {
        let nk = PASS_KEYS.min(n_ctx - j0);
        key_rows.fill(0.0);
        for l in 0..nk {
            if slots[j0 + l] != usize::MAX {
                // (A key no row here sees stays zero: its block may be gone.)
                widen::<AVX2>(&layer.k[slots[j0 + l] * width + g * head_dim..][..head_dim], &mut key_rows[l * head_dim..(l + 1) * head_dim]);
            }
        }
        for (half, out) in keys.chunks_exact_mut(head_dim * KEYS).enumerate() {
            transpose_keys::<AVX2>(&key_rows[half * KEYS * head_dim..], head_dim, out);
        }
        // Rows before `first_row` belong to tokens that come before every key of this pass.
        let first_row = j0.saturating_sub(tile.pos) * group;
        for gi in first_row / lanes..groups {
            let group_queries = &queries[gi * head_dim * lanes..(gi + 1) * head_dim * lanes];
            let mut store = |lane: usize, key0: usize, acc: &[f32; KEYS]| {
                let r = gi * lanes + lane;
                if r < first_row || r >= rows || j0 + key0 >= visible[r] {
                    return;
                }
                let first = j0 + key0;
                let row_scores = &mut scores[r * n_ctx + first..][..KEYS.min(n_ctx - first).min(visible[r] - first)];
                for (l, s) in row_scores.iter_mut().enumerate() {
                    // Keys outside the window weigh nothing: exp(-inf) = 0.
                    *s = if seq.window.is_none() || sees(r, first + l) { acc[l] * scale } else { f32::NEG_INFINITY };
                }
            };
            if lanes == NARROW_ROWS {
                let accs = score_rows_narrow(group_queries, keys);
                for (lane, [first, second]) in accs.iter().enumerate() {
                    store(lane, 0, first);
                    store(lane, KEYS, second);
                }
            } else {
                for (half, half_keys) in keys.chunks_exact(head_dim * KEYS).enumerate() {
                    for (lane, acc) in score_rows_wide(group_queries, half_keys).iter().enumerate() {
                        store(lane, half * KEYS, acc);
                    }
                }
            }
        }
    }
    for r in 0..rows {
        softmax_in_place(&mut scores[r * n_ctx..r * n_ctx + visible[r]]);
    }
    // Values as f32 once per tile; keys no row sees stay zero (their weights are zero too).
    values.clear();
    values.resize(n_ctx * head_dim, 0.0);
    for (i, &slot) in slots.iter().enumerate() {
        if slot != usize::MAX {
            widen::<AVX2>(&layer.v[slot * width + g * head_dim..][..head_dim], &mut values[i * head_dim..(i + 1) * head_dim]);
        }
    }
    // Weighted sums, two rows at a time. A row's weights past its own last key are zero (never
    // written), so running it as far as its partner adds exact zeros and changes nothing.
    let weights = |r: usize, n: usize| &scores[r * n_ctx..r * n_ctx + n];
    let mut r = 0;
    while r + 2 <= rows {
        let n = visible[r + 1];
        let (first, second) = out[r * head_dim..(r + 2) * head_dim].split_at_mut(head_dim);
        weighted_sum_rows::<2>([weights(r, n), weights(r + 1, n)], values, head_dim, [first, second]);
        r += 2;
    }
    if r < rows {
        weighted_sum_rows::<1>([weights(r, visible[r])], values, head_dim, [&mut out[r * head_dim..(r + 1) * head_dim]]);
    }
}

/// Cached f16 values to f32. With `AVX2` (set only inside `attend_tile_avx2`, which is compiled
/// for AVX2, FMA and F16C) eight at a time by one instruction, inline; otherwise one at a time.
#[inline(always)]
fn widen<const AVX2: bool>(src: &[half::f16], dst: &mut [f32]) {
    assert_eq!(src.len(), dst.len());
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if AVX2 {
        use std::arch::x86_64::*;
        while done + 8 <= src.len() {
            // SAFETY: in bounds; `AVX2` is only set by callers compiled with F16C and AVX.
            unsafe {
                let halves = _mm_loadu_si128(src.as_ptr().add(done) as *const __m128i);
                _mm256_storeu_ps(dst.as_mut_ptr().add(done), _mm256_cvtph_ps(halves));
            }
            done += 8;
        }
    }
    for (d, s) in dst[done..].iter_mut().zip(&src[done..]) {
        *d = s.to_f32();
    }
}

/// Query rows scored together in a tile of many rows (prefill).
const WIDE_ROWS: usize = 8;
/// Query rows scored together in a tile of few rows (decode), against two blocks of keys.
const NARROW_ROWS: usize = 4;
/// Keys per pass over the queries: two blocks of KEYS.
const PASS_KEYS: usize = 2 * KEYS;

/// WIDE_ROWS transposed query rows (`[head_dim][WIDE_ROWS]`) against KEYS transposed keys
/// (`[head_dim][KEYS]`): one accumulator of KEYS lanes per row, summed over dimensions in order.
#[inline(always)]
fn score_rows_wide(queries: &[f32], keys: &[f32]) -> [[f32; KEYS]; WIDE_ROWS] {
    let mut acc = [[0f32; KEYS]; WIDE_ROWS];
    for (kd, qd) in keys.chunks_exact(KEYS).zip(queries.chunks_exact(WIDE_ROWS)) {
        for r in 0..WIDE_ROWS {
            for l in 0..KEYS {
                acc[r][l] = qd[r].mul_add(kd[l], acc[r][l]);
            }
        }
    }
    acc
}

/// NARROW_ROWS transposed query rows against two blocks of KEYS transposed keys
/// (`[2][head_dim][KEYS]`): per row and block the same sums as `score_rows_wide`.
#[inline(always)]
fn score_rows_narrow(queries: &[f32], keys: &[f32]) -> [[[f32; KEYS]; 2]; NARROW_ROWS] {
    let mut acc = [[[0f32; KEYS]; 2]; NARROW_ROWS];
    let (first, second) = keys.split_at(keys.len() / 2);
    for ((k0, k1), qd) in first.chunks_exact(KEYS).zip(second.chunks_exact(KEYS)).zip(queries.chunks_exact(NARROW_ROWS)) {
        for r in 0..NARROW_ROWS {
            for l in 0..KEYS {
                acc[r][0][l] = qd[r].mul_add(k0[l], acc[r][0][l]);
                acc[r][1][l] = qd[r].mul_add(k1[l], acc[r][1][l]);
            }
        }
    }
    acc
}

/// `KEYS` rows of `head_dim` (`[KEYS][head_dim]`) to `[head_dim][KEYS]`; with `AVX2` (as for
/// `widen`) 8x8 blocks at a time.
#[inline(always)]
fn transpose_keys<const AVX2: bool>(rows: &[f32], head_dim: usize, out: &mut [f32]) {
    let mut d0 = 0;
    #[cfg(target_arch = "x86_64")]
    if AVX2 {
        while d0 + 8 <= head_dim {
            // SAFETY: `AVX2` callers are compiled with AVX; both 8x8 blocks are in bounds.
            unsafe { transpose_8x8(&rows[d0..], head_dim, &mut out[d0 * KEYS..(d0 + 8) * KEYS]) };
            d0 += 8;
        }
    }
    for d in d0..head_dim {
        for l in 0..KEYS {
            out[d * KEYS + l] = rows[l * head_dim + d];
        }
    }
}

/// The 8x8 block at the start of `src` (rows `stride` apart) into `dst` (rows 8 apart),
/// transposed: the usual unpack / shuffle / lane-permute sequence.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
unsafe fn transpose_8x8(src: &[f32], stride: usize, dst: &mut [f32]) {
    use std::arch::x86_64::*;
    const _: () = assert!(KEYS == 8);
    assert!(src.len() >= 7 * stride + 8 && dst.len() >= 64);
    unsafe {
        let r: [__m256; 8] = std::array::from_fn(|i| _mm256_loadu_ps(src.as_ptr().add(i * stride)));
        let t0 = _mm256_unpacklo_ps(r[0], r[1]);
        let t1 = _mm256_unpackhi_ps(r[0], r[1]);
        let t2 = _mm256_unpacklo_ps(r[2], r[3]);
        let t3 = _mm256_unpackhi_ps(r[2], r[3]);
        let t4 = _mm256_unpacklo_ps(r[4], r[5]);
        let t5 = _mm256_unpackhi_ps(r[4], r[5]);
        let t6 = _mm256_unpacklo_ps(r[6], r[7]);
        let t7 = _mm256_unpackhi_ps(r[6], r[7]);
        let u0 = _mm256_shuffle_ps::<0x44>(t0, t2);
        let u1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
        let u2 = _mm256_shuffle_ps::<0x44>(t1, t3);
        let u3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
        let u4 = _mm256_shuffle_ps::<0x44>(t4, t6);
        let u5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
        let u6 = _mm256_shuffle_ps::<0x44>(t5, t7);
        let u7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
        let o = [
            _mm256_permute2f128_ps::<0x20>(u0, u4),
            _mm256_permute2f128_ps::<0x20>(u1, u5),
            _mm256_permute2f128_ps::<0x20>(u2, u6),
            _mm256_permute2f128_ps::<0x20>(u3, u7),
            _mm256_permute2f128_ps::<0x31>(u0, u4),
            _mm256_permute2f128_ps::<0x31>(u1, u5),
            _mm256_permute2f128_ps::<0x31>(u2, u6),
            _mm256_permute2f128_ps::<0x31>(u3, u7),
        ];
        for (i, v) in o.into_iter().enumerate() {
            _mm256_storeu_ps(dst.as_mut_ptr().add(i * 8), v);
        }
    }
}

/// Output dimensions accumulated in registers at once by `weighted_sum_rows`.
const VALUE_DIMS: usize = 32;

/// `out[r] = sum_i p[r][i] * v[i]` for `R` rows, in key order for every element: the running
/// sums of VALUE_DIMS dimensions stay in registers across all keys instead of in memory.
#[inline(always)]
fn weighted_sum_rows<const R: usize>(p: [&[f32]; R], values: &[f32], head_dim: usize, out: [&mut [f32]; R]) {
    let n = p[0].len();
    let mut d0 = 0;
    while d0 + VALUE_DIMS <= head_dim {
        let mut acc = [[0f32; VALUE_DIMS]; R];
        for i in 0..n {
            let v = &values[i * head_dim + d0..][..VALUE_DIMS];
            for r in 0..R {
                let pr = p[r][i];
                for j in 0..VALUE_DIMS {
                    acc[r][j] = pr.mul_add(v[j], acc[r][j]);
                }
            }
        }
        for r in 0..R {
            out[r][d0..d0 + VALUE_DIMS].copy_from_slice(&acc[r]);
        }
        d0 += VALUE_DIMS;
    }
    // The remaining dimensions one at a time, in the same key order.
    for d in d0..head_dim {
        for r in 0..R {
            out[r][d] = (0..n).fold(0f32, |acc, i| p[r][i].mul_add(values[i * head_dim + d], acc));
        }
    }
}

pub fn softmax_in_place(row: &mut [f32]) {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    for x in row.iter_mut() {
        *x -= max;
    }
    super::vmath::exp_in_place(row);
    // Summed in 8 lanes (a fixed order for a given length), not one long dependent chain.
    let mut lanes = [0f32; 8];
    let mut chunks = row.chunks_exact(8);
    for chunk in &mut chunks {
        for (l, &x) in lanes.iter_mut().zip(chunk) {
            *l += x;
        }
    }
    let sum = chunks.remainder().iter().fold(lanes.iter().sum::<f32>(), |s, &x| s + x);
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
        let shape = AttentionShape { n_head, n_kv_head: n_kv, head_dim: hd };
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

    #[test]
    fn keys_transpose_on_odd_widths() {
        for head_dim in [1usize, 7, 8, 13, 24, 64] {
            let rows: Vec<f32> = (0..KEYS * head_dim).map(|i| i as f32).collect();
            let mut out = vec![0f32; head_dim * KEYS];
            transpose_keys::<false>(&rows, head_dim, &mut out);
            let plain = out.clone();
            #[cfg(target_arch = "x86_64")]
            if crate::model::quant_avx2::available() {
                out.fill(0.0);
                transpose_keys::<true>(&rows, head_dim, &mut out);
                assert_eq!(out, plain, "head_dim {head_dim}: the AVX path equals the plain one");
            }
            for d in 0..head_dim {
                for l in 0..KEYS {
                    assert_eq!(out[d * KEYS + l], rows[l * head_dim + d], "head_dim {head_dim}, d {d}, key {l}");
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
