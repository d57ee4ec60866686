//! Model hyper-parameters: one struct for every architecture braid serves, read from GGUF
//! metadata here (`from_gguf`) or from a Hugging Face `config.json` (`loader/hf/`).

use crate::cpu::rope::Rope;
pub use crate::cpu::rope::{RopeScaling, RopeStyle};
use crate::gguf::{GgufFile, ModelError};

/// The architectures braid runs. Each has a file in `model/arch/` saying how it differs from
/// the shared decoder (`model/decoder.rs`): its tensors, norms, activation and attention.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Architecture {
    /// Llama 2/3.x, SmolLM, TinyLlama (and Mistral's GGUF files, which llama.cpp writes as llama).
    #[default]
    Llama,
    /// Mistral: llama with a sliding window over every layer.
    Mistral,
    /// Qwen2 / Qwen2.5: Q, K and V biases.
    Qwen2,
    /// Qwen3: RMS norms on each head's Q and K.
    Qwen3,
    /// Qwen3's mixture of experts (Qwen3-30B-A3B).
    Qwen3Moe,
    /// Mixtral: llama with a mixture of experts.
    Mixtral,
    /// Gemma 3 (text): local/global layers, pre and post norms, GeGLU, scaled embeddings.
    Gemma3,
    /// Phi-3 / Phi-4: fused QKV and gate/up projections.
    Phi3,
}

impl Architecture {
    /// The name GGUF files (`general.architecture`) and braid's logs use.
    pub fn gguf_name(self) -> &'static str {
        match self {
            Architecture::Llama | Architecture::Mistral | Architecture::Mixtral => "llama",
            Architecture::Qwen2 => "qwen2",
            Architecture::Qwen3 => "qwen3",
            Architecture::Qwen3Moe => "qwen3moe",
            Architecture::Gemma3 => "gemma3",
            Architecture::Phi3 => "phi3",
        }
    }

    /// The family name people know it by.
    pub fn name(self) -> &'static str {
        match self {
            Architecture::Llama => "llama",
            Architecture::Mistral => "mistral",
            Architecture::Qwen2 => "qwen2",
            Architecture::Qwen3 => "qwen3",
            Architecture::Qwen3Moe => "qwen3_moe",
            Architecture::Mixtral => "mixtral",
            Architecture::Gemma3 => "gemma3",
            Architecture::Phi3 => "phi3",
        }
    }
}

/// The activation of the gated feed-forward network.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Activation {
    /// SwiGLU: silu(gate) * up.
    #[default]
    Silu,
    /// GeGLU with GELU's tanh approximation (Gemma).
    GeluTanh,
}

/// A mixture of experts in place of the dense feed-forward network.
#[derive(Debug, Clone, PartialEq)]
pub struct MoeConfig {
    pub n_expert: usize,
    /// Experts each token is routed to.
    pub n_expert_used: usize,
    /// Each expert's feed-forward width.
    pub expert_ffn_size: usize,
    /// Whether the chosen experts' weights are renormalised to sum to 1 (Mixtral, Qwen3-MoE).
    pub norm_top_k: bool,
    /// Layers that keep a dense feed-forward network (Qwen3-MoE's `mlp_only_layers`).
    pub dense_layers: Vec<usize>,
}

#[derive(Debug, Clone, Default)]
pub struct ModelConfig {
    pub architecture: Architecture,
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
    /// Rope base of the sliding-window layers where it differs (Gemma 3's local layers, which
    /// also take no scaling).
    pub rope_local_theta: Option<f32>,
    /// Factor on the global rope's cos and sin (Phi-3's longrope attention factor).
    pub rope_attention_factor: Option<f32>,
    /// Phi-3 longrope in a GGUF file, which ships both factor sets: whether the long ones apply
    /// (the served context exceeds the original one, as llama.cpp decides).
    pub rope_long_factors: bool,
    /// Phi-3 longrope's original context (`rope.scaling.original_context_length`).
    pub rope_original_context: Option<usize>,
    pub rms_eps: f32,
    pub context_length: usize,
    /// Whether Q, K and V projections carry a bias (Qwen2).
    pub qkv_bias: bool,
    /// Whether each head's Q and K are RMS-normalised before rope (Qwen3, Gemma 3).
    pub qk_norm: bool,
    /// Per layer, its sliding attention window in tokens (`None`: the layer sees everything).
    pub layer_windows: Vec<Option<usize>>,
    /// The factor on attention scores (1/sqrt(head_dim) unless the model says otherwise).
    pub attention_scale: f32,
    pub activation: Activation,
    /// Factor on the token embeddings (Gemma: sqrt(hidden_size)).
    pub embedding_scale: Option<f32>,
    /// Whether each block also normalises its attention and feed-forward outputs (Gemma 3).
    pub post_norms: bool,
    pub moe: Option<MoeConfig>,
}

/// Architectures braid reads from GGUF files (`general.architecture`).
pub const SUPPORTED_ARCHITECTURES: &[&str] = &["llama", "qwen2", "qwen3", "qwen3moe", "gemma3", "phi3"];

/// What an unsupported architecture's error lists.
pub const SUPPORTED_LIST: &str = "llama, mistral, mixtral, qwen2, qwen3, qwen3_moe, gemma3, phi3";

impl ModelConfig {
    pub fn from_gguf(file: &GgufFile) -> Result<Self, ModelError> {
        let arch = file.get_str("general.architecture")?.to_string();
        if !SUPPORTED_ARCHITECTURES.contains(&arch.as_str()) {
            return Err(ModelError::UnsupportedArchitecture { name: arch, supported: SUPPORTED_LIST });
        }
        let key = |k: &str| format!("{arch}.{k}");
        let hidden_size = file.get_usize(&key("embedding_length"))?;
        let n_head = file.get_usize(&key("attention.head_count"))?;
        if n_head == 0 {
            return Err(ModelError::Invalid("attention.head_count is 0".into()));
        }
        let n_kv_head = match file.opt_usize(&key("attention.head_count_kv"))? {
            Some(n) => n,
            None => n_head,
        };
        let head_dim = match file.opt_usize(&key("attention.key_length"))? {
            Some(d) => d,
            None if hidden_size % n_head == 0 => hidden_size / n_head,
            None => {
                return Err(ModelError::Invalid(format!(
                    "embedding_length {hidden_size} is not a multiple of head_count {n_head}"
                )));
            }
        };
        let rope_dim = file.opt_usize(&key("rope.dimension_count"))?.unwrap_or(head_dim);
        let rope_scaling = match file.opt_str(&key("rope.scaling.type"))? {
            None | Some("none") => RopeScaling::None,
            Some("linear") => {
                let factor = file.get_f32(&key("rope.scaling.factor"))?;
                if factor == 1.0 { RopeScaling::None } else { RopeScaling::Linear { factor } }
            }
            Some(other) => {
                return Err(ModelError::Unsupported(format!("rope scaling type '{other}'")));
            }
        };
        let n_layer = file.get_usize(&key("block_count"))?;
        let n_expert = file.opt_usize(&key("expert_count"))?.unwrap_or(0);
        let moe = if n_expert > 0 {
            Some(MoeConfig {
                n_expert,
                n_expert_used: file.get_usize(&key("expert_used_count"))?,
                expert_ffn_size: match file.opt_usize(&key("expert_feed_forward_length"))? {
                    Some(n) => n,
                    None => file.get_usize(&key("feed_forward_length"))?,
                },
                norm_top_k: true,
                // Layers without a router keep a dense feed-forward network (Qwen3-MoE's
                // mlp_only_layers, as `braid convert` writes them).
                dense_layers: (0..n_layer)
                    .filter(|&l| !file.has_tensor(&super::arch::names::Layer::new(l).router))
                    .collect(),
            })
        } else {
            None
        };
        let window = file.opt_usize(&key("attention.sliding_window"))?.filter(|&w| w > 0);
        let mut config = Self {
            name: file.opt_str("general.name")?.unwrap_or(&arch).to_string(),
            n_layer,
            hidden_size,
            ffn_size: file.opt_usize(&key("feed_forward_length"))?.unwrap_or(0),
            n_head,
            n_kv_head,
            head_dim,
            rope_dim,
            rope_theta: file.opt_f32(&key("rope.freq_base"))?.unwrap_or(10_000.0),
            rope_style: RopeStyle::Neox,
            rope_scaling,
            rope_local_theta: None,
            rope_attention_factor: None,
            rope_long_factors: false,
            rope_original_context: None,
            rms_eps: file.get_f32(&key("attention.layer_norm_rms_epsilon"))?,
            context_length: file.get_usize(&key("context_length"))?,
            qkv_bias: false,
            qk_norm: false,
            layer_windows: vec![None; n_layer],
            attention_scale: 1.0 / (head_dim as f32).sqrt(),
            activation: Activation::Silu,
            embedding_scale: None,
            post_norms: false,
            moe,
            architecture: Architecture::Llama,
        };
        match arch.as_str() {
            "llama" => {
                // GGUF llama files hold Q/K rows permuted for adjacent-pair rope.
                config.rope_style = RopeStyle::Interleaved;
                config.architecture = match (&config.moe, window) {
                    (Some(_), _) => Architecture::Mixtral,
                    (None, Some(_)) => Architecture::Mistral,
                    (None, None) => Architecture::Llama,
                };
                config.layer_windows = vec![window; n_layer];
            }
            "qwen2" => {
                config.architecture = Architecture::Qwen2;
                config.qkv_bias = true;
            }
            "qwen3" => {
                config.architecture = Architecture::Qwen3;
                config.qk_norm = true;
            }
            "qwen3moe" => {
                config.architecture = Architecture::Qwen3Moe;
                config.qk_norm = true;
                if config.moe.is_none() {
                    return Err(ModelError::Invalid("qwen3moe without qwen3moe.expert_count".into()));
                }
            }
            "gemma3" => {
                super::arch::gemma3::adjust_gguf_config(&mut config, window);
                // Which layers slide, where the file says (llama.cpp's sliding_window_pattern:
                // one bool per layer, or a period), instead of Gemma 3's one global in six.
                let pattern_key = key("attention.sliding_window_pattern");
                if let Some(w) = window {
                    let slides: Option<Vec<bool>> = match file.metadata().get(&pattern_key) {
                        None => None,
                        Some(candle_core::quantized::gguf_file::Value::Array(values)) => {
                            Some(values.iter().map(|v| v.to_bool()).collect::<Result<_, _>>().map_err(|e| {
                                ModelError::WrongType { key: pattern_key.clone(), reason: e.to_string() }
                            })?)
                        }
                        Some(_) => {
                            let period = file.get_usize(&pattern_key)?;
                            Some((0..n_layer).map(|l| period > 0 && (l + 1) % period != 0).collect())
                        }
                    };
                    if let Some(slides) = slides {
                        if slides.len() != n_layer {
                            return Err(ModelError::Invalid(format!(
                                "{pattern_key} has {} entries for {n_layer} layers",
                                slides.len()
                            )));
                        }
                        config.layer_windows = slides.into_iter().map(|s| s.then_some(w)).collect();
                    }
                }
                if let Some(theta) = file.opt_f32(&key("rope.freq_base_swa"))? {
                    config.rope_local_theta = Some(theta);
                }
            }
            "phi3" => {
                config.architecture = Architecture::Phi3;
                config.layer_windows = vec![window; n_layer];
                config.rope_attention_factor = file.opt_f32(&key("rope.scaling.attn_factor"))?;
                config.rope_original_context = file.opt_usize(&key("rope.scaling.original_context_length"))?;
                config.rope_long_factors =
                    config.rope_original_context.is_some_and(|original| config.context_length > original);
            }
            _ => unreachable!("checked against SUPPORTED_ARCHITECTURES above"),
        }
        config.validate()?;
        Ok(config)
    }

    /// Serves at most `max` tokens a sequence where the model allows more; Phi-3 longrope's
    /// factor set follows the context served.
    pub fn cap_context(&mut self, max: usize) {
        self.context_length = self.context_length.min(max.max(1));
        if let Some(original) = self.rope_original_context {
            self.rope_long_factors = self.context_length > original;
        }
    }

    /// Checks the shapes every format must agree on, so a bad file fails at load, not mid-step.
    pub fn validate(&self) -> Result<(), ModelError> {
        let invalid = |m: String| Err(ModelError::Invalid(m));
        if self.n_layer == 0 || self.hidden_size == 0 || self.head_dim == 0 {
            return invalid(format!(
                "empty shape: {} layers, hidden size {}, head dimension {}",
                self.n_layer, self.hidden_size, self.head_dim
            ));
        }
        if self.n_kv_head == 0 || !self.n_head.is_multiple_of(self.n_kv_head) {
            return invalid(format!("{} heads is not a multiple of {} kv heads", self.n_head, self.n_kv_head));
        }
        if self.rope_dim > self.head_dim || !self.rope_dim.is_multiple_of(2) {
            return invalid(format!("rope dimension {} does not fit head dimension {}", self.rope_dim, self.head_dim));
        }
        if self.layer_windows.len() != self.n_layer {
            return invalid(format!("{} layer windows for {} layers", self.layer_windows.len(), self.n_layer));
        }
        if let RopeScaling::Linear { factor } = self.rope_scaling
            && factor <= 0.0
        {
            return invalid(format!("rope scaling factor {factor}"));
        }
        if let Some(m) = &self.moe
            && (m.n_expert_used == 0 || m.n_expert_used > m.n_expert || m.expert_ffn_size == 0)
        {
            return invalid(format!(
                "{} of {} experts per token, expert width {}",
                m.n_expert_used, m.n_expert, m.expert_ffn_size
            ));
        }
        if self.moe.is_none() && self.ffn_size == 0 {
            return invalid("feed-forward width 0".into());
        }
        Ok(())
    }

    /// The rotary embedding of the global layers; `freq_factors` are per-frequency divisors (a
    /// GGUF file's `rope_freqs`, Llama 3.1's scaling).
    pub fn rope(&self, freq_factors: Option<&[f32]>) -> Rope {
        let rope =
            Rope::new(self.rope_style, &self.rope_scaling, self.rope_theta, self.head_dim, self.rope_dim, freq_factors);
        match self.rope_attention_factor {
            Some(f) => rope.with_attention_factor(f),
            None => rope,
        }
    }

    /// The rotary embedding of the sliding-window layers where it differs from the global one
    /// (Gemma 3's local layers: their own base, no scaling).
    pub fn local_rope(&self) -> Option<Rope> {
        let theta = self.rope_local_theta?;
        Some(Rope::new(self.rope_style, &RopeScaling::None, theta, self.head_dim, self.rope_dim, None))
    }

    /// Whether layer `layer` rotates with `local_rope` rather than the global rope.
    pub fn uses_local_rope(&self, layer: usize) -> bool {
        self.layer_windows[layer].is_some() && self.rope_local_theta.is_some()
    }

    /// The window every layer shares, when every layer slides (Mistral): blocks behind it can be
    /// freed for good.
    pub fn uniform_window(&self) -> Option<usize> {
        let first = self.layer_windows.first().copied().flatten()?;
        self.layer_windows.iter().all(|&w| w == Some(first)).then_some(first)
    }

    /// Floats of K plus V that one token occupies in one layer.
    pub fn kv_floats_per_token_layer(&self) -> usize {
        2 * self.n_kv_head * self.head_dim
    }
}
