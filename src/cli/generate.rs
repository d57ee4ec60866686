use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;

use super::{EngineArgs, ModelArgs};
use crate::engine::{Engine, Request, SamplingParams};
use crate::loader::LoadedModel;
use crate::util::read_jsonl;

#[derive(clap::Args)]
#[command(group = clap::ArgGroup::new("input").required(true))]
pub struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    engine: EngineArgs,
    #[command(flatten)]
    cache: super::cache::PromptCacheArgs,
    /// The prompt text (special-token text such as <|im_start|> is parsed).
    #[arg(long, group = "input")]
    prompt: Option<String>,
    /// A JSONL file with one {"prompt": "..."} or {"prompt_ids": [...]} object per line.
    #[arg(long, group = "input")]
    prompts_file: Option<PathBuf>,
    /// Wrap each text prompt as one user message through the model's chat template.
    #[arg(long)]
    chat: bool,
    /// Most tokens to generate per prompt.
    #[arg(long, default_value_t = 128)]
    max_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Keep only the k most likely tokens (0: all).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Keep the most likely tokens up to this much probability (1: all).
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// Drop tokens less likely than this fraction of the most likely one (0: none).
    #[arg(long, default_value_t = 0.0)]
    min_p: f32,
    /// Seed of each prompt's own random generator (sampling is then repeatable).
    #[arg(long)]
    seed: Option<u64>,
    /// Keep generating past end-of-sequence tokens (fixed output lengths, for benchmarks).
    #[arg(long)]
    ignore_eos: bool,
    /// Print one JSON line per prompt, in input order: {"prompt_ids", "ids", "text"}.
    #[arg(long)]
    json: bool,
    /// With --json, also print each token's log-probability and this many most likely
    /// alternatives ("logprobs": [[logprob, [[id, logprob], ...]], ...]).
    #[arg(long, default_value_t = 0, requires = "json")]
    top_logprobs: usize,
    /// Milliseconds between the arrivals of successive prompts (0: all at once).
    #[arg(long, default_value_t = 0)]
    arrival_ms: u64,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct PromptLine {
    prompt: Option<String>,
    prompt_ids: Option<Vec<u32>>,
}

enum Prompt {
    Text(String),
    Ids(Vec<u32>),
}

fn read_prompts(args: &GenerateArgs) -> anyhow::Result<Vec<Prompt>> {
    if let Some(text) = &args.prompt {
        return Ok(vec![Prompt::Text(text.clone())]);
    }
    let path = args.prompts_file.as_ref().expect("clap requires one input");
    read_jsonl::<PromptLine>(path)?
        .into_iter()
        .enumerate()
        .map(|(i, line)| match (line.prompt, line.prompt_ids) {
            (Some(text), None) => Ok(Prompt::Text(text)),
            (None, Some(ids)) => Ok(Prompt::Ids(ids)),
            _ => anyhow::bail!("{} line {}: give exactly one of \"prompt\" and \"prompt_ids\"", path.display(), i + 1),
        })
        .collect()
}

/// Token ids of a prompt, through the chat template when asked.
fn prompt_ids(loaded: &LoadedModel, prompt: &Prompt, chat: bool) -> anyhow::Result<Vec<u32>> {
    let ids = match prompt {
        Prompt::Ids(ids) => ids.clone(),
        Prompt::Text(text) if chat => {
            let template = loaded.chat_template.as_ref().context("--chat: this model has no chat template")?;
            let rendered = template.render(&vec![serde_json::json!({"role": "user", "content": text})], true)?;
            loaded.tokenizer.encode_prompt(&rendered).map_err(anyhow::Error::msg)?
        }
        Prompt::Text(text) => loaded.tokenizer.encode_prompt(text).map_err(anyhow::Error::msg)?,
    };
    Ok(ids)
}

pub fn run(args: GenerateArgs) -> anyhow::Result<()> {
    let prompts = read_prompts(&args)?;
    let params = SamplingParams {
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        min_p: args.min_p,
        seed: args.seed,
        max_tokens: args.max_tokens,
        ignore_eos: args.ignore_eos,
        top_logprobs: args.top_logprobs,
        ..SamplingParams::default()
    };
    // Before the model loads, so a bad flag fails at once (`Request::new` checks it again).
    params.validate().map_err(anyhow::Error::msg)?;
    let config = args.engine.config()?;
    let loaded = args.model.load()?;
    let all_ids = prompts.iter().map(|p| prompt_ids(&loaded, p, args.chat)).collect::<anyhow::Result<Vec<_>>>()?;
    let mut engine = Engine::new(loaded.model.clone(), loaded.tokenizer.eos_ids.clone(), config)?;
    args.cache.attach(&mut engine, &loaded)?;
    let limits = engine.limits();
    let requests = all_ids.iter().enumerate().map(|(i, ids)| {
        Request::new(ids.clone(), params.clone(), &limits).with_context(|| format!("prompt {}", i + 1))
    });
    let mut requests = requests.collect::<anyhow::Result<Vec<_>>>()?.into_iter();
    let start = Instant::now();
    let mut outputs: Vec<Vec<u32>> = vec![Vec::new(); all_ids.len()];
    let mut logprobs: Vec<Vec<serde_json::Value>> = vec![Vec::new(); all_ids.len()];
    let mut request_index = std::collections::HashMap::new();
    let mut next = 0;
    let mut done = 0;
    let stream = !args.json && all_ids.len() == 1;
    let mut decoder = crate::tokenizer::IncrementalDecoder::new();
    // Steps in which every request decoded one token (no prefill), and their time.
    let (mut decode_steps, mut decode_time) = (0usize, 0f64);
    while done < all_ids.len() {
        // Admit every prompt whose arrival time has come; sleep if idle until the next one.
        while next < all_ids.len() && start.elapsed().as_millis() as u64 >= next as u64 * args.arrival_ms {
            let id = engine.add(requests.next().expect("a request per prompt"));
            request_index.insert(id, next);
            next += 1;
        }
        if !engine.has_work() {
            std::thread::sleep(std::time::Duration::from_millis(1));
            continue;
        }
        let step_start = Instant::now();
        let events = engine.step()?;
        if !engine.last_step().is_empty() && engine.last_step().iter().all(|s| s.num_tokens == 1) {
            decode_steps += 1;
            decode_time += step_start.elapsed().as_secs_f64();
        }
        for event in events {
            let i = request_index[&event.id];
            if let Some(token) = event.token {
                outputs[i].push(token.id);
                if args.top_logprobs > 0 {
                    logprobs[i].push(serde_json::json!([token.logprob, token.top]));
                }
                if stream {
                    use std::io::Write;
                    print!("{}", decoder.push(&loaded.tokenizer, token.id));
                    std::io::stdout().flush().ok();
                }
            }
            if event.finish.is_some() {
                done += 1;
            }
        }
    }
    let secs = start.elapsed().as_secs_f64();
    let generated: usize = outputs.iter().map(Vec::len).sum();
    if stream {
        println!("{}", decoder.flush(&loaded.tokenizer));
    } else {
        for ((ids, out), lps) in all_ids.iter().zip(&outputs).zip(&logprobs) {
            let text = loaded.tokenizer.decode(out);
            if args.json {
                let mut line = serde_json::json!({ "prompt_ids": ids, "ids": out, "text": text });
                if args.top_logprobs > 0 {
                    line["logprobs"] = serde_json::json!(lps);
                }
                println!("{line}");
            } else {
                println!("{text}");
            }
        }
    }
    engine.flush_disk_cache();
    let stats = engine.stats();
    eprintln!(
        "{} prompts on {}, {generated} tokens generated in {secs:.3} s: {:.1} tok/s aggregate; {decode_steps} decode-only steps of {:.3} ms mean; {} prompt tokens prefilled, {} from the prefix cache ({} from disk)",
        all_ids.len(),
        loaded.model.device(),
        generated as f64 / secs,
        1e3 * decode_time / decode_steps.max(1) as f64,
        stats.prefilled_tokens,
        stats.prefix_hit_tokens,
        stats.prefix_hit_tokens_disk
    );
    Ok(())
}
