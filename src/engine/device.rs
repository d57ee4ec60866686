//! Where the forward pass runs: braid's CPU model over a KV cache in host memory, or (feature
//! `cuda`) the CUDA path over a KV cache on the device. The engine sees one interface.

use std::sync::Arc;

use crate::backend::RowChoice;
use crate::backend::{BlockStore, FlatBatch, RowOutput};
use crate::model::{Decoder, KvCache, ModelConfig};

/// A loaded model, shareable between engines (weights are read-only).
#[derive(Clone)]
pub enum ModelHandle {
    Cpu(Arc<Decoder>),
    #[cfg(feature = "cuda")]
    Cuda(Arc<crate::gpu::CudaWeights>),
}

impl From<Arc<Decoder>> for ModelHandle {
    fn from(model: Arc<Decoder>) -> Self {
        ModelHandle::Cpu(model)
    }
}

impl ModelHandle {
    pub fn config(&self) -> &ModelConfig {
        match self {
            ModelHandle::Cpu(m) => &m.config,
            #[cfg(feature = "cuda")]
            ModelHandle::Cuda(w) => &w.config,
        }
    }

    pub fn vocab_size(&self) -> usize {
        match self {
            ModelHandle::Cpu(m) => m.vocab_size(),
            #[cfg(feature = "cuda")]
            ModelHandle::Cuda(w) => w.vocab_size,
        }
    }

    /// Where the model runs, in words ("cpu", or the GPU's name).
    pub fn device(&self) -> String {
        match self {
            ModelHandle::Cpu(_) => "cpu".into(),
            #[cfg(feature = "cuda")]
            ModelHandle::Cuda(w) => w.gpu.name(),
        }
    }

    pub fn is_cpu(&self) -> bool {
        matches!(self, ModelHandle::Cpu(_))
    }

    /// What tells this model's K/V values from those the same weights give elsewhere: 0 on the
    /// CPU (whose kernel family the weights' fingerprint covers), else a tag of the GPU path,
    /// its products' mode and the kernels of this build (a kernel whose sums change makes
    /// another build's blocks differ in their last bits). Mixed into the prompt cache's
    /// identity, so that a block computed one way is never loaded by another.
    pub fn arithmetic_tag(&self) -> u128 {
        match self {
            ModelHandle::Cpu(_) => 0,
            #[cfg(feature = "cuda")]
            ModelHandle::Cuda(w) => {
                let kernels = crate::gpu::Gpu::kernels_fingerprint();
                xxhash_rust::xxh3::xxh3_128(
                    format!("cuda bf16 {:?} kernels {kernels:032x}", w.gpu.gemm_kind).as_bytes(),
                )
            }
        }
    }

    /// KV-cache bytes when none are configured: a quarter of available host memory on the
    /// CPU; on a GPU, 90% of the device memory left after the activations of a step of
    /// `tokens` tokens and `rows` logits rows (vLLM's default share).
    pub fn default_kv_bytes(&self, tokens: usize, rows: usize) -> usize {
        let _ = (tokens, rows);
        match self {
            ModelHandle::Cpu(_) => available_memory().unwrap_or(4 << 30) / 4,
            #[cfg(feature = "cuda")]
            ModelHandle::Cuda(w) => {
                let free = w.gpu.memory().map(|m| m.0).unwrap_or(0);
                let workspace = crate::gpu::CudaRunner::workspace_bytes(w, tokens, rows);
                (free.saturating_sub(workspace) as f64 * 0.9) as usize
            }
        }
    }

    /// The forward pass of one engine: its own KV cache of `num_blocks` blocks, and room for
    /// steps of up to `tokens` tokens and `rows` logits rows.
    pub fn backend(&self, num_blocks: usize, block_size: usize, tokens: usize, rows: usize) -> Result<Backend, String> {
        let _ = (tokens, rows);
        match self {
            ModelHandle::Cpu(m) => {
                Ok(Backend::Cpu { model: Arc::clone(m), kv: KvCache::new(&m.config, num_blocks, block_size) })
            }
            #[cfg(feature = "cuda")]
            ModelHandle::Cuda(w) => crate::gpu::CudaRunner::new(Arc::clone(w), num_blocks, block_size, tokens, rows)
                .map(|r| Backend::Cuda(Box::new(r)))
                .map_err(|e| e.to_string()),
        }
    }
}

/// Bytes of memory the OS says are available (Linux), if known.
fn available_memory() -> Option<usize> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: usize = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

pub enum Backend {
    Cpu {
        model: Arc<Decoder>,
        kv: KvCache,
    },
    #[cfg(feature = "cuda")]
    Cuda(Box<crate::gpu::CudaRunner>),
}

impl Backend {
    /// Whether `forward` can choose tokens itself (`choices`): the GPU then sends back token ids
    /// instead of logits rows. The CPU always returns rows.
    pub fn draws_on_device(&self) -> bool {
        !matches!(self, Backend::Cpu { .. })
    }

    /// One forward pass: one output per logits row. With `choices` (one per logits row, where
    /// `draws_on_device`), the backend chooses the rows' tokens itself but for `Host` rows.
    pub fn forward(&mut self, batch: &FlatBatch, choices: Option<&[RowChoice]>) -> candle_core::Result<Vec<RowOutput>> {
        let _ = choices;
        match self {
            Backend::Cpu { model, kv } => Ok(model.forward(batch, kv)?.into_iter().map(RowOutput::Logits).collect()),
            #[cfg(feature = "cuda")]
            Backend::Cuda(runner) => Ok(runner.forward(batch, choices)?),
        }
    }

    /// Prepares decode steps of up to `max_batch` sequences ahead of the first request (on a
    /// GPU: captures their CUDA graphs); nothing to do on the CPU.
    pub fn warm_up(&mut self, max_batch: usize) -> Result<(), String> {
        let _ = max_batch;
        match self {
            Backend::Cpu { .. } => Ok(()),
            #[cfg(feature = "cuda")]
            Backend::Cuda(runner) => runner.warm_up(max_batch).map_err(|e| e.to_string()),
        }
    }

    /// The KV blocks, as the disk tier reads and fills them.
    pub fn block_store(&mut self) -> &mut dyn BlockStore {
        match self {
            Backend::Cpu { kv, .. } => kv,
            #[cfg(feature = "cuda")]
            Backend::Cuda(runner) => runner.as_mut(),
        }
    }
}
