//! `braid convert HF_FOLDER OUT.gguf [--quantize TYPE]`: a Hugging Face model folder to one GGUF
//! file (`crate::convert`).

use std::path::PathBuf;

use crate::convert::OutType;

#[derive(clap::Args, Debug)]
pub struct ConvertArgs {
    /// The Hugging Face model folder (config.json, *.safetensors, tokenizer.json, ...).
    pub input: PathBuf,
    /// The GGUF file to write.
    pub output: PathBuf,
    /// Type of the weight matrices: f32, f16, bf16, q8_0, q4_0, q4_k or q6_k. Norms, biases and
    /// routers stay f32; matrices whose rows are not whole blocks of the type fall back
    /// (q4_k → q5_0, q6_k → q8_0, then f16), as llama.cpp does.
    #[arg(long, short = 'q', value_enum, default_value_t = OutType::F16)]
    pub quantize: OutType,
    /// Replace OUTPUT if it exists.
    #[arg(long)]
    pub force: bool,
}

pub fn run(args: ConvertArgs) -> anyhow::Result<()> {
    if args.output.exists() && !args.force {
        anyhow::bail!("{} exists; pass --force to replace it", args.output.display());
    }
    if args.output.extension().is_none_or(|e| e != "gguf") {
        anyhow::bail!("{}: the output should be a .gguf file", args.output.display());
    }
    let bar = indicatif::ProgressBar::new(0).with_style(
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} tensors {elapsed} {wide_msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let summary = crate::convert::convert(&args.input, &args.output, args.quantize, &bar);
    bar.finish_and_clear();
    let summary = summary?;
    for (name, dtype) in &summary.fallbacks {
        eprintln!("note: {name} is {dtype:?}: its rows are not whole blocks of {:?}", args.quantize.dtype());
    }
    println!(
        "wrote {} ({}, {} tensors, {:.1} MB)",
        args.output.display(),
        summary.architecture.name(),
        summary.tensors,
        summary.bytes as f64 / 1e6
    );
    Ok(())
}
