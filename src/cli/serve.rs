//! `braid serve`: its flags, and the start-up that turns them into what `server::run` takes
//! (the model loaded, the engine built with its prompt cache attached, plain config).

use std::path::Path;

use super::cache::PromptCacheArgs;
use super::{EngineArgs, ModelArgs};
use crate::engine::Engine;
use crate::server::{self, ServerConfig};

#[derive(clap::Args)]
pub struct ServeArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    engine: EngineArgs,
    #[command(flatten)]
    cache: PromptCacheArgs,
    /// Name of this replica, sent back as the `X-Braid-Replica` response header and in /health
    /// (to see which replica behind a load balancer answered). Default: the listening address.
    #[arg(long)]
    replica_id: Option<String>,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port to listen on (0 picks a free one; the summary line says which).
    #[arg(long, default_value_t = 8000)]
    port: u16,
    /// Model name clients send in "model" and see in /v1/models. Default: the file's stem.
    #[arg(long)]
    served_model_name: Option<String>,
    /// Requests that may wait for a free sequence slot; beyond that: 429 with Retry-After.
    #[arg(long, default_value_t = 256)]
    queue_size: usize,
    /// Seconds a request may wait, from its arrival until the engine starts it (for a slot,
    /// then in the engine's queue for KV blocks), before it is answered 503 and dropped. A
    /// prefill under way is never cut off.
    #[arg(long, default_value_t = 60.0)]
    queue_timeout: f64,
    /// Require `Authorization: Bearer KEY` on /v1/*, /tokenize and /detokenize (not on /health
    /// or /metrics).
    #[arg(long, env = "BRAID_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Log prompts (never logged otherwise).
    #[arg(long)]
    log_prompts: bool,
    /// Parse special-token text in chat message contents and names (e.g. `<|im_start|>`) as
    /// control tokens, as llama.cpp and vLLM do. Off: contents are plain text, so a user cannot
    /// forge turns.
    #[arg(long)]
    allow_special_tokens_in_content: bool,
    /// Largest request body in bytes; larger ones are answered 413.
    #[arg(long, default_value_t = server::DEFAULT_MAX_REQUEST_BYTES)]
    max_request_bytes: usize,
    /// Seconds running requests may take to finish after SIGTERM/SIGINT before exit.
    #[arg(long, default_value_t = 30.0)]
    shutdown_grace: f64,
}

/// The model's name in the API when none is given: the GGUF file's name without `.gguf`, or
/// the dummy preset's name (`llama-3.2-1b`, whose dots are not an extension).
fn served_name(path: &Path) -> String {
    let name = path.file_name().map_or_else(|| "default".into(), |n| n.to_string_lossy().into_owned());
    name.strip_suffix(".gguf").map_or_else(|| name.clone(), str::to_string)
}

impl ServeArgs {
    /// The server's part of the flags; the model's name is known once it is loaded.
    fn server_config(&self, max_num_seqs: usize, served_model_name: String) -> ServerConfig {
        ServerConfig {
            host: self.host.clone(),
            port: self.port,
            served_model_name,
            replica_id: self.replica_id.clone(),
            max_num_seqs,
            queue_size: self.queue_size,
            queue_timeout: self.queue_timeout,
            api_key: self.api_key.clone().filter(|k| !k.is_empty()),
            log_prompts: self.log_prompts,
            allow_special_in_content: self.allow_special_tokens_in_content,
            max_request_bytes: self.max_request_bytes,
            shutdown_grace: self.shutdown_grace,
            prompt_cache_dir: self.cache.prompt_cache_dir.clone(),
        }
    }
}

pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    let engine_config = args.engine.config()?;
    // The flags are checked before the model loads (which may take a while); the name is not
    // known yet, and does not need checking.
    args.server_config(engine_config.max_num_seqs, String::new()).check()?;
    eprintln!("braid: loading {} ...", crate::loader::model_path(args.model.model.clone()).display());
    let loaded = args.model.load()?;
    let name = args.served_model_name.clone().unwrap_or_else(|| served_name(&loaded.path));
    let config = args.server_config(engine_config.max_num_seqs, name);
    let mut engine = Engine::new(loaded.model.clone(), loaded.tokenizer.eos_ids.clone(), engine_config)?;
    args.cache.attach(&mut engine, &loaded)?;
    server::run(config, engine, loaded.tokenizer, loaded.chat_template)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_drop_only_the_gguf_extension() {
        assert_eq!(served_name(Path::new("models/SmolLM2-135M-Instruct.Q4_1.gguf")), "SmolLM2-135M-Instruct.Q4_1");
        assert_eq!(served_name(Path::new("llama-3.2-1b")), "llama-3.2-1b");
    }
}
