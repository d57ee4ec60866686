//! The batch-invariant matrix products (`--batch-invariant`): kernels/gemm.cuh's tiles and
//! kernels/igemv.cuh's few-row form. Every one of them sums an output element in the one order
//! that kernels/gemm.cuh describes, which depends on k alone; which kernel and tile a product
//! gets changes its speed, never its bits.

use cudarc::driver::sys;

use super::runtime::{Buf, GemvArgs, Gpu, GpuError, Product, Result, Spread};
use super::variants::{GEMM_TILES, IGEMV_MAX_ROWS, IGEMV_VARIANTS, TileKind, WGMMA_BK, WIDE_OUTPUT, gemm_segments};

/// A tensor map (cuda.h's CUtensorMap) of a row-major bf16 matrix, read in boxes of 64 columns
/// (one 128-byte swizzled row) by `box_rows` rows: what the wgmma tiles load their stages with.
#[repr(transparent)]
pub struct TensorMap(sys::CUtensorMap);

// SAFETY: plain bytes that the driver copies into the kernel's parameters.
unsafe impl cudarc::driver::DeviceRepr for TensorMap {}

impl TensorMap {
    fn rows(ptr: u64, rows: usize, k: usize, box_rows: usize) -> Result<Self> {
        use sys::{
            CUtensorMapDataType, CUtensorMapFloatOOBfill, CUtensorMapInterleave, CUtensorMapL2promotion,
            CUtensorMapSwizzle,
        };
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

impl Gpu {
    /// `y[m, n] = x[m, k] · w[n, k]ᵀ (+ y)`, each row's bits independent of the batch: the
    /// few-row form up to 32 rows (`Spread::Auto`), the tiles beyond (and always, when a test
    /// forces a spread).
    pub fn gemm_invariant(&self, x: u64, p: Product, accumulate: bool, split: &Buf<f32>, spread: Spread) -> Result<()> {
        let Product { m, n, k, .. } = p;
        if !k.is_multiple_of(32) || m == 0 || n == 0 {
            return Err(GpuError(format!("a {m}x{n}x{k} product: k must be a multiple of 32")));
        }
        if let Some(index) = self.igemv_variant(m, n, k).filter(|_| spread == Spread::Auto) {
            return self.igemv_form(index, p, GemvArgs { x, accumulate: i32::from(accumulate), ..GemvArgs::default() });
        }
        let index = self.choose_tile(m, n, k);
        self.gemm_tiled(index, x, p, accumulate, split, spread)
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
            return wgmma()
                .find(|&i| blocks(i) >= self.multiprocessors())
                .or_else(|| wgmma().next_back())
                .expect("wgmma tiles");
        }
        GEMM_TILES
            .iter()
            .position(|t| t.kind == TileKind::MmaSync && t.rows >= m.min(128))
            .expect("an mma.sync tile of 128 rows")
    }

    /// Whether tile `index` can run a product of width k here.
    pub(super) fn tile_takes(&self, index: usize, k: usize) -> bool {
        let tile = &GEMM_TILES[index];
        (tile.kind == TileKind::MmaSync || self.has_wgmma())
            && (k / gemm_segments(k)).is_multiple_of(tile.k_per_stage())
    }

    /// Whether this binary and GPU run the wgmma tiles: Hopper (compute capability 9.0) and
    /// machine code built for sm_90a (build.rs). `BRAID_WGMMA=0` turns them off (the mma.sync
    /// tiles give the same bits, slower).
    pub fn has_wgmma(&self) -> bool {
        self.wgmma_enabled
    }

    /// The product through tile `GEMM_TILES[index]` (which must take it: `tile_takes`).
    pub(super) fn gemm_tiled(
        &self,
        index: usize,
        x: u64,
        p: Product,
        accumulate: bool,
        split: &Buf<f32>,
        spread: Spread,
    ) -> Result<()> {
        let Product { w, y, m, n, k } = p;
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
    pub fn igemv_with(&self, p: Product, args: GemvArgs) -> Result<()> {
        let Product { m, n, k, .. } = p;
        let Some(index) = self.igemv_variant(m, n, k).filter(|_| args.norm_w == 0 && args.x != 0) else {
            return Err(GpuError(format!(
                "a {m}x{n}x{k} product is not a few-row invariant one (1-32 rows of x, k a multiple of 32)"
            )));
        };
        self.igemv_form(index, p, args)
    }

    /// The few-row product through form `IGEMV_VARIANTS[index]` (which must take it).
    pub(super) fn igemv_form(&self, index: usize, p: Product, args: GemvArgs) -> Result<()> {
        let Product { w, y, m, n, k } = p;
        let v = &IGEMV_VARIANTS[index];
        let nseg = gemm_segments(k);
        let grid = (n.div_ceil(8 * v.groups) as u32, 1, 1);
        let threads = 32 * nseg as u32;
        crate::launch!(self, &self.k.igemv[index], grid, threads, v.shared_bytes(k) as u32;
            w, y, m as i32, n as i32, k as i32, nseg as i32, args)
    }
}
