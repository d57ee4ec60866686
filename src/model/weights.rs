//! Where an architecture's weights come from. Architectures ask for tensors by llama.cpp's GGUF
//! names (`blk.3.attn_q.weight`); a GGUF file answers directly, a Hugging Face folder
//! (`loader/hf/`) through its architecture's table of names (`model/arch/`).

use std::sync::Arc;

use candle_core::Device;
use candle_core::quantized::{QStorage, QTensor};

use crate::cpu::linear::QLinear;
use crate::gguf::{GgufFile, ModelError};

/// The token table, as a linear layer braid can look rows up in, or (types braid's kernels
/// don't read) candle's tensor.
pub enum Embedding {
    Rows(Arc<QLinear>),
    Table(Arc<QTensor>),
}

impl Embedding {
    /// Rows of the table for `ids`, `[ids.len(), hidden]` as plain f32.
    pub fn lookup(&self, ids: &[u32]) -> candle_core::Result<Vec<f32>> {
        match self {
            Embedding::Rows(t) => t.rows(ids),
            Embedding::Table(t) => {
                let ids = candle_core::Tensor::from_slice(ids, ids.len(), &Device::Cpu)?;
                t.embedding(&ids)?.flatten_all()?.to_vec1::<f32>()
            }
        }
    }
}

/// A model's tensors, by GGUF name. Matrices are `[out, in]`, experts `[n_expert, out, in]`.
pub trait WeightSource {
    /// A tensor's dimensions, outermost first, if the model has it.
    fn dims(&self, name: &str) -> Option<Vec<usize>>;

    fn has(&self, name: &str) -> bool {
        self.dims(name).is_some()
    }

    /// A matrix as a linear layer for braid's kernels.
    fn linear(&mut self, name: &str, out: usize, inp: usize) -> Result<QLinear, ModelError>;

    /// A stack of `n` matrices (one per expert) as one linear layer each.
    fn experts(&mut self, name: &str, n: usize, out: usize, inp: usize) -> Result<Vec<QLinear>, ModelError>;

    /// A tensor of the given dimensions as plain f32 (norm weights, biases, routers).
    fn floats(&mut self, name: &str, dims: &[usize]) -> Result<Vec<f32>, ModelError>;

    /// A vector as f32.
    fn vector(&mut self, name: &str, n: usize) -> Result<Vec<f32>, ModelError> {
        self.floats(name, &[n])
    }

    /// The token table `[vocab, hidden]`.
    fn embedding(&mut self, name: &str, vocab: usize, hidden: usize) -> Result<Embedding, ModelError> {
        Ok(Embedding::Rows(Arc::new(self.linear(name, vocab, hidden)?)))
    }
}

/// A GGUF file's tensors, read onto the CPU.
pub struct GgufSource<'a> {
    pub file: &'a mut GgufFile,
}

impl WeightSource for GgufSource<'_> {
    fn dims(&self, name: &str) -> Option<Vec<usize>> {
        self.file.tensor_dims(name).map(<[usize]>::to_vec)
    }

    fn linear(&mut self, name: &str, out: usize, inp: usize) -> Result<QLinear, ModelError> {
        Ok(QLinear::new(Arc::new(self.file.tensor(name, &[out, inp], &Device::Cpu)?))?)
    }

    fn experts(&mut self, name: &str, n: usize, out: usize, inp: usize) -> Result<Vec<QLinear>, ModelError> {
        let all = self.file.tensor(name, &[n, out, inp], &Device::Cpu)?;
        let dtype = all.dtype();
        let bytes = all.data()?;
        // Each expert is a whole number of rows, and rows are whole blocks: the bytes split evenly.
        let per_expert = bytes.len() / n;
        (0..n)
            .map(|e| {
                let chunk = std::borrow::Cow::Borrowed(&bytes[e * per_expert..(e + 1) * per_expert]);
                let storage = QStorage::from_data(chunk, &Device::Cpu, dtype)?;
                Ok(QLinear::new(Arc::new(QTensor::new(storage, (out, inp))?))?)
            })
            .collect()
    }

    fn floats(&mut self, name: &str, dims: &[usize]) -> Result<Vec<f32>, ModelError> {
        let t = self.file.tensor(name, dims, &Device::Cpu)?.dequantize(&Device::Cpu)?;
        Ok(t.flatten_all()?.to_vec1::<f32>()?)
    }

    fn embedding(&mut self, name: &str, vocab: usize, hidden: usize) -> Result<Embedding, ModelError> {
        let table = Arc::new(self.file.tensor(name, &[vocab, hidden], &Device::Cpu)?);
        let linear = QLinear::new(table.clone())?;
        Ok(if linear.supports_rows() { Embedding::Rows(Arc::new(linear)) } else { Embedding::Table(table) })
    }
}
