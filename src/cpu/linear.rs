//! Linear layers over quantized weights: braid's own kernels for Q4_0, Q4_1, Q5_0, Q8_0 and the
//! K-quants Q4_K, Q5_K, Q6_K (the types of the common GGUF files, Q4_K_M included), candle's for
//! the rest (F32, F16, BF16, Q5_1, Q2_K, Q3_K). Where the CPU has AVX-512 VNNI the
//! weights are repacked at load for `quant::vnni` / `quant::vnni_k` (and GGUF's blocks dropped);
//! elsewhere the AVX2 or plain kernels read GGUF's blocks as they are.

use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};

use rayon::prelude::*;

#[cfg(target_arch = "x86_64")]
use super::quant::vnni::{PackedWeights, PairFormat};
#[cfg(target_arch = "x86_64")]
use super::quant::vnni_k::{KPairFormat, PackedWeightsK};
use super::quant::{
    self, ActQuant, BlockQ4_0, BlockQ4_1, BlockQ4K, BlockQ5_0, BlockQ5K, BlockQ6K, BlockQ8_0, QK, QK_K, WeightBlock,
    kquants,
};

enum Weights {
    Q4_0(Vec<BlockQ4_0>),
    Q4_1(Vec<BlockQ4_1>),
    Q5_0(Vec<BlockQ5_0>),
    Q8_0(Vec<BlockQ8_0>),
    Q4K(Vec<BlockQ4K>),
    Q5K(Vec<BlockQ5K>),
    Q6K(Vec<BlockQ6K>),
    /// The same types repacked for the AVX-512 VNNI kernel, where the CPU has it.
    #[cfg(target_arch = "x86_64")]
    VnniQ4_0(PackedWeights<BlockQ4_0>),
    #[cfg(target_arch = "x86_64")]
    VnniQ4_1(PackedWeights<BlockQ4_1>),
    #[cfg(target_arch = "x86_64")]
    VnniQ5_0(PackedWeights<BlockQ5_0>),
    #[cfg(target_arch = "x86_64")]
    VnniQ8_0(PackedWeights<BlockQ8_0>),
    #[cfg(target_arch = "x86_64")]
    VnniQ4K(PackedWeightsK<BlockQ4K>),
    #[cfg(target_arch = "x86_64")]
    VnniQ5K(PackedWeightsK<BlockQ5K>),
    #[cfg(target_arch = "x86_64")]
    VnniQ6K(PackedWeightsK<BlockQ6K>),
    /// bf16 rows (dummy models): activations rounded to bf16, f32 sums (`bf16.rs`).
    Bf16(Vec<half::bf16>),
    /// f32 rows (f16 and f32 weights, or bf16 ones widened): plain f32 products, activations
    /// as they are.
    F32(Vec<f32>),
    /// Other types, through candle.
    Candle(QMatMul),
    /// Several matrices side by side (their outputs concatenated per row) that could not be
    /// merged into one because their types differ.
    Parts(Vec<QLinear>),
}

/// `y = x W^T` for `W` of shape `[n, k]`.
pub struct QLinear {
    n: usize,
    k: usize,
    weights: Weights,
}

/// Output columns per parallel task: enough work to amortise scheduling.
const COLUMNS_PER_TASK: usize = 32;

/// Native weights in the form this CPU's fastest kernel reads.
macro_rules! native {
    ($plain:ident, $vnni:ident, $packed:ident, $blocks:expr, $per_row:expr) => {{
        let blocks = $blocks;
        #[cfg(target_arch = "x86_64")]
        if super::quant::vnni::available() {
            return Weights::$vnni($packed::new(&blocks, $per_row));
        }
        Weights::$plain(blocks)
    }};
}

impl Weights {
    fn q4_0(blocks: Vec<BlockQ4_0>, per_row: usize) -> Self {
        native!(Q4_0, VnniQ4_0, PackedWeights, blocks, per_row)
    }
    fn q4_1(blocks: Vec<BlockQ4_1>, per_row: usize) -> Self {
        native!(Q4_1, VnniQ4_1, PackedWeights, blocks, per_row)
    }
    fn q5_0(blocks: Vec<BlockQ5_0>, per_row: usize) -> Self {
        native!(Q5_0, VnniQ5_0, PackedWeights, blocks, per_row)
    }
    fn q8_0(blocks: Vec<BlockQ8_0>, per_row: usize) -> Self {
        native!(Q8_0, VnniQ8_0, PackedWeights, blocks, per_row)
    }
    fn q4_k(blocks: Vec<BlockQ4K>, per_row: usize) -> Self {
        native!(Q4K, VnniQ4K, PackedWeightsK, blocks, per_row)
    }
    fn q5_k(blocks: Vec<BlockQ5K>, per_row: usize) -> Self {
        native!(Q5K, VnniQ5K, PackedWeightsK, blocks, per_row)
    }
    fn q6_k(blocks: Vec<BlockQ6K>, per_row: usize) -> Self {
        native!(Q6K, VnniQ6K, PackedWeightsK, blocks, per_row)
    }
}

impl QLinear {
    pub fn new(tensor: Arc<QTensor>) -> candle_core::Result<Self> {
        let (n, k) = tensor.shape().dims2()?;
        let dtype = tensor.dtype();
        let super_blocks = matches!(dtype, GgmlDType::Q4K | GgmlDType::Q5K | GgmlDType::Q6K);
        if super_blocks && k % QK_K != 0 {
            // llama.cpp never writes such a tensor: its rows would not be whole super-blocks.
            candle_core::bail!("a {dtype:?} matrix needs rows of a multiple of {QK_K} values, not {k}");
        }
        let cpu = tensor.device().is_cpu();
        let native = cpu && k % QK == 0;
        let weights = match dtype {
            GgmlDType::Q4_0 if native => Weights::q4_0(quant::parse_q4_0(&tensor.data()?), k / QK),
            GgmlDType::Q4_1 if native => Weights::q4_1(quant::parse_q4_1(&tensor.data()?), k / QK),
            GgmlDType::Q5_0 if native => Weights::q5_0(quant::parse_q5_0(&tensor.data()?), k / QK),
            GgmlDType::Q8_0 if native => Weights::q8_0(quant::parse_q8_0(&tensor.data()?), k / QK),
            GgmlDType::Q4K if cpu => Weights::q4_k(kquants::parse_q4_k(&tensor.data()?), k / QK_K),
            GgmlDType::Q5K if cpu => Weights::q5_k(kquants::parse_q5_k(&tensor.data()?), k / QK_K),
            GgmlDType::Q6K if cpu => Weights::q6_k(kquants::parse_q6_k(&tensor.data()?), k / QK_K),
            _ => Weights::Candle(QMatMul::from_arc(tensor)?),
        };
        Ok(Self { n, k, weights })
    }

    /// A `[n, k]` matrix of bf16 rows.
    pub fn from_bf16(n: usize, k: usize, rows: Vec<half::bf16>) -> Self {
        assert_eq!(rows.len(), n * k, "a {n}x{k} matrix");
        Self { n, k, weights: Weights::Bf16(rows) }
    }

    /// A `[n, k]` matrix of f32 rows: each output is one f32 dot product of its row with the
    /// activations, in the same order whatever the batch.
    pub fn from_f32(n: usize, k: usize, rows: Vec<f32>) -> Self {
        assert_eq!(rows.len(), n * k, "a {n}x{k} matrix");
        Self { n, k, weights: Weights::F32(rows) }
    }

    pub fn out_features(&self) -> usize {
        self.n
    }

    /// Stacks matrices with the same input width into one whose output is theirs side by side
    /// (Q, K and V; gate and up): one pass over the activations and one parallel region
    /// instead of several. Rows are merged when all parts share a native type.
    pub fn stack(parts: Vec<QLinear>) -> QLinear {
        let k = parts[0].k;
        let n = parts.iter().map(|p| p.n).sum();
        assert!(parts.iter().all(|p| p.k == k), "stacked matrices share their input width");
        macro_rules! merge {
            ($variant:ident, $join:expr) => {
                if parts.iter().all(|p| matches!(p.weights, Weights::$variant(_))) {
                    let mut all = None;
                    for p in parts {
                        if let Weights::$variant(w) = p.weights {
                            all = Some(match all {
                                None => w,
                                Some(mut all) => {
                                    $join(&mut all, w);
                                    all
                                }
                            });
                        }
                    }
                    return QLinear { n, k, weights: Weights::$variant(all.expect("at least one part")) };
                }
            };
        }
        merge!(Q4_0, |all: &mut Vec<_>, w| all.extend(w));
        merge!(Q4_1, |all: &mut Vec<_>, w| all.extend(w));
        merge!(Q5_0, |all: &mut Vec<_>, w| all.extend(w));
        merge!(Q8_0, |all: &mut Vec<_>, w| all.extend(w));
        merge!(Q4K, |all: &mut Vec<_>, w| all.extend(w));
        merge!(Q5K, |all: &mut Vec<_>, w| all.extend(w));
        merge!(Q6K, |all: &mut Vec<_>, w| all.extend(w));
        merge!(Bf16, |all: &mut Vec<_>, w| all.extend(w));
        merge!(F32, |all: &mut Vec<_>, w| all.extend(w));
        // The VNNI form packs rows in pairs: parts merge when none but the last has an odd
        // number of rows (Q, K, V and gate, up always have even ones).
        #[cfg(target_arch = "x86_64")]
        if parts[..parts.len() - 1].iter().all(|p| p.n.is_multiple_of(2)) {
            merge!(VnniQ4_0, |all: &mut PackedWeights<_>, w| all.append(w));
            merge!(VnniQ4_1, |all: &mut PackedWeights<_>, w| all.append(w));
            merge!(VnniQ5_0, |all: &mut PackedWeights<_>, w| all.append(w));
            merge!(VnniQ8_0, |all: &mut PackedWeights<_>, w| all.append(w));
            merge!(VnniQ4K, |all: &mut PackedWeightsK<_>, w| all.append(w));
            merge!(VnniQ5K, |all: &mut PackedWeightsK<_>, w| all.append(w));
            merge!(VnniQ6K, |all: &mut PackedWeightsK<_>, w| all.append(w));
        }
        QLinear { n, k, weights: Weights::Parts(parts) }
    }

    /// `[m, k]` rows in, `[m, n]` rows out, as plain vectors (CPU).
    pub fn forward_rows(&self, x: &[f32], m: usize) -> candle_core::Result<Vec<f32>> {
        match &self.weights {
            #[cfg(target_arch = "x86_64")]
            Weights::VnniQ4_0(w) => Ok(self.vnni_rows(x, m, w)),
            #[cfg(target_arch = "x86_64")]
            Weights::VnniQ4_1(w) => Ok(self.vnni_rows(x, m, w)),
            #[cfg(target_arch = "x86_64")]
            Weights::VnniQ5_0(w) => Ok(self.vnni_rows(x, m, w)),
            #[cfg(target_arch = "x86_64")]
            Weights::VnniQ8_0(w) => Ok(self.vnni_rows(x, m, w)),
            #[cfg(target_arch = "x86_64")]
            Weights::VnniQ4K(w) => Ok(self.vnni_k_rows(x, m, w)),
            #[cfg(target_arch = "x86_64")]
            Weights::VnniQ5K(w) => Ok(self.vnni_k_rows(x, m, w)),
            #[cfg(target_arch = "x86_64")]
            Weights::VnniQ6K(w) => Ok(self.vnni_k_rows(x, m, w)),
            Weights::Q4_0(w) => Ok(self.native_rows(x, m, w)),
            Weights::Q4_1(w) => Ok(self.native_rows(x, m, w)),
            Weights::Q5_0(w) => Ok(self.native_rows(x, m, w)),
            Weights::Q8_0(w) => Ok(self.native_rows(x, m, w)),
            Weights::Q4K(w) => Ok(self.native_rows(x, m, w)),
            Weights::Q5K(w) => Ok(self.native_rows(x, m, w)),
            Weights::Q6K(w) => Ok(self.native_rows(x, m, w)),
            Weights::Bf16(w) => {
                let xs = super::bf16::round_rows(&x[..m * self.k]);
                Ok(self.by_column_ranges(m, |cols, out| {
                    super::bf16::columns(w, self.k, &xs, m, cols, |r, c, v| out.set(r, c, v))
                }))
            }
            Weights::F32(w) => Ok(self.by_column_ranges(m, |cols, out| {
                for col in cols {
                    let row = &w[col * self.k..(col + 1) * self.k];
                    for r in 0..m {
                        out.set(r, col, super::bf16::dot(row, &x[r * self.k..(r + 1) * self.k]));
                    }
                }
            })),
            Weights::Candle(w) => {
                w.forward(&Tensor::from_slice(x, (m, self.k), &Device::Cpu)?)?.flatten_all()?.to_vec1::<f32>()
            }
            Weights::Parts(parts) => {
                let outs = parts.iter().map(|p| p.forward_rows(x, m)).collect::<candle_core::Result<Vec<_>>>()?;
                let mut y = Vec::with_capacity(m * self.n);
                for r in 0..m {
                    for (p, o) in parts.iter().zip(&outs) {
                        y.extend_from_slice(&o[r * p.n..(r + 1) * p.n]);
                    }
                }
                Ok(y)
            }
        }
    }

    /// Rows of `W` as f32, `[ids.len(), k]`: the embedding lookup when `W` is a token table.
    pub fn rows(&self, ids: &[u32]) -> candle_core::Result<Vec<f32>> {
        let k = self.k;
        let mut out = vec![0f32; ids.len() * k];
        for (&id, o) in ids.iter().zip(out.chunks_exact_mut(k)) {
            let id = id as usize;
            if id >= self.n {
                candle_core::bail!("token id {id} is outside the vocabulary of {}", self.n);
            }
            // Row `id`'s blocks of `size` values.
            let row = |size: usize| id * (k / size)..(id + 1) * (k / size);
            match &self.weights {
                Weights::Q4_0(w) => quant::dequantize_q4_0(&w[row(QK)], o),
                Weights::Q4_1(w) => quant::dequantize_q4_1(&w[row(QK)], o),
                Weights::Q5_0(w) => quant::dequantize_q5_0(&w[row(QK)], o),
                Weights::Q8_0(w) => quant::dequantize_q8_0(&w[row(QK)], o),
                Weights::Q4K(w) => kquants::dequantize_q4_k(&w[row(QK_K)], o),
                Weights::Q5K(w) => kquants::dequantize_q5_k(&w[row(QK_K)], o),
                Weights::Q6K(w) => kquants::dequantize_q6_k(&w[row(QK_K)], o),
                #[cfg(target_arch = "x86_64")]
                Weights::VnniQ4_0(w) => w.dequantize_row(id, o),
                #[cfg(target_arch = "x86_64")]
                Weights::VnniQ4_1(w) => w.dequantize_row(id, o),
                #[cfg(target_arch = "x86_64")]
                Weights::VnniQ5_0(w) => w.dequantize_row(id, o),
                #[cfg(target_arch = "x86_64")]
                Weights::VnniQ8_0(w) => w.dequantize_row(id, o),
                #[cfg(target_arch = "x86_64")]
                Weights::VnniQ4K(w) => w.dequantize_row(id, o),
                #[cfg(target_arch = "x86_64")]
                Weights::VnniQ5K(w) => w.dequantize_row(id, o),
                #[cfg(target_arch = "x86_64")]
                Weights::VnniQ6K(w) => w.dequantize_row(id, o),
                Weights::Bf16(w) => {
                    for (o, v) in o.iter_mut().zip(&w[id * k..(id + 1) * k]) {
                        *o = v.to_f32();
                    }
                }
                Weights::F32(w) => o.copy_from_slice(&w[id * k..(id + 1) * k]),
                Weights::Candle(_) | Weights::Parts(_) => {
                    candle_core::bail!("embedding lookup needs a natively supported type")
                }
            }
        }
        Ok(out)
    }

    /// Whether `rows` works for this weight type.
    pub fn supports_rows(&self) -> bool {
        !matches!(self.weights, Weights::Candle(_) | Weights::Parts(_))
    }

    fn native_rows<B: WeightBlock>(&self, xs: &[f32], m: usize, w: &[B]) -> Vec<f32> {
        let blocks = self.k / B::Act::SIZE;
        let acts = quantize_rows::<B::Act>(xs, m, blocks);
        let kernel = Kernel::detect();
        self.by_column_ranges(m, |cols, out| columns(kernel, w, &acts, blocks, cols, out))
    }

    #[cfg(target_arch = "x86_64")]
    fn vnni_rows<B: PairFormat>(&self, xs: &[f32], m: usize, w: &PackedWeights<B>) -> Vec<f32> {
        use super::quant::vnni::{PANEL, PackedActs, columns};
        let acts = PackedActs::new::<B>(&quantize_rows(xs, m, self.k / QK), self.k / QK);
        let full = acts.rows_in_panels();
        let panels: Vec<_> = (0..full).step_by(PANEL).map(|first| acts.panel(first, PANEL)).collect();
        let singles: Vec<_> = (full..m).map(|r| acts.panel(r, 1)).collect();
        // SAFETY: the weights were packed only where the CPU has the kernel's features.
        self.by_column_ranges(m, |cols, out| unsafe {
            columns(w, cols, &panels, &singles, |row, col, v| out.set(row, col, v))
        })
    }

    #[cfg(target_arch = "x86_64")]
    fn vnni_k_rows<B: KPairFormat>(&self, xs: &[f32], m: usize, w: &PackedWeightsK<B>) -> Vec<f32> {
        use super::quant::vnni::PANEL;
        use super::quant::vnni_k::{PackedActsK, columns};
        let acts = PackedActsK::new::<B>(&quantize_rows(xs, m, self.k / QK_K), self.k / QK_K);
        let full = acts.rows_in_panels();
        let panels: Vec<_> = (0..full).step_by(PANEL).map(|first| acts.panel(first, PANEL)).collect();
        let singles: Vec<_> = (full..m).map(|r| acts.panel(r, 1)).collect();
        // SAFETY: the weights were packed only where the CPU has the kernel's features.
        self.by_column_ranges(m, |cols, out| unsafe {
            columns(w, cols, &panels, &singles, |row, col, v| out.set(row, col, v))
        })
    }

    /// `[m, n]` outputs computed in parallel tasks that each own a range of output columns for
    /// every row (a weight row is read once per call, however many rows the batch has).
    /// `task(cols, out)` fills its columns of every row through `out`.
    fn by_column_ranges(&self, m: usize, task: impl Fn(std::ops::Range<usize>, &ColumnsOut) + Sync) -> Vec<f32> {
        let n = self.n;
        let mut y = vec![0f32; m * n];
        let out = ColumnsOut { ptr: y.as_mut_ptr(), m, n };
        (0..n.div_ceil(COLUMNS_PER_TASK)).into_par_iter().for_each(|t| {
            let cols = t * COLUMNS_PER_TASK..((t + 1) * COLUMNS_PER_TASK).min(n);
            task(cols, &out);
        });
        y
    }
}

/// The `[m, n]` output of a product, written by tasks that each own some columns.
struct ColumnsOut {
    ptr: *mut f32,
    m: usize,
    n: usize,
}

// SAFETY: tasks write disjoint columns (`by_column_ranges` hands each column to one task), and
// the output outlives them.
unsafe impl Sync for ColumnsOut {}

impl ColumnsOut {
    #[inline(always)]
    fn set(&self, row: usize, col: usize, value: f32) {
        assert!(row < self.m && col < self.n);
        // SAFETY: in bounds; only the task owning `col` writes it.
        unsafe { *self.ptr.add(row * self.n + col) = value };
    }
}

/// `m` rows of `blocks` blocks of values, quantized to 8-bit blocks (blocks never span rows, so
/// the rows quantize as one run).
fn quantize_rows<A: ActQuant>(xs: &[f32], m: usize, blocks: usize) -> Vec<A> {
    let mut acts = vec![A::default(); m * blocks];
    A::quantize(&xs[..m * blocks * A::SIZE], &mut acts);
    acts
}

/// Which kernels this CPU runs for the native types: "avx512-vnni", "avx2" or "plain".
/// Bumped whenever a kernel's sums change (a new type moved onto braid's kernels, a new
/// order): K/V stored on disk by an earlier revision are then never loaded.
pub const KERNEL_REVISION: u32 = 2;

pub fn kernel_family() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    if super::quant::vnni::available() {
        return "avx512-vnni";
    }
    match Kernel::detect() {
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx2 => "avx2",
        Kernel::Plain => "plain",
    }
}

/// The kernel family this CPU runs for a weight type, chosen at run time.
#[derive(Clone, Copy)]
enum Kernel {
    #[cfg(target_arch = "x86_64")]
    Avx2,
    Plain,
}

impl Kernel {
    fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            if super::quant::avx2::available() {
                return Kernel::Avx2;
            }
        }
        Kernel::Plain
    }
}

/// One weight row against `R` activation rows with the chosen kernel.
#[inline(always)]
fn dot_rows<B: WeightBlock, const R: usize>(kernel: Kernel, w: &[B], a: [&[B::Act]; R]) -> [f32; R] {
    match kernel {
        // SAFETY: `Kernel::detect` picks these only where the CPU has their features.
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx2 => unsafe { B::dot_avx2::<R>(w, a) },
        Kernel::Plain => a.map(|row| B::dot(w, row)),
    }
}

/// Dot products of weight rows `cols` with every activation row, four activation rows per
/// weight-row load.
fn columns<B: WeightBlock>(
    kernel: Kernel,
    w: &[B],
    acts: &[B::Act],
    blocks: usize,
    cols: std::ops::Range<usize>,
    out: &ColumnsOut,
) {
    let rows: Vec<&[B::Act]> = acts.chunks_exact(blocks).collect();
    let m = rows.len();
    for col in cols {
        let wrow = &w[col * blocks..(col + 1) * blocks];
        let mut r = 0;
        while r + 4 <= m {
            let values = dot_rows::<B, 4>(kernel, wrow, [rows[r], rows[r + 1], rows[r + 2], rows[r + 3]]);
            for (i, v) in values.into_iter().enumerate() {
                out.set(r + i, col, v);
            }
            r += 4;
        }
        while r < m {
            out.set(r, col, dot_rows::<B, 1>(kernel, wrow, [rows[r]])[0]);
            r += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// Every native type, through whichever kernel this CPU picks, on odd sizes: each output
    /// row equals the same row computed alone (bit for bit) and is close to the product of the
    /// dequantized weights with the exact activations.
    #[test]
    fn products_match_the_dequantized_reference_and_do_not_depend_on_the_batch() {
        let mut r = rand_chacha::ChaCha8Rng::seed_from_u64(17);
        let dtypes = [
            GgmlDType::Q4_0,
            GgmlDType::Q4_1,
            GgmlDType::Q5_0,
            GgmlDType::Q8_0,
            GgmlDType::Q4K,
            GgmlDType::Q5K,
            GgmlDType::Q6K,
        ];
        for dtype in dtypes {
            // Rows of whole blocks: 32 values, or 256 for the K-quants.
            let unit = dtype.block_size() / 32;
            for (n, k, m) in
                [(37usize, 96 * unit, 7usize), (70, 160 * unit, 13), (5, 32 * unit, 1), (33, 64 * unit, 64)]
            {
                let w: Vec<f32> = (0..n * k).map(|_| r.random_range(-1.0f32..1.0)).collect();
                let qt = QTensor::quantize(&Tensor::from_vec(w, (n, k), &Device::Cpu).unwrap(), dtype).unwrap();
                let deq = qt.dequantize(&Device::Cpu).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
                // The form this CPU's fastest kernel reads, and GGUF's own blocks (the AVX2 or
                // plain kernels), which that form replaces where AVX-512 VNNI is present.
                let bytes = qt.data().unwrap().to_vec();
                let blocks = match dtype {
                    GgmlDType::Q4_0 => Weights::Q4_0(quant::parse_q4_0(&bytes)),
                    GgmlDType::Q4_1 => Weights::Q4_1(quant::parse_q4_1(&bytes)),
                    GgmlDType::Q5_0 => Weights::Q5_0(quant::parse_q5_0(&bytes)),
                    GgmlDType::Q4K => Weights::Q4K(kquants::parse_q4_k(&bytes)),
                    GgmlDType::Q5K => Weights::Q5K(kquants::parse_q5_k(&bytes)),
                    GgmlDType::Q6K => Weights::Q6K(kquants::parse_q6_k(&bytes)),
                    _ => Weights::Q8_0(quant::parse_q8_0(&bytes)),
                };
                for linear in [QLinear::new(Arc::new(qt)).unwrap(), QLinear { n, k, weights: blocks }] {
                    // Embedding lookups give GGML's dequantized rows.
                    assert!(linear.supports_rows());
                    let ids = [n as u32 - 1, 0];
                    let looked_up = linear.rows(&ids).unwrap();
                    assert_eq!(&looked_up[..k], &deq[(n - 1) * k..], "{dtype:?}: last row");
                    assert_eq!(&looked_up[k..], &deq[..k], "{dtype:?}: first row");
                    let x: Vec<f32> = (0..m * k).map(|_| r.random_range(-2.0f32..2.0)).collect();
                    let y = linear.forward_rows(&x, m).unwrap();
                    assert_eq!(y.len(), m * n);
                    for row in 0..m {
                        let xr = &x[row * k..(row + 1) * k];
                        let alone = linear.forward_rows(xr, 1).unwrap();
                        for col in 0..n {
                            let got = y[row * n + col];
                            assert_eq!(
                                got.to_bits(),
                                alone[col].to_bits(),
                                "{dtype:?} {n}x{k}: row {row} alone differs"
                            );
                            let want: f64 =
                                deq[col * k..(col + 1) * k].iter().zip(xr).map(|(&a, &b)| a as f64 * b as f64).sum();
                            // Activations are quantized to 8 bits: allow for that rounding.
                            let bound = 0.02 * (k as f64).sqrt() + 0.01 * want.abs();
                            assert!(
                                (got as f64 - want).abs() <= bound,
                                "{dtype:?} {n}x{k} row {row} col {col}: {got} vs {want}"
                            );
                        }
                    }
                }
            }
        }
    }

    /// The real Gemma 3 270M Q4_K_M file's matrices of each new type, through `QLinear`: close
    /// to the product of candle's dequantized weights with the exact activations, every row the
    /// same whatever the batch, and embedding lookups equal to candle's dequantized rows.
    #[test]
    fn gemma_q4_k_m_matrices_match_candle() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/gemma-3-270m-q4_k_m.gguf");
        if !path.exists() {
            eprintln!("{} is absent: nothing to check (make install-model gemma3)", path.display());
            return;
        }
        let mut file = crate::gguf::GgufFile::open(&path).unwrap();
        let mut r = rand_chacha::ChaCha8Rng::seed_from_u64(23);
        let cases = [
            ("blk.0.attn_output.weight", GgmlDType::Q4K, [640, 1024]),
            ("blk.0.ffn_down.weight", GgmlDType::Q6K, [640, 2048]),
            ("blk.0.attn_q.weight", GgmlDType::Q5_0, [1024, 640]),
            ("blk.5.ffn_up.weight", GgmlDType::Q5_0, [2048, 640]),
            ("blk.0.attn_v.weight", GgmlDType::Q8_0, [256, 640]),
        ];
        for (name, dtype, [n, k]) in cases {
            let qt = file.tensor(name, &[n, k], &Device::Cpu).unwrap();
            assert_eq!(qt.dtype(), dtype, "{name}");
            let deq = qt.dequantize(&Device::Cpu).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let linear = QLinear::new(Arc::new(qt)).unwrap();
            assert!(!matches!(linear.weights, Weights::Candle(_)), "{name} runs braid's kernels");
            assert_eq!(linear.rows(&[3, n as u32 - 1]).unwrap(), [&deq[3 * k..4 * k], &deq[(n - 1) * k..]].concat());
            let m = 7;
            // Activations like a hidden state: mostly small, a few large.
            let x: Vec<f32> =
                (0..m * k).map(|i| r.random_range(-1.0f32..1.0) * if i % 97 == 0 { 20.0 } else { 1.0 }).collect();
            let y = linear.forward_rows(&x, m).unwrap();
            let block = dtype.block_size().max(QK);
            for row in 0..m {
                let xr = &x[row * k..(row + 1) * k];
                assert_eq!(linear.forward_rows(xr, 1).unwrap(), y[row * n..(row + 1) * n], "{name}: batch of 1");
                // Half an activation quantization step per value (its block's largest magnitude
                // / 127, plus f16 rounding of Q8_0-style scales): the most that rounding the
                // activations to 8 bits can move each product.
                let steps: Vec<f64> = xr
                    .chunks(block)
                    .map(|b| b.iter().fold(0f64, |a, &v| a.max(v.abs() as f64)) / 127.0 * 0.57)
                    .collect();
                for col in 0..n {
                    let w = &deq[col * k..(col + 1) * k];
                    let want: f64 = w.iter().zip(xr).map(|(&a, &b)| a as f64 * b as f64).sum();
                    let bound: f64 = w.iter().enumerate().map(|(i, &a)| a.abs() as f64 * steps[i / block]).sum();
                    let got = y[row * n + col] as f64;
                    assert!(
                        (got - want).abs() <= bound + 1e-4,
                        "{name} row {row} col {col}: {got} vs {want} (bound {bound})"
                    );
                }
            }
        }
    }
}
