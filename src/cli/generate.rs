use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;

use super::{read_jsonl, ModelArgs};
use crate::engine::{generate_solo, SamplingParams};
use crate::model::LoadedModel;

#[derive(clap::Args)]
#[command(group = clap::ArgGroup::new("input").required(true))]
pub struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
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
    /// Seed of each prompt's own random generator (sampling is then repeatable).
    #[arg(long)]
    seed: Option<u64>,
    /// Keep generating past end-of-sequence tokens (fixed output lengths, for benchmarks).
    #[arg(long)]
    ignore_eos: bool,
    /// Print one JSON line per prompt, in input order: {"prompt_ids", "ids", "text"}.
    #[arg(long)]
    json: bool,
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
    let vocab = loaded.model.vocab_size() as u32;
    if let Some(bad) = ids.iter().find(|&&id| id >= vocab) {
        anyhow::bail!("prompt token id {bad} is outside the vocabulary (size {vocab})");
    }
    if ids.is_empty() {
        anyhow::bail!("empty prompt: there is nothing to continue");
    }
    Ok(ids)
}

pub fn run(args: GenerateArgs) -> anyhow::Result<()> {
    let prompts = read_prompts(&args)?;
    let params = SamplingParams {
        temperature: args.temperature,
        seed: args.seed,
        max_tokens: args.max_tokens,
        ignore_eos: args.ignore_eos,
        ..SamplingParams::default()
    };
    params.validate().map_err(anyhow::Error::msg)?;
    let loaded = args.model.load()?;
    let all_ids = prompts.iter().map(|p| prompt_ids(&loaded, p, args.chat)).collect::<anyhow::Result<Vec<_>>>()?;
    let context = loaded.model.config.context_length;
    for ids in &all_ids {
        if ids.len() + args.max_tokens > context {
            anyhow::bail!("prompt of {} tokens plus --max-tokens {} exceeds the context of {context}", ids.len(), args.max_tokens);
        }
    }
    let start = Instant::now();
    let mut generated = 0;
    for ids in &all_ids {
        let (tokens, _) = generate_solo(&loaded.model, ids, params.clone(), &loaded.tokenizer.eos_ids)?;
        let out: Vec<u32> = tokens.iter().map(|t| t.id).collect();
        generated += out.len();
        let text = loaded.tokenizer.decode(&out);
        if args.json {
            println!("{}", serde_json::json!({ "prompt_ids": ids, "ids": out, "text": text }));
        } else {
            println!("{text}");
        }
    }
    let secs = start.elapsed().as_secs_f64();
    eprintln!("generated {generated} tokens in {secs:.2} s ({:.1} tok/s)", generated as f64 / secs);
    Ok(())
}
