//! Elementwise math, in three forms for three callers:
//!
//! - `exp_in_place`: a vectorised `exp` for the sampler's log-softmax over the vocabulary. It is
//!   the classic Cephes single-precision scheme (range reduction by ln 2, a degree-5
//!   polynomial, the exponent put back by integer arithmetic) written as straight-line code
//!   over lanes of 8, within a few ulp of the true value.
//! - `expf` / `expf_in_place`: glibc's `expf` to the bit, for attention's softmax (llama.cpp
//!   calls libm's `expf` there, once per key).
//! - `silu_mul`: SwiGLU with llama.cpp's AVX-512 `ggml_v_expf`, to the bit.

const LANES: usize = 8;

const LOG2E: f32 = std::f32::consts::LOG2_E;
/// ln 2 split in two so that `x - n ln 2` is exact for the `n` that occur.
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
const P: [f32; 6] = [1.987_569_1e-4, 1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 1.666_666_5e-1, 0.5];
/// Below this, `exp` is under the smallest normal float and is returned as 0.
const MIN_X: f32 = -87.336_54;
/// Above this, `exp` overflows; inputs are clamped here (the result is then near f32::MAX).
const MAX_X: f32 = 88.376_26;

#[inline(always)]
fn exp_lane(x: f32) -> f32 {
    let clamped = x.min(MAX_X);
    let n = (clamped * LOG2E).round_ties_even();
    let r = n.mul_add(-LN2_LO, n.mul_add(-LN2_HI, clamped));
    let mut y = P[0];
    for &c in &P[1..] {
        y = y.mul_add(r, c);
    }
    let y = y.mul_add(r * r, r) + 1.0;
    // 2^n built from its exponent bits; n is in [-126, 127] for the inputs that reach here.
    let scale = f32::from_bits(((n as i32 + 127).clamp(1, 254) as u32) << 23);
    if x < MIN_X { 0.0 } else { y * scale }
}

#[inline(always)]
fn exp_in_place_plain(xs: &mut [f32]) {
    let mut chunks = xs.chunks_exact_mut(LANES);
    for chunk in &mut chunks {
        for x in chunk.iter_mut() {
            *x = exp_lane(*x);
        }
    }
    for x in chunks.into_remainder() {
        *x = exp_lane(*x);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn exp_in_place_avx2(xs: &mut [f32]) {
    exp_in_place_plain(xs)
}

/// `x = exp(x)` for every element.
pub fn exp_in_place(xs: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if super::quant::avx2::available() {
        // SAFETY: the features were just detected.
        return unsafe { exp_in_place_avx2(xs) };
    }
    exp_in_place_plain(xs)
}

/// 2^(i/32) as f64 bits, less `i << 47` (glibc's `__exp2f_data.tab`).
const EXP2F_TABLE: [u64; 32] = [
    0x3ff0000000000000,
    0x3fefd9b0d3158574,
    0x3fefb5586cf9890f,
    0x3fef9301d0125b51,
    0x3fef72b83c7d517b,
    0x3fef54873168b9aa,
    0x3fef387a6e756238,
    0x3fef1e9df51fdee1,
    0x3fef06fe0a31b715,
    0x3feef1a7373aa9cb,
    0x3feedea64c123422,
    0x3feece086061892d,
    0x3feebfdad5362a27,
    0x3feeb42b569d4f82,
    0x3feeab07dd485429,
    0x3feea47eb03a5585,
    0x3feea09e667f3bcd,
    0x3fee9f75e8ec5f74,
    0x3feea11473eb0187,
    0x3feea589994cce13,
    0x3feeace5422aa0db,
    0x3feeb737b0cdc5e5,
    0x3feec49182a3f090,
    0x3feed503b23e255d,
    0x3feee89f995ad3ad,
    0x3feeff76f2fb5e47,
    0x3fef199bdd85529c,
    0x3fef3720dcef9069,
    0x3fef5818dcfba487,
    0x3fef7c97337b9b5f,
    0x3fefa4afa2a490da,
    0x3fefd0765b6e4540,
];

/// glibc `expf`'s constants: 32 / ln 2; 0x1.8p52 (adding it rounds to an integer); the cubic's
/// coefficients (of r^3, r^2 and r), and its limits: below log(2^-150) the result is 0, above
/// log(2^128) infinity.
const EXPF_INV_LN2_N: f64 = f64::from_bits(0x4047_1547_652b_82fe);
const EXPF_SHIFT: f64 = f64::from_bits(0x4338_0000_0000_0000);
const EXPF_POLY: [f64; 3] = [
    f64::from_bits(0x3ebc_6af8_4b91_2394),
    f64::from_bits(0x3f2e_bfce_50fa_c4f3),
    f64::from_bits(0x3f96_2e42_ff0c_52d6),
];
const EXPF_UNDER: f32 = f32::from_bits(0xc2cf_f1b4);
const EXPF_OVER: f32 = f32::from_bits(0x42b1_7217);

/// `expf` as glibc computes it (its `e_expf.c`: a 32-entry table of 2^(i/32) and a cubic in
/// f64, rounded once to f32), inline: llama.cpp's attention calls libm's `expf` once per key,
/// and braid must round exactly as it does, without a call per key. Checked against the libm
/// braid links (`exp_matches_libm`).
#[inline(always)]
pub fn expf(x: f32) -> f32 {
    let abstop = (x.to_bits() >> 20) & 0x7ff;
    if abstop >= 88f32.to_bits() >> 20 {
        if x == f32::NEG_INFINITY {
            return 0.0;
        }
        if abstop >= f32::INFINITY.to_bits() >> 20 {
            return x + x;
        }
        if x > EXPF_OVER {
            return f32::INFINITY;
        }
        if x < EXPF_UNDER {
            return 0.0;
        }
    }
    let kd = EXPF_INV_LN2_N * x as f64 + EXPF_SHIFT;
    let ki = kd.to_bits();
    let r = EXPF_INV_LN2_N.mul_add(x as f64, -(kd - EXPF_SHIFT));
    let s = f64::from_bits(EXP2F_TABLE[(ki % 32) as usize].wrapping_add(ki << 47));
    // The polynomial's multiply-adds are fused, as in glibc's FMA build (`__expf_fma`).
    let c = EXPF_POLY;
    let p = c[0].mul_add(r, c[1]);
    let y = p.mul_add(r * r, c[2].mul_add(r, 1.0));
    (y * s) as f32
}

/// `expf` of every element; with `S == f16_ops::AVX512` eight at a time in f64 lanes (the same
/// operations, the table read by permutes). A caller passing AVX512 must be compiled with it.
#[inline(always)]
pub fn expf_in_place<const S: u8>(xs: &mut [f32]) {
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if S == super::f16_ops::AVX512 {
        while done + 8 <= xs.len() {
            // SAFETY: in bounds; the caller has the features.
            unsafe {
                use std::arch::x86_64::*;
                let p = xs.as_mut_ptr().add(done);
                _mm256_storeu_ps(p, expf8(_mm256_loadu_ps(p)));
            }
            done += 8;
        }
    }
    for x in &mut xs[done..] {
        *x = expf(*x);
    }
}

/// Eight `expf`s in f64 lanes.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn expf8(x: std::arch::x86_64::__m256) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    unsafe {
        let t = |i: usize| _mm512_loadu_si512(EXP2F_TABLE.as_ptr().add(i) as *const __m512i);
        let (t0, t1, t2, t3) = (t(0), t(8), t(16), t(24));
        let inv_ln2_n = _mm512_set1_pd(EXPF_INV_LN2_N);
        let shift = _mm512_set1_pd(EXPF_SHIFT);
        let xd = _mm512_cvtps_pd(x);
        let kd = _mm512_add_pd(_mm512_mul_pd(inv_ln2_n, xd), shift);
        let ki = _mm512_castpd_si512(kd);
        let r = _mm512_fmsub_pd(inv_ln2_n, xd, _mm512_sub_pd(kd, shift));
        // EXP2F_TABLE[ki % 32]: two 16-entry permutes, chosen by bit 4.
        let low = _mm512_permutex2var_epi64(t0, ki, t1);
        let high = _mm512_permutex2var_epi64(t2, ki, t3);
        let table = _mm512_mask_blend_epi64(_mm512_test_epi64_mask(ki, _mm512_set1_epi64(16)), low, high);
        let s = _mm512_castsi512_pd(_mm512_add_epi64(table, _mm512_slli_epi64::<47>(ki)));
        let c = [_mm512_set1_pd(EXPF_POLY[0]), _mm512_set1_pd(EXPF_POLY[1]), _mm512_set1_pd(EXPF_POLY[2])];
        let p = _mm512_fmadd_pd(c[0], r, c[1]);
        let q = _mm512_fmadd_pd(c[2], r, _mm512_set1_pd(1.0));
        let y = _mm512_mul_pd(_mm512_fmadd_pd(p, _mm512_mul_pd(r, r), q), s);
        let e = _mm512_cvtpd_ps(y);
        // Below log(2^-150): 0 (-inf included); above log(2^128): inf.
        let under = _mm256_cmp_ps_mask::<_CMP_LT_OQ>(x, _mm256_set1_ps(EXPF_UNDER));
        let over = _mm256_cmp_ps_mask::<_CMP_GT_OQ>(x, _mm256_set1_ps(EXPF_OVER));
        let e = _mm256_mask_blend_ps(under, e, _mm256_setzero_ps());
        _mm256_mask_blend_ps(over, e, _mm256_set1_ps(f32::INFINITY))
    }
}

/// `exp(x)` as llama.cpp's AVX-512 `ggml_v_expf` computes it (a range reduction by ln 2 in
/// two parts, a degree-5 polynomial in fused multiply-adds, the exponent put back by
/// `scalef`), lane by lane: braid's SwiGLU must round exactly as llama.cpp's does.
#[inline(always)]
fn ggml_exp_lane(x: f32) -> f32 {
    let c = |bits: u32| f32::from_bits(bits);
    let r = c(0x4b40_0000); // 0x1.8p23: adding it rounds to an integer
    let z = x.mul_add(c(0x3fb8_aa3b), r); // log2(e)
    let n = z - r;
    let b = (-n).mul_add(c(0x35bf_be8e), (-n).mul_add(c(0x3f31_7200), x)); // ln 2, hi and lo
    let u = b * b;
    let j = c(0x3c07_2010)
        .mul_add(b, c(0x3d2b_9f17))
        .mul_add(u, c(0x3e2a_af33).mul_add(b, c(0x3eff_fedb)))
        .mul_add(u, c(0x3f7f_fff6).mul_add(b, 1.0));
    if n.abs() > 192.0 {
        return if n <= 0.0 { 0.0 } else { f32::INFINITY };
    }
    // scalef: j * 2^n with one rounding (the product is exact in f64; |n| <= 192 fits).
    (j as f64 * f64::from_bits(((n as i64 + 1023) as u64) << 52)) as f32
}

#[inline(always)]
fn ggml_exp_plain(xs: &mut [f32]) {
    xs.iter_mut().for_each(|x| *x = ggml_exp_lane(*x));
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn ggml_exp_avx2(xs: &mut [f32]) {
    ggml_exp_plain(xs)
}

/// `x = exp(x)` for every element, each as `ggml_exp_lane` computes it: the same bits as the
/// GPU's `ggml_expf` (kernels/pointwise.cuh), which the sampler's weights rely on.
pub fn ggml_exp_in_place(xs: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if super::quant::avx2::available() {
        // SAFETY: the features were just detected.
        return unsafe { ggml_exp_avx2(xs) };
    }
    ggml_exp_plain(xs)
}

/// Elements llama.cpp's SwiGLU handles per vector (AVX-512); the tail uses libm's `expf`.
const GGML_SILU_LANES: usize = 16;

#[inline(always)]
fn silu_mul_plain(gate: &[f32], up: &[f32], out: &mut [f32]) {
    let vector = gate.len() / GGML_SILU_LANES * GGML_SILU_LANES;
    for ((o, &g), &u) in out[..vector].iter_mut().zip(gate).zip(up) {
        *o = g / (1.0 + ggml_exp_lane(0.0 - g)) * u;
    }
    for ((o, &g), &u) in out[vector..].iter_mut().zip(&gate[vector..]).zip(&up[vector..]) {
        *o = g / (1.0 + (-g).exp()) * u;
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn silu_mul_avx2(gate: &[f32], up: &[f32], out: &mut [f32]) {
    silu_mul_plain(gate, up, out)
}

/// `out = silu(gate) * up`, elementwise (the SwiGLU of a feed-forward layer), rounded as
/// llama.cpp rounds it.
pub fn silu_mul(gate: &[f32], up: &[f32], out: &mut [f32]) {
    assert!(gate.len() == out.len() && up.len() == out.len());
    #[cfg(target_arch = "x86_64")]
    if super::quant::avx2::available() {
        // SAFETY: the features were just detected.
        return unsafe { silu_mul_avx2(gate, up, out) };
    }
    silu_mul_plain(gate, up, out)
}

/// GeGLU with GELU's tanh approximation, `gelu(gate) * up` (Gemma's feed-forward network), as
/// llama.cpp computes it: GELU looked up for the gate rounded to f16, in a table of f16 values
/// (`ggml_table_gelu_f16`), outside (-10, 10) the identity or 0.
pub fn gelu_tanh_mul(gate: &[f32], up: &[f32], out: &mut [f32]) {
    assert!(gate.len() == out.len() && up.len() == out.len());
    let table = gelu_f16_table();
    for ((o, &x), &u) in out.iter_mut().zip(gate).zip(up) {
        *o = if x <= -10.0 {
            0.0
        } else if x >= 10.0 {
            x * u
        } else {
            table[half::f16::from_f32(x).to_bits() as usize] * u
        };
    }
}

/// GELU of every f16 value, rounded to f16 (held as f32): 65,536 entries made once.
fn gelu_f16_table() -> &'static [f32] {
    static TABLE: std::sync::OnceLock<Vec<f32>> = std::sync::OnceLock::new();
    TABLE.get_or_init(|| {
        (0..=u16::MAX)
            .map(|bits| half::f16::from_f32(gelu_tanh(half::f16::from_bits(bits).to_f32())).to_f32())
            .collect()
    })
}

/// GELU's tanh approximation in f32 (`ggml_gelu_f32`, transformers' `gelu_pytorch_tanh`).
pub fn gelu_tanh(x: f32) -> f32 {
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    0.5 * x * (1.0 + (SQRT_2_OVER_PI * x * (1.0 + 0.044_715 * x * x)).tanh())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn ulps(a: f32, b: f64) -> f64 {
        (a as f64 - b).abs() / (b.abs() * f32::EPSILON as f64).max(f32::MIN_POSITIVE as f64)
    }

    fn libm_mismatches(step: usize) -> Vec<u32> {
        // Every `step`-th float: the non-positive ones the attention meets, then a band of
        // positive ones.
        let negative = (0x8000_0000u32..=0xffff_ffff).step_by(step);
        let positive = (0u32..0x42b2_0000).step_by(step);
        negative
            .chain(positive)
            .filter(|&b| {
                f32::from_bits(b).exp().to_bits() != expf(f32::from_bits(b)).to_bits() && !f32::from_bits(b).is_nan()
            })
            .collect()
    }

    #[test]
    fn exp_matches_libm() {
        let bad = libm_mismatches(1009);
        assert!(
            bad.is_empty(),
            "{} differ, e.g. {:?}",
            bad.len(),
            bad.iter().take(5).map(|&b| f32::from_bits(b)).collect::<Vec<_>>()
        );
        for x in [0.0f32, -0.0, f32::NEG_INFINITY, f32::INFINITY, -87.5, -103.9, -104.0, 88.7, 88.8] {
            assert_eq!(expf(x).to_bits(), x.exp().to_bits(), "exp({x})");
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512dq,avx512vl")]
    unsafe fn expf_avx512(xs: &mut [f32]) {
        expf_in_place::<{ crate::cpu::f16_ops::AVX512 }>(xs)
    }

    /// The AVX-512 form gives the scalar form's bits (which `exp_matches_libm` checks).
    #[test]
    fn vector_exp_equals_the_scalar_one() {
        #[cfg(target_arch = "x86_64")]
        if crate::cpu::f16_ops::detect() >= crate::cpu::f16_ops::AVX512 {
            let mut xs: Vec<f32> = (0x8000_0000u32..=0xffff_ffff)
                .step_by(997)
                .chain((0u32..0x4300_0000).step_by(997))
                .map(f32::from_bits)
                .filter(|x| !x.is_nan())
                .collect();
            xs.extend([f32::NEG_INFINITY, f32::INFINITY, 0.0, -0.0, -103.9, -104.0, 88.7, 88.8]);
            let mut fast = xs.clone();
            unsafe { expf_avx512(&mut fast) };
            for (&x, &y) in xs.iter().zip(&fast) {
                assert_eq!(y.to_bits(), expf(x).to_bits(), "exp({x})");
            }
        }
    }

    /// Every float of `exp_matches_libm`'s ranges (a few seconds in release).
    #[test]
    #[ignore]
    fn exp_matches_libm_everywhere() {
        let bad = libm_mismatches(1);
        assert!(
            bad.is_empty(),
            "{} differ, e.g. {:?}",
            bad.len(),
            bad.iter().take(5).map(|&b| f32::from_bits(b)).collect::<Vec<_>>()
        );
    }

    #[test]
    fn exp_is_within_a_few_ulp_of_the_true_value() {
        let mut r = rand_chacha::ChaCha8Rng::seed_from_u64(5);
        // An odd length, so the tail after the last full group of lanes is covered too.
        let mut xs: Vec<f32> = (0..10_007).map(|_| r.random_range(-87.0f32..88.0)).collect();
        xs.extend([0.0, -0.0, 1.0, -1.0, 1e-8, -1e-8, 88.0, -87.0]);
        let mut got = xs.clone();
        exp_in_place(&mut got);
        let mut plain = xs.clone();
        exp_in_place_plain(&mut plain);
        for ((&x, &y), &p) in xs.iter().zip(&got).zip(&plain) {
            let want = (x as f64).exp();
            assert!(ulps(y, want) <= 4.0, "exp({x}) = {y}, want {want}");
            assert_eq!(y.to_bits(), p.to_bits(), "the vector and plain builds agree on {x}");
        }
    }

    #[test]
    fn exp_of_very_negative_inputs_is_zero_and_large_inputs_stay_finite() {
        let mut xs = vec![f32::NEG_INFINITY, -1000.0, -88.0, 1000.0, f32::INFINITY];
        exp_in_place(&mut xs);
        assert_eq!(&xs[..3], &[0.0, 0.0, 0.0]);
        assert!(xs[3].is_finite() && xs[3] > 1e38 && xs[4].is_finite());
    }

    #[test]
    fn silu_mul_matches_the_definition() {
        let mut r = rand_chacha::ChaCha8Rng::seed_from_u64(6);
        let n = 1_003;
        let gate: Vec<f32> = (0..n).map(|_| r.random_range(-30.0f32..30.0)).collect();
        let up: Vec<f32> = (0..n).map(|_| r.random_range(-3.0f32..3.0)).collect();
        let mut out = vec![0f32; n];
        silu_mul(&gate, &up, &mut out);
        for i in 0..n {
            let (g, u) = (gate[i] as f64, up[i] as f64);
            let want = g / (1.0 + (-g).exp()) * u;
            assert!(
                (out[i] as f64 - want).abs() <= 1e-6 * (1.0 + want.abs()),
                "silu({g}) * {u} = {}, want {want}",
                out[i]
            );
        }
    }

    /// GeGLU against GELU's definition in f64: within f16's rounding of the gate and of the
    /// looked-up value, identity and zero past +-10.
    #[test]
    fn gelu_tanh_mul_matches_the_definition() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        let gate: Vec<f32> = (0..1001).map(|_| rng.random_range(-12.0f32..12.0)).collect();
        let up: Vec<f32> = (0..1001).map(|_| rng.random_range(-2.0f32..2.0)).collect();
        let mut out = vec![0f32; gate.len()];
        gelu_tanh_mul(&gate, &up, &mut out);
        for ((&x, &u), &got) in gate.iter().zip(&up).zip(&out) {
            let x64 = x as f64;
            let gelu =
                0.5 * x64 * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x64 + 0.044715 * x64.powi(3))).tanh());
            let want = gelu * u as f64;
            assert!((got as f64 - want).abs() <= 2e-3 * (1.0 + want.abs()), "gelu({x}) * {u}: {got} vs {want}");
        }
    }
}
