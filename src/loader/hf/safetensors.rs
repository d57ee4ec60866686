//! A Hugging Face folder's weights: `model.safetensors`, or the shards a
//! `model.safetensors.index.json` lists, memory-mapped and read by the GGUF names the decoder
//! asks for (translated by `model/arch/hf_names.rs`).

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use memmap2::Mmap;
use safetensors::tensor::{Dtype, Metadata, SafeTensors};

use crate::cpu::linear::QLinear;
use crate::gguf::ModelError;
use crate::model::arch::hf_names::{hf_expert_name, hf_name, norm_has_unit_offset};
use crate::model::arch::names;
use crate::model::config::Architecture;
use crate::model::weights::WeightSource;

/// How matrices are kept for braid's kernels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MatrixFormat {
    /// bf16 weights stay bf16 (half the memory; activations rounded to bf16 in products);
    /// f16 and f32 weights are widened to f32.
    Native,
    /// Every matrix widened to f32, activations kept in f32: transformers' float32 arithmetic.
    F32,
}

struct Shard {
    path: PathBuf,
    map: Mmap,
    /// Where the tensor data starts (after the 8-byte length and the JSON header).
    data_start: usize,
    metadata: Metadata,
}

impl Shard {
    fn open(path: &Path) -> Result<Self, ModelError> {
        let io = |source| ModelError::Io { path: path.to_path_buf(), source };
        let file = File::open(path).map_err(io)?;
        // SAFETY: the mapping is read-only; a model file changed underneath a running server is
        // outside what braid can guard against (as for GGUF files, which are read the same way).
        let map = unsafe { Mmap::map(&file) }.map_err(io)?;
        let (header, metadata) =
            SafeTensors::read_metadata(&map).map_err(|e| bad_file(path, format!("not a safetensors file: {e}")))?;
        Ok(Self { path: path.to_path_buf(), map, data_start: 8 + header, metadata })
    }
}

/// A tensor's type, shape and bytes.
struct View<'a> {
    dtype: Dtype,
    shape: Vec<usize>,
    bytes: &'a [u8],
}

/// The weights of a Hugging Face folder, as a `WeightSource`.
pub struct SafetensorsSource {
    arch: Architecture,
    shards: Vec<Shard>,
    /// Hugging Face tensor name → its shard.
    index: HashMap<String, usize>,
    format: MatrixFormat,
    /// Served as `rope_freqs.weight` (Llama 3 scaling, Phi-3 longrope).
    rope_freqs: Option<Vec<f32>>,
    tied_embeddings: bool,
}

impl SafetensorsSource {
    /// The weights of `dir`: `model.safetensors.index.json`'s shards, else `model.safetensors`,
    /// else the folder's one `*.safetensors` file.
    pub fn open(
        dir: &Path,
        arch: Architecture,
        format: MatrixFormat,
        rope_freqs: Option<Vec<f32>>,
        tied_embeddings: bool,
    ) -> Result<Self, ModelError> {
        let files = shard_files(dir)?;
        let mut shards = Vec::with_capacity(files.len());
        let mut index = HashMap::new();
        for (i, path) in files.iter().enumerate() {
            let shard = Shard::open(path)?;
            for name in shard.metadata.tensors().keys() {
                if index.insert(name.clone(), i).is_some() {
                    return Err(ModelError::Invalid(format!("tensor '{name}' is in more than one shard")));
                }
            }
            shards.push(shard);
        }
        Ok(Self { arch, shards, index, format, rope_freqs, tied_embeddings })
    }

    /// The stored type of most weights (for the startup log): the commonest dtype.
    pub fn dtype_summary(&self) -> String {
        let mut counts: HashMap<String, usize> = HashMap::new();
        for s in &self.shards {
            for info in s.metadata.tensors().values() {
                *counts.entry(format!("{:?}", info.dtype).to_lowercase()).or_default() += 1;
            }
        }
        counts.into_iter().max_by_key(|(d, n)| (*n, d.clone())).map(|(d, _)| d).unwrap_or_default()
    }

    /// Parameters held in the files.
    pub fn parameter_count(&self) -> usize {
        self.shards
            .iter()
            .flat_map(|s| s.metadata.tensors().into_values().map(|i| i.shape.iter().product::<usize>()))
            .sum()
    }

    fn view(&self, hf: &str) -> Option<View<'_>> {
        let shard = &self.shards[*self.index.get(hf)?];
        let info = shard.metadata.info(hf)?;
        let (start, end) = info.data_offsets;
        let bytes = &shard.map[shard.data_start + start..shard.data_start + end];
        Some(View { dtype: info.dtype, shape: info.shape.clone(), bytes })
    }

    /// The Hugging Face name of a GGUF name, where this model has that tensor.
    fn translate(&self, gguf: &str) -> Option<String> {
        if gguf == names::OUTPUT && self.tied_embeddings {
            return None;
        }
        hf_name(self.arch, gguf)
    }

    /// A tensor checked against its expected shape.
    fn checked(&self, gguf: &str, hf: &str, dims: &[usize]) -> Result<View<'_>, ModelError> {
        let view = self.view(hf).ok_or_else(|| missing(gguf, hf))?;
        if view.shape != dims {
            return Err(ModelError::WrongShape { tensor: hf.to_string(), actual: view.shape, expected: dims.to_vec() });
        }
        Ok(view)
    }

    fn matrix(&self, hf: &str, view: &View, out: usize, inp: usize) -> Result<QLinear, ModelError> {
        if view.dtype == Dtype::BF16 && self.format == MatrixFormat::Native {
            let rows = view.bytes.chunks_exact(2).map(|b| bf16::from_le_bytes([b[0], b[1]])).collect();
            return Ok(QLinear::from_bf16(out, inp, rows));
        }
        Ok(QLinear::from_f32(out, inp, to_f32(hf, view)?))
    }
}

/// A file of the folder that is not what it should be (`ModelError::BadFile` speaks of GGUF).
pub(super) fn bad_file(path: &Path, reason: String) -> ModelError {
    ModelError::Invalid(format!("{}: {reason}", path.display()))
}

fn missing(gguf: &str, hf: &str) -> ModelError {
    if hf.is_empty() {
        ModelError::MissingTensor(gguf.to_string())
    } else {
        ModelError::MissingTensor(format!("{hf} (braid's {gguf})"))
    }
}

/// A tensor's values as f32 (bf16 and f16 widen exactly).
fn to_f32(hf: &str, view: &View) -> Result<Vec<f32>, ModelError> {
    let b = view.bytes;
    Ok(match view.dtype {
        Dtype::F32 => b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
        Dtype::BF16 => b.chunks_exact(2).map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        Dtype::F16 => b.chunks_exact(2).map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        other => {
            return Err(ModelError::Unsupported(format!(
                "tensor '{hf}' is {other:?}; braid reads safetensors weights in bf16, f16 and f32"
            )));
        }
    })
}

/// The safetensors files of a folder.
fn shard_files(dir: &Path) -> Result<Vec<PathBuf>, ModelError> {
    let index_path = dir.join("model.safetensors.index.json");
    if index_path.is_file() {
        let text = std::fs::read_to_string(&index_path)
            .map_err(|source| ModelError::Io { path: index_path.clone(), source })?;
        let json: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| bad_file(&index_path, format!("not JSON: {e}")))?;
        let map = json
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| bad_file(&index_path, "no weight_map object".into()))?;
        let mut files: Vec<String> = Vec::new();
        for (tensor, file) in map {
            let file = file
                .as_str()
                .ok_or_else(|| bad_file(&index_path, format!("weight_map['{tensor}'] is not a file name")))?;
            // Shards live beside the index: a name that climbs out of the folder is refused.
            if file.contains('/') || file.contains('\\') || file == ".." {
                return Err(bad_file(&index_path, format!("shard '{file}' is not a file in the folder")));
            }
            if !files.iter().any(|f| f == file) {
                files.push(file.to_string());
            }
        }
        files.sort();
        return Ok(files.into_iter().map(|f| dir.join(f)).collect());
    }
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|source| ModelError::Io { path: dir.to_path_buf(), source })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    found.sort();
    match found.len() {
        1 => Ok(found),
        0 => Err(ModelError::Invalid(format!("{} holds no .safetensors file", dir.display()))),
        n => Err(ModelError::Invalid(format!(
            "{} holds {n} .safetensors files but no model.safetensors.index.json",
            dir.display()
        ))),
    }
}

impl WeightSource for SafetensorsSource {
    fn dims(&self, name: &str) -> Option<Vec<usize>> {
        if name == names::ROPE_FREQS {
            return self.rope_freqs.as_ref().map(|f| vec![f.len()]);
        }
        let hf = self.translate(name)?;
        self.view(&hf).map(|v| v.shape)
    }

    fn linear(&mut self, name: &str, out: usize, inp: usize) -> Result<QLinear, ModelError> {
        let hf = self.translate(name).ok_or_else(|| missing(name, ""))?;
        let view = self.checked(name, &hf, &[out, inp])?;
        self.matrix(&hf, &view, out, inp)
    }

    fn experts(&mut self, name: &str, n: usize, out: usize, inp: usize) -> Result<Vec<QLinear>, ModelError> {
        (0..n)
            .map(|e| {
                let hf = hf_expert_name(self.arch, name, e).ok_or_else(|| missing(name, ""))?;
                let view = self.checked(name, &hf, &[out, inp])?;
                self.matrix(&hf, &view, out, inp)
            })
            .collect()
    }

    fn floats(&mut self, name: &str, dims: &[usize]) -> Result<Vec<f32>, ModelError> {
        if name == names::ROPE_FREQS {
            return self.rope_freqs.clone().ok_or_else(|| missing(name, ""));
        }
        let hf = self.translate(name).ok_or_else(|| missing(name, ""))?;
        let view = self.checked(name, &hf, dims)?;
        let mut values = to_f32(&hf, &view)?;
        // Gemma multiplies by (1 + w) in f32; braid's norms multiply by their weight.
        if norm_has_unit_offset(self.arch, name) {
            values.iter_mut().for_each(|v| *v += 1.0);
        }
        Ok(values)
    }
}

impl std::fmt::Debug for SafetensorsSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let files: Vec<_> = self.shards.iter().map(|s| s.path.display().to_string()).collect();
        f.debug_struct("SafetensorsSource").field("files", &files).field("tensors", &self.index.len()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A safetensors file of the given tensors (name, dtype, shape, bytes).
    fn write(path: &Path, tensors: &[(&str, Dtype, Vec<usize>, Vec<u8>)]) {
        let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
            .iter()
            .map(|(n, d, s, b)| (n.to_string(), safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap()))
            .collect();
        safetensors::tensor::serialize_to_file(views, None, path).unwrap();
    }

    fn f32_bytes(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    #[test]
    fn names_shapes_dtypes_and_gemma_offsets() {
        let dir = tempfile::tempdir().unwrap();
        let norm = [0.5f32, -0.25];
        let f16s: Vec<u8> = [1.5f32, 2.0, -3.0, 0.25].iter().flat_map(|&x| f16::from_f32(x).to_le_bytes()).collect();
        write(
            &dir.path().join("model.safetensors"),
            &[
                ("model.norm.weight", Dtype::F32, vec![2], f32_bytes(&norm)),
                ("model.layers.0.self_attn.q_proj.weight", Dtype::F16, vec![2, 2], f16s),
                ("model.layers.0.self_attn.k_proj.weight", Dtype::I32, vec![1], vec![0; 4]),
            ],
        );
        let mut src =
            SafetensorsSource::open(dir.path(), Architecture::Gemma3, MatrixFormat::Native, None, true).unwrap();
        assert_eq!(src.floats(names::OUTPUT_NORM, &[2]).unwrap(), vec![1.5, 0.75]);
        let q = src.linear("blk.0.attn_q.weight", 2, 2).unwrap();
        assert_eq!(q.forward_rows(&[1.0, 1.0], 1).unwrap(), vec![3.5, -2.75]);
        let e = src.linear("blk.0.attn_q.weight", 4, 1).err().unwrap().to_string();
        assert!(e.contains("[2, 2]") && e.contains("q_proj"), "{e}");
        let e = src.linear("blk.0.attn_k.weight", 1, 1).err().unwrap().to_string();
        assert!(e.contains("I32") || e.contains("shape"), "{e}");
        let e = src.linear("blk.0.attn_v.weight", 2, 2).err().unwrap().to_string();
        assert!(e.contains("v_proj") && e.contains("missing"), "{e}");
        assert!(!src.has(names::OUTPUT), "tied: no output projection of its own");
    }

    #[test]
    fn unsupported_dtypes_are_named() {
        let dir = tempfile::tempdir().unwrap();
        write(&dir.path().join("model.safetensors"), &[("model.norm.weight", Dtype::I32, vec![2], vec![0; 8])]);
        let mut src =
            SafetensorsSource::open(dir.path(), Architecture::Llama, MatrixFormat::Native, None, false).unwrap();
        let e = src.floats(names::OUTPUT_NORM, &[2]).unwrap_err().to_string();
        assert!(e.contains("I32") && e.contains("model.norm.weight"), "{e}");
    }
}
