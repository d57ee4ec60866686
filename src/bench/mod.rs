//! `braid bench`: load generator and report against any OpenAI-compatible server.

pub mod client;
pub mod plot;
pub mod stats;
pub mod workload;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;

use client::Target;
use stats::{RequestRecord, RunMetrics, Slo};
use workload::{Body, Item, Lengths, Session, TextSource};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum WorkloadKind {
    Random,
    SharedPrefix,
    MultiTurn,
    File,
}

#[derive(clap::Args, Debug, Clone)]
pub struct BenchArgs {
    /// Base URL of the server (without /v1).
    #[arg(long, default_value = "http://127.0.0.1:8000")]
    pub url: String,
    /// Model name to send. Default: the first one the server's /v1/models lists.
    #[arg(long)]
    pub model: Option<String>,
    /// Name of this server in reports and plots.
    #[arg(long)]
    pub label: Option<String>,
    #[arg(long, value_enum, default_value = "random")]
    pub workload: WorkloadKind,
    /// Requests per run (multi-turn: ignored, sessions x turns). Default: max(16, 4 x concurrency).
    #[arg(short = 'n', long)]
    pub num_prompts: Option<usize>,
    /// Prompt tokens (random), fixed or a range like 64:256.
    #[arg(long, default_value = "128")]
    pub input_len: Lengths,
    /// Output tokens (max_tokens), fixed or a range.
    #[arg(long, default_value = "64")]
    pub output_len: Lengths,
    /// shared-prefix / multi-turn: tokens of the system prompt.
    #[arg(long, default_value_t = 1000)]
    pub prefix_len: usize,
    /// shared-prefix / multi-turn: tokens of each question.
    #[arg(long, default_value = "32")]
    pub question_len: Lengths,
    /// multi-turn: conversations and turns per conversation.
    #[arg(long, default_value_t = 8)]
    pub sessions: usize,
    #[arg(long, default_value_t = 4)]
    pub turns: usize,
    /// file: JSONL of {"prompt": ...} or {"messages": [...]} (optional "max_tokens").
    #[arg(long)]
    pub prompts_file: Option<PathBuf>,
    /// Requests in flight at once (multi-turn: sessions at once).
    #[arg(short = 'c', long, default_value_t = 1)]
    pub concurrency: usize,
    /// Poisson arrivals at this many requests per second instead of fixed concurrency
    /// (concurrency then caps requests in flight).
    #[arg(long)]
    pub rate: Option<f64>,
    /// Gamma shape of inter-arrival times with --rate: 1 is Poisson, < 1 burstier.
    #[arg(long, default_value_t = 1.0)]
    pub burstiness: f64,
    /// Several runs in one call, e.g. c=1,4,16,32 (concurrency) or rate=1,2,4.
    #[arg(long)]
    pub sweep: Option<String>,
    /// Ask the server to ignore end-of-sequence so output lengths are fixed.
    #[arg(long)]
    pub ignore_eos: bool,
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    /// Sent as logit_bias, e.g. --logit-bias 2=-100 (servers that ignore ignore_eos can be held
    /// to fixed lengths by banning the end-of-sequence token).
    #[arg(long, value_parser = parse_bias)]
    pub logit_bias: Vec<(u32, f64)>,
    /// Seed of the generated prompts; each run of a sweep adds its index.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Goodput targets, e.g. ttft=500,tpot=50 (milliseconds).
    #[arg(long)]
    pub slo: Option<String>,
    /// Model file whose tokenizer makes the prompts (default: the default model).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    #[arg(long, env = "BRAID_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Write every metric and per-request row here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Draw throughput and TTFT vs concurrency and latency distributions here (PNG).
    #[arg(long)]
    pub plot: Option<PathBuf>,
    /// Instead of running: plot (and tabulate) these earlier --json reports side by side.
    #[arg(long, num_args = 1.., conflicts_with = "sweep")]
    pub compare: Vec<PathBuf>,
    /// Seconds a single request may take before it counts as failed.
    #[arg(long, default_value_t = 600.0)]
    pub request_timeout: f64,
}

/// One run of a sweep.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunReport {
    pub concurrency: usize,
    pub rate: Option<f64>,
    pub seed: u64,
    pub metrics: RunMetrics,
    pub requests: Vec<RequestRecord>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    pub label: String,
    pub url: String,
    pub model: String,
    pub workload: WorkloadKind,
    pub input_len: String,
    pub output_len: String,
    pub ignore_eos: bool,
    pub slo: Option<Slo>,
    pub runs: Vec<RunReport>,
}

enum Plan {
    Items(Vec<Item>),
    Sessions(Vec<Session>),
}

fn parse_bias(text: &str) -> Result<(u32, f64), String> {
    let (id, bias) = text.split_once('=').ok_or("expected TOKEN_ID=BIAS")?;
    Ok((
        id.parse().map_err(|_| format!("'{id}' is not a token id"))?,
        bias.parse().map_err(|_| format!("'{bias}' is not a number"))?,
    ))
}

fn sweep_points(args: &BenchArgs) -> anyhow::Result<Vec<(usize, Option<f64>)>> {
    let Some(sweep) = &args.sweep else { return Ok(vec![(args.concurrency, args.rate)]) };
    let (key, values) = sweep.split_once('=').context("--sweep takes c=1,4,... or rate=1,2,...")?;
    values
        .split(',')
        .map(|v| match key {
            "c" | "concurrency" => Ok((v.trim().parse().context("--sweep c: not a number")?, None)),
            "rate" => Ok((args.concurrency.max(256), Some(v.trim().parse().context("--sweep rate: not a number")?))),
            other => anyhow::bail!("--sweep {other}: sweep c or rate"),
        })
        .collect()
}

fn plan(args: &BenchArgs, tokenizer: &crate::tokenizer::TextTokenizer, n: usize, seed: u64) -> anyhow::Result<Plan> {
    let mut src = TextSource::new(tokenizer, seed);
    Ok(match args.workload {
        WorkloadKind::Random => Plan::Items(workload::random(&mut src, n, args.input_len, args.output_len)),
        WorkloadKind::SharedPrefix => {
            Plan::Items(workload::shared_prefix(&mut src, n, args.prefix_len, args.question_len, args.output_len))
        }
        WorkloadKind::MultiTurn => Plan::Sessions(workload::multi_turn(
            &mut src,
            args.sessions,
            args.turns,
            args.prefix_len,
            args.question_len,
            args.output_len,
        )),
        WorkloadKind::File => {
            let path = args.prompts_file.as_ref().context("--workload file needs --prompts-file")?;
            Plan::Items(workload::from_file(path, args.output_len, seed)?)
        }
    })
}

async fn run_items(
    target: Arc<Target>,
    items: Vec<Item>,
    concurrency: usize,
    rate: Option<(f64, f64)>,
    seed: u64,
    bar: ProgressBar,
) -> Vec<RequestRecord> {
    let start = Instant::now();
    let slots = Arc::new(tokio::sync::Semaphore::new(concurrency.max(1)));
    let mut gaps = rate.map(|(r, shape)| {
        use rand::SeedableRng;
        use rand_distr::Distribution;
        let gamma = rand_distr::Gamma::new(shape, 1.0 / (r * shape)).expect("positive rate and burstiness");
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed ^ 0x5eed);
        (0..items.len()).map(move |_| gamma.sample(&mut rng)).collect::<Vec<f64>>().into_iter()
    });
    let mut tasks = Vec::new();
    let mut next_at = 0.0;
    for item in items {
        if let Some(g) = gaps.as_mut() {
            next_at += g.next().unwrap_or(0.0);
            tokio::time::sleep_until(tokio::time::Instant::from_std(start + Duration::from_secs_f64(next_at))).await;
        }
        let permit = slots.clone().acquire_owned().await.expect("semaphore open");
        let (target, bar) = (target.clone(), bar.clone());
        tasks.push(tokio::spawn(async move {
            let reply = target.send(&item.body, item.max_tokens, item.prompt_tokens, start).await;
            drop(permit);
            bar.inc(1);
            reply.record
        }));
    }
    let mut records = Vec::new();
    for t in tasks {
        records.push(t.await.expect("request task"));
    }
    records
}

async fn run_sessions(
    target: Arc<Target>,
    sessions: Vec<Session>,
    concurrency: usize,
    bar: ProgressBar,
) -> Vec<RequestRecord> {
    let start = Instant::now();
    let queue = Arc::new(Mutex::new(sessions.into_iter()));
    let records = Arc::new(Mutex::new(Vec::new()));
    let workers: Vec<_> = (0..concurrency.max(1))
        .map(|_| {
            let (queue, records, target, bar) = (queue.clone(), records.clone(), target.clone(), bar.clone());
            tokio::spawn(async move {
                loop {
                    let Some(session) = queue.lock().await.next() else { return };
                    let mut messages = vec![serde_json::json!({"role": "system", "content": session.system})];
                    for (turn, (q, &max_tokens)) in session.questions.iter().zip(&session.max_tokens).enumerate() {
                        messages.push(serde_json::json!({"role": "user", "content": q}));
                        let reply = target.send(&Body::Chat(messages.clone()), max_tokens, 0, start).await;
                        let ok = reply.record.ok();
                        let mut record = reply.record;
                        record.turn = Some(turn);
                        records.lock().await.push(record);
                        bar.inc(1);
                        if !ok {
                            break;
                        }
                        messages.push(serde_json::json!({"role": "assistant", "content": reply.text}));
                    }
                }
            })
        })
        .collect();
    for w in workers {
        w.await.expect("session worker");
    }
    Arc::try_unwrap(records).expect("workers done").into_inner()
}

async fn first_model(client: &reqwest::Client, url: &str, key: Option<&str>) -> anyhow::Result<String> {
    let mut request = client.get(format!("{url}/v1/models"));
    if let Some(k) = key {
        request = request.bearer_auth(k);
    }
    let models: serde_json::Value = request.send().await.context("cannot reach the server")?.json().await?;
    models["data"][0]["id"].as_str().map(str::to_string).context("the server lists no model; pass --model")
}

pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    if !args.compare.is_empty() {
        let reports = args
            .compare
            .iter()
            .map(|p| {
                Ok(serde_json::from_slice::<Report>(
                    &std::fs::read(p).with_context(|| format!("cannot read {}", p.display()))?,
                )?)
            })
            .collect::<anyhow::Result<Vec<Report>>>()?;
        let reports = merge_by_label(reports);
        for r in &reports {
            print_table(r);
        }
        if let Some(path) = &args.plot {
            plot::draw(&reports, path)?;
            eprintln!("plot written to {}", path.display());
        }
        return Ok(());
    }
    let slo = args.slo.as_deref().map(Slo::parse).transpose().map_err(anyhow::Error::msg)?;
    // Written so that NaN is refused too.
    let positive = |x: f64| x > 0.0;
    if args.rate.is_some_and(|r| !positive(r)) || !positive(args.burstiness) {
        anyhow::bail!("--rate and --burstiness must be positive");
    }
    let points = sweep_points(&args)?;
    let tokenizer_path = crate::loader::model_path(args.tokenizer.clone());
    let gguf = crate::gguf::GgufFile::open(&tokenizer_path)?;
    let tokenizer = crate::tokenizer::TextTokenizer::from_gguf(&gguf, None)?;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let url = args.url.trim_end_matches('/').to_string();
    // A fresh connection per request: a pooled one the server already closed would fail the request.
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs_f64(args.request_timeout))
        .pool_max_idle_per_host(0)
        .build()?;
    let model = match &args.model {
        Some(m) => m.clone(),
        None => runtime.block_on(first_model(&client, &url, args.api_key.as_deref()))?,
    };
    let target = Arc::new(Target {
        client,
        base_url: url.clone(),
        model: model.clone(),
        api_key: args.api_key.clone(),
        ignore_eos: args.ignore_eos,
        temperature: args.temperature,
        logit_bias: args.logit_bias.clone(),
    });
    let mut report = Report {
        label: args.label.clone().unwrap_or_else(|| url.clone()),
        url,
        model,
        workload: args.workload,
        input_len: format!("{}:{}", args.input_len.min, args.input_len.max),
        output_len: format!("{}:{}", args.output_len.min, args.output_len.max),
        ignore_eos: args.ignore_eos,
        slo: slo.clone(),
        runs: Vec::new(),
    };
    for (i, &(concurrency, rate)) in points.iter().enumerate() {
        let seed = args.seed + i as u64;
        let n = args.num_prompts.unwrap_or((4 * concurrency).max(16));
        let plan = plan(&args, &tokenizer, n, seed)?;
        let total = match &plan {
            Plan::Items(items) => items.len(),
            Plan::Sessions(s) => s.iter().map(|s| s.questions.len()).sum(),
        };
        let bar = ProgressBar::new(total as u64);
        bar.set_style(
            ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} {elapsed}")
                .expect("template")
                .progress_chars("=> "),
        );
        bar.set_message(match rate {
            Some(r) => format!("rate {r}/s"),
            None => format!("c={concurrency}"),
        });
        let start = Instant::now();
        let records = runtime.block_on(async {
            match plan {
                Plan::Items(items) => {
                    run_items(target.clone(), items, concurrency, rate.map(|r| (r, args.burstiness)), seed, bar.clone())
                        .await
                }
                Plan::Sessions(sessions) => run_sessions(target.clone(), sessions, concurrency, bar.clone()).await,
            }
        });
        let duration = start.elapsed().as_secs_f64();
        bar.finish_and_clear();
        let metrics = RunMetrics::compute(&records, duration, slo.as_ref());
        report.runs.push(RunReport { concurrency, rate, seed, metrics, requests: records });
    }
    print_table(&report);
    if let Some(path) = &args.json {
        crate::util::write_atomic(path, serde_json::to_string_pretty(&report)?.as_bytes())?;
        eprintln!("report written to {}", path.display());
    }
    if let Some(path) = &args.plot {
        plot::draw(std::slice::from_ref(&report), path)?;
        eprintln!("plot written to {}", path.display());
    }
    Ok(())
}

/// Joins reports of the same label (one file per sweep point) into one, runs by concurrency.
fn merge_by_label(reports: Vec<Report>) -> Vec<Report> {
    let mut merged: Vec<Report> = Vec::new();
    for r in reports {
        match merged.iter_mut().find(|m| m.label == r.label) {
            Some(m) => m.runs.extend(r.runs),
            None => merged.push(r),
        }
    }
    for m in &mut merged {
        m.runs.sort_by(|a, b| {
            a.concurrency.cmp(&b.concurrency).then(a.rate.unwrap_or(0.0).total_cmp(&b.rate.unwrap_or(0.0)))
        });
    }
    merged
}

fn print_table(report: &Report) {
    println!(
        "{} ({}, model {}, workload {:?}, in {} out {} tokens{})",
        report.label,
        report.url,
        report.model,
        report.workload,
        report.input_len,
        report.output_len,
        if report.ignore_eos { ", ignore_eos" } else { "" }
    );
    println!(
        "{:>6} {:>6} {:>5} {:>9} {:>9} {:>9} | {:>8} {:>8} {:>8} | {:>8} {:>8} | {:>8} {:>8} | {:>9}",
        "c",
        "rate",
        "fail",
        "req/s",
        "out tok/s",
        "tot tok/s",
        "ttft p50",
        "ttft p90",
        "ttft p99",
        "tpot p50",
        "tpot p90",
        "itl p50",
        "e2e p50",
        "goodput"
    );
    for run in &report.runs {
        let m = &run.metrics;
        println!(
            "{:>6} {:>6} {:>5} {:>9.2} {:>9.1} {:>9.1} | {:>8.0} {:>8.0} {:>8.0} | {:>8.1} {:>8.1} | {:>8.1} {:>8.0} | {:>9}",
            run.concurrency,
            run.rate.map_or("-".into(), |r| format!("{r}")),
            m.failed,
            m.request_throughput,
            m.output_throughput,
            m.total_token_throughput,
            m.ttft_ms.p50,
            m.ttft_ms.p90,
            m.ttft_ms.p99,
            m.tpot_ms.p50,
            m.tpot_ms.p90,
            m.itl_ms.p50,
            m.e2e_ms.p50,
            m.goodput.map_or("-".into(), |g| format!("{g:.2}")),
        );
        if !m.errors.is_empty() {
            println!("       errors by status: {:?}", m.errors);
        }
        if !m.ttft_by_turn_ms.is_empty() {
            let turns: Vec<String> = m
                .ttft_by_turn_ms
                .iter()
                .enumerate()
                .map(|(t, d)| format!("turn {}: p50 {:.0} p90 {:.0} ms", t + 1, d.p50, d.p90))
                .collect();
            println!("       TTFT by turn: {}", turns.join(" | "));
        }
    }
}
