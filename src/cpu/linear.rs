//! Linear layers over quantized weights: braid's own kernels for Q4_0, Q4_1 and Q8_0 (the
//! common GGUF types), candle's for the rest. Where the CPU has AVX-512 VNNI the weights are
//! repacked at load for `quant::vnni` (and GGUF's blocks dropped); elsewhere the AVX2 or plain
//! kernels read GGUF's blocks as they are.

use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};

use rayon::prelude::*;

#[cfg(target_arch = "x86_64")]
use super::quant::vnni::{PackedWeights, PairFormat};
use super::quant::{self, ActBlock, BlockQ4_0, BlockQ4_1, BlockQ8_0, QK, WeightBlock};

enum Weights {
    Q4_0(Vec<BlockQ4_0>),
    Q4_1(Vec<BlockQ4_1>),
    Q8_0(Vec<BlockQ8_0>),
    /// The same types repacked for the AVX-512 VNNI kernel, where the CPU has it.
    #[cfg(target_arch = "x86_64")]
    VnniQ4_0(PackedWeights<BlockQ4_0>),
    #[cfg(target_arch = "x86_64")]
    VnniQ4_1(PackedWeights<BlockQ4_1>),
    #[cfg(target_arch = "x86_64")]
    VnniQ8_0(PackedWeights<BlockQ8_0>),
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
    ($plain:ident, $vnni:ident, $blocks:expr, $per_row:expr) => {{
        let blocks = $blocks;
        #[cfg(target_arch = "x86_64")]
        if super::quant::vnni::available() {
            return Weights::$vnni(PackedWeights::new(&blocks, $per_row));
        }
        Weights::$plain(blocks)
    }};
}

impl Weights {
    fn q4_0(blocks: Vec<BlockQ4_0>, per_row: usize) -> Self {
        native!(Q4_0, VnniQ4_0, blocks, per_row)
    }
    fn q4_1(blocks: Vec<BlockQ4_1>, per_row: usize) -> Self {
        native!(Q4_1, VnniQ4_1, blocks, per_row)
    }
    fn q8_0(blocks: Vec<BlockQ8_0>, per_row: usize) -> Self {
        native!(Q8_0, VnniQ8_0, blocks, per_row)
    }
}

impl QLinear {
    pub fn new(tensor: Arc<QTensor>) -> candle_core::Result<Self> {
        let (n, k) = tensor.shape().dims2()?;
        let native = tensor.device().is_cpu() && k % QK == 0;
        let weights = match tensor.dtype() {
            GgmlDType::Q4_0 if native => Weights::q4_0(quant::parse_q4_0(&tensor.data()?), k / QK),
            GgmlDType::Q4_1 if native => Weights::q4_1(quant::parse_q4_1(&tensor.data()?), k / QK),
            GgmlDType::Q8_0 if native => Weights::q8_0(quant::parse_q8_0(&tensor.data()?), k / QK),
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
        merge!(Q8_0, |all: &mut Vec<_>, w| all.extend(w));
        merge!(Bf16, |all: &mut Vec<_>, w| all.extend(w));
        merge!(F32, |all: &mut Vec<_>, w| all.extend(w));
        // The VNNI form packs rows in pairs: parts merge when none but the last has an odd
        // number of rows (Q, K, V and gate, up always have even ones).
        #[cfg(target_arch = "x86_64")]
        if parts[..parts.len() - 1].iter().all(|p| p.n.is_multiple_of(2)) {
            merge!(VnniQ4_0, |all: &mut PackedWeights<_>, w| all.append(w));
            merge!(VnniQ4_1, |all: &mut PackedWeights<_>, w| all.append(w));
            merge!(VnniQ8_0, |all: &mut PackedWeights<_>, w| all.append(w));
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
            Weights::VnniQ8_0(w) => Ok(self.vnni_rows(x, m, w)),
            Weights::Q4_0(w) => Ok(self.native_rows(x, m, w)),
            Weights::Q4_1(w) => Ok(self.native_rows(x, m, w)),
            Weights::Q8_0(w) => Ok(self.native_rows(x, m, w)),
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
        let (k, blocks) = (self.k, self.k / QK);
        let mut out = vec![0f32; ids.len() * k];
        for (&id, o) in ids.iter().zip(out.chunks_exact_mut(k)) {
            let id = id as usize;
            if id >= self.n {
                candle_core::bail!("token id {id} is outside the vocabulary of {}", self.n);
            }
            let range = id * blocks..(id + 1) * blocks;
            match &self.weights {
                Weights::Q4_0(w) => quant::dequantize_q4_0(&w[range], o),
                Weights::Q4_1(w) => quant::dequantize_q4_1(&w[range], o),
                Weights::Q8_0(w) => quant::dequantize_q8_0(&w[range], o),
                #[cfg(target_arch = "x86_64")]
                Weights::VnniQ4_0(w) => w.dequantize_row(id, o),
                #[cfg(target_arch = "x86_64")]
                Weights::VnniQ4_1(w) => w.dequantize_row(id, o),
                #[cfg(target_arch = "x86_64")]
                Weights::VnniQ8_0(w) => w.dequantize_row(id, o),
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
        let blocks = self.k / QK;
        let acts = quantize_rows(xs, m, blocks);
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

/// `m` rows of `blocks * QK` values, quantized to 8-bit blocks (blocks never span rows, so the
/// rows quantize as one run).
fn quantize_rows(xs: &[f32], m: usize, blocks: usize) -> Vec<ActBlock> {
    let mut acts = vec![ActBlock::default(); m * blocks];
    quant::quantize_row(&xs[..m * blocks * QK], &mut acts);
    acts
}

/// Which kernels this CPU runs for the native types: "avx512-vnni", "avx2" or "plain".
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
fn dot_rows<B: WeightBlock, const R: usize>(kernel: Kernel, w: &[B], a: [&[ActBlock]; R]) -> [f32; R] {
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
    acts: &[ActBlock],
    blocks: usize,
    cols: std::ops::Range<usize>,
    out: &ColumnsOut,
) {
    let rows: Vec<&[ActBlock]> = acts.chunks_exact(blocks).collect();
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
        for dtype in [GgmlDType::Q4_0, GgmlDType::Q4_1, GgmlDType::Q8_0] {
            for (n, k, m) in [(37usize, 96usize, 7usize), (70, 160, 13), (5, 32, 1), (33, 64, 4)] {
                let w: Vec<f32> = (0..n * k).map(|_| r.random_range(-1.0f32..1.0)).collect();
                let qt = QTensor::quantize(&Tensor::from_vec(w, (n, k), &Device::Cpu).unwrap(), dtype).unwrap();
                let deq = qt.dequantize(&Device::Cpu).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
                // The form this CPU's fastest kernel reads, and GGUF's own blocks (the AVX2 or
                // plain kernels), which that form replaces where AVX-512 VNNI is present.
                let bytes = qt.data().unwrap().to_vec();
                let blocks = match dtype {
                    GgmlDType::Q4_0 => Weights::Q4_0(quant::parse_q4_0(&bytes)),
                    GgmlDType::Q4_1 => Weights::Q4_1(quant::parse_q4_1(&bytes)),
                    _ => Weights::Q8_0(quant::parse_q8_0(&bytes)),
                };
                for linear in [QLinear::new(Arc::new(qt)).unwrap(), QLinear { n, k, weights: blocks }] {
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
}
