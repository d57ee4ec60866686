//! Rotary position embeddings, applied in place to rows of `n_heads * head_dim` floats.

use super::config::{ModelConfig, RopeScaling, RopeStyle};

#[derive(Debug, Clone)]
pub struct Rope {
    style: RopeStyle,
    head_dim: usize,
    rope_dim: usize,
    /// theta_i = base^(-2i / rope_dim), divided by any per-frequency factors.
    inv_freq: Vec<f32>,
    position_scale: f32,
}

impl Rope {
    pub fn new(config: &ModelConfig, freq_factors: Option<&[f32]>) -> Self {
        let half = config.rope_dim / 2;
        let inv_freq = (0..half)
            .map(|i| {
                let f = (config.rope_theta as f64).powf(-2.0 * i as f64 / config.rope_dim as f64);
                let factor = freq_factors.map_or(1.0, |f| f[i] as f64);
                (f / factor) as f32
            })
            .collect();
        let position_scale = match config.rope_scaling {
            RopeScaling::None => 1.0,
            RopeScaling::Linear { factor } => 1.0 / factor,
        };
        Self { style: config.rope_style, head_dim: config.head_dim, rope_dim: config.rope_dim, inv_freq, position_scale }
    }

    /// cos/sin tables for `positions`, `[positions.len(), rope_dim / 2]` each.
    pub fn tables(&self, positions: &[u32]) -> (Vec<f32>, Vec<f32>) {
        let half = self.inv_freq.len();
        let mut cos = Vec::with_capacity(positions.len() * half);
        let mut sin = Vec::with_capacity(positions.len() * half);
        for &p in positions {
            let p = p as f32 * self.position_scale;
            for &f in &self.inv_freq {
                let (s, c) = (p * f).sin_cos();
                cos.push(c);
                sin.push(s);
            }
        }
        (cos, sin)
    }

    /// Rotates every head of one token's row. `cos`/`sin` are that token's table rows.
    pub fn apply(&self, row: &mut [f32], cos: &[f32], sin: &[f32]) {
        let half = self.rope_dim / 2;
        for head in row.chunks_exact_mut(self.head_dim) {
            for i in 0..half {
                let (a, b) = match self.style {
                    RopeStyle::Interleaved => (2 * i, 2 * i + 1),
                    RopeStyle::Neox => (i, i + half),
                };
                let (x0, x1) = (head[a], head[b]);
                head[a] = x0 * cos[i] - x1 * sin[i];
                head[b] = x0 * sin[i] + x1 * cos[i];
            }
        }
    }

    pub fn half_dim(&self) -> usize {
        self.inv_freq.len()
    }
}
