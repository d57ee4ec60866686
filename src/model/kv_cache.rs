//! Paged key/value storage: a pool of fixed-size blocks per layer. Which blocks belong to which
//! sequence is decided elsewhere (the engine's block manager); the model only reads and writes
//! through block tables.

use super::config::ModelConfig;
use crate::backend::{BlockId, BlockStore, push_f16_bytes, read_f16_bytes};

use half::f16;

/// One layer's K and V, in the layout the CPU attention kernel reads (`cpu::attention`).
pub use crate::cpu::attention::LayerKv;

pub struct KvCache {
    pub block_size: usize,
    pub num_blocks: usize,
    /// Floats per token per layer in K (the same in V): n_kv_head * head_dim.
    pub token_width: usize,
    pub layers: Vec<LayerKv>,
}

impl KvCache {
    /// Bytes one block takes across all layers (K and V).
    pub fn bytes_per_block(config: &ModelConfig, block_size: usize) -> usize {
        block_size * config.n_layer * config.kv_floats_per_token_layer() * std::mem::size_of::<f16>()
    }

    /// Allocates the pool. Memory is zero-initialised lazily by the OS, so resident memory
    /// grows only as blocks are first written.
    pub fn new(config: &ModelConfig, num_blocks: usize, block_size: usize) -> Self {
        let token_width = config.n_kv_head * config.head_dim;
        let floats = num_blocks * block_size * token_width;
        let layers = (0..config.n_layer).map(|_| LayerKv { k: zeroed(floats), v: zeroed(floats) }).collect();
        Self { block_size, num_blocks, token_width, layers }
    }
}

impl BlockStore for KvCache {
    fn block_bytes(&self, id: BlockId) -> Result<Vec<u8>, String> {
        let n = self.block_size * self.token_width;
        let start = id as usize * n;
        let mut out = Vec::with_capacity(self.layers.len() * 4 * n);
        for layer in &self.layers {
            for half in [&layer.k, &layer.v] {
                push_f16_bytes(&half[start..start + n], &mut out);
            }
        }
        Ok(out)
    }

    fn fill_block(&mut self, id: BlockId, bytes: &[u8]) -> Result<(), String> {
        let n = self.block_size * self.token_width;
        assert_eq!(bytes.len(), self.layers.len() * 4 * n, "block payload of the wrong size");
        let start = id as usize * n;
        let mut chunks = bytes.chunks_exact(2 * n);
        for layer in &mut self.layers {
            for half in [&mut layer.k, &mut layer.v] {
                read_f16_bytes(chunks.next().expect("sized above"), &mut half[start..start + n]);
            }
        }
        Ok(())
    }
}

/// A zeroed vector obtained from the allocator as zeroed pages (`vec![0u16; n]` is calloc), so
/// untouched blocks cost no resident memory; `vec![f16::ZERO; n]` would write every element.
fn zeroed(n: usize) -> Vec<f16> {
    use half::vec::HalfBitsVecExt;
    vec![0u16; n].reinterpret_into()
}
