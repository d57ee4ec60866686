//! The batching engine on the real model: batched == solo, prefix reuse, no leaks,
//! preemption, chunked prefill.

mod common;

use std::collections::HashMap;

use braid::engine::{Engine, EngineConfig, FinishReason, Request, RequestId, SamplingParams, StepFault};
use common::{golden, ids, model};

fn engine(config: EngineConfig) -> Engine {
    let m = model();
    Engine::new(m.model.clone(), m.tokenizer.eos_ids.clone(), config).expect("the engine starts")
}

fn small_config() -> EngineConfig {
    EngineConfig { kv_cache_bytes: Some(256 << 20), ..EngineConfig::default() }
}

/// Runs prompts through the engine, admitting prompt i before step `arrivals[i]`; returns each
/// prompt's tokens.
fn run(engine: &mut Engine, prompts: &[Vec<u32>], params: &[SamplingParams], arrivals: &[usize]) -> Vec<Vec<u32>> {
    let mut out = vec![Vec::new(); prompts.len()];
    let mut which: HashMap<RequestId, usize> = HashMap::new();
    let mut finished = 0;
    let mut step = 0;
    while finished < prompts.len() {
        for (i, &at) in arrivals.iter().enumerate() {
            if at == step {
                which.insert(engine.add_request(prompts[i].clone(), params[i].clone()).unwrap(), i);
            }
        }
        for e in engine.step().unwrap() {
            if let Some(t) = e.token {
                out[which[&e.id]].push(t.id);
            }
            if e.finish.is_some() {
                finished += 1;
            }
        }
        step += 1;
        assert!(step < 100_000, "the engine stopped making progress");
    }
    out
}

fn solo(prompt: &[u32], params: &SamplingParams) -> Vec<u32> {
    let mut e = engine(small_config());
    run(&mut e, &[prompt.to_vec()], std::slice::from_ref(params), &[0]).remove(0)
}

fn golden_prompts() -> Vec<Vec<u32>> {
    golden("greedy.jsonl").iter().map(|c| ids(&c["prompt_ids"])).collect()
}

fn check_batched_equals_solo(params: SamplingParams, config: EngineConfig) {
    let prompts = golden_prompts();
    let params: Vec<SamplingParams> = (0..prompts.len())
        .map(|i| SamplingParams { seed: params.seed.map(|s| s + i as u64), ..params.clone() })
        .collect();
    // Staggered: a new prompt every other step, so prefills land among running decodes.
    let arrivals: Vec<usize> = (0..prompts.len()).map(|i| i * 2).collect();
    let mut e = engine(config);
    let batched = run(&mut e, &prompts, &params, &arrivals);
    for (i, (p, got)) in prompts.iter().zip(&batched).enumerate() {
        assert_eq!(got, &solo(p, &params[i]), "prompt {i} differs between batched and solo");
    }
    let stats = e.stats();
    assert_eq!(stats.kv_blocks_used, 0, "blocks leaked: {stats:?}");
}

#[test]
fn batched_greedy_equals_solo() {
    check_batched_equals_solo(SamplingParams { ignore_eos: true, ..SamplingParams::greedy(20) }, small_config());
}

#[test]
fn batched_seeded_sampling_equals_solo() {
    let params = SamplingParams { temperature: 0.8, seed: Some(1234), ignore_eos: true, ..SamplingParams::greedy(20) };
    check_batched_equals_solo(params, small_config());
}

/// A pool far too small for 32 sequences forces preemption and recomputation; outputs stay
/// those of solo runs.
#[test]
fn preemption_under_a_tiny_budget_keeps_outputs() {
    let block_bytes = braid::model::KvCache::bytes_per_block(model().model.config(), 16);
    let config =
        EngineConfig { kv_cache_bytes: Some(block_bytes * 40), max_num_batched_tokens: 256, ..EngineConfig::default() };
    let prompts = golden_prompts();
    let params = SamplingParams { ignore_eos: true, ..SamplingParams::greedy(20) };
    let mut e = engine(config);
    let batched = run(&mut e, &prompts[..12], &vec![params.clone(); 12], &[0; 12]);
    assert!(e.stats().preemptions > 0, "the budget was meant to force preemption");
    for (p, got) in prompts.iter().zip(&batched) {
        assert_eq!(got, &solo(p, &params));
    }
    assert_eq!(e.stats().kv_blocks_used, 0);
}

/// ~1,000 tokens of ordinary text from the golden files.
fn long_prefix() -> Vec<u32> {
    let mut out = Vec::new();
    for case in golden("tokenize.jsonl") {
        out.extend(ids(&case["ids"]));
        if out.len() >= 1000 {
            break;
        }
    }
    out.truncate(1000);
    out
}

#[test]
fn a_shared_prefix_is_computed_once() {
    let prefix = long_prefix();
    let params = SamplingParams::greedy(2);
    let with_suffix = |s: u32| {
        let mut p = prefix.clone();
        p.extend([s, s + 1, s + 2]);
        p
    };
    // A second request after the first finished reuses the cached prefix.
    let mut e = engine(small_config());
    run(&mut e, &[with_suffix(100)], std::slice::from_ref(&params), &[0]);
    let before = e.stats().prefilled_tokens;
    run(&mut e, &[with_suffix(200)], std::slice::from_ref(&params), &[0]);
    let second = e.stats().prefilled_tokens - before;
    assert!(second * 10 < prefix.len() as u64, "second request prefilled {second} tokens");
    assert!(e.stats().prefix_hit_tokens >= 992);

    // Sixteen arriving together compute it once (the rest wait for its blocks).
    let mut e = engine(small_config());
    let prompts: Vec<Vec<u32>> = (0..16).map(|i| with_suffix(300 + 10 * i)).collect();
    let outputs = run(&mut e, &prompts, &vec![params.clone(); 16], &[0; 16]);
    let prefilled = e.stats().prefilled_tokens;
    assert!(prefilled < prefix.len() as u64 + 16 * 32, "prefilled {prefilled} tokens for 16 requests");
    // And sharing changed nothing in what they generate.
    assert_eq!(outputs[3], solo(&prompts[3], &params));
}

#[test]
fn aborts_and_completions_return_the_pool_to_baseline() {
    let mut e = engine(small_config());
    let baseline = e.stats();
    let prompts = golden_prompts();
    let mut live = Vec::new();
    for (i, p) in prompts.iter().enumerate().take(16) {
        let params = SamplingParams { ignore_eos: true, ..SamplingParams::greedy(5 + i % 7) };
        live.push(e.add_request(p.clone(), params).unwrap());
    }
    let mut aborted = 0;
    let mut step = 0;
    let mut finished = std::collections::HashSet::new();
    while e.has_work() {
        // Abort every third request at different moments: waiting, mid-prefill, decoding.
        if step % 3 == 0
            && let Some(id) = live.iter().copied().find(|id| !finished.contains(id) && id % 3 == (step / 3) as u64 % 3)
            && e.abort(id)
        {
            aborted += 1;
        }
        for ev in e.step().unwrap() {
            if let Some(f) = ev.finish {
                assert!(finished.insert(ev.id), "request {} finished twice", ev.id);
                assert!(matches!(f, FinishReason::Length | FinishReason::Abort));
            }
        }
        step += 1;
        let s = e.stats();
        assert!(s.kv_blocks_used <= s.kv_blocks_total);
    }
    assert!(aborted > 0);
    assert_eq!(finished.len(), 16);
    let end = e.stats();
    assert_eq!(end.kv_blocks_used, baseline.kv_blocks_used);
    assert_eq!(end.kv_blocks_free, baseline.kv_blocks_free);
    assert!(!e.abort(live[0]), "an ended request cannot be aborted again");
}

/// A 4,000-token prompt joins 8 decoding sequences: every step still carries all 8 decodes,
/// and the prompt advances one chunk per step.
#[test]
fn a_long_prompt_never_stalls_running_decodes() {
    let config = EngineConfig { max_num_batched_tokens: 512, ..small_config() };
    let mut e = engine(config);
    let prompts = golden_prompts();
    let decoders: Vec<RequestId> = prompts[..8]
        .iter()
        .map(|p| e.add_request(p.clone(), SamplingParams { ignore_eos: true, ..SamplingParams::greedy(200) }).unwrap())
        .collect();
    // Let the eight finish their prefill and start decoding.
    for _ in 0..3 {
        e.step().unwrap();
    }
    let mut long = Vec::new();
    while long.len() < 4000 {
        long.extend(long_prefix());
    }
    long.truncate(4000);
    let big = e.add_request(long, SamplingParams::greedy(1)).unwrap();
    let mut prefill_steps = 0;
    loop {
        let events = e.step().unwrap();
        let step = e.last_step().to_vec();
        for d in &decoders {
            assert!(
                step.iter().any(|s| s.id == *d && s.num_tokens == 1),
                "decode of {d} missing from a step: {step:?}"
            );
        }
        let chunk = step.iter().find(|s| s.id == big).map_or(0, |s| s.num_tokens);
        assert!(chunk <= 512 - 8, "chunk of {chunk} tokens");
        prefill_steps += 1;
        if events.iter().any(|ev| ev.id == big) {
            break;
        }
    }
    assert_eq!(prefill_steps, 4000usize.div_ceil(504), "the prompt advanced by a full chunk each step");
}

#[test]
fn bad_requests_are_refused() {
    let e = engine(small_config());
    let limits = e.limits();
    let validate = |prompt: &[u32], params: &SamplingParams| Request::new(prompt.to_vec(), params.clone(), &limits);
    let p = SamplingParams::greedy(4);
    assert!(validate(&[], &p).is_err());
    assert!(validate(&[1_000_000], &p).unwrap_err().to_string().contains("vocabulary"));
    let long = vec![1u32; 8190];
    assert!(validate(&long, &SamplingParams::greedy(10)).unwrap_err().to_string().contains("context"));
    assert!(
        validate(&[1], &SamplingParams { temperature: -1.0, ..p }).unwrap_err().to_string().contains("temperature")
    );
}

/// `--max-kv-size`: a sequence keeps its first tokens and a window of recent ones; blocks
/// behind the window are freed, and batching still changes nothing.
#[test]
fn a_rotating_window_bounds_memory_and_stays_batch_invariant() {
    let config = EngineConfig { max_kv_size: Some(64), ..small_config() };
    let prompts: Vec<Vec<u32>> = golden_prompts().into_iter().take(4).collect();
    let params = SamplingParams { ignore_eos: true, ..SamplingParams::greedy(150) };
    let mut e = engine(config.clone());
    let mut which = HashMap::new();
    let mut out = vec![Vec::new(); prompts.len()];
    for (i, p) in prompts.iter().enumerate() {
        which.insert(e.add_request(p.clone(), params.clone()).unwrap(), i);
    }
    let mut steps = 0;
    let mut most_used_late = 0;
    while e.has_work() {
        for ev in e.step().unwrap() {
            if let Some(t) = ev.token {
                out[which[&ev.id]].push(t.id);
            }
        }
        steps += 1;
        if steps > 100 {
            most_used_late = most_used_late.max(e.stats().kv_blocks_used);
        }
    }
    // Per sequence: the block with the kept tokens, the window's blocks, one being filled.
    assert!(most_used_late <= 4 * (1 + 64usize.div_ceil(16) + 1), "{most_used_late} blocks in use");
    assert_eq!(e.stats().kv_blocks_used, 0);
    for (p, got) in prompts.iter().zip(&out) {
        let mut alone = engine(config.clone());
        assert_eq!(got, &run(&mut alone, std::slice::from_ref(p), std::slice::from_ref(&params), &[0])[0]);
    }
    // The window changes what the model sees once it is full.
    assert_ne!(out[0], solo(&prompts[0], &params));
}

/// A step that fails, by a panic on a compute thread (like a sampler's) or by a backend error,
/// fails only its own requests: they are aborted with their blocks freed, while a request still
/// waiting and an abort queued before the step survive; the engine goes on, and the waiting
/// request gets the tokens it gets alone.
#[test]
fn a_failed_step_fails_only_its_requests() {
    let prompts = golden_prompts();
    let params = SamplingParams { ignore_eos: true, ..SamplingParams::greedy(6) };
    for panic in [true, false] {
        // One sequence at a time: `a` runs, `b` and `c` wait.
        let mut e = engine(EngineConfig { max_num_seqs: 1, ..small_config() });
        let baseline = e.stats();
        e.inject_fault(StepFault { at: 2, always: false, panic });
        let a = e.add_request(prompts[0].clone(), params.clone()).unwrap();
        let b = e.add_request(prompts[1].clone(), params.clone()).unwrap();
        let c = e.add_request(prompts[2].clone(), params.clone()).unwrap();
        let first = e.step().unwrap();
        assert!(first.iter().all(|ev| ev.id == a) && !first.is_empty(), "{first:?}");
        assert!(e.abort(c), "c was waiting");
        let err = e.step().unwrap_err();
        assert_eq!(err.failed, vec![a], "only the step's own request fails");
        assert_eq!(err.panicked, panic);
        assert!(
            err.to_string().contains("the engine step failed") && err.cause.contains("injected test fault"),
            "{err}"
        );
        assert!(e.last_step().is_empty());
        let s = e.stats();
        assert_eq!((s.running, s.waiting), (0, 1), "b still waits: {s:?}");
        // Then: the abort queued before the failure, the failed request's, and b to its end.
        let mut finishes = HashMap::new();
        let mut tokens = Vec::new();
        let mut steps = 0;
        while e.has_work() {
            for ev in e.step().expect("the engine goes on after a failed step") {
                if ev.id == b
                    && let Some(t) = ev.token
                {
                    tokens.push(t.id);
                }
                if let Some(f) = ev.finish {
                    assert!(finishes.insert(ev.id, f).is_none(), "request {} finished twice", ev.id);
                }
            }
            steps += 1;
            assert!(steps < 100);
        }
        assert_eq!(
            finishes,
            HashMap::from([(a, FinishReason::Abort), (b, FinishReason::Length), (c, FinishReason::Abort)])
        );
        assert_eq!(tokens, solo(&prompts[1], &params));
        assert_eq!(e.stats().kv_blocks_used, baseline.kv_blocks_used, "the failed request's blocks were freed");
    }
}

/// A fault that repeats fails every step it reaches, each with its own requests, and the
/// engine reports each failure rather than unwinding out of `step`.
#[test]
fn a_repeating_fault_fails_each_step_without_escaping() {
    let prompts = golden_prompts();
    let mut e = engine(EngineConfig { max_num_seqs: 1, ..small_config() });
    e.inject_fault(StepFault { at: 1, always: true, panic: true });
    let ids: Vec<RequestId> =
        prompts[..3].iter().map(|p| e.add_request(p.clone(), SamplingParams::greedy(4)).unwrap()).collect();
    for &id in &ids {
        assert_eq!(e.step().unwrap_err().failed, vec![id]);
    }
    assert_eq!(e.stats().kv_blocks_used, 0);
    assert_eq!(e.forward_passes(), 3);
}

fn kv_blocks(n: usize) -> Option<usize> {
    Some(braid::model::KvCache::bytes_per_block(model().model.config(), 16) * n)
}

/// Steps the engine until it has nothing left; returns every request's tokens and events.
fn drain(e: &mut Engine, out: &mut HashMap<RequestId, Vec<u32>>) {
    let mut steps = 0;
    while e.has_work() {
        for ev in e.step().unwrap() {
            if let Some(t) = ev.token {
                out.entry(ev.id).or_default().push(t.id);
            }
        }
        steps += 1;
        assert!(steps < 100_000, "the engine stopped making progress");
    }
}

/// A prompt too large for the blocks left does not hold up the short requests behind it
/// (head-of-line blocking): they are admitted at once, and it runs once blocks free up.
#[test]
fn a_prompt_that_does_not_fit_lets_shorter_ones_pass() {
    let config = EngineConfig { kv_cache_bytes: kv_blocks(40), ..EngineConfig::default() };
    let text = long_prefix();
    let mut e = engine(config.clone());
    let hold = SamplingParams { ignore_eos: true, ..SamplingParams::greedy(60) };
    // Two running requests of 150 prompt tokens hold 10 blocks each: 20 of 40 are left.
    for range in [500..650, 650..800] {
        e.add_request(text[range].to_vec(), hold.clone()).unwrap();
    }
    let mut out = HashMap::new();
    for ev in e.step().unwrap() {
        out.entry(ev.id).or_insert_with(Vec::new).extend(ev.token.map(|t| t.id));
    }
    // 400 tokens need 25 blocks: this one must wait for the two to finish.
    let long =
        e.add_request(text[..400].to_vec(), SamplingParams { ignore_eos: true, ..SamplingParams::greedy(8) }).unwrap();
    let short_params = SamplingParams { ignore_eos: true, ..SamplingParams::greedy(4) };
    let short_prompts: Vec<Vec<u32>> = golden_prompts()[20..24].to_vec();
    let shorts: Vec<RequestId> =
        short_prompts.iter().map(|p| e.add_request(p.clone(), short_params.clone()).unwrap()).collect();
    for ev in e.step().unwrap() {
        out.entry(ev.id).or_default().extend(ev.token.map(|t| t.id));
    }
    let step = e.last_step().to_vec();
    assert!(!step.iter().any(|s| s.id == long), "the long prompt cannot fit yet: {step:?}");
    for id in &shorts {
        assert!(step.iter().any(|s| s.id == *id), "short request {id} waits behind the long prompt: {step:?}");
    }
    drain(&mut e, &mut out);
    assert_eq!(out[&long].len(), 8, "the long prompt ran once there was room");
    for (id, p) in shorts.iter().zip(&short_prompts) {
        assert_eq!(out[id], solo(p, &short_params), "admission order changed an output");
    }
    assert_eq!(e.stats().kv_blocks_used, 0);
}

/// Skipping ahead has an age bound: with short requests arriving as fast as the pool serves
/// them, so that it never has room for a large prompt, the large prompt still gets its turn
/// (the queue stops passing it once it has waited too long) instead of starving.
#[test]
fn a_skipped_prompt_is_admitted_within_the_age_bound() {
    let config = EngineConfig { kv_cache_bytes: kv_blocks(40), ..EngineConfig::default() };
    let text = long_prefix();
    // 20 prompt tokens and 10 generated fit 2 blocks: the shorts never grow, so nothing is
    // preempted; two arrive per step and each lives about 10 steps, keeping the pool full.
    let short_params = SamplingParams { ignore_eos: true, ..SamplingParams::greedy(10) };
    let mut e = engine(config);
    let mut long = None;
    let mut long_arrival = 0;
    let mut long_started = None;
    for step in 0..600 {
        for k in 0..2 {
            let at = 500 + (2 * step + k) % 400;
            e.add_request(text[at..at + 20].to_vec(), short_params.clone()).unwrap();
        }
        if step == 30 {
            assert!(e.stats().kv_blocks_free < 25, "the pool should be busy by now: {:?}", e.stats());
            long = Some(
                e.add_request(text[..400].to_vec(), SamplingParams { ignore_eos: true, ..SamplingParams::greedy(4) })
                    .unwrap(),
            );
            long_arrival = step;
        }
        let events = e.step().unwrap();
        if let Some(id) = long
            && events.iter().any(|ev| ev.id == id && ev.token.is_some())
        {
            long_started = Some(step);
            break;
        }
    }
    assert_eq!(e.stats().preemptions, 0);
    let started = long_started.expect("the large prompt never ran: starved by the requests passing it");
    let bound = braid::engine::scheduler::SKIP_AHEAD_PATIENCE as usize + 30;
    assert!(started - long_arrival <= bound, "the large prompt waited {} steps", started - long_arrival);
}

/// `cached_tokens` is what the prefix cache gave a request when it was first admitted: after
/// preemption, the blocks it finds again are its own recomputation's, not a cache hit.
#[test]
fn a_preempted_request_reports_only_what_the_cache_gave_it() {
    let config = EngineConfig { kv_cache_bytes: kv_blocks(40), max_num_batched_tokens: 256, ..EngineConfig::default() };
    let text = long_prefix();
    // Twelve prompts of 60 tokens with no block in common.
    let prompts: Vec<Vec<u32>> = (0..12).map(|i| text[i * 75..i * 75 + 60].to_vec()).collect();
    let params = SamplingParams { ignore_eos: true, ..SamplingParams::greedy(40) };
    let mut e = engine(config);
    let ids: Vec<RequestId> = prompts.iter().map(|p| e.add_request(p.clone(), params.clone()).unwrap()).collect();
    let mut cached: HashMap<RequestId, usize> = HashMap::new();
    let mut steps = 0;
    while e.has_work() {
        for ev in e.step().unwrap() {
            if ev.token.is_some() {
                *cached.entry(ev.id).or_default() = cached.get(&ev.id).copied().unwrap_or(0).max(ev.cached_tokens);
            }
        }
        steps += 1;
        assert!(steps < 100_000);
    }
    let stats = e.stats();
    assert!(stats.preemptions > 0, "the pool was meant to force preemption: {stats:?}");
    for id in ids {
        assert_eq!(cached[&id], 0, "request {id} claims cached prompt tokens it computed itself");
    }
    assert_eq!(stats.prefix_hit_tokens, 0, "recomputation counted as prefix-cache hits: {stats:?}");
    assert!(stats.preempted_reuse_tokens > 0, "readmitted requests found their own blocks, counted apart: {stats:?}");
    assert_eq!(stats.kv_blocks_used, 0);
}
