//! A llama-family model's weights on a CUDA device: bf16 matrices (Q/K/V and gate/up stacked,
//! as on the CPU), f32 norms and biases, and the rope tables. From a GGUF file (dequantized on
//! the host) or drawn on the device as dummy weights.

use std::sync::Arc;

use half::bf16;

use super::runtime::{Buf, Gpu, Result};
use crate::gguf::{GgufFile, ModelError};
use crate::launch;
use crate::model::arch::names as tensors;
use crate::model::config::ModelConfig;
use crate::model::presets::{Draw, DummyTensor, Preset};

pub struct LayerWeights {
    pub attn_norm: Buf<f32>,
    /// `[q + 2 kv, hidden]`: each output row is [q | k | v].
    pub qkv: Buf<bf16>,
    pub qkv_bias: Option<Buf<f32>>,
    pub o: Buf<bf16>,
    pub ffn_norm: Buf<f32>,
    /// `[2 ffn, hidden]`: gate and up rows alternate, so each output row is [g0, u0, g1, u1, ...]
    /// (the few-row product then holds each pair in one warp and finishes SwiGLU itself).
    pub gate_up: Buf<bf16>,
    pub down: Buf<bf16>,
}

pub struct CudaWeights {
    pub gpu: Arc<Gpu>,
    pub config: ModelConfig,
    pub vocab_size: usize,
    pub embeddings: Buf<bf16>,
    /// None: tied to the embeddings.
    pub output: Option<Buf<bf16>>,
    pub output_norm: Buf<f32>,
    pub layers: Vec<LayerWeights>,
    /// `[positions, rope_dim / 2]` cos and sin, the CPU's own tables (cpu/rope.rs).
    pub cos: Buf<f32>,
    pub sin: Buf<f32>,
    pub positions: usize,
}

/// Most positions the rope tables cover (and so the longest context on the GPU).
const MAX_TABLE_POSITIONS: usize = 131_072;

fn rope_tables(gpu: &Gpu, config: &ModelConfig, freq_factors: Option<&[f32]>) -> Result<(Buf<f32>, Buf<f32>, usize)> {
    let positions = config.context_length.min(MAX_TABLE_POSITIONS);
    let all: Vec<u32> = (0..positions as u32).collect();
    let (cos, sin) = config.rope(freq_factors).tables(&all);
    Ok((gpu.upload(&cos)?, gpu.upload(&sin)?, positions))
}

impl CudaWeights {
    /// Dummy weights of a preset's shape, drawn on the device: the same values `Decoder` loads from `presets::DummySource`
    /// draws on the CPU for the same seed.
    pub fn dummy(gpu: Arc<Gpu>, preset: &Preset, seed: u64) -> Result<Self> {
        let c = preset.config.clone();
        let (h, q, kv, ffn, vocab) =
            (c.hidden_size, c.n_head * c.head_dim, c.n_kv_head * c.head_dim, c.ffn_size, preset.vocab_size);
        let draw = |t: DummyTensor| t.draw(&c, seed);
        // A matrix of stacked parts, each part its own draw.
        let matrix = |parts: &[(DummyTensor, usize)]| -> Result<Buf<bf16>> {
            let rows: usize = parts.iter().map(|p| p.1).sum();
            let buf = gpu.alloc::<bf16>(rows * h_of(parts[0].0, &c))?;
            let mut offset = 0;
            for &(t, n) in parts {
                let len = n * h_of(t, &c);
                fill_bf16(&gpu, buf.at(offset), len, draw(t))?;
                offset += len;
            }
            Ok(buf)
        };
        let vector = |t: DummyTensor, n: usize| -> Result<Buf<f32>> {
            let buf = gpu.alloc::<f32>(n)?;
            fill_f32(&gpu, buf.ptr, n, draw(t))?;
            Ok(buf)
        };
        use DummyTensor as T;
        let mut layers = Vec::with_capacity(c.n_layer);
        for l in 0..c.n_layer {
            layers.push(LayerWeights {
                attn_norm: vector(T::AttnNorm(l), h)?,
                qkv: matrix(&[(T::Q(l), q), (T::K(l), kv), (T::V(l), kv)])?,
                qkv_bias: if c.qkv_bias { Some(vector(T::QkvBias(l), q + 2 * kv)?) } else { None },
                o: matrix(&[(T::O(l), h)])?,
                ffn_norm: vector(T::FfnNorm(l), h)?,
                gate_up: {
                    let buf = gpu.alloc::<bf16>(2 * ffn * h)?;
                    fill_bf16_rows(&gpu, buf.ptr, ffn * h, h, 2 * h, draw(T::Gate(l)))?;
                    fill_bf16_rows(&gpu, buf.at(h), ffn * h, h, 2 * h, draw(T::Up(l)))?;
                    buf
                },
                down: matrix(&[(T::Down(l), h)])?,
            });
        }
        let embeddings = matrix(&[(T::Embeddings, vocab)])?;
        let output = if preset.tied_embeddings { None } else { Some(matrix(&[(T::Output, vocab)])?) };
        let output_norm = vector(T::OutputNorm, h)?;
        let (cos, sin, positions) = rope_tables(&gpu, &c, preset.rope_freq_factors.as_deref())?;
        gpu.synchronize()?;
        Ok(Self { gpu, config: c, vocab_size: vocab, embeddings, output, output_norm, layers, cos, sin, positions })
    }

    /// A GGUF model's weights, dequantized on the host and stored as bf16.
    pub fn from_gguf(gpu: Arc<Gpu>, file: &mut GgufFile, config: ModelConfig) -> std::result::Result<Self, ModelError> {
        let c = config;
        check_supported(&c)?;
        let cpu = candle_core::Device::Cpu;
        let (h, q, kv) = (c.hidden_size, c.n_head * c.head_dim, c.n_kv_head * c.head_dim);
        let gpu_err = |e: super::runtime::GpuError| ModelError::Invalid(e.to_string());
        let vocab = file
            .tensor_dims(tensors::TOKEN_EMBD)
            .and_then(|d| d.first().copied())
            .ok_or_else(|| ModelError::MissingTensor(tensors::TOKEN_EMBD.into()))?;
        let floats = |file: &mut GgufFile, name: &str, dims: &[usize]| -> std::result::Result<Vec<f32>, ModelError> {
            Ok(file.tensor(name, dims, &cpu)?.dequantize(&cpu)?.flatten_all()?.to_vec1::<f32>()?)
        };
        let matrix =
            |file: &mut GgufFile, parts: &[(&str, usize, usize)]| -> std::result::Result<Buf<bf16>, ModelError> {
                let mut all = Vec::new();
                for &(name, n, k) in parts {
                    all.extend(floats(file, name, &[n, k])?.into_iter().map(bf16::from_f32));
                }
                gpu.upload(&all).map_err(gpu_err)
            };
        let vector = |file: &mut GgufFile, names: &[(&str, usize)]| -> std::result::Result<Buf<f32>, ModelError> {
            let mut all = Vec::new();
            for &(name, n) in names {
                all.extend(floats(file, name, &[n])?);
            }
            gpu.upload(&all).map_err(gpu_err)
        };
        let mut layers = Vec::with_capacity(c.n_layer);
        for i in 0..c.n_layer {
            let t = tensors::Layer::new(i);
            let qkv_bias = if c.qkv_bias {
                Some(vector(file, &[(&t.q_bias, q), (&t.k_bias, kv), (&t.v_bias, kv)])?)
            } else {
                None
            };
            layers.push(LayerWeights {
                attn_norm: vector(file, &[(&t.attn_norm, h)])?,
                qkv: matrix(file, &[(&t.q, q, h), (&t.k, kv, h), (&t.v, kv, h)])?,
                qkv_bias,
                o: matrix(file, &[(&t.o, h, q)])?,
                ffn_norm: vector(file, &[(&t.ffn_norm, h)])?,
                gate_up: {
                    let gate = floats(file, &t.gate, &[c.ffn_size, h])?;
                    let up = floats(file, &t.up, &[c.ffn_size, h])?;
                    let rows: Vec<bf16> = gate
                        .chunks_exact(h)
                        .zip(up.chunks_exact(h))
                        .flat_map(|(g, u)| g.iter().chain(u))
                        .map(|&v| bf16::from_f32(v))
                        .collect();
                    gpu.upload(&rows).map_err(gpu_err)?
                },
                down: matrix(file, &[(&t.down, h, c.ffn_size)])?,
            });
        }
        let embeddings = matrix(file, &[(tensors::TOKEN_EMBD, vocab, h)])?;
        let output =
            if file.has_tensor(tensors::OUTPUT) { Some(matrix(file, &[(tensors::OUTPUT, vocab, h)])?) } else { None };
        let output_norm = vector(file, &[(tensors::OUTPUT_NORM, h)])?;
        let freq_factors = if file.has_tensor(tensors::ROPE_FREQS) {
            Some(floats(file, tensors::ROPE_FREQS, &[c.rope_dim / 2])?)
        } else {
            None
        };
        let (cos, sin, positions) = rope_tables(&gpu, &c, freq_factors.as_deref()).map_err(gpu_err)?;
        gpu.synchronize().map_err(gpu_err)?;
        Ok(Self { gpu, config: c, vocab_size: vocab, embeddings, output, output_norm, layers, cos, sin, positions })
    }

    /// Bytes of device memory the weights take.
    pub fn bytes(&self) -> usize {
        let m = |b: &Buf<bf16>| b.len * 2;
        let v = |b: &Buf<f32>| b.len * 4;
        let layers: usize = self
            .layers
            .iter()
            .map(|l| {
                v(&l.attn_norm)
                    + m(&l.qkv)
                    + l.qkv_bias.as_ref().map_or(0, v)
                    + m(&l.o)
                    + v(&l.ffn_norm)
                    + m(&l.gate_up)
                    + m(&l.down)
            })
            .sum();
        layers
            + m(&self.embeddings)
            + self.output.as_ref().map_or(0, m)
            + v(&self.output_norm)
            + v(&self.cos)
            + v(&self.sin)
    }
}

/// Input width of a dummy matrix.
fn h_of(t: DummyTensor, c: &ModelConfig) -> usize {
    match t {
        DummyTensor::O(_) => c.n_head * c.head_dim,
        DummyTensor::Down(_) => c.ffn_size,
        _ => c.hidden_size,
    }
}

const FILL_GRID: u32 = 1024;

fn fill_bf16(gpu: &Gpu, ptr: u64, n: usize, d: Draw) -> Result<()> {
    launch!(gpu, &gpu.k.fill_dummy_bf16, (FILL_GRID, 1, 1), 256; ptr, n as u64, d.seed, d.centre, d.scale)
}

/// A draw of `n` values in rows of `width`, row r at `ptr + r * stride` elements.
fn fill_bf16_rows(gpu: &Gpu, ptr: u64, n: usize, width: usize, stride: usize, d: Draw) -> Result<()> {
    launch!(gpu, &gpu.k.fill_dummy_bf16_rows, (FILL_GRID, 1, 1), 256; ptr, n as u64, width as u64, stride as u64, d.seed, d.centre, d.scale)
}

fn fill_f32(gpu: &Gpu, ptr: u64, n: usize, d: Draw) -> Result<()> {
    launch!(gpu, &gpu.k.fill_dummy_f32, (FILL_GRID, 1, 1), 256; ptr, n as u64, d.seed, d.centre, d.scale)
}

/// The CUDA path computes llama-shaped blocks (Llama, Qwen2, Mistral without its window);
/// other architectures are refused at load with what is missing, rather than run wrong.
fn check_supported(c: &ModelConfig) -> std::result::Result<(), ModelError> {
    let default_scale = 1.0 / (c.head_dim as f32).sqrt();
    let missing = [
        (c.qk_norm, "Q/K norms"),
        (c.post_norms, "post-norms"),
        (c.moe.is_some(), "experts"),
        (c.layer_windows.iter().any(Option::is_some), "sliding windows"),
        (c.activation != crate::model::config::Activation::Silu, "GeGLU"),
        (c.embedding_scale.is_some(), "scaled embeddings"),
        (c.attention_scale != default_scale, "a custom attention scale"),
    ];
    let missing: Vec<&str> = missing.iter().filter(|m| m.0).map(|m| m.1).collect();
    if missing.is_empty() {
        return Ok(());
    }
    Err(ModelError::Unsupported(format!(
        "{} on the GPU: braid's CUDA path does not yet compute {}; serve it on the CPU (without --device cuda)",
        c.architecture.name(),
        missing.join(", ")
    )))
}
