//! RMS normalisation, computed as llama.cpp does: the sum of squares in f64, then
//! `(x * (1 / sqrt(mean + eps))) * w` with f32 roundings in that order.

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
            let x: Vec<f32> = (0..width).map(|i| (i as f32 * 0.37).sin() * 4.0).collect();
            let w: Vec<f32> = (0..width).map(|i| 0.5 + i as f32 * 0.01).collect();
            let mut got = x.clone();
            rms_norm_row(&mut got, &w, 1e-5);
            let ms: f64 = x.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / width as f64;
            for (i, &v) in x.iter().enumerate() {
                let want = v as f64 / (ms + 1e-5).sqrt() * w[i] as f64;
                assert!((got[i] as f64 - want).abs() < 1e-5 * want.abs().max(1.0));
            }
        }
    }
}
