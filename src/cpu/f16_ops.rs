//! The f16 vector operations of llama.cpp's CPU flash attention, with its roundings to the bit:
//! a key-query dot product summed in the order of ggml's AVX-512 `ggml_vec_dot_f16`, and the
//! running weighted sum of values kept in f16 (`ggml_vec_scale_f16`, `ggml_vec_mad_f16`).
//!
//! Each operation has a plain form (the definition) and AVX2 / AVX-512 forms that give the same
//! bits. The level is a const parameter; a caller passing `AVX2` or `AVX512` must itself be
//! compiled with those features (these functions are inlined into it).

use half::f16;

/// Scalar code only.
pub const PLAIN: u8 = 0;
/// AVX2, FMA and F16C: 8 lanes.
pub const AVX2: u8 = 1;
/// AVX-512 (F, DQ, VL) with F16C: 16 lanes.
pub const AVX512: u8 = 2;

/// The best level this CPU runs.
pub fn detect() -> u8 {
    #[cfg(target_arch = "x86_64")]
    {
        if super::quant::avx2::available() {
            let avx512 = is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512dq")
                && is_x86_feature_detected!("avx512vl");
            return if avx512 { AVX512 } else { AVX2 };
        }
    }
    PLAIN
}

/// `x` rounded to the nearest f16 (ties to even), as f32.
#[inline(always)]
pub fn round(x: f32) -> f32 {
    f16::from_f32(x).to_f32()
}

/// The dot product of a key (f16) and a query (f16 values held as f32) summed as ggml's
/// AVX-512 `ggml_vec_dot_f16` sums it: four accumulators of 16 lanes over each 64 elements
/// (element `e` of a 64-run goes to accumulator `e / 16`, lane `e % 16`) with fused
/// multiply-adds, the accumulators added as (0 + 2) + (1 + 3), the 16 lanes reduced as GCC's
/// `_mm512_reduce_add_ps` does (halves, then quarters, then (0 + 2) + (1 + 3)), and any
/// elements past the last full 64 added in f64.
#[inline(always)]
pub fn dot<const S: u8>(k: &[f16], q: &[f32]) -> f32 {
    assert_eq!(k.len(), q.len());
    let full = k.len() / 64 * 64;
    let head = match S {
        // SAFETY: callers passing these levels are compiled with their features; `full` is
        // within both slices.
        #[cfg(target_arch = "x86_64")]
        AVX512 => unsafe { x86::dot_avx512(k.as_ptr(), q.as_ptr(), full) },
        #[cfg(target_arch = "x86_64")]
        AVX2 => unsafe { x86::dot_avx2(k.as_ptr(), q.as_ptr(), full) },
        _ => dot_plain(|e| k[e].to_f32(), q, full),
    };
    with_tail(head, k[full..].iter().zip(&q[full..]).map(|(a, &b)| a.to_f32() * b))
}

/// `dot`'s sum over the whole 64-element runs of its first `full` elements, key element `e`
/// being `k(e)`: the definition the vector forms meet.
#[inline(always)]
fn dot_plain(k: impl Fn(usize) -> f32, q: &[f32], full: usize) -> f32 {
    let mut acc = [[0f32; 16]; 4];
    for c in (0..full).step_by(64) {
        for (j, accumulator) in acc.iter_mut().enumerate() {
            for (l, a) in accumulator.iter_mut().enumerate() {
                let e = c + 16 * j + l;
                *a = k(e).mul_add(q[e], *a);
            }
        }
    }
    let lanes: [f32; 16] = std::array::from_fn(|l| (acc[0][l] + acc[2][l]) + (acc[1][l] + acc[3][l]));
    let t8: [f32; 8] = std::array::from_fn(|i| lanes[i + 8] + lanes[i]);
    let t4: [f32; 4] = std::array::from_fn(|i| t8[i + 4] + t8[i]);
    (t4[0] + t4[2]) + (t4[1] + t4[3])
}

/// `dot`'s last step: the runs' sum plus the products past them, added in f64.
#[inline(always)]
fn with_tail(head: f32, products: impl Iterator<Item = f32>) -> f32 {
    products.fold(head as f64, |total, p| total + p as f64) as f32
}

/// Keys scored together by `dot_keys`.
pub const KEYS: usize = 16;

/// Up to KEYS key rows (f16, at offsets `slots` in `cache`) as f32, transposed into `out`:
/// `[head_dim][KEYS]`, missing keys zero. `row` is scratch for one converted row.
pub fn transpose_keys(cache: &[f16], slots: &[usize], head_dim: usize, row: &mut Vec<f32>, out: &mut Vec<f32>) {
    use half::slice::HalfFloatSliceExt;
    out.clear();
    out.resize(head_dim * KEYS, 0.0);
    row.clear();
    row.resize(head_dim, 0.0);
    for (l, &slot) in slots.iter().enumerate() {
        cache[slot..slot + head_dim].convert_to_f32_slice(row);
        for (d, &x) in row.iter().enumerate() {
            out[d * KEYS + l] = x;
        }
    }
}

/// `dot` of one query with each of KEYS transposed keys (`transpose_keys`), the keys in the
/// lanes of one register: the same sums in the same order, 16 at a time.
#[inline(always)]
pub fn dot_keys<const S: u8>(keys_t: &[f32], q: &[f32]) -> [f32; KEYS] {
    let head_dim = q.len();
    assert_eq!(keys_t.len(), head_dim * KEYS);
    let full = head_dim / 64 * 64;
    let mut out = match S {
        // SAFETY: as in `dot`; the lengths were checked.
        #[cfg(target_arch = "x86_64")]
        AVX512 => unsafe { x86::dot_keys_avx512(keys_t.as_ptr(), q.as_ptr(), full) },
        _ => std::array::from_fn(|l| dot_plain(|e| keys_t[e * KEYS + l], q, full)),
    };
    if full < head_dim {
        for (l, o) in out.iter_mut().enumerate() {
            *o = with_tail(*o, (full..head_dim).map(|d| keys_t[d * KEYS + l] * q[d]));
        }
    }
    out
}

/// `acc = f16(acc * m)` elementwise (`ggml_vec_scale_f16`; `acc` holds f16 values).
#[inline(always)]
pub fn scale<const S: u8>(acc: &mut [f32], m: f32) {
    let done = match S {
        // SAFETY: as in `dot`.
        #[cfg(target_arch = "x86_64")]
        AVX512 => unsafe { x86::scale_avx512(acc, m) },
        #[cfg(target_arch = "x86_64")]
        AVX2 => unsafe { x86::scale_avx2(acc, m) },
        _ => 0,
    };
    for a in &mut acc[done..] {
        *a = round(*a * m);
    }
}

/// `acc = f16(v * w + acc)` elementwise, one rounding for the multiply-add
/// (`ggml_vec_mad_f16`; `acc` holds f16 values).
#[inline(always)]
pub fn mad<const S: u8>(acc: &mut [f32], v: &[f16], w: f32) {
    assert_eq!(acc.len(), v.len());
    let done = match S {
        // SAFETY: as in `dot`.
        #[cfg(target_arch = "x86_64")]
        AVX512 => unsafe { x86::mad_avx512(acc, v, w) },
        #[cfg(target_arch = "x86_64")]
        AVX2 => unsafe { x86::mad_avx2(acc, v, w) },
        _ => 0,
    };
    for (a, x) in acc[done..].iter_mut().zip(&v[done..]) {
        *a = round(x.to_f32().mul_add(w, *a));
    }
}

/// One key of a row's online softmax (llama.cpp's order): the factor `ms` the running sum is
/// scaled by first (1.0: none), and the key's weight `vs`.
#[derive(Clone, Copy, Debug, Default)]
pub struct Step {
    pub ms: f32,
    pub vs: f32,
}

/// The running weighted sums of several rows whose steps visit the values at `keys` (offsets
/// into `values`) in order, each row as far as its steps go (the query heads of one token; the
/// tokens of a tile without a window): per row, per step, `acc = f16(acc * ms)` when `ms` is
/// not 1, then `acc = f16(v * vs + acc)`; `out` gets the rows' sums side by side (not yet
/// divided by their total weights).
#[inline(always)]
pub fn weighted_sums<const S: u8>(
    rows: &[Vec<Step>],
    keys: &[usize],
    values: &[f16],
    head_dim: usize,
    out: &mut [f32],
) {
    assert_eq!(out.len(), rows.len() * head_dim);
    assert!(rows.iter().all(|r| r.len() <= keys.len()) && keys.iter().all(|&k| k + head_dim <= values.len()));
    out.fill(0.0);
    let done = match S {
        // SAFETY: as in `dot`; the offsets were just checked.
        #[cfg(target_arch = "x86_64")]
        AVX512 => unsafe { x86::weighted_sums_avx512(rows, keys, values, head_dim, out) },
        _ => 0,
    };
    for (steps, acc) in rows.iter().zip(out.chunks_exact_mut(head_dim)) {
        let acc = &mut acc[done..];
        for (step, &key) in steps.iter().zip(keys) {
            if step.ms != 1.0 {
                scale::<S>(acc, step.ms);
            }
            mad::<S>(acc, &values[key + done..key + head_dim], step.vs);
        }
    }
}

/// The vector forms. Each returns (or works on) a prefix of whole vectors and leaves the rest
/// to the plain loop, which performs the same per-element operations.
#[cfg(target_arch = "x86_64")]
mod x86 {
    use half::f16;
    use std::arch::x86_64::*;

    const RNE: i32 = _MM_FROUND_TO_NEAREST_INT;

    /// The reduction of `dot` from the 16 lanes (0..8 in `lo`, 8..16 in `hi`).
    #[inline(always)]
    unsafe fn reduce16(lo: __m256, hi: __m256) -> f32 {
        unsafe {
            let t8 = _mm256_add_ps(hi, lo);
            let t4 = _mm_add_ps(_mm256_extractf128_ps(t8, 1), _mm256_castps256_ps128(t8));
            let t2 = _mm_add_ps(t4, _mm_movehl_ps(t4, t4));
            _mm_cvtss_f32(_mm_add_ss(t2, _mm_movehdup_ps(t2)))
        }
    }

    /// # Safety
    /// AVX2, FMA and F16C; `k` and `q` hold at least `full` (a multiple of 64) elements.
    #[inline(always)]
    pub unsafe fn dot_avx2(k: *const f16, q: *const f32, full: usize) -> f32 {
        unsafe {
            // acc[2j + h] holds lanes 8h..8h + 8 of accumulator j.
            let mut acc = [_mm256_setzero_ps(); 8];
            for c in (0..full).step_by(64) {
                for (i, a) in acc.iter_mut().enumerate() {
                    let kv = _mm256_cvtph_ps(_mm_loadu_si128(k.add(c + 8 * i) as *const __m128i));
                    *a = _mm256_fmadd_ps(kv, _mm256_loadu_ps(q.add(c + 8 * i)), *a);
                }
            }
            let lo = _mm256_add_ps(_mm256_add_ps(acc[0], acc[4]), _mm256_add_ps(acc[2], acc[6]));
            let hi = _mm256_add_ps(_mm256_add_ps(acc[1], acc[5]), _mm256_add_ps(acc[3], acc[7]));
            reduce16(lo, hi)
        }
    }

    /// # Safety
    /// AVX-512 F and DQ; otherwise as `dot_avx2`.
    #[inline(always)]
    pub unsafe fn dot_avx512(k: *const f16, q: *const f32, full: usize) -> f32 {
        unsafe {
            let mut acc = [_mm512_setzero_ps(); 4];
            for c in (0..full).step_by(64) {
                for (j, a) in acc.iter_mut().enumerate() {
                    let kv = _mm512_cvtph_ps(_mm256_loadu_si256(k.add(c + 16 * j) as *const __m256i));
                    *a = _mm512_fmadd_ps(kv, _mm512_loadu_ps(q.add(c + 16 * j)), *a);
                }
            }
            let lanes = _mm512_add_ps(_mm512_add_ps(acc[0], acc[2]), _mm512_add_ps(acc[1], acc[3]));
            reduce16(_mm512_castps512_ps256(lanes), _mm512_extractf32x8_ps(lanes, 1))
        }
    }

    /// # Safety
    /// AVX-512 F; `kt` holds `full` rows of KEYS floats, `q` at least `full` floats.
    #[inline(always)]
    pub unsafe fn dot_keys_avx512(kt: *const f32, q: *const f32, full: usize) -> [f32; super::KEYS] {
        unsafe {
            // c[l] is lane l of `dot`'s (acc0 + acc2) + (acc1 + acc3), for all 16 keys at once.
            let mut c = [_mm512_setzero_ps(); 16];
            for (l, cl) in c.iter_mut().enumerate() {
                let mut a = [_mm512_setzero_ps(); 4];
                for step in (0..full).step_by(64) {
                    for (j, aj) in a.iter_mut().enumerate() {
                        let e = step + 16 * j + l;
                        *aj = _mm512_fmadd_ps(_mm512_loadu_ps(kt.add(e * super::KEYS)), _mm512_set1_ps(*q.add(e)), *aj);
                    }
                }
                *cl = _mm512_add_ps(_mm512_add_ps(a[0], a[2]), _mm512_add_ps(a[1], a[3]));
            }
            let t8: [__m512; 8] = std::array::from_fn(|i| _mm512_add_ps(c[i + 8], c[i]));
            let t4: [__m512; 4] = std::array::from_fn(|i| _mm512_add_ps(t8[i + 4], t8[i]));
            let r = _mm512_add_ps(_mm512_add_ps(t4[0], t4[2]), _mm512_add_ps(t4[1], t4[3]));
            let mut out = [0f32; super::KEYS];
            _mm512_storeu_ps(out.as_mut_ptr(), r);
            out
        }
    }

    #[inline(always)]
    unsafe fn round8(x: __m256) -> __m256 {
        unsafe { _mm256_cvtph_ps(_mm256_cvtps_ph::<RNE>(x)) }
    }

    #[inline(always)]
    unsafe fn round16(x: __m512) -> __m512 {
        unsafe { _mm512_cvtph_ps(_mm512_cvtps_ph::<RNE>(x)) }
    }

    /// # Safety
    /// AVX2, FMA and F16C. Returns the elements done.
    #[inline(always)]
    pub unsafe fn scale_avx2(acc: &mut [f32], m: f32) -> usize {
        let n = acc.len() / 8 * 8;
        unsafe {
            for i in (0..n).step_by(8) {
                let p = acc.as_mut_ptr().add(i);
                _mm256_storeu_ps(p, round8(_mm256_mul_ps(_mm256_loadu_ps(p), _mm256_set1_ps(m))));
            }
        }
        n
    }

    /// # Safety
    /// AVX-512 F with F16C. Returns the elements done.
    #[inline(always)]
    pub unsafe fn scale_avx512(acc: &mut [f32], m: f32) -> usize {
        let n = acc.len() / 16 * 16;
        unsafe {
            for i in (0..n).step_by(16) {
                let p = acc.as_mut_ptr().add(i);
                _mm512_storeu_ps(p, round16(_mm512_mul_ps(_mm512_loadu_ps(p), _mm512_set1_ps(m))));
            }
        }
        n
    }

    /// # Safety
    /// As `scale_avx2`; `v` is as long as `acc`.
    #[inline(always)]
    pub unsafe fn mad_avx2(acc: &mut [f32], v: &[f16], w: f32) -> usize {
        let n = acc.len() / 8 * 8;
        unsafe {
            for i in (0..n).step_by(8) {
                let p = acc.as_mut_ptr().add(i);
                let x = _mm256_cvtph_ps(_mm_loadu_si128(v.as_ptr().add(i) as *const __m128i));
                _mm256_storeu_ps(p, round8(_mm256_fmadd_ps(x, _mm256_set1_ps(w), _mm256_loadu_ps(p))));
            }
        }
        n
    }

    /// # Safety
    /// As `scale_avx512`; `v` is as long as `acc`.
    #[inline(always)]
    pub unsafe fn mad_avx512(acc: &mut [f32], v: &[f16], w: f32) -> usize {
        let n = acc.len() / 16 * 16;
        unsafe {
            for i in (0..n).step_by(16) {
                let p = acc.as_mut_ptr().add(i);
                let x = _mm512_cvtph_ps(_mm256_loadu_si256(v.as_ptr().add(i) as *const __m256i));
                _mm512_storeu_ps(p, round16(_mm512_fmadd_ps(x, _mm512_set1_ps(w), _mm512_loadu_ps(p))));
            }
        }
        n
    }

    /// Dimensions of a row kept in registers per pass: 2 x 16 lanes.
    const BLOCK: usize = 32;
    /// Rows per pass: each value (a block of it) is converted once for them all.
    const ROWS: usize = 8;

    /// `weighted_sums` for the leading whole blocks of BLOCK dimensions, ROWS rows at a time,
    /// the running sums in registers across all steps. Returns the dimensions done.
    ///
    /// # Safety
    /// AVX-512 F with F16C; rows are no longer than `keys`, whose value rows are within
    /// `values`; `out` is `rows.len() * head_dim` zeros.
    #[inline(always)]
    pub unsafe fn weighted_sums_avx512(
        rows: &[Vec<super::Step>],
        keys: &[usize],
        values: &[f16],
        head_dim: usize,
        out: &mut [f32],
    ) -> usize {
        let blocks = head_dim / BLOCK;
        for (chunk, rows) in rows.chunks(ROWS).enumerate() {
            let out = &mut out[chunk * ROWS * head_dim..];
            for b in 0..blocks {
                // SAFETY: as the function's.
                unsafe {
                    match rows.len() {
                        8 => block::<8>(rows, keys, values, b * BLOCK, head_dim, out),
                        7 => block::<7>(rows, keys, values, b * BLOCK, head_dim, out),
                        6 => block::<6>(rows, keys, values, b * BLOCK, head_dim, out),
                        5 => block::<5>(rows, keys, values, b * BLOCK, head_dim, out),
                        4 => block::<4>(rows, keys, values, b * BLOCK, head_dim, out),
                        3 => block::<3>(rows, keys, values, b * BLOCK, head_dim, out),
                        2 => block::<2>(rows, keys, values, b * BLOCK, head_dim, out),
                        _ => block::<1>(rows, keys, values, b * BLOCK, head_dim, out),
                    }
                }
            }
        }
        blocks * BLOCK
    }

    #[inline(always)]
    unsafe fn block<const R: usize>(
        rows: &[Vec<super::Step>],
        keys: &[usize],
        values: &[f16],
        d0: usize,
        head_dim: usize,
        out: &mut [f32],
    ) {
        let n = rows[..R].iter().map(|r| r.len()).max().unwrap_or(0);
        unsafe {
            let mut acc = [[_mm512_setzero_ps(); 2]; R];
            for (k, &key) in keys[..n].iter().enumerate() {
                let p = values.as_ptr().add(key + d0);
                let v: [__m512; 2] =
                    std::array::from_fn(|j| _mm512_cvtph_ps(_mm256_loadu_si256(p.add(16 * j) as *const __m256i)));
                for r in 0..R {
                    let Some(&step) = rows[r].get(k) else { continue };
                    if step.ms != 1.0 {
                        let ms = _mm512_set1_ps(step.ms);
                        for a in acc[r].iter_mut() {
                            *a = round16(_mm512_mul_ps(*a, ms));
                        }
                    }
                    let vs = _mm512_set1_ps(step.vs);
                    for (a, &x) in acc[r].iter_mut().zip(&v) {
                        *a = round16(_mm512_fmadd_ps(x, vs, *a));
                    }
                }
            }
            for (r, row) in acc.iter().enumerate() {
                for (j, &a) in row.iter().enumerate() {
                    _mm512_storeu_ps(out.as_mut_ptr().add(r * head_dim + d0 + 16 * j), a);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn run_avx2(k: &[f16], q: &[f32], acc: &mut [f32], w: f32) -> f32 {
        scale::<AVX2>(acc, w * 0.5);
        mad::<AVX2>(acc, k, w);
        dot::<AVX2>(k, q)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512dq,avx512vl")]
    unsafe fn run_avx512(k: &[f16], q: &[f32], acc: &mut [f32], w: f32) -> f32 {
        scale::<AVX512>(acc, w * 0.5);
        mad::<AVX512>(acc, k, w);
        dot::<AVX512>(k, q)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512dq,avx512vl")]
    unsafe fn dot_keys_avx512(kt: &[f32], q: &[f32]) -> [f32; KEYS] {
        dot_keys::<AVX512>(kt, q)
    }

    /// Every level gives the plain bits on odd lengths; the dot product is close to the exact
    /// sum, and for 64 values (f16 products are exact in f32) equals ggml's tree by hand.
    #[test]
    fn levels_agree_bit_for_bit_and_follow_ggml_order() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(10);
        for n in [1usize, 13, 64, 80, 128, 200] {
            let k: Vec<f16> = (0..n).map(|_| f16::from_f32(rng.random_range(-2.0f32..2.0))).collect();
            let q: Vec<f32> = (0..n).map(|_| round(rng.random_range(-2.0f32..2.0))).collect();
            let start: Vec<f32> = (0..n).map(|_| round(rng.random_range(-3.0f32..3.0))).collect();
            let w = rng.random_range(0.0f32..1.0);
            let mut plain = start.clone();
            scale::<PLAIN>(&mut plain, w * 0.5);
            mad::<PLAIN>(&mut plain, &k, w);
            let d = dot::<PLAIN>(&k, &q);
            let exact: f64 = k.iter().zip(&q).map(|(&a, &b)| a.to_f64() * b as f64).sum();
            assert!((d as f64 - exact).abs() <= 1e-5 * (1.0 + exact.abs()) * n as f64, "n {n}: {d} vs {exact}");
            for (i, (&p, &s)) in plain.iter().zip(&start).enumerate() {
                let want = (k[i].to_f64() * w as f64 + round(s * (w * 0.5)) as f64) as f32;
                assert!((p - want).abs() <= 1e-3 * (1.0 + want.abs()), "n {n}, element {i}: {p} vs {want}");
            }
            #[cfg(target_arch = "x86_64")]
            for level in [AVX2, AVX512] {
                if detect() < level {
                    continue;
                }
                let mut acc = start.clone();
                let got = unsafe {
                    if level == AVX2 { run_avx2(&k, &q, &mut acc, w) } else { run_avx512(&k, &q, &mut acc, w) }
                };
                assert_eq!(got.to_bits(), d.to_bits(), "dot, n {n}, level {level}");
                assert_eq!(
                    acc.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                    plain.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                    "n {n}, level {level}"
                );
            }
        }
        // Keys scored 16 at a time give each key's `dot`, bit for bit.
        for head_dim in [13usize, 64, 80, 128] {
            let keys: Vec<f16> = (0..KEYS * head_dim).map(|_| f16::from_f32(rng.random_range(-2.0f32..2.0))).collect();
            let q: Vec<f32> = (0..head_dim).map(|_| round(rng.random_range(-2.0f32..2.0))).collect();
            let slots: Vec<usize> = (0..KEYS - 3).map(|l| l * head_dim).collect();
            let mut kt = Vec::new();
            transpose_keys(&keys, &slots, head_dim, &mut Vec::new(), &mut kt);
            let want: Vec<u32> = (0..KEYS)
                .map(|l| {
                    if l < slots.len() {
                        dot::<PLAIN>(&keys[l * head_dim..(l + 1) * head_dim], &q).to_bits()
                    } else {
                        0
                    }
                })
                .collect();
            let plain: Vec<u32> = dot_keys::<PLAIN>(&kt, &q).iter().map(|x| x.to_bits()).collect();
            assert_eq!(plain, want, "head_dim {head_dim}");
            #[cfg(target_arch = "x86_64")]
            if detect() >= AVX512 {
                let fast: Vec<u32> = unsafe { dot_keys_avx512(&kt, &q) }.iter().map(|x| x.to_bits()).collect();
                assert_eq!(fast, want, "head_dim {head_dim}");
            }
        }
        let k: Vec<f16> = (0..64).map(|_| f16::from_f32(rng.random_range(-2.0f32..2.0))).collect();
        let q: Vec<f32> = (0..64).map(|_| round(rng.random_range(-2.0f32..2.0))).collect();
        let p: Vec<f32> = k.iter().zip(&q).map(|(a, b)| a.to_f32() * b).collect();
        let c: Vec<f32> = (0..16).map(|l| (p[l] + p[32 + l]) + (p[16 + l] + p[48 + l])).collect();
        let t8: Vec<f32> = (0..8).map(|i| c[i + 8] + c[i]).collect();
        let t4: Vec<f32> = (0..4).map(|i| t8[i + 4] + t8[i]).collect();
        assert_eq!(dot::<PLAIN>(&k, &q).to_bits(), ((t4[0] + t4[2]) + (t4[1] + t4[3])).to_bits());
    }
}
