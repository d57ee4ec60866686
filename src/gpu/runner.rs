//! One engine's forward pass on the GPU: the paged KV cache, the activation buffers sized for
//! the engine's largest step, and the launch sequence of a llama-family forward pass.
//!
//! Per step the host uploads one small array (tokens, positions, cache slots, attention plans,
//! block tables, logit rows) and reads back either each sampled row's token and log-probability
//! (greedy or drawn on the device), or the logits rows when the requests need host-side sampling.

use std::sync::Arc;

use half::{bf16, f16};

use super::plan::{graph_layout, write_plan};
use super::runtime::{Buf, GemvArgs, Gpu, GpuError, Product, Result};
use super::weights::CudaWeights;
use crate::backend::RowChoice;
use crate::backend::{BlockId, BlockStore, FlatBatch, RowOutput, push_f16_bytes, read_f16_bytes};
use crate::launch;
use crate::model::config::RopeStyle;

/// Activation buffers for up to `tokens` tokens and `rows` logits rows per step.
struct Workspace {
    tokens: usize,
    rows: usize,
    x: Buf<f32>,
    h: Buf<bf16>,
    qkv: Buf<f32>,
    q: Buf<f32>,
    attn: Buf<bf16>,
    gate_up: Buf<f32>,
    act: Buf<bf16>,
    logits: Buf<f32>,
    /// The chosen rows' token ids, then their log-probabilities' bits: one read brings both.
    chosen: Buf<u32>,
    /// Each row's draw (kernels/sample.cuh, `RowDraw`), `DRAW_WORDS` words per row.
    draws: Buf<u32>,
    /// Scratch of the batch-invariant products that spread k over blocks.
    split: Buf<f32>,
    /// Scratch of split attention: (max, sum, acc[head_dim]) per token, head and split, for
    /// steps of fewer (token, KV head) pairs than multiprocessors.
    attn_partial: Buf<f32>,
    /// Per (token, KV head) of split attention: blocks done, reset by the last (starts zeroed).
    attn_counters: Buf<u32>,
    /// The device argmax's per-slice results (16 bytes each) and per-row counters (zeroed).
    argmax_parts: Buf<u64>,
    argmax_counters: Buf<u32>,
    /// The step's plan, uploaded at once (grown when a step needs more).
    meta: Buf<u32>,
}

/// Elements of each workspace buffer: what `CudaRunner::new` allocates, and what
/// `workspace_bytes` adds up for the KV-cache budget.
struct WorkspaceSizes {
    x: usize,
    h: usize,
    qkv: usize,
    q: usize,
    attn: usize,
    gate_up: usize,
    act: usize,
    logits: usize,
    chosen: usize,
    draws: usize,
    attn_partial: usize,
    attn_counters: usize,
    argmax_parts: usize,
    argmax_counters: usize,
    split: usize,
    meta: usize,
}

impl WorkspaceSizes {
    fn new(weights: &CudaWeights, tokens: usize, rows: usize) -> Self {
        let c = &weights.config;
        let (h, q, kv, ffn) = (c.hidden_size, c.n_head * c.head_dim, c.n_kv_head * c.head_dim, c.ffn_size);
        // Split attention runs only while (token, KV head) pairs are fewer than multiprocessors.
        let split_tokens = tokens.min(weights.gpu.multiprocessors());
        Self {
            x: tokens * h,
            h: tokens * h.max(q),
            qkv: tokens * (q + 2 * kv),
            q: tokens * q,
            attn: tokens * q,
            gate_up: tokens * 2 * ffn,
            act: tokens * ffn,
            logits: rows * weights.vocab_size,
            chosen: 2 * rows,
            draws: DRAW_WORDS * rows,
            attn_partial: split_tokens * c.n_head * super::runtime::ATTENTION_MAX_SPLITS * (c.head_dim + 2),
            attn_counters: split_tokens * c.n_kv_head,
            argmax_parts: 2 * rows * ARGMAX_SLICES,
            argmax_counters: rows,
            split: super::variants::GEMM_MAX_SEGMENTS * SPLIT_ROWS.min(tokens) * (q + 2 * kv).max(h),
            meta: tokens * 16,
        }
    }

    fn bytes(&self) -> usize {
        // bf16: h, attn, act; u64: argmax_parts; 4-byte elements otherwise.
        2 * (self.h + self.attn + self.act)
            + 8 * self.argmax_parts
            + 4 * (self.x
                + self.qkv
                + self.q
                + self.gate_up
                + self.logits
                + self.chosen
                + self.draws
                + self.attn_partial
                + self.attn_counters
                + self.argmax_counters
                + self.split
                + self.meta)
    }
}

pub struct CudaRunner {
    weights: Arc<CudaWeights>,
    /// Per layer, `num_blocks + 1` blocks: the last is scratch, written by the padding tokens
    /// of graph replays and read by no sequence.
    k: Vec<Buf<f16>>,
    v: Vec<Buf<f16>>,
    pub block_size: usize,
    pub num_blocks: usize,
    ws: Workspace,
    host_meta: Vec<u32>,
    /// Decode steps replayed from CUDA graphs, one per padded batch size (`GRAPH_BATCHES`)
    /// and whether any row draws at random: a step is then one launch instead of ~150.
    graphs: std::collections::HashMap<(usize, bool), DecodeGraph>,
    /// The fixed-address plan the graphs read (`graph_layout`).
    graph_meta: Buf<u32>,
    use_graphs: bool,
}

/// A captured decode step.
struct DecodeGraph(cudarc::driver::CudaGraph);

// SAFETY: a graph is launched by whichever thread owns the runner (one at a time, `&mut`);
// launching binds the context to that thread first.
unsafe impl Send for DecodeGraph {}

/// Padded batch sizes of the decode graphs.
const GRAPH_BATCHES: &[usize] = &[1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256, 320, 384, 448, 512];

/// Words of a row's draw (kernels/sample.cuh, `RowDraw`).
const DRAW_WORDS: usize = 8;

/// The rows' draws as `RowDraw`s, padded with greedy rows to `rows`; and whether any draws at
/// random (else the argmax alone decides).
pub(super) fn draw_words(draws: &[RowChoice], rows: usize) -> (Vec<u32>, bool) {
    let mut words = vec![0u32; DRAW_WORDS * rows];
    let mut random = false;
    for (row, draw) in words.chunks_exact_mut(DRAW_WORDS).zip(draws) {
        if let RowChoice::Random { params, uniform } = draw {
            random = true;
            let top_k = u32::try_from(params.top_k).unwrap_or(u32::MAX).min(i32::MAX as u32);
            row[..5].copy_from_slice(&[
                params.temperature.to_bits(),
                top_k,
                params.top_p.to_bits(),
                params.min_p.to_bits(),
                uniform.to_bits(),
            ]);
        }
    }
    (words, random)
}

/// The GPU's KV blocks for the prompt cache on disk: per layer, a block's K (then V) is one run
/// of `block_size` tokens' f16 values, laid out as the CPU's (tiering.rs).
impl BlockStore for CudaRunner {
    fn block_bytes(&self, id: BlockId) -> std::result::Result<Vec<u8>, String> {
        let n = self.block_values();
        let mut out = Vec::with_capacity(self.k.len() * 4 * n);
        let mut host = vec![f16::ZERO; n];
        for (k, v) in self.k.iter().zip(&self.v) {
            for half in [k, v] {
                self.weights.gpu.read_at(half, id as usize * n, &mut host).map_err(|e| e.to_string())?;
                push_f16_bytes(&host, &mut out);
            }
        }
        Ok(out)
    }

    fn fill_block(&mut self, id: BlockId, bytes: &[u8]) -> std::result::Result<(), String> {
        let n = self.block_values();
        if bytes.len() != self.k.len() * 4 * n || id as usize >= self.num_blocks {
            return Err(format!("a block payload of {} bytes for block {id}", bytes.len()));
        }
        let gpu = Arc::clone(&self.weights.gpu);
        let mut chunks = bytes.chunks_exact(2 * n);
        let mut host = vec![f16::ZERO; n];
        for (k, v) in self.k.iter_mut().zip(self.v.iter_mut()) {
            for half in [k, v] {
                read_f16_bytes(chunks.next().expect("sized above"), &mut host);
                gpu.write_at(&host, half, id as usize * n).map_err(|e| e.to_string())?;
            }
        }
        Ok(())
    }
}

/// What a forward pass leaves for the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Choose {
    /// The logits rows.
    Logits,
    /// Each row's first maximum (argmax_logprob).
    Greedy,
    /// The argmax, then the random draws of the rows that have them (sample_rows).
    Draws,
}

impl Choose {
    fn from(on_device: bool, random: bool) -> Self {
        match (on_device, random) {
            (false, _) => Choose::Logits,
            (true, false) => Choose::Greedy,
            (true, true) => Choose::Draws,
        }
    }
}

/// Threads of the RMS norm kernel (NORM_THREADS).
const NORM_THREADS: u32 = 1024;

/// The operands of rms_norm_bf16: `count` rows of `hidden` f32 values from `x` (the rows that
/// the u32 list `rows` names, where it is not 0), normalised with the weights `w` and `eps`,
/// into the bf16 rows `out`.
#[derive(Debug, Clone, Copy)]
pub(super) struct RmsNorm {
    pub x: u64,
    pub rows: u64,
    pub w: u64,
    pub out: u64,
    pub count: usize,
    pub hidden: usize,
    pub eps: f32,
}

pub(super) fn rms_norm(gpu: &Gpu, a: RmsNorm) -> Result<()> {
    launch!(gpu, &gpu.k.rms_norm_bf16, (a.count as u32, 1, 1), NORM_THREADS; a.x, a.rows, a.w, a.out, a.hidden as i32, a.eps)
}

/// Slices of a logits row that the device argmax's blocks share.
const ARGMAX_SLICES: usize = 16;

/// Most rows of a product whose k-segments are spread over blocks (decode-sized steps).
const SPLIT_ROWS: usize = 512;

/// Device addresses of a step's plan parts.
#[derive(Clone, Copy)]
struct PlanPointers {
    tokens: u64,
    positions: u64,
    slots: u64,
    plans: u64,
    tables: u64,
    logit_rows: u64,
}

impl CudaRunner {
    /// f16 values of one block's K (or V) in one layer.
    fn block_values(&self) -> usize {
        let c = &self.weights.config;
        self.block_size * c.n_kv_head * c.head_dim
    }

    /// Device bytes of activations for a step of `tokens` tokens and `rows` logits rows.
    pub fn workspace_bytes(weights: &CudaWeights, tokens: usize, rows: usize) -> usize {
        WorkspaceSizes::new(weights, tokens, rows).bytes()
    }

    pub fn new(
        weights: Arc<CudaWeights>,
        num_blocks: usize,
        block_size: usize,
        tokens: usize,
        rows: usize,
    ) -> Result<Self> {
        let gpu = Arc::clone(&weights.gpu);
        let c = &weights.config;
        if !matches!(c.head_dim, 64 | 128) {
            return Err(GpuError(format!("head dimension {} (the CUDA attention kernels take 64 or 128)", c.head_dim)));
        }
        if c.n_head / c.n_kv_head > 8 {
            return Err(GpuError(format!(
                "{} query heads per KV head (the CUDA attention kernels take up to 8)",
                c.n_head / c.n_kv_head
            )));
        }
        let cache = (num_blocks + 1) * block_size * c.n_kv_head * c.head_dim;
        let mut k = Vec::with_capacity(c.n_layer);
        let mut v = Vec::with_capacity(c.n_layer);
        for _ in 0..c.n_layer {
            k.push(gpu.alloc::<f16>(cache)?);
            v.push(gpu.alloc::<f16>(cache)?);
        }
        let n = WorkspaceSizes::new(&weights, tokens, rows);
        let ws = Workspace {
            tokens,
            rows,
            x: gpu.alloc(n.x)?,
            h: gpu.alloc(n.h)?,
            qkv: gpu.alloc(n.qkv)?,
            q: gpu.alloc(n.q)?,
            attn: gpu.alloc(n.attn)?,
            gate_up: gpu.alloc(n.gate_up)?,
            act: gpu.alloc(n.act)?,
            logits: gpu.alloc(n.logits)?,
            chosen: gpu.alloc(n.chosen)?,
            draws: gpu.alloc(n.draws)?,
            attn_partial: gpu.alloc(n.attn_partial)?,
            attn_counters: gpu.alloc_zeroed(n.attn_counters)?,
            argmax_parts: gpu.alloc(n.argmax_parts)?,
            argmax_counters: gpu.alloc_zeroed(n.argmax_counters)?,
            split: gpu.alloc(n.split)?,
            meta: gpu.alloc(n.meta)?,
        };
        let largest = GRAPH_BATCHES.iter().copied().filter(|&b| b <= tokens && b <= rows).max().unwrap_or(0);
        let graph_meta = gpu.alloc(8 * largest + 1 + largest * c.context_length.div_ceil(block_size))?;
        let use_graphs = std::env::var_os("BRAID_CUDA_GRAPHS").is_none_or(|v| v != "0");
        Ok(Self {
            weights,
            k,
            v,
            block_size,
            num_blocks,
            ws,
            host_meta: Vec::new(),
            graphs: Default::default(),
            graph_meta,
            use_graphs,
        })
    }

    /// One forward pass. With `draws` (one per logits row), each row's token and its
    /// log-probability are chosen on the device and only they come back, but for `Host` rows,
    /// whose logits come back.
    pub fn forward(&mut self, batch: &FlatBatch, draws: Option<&[RowChoice]>) -> Result<Vec<RowOutput>> {
        let w = Arc::clone(&self.weights);
        let n = batch.tokens.len();
        let rows = batch.logit_rows.len();
        if n > self.ws.tokens || rows > self.ws.rows {
            return Err(GpuError(format!(
                "a step of {n} tokens and {rows} logits rows exceeds the workspace ({} / {})",
                self.ws.tokens, self.ws.rows
            )));
        }
        if let Some(&p) = batch.positions.iter().max()
            && p as usize >= w.positions
        {
            return Err(GpuError(format!("position {p} is past the rope tables ({} positions)", w.positions)));
        }
        if draws.is_some_and(|d| d.len() != rows) {
            return Err(GpuError(format!("{} draws for {rows} logits rows", draws.map_or(0, <[_]>::len))));
        }
        let decode_only = rows == n && batch.seqs.iter().all(|s| s.query_len == 1);
        if let Some(draws) = draws
            && decode_only
            && self.use_graphs
            && let Some(out) = self.forward_graph(batch, draws)?
        {
            return Ok(out);
        }
        let o = self.upload_plan(batch)?;
        let random = match draws {
            Some(draws) => self.upload_draws(draws, rows)?,
            None => false,
        };
        let at = |x: usize| self.ws.meta.at(x);
        let ptrs = PlanPointers {
            tokens: at(0),
            positions: at(o[1]),
            slots: at(o[2]),
            plans: at(o[3]),
            tables: at(o[4]),
            logit_rows: at(o[5]),
        };
        let choose = Choose::from(draws.is_some(), random);
        self.launch_forward(n, rows, ptrs, choose, decode_only && batch.logit_rows.iter().copied().eq(0..n))?;
        self.read_output(rows, rows, draws)
    }

    /// A decode step through the graph of its padded batch size, captured on first use.
    /// None when the step does not fit a graph (the caller runs it directly).
    fn forward_graph(&mut self, batch: &FlatBatch, draws: &[RowChoice]) -> Result<Option<Vec<RowOutput>>> {
        let n = batch.tokens.len();
        let Some(&padded) = GRAPH_BATCHES.iter().find(|&&b| b >= n && b <= self.ws.tokens && b <= self.ws.rows) else {
            return Ok(None);
        };
        self.replay(batch, padded, draws)
    }

    /// Captures (once) and replays every greedy decode graph up to `max_batch` sequences on
    /// padding alone, so that first requests find their graphs, and cuBLAS its decode shapes,
    /// ready. (Graphs with random draws are captured on first use.)
    pub fn warm_up(&mut self, max_batch: usize) -> Result<()> {
        let largest = max_batch.min(self.ws.tokens).min(self.ws.rows);
        for &padded in GRAPH_BATCHES.iter().filter(|&&b| b <= largest) {
            if !self.use_graphs || self.replay(&FlatBatch::default(), padded, &[])?.is_none() {
                break;
            }
        }
        Ok(())
    }

    /// `batch`'s decode step padded to `padded` tokens through that size's graph.
    fn replay(&mut self, batch: &FlatBatch, padded: usize, draws: &[RowChoice]) -> Result<Option<Vec<RowOutput>>> {
        let n = batch.tokens.len();
        let Some(o) = graph_layout(batch, padded, self.block_size, self.num_blocks, &mut self.host_meta)? else {
            return Ok(None);
        };
        if self.host_meta.len() > self.graph_meta.len {
            return Ok(None);
        }
        self.weights.gpu.write(&self.host_meta, &mut self.graph_meta)?;
        let random = self.upload_draws(draws, padded)?;
        if !self.graphs.contains_key(&(padded, random)) {
            let at = |x: usize| self.graph_meta.at(x);
            let ptrs = PlanPointers {
                tokens: at(o.tokens),
                positions: at(o.positions),
                slots: at(o.slots),
                plans: at(o.plans),
                tables: at(o.tables),
                logit_rows: at(o.logit_rows),
            };
            let stream = Arc::clone(&self.weights.gpu.stream);
            stream.begin_capture(cudarc::driver::sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)?;
            let launched = self.launch_forward(padded, padded, ptrs, Choose::from(true, random), true);
            let captured = stream.end_capture(cudarc::driver::sys::CUgraphInstantiate_flags(0));
            match (launched, captured) {
                (Ok(()), Ok(Some(graph))) => {
                    self.graphs.insert((padded, random), DecodeGraph(graph));
                }
                (launched, captured) => {
                    tracing::warn!(
                        "CUDA graph capture failed ({:?} / {:?}): decode steps run without graphs",
                        launched.err(),
                        captured.err()
                    );
                    self.use_graphs = false;
                    return Ok(None);
                }
            }
        }
        self.graphs[&(padded, random)].0.launch()?;
        self.read_output(n, padded, Some(draws)).map(Some)
    }

    /// Writes the rows' draws (padded to `rows`) where sample_rows reads them, if any row draws
    /// at random; returns whether one does.
    fn upload_draws(&mut self, draws: &[RowChoice], rows: usize) -> Result<bool> {
        let (words, random) = draw_words(draws, rows);
        if random {
            self.weights.gpu.write(&words, &mut self.ws.draws)?;
        }
        Ok(random)
    }

    /// Copies back the first `wanted` rows' results of a step with `rows` logits rows: with
    /// `choices`, the chosen tokens and the `Host` rows' logits; else every row's logits.
    fn read_output(&mut self, wanted: usize, rows: usize, choices: Option<&[RowChoice]>) -> Result<Vec<RowOutput>> {
        let gpu = Arc::clone(&self.weights.gpu);
        let vocab = self.weights.vocab_size;
        if rows == 0 {
            gpu.synchronize()?;
            return Ok(Vec::new());
        }
        let Some(choices) = choices else {
            let mut all = vec![0f32; wanted * vocab];
            gpu.read(&self.ws.logits, &mut all)?;
            return Ok(all.chunks_exact(vocab).map(|row| RowOutput::Logits(row.to_vec())).collect());
        };
        let mut chosen = vec![0u32; 2 * rows];
        gpu.read(&self.ws.chosen, &mut chosen)?;
        let (ids, logprobs) = chosen.split_at(rows);
        (0..wanted)
            .map(|i| match choices.get(i) {
                Some(RowChoice::Host) => {
                    let mut row = vec![0f32; vocab];
                    gpu.read_at(&self.ws.logits, i * vocab, &mut row)?;
                    Ok(RowOutput::Logits(row))
                }
                _ => Ok(RowOutput::Chosen(ids[i], f32::from_bits(logprobs[i]))),
            })
            .collect()
    }

    /// Queues a whole forward pass of `n` tokens and `rows` logits rows (no copies, no waits:
    /// a graph can capture it).
    /// `decode`: every token is its sequence's one new token and a logits row, in order.
    fn launch_forward(&self, n: usize, rows: usize, p: PlanPointers, choose: Choose, decode: bool) -> Result<()> {
        let w = &self.weights;
        let gpu: &Gpu = &w.gpu;
        let c = &w.config;
        let (h, q, kv, ffn) = (c.hidden_size, c.n_head * c.head_dim, c.n_kv_head * c.head_dim, c.ffn_size);
        let ws = &self.ws;
        let n32 = n as u32;
        gpu.begin_step(n);
        launch!(gpu, &gpu.k.embed_rows, (n32, 1, 1), 256; w.embeddings.ptr, p.tokens, ws.x.ptr, h as i32)?;
        let (attention, attention_threads, splits) =
            gpu.attention_plan(c.head_dim, c.n_head / c.n_kv_head, n * c.n_kv_head);
        let partial = if splits > 1 { ws.attn_partial.ptr } else { 0 };
        // Decode of a few sequences: rope with the K/V write and SwiGLU run inside the products
        // next to them, and in the default mode the norms too (kernels/gemv.cuh, igemv.cuh).
        let fuse = gpu.fuses(n, h);
        let norm_inside = gpu.norm_inside(n, h);
        let scale = 1.0 / (c.head_dim as f32).sqrt();
        let neox = i32::from(c.rope_style == RopeStyle::Neox);
        let norm_apart = |norm_w: u64| {
            rms_norm(
                gpu,
                RmsNorm { x: ws.x.ptr, rows: 0, w: norm_w, out: ws.h.ptr, count: n, hidden: h, eps: c.rms_eps },
            )
        };
        // A product of this step's `n` rows.
        let product = |weights: u64, y: u64, out: usize, k: usize| Product { w: weights, y, m: n, n: out, k };
        for (l, layer) in w.layers.iter().enumerate() {
            let bias = layer.qkv_bias.as_ref().map_or(0, |b| b.ptr);
            if fuse && neox == 0 {
                // The product, rope and the K/V write in one launch (and the norm, inside or just before).
                let input = if norm_inside {
                    GemvArgs { residual: ws.x.ptr, norm_w: layer.attn_norm.ptr, eps: c.rms_eps, ..GemvArgs::default() }
                } else {
                    norm_apart(layer.attn_norm.ptr)?;
                    GemvArgs { x: ws.h.ptr, ..GemvArgs::default() }
                };
                let rope = GemvArgs {
                    positions: p.positions,
                    slots: p.slots,
                    cos_table: w.cos.ptr,
                    sin_table: w.sin.ptr,
                    bias,
                    q_out: ws.q.ptr,
                    k_cache: self.k[l].ptr,
                    v_cache: self.v[l].ptr,
                    n_head: c.n_head as i32,
                    n_kv_head: c.n_kv_head as i32,
                    head_dim: c.head_dim as i32,
                    rope_dim: c.rope_dim as i32,
                    ..input
                };
                gpu.gemv_qkv(product(layer.qkv.ptr, 0, q + 2 * kv, h), rope)?;
            } else {
                if norm_inside {
                    gpu.gemv_norm(
                        ws.x.ptr,
                        layer.attn_norm.ptr,
                        c.rms_eps,
                        product(layer.qkv.ptr, ws.qkv.ptr, q + 2 * kv, h),
                    )?;
                } else {
                    norm_apart(layer.attn_norm.ptr)?;
                    gpu.gemm(ws.h.ptr, product(layer.qkv.ptr, ws.qkv.ptr, q + 2 * kv, h), false, &ws.split)?;
                }
                launch!(gpu, &gpu.k.rope_and_cache, (n32, 1, 1), 256;
                    ws.qkv.ptr, bias, p.positions, p.slots, w.cos.ptr, w.sin.ptr, ws.q.ptr, self.k[l].ptr, self.v[l].ptr,
                    c.n_head as i32, c.n_kv_head as i32, c.head_dim as i32, c.rope_dim as i32, neox)?;
            }
            launch!(gpu, attention, (n32, c.n_kv_head as u32, splits as u32), attention_threads;
                ws.q.ptr, self.k[l].ptr, self.v[l].ptr, p.plans, p.tables, ws.attn.ptr,
                c.n_head as i32, c.n_kv_head as i32, self.block_size as i32, scale, partial, ws.attn_counters.ptr)?;
            gpu.gemm(ws.attn.ptr, product(layer.o.ptr, ws.x.ptr, h, q), true, &ws.split)?;
            if norm_inside {
                gpu.gemv_norm_swiglu(
                    ws.x.ptr,
                    layer.ffn_norm.ptr,
                    c.rms_eps,
                    product(layer.gate_up.ptr, ws.act.ptr, 2 * ffn, h),
                )?;
            } else if fuse {
                norm_apart(layer.ffn_norm.ptr)?;
                gpu.gemv_swiglu(ws.h.ptr, product(layer.gate_up.ptr, ws.act.ptr, 2 * ffn, h))?;
            } else {
                norm_apart(layer.ffn_norm.ptr)?;
                gpu.gemm(ws.h.ptr, product(layer.gate_up.ptr, ws.gate_up.ptr, 2 * ffn, h), false, &ws.split)?;
                let total = (n * ffn) as u64;
                let grid = (total.div_ceil(256).min(65_535)) as u32;
                launch!(gpu, &gpu.k.silu_mul_bf16, (grid, 1, 1), 256; ws.gate_up.ptr, ws.act.ptr, ffn as i32, total)?;
            }
            gpu.gemm(ws.act.ptr, product(layer.down.ptr, ws.x.ptr, h, ffn), true, &ws.split)?;
        }
        if rows == 0 {
            return Ok(());
        }
        let rows32 = rows as u32;
        let output = w.output.as_ref().unwrap_or(&w.embeddings);
        let vocab = w.vocab_size;
        if norm_inside && rows == n && decode {
            // Every token is a logits row, in order: the final norm goes inside the product.
            gpu.gemv_norm(
                ws.x.ptr,
                w.output_norm.ptr,
                c.rms_eps,
                Product { w: output.ptr, y: ws.logits.ptr, m: rows, n: vocab, k: h },
            )?;
        } else {
            rms_norm(
                gpu,
                RmsNorm {
                    x: ws.x.ptr,
                    rows: p.logit_rows,
                    w: w.output_norm.ptr,
                    out: ws.h.ptr,
                    count: rows,
                    hidden: h,
                    eps: c.rms_eps,
                },
            )?;
            gpu.gemm(ws.h.ptr, Product { w: output.ptr, y: ws.logits.ptr, m: rows, n: vocab, k: h }, false, &ws.split)?;
        }
        if choose != Choose::Logits {
            launch!(gpu, &gpu.k.argmax_logprob, (rows32, ARGMAX_SLICES as u32, 1), 1024;
                ws.logits.ptr, vocab as i32, ws.chosen.ptr, ws.chosen.at(rows), ws.argmax_parts.ptr, ws.argmax_counters.ptr)?;
        }
        if choose == Choose::Draws {
            // After the argmax: its token gives each row's maximum, and greedy rows keep it.
            gpu.sample_rows(ws.logits.ptr, vocab, ws.draws.ptr, ws.chosen.ptr, ws.chosen.at(rows), rows)?;
        }
        Ok(())
    }

    /// Uploads the step's plan as one array; returns where each part starts (in u32 words):
    /// tokens, positions, cache slots, attention plans, block tables, logit rows.
    fn upload_plan(&mut self, batch: &FlatBatch) -> Result<[usize; 6]> {
        let offsets = write_plan(batch, self.block_size, self.num_blocks, &mut self.host_meta)?;
        if self.host_meta.len() > self.ws.meta.len {
            self.ws.meta = self.weights.gpu.alloc(self.host_meta.len().next_power_of_two())?;
        }
        self.weights.gpu.write(&self.host_meta, &mut self.ws.meta)?;
        Ok(offsets)
    }
}
