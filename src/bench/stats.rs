//! Serving metrics from client-side timings, as `vllm bench serve` defines them: TTFT, TPOT =
//! (e2e - ttft) / (tokens - 1), ITL (gaps between streamed chunks), end-to-end latency;
//! throughput; goodput under latency SLOs.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// One request as the client saw it. Times in seconds from the start of the run.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct RequestRecord {
    /// HTTP status (0: no response).
    pub status: u16,
    pub error: Option<String>,
    pub start: f64,
    pub ttft: Option<f64>,
    pub e2e: f64,
    pub prompt_tokens: usize,
    pub output_tokens: usize,
    /// Gaps between successive streamed chunks that carried text.
    pub itl: Vec<f64>,
    /// Multi-turn: the turn's index within its session (0 = first).
    pub turn: Option<usize>,
}

impl RequestRecord {
    pub fn ok(&self) -> bool {
        self.status == 200 && self.error.is_none()
    }

    pub fn tpot(&self) -> Option<f64> {
        match (self.ttft, self.output_tokens) {
            (Some(ttft), n) if n > 1 => Some((self.e2e - ttft) / (n - 1) as f64),
            _ => None,
        }
    }

    /// Builds a record from chunk arrival times (seconds since the request was sent).
    pub fn from_stream(start: f64, chunk_times: &[f64], end: f64, output_tokens: usize, prompt_tokens: usize) -> Self {
        Self {
            status: 200,
            error: None,
            start,
            ttft: chunk_times.first().copied(),
            e2e: end,
            prompt_tokens,
            output_tokens,
            itl: chunk_times.windows(2).map(|w| w[1] - w[0]).collect(),
            turn: None,
        }
    }
}

/// Mean and percentiles, in milliseconds.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Distribution {
    pub mean: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub count: usize,
}

/// Linear-interpolated percentile (numpy's default) of sorted values.
pub fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = q / 100.0 * (sorted.len() - 1) as f64;
    let (lo, hi) = (rank.floor() as usize, rank.ceil() as usize);
    sorted[lo] + (sorted[hi] - sorted[lo]) * (rank - lo as f64)
}

impl Distribution {
    /// From values in seconds.
    pub fn of(values: impl IntoIterator<Item = f64>) -> Self {
        let mut v: Vec<f64> = values.into_iter().map(|s| s * 1000.0).collect();
        v.sort_by(f64::total_cmp);
        if v.is_empty() {
            return Self::default();
        }
        Self {
            mean: v.iter().sum::<f64>() / v.len() as f64,
            p50: percentile(&v, 50.0),
            p90: percentile(&v, 90.0),
            p99: percentile(&v, 99.0),
            count: v.len(),
        }
    }
}

/// Latency targets a request must meet to count toward goodput (milliseconds).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Slo {
    pub ttft_ms: Option<f64>,
    pub tpot_ms: Option<f64>,
}

impl Slo {
    /// Parses `ttft=MS,tpot=MS` (either part optional).
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut slo = Slo::default();
        for part in text.split(',').filter(|p| !p.is_empty()) {
            let (key, value) = part.split_once('=').ok_or_else(|| format!("'{part}': expected key=milliseconds"))?;
            let ms: f64 = value.parse().map_err(|_| format!("'{value}' is not a number of milliseconds"))?;
            match key {
                "ttft" => slo.ttft_ms = Some(ms),
                "tpot" => slo.tpot_ms = Some(ms),
                other => return Err(format!("unknown SLO '{other}' (ttft, tpot)")),
            }
        }
        Ok(slo)
    }

    pub fn met_by(&self, r: &RequestRecord) -> bool {
        let ttft_ok = self.ttft_ms.is_none_or(|max| r.ttft.is_some_and(|t| t * 1000.0 <= max));
        let tpot_ok = self.tpot_ms.is_none_or(|max| r.tpot().is_none_or(|t| t * 1000.0 <= max));
        r.ok() && ttft_ok && tpot_ok
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct RunMetrics {
    pub completed: usize,
    pub failed: usize,
    /// Failures by HTTP status ("0" for no response).
    pub errors: BTreeMap<String, usize>,
    pub duration_s: f64,
    pub request_throughput: f64,
    pub output_throughput: f64,
    pub total_token_throughput: f64,
    pub goodput: Option<f64>,
    pub total_input_tokens: usize,
    pub total_output_tokens: usize,
    pub ttft_ms: Distribution,
    pub tpot_ms: Distribution,
    pub itl_ms: Distribution,
    pub e2e_ms: Distribution,
    /// Multi-turn runs: TTFT of each turn index.
    pub ttft_by_turn_ms: Vec<Distribution>,
}

impl RunMetrics {
    pub fn compute(records: &[RequestRecord], duration_s: f64, slo: Option<&Slo>) -> Self {
        let ok: Vec<&RequestRecord> = records.iter().filter(|r| r.ok()).collect();
        let mut errors = BTreeMap::new();
        for r in records.iter().filter(|r| !r.ok()) {
            *errors.entry(r.status.to_string()).or_insert(0) += 1;
        }
        let input: usize = ok.iter().map(|r| r.prompt_tokens).sum();
        let output: usize = ok.iter().map(|r| r.output_tokens).sum();
        let per_s = |x: f64| if duration_s > 0.0 { x / duration_s } else { 0.0 };
        let turns = ok.iter().filter_map(|r| r.turn).max().map_or(0, |t| t + 1);
        Self {
            completed: ok.len(),
            failed: records.len() - ok.len(),
            errors,
            duration_s,
            request_throughput: per_s(ok.len() as f64),
            output_throughput: per_s(output as f64),
            total_token_throughput: per_s((input + output) as f64),
            goodput: slo.map(|s| per_s(ok.iter().filter(|r| s.met_by(r)).count() as f64)),
            total_input_tokens: input,
            total_output_tokens: output,
            ttft_ms: Distribution::of(ok.iter().filter_map(|r| r.ttft)),
            tpot_ms: Distribution::of(ok.iter().filter_map(|r| r.tpot())),
            itl_ms: Distribution::of(ok.iter().flat_map(|r| r.itl.iter().copied())),
            e2e_ms: Distribution::of(ok.iter().map(|r| r.e2e)),
            ttft_by_turn_ms: (0..turns)
                .map(|t| Distribution::of(ok.iter().filter(|r| r.turn == Some(t)).filter_map(|r| r.ttft)))
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A recorded stream: sent at 1.0 s, chunks at +0.5, +0.6, +0.8, done at +0.8, 3 tokens.
    fn recorded() -> RequestRecord {
        RequestRecord::from_stream(1.0, &[0.5, 0.6, 0.8], 0.8, 3, 10)
    }

    #[test]
    fn per_request_metrics_follow_the_definitions() {
        let r = recorded();
        assert_eq!(r.ttft, Some(0.5));
        assert!((r.tpot().unwrap() - 0.15).abs() < 1e-12, "(0.8 - 0.5) / (3 - 1)");
        assert_eq!(r.itl.len(), 2);
        assert!((r.itl[0] - 0.1).abs() < 1e-12 && (r.itl[1] - 0.2).abs() < 1e-12);
        let one = RequestRecord::from_stream(0.0, &[0.3], 0.3, 1, 5);
        assert_eq!(one.tpot(), None, "TPOT needs two tokens");
    }

    #[test]
    fn percentiles_interpolate_like_numpy() {
        let v = [1.0, 2.0, 3.0, 4.0];
        assert_eq!(percentile(&v, 50.0), 2.5);
        assert!((percentile(&v, 90.0) - 3.7).abs() < 1e-12);
        assert_eq!(percentile(&[7.0], 99.0), 7.0);
        let d = Distribution::of([0.001, 0.002, 0.003]);
        assert!((d.mean - 2.0).abs() < 1e-9 && (d.p50 - 2.0).abs() < 1e-9 && d.count == 3);
    }

    #[test]
    fn run_metrics_count_throughput_errors_and_goodput() {
        let mut slow = recorded();
        slow.ttft = Some(2.0);
        slow.e2e = 2.2;
        let failed = RequestRecord { status: 429, error: Some("queue full".into()), ..Default::default() };
        let records = vec![recorded(), slow, failed];
        let slo = Slo::parse("ttft=1000,tpot=200").unwrap();
        let m = RunMetrics::compute(&records, 2.0, Some(&slo));
        assert_eq!((m.completed, m.failed), (2, 1));
        assert_eq!(m.errors.get("429"), Some(&1));
        assert_eq!(m.total_output_tokens, 6);
        assert!((m.output_throughput - 3.0).abs() < 1e-12);
        assert!((m.total_token_throughput - 13.0).abs() < 1e-12);
        assert!((m.request_throughput - 1.0).abs() < 1e-12);
        assert!((m.goodput.unwrap() - 0.5).abs() < 1e-12, "only the fast request meets the SLO");
        assert!((m.ttft_ms.p50 - 1250.0).abs() < 1e-9);
        assert!(Slo::parse("ttft=abc").is_err() && Slo::parse("latency=5").is_err());
    }

    #[test]
    fn multi_turn_ttft_is_split_by_turn() {
        let mut a = recorded();
        a.turn = Some(0);
        let mut b = recorded();
        b.turn = Some(1);
        b.ttft = Some(0.1);
        let m = RunMetrics::compute(&[a, b], 1.0, None);
        assert_eq!(m.ttft_by_turn_ms.len(), 2);
        assert!((m.ttft_by_turn_ms[1].p50 - 100.0).abs() < 1e-9);
    }
}
