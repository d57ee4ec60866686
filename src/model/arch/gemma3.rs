//! Gemma 3 (text): interleaved local (sliding-window) and global layers with their own rope
//! bases, RMS norms on Q and K, norms before and after both attention and the feed-forward
//! network, GeGLU, embeddings scaled by sqrt(hidden), head dimension 256.

use crate::model::config::{Activation, Architecture, ModelConfig};

/// One layer in this many is global (`(layer + 1) % 6 == 0`); the others slide.
pub const GLOBAL_EVERY: usize = 6;
/// The rope base of the local layers, which GGUF files do not record (llama.cpp fixes it too).
pub const LOCAL_ROPE_THETA: f32 = 10_000.0;

/// The pattern of layer types when a config gives none.
pub fn default_windows(n_layer: usize, window: usize) -> Vec<Option<usize>> {
    (0..n_layer).map(|l| if (l + 1) % GLOBAL_EVERY == 0 { None } else { Some(window) }).collect()
}

/// What a GGUF file of Gemma 3 leaves implicit.
pub fn adjust_gguf_config(c: &mut ModelConfig, window: Option<usize>) {
    c.architecture = Architecture::Gemma3;
    c.qk_norm = true;
    c.post_norms = true;
    c.activation = Activation::GeluTanh;
    c.embedding_scale = Some((c.hidden_size as f32).sqrt());
    c.rope_local_theta = Some(LOCAL_ROPE_THETA);
    c.layer_windows = default_windows(c.n_layer, window.unwrap_or(512));
    // Scores are scaled by query_pre_attn_scalar^-1/2, which GGUF does not record: it is the
    // head dimension except in the 27B model (62 layers), where it is hidden / heads.
    let scalar = if c.n_layer == 62 { c.hidden_size / c.n_head } else { c.head_dim };
    c.attention_scale = 1.0 / (scalar as f32).sqrt();
}
