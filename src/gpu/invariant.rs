//! The batch-invariant matrix products (`--batch-invariant`): kernels/gemm.cuh's tiles and
//! kernels/igemv.cuh's few-row form. Every one of them sums an output element in the one order
//! that kernels/gemm.cuh describes, which depends on k alone; which kernel and tile a product
//! gets changes its speed, never its bits.

use cudarc::driver::sys;

use super::runtime::{gemm_segments, Buf, GemvArgs, Gpu, GpuError, Kernels, Result, Spread};

/// One tile shape of `gemm_tile` (kernels/gemm.cuh, `GEMM_VARIANT`).
pub struct GemmTile {
    pub name: &'static str,
    pub rows: usize,
    pub cols: usize,
    pub threads: u32,
    pub stages: usize,
}

/// The tiles, by the rows they take (`choose_tile`).
pub const GEMM_TILES: &[GemmTile] = &[
    GemmTile { name: "gemm_16x64", rows: 16, cols: 64, threads: 128, stages: 4 },
    GemmTile { name: "gemm_64x64", rows: 64, cols: 64, threads: 128, stages: 4 },
    GemmTile { name: "gemm_128x128", rows: 128, cols: 128, threads: 256, stages: 4 },
];

/// The tile for m rows: the smallest that holds them, up to 128 x 128 (measured fastest beyond
/// 64 rows for the products of a Llama-3.2-1B step, even where its tiles are fewer than the
/// multiprocessors: H100 run 39).
fn choose_tile(m: usize) -> usize {
    GEMM_TILES.iter().position(|t| t.rows >= m).unwrap_or(GEMM_TILES.len() - 1)
}

/// k per stage and the padded shared row (kernels/gemm.cuh: GEMM_BK, GEMM_BK + GEMM_PAD).
const GEMM_BK: usize = 32;
const SHARED_ROW_BYTES: usize = (GEMM_BK + 8) * 2;

impl GemmTile {
    fn shared_bytes(&self) -> usize {
        self.stages * (self.rows + self.cols) * SHARED_ROW_BYTES
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
/// H100 (runs 44, 49, 50): stages of 64 k beat 32 (batch 1's products 1.01 ms a step against
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

/// Lets each product kernel use up to `limit` bytes of dynamic shared memory.
pub fn allow_shared_memory(k: &Kernels, limit: usize) -> Result<()> {
    let most = |f: &cudarc::driver::CudaFunction, bytes: usize| -> Result<()> {
        // SAFETY: a loaded function and a valid attribute.
        unsafe {
            sys::cuFuncSetAttribute(f.cu_function(), sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, bytes as i32)
        }
        .result()?;
        Ok(())
    };
    for (f, tile) in k.gemm_tiles.iter().zip(GEMM_TILES) {
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
        let index = choose_tile(m);
        self.gemm_tiled(index, x, w, y, m, n, k, accumulate, split, spread)
    }

    /// The product through tile `GEMM_TILES[index]`.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn gemm_tiled(&self, index: usize, x: u64, w: u64, y: u64, m: usize, n: usize, k: usize, accumulate: bool, split: &Buf<f32>, spread: Spread) -> Result<()> {
        let tile = &GEMM_TILES[index];
        let nseg = gemm_segments(k);
        let tiles = n.div_ceil(tile.cols) * m.div_ceil(tile.rows);
        let fits = nseg * m * n <= split.len;
        // Spreading k over blocks costs a round trip of the partial sums through memory: only
        // when the output alone leaves most multiprocessors idle.
        let blocks = nseg > 1
            && match spread {
                Spread::Auto => fits && 2 * tiles < self.multiprocessors(),
                Spread::Blocks => fits,
                Spread::Registers => false,
            };
        let grid = (n.div_ceil(tile.cols) as u32, m.div_ceil(tile.rows) as u32, if blocks { nseg as u32 } else { 1 });
        let (partial, per_block) = if blocks { (split.ptr, 1) } else { (0u64, nseg) };
        let acc = i32::from(accumulate);
        let f = &self.k.gemm_tiles[index];
        crate::launch!(self, f, grid, tile.threads, tile.shared_bytes() as u32;
            x, w, y, partial, m as i32, n as i32, k as i32, nseg as i32, per_block as i32, acc)?;
        if blocks {
            let mn = (m * n) as u64;
            let grid = mn.div_ceil(256).min(4 * 65_535) as u32;
            crate::launch!(self, &self.k.gemm_reduce, (grid, 1, 1), 256; split.ptr, y, mn, nseg as i32, acc)?;
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
