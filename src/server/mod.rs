//! `braid serve`: the OpenAI-compatible HTTP server (axum + tokio). One engine thread per model;
//! handlers validate, queue, stream.

mod admission;
mod choice;
mod engine_thread;
mod error;
mod metrics;
mod openai;
mod openapi;
mod prompt;
mod routes;
mod run;
mod session;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::HeaderValue;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use subtle::ConstantTimeEq;

pub use admission::Admission;
pub use engine_thread::EngineHandle;
pub use error::ApiError;

use crate::engine::{Engine, Limits};
use crate::tokenizer::{ChatTemplate, TextTokenizer};

pub use prompt::DEFAULT_MAX_REQUEST_BYTES;

pub const SYSTEM_FINGERPRINT: &str = concat!("braid-", env!("CARGO_PKG_VERSION"));

/// How to serve: the HTTP side of `braid serve`'s flags (cli/serve.rs), with the model's name
/// in the API decided.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub host: String,
    /// 0 picks a free port (the summary line says which).
    pub port: u16,
    /// The name clients send in "model" and see in /v1/models.
    pub served_model_name: String,
    /// Sent as `X-Braid-Replica` and in /health; None: the listening address.
    pub replica_id: Option<String>,
    /// Requests running at once: the engine's `max_num_seqs` (the admission's slots).
    pub max_num_seqs: usize,
    /// Requests that may wait for a slot; beyond that: 429.
    pub queue_size: usize,
    /// Seconds a request may wait, from its arrival until the engine starts it.
    pub queue_timeout: f64,
    /// Required as `Authorization: Bearer KEY` on the routes that use the model (None or
    /// empty: none).
    pub api_key: Option<String>,
    pub log_prompts: bool,
    /// Special-token text in chat contents becomes control tokens (`--allow-special-tokens-in-content`).
    pub allow_special_in_content: bool,
    /// Largest request body; larger ones are answered 413.
    pub max_request_bytes: usize,
    /// Seconds running requests may take to finish after SIGTERM/SIGINT.
    pub shutdown_grace: f64,
    /// The prompt cache's folder, for the start-up summary (the engine holds the cache).
    pub prompt_cache_dir: Option<std::path::PathBuf>,
}

impl ServerConfig {
    /// Refuses values the server cannot run with (each message names its `braid serve` flag).
    pub fn check(&self) -> anyhow::Result<()> {
        if !(self.queue_timeout > 0.0 && self.queue_timeout.is_finite()) {
            anyhow::bail!("--queue-timeout must be a positive number of seconds");
        }
        if self.max_request_bytes == 0 {
            anyhow::bail!("--max-request-bytes must be at least 1");
        }
        self.replica_header()?;
        Ok(())
    }

    fn replica_header(&self) -> anyhow::Result<Option<HeaderValue>> {
        self.replica_id
            .as_deref()
            .map(HeaderValue::from_str)
            .transpose()
            .map_err(|_| anyhow::anyhow!("--replica-id must be visible ASCII text"))
    }
}

pub struct AppState {
    pub engine: EngineHandle,
    pub tokenizer: Arc<TextTokenizer>,
    pub template: Option<Arc<ChatTemplate>>,
    pub model_name: String,
    pub max_context: usize,
    pub vocab_size: usize,
    pub admission: Admission,
    pub created: u64,
    pub log_prompts: bool,
    /// `--allow-special-tokens-in-content`.
    pub allow_special_in_content: bool,
    pub max_request_bytes: usize,
    api_key: Option<String>,
    /// Set once the listening address is known.
    replica: std::sync::OnceLock<HeaderValue>,
}

impl AppState {
    pub fn replica(&self) -> &str {
        self.replica.get().and_then(|v| v.to_str().ok()).unwrap_or("")
    }

    /// What one request may hold: what the engine's `Request`s are checked against.
    pub fn limits(&self) -> Limits {
        Limits { vocab_size: self.vocab_size, max_context: self.max_context }
    }

    pub fn check_model(&self, model: &str) -> Result<(), ApiError> {
        if model == self.model_name { Ok(()) } else { Err(ApiError::model_not_found(model)) }
    }
}

pub const REPLICA_HEADER: &str = "x-braid-replica";

/// How long a server whose engine has stopped goes on answering (/health 503 with the reason,
/// requests 503) before it shuts down and exits non-zero.
const STOPPED_ENGINE_LINGER: Duration = Duration::from_secs(2);

async fn add_replica_header(State(state): State<Arc<AppState>>, request: Request, next: Next) -> Response {
    let mut response = next.run(request).await;
    if let Some(v) = state.replica.get() {
        response.headers_mut().insert(REPLICA_HEADER, v.clone());
    }
    response
}

async fn require_api_key(State(state): State<Arc<AppState>>, request: Request, next: Next) -> Response {
    if let Some(key) = &state.api_key {
        let given = request
            .headers()
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        if !bool::from(given.as_bytes().ct_eq(key.as_bytes())) {
            return ApiError::unauthorized().into_response();
        }
    }
    next.run(request).await
}

pub fn router(state: Arc<AppState>) -> Router {
    // Every route that reads or spends the model is behind the key; the probes a load balancer
    // or Prometheus polls (/health, /metrics) are not.
    let keyed = Router::new()
        .route("/v1/chat/completions", post(routes::chat_completions))
        .route("/v1/completions", post(routes::completions))
        .route("/v1/models", get(routes::models))
        .route("/tokenize", post(routes::tokenize))
        .route("/detokenize", post(routes::detokenize))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_api_key));
    Router::new()
        .merge(keyed)
        .route("/health", get(routes::health))
        .route("/metrics", get(routes::metrics))
        .route("/openapi.json", get(openapi::serve))
        .fallback(routes::fallback)
        .layer(DefaultBodyLimit::max(state.max_request_bytes))
        .layer(middleware::from_fn_with_state(state.clone(), add_replica_header))
        .with_state(state)
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = ctrl_c => {},
        _ = term.recv() => {},
    }
}

/// Serves `engine` (its model loaded, its prompt cache attached) with the model's tokenizer
/// and chat template until SIGTERM/SIGINT, or until the engine stops (then an error: the exit
/// code says so).
pub fn run(
    config: ServerConfig,
    engine: Engine,
    tokenizer: TextTokenizer,
    template: Option<ChatTemplate>,
) -> anyhow::Result<()> {
    config.check()?;
    let replica = config.replica_header()?;
    // Read once: a fault to cause on purpose, for the tests of what a failing engine does.
    let fault = engine_thread::TestFault::from_env().map_err(anyhow::Error::msg)?;
    if let Some(fault) = fault {
        tracing::warn!("BRAID_TEST_FAULT: the engine will fail on purpose ({fault:?}); for tests only");
    }
    let max_context = engine.max_context();
    let vocab_size = engine.model().vocab_size();
    let kv = engine.stats();
    let kv_bytes = kv.kv_blocks_total * crate::model::KvCache::bytes_per_block(engine.model().config(), kv.block_size);
    metrics::install();
    let state = Arc::new(AppState {
        engine: EngineHandle::spawn_with_fault(engine, fault),
        vocab_size,
        tokenizer: Arc::new(tokenizer),
        template: template.map(Arc::new),
        model_name: config.served_model_name.clone(),
        max_context,
        admission: Admission::new(
            config.max_num_seqs,
            config.queue_size,
            Duration::from_secs_f64(config.queue_timeout),
        ),
        created: std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs()),
        log_prompts: config.log_prompts,
        allow_special_in_content: config.allow_special_in_content,
        max_request_bytes: config.max_request_bytes,
        api_key: config.api_key.clone().filter(|k| !k.is_empty()),
        replica: std::sync::OnceLock::new(),
    });
    let engine_handle = state.engine.clone();
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    runtime.block_on(async move {
        let addr: SocketAddr = format!("{}:{}", config.host, config.port).parse()?;
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let bound = listener.local_addr()?;
        let _ = state.replica.set(replica.unwrap_or_else(|| HeaderValue::from_str(&bound.to_string()).expect("an address is a header value")));
        eprintln!(
            "braid: serving '{}' on http://{bound}/v1 | KV cache {} tokens ({:.0} MiB){} | context {max_context} | max {} running, {} queued, queue timeout {} s{}",
            config.served_model_name,
            kv.kv_blocks_total * kv.block_size,
            kv_bytes as f64 / (1 << 20) as f64,
            kv.disk.as_ref().map_or(String::new(), |d| format!(
                " | prompt cache {} ({} files, {:.0} of {:.0} MiB)",
                config.prompt_cache_dir.as_deref().unwrap_or(std::path::Path::new("")).display(),
                d.files,
                d.bytes as f64 / (1 << 20) as f64,
                d.budget as f64 / (1 << 20) as f64
            )),
            config.max_num_seqs,
            config.queue_size,
            config.queue_timeout,
            if state.api_key.is_some() { " | API key required" } else { "" },
        );
        let grace = Duration::from_secs_f64(config.shutdown_grace.max(0.0));
        let closing = state.clone();
        // A signal, or the engine stopping for good: either way stop admitting, let what runs
        // finish (a stopped engine has already answered its requests), and exit.
        let signal = async move {
            let stopped = tokio::select! {
                _ = shutdown_signal() => None,
                reason = closing.engine.failed() => Some(reason),
            };
            closing.admission.close();
            match stopped {
                None => eprintln!("braid: shutting down; letting running requests finish (up to {} s)", grace.as_secs_f64()),
                Some(reason) => {
                    eprintln!("braid: the engine has stopped ({reason}); shutting down");
                    // Go on answering a moment, so health checks see /health's 503 and why
                    // rather than only a refused connection.
                    tokio::time::sleep(STOPPED_ENGINE_LINGER).await;
                }
            }
            // Past the grace period, leave whatever is still running.
            tokio::spawn(async move {
                tokio::time::sleep(grace).await;
                eprintln!("braid: grace period over; exiting");
                std::process::exit(if closing.engine.failure().is_some() { 1 } else { 0 });
            });
        };
        axum::serve(listener, router(state)).with_graceful_shutdown(signal).await?;
        anyhow::Ok(())
    })?;
    // A stopped engine makes the exit code say so (a supervisor restarts the replica).
    let failure = engine_handle.failure();
    // Lets the engine finish its prompt-cache writes.
    engine_handle.shutdown();
    if let Some(reason) = failure {
        anyhow::bail!("the engine stopped: {reason}");
    }
    eprintln!("braid: stopped");
    Ok(())
}
