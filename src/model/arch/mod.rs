//! What sets each architecture apart from the shared decoder (`model/decoder.rs`), one file
//! each: its config quirks, and the names its tensors have in a Hugging Face folder. Inside
//! braid every tensor is named as llama.cpp names it in GGUF files (`names` below).

pub mod gemma3;
pub mod hf_names;

/// llama.cpp's GGUF tensor names: the one place they are spelled.
pub mod names {
    pub const TOKEN_EMBD: &str = "token_embd.weight";
    /// Absent when the output projection is the embedding table (tied embeddings).
    pub const OUTPUT: &str = "output.weight";
    pub const OUTPUT_NORM: &str = "output_norm.weight";
    /// Llama 3.1-style rope scaling's per-frequency divisors, where a model ships them.
    pub const ROPE_FREQS: &str = "rope_freqs.weight";
    /// Phi-3 longrope's two sets of per-frequency divisors (GGUF files ship both).
    pub const ROPE_FACTORS_LONG: &str = "rope_factors_long.weight";
    pub const ROPE_FACTORS_SHORT: &str = "rope_factors_short.weight";

    /// The tensors of block `layer`.
    pub struct Layer {
        pub attn_norm: String,
        pub q: String,
        pub k: String,
        pub v: String,
        /// Q, K and V in one matrix (Phi-3).
        pub qkv: String,
        pub q_bias: String,
        pub k_bias: String,
        pub v_bias: String,
        pub q_norm: String,
        pub k_norm: String,
        pub o: String,
        /// Gemma 3's norm of the attention output.
        pub post_attn_norm: String,
        pub ffn_norm: String,
        pub gate: String,
        /// The up projection, or gate and up in one matrix (Phi-3).
        pub up: String,
        pub down: String,
        /// Gemma 3's norm of the feed-forward output.
        pub post_ffn_norm: String,
        /// A mixture of experts: the router and the experts' stacked matrices.
        pub router: String,
        pub gate_exps: String,
        pub up_exps: String,
        pub down_exps: String,
    }

    impl Layer {
        pub fn new(layer: usize) -> Self {
            let name = |s: &str| format!("blk.{layer}.{s}");
            Self {
                attn_norm: name("attn_norm.weight"),
                q: name("attn_q.weight"),
                k: name("attn_k.weight"),
                v: name("attn_v.weight"),
                qkv: name("attn_qkv.weight"),
                q_bias: name("attn_q.bias"),
                k_bias: name("attn_k.bias"),
                v_bias: name("attn_v.bias"),
                q_norm: name("attn_q_norm.weight"),
                k_norm: name("attn_k_norm.weight"),
                o: name("attn_output.weight"),
                post_attn_norm: name("post_attention_norm.weight"),
                ffn_norm: name("ffn_norm.weight"),
                gate: name("ffn_gate.weight"),
                up: name("ffn_up.weight"),
                down: name("ffn_down.weight"),
                post_ffn_norm: name("post_ffw_norm.weight"),
                router: name("ffn_gate_inp.weight"),
                gate_exps: name("ffn_gate_exps.weight"),
                up_exps: name("ffn_up_exps.weight"),
                down_exps: name("ffn_down_exps.weight"),
            }
        }
    }
}
