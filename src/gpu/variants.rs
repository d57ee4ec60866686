//! The compiled forms of braid's kernels that come in several (kernels/attention.cuh's paged
//! attention, kernels/gemm.cuh's and wgmma.cuh's tiles, kernels/igemv.cuh's few-row products):
//! their names, shapes and shared memory. runtime.rs loads them by these names; attention.rs and
//! invariant.rs choose among them. This module imports neither, so none of them import each
//! other in a circle.

use cudarc::driver::{CudaFunction, DriverError, sys};

/// The forms of paged attention (kernels/attention.cuh, `ATTENTION_VARIANTS`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttentionKind {
    /// 4 warps a block, 2 passes of keys loaded at once: (token, KV head) pairs enough to fill
    /// the multiprocessors twice over.
    Many = 0,
    /// 4 warps, 8 passes at once: fewer pairs (the same sums as `Many`).
    Few = 1,
    /// 8 warps, one pass at a time, the keys of a pair shared by several blocks (the last
    /// merges) while the pairs are fewer than multiprocessors: fewer pairs, in the default
    /// mode. Its sums differ, so the batch-invariant mode never takes it.
    Split = 2,
}

impl AttentionKind {
    pub const ALL: [Self; 3] = [Self::Many, Self::Few, Self::Split];

    pub(super) fn name(self) -> &'static str {
        match self {
            Self::Many => "many",
            Self::Few => "few",
            Self::Split => "split",
        }
    }

    pub fn threads(self) -> u32 {
        if self == Self::Split { 256 } else { 128 }
    }
}

/// The instruction a tile's kernel multiplies with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TileKind {
    /// kernels/gemm.cuh's `gemm_tile` (mma.sync, any CUDA GPU from compute capability 8.0).
    MmaSync,
    /// kernels/wgmma.cuh's `gemm_wgmma_tile` (wgmma fed by the tensor memory accelerator:
    /// Hopper's sm_90a machine code only).
    Wgmma,
}

/// One tile shape of `gemm_tile` or `gemm_wgmma_tile` (`GEMM_VARIANT`, `GEMM_WGMMA_VARIANT`).
pub struct GemmTile {
    pub name: &'static str,
    pub rows: usize,
    pub cols: usize,
    pub threads: u32,
    pub stages: usize,
    pub kind: TileKind,
}

const fn tile(name: &'static str, rows: usize, cols: usize, threads: u32, stages: usize, kind: TileKind) -> GemmTile {
    GemmTile { name, rows, cols, threads, stages, kind }
}

/// The tiles (`choose_tile` says which a product gets). The wgmma tiles have a producer
/// warpgroup beside one consumer warpgroup per 64 rows.
pub const GEMM_TILES: &[GemmTile] = &[
    tile("gemm_16x64", 16, 64, 128, 4, TileKind::MmaSync),
    tile("gemm_64x64", 64, 64, 128, 4, TileKind::MmaSync),
    tile("gemm_128x128", 128, 128, 256, 4, TileKind::MmaSync),
    tile("gemm_wgmma_128x128", 128, 128, 384, 4, TileKind::Wgmma),
    tile("gemm_wgmma_64x128", 64, 128, 256, 6, TileKind::Wgmma),
    tile("gemm_wgmma_64x64", 64, 64, 256, 6, TileKind::Wgmma),
];

/// k per stage and the padded shared row of the mma.sync tiles (kernels/gemm.cuh: GEMM_BK,
/// GEMM_BK + GEMM_PAD); the wgmma tiles take 64 k a stage in unpadded 128-byte rows, 1 KiB to
/// align them, and two barriers per stage (kernels/wgmma.cuh).
const GEMM_BK: usize = 32;
const SHARED_ROW_BYTES: usize = (GEMM_BK + 8) * 2;
pub(super) const WGMMA_BK: usize = 64;

impl GemmTile {
    pub(super) fn shared_bytes(&self) -> usize {
        match self.kind {
            TileKind::MmaSync => self.stages * (self.rows + self.cols) * SHARED_ROW_BYTES,
            TileKind::Wgmma => self.stages * (self.rows + self.cols) * WGMMA_BK * 2 + 1024 + self.stages * 16,
        }
    }

    /// k per pipeline stage: a segment of k must hold whole stages.
    pub(super) fn k_per_stage(&self) -> usize {
        match self.kind {
            TileKind::MmaSync => GEMM_BK,
            TileKind::Wgmma => WGMMA_BK,
        }
    }
}

/// One form of `igemv_impl` (kernels/igemv.cuh, `IGEMV_VARIANT`): up to `rows` activation rows,
/// 8·`groups` weight rows per block, `stages` tiles in flight per warp.
pub struct IgemvVariant {
    pub name: &'static str,
    pub rows: usize,
    pub groups: usize,
    pub stages: usize,
    /// k per stage.
    pub bk: usize,
    pub width: Width,
}

const fn igemv(name: &'static str, rows: usize, groups: usize, stages: usize, bk: usize, width: Width) -> IgemvVariant {
    IgemvVariant { name, rows, groups, stages, bk, width }
}

/// The forms, in the order `igemv_with` tries them: the first with enough rows, whose stage
/// divides a segment, and whose weight rows per block suit the output's width. Measured on an
/// H100: stages of 64 k beat 32 (batch 1's products 1.01 ms a step against
/// 1.16); 64 weight rows per warp (2 stages) beat 32 (3 stages) on wide outputs (gate/up and
/// the LM head at 32 rows: 32 and 211 µs against 43 and 293), and lost on narrow ones, where
/// they leave too few blocks. The 32-k forms serve segments that 64 does not divide.
pub const IGEMV_VARIANTS: &[IgemvVariant] = &[
    igemv("igemv_8x4_s3_k64", 8, 4, 3, 64, Width::Narrow),
    igemv("igemv_8x8_s2_k64", 8, 8, 2, 64, Width::Wide),
    igemv("igemv_16x4_s3_k64", 16, 4, 3, 64, Width::Narrow),
    igemv("igemv_16x8_s2_k64", 16, 8, 2, 64, Width::Wide),
    igemv("igemv_32x4_s3_k64", 32, 4, 3, 64, Width::Narrow),
    igemv("igemv_32x8_s2_k64", 32, 8, 2, 64, Width::Wide),
    igemv("igemv_8x2_s3_k32", 8, 2, 3, 32, Width::Any),
    igemv("igemv_16x2_s4_k32", 16, 2, 4, 32, Width::Any),
    igemv("igemv_32x4_s3_k32", 32, 4, 3, 32, Width::Any),
];

/// Which outputs a few-row form is for: wide ones have at least WIDE_OUTPUT rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Width {
    Narrow,
    Wide,
    Any,
}

pub(super) const WIDE_OUTPUT: usize = 8192;

impl Width {
    pub(super) fn suits(self, n: usize) -> bool {
        match self {
            Width::Narrow => n < WIDE_OUTPUT,
            Width::Wide => n >= WIDE_OUTPUT,
            Width::Any => true,
        }
    }
}

/// Most rows the few-row form takes.
pub const IGEMV_MAX_ROWS: usize = 32;

impl IgemvVariant {
    /// kernels/igemv.cuh's `igemv_warp_bytes` times the block's warps (one per segment).
    pub(super) fn shared_bytes(&self, k: usize) -> usize {
        gemm_segments(k) * self.stages * (8 * self.groups + self.rows) * (self.bk + 8) * 2
    }
}

/// Most k-segments of a product.
pub const GEMM_MAX_SEGMENTS: usize = 8;

/// Segments of a k-wide product: the most of 8, 4, 2, 1 that cut k into multiples of 32.
/// A function of k alone: every shape of batch sums a row in the same order.
pub fn gemm_segments(k: usize) -> usize {
    [8, 4, 2, 1].into_iter().find(|&s| (k / 32).is_multiple_of(s)).expect("1 divides everything")
}

/// Lets each product kernel (`gemm_tiles`, loaded in `GEMM_TILES`' order, and `igemv`) use up to
/// `limit` bytes of dynamic shared memory (the wgmma tiles only where `wgmma` says they run).
pub fn allow_shared_memory(
    gemm_tiles: &[CudaFunction],
    igemv: &[CudaFunction],
    limit: usize,
    wgmma: bool,
) -> Result<(), DriverError> {
    let most = |f: &CudaFunction, bytes: usize| -> Result<(), DriverError> {
        // SAFETY: a loaded function and a valid attribute.
        unsafe {
            sys::cuFuncSetAttribute(
                f.cu_function(),
                sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                bytes as i32,
            )
        }
        .result()?;
        Ok(())
    };
    for (f, tile) in gemm_tiles.iter().zip(GEMM_TILES).filter(|(_, t)| wgmma || t.kind == TileKind::MmaSync) {
        most(f, tile.shared_bytes())?;
    }
    for f in igemv {
        most(f, limit)?;
    }
    Ok(())
}
