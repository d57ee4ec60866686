//! The llama family (SmolLM2, Llama 2/3, Mistral, TinyLlama; Qwen2 adds Q/K/V biases and
//! NeoX rope). Forward takes a flat batch and reads/writes an external paged KV cache.

use std::sync::Arc;

use candle_core::quantized::QTensor;
use candle_core::{Device, Tensor};

use super::config::ModelConfig;
use super::dump;
use super::kv_cache::KvCache;
use super::presets::Preset;
use crate::backend::FlatBatch;
use crate::cpu::attention::{AttentionPlan, AttentionShape, paged_attention, write_kv};
use crate::cpu::linear::QLinear;
use crate::cpu::norm::rms_norm_row;
use crate::cpu::rope::Rope;
use crate::cpu::vmath::silu_mul;
use crate::gguf::{GgufFile, ModelError};

/// The llama family's tensors in a GGUF file (llama.cpp's names): the one place they are
/// spelled, for the CPU loader here and the CUDA one (`gpu/weights.rs`).
pub mod tensors {
    pub const TOKEN_EMBD: &str = "token_embd.weight";
    /// Absent when the output projection is the embedding table (tied embeddings).
    pub const OUTPUT: &str = "output.weight";
    pub const OUTPUT_NORM: &str = "output_norm.weight";
    /// Llama 3.1-style rope scaling's per-frequency divisors, where a model ships them.
    pub const ROPE_FREQS: &str = "rope_freqs.weight";

    /// The tensors of one block.
    pub struct Layer {
        pub attn_norm: String,
        pub q: String,
        pub k: String,
        pub v: String,
        /// The Q, K and V biases, where the config says so (Qwen2).
        pub q_bias: String,
        pub k_bias: String,
        pub v_bias: String,
        pub o: String,
        pub ffn_norm: String,
        pub gate: String,
        pub up: String,
        pub down: String,
    }

    impl Layer {
        pub fn new(layer: usize) -> Self {
            let name = |s: &str| format!("blk.{layer}.{s}");
            Self {
                attn_norm: name("attn_norm.weight"),
                q: name("attn_q.weight"),
                k: name("attn_k.weight"),
                v: name("attn_v.weight"),
                q_bias: name("attn_q.bias"),
                k_bias: name("attn_k.bias"),
                v_bias: name("attn_v.bias"),
                o: name("attn_output.weight"),
                ffn_norm: name("ffn_norm.weight"),
                gate: name("ffn_gate.weight"),
                up: name("ffn_up.weight"),
                down: name("ffn_down.weight"),
            }
        }
    }
}

/// A linear layer with an optional bias, over rows held in plain vectors.
struct Linear {
    weight: QLinear,
    bias: Option<Vec<f32>>,
}

impl Linear {
    fn forward(&self, x: &[f32], rows: usize) -> candle_core::Result<Vec<f32>> {
        let mut y = self.weight.forward_rows(x, rows)?;
        if let Some(b) = &self.bias {
            for row in y.chunks_exact_mut(b.len()) {
                for (v, bi) in row.iter_mut().zip(b) {
                    *v += bi;
                }
            }
        }
        Ok(y)
    }

    /// Several layers that read the same input, as one (outputs side by side).
    fn stack(parts: Vec<Linear>) -> Linear {
        let bias = if parts.iter().any(|p| p.bias.is_some()) {
            Some(
                parts
                    .iter()
                    .flat_map(|p| p.bias.clone().unwrap_or_else(|| vec![0.0; p.weight.out_features()]))
                    .collect(),
            )
        } else {
            None
        };
        Linear { weight: QLinear::stack(parts.into_iter().map(|p| p.weight).collect()), bias }
    }
}

struct Layer {
    attn_norm: Vec<f32>,
    /// Q, K and V projections stacked: each output row is [q | k | v].
    qkv: Linear,
    wo: Linear,
    ffn_norm: Vec<f32>,
    /// Gate and up projections stacked: each output row is [gate | up].
    gate_up: Linear,
    w_down: Linear,
}

enum Embeddings {
    SameAsOutput,
    Table(Arc<QTensor>),
    /// A table of a type braid reads natively (dummy models).
    Rows(QLinear),
}

pub struct Llama {
    pub config: ModelConfig,
    device: Device,
    /// Token table for lookups: the output projection itself when tied and natively supported.
    embeddings: Embeddings,
    layers: Vec<Layer>,
    norm: Vec<f32>,
    output: Arc<QLinear>,
    rope: Rope,
    vocab_size: usize,
}

impl Llama {
    pub fn load(file: &mut GgufFile, config: ModelConfig, device: &Device) -> Result<Self, ModelError> {
        let c = &config;
        let (h, q_out, kv_out) = (c.hidden_size, c.n_head * c.head_dim, c.n_kv_head * c.head_dim);
        let vocab_size = file
            .tensor_dims(tensors::TOKEN_EMBD)
            .and_then(|d| d.first().copied())
            .ok_or_else(|| ModelError::MissingTensor(tensors::TOKEN_EMBD.into()))?;
        let table = Arc::new(file.tensor(tensors::TOKEN_EMBD, &[vocab_size, h], device)?);
        let (embeddings, output) = if file.has_tensor(tensors::OUTPUT) {
            let output = QLinear::new(Arc::new(file.tensor(tensors::OUTPUT, &[vocab_size, h], device)?))?;
            (Embeddings::Table(table), Arc::new(output))
        } else {
            // Tied embeddings: the output projection is the embedding table.
            let output = QLinear::new(table.clone())?;
            if output.supports_rows() {
                (Embeddings::SameAsOutput, Arc::new(output))
            } else {
                (Embeddings::Table(table), Arc::new(output))
            }
        };
        let vector = |file: &mut GgufFile, name: &str, n: usize| -> Result<Vec<f32>, ModelError> {
            Ok(file.tensor(name, &[n], device)?.dequantize(device)?.to_vec1::<f32>()?)
        };
        let linear = |file: &mut GgufFile,
                      name: &str,
                      bias: Option<&str>,
                      out: usize,
                      inp: usize|
         -> Result<Linear, ModelError> {
            let weight = QLinear::new(Arc::new(file.tensor(name, &[out, inp], device)?))?;
            let bias = match bias {
                Some(b) => Some(vector(file, b, out)?),
                None => None,
            };
            Ok(Linear { weight, bias })
        };
        let mut layers = Vec::with_capacity(c.n_layer);
        for i in 0..c.n_layer {
            let t = tensors::Layer::new(i);
            let bias = |name| c.qkv_bias.then_some(name);
            let q = linear(file, &t.q, bias(t.q_bias.as_str()), q_out, h)?;
            let k = linear(file, &t.k, bias(t.k_bias.as_str()), kv_out, h)?;
            let v = linear(file, &t.v, bias(t.v_bias.as_str()), kv_out, h)?;
            let gate = linear(file, &t.gate, None, c.ffn_size, h)?;
            let up = linear(file, &t.up, None, c.ffn_size, h)?;
            layers.push(Layer {
                attn_norm: vector(file, &t.attn_norm, h)?,
                qkv: Linear::stack(vec![q, k, v]),
                wo: linear(file, &t.o, None, h, q_out)?,
                ffn_norm: vector(file, &t.ffn_norm, h)?,
                gate_up: Linear::stack(vec![gate, up]),
                w_down: linear(file, &t.down, None, h, c.ffn_size)?,
            });
        }
        let norm = vector(file, tensors::OUTPUT_NORM, h)?;
        // Llama 3.1-style rope scaling ships per-frequency divisors as a tensor.
        let freq_factors = if file.has_tensor(tensors::ROPE_FREQS) {
            Some(vector(file, tensors::ROPE_FREQS, c.rope_dim / 2)?)
        } else {
            None
        };
        let rope = c.rope(freq_factors.as_deref());
        Ok(Self { config, device: device.clone(), embeddings, layers, norm, output, rope, vocab_size })
    }

    /// A model of the preset's shape with dummy bf16 weights (`presets.rs`), the same ones the
    /// CUDA path draws for the same seed.
    pub fn dummy(preset: &Preset, seed: u64) -> Self {
        use super::presets::{DummyTensor as T, dummy_bf16, dummy_f32};
        let c = preset.config.clone();
        let (h, q_out, kv_out, ffn, vocab) =
            (c.hidden_size, c.n_head * c.head_dim, c.n_kv_head * c.head_dim, c.ffn_size, preset.vocab_size);
        let matrix = |t: T, n: usize, k: usize| QLinear::from_bf16(n, k, dummy_bf16(t.draw(&c, seed), n * k));
        let vector = |t: T, n: usize| dummy_f32(t.draw(&c, seed), n);
        let layers = (0..c.n_layer)
            .map(|l| {
                let mut qkv = Linear {
                    weight: QLinear::stack(vec![
                        matrix(T::Q(l), q_out, h),
                        matrix(T::K(l), kv_out, h),
                        matrix(T::V(l), kv_out, h),
                    ]),
                    bias: None,
                };
                if c.qkv_bias {
                    qkv.bias = Some(vector(T::QkvBias(l), q_out + 2 * kv_out));
                }
                Layer {
                    attn_norm: vector(T::AttnNorm(l), h),
                    qkv,
                    wo: Linear { weight: matrix(T::O(l), h, q_out), bias: None },
                    ffn_norm: vector(T::FfnNorm(l), h),
                    gate_up: Linear {
                        weight: QLinear::stack(vec![matrix(T::Gate(l), ffn, h), matrix(T::Up(l), ffn, h)]),
                        bias: None,
                    },
                    w_down: Linear { weight: matrix(T::Down(l), h, ffn), bias: None },
                }
            })
            .collect();
        let (embeddings, output) = if preset.tied_embeddings {
            (Embeddings::SameAsOutput, matrix(T::Embeddings, vocab, h))
        } else {
            (Embeddings::Rows(matrix(T::Embeddings, vocab, h)), matrix(T::Output, vocab, h))
        };
        let rope = c.rope(preset.rope_freq_factors.as_deref());
        let norm = vector(T::OutputNorm, h);
        Self {
            config: c,
            device: Device::Cpu,
            embeddings,
            layers,
            norm,
            output: Arc::new(output),
            rope,
            vocab_size: vocab,
        }
    }

    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// One forward pass over a flat batch. Returns `[batch.logit_rows.len(), vocab]` f32 logits.
    ///
    /// Activations stay in plain row-major vectors between braid's kernels: no tensor
    /// allocations or extra thread pools per step.
    pub fn forward(&self, batch: &FlatBatch, kv: &mut KvCache) -> candle_core::Result<Tensor> {
        let c = &self.config;
        let n_tokens = batch.tokens.len();
        let hidden = c.hidden_size;
        let mut x = match &self.embeddings {
            Embeddings::SameAsOutput => self.output.rows(&batch.tokens)?,
            Embeddings::Rows(t) => t.rows(&batch.tokens)?,
            Embeddings::Table(t) => t
                .embedding(&Tensor::from_slice(&batch.tokens, n_tokens, &self.device)?)?
                .flatten_all()?
                .to_vec1::<f32>()?,
        };
        let plan = AttentionPlan::new(batch, kv.block_size);
        let (cos, sin) = self.rope.tables(&batch.positions);
        let half = self.rope.half_dim();
        let shape = AttentionShape { n_head: c.n_head, n_kv_head: c.n_kv_head, head_dim: c.head_dim };
        let (qw, kw) = (c.n_head * c.head_dim, c.n_kv_head * c.head_dim);
        let ffn = c.ffn_size;
        let mut q = vec![0f32; n_tokens * qw];
        let mut k = vec![0f32; n_tokens * kw];
        let mut v = vec![0f32; n_tokens * kw];
        let mut act = vec![0f32; n_tokens * ffn];
        let step = dump::next_step();
        dump::tensor(step, || "embd".into(), &x);
        for (l, (layer, layer_kv)) in self.layers.iter().zip(kv.layers.iter_mut()).enumerate() {
            let h = rms_norm_rows(&x, &layer.attn_norm, c.rms_eps);
            dump::tensor(step, || format!("attn_norm-{l}"), &h);
            let qkv = layer.qkv.forward(&h, n_tokens)?;
            dump::tensor(step, || format!("qkv-{l}"), &qkv);
            for (t, row) in qkv.chunks_exact(qw + 2 * kw).enumerate() {
                let (ct, st) = (&cos[t * half..(t + 1) * half], &sin[t * half..(t + 1) * half]);
                let (qt, kt) = (&mut q[t * qw..(t + 1) * qw], &mut k[t * kw..(t + 1) * kw]);
                qt.copy_from_slice(&row[..qw]);
                kt.copy_from_slice(&row[qw..qw + kw]);
                v[t * kw..(t + 1) * kw].copy_from_slice(&row[qw + kw..]);
                self.rope.apply(qt, ct, st);
                self.rope.apply(kt, ct, st);
            }
            dump::tensor(step, || format!("Qcur-{l}"), &q);
            dump::tensor(step, || format!("Kcur-{l}"), &k);
            write_kv(&plan, layer_kv, &k, &v, kw);
            let attn = paged_attention(batch, &plan, layer_kv, &q, &shape);
            dump::tensor(step, || format!("kqv_out-{l}"), &attn);
            add_into(&mut x, &layer.wo.forward(&attn, n_tokens)?);
            dump::tensor(step, || format!("ffn_inp-{l}"), &x);
            let h = rms_norm_rows(&x, &layer.ffn_norm, c.rms_eps);
            let gate_up = layer.gate_up.forward(&h, n_tokens)?;
            dump::tensor(step, || format!("gate_up-{l}"), &gate_up);
            for (row, out) in gate_up.chunks_exact(2 * ffn).zip(act.chunks_exact_mut(ffn)) {
                let (gate, up) = row.split_at(ffn);
                silu_mul(gate, up, out);
            }
            dump::tensor(step, || format!("ffn_swiglu-{l}"), &act);
            add_into(&mut x, &layer.w_down.forward(&act, n_tokens)?);
            dump::tensor(step, || format!("l_out-{l}"), &x);
        }
        let mut last = Vec::with_capacity(batch.logit_rows.len() * hidden);
        for &r in &batch.logit_rows {
            last.extend_from_slice(&x[r * hidden..(r + 1) * hidden]);
        }
        let last = rms_norm_rows(&last, &self.norm, c.rms_eps);
        let logits = self.output.forward_rows(&last, batch.logit_rows.len())?;
        dump::tensor(step, || "result_output".into(), &logits);
        Tensor::from_vec(logits, (batch.logit_rows.len(), self.vocab_size), &Device::Cpu)
    }
}

fn add_into(x: &mut [f32], y: &[f32]) {
    for (a, b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

fn rms_norm_rows(x: &[f32], weight: &[f32], eps: f32) -> Vec<f32> {
    let mut out = x.to_vec();
    for row in out.chunks_exact_mut(weight.len()) {
        rms_norm_row(row, weight, eps);
    }
    out
}
