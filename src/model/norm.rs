//! RMS normalisation, computed as llama.cpp does: the sum of squares in f64, then
//! `(x * (1 / sqrt(mean + eps))) * w` with f32 roundings in that order.

use candle_core::Tensor;

pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f32) -> candle_core::Result<Tensor> {
    if !x.device().is_cpu() {
        return candle_nn::ops::rms_norm(x, weight, eps);
    }
    let (rows, width) = x.dims2()?;
    let mut xs = x.flatten_all()?.to_vec1::<f32>()?;
    let w = weight.to_vec1::<f32>()?;
    for row in xs.chunks_exact_mut(width) {
        rms_norm_row(row, &w, eps);
    }
    Tensor::from_vec(xs, (rows, width), x.device())
}

pub fn rms_norm_row(row: &mut [f32], w: &[f32], eps: f32) {
    let sum: f64 = row.iter().map(|&v| (v * v) as f64).sum();
    let mean = (sum / row.len() as f64) as f32;
    let scale = 1.0 / (mean + eps).sqrt();
    for (v, &wi) in row.iter_mut().zip(w) {
        *v = (*v * scale) * wi;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_definition_on_odd_widths() {
        for width in [1usize, 7, 33] {
            let x: Vec<f32> = (0..width * 3).map(|i| (i as f32 * 0.37).sin() * 4.0).collect();
            let w: Vec<f32> = (0..width).map(|i| 0.5 + i as f32 * 0.01).collect();
            let t = Tensor::from_vec(x.clone(), (3, width), &candle_core::Device::Cpu).unwrap();
            let wt = Tensor::from_vec(w.clone(), width, &candle_core::Device::Cpu).unwrap();
            let got = rms_norm(&t, &wt, 1e-5).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            for (r, row) in x.chunks(width).enumerate() {
                let ms: f64 = row.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / width as f64;
                for (i, &v) in row.iter().enumerate() {
                    let want = v as f64 / (ms + 1e-5).sqrt() * w[i] as f64;
                    assert!((got[r * width + i] as f64 - want).abs() < 1e-5 * want.abs().max(1.0));
                }
            }
        }
    }
}
