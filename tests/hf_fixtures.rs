//! Every architecture, loaded from a Hugging Face folder, against what `transformers` computes
//! from the same weights (tests/fixtures/tiny/, README.md there): logits, greedy tokens and
//! token ids, plus batched == solo.
//!
//! Tolerances. transformers computes in f32 from the bf16 weights (its own f32-vs-f64 error is
//! ~3e-5). braid's attention keeps llama.cpp's arithmetic: Q, K and V rounded to f16 (the KV
//! cache is f16) and the weighted sum of values in f16. That alone moves logits by up to ~2.4e-2
//! on these fixtures, whose attention is peaked (a numpy emulation of the llama fixture with only
//! Q/K/V rounded to f16 gives 2.35e-2). So, per format:
//! - `MatrixFormat::F32` (matrices widened to f32, activations kept f32, transformers' matrix
//!   arithmetic): max |Δlogit| measured ≤ 3.4e-2 and RMS ≤ 4.3e-3 over all fixtures; the test
//!   allows 5e-2 and RMS 1e-2.
//! - `MatrixFormat::Native` (the default for bf16 folders: bf16 weights, matrix inputs rounded to
//!   bf16, relative error 2^-9 on every product's input, as braid's GPU does): max measured
//!   ≤ 3.7e-1 (qwen3_moe; ≤ 2.2e-1 elsewhere), RMS ≤ 3e-2; the test allows 5e-1 and RMS 5e-2.
//!   The logits spread over a few units; a wrong rope, norm or window shifts them by whole units.
//!
//! Top-1 tokens (teacher-forced over the prompt and the greedy continuation) and free-running
//! greedy tokens must equal transformers' wherever its top-2 margin exceeds twice the tolerance.

mod common;

use std::collections::HashMap;
use std::path::PathBuf;

use braid::engine::{Engine, EngineConfig, RequestId, SamplingParams};
use braid::loader::LoadedModel;
use braid::loader::hf::{self, HfOptions, MatrixFormat};
use serde_json::Value;

/// (max |Δlogit|, RMS of Δlogit) allowed.
const F32_ATOL: (f32, f64) = (5e-2, 1e-2);
const BF16_ATOL: (f32, f64) = (5e-1, 5e-2);

fn dir(arch: &str) -> PathBuf {
    common::root().join("tests/fixtures/tiny").join(arch)
}

fn expected(arch: &str) -> Value {
    let path = dir(arch).join("expected.json");
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

fn load(arch: &str, format: MatrixFormat, max_context: Option<usize>) -> LoadedModel {
    hf::load(&dir(arch), &braid::loader::Placement::Cpu, &HfOptions { format, max_context })
        .unwrap_or_else(|e| panic!("{arch}: {e}"))
}

fn ids(v: &Value) -> Vec<u32> {
    common::ids(v)
}

fn f(v: &Value) -> f32 {
    v.as_f64().unwrap() as f32
}

/// The models a fixture's prompts run on: Phi-3 picks its longrope factors by the context it
/// serves (llama.cpp's rule), transformers by each pass's length; the fixture keeps each prompt
/// on one side of `original_max_position_embeddings` (32), so a prompt that stays within it
/// runs on a model serving 32 tokens.
struct Models {
    full: LoadedModel,
    short: Option<(usize, LoadedModel)>,
}

impl Models {
    fn new(arch: &str, format: MatrixFormat) -> Self {
        let short = (arch == "phi3").then(|| (32, load(arch, format, Some(32))));
        Self { full: load(arch, format, None), short }
    }

    fn for_length(&self, tokens: usize) -> &LoadedModel {
        match &self.short {
            Some((limit, m)) if tokens <= *limit => m,
            _ => &self.full,
        }
    }
}

/// braid's logits against every value expected.json stores; returns the largest difference.
/// Top-1 must agree wherever transformers' top-2 margin exceeds `2 * atol`.
fn check_logits(arch: &str, format: MatrixFormat, (atol, rms_tol): (f32, f64)) -> f32 {
    let exp = expected(arch);
    let models = Models::new(arch, format);
    let (mut worst, mut squares, mut count) = (0f32, 0f64, 0usize);
    for p in exp["prompts"].as_array().unwrap() {
        let name = p["name"].as_str().unwrap();
        let prompt = ids(&p["prompt_ids"]);
        let greedy = ids(&p["greedy"]["tokens"]);
        // The prompt and the greedy tokens fed back: one pass gives the prompt's logits and
        // those of every greedy step (step i's are at position prompt_len - 1 + i).
        let mut all = prompt.clone();
        all.extend(&greedy[..greedy.len() - 1]);
        let model = models.for_length(all.len() + 1);
        let logits = common::solo::logits_all_positions(&model.model, &all).unwrap();
        let mut diff = |what: &str, got: f32, want: f32| {
            let d = (got - want).abs();
            worst = worst.max(d);
            squares += (d as f64).powi(2);
            count += 1;
            assert!(d <= atol, "{arch} {name} {what}: braid {got}, transformers {want} (|Δ| {d} > {atol})");
        };
        let positions = ids(&p["logits"]["positions"]);
        for (&pos, row) in positions.iter().zip(p["logits"]["values"].as_array().unwrap()) {
            for (t, want) in row.as_array().unwrap().iter().enumerate() {
                diff(&format!("position {pos} token {t}"), logits[pos as usize][t], f(want));
            }
        }
        let argmax = |row: &[f32]| (0..row.len()).max_by(|&a, &b| row[a].total_cmp(&row[b]).then(b.cmp(&a))).unwrap();
        let top5_rows = p["top5"].as_array().unwrap().iter().enumerate().map(|(pos, t)| (pos, t, None));
        let steps =
            p["greedy"]["top5"].as_array().unwrap().iter().enumerate().map(|(i, t)| (prompt.len() - 1 + i, t, Some(i)));
        for (pos, top5, step) in top5_rows.chain(steps) {
            let top5 = top5.as_array().unwrap();
            for entry in top5 {
                let (id, want) = (entry[0].as_u64().unwrap() as usize, f(&entry[1]));
                diff(&format!("position {pos} ({step:?}) top-5 token {id}"), logits[pos][id], want);
            }
            let margin = f(&top5[0][1]) - f(&top5[1][1]);
            if margin > 2.0 * atol {
                let want = top5[0][0].as_u64().unwrap() as usize;
                assert_eq!(argmax(&logits[pos]), want, "{arch} {name}: top-1 at position {pos} (margin {margin})");
            }
        }
    }
    let rms = (squares / count as f64).sqrt();
    eprintln!("{arch} {format:?}: max |Δlogit| {worst:.2e}, rms {rms:.2e} over {count} values");
    assert!(rms <= rms_tol, "{arch} {format:?}: RMS of Δlogit {rms} > {rms_tol}");
    worst
}

/// Free-running greedy generation equals transformers' token for token, until a step whose
/// top-2 margin is within `2 * atol` (there the two runs may part, legitimately).
fn check_greedy(arch: &str, format: MatrixFormat, (atol, _): (f32, f64)) {
    let exp = expected(arch);
    let models = Models::new(arch, format);
    for p in exp["prompts"].as_array().unwrap() {
        let prompt = ids(&p["prompt_ids"]);
        let want = ids(&p["greedy"]["tokens"]);
        let margins: Vec<f32> = p["greedy"]["margins"].as_array().unwrap().iter().map(f).collect();
        let model = models.for_length(prompt.len() + want.len());
        let params = SamplingParams { ignore_eos: true, ..SamplingParams::greedy(want.len()) };
        let (got, _) = common::solo::generate_solo(&model.model, &prompt, params, &model.tokenizer.eos_ids).unwrap();
        let got: Vec<u32> = got.iter().map(|t| t.id).collect();
        // Token by token until the runs part, which they may only at a near tie.
        let same = got.iter().zip(&want).take_while(|(a, b)| a == b).count();
        if same < want.len() {
            assert!(
                margins[same] <= 2.0 * atol,
                "{arch} {format:?} {}: greedy step {same} is {} where transformers chose {} with margin {} \
                 (braid {got:?}, transformers {want:?})",
                p["name"],
                got[same],
                want[same],
                margins[same]
            );
            eprintln!("{arch} {format:?} {}: {same} of {} greedy tokens equal, then a near tie", p["name"], want.len());
        }
    }
}

/// Token ids of every prompt equal the fixture's (its tokenizer, BOS as the family adds it),
/// and the chat prompt renders through the folder's template to transformers' text.
fn check_tokenizer(arch: &str) {
    let exp = expected(arch);
    let model = load(arch, MatrixFormat::Native, None);
    for p in exp["prompts"].as_array().unwrap() {
        let text = p["text"].as_str().unwrap();
        let got = if p["chat"].as_bool().unwrap() {
            let template = model.chat_template.as_ref().expect("the folder's chat template");
            let messages: Vec<Value> = p["messages"].as_array().unwrap().clone();
            assert_eq!(template.render(&messages, true).unwrap(), text, "{arch}: rendered chat");
            model.tokenizer.encode(text).unwrap()
        } else {
            model.tokenizer.encode_prompt(text).unwrap()
        };
        assert_eq!(got, ids(&p["prompt_ids"]), "{arch} {}: prompt ids", p["name"]);
    }
    let generation: Value =
        serde_json::from_str(&std::fs::read_to_string(dir(arch).join("generation_config.json")).unwrap()).unwrap();
    let stops = match &generation["eos_token_id"] {
        Value::Array(a) => ids(&Value::Array(a.clone())),
        v => vec![v.as_u64().unwrap() as u32],
    };
    assert_eq!(model.tokenizer.eos_ids[..stops.len()], stops[..], "{arch}: stop ids");
}

/// The fixture's prompts through one engine, arriving a step apart so prefills land among
/// decodes, against each alone.
fn check_batched_equals_solo(arch: &str) {
    let exp = expected(arch);
    let model = load(arch, MatrixFormat::Native, None);
    let prompts: Vec<Vec<u32>> = exp["prompts"].as_array().unwrap().iter().map(|p| ids(&p["prompt_ids"])).collect();
    let params = SamplingParams { ignore_eos: true, ..SamplingParams::greedy(16) };
    let run = |prompts: &[Vec<u32>]| {
        let config = EngineConfig { kv_cache_bytes: Some(8 << 20), ..EngineConfig::default() };
        let mut engine = Engine::new(model.model.clone(), model.tokenizer.eos_ids.clone(), config).unwrap();
        let mut out = vec![Vec::new(); prompts.len()];
        let mut which: HashMap<RequestId, usize> = HashMap::new();
        let (mut finished, mut step) = (0, 0);
        while finished < prompts.len() {
            if step < prompts.len() {
                which.insert(engine.add_request(prompts[step].clone(), params.clone()).unwrap(), step);
            }
            for e in engine.step().unwrap() {
                if let Some(t) = e.token {
                    out[which[&e.id]].push(t.id);
                }
                finished += usize::from(e.finish.is_some());
            }
            step += 1;
            assert!(step < 10_000, "the engine stopped making progress");
        }
        out
    };
    let batched = run(&prompts);
    for (i, p) in prompts.iter().enumerate() {
        assert_eq!(batched[i], run(std::slice::from_ref(p))[0], "{arch} prompt {i}: batched != solo");
        assert_eq!(batched[i].len(), 16);
    }
}

/// A copy of a fixture folder in a temporary directory, with `edit` applied to its files.
fn edited(arch: &str, edit: impl FnOnce(&std::path::Path)) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(dir(arch)).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, tmp.path().join(path.file_name().unwrap())).unwrap();
    }
    edit(tmp.path());
    tmp
}

fn edit_json(path: &std::path::Path, edit: impl FnOnce(&mut Value)) {
    let mut v: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(path, serde_json::to_string_pretty(&v).unwrap()).unwrap();
}

/// The error loading a folder gives, as text.
fn load_error(dir: &std::path::Path) -> String {
    match braid::loader::load(dir, &braid::loader::Placement::Cpu) {
        Ok(_) => panic!("{} loaded", dir.display()),
        Err(e) => e.to_string(),
    }
}

/// What an edited fixture gives: bad folders fail at load with the culprit named.
#[test]
fn bad_folders_are_refused_by_name() {
    type Edit = Box<dyn FnOnce(&std::path::Path)>;
    let cases: Vec<(&str, Edit, &[&str])> = vec![
        (
            "llama",
            Box::new(|d| edit_json(&d.join("config.json"), |c| c["model_type"] = "gpt_neox".into())),
            &["gpt_neox", "qwen3_moe"],
        ),
        (
            "llama",
            Box::new(|d| {
                edit_json(&d.join("config.json"), |c| {
                    c["rope_parameters"] = serde_json::json!({"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4})
                })
            }),
            &["yarn"],
        ),
        ("llama", Box::new(|d| edit_json(&d.join("config.json"), |c| c["hidden_size"] = 32.into())), &["shape"]),
        ("mistral", Box::new(|d| edit_json(&d.join("config.json"), |c| c["tie_word_embeddings"] = true.into())), &[]),
        (
            "llama",
            Box::new(|d| edit_json(&d.join("config.json"), |c| c["tie_word_embeddings"] = false.into())),
            &["lm_head.weight"],
        ),
        (
            "qwen3",
            Box::new(|d| std::fs::remove_file(d.join("model-00002-of-00002.safetensors")).unwrap()),
            &["model-00002-of-00002.safetensors"],
        ),
        ("qwen2", Box::new(|d| std::fs::remove_file(d.join("tokenizer.json")).unwrap()), &["tokenizer.json"]),
        (
            "qwen2",
            Box::new(|d| std::fs::write(d.join("model.safetensors"), b"not weights").unwrap()),
            &["model.safetensors"],
        ),
        (
            "gemma3",
            Box::new(|d| edit_json(&d.join("config.json"), |c| c["final_logit_softcapping"] = 30.0.into())),
            &["final_logit_softcapping"],
        ),
    ];
    for (arch, edit, words) in cases {
        let tmp = edited(arch, edit);
        if words.is_empty() {
            // Tying an untied model is allowed (its lm_head is then unused): it loads.
            braid::loader::load(tmp.path(), &braid::loader::Placement::Cpu).unwrap();
            continue;
        }
        let e = load_error(tmp.path());
        for w in words {
            assert!(e.contains(w), "{arch}: error '{e}' should name '{w}'");
        }
    }
}

/// Without `add_bos_token` in tokenizer_config.json, BOS follows the tokenizer's own
/// post-processor (llama's adds it, qwen2's does not); a chat template in a list of named
/// templates is taken by the name "default".
#[test]
fn folder_defaults_follow_the_tokenizer() {
    for (arch, bos) in [("llama", true), ("qwen2", false)] {
        let tmp = edited(arch, |d| {
            edit_json(&d.join("tokenizer_config.json"), |c| {
                c.as_object_mut().unwrap().remove("add_bos_token");
                let t = c["chat_template"].clone();
                c["chat_template"] =
                    serde_json::json!([{"name": "tool_use", "template": "x"}, {"name": "default", "template": t}]);
            })
        });
        let m = braid::loader::load(tmp.path(), &braid::loader::Placement::Cpu).unwrap();
        assert_eq!(m.tokenizer.add_bos, bos, "{arch}");
        let rendered = m.chat_template.unwrap().render(&[serde_json::json!({"role": "user", "content": "hi"})], true);
        assert!(rendered.unwrap().contains("<|im_start|>user\nhi"), "{arch}");
    }
}

/// The fixture's weights rewritten as f32 and as f16 safetensors: f32 weights are the bf16
/// ones widened, so they give exactly `MatrixFormat::F32`'s logits; f16 ones (bf16 values
/// below f16's normal range lose bits) nearly.
#[test]
fn f32_and_f16_folders_compute_in_f32() {
    use safetensors::tensor::{Dtype, SafeTensors, TensorView, serialize_to_file};
    let arch = "qwen2";
    let bytes = std::fs::read(dir(arch).join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let widened: Vec<(String, Vec<usize>, Vec<f32>)> = st
        .tensors()
        .into_iter()
        .map(|(name, v)| {
            assert_eq!(v.dtype(), Dtype::BF16);
            let values = v.data().chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect();
            (name, v.shape().to_vec(), values)
        })
        .collect();
    let reference = load(arch, MatrixFormat::F32, None);
    let prompt = ids(&expected(arch)["prompts"][3]["prompt_ids"]);
    let want = common::solo::logits_all_positions(&reference.model, &prompt).unwrap();
    for dtype in [Dtype::F32, Dtype::F16] {
        let tmp = edited(arch, |d| {
            let data: Vec<Vec<u8>> = widened
                .iter()
                .map(|(_, _, v)| match dtype {
                    Dtype::F32 => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
                    _ => v.iter().flat_map(|&x| half::f16::from_f32(x).to_le_bytes()).collect(),
                })
                .collect();
            let views = widened
                .iter()
                .zip(&data)
                .map(|((name, shape, _), b)| (name.clone(), TensorView::new(dtype, shape.clone(), b).unwrap()));
            serialize_to_file(views, None, &d.join("model.safetensors")).unwrap();
        });
        let m = braid::loader::load(tmp.path(), &braid::loader::Placement::Cpu).unwrap();
        let got = common::solo::logits_all_positions(&m.model, &prompt).unwrap();
        let worst = got.iter().flatten().zip(want.iter().flatten()).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        match dtype {
            Dtype::F32 => assert_eq!(got, want, "f32 weights compute as MatrixFormat::F32"),
            _ => assert!(worst < 1e-3, "f16 weights: max |Δlogit| {worst}"),
        }
    }
}

macro_rules! fixture_tests {
    ($($arch:ident),*) => {$(
        mod $arch {
            use super::*;

            #[test]
            fn logits_match_transformers_f32() {
                check_logits(stringify!($arch), MatrixFormat::F32, F32_ATOL);
            }

            #[test]
            fn logits_match_transformers_bf16() {
                check_logits(stringify!($arch), MatrixFormat::Native, BF16_ATOL);
            }

            #[test]
            fn greedy_matches_transformers() {
                check_greedy(stringify!($arch), MatrixFormat::F32, F32_ATOL);
                check_greedy(stringify!($arch), MatrixFormat::Native, BF16_ATOL);
            }

            #[test]
            fn tokenizer_matches_transformers() {
                check_tokenizer(stringify!($arch));
            }

            #[test]
            fn batched_equals_solo() {
                check_batched_equals_solo(stringify!($arch));
            }
        }
    )*};
}

fixture_tests!(llama, mistral, qwen2, qwen3, qwen3_moe, mixtral, gemma3, phi3);
