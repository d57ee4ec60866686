use std::path::PathBuf;

use anyhow::Context;

use super::ModelArgs;
use crate::util::read_jsonl;

#[derive(clap::Args)]
#[command(group = clap::ArgGroup::new("input").required(true))]
pub struct TokenizeArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// The text to tokenize.
    #[arg(long, group = "input")]
    text: Option<String>,
    /// A JSONL file of {"text": "..."} objects; one output line per input line.
    #[arg(long, group = "input")]
    texts_file: Option<PathBuf>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct TextLine {
    text: String,
}

pub fn run(args: TokenizeArgs) -> anyhow::Result<()> {
    let texts = match (&args.text, &args.texts_file) {
        (Some(t), _) => vec![t.clone()],
        (None, Some(path)) => read_jsonl::<TextLine>(path)?.into_iter().map(|l| l.text).collect(),
        (None, None) => unreachable!("clap requires one input"),
    };
    let loaded = args.model.load()?;
    for text in texts {
        let ids = loaded.tokenizer.encode(&text).map_err(anyhow::Error::msg).context("tokenizing")?;
        println!("{}", serde_json::json!({ "ids": ids }));
    }
    Ok(())
}
