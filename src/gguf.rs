//! Opening a GGUF file: header parsing (candle's reader), typed metadata access, and an up-front
//! check that every tensor lies inside the file, so a truncated download fails at open time with
//! a message that names the problem instead of half-way through loading.

use std::collections::HashMap;
use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};

use candle_core::Device;
use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::{GgmlDType, QTensor};

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("cannot open model file {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path} is not a valid GGUF file: {reason}")]
    BadFile { path: PathBuf, reason: String },
    #[error(
        "model file is truncated: tensor '{tensor}' needs bytes up to offset {needed}, but the file has only {size} bytes"
    )]
    Truncated { tensor: String, needed: u64, size: u64 },
    #[error("unsupported model architecture '{name}' (braid runs: {supported})")]
    UnsupportedArchitecture { name: String, supported: &'static str },
    #[error("tensor '{tensor}' has type {dtype:?}, which braid cannot compute with")]
    UnsupportedTensorType { tensor: String, dtype: GgmlDType },
    #[error("GGUF metadata key '{0}' is missing")]
    MissingKey(String),
    #[error("GGUF metadata key '{key}' has the wrong type: {reason}")]
    WrongType { key: String, reason: String },
    #[error("tensor '{0}' is missing from the model file")]
    MissingTensor(String),
    #[error("tensor '{tensor}' has shape {actual:?}, expected {expected:?}")]
    WrongShape { tensor: String, actual: Vec<usize>, expected: Vec<usize> },
    #[error("unsupported model feature: {0}")]
    Unsupported(String),
    #[error("invalid model: {0}")]
    Invalid(String),
    #[error("tensor library error: {0}")]
    Candle(#[from] candle_core::Error),
}

/// Tensor types braid computes with (those candle's quantized kernels implement).
const SUPPORTED_TENSOR_TYPES: &[GgmlDType] = &[
    GgmlDType::F32,
    GgmlDType::F16,
    GgmlDType::BF16,
    GgmlDType::Q4_0,
    GgmlDType::Q4_1,
    GgmlDType::Q5_0,
    GgmlDType::Q5_1,
    GgmlDType::Q8_0,
    GgmlDType::Q2K,
    GgmlDType::Q3K,
    GgmlDType::Q4K,
    GgmlDType::Q5K,
    GgmlDType::Q6K,
];

pub struct GgufFile {
    pub path: PathBuf,
    content: Content,
    reader: BufReader<File>,
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<Self, ModelError> {
        let io_err = |source| ModelError::Io { path: path.to_path_buf(), source };
        let file = File::open(path).map_err(io_err)?;
        let size = file.metadata().map_err(io_err)?.len();
        let mut reader = BufReader::new(file);
        let content = Content::read(&mut reader)
            .map_err(|e| ModelError::BadFile { path: path.to_path_buf(), reason: e.to_string() })?;
        let gguf = Self { path: path.to_path_buf(), content, reader };
        gguf.check_tensor_extents(size)?;
        Ok(gguf)
    }

    fn check_tensor_extents(&self, size: u64) -> Result<(), ModelError> {
        for (name, info) in &self.content.tensor_infos {
            if !SUPPORTED_TENSOR_TYPES.contains(&info.ggml_dtype) {
                return Err(ModelError::UnsupportedTensorType { tensor: name.clone(), dtype: info.ggml_dtype });
            }
            let elems = info.shape.elem_count();
            let block = info.ggml_dtype.block_size();
            if elems % block != 0 {
                return Err(ModelError::Invalid(format!(
                    "tensor '{name}' has {elems} elements, not a multiple of its block size {block}"
                )));
            }
            let bytes = (elems / block * info.ggml_dtype.type_size()) as u64;
            let end = self.content.tensor_data_offset.saturating_add(info.offset).saturating_add(bytes);
            if end > size {
                return Err(ModelError::Truncated { tensor: name.clone(), needed: end, size });
            }
        }
        Ok(())
    }

    pub fn metadata(&self) -> &HashMap<String, Value> {
        &self.content.metadata
    }

    fn get(&self, key: &str) -> Result<&Value, ModelError> {
        self.content.metadata.get(key).ok_or_else(|| ModelError::MissingKey(key.to_string()))
    }

    fn wrong(key: &str, e: candle_core::Error) -> ModelError {
        ModelError::WrongType { key: key.to_string(), reason: e.to_string() }
    }

    pub fn get_str(&self, key: &str) -> Result<&str, ModelError> {
        self.get(key)?.to_string().map(|s| s.as_str()).map_err(|e| Self::wrong(key, e))
    }

    pub fn opt_str(&self, key: &str) -> Result<Option<&str>, ModelError> {
        self.content.metadata.get(key).map(|_| self.get_str(key)).transpose()
    }

    /// Any integer type, as GGUF writers differ in which width they use.
    pub fn get_usize(&self, key: &str) -> Result<usize, ModelError> {
        let value = self.get(key)?;
        let n = match value {
            Value::U8(v) => *v as i64,
            Value::I8(v) => *v as i64,
            Value::U16(v) => *v as i64,
            Value::I16(v) => *v as i64,
            Value::U32(v) => *v as i64,
            Value::I32(v) => *v as i64,
            Value::U64(v) => i64::try_from(*v).unwrap_or(-1),
            Value::I64(v) => *v,
            other => {
                return Err(ModelError::WrongType {
                    key: key.to_string(),
                    reason: format!("expected an integer, found {:?}", other.value_type()),
                });
            }
        };
        usize::try_from(n).map_err(|_| ModelError::WrongType {
            key: key.to_string(),
            reason: format!("expected a non-negative integer, found {n}"),
        })
    }

    pub fn opt_usize(&self, key: &str) -> Result<Option<usize>, ModelError> {
        self.content.metadata.get(key).map(|_| self.get_usize(key)).transpose()
    }

    pub fn get_f32(&self, key: &str) -> Result<f32, ModelError> {
        match self.get(key)? {
            Value::F32(v) => Ok(*v),
            Value::F64(v) => Ok(*v as f32),
            _ => self.get_usize(key).map(|v| v as f32),
        }
    }

    pub fn opt_f32(&self, key: &str) -> Result<Option<f32>, ModelError> {
        self.content.metadata.get(key).map(|_| self.get_f32(key)).transpose()
    }

    pub fn opt_bool(&self, key: &str) -> Result<Option<bool>, ModelError> {
        self.content.metadata.get(key).map(|v| v.to_bool().map_err(|e| Self::wrong(key, e))).transpose()
    }

    pub fn get_array(&self, key: &str) -> Result<&Vec<Value>, ModelError> {
        self.get(key)?.to_vec().map_err(|e| Self::wrong(key, e))
    }

    pub fn opt_array(&self, key: &str) -> Result<Option<&Vec<Value>>, ModelError> {
        self.content.metadata.get(key).map(|_| self.get_array(key)).transpose()
    }

    /// A tensor's shape in candle's row-major order, if present.
    pub fn tensor_dims(&self, name: &str) -> Option<&[usize]> {
        self.content.tensor_infos.get(name).map(|i| i.shape.dims())
    }

    pub fn has_tensor(&self, name: &str) -> bool {
        self.content.tensor_infos.contains_key(name)
    }

    /// The number of weights in the file, and its tensor types with how many tensors of each
    /// (most common first), for the startup log.
    pub fn summary(&self) -> (usize, String) {
        let mut count = 0;
        let mut types: Vec<(String, usize)> = Vec::new();
        for info in self.content.tensor_infos.values() {
            count += info.shape.elem_count();
            let name = format!("{:?}", info.ggml_dtype);
            match types.iter_mut().find(|t| t.0 == name) {
                Some(t) => t.1 += 1,
                None => types.push((name, 1)),
            }
        }
        types.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        (count, types.iter().map(|(t, n)| format!("{t} x{n}")).collect::<Vec<_>>().join(", "))
    }

    /// Reads a tensor and checks its shape (given in candle's row-major order).
    pub fn tensor(&mut self, name: &str, expected: &[usize], device: &Device) -> Result<QTensor, ModelError> {
        let info = self.content.tensor_infos.get(name).ok_or_else(|| ModelError::MissingTensor(name.to_string()))?;
        if info.shape.dims() != expected {
            return Err(ModelError::WrongShape {
                tensor: name.to_string(),
                actual: info.shape.dims().to_vec(),
                expected: expected.to_vec(),
            });
        }
        Ok(self.content.tensor(&mut self.reader, name, device)?)
    }
}
