//! Rotary position embeddings, applied in place to rows of `n_heads * head_dim` floats.

/// How rotary embeddings pair up the dimensions of a head.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RopeStyle {
    /// Adjacent pairs (x[2i], x[2i+1]): llama.cpp's "norm" rope, used by GGUF llama files whose
    /// Q/K rows were permuted at conversion.
    #[default]
    Interleaved,
    /// Halves (x[i], x[i + d/2]): GPT-NeoX style, used by Qwen2.
    Neox,
}

/// Rope frequency scaling declared in the metadata.
#[derive(Debug, Clone, PartialEq, Default)]
pub enum RopeScaling {
    #[default]
    None,
    /// Positions are divided by `factor`.
    Linear { factor: f32 },
}

#[derive(Debug, Clone)]
pub struct Rope {
    style: RopeStyle,
    head_dim: usize,
    rope_dim: usize,
    /// base^(-2 / rope_dim): each pair's angle is the previous pair's times this.
    theta_scale: f32,
    /// Per-frequency divisors (Llama 3.1-style scaling), one per pair.
    freq_factors: Option<Vec<f32>>,
    position_scale: f32,
    /// Factor on cos and sin (Phi-3's longrope attention factor); 1 elsewhere.
    attention_factor: f32,
}

impl Rope {
    /// Rope over heads of `head_dim` whose first `rope_dim` dimensions rotate, frequencies
    /// from base `theta` (`ModelConfig::rope` passes a model's).
    pub fn new(
        style: RopeStyle,
        scaling: &RopeScaling,
        theta: f32,
        head_dim: usize,
        rope_dim: usize,
        freq_factors: Option<&[f32]>,
    ) -> Self {
        let theta_scale = theta.powf(-2.0 / rope_dim as f32);
        let position_scale = match *scaling {
            RopeScaling::None => 1.0,
            RopeScaling::Linear { factor } => 1.0 / factor,
        };
        Self {
            style,
            head_dim,
            rope_dim,
            theta_scale,
            freq_factors: freq_factors.map(|f| f.to_vec()),
            position_scale,
            attention_factor: 1.0,
        }
    }

    /// The same rope with cos and sin multiplied by `factor` (the rotated dimensions grow by it,
    /// the others do not): Phi-3's longrope `attention_factor`.
    pub fn with_attention_factor(mut self, factor: f32) -> Self {
        self.attention_factor = factor;
        self
    }

    /// cos/sin tables for `positions`, `[positions.len(), rope_dim / 2]` each, computed as
    /// llama.cpp's `ggml_rope_cache_init` does: each pair's angle is the previous one's times
    /// `theta_scale` in f32 (not `base^(-2i/d)` directly), then libm's `sinf`/`cosf`.
    pub fn tables(&self, positions: &[u32]) -> (Vec<f32>, Vec<f32>) {
        let half = self.rope_dim / 2;
        let mut cos = Vec::with_capacity(positions.len() * half);
        let mut sin = Vec::with_capacity(positions.len() * half);
        for &p in positions {
            let mut theta = p as f32;
            for i in 0..half {
                let extrapolated = self.freq_factors.as_ref().map_or(theta, |f| theta / f[i]);
                let t = self.position_scale * extrapolated;
                cos.push(t.cos() * self.attention_factor);
                sin.push(t.sin() * self.attention_factor);
                theta *= self.theta_scale;
            }
        }
        (cos, sin)
    }

    /// Rotates every head of one token's row. `cos`/`sin` are that token's table rows. The
    /// products are fused as llama.cpp's compiled `rotate_pairs` fuses them.
    pub fn apply(&self, row: &mut [f32], cos: &[f32], sin: &[f32]) {
        #[cfg(target_arch = "x86_64")]
        if super::quant::avx2::available() {
            // SAFETY: the features were just detected.
            return unsafe { self.apply_fma(row, cos, sin) };
        }
        self.apply_plain(row, cos, sin)
    }

    /// `apply_plain` with hardware fused multiply-adds (not calls to libm's `fmaf`).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn apply_fma(&self, row: &mut [f32], cos: &[f32], sin: &[f32]) {
        self.apply_plain(row, cos, sin)
    }

    #[inline(always)]
    fn apply_plain(&self, row: &mut [f32], cos: &[f32], sin: &[f32]) {
        let half = self.rope_dim / 2;
        for head in row.chunks_exact_mut(self.head_dim) {
            for i in 0..half {
                let (a, b) = match self.style {
                    RopeStyle::Interleaved => (2 * i, 2 * i + 1),
                    RopeStyle::Neox => (i, i + half),
                };
                let (x0, x1) = (head[a], head[b]);
                head[a] = x0.mul_add(cos[i], -(x1 * sin[i]));
                head[b] = x0.mul_add(sin[i], x1 * cos[i]);
            }
        }
    }

    pub fn half_dim(&self) -> usize {
        self.rope_dim / 2
    }
}
