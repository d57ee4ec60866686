//! The device's token choices (kernels/sample.cuh, runner.rs): random draws against draw.rs,
//! and a step mixing device and host rows. They need a GPU and pass vacuously, saying so, where
//! none is found.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::runtime::available;
use super::tests::{gpu, read};
use crate::backend::FlatBatch;
use crate::launch;

/// Random draws on the device pick draw.rs's token for the same logits, parameters and
/// uniform number (the same integers on both sides), and greedy rows keep the argmax: rows of
/// odd vocabularies, coarse logits (many ties) and fine ones, every limit alone and together.
#[test]
fn sample_rows_match_the_cpu_draw() {
    use crate::backend::DrawParams;
    use crate::backend::RowChoice;
    use crate::cpu::draw::draw;
    use crate::cpu::row::{argmax, log_sum_exp};
    let Some(gpu) = gpu() else { return };
    let mut r = ChaCha8Rng::seed_from_u64(29);
    let mut drawn = 0;
    let mut failures = Vec::new();
    // Row counts that give the rows clusters of 8, 4, 2 and 1 blocks (on 132 multiprocessors).
    for (vocab, rows) in
        [(1usize, 24usize), (7, 150), (1000, 24), (1000, 60), (4099, 1), (4099, 3), (49_157, 24), (49_157, 150)]
    {
        let mut logits = Vec::with_capacity(rows * vocab);
        for row in 0..rows {
            let step = [0.5f32, 1e-3][row % 2];
            logits.extend((0..vocab).map(|_| (r.random_range(-12.0f32..12.0) / step).round() * step));
        }
        let draws: Vec<RowChoice> = (0..rows)
            .map(|row| match row % 9 {
                8 if row % 2 == 0 => RowChoice::Greedy,
                8 => RowChoice::Host, // greedy on the device (the host reads the logits)
                k => RowChoice::Random {
                    params: DrawParams {
                        temperature: [0.3f32, 1.0, 2.5][row % 3],
                        top_k: if k & 1 != 0 { [1, 3, 40, 5000][row % 4] } else { 0 },
                        top_p: if k & 2 != 0 { [0.9f32, 0.5, 0.05][row % 3] } else { 1.0 },
                        min_p: if k & 4 != 0 { [0.05f32, 0.3][row % 2] } else { 0.0 },
                    },
                    uniform: r.random::<f32>(),
                },
            })
            .collect();
        let (words, random) = super::runner::draw_words(&draws, rows);
        assert!(random);
        let ld = gpu.upload(&logits).unwrap();
        let dd = gpu.upload(&words).unwrap();
        let chosen = gpu.alloc::<u32>(2 * rows).unwrap();
        let parts = gpu.alloc::<u64>(2 * rows * 16).unwrap();
        let counters = gpu.alloc_zeroed::<u32>(rows).unwrap();
        launch!(&gpu, &gpu.k.argmax_logprob, (rows as u32, 16, 1), 1024; ld.ptr, vocab as i32, chosen.ptr, chosen.at(rows), parts.ptr, counters.ptr).unwrap();
        gpu.sample_rows(ld.ptr, vocab, dd.ptr, chosen.ptr, chosen.at(rows), rows).unwrap();
        let got = read(&gpu, &chosen, 2 * rows);
        for (t, d) in draws.iter().enumerate() {
            let row = &logits[t * vocab..(t + 1) * vocab];
            let want = match d {
                RowChoice::Greedy | RowChoice::Host => argmax(row),
                RowChoice::Random { params, uniform } => {
                    drawn += 1;
                    draw(row, params, *uniform)
                }
            };
            if got[t] != want {
                failures.push(format!("vocab {vocab} rows {rows} row {t}: {} vs {want} {d:?}", got[t]));
                continue;
            }
            let lp = row[want as usize] - log_sum_exp(row);
            let glp = f32::from_bits(got[rows + t]);
            assert!((glp - lp).abs() <= 1e-4 * lp.abs().max(1.0), "vocab {vocab} row {t}: logprob {glp} vs {lp}");
        }
    }
    assert!(failures.is_empty(), "{} of {drawn} draws differ:\n{}", failures.len(), failures.join("\n"));
    assert!(drawn > 100);
}

/// One step mixing rows the device chooses (greedy, a draw) with a row whose logits come back
/// for the host's sampler: the same prompt in three sequences gives the same token three ways
/// (a draw keeping only the top token), and the host row's logits are whole.
#[test]
fn a_step_mixes_device_choices_and_host_rows() {
    use crate::backend::DrawParams;
    use crate::backend::RowChoice;
    use crate::backend::RowOutput;
    use crate::cpu::row::argmax;
    if !available() {
        eprintln!("no CUDA device: skipped");
        return;
    }
    let gpu = std::sync::Arc::new(super::Gpu::new(0, super::GemmKind::Cublas).expect("the CUDA device opens"));
    let preset = crate::model::presets::preset("smollm2-135m").unwrap();
    let weights = std::sync::Arc::new(super::CudaWeights::dummy(gpu, &preset, 0).unwrap());
    let mut runner = super::CudaRunner::new(std::sync::Arc::clone(&weights), 3, 16, 64, 64).unwrap();
    let prompt = [5u32, 900, 17, 4242, 31];
    let mut batch = FlatBatch::default();
    for s in 0..3u32 {
        batch.push(&prompt, prompt.len(), vec![s], true);
    }
    let top_one = DrawParams { temperature: 1.0, top_k: 1, top_p: 1.0, min_p: 0.0 };
    let choices = [RowChoice::Greedy, RowChoice::Host, RowChoice::Random { params: top_one, uniform: 0.5 }];
    let out = runner.forward(&batch, Some(&choices)).unwrap();
    assert_eq!(out.len(), 3);
    let (RowOutput::Chosen(greedy, _), RowOutput::Logits(row), RowOutput::Chosen(drawn, _)) =
        (&out[0], &out[1], &out[2])
    else {
        panic!("the device chooses rows 0 and 2 and returns row 1's logits");
    };
    assert_eq!(row.len(), weights.vocab_size);
    assert!(row.iter().all(|x| x.is_finite()));
    assert_eq!(argmax(row), *greedy);
    assert_eq!(drawn, greedy);
    // A decode step (through its CUDA graph), the host's row elsewhere.
    let mut batch = FlatBatch::default();
    for s in 0..3u32 {
        batch.push(&[*greedy], prompt.len() + 1, vec![s], true);
    }
    let choices = [RowChoice::Random { params: top_one, uniform: 0.9 }, RowChoice::Greedy, RowChoice::Host];
    let out = runner.forward(&batch, Some(&choices)).unwrap();
    let (RowOutput::Chosen(drawn, _), RowOutput::Chosen(greedy, _), RowOutput::Logits(row)) =
        (&out[0], &out[1], &out[2])
    else {
        panic!("the device chooses rows 0 and 1 and returns row 2's logits");
    };
    assert_eq!(argmax(row), *greedy);
    assert_eq!(drawn, greedy);
}
