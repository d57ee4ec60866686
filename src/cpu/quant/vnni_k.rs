//! K-quant products (Q4_K, Q5_K, Q6_K) with AVX-512 VNNI, over weights and activations
//! repacked for it, with the arithmetic of `kquants.rs` (llama.cpp's AVX2 kernels) to the bit.
//!
//! As in `vnni.rs`, a 512-bit register holds the 8 lanes of two weight rows side by side: each
//! run of 32 values of a super-block is stored for a row pair with the two rows alternating 4
//! bytes at a time, and each activation run with its 4-byte groups doubled to meet both. Per
//! run, `vpmaddubsw` multiplies the unsigned weights by the signed activations into 16-bit pair
//! sums (exact: at most 63 x 127 x 2), and `vpdpwssd` multiplies those by the sub-block scales
//! and adds them, in fours, into the 32-bit lanes: llama.cpp's `madd(scale, maddubs(q, a))`
//! with the addition fused. Integers are exact, so each lane holds llama.cpp's value; the
//! per-super-block float steps (one fused multiply-add by `d_w * d_a`, the minimums' lanes)
//! and the final additions are its order too.
//!
//! Weights keep their low 4 bits as nibbles (32 bytes per run and pair) and each higher bit
//! (Q5_K one, Q6_K two) as a 64-bit mask per run and pair, added with one masked add. Q6_K's
//! values are stored plus 32: the activations carry `-32 x (pair sum)` per 16-bit pair, added
//! before the scaling, which gives llama.cpp's `maddubs(q, a) - maddubs(32, a)`.
//!
//! Like the other kernels, a row's arithmetic is the same however many rows run together.

#![cfg(target_arch = "x86_64")]

use std::arch::x86_64::*;

use super::blocks::{ActBlockK, BlockQ4K, BlockQ5K, BlockQ6K, QK_K, WeightBlock, k_nibble, q5k_value, q6k_stored};
use super::vnni::{PANEL, Unit, register_byte, source_of, sweep, units_as_bytes, units_bytes, units_for};

/// Runs of 32 values in a super-block.
const RUNS: usize = QK_K / 32;

/// How a type's minimums enter the sum.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Mins {
    /// None (Q6_K).
    None,
    /// Four fused lanes per row, added as (0 + 2) + (1 + 3) (Q4_K).
    Lanes,
    /// One fused chain per row of each super-block's total (Q5_K).
    Sum,
}

/// A K-quant type the VNNI kernel runs.
pub trait KPairFormat: WeightBlock<Act = ActBlockK> + Copy {
    /// Bits per value above the low 4.
    const PLANES: usize;
    /// Scales per 16 values rather than per 32.
    const SCALES_16: bool;
    const MINS: Mins;
    /// Values are stored plus 32.
    const OFFSET: bool;
    /// Value `e` as stored (unsigned).
    fn stored(&self, e: usize) -> u8;
    /// The scale of value `e`'s sub-block.
    fn scale(&self, e: usize) -> i16;
    fn minimums(&self) -> [u8; 8];
    /// `d` and `dmin` (0 where the type has none).
    fn d_dmin(&self) -> (f32, f32);
    /// A value as GGML dequantizes it.
    fn value(stored: u8, d: f32, dmin: f32, scale: i16, min: u8) -> f32;
}

impl KPairFormat for BlockQ4K {
    const PLANES: usize = 0;
    const SCALES_16: bool = false;
    const MINS: Mins = Mins::Lanes;
    const OFFSET: bool = false;
    fn stored(&self, e: usize) -> u8 {
        k_nibble(&self.qs, e)
    }
    fn scale(&self, e: usize) -> i16 {
        self.scales[e / 32] as i16
    }
    fn minimums(&self) -> [u8; 8] {
        self.mins
    }
    fn d_dmin(&self) -> (f32, f32) {
        (self.d.to_f32(), self.dmin.to_f32())
    }
    fn value(stored: u8, d: f32, dmin: f32, scale: i16, min: u8) -> f32 {
        d * scale as f32 * stored as f32 - dmin * min as f32
    }
}

impl KPairFormat for BlockQ5K {
    const PLANES: usize = 1;
    const SCALES_16: bool = false;
    const MINS: Mins = Mins::Sum;
    const OFFSET: bool = false;
    fn stored(&self, e: usize) -> u8 {
        q5k_value(self, e)
    }
    fn scale(&self, e: usize) -> i16 {
        self.scales[e / 32] as i16
    }
    fn minimums(&self) -> [u8; 8] {
        self.mins
    }
    fn d_dmin(&self) -> (f32, f32) {
        (self.d.to_f32(), self.dmin.to_f32())
    }
    fn value(stored: u8, d: f32, dmin: f32, scale: i16, min: u8) -> f32 {
        d * scale as f32 * stored as f32 - dmin * min as f32
    }
}

impl KPairFormat for BlockQ6K {
    const PLANES: usize = 2;
    const SCALES_16: bool = true;
    const MINS: Mins = Mins::None;
    const OFFSET: bool = true;
    fn stored(&self, e: usize) -> u8 {
        q6k_stored(self, e)
    }
    fn scale(&self, e: usize) -> i16 {
        self.scales[e / 16] as i16
    }
    fn minimums(&self) -> [u8; 8] {
        [0; 8]
    }
    fn d_dmin(&self) -> (f32, f32) {
        (self.d.to_f32(), 0.0)
    }
    fn value(stored: u8, d: f32, _dmin: f32, scale: i16, _min: u8) -> f32 {
        d * scale as f32 * (stored as i32 - 32) as f32
    }
}

/// Bytes of nibbles per pair and super-block (32 per run).
const NIBBLE_BYTES: usize = RUNS * 32;

/// Weights of `n` rows of `blocks` super-blocks, in row pairs (an odd last row is paired with a
/// row of zeros).
pub struct PackedWeightsK<B: KPairFormat> {
    n: usize,
    blocks: usize,
    /// Per pair, super-block and run: 32 bytes whose low nibbles are register bytes 0..32 and
    /// high nibbles 32..64.
    values: Vec<Unit>,
    /// Per pair, super-block, run and plane: bit `p` is that bit of register byte `p`.
    high: Vec<u64>,
    /// Per pair, super-block and run: the scales of the run's values as 16-bit pairs (row 0
    /// twice, row 1 twice); for Q6_K two such, of its first 16 values and of its last 16.
    scales: Vec<[i16; 4]>,
    /// Per pair and super-block: d of each row, then dmin of each row.
    floats: Vec<[f32; 4]>,
    /// Per pair and super-block: row 0's 8 minimums, then row 1's (none for Q6_K).
    mins: Vec<[i16; 16]>,
    _format: std::marker::PhantomData<B>,
}

impl<B: KPairFormat> PackedWeightsK<B> {
    const SCALES_PER_RUN: usize = if B::SCALES_16 { 2 } else { 1 };

    /// `w` holds rows of `blocks` super-blocks each.
    pub fn new(w: &[B], blocks: usize) -> Self {
        let n = w.len() / blocks;
        let pairs = n.div_ceil(2);
        let mut packed = Self {
            n,
            blocks,
            values: units_for(pairs * blocks * NIBBLE_BYTES),
            high: Vec::with_capacity(pairs * blocks * RUNS * B::PLANES),
            scales: Vec::with_capacity(pairs * blocks * RUNS * Self::SCALES_PER_RUN),
            floats: Vec::with_capacity(pairs * blocks),
            mins: Vec::with_capacity(pairs * blocks),
            _format: std::marker::PhantomData,
        };
        let bytes = units_as_bytes(&mut packed.values);
        let sources: [(usize, usize); 64] = std::array::from_fn(source_of);
        let mut at = 0;
        for pair in 0..pairs {
            let row = |which: usize| {
                (2 * pair + which < n).then(|| &w[(2 * pair + which) * blocks..(2 * pair + which + 1) * blocks])
            };
            let rows = [row(0), row(1)];
            for b in 0..blocks {
                let blocks_of = rows.map(|r| r.map(|r| &r[b]));
                for run in 0..RUNS {
                    let mut stored = [[0u8; 32]; 2];
                    for (which, block) in blocks_of.iter().enumerate() {
                        if let Some(block) = block {
                            for (e, v) in stored[which].iter_mut().enumerate() {
                                *v = block.stored(32 * run + e);
                            }
                        }
                    }
                    let value = |p: usize| stored[sources[p].0][sources[p].1];
                    for (j, byte) in bytes[at..at + 32].iter_mut().enumerate() {
                        *byte = (value(j) & 0x0F) | ((value(j + 32) & 0x0F) << 4);
                    }
                    at += 32;
                    for plane in 0..B::PLANES {
                        packed.high.push((0..64).map(|p| ((value(p) as u64 >> (4 + plane)) & 1) << p).sum());
                    }
                    let scale = |which: usize, half: usize| {
                        blocks_of[which].map_or(0, |block| block.scale(32 * run + 16 * half))
                    };
                    for half in 0..Self::SCALES_PER_RUN {
                        let (s0, s1) = (scale(0, half), scale(1, half));
                        packed.scales.push([s0, s0, s1, s1]);
                    }
                }
                let (d0, dmin0) = blocks_of[0].map_or((0.0, 0.0), |block| block.d_dmin());
                let (d1, dmin1) = blocks_of[1].map_or((0.0, 0.0), |block| block.d_dmin());
                packed.floats.push([d0, d1, dmin0, dmin1]);
                if B::MINS != Mins::None {
                    let mins = blocks_of.map(|block| block.map_or([0; 8], |block| block.minimums()));
                    packed.mins.push(std::array::from_fn(|i| mins[i / 8][i % 8] as i16));
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
        let bytes_of = |w: &Self| w.n.div_ceil(2) * w.blocks * NIBBLE_BYTES;
        let (mine, theirs) = (bytes_of(self), bytes_of(&other));
        let mut values = units_for(mine + theirs);
        let bytes = units_as_bytes(&mut values);
        bytes[..mine].copy_from_slice(&units_bytes(&self.values)[..mine]);
        bytes[mine..mine + theirs].copy_from_slice(&units_bytes(&other.values)[..theirs]);
        self.values = values;
        self.n += other.n;
        self.high.extend(other.high);
        self.scales.extend(other.scales);
        self.floats.extend(other.floats);
        self.mins.extend(other.mins);
    }

    /// Row `row` as f32 values (for embedding lookups), as GGML dequantizes it.
    pub fn dequantize_row(&self, row: usize, out: &mut [f32]) {
        let bytes = units_bytes(&self.values);
        let (pair, which) = (row / 2, row % 2);
        for (b, o) in out.chunks_exact_mut(QK_K).enumerate() {
            let at = pair * self.blocks + b;
            let [d0, d1, dmin0, dmin1] = self.floats[at];
            let (d, dmin) = if which == 0 { (d0, dmin0) } else { (d1, dmin1) };
            for (e, x) in o.iter_mut().enumerate() {
                let (run, p) = (e / 32, register_byte(which, e % 32));
                let byte = bytes[at * NIBBLE_BYTES + run * 32 + p % 32];
                let mut stored = if p < 32 { byte & 0x0F } else { byte >> 4 };
                for plane in 0..B::PLANES {
                    stored |= (((self.high[(at * RUNS + run) * B::PLANES + plane] >> p) & 1) as u8) << (4 + plane);
                }
                let half = if B::SCALES_16 { (e % 32) / 16 } else { 0 };
                let scale = self.scales[(at * RUNS + run) * Self::SCALES_PER_RUN + half][2 * which];
                let min = if B::MINS == Mins::None { 0 } else { self.mins[at][8 * which + e / 32] as u8 };
                *x = B::value(stored, d, dmin, scale, min);
            }
        }
    }
}

/// One activation row's per-super-block numbers the kernel reads besides the quants.
#[derive(Clone, Copy, Default)]
#[repr(C)]
struct RowBlock {
    /// The sums of each 32 quants (sub-block), twice: one copy per row of a pair.
    sums: [i16; 16],
    d: f32,
}

/// Activation rows in panels of PANEL rows (the rows left over in panels of one): for each
/// super-block and run, the panel's rows' quants (64 bytes each: the run's 4-byte groups each
/// twice, in register order), then for Q6_K each row's `-32 x (sum of each byte pair)` as
/// 16-bit values. Each row's sums and scale per super-block lie apart, row after row.
pub struct PackedActsK {
    blocks: usize,
    m: usize,
    offset: bool,
    units: Vec<Unit>,
    rows: Vec<RowBlock>,
}

/// Consecutive activation rows as the kernel reads them.
pub struct PanelK<'a> {
    blocks: usize,
    offset: bool,
    units: &'a [Unit],
    rows: &'a [RowBlock],
}

/// 64-byte units per run in a panel of `rows` rows.
const fn units_per_run(rows: usize, offset: bool) -> usize {
    rows * if offset { 2 } else { 1 }
}

impl PackedActsK {
    /// `acts` holds rows of `blocks` super-blocks each; `B` is the weight type they will meet.
    pub fn new<B: KPairFormat>(acts: &[ActBlockK], blocks: usize) -> Self {
        let m = acts.len() / blocks;
        let offset = B::OFFSET;
        let mut units = vec![Unit([0; 64]); m * blocks * RUNS * units_per_run(1, offset)];
        let bytes = units_as_bytes(&mut units);
        let full = m / PANEL * PANEL;
        let (mut at, mut first) = (0, 0);
        while first < m {
            let rows = if first < full { PANEL } else { 1 };
            for b in 0..blocks {
                for run in 0..RUNS {
                    for i in 0..rows {
                        let qs = &acts[(first + i) * blocks + b].qs[32 * run..32 * run + 32];
                        // Register group `g` (4 bytes) holds the run's values 4(g / 2)..4(g / 2) + 4.
                        for (g, group) in bytes[at + i * 64..][..64].chunks_exact_mut(4).enumerate() {
                            for (byte, &q) in group.iter_mut().zip(&qs[4 * (g / 2)..]) {
                                *byte = q as u8;
                            }
                        }
                        if offset {
                            // The 16-bit pair `h` of the register is pair `2(h / 4) + h % 2` of the run.
                            let pairs: [i16; 16] =
                                std::array::from_fn(|t| -32 * (qs[2 * t] as i16 + qs[2 * t + 1] as i16));
                            for (h, v) in bytes[at + (rows + i) * 64..][..64].chunks_exact_mut(2).enumerate() {
                                v.copy_from_slice(&pairs[2 * (h / 4) + h % 2].to_ne_bytes());
                            }
                        }
                    }
                    at += units_per_run(rows, offset) * 64;
                }
            }
            first += rows;
        }
        let rows = acts
            .iter()
            .map(|a| {
                let sums: [i16; 8] = std::array::from_fn(|s| a.bsums[2 * s] + a.bsums[2 * s + 1]);
                RowBlock { sums: std::array::from_fn(|i| sums[i % 8]), d: a.d }
            })
            .collect();
        Self { blocks, m, offset, units, rows }
    }

    /// The panel of `rows` rows that starts at row `first`.
    pub fn panel(&self, first: usize, rows: usize) -> PanelK<'_> {
        let full = self.m / PANEL * PANEL;
        let in_panels = rows == PANEL && first.is_multiple_of(PANEL) && first < full;
        assert!(
            first + rows <= self.m && (in_panels || rows == 1 && first >= full),
            "no panel of {rows} rows at row {first}"
        );
        // Every row takes the same units, whichever panel holds it.
        let per_row = self.blocks * RUNS * units_per_run(1, self.offset);
        PanelK {
            blocks: self.blocks,
            offset: self.offset,
            units: &self.units[first * per_row..(first + rows) * per_row],
            rows: &self.rows[first * self.blocks..(first + rows) * self.blocks],
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
/// The CPU must support what `vnni::available` checks.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512vnni")]
pub unsafe fn dot<B: KPairFormat, const R: usize>(w: &PackedWeightsK<B>, pair: usize, panel: &PanelK) -> [[f32; 2]; R] {
    let blocks = w.blocks;
    let per_run = units_per_run(R, B::OFFSET);
    assert!(blocks == panel.blocks && panel.offset == B::OFFSET);
    assert!(panel.units.len() == blocks * RUNS * per_run && panel.rows.len() == R * blocks);
    assert!(pair < w.n.div_ceil(2));
    let values = w.values.as_ptr() as *const u8;
    let mut acc = [_mm512_setzero_ps(); R];
    // Q4_K: row 0's 4 lanes, then row 1's; Q5_K: lanes 0 and 4 carry each row's chain.
    let mut acc_m = [_mm256_setzero_ps(); R];
    for b in 0..blocks {
        let at = pair * blocks + b;
        let floats = w.floats[at];
        // (d0, d1, d0, d1, ...): each lane's row's scale.
        let wd = _mm512_castpd_ps(_mm512_set1_pd(f64::from_bits(
            (floats[1].to_bits() as u64) << 32 | floats[0].to_bits() as u64,
        )));
        let wdmin = _mm256_set_m128(_mm_set1_ps(floats[3]), _mm_set1_ps(floats[2]));
        let mut sumi = [_mm512_setzero_si512(); R];
        for run in 0..RUNS {
            // SAFETY: run `run` of the pair's super-block `b` is within the packed values, and
            // the panel holds `per_run` units for each run of each of `blocks` super-blocks.
            unsafe {
                let raw = _mm256_loadu_si256(values.add(at * NIBBLE_BYTES + run * 32) as *const __m256i);
                let mask = _mm256_set1_epi8(0x0F);
                let (lo, hi) = (_mm256_and_si256(raw, mask), _mm256_and_si256(_mm256_srli_epi16(raw, 4), mask));
                let mut qx = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
                for plane in 0..B::PLANES {
                    let bits = _cvtu64_mask64(w.high[(at * RUNS + run) * B::PLANES + plane]);
                    qx = _mm512_mask_add_epi8(qx, bits, qx, _mm512_set1_epi8(16 << plane));
                }
                let sc = (at * RUNS + run) * PackedWeightsK::<B>::SCALES_PER_RUN;
                let pattern =
                    |i: usize| _mm512_set1_epi64(std::ptr::read_unaligned(w.scales[i].as_ptr() as *const i64));
                // Q6_K: the first 16 values' lanes are the register's low half.
                let scales = if B::SCALES_16 {
                    _mm512_mask_blend_epi64(0xF0, pattern(sc), pattern(sc + 1))
                } else {
                    pattern(sc)
                };
                let unit = panel.units.as_ptr().add((b * RUNS + run) * per_run) as *const u8;
                for (r, s) in sumi.iter_mut().enumerate() {
                    let quants = _mm512_load_si512(unit.add(r * 64) as *const __m512i);
                    let mut pairs = _mm512_maddubs_epi16(qx, quants);
                    if B::OFFSET {
                        pairs = _mm512_add_epi16(pairs, _mm512_load_si512(unit.add((R + r) * 64) as *const __m512i));
                    }
                    *s = _mm512_dpwssd_epi32(*s, pairs, scales);
                }
            }
        }
        for r in 0..R {
            let info = &panel.rows[r * blocks + b];
            // llama.cpp's per-super-block scale: d_a * d_w, one rounding.
            acc[r] = _mm512_fmadd_ps(_mm512_mul_ps(wd, _mm512_set1_ps(info.d)), _mm512_cvtepi32_ps(sumi[r]), acc[r]);
            if B::MINS != Mins::None {
                // SAFETY: 16 i16 each.
                let (mins, sums) = unsafe {
                    (
                        _mm256_loadu_si256(w.mins[at].as_ptr() as *const __m256i),
                        _mm256_loadu_si256(info.sums.as_ptr() as *const __m256i),
                    )
                };
                let mut prod = _mm256_madd_epi16(mins, sums);
                if B::MINS == Mins::Sum {
                    // Each row's 4 lanes' total (in every lane of its half).
                    prod = _mm256_hadd_epi32(prod, prod);
                    prod = _mm256_hadd_epi32(prod, prod);
                }
                let dmin = _mm256_mul_ps(_mm256_set1_ps(-info.d), wdmin);
                acc_m[r] = _mm256_fmadd_ps(dmin, _mm256_cvtepi32_ps(prod), acc_m[r]);
            }
        }
    }
    let mut out = [[0f32; 2]; R];
    for r in 0..R {
        // Each row's 8 lanes added as ((0 + 4) + (2 + 6)) + ((1 + 5) + (3 + 7)), as
        // llama.cpp's `hsum_float_8` adds them; its lane j is register lane 2j (+1).
        let t = _mm256_add_ps(_mm512_extractf32x8_ps(acc[r], 1), _mm512_castps512_ps256(acc[r]));
        let u = _mm_add_ps(_mm256_extractf128_ps(t, 1), _mm256_castps256_ps128(t));
        let (mut lanes, mut m) = ([0f32; 4], [0f32; 8]);
        // SAFETY: four floats into four, eight into eight.
        unsafe {
            _mm_storeu_ps(lanes.as_mut_ptr(), u);
            _mm256_storeu_ps(m.as_mut_ptr(), acc_m[r]);
        }
        out[r] = [lanes[0] + lanes[2], lanes[1] + lanes[3]];
        match B::MINS {
            Mins::None => {}
            Mins::Lanes => {
                out[r][0] += (m[0] + m[2]) + (m[1] + m[3]);
                out[r][1] += (m[4] + m[6]) + (m[5] + m[7]);
            }
            Mins::Sum => out[r] = [out[r][0] + m[0], out[r][1] + m[4]],
        }
    }
    out
}

/// Weight rows `cols` (a range starting at an even row) against every panel (`panels` of
/// PANEL rows, then `singles` of one row from row `panels.len() * PANEL`), each result passed
/// to `set(row, col, value)`. Compiled with the kernel's features so that `dot` is inlined
/// into the loop.
///
/// # Safety
/// The CPU must support what `vnni::available` checks.
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512vnni")]
pub unsafe fn columns<B: KPairFormat>(
    w: &PackedWeightsK<B>,
    cols: std::ops::Range<usize>,
    panels: &[PanelK],
    singles: &[PanelK],
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
    use super::super::kquants::{self, tests::random_blocks};
    use super::super::vnni::available;
    use super::*;
    use candle_core::quantized::GgmlDType;
    use rand::{Rng, SeedableRng};

    fn check<B: KPairFormat>(dtype: GgmlDType, parse: fn(&[u8]) -> Vec<B>, dequantize: fn(&[B], &mut [f32])) {
        let mut r = rand_chacha::ChaCha8Rng::seed_from_u64(31);
        for blocks in [1usize, 2, 5] {
            // An odd number of weight rows; one full panel of activations and two rows after it.
            let (n, m) = (5usize, PANEL + 2);
            let x: Vec<f32> = (0..m * blocks * QK_K).map(|_| r.random_range(-4.0..4.0)).collect();
            let mut acts = vec![ActBlockK::default(); m * blocks];
            for (row, out) in x.chunks_exact(blocks * QK_K).zip(acts.chunks_exact_mut(blocks)) {
                kquants::quantize_row_k(row, out);
            }
            let w = parse(&random_blocks(&mut r, dtype, n * blocks));
            let (pw, pa) = (PackedWeightsK::new(&w, blocks), PackedActsK::new::<B>(&acts, blocks));
            // Appending rows keeps every row; dequantizing gives GGML's values.
            let mut joined = PackedWeightsK::new(&w[..2 * blocks], blocks);
            joined.append(PackedWeightsK::new(&w[2 * blocks..], blocks));
            for row in 0..n {
                let (mut got, mut want) = (vec![0f32; blocks * QK_K], vec![0f32; blocks * QK_K]);
                joined.dequantize_row(row, &mut got);
                dequantize(&w[row * blocks..(row + 1) * blocks], &mut want);
                assert_eq!(got, want, "{dtype:?} {blocks} blocks, row {row}");
            }
            let mut got = vec![vec![f32::NAN; n]; m];
            let panels = [pa.panel(0, PANEL)];
            let singles: Vec<_> = (PANEL..m).map(|row| pa.panel(row, 1)).collect();
            unsafe { columns(&pw, 0..n, &panels, &singles, |row, col, v| got[row][col] = v) };
            for (row, values) in got.iter().enumerate() {
                let alone_acts = &acts[row * blocks..(row + 1) * blocks];
                let alone_packed = PackedActsK::new::<B>(alone_acts, blocks);
                let mut alone = vec![f32::NAN; n];
                unsafe { columns(&pw, 0..n, &[], &[alone_packed.panel(0, 1)], |_, col, v| alone[col] = v) };
                for (col, &value) in values.iter().enumerate() {
                    // llama.cpp's arithmetic, bit for bit (the plain kernel is its definition).
                    let want = B::dot(&w[col * blocks..(col + 1) * blocks], alone_acts);
                    assert_eq!(
                        value.to_bits(),
                        want.to_bits(),
                        "{dtype:?} {blocks} blocks, row {row}, col {col}: {value} vs {want}"
                    );
                    assert_eq!(value.to_bits(), alone[col].to_bits(), "grouping rows changes nothing");
                }
            }
        }
    }

    #[test]
    fn packed_k_dots_equal_the_plain_ones_bit_for_bit() {
        if !available() {
            eprintln!("no AVX-512 VNNI here: nothing to compare");
            return;
        }
        check::<BlockQ4K>(GgmlDType::Q4K, kquants::parse_q4_k, kquants::dequantize_q4_k);
        check::<BlockQ5K>(GgmlDType::Q5K, kquants::parse_q5_k, kquants::dequantize_q5_k);
        check::<BlockQ6K>(GgmlDType::Q6K, kquants::parse_q6_k, kquants::dequantize_q6_k);
    }
}
