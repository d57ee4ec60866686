//! `config.json` of a Hugging Face folder → `ModelConfig`, for every architecture braid runs.
//! Rope parameters come in two spellings and both are read: transformers 5's `rope_parameters`
//! (Gemma 3: one set per layer type) and the older top-level `rope_theta`, `rope_scaling`,
//! `rope_local_base_freq` and `partial_rotary_factor`, which most checkpoints still carry.

use serde_json::{Map, Value};

use crate::gguf::ModelError;
use crate::model::arch::{gemma3, hf_names};
use crate::model::config::{Activation, Architecture, ModelConfig, MoeConfig, RopeScaling, RopeStyle, SUPPORTED_LIST};
use crate::model::presets::llama3_freq_factors;

/// The `model_type`s braid reads, with the architecture each is.
const MODEL_TYPES: &[(&str, Architecture)] = &[
    ("llama", Architecture::Llama),
    ("mistral", Architecture::Mistral),
    ("qwen2", Architecture::Qwen2),
    ("qwen3", Architecture::Qwen3),
    ("qwen3_moe", Architecture::Qwen3Moe),
    ("mixtral", Architecture::Mixtral),
    ("gemma3_text", Architecture::Gemma3),
    ("phi3", Architecture::Phi3),
];

/// What `config.json` says beyond `ModelConfig`.
#[derive(Debug, Clone)]
pub struct HfConfig {
    pub config: ModelConfig,
    /// Per-frequency rope divisors (Llama 3 scaling, Phi-3 longrope's factors), given to the
    /// decoder as the `rope_freqs.weight` tensor a GGUF file would carry.
    pub rope_freqs: Option<Vec<f32>>,
    /// Whether the output projection is the embedding table.
    pub tied_embeddings: bool,
    pub vocab_size: Option<usize>,
    /// `torch_dtype` / `dtype`, as written.
    pub dtype: Option<String>,
}

/// Typed reads of one JSON object, with errors that name the key.
struct Keys<'a>(&'a Map<String, Value>);

impl<'a> Keys<'a> {
    /// A key's value, `None` when absent or null.
    fn get(&self, key: &str) -> Option<&'a Value> {
        self.0.get(key).filter(|v| !v.is_null())
    }
    fn opt_usize(&self, key: &str) -> Result<Option<usize>, ModelError> {
        self.get(key)
            .map(|v| v.as_u64().map(|n| n as usize).ok_or_else(|| wrong(key, v, "a non-negative integer")))
            .transpose()
    }
    fn usize(&self, key: &str) -> Result<usize, ModelError> {
        self.opt_usize(key)?.ok_or_else(|| missing(key))
    }
    fn opt_f64(&self, key: &str) -> Result<Option<f64>, ModelError> {
        self.get(key).map(|v| v.as_f64().ok_or_else(|| wrong(key, v, "a number"))).transpose()
    }
    fn opt_bool(&self, key: &str) -> Result<Option<bool>, ModelError> {
        self.get(key).map(|v| v.as_bool().ok_or_else(|| wrong(key, v, "true or false"))).transpose()
    }
    fn opt_str(&self, key: &str) -> Result<Option<&'a str>, ModelError> {
        self.get(key).map(|v| v.as_str().ok_or_else(|| wrong(key, v, "a string"))).transpose()
    }
    fn opt_object(&self, key: &str) -> Result<Option<Keys<'a>>, ModelError> {
        self.get(key).map(|v| v.as_object().map(Keys).ok_or_else(|| wrong(key, v, "an object"))).transpose()
    }
    fn opt_floats(&self, key: &str) -> Result<Option<Vec<f32>>, ModelError> {
        let Some(v) = self.get(key) else { return Ok(None) };
        let list = v.as_array().ok_or_else(|| wrong(key, v, "a list of numbers"))?;
        list.iter()
            .map(|x| x.as_f64().map(|f| f as f32).ok_or_else(|| wrong(key, v, "a list of numbers")))
            .collect::<Result<Vec<_>, _>>()
            .map(Some)
    }
}

fn missing(key: &str) -> ModelError {
    ModelError::Invalid(format!("config.json has no '{key}'"))
}

fn wrong(key: &str, v: &Value, what: &str) -> ModelError {
    ModelError::Invalid(format!("config.json '{key}' is {v}, expected {what}"))
}

/// One rope as a config describes it: base, scaling, and how much of each head rotates.
struct RopeSpec {
    theta: f64,
    /// `rope_type` (or the older `type`): default, linear, llama3, longrope, yarn, ...
    kind: String,
    params: Option<Map<String, Value>>,
}

impl RopeSpec {
    /// The rope of a parameter set (transformers 5's `rope_parameters`, or one layer type's).
    fn from_parameters(p: &Keys, fallback_theta: Option<f64>) -> Result<Self, ModelError> {
        let theta = p.opt_f64("rope_theta")?.or(fallback_theta).ok_or_else(|| missing("rope_parameters.rope_theta"))?;
        let kind = p.opt_str("rope_type")?.or(p.opt_str("type")?).unwrap_or("default").to_string();
        Ok(Self { theta, kind, params: Some(p.0.clone()) })
    }

    /// The older spelling: `rope_theta` and `rope_scaling` at the top level.
    fn from_old_keys(c: &Keys, default_theta: f64) -> Result<Self, ModelError> {
        let theta = c.opt_f64("rope_theta")?.unwrap_or(default_theta);
        match c.opt_object("rope_scaling")? {
            Some(s) => {
                let kind = s.opt_str("rope_type")?.or(s.opt_str("type")?).unwrap_or("default").to_string();
                Ok(Self { theta, kind, params: Some(s.0.clone()) })
            }
            None => Ok(Self { theta, kind: "default".into(), params: None }),
        }
    }

    fn param(&self, key: &str) -> Result<Option<f64>, ModelError> {
        match &self.params {
            Some(p) => Keys(p).opt_f64(key),
            None => Ok(None),
        }
    }

    fn required(&self, key: &str) -> Result<f64, ModelError> {
        self.param(key)?.ok_or_else(|| ModelError::Invalid(format!("rope scaling '{}' without '{key}'", self.kind)))
    }
}

/// The architecture a config names: `model_type`, else the class in `architectures`.
fn architecture(c: &Keys) -> Result<(Architecture, String), ModelError> {
    let model_type = c.opt_str("model_type")?.unwrap_or_default();
    if let Some((_, a)) = MODEL_TYPES.iter().find(|(t, _)| *t == model_type) {
        return Ok((*a, model_type.to_string()));
    }
    if model_type == "gemma3" {
        return Err(ModelError::Unsupported(
            "model_type 'gemma3' is the multimodal Gemma 3 (text_config, vision tower): braid runs the text-only \
             Gemma3ForCausalLM (model_type 'gemma3_text')"
                .into(),
        ));
    }
    let class = c.get("architectures").and_then(|a| a.get(0)).and_then(Value::as_str).unwrap_or_default();
    match hf_names::class_architecture(class) {
        Some(a) if model_type.is_empty() => Ok((a, class.to_string())),
        _ => Err(ModelError::UnsupportedArchitecture {
            name: if model_type.is_empty() { class.to_string() } else { model_type.to_string() },
            supported: SUPPORTED_LIST,
        }),
    }
}

fn activation(name: &str) -> Result<Activation, ModelError> {
    match name {
        "silu" | "swish" => Ok(Activation::Silu),
        // Gemma's `gelu_pytorch_tanh`; plain "gelu" in Gemma configs also means the tanh form.
        "gelu_pytorch_tanh" | "gelu_new" | "gelu" => Ok(Activation::GeluTanh),
        other => Err(ModelError::Unsupported(format!("activation '{other}' (braid has silu and gelu_pytorch_tanh)"))),
    }
}

/// Reads `config.json` (parsed). `served_context` is the context braid will serve when smaller
/// than the model's; it decides Phi-3 longrope's factor set.
pub fn parse(json: &Value, served_context: Option<usize>) -> Result<HfConfig, ModelError> {
    let c = Keys(json.as_object().ok_or_else(|| ModelError::Invalid("config.json is not a JSON object".into()))?);
    let (arch, model_type) = architecture(&c)?;
    let hidden_size = c.usize("hidden_size")?;
    let n_layer = c.usize("num_hidden_layers")?;
    let n_head = c.usize("num_attention_heads")?;
    if n_head == 0 {
        return Err(ModelError::Invalid("num_attention_heads is 0".into()));
    }
    let n_kv_head = c.opt_usize("num_key_value_heads")?.unwrap_or(n_head);
    let head_dim = match c.opt_usize("head_dim")? {
        Some(d) => d,
        None if hidden_size.is_multiple_of(n_head) => hidden_size / n_head,
        None => {
            return Err(ModelError::Invalid(format!(
                "hidden_size {hidden_size} is not a multiple of num_attention_heads {n_head}"
            )));
        }
    };
    let model_context = c.opt_usize("max_position_embeddings")?.unwrap_or(4096);
    let context_length = served_context.map_or(model_context, |s| s.min(model_context));
    let gemma = arch == Architecture::Gemma3;
    let act_key = if gemma { "hidden_activation" } else { "hidden_act" };
    let activation = activation(c.opt_str(act_key)?.or(c.opt_str("hidden_act")?).unwrap_or(if gemma {
        "gelu_pytorch_tanh"
    } else {
        "silu"
    }))?;
    // Biases braid's blocks have no place for: refused, not dropped.
    let attention_bias = c.opt_bool("attention_bias")?.unwrap_or(false);
    if attention_bias && arch != Architecture::Qwen2 {
        return Err(ModelError::Unsupported("attention_bias: true (a bias on the attention output)".into()));
    }
    if c.opt_bool("mlp_bias")?.unwrap_or(false) {
        return Err(ModelError::Unsupported("mlp_bias: true".into()));
    }
    for key in ["attn_logit_softcapping", "final_logit_softcapping"] {
        if c.get(key).is_some() {
            return Err(ModelError::Unsupported(format!("{key} (Gemma 2-style soft-capping)")));
        }
    }

    // Which layers slide: `layer_types` where given, else the family's rule.
    let window = c.opt_usize("sliding_window")?.filter(|&w| w > 0);
    let layer_types: Option<Vec<String>> = match c.get("layer_types") {
        None => None,
        Some(v) => Some(
            v.as_array()
                .and_then(|a| a.iter().map(|t| t.as_str().map(str::to_string)).collect::<Option<Vec<_>>>())
                .ok_or_else(|| wrong("layer_types", v, "a list of strings"))?,
        ),
    };
    let layer_windows: Vec<Option<usize>> = match &layer_types {
        Some(types) => {
            if types.len() != n_layer {
                return Err(ModelError::Invalid(format!("{} layer_types for {n_layer} layers", types.len())));
            }
            types
                .iter()
                .map(|t| match t.as_str() {
                    "full_attention" => Ok(None),
                    "sliding_attention" => window
                        .map(Some)
                        .ok_or_else(|| ModelError::Invalid("a sliding_attention layer without sliding_window".into())),
                    other => Err(ModelError::Unsupported(format!("layer type '{other}'"))),
                })
                .collect::<Result<_, _>>()?
        }
        None if gemma => {
            let pattern = match c.opt_usize("sliding_window_pattern")? {
                Some(p) => p,
                None => c.opt_usize("_sliding_window_pattern")?.unwrap_or(gemma3::GLOBAL_EVERY),
            };
            let w = window.unwrap_or(512);
            (0..n_layer).map(|l| if pattern > 0 && (l + 1) % pattern == 0 { None } else { Some(w) }).collect()
        }
        // Qwen2/3 slide only with use_sliding_window, on the layers from max_window_layers on.
        None if matches!(arch, Architecture::Qwen2 | Architecture::Qwen3 | Architecture::Qwen3Moe) => {
            let from = c.opt_usize("max_window_layers")?.unwrap_or(n_layer);
            let on = c.opt_bool("use_sliding_window")?.unwrap_or(false);
            (0..n_layer).map(|l| if on && l >= from { window } else { None }).collect()
        }
        None => vec![window; n_layer],
    };

    // Rope: the global one, and Gemma's local one.
    let default_theta = 10_000.0;
    let partial = c.opt_f64("partial_rotary_factor")?;
    let (global, local) = match c.opt_object("rope_parameters")? {
        Some(p) if gemma && (p.get("full_attention").is_some() || p.get("sliding_attention").is_some()) => {
            let full = p.opt_object("full_attention")?.ok_or_else(|| missing("rope_parameters.full_attention"))?;
            let global = RopeSpec::from_parameters(&full, c.opt_f64("rope_theta")?)?;
            let local = match p.opt_object("sliding_attention")? {
                Some(s) => Some(RopeSpec::from_parameters(&s, Some(gemma3::LOCAL_ROPE_THETA as f64))?),
                None => None,
            };
            (global, local)
        }
        Some(p) => (RopeSpec::from_parameters(&p, c.opt_f64("rope_theta")?)?, None),
        None => (RopeSpec::from_old_keys(&c, default_theta)?, None),
    };
    let partial = match partial {
        Some(p) => Some(p),
        None => global.param("partial_rotary_factor")?,
    };
    let rope_dim = match partial {
        Some(f) if !(f > 0.0 && f <= 1.0) => {
            return Err(ModelError::Invalid(format!("partial_rotary_factor {f}")));
        }
        Some(f) => (head_dim as f64 * f).round() as usize,
        None => head_dim,
    };
    let mut config = ModelConfig {
        architecture: arch,
        name: model_type.clone(),
        n_layer,
        hidden_size,
        ffn_size: c.opt_usize("intermediate_size")?.unwrap_or(0),
        n_head,
        n_kv_head,
        head_dim,
        rope_dim,
        rope_theta: global.theta as f32,
        // Hugging Face rotates halves (no Q/K row permutation as GGUF llama files have).
        rope_style: RopeStyle::Neox,
        rope_scaling: RopeScaling::None,
        rope_local_theta: None,
        rope_attention_factor: None,
        rope_long_factors: false,
        rope_original_context: None,
        rms_eps: c.opt_f64("rms_norm_eps")?.unwrap_or(1e-6) as f32,
        context_length,
        qkv_bias: arch == Architecture::Qwen2 || attention_bias,
        qk_norm: matches!(arch, Architecture::Qwen3 | Architecture::Qwen3Moe | Architecture::Gemma3),
        layer_windows,
        attention_scale: 1.0 / (head_dim as f32).sqrt(),
        activation,
        embedding_scale: None,
        post_norms: false,
        moe: None,
    };

    let rope_freqs = match global.kind.as_str() {
        "default" => None,
        "linear" => {
            let factor = global.required("factor")? as f32;
            if factor != 1.0 {
                config.rope_scaling = RopeScaling::Linear { factor };
            }
            None
        }
        "llama3" => Some(llama3_freq_factors(
            &config,
            global.required("factor")?,
            global.required("low_freq_factor")?,
            global.required("high_freq_factor")?,
            global.required("original_max_position_embeddings")?,
        )),
        "longrope" | "su" => {
            let p = Keys(global.params.as_ref().expect("longrope comes from a parameter set"));
            let original = match global.param("original_max_position_embeddings")? {
                Some(o) => o as usize,
                None => c.usize("original_max_position_embeddings")?,
            };
            // As llama.cpp does: the long factors when the served context exceeds the original
            // one, else the short ones. (transformers picks per forward pass by its length.)
            let which = if context_length > original { "long_factor" } else { "short_factor" };
            let factors = p.opt_floats(which)?.ok_or_else(|| missing(&format!("rope_scaling.{which}")))?;
            if factors.len() != rope_dim / 2 {
                return Err(ModelError::Invalid(format!(
                    "rope_scaling.{which} has {} factors for {} rotated pairs",
                    factors.len(),
                    rope_dim / 2
                )));
            }
            let attention_factor = match global.param("attention_factor")? {
                Some(f) => f,
                None if model_context > original => {
                    let scale = model_context as f64 / original as f64;
                    (1.0 + scale.ln() / (original as f64).ln()).sqrt()
                }
                None => 1.0,
            };
            config.rope_attention_factor = Some(attention_factor as f32);
            Some(factors)
        }
        other => {
            return Err(ModelError::Unsupported(format!(
                "rope scaling '{other}' (braid reads default, linear, llama3 and longrope)"
            )));
        }
    };

    match arch {
        Architecture::Gemma3 => {
            config.post_norms = true;
            config.embedding_scale = Some((hidden_size as f32).sqrt());
            let scalar = c.opt_f64("query_pre_attn_scalar")?.unwrap_or(head_dim as f64);
            config.attention_scale = (1.0 / scalar.sqrt()) as f32;
            let local_theta = match &local {
                Some(l) if l.kind != "default" => {
                    return Err(ModelError::Unsupported(format!(
                        "rope scaling '{}' on Gemma 3's sliding layers",
                        l.kind
                    )));
                }
                Some(l) => l.theta,
                None => c.opt_f64("rope_local_base_freq")?.unwrap_or(gemma3::LOCAL_ROPE_THETA as f64),
            };
            config.rope_local_theta = Some(local_theta as f32);
        }
        Architecture::Qwen3Moe | Architecture::Mixtral => {
            let n_expert = match c.opt_usize("num_experts")? {
                Some(n) => n,
                None => c.usize("num_local_experts")?,
            };
            let (expert_ffn_size, norm_top_k, dense_layers) = if arch == Architecture::Mixtral {
                (c.usize("intermediate_size")?, true, Vec::new())
            } else {
                let step = c.opt_usize("decoder_sparse_step")?.unwrap_or(1);
                let only: Vec<usize> = match c.get("mlp_only_layers") {
                    None => Vec::new(),
                    Some(v) => v
                        .as_array()
                        .and_then(|a| a.iter().map(|x| x.as_u64().map(|n| n as usize)).collect::<Option<Vec<_>>>())
                        .ok_or_else(|| wrong("mlp_only_layers", v, "a list of layer numbers"))?,
                };
                // transformers' rule: a layer is sparse unless listed, and only every step-th.
                let dense =
                    (0..n_layer).filter(|l| only.contains(l) || step == 0 || !(l + 1).is_multiple_of(step)).collect();
                (c.usize("moe_intermediate_size")?, c.opt_bool("norm_topk_prob")?.unwrap_or(false), dense)
            };
            config.moe = Some(MoeConfig {
                n_expert,
                n_expert_used: c.usize("num_experts_per_tok")?,
                expert_ffn_size,
                norm_top_k,
                dense_layers,
            });
        }
        _ => {}
    }
    config.validate()?;
    let tied_embeddings = c.opt_bool("tie_word_embeddings")?.unwrap_or(gemma);
    Ok(HfConfig {
        config,
        rope_freqs,
        tied_embeddings,
        vocab_size: c.opt_usize("vocab_size")?,
        dtype: c.opt_str("torch_dtype")?.or(c.opt_str("dtype")?).map(str::to_string),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn base() -> Value {
        json!({"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
               "num_key_value_heads": 2, "intermediate_size": 128, "rms_norm_eps": 1e-5,
               "max_position_embeddings": 512})
    }

    fn with(mut v: Value, extra: Value) -> Value {
        for (k, x) in extra.as_object().unwrap() {
            v[k] = x.clone();
        }
        v
    }

    #[test]
    fn old_and_new_rope_spellings_agree() {
        let old =
            parse(&with(base(), json!({"rope_theta": 5e5, "rope_scaling": {"type": "linear", "factor": 4.0}})), None)
                .unwrap();
        let new = parse(
            &with(base(), json!({"rope_parameters": {"rope_theta": 5e5, "rope_type": "linear", "factor": 4.0}})),
            None,
        )
        .unwrap();
        for c in [&old.config, &new.config] {
            assert_eq!(c.rope_theta, 5e5);
            assert_eq!(c.rope_scaling, RopeScaling::Linear { factor: 4.0 });
            assert_eq!(c.rope_style, RopeStyle::Neox);
        }
    }

    #[test]
    fn unknown_model_types_and_ropes_are_refused_by_name() {
        let e = parse(&with(base(), json!({"model_type": "gpt2"})), None).unwrap_err().to_string();
        assert!(e.contains("gpt2") && e.contains("qwen3_moe"), "{e}");
        let e = parse(&with(base(), json!({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}})), None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("yarn"), "{e}");
        let e = parse(&with(base(), json!({"hidden_size": "64"})), None).unwrap_err().to_string();
        assert!(e.contains("hidden_size"), "{e}");
        let e = parse(&with(base(), json!({"attention_bias": true})), None).unwrap_err().to_string();
        assert!(e.contains("attention_bias"), "{e}");
    }

    #[test]
    fn qwen_slides_only_with_use_sliding_window_from_max_window_layers() {
        let q = with(base(), json!({"model_type": "qwen2", "sliding_window": 16, "max_window_layers": 1}));
        assert_eq!(parse(&q, None).unwrap().config.layer_windows, vec![None, None]);
        let q = with(q, json!({"use_sliding_window": true}));
        assert_eq!(parse(&q, None).unwrap().config.layer_windows, vec![None, Some(16)]);
    }

    #[test]
    fn gemma_without_layer_types_follows_its_pattern() {
        let g = with(
            base(),
            json!({"model_type": "gemma3_text", "num_hidden_layers": 6, "sliding_window": 4,
                   "sliding_window_pattern": 3, "rope_local_base_freq": 20000.0, "query_pre_attn_scalar": 16}),
        );
        let c = parse(&g, None).unwrap().config;
        assert_eq!(c.layer_windows, vec![Some(4), Some(4), None, Some(4), Some(4), None]);
        assert_eq!(c.rope_local_theta, Some(20000.0));
        assert_eq!(c.attention_scale, 0.25);
        assert_eq!(c.activation, Activation::GeluTanh);
    }

    #[test]
    fn qwen3_moe_dense_layers_follow_mlp_only_layers_and_the_step() {
        let m = with(
            base(),
            json!({"model_type": "qwen3_moe", "num_hidden_layers": 4, "num_experts": 8, "num_experts_per_tok": 2,
                   "moe_intermediate_size": 32, "decoder_sparse_step": 2, "mlp_only_layers": [3]}),
        );
        let moe = parse(&m, None).unwrap().config.moe.unwrap();
        assert_eq!(moe.dense_layers, vec![0, 2, 3]);
        assert!(!moe.norm_top_k);
    }
}
