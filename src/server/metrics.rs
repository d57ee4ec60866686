//! Prometheus metrics: braid's own names, plus the vLLM names that existing routers and
//! dashboards read.

use std::sync::OnceLock;

use metrics::{counter, gauge, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::engine::EngineStats;

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

const LATENCY_BUCKETS: &[f64] = &[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0];

/// Installs the process-wide recorder (once); later calls reuse it.
pub fn install() -> &'static PrometheusHandle {
    HANDLE.get_or_init(|| {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("seconds".into()), LATENCY_BUCKETS)
            .expect("valid buckets")
            .build_recorder();
        let handle = recorder.handle();
        // Fails only if another recorder was installed first, in which case ours stays unused.
        let _ = metrics::set_global_recorder(recorder);
        handle
    })
}

pub fn render() -> String {
    install().render()
}

pub fn record_engine(s: &EngineStats) {
    let usage = if s.kv_blocks_total == 0 { 0.0 } else { s.kv_blocks_used as f64 / s.kv_blocks_total as f64 };
    gauge!("braid_requests_running").set(s.running as f64);
    gauge!("braid_engine_requests_waiting").set(s.waiting as f64);
    gauge!("braid_kv_cache_usage_ratio").set(usage);
    gauge!("braid_kv_blocks_used").set(s.kv_blocks_used as f64);
    gauge!("braid_kv_blocks_cached").set(s.kv_blocks_cached as f64);
    gauge!("braid_kv_blocks_total").set(s.kv_blocks_total as f64);
    // One name, split by where the blocks came from: sum over `tier` for the old total.
    counter!("braid_prefix_hit_tokens_total", "tier" => "memory")
        .absolute(s.prefix_hit_tokens - s.prefix_hit_tokens_disk);
    counter!("braid_prefix_hit_tokens_total", "tier" => "disk").absolute(s.prefix_hit_tokens_disk);
    // A preempted request's readmission finds its own blocks: recomputation saved, not a hit.
    counter!("braid_preempted_reuse_tokens_total").absolute(s.preempted_reuse_tokens);
    if let Some(d) = &s.disk {
        gauge!("braid_prompt_cache_disk_bytes").set(d.bytes as f64);
        gauge!("braid_prompt_cache_disk_budget_bytes").set(d.budget as f64);
        gauge!("braid_prompt_cache_disk_files").set(d.files as f64);
        counter!("braid_prompt_cache_disk_written_blocks_total").absolute(d.written_blocks);
        counter!("braid_prompt_cache_disk_loaded_blocks_total").absolute(d.loaded_blocks);
        counter!("braid_prompt_cache_disk_rejected_files_total").absolute(d.rejected_files);
        counter!("braid_prompt_cache_disk_evicted_files_total").absolute(d.evicted_files);
        counter!("braid_prompt_cache_disk_dropped_writes_total").absolute(d.dropped_writes);
        counter!("braid_prompt_cache_disk_abandoned_loads_total").absolute(d.abandoned_loads);
    }
    counter!("braid_prefilled_tokens_total").absolute(s.prefilled_tokens);
    counter!("braid_generated_tokens_total").absolute(s.generated_tokens);
    counter!("braid_preemptions_total").absolute(s.preemptions);
    gauge!("vllm:num_requests_running").set(s.running as f64);
    gauge!("vllm:kv_cache_usage_perc").set(usage);
}

/// Requests waiting anywhere: in the server's admission queue and in the engine's.
pub fn record_waiting(queued: usize, engine_waiting: usize) {
    gauge!("braid_requests_waiting").set((queued + engine_waiting) as f64);
    gauge!("vllm:num_requests_waiting").set((queued + engine_waiting) as f64);
}

pub fn record_rejection(reason: &'static str) {
    counter!("braid_rejections_total", "reason" => reason).increment(1);
}

/// A sequence stopped because its client went away (not a stop string, not a deadline).
pub fn record_abort() {
    counter!("braid_aborted_requests_total").increment(1);
}

/// A request answered in full: time to its first token and end to end, and each choice's
/// mean time per output token after its first.
pub fn record_request(ttft: Option<f64>, tpot_per_choice: &[f64], e2e: f64) {
    if let Some(t) = ttft {
        histogram!("braid_time_to_first_token_seconds").record(t);
    }
    for &t in tpot_per_choice {
        histogram!("braid_time_per_output_token_seconds").record(t);
    }
    histogram!("braid_e2e_request_latency_seconds").record(e2e);
}

/// One choice (sequence) of a request, by how it ended: stop, length, abort (its client went
/// away), error (the engine failed it).
pub fn record_choice(finish: &'static str) {
    counter!("braid_requests_total", "finish_reason" => finish).increment(1);
}
