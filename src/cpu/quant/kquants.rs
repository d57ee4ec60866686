//! K-quants (Q4_K, Q5_K, Q6_K: super-blocks of 256 values in sub-blocks with their own
//! scales) against activations quantized as llama.cpp's Q8_K, with llama.cpp's x86 arithmetic.
//!
//! Activations: per super-block, `iscale = -127 / max` where `max` is the value of largest
//! magnitude (the first one on ties), quants `min(127, round_ties_even(iscale * x))`, scale
//! `d = 1 / iscale`, and the sums of each 16 quants (llama.cpp's x86 build quantizes with its
//! reference `quantize_row_q8_K_ref`).
//!
//! Dot products follow `ggml_vec_dot_q{4,5,6}_K_q8_K`'s AVX2 kernels: per super-block, 8
//! integer lanes, lane `l` summing over each run of 32 values the sub-block scale times the 4
//! products `4l..4l + 4` of the run (exact in integers, so the order within does not matter);
//! each lane accumulates `(d_a * d_w) * lane` with one fused multiply-add, super-block after
//! super-block, and the lanes are added as `hsum_float_8` adds them. The minimums of Q4_K and
//! Q5_K: `-(d_a * dmin_w)` times `sum of mins x sums of their sub-block's quants`, in 4 fused
//! lanes added as (0 + 2) + (1 + 3) after the main sum for Q4_K, and for Q5_K in one fused
//! chain (llama.cpp's `summs += dmin * sum`, contracted as for Q4_1's offsets) added last.
//! Q6_K's values are stored plus 32; the kernel's products are `(q - 32) * a`.

use half::f16;

#[cfg(target_arch = "x86_64")]
use super::avx2;
use super::blocks::{ActBlockK, ActQuant, BlockQ4K, BlockQ5K, BlockQ6K, QK_K, WeightBlock};
use super::blocks::{k_nibble, q5k_value, q6k_stored};
use super::hsum8;

fn f16_at(bytes: &[u8], at: usize) -> f16 {
    f16::from_le_bytes([bytes[at], bytes[at + 1]])
}

/// GGML's 12 bytes of 6-bit scales and minimums (`get_scale_min_k4`), unpacked.
fn scales_and_mins(q: &[u8]) -> ([u8; 8], [u8; 8]) {
    let (mut scales, mut mins) = ([0u8; 8], [0u8; 8]);
    for j in 0..8 {
        (scales[j], mins[j]) = if j < 4 {
            (q[j] & 63, q[j + 4] & 63)
        } else {
            ((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4))
        };
    }
    (scales, mins)
}

pub const Q4K_BYTES: usize = 144;
pub const Q5K_BYTES: usize = 176;
pub const Q6K_BYTES: usize = 210;

pub fn parse_q4_k(bytes: &[u8]) -> Vec<BlockQ4K> {
    bytes
        .chunks_exact(Q4K_BYTES)
        .map(|b| {
            let (scales, mins) = scales_and_mins(&b[4..16]);
            BlockQ4K { d: f16_at(b, 0), dmin: f16_at(b, 2), scales, mins, qs: b[16..144].try_into().unwrap() }
        })
        .collect()
}

pub fn parse_q5_k(bytes: &[u8]) -> Vec<BlockQ5K> {
    bytes
        .chunks_exact(Q5K_BYTES)
        .map(|b| {
            let (scales, mins) = scales_and_mins(&b[4..16]);
            BlockQ5K {
                d: f16_at(b, 0),
                dmin: f16_at(b, 2),
                scales,
                mins,
                qh: b[16..48].try_into().unwrap(),
                qs: b[48..176].try_into().unwrap(),
            }
        })
        .collect()
}

pub fn parse_q6_k(bytes: &[u8]) -> Vec<BlockQ6K> {
    bytes
        .chunks_exact(Q6K_BYTES)
        .map(|b| {
            let mut scales = [0i8; 16];
            for (s, &x) in scales.iter_mut().zip(&b[192..208]) {
                *s = x as i8;
            }
            BlockQ6K {
                ql: b[..128].try_into().unwrap(),
                qh: b[128..192].try_into().unwrap(),
                scales,
                d: f16_at(b, 208),
            }
        })
        .collect()
}

/// `quantize_row_q8_K_ref`: one row, a whole number of super-blocks.
pub fn quantize_row_k(x: &[f32], out: &mut [ActBlockK]) {
    #[cfg(target_arch = "x86_64")]
    if avx2::available() {
        // SAFETY: the features were just detected.
        return unsafe { avx2::quantize_row_k(x, out) };
    }
    quantize_row_k_plain(x, out)
}

/// llama.cpp's `nearest_int`: round to nearest even by adding 1.5 * 2^23 (for |x| < 2^22).
#[inline(always)]
fn nearest_int(x: f32) -> i32 {
    ((x + 12582912.0).to_bits() & 0x007f_ffff) as i32 - 0x0040_0000
}

/// The definition (and the path for CPUs without AVX2).
pub(super) fn quantize_row_k_plain(x: &[f32], out: &mut [ActBlockK]) {
    for (block, xs) in out.iter_mut().zip(x.chunks_exact(QK_K)) {
        let (mut max, mut amax) = (0f32, 0f32);
        for &v in xs {
            if v.abs() > amax {
                amax = v.abs();
                max = v;
            }
        }
        if amax == 0.0 {
            *block = ActBlockK::default();
            continue;
        }
        let iscale = -127.0 / max;
        for (q, &v) in block.qs.iter_mut().zip(xs) {
            *q = nearest_int(iscale * v).min(127) as i8;
        }
        for (sum, qs) in block.bsums.iter_mut().zip(block.qs.chunks_exact(16)) {
            *sum = qs.iter().map(|&q| q as i16).sum();
        }
        block.d = 1.0 / iscale;
    }
}

impl ActQuant for ActBlockK {
    const SIZE: usize = QK_K;
    fn quantize(x: &[f32], out: &mut [Self]) {
        quantize_row_k(x, out)
    }
}

/// The 8 integer lanes of one super-block: lane `l` sums, over each run `r` of 32 values, the
/// scale of value `32r + 4l` times the products of values `32r + 4l .. 32r + 4l + 4`.
#[inline(always)]
fn lanes(w: impl Fn(usize) -> i32, scale: impl Fn(usize) -> i32, a: &[i8; QK_K]) -> [i32; 8] {
    std::array::from_fn(|l| {
        (0..QK_K / 32)
            .map(|r| {
                let first = 32 * r + 4 * l;
                scale(first) * (first..first + 4).map(|e| w(e) * a[e] as i32).sum::<i32>()
            })
            .sum()
    })
}

/// Lane `l` (0..4) of the minimums' products: sub-blocks `2l` and `2l + 1` (two sums of 16
/// quants each).
#[inline(always)]
fn min_lane(mins: &[u8; 8], bsums: &[i16; 16], l: usize) -> i32 {
    let pair = |s: usize| (bsums[2 * s] + bsums[2 * s + 1]) as i32;
    mins[2 * l] as i32 * pair(2 * l) + mins[2 * l + 1] as i32 * pair(2 * l + 1)
}

#[inline(always)]
fn accumulate(acc: &mut [f32; 8], d: f32, lanes: [i32; 8]) {
    for (a, x) in acc.iter_mut().zip(lanes) {
        *a = d.mul_add(x as f32, *a);
    }
}

pub fn dot_q4_k(w: &[BlockQ4K], a: &[ActBlockK]) -> f32 {
    let (mut acc, mut acc_m) = ([0f32; 8], [0f32; 4]);
    for (wb, ab) in w.iter().zip(a) {
        let (d, dmin) = (ab.d * wb.d.to_f32(), -ab.d * wb.dmin.to_f32());
        for (l, m) in acc_m.iter_mut().enumerate() {
            *m = dmin.mul_add(min_lane(&wb.mins, &ab.bsums, l) as f32, *m);
        }
        accumulate(&mut acc, d, lanes(|e| k_nibble(&wb.qs, e) as i32, |e| wb.scales[e / 32] as i32, &ab.qs));
    }
    hsum8(acc) + ((acc_m[0] + acc_m[2]) + (acc_m[1] + acc_m[3]))
}

pub fn dot_q5_k(w: &[BlockQ5K], a: &[ActBlockK]) -> f32 {
    let (mut acc, mut summs) = ([0f32; 8], 0f32);
    for (wb, ab) in w.iter().zip(a) {
        let (d, dmin) = (ab.d * wb.d.to_f32(), -ab.d * wb.dmin.to_f32());
        let mins: i32 = (0..4).map(|l| min_lane(&wb.mins, &ab.bsums, l)).sum();
        summs = dmin.mul_add(mins as f32, summs);
        accumulate(&mut acc, d, lanes(|e| q5k_value(wb, e) as i32, |e| wb.scales[e / 32] as i32, &ab.qs));
    }
    hsum8(acc) + summs
}

pub fn dot_q6_k(w: &[BlockQ6K], a: &[ActBlockK]) -> f32 {
    let mut acc = [0f32; 8];
    for (wb, ab) in w.iter().zip(a) {
        let d = ab.d * wb.d.to_f32();
        accumulate(&mut acc, d, lanes(|e| q6k_stored(wb, e) as i32 - 32, |e| wb.scales[e / 16] as i32, &ab.qs));
    }
    hsum8(acc)
}

// Dequantization as GGML (and candle) compute it: `d * scale` and `dmin * min` rounded first.

pub fn dequantize_q4_k(w: &[BlockQ4K], out: &mut [f32]) {
    for (wb, o) in w.iter().zip(out.chunks_exact_mut(QK_K)) {
        let (d, min) = (wb.d.to_f32(), wb.dmin.to_f32());
        for (e, x) in o.iter_mut().enumerate() {
            let (d1, m1) = (d * wb.scales[e / 32] as f32, min * wb.mins[e / 32] as f32);
            *x = d1 * k_nibble(&wb.qs, e) as f32 - m1;
        }
    }
}

pub fn dequantize_q5_k(w: &[BlockQ5K], out: &mut [f32]) {
    for (wb, o) in w.iter().zip(out.chunks_exact_mut(QK_K)) {
        let (d, min) = (wb.d.to_f32(), wb.dmin.to_f32());
        for (e, x) in o.iter_mut().enumerate() {
            let (d1, m1) = (d * wb.scales[e / 32] as f32, min * wb.mins[e / 32] as f32);
            *x = d1 * q5k_value(wb, e) as f32 - m1;
        }
    }
}

pub fn dequantize_q6_k(w: &[BlockQ6K], out: &mut [f32]) {
    for (wb, o) in w.iter().zip(out.chunks_exact_mut(QK_K)) {
        let d = wb.d.to_f32();
        for (e, x) in o.iter_mut().enumerate() {
            *x = d * wb.scales[e / 16] as f32 * (q6k_stored(wb, e) as i32 - 32) as f32;
        }
    }
}

impl WeightBlock for BlockQ4K {
    type Act = ActBlockK;
    #[inline(always)]
    fn dot(w: &[Self], a: &[ActBlockK]) -> f32 {
        dot_q4_k(w, a)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn dot_avx2<const R: usize>(w: &[Self], a: [&[ActBlockK]; R]) -> [f32; R] {
        unsafe { avx2::dot_q4_k::<R>(w, a) }
    }
}

impl WeightBlock for BlockQ5K {
    type Act = ActBlockK;
    #[inline(always)]
    fn dot(w: &[Self], a: &[ActBlockK]) -> f32 {
        dot_q5_k(w, a)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn dot_avx2<const R: usize>(w: &[Self], a: [&[ActBlockK]; R]) -> [f32; R] {
        unsafe { avx2::dot_q5_k::<R>(w, a) }
    }
}

impl WeightBlock for BlockQ6K {
    type Act = ActBlockK;
    #[inline(always)]
    fn dot(w: &[Self], a: &[ActBlockK]) -> f32 {
        dot_q6_k(w, a)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn dot_avx2<const R: usize>(w: &[Self], a: [&[ActBlockK]; R]) -> [f32; R] {
        unsafe { avx2::dot_q6_k::<R>(w, a) }
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::{Device, Tensor};
    use rand::{Rng, SeedableRng};

    /// `blocks` random super-blocks of `dtype` as GGUF stores them, with sane scales.
    pub(in crate::cpu::quant) fn random_blocks(r: &mut impl Rng, dtype: GgmlDType, blocks: usize) -> Vec<u8> {
        let size = match dtype {
            GgmlDType::Q4K => Q4K_BYTES,
            GgmlDType::Q5K => Q5K_BYTES,
            _ => Q6K_BYTES,
        };
        (0..blocks)
            .flat_map(|_| {
                let mut b: Vec<u8> = (0..size).map(|_| r.random()).collect();
                let mut scale = |at: usize, x: f32| b[at..at + 2].copy_from_slice(&f16::from_f32(x).to_le_bytes());
                if dtype == GgmlDType::Q6K {
                    scale(208, r.random_range(-0.01..0.01));
                } else {
                    scale(0, r.random_range(0.0..0.01));
                    scale(2, r.random_range(0.0..0.01));
                }
                b
            })
            .collect()
    }

    #[test]
    fn quantized_activations_follow_q8_k() {
        let mut r = rand_chacha::ChaCha8Rng::seed_from_u64(5);
        let mut x: Vec<f32> = (0..3 * QK_K).map(|_| r.random_range(-3.0..3.0)).collect();
        // A zero super-block, and one whose largest magnitude is negative and tied.
        x[QK_K..2 * QK_K].fill(0.0);
        x[2 * QK_K + 7] = -9.0;
        x[2 * QK_K + 9] = 9.0;
        let mut q = vec![ActBlockK::default(); 3];
        quantize_row_k(&x, &mut q);
        assert_eq!((q[1].d, q[1].qs, q[1].bsums), (0.0, [0; QK_K], [0; 16]));
        // The first of the tied values is `max`, quantized to -127: iscale = -127 / -9.
        assert_eq!((q[2].qs[7], q[2].qs[9]), (-127, 127));
        assert_eq!(q[2].d, 1.0 / (-127.0f32 / -9.0));
        for (b, xs) in q.iter().zip(x.chunks(QK_K)) {
            for (s, qs) in b.bsums.iter().zip(b.qs.chunks(16)) {
                assert_eq!(*s as i32, qs.iter().map(|&v| v as i32).sum::<i32>());
            }
            for (&v, &qv) in xs.iter().zip(&b.qs) {
                assert!((v - qv as f32 * b.d).abs() <= b.d.abs() * 0.5 + 1e-5, "{v} vs {}", qv as f32 * b.d);
            }
        }
    }

    /// Parsing and dequantizing give candle's (GGML's) values bit for bit, and each dot product
    /// equals the exact sum over the dequantized weights and quantized activations (the lanes
    /// and sub-block scales cover each product once, with the right scale).
    #[test]
    fn k_dots_match_the_dequantized_product() {
        let mut r = rand_chacha::ChaCha8Rng::seed_from_u64(9);
        for dtype in [GgmlDType::Q4K, GgmlDType::Q5K, GgmlDType::Q6K] {
            for blocks in [1usize, 3, 8] {
                let n = 3;
                let k = blocks * QK_K;
                let w: Vec<f32> = (0..n * k).map(|_| r.random_range(-1.0f32..1.0)).collect();
                let qt = QTensor::quantize(&Tensor::from_vec(w, (n, k), &Device::Cpu).unwrap(), dtype).unwrap();
                let want = qt.dequantize(&Device::Cpu).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
                let bytes = qt.data().unwrap();
                let x: Vec<f32> = (0..k).map(|_| r.random_range(-2.0f32..2.0)).collect();
                let mut a = vec![ActBlockK::default(); blocks];
                quantize_row_k(&x, &mut a);
                let deq_a: Vec<f64> = a.iter().flat_map(|b| b.qs.iter().map(move |&q| q as f64 * b.d as f64)).collect();
                let mut got = vec![0f32; n * k];
                let dots: Vec<f32> = match dtype {
                    GgmlDType::Q4K => {
                        let w = parse_q4_k(&bytes);
                        dequantize_q4_k(&w, &mut got);
                        w.chunks(blocks).map(|row| dot_q4_k(row, &a)).collect()
                    }
                    GgmlDType::Q5K => {
                        let w = parse_q5_k(&bytes);
                        dequantize_q5_k(&w, &mut got);
                        w.chunks(blocks).map(|row| dot_q5_k(row, &a)).collect()
                    }
                    _ => {
                        let w = parse_q6_k(&bytes);
                        dequantize_q6_k(&w, &mut got);
                        w.chunks(blocks).map(|row| dot_q6_k(row, &a)).collect()
                    }
                };
                assert_eq!(got, want, "{dtype:?}: dequantized values");
                for (row, &dot) in dots.iter().enumerate() {
                    let exact: f64 = want[row * k..(row + 1) * k].iter().zip(&deq_a).map(|(&w, &a)| w as f64 * a).sum();
                    let scale: f64 =
                        want[row * k..(row + 1) * k].iter().zip(&deq_a).map(|(&w, &a)| (w as f64 * a).abs()).sum();
                    // f32 scales and sums: a few roundings relative to the sum of magnitudes.
                    assert!(
                        (dot as f64 - exact).abs() <= 1e-5 * scale + 1e-6,
                        "{dtype:?} {blocks} blocks row {row}: {dot} vs {exact}"
                    );
                }
            }
        }
    }
}
