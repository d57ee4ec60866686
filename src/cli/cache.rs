//! `braid cache ...` and the prompt-cache flags of `serve` and `generate`.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Subcommand;

use super::{EngineArgs, ModelArgs};
use crate::engine::disk::{SaveMode, dummy_fingerprint, folder, folder_fingerprint, gguf_fingerprint};
use crate::engine::{DiskCache, Engine, SamplingParams};
use crate::loader::LoadedModel;

/// Parses a byte count: a number, optionally followed by K, M, G or T (powers of 1024) and an
/// optional B ("500M", "4GiB", "1000000").
pub fn parse_bytes(text: &str) -> Result<u64, String> {
    let t = text.trim().trim_end_matches(['B', 'b']).trim_end_matches(['i', 'I']);
    let (digits, shift) = match t.chars().last().map(|c| c.to_ascii_uppercase()) {
        Some('K') => (&t[..t.len() - 1], 10),
        Some('M') => (&t[..t.len() - 1], 20),
        Some('G') => (&t[..t.len() - 1], 30),
        Some('T') => (&t[..t.len() - 1], 40),
        _ => (t, 0),
    };
    let n: f64 = digits.trim().parse().map_err(|_| format!("'{text}' is not a byte count (e.g. 500M, 4G, 1000000)"))?;
    if !(n.is_finite() && n >= 0.0) {
        return Err(format!("'{text}' is not a byte count"));
    }
    Ok((n * (1u64 << shift) as f64) as u64)
}

/// Where the disk tier of the prefix cache lives.
#[derive(clap::Args, Debug, Clone)]
pub struct PromptCacheArgs {
    /// Folder for the disk tier of the prefix cache: KV blocks leaving memory, and those of
    /// finished requests, are kept there and loaded back on a prefix hit, also after a restart.
    #[arg(long, env = "BRAID_PROMPT_CACHE_DIR")]
    pub prompt_cache_dir: Option<PathBuf>,
    /// Most bytes the folder may hold (least recently used blocks go first), e.g. 4G.
    #[arg(long, default_value = "4G", value_parser = parse_bytes)]
    pub prompt_cache_bytes: u64,
}

impl PromptCacheArgs {
    /// Opens the folder for this engine's model and layout and attaches it (when asked for).
    pub fn attach(&self, engine: &mut Engine, loaded: &LoadedModel) -> anyhow::Result<()> {
        if let Some(disk) = self.open(engine, loaded)? {
            engine.attach_disk_cache(disk)?;
        }
        Ok(())
    }

    fn open(&self, engine: &Engine, loaded: &LoadedModel) -> anyhow::Result<Option<DiskCache>> {
        let Some(dir) = &self.prompt_cache_dir else { return Ok(None) };
        let fingerprint = match loaded.dummy_seed {
            Some(seed) => dummy_fingerprint(&loaded.path.to_string_lossy(), seed),
            None if loaded.path.is_dir() => folder_fingerprint(&loaded.path)
                .with_context(|| format!("cannot fingerprint {}", loaded.path.display()))?,
            None => gguf_fingerprint(&loaded.path)
                .with_context(|| format!("cannot fingerprint {}", loaded.path.display()))?,
        };
        let identity = engine.disk_identity(fingerprint);
        let name = loaded
            .path
            .file_name()
            .map_or_else(|| loaded.model.config().name.clone(), |n| n.to_string_lossy().into_owned());
        let disk = DiskCache::open(dir, self.prompt_cache_bytes, identity, &name)
            .context("--prompt-cache-dir is not usable")?;
        Ok(Some(disk))
    }
}

#[derive(clap::Args)]
pub struct CacheArgs {
    #[command(subcommand)]
    command: CacheCommand,
}

/// The folder argument of the commands that only look at files.
#[derive(clap::Args)]
struct FolderArg {
    /// The prompt cache folder.
    #[arg(long, env = "BRAID_PROMPT_CACHE_DIR")]
    prompt_cache_dir: PathBuf,
}

/// A prompt, from a file or the command line.
#[derive(clap::Args)]
#[command(group = clap::ArgGroup::new("text").required(true))]
struct PromptArgs {
    /// File holding the prompt text (special-token text such as <|im_start|> is parsed).
    #[arg(long, group = "text")]
    prompt_file: Option<PathBuf>,
    /// The prompt text itself.
    #[arg(long, group = "text")]
    prompt: Option<String>,
    /// Render the text as a system message through the model's chat template (no generation
    /// prompt): the prefix of every conversation that starts with this system prompt.
    #[arg(long)]
    chat: bool,
}

#[derive(Subcommand)]
enum CacheCommand {
    /// Compute a prompt's KV blocks and store them in the folder (e.g. a long system prompt,
    /// so that the first request after a start finds it warm).
    Save {
        #[command(flatten)]
        model: ModelArgs,
        #[command(flatten)]
        engine: EngineArgs,
        #[command(flatten)]
        cache: PromptCacheArgs,
        #[command(flatten)]
        prompt: PromptArgs,
    },
    /// List what the folder holds, per model and layout.
    Ls {
        #[command(flatten)]
        folder: FolderArg,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
    /// Remove one model's blocks (FOLDER as `ls` shows it, or a prefix of it), or one prompt's.
    Rm {
        #[command(flatten)]
        folder: FolderArg,
        /// The subfolder of one model and layout, as `ls` prints it.
        #[arg(required_unless_present_any = ["prompt_file", "prompt"])]
        id: Option<String>,
        #[command(flatten)]
        model: ModelArgs,
        #[command(flatten)]
        engine: EngineArgs,
        /// Remove the blocks of this prompt (and so of every longer prompt that starts with it).
        #[arg(long, conflicts_with_all = ["id", "prompt"])]
        prompt_file: Option<PathBuf>,
        #[arg(long, conflicts_with = "id")]
        prompt: Option<String>,
        #[arg(long)]
        chat: bool,
    },
    /// Remove every block file from the folder.
    Clear {
        #[command(flatten)]
        folder: FolderArg,
    },
}

/// The prompt's token ids, as `serve` would see them.
fn prompt_ids(loaded: &LoadedModel, file: Option<&Path>, text: Option<&str>, chat: bool) -> anyhow::Result<Vec<u32>> {
    let text = match (file, text) {
        (Some(f), _) => std::fs::read_to_string(f).with_context(|| format!("cannot read {}", f.display()))?,
        (None, Some(t)) => t.to_string(),
        (None, None) => anyhow::bail!("give --prompt-file or --prompt"),
    };
    let rendered = if chat {
        let template = loaded.chat_template.as_ref().context("--chat: this model has no chat template")?;
        template.render(&vec![serde_json::json!({"role": "system", "content": text})], false)?
    } else {
        text
    };
    let ids = loaded.tokenizer.encode_prompt(&rendered).map_err(anyhow::Error::msg)?;
    anyhow::ensure!(!ids.is_empty(), "the prompt is empty");
    Ok(ids)
}

/// Takes the folder's lock for a command that removes files (as `DiskCache::open` does), so
/// that it never removes files under a running server; `ls` only reads, and takes none.
fn lock_folder(root: &Path) -> anyhow::Result<folder::FolderLock> {
    folder::lock(root).with_context(|| format!("prompt cache folder {}", root.display()))
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1 << 20) as f64
}

pub fn run(args: CacheArgs) -> anyhow::Result<()> {
    match args.command {
        CacheCommand::Save { model, engine, cache, prompt } => {
            anyhow::ensure!(cache.prompt_cache_dir.is_some(), "give --prompt-cache-dir (or BRAID_PROMPT_CACHE_DIR)");
            let config = engine.config()?;
            let loaded = model.load()?;
            let ids = prompt_ids(&loaded, prompt.prompt_file.as_deref(), prompt.prompt.as_deref(), prompt.chat)?;
            let mut engine = Engine::new(loaded.model.clone(), loaded.tokenizer.eos_ids.clone(), config)?;
            // Every block, however long the prompt: nothing here competes with the writes.
            let disk = cache.open(&engine, &loaded)?.expect("the folder was given").with_write_through(SaveMode::Wait);
            engine.attach_disk_cache(disk)?;
            let start = std::time::Instant::now();
            engine.add_request(ids.clone(), SamplingParams::greedy(1))?;
            while engine.has_work() {
                engine.step()?;
            }
            engine.flush_disk_cache();
            let s = engine.stats();
            let disk = s.disk.unwrap_or_default();
            let blocks = ids.len() / s.block_size;
            println!(
                "{} tokens: {blocks} blocks of {} stored ({} computed, {} already cached) in {:.2} s; folder {:.1} of {:.1} MiB",
                ids.len(),
                s.block_size,
                s.prefilled_tokens,
                s.prefix_hit_tokens,
                start.elapsed().as_secs_f64(),
                mib(disk.bytes),
                mib(disk.budget)
            );
        }
        CacheCommand::Ls { folder: f, json } => {
            let summaries = folder::summarize(&f.prompt_cache_dir)
                .with_context(|| format!("cannot read {}", f.prompt_cache_dir.display()))?;
            for s in &summaries {
                if json {
                    println!("{}", serde_json::to_string(s)?);
                } else {
                    let window = if s.window > 0 { format!(", window {}", s.window) } else { String::new() };
                    println!(
                        "{}  {}  block size {}{window}  {} blocks  {:.1} MiB  used {} s ago",
                        s.folder,
                        s.model,
                        s.block_size,
                        s.blocks,
                        mib(s.bytes),
                        s.idle_secs
                    );
                }
            }
            if !json {
                let total: u64 = summaries.iter().map(|s| s.bytes).sum();
                println!("{} models, {:.1} MiB in {}", summaries.len(), mib(total), f.prompt_cache_dir.display());
            }
        }
        CacheCommand::Rm { folder: f, id, model, engine, prompt_file, prompt, chat } => {
            if let Some(id) = id {
                anyhow::ensure!(
                    !id.is_empty() && id.chars().all(|c| c.is_ascii_hexdigit()),
                    "'{id}' is not a folder id as `braid cache ls` prints it"
                );
                let _lock = lock_folder(&f.prompt_cache_dir)?;
                let (files, bytes) = folder::remove(&f.prompt_cache_dir, &id)?;
                println!("removed {files} files, {:.1} MiB", mib(bytes));
            } else {
                let loaded = model.load()?;
                let ids = prompt_ids(&loaded, prompt_file.as_deref(), prompt.as_deref(), chat)?;
                let engine = Engine::new(loaded.model.clone(), loaded.tokenizer.eos_ids.clone(), engine.config()?)?;
                let cache = PromptCacheArgs {
                    prompt_cache_dir: Some(f.prompt_cache_dir.clone()),
                    prompt_cache_bytes: u64::MAX,
                };
                let disk = cache.open(&engine, &loaded)?.expect("the folder was given");
                let hashes = crate::engine::block_manager::prefix_hashes(&ids, engine.stats().block_size);
                let removed = hashes.iter().filter(|&&h| disk.remove(h)).count();
                println!("removed {removed} of the prompt's {} blocks", hashes.len());
            }
        }
        CacheCommand::Clear { folder: f } => {
            let _lock = lock_folder(&f.prompt_cache_dir)?;
            let (files, bytes) = folder::remove(&f.prompt_cache_dir, "")
                .with_context(|| format!("cannot clear {}", f.prompt_cache_dir.display()))?;
            println!("removed {files} files, {:.1} MiB", mib(bytes));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::parse_bytes;

    #[test]
    fn byte_counts_take_binary_suffixes() {
        assert_eq!(parse_bytes("1000000"), Ok(1_000_000));
        assert_eq!(parse_bytes("500M"), Ok(500 << 20));
        assert_eq!(parse_bytes("4GiB"), Ok(4 << 30));
        assert_eq!(parse_bytes("1.5k"), Ok(1536));
        assert!(parse_bytes("lots").is_err());
        assert!(parse_bytes("-1G").is_err());
    }
}
