//! Linear layers over quantized weights: braid's own kernels for Q4_0, Q4_1 and Q8_0 (the
//! common GGUF types), candle's for the rest.

use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};

use rayon::prelude::*;

use super::quant::{self, ActBlock, BlockQ4_0, BlockQ4_1, BlockQ8_0, WeightBlock, QK};

enum Weights {
    Q4_0(Vec<BlockQ4_0>),
    Q4_1(Vec<BlockQ4_1>),
    Q8_0(Vec<BlockQ8_0>),
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

impl QLinear {
    pub fn new(tensor: Arc<QTensor>) -> candle_core::Result<Self> {
        let (n, k) = tensor.shape().dims2()?;
        let native = tensor.device().is_cpu() && k % QK == 0;
        let weights = match tensor.dtype() {
            GgmlDType::Q4_0 if native => Weights::Q4_0(quant::parse_q4_0(&tensor.data()?)),
            GgmlDType::Q4_1 if native => Weights::Q4_1(quant::parse_q4_1(&tensor.data()?)),
            GgmlDType::Q8_0 if native => Weights::Q8_0(quant::parse_q8_0(&tensor.data()?)),
            _ => Weights::Candle(QMatMul::from_arc(tensor)?),
        };
        Ok(Self { n, k, weights })
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
            ($variant:ident) => {
                if parts.iter().all(|p| matches!(p.weights, Weights::$variant(_))) {
                    let mut all = Vec::new();
                    for p in parts {
                        if let Weights::$variant(w) = p.weights {
                            all.extend(w);
                        }
                    }
                    return QLinear { n, k, weights: Weights::$variant(all) };
                }
            };
        }
        merge!(Q4_0);
        merge!(Q4_1);
        merge!(Q8_0);
        QLinear { n, k, weights: Weights::Parts(parts) }
    }

    /// `[m, k]` rows in, `[m, n]` rows out, as plain vectors (CPU).
    pub fn forward_rows(&self, x: &[f32], m: usize) -> candle_core::Result<Vec<f32>> {
        match &self.weights {
            Weights::Q4_0(w) => Ok(self.native_rows(x, m, w)),
            Weights::Q4_1(w) => Ok(self.native_rows(x, m, w)),
            Weights::Q8_0(w) => Ok(self.native_rows(x, m, w)),
            Weights::Candle(w) => w.forward(&Tensor::from_slice(x, (m, self.k), &Device::Cpu)?)?.flatten_all()?.to_vec1::<f32>(),
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
                Weights::Candle(_) | Weights::Parts(_) => candle_core::bail!("embedding lookup needs a natively supported type"),
            }
        }
        Ok(out)
    }

    /// Whether `rows` works for this weight type.
    pub fn supports_rows(&self) -> bool {
        !matches!(self.weights, Weights::Candle(_) | Weights::Parts(_))
    }

    fn native_rows<B: WeightBlock>(&self, xs: &[f32], m: usize, w: &[B]) -> Vec<f32> {
        let (n, k) = (self.n, self.k);
        if m == 0 {
            return Vec::new();
        }
        let blocks = k / QK;
        let mut acts = vec![ActBlock::default(); m * blocks];
        for (row, out) in xs.chunks_exact(k).zip(acts.chunks_exact_mut(blocks)) {
            quant::quantize_row(row, out);
        }
        // Each task owns a range of output columns for every row: a weight row is read once
        // per call, however many rows the batch has.
        let tasks: Vec<Vec<f32>> = (0..n.div_ceil(COLUMNS_PER_TASK))
            .into_par_iter()
            .map(|task| {
                let cols = task * COLUMNS_PER_TASK..((task + 1) * COLUMNS_PER_TASK).min(n);
                let mut out = vec![0f32; cols.len() * m];
                columns(w, &acts, blocks, cols, &mut out);
                out
            })
            .collect();
        // Tasks hold their columns column-major; lay them out row-major.
        let mut y = vec![0f32; m * n];
        for (task, values) in tasks.iter().enumerate() {
            for (c, column) in values.chunks_exact(m).enumerate() {
                let col = task * COLUMNS_PER_TASK + c;
                for (row, &v) in column.iter().enumerate() {
                    y[row * n + col] = v;
                }
            }
        }
        y
    }
}

/// The kernel family this CPU runs for a weight type, chosen at run time.
#[derive(Clone, Copy)]
enum Kernel {
    #[cfg(target_arch = "x86_64")]
    Vnni,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    Plain,
}

impl Kernel {
    fn detect<B: WeightBlock>() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            // SAFETY: called with no blocks, the VNNI entry only says whether it exists.
            if super::quant_vnni::available() && unsafe { B::dot_vnni::<1>(&[], [&[]]) }.is_some() {
                return Kernel::Vnni;
            }
            if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") && std::is_x86_feature_detected!("f16c") {
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
        Kernel::Vnni => unsafe { B::dot_vnni::<R>(w, a) }.expect("detected VNNI kernel"),
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx2 => unsafe { B::dot_avx2::<R>(w, a) },
        Kernel::Plain => a.map(|row| B::dot(w, row)),
    }
}

/// Dot products of weight rows `cols` with every activation row, column-major into `out`,
/// four activation rows per weight-row load.
fn columns<B: WeightBlock>(w: &[B], acts: &[ActBlock], blocks: usize, cols: std::ops::Range<usize>, out: &mut [f32]) {
    let rows: Vec<&[ActBlock]> = acts.chunks_exact(blocks).collect();
    let m = rows.len();
    let kernel = Kernel::detect::<B>();
    for (c, col) in cols.enumerate() {
        let wrow = &w[col * blocks..(col + 1) * blocks];
        let o = &mut out[c * m..(c + 1) * m];
        let mut r = 0;
        while r + 4 <= m {
            o[r..r + 4].copy_from_slice(&dot_rows::<B, 4>(kernel, wrow, [rows[r], rows[r + 1], rows[r + 2], rows[r + 3]]));
            r += 4;
        }
        while r < m {
            o[r] = dot_rows::<B, 1>(kernel, wrow, [rows[r]])[0];
            r += 1;
        }
    }
}
