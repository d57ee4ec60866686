//! Turning one row of logits into the next token, per request: penalties, logit bias,
//! temperature, top-k / top-p / min-p, and a generator seeded per request (never shared), so a
//! seeded request samples the same tokens whatever else runs beside it.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

pub use crate::backend::RowChoice;
use crate::backend::{DrawParams, is_greedy};
use crate::cpu::draw::draw;
pub use crate::cpu::row::{argmax, log_sum_exp, top_k_indices};

#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy, as does anything below `backend::MIN_TEMPERATURE`.
    pub temperature: f32,
    /// 0 disables.
    pub top_k: usize,
    /// 1.0 disables.
    pub top_p: f32,
    /// 0.0 disables.
    pub min_p: f32,
    /// 1.0 disables; > 1 discourages tokens already in prompt or output.
    pub repetition_penalty: f32,
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    /// Added to the logit of each listed token.
    pub logit_bias: Vec<(u32, f32)>,
    pub seed: Option<u64>,
    pub max_tokens: usize,
    /// Extra tokens that end the request (besides the model's end-of-sequence tokens).
    pub stop_token_ids: Vec<u32>,
    pub ignore_eos: bool,
    /// Alternatives to report with each token's logprob (0 = only the chosen token's).
    pub top_logprobs: usize,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            logit_bias: Vec::new(),
            seed: None,
            max_tokens: 16,
            stop_token_ids: Vec::new(),
            ignore_eos: false,
            top_logprobs: 0,
        }
    }
}

impl SamplingParams {
    pub fn greedy(max_tokens: usize) -> Self {
        Self { max_tokens, ..Self::default() }
    }

    /// Checks ranges; the message names the offending field.
    pub fn validate(&self) -> Result<(), String> {
        let finite =
            |name: &str, v: f32| if v.is_finite() { Ok(()) } else { Err(format!("{name} must be a finite number")) };
        finite("temperature", self.temperature)?;
        finite("top_p", self.top_p)?;
        finite("min_p", self.min_p)?;
        finite("repetition_penalty", self.repetition_penalty)?;
        finite("presence_penalty", self.presence_penalty)?;
        finite("frequency_penalty", self.frequency_penalty)?;
        if self.temperature < 0.0 {
            return Err(format!("temperature must be >= 0, got {}", self.temperature));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(format!("top_p must be in (0, 1], got {}", self.top_p));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return Err(format!("min_p must be in [0, 1], got {}", self.min_p));
        }
        if self.repetition_penalty <= 0.0 {
            return Err(format!("repetition_penalty must be > 0, got {}", self.repetition_penalty));
        }
        if !(-2.0..=2.0).contains(&self.presence_penalty) {
            return Err(format!("presence_penalty must be in [-2, 2], got {}", self.presence_penalty));
        }
        if !(-2.0..=2.0).contains(&self.frequency_penalty) {
            return Err(format!("frequency_penalty must be in [-2, 2], got {}", self.frequency_penalty));
        }
        if self.logit_bias.iter().any(|(_, b)| !b.is_finite()) {
            return Err("logit_bias values must be finite numbers".into());
        }
        Ok(())
    }
}

/// The chosen token with its log-probability and the top alternatives, all taken from the
/// model's distribution after penalties and bias but before temperature and truncation.
#[derive(Debug, Clone, PartialEq)]
pub struct SampledToken {
    pub id: u32,
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

/// Per-request sampling state.
pub struct Sampler {
    params: SamplingParams,
    rng: ChaCha8Rng,
    /// Occurrences of each token among prompt and output (for penalties), sparse.
    counts: std::collections::HashMap<u32, (u32, bool)>,
}

impl Sampler {
    pub fn new(params: SamplingParams, prompt: &[u32]) -> Self {
        let rng = match params.seed {
            Some(seed) => ChaCha8Rng::seed_from_u64(seed),
            None => ChaCha8Rng::from_rng(&mut rand::rng()),
        };
        let mut sampler = Self { params, rng, counts: Default::default() };
        if sampler.params.repetition_penalty != 1.0 {
            for &t in prompt {
                sampler.counts.entry(t).or_insert((0, true));
            }
        }
        sampler
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Records a generated token (for the penalties).
    pub fn observe(&mut self, id: u32) {
        let entry = self.counts.entry(id).or_insert((0, false));
        entry.0 += 1;
    }

    fn adjust(&self, logits: &mut [f32]) {
        let p = &self.params;
        for (&id, &(generated, _)) in &self.counts {
            let Some(l) = logits.get_mut(id as usize) else { continue };
            if p.repetition_penalty != 1.0 {
                *l = if *l > 0.0 { *l / p.repetition_penalty } else { *l * p.repetition_penalty };
            }
            if generated > 0 {
                *l -= p.presence_penalty + p.frequency_penalty * generated as f32;
            }
        }
        for &(id, bias) in &p.logit_bias {
            if let Some(l) = logits.get_mut(id as usize) {
                *l += bias;
            }
        }
    }

    /// Picks the next token from one row of logits (modified in place).
    pub fn sample(&mut self, logits: &mut [f32]) -> SampledToken {
        self.adjust(logits);
        let logsumexp = log_sum_exp(logits);
        let logprob = |id: u32| logits[id as usize] - logsumexp;
        let top = if self.params.top_logprobs > 0 {
            top_k_indices(logits, self.params.top_logprobs).into_iter().map(|i| (i, logprob(i))).collect()
        } else {
            Vec::new()
        };
        let id = if self.greedy() { argmax(logits) } else { self.sample_random(logits) };
        SampledToken { id, logprob: logprob(id), top }
    }

    /// Whether the temperature is below the floor where sampling means anything (0 included).
    fn greedy(&self) -> bool {
        is_greedy(self.params.temperature)
    }

    fn sample_random(&mut self, logits: &[f32]) -> u32 {
        let uniform = self.rng.random::<f32>();
        draw(logits, &self.draw_params(), uniform)
    }

    fn draw_params(&self) -> DrawParams {
        let p = &self.params;
        DrawParams { temperature: p.temperature, top_k: p.top_k, top_p: p.top_p, min_p: p.min_p }
    }

    /// Whether a backend that samples on its own device can pick this request's next token:
    /// no penalties, bias or alternatives to report (its logits reach the draw unchanged).
    pub fn samples_anywhere(&self) -> bool {
        let p = &self.params;
        p.repetition_penalty == 1.0
            && p.presence_penalty == 0.0
            && p.frequency_penalty == 0.0
            && p.logit_bias.is_empty()
            && p.top_logprobs == 0
    }

    /// Who picks the next token where the backend can pick on its device: the device, given
    /// the parameters and this request's next uniform number (taken from its generator as
    /// `sample` would take it), unless the logits must reach the host's sampler.
    pub fn row_choice(&mut self) -> RowChoice {
        if !self.samples_anywhere() {
            return RowChoice::Host;
        }
        if self.greedy() {
            return RowChoice::Greedy;
        }
        let uniform = self.rng.random::<f32>();
        RowChoice::Random { params: self.draw_params(), uniform }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::MIN_TEMPERATURE;

    fn logits() -> Vec<f32> {
        vec![1.0, 3.0, 2.0, -1.0, 3.0, 0.5]
    }

    #[test]
    fn greedy_takes_the_first_maximum() {
        let mut s = Sampler::new(SamplingParams::greedy(1), &[]);
        let t = s.sample(&mut logits());
        assert_eq!(t.id, 1);
        assert!((t.logprob - (3.0 - log_sum_exp(&logits()))).abs() < 1e-6);
    }

    #[test]
    fn top_logprobs_are_sorted_and_normalised() {
        let params = SamplingParams { top_logprobs: 3, ..SamplingParams::greedy(1) };
        let t = Sampler::new(params, &[]).sample(&mut logits());
        let ids: Vec<u32> = t.top.iter().map(|x| x.0).collect();
        assert_eq!(ids, vec![1, 4, 2]);
        let total: f32 = logits().iter().map(|&l| (l - log_sum_exp(&logits())).exp()).sum();
        assert!((total - 1.0).abs() < 1e-5);
    }

    #[test]
    fn seeded_sampling_repeats_and_respects_top_k() {
        let params = SamplingParams { temperature: 1.0, top_k: 2, seed: Some(42), ..SamplingParams::default() };
        let draw = || {
            let mut s = Sampler::new(params.clone(), &[]);
            (0..50).map(|_| s.sample(&mut logits()).id).collect::<Vec<_>>()
        };
        let a = draw();
        assert_eq!(a, draw());
        assert!(a.iter().all(|&id| id == 1 || id == 4));
        assert!(a.contains(&1) && a.contains(&4));
    }

    #[test]
    fn min_p_and_top_p_cut_the_tail() {
        let params = SamplingParams { temperature: 1.0, min_p: 0.5, seed: Some(1), ..SamplingParams::default() };
        let mut s = Sampler::new(params, &[]);
        for _ in 0..100 {
            let id = s.sample(&mut logits()).id;
            assert!(id == 1 || id == 4, "min_p kept token {id}");
        }
        // Tokens 1 and 4 tie for the best logit: a threshold keeps both.
        let params = SamplingParams { temperature: 1.0, top_p: 0.01, seed: Some(1), ..SamplingParams::default() };
        let mut s = Sampler::new(params, &[]);
        let ids: std::collections::BTreeSet<u32> = (0..100).map(|_| s.sample(&mut logits()).id).collect();
        assert_eq!(ids, [1, 4].into());
        let mut row = logits();
        row[4] = 2.9;
        let params = SamplingParams { temperature: 1.0, top_p: 0.01, seed: Some(1), ..SamplingParams::default() };
        let mut s = Sampler::new(params, &[]);
        for _ in 0..20 {
            assert_eq!(s.sample(&mut row.clone()).id, 1);
        }
    }

    #[test]
    fn penalties_and_bias_change_the_choice() {
        let params = SamplingParams { logit_bias: vec![(3, 10.0)], ..SamplingParams::greedy(1) };
        assert_eq!(Sampler::new(params, &[]).sample(&mut logits()).id, 3);
        let params = SamplingParams { presence_penalty: 2.0, ..SamplingParams::greedy(1) };
        let mut s = Sampler::new(params, &[]);
        s.observe(1);
        assert_eq!(s.sample(&mut logits()).id, 4);
        let params = SamplingParams { repetition_penalty: 2.0, ..SamplingParams::greedy(1) };
        let mut s = Sampler::new(params, &[1, 4]);
        assert_eq!(s.sample(&mut logits()).id, 2);
    }

    #[test]
    fn temperatures_below_the_floor_are_greedy_on_host_and_device() {
        // 1e-40 made `1 / T` overflow and the draw panic (the engine thread with it); the
        // device's draw got the same parameters.
        for temperature in [1e-40, f32::from_bits(1), 9.99e-6] {
            let params = SamplingParams { temperature, top_p: 0.5, seed: Some(3), ..SamplingParams::default() };
            let mut s = Sampler::new(params.clone(), &[]);
            assert_eq!(s.sample(&mut logits()).id, 1);
            assert_eq!(Sampler::new(params.clone(), &[]).row_choice(), RowChoice::Greedy);
            let with_logprobs = SamplingParams { top_logprobs: 20, ..params };
            let t = Sampler::new(with_logprobs, &[]).sample(&mut logits());
            assert_eq!((t.id, t.top.len()), (1, 6));
            assert!(t.logprob.is_finite());
        }
        let at_floor = SamplingParams { temperature: MIN_TEMPERATURE, seed: Some(3), ..SamplingParams::default() };
        assert!(matches!(Sampler::new(at_floor, &[]).row_choice(), RowChoice::Random { .. }));
    }

    #[test]
    fn a_bias_of_minus_100_on_every_token_but_one_leaves_that_one() {
        let row: Vec<f32> = (0..1000).map(|i| ((i * 37) % 101) as f32 * 0.3 - 15.0).collect();
        let logit_bias: Vec<(u32, f32)> = (0..1000).filter(|&i| i != 417).map(|i| (i, -100.0)).collect();
        for temperature in [0.0, 1e-40, 0.7, 2.0] {
            let params = SamplingParams {
                temperature,
                top_p: 0.5,
                logit_bias: logit_bias.clone(),
                top_logprobs: 5,
                seed: Some(i64::MIN as u64),
                ..SamplingParams::default()
            };
            let mut s = Sampler::new(params, &[]);
            for _ in 0..5 {
                let t = s.sample(&mut row.clone());
                assert_eq!(t.id, 417, "temperature {temperature}");
                assert!(t.logprob.is_finite() && t.logprob <= 0.0);
            }
        }
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        /// Rows of a model's scale: ordinary, tied, one apart from the rest.
        fn row() -> impl Strategy<Value = Vec<f32>> {
            prop_oneof![
                proptest::collection::vec(-30.0f32..30.0, 1..300),
                proptest::collection::vec((-4i32..4).prop_map(|x| x as f32), 1..300),
                (1usize..300, -30.0f32..30.0).prop_map(|(n, x)| vec![x; n]),
            ]
        }

        /// From 0 to 2, subnormals and the floor's neighbourhood included.
        fn temperature() -> impl Strategy<Value = f32> {
            prop_oneof![
                Just(0.0f32),
                Just(MIN_TEMPERATURE),
                Just(f32::from_bits(MIN_TEMPERATURE.to_bits() - 1)),
                (1u32..0x0080_0000).prop_map(f32::from_bits),
                1e-40f32..MIN_TEMPERATURE,
                ends(MIN_TEMPERATURE, 2.0),
            ]
        }

        fn ends(lo: f32, hi: f32) -> impl Strategy<Value = f32> {
            prop_oneof![Just(lo), Just(hi), lo..=hi]
        }

        /// Every parameter within what validation lets through, ends included.
        fn params() -> impl Strategy<Value = SamplingParams> {
            let bias = proptest::collection::vec(
                (0u32..400, prop_oneof![Just(-100.0f32), Just(100.0), -100.0f32..=100.0]),
                0..300,
            );
            let top_p = prop_oneof![
                Just(f32::MIN_POSITIVE),
                Just(1e-30f32),
                ends(0.0, 1.0).prop_filter("top_p > 0", |&p| p > 0.0)
            ];
            let top_k = prop_oneof![Just(0usize), Just(1), 1usize..400, Just(usize::MAX)];
            let seed = prop_oneof![Just(i64::MIN), Just(i64::MAX), Just(-1), any::<i64>()].prop_map(|s| Some(s as u64));
            (
                (temperature(), top_k, top_p, ends(0.0, 1.0)),
                (ends(0.01, 10.0), ends(-2.0, 2.0), ends(-2.0, 2.0), bias),
                (seed, 0usize..=20),
            )
                .prop_map(
                    |(
                        (temperature, top_k, top_p, min_p),
                        (repetition_penalty, presence_penalty, frequency_penalty, mut logit_bias),
                        (seed, top_logprobs),
                    )| {
                        logit_bias.sort_by_key(|b| b.0);
                        logit_bias.dedup_by_key(|b| b.0);
                        SamplingParams {
                            temperature,
                            top_k,
                            top_p,
                            min_p,
                            repetition_penalty,
                            presence_penalty,
                            frequency_penalty,
                            logit_bias,
                            seed,
                            top_logprobs,
                            ..SamplingParams::default()
                        }
                    },
                )
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(1500))]

            /// Whatever validation accepts samples a token of the row for every step, with
            /// finite log-probabilities, on the host and in the device's choice alike.
            #[test]
            fn every_valid_request_samples_a_token(row in row(), params in params(), prompt in proptest::collection::vec(0u32..400, 0..50), steps in 1usize..6) {
                prop_assert!(params.validate().is_ok());
                let greedy = params.temperature < MIN_TEMPERATURE;
                let mut s = Sampler::new(params.clone(), &prompt);
                for _ in 0..steps {
                    let mut logits = row.clone();
                    let t = s.sample(&mut logits);
                    prop_assert!((t.id as usize) < row.len());
                    if greedy {
                        prop_assert_eq!(t.id, argmax(&logits));
                    }
                    prop_assert!(t.logprob.is_finite() && t.logprob <= 1e-4, "logprob {}", t.logprob);
                    prop_assert_eq!(t.top.len(), params.top_logprobs.min(row.len()));
                    prop_assert!(t.top.iter().all(|&(id, lp)| (id as usize) < row.len() && lp.is_finite()));
                    match s.row_choice() {
                        RowChoice::Greedy => prop_assert!(greedy),
                        RowChoice::Random { params: d, uniform } => prop_assert!(!greedy && d.temperature >= MIN_TEMPERATURE && (0.0..1.0).contains(&uniform)),
                        RowChoice::Host => prop_assert!(!s.samples_anywhere()),
                    }
                    s.observe(t.id);
                }
            }
        }
    }

    #[test]
    fn validation_names_the_field() {
        let bad = SamplingParams { temperature: -1.0, ..SamplingParams::default() };
        assert!(bad.validate().unwrap_err().contains("temperature"));
        let bad = SamplingParams { top_p: 0.0, ..SamplingParams::default() };
        assert!(bad.validate().unwrap_err().contains("top_p"));
        let bad = SamplingParams { min_p: 1.5, ..SamplingParams::default() };
        assert!(bad.validate().unwrap_err().contains("min_p"));
    }
}
