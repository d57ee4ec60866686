//! Block-quantized weights (GGML layouts) and their dot products with quantized activations:
//! the 32-value types here, the 256-value K-quants in `kquants.rs`.
//!
//! Activations are quantized and dot products summed exactly as llama.cpp's x86 path does
//! (`127 / amax` scale, round to nearest even, `s = f16(d * sum)`; the lane order below),
//! because this small model is chaotic: any other rounding moves its greedy output (see the
//! golden tests). Every output element is computed by the same code whatever the batch size.

use half::f16;

pub mod avx2;
pub mod blocks;
pub mod kquants;
pub mod vnni;
pub mod vnni_k;

pub use blocks::{
    ActBlock, ActBlockK, ActQuant, BlockQ4_0, BlockQ4_1, BlockQ4K, BlockQ5_0, BlockQ5K, BlockQ6K, BlockQ8_0, QK, QK_K,
    WeightBlock,
};
use blocks::{five_bits, nibble};

fn f16_at(bytes: &[u8], at: usize) -> f16 {
    f16::from_le_bytes([bytes[at], bytes[at + 1]])
}

pub fn parse_q4_0(bytes: &[u8]) -> Vec<BlockQ4_0> {
    bytes.chunks_exact(18).map(|b| BlockQ4_0 { d: f16_at(b, 0), qs: b[2..18].try_into().unwrap() }).collect()
}

pub fn parse_q4_1(bytes: &[u8]) -> Vec<BlockQ4_1> {
    bytes
        .chunks_exact(20)
        .map(|b| BlockQ4_1 { d: f16_at(b, 0), m: f16_at(b, 2), qs: b[4..20].try_into().unwrap() })
        .collect()
}

pub fn parse_q5_0(bytes: &[u8]) -> Vec<BlockQ5_0> {
    bytes
        .chunks_exact(22)
        .map(|b| BlockQ5_0 {
            d: f16_at(b, 0),
            qh: u32::from_le_bytes(b[2..6].try_into().unwrap()),
            qs: b[6..22].try_into().unwrap(),
        })
        .collect()
}

pub fn parse_q8_0(bytes: &[u8]) -> Vec<BlockQ8_0> {
    bytes
        .chunks_exact(34)
        .map(|b| {
            let mut qs = [0i8; QK];
            for (q, &x) in qs.iter_mut().zip(&b[2..34]) {
                *q = x as i8;
            }
            BlockQ8_0 { d: f16_at(b, 0), qs }
        })
        .collect()
}

/// Quantizes one row (length a multiple of 32) to 8-bit blocks, as llama.cpp's AVX2
/// `quantize_row_q8_0` / `quantize_row_q8_1` do.
pub fn quantize_row(x: &[f32], out: &mut [ActBlock]) {
    #[cfg(target_arch = "x86_64")]
    if avx2::available() {
        // SAFETY: the features were just detected.
        return unsafe { avx2::quantize_row(x, out) };
    }
    quantize_row_plain(x, out)
}

/// The definition (and the path for CPUs without AVX2).
pub(super) fn quantize_row_plain(x: &[f32], out: &mut [ActBlock]) {
    for (block, xs) in out.iter_mut().zip(x.chunks_exact(QK)) {
        let amax = xs.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
        let mut sum = 0i32;
        for (q, &v) in block.qs.iter_mut().zip(xs) {
            *q = (v * id).round_ties_even() as i8;
            sum += *q as i32;
        }
        block.d = f16::from_f32(d).to_f32();
        block.s = f16::from_f32(d * sum as f32).to_f32();
    }
}

impl ActQuant for ActBlock {
    const SIZE: usize = QK;
    fn quantize(x: &[f32], out: &mut [Self]) {
        quantize_row(x, out)
    }
}

impl WeightBlock for BlockQ4_0 {
    type Act = ActBlock;
    #[inline(always)]
    fn dot(w: &[Self], a: &[ActBlock]) -> f32 {
        dot_q4_0(w, a)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn dot_avx2<const R: usize>(w: &[Self], a: [&[ActBlock]; R]) -> [f32; R] {
        unsafe { avx2::dot_q4_0::<R>(w, a) }
    }
}

impl WeightBlock for BlockQ4_1 {
    type Act = ActBlock;
    #[inline(always)]
    fn dot(w: &[Self], a: &[ActBlock]) -> f32 {
        dot_q4_1(w, a)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn dot_avx2<const R: usize>(w: &[Self], a: [&[ActBlock]; R]) -> [f32; R] {
        unsafe { avx2::dot_q4_1::<R>(w, a) }
    }
}

impl WeightBlock for BlockQ5_0 {
    type Act = ActBlock;
    #[inline(always)]
    fn dot(w: &[Self], a: &[ActBlock]) -> f32 {
        dot_q5_0(w, a)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn dot_avx2<const R: usize>(w: &[Self], a: [&[ActBlock]; R]) -> [f32; R] {
        unsafe { avx2::dot_q5_0::<R>(w, a) }
    }
}

impl WeightBlock for BlockQ8_0 {
    type Act = ActBlock;
    #[inline(always)]
    fn dot(w: &[Self], a: &[ActBlock]) -> f32 {
        dot_q8_0(w, a)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn dot_avx2<const R: usize>(w: &[Self], a: [&[ActBlock]; R]) -> [f32; R] {
        unsafe { avx2::dot_q8_0::<R>(w, a) }
    }
}

// The plain dot products follow llama.cpp's x86 arithmetic exactly (the AVX2 and AVX-512
// kernels must give the same bits): per block, 8 lanes each sum 4 consecutive products in
// integers; each lane accumulates `(d_w * d_a) * lane` with a fused multiply-add, block after
// block; the lanes are added as ((0 + 4) + (2 + 6)) + ((1 + 5) + (3 + 7)) (`hsum_float_8`);
// Q4_1's offsets `m * s` accumulate in one fused chain and are added last. Q5_0 is Q4_0 with a
// fifth bit (llama.cpp's AVX2 kernel makes signed bytes `q - 16` and sums them the same way).

/// The 8 lanes of one block's integer products, for weight values `w(e)`.
#[inline(always)]
fn lanes(w: impl Fn(usize) -> i32, a: &[i8; QK]) -> [f32; 8] {
    std::array::from_fn(|l| (4 * l..4 * l + 4).map(|e| w(e) * a[e] as i32).sum::<i32>() as f32)
}

#[inline(always)]
fn hsum8(a: [f32; 8]) -> f32 {
    ((a[0] + a[4]) + (a[2] + a[6])) + ((a[1] + a[5]) + (a[3] + a[7]))
}

#[inline(always)]
fn accumulate(acc: &mut [f32; 8], scale: f32, lanes: [f32; 8]) {
    for (a, x) in acc.iter_mut().zip(lanes) {
        *a = scale.mul_add(x, *a);
    }
}

#[inline(always)]
pub fn dot_q4_0(w: &[BlockQ4_0], a: &[ActBlock]) -> f32 {
    let mut acc = [0f32; 8];
    for (wb, ab) in w.iter().zip(a) {
        accumulate(&mut acc, wb.d.to_f32() * ab.d, lanes(|e| nibble(&wb.qs, e) as i32 - 8, &ab.qs));
    }
    hsum8(acc)
}

#[inline(always)]
pub fn dot_q4_1(w: &[BlockQ4_1], a: &[ActBlock]) -> f32 {
    let (mut acc, mut offsets) = ([0f32; 8], 0f32);
    for (wb, ab) in w.iter().zip(a) {
        offsets = wb.m.to_f32().mul_add(ab.s, offsets);
        accumulate(&mut acc, wb.d.to_f32() * ab.d, lanes(|e| nibble(&wb.qs, e) as i32, &ab.qs));
    }
    hsum8(acc) + offsets
}

#[inline(always)]
pub fn dot_q5_0(w: &[BlockQ5_0], a: &[ActBlock]) -> f32 {
    let mut acc = [0f32; 8];
    for (wb, ab) in w.iter().zip(a) {
        accumulate(&mut acc, wb.d.to_f32() * ab.d, lanes(|e| five_bits(wb, e) as i32 - 16, &ab.qs));
    }
    hsum8(acc)
}

#[inline(always)]
pub fn dot_q8_0(w: &[BlockQ8_0], a: &[ActBlock]) -> f32 {
    let mut acc = [0f32; 8];
    for (wb, ab) in w.iter().zip(a) {
        accumulate(&mut acc, wb.d.to_f32() * ab.d, lanes(|e| wb.qs[e] as i32, &ab.qs));
    }
    hsum8(acc)
}

/// Dequantized values of one row of weight blocks.
pub fn dequantize_q8_0(w: &[BlockQ8_0], out: &mut [f32]) {
    for (wb, o) in w.iter().zip(out.chunks_exact_mut(QK)) {
        let d = wb.d.to_f32();
        for (x, &q) in o.iter_mut().zip(&wb.qs) {
            *x = q as f32 * d;
        }
    }
}

pub fn dequantize_q4_0(w: &[BlockQ4_0], out: &mut [f32]) {
    for (wb, o) in w.iter().zip(out.chunks_exact_mut(QK)) {
        let d = wb.d.to_f32();
        for j in 0..QK / 2 {
            o[j] = ((wb.qs[j] & 0x0F) as i32 - 8) as f32 * d;
            o[j + QK / 2] = ((wb.qs[j] >> 4) as i32 - 8) as f32 * d;
        }
    }
}

pub fn dequantize_q5_0(w: &[BlockQ5_0], out: &mut [f32]) {
    for (wb, o) in w.iter().zip(out.chunks_exact_mut(QK)) {
        let d = wb.d.to_f32();
        for (e, x) in o.iter_mut().enumerate() {
            *x = (five_bits(wb, e) as i32 - 16) as f32 * d;
        }
    }
}

pub fn dequantize_q4_1(w: &[BlockQ4_1], out: &mut [f32]) {
    for (wb, o) in w.iter().zip(out.chunks_exact_mut(QK)) {
        let (d, m) = (wb.d.to_f32(), wb.m.to_f32());
        for j in 0..QK / 2 {
            o[j] = (wb.qs[j] & 0x0F) as f32 * d + m;
            o[j + QK / 2] = (wb.qs[j] >> 4) as f32 * d + m;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn rng() -> rand_chacha::ChaCha8Rng {
        rand_chacha::ChaCha8Rng::seed_from_u64(3)
    }

    #[test]
    fn quantized_activations_round_trip_within_half_a_step() {
        let mut r = rng();
        let x: Vec<f32> = (0..96).map(|_| r.random_range(-3.0..3.0)).collect();
        let mut q = vec![ActBlock::default(); 3];
        quantize_row(&x, &mut q);
        for (b, xs) in q.iter().zip(x.chunks(QK)) {
            let sum: i32 = b.qs.iter().map(|&v| v as i32).sum();
            assert!((b.s - b.d * sum as f32).abs() <= b.d * sum.abs() as f32 * 1e-3 + 1e-6);
            for (&v, &qv) in xs.iter().zip(&b.qs) {
                assert!((v - qv as f32 * b.d).abs() <= b.d * 0.5 + 1e-3, "{v} vs {}", qv as f32 * b.d);
            }
        }
    }

    /// Each dot product equals the plain sum over dequantized weights and activations.
    #[test]
    fn dot_products_match_dequantized_reference() {
        let mut r = rng();
        let blocks = 5;
        let mut a = vec![ActBlock::default(); blocks];
        let x: Vec<f32> = (0..blocks * QK).map(|_| r.random_range(-2.0..2.0)).collect();
        quantize_row(&x, &mut a);
        let deq_a: Vec<f64> = a.iter().flat_map(|b| b.qs.iter().map(move |&q| q as f64 * b.d as f64)).collect();
        let mut bytes = |size: usize| -> Vec<u8> {
            (0..blocks)
                .flat_map(|_| {
                    let mut b: Vec<u8> = (0..size).map(|_| r.random()).collect();
                    b[0..2].copy_from_slice(&f16::from_f32(0.01).to_le_bytes());
                    if size == 20 {
                        b[2..4].copy_from_slice(&f16::from_f32(-0.07).to_le_bytes());
                    }
                    b
                })
                .collect()
        };
        let reference = |w: &[f32]| -> f64 {
            // Q4_1's offset term uses s = f16(d * sum): compare against the exact value loosely.
            w.iter().zip(&deq_a).map(|(&x, &y)| x as f64 * y).sum()
        };
        let mut w = vec![0f32; blocks * QK];
        let q40 = parse_q4_0(&bytes(18));
        dequantize_q4_0(&q40, &mut w);
        assert!((dot_q4_0(&q40, &a) as f64 - reference(&w)).abs() < 1e-4);
        let q41 = parse_q4_1(&bytes(20));
        dequantize_q4_1(&q41, &mut w);
        assert!((dot_q4_1(&q41, &a) as f64 - reference(&w)).abs() < 2e-3);
        let q50 = parse_q5_0(&bytes(22));
        dequantize_q5_0(&q50, &mut w);
        assert!((dot_q5_0(&q50, &a) as f64 - reference(&w)).abs() < 1e-4);
        let q80 = parse_q8_0(&bytes(34));
        dequantize_q8_0(&q80, &mut w);
        assert!((dot_q8_0(&q80, &a) as f64 - reference(&w)).abs() < 1e-3);
    }
}
