//! Quantized products with AVX-512 VNNI (Q4_0, Q4_1, Q8_0), over weights and activations
//! repacked for it.
//!
//! Two 32-element blocks fill one 512-bit register. In GGUF's layout every block needs its own
//! scale broadcast, its f16 scale converted, and two half-register loads put together, per
//! activation row. Here both sides are repacked once (weights at load time, activations once
//! per product) so that the blocks of a pair alternate every 4 bytes: after `vpdpbusd` (which
//! sums groups of 4 byte products into one 32-bit lane) the even lanes belong to the first
//! block and the odd lanes to the second, and a pair's two scales go in with one broadcast.
//!
//! `vpdpbusd` multiplies unsigned by signed bytes. Weights are stored unsigned (`q + zero
//! point`: 8 for Q4_0, 128 for Q8_0, none for Q4_1) and the product is corrected exactly in
//! integers by starting each lane at `-zero point * (sum of its 4 activation bytes)`.
//! Q4_1's offsets (`m * d_a * sum`) are added per block in a second accumulator.
//!
//! Like the other kernels, a row's arithmetic is the same however many rows run together.

#![cfg(target_arch = "x86_64")]

use std::arch::x86_64::*;

use super::quant::{ActBlock, BlockQ4_0, BlockQ4_1, BlockQ8_0, WeightBlock, QK};

pub fn available() -> bool {
    is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512dq")
        && is_x86_feature_detected!("avx512vl")
        && is_x86_feature_detected!("avx512vnni")
}

/// Where byte `p` (0..64) of a pair's register comes from: (block of the pair, element).
fn source_of(p: usize) -> (usize, usize) {
    let group = p / 4;
    (group % 2, (group / 2) * 4 + p % 4)
}

/// 64 bytes, aligned so that a 512-bit load never splits a cache line.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
pub struct Unit([u8; 64]);

/// A weight block type the VNNI kernel runs.
pub trait PairFormat: WeightBlock + Copy {
    /// Stored values have 8 bits (one byte each) rather than 4 (two per byte).
    const WIDE: bool;
    /// log2 of the zero point added to every stored value (none: 0 and `ZERO_POINT` false).
    const ZERO_POINT_SHIFT: u32;
    const ZERO_POINT: bool;
    /// Blocks carry a minimum `m` (Q4_1).
    const OFFSET: bool;
    /// Element `e` as stored: unsigned, zero point included.
    fn stored(&self, e: usize) -> u8;
    /// The block's scale and minimum (0 where it has none).
    fn scale_and_min(&self) -> (f32, f32);

    /// The real value of a stored element, computed as GGML dequantizes it.
    #[inline]
    fn value(stored: u8, d: f32, m: f32) -> f32 {
        let q = stored as i32 - if Self::ZERO_POINT { 1 << Self::ZERO_POINT_SHIFT } else { 0 };
        if Self::OFFSET {
            q as f32 * d + m
        } else {
            q as f32 * d
        }
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

fn nibble(qs: &[u8; QK / 2], e: usize) -> u8 {
    if e < QK / 2 {
        qs[e] & 0x0F
    } else {
        qs[e - QK / 2] >> 4
    }
}

/// Weights of `n` rows of `pairs` block pairs, in register order: per pair 64 stored bytes, or
/// for 4-bit types 32 bytes whose low nibbles are register bytes 0..32 and high nibbles 32..64.
/// A row's odd last block stays in GGUF form.
pub struct PackedWeights<B: PairFormat> {
    n: usize,
    pairs: usize,
    values: Vec<Unit>,
    /// Per pair: the two blocks' scales, then their minimums.
    scales: Vec<[f32; 4]>,
    /// Per row, the last block when the row has an odd number of blocks.
    odd: Vec<B>,
}

impl<B: PairFormat> PackedWeights<B> {
    /// Bytes of one pair's values.
    const PAIR_BYTES: usize = if B::WIDE { 64 } else { 32 };

    /// `w` holds rows of `blocks` blocks each.
    pub fn new(w: &[B], blocks: usize) -> Self {
        let pairs = blocks / 2;
        let n = w.len() / blocks;
        let mut packed = Self { n, pairs, values: units_for(n * pairs * Self::PAIR_BYTES), scales: Vec::with_capacity(n * pairs), odd: Vec::new() };
        let bytes = units_as_bytes(&mut packed.values);
        let mut at = 0;
        for row in w.chunks_exact(blocks) {
            for pair in row[..2 * pairs].chunks_exact(2) {
                let value = |p: usize| {
                    let (b, e) = source_of(p);
                    pair[b].stored(e)
                };
                for (j, byte) in bytes[at..at + Self::PAIR_BYTES].iter_mut().enumerate() {
                    *byte = if B::WIDE { value(j) } else { value(j) | (value(j + 32) << 4) };
                }
                at += Self::PAIR_BYTES;
                let ((d0, m0), (d1, m1)) = (pair[0].scale_and_min(), pair[1].scale_and_min());
                packed.scales.push([d0, d1, m0, m1]);
            }
            if blocks % 2 == 1 {
                packed.odd.push(row[blocks - 1]);
            }
        }
        packed
    }

    /// The rows of `other` after these (both must have the same width).
    pub fn append(&mut self, mut other: Self) {
        assert_eq!(self.pairs, other.pairs, "appended weights have the same width");
        let (mine, theirs) = (self.n * self.pairs * Self::PAIR_BYTES, other.n * other.pairs * Self::PAIR_BYTES);
        let mut values = units_for(mine + theirs);
        let bytes = units_as_bytes(&mut values);
        bytes[..mine].copy_from_slice(&units_as_bytes(&mut self.values)[..mine]);
        bytes[mine..mine + theirs].copy_from_slice(&units_as_bytes(&mut other.values)[..theirs]);
        self.values = values;
        self.n += other.n;
        self.scales.extend(other.scales);
        self.odd.extend(other.odd);
    }

    /// Row `row` as f32 values (for embedding lookups).
    pub fn dequantize_row(&self, row: usize, out: &mut [f32]) {
        let bytes = units_bytes(&self.values);
        for (b, o) in out.chunks_exact_mut(QK).enumerate() {
            if b / 2 == self.pairs {
                self.odd[row].dequantize(o);
                continue;
            }
            let pair = row * self.pairs + b / 2;
            let [d0, d1, m0, m1] = self.scales[pair];
            let (d, m) = if b % 2 == 0 { (d0, m0) } else { (d1, m1) };
            let values = &bytes[pair * Self::PAIR_BYTES..][..Self::PAIR_BYTES];
            for (e, x) in o.iter_mut().enumerate() {
                let p = ((e / 4) * 2 + b % 2) * 4 + e % 4;
                let stored = if B::WIDE { values[p] } else if p < 32 { values[p] & 0x0F } else { values[p - 32] >> 4 };
                *x = B::value(stored, d, m);
            }
        }
    }
}

/// Zeroed units holding at least `bytes` bytes.
fn units_for(bytes: usize) -> Vec<Unit> {
    vec![Unit([0; 64]); bytes.div_ceil(64)]
}

fn units_bytes(units: &[Unit]) -> &[u8] {
    // SAFETY: `Unit` is 64 plain bytes with no padding.
    unsafe { std::slice::from_raw_parts(units.as_ptr() as *const u8, units.len() * 64) }
}

fn units_as_bytes(units: &mut [Unit]) -> &mut [u8] {
    // SAFETY: `Unit` is 64 plain bytes with no padding.
    unsafe { std::slice::from_raw_parts_mut(units.as_mut_ptr() as *mut u8, units.len() * 64) }
}

/// Activation rows in panels of PANEL rows (the rows left over in panels of one): for each
/// block pair, the panel's rows' quants (64 bytes each, in register order), then, for weight
/// types with a zero point, each row's `-zero point x (sum of every 4 quants)` (16 x i32), then their
/// scales and scale x sum of quants `(d0, d1, s0, s1)`, padded to whole units. A panel is read
/// front to back through one pointer, whichever row of it the kernel is at.
pub struct PackedActs {
    pairs: usize,
    m: usize,
    lane_sums: bool,
    units: Vec<Unit>,
    /// Per row, the last block when rows have an odd number of blocks.
    odd: Vec<ActBlock>,
}

/// Consecutive activation rows as the kernel reads them.
pub struct Panel<'a> {
    pairs: usize,
    lane_sums: bool,
    units: &'a [Unit],
    /// The rows' odd last blocks, if blocks are odd.
    odd: &'a [ActBlock],
}

/// Activation rows per panel: the rows the kernel runs against one weight row at once.
pub const PANEL: usize = 4;

/// 64-byte units per block pair in a panel of `rows` rows.
const fn units_per_pair(rows: usize, lane_sums: bool) -> usize {
    rows * if lane_sums { 2 } else { 1 } + (rows * 16).div_ceil(64)
}

impl PackedActs {
    /// `acts` holds rows of `blocks` blocks each; `B` is the weight type they will meet.
    pub fn new<B: PairFormat>(acts: &[ActBlock], blocks: usize) -> Self {
        let pairs = blocks / 2;
        let m = acts.len() / blocks;
        let lane_sums = B::ZERO_POINT;
        let full = m / PANEL * PANEL;
        let total = (full / PANEL * units_per_pair(PANEL, lane_sums) + (m - full) * units_per_pair(1, lane_sums)) * pairs;
        let mut packed = Self { pairs, m, lane_sums, units: vec![Unit([0; 64]); total], odd: Vec::new() };
        let bytes = units_as_bytes(&mut packed.units);
        let row = |r: usize| &acts[r * blocks..(r + 1) * blocks];
        let mut at = 0;
        let mut first = 0;
        while first < m {
            let rows = if first < full { PANEL } else { 1 };
            let sums_at = rows * 64;
            let scales_at = rows * 64 * if lane_sums { 2 } else { 1 };
            for p in 0..pairs {
                for i in 0..rows {
                    let pair = &row(first + i)[2 * p..2 * p + 2];
                    let quants: [i8; 64] = std::array::from_fn(|j| {
                        let (b, e) = source_of(j);
                        pair[b].qs[e]
                    });
                    for (byte, &q) in bytes[at + i * 64..][..64].iter_mut().zip(&quants) {
                        *byte = q as u8;
                    }
                    if lane_sums {
                        for (lane, four) in quants.chunks_exact(4).enumerate() {
                            let negated = -(four.iter().map(|&q| q as i32).sum::<i32>() << B::ZERO_POINT_SHIFT);
                            bytes[at + sums_at + i * 64 + lane * 4..][..4].copy_from_slice(&negated.to_ne_bytes());
                        }
                    }
                    let scales = [pair[0].d, pair[1].d, pair[0].s, pair[1].s];
                    for (k, v) in scales.iter().enumerate() {
                        bytes[at + scales_at + i * 16 + k * 4..][..4].copy_from_slice(&v.to_ne_bytes());
                    }
                }
                at += units_per_pair(rows, lane_sums) * 64;
            }
            first += rows;
        }
        if blocks % 2 == 1 {
            packed.odd = (0..m).map(|r| row(r)[blocks - 1]).collect();
        }
        packed
    }

    /// The panel of `rows` rows that starts at row `first`.
    pub fn panel(&self, first: usize, rows: usize) -> Panel<'_> {
        let full = self.m / PANEL * PANEL;
        let in_panels = rows == PANEL && first.is_multiple_of(PANEL) && first < full;
        assert!(first + rows <= self.m && (in_panels || rows == 1 && first >= full), "no panel of {rows} rows at row {first}");
        let per_panel = self.pairs * units_per_pair(PANEL, self.lane_sums);
        let start = if first < full {
            first / PANEL * per_panel
        } else {
            full / PANEL * per_panel + (first - full) * self.pairs * units_per_pair(1, self.lane_sums)
        };
        Panel {
            pairs: self.pairs,
            lane_sums: self.lane_sums,
            units: &self.units[start..start + self.pairs * units_per_pair(rows, self.lane_sums)],
            odd: if self.odd.is_empty() { &[] } else { &self.odd[first..first + rows] },
        }
    }

    /// Rows that run in panels of PANEL (the rest run one at a time).
    pub fn rows_in_panels(&self) -> usize {
        self.m / PANEL * PANEL
    }
}

/// Weight row `col` against a panel of `R` activation rows (PANEL, or 1 for the rows after
/// the last full panel).
///
/// # Safety
/// The CPU must support what `available` checks.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512vnni")]
pub unsafe fn dot<B: PairFormat, const R: usize>(w: &PackedWeights<B>, col: usize, panel: &Panel) -> [f32; R] {
    let pairs = w.pairs;
    let per_pair = units_per_pair(R, B::ZERO_POINT);
    assert!(pairs == panel.pairs && panel.lane_sums == B::ZERO_POINT && panel.units.len() == pairs * per_pair);
    let (sums_at, scales_at) = (R * 64, R * 64 * if B::ZERO_POINT { 2 } else { 1 });
    let values = w.values.as_ptr() as *const u8;
    let value_bytes = PackedWeights::<B>::PAIR_BYTES;
    let ws = &w.scales[col * pairs..(col + 1) * pairs];
    let mut acc = [_mm512_setzero_ps(); R];
    // 128 bits are enough for the offsets (two useful lanes), and cost one operation less.
    let mut offsets = [_mm_setzero_ps(); R];
    for (p, pair_scales) in ws.iter().enumerate() {
        // SAFETY: pair `col * pairs + p` is within the packed values, and the panel holds
        // `per_pair` units for each of `pairs` pairs.
        unsafe {
            let at = values.add((col * pairs + p) * value_bytes);
            let qx = if B::WIDE {
                _mm512_load_si512(at as *const __m512i)
            } else {
                let raw = _mm256_load_si256(at as *const __m256i);
                let mask = _mm256_set1_epi8(0x0F);
                let (lo, hi) = (_mm256_and_si256(raw, mask), _mm256_and_si256(_mm256_srli_epi16(raw, 4), mask));
                _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1)
            };
            let w4 = _mm_loadu_ps(pair_scales.as_ptr());
            // (d0, d1, d0, d1, ...) and (0, 0, m0, m1): with the activations' (d0, d1, s0, s1),
            // each offset term is counted once.
            let wd = _mm512_castpd_ps(_mm512_broadcastsd_pd(_mm_castps_pd(w4)));
            let wm = _mm_maskz_mov_ps(0b1100, w4);
            let unit = panel.units.as_ptr().add(p * per_pair) as *const u8;
            for r in 0..R {
                let quants = _mm512_load_si512(unit.add(r * 64) as *const __m512i);
                let start = if B::ZERO_POINT {
                    _mm512_load_si512(unit.add(sums_at + r * 64) as *const __m512i)
                } else {
                    _mm512_setzero_si512()
                };
                let sums = _mm512_dpbusd_epi32(start, qx, quants);
                let act4 = _mm_loadu_ps(unit.add(scales_at + r * 16) as *const f32);
                let scale = _mm512_mul_ps(wd, _mm512_castpd_ps(_mm512_broadcastsd_pd(_mm_castps_pd(act4))));
                acc[r] = _mm512_fmadd_ps(scale, _mm512_cvtepi32_ps(sums), acc[r]);
                if B::OFFSET {
                    offsets[r] = _mm_fmadd_ps(wm, act4, offsets[r]);
                }
            }
        }
    }
    let mut out = [0f32; R];
    for r in 0..R {
        out[r] = _mm512_reduce_add_ps(acc[r]);
        if B::OFFSET {
            let o = offsets[r];
            out[r] += _mm_cvtss_f32(_mm_add_ss(_mm_movehl_ps(o, o), _mm_movehdup_ps(_mm_movehl_ps(o, o))));
        }
        if !w.odd.is_empty() {
            out[r] += B::dot(std::slice::from_ref(&w.odd[col]), std::slice::from_ref(&panel.odd[r]));
        }
    }
    out
}

/// Weight rows `cols` against every panel (`panels` of PANEL rows, then `singles` of one row
/// from row `panels.len() * PANEL`), each result passed to `set(row, col, value)`. Compiled
/// with the kernel's features so that `dot` is inlined into the loop.
///
/// # Safety
/// The CPU must support what `available` checks.
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512vnni")]
pub unsafe fn columns<B: PairFormat>(w: &PackedWeights<B>, cols: std::ops::Range<usize>, panels: &[Panel], singles: &[Panel], mut set: impl FnMut(usize, usize, f32)) {
    let full = panels.len() * PANEL;
    for col in cols {
        for (i, panel) in panels.iter().enumerate() {
            let values = unsafe { dot::<B, PANEL>(w, col, panel) };
            for (j, v) in values.into_iter().enumerate() {
                set(i * PANEL + j, col, v);
            }
        }
        for (i, panel) in singles.iter().enumerate() {
            set(full + i, col, unsafe { dot::<B, 1>(w, col, panel) }[0]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::quant::{self, quantize_row};
    use super::*;
    use rand::{Rng, SeedableRng};

    #[test]
    fn every_register_byte_comes_from_one_element() {
        let mut seen = [[false; QK]; 2];
        for p in 0..64 {
            let (b, e) = source_of(p);
            assert!(!seen[b][e]);
            seen[b][e] = true;
            assert_eq!(b, (p / 4) % 2, "byte {p} lands in a lane of block {b}");
        }
    }

    fn check<B: PairFormat>(parse: fn(&[u8]) -> Vec<B>, dequantize: fn(&[B], &mut [f32]), block_bytes: usize, has_min: bool) {
        let mut r = rand_chacha::ChaCha8Rng::seed_from_u64(21);
        for blocks in [1usize, 2, 5, 18, 49] {
            // One full panel and two rows after it.
            let (n, m) = (3usize, PANEL + 2);
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
            let mut joined = PackedWeights::new(&w[..blocks], blocks);
            joined.append(PackedWeights::new(&w[blocks..], blocks));
            for row in 0..n {
                let (mut got, mut want) = (vec![0f32; blocks * QK], vec![0f32; blocks * QK]);
                joined.dequantize_row(row, &mut got);
                dequantize(&w[row * blocks..(row + 1) * blocks], &mut want);
                assert_eq!(got, want, "{blocks} blocks, row {row}");
            }
            for col in 0..n {
                let wrow = &w[col * blocks..(col + 1) * blocks];
                // The first PANEL rows run as one panel, the last two one at a time; each row
                // alone (its own one-row packing) must give the same bits.
                let mut got = unsafe { dot::<B, PANEL>(&pw, col, &pa.panel(0, PANEL)) }.to_vec();
                got.extend((PANEL..m).map(|row| unsafe { dot::<B, 1>(&pw, col, &pa.panel(row, 1)) }[0]));
                for (row, &value) in got.iter().enumerate() {
                    let alone_acts = &acts[row * blocks..(row + 1) * blocks];
                    let want = B::dot(wrow, alone_acts);
                    assert!((value - want).abs() <= 1e-4 * (1.0 + want.abs()), "{blocks} blocks: {value} vs {want}");
                    let alone = unsafe { dot::<B, 1>(&pw, col, &PackedActs::new::<B>(alone_acts, blocks).panel(0, 1)) }[0];
                    assert_eq!(value.to_bits(), alone.to_bits(), "grouping rows changes nothing");
                }
            }
        }
    }

    #[test]
    fn packed_dots_match_the_plain_reference_and_ignore_grouping() {
        if !available() {
            eprintln!("no AVX-512 VNNI here: nothing to compare");
            return;
        }
        check::<BlockQ4_0>(quant::parse_q4_0, quant::dequantize_q4_0, 18, false);
        check::<BlockQ4_1>(quant::parse_q4_1, quant::dequantize_q4_1, 20, true);
        check::<BlockQ8_0>(quant::parse_q8_0, quant::dequantize_q8_0, 34, false);
    }
}
