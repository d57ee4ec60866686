//! Model shapes without weight files, for `--load-format dummy`: random weights of the real
//! shapes (like vLLM's dummy load format), so throughput can be measured on any model size
//! without downloading it. The weights come from a counter-based generator that the CPU and the
//! GPU (`src/gpu/kernels/pointwise.cuh`, `dummy_value`) compute bit for bit alike, so both run the same model.

use half::bf16;

use super::arch::names;
use super::config::{Architecture, ModelConfig, RopeScaling, RopeStyle};
use super::weights::WeightSource;
use crate::cpu::linear::QLinear;
use crate::gguf::ModelError;

/// A named model shape.
#[derive(Debug, Clone)]
pub struct Preset {
    pub config: ModelConfig,
    pub vocab_size: usize,
    /// Whether the output projection is the embedding table (Llama 3.2 1B).
    pub tied_embeddings: bool,
    /// Llama 3.1-style per-frequency rope divisors (what GGUF files ship as `rope_freqs`).
    pub rope_freq_factors: Option<Vec<f32>>,
}

/// The shapes `--model-config` accepts.
pub const PRESETS: &[&str] = &["llama-3.2-1b", "llama-3.1-8b", "qwen2.5-7b", "smollm2-135m"];

#[allow(clippy::too_many_arguments)]
fn config(
    name: &str,
    arch: &str,
    n_layer: usize,
    hidden: usize,
    ffn: usize,
    n_head: usize,
    n_kv_head: usize,
    theta: f32,
    eps: f32,
    context: usize,
) -> ModelConfig {
    let head_dim = hidden / n_head;
    ModelConfig {
        architecture: if arch == "qwen2" { Architecture::Qwen2 } else { Architecture::Llama },
        name: name.into(),
        n_layer,
        hidden_size: hidden,
        ffn_size: ffn,
        n_head,
        n_kv_head,
        head_dim,
        rope_dim: head_dim,
        rope_theta: theta,
        rope_style: if arch == "qwen2" { RopeStyle::Neox } else { RopeStyle::Interleaved },
        rope_scaling: RopeScaling::None,
        rms_eps: eps,
        context_length: context,
        qkv_bias: arch == "qwen2",
        layer_windows: vec![None; n_layer],
        attention_scale: 1.0 / (head_dim as f32).sqrt(),
        ..Default::default()
    }
}

/// Llama 3.1's rope scaling as per-frequency divisors (llama.cpp's `rope_freqs`).
pub fn llama3_freq_factors(c: &ModelConfig, factor: f64, low: f64, high: f64, original_context: f64) -> Vec<f32> {
    let (low_wavelen, high_wavelen) = (original_context / low, original_context / high);
    (0..c.rope_dim / 2)
        .map(|i| {
            let freq = (c.rope_theta as f64).powf(-2.0 * i as f64 / c.rope_dim as f64);
            let wavelen = 2.0 * std::f64::consts::PI / freq;
            let divisor = if wavelen < high_wavelen {
                1.0
            } else if wavelen > low_wavelen {
                factor
            } else {
                let smooth = (original_context / wavelen - low) / (high - low);
                1.0 / ((1.0 - smooth) / factor + smooth)
            };
            divisor as f32
        })
        .collect()
}

pub fn preset(name: &str) -> Option<Preset> {
    let p = match name {
        "llama-3.2-1b" => {
            let config = config(name, "llama", 16, 2048, 8192, 32, 8, 500_000.0, 1e-5, 131_072);
            let factors = llama3_freq_factors(&config, 32.0, 1.0, 4.0, 8192.0);
            Preset { config, vocab_size: 128_256, tied_embeddings: true, rope_freq_factors: Some(factors) }
        }
        "llama-3.1-8b" => {
            let config = config(name, "llama", 32, 4096, 14_336, 32, 8, 500_000.0, 1e-5, 131_072);
            let factors = llama3_freq_factors(&config, 8.0, 1.0, 4.0, 8192.0);
            Preset { config, vocab_size: 128_256, tied_embeddings: false, rope_freq_factors: Some(factors) }
        }
        "qwen2.5-7b" => Preset {
            config: config(name, "qwen2", 28, 3584, 18_944, 28, 4, 1_000_000.0, 1e-6, 32_768),
            vocab_size: 152_064,
            tied_embeddings: false,
            rope_freq_factors: None,
        },
        "smollm2-135m" => Preset {
            config: config(name, "llama", 30, 576, 1536, 9, 3, 100_000.0, 1e-5, 8192),
            vocab_size: 49_152,
            tied_embeddings: true,
            rope_freq_factors: None,
        },
        _ => return None,
    };
    Some(p)
}

/// How one dummy tensor is drawn: uniform in `[centre - scale, centre + scale)`.
#[derive(Debug, Clone, Copy)]
pub struct Draw {
    pub seed: u64,
    pub centre: f32,
    pub scale: f32,
}

/// Which tensor a draw is for; each gets its own stream of the generator.
#[derive(Debug, Clone, Copy)]
pub enum DummyTensor {
    Embeddings,
    Output,
    OutputNorm,
    AttnNorm(usize),
    Q(usize),
    K(usize),
    V(usize),
    QkvBias(usize),
    O(usize),
    FfnNorm(usize),
    Gate(usize),
    Up(usize),
    Down(usize),
}

impl DummyTensor {
    /// The draw of this tensor in a model of `config` under `seed`. Scales keep activations of
    /// order one: matrices have variance 1/fan-in, norms sit around 1, logits spread by ~1.
    pub fn draw(self, config: &ModelConfig, seed: u64) -> Draw {
        use DummyTensor::*;
        // Projections back into the residual stream are halved: at full scale a deep random
        // model is chaotic (a last-bit rounding difference changes its greedy tokens within a
        // few steps), at GPT-2's 1/sqrt(2 n_layer) it repeats one token; at 1/2 it is stable
        // and still varied (about 6 distinct tokens in 16 for llama-3.2-1b).
        let residual = 0.5;
        let (index, centre, scale) = match self {
            Embeddings => (0, 0.0, 0.05),
            Output => (1, 0.0, 0.05),
            OutputNorm => (2, 1.0, 0.2),
            AttnNorm(l) => (16 + 16 * l, 1.0, 0.2),
            Q(l) => (17 + 16 * l, 0.0, fan_in(config.hidden_size)),
            K(l) => (18 + 16 * l, 0.0, fan_in(config.hidden_size)),
            V(l) => (19 + 16 * l, 0.0, fan_in(config.hidden_size)),
            QkvBias(l) => (20 + 16 * l, 0.0, 0.05),
            O(l) => (21 + 16 * l, 0.0, fan_in(config.n_head * config.head_dim) * residual),
            FfnNorm(l) => (22 + 16 * l, 1.0, 0.2),
            Gate(l) => (23 + 16 * l, 0.0, fan_in(config.hidden_size)),
            Up(l) => (24 + 16 * l, 0.0, fan_in(config.hidden_size)),
            Down(l) => (25 + 16 * l, 0.0, fan_in(config.ffn_size) * residual),
        };
        Draw { seed: seed.wrapping_mul(1_000_003).wrapping_add(index as u64), centre, scale }
    }
}

/// Half-width of a uniform distribution of variance 1/n.
fn fan_in(n: usize) -> f32 {
    (3.0 / n as f32).sqrt()
}

/// splitmix64's finaliser, high 32 bits.
fn mix32(mut z: u64) -> u32 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58476d1ce4e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d049bb133111eb);
    z ^= z >> 31;
    (z >> 32) as u32
}

/// Element `i` of a draw: the exact arithmetic of the GPU's `dummy_value` (one rounding in
/// the multiply, one in the add; f32 has no fused operations in Rust).
pub fn dummy_value(draw: Draw, i: u64) -> f32 {
    let k = (mix32(draw.seed.wrapping_mul(0x9e3779b97f4a7c15).wrapping_add(i)) >> 8) | 1;
    let unit = (k as i32 - (1 << 23)) as f32 * (1.0 / 8_388_608.0);
    draw.centre + unit * draw.scale
}

pub fn dummy_f32(draw: Draw, n: usize) -> Vec<f32> {
    (0..n as u64).map(|i| dummy_value(draw, i)).collect()
}

pub fn dummy_bf16(draw: Draw, n: usize) -> Vec<bf16> {
    (0..n as u64).map(|i| bf16::from_f32(dummy_value(draw, i))).collect()
}

/// A preset's dummy weights, by GGUF name, as the shared decoder loads any model.
pub struct DummySource<'a> {
    pub preset: &'a Preset,
    pub seed: u64,
}

impl DummySource<'_> {
    /// The draw behind a tensor name, with the element range of it this tensor is (the Q, K
    /// and V biases share one draw, as the GPU lays them out).
    fn tensor(&self, name: &str) -> Option<(DummyTensor, std::ops::Range<usize>, Vec<usize>)> {
        use DummyTensor as T;
        let c = &self.preset.config;
        let (h, q, kv, ffn, vocab) =
            (c.hidden_size, c.n_head * c.head_dim, c.n_kv_head * c.head_dim, c.ffn_size, self.preset.vocab_size);
        let whole = |t: T, dims: Vec<usize>| Some((t, 0..dims.iter().product(), dims));
        match name {
            names::TOKEN_EMBD => return whole(T::Embeddings, vec![vocab, h]),
            names::OUTPUT if !self.preset.tied_embeddings => return whole(T::Output, vec![vocab, h]),
            names::OUTPUT_NORM => return whole(T::OutputNorm, vec![h]),
            _ => {}
        }
        let (layer, suffix) = name.strip_prefix("blk.")?.split_once('.')?;
        let l: usize = layer.parse().ok().filter(|&l| l < c.n_layer)?;
        match suffix {
            "attn_norm.weight" => whole(T::AttnNorm(l), vec![h]),
            "attn_q.weight" => whole(T::Q(l), vec![q, h]),
            "attn_k.weight" => whole(T::K(l), vec![kv, h]),
            "attn_v.weight" => whole(T::V(l), vec![kv, h]),
            "attn_q.bias" if c.qkv_bias => Some((T::QkvBias(l), 0..q, vec![q])),
            "attn_k.bias" if c.qkv_bias => Some((T::QkvBias(l), q..q + kv, vec![kv])),
            "attn_v.bias" if c.qkv_bias => Some((T::QkvBias(l), q + kv..q + 2 * kv, vec![kv])),
            "attn_output.weight" => whole(T::O(l), vec![h, q]),
            "ffn_norm.weight" => whole(T::FfnNorm(l), vec![h]),
            "ffn_gate.weight" => whole(T::Gate(l), vec![ffn, h]),
            "ffn_up.weight" => whole(T::Up(l), vec![ffn, h]),
            "ffn_down.weight" => whole(T::Down(l), vec![h, ffn]),
            _ => None,
        }
    }
}

impl WeightSource for DummySource<'_> {
    fn dims(&self, name: &str) -> Option<Vec<usize>> {
        if name == names::ROPE_FREQS {
            return self.preset.rope_freq_factors.as_ref().map(|f| vec![f.len()]);
        }
        self.tensor(name).map(|t| t.2)
    }

    fn linear(&mut self, name: &str, out: usize, inp: usize) -> Result<QLinear, ModelError> {
        let (t, range, _) = self.tensor(name).ok_or_else(|| ModelError::MissingTensor(name.into()))?;
        let draw = t.draw(&self.preset.config, self.seed);
        Ok(QLinear::from_bf16(out, inp, dummy_bf16(draw, range.end)[range].to_vec()))
    }

    fn experts(&mut self, name: &str, _: usize, _: usize, _: usize) -> Result<Vec<QLinear>, ModelError> {
        Err(ModelError::MissingTensor(name.into()))
    }

    fn floats(&mut self, name: &str, _dims: &[usize]) -> Result<Vec<f32>, ModelError> {
        if name == names::ROPE_FREQS {
            return self.preset.rope_freq_factors.clone().ok_or_else(|| ModelError::MissingTensor(name.into()));
        }
        let (t, range, _) = self.tensor(name).ok_or_else(|| ModelError::MissingTensor(name.into()))?;
        Ok(dummy_f32(t.draw(&self.preset.config, self.seed), range.end)[range].to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_have_consistent_shapes() {
        for name in PRESETS {
            let p = preset(name).unwrap();
            let c = &p.config;
            assert_eq!(c.n_head * c.head_dim, c.hidden_size, "{name}");
            assert_eq!(c.n_head % c.n_kv_head, 0, "{name}");
            if let Some(f) = &p.rope_freq_factors {
                assert_eq!(f.len(), c.rope_dim / 2);
                assert!(f.iter().all(|&d| d >= 1.0));
            }
        }
        assert!(preset("gpt-5").is_none());
    }

    /// Values are spread over the whole range, never zero, and differ between tensors.
    #[test]
    fn dummy_values_are_uniform_and_never_zero() {
        let c = preset("smollm2-135m").unwrap().config;
        let d = DummyTensor::Q(3).draw(&c, 7);
        let v = dummy_f32(d, 100_000);
        assert!(v.iter().all(|&x| x != 0.0 && x.abs() <= d.scale));
        let mean = v.iter().map(|&x| x as f64).sum::<f64>() / v.len() as f64;
        let var = v.iter().map(|&x| (x as f64).powi(2)).sum::<f64>() / v.len() as f64;
        assert!(mean.abs() < 0.01 * d.scale as f64);
        assert!((var - (d.scale as f64).powi(2) / 3.0).abs() < 0.02 * var);
        assert_ne!(dummy_f32(DummyTensor::K(3).draw(&c, 7), 8), v[..8].to_vec());
        let norm = dummy_f32(DummyTensor::AttnNorm(0).draw(&c, 7), 1000);
        assert!(norm.iter().all(|&x| (0.8..1.2).contains(&x)));
    }
}
