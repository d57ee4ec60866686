//! A random draw from one row of logits: temperature, top-k, min-p and top-p as thresholds,
//! then one uniform number walked over the kept tokens in vocabulary order.
//!
//! The GPU's `sample_rows` kernel (src/gpu/kernels/sample.cuh) computes the same integers:
//! each token's weight is `exp((logit - max) * (1 / T))` by ggml's exp polynomial, which both sides
//! compute to the bit, in 32.32 fixed point, and every sum is of integers. Given the same logits
//! and the same uniform number, both pick the same token. Nothing is sorted: a thresholds
//! search and one walk are linear in the vocabulary.
//!
//! What is kept (each limit off at its neutral value):
//! - top-k: tokens whose logit is at least the k-th largest (ties at the k-th all stay);
//! - min-p: tokens whose weight relative to the best is at least `min_p`;
//! - top-p: of those, the tokens at or above the highest logit `t` such that their weights sum
//!   to at least `top_p` of the top-k tokens' weight (ties at `t` all stay).
//!
//! Every input gives a token: a temperature below `MIN_TEMPERATURE` (or not a number) takes the
//! first maximum, as does a row where no kept token has any weight (all logits -inf or NaN, or
//! parameters outside their ranges). On the GPU the first of these never arrives (the sampler
//! sends such rows as greedy, `RowChoice::Greedy`), and the kernel's argmax runs first and
//! stays where nothing has weight, so it agrees.

use super::row::argmax;
pub use crate::backend::{DrawParams, MIN_TEMPERATURE, is_greedy};

/// Fixed-point scale of the weights: 1.0 (the best token's) is 2^32.
const ONE: f32 = 4_294_967_296.0;

/// Each token's relative probability `p = exp((l - max) * (1 / T))` and its fixed-point weight
/// `w = trunc(p * 2^32)`.
fn weights(logits: &[f32], max: f32, temperature: f32) -> (Vec<f32>, Vec<u64>) {
    let inv_t = 1.0 / temperature;
    let mut p: Vec<f32> = logits.iter().map(|&l| (l - max) * inv_t).collect();
    crate::cpu::vmath::ggml_exp_in_place(&mut p);
    let w = p.iter().map(|&x| (x * ONE) as u64).collect();
    (p, w)
}

/// The `k`-th largest logit (1-based).
fn kth_largest(logits: &[f32], k: usize) -> f32 {
    let mut values = logits.to_vec();
    let (_, kth, _) = values.select_nth_unstable_by(k - 1, |a, b| b.total_cmp(a));
    *kth
}

/// Buckets of the top-p search, by logit below the best.
const TOP_P_BUCKETS: usize = 256; // (a bucket's index fits a byte)
/// Temperatures below the best logit that the buckets span: past 23, a weight is below 2^-33 of
/// the best and truncates to 0 (the last bucket takes those).
const TOP_P_SPAN: f32 = 23.0;

/// The highest logit `t` among the candidates whose weights at or above `t` sum to at least
/// `target`; `None` when all of them together fall short. One pass adds the weights up in
/// buckets of logit (each bucket's logits above the next's); only the bucket where the sum
/// reaches the target is sorted. Total: each group of equal logits advances the walk (NaN
/// included, though no candidate is NaN), and a sum that never reaches the target is `None`.
fn top_p_floor(logits: &[f32], w: &[u64], candidates: &[u32], target: u64, max: f32, temperature: f32) -> Option<f32> {
    let per_logit = TOP_P_BUCKETS as f32 / (TOP_P_SPAN * temperature);
    // Monotone in the logit: equal logits share a bucket, higher ones never come later.
    let bucket = |l: f32| (((max - l) * per_logit) as usize).min(TOP_P_BUCKETS - 1);
    let buckets: Vec<u8> = candidates.iter().map(|&c| bucket(logits[c as usize]) as u8).collect();
    let mut mass = [0u64; TOP_P_BUCKETS];
    for (&c, &b) in candidates.iter().zip(&buckets) {
        mass[b as usize] += w[c as usize];
    }
    let mut above = 0u64;
    let crossing = mass.iter().position(|&m| {
        above += m;
        above >= target
    })?;
    above -= mass[crossing];
    let mut inside: Vec<u32> =
        candidates.iter().zip(&buckets).filter(|&(_, &b)| b as usize == crossing).map(|(&c, _)| c).collect();
    inside.sort_by(|a, b| logits[*b as usize].total_cmp(&logits[*a as usize]));
    let mut sum = above;
    let mut i = 0;
    while i < inside.len() {
        let t = logits[inside[i] as usize];
        sum += w[inside[i] as usize];
        i += 1;
        while i < inside.len() && logits[inside[i] as usize] == t {
            sum += w[inside[i] as usize];
            i += 1;
        }
        if sum >= target {
            return Some(t);
        }
    }
    // (The crossing bucket's weights reach the target, so this is not reached.)
    None
}

/// The token that `uniform` (in [0, 1)) picks from `logits` under `params`.
pub fn draw(logits: &[f32], params: &DrawParams, uniform: f32) -> u32 {
    if is_greedy(params.temperature) {
        return argmax(logits);
    }
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let (p, w) = weights(logits, max, params.temperature);
    let k_floor = if params.top_k > 0 && params.top_k < logits.len() {
        kth_largest(logits, params.top_k)
    } else {
        f32::NEG_INFINITY
    };
    let in_k = |i: usize| logits[i] >= k_floor;
    let base = |i: usize| in_k(i) && p[i] >= params.min_p;
    let mut floor = k_floor;
    if params.top_p < 1.0 {
        let top_k_weight: u64 = (0..logits.len()).filter(|&i| in_k(i)).map(|i| w[i]).sum();
        let target = (params.top_p as f64 * top_k_weight as f64).ceil() as u64;
        let candidates: Vec<u32> = (0..logits.len() as u32).filter(|&i| base(i as usize)).collect();
        if let Some(t) = top_p_floor(logits, &w, &candidates, target, max, params.temperature) {
            floor = floor.max(t);
        }
    }
    let kept = |i: usize| base(i) && logits[i] >= floor;
    let total: u64 = (0..logits.len()).filter(|&i| kept(i)).map(|i| w[i]).sum();
    let mut r = (uniform as f64 * total as f64) as u64;
    for i in (0..logits.len()).filter(|&i| kept(i)) {
        if r < w[i] {
            return i as u32;
        }
        r -= w[i];
    }
    // No kept token has weight (r < total otherwise): the row's logits are all -inf or NaN, or
    // the limits are out of range (min-p above 1). The first maximum, as the kernel leaves it.
    argmax(logits)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    fn params(temperature: f32, top_k: usize, top_p: f32, min_p: f32) -> DrawParams {
        DrawParams { temperature, top_k, top_p, min_p }
    }

    /// The kept set by its definition: sorted candidates, cumulative weights.
    fn kept_reference(logits: &[f32], d: &DrawParams) -> Vec<bool> {
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let (p, w) = weights(logits, max, d.temperature);
        let mut sorted: Vec<f32> = logits.to_vec();
        sorted.sort_by(|a, b| b.total_cmp(a));
        let k_floor = if d.top_k > 0 && d.top_k < logits.len() { sorted[d.top_k - 1] } else { f32::NEG_INFINITY };
        let base: Vec<bool> = (0..logits.len()).map(|i| logits[i] >= k_floor && p[i] >= d.min_p).collect();
        let mut floor = k_floor;
        if d.top_p < 1.0 {
            let m: u64 = (0..logits.len()).filter(|&i| logits[i] >= k_floor).map(|i| w[i]).sum();
            let target = (d.top_p as f64 * m as f64).ceil() as u64;
            // Every candidate logit as a threshold, highest first.
            let mut ts: Vec<f32> = (0..logits.len()).filter(|&i| base[i]).map(|i| logits[i]).collect();
            ts.sort_by(|a, b| b.total_cmp(a));
            if let Some(&t) = ts.iter().find(|&&t| {
                (0..logits.len()).filter(|&i| base[i] && logits[i] >= t).map(|i| w[i]).sum::<u64>() >= target
            }) {
                floor = floor.max(t);
            }
        }
        (0..logits.len()).map(|i| base[i] && logits[i] >= floor).collect()
    }

    #[test]
    fn kept_tokens_follow_the_definition_on_random_rows() {
        let mut r = ChaCha8Rng::seed_from_u64(5);
        for case in 0..300 {
            let v = r.random_range(1..700usize);
            // Coarse logits make ties common; fine ones make them rare.
            let step = if case % 2 == 0 { 0.25 } else { 1e-3 };
            let logits: Vec<f32> = (0..v).map(|_| (r.random_range(-40.0f32..40.0) / step).round() * step).collect();
            let d = params(
                r.random_range(0.05f32..3.0),
                [0, 1, 5, 50, 1000][case % 5],
                [1.0, 0.95, 0.5, 0.01][case % 4],
                [0.0, 0.0, 0.05, 0.5][(case / 4) % 4],
            );
            let kept = kept_reference(&logits, &d);
            for _ in 0..20 {
                let id = draw(&logits, &d, r.random::<f32>()) as usize;
                assert!(kept[id], "case {case}: token {id} is not kept under {d:?}");
            }
            assert!(kept.iter().any(|&k| k));
        }
    }

    #[test]
    fn the_walk_matches_the_weights() {
        // Two tokens of weights 1 and 1/2 (temperature 1, logits 0 and -ln 2): a uniform below
        // 2/3 picks the first.
        let logits = [0.0, -std::f32::consts::LN_2];
        let d = params(1.0, 0, 1.0, 0.0);
        assert_eq!(draw(&logits, &d, 0.0), 0);
        assert_eq!(draw(&logits, &d, 0.66), 0);
        assert_eq!(draw(&logits, &d, 0.67), 1);
        assert_eq!(draw(&logits, &d, 0.999_999), 1);
    }

    #[test]
    fn frequencies_follow_the_probabilities() {
        let logits = [1.0, 3.0, 2.0, -1.0, 2.5, 0.5];
        let d = params(0.8, 0, 1.0, 0.0);
        let mut r = ChaCha8Rng::seed_from_u64(9);
        let n = 200_000;
        let mut counts = [0usize; 6];
        for _ in 0..n {
            counts[draw(&logits, &d, r.random::<f32>()) as usize] += 1;
        }
        let z: f64 = logits.iter().map(|&l| ((l - 3.0) as f64 / 0.8).exp()).sum();
        for (i, &c) in counts.iter().enumerate() {
            let want = ((logits[i] - 3.0) as f64 / 0.8).exp() / z;
            assert!((c as f64 / n as f64 - want).abs() < 0.005, "token {i}: {} vs {want}", c as f64 / n as f64);
        }
    }

    #[test]
    fn a_temperature_below_the_floor_is_greedy() {
        // 1e-40 is subnormal: `1 / T` overflows to inf, and the best token's weight was
        // `exp(0 * inf)`, NaN, so the walk found nothing (a panic, before the floor).
        let logits = [1.0, 3.0, 2.0, 3.0, -1.0];
        for t in [1e-40, f32::from_bits(1), 1e-6, 0.0, -0.0] {
            for (top_k, top_p, min_p) in [(0, 1.0, 0.0), (0, 0.5, 0.0), (2, 0.01, 0.5)] {
                assert_eq!(draw(&logits, &params(t, top_k, top_p, min_p), 0.7), 1, "temperature {t:e}");
            }
        }
        // At the floor a draw still happens (the tie at 3.0 splits).
        let ids: std::collections::BTreeSet<u32> =
            (0..100).map(|j| draw(&logits, &params(MIN_TEMPERATURE, 0, 1.0, 0.0), j as f32 / 100.0)).collect();
        assert_eq!(ids, [1, 3].into());
    }

    #[test]
    fn rows_without_weight_take_the_first_maximum() {
        // All -inf (no weight anywhere), +inf (inf - inf is NaN), min-p above 1 (nothing kept).
        assert_eq!(draw(&[f32::NEG_INFINITY; 4], &params(1.0, 0, 0.9, 0.0), 0.5), 0);
        assert_eq!(draw(&[0.0, f32::INFINITY, 1.0], &params(1.0, 0, 0.5, 0.0), 0.5), 1);
        assert_eq!(draw(&[0.0, 2.0, 1.0], &params(1.0, 0, 1.0, 1.5), 0.5), 1);
        // The largest uniform below 1 stays inside the kept weight.
        assert_eq!(draw(&[0.0, 0.0], &params(1.0, 0, 1.0, 0.0), 1.0 - f32::EPSILON / 2.0), 1);
    }

    #[test]
    fn limits_cut_the_tail() {
        let logits = [1.0, 3.0, 2.0, -1.0, 2.5, 0.5];
        let kept = |d: DrawParams| -> Vec<u32> {
            let mut ids: Vec<u32> = (0..1000).map(|j| draw(&logits, &d, j as f32 / 1000.0)).collect();
            ids.sort();
            ids.dedup();
            ids
        };
        assert_eq!(kept(params(1.0, 2, 1.0, 0.0)), vec![1, 4]);
        assert_eq!(kept(params(1.0, 0, 0.01, 0.0)), vec![1]);
        // exp(-0.5) = 0.61 and exp(-1) = 0.37 of the best: min-p 0.5 keeps two.
        assert_eq!(kept(params(1.0, 0, 1.0, 0.5)), vec![1, 4]);
        assert_eq!(kept(params(1.0, 0, 1.0, 0.0)), vec![0, 1, 2, 3, 4, 5]);
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        /// Logits as rows meet them, and at the extremes: ties, huge, infinite, subnormal, NaN.
        fn logit() -> impl Strategy<Value = f32> {
            let special = [
                f32::MAX,
                f32::MIN,
                1e30,
                -1e30,
                f32::INFINITY,
                f32::NEG_INFINITY,
                0.0,
                -0.0,
                f32::from_bits(1),
                -f32::from_bits(1),
                f32::NAN,
            ];
            prop_oneof![
                4 => -40.0f32..40.0,
                2 => (-8i32..8).prop_map(|x| x as f32),
                1 => proptest::sample::select(special.to_vec()),
                1 => proptest::num::f32::ANY,
            ]
        }

        fn row() -> impl Strategy<Value = Vec<f32>> {
            prop_oneof![
                6 => proptest::collection::vec(logit(), 1..200),
                // One value throughout (all -inf, all equal, ...).
                1 => (1usize..100, logit()).prop_map(|(n, x)| vec![x; n]),
                // One token not -inf.
                1 => (1usize..100, 0usize..100, logit()).prop_map(|(n, i, x)| {
                    let mut row = vec![f32::NEG_INFINITY; n];
                    row[i % n] = x;
                    row
                }),
            ]
        }

        /// From 0 to 2, subnormals and the floor's neighbourhood included.
        fn temperature() -> impl Strategy<Value = f32> {
            prop_oneof![
                Just(0.0f32),
                Just(MIN_TEMPERATURE),
                Just(f32::from_bits(MIN_TEMPERATURE.to_bits() - 1)),
                Just(2.0),
                (1u32..0x0080_0000).prop_map(f32::from_bits),
                1e-40f32..MIN_TEMPERATURE,
                MIN_TEMPERATURE..=2.0f32,
            ]
        }

        fn draw_params() -> impl Strategy<Value = DrawParams> {
            let top_k = prop_oneof![Just(0usize), Just(1), 1usize..300, Just(usize::MAX)];
            let top_p = prop_oneof![Just(1.0f32), Just(f32::MIN_POSITIVE), Just(f32::from_bits(1)), 1e-30f32..=1.0];
            let min_p = prop_oneof![Just(0.0f32), Just(1.0), Just(f32::from_bits(1)), 0.0f32..=1.0];
            (temperature(), top_k, top_p, min_p).prop_map(|(temperature, top_k, top_p, min_p)| DrawParams {
                temperature,
                top_k,
                top_p,
                min_p,
            })
        }

        fn uniform() -> impl Strategy<Value = f32> {
            prop_oneof![Just(0.0f32), Just(1.0 - f32::EPSILON / 2.0), 0.0f32..1.0]
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(3000))]

            /// Any row and limits give a token of the row: the first maximum below the
            /// temperature floor or where no kept token has weight, else a kept token of
            /// positive weight (the definition's).
            #[test]
            fn every_row_gives_a_token_the_definition_keeps(logits in row(), d in draw_params(), u in uniform()) {
                let id = draw(&logits, &d, u) as usize;
                prop_assert!(id < logits.len());
                if d.temperature < MIN_TEMPERATURE {
                    prop_assert_eq!(id, argmax(&logits) as usize);
                } else {
                    let kept = kept_reference(&logits, &d);
                    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    let (_, w) = weights(&logits, max, d.temperature);
                    if (0..logits.len()).any(|i| kept[i] && w[i] > 0) {
                        prop_assert!(kept[id] && w[id] > 0, "token {} (weight {}) under {:?}", id, w[id], d);
                    } else {
                        prop_assert_eq!(id, argmax(&logits) as usize);
                    }
                }
            }
        }
    }
}
