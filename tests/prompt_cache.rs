//! The disk tier of the prefix cache on the real model: blocks evicted from memory come back
//! from disk, a new engine on the same folder starts warm, bad or foreign files are never
//! loaded, the folder keeps to its budget, and conversations larger than memory stay warm.
//! Whatever the tier, the tokens generated are those of a cold run.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::sync::OnceLock;

use braid::engine::disk::gguf_fingerprint;
use braid::engine::{DiskCache, Engine, EngineConfig, RequestId, SamplingParams};
use common::{default_model_path, golden, ids, model};

fn fingerprint() -> u128 {
    static F: OnceLock<u128> = OnceLock::new();
    *F.get_or_init(|| gguf_fingerprint(&default_model_path()).unwrap())
}

fn block_file_bytes() -> u64 {
    let config = model().model.config();
    braid::model::KvCache::bytes_per_block(config, 16) as u64 + 1024
}

/// A pool of `blocks` KV blocks of 16 tokens.
fn config(blocks: usize) -> EngineConfig {
    let bytes = braid::model::KvCache::bytes_per_block(model().model.config(), 16) * blocks;
    EngineConfig { kv_cache_bytes: Some(bytes), ..EngineConfig::default() }
}

fn engine(config: EngineConfig) -> Engine {
    let m = model();
    Engine::new(m.model.clone(), m.tokenizer.eos_ids.clone(), config).expect("the engine starts")
}

fn engine_on(dir: &Path, budget: u64, config: EngineConfig) -> Engine {
    let mut e = engine(config);
    let disk = DiskCache::open(dir, budget, e.disk_identity(fingerprint()), "test").unwrap();
    e.attach_disk_cache(disk).unwrap();
    e
}

/// The golden tokenizer corpus as one token stream (about 7,600 tokens of ordinary text).
fn corpus() -> &'static [u32] {
    static C: OnceLock<Vec<u32>> = OnceLock::new();
    C.get_or_init(|| golden("tokenize.jsonl").iter().flat_map(|c| ids(&c["ids"])).collect())
}

fn text(start: usize, len: usize) -> Vec<u32> {
    corpus()[start..start + len].to_vec()
}

/// Runs prompts one after another (each to completion); returns their greedy tokens.
fn run_each(e: &mut Engine, prompts: &[Vec<u32>], max_tokens: usize) -> Vec<Vec<u32>> {
    prompts
        .iter()
        .map(|p| {
            let params = SamplingParams { ignore_eos: true, ..SamplingParams::greedy(max_tokens) };
            let id: RequestId = e.add_request(p.clone(), params).unwrap();
            let mut out: HashMap<RequestId, Vec<u32>> = HashMap::new();
            while e.has_work() {
                for ev in e.step().unwrap() {
                    if let Some(t) = ev.token {
                        out.entry(ev.id).or_default().push(t.id);
                    }
                }
            }
            out.remove(&id).unwrap()
        })
        .collect()
}

fn cold(prompt: &[u32], max_tokens: usize) -> Vec<u32> {
    run_each(&mut engine(config(256)), &[prompt.to_vec()], max_tokens).remove(0)
}

#[test]
fn blocks_evicted_from_memory_come_back_from_disk_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    // 30 blocks: room for one 300-token prompt, not for three.
    let mut e = engine_on(dir.path(), 1 << 30, config(30));
    let a = text(0, 300);
    let first = run_each(&mut e, &[a.clone(), text(1000, 300), text(2000, 300)], 8);
    let before = e.stats();
    let again = run_each(&mut e, std::slice::from_ref(&a), 8).remove(0);
    let after = e.stats();
    assert_eq!(before.prefix_hit_tokens, 0, "three distinct prompts");
    assert_eq!(
        after.prefix_hit_tokens_disk - before.prefix_hit_tokens_disk,
        288,
        "18 full blocks of the 300 came from disk"
    );
    assert!(after.prefilled_tokens - before.prefilled_tokens <= 16);
    assert_eq!(again, first[0]);
    assert_eq!(again, cold(&a, 8));
}

#[test]
fn a_new_engine_on_the_same_folder_starts_warm() {
    let dir = tempfile::tempdir().unwrap();
    let prefix = text(0, 1000);
    let mut first = engine_on(dir.path(), 1 << 30, config(256));
    run_each(&mut first, std::slice::from_ref(&prefix), 4);
    drop(first); // finishes its writes
    let mut prompt = prefix.clone();
    prompt.extend(text(5000, 20));
    let mut second = engine_on(dir.path(), 1 << 30, config(256));
    let warm = run_each(&mut second, std::slice::from_ref(&prompt), 16).remove(0);
    let s = second.stats();
    assert!(s.prefilled_tokens * 10 < prompt.len() as u64, "prefilled {} of {}", s.prefilled_tokens, prompt.len());
    assert_eq!(s.prefix_hit_tokens_disk, 992);
    assert_eq!(warm, cold(&prompt, 16), "tokens computed on K/V loaded from disk are the cold run's");
}

#[test]
fn corrupt_truncated_and_unfinished_files_are_never_loaded() {
    let dir = tempfile::tempdir().unwrap();
    let prompt = text(3000, 400);
    let mut first = engine_on(dir.path(), 1 << 30, config(256));
    run_each(&mut first, std::slice::from_ref(&prompt), 4);
    let folder = dir.path().join(first.disk_identity(fingerprint()).folder_name());
    drop(first);
    let hashes = braid::engine::block_manager::prefix_hashes(&prompt, 16);
    let file = |i: usize| folder.join(format!("{:016x}.kv", hashes[i]));
    // A flipped bit in block 20, a file cut short at block 10 (what a crash on a file system
    // without ordered writes could leave), and an unfinished temporary file.
    let mut bytes = std::fs::read(file(20)).unwrap();
    bytes[5000] ^= 4;
    std::fs::write(file(20), bytes).unwrap();
    let whole = std::fs::read(file(10)).unwrap();
    std::fs::write(file(10), &whole[..whole.len() - 100]).unwrap();
    let temp = folder.join(format!(".{:016x}.kv.tmp999", hashes[24]));
    std::fs::write(&temp, &whole[..1000]).unwrap();

    let mut second = engine_on(dir.path(), 1 << 30, config(256));
    assert!(!temp.exists() && !file(10).exists(), "removed at start");
    let out = run_each(&mut second, std::slice::from_ref(&prompt), 8).remove(0);
    let s = second.stats();
    assert_eq!(s.prefix_hit_tokens_disk, 160, "the prefix stops at the truncated block");
    assert_eq!(s.disk.as_ref().unwrap().rejected_files, 1);
    assert_eq!(out, cold(&prompt, 8));
    // The corrupt block is reached once the truncated one is computed again (and rewritten).
    drop(second);
    let mut third = engine_on(dir.path(), 1 << 30, config(256));
    assert_eq!(run_each(&mut third, std::slice::from_ref(&prompt), 8).remove(0), out);
    let s = third.stats();
    assert_eq!(s.prefix_hit_tokens_disk, 320, "up to the corrupt block");
    assert_eq!(s.disk.as_ref().unwrap().rejected_files, 1, "the corrupt file, found when loading it");
    assert!(!file(20).exists() || std::fs::read(file(20)).unwrap().len() == whole.len());
}

#[test]
fn another_model_block_size_or_window_never_uses_the_files() {
    let dir = tempfile::tempdir().unwrap();
    let prompt = text(500, 200);
    run_each(&mut engine_on(dir.path(), 1 << 30, config(256)), std::slice::from_ref(&prompt), 2);
    let others = [
        (EngineConfig { block_size: 32, ..config(256) }, fingerprint()),
        (EngineConfig { max_kv_size: Some(1024), ..config(256) }, fingerprint()),
        (config(256), fingerprint() ^ 1),
    ];
    for (c, f) in others {
        let mut e = engine(c);
        let disk = DiskCache::open(dir.path(), 1 << 30, e.disk_identity(f), "other").unwrap();
        e.attach_disk_cache(disk).unwrap();
        run_each(&mut e, std::slice::from_ref(&prompt), 2);
        assert_eq!(e.stats().prefix_hit_tokens, 0);
    }
    // And an identity that is not the engine's own layout is refused outright.
    let mut e = engine(config(256));
    let wrong = braid::engine::disk::Identity { block_size: 32, ..e.disk_identity(fingerprint()) };
    assert!(e.attach_disk_cache(DiskCache::open(dir.path(), 1 << 30, wrong, "x").unwrap()).is_err());
}

#[test]
fn the_folder_keeps_to_its_budget_under_a_stream_of_distinct_prefixes() {
    let dir = tempfile::tempdir().unwrap();
    let budget = 20 * block_file_bytes();
    let mut e = engine_on(dir.path(), budget, config(24));
    for i in 0..10 {
        run_each(&mut e, &[text(400 * i, 130)], 2);
        e.flush_disk_cache();
        let used: u64 = walk(dir.path()).iter().map(|p| p.metadata().unwrap().len()).sum();
        assert!(used <= budget, "{used} bytes after prompt {i}, budget {budget}");
    }
    let disk = e.stats().disk.unwrap();
    assert!(disk.evicted_files > 0 && disk.written_blocks >= 80, "{disk:?}");
}

fn walk(root: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(root).unwrap() {
        let p = entry.unwrap().path();
        if p.is_dir() { out.extend(walk(&p)) } else { out.push(p) }
    }
    out
}

/// Four conversations, four turns each, taken in turn; each turn resends the conversation so
/// far (prompt and reply) plus a new message. The pool holds about one conversation.
fn conversations(e: &mut Engine) -> (Vec<Vec<u32>>, Vec<(usize, u64)>) {
    let mut history: Vec<Vec<u32>> = (0..4).map(|c| text(1500 * c, 150)).collect();
    let mut outputs = Vec::new();
    let mut prefills = Vec::new();
    for turn in 0..4 {
        for (c, h) in history.iter_mut().enumerate() {
            if turn > 0 {
                h.extend(text(1500 * c + 200 + 80 * turn, 40));
            }
            let before = e.stats().prefilled_tokens;
            let out = run_each(e, std::slice::from_ref(h), 12).remove(0);
            prefills.push((turn, e.stats().prefilled_tokens - before));
            h.extend(&out);
            outputs.push(out);
        }
    }
    (outputs, prefills)
}

#[test]
fn turns_of_conversations_larger_than_memory_prefill_only_their_new_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let (with_disk, prefills) = conversations(&mut engine_on(dir.path(), 1 << 30, config(36)));
    for &(turn, prefilled) in &prefills {
        if turn > 0 {
            // 40 new tokens, the previous reply's last token, and the partial last block.
            assert!(prefilled <= 40 + 16, "turn {turn} prefilled {prefilled} tokens");
        }
    }
    let (without, prefills_without) = conversations(&mut engine(config(36)));
    assert!(
        prefills_without.iter().any(|&(t, p)| t > 0 && p > 150),
        "without the disk tier, memory alone cannot hold them"
    );
    assert_eq!(with_disk, without);
}

/// A session's blocks are kept in memory ahead of anonymous requests' (no disk tier here).
#[test]
fn a_sessions_blocks_outlive_anonymous_requests_in_memory() {
    use braid::engine::{Request, Retention, RetentionPlan};
    let conversation = text(0, 300);
    let hits_after_traffic = |class: Retention| {
        // 40 blocks: the conversation (20) and one anonymous request (20) fit, not a second.
        let mut e = engine(config(40));
        let params = SamplingParams { ignore_eos: true, ..SamplingParams::greedy(4) };
        let request = Request::new(conversation.clone(), params, &e.limits()).unwrap();
        e.add(request.with_retention(RetentionPlan::uniform(300, class)));
        while e.has_work() {
            e.step().unwrap();
        }
        run_each(&mut e, &[text(1000, 300), text(2000, 300)], 4);
        let before = e.stats().prefix_hit_tokens;
        run_each(&mut e, std::slice::from_ref(&conversation), 4);
        e.stats().prefix_hit_tokens - before
    };
    assert_eq!(hits_after_traffic(Retention::System), 288);
    // Anonymous, it loses all but the head of its prefix (tails are evicted first).
    let anonymous = hits_after_traffic(Retention::Anonymous);
    assert!(anonymous < 100, "{anonymous} tokens survived without a session");
}

/// A barrier the test opens: the disk tier's I/O threads stop at it (through its I/O hook)
/// until then. Should the engine wait for the disk on its own thread, the test would wait
/// forever; after a minute the gate opens by itself and says so, and the test fails instead.
#[derive(Default)]
struct Gate {
    open: std::sync::Mutex<bool>,
    opened: std::sync::Condvar,
    timed_out: std::sync::atomic::AtomicBool,
}

impl Gate {
    /// Holds the reads (or the writes) of `disk` at a new gate.
    fn on(disk: &DiskCache, writes: bool) -> std::sync::Arc<Gate> {
        let gate = std::sync::Arc::new(Gate::default());
        let g = gate.clone();
        disk.set_io_hook(move |io| {
            if matches!(io, braid::engine::disk::Io::Write(_)) == writes {
                g.wait();
            }
        });
        gate
    }

    fn wait(&self) {
        let open = self.open.lock().unwrap();
        let (mut open, timeout) =
            self.opened.wait_timeout_while(open, std::time::Duration::from_secs(60), |open| !*open).unwrap();
        if timeout.timed_out() {
            *open = true;
            self.timed_out.store(true, std::sync::atomic::Ordering::SeqCst);
        }
    }

    fn open(&self) {
        *self.open.lock().unwrap() = true;
        self.opened.notify_all();
    }

    fn timed_out(&self) -> bool {
        self.timed_out.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// Steps until `until` holds of the tokens so far (or nothing is left to do).
fn step_until(
    e: &mut Engine,
    out: &mut HashMap<RequestId, Vec<u32>>,
    until: impl Fn(&HashMap<RequestId, Vec<u32>>) -> bool,
) {
    while e.has_work() && !until(out) {
        for ev in e.step().unwrap() {
            if let Some(t) = ev.token {
                out.entry(ev.id).or_default().push(t.id);
            }
        }
    }
}

/// Engine on a folder that already holds `prompt`'s blocks, with the folder's reads held at a
/// gate and requests waiting `wait` for their blocks.
fn warm_folder_with_held_reads(
    dir: &Path,
    prompt: &[u32],
    wait: std::time::Duration,
) -> (Engine, std::sync::Arc<Gate>) {
    run_each(&mut engine_on(dir, 1 << 30, config(256)), &[prompt.to_vec()], 2);
    let mut e = engine(config(256));
    let disk = DiskCache::open(dir, 1 << 30, e.disk_identity(fingerprint()), "test").unwrap().with_prefetch_wait(wait);
    let gate = Gate::on(&disk, false);
    e.attach_disk_cache(disk).unwrap();
    (e, gate)
}

#[test]
fn running_requests_decode_while_a_waiting_requests_blocks_are_read() {
    let dir = tempfile::tempdir().unwrap();
    let on_disk = text(0, 600);
    let (mut e, gate) = warm_folder_with_held_reads(dir.path(), &on_disk, std::time::Duration::from_secs(3600));
    let params = |n| SamplingParams { ignore_eos: true, ..SamplingParams::greedy(n) };
    // The request whose prefix is on disk is first in the queue; another arrives behind it.
    let from_disk = e.add_request(on_disk.clone(), params(6)).unwrap();
    let other = text(3000, 40);
    let other_id = e.add_request(other.clone(), params(12)).unwrap();
    let mut out = HashMap::new();
    step_until(&mut e, &mut out, |out| out.get(&other_id).is_some_and(|t| t.len() == 12));
    assert!(!gate.timed_out(), "a step waited for a file to be read");
    assert_eq!(out.get(&other_id).map(Vec::len), Some(12), "the other request ran to the end while the disk was held");
    assert!(!out.contains_key(&from_disk), "the request waits for its blocks (the wait is an hour)");
    assert_eq!(e.stats().waiting, 1);
    assert_eq!(out[&other_id], cold(&other, 12));
    // The disk answers: the blocks are copied in and used.
    gate.open();
    step_until(&mut e, &mut out, |_| false);
    let s = e.stats();
    assert_eq!(s.prefix_hit_tokens_disk, 592, "37 full blocks of the 600 came from disk");
    assert!(s.prefilled_tokens <= 40 + 16, "prefilled {}", s.prefilled_tokens);
    assert_eq!(s.disk.unwrap().abandoned_loads, 0);
    assert_eq!(out[&from_disk], cold(&on_disk, 6));
}

#[test]
fn a_request_whose_blocks_do_not_arrive_in_time_computes_them() {
    let dir = tempfile::tempdir().unwrap();
    let on_disk = text(1000, 300);
    let (mut e, gate) = warm_folder_with_held_reads(dir.path(), &on_disk, std::time::Duration::from_millis(50));
    // The disk never answers while the request runs: it waits its 50 ms, then computes.
    let out = run_each(&mut e, std::slice::from_ref(&on_disk), 6).remove(0);
    let s = e.stats();
    assert!(!gate.timed_out(), "a step waited for a file to be read");
    assert_eq!(s.prefix_hit_tokens_disk, 0);
    assert_eq!(s.prefilled_tokens, 300);
    assert_eq!(s.disk.as_ref().unwrap().abandoned_loads, 18);
    assert_eq!(out, cold(&on_disk, 6));
    // Late blocks are dropped, and the next request finds the prefix in memory.
    gate.open();
    assert_eq!(run_each(&mut e, std::slice::from_ref(&on_disk), 6).remove(0), out);
    assert_eq!(e.stats().prefix_hit_tokens, 288);
}

#[test]
fn evicted_blocks_are_dropped_not_waited_for_when_the_writer_is_behind() {
    let dir = tempfile::tempdir().unwrap();
    let mut e = engine(config(30));
    // Room for one block copy in the queue; the writer is held at the gate with the first.
    let disk =
        DiskCache::open(dir.path(), 1 << 30, e.disk_identity(fingerprint()), "test").unwrap().with_queue_bytes(1);
    let gate = Gate::on(&disk, true);
    e.attach_disk_cache(disk).unwrap();
    let first = text(0, 300);
    run_each(&mut e, std::slice::from_ref(&first), 8);
    let dropped = e.stats().disk.unwrap().dropped_writes;
    // The next prompt needs the first's blocks: admitting it evicts them, and their copies,
    // which the writer cannot take, are dropped (counted) without waiting.
    let second = text(1000, 300);
    e.add_request(second.clone(), SamplingParams { ignore_eos: true, ..SamplingParams::greedy(8) }).unwrap();
    let events = e.step().unwrap();
    assert_eq!(events.len(), 1, "the second prompt's first token");
    // (The first left 11 unnamed blocks and 19 named: the second's 19 evict 8 of those.)
    let spilled = e.stats().disk.unwrap().dropped_writes - dropped;
    assert!(spilled > 0, "no evicted block was dropped");
    let mut out = HashMap::new();
    step_until(&mut e, &mut out, |_| false);
    assert!(!gate.timed_out(), "a step waited for the writer");
    gate.open();
    e.flush_disk_cache();
    let disk = e.stats().disk.unwrap();
    assert_eq!(disk.written_blocks, 1, "the one copy the queue had room for");
    assert_eq!(run_each(&mut e, std::slice::from_ref(&first), 8).remove(0), cold(&first, 8));
}

#[test]
fn a_second_engine_on_the_same_folder_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let first = engine_on(dir.path(), 1 << 30, config(16));
    let e = engine(config(16));
    let err = DiskCache::open(dir.path(), 1 << 30, e.disk_identity(fingerprint()), "test")
        .err()
        .expect("the folder is taken");
    let message = err.to_string();
    assert!(
        message.contains(&dir.path().display().to_string()) && message.contains(&format!("pid {}", std::process::id())),
        "{message}"
    );
    drop(first);
    assert!(DiskCache::open(dir.path(), 1 << 30, e.disk_identity(fingerprint()), "test").is_ok());
}
