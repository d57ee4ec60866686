//! AVX2 versions of the dot products in `mod.rs` and `kquants.rs`: llama.cpp's x86 arithmetic
//! (8 lanes of 4-product integer sums, scaled per block with one FMA, Q4_1's offsets in a fused
//! chain; for K-quants the sub-block scales applied in integers first), giving the plain
//! functions' bits.

#![cfg(target_arch = "x86_64")]

use std::arch::x86_64::*;

use super::blocks::{ActBlock, ActBlockK, BlockQ4_0, BlockQ4_1, BlockQ4K, BlockQ5_0, BlockQ5K, BlockQ6K, BlockQ8_0};

/// Whether this CPU runs the functions here (and the other code compiled for AVX2, FMA and F16C).
pub fn available() -> bool {
    is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c")
}

#[inline(always)]
pub(super) unsafe fn f16_to_f32(bits: half::f16) -> f32 {
    unsafe { _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits.to_bits() as i32))) }
}

/// 16 bytes of nibbles -> 32 bytes: low nibbles (elements 0..16) then high nibbles (16..32).
#[inline(always)]
unsafe fn nibbles(qs: &[u8; 16]) -> __m256i {
    unsafe {
        let raw = _mm_loadu_si128(qs.as_ptr() as *const __m128i);
        let both = _mm256_set_m128i(_mm_srli_epi16(raw, 4), raw);
        _mm256_and_si256(both, _mm256_set1_epi8(0x0F))
    }
}

/// Bit `e` of `bits` -> byte `e`: 0xFF where set, 0 where not (llama.cpp's `bytes_from_bits_32`).
#[inline(always)]
unsafe fn bytes_from_bits(bits: u32) -> __m256i {
    unsafe {
        let shuffle = _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202, 0x0101010101010101, 0);
        let bytes = _mm256_shuffle_epi8(_mm256_set1_epi32(bits as i32), shuffle);
        let bytes = _mm256_or_si256(bytes, _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe));
        _mm256_cmpeq_epi8(bytes, _mm256_set1_epi64x(-1))
    }
}

/// Unsigned x signed bytes, summed in groups of four into 8 f32 lanes.
#[inline(always)]
unsafe fn sum_us8(x: __m256i, y: __m256i) -> __m256 {
    unsafe {
        let pairs = _mm256_maddubs_epi16(x, y);
        _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, _mm256_set1_epi16(1)))
    }
}

/// Signed x signed bytes, summed in groups of four into 8 f32 lanes.
#[inline(always)]
unsafe fn sum_i8(x: __m256i, y: __m256i) -> __m256 {
    unsafe { sum_us8(_mm256_sign_epi8(x, x), _mm256_sign_epi8(y, x)) }
}

#[inline(always)]
unsafe fn hsum(v: __m256) -> f32 {
    unsafe {
        let q = _mm_add_ps(_mm256_extractf128_ps(v, 1), _mm256_castps256_ps128(v));
        let d = _mm_add_ps(q, _mm_movehl_ps(q, q));
        _mm_cvtss_f32(_mm_add_ss(d, _mm_movehdup_ps(d)))
    }
}

#[inline(always)]
unsafe fn load(a: &ActBlock) -> __m256i {
    unsafe { _mm256_loadu_si256(a.qs.as_ptr() as *const __m256i) }
}

// Each kernel computes R activation rows against one weight row at once: the weight block is
// loaded and unpacked once for all R rows. Every row's arithmetic is the same sequence of
// operations whatever R is, so results do not depend on how rows are grouped (batch invariance).

/// # Safety
/// The CPU must support AVX2, FMA and F16C (as for every function here).
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn dot_q4_0<const R: usize>(w: &[BlockQ4_0], a: [&[ActBlock]; R]) -> [f32; R] {
    let mut acc = [_mm256_setzero_ps(); R];
    for (b, wb) in w.iter().enumerate() {
        unsafe {
            let dw = f16_to_f32(wb.d);
            let qx = _mm256_sub_epi8(nibbles(&wb.qs), _mm256_set1_epi8(8));
            for r in 0..R {
                let ab = &a[r][b];
                acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(dw * ab.d), sum_i8(qx, load(ab)), acc[r]);
            }
        }
    }
    acc.map(|v| unsafe { hsum(v) })
}

/// # Safety
/// As `dot_q4_0`.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn dot_q4_1<const R: usize>(w: &[BlockQ4_1], a: [&[ActBlock]; R]) -> [f32; R] {
    let mut acc = [_mm256_setzero_ps(); R];
    let mut offsets = [0f32; R];
    for (b, wb) in w.iter().enumerate() {
        unsafe {
            let (dw, mw) = (f16_to_f32(wb.d), f16_to_f32(wb.m));
            let qx = nibbles(&wb.qs);
            for r in 0..R {
                let ab = &a[r][b];
                offsets[r] = mw.mul_add(ab.s, offsets[r]);
                acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(dw * ab.d), sum_us8(qx, load(ab)), acc[r]);
            }
        }
    }
    let mut out = [0f32; R];
    for r in 0..R {
        out[r] = unsafe { hsum(acc[r]) } + offsets[r];
    }
    out
}

/// # Safety
/// As `dot_q4_0`.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn dot_q5_0<const R: usize>(w: &[BlockQ5_0], a: [&[ActBlock]; R]) -> [f32; R] {
    let mut acc = [_mm256_setzero_ps(); R];
    for (b, wb) in w.iter().enumerate() {
        unsafe {
            let dw = f16_to_f32(wb.d);
            // Nibbles, and 0xF0 where the fifth bit is clear: the signed byte `q - 16`.
            let high = _mm256_andnot_si256(bytes_from_bits(wb.qh), _mm256_set1_epi8(0xF0u8 as i8));
            let qx = _mm256_or_si256(nibbles(&wb.qs), high);
            for r in 0..R {
                let ab = &a[r][b];
                acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(dw * ab.d), sum_i8(qx, load(ab)), acc[r]);
            }
        }
    }
    acc.map(|v| unsafe { hsum(v) })
}

/// # Safety
/// As `dot_q4_0`.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn dot_q8_0<const R: usize>(w: &[BlockQ8_0], a: [&[ActBlock]; R]) -> [f32; R] {
    let mut acc = [_mm256_setzero_ps(); R];
    for (b, wb) in w.iter().enumerate() {
        unsafe {
            let dw = f16_to_f32(wb.d);
            let qx = _mm256_loadu_si256(wb.qs.as_ptr() as *const __m256i);
            for r in 0..R {
                let ab = &a[r][b];
                acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(dw * ab.d), sum_i8(qx, load(ab)), acc[r]);
            }
        }
    }
    acc.map(|v| unsafe { hsum(v) })
}

// K-quants. Per super-block and activation row, `sumi` holds 8 i32 lanes: each 32 values'
// products summed in pairs (`maddubs`) then in fours times their sub-block scale (`madd`).

/// 32 activation quants from `at`.
#[inline(always)]
unsafe fn load_k(a: &ActBlockK, at: usize) -> __m256i {
    unsafe { _mm256_loadu_si256(a.qs.as_ptr().add(at) as *const __m256i) }
}

/// Pairs of the 16 sums of 16 quants (`bsums[2s] + bsums[2s + 1]`, sub-block `s`'s sum).
#[inline(always)]
unsafe fn sub_block_sums(a: &ActBlockK) -> __m128i {
    unsafe {
        let lo = _mm_loadu_si128(a.bsums.as_ptr() as *const __m128i);
        let hi = _mm_loadu_si128(a.bsums.as_ptr().add(8) as *const __m128i);
        _mm_hadd_epi16(lo, hi)
    }
}

/// 8 unsigned bytes as 8 i16.
#[inline(always)]
unsafe fn widen8(x: &[u8; 8]) -> __m128i {
    unsafe { _mm_cvtepu8_epi16(_mm_loadl_epi64(x.as_ptr() as *const __m128i)) }
}

/// The 4-bit values of runs `2j` and `2j + 1` of a Q4_K or Q5_K super-block.
#[inline(always)]
unsafe fn k_nibbles(qs: &[u8; 128], j: usize) -> [__m256i; 2] {
    unsafe {
        let bits = _mm256_loadu_si256(qs.as_ptr().add(32 * j) as *const __m256i);
        let m4 = _mm256_set1_epi8(0x0F);
        [_mm256_and_si256(bits, m4), _mm256_and_si256(_mm256_srli_epi16(bits, 4), m4)]
    }
}

/// `sumi += scale * (x . a)` in llama.cpp's lanes, `x` unsigned.
#[inline(always)]
unsafe fn scaled_sum(sumi: __m256i, scale: __m256i, x: __m256i, a: __m256i) -> __m256i {
    unsafe { _mm256_add_epi32(sumi, _mm256_madd_epi16(scale, _mm256_maddubs_epi16(x, a))) }
}

/// Lanes of the minimums' products: `(mins[2l] * s[2l] + mins[2l + 1] * s[2l + 1])`.
#[inline(always)]
unsafe fn min_products(mins: __m128i, a: &ActBlockK) -> __m128i {
    unsafe { _mm_madd_epi16(mins, sub_block_sums(a)) }
}

/// # Safety
/// As `dot_q4_0`.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn dot_q4_k<const R: usize>(w: &[BlockQ4K], a: [&[ActBlockK]; R]) -> [f32; R] {
    let mut acc = [_mm256_setzero_ps(); R];
    let mut acc_m = [_mm_setzero_ps(); R];
    for (b, wb) in w.iter().enumerate() {
        unsafe {
            let (dw, mw) = (f16_to_f32(wb.d), f16_to_f32(wb.dmin));
            let mins = widen8(&wb.mins);
            let mut sumi = [_mm256_setzero_si256(); R];
            for j in 0..4 {
                let [lo, hi] = k_nibbles(&wb.qs, j);
                let (s_lo, s_hi) =
                    (_mm256_set1_epi16(wb.scales[2 * j] as i16), _mm256_set1_epi16(wb.scales[2 * j + 1] as i16));
                for r in 0..R {
                    let ab = &a[r][b];
                    sumi[r] = scaled_sum(sumi[r], s_lo, lo, load_k(ab, 64 * j));
                    sumi[r] = scaled_sum(sumi[r], s_hi, hi, load_k(ab, 64 * j + 32));
                }
            }
            for r in 0..R {
                let ab = &a[r][b];
                let prod = _mm_cvtepi32_ps(min_products(mins, ab));
                acc_m[r] = _mm_fmadd_ps(_mm_set1_ps(-ab.d * mw), prod, acc_m[r]);
                acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(ab.d * dw), _mm256_cvtepi32_ps(sumi[r]), acc[r]);
            }
        }
    }
    let mut out = [0f32; R];
    for r in 0..R {
        unsafe {
            let m = _mm_add_ps(acc_m[r], _mm_movehl_ps(acc_m[r], acc_m[r]));
            let m = _mm_add_ss(m, _mm_movehdup_ps(m));
            out[r] = hsum(acc[r]) + _mm_cvtss_f32(m);
        }
    }
    out
}

/// # Safety
/// As `dot_q4_0`.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn dot_q5_k<const R: usize>(w: &[BlockQ5K], a: [&[ActBlockK]; R]) -> [f32; R] {
    let mut acc = [_mm256_setzero_ps(); R];
    let mut summs = [0f32; R];
    for (b, wb) in w.iter().enumerate() {
        unsafe {
            let (dw, mw) = (f16_to_f32(wb.d), f16_to_f32(wb.dmin));
            let mins = widen8(&wb.mins);
            let hbits = _mm256_loadu_si256(wb.qh.as_ptr() as *const __m256i);
            let one = _mm256_set1_epi8(1);
            // Run `s`'s fifth bits, as 16.
            let high =
                |s: i32| _mm256_slli_epi16(_mm256_and_si256(_mm256_srl_epi16(hbits, _mm_cvtsi32_si128(s)), one), 4);
            let mut sumi = [_mm256_setzero_si256(); R];
            for j in 0..4 {
                let [lo, hi] = k_nibbles(&wb.qs, j);
                let (lo, hi) = (_mm256_add_epi8(lo, high(2 * j as i32)), _mm256_add_epi8(hi, high(2 * j as i32 + 1)));
                let (s_lo, s_hi) =
                    (_mm256_set1_epi16(wb.scales[2 * j] as i16), _mm256_set1_epi16(wb.scales[2 * j + 1] as i16));
                for r in 0..R {
                    let ab = &a[r][b];
                    sumi[r] = scaled_sum(sumi[r], s_lo, lo, load_k(ab, 64 * j));
                    sumi[r] = scaled_sum(sumi[r], s_hi, hi, load_k(ab, 64 * j + 32));
                }
            }
            for r in 0..R {
                let ab = &a[r][b];
                let p = min_products(mins, ab);
                let p = _mm_hadd_epi32(_mm_hadd_epi32(p, _mm_setzero_si128()), _mm_setzero_si128());
                summs[r] = (-ab.d * mw).mul_add(_mm_cvtsi128_si32(p) as f32, summs[r]);
                acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(ab.d * dw), _mm256_cvtepi32_ps(sumi[r]), acc[r]);
            }
        }
    }
    let mut out = [0f32; R];
    for r in 0..R {
        out[r] = unsafe { hsum(acc[r]) } + summs[r];
    }
    out
}

/// # Safety
/// As `dot_q4_0`.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn dot_q6_k<const R: usize>(w: &[BlockQ6K], a: [&[ActBlockK]; R]) -> [f32; R] {
    let mut acc = [_mm256_setzero_ps(); R];
    for (b, wb) in w.iter().enumerate() {
        unsafe {
            let dw = f16_to_f32(wb.d);
            let (m4, m3, m32) = (_mm256_set1_epi8(0x0F), _mm256_set1_epi8(3), _mm256_set1_epi8(32));
            let mut sumi = [_mm256_setzero_si256(); R];
            for j in 0..2 {
                let bits1 = _mm256_loadu_si256(wb.ql.as_ptr().add(64 * j) as *const __m256i);
                let bits2 = _mm256_loadu_si256(wb.ql.as_ptr().add(64 * j + 32) as *const __m256i);
                let hbits = _mm256_loadu_si256(wb.qh.as_ptr().add(32 * j) as *const __m256i);
                let high = |shift: i32| {
                    _mm256_slli_epi16(_mm256_and_si256(_mm256_srl_epi16(hbits, _mm_cvtsi32_si128(shift)), m3), 4)
                };
                // Runs 4j .. 4j + 4, stored values 0..64.
                let q = [
                    _mm256_or_si256(_mm256_and_si256(bits1, m4), high(0)),
                    _mm256_or_si256(_mm256_and_si256(bits2, m4), high(2)),
                    _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(bits1, 4), m4), high(4)),
                    _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(bits2, 4), m4), high(6)),
                ];
                for (k, &qk) in q.iter().enumerate() {
                    let run = 4 * j + k;
                    // Lanes 0..4 hold the run's first 16 values, 4..8 its last 16.
                    let scale = _mm256_set_m128i(
                        _mm_set1_epi16(wb.scales[2 * run + 1] as i16),
                        _mm_set1_epi16(wb.scales[2 * run] as i16),
                    );
                    for r in 0..R {
                        let qa = load_k(&a[r][b], 32 * run);
                        let p = _mm256_sub_epi16(_mm256_maddubs_epi16(qk, qa), _mm256_maddubs_epi16(m32, qa));
                        sumi[r] = _mm256_add_epi32(sumi[r], _mm256_madd_epi16(scale, p));
                    }
                }
            }
            for r in 0..R {
                let d = a[r][b].d * dw;
                acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sumi[r]), acc[r]);
            }
        }
    }
    acc.map(|v| unsafe { hsum(v) })
}

/// `kquants::quantize_row_k` with AVX2: the same arithmetic (the maximum magnitude does not
/// depend on the order, `max` is the first value reaching it, rounding to nearest even equals
/// llama.cpp's `nearest_int` for these magnitudes).
///
/// # Safety
/// As `dot_q4_0`.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn quantize_row_k(x: &[f32], out: &mut [ActBlockK]) {
    for (block, xs) in out.iter_mut().zip(x.chunks_exact(256)) {
        unsafe {
            let v: [__m256; 32] = std::array::from_fn(|i| _mm256_loadu_ps(xs.as_ptr().add(8 * i)));
            let sign = _mm256_set1_ps(-0.0);
            // `max(|x|, m)` keeps `m` where `x` is NaN, as the plain loop ignores NaN.
            let m8 = v.iter().fold(_mm256_setzero_ps(), |m, &r| _mm256_max_ps(_mm256_andnot_ps(sign, r), m));
            let m4 = _mm_max_ps(_mm256_extractf128_ps(m8, 1), _mm256_castps256_ps128(m8));
            let m2 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
            let amax = _mm_cvtss_f32(_mm_max_ss(m2, _mm_movehdup_ps(m2)));
            if amax == 0.0 {
                *block = ActBlockK::default();
                continue;
            }
            let target = _mm256_set1_ps(amax);
            let first = (0..32)
                .find_map(|i| {
                    let hits = _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_EQ_OQ>(_mm256_andnot_ps(sign, v[i]), target));
                    (hits != 0).then(|| 8 * i + hits.trailing_zeros() as usize)
                })
                .unwrap_or(0);
            let iscale = -127.0 / xs[first];
            let scale = _mm256_set1_ps(iscale);
            let q: [__m256i; 32] = std::array::from_fn(|i| {
                let scaled = _mm256_mul_ps(v[i], scale);
                let rounded = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(scaled);
                // `nearest_int` of a (default) NaN is 0; the conversion would give i32::MIN.
                let nan = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_UNORD_Q>(scaled, scaled));
                _mm256_andnot_si256(nan, _mm256_min_epi32(_mm256_cvtps_epi32(rounded), _mm256_set1_epi32(127)))
            });
            for (s, pair) in block.bsums.iter_mut().zip(q.chunks_exact(2)) {
                let t = _mm256_add_epi32(pair[0], pair[1]);
                let t4 = _mm_add_epi32(_mm256_extracti128_si256(t, 1), _mm256_castsi256_si128(t));
                let t2 = _mm_add_epi32(t4, _mm_unpackhi_epi64(t4, t4));
                *s = _mm_cvtsi128_si32(_mm_add_epi32(t2, _mm_shuffle_epi32::<1>(t2))) as i16;
            }
            for (i, four) in q.chunks_exact(4).enumerate() {
                // Packing works within 128-bit lanes; the permute puts the 32 bytes in order.
                let packed =
                    _mm256_packs_epi16(_mm256_packs_epi32(four[0], four[1]), _mm256_packs_epi32(four[2], four[3]));
                let ordered = _mm256_permutevar8x32_epi32(packed, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
                _mm256_storeu_si256(block.qs.as_mut_ptr().add(32 * i) as *mut __m256i, ordered);
            }
            block.d = 1.0 / iscale;
        }
    }
}

/// `quant::quantize_row` with AVX2: the same arithmetic (the products, the rounding to nearest
/// even and the maximum do not depend on the order), 32 values in four registers.
///
/// # Safety
/// As `dot_q4_0`.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn quantize_row(x: &[f32], out: &mut [ActBlock]) {
    for (block, xs) in out.iter_mut().zip(x.chunks_exact(32)) {
        unsafe {
            let v: [__m256; 4] = std::array::from_fn(|i| _mm256_loadu_ps(xs.as_ptr().add(8 * i)));
            let sign = _mm256_set1_ps(-0.0);
            let abs = v.map(|r| _mm256_andnot_ps(sign, r));
            let m8 = _mm256_max_ps(_mm256_max_ps(abs[0], abs[1]), _mm256_max_ps(abs[2], abs[3]));
            let m4 = _mm_max_ps(_mm256_extractf128_ps(m8, 1), _mm256_castps256_ps128(m8));
            let m2 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
            let amax = _mm_cvtss_f32(_mm_max_ss(m2, _mm_movehdup_ps(m2)));
            let d = amax / 127.0;
            let id = _mm256_set1_ps(if amax != 0.0 { 127.0 / amax } else { 0.0 });
            let q = v.map(|r| {
                _mm256_cvtps_epi32(_mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_ps(
                    r, id,
                )))
            });
            let total = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
            let t4 = _mm_add_epi32(_mm256_extracti128_si256(total, 1), _mm256_castsi256_si128(total));
            let t2 = _mm_add_epi32(t4, _mm_unpackhi_epi64(t4, t4));
            let sum = _mm_cvtsi128_si32(_mm_add_epi32(t2, _mm_shuffle_epi32::<1>(t2)));
            // Packing works within 128-bit lanes; the permute puts the 32 bytes back in order.
            let packed = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
            let ordered = _mm256_permutevar8x32_epi32(packed, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
            _mm256_storeu_si256(block.qs.as_mut_ptr() as *mut __m256i, ordered);
            block.d = half::f16::from_f32(d).to_f32();
            block.s = half::f16::from_f32(d * sum as f32).to_f32();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::{self as quant, blocks::QK, quantize_row};
    use super::*;
    use rand::{Rng, SeedableRng};

    /// Quantizing with AVX2 gives exactly the plain quantization, zero blocks included.
    #[test]
    fn avx2_quantization_equals_the_plain_one() {
        if !available() {
            eprintln!("no AVX2 here: nothing to compare");
            return;
        }
        let mut r = rand_chacha::ChaCha8Rng::seed_from_u64(12);
        for blocks in [1usize, 3, 18] {
            let mut x: Vec<f32> = (0..blocks * QK).map(|_| r.random_range(-7.0..7.0)).collect();
            // A block of zeros, and values on rounding ties.
            x[..QK].fill(0.0);
            if blocks > 1 {
                for (i, v) in x[QK..2 * QK].iter_mut().enumerate() {
                    *v = (i as f32 - 15.5) / 2.0;
                }
            }
            let (mut fast, mut plain) = (vec![ActBlock::default(); blocks], vec![ActBlock::default(); blocks]);
            unsafe { super::quantize_row(&x, &mut fast) };
            quant::quantize_row_plain(&x, &mut plain);
            for (a, b) in fast.iter().zip(&plain) {
                assert_eq!((a.qs, a.d.to_bits(), a.s.to_bits()), (b.qs, b.d.to_bits(), b.s.to_bits()));
            }
        }
    }

    /// Q8_K quantization with AVX2 gives exactly the plain one: zero super-blocks, ties for the
    /// largest magnitude, values on rounding ties, NaN ignored as llama.cpp's loop ignores it.
    #[test]
    fn avx2_k_quantization_equals_the_plain_one() {
        use super::super::kquants;
        if !available() {
            eprintln!("no AVX2 here: nothing to compare");
            return;
        }
        let mut r = rand_chacha::ChaCha8Rng::seed_from_u64(14);
        let mut x: Vec<f32> = (0..5 * 256).map(|_| r.random_range(-7.0..7.0)).collect();
        x[256..512].fill(0.0);
        x[512 + 100] = -12.7;
        x[512 + 40] = 12.7;
        for (i, v) in x[768..1024].iter_mut().enumerate() {
            *v = (i as f32 - 127.5) / 2.0;
        }
        x[1024 + 3] = f32::NAN;
        let (mut fast, mut plain) = (vec![ActBlockK::default(); 5], vec![ActBlockK::default(); 5]);
        unsafe { super::quantize_row_k(&x, &mut fast) };
        kquants::quantize_row_k_plain(&x, &mut plain);
        for (a, b) in fast.iter().zip(&plain) {
            assert_eq!((a.qs, a.bsums, a.d.to_bits()), (b.qs, b.bsums, b.d.to_bits()));
        }
        assert_eq!(fast[2].qs[40], -127, "the first value of largest magnitude sets the sign");
    }

    /// The AVX2 kernels give the plain ones' bits on random blocks, odd block counts included.
    #[test]
    fn avx2_dots_match_the_plain_reference() {
        if !available() {
            eprintln!("no AVX2 here: nothing to compare");
            return;
        }
        let mut r = rand_chacha::ChaCha8Rng::seed_from_u64(11);
        for blocks in [1usize, 3, 7, 18] {
            let x: Vec<f32> = (0..blocks * QK).map(|_| r.random_range(-5.0..5.0)).collect();
            let mut a = vec![ActBlock::default(); blocks];
            quantize_row(&x, &mut a);
            // A second activation row, so grouped rows can be checked against single ones.
            let x2: Vec<f32> = (0..blocks * QK).map(|_| r.random_range(-1.0..1.0)).collect();
            let mut a2 = vec![ActBlock::default(); blocks];
            quantize_row(&x2, &mut a2);
            let mut bytes = |size: usize| -> Vec<u8> {
                (0..blocks)
                    .flat_map(|_| {
                        let mut b: Vec<u8> = (0..size).map(|_| r.random()).collect();
                        b[0..2].copy_from_slice(&half::f16::from_f32(r.random_range(-0.1..0.1)).to_le_bytes());
                        b[2..4].copy_from_slice(&half::f16::from_f32(r.random_range(-0.1..0.1)).to_le_bytes());
                        b
                    })
                    .collect()
            };
            let same = |x: f32, y: f32| x.to_bits() == y.to_bits();
            let w = quant::parse_q4_0(&bytes(18));
            let one = unsafe { dot_q4_0::<1>(&w, [&a]) }[0];
            assert!(same(one, quant::dot_q4_0(&w, &a)));
            assert_eq!(
                unsafe { dot_q4_0::<3>(&w, [&a2, &a, &a2]) },
                [unsafe { dot_q4_0::<1>(&w, [&a2]) }[0], one, unsafe { dot_q4_0::<1>(&w, [&a2]) }[0]]
            );
            let w = quant::parse_q4_1(&bytes(20));
            let one = unsafe { dot_q4_1::<1>(&w, [&a]) }[0];
            assert!(same(one, quant::dot_q4_1(&w, &a)));
            assert_eq!(unsafe { dot_q4_1::<4>(&w, [&a2, &a, &a2, &a]) }[1], one, "grouping rows changes nothing");
            let w = quant::parse_q8_0(&bytes(34));
            let one = unsafe { dot_q8_0::<1>(&w, [&a]) }[0];
            assert!(same(one, quant::dot_q8_0(&w, &a)));
            assert_eq!(unsafe { dot_q8_0::<2>(&w, [&a, &a2]) }[0], one);
            let w = quant::parse_q5_0(&bytes(22));
            let one = unsafe { dot_q5_0::<1>(&w, [&a]) }[0];
            assert!(same(one, quant::dot_q5_0(&w, &a)));
            assert_eq!(unsafe { dot_q5_0::<3>(&w, [&a2, &a2, &a]) }[2], one);
        }
    }

    /// The same for the K-quants, random super-blocks against Q8_K activations.
    #[test]
    fn avx2_k_dots_match_the_plain_reference() {
        use super::super::kquants::{self, tests::random_blocks};
        use candle_core::quantized::GgmlDType;
        if !available() {
            eprintln!("no AVX2 here: nothing to compare");
            return;
        }
        let mut r = rand_chacha::ChaCha8Rng::seed_from_u64(13);
        for blocks in [1usize, 3, 8] {
            let acts: Vec<Vec<ActBlockK>> = (0..3)
                .map(|_| {
                    let x: Vec<f32> = (0..blocks * 256).map(|_| r.random_range(-5.0..5.0)).collect();
                    let mut a = vec![ActBlockK::default(); blocks];
                    kquants::quantize_row_k(&x, &mut a);
                    a
                })
                .collect();
            let [a, a2, a3] = [&acts[0][..], &acts[1][..], &acts[2][..]];
            let same = |x: f32, y: f32| x.to_bits() == y.to_bits();
            let w = kquants::parse_q4_k(&random_blocks(&mut r, GgmlDType::Q4K, blocks));
            let one = unsafe { dot_q4_k::<1>(&w, [a]) }[0];
            assert!(same(one, kquants::dot_q4_k(&w, a)), "Q4_K {blocks}");
            let four = unsafe { dot_q4_k::<4>(&w, [a2, a, a3, a2]) };
            assert!(same(four[1], one) && same(four[2], kquants::dot_q4_k(&w, a3)));
            let w = kquants::parse_q5_k(&random_blocks(&mut r, GgmlDType::Q5K, blocks));
            let one = unsafe { dot_q5_k::<1>(&w, [a]) }[0];
            assert!(same(one, kquants::dot_q5_k(&w, a)), "Q5_K {blocks}");
            let four = unsafe { dot_q5_k::<4>(&w, [a2, a, a3, a2]) };
            assert!(same(four[1], one) && same(four[2], kquants::dot_q5_k(&w, a3)));
            let w = kquants::parse_q6_k(&random_blocks(&mut r, GgmlDType::Q6K, blocks));
            let one = unsafe { dot_q6_k::<1>(&w, [a]) }[0];
            assert!(same(one, kquants::dot_q6_k(&w, a)), "Q6_K {blocks}");
            let four = unsafe { dot_q6_k::<4>(&w, [a2, a, a3, a2]) };
            assert!(same(four[1], one) && same(four[2], kquants::dot_q6_k(&w, a3)));
        }
    }
}
