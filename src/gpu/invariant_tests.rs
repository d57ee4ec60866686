//! The batch-invariant products (invariant.rs; kernels/gemm.cuh, igemv.cuh, wgmma.cuh) against
//! an f64 reference, and every form and tile of them bit for bit against each other: a row's
//! bits alone equal its bits in any batch. They need a GPU and pass vacuously where none is
//! found; `gemm_speed` (ignored) times them against cuBLAS.

use half::bf16;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::runtime::{GemvArgs, Product, Spread};
use super::tests::{assert_product, gpu, mean_micros, random_bf16, read, same_bits};
use super::variants::{GEMM_TILES, IGEMV_VARIANTS};

// (2, 8200, 2048), (9, 8192, 512) and (20, 8193, 512): the few-row forms for wide outputs;
// (40, 136, 1024), (65, 300, 1024), (129, 130, 512) and (200, 300, 2048): the wgmma tiles on
// Hopper (segments of whole 64-k stages); (300, 77, 352) and (130, 1000, 256) fall back to
// mma.sync there.
const SHAPES: &[(usize, usize, usize)] = &[
    (1, 70, 64),
    (3, 50, 2048),
    (5, 129, 96),
    (30, 40, 2048),
    (2, 8200, 2048),
    (9, 8192, 512),
    (20, 8193, 512),
    (17, 200, 576),
    (16, 64, 2048),
    (64, 33, 160),
    (40, 136, 1024),
    (65, 300, 1024),
    (129, 130, 512),
    (200, 300, 2048),
    (300, 77, 352),
    (130, 1000, 256),
];

/// Every variant and spread against an f64 product of the same bf16 operands; outputs poisoned
/// with NaN first, so an unwritten element fails.
#[test]
fn gemm_matches_the_reference_product() {
    let Some(gpu) = gpu() else { return };
    let mut r = ChaCha8Rng::seed_from_u64(11);
    for &(m, n, k) in SHAPES {
        let x = random_bf16(&mut r, m * k, 2.0);
        let w = random_bf16(&mut r, n * k, 1.0);
        let y0: Vec<f32> = (0..m * n).map(|_| r.random_range(-1.0f32..1.0)).collect();
        let (xd, wd) = (gpu.upload(&x).unwrap(), gpu.upload(&w).unwrap());
        let split = gpu.alloc::<f32>(8 * m * n).unwrap();
        for spread in [Spread::Auto, Spread::Registers, Spread::Blocks] {
            for accumulate in [false, true] {
                let start = if accumulate { y0.clone() } else { vec![f32::NAN; m * n] };
                let yd = gpu.upload(&start).unwrap();
                gpu.gemm_invariant(xd.ptr, Product { w: wd.ptr, y: yd.ptr, m, n, k }, accumulate, &split, spread)
                    .unwrap();
                assert_product(
                    &format!("gemm {spread:?}"),
                    &x,
                    &w,
                    &y0,
                    &read(&gpu, &yd, m * n),
                    (m, n, k),
                    accumulate,
                );
                for (index, tile) in
                    GEMM_TILES.iter().enumerate().filter(|(i, _)| gpu.tile_takes(*i, k) && spread != Spread::Auto)
                {
                    let yd = gpu.upload(&start).unwrap();
                    gpu.gemm_tiled(
                        index,
                        xd.ptr,
                        Product { w: wd.ptr, y: yd.ptr, m, n, k },
                        accumulate,
                        &split,
                        spread,
                    )
                    .unwrap();
                    assert_product(
                        &format!("{} {spread:?}", tile.name),
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

/// A row's result is the same bits alone, inside any batch, and however the work is spread.
#[test]
fn gemm_rows_do_not_depend_on_the_batch() {
    let Some(gpu) = gpu() else { return };
    let mut r = ChaCha8Rng::seed_from_u64(12);
    for &(m, n, k) in SHAPES {
        let x = random_bf16(&mut r, m * k, 2.0);
        let w = random_bf16(&mut r, n * k, 1.0);
        let wd = gpu.upload(&w).unwrap();
        let split = gpu.alloc::<f32>(8 * m * n).unwrap();
        let run = |rows: &[bf16], count: usize, spread: Spread| {
            let xd = gpu.upload(rows).unwrap();
            let yd = gpu.alloc::<f32>(count * n).unwrap();
            gpu.gemm_invariant(xd.ptr, Product { w: wd.ptr, y: yd.ptr, m: count, n, k }, false, &split, spread)
                .unwrap();
            read(&gpu, &yd, count * n)
        };
        let batched = run(&x, m, Spread::Registers);
        for spread in [Spread::Auto, Spread::Blocks] {
            assert!(same_bits(&run(&x, m, spread), &batched), "{m}x{n}x{k} {spread:?}");
        }
        // Every tile, mma.sync and wgmma alike, gives the same bits.
        let xd = gpu.upload(&x).unwrap();
        for (index, tile) in GEMM_TILES.iter().enumerate().filter(|(i, _)| gpu.tile_takes(*i, k)) {
            for spread in [Spread::Registers, Spread::Blocks] {
                let yd = gpu.alloc::<f32>(m * n).unwrap();
                gpu.gemm_tiled(index, xd.ptr, Product { w: wd.ptr, y: yd.ptr, m, n, k }, false, &split, spread)
                    .unwrap();
                let same = same_bits(&read(&gpu, &yd, m * n), &batched);
                assert!(same, "{m}x{n}x{k}: tile {} ({spread:?}) differs from the batch", tile.name);
            }
        }
        // And every few-row form that takes these rows.
        for (index, form) in IGEMV_VARIANTS.iter().enumerate().filter(|(i, _)| gpu.igemv_takes(*i, m, k)) {
            let yd = gpu.alloc::<f32>(m * n).unwrap();
            gpu.igemv_form(
                index,
                Product { w: wd.ptr, y: yd.ptr, m, n, k },
                GemvArgs { x: xd.ptr, ..GemvArgs::default() },
            )
            .unwrap();
            assert!(
                same_bits(&read(&gpu, &yd, m * n), &batched),
                "{m}x{n}x{k}: few-row form {} differs from the batch",
                form.name
            );
        }
        for row in [0, m / 2, m - 1] {
            for spread in [Spread::Auto, Spread::Registers, Spread::Blocks] {
                let alone = run(&x[row * k..(row + 1) * k], 1, spread);
                let same = same_bits(&alone, &batched[row * n..(row + 1) * n]);
                assert!(same, "{m}x{n}x{k}: row {row} alone ({spread:?}) differs from the batch");
            }
        }
    }
}

/// Not a test: times the batch-invariant product against cuBLAS on the shapes of a
/// Llama-3.2-1B step (`cargo test --features cuda gpu::invariant_tests::gemm_speed -- --ignored`).
#[test]
#[ignore]
fn gemm_speed() {
    let Some(gpu) = gpu() else { return };
    let mut r = ChaCha8Rng::seed_from_u64(15);
    let shapes = [
        (3072usize, 2048usize, "qkv"),
        (2048, 2048, "o"),
        (16384, 2048, "gate_up"),
        (2048, 8192, "down"),
        (128256, 2048, "lm_head"),
    ];
    let max_w = shapes.iter().map(|s| s.0 * s.1).max().unwrap();
    let w = gpu.upload(&random_bf16(&mut r, max_w, 0.05)).unwrap();
    let x = gpu.upload(&random_bf16(&mut r, 8192 * 8192, 1.0)).unwrap();
    let y = gpu.alloc::<f32>(8192 * 16384).unwrap();
    let split = gpu.alloc::<f32>(8 * 512 * 4096).unwrap();
    // BRAID_GEMM_SPEED_M="256 4096" measures those row counts alone.
    let rows: Vec<usize> = match std::env::var("BRAID_GEMM_SPEED_M") {
        Ok(list) => list.split_whitespace().map(|m| m.parse().expect("BRAID_GEMM_SPEED_M: row counts")).collect(),
        Err(_) => vec![1, 4, 8, 16, 32, 64, 256, 4096],
    };
    for m in rows {
        for &(n, k, name) in &shapes {
            if m > 256 && name == "lm_head" {
                continue;
            }
            let time = |f: &dyn Fn()| mean_micros(&gpu, 3, 20, f);
            let ours = time(&|| {
                gpu.gemm_invariant(x.ptr, Product { w: w.ptr, y: y.ptr, m, n, k }, false, &split, Spread::Auto).unwrap()
            });
            let cublas = time(&|| gpu.gemm_cublas(x.ptr, Product { w: w.ptr, y: y.ptr, m, n, k }, 0.0).unwrap());
            if m <= 32 {
                for (index, v) in IGEMV_VARIANTS.iter().enumerate().filter(|(i, _)| gpu.igemv_takes(*i, m, k)) {
                    let args = GemvArgs { x: x.ptr, ..Default::default() };
                    let us = time(&|| gpu.igemv_form(index, Product { w: w.ptr, y: y.ptr, m, n, k }, args).unwrap());
                    println!(
                        "igemv m={m:5} {name:8} {}: {us:8.1} us ({:6.0} GB/s)",
                        v.name,
                        (n * k * 2) as f64 / us / 1e3
                    );
                }
            }
            if m <= 4 {
                let gemv = time(&|| gpu.gemv(x.ptr, Product { w: w.ptr, y: y.ptr, m, n, k }, false).unwrap());
                println!("gemv m={m:5} {name:8} {n}x{k}: {gemv:8.1} us ({:6.0} GB/s)", (n * k * 2) as f64 / gemv / 1e3);
            }
            let bytes = (n * k * 2 + m * k * 2 + m * n * 4) as f64;
            let flops = 2.0 * (m * n * k) as f64;
            if m >= 64 {
                for (index, tile) in GEMM_TILES.iter().enumerate().filter(|(i, _)| gpu.tile_takes(*i, k)) {
                    for spread in [Spread::Auto, Spread::Registers] {
                        let us = time(&|| {
                            gpu.gemm_tiled(index, x.ptr, Product { w: w.ptr, y: y.ptr, m, n, k }, false, &split, spread)
                                .unwrap()
                        });
                        println!(
                            "tile m={m:5} {name:8} {} {spread:?}: {us:8.1} us ({:5.0} TFLOP/s)",
                            tile.name,
                            flops / us / 1e6
                        );
                    }
                }
            }
            println!(
                "gemm m={m:5} {name:8} {n}x{k}: invariant {ours:8.1} us ({:6.0} GB/s, {:5.0} TFLOP/s)  cublas {cublas:8.1} us ({:6.0} GB/s, {:5.0} TFLOP/s)",
                bytes / ours / 1e3,
                flops / ours / 1e6,
                bytes / cublas / 1e3,
                flops / cublas / 1e6
            );
        }
    }
}
