//! Agreement with llama.cpp on the golden data (../shared/golden, see its README).

mod common;

use braid::engine::SamplingParams;
use common::solo::{generate_solo, logprobs_all_positions};
use common::{golden, ids, model, on_cpu};

#[test]
fn tokenizer_matches_llama_cpp_exactly() {
    let m = model();
    let cases = golden("tokenize.jsonl");
    assert_eq!(cases.len(), 166);
    let mut failures = Vec::new();
    for case in &cases {
        let text = case["text"].as_str().unwrap();
        let got = m.tokenizer.encode(text).unwrap();
        if got != ids(&case["ids"]) {
            failures.push(format!("{text:?}: got {got:?}, want {:?}", ids(&case["ids"])));
        }
    }
    assert!(failures.is_empty(), "{} of {} differ:\n{}", failures.len(), cases.len(), failures.join("\n"));
}

#[test]
fn chat_template_matches_llama_cpp_exactly() {
    let m = model();
    let template = m.chat_template.as_ref().expect("the default model has a chat template");
    let cases = golden("chat_template.jsonl");
    assert_eq!(cases.len(), 20);
    for case in &cases {
        let got = template.render(&case["messages"], true).unwrap();
        assert_eq!(got, case["prompt"].as_str().unwrap(), "messages: {}", case["messages"]);
    }
}

/// llama.cpp computes attention in one pass per query row (braid's order, see
/// `cpu/attention.rs`) for decode steps and for prompts of under this many tokens; a longer
/// prompt is processed in one batch with its tiled kernel, whose roundings differ.
const LLAMA_CPP_TILED_FROM: usize = 64;

/// One teacher-forced step: braid's prediction after the prompt and the reference's first `k`
/// tokens, beside llama.cpp's.
struct Step {
    prompt: usize,
    prompt_len: usize,
    k: usize,
    /// braid's top token, and its log-probability of llama.cpp's top token.
    ours: usize,
    ours_lp: f32,
    /// llama.cpp's top token, its log-probability, and its margin over the second.
    reference: usize,
    reference_lp: f32,
    gap: f32,
}

/// Every golden prompt with its reference tokens fed in one prefill: a step per reference token.
fn teacher_forced_steps() -> Vec<Step> {
    let m = model();
    let cases = golden("greedy.jsonl");
    assert_eq!(cases.len(), 32);
    let mut steps = Vec::new();
    for (n, case) in cases.iter().enumerate() {
        let prompt = ids(&case["prompt_ids"]);
        let reference = ids(&case["ids"]);
        assert_eq!(m.tokenizer.encode(case["prompt"].as_str().unwrap()).unwrap(), prompt);
        let mut input = prompt.clone();
        input.extend_from_slice(&reference[..reference.len() - 1]);
        let logprobs = logprobs_all_positions(&m.model, &input).unwrap();
        for (k, top) in case["top"].as_array().unwrap().iter().enumerate() {
            let top = top.as_array().unwrap();
            let (id, lp) = (top[0][0].as_u64().unwrap() as usize, top[0][1].as_f64().unwrap() as f32);
            let row = &logprobs[prompt.len() - 1 + k];
            steps.push(Step {
                prompt: n,
                prompt_len: prompt.len(),
                k,
                ours: braid::cpu::row::argmax(row) as usize,
                ours_lp: row[id],
                reference: id,
                reference_lp: lp,
                gap: lp - top[1][1].as_f64().unwrap() as f32,
            });
        }
    }
    steps
}

/// Teacher forcing against the README's criterion. braid's forward pass is llama.cpp's
/// arithmetic to the bit, so every step of a prompt llama.cpp ran with one-pass attention
/// agrees to the rounding of the reference's five decimals and of the two log-softmax
/// computations: asserted to 1e-3, on every step. The one golden prompt of 64 tokens or more
/// went through llama.cpp's tiled kernel; there the top token still agrees at every confident
/// step (checked), but two log-probabilities differ by 0.18 and 0.20 (printed, not asserted).
///
/// On the GPU (`BRAID_TEST_DEVICE=cuda`) the weights are dequantized to bf16 and activations
/// are not quantized, so the GPU meets a looser bar: the top token wherever llama.cpp's margin
/// exceeds 1.0 and at 97% of confident steps, log-probabilities within 0.1 at 85% of them, a
/// mean difference of at most 0.05.
#[test]
fn teacher_forced_predictions_agree_with_llama_cpp() {
    let steps = teacher_forced_steps();
    let confident: Vec<&Step> = steps.iter().filter(|s| s.gap > 0.1).collect();
    let diff = |s: &Step| (s.ours_lp - s.reference_lp).abs();
    let top_agree = confident.iter().filter(|s| s.ours == s.reference).count();
    let within = confident.iter().filter(|s| diff(s) <= 0.1).count();
    let mean = confident.iter().map(|s| diff(s) as f64).sum::<f64>() / confident.len() as f64;
    let short = |s: &Step| s.prompt_len < LLAMA_CPP_TILED_FROM;
    let max_short = steps.iter().filter(|s| short(s)).map(diff).fold(0f32, f32::max);
    eprintln!(
        "{} confident steps: top token agrees on {top_agree}, logprob within 0.1 on {within}, mean |diff| {mean:.4}; prompts under {LLAMA_CPP_TILED_FROM} tokens: largest logprob difference {max_short:.5}",
        confident.len()
    );
    let describe = |s: &Step| {
        format!(
            "prompt {} ({} tokens) step {}: top token {} (llama.cpp {}), logprob {:.5} (llama.cpp {:.5}, gap {:.3})",
            s.prompt, s.prompt_len, s.k, s.ours, s.reference, s.ours_lp, s.reference_lp, s.gap
        )
    };
    for s in confident.iter().filter(|s| diff(s) > 0.1) {
        eprintln!("{}", describe(s));
    }
    if !on_cpu() {
        let decided =
            confident.iter().filter(|s| s.gap > 1.0 && s.ours != s.reference).map(|s| describe(s)).collect::<Vec<_>>();
        assert!(decided.is_empty(), "clearly decided steps disagree:\n{}", decided.join("\n"));
        assert!(top_agree * 100 >= confident.len() * 97 && within * 100 >= confident.len() * 85 && mean <= 0.05);
        return;
    }
    let mut failures: Vec<String> = confident.iter().filter(|s| s.ours != s.reference).map(|s| describe(s)).collect();
    failures.extend(
        steps.iter().filter(|s| short(s) && (diff(s) > 1e-3 || (s.gap > 1e-3 && s.ours != s.reference))).map(describe),
    );
    assert!(failures.is_empty(), "steps disagree:\n{}", failures.join("\n"));
}

/// Free-running greedy decoding with end-of-sequence banned (llama.cpp's `ignore_eos`):
/// every prompt llama.cpp ran with one-pass attention gives llama.cpp's 32 tokens exactly, and
/// the README's 80% of prompts match their first 16. (On the GPU: at least 12 of 32 match
/// their first 16, as measured there.)
#[test]
fn free_running_greedy_matches_llama_cpp() {
    let m = model();
    let cases = golden("greedy.jsonl");
    let (mut matched16, mut short, mut short_exact) = (0, 0, 0);
    for case in &cases {
        let prompt = ids(&case["prompt_ids"]);
        let reference = ids(&case["ids"]);
        let logit_bias = m.tokenizer.eos_ids.iter().map(|&id| (id, -1e30)).collect();
        let params = SamplingParams { ignore_eos: true, logit_bias, ..SamplingParams::greedy(reference.len()) };
        let (tokens, _) = generate_solo(&m.model, &prompt, params, &m.tokenizer.eos_ids).unwrap();
        let got: Vec<u32> = tokens.iter().map(|t| t.id).collect();
        matched16 += usize::from(got[..16] == reference[..16]);
        if prompt.len() < LLAMA_CPP_TILED_FROM {
            short += 1;
            short_exact += usize::from(got == reference);
        }
    }
    eprintln!(
        "{matched16} of {} prompts match llama.cpp's first 16 greedy tokens; {short_exact} of {short} short prompts all 32",
        cases.len()
    );
    if !on_cpu() {
        assert!(matched16 >= 12, "only {matched16} of {} prompts match their first 16 tokens", cases.len());
        return;
    }
    assert_eq!(short_exact, short, "prompts under {LLAMA_CPP_TILED_FROM} tokens give llama.cpp's 32 tokens");
    assert!(
        matched16 * 100 >= cases.len() * 80,
        "only {matched16} of {} prompts match their first 16 tokens",
        cases.len()
    );
}
