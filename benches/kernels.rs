//! Microbenchmarks of braid's CPU kernels: quantized matrix products at decode and prefill
//! batch sizes, paged attention, and the sampler's random draw. Run with `cargo bench --bench
//! kernels`.

use std::sync::Arc;

use braid::backend::FlatBatch;
use braid::cpu::attention::{AttentionPlan, AttentionShape, LayerKv, paged_attention, write_kv};
use braid::cpu::linear::QLinear;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use half::f16;

fn random(n: usize, seed: u64) -> Vec<f32> {
    // A small xorshift: the values only need to look like weights.
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        })
        .collect()
}

fn matmul(c: &mut Criterion) {
    // SmolLM2-135M's feed-forward up projection: 1536 x 576.
    let (n, k) = (1536, 576);
    let mut group = c.benchmark_group("qmatmul_1536x576");
    for dtype in [GgmlDType::Q4_1, GgmlDType::Q4_0, GgmlDType::Q8_0] {
        let w = Tensor::from_vec(random(n * k, 1), (n, k), &Device::Cpu).unwrap();
        let linear = QLinear::new(Arc::new(QTensor::quantize(&w, dtype).unwrap())).unwrap();
        for m in [1usize, 32, 512] {
            let x = random(m * k, 2);
            group.throughput(Throughput::Elements((m * n * k) as u64));
            group.bench_with_input(BenchmarkId::new(format!("{dtype:?}"), m), &m, |b, &m| {
                b.iter(|| linear.forward_rows(&x, m).unwrap())
            });
        }
    }
    group.finish();
}

/// Gemma 3 270M Q4_K_M's types on its feed-forward shapes (Q5_0 gate/up 2048 x 640, Q4_K /
/// Q5_K / Q6_K down 640 x 2048: K-quant rows are whole 256-value super-blocks), braid's kernels
/// against candle's QMatMul (what these types ran on before) on the same weights.
fn matmul_kquants(c: &mut Criterion) {
    use candle_core::Module;
    use candle_core::quantized::QMatMul;
    let mut group = c.benchmark_group("qmatmul_gemma_ffn");
    for (dtype, n, k) in [
        (GgmlDType::Q5_0, 2048, 640),
        (GgmlDType::Q4K, 640, 2048),
        (GgmlDType::Q5K, 640, 2048),
        (GgmlDType::Q6K, 640, 2048),
    ] {
        let w = Tensor::from_vec(random(n * k, 1), (n, k), &Device::Cpu).unwrap();
        let qt = Arc::new(QTensor::quantize(&w, dtype).unwrap());
        let linear = QLinear::new(qt.clone()).unwrap();
        let candle = QMatMul::from_arc(qt).unwrap();
        for m in [1usize, 32] {
            let x = random(m * k, 2);
            let xt = Tensor::from_slice(&x, (m, k), &Device::Cpu).unwrap();
            group.throughput(Throughput::Elements((m * n * k) as u64));
            group.bench_with_input(BenchmarkId::new(format!("braid {dtype:?} {n}x{k}"), m), &m, |b, &m| {
                b.iter(|| linear.forward_rows(&x, m).unwrap())
            });
            group.bench_with_input(BenchmarkId::new(format!("candle {dtype:?} {n}x{k}"), m), &m, |b, _| {
                b.iter(|| candle.forward(&xt).unwrap())
            });
        }
    }
    group.finish();
}

fn attention(c: &mut Criterion) {
    // SmolLM2's heads: 9 query heads, 3 KV heads of 64.
    let shape = AttentionShape::global(9, 3, 64);
    let width = shape.n_kv_head * shape.head_dim;
    let block = 16;
    let mut group = c.benchmark_group("paged_attention");
    // (sequences, cached tokens each, new tokens each): decode of 32, and a 512-token prefill chunk.
    for (seqs, past, new) in [(32usize, 256usize, 1usize), (1, 512, 512)] {
        let blocks_per_seq = (past + new).div_ceil(block);
        let mut layer = LayerKv {
            k: vec![f16::ZERO; seqs * blocks_per_seq * block * width],
            v: vec![f16::ZERO; seqs * blocks_per_seq * block * width],
        };
        let mut batch = FlatBatch::default();
        for s in 0..seqs {
            let table = (0..blocks_per_seq as u32).map(|b| (s * blocks_per_seq) as u32 + b).collect();
            batch.push(&vec![0; new], past + new, table, true);
        }
        let plan = AttentionPlan::new(&batch, block);
        let t = seqs * new;
        let kv = random(t * width, 3);
        write_kv(&plan, &mut layer, &kv, &kv, width);
        let q = random(t * shape.n_head * shape.head_dim, 4);
        group.bench_function(format!("{seqs}x(past {past}, new {new})"), |b| {
            b.iter(|| paged_attention(&batch, &plan, &layer, &q, &shape))
        });
    }
    group.finish();
}

fn sampling(c: &mut Criterion) {
    use braid::backend::DrawParams;
    use braid::cpu::draw::draw;
    use braid::cpu::row::{log_sum_exp, top_k_indices};
    let mut group = c.benchmark_group("sampling");
    // SmolLM2's vocabulary and Llama 3's, logits spread like a trained model's.
    for vocab in [49_152usize, 128_256] {
        let logits: Vec<f32> = random(vocab, 5).iter().map(|x| x * 24.0).collect();
        for (name, top_p) in [("T0.8", 1.0f32), ("T0.8 top-p 0.9", 0.9)] {
            let params = DrawParams { temperature: 0.8, top_k: 0, top_p, min_p: 0.0 };
            group.bench_function(format!("draw {name}/{vocab}"), |b| b.iter(|| draw(&logits, &params, 0.37)));
        }
        // The logprob every sampled token reports, and the full sort the sampler used to make
        // of every row before the draw walked it in order (kept for comparison).
        group.bench_function(format!("log_sum_exp/{vocab}"), |b| b.iter(|| log_sum_exp(&logits)));
        group.bench_function(format!("top 20 alternatives (logprobs)/{vocab}"), |b| {
            b.iter(|| top_k_indices(&logits, 20))
        });
        group.bench_function(format!("sort of the row (former draw)/{vocab}"), |b| {
            b.iter(|| top_k_indices(&logits, vocab))
        });
    }
    group.finish();
}

criterion_group!(benches, matmul, matmul_kquants, attention, sampling);
criterion_main!(benches);
