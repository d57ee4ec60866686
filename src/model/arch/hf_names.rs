//! Tensor names in Hugging Face folders, by the GGUF name braid asks for: the table
//! `convert_hf_to_gguf.py` applies, in reverse. One table serves every architecture; the
//! entries that differ by family say so.

use crate::model::config::Architecture;

/// The Hugging Face model classes (`architectures` in config.json) braid reads, and the
/// architecture each is: the loader's fallback when `model_type` is absent, and what
/// `braid convert` goes by.
pub const HF_CLASSES: &[(&str, Architecture)] = &[
    ("LlamaForCausalLM", Architecture::Llama),
    ("MistralForCausalLM", Architecture::Mistral),
    ("MixtralForCausalLM", Architecture::Mixtral),
    ("Qwen2ForCausalLM", Architecture::Qwen2),
    ("Qwen3ForCausalLM", Architecture::Qwen3),
    ("Qwen3MoeForCausalLM", Architecture::Qwen3Moe),
    ("Gemma3ForCausalLM", Architecture::Gemma3),
    ("Phi3ForCausalLM", Architecture::Phi3),
];

/// The architecture of a Hugging Face model class, if braid reads it.
pub fn class_architecture(class: &str) -> Option<Architecture> {
    HF_CLASSES.iter().find(|(name, _)| *name == class).map(|&(_, a)| a)
}

/// The Hugging Face name of a non-expert tensor (GGUF name in, `None` if the architecture
/// has no such tensor).
pub fn hf_name(arch: Architecture, gguf: &str) -> Option<String> {
    let top = match gguf {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(t) = top {
        return Some(t.to_string());
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, suffix) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let gemma = arch == Architecture::Gemma3;
    let mixtral = arch == Architecture::Mixtral;
    let local = match suffix {
        "attn_norm.weight" => "input_layernorm.weight",
        "attn_q.weight" => "self_attn.q_proj.weight",
        "attn_k.weight" => "self_attn.k_proj.weight",
        "attn_v.weight" => "self_attn.v_proj.weight",
        "attn_q.bias" => "self_attn.q_proj.bias",
        "attn_k.bias" => "self_attn.k_proj.bias",
        "attn_v.bias" => "self_attn.v_proj.bias",
        "attn_qkv.weight" => "self_attn.qkv_proj.weight",
        "attn_q_norm.weight" => "self_attn.q_norm.weight",
        "attn_k_norm.weight" => "self_attn.k_norm.weight",
        "attn_output.weight" => "self_attn.o_proj.weight",
        // Gemma's four norms: the one after attention is HF's post_attention_layernorm, which
        // in llama-like models is the norm before the feed-forward network.
        "post_attention_norm.weight" if gemma => "post_attention_layernorm.weight",
        "ffn_norm.weight" if gemma => "pre_feedforward_layernorm.weight",
        "post_ffw_norm.weight" if gemma => "post_feedforward_layernorm.weight",
        "ffn_norm.weight" => "post_attention_layernorm.weight",
        // Phi-3 keeps gate and up in one matrix, named as the up projection in GGUF.
        "ffn_up.weight" if arch == Architecture::Phi3 => "mlp.gate_up_proj.weight",
        "ffn_gate.weight" => "mlp.gate_proj.weight",
        "ffn_up.weight" => "mlp.up_proj.weight",
        "ffn_down.weight" => "mlp.down_proj.weight",
        "ffn_gate_inp.weight" if mixtral => "block_sparse_moe.gate.weight",
        "ffn_gate_inp.weight" => "mlp.gate.weight",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{local}"))
}

/// The Hugging Face names of expert `e`'s matrix for a stacked GGUF expert tensor
/// (`blk.N.ffn_{gate,up,down}_exps.weight`), per-expert as checkpoints store them.
pub fn hf_expert_name(arch: Architecture, gguf: &str, e: usize) -> Option<String> {
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, suffix) = rest.split_once('.')?;
    let which = match (arch, suffix) {
        (Architecture::Mixtral, "ffn_gate_exps.weight") => "block_sparse_moe.experts.{e}.w1.weight",
        (Architecture::Mixtral, "ffn_down_exps.weight") => "block_sparse_moe.experts.{e}.w2.weight",
        (Architecture::Mixtral, "ffn_up_exps.weight") => "block_sparse_moe.experts.{e}.w3.weight",
        (_, "ffn_gate_exps.weight") => "mlp.experts.{e}.gate_proj.weight",
        (_, "ffn_up_exps.weight") => "mlp.experts.{e}.up_proj.weight",
        (_, "ffn_down_exps.weight") => "mlp.experts.{e}.down_proj.weight",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{}", which.replace("{e}", &e.to_string())))
}

/// Whether a norm's weight is stored as `w` where braid (and GGUF) multiply by `1 + w`:
/// Gemma's RMS norms, whose offset `convert_hf_to_gguf.py` folds in.
pub fn norm_has_unit_offset(arch: Architecture, gguf: &str) -> bool {
    arch == Architecture::Gemma3 && gguf.ends_with("norm.weight")
}
