//! Quantized products with AVX-512 VNNI (Q4_0, Q4_1, Q5_0, Q8_0), over weights and activations
//! repacked for it, with llama.cpp's arithmetic to the bit.
//!
//! llama.cpp's x86 dot products (and `mod.rs`, their plain form) keep 8 lanes per output,
//! each lane the sum of 4 consecutive integer products of a block, accumulated block after
//! block with one fused multiply-add by `d_w * d_a`. A 512-bit register holds 16 lanes: here
//! the 8 lanes of two weight rows side by side. Weight rows are repacked in pairs at load time so
//! that, 4 bytes at a time, the pair's two rows alternate: after `vpdpbusd` (which sums groups of
//! 4 byte products into one 32-bit lane) the even lanes belong to the first row and the odd
//! lanes to the second, and each activation block is stored with its 4-byte groups doubled to
//! meet both. The two rows' lanes are added at the end in llama.cpp's order.
//!
//! `vpdpbusd` multiplies unsigned by signed bytes. Weights are stored unsigned (`q + zero
//! point`: 8 for Q4_0, 16 for Q5_0, 128 for Q8_0, none for Q4_1) and the product is corrected
//! exactly in integers by starting each lane at `-zero point * (sum of its 4 activation bytes)`.
//! Q5_0 keeps its fifth bits apart, one 64-bit mask per pair and block, added to the unpacked
//! nibbles with one masked add.
//! Q4_1's offsets (`m * s`) accumulate in a second, fused chain per row.
//!
//! Like the other kernels, a row's arithmetic is the same however many rows run together.

#![cfg(target_arch = "x86_64")]

use std::arch::x86_64::*;

use super::blocks::{ActBlock, BlockQ4_0, BlockQ4_1, BlockQ5_0, BlockQ8_0, QK, WeightBlock, five_bits, nibble};

pub fn available() -> bool {
    is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512dq")
        && is_x86_feature_detected!("avx512vl")
        && is_x86_feature_detected!("avx512vnni")
}

/// Where byte `p` (0..64) of a pair's register comes from: (row of the pair, element).
pub(super) fn source_of(p: usize) -> (usize, usize) {
    let group = p / 4;
    (group % 2, (group / 2) * 4 + p % 4)
}

/// The register byte holding element `e` of row `which` of a pair.
pub(super) fn register_byte(which: usize, e: usize) -> usize {
    ((e / 4) * 2 + which) * 4 + e % 4
}

/// 64 bytes, aligned so that a 512-bit load never splits a cache line.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
pub struct Unit(pub(super) [u8; 64]);

/// A weight block type the VNNI kernel runs.
pub trait PairFormat: WeightBlock<Act = ActBlock> + Copy {
    /// Stored values have 8 bits (one byte each) rather than 4 (two per byte).
    const WIDE: bool;
    /// log2 of the zero point added to every stored value (none: 0 and `ZERO_POINT` false).
    const ZERO_POINT_SHIFT: u32;
    const ZERO_POINT: bool;
    /// Blocks carry a minimum `m` (Q4_1).
    const OFFSET: bool;
    /// Stored values have a fifth bit (Q5_0), kept in a mask beside the nibbles.
    const HIGH_BIT: bool = false;
    /// Element `e` as stored: unsigned, zero point included.
    fn stored(&self, e: usize) -> u8;
    /// The block's scale and minimum (0 where it has none).
    fn scale_and_min(&self) -> (f32, f32);

    /// The real value of a stored element, computed as GGML dequantizes it.
    #[inline]
    fn value(stored: u8, d: f32, m: f32) -> f32 {
        let q = stored as i32 - if Self::ZERO_POINT { 1 << Self::ZERO_POINT_SHIFT } else { 0 };
        if Self::OFFSET { q as f32 * d + m } else { q as f32 * d }
    }

    fn dequantize(&self, out: &mut [f32]) {
        let (d, m) = self.scale_and_min();
        for (e, x) in out.iter_mut().enumerate() {
            *x = Self::value(self.stored(e), d, m);
        }
    }
}

impl PairFormat for BlockQ4_0 {
    const WIDE: bool = false;
    const ZERO_POINT_SHIFT: u32 = 3;
    const ZERO_POINT: bool = true;
    const OFFSET: bool = false;
    fn stored(&self, e: usize) -> u8 {
        nibble(&self.qs, e)
    }
    fn scale_and_min(&self) -> (f32, f32) {
        (self.d.to_f32(), 0.0)
    }
}

impl PairFormat for BlockQ4_1 {
    const WIDE: bool = false;
    const ZERO_POINT_SHIFT: u32 = 0;
    const ZERO_POINT: bool = false;
    const OFFSET: bool = true;
    fn stored(&self, e: usize) -> u8 {
        nibble(&self.qs, e)
    }
    fn scale_and_min(&self) -> (f32, f32) {
        (self.d.to_f32(), self.m.to_f32())
    }
}

impl PairFormat for BlockQ5_0 {
    const WIDE: bool = false;
    const ZERO_POINT_SHIFT: u32 = 4;
    const ZERO_POINT: bool = true;
    const OFFSET: bool = false;
    const HIGH_BIT: bool = true;
    fn stored(&self, e: usize) -> u8 {
        five_bits(self, e)
    }
    fn scale_and_min(&self) -> (f32, f32) {
        (self.d.to_f32(), 0.0)
    }
}

impl PairFormat for BlockQ8_0 {
    const WIDE: bool = true;
    const ZERO_POINT_SHIFT: u32 = 7;
    const ZERO_POINT: bool = true;
    const OFFSET: bool = false;
    fn stored(&self, e: usize) -> u8 {
        (self.qs[e] as i32 + 128) as u8
    }
    fn scale_and_min(&self) -> (f32, f32) {
        (self.d.to_f32(), 0.0)
    }
}

/// Weights of `n` rows of `blocks` blocks, in row pairs (an odd last row is paired with a row of
/// zeros): per pair and block, the two rows' values in register order (64 stored bytes, or for
/// 4-bit types 32 bytes whose low nibbles are register bytes 0..32 and high nibbles 32..64).
pub struct PackedWeights<B: PairFormat> {
    n: usize,
    blocks: usize,
    values: Vec<Unit>,
    /// Per pair and block (Q5_0): bit `p` is the fifth bit of register byte `p`.
    high: Vec<u64>,
    /// Per pair and block: the two rows' scales.
    scales: Vec<[f32; 2]>,
    /// Per pair and block, for the formats with an offset (Q4_1): the two rows' minimums. (Kept
    /// apart so that the others read 8 bytes of scales a block, not 16: a decode step's largest
    /// product, the output projection, is bound by the bytes it reads.)
    mins: Vec<[f32; 2]>,
    _format: std::marker::PhantomData<B>,
}

impl<B: PairFormat> PackedWeights<B> {
    /// Bytes of one pair's values for one block.
    const PAIR_BYTES: usize = if B::WIDE { 64 } else { 32 };

    /// `w` holds rows of `blocks` blocks each.
    pub fn new(w: &[B], blocks: usize) -> Self {
        let n = w.len() / blocks;
        let pairs = n.div_ceil(2);
        let mut packed = Self {
            n,
            blocks,
            values: units_for(pairs * blocks * Self::PAIR_BYTES),
            high: Vec::with_capacity(if B::HIGH_BIT { pairs * blocks } else { 0 }),
            scales: Vec::with_capacity(pairs * blocks),
            mins: Vec::with_capacity(if B::OFFSET { pairs * blocks } else { 0 }),
            _format: std::marker::PhantomData,
        };
        let bytes = units_as_bytes(&mut packed.values);
        let mut at = 0;
        let sources: [(usize, usize); 64] = std::array::from_fn(source_of);
        for pair in 0..pairs {
            let row = |which: usize| {
                (2 * pair + which < n).then(|| &w[(2 * pair + which) * blocks..(2 * pair + which + 1) * blocks])
            };
            let (first, second) = (row(0), row(1));
            for b in 0..blocks {
                // Both rows' stored values, then each register byte from its source.
                let mut stored = [[0u8; QK]; 2];
                for (which, r) in [first, second].into_iter().enumerate() {
                    if let Some(r) = r {
                        for (e, v) in stored[which].iter_mut().enumerate() {
                            *v = r[b].stored(e);
                        }
                    }
                }
                let value = |p: usize| stored[sources[p].0][sources[p].1];
                for (j, byte) in bytes[at..at + Self::PAIR_BYTES].iter_mut().enumerate() {
                    *byte = if B::WIDE { value(j) } else { (value(j) & 0x0F) | ((value(j + 32) & 0x0F) << 4) };
                }
                if B::HIGH_BIT {
                    packed.high.push((0..64).map(|p| ((value(p) as u64 >> 4) & 1) << p).sum());
                }
                at += Self::PAIR_BYTES;
                let ((d0, m0), (d1, m1)) = (
                    first.map_or((0.0, 0.0), |r| r[b].scale_and_min()),
                    second.map_or((0.0, 0.0), |r| r[b].scale_and_min()),
                );
                packed.scales.push([d0, d1]);
                if B::OFFSET {
                    packed.mins.push([m0, m1]);
                }
            }
        }
        packed
    }

    /// Whether rows can be appended after these (pairs must not straddle the two).
    pub fn can_append(&self) -> bool {
        self.n.is_multiple_of(2)
    }

    /// The rows of `other` after these (both must have the same width, and `can_append`).
    pub fn append(&mut self, other: Self) {
        assert_eq!(self.blocks, other.blocks, "appended weights have the same width");
        assert!(self.can_append(), "rows are appended after an even number of rows");
        let bytes_of = |w: &Self| w.n.div_ceil(2) * w.blocks * Self::PAIR_BYTES;
        let (mine, theirs) = (bytes_of(self), bytes_of(&other));
        let mut values = units_for(mine + theirs);
        let bytes = units_as_bytes(&mut values);
        bytes[..mine].copy_from_slice(&units_bytes(&self.values)[..mine]);
        bytes[mine..mine + theirs].copy_from_slice(&units_bytes(&other.values)[..theirs]);
        self.values = values;
        self.n += other.n;
        self.high.extend(other.high);
        self.scales.extend(other.scales);
        self.mins.extend(other.mins);
    }

    /// Row `row` as f32 values (for embedding lookups).
    pub fn dequantize_row(&self, row: usize, out: &mut [f32]) {
        let bytes = units_bytes(&self.values);
        let (pair, which) = (row / 2, row % 2);
        for (b, o) in out.chunks_exact_mut(QK).enumerate() {
            let at = pair * self.blocks + b;
            let scales = self.scales[at];
            let mins = if B::OFFSET { self.mins[at] } else { [0.0; 2] };
            let values = &bytes[at * Self::PAIR_BYTES..][..Self::PAIR_BYTES];
            for (e, x) in o.iter_mut().enumerate() {
                let p = register_byte(which, e);
                let mut stored = if B::WIDE {
                    values[p]
                } else if p < 32 {
                    values[p] & 0x0F
                } else {
                    values[p - 32] >> 4
                };
                if B::HIGH_BIT {
                    stored |= (((self.high[at] >> p) & 1) as u8) << 4;
                }
                *x = B::value(stored, scales[which], mins[which]);
            }
        }
    }
}

/// Zeroed units holding at least `bytes` bytes.
pub(super) fn units_for(bytes: usize) -> Vec<Unit> {
    vec![Unit([0; 64]); bytes.div_ceil(64)]
}

pub(super) fn units_bytes(units: &[Unit]) -> &[u8] {
    // SAFETY: `Unit` is 64 plain bytes with no padding.
    unsafe { std::slice::from_raw_parts(units.as_ptr() as *const u8, units.len() * 64) }
}

pub(super) fn units_as_bytes(units: &mut [Unit]) -> &mut [u8] {
    // SAFETY: `Unit` is 64 plain bytes with no padding.
    unsafe { std::slice::from_raw_parts_mut(units.as_mut_ptr() as *mut u8, units.len() * 64) }
}

/// Activation rows in panels of PANEL rows (the rows left over in panels of one): for each
/// block, the panel's rows' quants (64 bytes each: the block's 4-byte groups each twice, in
/// register order), then, for weight types with a zero point, each row's `-zero point x (sum
/// of the group's 4 quants)` per lane (16 x i32), then their scales and scale x sum of quants
/// `(d, s)`, padded to whole units. A panel is read front to back through one pointer.
pub struct PackedActs {
    blocks: usize,
    m: usize,
    lane_sums: bool,
    units: Vec<Unit>,
}

/// Consecutive activation rows as the kernel reads them.
pub struct Panel<'a> {
    blocks: usize,
    lane_sums: bool,
    units: &'a [Unit],
}

/// Activation rows per panel: the rows the kernel runs against one weight row pair at once.
pub const PANEL: usize = 4;

/// 64-byte units per block in a panel of `rows` rows.
const fn units_per_block(rows: usize, lane_sums: bool) -> usize {
    rows * if lane_sums { 2 } else { 1 } + (rows * 8).div_ceil(64)
}

impl PackedActs {
    /// `acts` holds rows of `blocks` blocks each; `B` is the weight type they will meet.
    pub fn new<B: PairFormat>(acts: &[ActBlock], blocks: usize) -> Self {
        let m = acts.len() / blocks;
        let lane_sums = B::ZERO_POINT;
        let full = m / PANEL * PANEL;
        let total =
            (full / PANEL * units_per_block(PANEL, lane_sums) + (m - full) * units_per_block(1, lane_sums)) * blocks;
        let mut packed = Self { blocks, m, lane_sums, units: vec![Unit([0; 64]); total] };
        let bytes = units_as_bytes(&mut packed.units);
        let mut at = 0;
        let mut first = 0;
        while first < m {
            let rows = if first < full { PANEL } else { 1 };
            let sums_at = rows * 64;
            let scales_at = rows * 64 * if lane_sums { 2 } else { 1 };
            for b in 0..blocks {
                for i in 0..rows {
                    let block = &acts[(first + i) * blocks + b];
                    for (p, byte) in bytes[at + i * 64..][..64].iter_mut().enumerate() {
                        *byte = block.qs[source_of(p).1] as u8;
                    }
                    if lane_sums {
                        for lane in 0..16 {
                            let group = (lane / 2) * 4;
                            let sum: i32 = block.qs[group..group + 4].iter().map(|&q| q as i32).sum();
                            bytes[at + sums_at + i * 64 + lane * 4..][..4]
                                .copy_from_slice(&(-(sum << B::ZERO_POINT_SHIFT)).to_ne_bytes());
                        }
                    }
                    bytes[at + scales_at + i * 8..][..4].copy_from_slice(&block.d.to_ne_bytes());
                    bytes[at + scales_at + i * 8 + 4..][..4].copy_from_slice(&block.s.to_ne_bytes());
                }
                at += units_per_block(rows, lane_sums) * 64;
            }
            first += rows;
        }
        packed
    }

    /// The panel of `rows` rows that starts at row `first`.
    pub fn panel(&self, first: usize, rows: usize) -> Panel<'_> {
        let full = self.m / PANEL * PANEL;
        let in_panels = rows == PANEL && first.is_multiple_of(PANEL) && first < full;
        assert!(
            first + rows <= self.m && (in_panels || rows == 1 && first >= full),
            "no panel of {rows} rows at row {first}"
        );
        let per_panel = self.blocks * units_per_block(PANEL, self.lane_sums);
        let start = if first < full {
            first / PANEL * per_panel
        } else {
            full / PANEL * per_panel + (first - full) * self.blocks * units_per_block(1, self.lane_sums)
        };
        Panel {
            blocks: self.blocks,
            lane_sums: self.lane_sums,
            units: &self.units[start..start + self.blocks * units_per_block(rows, self.lane_sums)],
        }
    }

    /// Rows that run in panels of PANEL (the rest run one at a time).
    pub fn rows_in_panels(&self) -> usize {
        self.m / PANEL * PANEL
    }
}

/// Weight row pair `pair` against a panel of `R` activation rows (PANEL, or 1 for the rows
/// after the last full panel): `[row][which row of the pair]`.
///
/// # Safety
/// The CPU must support what `available` checks.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512vnni")]
pub unsafe fn dot<B: PairFormat, const R: usize>(w: &PackedWeights<B>, pair: usize, panel: &Panel) -> [[f32; 2]; R] {
    let blocks = w.blocks;
    let per_block = units_per_block(R, B::ZERO_POINT);
    assert!(blocks == panel.blocks && panel.lane_sums == B::ZERO_POINT && panel.units.len() == blocks * per_block);
    assert!(pair < w.n.div_ceil(2));
    let (sums_at, scales_at) = (R * 64, R * 64 * if B::ZERO_POINT { 2 } else { 1 });
    let values = w.values.as_ptr() as *const u8;
    let value_bytes = PackedWeights::<B>::PAIR_BYTES;
    let ws = &w.scales[pair * blocks..(pair + 1) * blocks];
    let mut acc = [_mm512_setzero_ps(); R];
    // 128 bits are enough for the offsets (two useful lanes).
    let mut offsets = [_mm_setzero_ps(); R];
    for (b, block_scales) in ws.iter().enumerate() {
        // SAFETY: block `b` of the pair is within the packed values, and the panel holds
        // `per_block` units for each of `blocks` blocks.
        unsafe {
            let at = values.add((pair * blocks + b) * value_bytes);
            let qx = if B::WIDE {
                _mm512_load_si512(at as *const __m512i)
            } else {
                let raw = _mm256_loadu_si256(at as *const __m256i);
                let mask = _mm256_set1_epi8(0x0F);
                let (lo, hi) = (_mm256_and_si256(raw, mask), _mm256_and_si256(_mm256_srli_epi16(raw, 4), mask));
                let nibbles = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
                if B::HIGH_BIT {
                    let high = _cvtu64_mask64(w.high[pair * blocks + b]);
                    _mm512_mask_add_epi8(nibbles, high, nibbles, _mm512_set1_epi8(16))
                } else {
                    nibbles
                }
            };
            let w2 = _mm_load_sd(block_scales.as_ptr() as *const f64);
            // (d0, d1, d0, d1, ...): each lane's row's scale; (m0, m1, ...) for the offsets.
            let wd = _mm512_castpd_ps(_mm512_broadcastsd_pd(w2));
            let wm = if B::OFFSET {
                _mm_castpd_ps(_mm_load_sd(w.mins[pair * blocks + b].as_ptr() as *const f64))
            } else {
                _mm_setzero_ps()
            };
            let unit = panel.units.as_ptr().add(b * per_block) as *const u8;
            for r in 0..R {
                let quants = _mm512_load_si512(unit.add(r * 64) as *const __m512i);
                let start = if B::ZERO_POINT {
                    _mm512_load_si512(unit.add(sums_at + r * 64) as *const __m512i)
                } else {
                    _mm512_setzero_si512()
                };
                let sums = _mm512_dpbusd_epi32(start, qx, quants);
                let ds = unit.add(scales_at + r * 8) as *const f32;
                // llama.cpp's per-block scale: d_w * d_a, one rounding.
                let scale = _mm512_mul_ps(wd, _mm512_set1_ps(*ds));
                acc[r] = _mm512_fmadd_ps(scale, _mm512_cvtepi32_ps(sums), acc[r]);
                if B::OFFSET {
                    offsets[r] = _mm_fmadd_ps(wm, _mm_set1_ps(*ds.add(1)), offsets[r]);
                }
            }
        }
    }
    let mut out = [[0f32; 2]; R];
    for r in 0..R {
        // Each row's 8 lanes added as ((0 + 4) + (2 + 6)) + ((1 + 5) + (3 + 7)), as
        // llama.cpp's `hsum_float_8` adds them; its lane j is register lane 2j (+1).
        let t = _mm256_add_ps(_mm512_extractf32x8_ps(acc[r], 1), _mm512_castps512_ps256(acc[r]));
        let u = _mm_add_ps(_mm256_extractf128_ps(t, 1), _mm256_castps256_ps128(t));
        let mut lanes = [0f32; 4];
        // SAFETY: four floats into four floats.
        unsafe { _mm_storeu_ps(lanes.as_mut_ptr(), u) };
        out[r] = [lanes[0] + lanes[2], lanes[1] + lanes[3]];
        if B::OFFSET {
            let mut o = [0f32; 4];
            // SAFETY: as above.
            unsafe { _mm_storeu_ps(o.as_mut_ptr(), offsets[r]) };
            out[r] = [out[r][0] + o[0], out[r][1] + o[1]];
        }
    }
    out
}

/// Panels (of `PANEL` rows) computed together against a range of columns (`columns`).
pub const PANELS_PER_BLOCK: usize = 16;

/// The loop of every VNNI product (`columns` here and in `vnni_k.rs`): weight rows `cols` (a
/// range starting at an even row) against every panel (`panels` of PANEL rows, then `singles`
/// of one row from row `panels.len() * PANEL`), each result passed to `set(row, col, value)`.
/// Panels go in blocks, each block against every column pair of the range: the block's
/// activations stay in cache while the range's weights (a few KB a pair) are read once per
/// block (sweeping all of a long prefill's rows for every pair streams them from memory).
/// Each (pair, panel) product is the same whatever the blocking, so results are too. Inlined
/// into its callers, which carry the kernel's features.
#[inline(always)]
pub(super) fn sweep<P>(
    cols: std::ops::Range<usize>,
    panels: &[P],
    singles: &[P],
    mut set: impl FnMut(usize, usize, f32),
    mut dot_panel: impl FnMut(usize, &P) -> [[f32; 2]; PANEL],
    mut dot_single: impl FnMut(usize, &P) -> [f32; 2],
) {
    let full = panels.len() * PANEL;
    let pairs = cols.start / 2..cols.end.div_ceil(2);
    let mut put = |pair: usize, row: usize, values: [f32; 2]| {
        for (which, v) in values.into_iter().enumerate() {
            if 2 * pair + which < cols.end {
                set(row, 2 * pair + which, v);
            }
        }
    };
    for (b, block) in panels.chunks(PANELS_PER_BLOCK).enumerate() {
        for pair in pairs.clone() {
            for (i, panel) in block.iter().enumerate() {
                for (j, v) in dot_panel(pair, panel).into_iter().enumerate() {
                    put(pair, (b * PANELS_PER_BLOCK + i) * PANEL + j, v);
                }
            }
        }
    }
    for pair in pairs {
        for (i, panel) in singles.iter().enumerate() {
            put(pair, full + i, dot_single(pair, panel));
        }
    }
}

/// `sweep` over these packed weights: each result passed to `set(row, col, value)`.
///
/// # Safety
/// The CPU must support what `available` checks.
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512vnni")]
pub unsafe fn columns<B: PairFormat>(
    w: &PackedWeights<B>,
    cols: std::ops::Range<usize>,
    panels: &[Panel],
    singles: &[Panel],
    set: impl FnMut(usize, usize, f32),
) {
    assert!(cols.start.is_multiple_of(2) && cols.end <= w.n);
    // SAFETY: this function has the features `dot` needs, and the closures inherit them.
    sweep(
        cols,
        panels,
        singles,
        set,
        |pair, p| unsafe { dot::<B, PANEL>(w, pair, p) },
        |pair, p| unsafe { dot::<B, 1>(w, pair, p)[0] },
    )
}

#[cfg(test)]
mod tests {
    use super::super::{self as quant, quantize_row};
    use super::*;
    use rand::{Rng, SeedableRng};

    #[test]
    fn every_register_byte_comes_from_one_element() {
        let mut seen = [[false; QK]; 2];
        for p in 0..64 {
            let (which, e) = source_of(p);
            assert!(!seen[which][e]);
            seen[which][e] = true;
            assert_eq!(which, (p / 4) % 2, "byte {p} lands in a lane of row {which}");
            assert_eq!(register_byte(which, e), p);
        }
    }

    fn check<B: PairFormat>(
        parse: fn(&[u8]) -> Vec<B>,
        dequantize: fn(&[B], &mut [f32]),
        block_bytes: usize,
        has_min: bool,
    ) {
        let mut r = rand_chacha::ChaCha8Rng::seed_from_u64(21);
        for blocks in [1usize, 2, 5, 18, 49] {
            // An odd number of weight rows; one full panel of activations and two rows after it.
            let (n, m) = (5usize, PANEL + 2);
            let x: Vec<f32> = (0..m * blocks * QK).map(|_| r.random_range(-4.0..4.0)).collect();
            let mut acts = vec![ActBlock::default(); m * blocks];
            for (row, out) in x.chunks_exact(blocks * QK).zip(acts.chunks_exact_mut(blocks)) {
                quantize_row(row, out);
            }
            let bytes: Vec<u8> = (0..n * blocks)
                .flat_map(|_| {
                    let mut blk: Vec<u8> = (0..block_bytes).map(|_| r.random()).collect();
                    blk[0..2].copy_from_slice(&half::f16::from_f32(r.random_range(0.001..0.05)).to_le_bytes());
                    if has_min {
                        blk[2..4].copy_from_slice(&half::f16::from_f32(r.random_range(-0.2..0.0)).to_le_bytes());
                    }
                    blk
                })
                .collect();
            let w = parse(&bytes);
            let (pw, pa) = (PackedWeights::new(&w, blocks), PackedActs::new::<B>(&acts, blocks));
            // Appending rows keeps every row; dequantizing gives GGML's values.
            let mut joined = PackedWeights::new(&w[..2 * blocks], blocks);
            joined.append(PackedWeights::new(&w[2 * blocks..], blocks));
            for row in 0..n {
                let (mut got, mut want) = (vec![0f32; blocks * QK], vec![0f32; blocks * QK]);
                joined.dequantize_row(row, &mut got);
                dequantize(&w[row * blocks..(row + 1) * blocks], &mut want);
                assert_eq!(got, want, "{blocks} blocks, row {row}");
            }
            let mut got = vec![vec![f32::NAN; n]; m];
            let panels = [pa.panel(0, PANEL)];
            let singles: Vec<_> = (PANEL..m).map(|row| pa.panel(row, 1)).collect();
            unsafe { columns(&pw, 0..n, &panels, &singles, |row, col, v| got[row][col] = v) };
            for (row, values) in got.iter().enumerate() {
                let alone_acts = &acts[row * blocks..(row + 1) * blocks];
                let alone_packed = PackedActs::new::<B>(alone_acts, blocks);
                let mut alone = vec![f32::NAN; n];
                unsafe { columns(&pw, 0..n, &[], &[alone_packed.panel(0, 1)], |_, col, v| alone[col] = v) };
                for (col, &value) in values.iter().enumerate() {
                    // llama.cpp's arithmetic, bit for bit (the plain kernel is its definition).
                    let want = B::dot(&w[col * blocks..(col + 1) * blocks], alone_acts);
                    assert_eq!(
                        value.to_bits(),
                        want.to_bits(),
                        "{blocks} blocks, row {row}, col {col}: {value} vs {want}"
                    );
                    assert_eq!(value.to_bits(), alone[col].to_bits(), "grouping rows changes nothing");
                }
            }
        }
    }

    #[test]
    fn packed_dots_equal_the_plain_ones_bit_for_bit() {
        if !available() {
            eprintln!("no AVX-512 VNNI here: nothing to compare");
            return;
        }
        check::<BlockQ4_0>(quant::parse_q4_0, quant::dequantize_q4_0, 18, false);
        check::<BlockQ4_1>(quant::parse_q4_1, quant::dequantize_q4_1, 20, true);
        check::<BlockQ5_0>(quant::parse_q5_0, quant::dequantize_q5_0, 22, false);
        check::<BlockQ8_0>(quant::parse_q8_0, quant::dequantize_q8_0, 34, false);
    }
}
