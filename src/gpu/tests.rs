//! The CUDA kernels against braid's plain CPU code on random inputs of odd sizes. They need a
//! GPU (a `cuda` build run on a GPU machine) and pass vacuously, saying so, where none is found.

use half::{bf16, f16};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::runner::{RmsNorm, rms_norm};
use super::runtime::{Buf, GemmKind, Gpu, Product, Spread, available};
use crate::launch;

pub(super) fn gpu() -> Option<Gpu> {
    if !available() {
        eprintln!("no CUDA device: skipped");
        return None;
    }
    let mut gpu = Gpu::new(0, super::runtime::GemmKind::BatchInvariant).expect("the CUDA device opens");
    // Every kernel launched as the default mode's decode launches it, where the device can.
    gpu.programmatic_launch = gpu.supports_programmatic_launch();
    Some(gpu)
}

pub(super) fn random_bf16(r: &mut ChaCha8Rng, n: usize, scale: f32) -> Vec<bf16> {
    (0..n).map(|_| bf16::from_f32(r.random_range(-scale..scale))).collect()
}

pub(super) fn read<T: cudarc::driver::DeviceRepr + Clone + Default>(gpu: &Gpu, buf: &Buf<T>, n: usize) -> Vec<T> {
    let mut out = vec![T::default(); n];
    gpu.read(buf, &mut out).unwrap();
    out
}

/// A float whose bits the kernel tests compare (NaNs and signed zeros included).
pub(super) trait Bits: Copy {
    fn bits(self) -> u32;
}
impl Bits for f32 {
    fn bits(self) -> u32 {
        self.to_bits()
    }
}
impl Bits for f16 {
    fn bits(self) -> u32 {
        self.to_bits().into()
    }
}
impl Bits for bf16 {
    fn bits(self) -> u32 {
        self.to_bits().into()
    }
}

/// Whether two outputs are the same length and the same bits, element for element.
pub(super) fn same_bits<T: Bits>(a: &[T], b: &[T]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.bits() == y.bits())
}

/// Mean µs of one call of `f` (a launch or a few) over `reps` calls queued back to back, after
/// `warmup` calls; for the ignored speed tests.
pub(super) fn mean_micros(gpu: &Gpu, warmup: usize, reps: usize, f: &dyn Fn()) -> f64 {
    for _ in 0..warmup {
        f();
    }
    gpu.synchronize().unwrap();
    let start = std::time::Instant::now();
    for _ in 0..reps {
        f();
    }
    gpu.synchronize().unwrap();
    start.elapsed().as_secs_f64() / reps as f64 * 1e6
}

/// Checks `y` (`[m, n]`) against the f64 product of the same bf16 operands (+ `y0` when
/// accumulating): f32 sums of k products stay within ~1e-5·sqrt(k).
pub(super) fn assert_product(
    label: &str,
    x: &[bf16],
    w: &[bf16],
    y0: &[f32],
    y: &[f32],
    (m, n, k): (usize, usize, usize),
    accumulate: bool,
) {
    for row in 0..m {
        for col in 0..n {
            let dot: f64 = (0..k).map(|i| x[row * k + i].to_f64() * w[col * k + i].to_f64()).sum();
            let want = dot + if accumulate { y0[row * n + col] as f64 } else { 0.0 };
            let got = y[row * n + col] as f64;
            assert!(
                (got - want).abs() <= 1e-5 * (k as f64).sqrt() * 2.0 + 1e-6 * want.abs(),
                "{label} {m}x{n}x{k} acc {accumulate} ({row},{col}): {got} vs {want}"
            );
        }
    }
}

/// The few-row product (decode of up to 4 sequences) against the same f64 reference.
#[test]
fn gemv_matches_the_reference_product() {
    let Some(mut gpu) = gpu() else { return };
    let mut r = ChaCha8Rng::seed_from_u64(16);
    for (n, k) in [(1usize, 8usize), (7, 72), (129, 2048), (1001, 584), (33, 8200)] {
        for m in 1..=4 {
            let x = random_bf16(&mut r, m * k, 2.0);
            let w = random_bf16(&mut r, n * k, 1.0);
            let y0: Vec<f32> = (0..m * n).map(|_| r.random_range(-1.0f32..1.0)).collect();
            let (xd, wd) = (gpu.upload(&x).unwrap(), gpu.upload(&w).unwrap());
            // These outputs are narrow enough for the split-k variant: both, in turn.
            for split in [false, true] {
                gpu.gemv_split = split;
                for accumulate in [false, true] {
                    let yd = gpu.upload(&if accumulate { y0.clone() } else { vec![f32::NAN; m * n] }).unwrap();
                    gpu.gemv(xd.ptr, Product { w: wd.ptr, y: yd.ptr, m, n, k }, accumulate).unwrap();
                    assert_product(
                        if split { "gemv split" } else { "gemv" },
                        &x,
                        &w,
                        &y0,
                        &read(&gpu, &yd, m * n),
                        (m, n, k),
                        accumulate,
                    );
                }
            }
        }
    }
}

/// The few-row product with the RMS norm inside against norm.rs, bf16 rounding and an f64 dot.
#[test]
fn gemv_with_the_norm_inside_matches_the_cpu() {
    let Some(gpu) = gpu() else { return };
    let mut r = ChaCha8Rng::seed_from_u64(17);
    for (n, k) in [(5usize, 64usize), (300, 2048), (77, 584), (9, 8200)] {
        for m in 1..=4 {
            let x: Vec<f32> = (0..m * k).map(|_| r.random_range(-3.0f32..3.0)).collect();
            let nw: Vec<f32> = (0..k).map(|_| r.random_range(0.5f32..1.5)).collect();
            let w = random_bf16(&mut r, n * k, 1.0);
            let (xd, nd, wd) = (gpu.upload(&x).unwrap(), gpu.upload(&nw).unwrap(), gpu.upload(&w).unwrap());
            let yd = gpu.upload(&vec![f32::NAN; m * n]).unwrap();
            gpu.gemv_norm(xd.ptr, nd.ptr, 1e-5, Product { w: wd.ptr, y: yd.ptr, m, n, k }).unwrap();
            let y = read(&gpu, &yd, m * n);
            for row in 0..m {
                let mut h = x[row * k..(row + 1) * k].to_vec();
                crate::cpu::norm::rms_norm_row(&mut h, &nw, 1e-5);
                for col in 0..n {
                    let want: f64 = (0..k).map(|i| bf16::from_f32(h[i]).to_f64() * w[col * k + i].to_f64()).sum();
                    let got = y[row * n + col] as f64;
                    // One bf16 step of an input can differ (the sums of squares run in another order).
                    assert!(
                        (got - want).abs() <= 2e-2 * (k as f64).sqrt() / 16.0 + 1e-3 * want.abs(),
                        "gemv_norm {m}x{n}x{k} ({row},{col}): {got} vs {want}"
                    );
                }
            }
        }
    }
}

/// Kernels launched to start while their predecessor finishes (programmatic dependent launch)
/// still see its results and never overwrite what it reads: a chain of normed products, each
/// reading the buffer the previous one wrote and writing the one it read, gives the same bits
/// with the launch attribute as without it (where the device has it; else both are plain). The
/// default mode's products normalise inside; the batch-invariant mode's few-row ones follow
/// rms_norm_bf16 and let the next kernel launch only after their own wait.
#[test]
fn dependent_launches_see_their_predecessors_results() {
    let Some(mut gpu) = gpu() else { return };
    let supported = gpu.supports_programmatic_launch();
    let mut r = ChaCha8Rng::seed_from_u64(23);
    for (kind, m, k) in [
        (GemmKind::Cublas, 1usize, 2048usize),
        (GemmKind::Cublas, 3, 1032),
        (GemmKind::BatchInvariant, 1, 2048),
        (GemmKind::BatchInvariant, 5, 1024),
    ] {
        gpu.gemm_kind = kind;
        let x: Vec<f32> = (0..m * k).map(|_| r.random_range(-3.0f32..3.0)).collect();
        let nw: Vec<f32> = (0..k).map(|_| r.random_range(0.5f32..1.5)).collect();
        let w = random_bf16(&mut r, k * k, 1.0);
        let (nd, wd) = (gpu.upload(&nw).unwrap(), gpu.upload(&w).unwrap());
        let (h, split) = (gpu.alloc::<bf16>(m * k).unwrap(), gpu.alloc::<f32>(8 * m * k).unwrap());
        let mut results = Vec::new();
        for programmatic in [false, true] {
            gpu.programmatic_launch = programmatic && supported;
            let bufs = [gpu.upload(&x).unwrap(), gpu.upload(&vec![f32::NAN; m * k]).unwrap()];
            for step in 0..41 {
                let (from, to) = (&bufs[step % 2], &bufs[1 - step % 2]);
                match kind {
                    GemmKind::Cublas => {
                        gpu.gemv_norm(from.ptr, nd.ptr, 1e-5, Product { w: wd.ptr, y: to.ptr, m, n: k, k }).unwrap()
                    }
                    GemmKind::BatchInvariant => {
                        rms_norm(
                            &gpu,
                            RmsNorm { x: from.ptr, rows: 0, w: nd.ptr, out: h.ptr, count: m, hidden: k, eps: 1e-5 },
                        )
                        .unwrap();
                        gpu.gemm_invariant(
                            h.ptr,
                            Product { w: wd.ptr, y: to.ptr, m, n: k, k },
                            false,
                            &split,
                            Spread::Auto,
                        )
                        .unwrap();
                    }
                }
            }
            let out = read(&gpu, &bufs[1], m * k);
            assert!(out.iter().all(|v| v.is_finite()), "the chain stays finite");
            results.push(out);
        }
        assert!(same_bits(&results[0], &results[1]), "{kind:?} {m}x{k}: dependent launches changed the results");
    }
    if !supported {
        eprintln!("no programmatic dependent launch on this device: compared plain launches");
    }
}

/// Row counts the mode's fused few-row products take (up to 4 in the default mode, 32 in the
/// batch-invariant one: each of its forms).
fn fused_rows(kind: GemmKind) -> Vec<usize> {
    match kind {
        GemmKind::Cublas => (1..=4).collect(),
        GemmKind::BatchInvariant => vec![1, 3, 8, 9, 16, 17, 32],
    }
}

/// rms_norm_bf16 of `m` rows of width `k` (what the products take as input).
fn normed_rows(gpu: &Gpu, x: u64, norm_w: u64, m: usize, k: usize) -> Buf<bf16> {
    let h = gpu.alloc::<bf16>(m * k).unwrap();
    rms_norm(gpu, RmsNorm { x, rows: 0, w: norm_w, out: h.ptr, count: m, hidden: k, eps: 1e-5 }).unwrap();
    h
}

/// The unfused way to `y = rms_norm(x) · wᵀ`: rms_norm_bf16, then the mode's plain product
/// (the few-row one in the default mode; in the batch-invariant one the tiled product that
/// large batches take, so that fused decode steps are checked against it bit for bit).
fn normed_product_apart(gpu: &Gpu, x: u64, norm_w: u64, p: Product) {
    let h = normed_rows(gpu, x, norm_w, p.m, p.k);
    match gpu.gemm_kind {
        GemmKind::Cublas => gpu.gemv(h.ptr, p, false).unwrap(),
        GemmKind::BatchInvariant => {
            let split = gpu.alloc::<f32>(8 * p.m * p.n).unwrap();
            gpu.gemm_invariant(h.ptr, p, false, &split, Spread::Registers).unwrap();
        }
    }
}

/// Gate/up product and SwiGLU in one launch (and the norm, in the default mode) give the same
/// bits as the norm, the product and silu_mul_bf16 apart, in both modes (the invariant mode's
/// few-row form checked against its tiled product).
#[test]
fn gemv_swiglu_equals_the_product_then_silu() {
    let Some(mut gpu) = gpu() else { return };
    let mut r = ChaCha8Rng::seed_from_u64(20);
    // The last: a gate/up product wide enough for the invariant mode's wide forms.
    for (kind, hidden, ffn) in [
        (GemmKind::Cublas, 192usize, 301usize),
        (GemmKind::BatchInvariant, 192, 301),
        (GemmKind::BatchInvariant, 512, 4100),
    ] {
        gpu.gemm_kind = kind;
        for m in fused_rows(kind) {
            let x: Vec<f32> = (0..m * hidden).map(|_| r.random_range(-3.0f32..3.0)).collect();
            let nw: Vec<f32> = (0..hidden).map(|_| r.random_range(0.5f32..1.5)).collect();
            let w = random_bf16(&mut r, 2 * ffn * hidden, 0.3);
            let (xd, nd, wd) = (gpu.upload(&x).unwrap(), gpu.upload(&nw).unwrap(), gpu.upload(&w).unwrap());
            let fused = gpu.alloc::<bf16>(m * ffn).unwrap();
            match kind {
                GemmKind::Cublas => gpu
                    .gemv_norm_swiglu(
                        xd.ptr,
                        nd.ptr,
                        1e-5,
                        Product { w: wd.ptr, y: fused.ptr, m, n: 2 * ffn, k: hidden },
                    )
                    .unwrap(),
                GemmKind::BatchInvariant => {
                    let h = normed_rows(&gpu, xd.ptr, nd.ptr, m, hidden);
                    gpu.gemv_swiglu(h.ptr, Product { w: wd.ptr, y: fused.ptr, m, n: 2 * ffn, k: hidden }).unwrap();
                }
            }
            let gate_up = gpu.alloc::<f32>(m * 2 * ffn).unwrap();
            normed_product_apart(&gpu, xd.ptr, nd.ptr, Product { w: wd.ptr, y: gate_up.ptr, m, n: 2 * ffn, k: hidden });
            let separate = gpu.alloc::<bf16>(m * ffn).unwrap();
            launch!(&gpu, &gpu.k.silu_mul_bf16, (8, 1, 1), 256; gate_up.ptr, separate.ptr, ffn as i32, (m * ffn) as u64).unwrap();
            let (a, b) = (read(&gpu, &fused, m * ffn), read(&gpu, &separate, m * ffn));
            assert!(same_bits(&a, &b), "{kind:?} m {m}, ffn {ffn}: fused SwiGLU differs");
        }
    }
}

/// QKV product, rope and the K/V write in one launch (and the norm, in the default mode) give
/// the same bits as the norm, the product and rope_and_cache apart, in both modes.
#[test]
fn gemv_qkv_equals_the_product_then_rope_and_cache() {
    let Some(mut gpu) = gpu() else { return };
    let mut r = ChaCha8Rng::seed_from_u64(19);
    let (n_head, n_kv_head, head_dim, positions_max) = (4usize, 2usize, 64usize, 50usize);
    let (q, kv) = (n_head * head_dim, n_kv_head * head_dim);
    let n = q + 2 * kv;
    let slots_total = 512usize;
    // The few-row product takes any k that is a multiple of 8, the invariant one of 32.
    for (kind, hidden, rope_dim) in [
        (GemmKind::Cublas, 200usize, 64usize),
        (GemmKind::Cublas, 200, 32),
        (GemmKind::BatchInvariant, 224, 64),
        (GemmKind::BatchInvariant, 224, 32),
    ] {
        gpu.gemm_kind = kind;
        for with_bias in [false, true] {
            for m in fused_rows(kind) {
                let x: Vec<f32> = (0..m * hidden).map(|_| r.random_range(-3.0f32..3.0)).collect();
                let nw: Vec<f32> = (0..hidden).map(|_| r.random_range(0.5f32..1.5)).collect();
                let w = random_bf16(&mut r, n * hidden, 0.2);
                let bias: Vec<f32> = (0..n).map(|_| r.random_range(-0.5f32..0.5)).collect();
                let cos: Vec<f32> = (0..positions_max * rope_dim / 2).map(|_| r.random_range(-1.0f32..1.0)).collect();
                let sin: Vec<f32> = (0..positions_max * rope_dim / 2).map(|_| r.random_range(-1.0f32..1.0)).collect();
                let positions: Vec<u32> = (0..m).map(|_| r.random_range(0..positions_max as u32)).collect();
                let slots: Vec<u32> = (0..m as u32).map(|j| 7 + 13 * j).collect();
                let up = |v: &[f32]| gpu.upload(v).unwrap();
                let (xd, nd, wd, bd, cd, sd) =
                    (up(&x), up(&nw), gpu.upload(&w).unwrap(), up(&bias), up(&cos), up(&sin));
                let (pd, sld) = (gpu.upload(&positions).unwrap(), gpu.upload(&slots).unwrap());
                let run = |fused: bool| {
                    let zeros = vec![f16::ZERO; slots_total * kv];
                    let (kd, vd) = (gpu.upload(&zeros).unwrap(), gpu.upload(&zeros).unwrap());
                    let qd = gpu.upload(&vec![f32::NAN; m * q]).unwrap();
                    let b = if with_bias { bd.ptr } else { 0 };
                    if fused {
                        let h; // the normalised rows the invariant mode's product takes
                        let input = match kind {
                            GemmKind::Cublas => super::runtime::GemvArgs {
                                residual: xd.ptr,
                                norm_w: nd.ptr,
                                eps: 1e-5,
                                ..Default::default()
                            },
                            GemmKind::BatchInvariant => {
                                h = normed_rows(&gpu, xd.ptr, nd.ptr, m, hidden);
                                super::runtime::GemvArgs { x: h.ptr, ..Default::default() }
                            }
                        };
                        let args = super::runtime::GemvArgs {
                            positions: pd.ptr,
                            slots: sld.ptr,
                            cos_table: cd.ptr,
                            sin_table: sd.ptr,
                            bias: b,
                            q_out: qd.ptr,
                            k_cache: kd.ptr,
                            v_cache: vd.ptr,
                            n_head: n_head as i32,
                            n_kv_head: n_kv_head as i32,
                            head_dim: head_dim as i32,
                            rope_dim: rope_dim as i32,
                            ..input
                        };
                        gpu.gemv_qkv(Product { w: wd.ptr, y: 0, m, n, k: hidden }, args).unwrap();
                    } else {
                        let qkv = gpu.alloc::<f32>(m * n).unwrap();
                        normed_product_apart(&gpu, xd.ptr, nd.ptr, Product { w: wd.ptr, y: qkv.ptr, m, n, k: hidden });
                        launch!(&gpu, &gpu.k.rope_and_cache, (m as u32, 1, 1), 256;
                            qkv.ptr, b, pd.ptr, sld.ptr, cd.ptr, sd.ptr, qd.ptr, kd.ptr, vd.ptr,
                            n_head as i32, n_kv_head as i32, head_dim as i32, rope_dim as i32, 0i32)
                        .unwrap();
                    }
                    (read(&gpu, &qd, m * q), read(&gpu, &kd, slots_total * kv), read(&gpu, &vd, slots_total * kv))
                };
                let (fused, separate) = (run(true), run(false));
                let case = format!("{kind:?} m {m}, rope_dim {rope_dim}, bias {with_bias}");
                assert!(same_bits(&fused.0, &separate.0), "Q differs: {case}");
                assert!(same_bits(&fused.1, &separate.1), "K cache differs: {case}");
                assert!(same_bits(&fused.2, &separate.2), "V cache differs: {case}");
                assert!(fused.0.iter().all(|v| v.is_finite()), "Q not all written: {case}");
            }
        }
    }
}

/// The device argmax against the sampler's: the first maximum (ties included) and its
/// log-probability, on odd vocabulary sizes (some smaller than the slices).
#[test]
fn argmax_matches_the_sampler() {
    let Some(gpu) = gpu() else { return };
    let mut r = ChaCha8Rng::seed_from_u64(21);
    for vocab in [1usize, 7, 1000, 49_157] {
        let rows = 3;
        let mut logits: Vec<f32> = (0..rows * vocab).map(|_| r.random_range(-8.0f32..8.0)).collect();
        if vocab > 10 {
            // A tie for the maximum in row 1: the first one wins.
            let row = &mut logits[vocab..2 * vocab];
            row[vocab / 3] = 20.0;
            row[vocab / 2] = 20.0;
        }
        let ld = gpu.upload(&logits).unwrap();
        let chosen = gpu.alloc::<u32>(2 * rows).unwrap();
        let parts = gpu.alloc::<u64>(2 * rows * 16).unwrap();
        let counters = gpu.alloc_zeroed::<u32>(rows).unwrap();
        for _ in 0..2 {
            // Twice: the counters must be back at zero for the second launch.
            launch!(&gpu, &gpu.k.argmax_logprob, (rows as u32, 16, 1), 1024; ld.ptr, vocab as i32, chosen.ptr, chosen.at(rows), parts.ptr, counters.ptr).unwrap();
            let got = read(&gpu, &chosen, 2 * rows);
            for t in 0..rows {
                let row = &logits[t * vocab..(t + 1) * vocab];
                let id = crate::cpu::row::argmax(row);
                let lp = row[id as usize] - crate::cpu::row::log_sum_exp(row);
                assert_eq!(got[t], id, "vocab {vocab} row {t}");
                let glp = f32::from_bits(got[rows + t]);
                assert!((glp - lp).abs() <= 1e-4 * lp.abs().max(1.0), "vocab {vocab} row {t}: logprob {glp} vs {lp}");
            }
        }
    }
}

/// Rope (both pairings, a partial rotary width) with the bias and the K/V write, against
/// rope.rs on the CPU's own cos/sin tables.
#[test]
fn rope_and_cache_matches_the_cpu() {
    use crate::model::config::{ModelConfig, RopeScaling, RopeStyle};
    let Some(gpu) = gpu() else { return };
    let mut r = ChaCha8Rng::seed_from_u64(22);
    for style in [RopeStyle::Interleaved, RopeStyle::Neox] {
        for rope_dim in [128usize, 64] {
            let config = ModelConfig {
                name: "test".into(),
                n_layer: 1,
                hidden_size: 7 * 128,
                ffn_size: 8,
                n_head: 7,
                n_kv_head: 1,
                head_dim: 128,
                rope_dim,
                rope_theta: 1e6,
                rope_style: style,
                rope_scaling: RopeScaling::None,
                rms_eps: 1e-6,
                context_length: 64,
                qkv_bias: true,
                layer_windows: vec![None],
                ..Default::default()
            };
            let rope = config.rope(None);
            let (q, kv) = (7 * 128, 128);
            let tokens = 3;
            let qkv: Vec<f32> = (0..tokens * (q + 2 * kv)).map(|_| r.random_range(-2.0f32..2.0)).collect();
            let bias: Vec<f32> = (0..q + 2 * kv).map(|_| r.random_range(-0.5f32..0.5)).collect();
            let positions = vec![0u32, 17, 63];
            let slots = vec![5u32, 0, 9];
            let all: Vec<u32> = (0..64).collect();
            let (cos, sin) = rope.tables(&all);
            let up = |v: &[f32]| gpu.upload(v).unwrap();
            let (qd, bd, cd, sd) = (up(&qkv), up(&bias), up(&cos), up(&sin));
            let (pd, sld) = (gpu.upload(&positions).unwrap(), gpu.upload(&slots).unwrap());
            let q_out = gpu.alloc::<f32>(tokens * q).unwrap();
            let zeros = vec![f16::ZERO; 16 * kv];
            let (kd, vd) = (gpu.upload(&zeros).unwrap(), gpu.upload(&zeros).unwrap());
            let neox = i32::from(style == RopeStyle::Neox);
            launch!(&gpu, &gpu.k.rope_and_cache, (tokens as u32, 1, 1), 256;
                qd.ptr, bd.ptr, pd.ptr, sld.ptr, cd.ptr, sd.ptr, q_out.ptr, kd.ptr, vd.ptr,
                7i32, 1i32, 128i32, rope_dim as i32, neox)
            .unwrap();
            let (gq, gk, gv) = (read(&gpu, &q_out, tokens * q), read(&gpu, &kd, 16 * kv), read(&gpu, &vd, 16 * kv));
            let half = rope_dim / 2;
            for t in 0..tokens {
                let row: Vec<f32> =
                    qkv[t * (q + 2 * kv)..(t + 1) * (q + 2 * kv)].iter().zip(&bias).map(|(a, b)| a + b).collect();
                let p = positions[t] as usize;
                let (ct, st) = (&cos[p * half..(p + 1) * half], &sin[p * half..(p + 1) * half]);
                let (mut wq, mut wk) = (row[..q].to_vec(), row[q..q + kv].to_vec());
                rope.apply(&mut wq, ct, st);
                rope.apply(&mut wk, ct, st);
                let case = format!("{style:?} rope_dim {rope_dim} token {t}");
                assert_eq!(&gq[t * q..(t + 1) * q], &wq[..], "Q: {case}");
                let slot = slots[t] as usize;
                assert!(
                    gk[slot * kv..(slot + 1) * kv].iter().zip(&wk).all(|(g, w)| *g == f16::from_f32(*w)),
                    "K: {case}"
                );
                assert!(
                    gv[slot * kv..(slot + 1) * kv].iter().zip(&row[q + kv..]).all(|(g, w)| *g == f16::from_f32(*w)),
                    "V: {case}"
                );
            }
        }
    }
}

/// RMS norm (over picked rows) and SwiGLU against norm.rs and vmath.rs, rounded to bf16.
#[test]
fn norm_and_swiglu_match_the_cpu() {
    let Some(gpu) = gpu() else { return };
    let mut r = ChaCha8Rng::seed_from_u64(14);
    let (rows, hidden, ffn) = (7usize, 576usize, 1539usize);
    let x: Vec<f32> = (0..rows * hidden).map(|_| r.random_range(-3.0f32..3.0)).collect();
    let w: Vec<f32> = (0..hidden).map(|_| r.random_range(0.5f32..1.5)).collect();
    let pick: Vec<u32> = vec![6, 0, 3];
    let (xd, wd, pd) = (gpu.upload(&x).unwrap(), gpu.upload(&w).unwrap(), gpu.upload(&pick).unwrap());
    let out = gpu.alloc::<bf16>(pick.len() * hidden).unwrap();
    rms_norm(&gpu, RmsNorm { x: xd.ptr, rows: pd.ptr, w: wd.ptr, out: out.ptr, count: pick.len(), hidden, eps: 1e-5 })
        .unwrap();
    let got = read(&gpu, &out, pick.len() * hidden);
    for (i, &p) in pick.iter().enumerate() {
        let mut want = x[p as usize * hidden..(p as usize + 1) * hidden].to_vec();
        crate::cpu::norm::rms_norm_row(&mut want, &w, 1e-5);
        for (g, w) in got[i * hidden..(i + 1) * hidden].iter().zip(&want) {
            // Within one bf16 step: the sums of squares are added in another order.
            assert!((g.to_f32() - w).abs() <= w.abs() / 128.0, "norm row {p}: {g} vs {w}");
        }
    }
    // Gate and up interleaved per row, as the GPU's gate/up product lays them out.
    let gate_up: Vec<f32> = (0..rows * 2 * ffn).map(|_| r.random_range(-6.0f32..6.0)).collect();
    let interleaved: Vec<f32> = gate_up
        .chunks_exact(2 * ffn)
        .flat_map(|row| {
            let (g, u) = row.split_at(ffn);
            g.iter().zip(u).flat_map(|(&a, &b)| [a, b]).collect::<Vec<_>>()
        })
        .collect();
    let gd = gpu.upload(&interleaved).unwrap();
    let act = gpu.alloc::<bf16>(rows * ffn).unwrap();
    launch!(&gpu, &gpu.k.silu_mul_bf16, (64, 1, 1), 256; gd.ptr, act.ptr, ffn as i32, (rows * ffn) as u64).unwrap();
    let got = read(&gpu, &act, rows * ffn);
    for t in 0..rows {
        let (g, u) = gate_up[t * 2 * ffn..(t + 1) * 2 * ffn].split_at(ffn);
        let mut want = vec![0f32; ffn];
        crate::cpu::vmath::silu_mul(g, u, &mut want);
        for (i, (a, b)) in got[t * ffn..(t + 1) * ffn].iter().zip(&want).enumerate() {
            // The CPU's SwiGLU to the bit (ggml's exp), then the GPU's rounding to bf16 (libm's
            // exp in a row's tail past its last 16 may differ from CUDA's in the last bit).
            if i < ffn / 16 * 16 {
                assert_eq!(a.to_bits(), bf16::from_f32(*b).to_bits(), "swiglu ({t},{i}): {a} vs {b}");
            } else {
                assert!((a.to_f32() - b).abs() <= 8e-3 * b.abs() + 1e-6, "swiglu ({t},{i}): {a} vs {b}");
            }
        }
    }
}
