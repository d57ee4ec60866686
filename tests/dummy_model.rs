//! Dummy weights (`--load-format dummy`) on the CPU: a model of a preset's shape with no weight
//! file and no vocabulary, batched through the engine like a real one.

mod common;

use braid::engine::{Engine, EngineConfig, SamplingParams};
use braid::loader::{Placement, load_dummy};
use common::solo::generate_solo;

#[test]
fn a_dummy_model_generates_and_batched_equals_solo() {
    let m = load_dummy("smollm2-135m", 3, &Placement::Cpu).expect("the preset exists");
    assert_eq!(m.model.vocab_size(), 49_152);
    assert!(m.tokenizer.eos_ids.is_empty(), "dummy models have no end-of-sequence token");
    assert!(m.tokenizer.encode("hello").is_err(), "dummy models have no vocabulary");
    assert_eq!(m.tokenizer.decode(&[5, 7]), "<5><7>");
    let prompts: Vec<Vec<u32>> =
        (0..5u32).map(|i| (0..7 + 3 * i).map(|j| (j * 977 + i * 131) % 49_152).collect()).collect();
    let params = SamplingParams { ignore_eos: true, ..SamplingParams::greedy(6) };
    let config = EngineConfig { kv_cache_bytes: Some(64 << 20), ..EngineConfig::default() };
    let mut engine = Engine::new(m.model.clone(), Vec::new(), config).unwrap();
    let ids: Vec<_> = prompts.iter().map(|p| engine.add_request(p.clone(), params.clone()).unwrap()).collect();
    let mut out = vec![Vec::new(); prompts.len()];
    while engine.has_work() {
        for e in engine.step().unwrap() {
            if let Some(t) = e.token {
                out[ids.iter().position(|&i| i == e.id).unwrap()].push(t.id);
            }
        }
    }
    let mut distinct = std::collections::HashSet::new();
    for (prompt, got) in prompts.iter().zip(&out) {
        let (solo, _) = generate_solo(&m.model, prompt, params.clone(), &[]).unwrap();
        assert_eq!(got, &solo.iter().map(|t| t.id).collect::<Vec<_>>());
        assert_eq!(got.len(), 6);
        distinct.extend(got.iter().copied());
    }
    assert!(distinct.len() > 3, "the random model's outputs depend on the prompt: {out:?}");
    // The same seed draws the same model; another seed another one.
    let again = load_dummy("smollm2-135m", 3, &Placement::Cpu).unwrap();
    let other = load_dummy("smollm2-135m", 4, &Placement::Cpu).unwrap();
    let first = |m: &braid::loader::LoadedModel| generate_solo(&m.model, &prompts[0], params.clone(), &[]).unwrap().0;
    assert_eq!(first(&again), first(&m));
    assert_ne!(first(&other), first(&m));
}

#[test]
fn unknown_presets_are_refused_by_name() {
    let err = load_dummy("llama-9000", 0, &Placement::Cpu).err().expect("no such preset").to_string();
    assert!(err.contains("llama-9000") && err.contains("llama-3.2-1b"), "{err}");
}
