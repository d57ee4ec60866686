//! The engine: requests in, one batched forward pass per step, tokens out. A plain synchronous
//! library (no async runtime, no HTTP), like mlx-lm's `BatchGenerator`: `add` queues a checked
//! `Request`, `step` advances every running request by one forward pass, `abort` removes. What
//! runs when, and what a step's tokens do to each request, is the scheduler's.

use std::collections::HashMap;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;

use crate::backend::{FlatBatch, Window};
use crate::model::KvCache;

use super::block_manager::BlockManager;
use super::device::{Backend, ModelHandle};
use super::disk::{DiskCache, DiskStats, Identity};
use super::request::{Limits, Request, RequestError};
use super::sampler::{RowChoice, SampledToken, SamplingParams};
use super::scheduler::{Scheduled, Scheduler, SchedulerConfig};
use super::sequence::{Event, FinishReason, RequestId, Sequence};
use super::tiering;
use crate::backend::RowOutput;

#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Tokens per KV-cache block.
    pub block_size: usize,
    /// Bytes of KV cache (K and V of every layer); None: a quarter of available memory.
    pub kv_cache_bytes: Option<usize>,
    pub max_num_seqs: usize,
    pub max_num_batched_tokens: usize,
    /// Per-sequence attention window in tokens (the first `WINDOW_KEEP` plus the most recent
    /// ones), like mlx-lm's rotating KV cache; None: whole context.
    pub max_kv_size: Option<usize>,
}

/// The compute threads every engine of this process shares (one forward pass at a time uses
/// all of them; two engines stepping at once take turns rather than oversubscribing the CPU).
fn compute_pool() -> Arc<rayon::ThreadPool> {
    static POOL: std::sync::OnceLock<Arc<rayon::ThreadPool>> = std::sync::OnceLock::new();
    Arc::clone(POOL.get_or_init(|| {
        Arc::new(
            rayon::ThreadPoolBuilder::new()
                .thread_name(|i| format!("braid-compute-{i}"))
                .build()
                .expect("the operating system starts the compute threads"),
        )
    }))
}

/// Leading tokens a windowed sequence always keeps (mlx-lm's default `keep`).
pub const WINDOW_KEEP: usize = 4;

impl Default for EngineConfig {
    fn default() -> Self {
        Self { block_size: 16, kv_cache_bytes: None, max_num_seqs: 64, max_num_batched_tokens: 512, max_kv_size: None }
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum EngineError {
    #[error("the prompt cache folder holds blocks of another layout ({0:?}) than this engine's")]
    DiskLayout(Box<Identity>),
    #[error("cannot set up the engine on {device}: {message}")]
    Setup { device: String, message: String },
}

/// A step that failed: its forward pass returned an error, or something in it panicked (on this
/// thread or on a compute thread). The requests it ran are aborted (their blocks freed, their
/// `Abort` events come with the next step); every other request, waiting or running, is kept,
/// and so are events queued before the step. The engine can go on stepping.
#[derive(Debug, Clone, thiserror::Error, PartialEq)]
#[error("the engine step failed: {cause}")]
pub struct StepError {
    /// The backend's error, or the panic's message.
    pub cause: String,
    pub panicked: bool,
    /// The requests that were in the failed step, now aborted.
    pub failed: Vec<RequestId>,
}

/// The text of a caught panic's payload (what `panic!` was given, when it was text).
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    match (payload.downcast_ref::<&str>(), payload.downcast_ref::<String>()) {
        (Some(s), _) => format!("panic: {s}"),
        (_, Some(s)) => format!("panic: {s}"),
        _ => "panic".to_string(),
    }
}

/// A failure injected on purpose, for tests of what a failed step does (the server reads it
/// from `BRAID_TEST_FAULT`). Not for use outside tests.
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepFault {
    /// The forward pass, counted from 1, that fails first.
    pub at: u64,
    /// Every later one fails too (otherwise only that one).
    pub always: bool,
    /// It panics on a compute thread (otherwise the backend returns an error).
    pub panic: bool,
}

#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct EngineStats {
    pub running: usize,
    pub waiting: usize,
    pub kv_blocks_total: usize,
    pub kv_blocks_used: usize,
    /// Free blocks that still hold a reusable prefix.
    pub kv_blocks_cached: usize,
    pub kv_blocks_free: usize,
    pub block_size: usize,
    /// Prompt tokens served from the prefix cache (memory and disk), since start.
    pub prefix_hit_tokens: u64,
    /// Of those, the tokens whose blocks were loaded from the disk tier.
    pub prefix_hit_tokens_disk: u64,
    /// Tokens preempted requests found still cached when readmitted (their own earlier work,
    /// mostly): not in `prefix_hit_tokens`, which counts first admissions only.
    pub preempted_reuse_tokens: u64,
    /// Tokens computed by prefill (prompts, and recomputation after preemption), since start.
    pub prefilled_tokens: u64,
    pub generated_tokens: u64,
    pub preemptions: u64,
    /// The disk tier, when there is one.
    pub disk: Option<DiskStats>,
}

pub struct Engine {
    model: ModelHandle,
    /// The threads that run the forward pass (as many as the CPU has, or RAYON_NUM_THREADS).
    compute: Arc<rayon::ThreadPool>,
    backend: Backend,
    /// The KV blocks: the scheduler gives them to sequences, the disk tier fills and saves them.
    blocks: BlockManager,
    scheduler: Scheduler,
    next_id: RequestId,
    pending_events: Vec<Event>,
    last_step: Vec<Scheduled>,
    window: Option<Window>,
    max_kv_size: Option<usize>,
    disk: Option<DiskCache>,
    /// Forward passes run (steps that scheduled something), since start.
    forward_passes: u64,
    /// The forward pass at which the injected fault fires (u64::MAX: none), so a step pays
    /// one comparison for the hook.
    fault_at: u64,
    fault: Option<StepFault>,
    /// Loads of the disk tier in progress for waiting requests.
    prefetch: tiering::Prefetch,
}

impl Engine {
    /// An engine over `model` with its own KV cache (on the model's device).
    pub fn new(model: impl Into<ModelHandle>, eos_ids: Vec<u32>, config: EngineConfig) -> Result<Self, EngineError> {
        let model = model.into();
        let block_bytes = KvCache::bytes_per_block(model.config(), config.block_size);
        // Never more than every sequence at full context; by default what the device can spare.
        let most = config.max_num_seqs * model.config().context_length.div_ceil(config.block_size) * block_bytes;
        let bytes = config
            .kv_cache_bytes
            .unwrap_or_else(|| model.default_kv_bytes(config.max_num_batched_tokens, config.max_num_seqs).min(most));
        let num_blocks = (bytes / block_bytes).max(1);
        tracing::info!(
            "KV cache on {}: {} blocks of {} tokens = {} tokens, {:.1} MiB",
            model.device(),
            num_blocks,
            config.block_size,
            num_blocks * config.block_size,
            (num_blocks * block_bytes) as f64 / (1 << 20) as f64
        );
        // A step has at most max_num_batched_tokens tokens and one logits row per sequence.
        let rows = config.max_num_seqs.min(config.max_num_batched_tokens);
        let setup = |message| EngineError::Setup { device: model.device(), message };
        let mut backend =
            model.backend(num_blocks, config.block_size, config.max_num_batched_tokens, rows).map_err(setup)?;
        backend.warm_up(rows).map_err(setup)?;
        let scheduler = Scheduler::new(SchedulerConfig {
            max_num_seqs: config.max_num_seqs,
            max_num_batched_tokens: config.max_num_batched_tokens,
            eos_ids,
            context_length: model.config().context_length,
        });
        // A rotating window if asked for; else, where every layer slides (Mistral), the
        // model's own window, so that blocks behind it are freed.
        let window = config
            .max_kv_size
            .map(|size| Window { keep: WINDOW_KEEP.min(size.saturating_sub(1)), size: size.max(2) })
            .or_else(|| model.config().uniform_window().map(|size| Window { keep: 0, size: size.max(2) }));
        Ok(Self {
            model,
            compute: compute_pool(),
            backend,
            blocks: BlockManager::new(num_blocks, config.block_size),
            scheduler,
            next_id: 0,
            pending_events: Vec::new(),
            last_step: Vec::new(),
            window,
            max_kv_size: config.max_kv_size,
            disk: None,
            forward_passes: 0,
            fault_at: u64::MAX,
            fault: None,
            prefetch: tiering::Prefetch::default(),
        })
    }

    /// The prompt cache identity of this engine for weights of `fingerprint`: its layout, and
    /// the fingerprint mixed with how this backend computes K/V (`arithmetic_tag`).
    pub fn disk_identity(&self, fingerprint: u128) -> Identity {
        self.disk_layout(fingerprint ^ self.model.arithmetic_tag())
    }

    fn disk_layout(&self, fingerprint: u128) -> Identity {
        let c = self.model.config();
        Identity {
            fingerprint,
            block_size: self.blocks.block_size() as u32,
            n_layer: c.n_layer as u32,
            n_kv_head: c.n_kv_head as u32,
            head_dim: c.head_dim as u32,
            window: self.max_kv_size.unwrap_or(0) as u32,
        }
    }

    /// Adds the disk tier: prefixes found there are loaded instead of computed, and blocks
    /// leaving memory (or finishing requests) are written there. Its identity must be this
    /// engine's layout (the fingerprint is the caller's word).
    pub fn attach_disk_cache(&mut self, disk: DiskCache) -> Result<(), EngineError> {
        let identity = *disk.identity();
        if identity != self.disk_layout(identity.fingerprint) {
            return Err(EngineError::DiskLayout(Box::new(identity)));
        }
        self.blocks.record_evictions();
        self.disk = Some(disk);
        Ok(())
    }

    /// Waits until every block queued for the disk tier is written.
    pub fn flush_disk_cache(&self) {
        if let Some(disk) = &self.disk {
            disk.flush();
        }
    }

    pub fn model(&self) -> &ModelHandle {
        &self.model
    }

    /// Tokens one request may hold: the model's context, and the whole pool.
    pub fn max_context(&self) -> usize {
        self.model.config().context_length.min(self.blocks.num_blocks() * self.blocks.block_size())
    }

    /// What a request may hold on this engine: `Request::new` checks against it.
    pub fn limits(&self) -> Limits {
        Limits { vocab_size: self.model.vocab_size(), max_context: self.max_context() }
    }

    /// Queues a request; it joins the running batch at a coming step.
    pub fn add(&mut self, request: Request) -> RequestId {
        debug_assert!(request.fits(&self.limits()), "a request checked against other limits than this engine's");
        let (prompt, params, retention) = request.into_parts();
        let id = self.next_id;
        self.next_id += 1;
        let mut seq = Sequence::new(id, prompt, params, self.blocks.block_size());
        seq.window = self.window;
        seq.retention = retention;
        self.scheduler.add(seq);
        id
    }

    /// Checks and queues an anonymous request: `add(Request::new(prompt, params, &limits)?)`.
    pub fn add_request(&mut self, prompt: Vec<u32>, params: SamplingParams) -> Result<RequestId, RequestError> {
        let request = Request::new(prompt, params, &self.limits())?;
        Ok(self.add(request))
    }

    /// Removes a request, running or waiting, and frees its blocks. Its `Abort` event comes
    /// with the next step. Returns whether it was found.
    pub fn abort(&mut self, id: RequestId) -> bool {
        if !self.scheduler.abort(&mut self.blocks, id) {
            return false;
        }
        self.pending_events.push(Event { id, token: None, finish: Some(FinishReason::Abort), cached_tokens: 0 });
        true
    }

    pub fn has_work(&self) -> bool {
        self.scheduler.has_work() || !self.pending_events.is_empty()
    }

    /// The composition of the last step: which requests ran and how many tokens each.
    pub fn last_step(&self) -> &[Scheduled] {
        &self.last_step
    }

    /// Prompt tokens of a running request that came from the prefix cache.
    pub fn cached_tokens(&self, id: RequestId) -> Option<usize> {
        self.scheduler.cached_tokens(id)
    }

    pub fn stats(&self) -> EngineStats {
        let counters = self.scheduler.counters();
        EngineStats {
            running: self.scheduler.running().len(),
            waiting: self.scheduler.waiting().len(),
            kv_blocks_total: self.blocks.num_blocks(),
            kv_blocks_used: self.blocks.num_used(),
            kv_blocks_cached: self.blocks.num_cached_free(),
            kv_blocks_free: self.blocks.num_free(),
            block_size: self.blocks.block_size(),
            prefix_hit_tokens: counters.prefix_hit_tokens,
            prefix_hit_tokens_disk: counters.prefix_hit_tokens_disk,
            preempted_reuse_tokens: counters.preempted_reuse_tokens,
            prefilled_tokens: counters.prefilled_tokens,
            generated_tokens: counters.generated_tokens,
            preemptions: counters.preemptions,
            disk: self.disk.as_ref().map(DiskCache::stats),
        }
    }

    /// Forward passes run so far (steps that scheduled something).
    pub fn forward_passes(&self) -> u64 {
        self.forward_passes
    }

    /// Makes a coming forward pass fail on purpose (tests only).
    #[doc(hidden)]
    pub fn inject_fault(&mut self, fault: StepFault) {
        self.fault = Some(fault);
        self.fault_at = fault.at.max(1);
    }

    /// One forward pass over every scheduled request; returns new tokens and finishes. A
    /// failure (an error or a panic anywhere in the step) fails only the requests of this step:
    /// see `StepError`.
    pub fn step(&mut self) -> Result<Vec<Event>, StepError> {
        self.step_with(&mut |_| {})
    }

    /// `step`, calling `on_start` with each request the step schedules for the first time,
    /// before its forward pass (a server's deadline for waiting ends there, not at the end of
    /// a long prefill chunk).
    pub fn step_with(&mut self, on_start: &mut (dyn FnMut(RequestId) + Send)) -> Result<Vec<Event>, StepError> {
        // Events queued before the step (aborts) survive its failure.
        let mut events = std::mem::take(&mut self.pending_events);
        self.last_step.clear();
        // The whole step runs on a compute thread: the kernels' ~150 parallel regions per
        // forward pass then start from inside the pool, instead of each one handing its work
        // to the pool and putting this thread to sleep until it is done (two context switches
        // per region, a third of a decode step's time when measured). A panic on any compute
        // thread comes back out of `install` on this one, where it is caught: the requests of
        // the step are given up below, so no half-updated sequence is stepped again.
        let pool = Arc::clone(&self.compute);
        let outcome = catch_unwind(AssertUnwindSafe(|| pool.install(|| self.step_on_pool(on_start))));
        let (cause, panicked) = match outcome {
            Ok(Ok(new)) => {
                events.extend(new);
                return Ok(events);
            }
            Ok(Err(e)) => (e.to_string(), false),
            Err(payload) => (panic_message(&*payload), true),
        };
        events.append(&mut self.pending_events);
        self.pending_events = events;
        let failed: Vec<RequestId> = self.last_step.iter().map(|s| s.id).collect();
        for &id in &failed {
            self.abort(id);
        }
        self.last_step.clear();
        Err(StepError { cause, panicked, failed })
    }

    /// Fires the injected fault: an error from the "backend", or a panic on a compute thread
    /// (like a sampler's), which `step` must catch.
    #[cold]
    fn injected_fault(&mut self) -> candle_core::Result<()> {
        let Some(fault) = self.fault else { return Ok(()) };
        if !fault.always {
            self.fault_at = u64::MAX;
        }
        let message = format!("injected test fault at forward pass {} (BRAID_TEST_FAULT)", self.forward_passes);
        if fault.panic {
            rayon::join(|| (), || panic!("{message}"));
        }
        Err(candle_core::Error::Msg(message))
    }

    fn step_on_pool(&mut self, on_start: &mut (dyn FnMut(RequestId) + Send)) -> candle_core::Result<Vec<Event>> {
        let mut events = std::mem::take(&mut self.pending_events);
        if let Some(disk) = &self.disk {
            // Copies in the blocks the reader has read, starts reading the next requests'.
            let (running, slots) = (self.scheduler.running().len(), self.scheduler.free_slots());
            self.prefetch.step(
                disk,
                &mut self.blocks,
                self.backend.block_store(),
                self.scheduler.waiting(),
                running,
                slots,
            );
        }
        let scheduled = self.scheduler.schedule(&mut self.blocks);
        self.scheduler.started().iter().for_each(|&id| on_start(id));
        if let Some(disk) = &self.disk {
            tiering::spill_evicted(disk, &mut self.blocks, self.backend.block_store());
        }
        self.last_step = scheduled.clone();
        if scheduled.is_empty() {
            if let Some(disk) = &self.disk
                && events.is_empty()
            {
                // Only requests waiting for the disk: wait for it a little instead of spinning.
                self.prefetch.idle(disk);
            }
            return Ok(events);
        }
        let running = self.scheduler.running();
        let index: HashMap<RequestId, usize> = running.iter().enumerate().map(|(i, s)| (s.id, i)).collect();
        let mut batch = FlatBatch::default();
        let mut samples = Vec::new();
        for s in &scheduled {
            let seq = &running[index[&s.id]];
            let end = seq.num_computed + s.num_tokens;
            let sample = end == seq.tokens.len();
            batch.push(&seq.tokens[seq.num_computed..end], end, seq.block_table.clone(), sample);
            batch.seqs.last_mut().expect("just pushed").window = seq.window;
            samples.push(sample);
        }
        // Requests without penalties, bias or alternatives can take their token from the
        // backend (on a GPU: token ids come back instead of logits); the others' logits rows
        // come back to the host's sampler.
        let choices: Option<Vec<RowChoice>> = self.backend.draws_on_device().then(|| {
            let running = self.scheduler.running_mut();
            let sampled = scheduled.iter().zip(&samples).filter(|&(_, &sample)| sample);
            sampled.map(|(s, _)| running[index[&s.id]].sampler.row_choice()).collect()
        });
        self.forward_passes += 1;
        if self.forward_passes >= self.fault_at {
            self.injected_fault()?;
        }
        let outputs = self.backend.forward(&batch, choices.as_deref())?;
        let tokens = sample_rows(self.scheduler.running_mut(), &index, &scheduled, &samples, outputs);
        // A finishing request's full blocks go to the disk tier before they are released.
        let (disk, backend, block_size) = (&self.disk, &mut self.backend, self.blocks.block_size());
        events.extend(self.scheduler.update_from_output(&mut self.blocks, &scheduled, tokens, |seq| {
            if let Some(disk) = disk {
                tiering::save_sequence(disk, backend.block_store(), seq, block_size);
            }
        }));
        Ok(events)
    }
}

/// The sampled rows' tokens, aligned with `scheduled` (None for a row not sampled): those the
/// backend chose, and the host sampler's from the other rows' logits, drawn in parallel (each
/// request's sampler has its own generator, so the order makes no difference). `index` gives
/// each request's place in `running`.
fn sample_rows(
    running: &mut [Sequence],
    index: &HashMap<RequestId, usize>,
    scheduled: &[Scheduled],
    samples: &[bool],
    outputs: Vec<RowOutput>,
) -> Vec<Option<SampledToken>> {
    use rayon::prelude::*;
    let mut rows: Vec<Option<RowOutput>> = (0..running.len()).map(|_| None).collect();
    let mut outputs = outputs.into_iter();
    for (s, _) in scheduled.iter().zip(samples).filter(|&(_, &sample)| sample) {
        rows[index[&s.id]] = Some(outputs.next().expect("one output per sampled sequence"));
    }
    let mut tokens: Vec<Option<SampledToken>> = running
        .par_iter_mut()
        .zip(rows.into_par_iter())
        .map(|(seq, row)| {
            row.map(|row| match row {
                RowOutput::Logits(mut logits) => seq.sampler.sample(&mut logits),
                RowOutput::Chosen(id, logprob) => SampledToken { id, logprob, top: Vec::new() },
            })
        })
        .collect();
    scheduled.iter().map(|s| tokens[index[&s.id]].take()).collect()
}
