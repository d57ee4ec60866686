//! The CUDA device as braid uses it: one context and stream, braid's kernels (kernels.cu,
//! compiled by build.rs) and cuBLAS, and device buffers addressed by raw pointers.
//!
//! Everything runs on one stream in order, so cudarc's per-buffer event tracking (made for
//! several streams) is switched off: a launch is then one driver call.

use std::sync::Arc;

use cudarc::cublas::{CudaBlas, sys as blas_sys};
use cudarc::driver::{CudaContext, CudaFunction, CudaSlice, CudaStream, DevicePtr, DeviceRepr};

use super::variants::{AttentionKind, GEMM_TILES, IGEMV_VARIANTS, allow_shared_memory};

static KERNELS: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/kernels.fatbin"));

pub type Result<T> = std::result::Result<T, GpuError>;

#[derive(Debug, thiserror::Error)]
#[error("CUDA: {0}")]
pub struct GpuError(pub String);

impl From<cudarc::driver::DriverError> for GpuError {
    fn from(e: cudarc::driver::DriverError) -> Self {
        GpuError(e.to_string())
    }
}

impl From<cudarc::cublas::result::CublasError> for GpuError {
    fn from(e: cudarc::cublas::result::CublasError) -> Self {
        GpuError(format!("cuBLAS: {e:?}"))
    }
}

impl From<GpuError> for candle_core::Error {
    fn from(e: GpuError) -> Self {
        candle_core::Error::Msg(e.to_string())
    }
}

/// A device buffer of `len` elements and its address.
pub struct Buf<T> {
    slice: CudaSlice<T>,
    pub ptr: u64,
    pub len: usize,
}

impl<T> Buf<T> {
    /// Address of element `i`.
    pub fn at(&self, i: usize) -> u64 {
        assert!(i <= self.len);
        self.ptr + (i * std::mem::size_of::<T>()) as u64
    }
}

/// braid's kernels, looked up once.
pub struct Kernels {
    pub fill_dummy_bf16: CudaFunction,
    pub fill_dummy_bf16_rows: CudaFunction,
    pub fill_dummy_f32: CudaFunction,
    pub embed_rows: CudaFunction,
    pub rms_norm_bf16: CudaFunction,
    pub rope_and_cache: CudaFunction,
    /// Paged attention by head dimension (64, 128), `AttentionKind` and query heads per KV
    /// head held (up to 4, up to 8): `Gpu::attention_kernel` finds one.
    pub paged_attention: Vec<CudaFunction>,
    pub silu_mul_bf16: CudaFunction,
    pub argmax_logprob: CudaFunction,
    /// Random draws by blocks per row (`sample_rows_c1`, `_c2`, `_c4`, `_c8`).
    pub sample_rows: [CudaFunction; 4],
    /// The batch-invariant tiled product, one per shape of `variants::GEMM_TILES`.
    pub gemm_tiles: Vec<CudaFunction>,
    pub gemm_reduce: CudaFunction,
    /// The batch-invariant few-row product, one per shape of `variants::IGEMV_VARIANTS`.
    pub igemv: Vec<CudaFunction>,
    /// Products of 1-4 rows (`gemv_m1` ..= `gemv_m4`).
    pub gemv: [CudaFunction; 4],
    /// The same with k split over a block's warps, for narrow outputs (`gemv_split_m1` ..).
    pub gemv_split: [CudaFunction; 4],
}

/// Which matrix products the forward pass uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GemmKind {
    /// cuBLAS (the default): the fastest, but it picks kernels (and so summation orders) by
    /// shape, so a token batched with others can differ in the last bits from the same token
    /// alone, and a near-tie can then pick another greedy token.
    Cublas,
    /// braid's kernels (`--batch-invariant`, invariant.rs): each row's result is the same bits
    /// whatever else is in the batch; on an H100 1.1-1.3x slower end to end than the default
    /// mode (1 to 256 sequences), its large products 1.4-1.7x slower than cuBLAS's.
    BatchInvariant,
}

/// How a batch-invariant product is spread over blocks (tests force each way).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Spread {
    /// Segments over blocks when the output alone has too few tiles to fill the GPU.
    Auto,
    Registers,
    Blocks,
}

pub struct Gpu {
    pub ctx: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
    blas: CudaBlas,
    _cublas_workspace: CudaSlice<u8>,
    pub k: Kernels,
    pub gemm_kind: GemmKind,
    pub(super) multiprocessors: usize,
    /// Most blocks sharing a (token, KV head) pair's keys (BRAID_ATTENTION_SPLITS, 1..=8, for
    /// tuning; default 8).
    pub(super) attention_max_splits: usize,
    /// Whether kernels start while the previous one finishes (programmatic dependent launch,
    /// compute capability 9.0+, see `new` for the modes and BRAID_PDL). Every braid kernel waits for its
    /// predecessor's results (kernels.cu, `pdl_enter`), so this changes timing, never results.
    pub programmatic_launch: bool,
    /// The most tokens of a step that launches so (`begin_step`); `usize::MAX`: every step.
    programmatic_step_tokens: usize,
    /// Whether the current step launches so (`begin_step`; a step of more tokens turns it off).
    step_programmatic: std::sync::atomic::AtomicBool,
    /// Whether plain few-row products with narrow outputs split k over a block's warps
    /// (`gemv_split_*`; BRAID_GEMV_SPLIT=0 turns it off).
    pub gemv_split: bool,
    capability_major: u32,
    /// Whether the batch-invariant products may use the wgmma tiles (`Gpu::has_wgmma`).
    pub(super) wgmma_enabled: bool,
    /// Bytes of dynamic shared memory a few-row invariant product may ask for.
    pub(super) shared_limit: usize,
}

/// Threads of a `sample_rows` block (kernels/sample.cuh, SAMPLE_THREADS).
const SAMPLE_THREADS: u32 = 1024;

/// Bytes of cuBLAS scratch (what it asks for on Hopper).
const CUBLAS_WORKSPACE: usize = 32 << 20;

/// The most tokens of a batch-invariant step whose kernels launch programmatically dependent.
const PDL_INVARIANT_TOKENS: usize = 8;

/// Most blocks that share one (token, KV head) pair's keys in split attention.
pub const ATTENTION_MAX_SPLITS: usize = 8;

/// The arguments of `gemv_impl` (kernels/gemv.cuh) (`GemvArgs`, same layout): its input and output
/// modes. Addresses are 0 where unused.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct GemvArgs {
    pub x: u64,
    pub residual: u64,
    pub norm_w: u64,
    pub eps: f32,
    pub accumulate: i32,
    pub positions: u64,
    pub slots: u64,
    pub cos_table: u64,
    pub sin_table: u64,
    pub bias: u64,
    pub q_out: u64,
    pub k_cache: u64,
    pub v_cache: u64,
    pub n_head: i32,
    pub n_kv_head: i32,
    pub head_dim: i32,
    pub rope_dim: i32,
    pub act_out: u64,
}

// SAFETY: plain old data with the C layout kernels/gemv.cuh declares.
unsafe impl cudarc::driver::DeviceRepr for GemvArgs {}

/// A matrix product's weights, output and shape, `y[m, n] = input[m, k] · w[n, k]ᵀ`: device
/// addresses of row-major bf16 weights and of the output (f32, but for the SwiGLU forms, whose
/// `y` is the bf16 `act[m, n / 2]`). The input is passed beside it: bf16 rows `x`, or the input
/// modes of `GemvArgs`.
#[derive(Debug, Clone, Copy)]
pub struct Product {
    pub w: u64,
    pub y: u64,
    pub m: usize,
    pub n: usize,
    pub k: usize,
}

/// Rows of the largest product that `gemv` computes, and the weight rows of one of its blocks
/// (kernels/gemv.cuh: GEMV_WARPS x GEMV_ROWS).
const GEMV_MAX_ROWS: usize = 4;
const GEMV_ROWS_PER_BLOCK: usize = 8;
/// Weight rows of a block of the split-k variant (GEMV_ROWS: its warps share them).
const GEMV_SPLIT_ROWS_PER_BLOCK: usize = 2;

/// Whether the few-row product takes `m` rows of width `k` (16-byte loads: k a multiple of 8).
fn gemv_fits(m: usize, k: usize) -> bool {
    (1..=GEMV_MAX_ROWS).contains(&m) && k.is_multiple_of(8)
}

/// Whether a CUDA driver and device are present (false, not an error, when not).
pub fn available() -> bool {
    // cudarc panics when it cannot open the driver library: silence that report here.
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let found =
        std::panic::catch_unwind(|| CudaContext::device_count().map(|n| n > 0).unwrap_or(false)).unwrap_or(false);
    std::panic::set_hook(hook);
    found
}

impl Gpu {
    pub fn new(ordinal: usize, gemm_kind: GemmKind) -> Result<Self> {
        if !available() {
            return Err(GpuError("no CUDA driver or device found (is libcuda.so.1 on the loader's path?)".into()));
        }
        if KERNELS.is_empty() {
            return Err(GpuError("this binary was built without its CUDA kernels (BRAID_CUDA_CHECK_ONLY)".into()));
        }
        let ctx = CudaContext::new(ordinal)?;
        // SAFETY: braid uses one stream; nothing needs cross-stream events.
        unsafe { ctx.disable_event_tracking() };
        // A stream of its own: the legacy default stream cannot be captured into graphs.
        let stream = ctx.new_stream()?;
        let module = ctx.load_module(cudarc::nvrtc::Ptx::from_binary(KERNELS.to_vec()))?;
        let f = |name: &str| module.load_function(name);
        let k = Kernels {
            fill_dummy_bf16: f("fill_dummy_bf16")?,
            fill_dummy_bf16_rows: f("fill_dummy_bf16_rows")?,
            fill_dummy_f32: f("fill_dummy_f32")?,
            embed_rows: f("embed_rows")?,
            rms_norm_bf16: f("rms_norm_bf16")?,
            rope_and_cache: f("rope_and_cache")?,
            paged_attention: [64, 128]
                .into_iter()
                .flat_map(|d| {
                    AttentionKind::ALL
                        .into_iter()
                        .flat_map(move |kind| [4, 8].map(|g| format!("paged_attention_d{d}_{}_g{g}", kind.name())))
                })
                .map(|name| f(&name))
                .collect::<std::result::Result<_, _>>()?,
            silu_mul_bf16: f("silu_mul_bf16")?,
            argmax_logprob: f("argmax_logprob")?,
            sample_rows: [f("sample_rows_c1")?, f("sample_rows_c2")?, f("sample_rows_c4")?, f("sample_rows_c8")?],
            gemm_tiles: GEMM_TILES.iter().map(|t| f(t.name)).collect::<std::result::Result<_, _>>()?,
            gemm_reduce: f("gemm_reduce")?,
            igemv: IGEMV_VARIANTS.iter().map(|v| f(v.name)).collect::<std::result::Result<_, _>>()?,
            gemv: [f("gemv_m1")?, f("gemv_m2")?, f("gemv_m3")?, f("gemv_m4")?],
            gemv_split: [f("gemv_split_m1")?, f("gemv_split_m2")?, f("gemv_split_m3")?, f("gemv_split_m4")?],
        };
        // What a block may ask for beyond its static shared memory (igemv's: under 1 KiB).
        let shared_limit = ctx
            .attribute(cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)?
            as usize
            - 1024;
        let capability =
            ctx.attribute(cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?;
        let minor =
            ctx.attribute(cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?;
        // sm_90a machine code runs on compute capability 9.0 alone; elsewhere the driver takes
        // the PTX, whose wgmma kernels are empty.
        let wgmma_enabled = (capability, minor) == (9, 0)
            && env!("BRAID_CUDA_MACHINE_CODE") == "sm_90a"
            && std::env::var_os("BRAID_WGMMA").is_none_or(|v| v != "0");
        allow_shared_memory(&k.gemm_tiles, &k.igemv, shared_limit, wgmma_enabled)?;
        let blas = CudaBlas::new(stream.clone())?;
        // A workspace of its own, so cuBLAS allocates nothing while a graph is captured.
        let workspace = {
            // SAFETY: cuBLAS only uses it as scratch.
            let slice = unsafe { stream.alloc::<u8>(CUBLAS_WORKSPACE) }?;
            let ptr = slice.device_ptr(&stream).0;
            // SAFETY: the handle and the buffer live as long as this Gpu.
            unsafe { blas_sys::cublasSetWorkspace_v2(*blas.handle(), ptr as *mut _, CUBLAS_WORKSPACE) }.result()?;
            slice
        };
        let multiprocessors =
            ctx.attribute(cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)? as usize;
        let attention_max_splits = match std::env::var("BRAID_ATTENTION_SPLITS") {
            Err(_) => ATTENTION_MAX_SPLITS,
            Ok(v) => v
                .parse()
                .ok()
                .filter(|n| (1..=ATTENTION_MAX_SPLITS).contains(n))
                .ok_or_else(|| GpuError(format!("BRAID_ATTENTION_SPLITS={v}: give 1 to {ATTENTION_MAX_SPLITS}")))?,
        };
        // Default mode: on for every step (BRAID_PDL=0 turns it off). The batch-invariant mode:
        // on for steps of up to PDL_INVARIANT_TOKENS (the few-row products' 8-row forms), where
        // it took batch 1 from 1.43 to 1.39 ms, and steps of 4 and 8 tokens 30-50 µs (on an
        // H100); larger steps measured 2-4% slower with it (c=32 and c=256).
        // BRAID_PDL=1: every step.
        let pdl = std::env::var("BRAID_PDL").ok();
        let programmatic_launch = capability >= 9 && pdl.as_deref() != Some("0");
        let programmatic_step_tokens = match (gemm_kind, pdl.as_deref()) {
            (GemmKind::BatchInvariant, Some("1")) | (GemmKind::Cublas, _) => usize::MAX,
            (GemmKind::BatchInvariant, _) => PDL_INVARIANT_TOKENS,
        };
        let capability_major = capability as u32;
        let gemv_split = std::env::var_os("BRAID_GEMV_SPLIT").is_none_or(|v| v != "0");
        Ok(Self {
            ctx,
            stream,
            blas,
            _cublas_workspace: workspace,
            k,
            gemm_kind,
            multiprocessors,
            attention_max_splits,
            programmatic_launch,
            programmatic_step_tokens,
            step_programmatic: true.into(),
            gemv_split,
            capability_major,
            wgmma_enabled,
            shared_limit,
        })
    }

    /// Starts a step of `tokens` tokens: its kernels launch programmatically dependent where
    /// `programmatic_launch` is on and the step is small enough (`new`).
    pub fn begin_step(&self, tokens: usize) {
        self.step_programmatic.store(tokens <= self.programmatic_step_tokens, std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether the device can launch kernels programmatically dependent (compute capability 9.0+).
    pub fn supports_programmatic_launch(&self) -> bool {
        self.capability_major >= 9
    }

    pub fn name(&self) -> String {
        self.ctx.name().unwrap_or_else(|_| "CUDA device".into())
    }

    /// A hash of the kernels this binary carries (their machine code and PTX): it changes
    /// whenever a kernel does, and with it, possibly, the last bits of what braid computes.
    pub fn kernels_fingerprint() -> u128 {
        xxhash_rust::xxh3::xxh3_128(KERNELS)
    }

    /// (free, total) bytes of device memory.
    pub fn memory(&self) -> Result<(usize, usize)> {
        Ok(self.ctx.mem_get_info()?)
    }

    /// A buffer of zeros.
    pub fn alloc_zeroed<T: DeviceRepr + cudarc::driver::ValidAsZeroBits>(&self, len: usize) -> Result<Buf<T>> {
        let slice = self.stream.alloc_zeros::<T>(len.max(1))?;
        let ptr = slice.device_ptr(&self.stream).0;
        Ok(Buf { slice, ptr, len })
    }

    /// An uninitialised buffer (every user writes before reading).
    pub fn alloc<T: DeviceRepr>(&self, len: usize) -> Result<Buf<T>> {
        // SAFETY: contents are written by kernels or copies before they are read.
        let slice = unsafe { self.stream.alloc::<T>(len.max(1)) }?;
        let ptr = slice.device_ptr(&self.stream).0;
        Ok(Buf { slice, ptr, len })
    }

    pub fn upload<T: DeviceRepr>(&self, host: &[T]) -> Result<Buf<T>> {
        let mut buf = self.alloc::<T>(host.len())?;
        self.stream.memcpy_htod(host, &mut buf.slice)?;
        Ok(buf)
    }

    /// Copies `host` to the start of `dst`.
    pub fn write<T: DeviceRepr>(&self, host: &[T], dst: &mut Buf<T>) -> Result<()> {
        self.write_at(host, dst, 0)
    }

    /// Copies `host` into `dst` from element `offset` on.
    pub fn write_at<T: DeviceRepr>(&self, host: &[T], dst: &mut Buf<T>, offset: usize) -> Result<()> {
        assert!(offset + host.len() <= dst.len);
        if host.is_empty() {
            return Ok(());
        }
        let mut view = dst.slice.slice_mut(offset..offset + host.len());
        self.stream.memcpy_htod(host, &mut view)?;
        Ok(())
    }

    /// Copies the first `host.len()` elements of `src` to `host`, waiting for the stream.
    pub fn read<T: DeviceRepr>(&self, src: &Buf<T>, host: &mut [T]) -> Result<()> {
        self.read_at(src, 0, host)
    }

    /// Copies `host.len()` elements of `src` from element `offset` on to `host`, waiting for
    /// the stream.
    pub fn read_at<T: DeviceRepr>(&self, src: &Buf<T>, offset: usize, host: &mut [T]) -> Result<()> {
        assert!(offset + host.len() <= src.len);
        if host.is_empty() {
            return Ok(());
        }
        let view = src.slice.slice(offset..offset + host.len());
        self.stream.memcpy_dtoh(&view, host)?;
        self.stream.synchronize()?;
        Ok(())
    }

    pub fn synchronize(&self) -> Result<()> {
        Ok(self.stream.synchronize()?)
    }

    /// A kernel of the module by name (tests time variants that braid does not launch).
    #[cfg(test)]
    pub(super) fn function(&self, name: &str) -> Result<CudaFunction> {
        let module = self.ctx.load_module(cudarc::nvrtc::Ptx::from_binary(KERNELS.to_vec()))?;
        Ok(module.load_function(name)?)
    }

    pub fn multiprocessors(&self) -> usize {
        self.multiprocessors
    }

    /// `y[m, n] = x[m, k] · w[n, k]ᵀ (+ y when `accumulate`)`: bf16 operands, f32 sums and
    /// output, row-major. `split` is scratch for `variants::GEMM_MAX_SEGMENTS * m * n` floats (or fewer:
    /// products that do not fit keep their sums in registers).
    pub fn gemm(&self, x: u64, p: Product, accumulate: bool, split: &Buf<f32>) -> Result<()> {
        match self.gemm_kind {
            GemmKind::BatchInvariant => self.gemm_invariant(x, p, accumulate, split, Spread::Auto),
            GemmKind::Cublas if gemv_fits(p.m, p.k) => self.gemv(x, p, accumulate),
            GemmKind::Cublas => self.gemm_cublas(x, p, if accumulate { 1.0 } else { 0.0 }),
        }
    }

    /// The product for 1..=4 rows (kernels/gemv.cuh, `gemv_impl`): weights streamed once at full
    /// bandwidth, where cuBLAS's kernels for such shapes are latency-bound.
    pub fn gemv(&self, x: u64, p: Product, accumulate: bool) -> Result<()> {
        self.gemv_with(p, GemvArgs { x, accumulate: i32::from(accumulate), ..GemvArgs::default() })
    }

    /// Whether the fused few-row products (`gemv_qkv`, `gemv_swiglu`) take a step of `m` rows
    /// over a `k`-wide input (decode of a few sequences): kernels/gemv.cuh's in the default
    /// mode (up to 4 rows), kernels/igemv.cuh's in the batch-invariant one (up to 32).
    pub fn fuses(&self, m: usize, k: usize) -> bool {
        match self.gemm_kind {
            GemmKind::Cublas => gemv_fits(m, k),
            GemmKind::BatchInvariant => self.igemv_fits(m, k),
        }
    }

    /// Whether those products also compute the RMS norm of their input inside (`gemv_norm`,
    /// `gemv_norm_swiglu`, the norm in `gemv_qkv`): the default mode's only.
    pub fn norm_inside(&self, m: usize, k: usize) -> bool {
        self.gemm_kind == GemmKind::Cublas && gemv_fits(m, k)
    }

    /// `y = rms_norm(residual) · wᵀ` for 1..=4 rows: the norm (rms_norm_bf16's arithmetic,
    /// rounded to bf16) computed inside the product instead of by its own launch.
    pub fn gemv_norm(&self, residual: u64, norm_w: u64, eps: f32, p: Product) -> Result<()> {
        self.gemv_with(p, GemvArgs { residual, norm_w, eps, ..GemvArgs::default() })
    }

    /// `act = silu(gate) · up` of the gate/up product of 1..=4 rows from the residual (norm
    /// inside), gate and up rows interleaved in `p.w`: silu_mul_bf16's arithmetic in the
    /// product's last step. `act` is `p.y`, bf16 `[m, n / 2]`.
    pub fn gemv_norm_swiglu(&self, residual: u64, norm_w: u64, eps: f32, p: Product) -> Result<()> {
        if !p.n.is_multiple_of(2) {
            return Err(GpuError(format!("gate/up rows must come in pairs, got {}", p.n)));
        }
        self.gemv_with(Product { y: 0, ..p }, GemvArgs { residual, norm_w, eps, act_out: p.y, ..GemvArgs::default() })
    }

    /// `act = silu(gate) · up` of the gate/up product of the bf16 rows `x` (gate and up rows
    /// interleaved in `p.w`, `act` in `p.y`), as `gemv_norm_swiglu` but without the norm.
    pub fn gemv_swiglu(&self, x: u64, p: Product) -> Result<()> {
        if !p.n.is_multiple_of(2) {
            return Err(GpuError(format!("gate/up rows must come in pairs, got {}", p.n)));
        }
        self.fused(Product { y: 0, ..p }, GemvArgs { x, act_out: p.y, ..GemvArgs::default() })
    }

    /// The QKV product of a few rows finished as rope_and_cache does (interleaved rope only):
    /// `rope` names the input (the residual and the norm where `norm_inside`, else x), the
    /// outputs and the rope tables (`p.y` is unused).
    pub fn gemv_qkv(&self, p: Product, rope: GemvArgs) -> Result<()> {
        if rope.q_out == 0 || (rope.norm_w == 0) == (rope.x == 0) || rope.head_dim % 2 != 0 || rope.rope_dim % 2 != 0 {
            return Err(GpuError("gemv_qkv needs one input (x, or the residual and its norm), the outputs and even head and rope dimensions".into()));
        }
        if !p.n.is_multiple_of(2) {
            return Err(GpuError(format!("QKV rows must come in rotation pairs, got {}", p.n)));
        }
        self.fused(Product { y: 0, ..p }, rope)
    }

    /// A fused few-row product in the products' mode (see `fuses`).
    fn fused(&self, p: Product, args: GemvArgs) -> Result<()> {
        match self.gemm_kind {
            GemmKind::Cublas => self.gemv_with(p, args),
            GemmKind::BatchInvariant => self.igemv_with(p, args),
        }
    }

    fn gemv_with(&self, p: Product, args: GemvArgs) -> Result<()> {
        let Product { w, y, m, n, k } = p;
        if !gemv_fits(m, k) {
            return Err(GpuError(format!("a {m}x{n}x{k} product is not a GEMV (1-4 rows, k a multiple of 8)")));
        }
        let plain = args.norm_w == 0 && args.q_out == 0 && args.act_out == 0;
        // A block per 8 rows leaves a narrow output (o, down: 2048 rows) too few loads in flight.
        let (f, rows_per_block) =
            if plain && self.gemv_split && n.div_ceil(GEMV_ROWS_PER_BLOCK) < 4 * self.multiprocessors {
                (&self.k.gemv_split[m - 1], GEMV_SPLIT_ROWS_PER_BLOCK)
            } else {
                (&self.k.gemv[m - 1], GEMV_ROWS_PER_BLOCK)
            };
        let grid = (n.div_ceil(rows_per_block) as u32, 1, 1);
        crate::launch!(self, f, grid, 128; w, y, n as i32, k as i32, args)
    }

    /// Each row's random draw (kernels/sample.cuh) over `rows` logits rows, after the argmax
    /// has filled `ids` and `logprobs`. A row's blocks form one cluster (compute capability
    /// 9.0): as many as leave every row a share of the multiprocessors, up to 8.
    pub fn sample_rows(
        &self,
        logits: u64,
        vocab: usize,
        draws: u64,
        ids: u64,
        logprobs: u64,
        rows: usize,
    ) -> Result<()> {
        let (variant, cluster) = if self.capability_major >= 9 {
            [(3, 8u32), (2, 4), (1, 2), (0, 1)]
                .into_iter()
                .find(|&(_, c)| c as usize * rows <= self.multiprocessors)
                .unwrap_or((0, 1))
        } else {
            (0, 1)
        };
        crate::launch!(self, &self.k.sample_rows[variant], (rows as u32, cluster, 1), SAMPLE_THREADS; logits, vocab as i32, draws, ids, logprobs)
    }

    /// `y[m, n] = x[m, k] · w[n, k]ᵀ + beta · y` through cuBLAS (column-major: it sees the
    /// transposes).
    pub fn gemm_cublas(&self, x: u64, p: Product, beta: f32) -> Result<()> {
        let Product { w, y, m, n, k } = p;
        let alpha = 1.0f32;
        // SAFETY: the pointers address buffers of at least these shapes (callers size them).
        unsafe {
            cudarc::cublas::result::gemm_ex(
                *self.blas.handle(),
                blas_sys::cublasOperation_t::CUBLAS_OP_T,
                blas_sys::cublasOperation_t::CUBLAS_OP_N,
                n as i32,
                m as i32,
                k as i32,
                &alpha as *const f32 as *const _,
                w as *const _,
                blas_sys::cudaDataType::CUDA_R_16BF,
                k as i32,
                x as *const _,
                blas_sys::cudaDataType::CUDA_R_16BF,
                k as i32,
                &beta as *const f32 as *const _,
                y as *mut _,
                blas_sys::cudaDataType::CUDA_R_32F,
                n as i32,
                blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )?;
        }
        Ok(())
    }
}

/// Launches a kernel: `launch!(gpu, function, grid, block; arg, ...)`. Each argument is bound
/// to a local that lives to the end of the launch, since the driver reads it by address; types
/// must match the kernel's signature (u64 for pointers, i32, u64, f32).
#[macro_export]
macro_rules! launch {
    ($gpu:expr, $f:expr, $grid:expr, $block:expr; $($arg:expr),* $(,)?) => {
        $crate::launch!($gpu, $f, $grid, $block, 0u32; $($arg),*)
    };
    ($gpu:expr, $f:expr, $grid:expr, $block:expr, $smem:expr; $($arg:expr),* $(,)?) => {{
        let gpu: &$crate::gpu::runtime::Gpu = $gpu;
        let mut params: Vec<*mut std::ffi::c_void> = Vec::new();
        $(
            // Shadowed, not dropped: every argument lives until the block ends.
            let arg = $arg;
            params.push($crate::gpu::runtime::kernel_param(&arg));
        )*
        let (function, grid, block, shared): (&cudarc::driver::CudaFunction, (u32, u32, u32), u32, u32) = ($f, $grid, $block, $smem);
        // SAFETY: the caller passes the kernel's arguments in its signature's order and types.
        unsafe { gpu.launch_raw(function, grid, block, shared, &mut params) }
    }};
}

/// A kernel argument's address, as the driver takes it (plain data only).
pub fn kernel_param<T: DeviceRepr>(arg: &T) -> *mut std::ffi::c_void {
    arg as *const T as *mut std::ffi::c_void
}

impl Gpu {
    /// Launches `f` on the stream, programmatically dependent on the kernel before it when
    /// `programmatic_launch` is on (cudarc's launch builder cannot set launch attributes), with
    /// `shared_bytes` of dynamic shared memory.
    ///
    /// # Safety
    /// `params` holds the addresses of `f`'s arguments, in its signature's order and types,
    /// and the buffers they address outlive the launch.
    pub unsafe fn launch_raw(
        &self,
        f: &CudaFunction,
        grid: (u32, u32, u32),
        block: u32,
        shared_bytes: u32,
        params: &mut [*mut std::ffi::c_void],
    ) -> Result<()> {
        use cudarc::driver::sys;
        self.ctx.bind_to_thread()?;
        let mut attrs = [sys::CUlaunchAttribute {
            id: sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION,
            pad: [0; 4],
            value: sys::CUlaunchAttributeValue { programmaticStreamSerializationAllowed: 1 },
        }];
        let config = sys::CUlaunchConfig {
            gridDimX: grid.0,
            gridDimY: grid.1,
            gridDimZ: grid.2,
            blockDimX: block,
            blockDimY: 1,
            blockDimZ: 1,
            sharedMemBytes: shared_bytes,
            hStream: self.stream.cu_stream(),
            attrs: attrs.as_mut_ptr(),
            numAttrs: u32::from(
                self.programmatic_launch && self.step_programmatic.load(std::sync::atomic::Ordering::Relaxed),
            ),
        };
        // SAFETY: the config and attributes live across the call; the caller vouches for the
        // arguments.
        unsafe { sys::cuLaunchKernelEx(&config, f.cu_function(), params.as_mut_ptr(), std::ptr::null_mut()) }
            .result()?;
        Ok(())
    }
}
