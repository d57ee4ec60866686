//! Products with bf16 weights, the way llama.cpp's CPU backend and a GPU's matrix units do them:
//! activations rounded to bf16, products and sums in f32. Used for bf16 weights (dummy models);
//! with the same roundings as braid's CUDA path, the CPU and GPU compute the same model.

use half::bf16;

/// `x` rounded to bf16 (round to nearest even), kept as f32.
pub fn round_rows(x: &[f32]) -> Vec<f32> {
    x.iter().map(|&v| bf16::from_f32(v).to_f32()).collect()
}

/// Lanes of partial sums: independent chains the compiler can vectorise.
const LANES: usize = 16;

/// `dot(w_row, x_row)` over one widened weight row, in `LANES` interleaved partial sums.
#[inline]
pub fn dot(w: &[f32], x: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let (wc, xc) = (w.chunks_exact(LANES), x.chunks_exact(LANES));
    let (wt, xt) = (wc.remainder(), xc.remainder());
    for (a, b) in wc.zip(xc) {
        for i in 0..LANES {
            acc[i] += a[i] * b[i];
        }
    }
    let mut sum = acc.iter().sum::<f32>();
    for (a, b) in wt.iter().zip(xt) {
        sum += a * b;
    }
    sum
}

/// Output columns `cols` of `[m, k] x [n, k]^T` for rounded activations `xs`; `set(row, col, v)`
/// stores a result. Each weight row is widened once and used for every activation row.
pub fn columns(
    w: &[bf16],
    k: usize,
    xs: &[f32],
    m: usize,
    cols: std::ops::Range<usize>,
    mut set: impl FnMut(usize, usize, f32),
) {
    let mut wide = vec![0f32; k];
    for col in cols {
        for (o, &v) in wide.iter_mut().zip(&w[col * k..(col + 1) * k]) {
            *o = v.to_f32();
        }
        for r in 0..m {
            set(r, col, dot(&wide, &xs[r * k..(r + 1) * k]));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// Odd sizes against an f64 product of the same rounded operands.
    #[test]
    fn columns_match_a_plain_product_of_rounded_operands() {
        let mut r = rand_chacha::ChaCha8Rng::seed_from_u64(5);
        for (n, k, m) in [(7usize, 33usize, 3usize), (19, 70, 1), (4, 16, 5)] {
            let w: Vec<bf16> = (0..n * k).map(|_| bf16::from_f32(r.random_range(-1.0f32..1.0))).collect();
            let x: Vec<f32> = (0..m * k).map(|_| r.random_range(-3.0f32..3.0)).collect();
            let xr = round_rows(&x);
            let mut y = vec![f32::NAN; m * n];
            columns(&w, k, &xr, m, 0..n, |row, col, v| y[row * n + col] = v);
            for row in 0..m {
                for col in 0..n {
                    let want: f64 =
                        (0..k).map(|i| w[col * k + i].to_f64() * bf16::from_f32(x[row * k + i]).to_f64()).sum();
                    let got = y[row * n + col] as f64;
                    assert!((got - want).abs() <= 1e-5 * (k as f64), "{n}x{k} ({row},{col}): {got} vs {want}");
                }
            }
        }
    }
}
