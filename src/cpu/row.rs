//! Plain math over one row of logits: its first maximum, its log-sum-exp (log-probabilities)
//! and its largest entries (alternatives for logprobs).

pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in logits.iter().enumerate() {
        if x > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// `ln(sum(exp(x)))`, with the exponentials vectorised (one per vocabulary entry per token)
/// and summed in f64 lanes.
pub fn log_sum_exp(logits: &[f32]) -> f32 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut shifted: Vec<f32> = logits.iter().map(|&x| x - max).collect();
    crate::cpu::vmath::exp_in_place(&mut shifted);
    let mut lanes = [0f64; 8];
    let mut chunks = shifted.chunks_exact(8);
    for chunk in &mut chunks {
        for (lane, &x) in lanes.iter_mut().zip(chunk) {
            *lane += x as f64;
        }
    }
    let sum = chunks.remainder().iter().fold(lanes.iter().sum::<f64>(), |s, &x| s + x as f64);
    max + sum.ln() as f32
}

/// Most alternatives `top_k_indices` finds in one pass (OpenAI's `top_logprobs` allows 20).
const SMALL_K: usize = 32;

/// Indices of the `k` largest values, largest first, lower index first among equals.
pub fn top_k_indices(values: &[f32], k: usize) -> Vec<u32> {
    let by_value = |a: &u32, b: &u32| values[*b as usize].total_cmp(&values[*a as usize]).then(a.cmp(b));
    if k > 0 && k <= SMALL_K && k < values.len() {
        // A few alternatives (logprobs): one pass keeping the best k in order.
        let mut best: Vec<u32> = (0..k as u32).collect();
        best.sort_by(by_value);
        for i in k as u32..values.len() as u32 {
            // Later indices lose ties, so only a strictly larger value gets in.
            if values[i as usize].total_cmp(&values[best[k - 1] as usize]).is_gt() {
                let at = best.partition_point(|b| by_value(b, &i).is_lt());
                best.insert(at, i);
                best.pop();
            }
        }
        return best;
    }
    let mut idx: Vec<u32> = (0..values.len() as u32).collect();
    if k < idx.len() {
        idx.select_nth_unstable_by(k, by_value);
        idx.truncate(k);
    }
    idx.sort_by(by_value);
    idx
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    #[test]
    fn top_k_indices_one_pass_equals_the_full_sort() {
        let mut r = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        for case in 0..200 {
            let n = r.random_range(1..300usize);
            // Coarse values: many ties, which the lower index wins.
            let values: Vec<f32> = (0..n)
                .map(|_| (r.random_range(-8.0f32..8.0) * if case % 2 == 0 { 1.0 } else { 100.0 }).round())
                .collect();
            let mut sorted: Vec<u32> = (0..n as u32).collect();
            sorted.sort_by(|a, b| values[*b as usize].total_cmp(&values[*a as usize]).then(a.cmp(b)));
            for k in [1, 2, 5, 20, 32] {
                let want: Vec<u32> = sorted.iter().copied().take(k).collect();
                assert_eq!(top_k_indices(&values, k), want, "case {case} k {k}");
            }
        }
    }
}
