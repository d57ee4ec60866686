//! The `braid` command line.

pub mod cache;
mod convert;
mod generate;
mod serve;
mod tokenize;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "braid", version, about = "Serve a language model to many people at once from one machine")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate text for one prompt or a file of prompts.
    Generate(generate::GenerateArgs),
    /// Print the token ids of texts (no BOS added; special-token text is parsed).
    Tokenize(tokenize::TokenizeArgs),
    /// Serve the model over an OpenAI-compatible HTTP API.
    Serve(serve::ServeArgs),
    /// Inspect and fill the prompt cache folder: save, ls, rm, clear.
    Cache(cache::CacheArgs),
    /// Measure an OpenAI-compatible server (braid or any other): TTFT, TPOT, ITL, throughput.
    Bench(crate::bench::BenchArgs),
    /// Convert a Hugging Face model folder to a GGUF file, optionally quantized.
    Convert(convert::ConvertArgs),
}

/// Flags every model-loading command shares.
#[derive(clap::Args, Debug, Clone)]
pub struct ModelArgs {
    /// GGUF file; Hugging Face folder (config.json, safetensors, tokenizer.json); or a folder
    /// holding one GGUF file (and optionally tokenizer.json). Defaults to $BRAID_MODEL, else the
    /// default model installed by `make model`.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// The longest sequence (prompt and output) served, when less than the model's context
    /// (vLLM's flag). It also picks Phi-3 longrope's factor set, as llama.cpp does: the short
    /// factors when it is at most the model's original context.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_model_len: Option<u32>,
    /// Where the model runs: cpu, cuda (the first GPU; needs a build with `--features cuda`),
    /// or auto (cuda when built with it and a GPU is present, else cpu).
    #[arg(long, value_enum, default_value_t = DeviceArg::Auto)]
    pub device: DeviceArg,
    /// `auto` reads the --model file; `dummy` makes random weights of the --model-config shape
    /// (for benchmarks without weight files; prompts are then token ids).
    #[arg(long, value_enum, default_value_t = LoadFormat::Auto)]
    pub load_format: LoadFormat,
    /// Shape of the dummy model: llama-3.2-1b, llama-3.1-8b, qwen2.5-7b or smollm2-135m.
    #[arg(long, required_if_eq("load_format", "dummy"))]
    pub model_config: Option<String>,
    /// Seed of the dummy weights (the CPU and the GPU draw the same weights from it).
    #[arg(long, default_value_t = 0)]
    pub dummy_seed: u64,
    /// GPU: braid's batch-invariant matrix products instead of cuBLAS, so a request's tokens
    /// are the same bits whatever else is batched with it (slower; the CPU always is).
    #[arg(long)]
    pub batch_invariant: bool,
}

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceArg {
    Auto,
    Cpu,
    Cuda,
}

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoadFormat {
    Auto,
    Dummy,
}

impl ModelArgs {
    pub fn placement(&self) -> anyhow::Result<crate::loader::Placement> {
        #[cfg(feature = "cuda")]
        {
            if self.device == DeviceArg::Cuda || (self.device == DeviceArg::Auto && crate::gpu::available()) {
                return Ok(crate::loader::Placement::cuda(self.batch_invariant)?);
            }
        }
        if self.device == DeviceArg::Cuda {
            anyhow::bail!("--device cuda: this braid was built without CUDA (build with `make build-cuda`)");
        }
        Ok(crate::loader::Placement::Cpu)
    }

    pub fn load(&self) -> anyhow::Result<crate::loader::LoadedModel> {
        let placement = self.placement()?;
        if self.load_format == LoadFormat::Dummy {
            if self.model.is_some() {
                anyhow::bail!("--load-format dummy makes its own weights: give --model-config instead of --model");
            }
            if self.max_model_len.is_some() {
                anyhow::bail!("--max-model-len applies to --model files; a dummy preset has its own context");
            }
            let name = self.model_config.as_deref().expect("clap requires --model-config with dummy");
            return Ok(crate::loader::load_dummy(name, self.dummy_seed, &placement)?);
        }
        if self.model_config.is_some() {
            anyhow::bail!("--model-config is for --load-format dummy");
        }
        let path = crate::loader::model_path(self.model.clone());
        if self.model.is_none() && !path.exists() {
            anyhow::bail!("the default model {} is not installed; run `make model` (or pass --model)", path.display());
        }
        Ok(crate::loader::load_with(&path, &placement, self.max_model_len.map(|n| n as usize))?)
    }
}

/// Flags of the batching engine, shared by `generate` and `serve`.
#[derive(clap::Args, Debug, Clone)]
pub struct EngineArgs {
    /// Bytes of KV cache (e.g. 2000000000 or 2G). Default: a quarter of available memory,
    /// capped at what --max-num-seqs sequences of full context need.
    #[arg(long, value_parser = cache::parse_bytes)]
    pub kv_cache_bytes: Option<u64>,
    /// Most sequences decoding at once.
    #[arg(long, default_value_t = 64)]
    pub max_num_seqs: usize,
    /// Most tokens in one forward pass (decodes plus prefill chunks): the prefill chunk size.
    #[arg(long, default_value_t = 512)]
    pub max_num_batched_tokens: usize,
    /// Tokens per KV-cache block.
    #[arg(long, default_value_t = 16)]
    pub block_size: usize,
    /// Attention window per sequence, in tokens: each token sees the first 4 and the most
    /// recent ones, and older blocks are freed (like mlx-lm's rotating cache). Off by default.
    #[arg(long)]
    pub max_kv_size: Option<usize>,
}

impl EngineArgs {
    pub fn config(&self) -> anyhow::Result<crate::engine::EngineConfig> {
        if self.max_num_seqs == 0 || self.max_num_batched_tokens == 0 || self.block_size == 0 {
            anyhow::bail!("--max-num-seqs, --max-num-batched-tokens and --block-size must be at least 1");
        }
        if self.max_kv_size.is_some_and(|w| w <= crate::engine::core::WINDOW_KEEP) {
            anyhow::bail!(
                "--max-kv-size must be more than the {} tokens always kept",
                crate::engine::core::WINDOW_KEEP
            );
        }
        Ok(crate::engine::EngineConfig {
            block_size: self.block_size,
            kv_cache_bytes: self.kv_cache_bytes.map(|b| b as usize),
            max_num_seqs: self.max_num_seqs,
            max_num_batched_tokens: self.max_num_batched_tokens,
            max_kv_size: self.max_kv_size,
        })
    }
}

pub fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("BRAID_LOG").unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Generate(args) => generate::run(args),
        Command::Tokenize(args) => tokenize::run(args),
        Command::Serve(args) => serve::run(args),
        Command::Bench(args) => crate::bench::run(args),
        Command::Cache(args) => cache::run(args),
        Command::Convert(args) => convert::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both byte budgets take the same syntax.
    #[test]
    fn kv_cache_bytes_takes_sizes_like_the_prompt_cache_budget() {
        let engine = |value: &str| {
            #[derive(Parser)]
            struct Probe {
                #[command(flatten)]
                engine: EngineArgs,
            }
            Probe::try_parse_from(["probe", "--kv-cache-bytes", value])
                .map(|p| p.engine.config().unwrap().kv_cache_bytes)
        };
        assert_eq!(engine("2G").unwrap(), Some(2 << 30));
        assert_eq!(engine("1500000000").unwrap(), Some(1_500_000_000));
        assert!(engine("lots").is_err());
    }

    fn model_args(args: &[&str]) -> Result<ModelArgs, clap::Error> {
        #[derive(Parser)]
        struct Probe {
            #[command(flatten)]
            model: ModelArgs,
        }
        Probe::try_parse_from(std::iter::once("probe").chain(args.iter().copied())).map(|p| p.model)
    }

    /// Dummy weights need a shape and take no file; the shape flag needs dummy weights.
    #[test]
    fn dummy_weights_flags_are_checked() {
        assert!(model_args(&["--load-format", "dummy"]).is_err(), "--model-config is required");
        let err = |args: &[&str]| model_args(args).unwrap().load().err().expect("refused").to_string();
        assert!(
            err(&["--load-format", "dummy", "--model-config", "smollm2-135m", "--model", "x.gguf", "--device", "cpu"])
                .contains("--model-config instead of --model")
        );
        assert!(err(&["--model-config", "llama-3.2-1b", "--device", "cpu"]).contains("--load-format dummy"));
        assert!(err(&["--load-format", "dummy", "--model-config", "gpt-9", "--device", "cpu"]).contains("gpt-9"));
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn asking_a_cpu_build_for_cuda_says_how_to_get_it() {
        let err = model_args(&["--device", "cuda"]).unwrap().load().err().expect("refused").to_string();
        assert!(err.contains("make build-cuda"), "{err}");
    }
}
