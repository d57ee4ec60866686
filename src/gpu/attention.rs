//! Paged attention's forms (kernels/attention.cuh) and which one a step takes.

use cudarc::driver::CudaFunction;

use super::runtime::{GemmKind, Gpu};
use super::variants::AttentionKind;

impl AttentionKind {
    /// The form for `blocks` (token, KV head) pairs. On an H100, 32/8 heads x 64, 256 keys:
    /// up to 256 pairs (32 tokens) 8 warps took 9.2-13.7 µs (the keys split below 132 pairs)
    /// and 4 warps with 8 passes at once 12.7-17.6; from 512 pairs, 4 warps with 2 passes were
    /// fastest (22.3 µs at 512 pairs, 88.7 at 2,048).
    fn for_blocks(mode: GemmKind, blocks: usize, multiprocessors: usize) -> Self {
        match (blocks < 2 * multiprocessors, mode) {
            (true, GemmKind::Cublas) => Self::Split,
            (true, GemmKind::BatchInvariant) => Self::Few,
            (false, _) => Self::Many,
        }
    }
}

impl Gpu {
    /// How to run paged attention over `blocks` (token, KV head) pairs of `group` query heads
    /// each: the kernel, its threads and how many blocks share each pair's keys.
    pub fn attention_plan(&self, head_dim: usize, group: usize, blocks: usize) -> (&CudaFunction, u32, usize) {
        let kind = AttentionKind::for_blocks(self.gemm_kind, blocks, self.multiprocessors);
        let splits = if kind == AttentionKind::Split {
            (self.multiprocessors / blocks.max(1)).clamp(1, self.attention_max_splits)
        } else {
            1
        };
        (self.attention_kernel(head_dim, kind, group), kind.threads(), splits)
    }

    /// The attention kernel of that kind for heads of `head_dim` (64 or 128) and `group` query
    /// heads per KV head (up to 8).
    pub fn attention_kernel(&self, head_dim: usize, kind: AttentionKind, group: usize) -> &CudaFunction {
        let index =
            (usize::from(head_dim == 128) * AttentionKind::ALL.len() + kind as usize) * 2 + usize::from(group > 4);
        &self.k.paged_attention[index]
    }
}
