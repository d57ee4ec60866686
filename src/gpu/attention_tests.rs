//! Paged attention on the GPU: every kernel variant against the CPU kernel, the variants that
//! must give the same bits against each other, and (ignored) their speed.

use half::{bf16, f16};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::runtime::{ATTENTION_MAX_SPLITS, Buf, Gpu};
use super::tests::{gpu, mean_micros, read, same_bits};
use super::variants::AttentionKind;
use crate::backend::{FlatBatch, Window};
use crate::cpu::attention::{AttentionPlan, AttentionShape, LayerKv, paged_attention};
use crate::launch;

/// A step's attention inputs on the device: random f16 cache, f32 queries, the plan.
struct Case {
    n: usize,
    shape: AttentionShape,
    bs: usize,
    meta: Buf<u32>,
    offsets: [usize; 6],
    q: Buf<f32>,
    k: Buf<f16>,
    v: Buf<f16>,
    out: Buf<bf16>,
    partial: Buf<f32>,
    counters: Buf<u32>,
}

impl Case {
    /// `seqs`: (new tokens, context after the step, window) per sequence. Returns the case
    /// and the CPU kernel's output on the same inputs (when `cpu`).
    fn new(
        gpu: &Gpu,
        r: &mut ChaCha8Rng,
        shape: AttentionShape,
        seqs: &[(usize, usize, Option<Window>)],
        cpu: bool,
    ) -> (Case, Vec<f32>) {
        let bs = 16;
        let num_blocks: usize = seqs.iter().map(|s| s.1.div_ceil(bs)).sum();
        let width = shape.n_kv_head * shape.head_dim;
        let mut ids: Vec<u32> = (0..num_blocks as u32).collect();
        rand::seq::SliceRandom::shuffle(&mut ids[..], r);
        let mut batch = FlatBatch::default();
        let mut next = 0;
        for &(new, context, window) in seqs {
            let blocks = context.div_ceil(bs);
            let table = ids[next..next + blocks].to_vec();
            next += blocks;
            let tokens: Vec<u32> = (0..new as u32).collect();
            batch.push(&tokens, context, table, true);
            batch.seqs.last_mut().unwrap().window = window;
        }
        let n = batch.tokens.len();
        let cache = num_blocks * bs * width;
        let kv = LayerKv {
            k: (0..cache).map(|_| f16::from_f32(r.random_range(-1.0f32..1.0))).collect(),
            v: (0..cache).map(|_| f16::from_f32(r.random_range(-1.0f32..1.0))).collect(),
        };
        let q: Vec<f32> = (0..n * shape.n_head * shape.head_dim).map(|_| r.random_range(-2.0f32..2.0)).collect();
        // The random cache stands for K/V already written, the new tokens' included.
        let want =
            if cpu { paged_attention(&batch, &AttentionPlan::new(&batch, bs), &kv, &q, &shape) } else { Vec::new() };
        let mut meta = Vec::new();
        let offsets = super::plan::write_plan(&batch, bs, num_blocks, &mut meta).unwrap();
        let case = Case {
            n,
            bs,
            meta: gpu.upload(&meta).unwrap(),
            offsets,
            q: gpu.upload(&q).unwrap(),
            k: gpu.upload(&kv.k).unwrap(),
            v: gpu.upload(&kv.v).unwrap(),
            out: gpu.alloc::<bf16>(n * shape.n_head * shape.head_dim).unwrap(),
            partial: gpu.alloc::<f32>(n * shape.n_head * ATTENTION_MAX_SPLITS * (shape.head_dim + 2)).unwrap(),
            counters: gpu.alloc_zeroed::<u32>(n * shape.n_kv_head).unwrap(),
            shape,
        };
        (case, want)
    }

    fn launch(&self, gpu: &Gpu, f: &cudarc::driver::CudaFunction, threads: u32, splits: u32) {
        let s = &self.shape;
        let part = if splits > 1 { self.partial.ptr } else { 0 };
        let scale = 1.0 / (s.head_dim as f32).sqrt();
        launch!(gpu, f, (self.n as u32, s.n_kv_head as u32, splits), threads;
            self.q.ptr, self.k.ptr, self.v.ptr, self.meta.at(self.offsets[3]), self.meta.at(self.offsets[4]), self.out.ptr,
            s.n_head as i32, s.n_kv_head as i32, self.bs as i32, scale, part, self.counters.ptr).unwrap();
    }

    fn output(&self, gpu: &Gpu) -> Vec<bf16> {
        read(gpu, &self.out, self.n * self.shape.n_head * self.shape.head_dim)
    }
}

/// A mix of decodes and prefill chunks (odd lengths, shuffled block tables, a window).
const MIX: &[(usize, usize, Option<Window>)] = &[
    (1, 37, None),
    (23, 23, None),
    (5, 150, None),
    (1, 1, None),
    (1, 200, Some(Window { keep: 4, size: 40 })),
    (1, 300, None),
];

/// Every variant the runtime launches, unsplit and split, against the CPU kernel on the same f16
/// cache; outputs are bf16.
#[test]
fn attention_matches_the_cpu() {
    let Some(gpu) = gpu() else { return };
    let mut r = ChaCha8Rng::seed_from_u64(13);
    for (n_head, n_kv_head, head_dim) in [(9, 3, 64), (32, 8, 64), (28, 4, 128), (8, 8, 128)] {
        let shape = AttentionShape::global(n_head, n_kv_head, head_dim);
        let (case, want) = Case::new(&gpu, &mut r, shape, MIX, true);
        for kind in AttentionKind::ALL {
            // Registers for 8 query heads serve any group; for 4, groups up to 4.
            let groups: &[usize] = if n_head / n_kv_head <= 4 { &[4, 8] } else { &[8] };
            for &g in groups {
                let f = gpu.attention_kernel(head_dim, kind, g);
                // Unsplit, and the keys shared by 3 and by 8 blocks (more than some tokens have);
                // the counters return to zero after each split launch, so they serve the next.
                for splits in [1u32, 3, 8, 3] {
                    case.launch(&gpu, f, kind.threads(), splits);
                    for (i, (got, w)) in case.output(&gpu).iter().zip(&want).enumerate() {
                        let got = got.to_f32();
                        assert!(
                            (got - w).abs() <= 1e-2 * w.abs() + 1e-3,
                            "{kind:?} g{g}, {splits} splits, heads {n_head}/{n_kv_head}x{head_dim}, element {i}: {got} vs {w}"
                        );
                    }
                }
            }
        }
    }
}

/// The registers held per group (G) and the passes loaded together (U) change no sum: each
/// form gives the bits of the plain one of its warps (8 heads held, one pass at a time), so
/// the batch-invariant mode may take `Many` or `Few` by the batch.
#[test]
fn attention_forms_of_one_warp_count_agree_bit_for_bit() {
    let Some(gpu) = gpu() else { return };
    let mut r = ChaCha8Rng::seed_from_u64(14);
    let plain = |name: &'static str| (name, gpu.function(name).unwrap());
    let forms = [
        (plain("paged_attention_d64_w4_g8_u1"), &[AttentionKind::Many, AttentionKind::Few][..]),
        (plain("paged_attention_d64_w8_g8_u1"), &[AttentionKind::Split][..]),
    ];
    for (n_head, n_kv_head) in [(32, 8), (6, 2), (8, 8), (14, 2)] {
        let shape = AttentionShape::global(n_head, n_kv_head, 64);
        let (case, _) = Case::new(&gpu, &mut r, shape, MIX, false);
        let group = n_head / n_kv_head;
        for ((plain, plain_f), kinds) in &forms {
            for splits in [1u32, 3] {
                for &kind in *kinds {
                    case.launch(&gpu, plain_f, kind.threads(), splits);
                    let want = case.output(&gpu);
                    for g in [group, 8] {
                        case.launch(&gpu, gpu.attention_kernel(64, kind, g), kind.threads(), splits);
                        let same = same_bits(&case.output(&gpu), &want);
                        assert!(
                            same,
                            "{kind:?} g{g}, heads {n_head}/{n_kv_head}, {splits} splits: not the bits of {plain}"
                        );
                    }
                }
            }
        }
    }
}

/// Decode attention's time per launch for Llama-3.2-1B's heads (32/8 x 64) at a few batch sizes
/// and contexts (`cargo test --features cuda gpu::attention_tests::attention_speed -- --ignored`).
#[test]
#[ignore]
fn attention_speed() {
    let Some(gpu) = gpu() else { return };
    let mut r = ChaCha8Rng::seed_from_u64(16);
    let shape = || AttentionShape::global(32, 8, 64);
    let plain = |name: &str| gpu.function(name).unwrap();
    let (plain4, plain8) = (plain("paged_attention_d64_w4_g8_u1"), plain("paged_attention_d64_w8_g8_u1"));
    for (n, context) in [(1usize, 256usize), (1, 1024), (4, 256), (16, 256), (32, 256), (64, 256), (256, 256)] {
        let seqs = vec![(1, context, None); n];
        let (case, _) = Case::new(&gpu, &mut r, shape(), &seqs, false);
        let split = (gpu.multiprocessors() / (n * 8)).clamp(1, ATTENTION_MAX_SPLITS) as u32;
        for (name, f, threads, splits) in [
            ("4 warps, plain", &plain4, 128, 1),
            ("8 warps, plain, split", &plain8, 256, split),
            ("Many", gpu.attention_kernel(64, AttentionKind::Many, 4), 128, 1),
            ("Few", gpu.attention_kernel(64, AttentionKind::Few, 4), 128, 1),
            ("Split", gpu.attention_kernel(64, AttentionKind::Split, 4), 256, split),
        ] {
            let us = mean_micros(&gpu, 5, 200, &|| case.launch(&gpu, f, threads, splits));
            let bytes = (n * context * 8 * 64 * 2 * 2) as f64;
            println!(
                "attention n={n:4} context={context:5} {name:22} splits {splits}: {us:7.2} us ({:5.0} GB/s)",
                bytes / us / 1e3
            );
        }
    }
}
