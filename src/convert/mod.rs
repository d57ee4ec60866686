//! `braid convert`: a Hugging Face model folder to one GGUF file that braid and llama.cpp both
//! load, with the tokenizer and chat template, optionally quantized (what mlx-lm's `convert -q`
//! does for MLX). It writes what llama.cpp's `convert_hf_to_gguf.py` writes: the same metadata
//! keys and tensor names, Q/K rows permuted for llama's adjacent-pair rope, Gemma's norms with
//! their +1 folded in, experts stacked, norms and routers kept f32.
//!
//! Layering: the command line calls this; it reads through `model/` (names, architectures) and
//! `tokenizer/` and writes through its own streaming GGUF writer. Nothing below imports it.

mod hf;
mod vocab;
pub mod writer;

use std::path::Path;

use anyhow::{Context, bail};
use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};

use hf::HfFolder;
pub use hf::known_architectures;
use writer::TensorEntry;

use crate::model::arch::hf_names::{hf_expert_name, hf_name, norm_has_unit_offset};
use crate::model::arch::names::{self, Layer};
use crate::model::config::Architecture;

/// The tensor type of the converted weight matrices.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OutType {
    #[value(name = "f32")]
    F32,
    #[value(name = "f16")]
    F16,
    #[value(name = "bf16")]
    Bf16,
    #[value(name = "q8_0")]
    Q8_0,
    #[value(name = "q4_0")]
    Q4_0,
    #[value(name = "q4_k")]
    Q4K,
    #[value(name = "q6_k")]
    Q6K,
}

impl OutType {
    pub fn dtype(self) -> GgmlDType {
        match self {
            OutType::F32 => GgmlDType::F32,
            OutType::F16 => GgmlDType::F16,
            OutType::Bf16 => GgmlDType::BF16,
            OutType::Q8_0 => GgmlDType::Q8_0,
            OutType::Q4_0 => GgmlDType::Q4_0,
            OutType::Q4K => GgmlDType::Q4K,
            OutType::Q6K => GgmlDType::Q6K,
        }
    }

    /// `general.file_type` (llama.cpp's `llama_ftype`; a uniform Q4_K is its nearest, Q4_K_S).
    fn file_type(self) -> u32 {
        match self {
            OutType::F32 => 0,
            OutType::F16 => 1,
            OutType::Q4_0 => 2,
            OutType::Q8_0 => 7,
            OutType::Q4K => 14,
            OutType::Q6K => 18,
            OutType::Bf16 => 32,
        }
    }
}

/// What one output tensor is made from.
enum Source {
    Hf(String),
    /// Per-expert matrices stacked into `[n_expert, out, in]`.
    Stack(Vec<String>),
    /// Computed here (rope frequency factors).
    Floats(Vec<f32>),
}

enum Transform {
    None,
    /// llama.cpp's `LlamaModel.permute`: each head's rows reordered from rotate-half pairs
    /// (i, i + d/2) to adjacent pairs (2i, 2i + 1), the layout GGUF llama files use.
    Permute {
        heads: usize,
    },
    /// A Gemma norm stored as w and applied as (1 + w): GGUF stores (1 + w) * scale.
    UnitOffset {
        scale: f64,
    },
}

struct Planned {
    entry: TensorEntry,
    source: Source,
    transform: Transform,
}

/// What a conversion did, for the command's last line and for tests.
#[derive(Debug, Clone)]
pub struct Summary {
    pub architecture: Architecture,
    pub tensors: usize,
    pub bytes: u64,
    /// Tensors that could not take the asked type, and the type they got instead.
    pub fallbacks: Vec<(String, GgmlDType)>,
}

/// The type of one tensor, as `convert_hf_to_gguf.py` (and `llama-quantize` for the K-quants)
/// choose it: vectors, norms, routers and biases stay f32; a matrix whose rows are not whole
/// blocks of the asked type takes llama-quantize's fallback (Q4_K → Q5_0, Q6_K → Q8_0), then f16.
fn tensor_type(name: &str, dims: &[usize], out: OutType) -> GgmlDType {
    if dims.len() <= 1 || name.ends_with("_norm.weight") || name.contains("ffn_gate_inp") || !name.ends_with(".weight")
    {
        return GgmlDType::F32;
    }
    let row = dims.last().copied().unwrap_or(0);
    let mut dtype = out.dtype();
    if !row.is_multiple_of(dtype.block_size()) {
        dtype = match dtype {
            GgmlDType::Q4K => GgmlDType::Q5_0,
            GgmlDType::Q6K => GgmlDType::Q8_0,
            other => other,
        };
    }
    if !row.is_multiple_of(dtype.block_size()) { GgmlDType::F16 } else { dtype }
}

/// Llama 3's rope scaling as per-frequency divisors (`rope_freqs.weight`), computed as
/// `LlamaModel.generate_extra_tensors` does.
fn llama3_rope_factors(rope: &hf::RopeParams, head_dim: usize) -> Vec<f32> {
    let base = rope.theta.unwrap_or(10_000.0);
    let factor = rope.f64("factor").unwrap_or(8.0);
    let low = rope.f64("low_freq_factor").unwrap_or(1.0);
    let high = rope.f64("high_freq_factor").unwrap_or(4.0);
    let old_ctx = rope.f64("original_max_position_embeddings").unwrap_or(8192.0);
    let (low_wavelen, high_wavelen) = (old_ctx / low, old_ctx / high);
    (0..head_dim)
        .step_by(2)
        .map(|i| {
            // In f32 like torch.arange(..., dtype=float32), so the bands split where llama.cpp's do.
            let freq = 1.0 / (base as f32).powf(i as f32 / head_dim as f32);
            let wavelen = 2.0 * std::f64::consts::PI / freq as f64;
            let f = if wavelen < high_wavelen {
                1.0
            } else if wavelen > low_wavelen {
                factor
            } else {
                let smooth = (old_ctx / wavelen - low) / (high - low);
                1.0 / ((1.0 - smooth) / factor + smooth)
            };
            f as f32
        })
        .collect()
}

/// GGUF metadata, in the order it is written.
type Metadata = Vec<(String, Value)>;
/// Vectors computed from the config (rope factors), by GGUF name.
type ExtraTensors = Vec<(String, Vec<f32>)>;

/// The model's metadata keys (`general.*` and `{arch}.*`), with the extra tensors some rope
/// schemes need.
fn model_metadata(hf: &HfFolder, out: OutType) -> anyhow::Result<(Metadata, ExtraTensors)> {
    let arch = hf.arch;
    let a = arch.gguf_name();
    let key = |k: &str| format!("{a}.{k}");
    let u32v = |n: usize| Value::U32(n as u32);
    let n_layer = hf.need_usize("num_hidden_layers")?;
    let hidden = hf.need_usize("hidden_size")?;
    let n_head = hf.need_usize("num_attention_heads")?;
    if n_head == 0 {
        bail!("config.json: num_attention_heads is 0");
    }
    let n_kv_head = hf.usize("num_key_value_heads").unwrap_or(n_head);
    let head_dim = hf.usize("head_dim").unwrap_or(hidden / n_head);
    let rope = hf.rope();
    let name = hf.dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| arch.name().into());

    let mut md: Metadata = vec![
        ("general.architecture".into(), Value::String(a.into())),
        ("general.name".into(), Value::String(name)),
        ("general.file_type".into(), Value::U32(out.file_type())),
        ("general.quantization_version".into(), Value::U32(2)),
        (key("block_count"), u32v(n_layer)),
        (key("context_length"), u32v(hf.usize("max_position_embeddings").unwrap_or(4096))),
        (key("embedding_length"), u32v(hidden)),
        (key("attention.head_count"), u32v(n_head)),
        (key("attention.head_count_kv"), u32v(n_kv_head)),
        (key("attention.layer_norm_rms_epsilon"), Value::F32(hf.f64("rms_norm_eps").unwrap_or(1e-6) as f32)),
    ];
    if let Some(ff) = hf.usize("intermediate_size") {
        md.push((key("feed_forward_length"), u32v(ff)));
    }
    if hf.usize("head_dim").is_some() || arch == Architecture::Gemma3 {
        md.push((key("attention.key_length"), u32v(head_dim)));
        md.push((key("attention.value_length"), u32v(head_dim)));
    }
    if let Some(theta) = rope.theta {
        md.push((key("rope.freq_base"), Value::F32(theta as f32)));
    }
    let partial = rope.f64("partial_rotary_factor").unwrap_or(1.0);
    let rope_dim = if arch == Architecture::Phi3 { (partial * hidden as f64) as usize / n_head } else { head_dim };
    md.push((key("rope.dimension_count"), u32v(rope_dim)));

    let mut extra = Vec::new();
    match rope.kind.as_str() {
        "default" | "" => {}
        "linear" => {
            let factor = rope.f64("factor").context("linear rope scaling without a factor")?;
            md.push((key("rope.scaling.type"), Value::String("linear".into())));
            md.push((key("rope.scaling.factor"), Value::F32(factor as f32)));
        }
        "llama3" => extra.push((names::ROPE_FREQS.to_string(), llama3_rope_factors(&rope, head_dim))),
        "yarn" => {
            md.push((key("rope.scaling.type"), Value::String("yarn".into())));
            md.push((key("rope.scaling.factor"), Value::F32(rope.f64("factor").unwrap_or(1.0) as f32)));
            let orig = rope
                .f64("original_max_position_embeddings")
                .context("yarn rope scaling without original_max_position_embeddings")?;
            md.push((key("rope.scaling.original_context_length"), Value::U32(orig as u32)));
        }
        "longrope" | "su" if arch == Architecture::Phi3 => {
            let max_pos = hf.need_usize("max_position_embeddings")? as f64;
            let orig = rope
                .f64("original_max_position_embeddings")
                .context("longrope without original_max_position_embeddings")?;
            let scale = max_pos / orig;
            let attn_factor = if scale > 1.0 { (1.0 + scale.ln() / orig.ln()).sqrt() } else { 1.0 };
            md.push((key("rope.scaling.original_context_length"), Value::U32(orig as u32)));
            md.push((key("rope.scaling.attn_factor"), Value::F32(attn_factor as f32)));
            let (long, short) = (rope.floats("long_factor"), rope.floats("short_factor"));
            match (long, short) {
                (Some(l), Some(s)) if l.len() == rope_dim / 2 && s.len() == rope_dim / 2 => {
                    extra.push(("rope_factors_long.weight".into(), l));
                    extra.push(("rope_factors_short.weight".into(), s));
                }
                _ => bail!("longrope needs long_factor and short_factor of {} values each", rope_dim / 2),
            }
        }
        other => bail!("rope scaling type '{other}' is not supported for {}", arch.name()),
    }

    match arch {
        Architecture::Llama | Architecture::Mistral | Architecture::Mixtral => {
            md.push((key("vocab_size"), u32v(hf.need_usize("vocab_size")?)));
            // llama.cpp ignores the window of llama files; braid reads it (Mistral's sliding window).
            if let Some(w) = hf.usize("sliding_window").filter(|&w| w > 0) {
                md.push((key("attention.sliding_window"), u32v(w)));
            }
        }
        Architecture::Qwen2 => {
            if hf.bool("use_sliding_window") == Some(true) {
                bail!("Qwen2 with use_sliding_window is not supported (braid and llama.cpp attend over everything)");
            }
        }
        Architecture::Phi3 => {
            md.push((key("attention.sliding_window"), u32v(hf.usize("sliding_window").unwrap_or(0))));
        }
        Architecture::Gemma3 => {
            let window = hf.need_usize("sliding_window")?;
            md.push((key("attention.sliding_window"), u32v(window)));
            // Which layers slide: config.json's layer_types, else Gemma 3's one global in six.
            let pattern: Vec<bool> = match hf.get("layer_types").and_then(serde_json::Value::as_array) {
                Some(types) => types.iter().map(|t| t.as_str() == Some("sliding_attention")).collect(),
                None => (0..n_layer).map(|l| (l + 1) % 6 != 0).collect(),
            };
            if pattern.len() != n_layer {
                bail!("config.json: {} layer_types for {n_layer} layers", pattern.len());
            }
            md.push((
                key("attention.sliding_window_pattern"),
                Value::Array(pattern.into_iter().map(Value::Bool).collect()),
            ));
            if let Some(theta) = hf.rope_of("sliding_attention").theta.or_else(|| hf.f64("rope_local_base_freq")) {
                md.push((key("rope.freq_base_swa"), Value::F32(theta as f32)));
            }
            if let Some(cap) = hf.f64("final_logit_softcapping") {
                md.push((key("final_logit_softcapping"), Value::F32(cap as f32)));
            }
            if hf.f64("attn_logit_softcapping").is_some() {
                bail!("Gemma with attention logit softcapping (Gemma 2) is not supported");
            }
        }
        Architecture::Qwen3 | Architecture::Qwen3Moe => {}
    }
    if matches!(arch, Architecture::Mixtral | Architecture::Qwen3Moe) {
        let n_expert = hf
            .usize("num_local_experts")
            .or_else(|| hf.usize("num_experts"))
            .context("config.json lacks num_local_experts / num_experts")?;
        md.push((key("expert_count"), u32v(n_expert)));
        md.push((key("expert_used_count"), u32v(hf.need_usize("num_experts_per_tok")?)));
        if let Some(w) = hf.usize("moe_intermediate_size") {
            md.push((key("expert_feed_forward_length"), u32v(w)));
        }
    }
    Ok((md, extra))
}

fn plan_tensors(hf: &HfFolder, out: OutType, extra: ExtraTensors) -> anyhow::Result<Vec<Planned>> {
    let arch = hf.arch;
    let n_layer = hf.need_usize("num_hidden_layers")?;
    let n_head = hf.need_usize("num_attention_heads")?;
    let n_kv_head = hf.usize("num_key_value_heads").unwrap_or(n_head);
    let hidden = hf.need_usize("hidden_size")?;
    let head_dim = hf.usize("head_dim").unwrap_or(hidden / n_head);
    let permute = matches!(arch, Architecture::Llama | Architecture::Mistral | Architecture::Mixtral);
    // Gemma 3 scales scores by query_pre_attn_scalar^-1/2; GGUF readers (llama.cpp, braid) assume
    // the head dimension (hidden / heads for the 62-layer 27B). Where a config says otherwise,
    // the difference is folded into the Q norm, which scales Q right before the dot product.
    let q_scale = match (arch, hf.f64("query_pre_attn_scalar")) {
        (Architecture::Gemma3, Some(scalar)) if scalar > 0.0 => {
            let assumed = if n_layer == 62 { hidden / n_head } else { head_dim };
            (assumed as f64 / scalar).sqrt()
        }
        _ => 1.0,
    };

    let mut plan = Vec::new();
    let mut add = |gguf: String, source: Source, dims: Vec<usize>, transform: Transform| {
        let dtype = tensor_type(&gguf, &dims, out);
        plan.push(Planned { entry: TensorEntry { name: gguf, dims, dtype }, source, transform });
    };
    // One Hugging Face tensor under its GGUF name, if the folder has it.
    let single = |gguf: &str| -> anyhow::Result<Option<(Source, Vec<usize>, Transform)>> {
        let Some(name) = hf_name(arch, gguf).filter(|n| hf.has(n)) else { return Ok(None) };
        let dims = hf.dims(&name)?;
        let transform = if permute && (gguf.contains(".attn_q.") || gguf.contains(".attn_k.")) {
            let heads = if gguf.contains(".attn_q.") { n_head } else { n_kv_head };
            if dims[0] % (2 * heads) != 0 {
                bail!("{name}: {} rows do not split into {heads} heads of rotary pairs", dims[0]);
            }
            Transform::Permute { heads }
        } else if norm_has_unit_offset(arch, gguf) {
            Transform::UnitOffset { scale: if gguf.ends_with("attn_q_norm.weight") { q_scale } else { 1.0 } }
        } else {
            Transform::None
        };
        Ok(Some((Source::Hf(name), dims, transform)))
    };
    if let Some((source, dims, transform)) = single(names::TOKEN_EMBD)? {
        add(names::TOKEN_EMBD.to_string(), source, dims, transform);
    }
    for l in 0..n_layer {
        let t = Layer::new(l);
        for gguf in [
            &t.attn_norm,
            &t.q,
            &t.q_bias,
            &t.k,
            &t.k_bias,
            &t.v,
            &t.v_bias,
            &t.qkv,
            &t.q_norm,
            &t.k_norm,
            &t.o,
            &t.post_attn_norm,
            &t.ffn_norm,
            &t.router,
            &t.gate,
            &t.up,
            &t.down,
            &t.post_ffn_norm,
        ] {
            if let Some((source, dims, transform)) = single(gguf)? {
                add(gguf.clone(), source, dims, transform);
            }
        }
        for gguf in [&t.gate_exps, &t.up_exps, &t.down_exps] {
            let mut experts = Vec::new();
            while let Some(name) = hf_expert_name(arch, gguf, experts.len()).filter(|n| hf.has(n)) {
                experts.push(name);
            }
            if experts.is_empty() {
                continue;
            }
            let first = hf.dims(&experts[0])?;
            for e in &experts {
                if hf.dims(e)? != first {
                    bail!("expert tensors of {gguf} differ in shape ({e})");
                }
            }
            let dims = std::iter::once(experts.len()).chain(first).collect();
            add(gguf.clone(), Source::Stack(experts), dims, Transform::None);
        }
    }
    if let Some((source, dims, transform)) = single(names::OUTPUT_NORM)? {
        add(names::OUTPUT_NORM.to_string(), source, dims, transform);
    }
    if let Some((source, dims, transform)) = single(names::OUTPUT)? {
        add(names::OUTPUT.to_string(), source, dims, transform);
    }
    for (name, values) in extra {
        let dims = vec![values.len()];
        add(name, Source::Floats(values), dims, Transform::None);
    }
    let mut used = std::collections::BTreeSet::new();
    for p in &plan {
        match &p.source {
            Source::Hf(n) => {
                used.insert(n.clone());
            }
            Source::Stack(ns) => used.extend(ns.iter().cloned()),
            Source::Floats(_) => {}
        }
    }
    let leftover: Vec<&String> =
        hf.tensor_names.iter().filter(|n| !used.contains(*n) && !n.ends_with("rotary_emb.inv_freq")).collect();
    if !leftover.is_empty() {
        bail!(
            "{} tensor(s) of the folder have no place in a {} GGUF file, e.g. {}",
            leftover.len(),
            arch.name(),
            leftover.iter().take(3).map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
        );
    }
    if !plan.iter().any(|p| p.entry.name == names::TOKEN_EMBD) {
        bail!("the folder has no token embeddings (model.embed_tokens.weight)");
    }
    Ok(plan)
}

fn materialize(hf: &HfFolder, p: &Planned) -> anyhow::Result<Tensor> {
    let t = match &p.source {
        Source::Hf(name) => hf.load(name)?,
        Source::Stack(names) => {
            let parts = names.iter().map(|n| hf.load(n)).collect::<anyhow::Result<Vec<_>>>()?;
            Tensor::stack(&parts, 0)?
        }
        Source::Floats(v) => Tensor::from_slice(v, v.len(), &Device::Cpu)?,
    };
    let t = match p.transform {
        Transform::None => t,
        Transform::Permute { heads } => {
            let dims = t.dims().to_vec();
            let rows = dims[0];
            let rest: usize = dims[1..].iter().product();
            t.reshape((heads, 2, rows / heads / 2, rest))?.transpose(1, 2)?.contiguous()?.reshape(dims)?
        }
        Transform::UnitOffset { scale } => ((t + 1.0)? * scale)?,
    };
    Ok(t)
}

/// Converts the Hugging Face folder `input` into the GGUF file `output`. `progress` is told the
/// number of tensors, then each one as it is written.
pub fn convert(
    input: &Path,
    output: &Path,
    out: OutType,
    progress: &indicatif::ProgressBar,
) -> anyhow::Result<Summary> {
    let hf = HfFolder::open(input)?;
    let (mut metadata, extra) = model_metadata(&hf, out)?;
    let plan = plan_tensors(&hf, out, extra)?;
    let vocab_rows = plan
        .iter()
        .find(|p| p.entry.name == names::TOKEN_EMBD)
        .map(|p| p.entry.dims[0])
        .context("no token embeddings")?;
    metadata.extend(vocab::tokenizer_metadata(&hf, vocab_rows)?);
    if hf.arch == Architecture::Qwen3Moe
        && hf.get("mlp_only_layers").and_then(serde_json::Value::as_array).is_some_and(|a| !a.is_empty())
    {
        tracing::warn!("mlp_only_layers: the dense layers are written as such; braid loads them, llama.cpp does not");
    }
    let fallbacks: Vec<(String, GgmlDType)> = plan
        .iter()
        .filter(|p| p.entry.dtype != out.dtype() && p.entry.dtype != GgmlDType::F32)
        .map(|p| (p.entry.name.clone(), p.entry.dtype))
        .collect();
    let entries: Vec<TensorEntry> = plan.iter().map(|p| p.entry.clone()).collect();
    progress.set_length(entries.len() as u64);
    writer::write_gguf(output, &metadata, &entries, |i| {
        let p = &plan[i];
        progress.set_message(p.entry.name.clone());
        let t = materialize(&hf, p)?;
        let q = QTensor::quantize(&t, p.entry.dtype).with_context(|| format!("quantizing {}", p.entry.name))?;
        progress.inc(1);
        Ok(q.data()?.into_owned())
    })?;
    let bytes = std::fs::metadata(output).map(|m| m.len()).unwrap_or(0);
    Ok(Summary { architecture: hf.arch, tensors: entries.len(), bytes, fallbacks })
}
