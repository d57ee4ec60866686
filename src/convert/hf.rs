//! The parts of a Hugging Face folder convert reads: `config.json` as the raw hyper-parameters
//! (convert writes them the way llama.cpp's `convert_hf_to_gguf.py` does, so it needs the
//! Hugging Face spelling, not braid's `ModelConfig`), and the safetensors weights.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};
use serde_json::Value as Json;

use crate::model::arch::hf_names::{HF_CLASSES, class_architecture};
use crate::model::config::Architecture;

/// What `architectures` in config.json may say, for error messages.
pub fn known_architectures() -> String {
    HF_CLASSES.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", ")
}

/// Rotary embedding parameters of one kind of layer, from transformers 5's `rope_parameters`
/// or the older top-level `rope_theta` + `rope_scaling`.
#[derive(Debug, Clone, Default)]
pub struct RopeParams {
    pub theta: Option<f64>,
    /// `rope_type` (or the older `type`): default, linear, llama3, yarn, longrope, ...
    pub kind: String,
    pub raw: serde_json::Map<String, Json>,
}

impl RopeParams {
    pub fn f64(&self, key: &str) -> Option<f64> {
        self.raw.get(key).and_then(Json::as_f64)
    }

    pub fn floats(&self, key: &str) -> Option<Vec<f32>> {
        self.raw.get(key)?.as_array()?.iter().map(|v| v.as_f64().map(|x| x as f32)).collect()
    }

    fn from_map(map: &serde_json::Map<String, Json>) -> Self {
        let kind = map.get("rope_type").or_else(|| map.get("type")).and_then(Json::as_str).unwrap_or("default");
        RopeParams { theta: map.get("rope_theta").and_then(Json::as_f64), kind: kind.to_string(), raw: map.clone() }
    }
}

pub struct HfFolder {
    pub dir: PathBuf,
    pub config: serde_json::Map<String, Json>,
    pub arch: Architecture,
    weights: MmapedSafetensors,
    pub tensor_names: BTreeSet<String>,
}

pub fn read_json(path: &Path) -> anyhow::Result<Json> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", path.display()))
}

/// The weight files: the shards an index names, else `model.safetensors`, else every
/// `*.safetensors` in the folder.
fn weight_files(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let index = dir.join("model.safetensors.index.json");
    if index.is_file() {
        let json = read_json(&index)?;
        let map = json
            .get("weight_map")
            .and_then(Json::as_object)
            .with_context(|| format!("{} has no weight_map", index.display()))?;
        let files: BTreeSet<&str> = map.values().filter_map(Json::as_str).collect();
        return files
            .into_iter()
            .map(|f| {
                let p = dir.join(f);
                if p.is_file() { Ok(p) } else { bail!("{} names {f}, which is missing", index.display()) }
            })
            .collect();
    }
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot read folder {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    files.sort();
    if files.is_empty() {
        bail!(
            "{} holds no safetensors weights (model.safetensors or shards with model.safetensors.index.json); \
             PyTorch .bin checkpoints are not read",
            dir.display()
        );
    }
    Ok(files)
}

impl HfFolder {
    pub fn open(dir: &Path) -> anyhow::Result<Self> {
        if !dir.is_dir() {
            bail!("{} is not a folder (convert reads a Hugging Face model folder)", dir.display());
        }
        let config_path = dir.join("config.json");
        if !config_path.is_file() {
            bail!("{} has no config.json: not a Hugging Face model folder", dir.display());
        }
        let config = match read_json(&config_path)? {
            Json::Object(m) => m,
            _ => bail!("{} is not a JSON object", config_path.display()),
        };
        let class = config
            .get("architectures")
            .and_then(Json::as_array)
            .and_then(|a| a.first())
            .and_then(Json::as_str)
            .unwrap_or_default()
            .to_string();
        let Some(arch) = class_architecture(&class) else {
            let model_type = config.get("model_type").and_then(Json::as_str).unwrap_or("?");
            bail!(
                "unsupported architecture '{}' (model_type '{model_type}'); braid convert handles: {}",
                if class.is_empty() { "none named" } else { &class },
                known_architectures()
            );
        };
        let files = weight_files(dir)?;
        // SAFETY: the weight files are mapped read-only for the conversion; like every reader
        // of safetensors, this assumes nothing rewrites them meanwhile.
        let weights = unsafe { MmapedSafetensors::multi(&files) }
            .with_context(|| format!("cannot read the safetensors weights in {}", dir.display()))?;
        let tensor_names = weights.tensors().into_iter().map(|(n, _)| n).collect();
        Ok(Self { dir: dir.to_path_buf(), config, arch, weights, tensor_names })
    }

    pub fn has(&self, name: &str) -> bool {
        self.tensor_names.contains(name)
    }

    pub fn dims(&self, name: &str) -> anyhow::Result<Vec<usize>> {
        Ok(self.weights.get(name)?.shape().to_vec())
    }

    /// A tensor as f32 on the CPU.
    pub fn load(&self, name: &str) -> anyhow::Result<Tensor> {
        let t = self.weights.load(name, &Device::Cpu).with_context(|| format!("cannot read tensor {name}"))?;
        Ok(t.to_dtype(DType::F32)?)
    }

    pub fn get(&self, key: &str) -> Option<&Json> {
        self.config.get(key).filter(|v| !v.is_null())
    }

    pub fn usize(&self, key: &str) -> Option<usize> {
        self.get(key).and_then(Json::as_u64).map(|v| v as usize)
    }

    pub fn need_usize(&self, key: &str) -> anyhow::Result<usize> {
        self.usize(key).with_context(|| format!("config.json lacks '{key}' (a non-negative integer)"))
    }

    pub fn f64(&self, key: &str) -> Option<f64> {
        self.get(key).and_then(Json::as_f64)
    }

    pub fn bool(&self, key: &str) -> Option<bool> {
        self.get(key).and_then(Json::as_bool)
    }

    /// The rope parameters of the global (full-attention) layers.
    pub fn rope(&self) -> RopeParams {
        self.rope_of("full_attention")
    }

    /// The rope parameters of one layer type (`full_attention`, `sliding_attention`): transformers
    /// 5 nests them per type for models that have several (Gemma 3).
    pub fn rope_of(&self, layer_type: &str) -> RopeParams {
        if let Some(Json::Object(params)) = self.get("rope_parameters") {
            if let Some(Json::Object(nested)) = params.get(layer_type) {
                return RopeParams::from_map(nested);
            }
            if params.values().all(|v| !v.is_object()) {
                return RopeParams::from_map(params);
            }
            return RopeParams::default();
        }
        let mut map = match self.get("rope_scaling") {
            Some(Json::Object(m)) => m.clone(),
            _ => serde_json::Map::new(),
        };
        for key in ["rope_theta", "partial_rotary_factor", "original_max_position_embeddings"] {
            if let Some(v) = self.get(key) {
                map.entry(key).or_insert_with(|| v.clone());
            }
        }
        RopeParams::from_map(&map)
    }
}
