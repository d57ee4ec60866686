//! AVX-512 VNNI version of the Q4_1 dot product: two blocks per 512-bit register, the
//! u8 x i8 products summed by one `vpdpbusd`. Chosen at run time where the CPU has it; like
//! the AVX2 kernel, each row's arithmetic is the same however many rows run together.

#![cfg(target_arch = "x86_64")]

use std::arch::x86_64::*;

use super::quant::{ActBlock, BlockQ4_1};
use super::quant_avx2::f16_to_f32;

pub fn available() -> bool {
    is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw") && is_x86_feature_detected!("avx512vnni") && is_x86_feature_detected!("f16c")
}

/// The nibbles of two Q4 blocks as 64 bytes: block 0's low then high nibbles, then block 1's.
#[inline(always)]
unsafe fn nibbles2(a: &[u8; 16], b: &[u8; 16]) -> __m512i {
    unsafe {
        let mask = _mm_set1_epi8(0x0F);
        let (xa, xb) = (_mm_loadu_si128(a.as_ptr() as *const __m128i), _mm_loadu_si128(b.as_ptr() as *const __m128i));
        let first = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(xa, 4), mask), _mm_and_si128(xa, mask));
        let second = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(xb, 4), mask), _mm_and_si128(xb, mask));
        _mm512_inserti64x4(_mm512_castsi256_si512(first), second, 1)
    }
}

#[inline(always)]
unsafe fn load2(a: &ActBlock, b: &ActBlock) -> __m512i {
    unsafe {
        let first = _mm256_loadu_si256(a.qs.as_ptr() as *const __m256i);
        let second = _mm256_loadu_si256(b.qs.as_ptr() as *const __m256i);
        _mm512_inserti64x4(_mm512_castsi256_si512(first), second, 1)
    }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
pub unsafe fn dot_q4_1<const R: usize>(w: &[BlockQ4_1], a: [&[ActBlock]; R]) -> [f32; R] {
    let mut acc = [_mm512_setzero_ps(); R];
    let mut offsets = [0f32; R];
    let pairs = w.len() / 2;
    for p in 0..pairs {
        let (w0, w1) = (&w[2 * p], &w[2 * p + 1]);
        unsafe {
            let qx = nibbles2(&w0.qs, &w1.qs);
            let (d0, d1) = (f16_to_f32(w0.d), f16_to_f32(w1.d));
            let (m0, m1) = (f16_to_f32(w0.m), f16_to_f32(w1.m));
            for r in 0..R {
                let (a0, a1) = (&a[r][2 * p], &a[r][2 * p + 1]);
                offsets[r] += m0 * a0.s;
                offsets[r] += m1 * a1.s;
                let sums = _mm512_dpbusd_epi32(_mm512_setzero_si512(), qx, load2(a0, a1));
                let scale = _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(d0 * a0.d), _mm512_set1_ps(d1 * a1.d));
                acc[r] = _mm512_fmadd_ps(scale, _mm512_cvtepi32_ps(sums), acc[r]);
            }
        }
    }
    let mut out = [0f32; R];
    for r in 0..R {
        let mut total = _mm512_reduce_add_ps(acc[r]);
        if w.len() % 2 == 1 {
            // An odd last block: the plain arithmetic for that one block.
            let (wb, ab) = (&w[w.len() - 1], &a[r][w.len() - 1]);
            total += super::quant::dot_q4_1(std::slice::from_ref(wb), std::slice::from_ref(ab)) - unsafe { f16_to_f32(wb.m) } * ab.s;
            offsets[r] += unsafe { f16_to_f32(wb.m) } * ab.s;
        }
        out[r] = total + offsets[r];
    }
    out
}

#[cfg(test)]
mod tests {
    use super::super::quant::{self, quantize_row, QK};
    use super::*;
    use rand::{Rng, SeedableRng};

    #[test]
    fn vnni_dot_matches_the_plain_reference_and_ignores_grouping() {
        if !available() {
            eprintln!("no AVX-512 VNNI here: nothing to compare");
            return;
        }
        let mut r = rand_chacha::ChaCha8Rng::seed_from_u64(21);
        for blocks in [1usize, 2, 5, 18, 48] {
            let act = |r: &mut rand_chacha::ChaCha8Rng| {
                let x: Vec<f32> = (0..blocks * QK).map(|_| r.random_range(-4.0..4.0)).collect();
                let mut a = vec![ActBlock::default(); blocks];
                quantize_row(&x, &mut a);
                a
            };
            let (a, b) = (act(&mut r), act(&mut r));
            let bytes: Vec<u8> = (0..blocks)
                .flat_map(|_| {
                    let mut blk: Vec<u8> = (0..20).map(|_| r.random()).collect();
                    blk[0..2].copy_from_slice(&half::f16::from_f32(r.random_range(0.001..0.05)).to_le_bytes());
                    blk[2..4].copy_from_slice(&half::f16::from_f32(r.random_range(-0.2..0.0)).to_le_bytes());
                    blk
                })
                .collect();
            let w = quant::parse_q4_1(&bytes);
            let one = unsafe { dot_q4_1::<1>(&w, [&a]) }[0];
            let want = quant::dot_q4_1(&w, &a);
            assert!((one - want).abs() <= 1e-4 * (1.0 + want.abs()), "{blocks} blocks: {one} vs {want}");
            let four = unsafe { dot_q4_1::<4>(&w, [&b, &a, &b, &a]) };
            assert_eq!(four[1], one);
            assert_eq!(four[0], unsafe { dot_q4_1::<1>(&w, [&b]) }[0]);
        }
    }
}
