//! Model hyper-parameters read from GGUF metadata.

use crate::cpu::rope::Rope;
pub use crate::cpu::rope::{RopeScaling, RopeStyle};
use crate::gguf::{GgufFile, ModelError};

#[derive(Debug, Clone)]
pub struct ModelConfig {
    pub architecture: String,
    pub name: String,
    pub n_layer: usize,
    pub hidden_size: usize,
    pub ffn_size: usize,
    pub n_head: usize,
    pub n_kv_head: usize,
    pub head_dim: usize,
    /// Number of leading dimensions of each head that are rotated (usually `head_dim`).
    pub rope_dim: usize,
    pub rope_theta: f32,
    pub rope_style: RopeStyle,
    pub rope_scaling: RopeScaling,
    pub rms_eps: f32,
    pub context_length: usize,
    /// Whether Q, K and V projections carry a bias (Qwen2).
    pub qkv_bias: bool,
}

/// Architectures whose tensors follow llama's layout.
pub const SUPPORTED_ARCHITECTURES: &[&str] = &["llama", "qwen2"];

impl ModelConfig {
    pub fn from_gguf(file: &GgufFile) -> Result<Self, ModelError> {
        let arch = file.get_str("general.architecture")?.to_string();
        if !SUPPORTED_ARCHITECTURES.contains(&arch.as_str()) {
            return Err(ModelError::UnsupportedArchitecture(arch));
        }
        let key = |k: &str| format!("{arch}.{k}");
        let hidden_size = file.get_usize(&key("embedding_length"))?;
        let n_head = file.get_usize(&key("attention.head_count"))?;
        if n_head == 0 || hidden_size % n_head != 0 {
            return Err(ModelError::Invalid(format!(
                "embedding_length {hidden_size} is not a multiple of head_count {n_head}"
            )));
        }
        let n_kv_head = match file.opt_usize(&key("attention.head_count_kv"))? {
            Some(n) => n,
            None => n_head,
        };
        if n_kv_head == 0 || n_head % n_kv_head != 0 {
            return Err(ModelError::Invalid(format!(
                "head_count {n_head} is not a multiple of head_count_kv {n_kv_head}"
            )));
        }
        let head_dim = file.opt_usize(&key("attention.key_length"))?.unwrap_or(hidden_size / n_head);
        let rope_dim = file.opt_usize(&key("rope.dimension_count"))?.unwrap_or(head_dim);
        if rope_dim > head_dim || rope_dim % 2 != 0 {
            return Err(ModelError::Invalid(format!(
                "rope.dimension_count {rope_dim} does not fit head dimension {head_dim}"
            )));
        }
        let rope_scaling = match file.opt_str(&key("rope.scaling.type"))? {
            None | Some("none") => RopeScaling::None,
            Some("linear") => {
                let factor = file.get_f32(&key("rope.scaling.factor"))?;
                if factor <= 0.0 {
                    return Err(ModelError::Invalid(format!("rope.scaling.factor {factor}")));
                }
                if factor == 1.0 { RopeScaling::None } else { RopeScaling::Linear { factor } }
            }
            Some(other) => {
                return Err(ModelError::Unsupported(format!("rope scaling type '{other}'")));
            }
        };
        let (rope_style, qkv_bias, default_theta) = match arch.as_str() {
            "qwen2" => (RopeStyle::Neox, true, 1_000_000.0),
            _ => (RopeStyle::Interleaved, false, 10_000.0),
        };
        Ok(Self {
            name: file.opt_str("general.name")?.unwrap_or(&arch).to_string(),
            n_layer: file.get_usize(&key("block_count"))?,
            hidden_size,
            ffn_size: file.get_usize(&key("feed_forward_length"))?,
            n_head,
            n_kv_head,
            head_dim,
            rope_dim,
            rope_theta: file.opt_f32(&key("rope.freq_base"))?.unwrap_or(default_theta),
            rope_style,
            rope_scaling,
            rms_eps: file.get_f32(&key("attention.layer_norm_rms_epsilon"))?,
            context_length: file.get_usize(&key("context_length"))?,
            qkv_bias,
            architecture: arch,
        })
    }

    /// The rotary embedding of this shape; `freq_factors` are Llama 3.1-style per-frequency
    /// divisors (a GGUF file's `rope_freqs`).
    pub fn rope(&self, freq_factors: Option<&[f32]>) -> Rope {
        Rope::new(self.rope_style, &self.rope_scaling, self.rope_theta, self.head_dim, self.rope_dim, freq_factors)
    }

    /// Floats of K plus V that one token occupies in one layer.
    pub fn kv_floats_per_token_layer(&self) -> usize {
        2 * self.n_kv_head * self.head_dim
    }
}
