//! The llama family (SmolLM2, Llama 2/3, Mistral, TinyLlama; Qwen2 adds Q/K/V biases and
//! NeoX rope). Forward takes a flat batch and reads/writes an external paged KV cache.

use std::sync::Arc;

use candle_core::quantized::QTensor;
use candle_core::{DType, Device, Tensor};

use super::attention::{paged_attention, write_kv, AttentionPlan, AttentionShape};
use super::batch::FlatBatch;
use super::config::ModelConfig;
use super::gguf::{GgufFile, ModelError};
use super::kv_cache::KvCache;
use super::linear::QLinear;
use super::norm::rms_norm;
use super::rope::Rope;

struct Linear {
    weight: QLinear,
    bias: Option<Tensor>,
}

impl Linear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let y = self.weight.forward(x)?;
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }
}

struct Layer {
    attn_norm: Tensor,
    wq: Linear,
    wk: Linear,
    wv: Linear,
    wo: Linear,
    ffn_norm: Tensor,
    w_gate: Linear,
    w_up: Linear,
    w_down: Linear,
}

enum Embeddings {
    SameAsOutput,
    Table(Arc<QTensor>),
}

pub struct Llama {
    pub config: ModelConfig,
    device: Device,
    /// Token table for lookups: the output projection itself when tied and natively supported.
    embeddings: Embeddings,
    layers: Vec<Layer>,
    norm: Tensor,
    output: Arc<QLinear>,
    rope: Rope,
    vocab_size: usize,
}

impl Llama {
    pub fn load(file: &mut GgufFile, config: ModelConfig, device: &Device) -> Result<Self, ModelError> {
        let c = &config;
        let (h, q_out, kv_out) = (c.hidden_size, c.n_head * c.head_dim, c.n_kv_head * c.head_dim);
        let vocab_size = file
            .tensor_dims("token_embd.weight")
            .and_then(|d| d.first().copied())
            .ok_or_else(|| ModelError::MissingTensor("token_embd.weight".into()))?;
        let table = Arc::new(file.tensor("token_embd.weight", &[vocab_size, h], device)?);
        let (embeddings, output) = if file.has_tensor("output.weight") {
            let output = QLinear::new(Arc::new(file.tensor("output.weight", &[vocab_size, h], device)?))?;
            (Embeddings::Table(table), Arc::new(output))
        } else {
            // Tied embeddings: the output projection is the embedding table.
            let output = QLinear::new(table.clone())?;
            if output.supports_rows() { (Embeddings::SameAsOutput, Arc::new(output)) } else { (Embeddings::Table(table), Arc::new(output)) }
        };
        let vector = |file: &mut GgufFile, name: &str, n: usize| -> Result<Tensor, ModelError> {
            Ok(file.tensor(name, &[n], device)?.dequantize(device)?)
        };
        let linear = |file: &mut GgufFile, name: &str, out: usize, inp: usize, bias: bool| -> Result<Linear, ModelError> {
            let weight = QLinear::new(Arc::new(file.tensor(&format!("{name}.weight"), &[out, inp], device)?))?;
            let bias = if bias { Some(vector(file, &format!("{name}.bias"), out)?) } else { None };
            Ok(Linear { weight, bias })
        };
        let mut layers = Vec::with_capacity(c.n_layer);
        for i in 0..c.n_layer {
            let p = format!("blk.{i}");
            layers.push(Layer {
                attn_norm: vector(file, &format!("{p}.attn_norm.weight"), h)?,
                wq: linear(file, &format!("{p}.attn_q"), q_out, h, c.qkv_bias)?,
                wk: linear(file, &format!("{p}.attn_k"), kv_out, h, c.qkv_bias)?,
                wv: linear(file, &format!("{p}.attn_v"), kv_out, h, c.qkv_bias)?,
                wo: linear(file, &format!("{p}.attn_output"), h, q_out, false)?,
                ffn_norm: vector(file, &format!("{p}.ffn_norm.weight"), h)?,
                w_gate: linear(file, &format!("{p}.ffn_gate"), c.ffn_size, h, false)?,
                w_up: linear(file, &format!("{p}.ffn_up"), c.ffn_size, h, false)?,
                w_down: linear(file, &format!("{p}.ffn_down"), h, c.ffn_size, false)?,
            });
        }
        let norm = vector(file, "output_norm.weight", h)?;
        // Llama 3.1-style rope scaling ships per-frequency divisors as a tensor.
        let freq_factors = if file.has_tensor("rope_freqs.weight") {
            let t = vector(file, "rope_freqs.weight", c.rope_dim / 2)?;
            Some(t.to_vec1::<f32>()?)
        } else {
            None
        };
        let rope = Rope::new(c, freq_factors.as_deref());
        Ok(Self { config, device: device.clone(), embeddings, layers, norm, output, rope, vocab_size })
    }

    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// One forward pass over a flat batch. Returns `[batch.logit_rows.len(), vocab]` f32 logits.
    pub fn forward(&self, batch: &FlatBatch, kv: &mut KvCache) -> candle_core::Result<Tensor> {
        let c = &self.config;
        let n_tokens = batch.tokens.len();
        let mut x = match &self.embeddings {
            Embeddings::SameAsOutput => self.output.rows(&batch.tokens, &self.device)?,
            Embeddings::Table(t) => t.embedding(&Tensor::from_slice(&batch.tokens, n_tokens, &self.device)?)?,
        };
        let plan = AttentionPlan::new(batch, kv.block_size);
        let (cos, sin) = self.rope.tables(&batch.positions);
        let half = self.rope.half_dim();
        let shape = AttentionShape { n_head: c.n_head, n_kv_head: c.n_kv_head, head_dim: c.head_dim };
        for (layer, layer_kv) in self.layers.iter().zip(kv.layers.iter_mut()) {
            let h = rms_norm(&x, &layer.attn_norm, c.rms_eps)?;
            let mut q = layer.wq.forward(&h)?.flatten_all()?.to_vec1::<f32>()?;
            let mut k = layer.wk.forward(&h)?.flatten_all()?.to_vec1::<f32>()?;
            let v = layer.wv.forward(&h)?.flatten_all()?.to_vec1::<f32>()?;
            let (qw, kw) = (q.len() / n_tokens, k.len() / n_tokens);
            for t in 0..n_tokens {
                let (ct, st) = (&cos[t * half..(t + 1) * half], &sin[t * half..(t + 1) * half]);
                self.rope.apply(&mut q[t * qw..(t + 1) * qw], ct, st);
                self.rope.apply(&mut k[t * kw..(t + 1) * kw], ct, st);
            }
            write_kv(&plan, layer_kv, &k, &v, kw);
            let attn = paged_attention(batch, &plan, layer_kv, &q, &shape);
            let attn = Tensor::from_vec(attn, (n_tokens, qw), &self.device)?;
            x = (x + layer.wo.forward(&attn)?)?;
            let h = rms_norm(&x, &layer.ffn_norm, c.rms_eps)?;
            let gate = layer.w_gate.forward(&h)?.silu()?;
            let up = layer.w_up.forward(&h)?;
            x = (x + layer.w_down.forward(&(gate * up)?)?)?;
        }
        let rows: Vec<u32> = batch.logit_rows.iter().map(|&r| r as u32).collect();
        let rows = Tensor::from_vec(rows, batch.logit_rows.len(), &self.device)?;
        let x = x.index_select(&rows, 0)?;
        let x = rms_norm(&x, &self.norm, c.rms_eps)?;
        self.output.forward(&x)?.to_dtype(DType::F32)
    }
}
