//! The batch-invariant matrix products (`--batch-invariant`): kernels/gemm.cuh's tiles and
//! kernels/igemv.cuh's few-row form. Every one of them sums an output element in the one order
//! that kernels/gemm.cuh describes, which depends on k alone; which kernel and tile a product
//! gets changes its speed, never its bits.

use cudarc::driver::sys;

use super::runtime::{gemm_segments, Buf, GemvArgs, Gpu, GpuError, Kernels, Result, Spread};

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
const WGMMA_BK: usize = 64;

impl GemmTile {
    fn shared_bytes(&self) -> usize {
        match self.kind {
            TileKind::MmaSync => self.stages * (self.rows + self.cols) * SHARED_ROW_BYTES,
            TileKind::Wgmma => self.stages * (self.rows + self.cols) * WGMMA_BK * 2 + 1024 + self.stages * 16,
        }
    }

    /// k per pipeline stage: a segment of k must hold whole stages.
    fn k_per_stage(&self) -> usize {
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

const WIDE_OUTPUT: usize = 8192;

impl Width {
    fn suits(self, n: usize) -> bool {
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
    fn shared_bytes(&self, k: usize) -> usize {
        gemm_segments(k) * self.stages * (8 * self.groups + self.rows) * (self.bk + 8) * 2
    }
}

/// A tensor map (cuda.h's CUtensorMap) of a row-major bf16 matrix, read in boxes of 64 columns
/// (one 128-byte swizzled row) by `box_rows` rows: what the wgmma tiles load their stages with.
#[repr(transparent)]
pub struct TensorMap(sys::CUtensorMap);

// SAFETY: plain bytes that the driver copies into the kernel's parameters.
unsafe impl cudarc::driver::DeviceRepr for TensorMap {}

impl TensorMap {
    fn rows(ptr: u64, rows: usize, k: usize, box_rows: usize) -> Result<Self> {
        use sys::{CUtensorMapDataType, CUtensorMapFloatOOBfill, CUtensorMapInterleave, CUtensorMapL2promotion, CUtensorMapSwizzle};
        let dims = [k as u64, rows as u64];
        let strides = [k as u64 * 2];
        let boxes = [WGMMA_BK as u32, box_rows as u32];
        let steps = [1u32, 1];
        let mut map = std::mem::MaybeUninit::<sys::CUtensorMap>::uninit();
        // SAFETY: every array holds the rank's entries (strides one fewer); the driver fills map.
        unsafe {
            sys::cuTensorMapEncodeTiled(
                map.as_mut_ptr(),
                CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_BFLOAT16,
                2,
                ptr as *mut std::ffi::c_void,
                dims.as_ptr(),
                strides.as_ptr(),
                boxes.as_ptr(),
                steps.as_ptr(),
                CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
                CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B,
                CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
            )
            .result()?;
            Ok(Self(map.assume_init()))
        }
    }
}

/// Lets each product kernel use up to `limit` bytes of dynamic shared memory (the wgmma tiles
/// only where `wgmma` says they run).
pub fn allow_shared_memory(k: &Kernels, limit: usize, wgmma: bool) -> Result<()> {
    let most = |f: &cudarc::driver::CudaFunction, bytes: usize| -> Result<()> {
        // SAFETY: a loaded function and a valid attribute.
        unsafe {
            sys::cuFuncSetAttribute(f.cu_function(), sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, bytes as i32)
        }
        .result()?;
        Ok(())
    };
    for (f, tile) in k.gemm_tiles.iter().zip(GEMM_TILES).filter(|(_, t)| wgmma || t.kind == TileKind::MmaSync) {
        most(f, tile.shared_bytes())?;
    }
    for f in &k.igemv {
        most(f, limit)?;
    }
    Ok(())
}

impl Gpu {
    /// `y[m, n] = x[m, k] · w[n, k]ᵀ (+ y)`, each row's bits independent of the batch: the
    /// few-row form up to 32 rows (`Spread::Auto`), the tiles beyond (and always, when a test
    /// forces a spread).
    #[allow(clippy::too_many_arguments)]
    pub fn gemm_invariant(&self, x: u64, w: u64, y: u64, m: usize, n: usize, k: usize, accumulate: bool, split: &Buf<f32>, spread: Spread) -> Result<()> {
        if !k.is_multiple_of(32) || m == 0 || n == 0 {
            return Err(GpuError(format!("a {m}x{n}x{k} product: k must be a multiple of 32")));
        }
        if let Some(index) = self.igemv_variant(m, n, k).filter(|_| spread == Spread::Auto) {
            return self.igemv_form(index, w, y, m, n, k, GemvArgs { x, accumulate: i32::from(accumulate), ..GemvArgs::default() });
        }
        let index = self.choose_tile(m, n, k);
        self.gemm_tiled(index, x, w, y, m, n, k, accumulate, split, spread)
    }

    /// The tile for an m x n x k product. Where this GPU has the wgmma tiles and a segment of k
    /// holds whole stages of them: the largest that still makes a block for every
    /// multiprocessor, else the smallest (on an H100, at 256 rows, 128 x 128 for gate/up
    /// and the LM head; the narrower QKV, o and down products, whose 128 x 128 tiles leave most
    /// multiprocessors idle, ran up to 1.5x faster in smaller ones). Else the smallest mma.sync
    /// tile that holds the rows, up to 128 x 128 (fastest beyond 64 rows even where its tiles
    /// are fewer than the multiprocessors).
    fn choose_tile(&self, m: usize, n: usize, k: usize) -> usize {
        let wgmma = || (0..GEMM_TILES.len()).filter(|&i| GEMM_TILES[i].kind == TileKind::Wgmma);
        if m > IGEMV_MAX_ROWS && wgmma().all(|i| self.tile_takes(i, k)) {
            let blocks = |i: usize| m.div_ceil(GEMM_TILES[i].rows) * n.div_ceil(GEMM_TILES[i].cols);
            // GEMM_TILES lists them largest first.
            return wgmma().find(|&i| blocks(i) >= self.multiprocessors()).or_else(|| wgmma().next_back()).expect("wgmma tiles");
        }
        GEMM_TILES.iter().position(|t| t.kind == TileKind::MmaSync && t.rows >= m.min(128)).expect("an mma.sync tile of 128 rows")
    }

    /// Whether tile `index` can run a product of width k here.
    pub(super) fn tile_takes(&self, index: usize, k: usize) -> bool {
        let tile = &GEMM_TILES[index];
        (tile.kind == TileKind::MmaSync || self.has_wgmma()) && (k / gemm_segments(k)).is_multiple_of(tile.k_per_stage())
    }

    /// Whether this binary and GPU run the wgmma tiles: Hopper (compute capability 9.0) and
    /// machine code built for sm_90a (build.rs). `BRAID_WGMMA=0` turns them off (the mma.sync
    /// tiles give the same bits, slower).
    pub fn has_wgmma(&self) -> bool {
        self.wgmma_enabled
    }

    /// The product through tile `GEMM_TILES[index]` (which must take it: `tile_takes`).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn gemm_tiled(&self, index: usize, x: u64, w: u64, y: u64, m: usize, n: usize, k: usize, accumulate: bool, split: &Buf<f32>, spread: Spread) -> Result<()> {
        let tile = &GEMM_TILES[index];
        if !self.tile_takes(index, k) {
            return Err(GpuError(format!("tile {} cannot take a product of width {k} on this GPU", tile.name)));
        }
        let nseg = gemm_segments(k);
        let tiles = n.div_ceil(tile.cols) * m.div_ceil(tile.rows);
        let fits = nseg * m * n <= split.len;
        // Spreading k over blocks costs a round trip of the partial sums through memory: only
        // when the output alone leaves most multiprocessors idle (half of them for mma.sync;
        // three quarters for wgmma, whose 64 tiles of a 256-row o product took 12.8 µs
        // unspread and 27.4 spread).
        let idle = if tile.kind == TileKind::Wgmma { 4 } else { 2 };
        let blocks = nseg > 1
            && match spread {
                Spread::Auto => fits && idle * tiles < self.multiprocessors(),
                Spread::Blocks => fits,
                Spread::Registers => false,
            };
        let z = if blocks { nseg as u32 } else { 1 };
        let (row_tiles, col_tiles) = (m.div_ceil(tile.rows) as u32, n.div_ceil(tile.cols) as u32);
        let (partial, per_block) = if blocks { (split.ptr, 1) } else { (0u64, nseg) };
        let f = &self.k.gemm_tiles[index];
        let shared = tile.shared_bytes() as u32;
        let ints = (m as i32, n as i32, k as i32, nseg as i32, per_block as i32, i32::from(accumulate));
        if tile.kind == TileKind::Wgmma {
            // Row tiles vary fastest: they share each weight tile while it is in L2.
            let (x_map, w_map) = (TensorMap::rows(x, m, k, tile.rows)?, TensorMap::rows(w, n, k, tile.cols)?);
            crate::launch!(self, f, (row_tiles, col_tiles, z), tile.threads, shared;
                x_map, w_map, y, partial, ints.0, ints.1, ints.2, ints.3, ints.4, ints.5)?;
        } else {
            crate::launch!(self, f, (col_tiles, row_tiles, z), tile.threads, shared;
                x, w, y, partial, ints.0, ints.1, ints.2, ints.3, ints.4, ints.5)?;
        }
        if blocks {
            let mn = (m * n) as u64;
            let grid = mn.div_ceil(256).min(4 * 65_535) as u32;
            crate::launch!(self, &self.k.gemm_reduce, (grid, 1, 1), 256; split.ptr, y, mn, nseg as i32, i32::from(accumulate))?;
        }
        Ok(())
    }

    /// The form of the few-row product for `m` rows of width `k` and `n` outputs, if any.
    fn igemv_variant(&self, m: usize, n: usize, k: usize) -> Option<usize> {
        if !(1..=IGEMV_MAX_ROWS).contains(&m) || !k.is_multiple_of(32) {
            return None;
        }
        (0..IGEMV_VARIANTS.len()).find(|&i| IGEMV_VARIANTS[i].width.suits(n) && self.igemv_takes(i, m, k))
    }

    /// Whether form `index` takes `m` rows of width `k` (whatever the outputs).
    pub(super) fn igemv_takes(&self, index: usize, m: usize, k: usize) -> bool {
        let v = &IGEMV_VARIANTS[index];
        v.rows >= m && (k / gemm_segments(k)).is_multiple_of(v.bk) && v.shared_bytes(k) <= self.shared_limit
    }

    /// Whether the few-row form takes `m` rows of width `k`, narrow outputs and wide.
    pub fn igemv_fits(&self, m: usize, k: usize) -> bool {
        self.igemv_variant(m, 1, k).is_some() && self.igemv_variant(m, WIDE_OUTPUT, k).is_some()
    }

    /// The few-row batch-invariant product (kernels/igemv.cuh) of 1..=32 rows of `args.x`,
    /// finished as `args` asks (the forms of `GemvArgs` but the norm inside).
    pub fn igemv_with(&self, w: u64, y: u64, m: usize, n: usize, k: usize, args: GemvArgs) -> Result<()> {
        let Some(index) = self.igemv_variant(m, n, k).filter(|_| args.norm_w == 0 && args.x != 0) else {
            return Err(GpuError(format!("a {m}x{n}x{k} product is not a few-row invariant one (1-32 rows of x, k a multiple of 32)")));
        };
        self.igemv_form(index, w, y, m, n, k, args)
    }

    /// The few-row product through form `IGEMV_VARIANTS[index]` (which must take it).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn igemv_form(&self, index: usize, w: u64, y: u64, m: usize, n: usize, k: usize, args: GemvArgs) -> Result<()> {
        let v = &IGEMV_VARIANTS[index];
        let nseg = gemm_segments(k);
        let grid = (n.div_ceil(8 * v.groups) as u32, 1, 1);
        let threads = 32 * nseg as u32;
        crate::launch!(self, &self.k.igemv[index], grid, threads, v.shared_bytes(k) as u32;
            w, y, m as i32, n as i32, k as i32, nseg as i32, args)
    }
}
