use super::*;
use std::sync::atomic::Ordering;

fn identity() -> Identity {
    Identity { fingerprint: 7, block_size: 4, n_layer: 2, n_kv_head: 1, head_dim: 2, window: 0 }
}

fn payload(seed: u8) -> Vec<u8> {
    (0..identity().payload_len()).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
}

fn open(root: &Path, budget_files: usize) -> DiskCache {
    DiskCache::open(root, (budget_files * identity().file_len()) as u64, identity(), "test model").unwrap()
}

fn folder_bytes(root: &Path) -> u64 {
    walk(root).iter().map(|p| p.metadata().unwrap().len()).sum()
}

/// The files of the folder, less its lock file.
fn walk(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in fs::read_dir(root).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else if p.file_name().is_some_and(|n| n != folder::LOCK_FILE) {
            out.push(p);
        }
    }
    out
}

/// A barrier the test opens: the I/O threads stop at it (through the I/O hook) until then.
/// Should the code under test wait for the disk itself, the test would wait forever; after a
/// minute the gate opens by itself and says so, so the test fails instead.
#[derive(Default)]
struct Gate {
    open: Mutex<bool>,
    opened: Condvar,
    timed_out: std::sync::atomic::AtomicBool,
}

impl Gate {
    fn wait(&self) {
        let open = lock_gate(&self.open);
        let (mut open, timeout) = self.opened.wait_timeout_while(open, Duration::from_secs(60), |open| !*open).unwrap();
        if timeout.timed_out() {
            *open = true;
            self.timed_out.store(true, Ordering::SeqCst);
        }
    }

    fn open(&self) {
        *lock_gate(&self.open) = true;
        self.opened.notify_all();
    }

    fn timed_out(&self) -> bool {
        self.timed_out.load(Ordering::SeqCst)
    }
}

fn lock_gate(m: &Mutex<bool>) -> MutexGuard<'_, bool> {
    m.lock().unwrap()
}

/// Holds the cache's writes (`Io::Write`) or reads (`Io::Read`) on a gate.
fn gate(cache: &DiskCache, writes: bool) -> Arc<Gate> {
    let gate = Arc::new(Gate::default());
    let g = gate.clone();
    cache.set_io_hook(move |io| {
        if matches!(io, Io::Write(_)) == writes {
            g.wait();
        }
    });
    gate
}

#[test]
fn blocks_survive_a_reopen() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = open(tmp.path(), 10);
    cache.save(1, payload(1), SaveMode::Wait);
    cache.save(2, payload(2), SaveMode::Wait);
    cache.flush();
    assert!(cache.contains(1) && !cache.wants(2) && cache.wants(3));
    drop(cache);
    let cache = open(tmp.path(), 10);
    assert_eq!(cache.load(2), Some(payload(2)));
    assert_eq!(cache.load(3), None);
    assert_eq!(cache.stats().files, 2);
    assert_eq!(cache.stats().loaded_blocks, 1);
}

#[test]
fn the_folder_never_exceeds_its_budget_and_drops_the_least_recently_used() {
    let tmp = tempfile::tempdir().unwrap();
    let budget = 3 * identity().file_len() as u64;
    let cache = open(tmp.path(), 3);
    for h in 1..=3 {
        cache.save(h, payload(h as u8), SaveMode::Wait);
    }
    cache.flush();
    assert!(cache.load(1).is_some(), "block 1 is now the most recently used");
    for h in 4..=20 {
        cache.save(h, payload(h as u8), SaveMode::Wait);
        cache.flush();
        assert!(folder_bytes(tmp.path()) <= budget);
        if h == 4 {
            assert!(cache.contains(1) && !cache.contains(2), "the least recently used went first");
        }
    }
    assert_eq!(cache.stats().files, 3);
    assert!(cache.stats().bytes <= budget);
    // A smaller budget at the next start trims the folder at once.
    drop(cache);
    let cache = open(tmp.path(), 1);
    assert_eq!(cache.stats().files, 1);
    assert!(cache.contains(20), "the newest file stays");
}

#[test]
fn a_corrupt_file_is_refused_removed_and_counted() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = open(tmp.path(), 10);
    cache.save(5, payload(5), SaveMode::Wait);
    cache.flush();
    let path = cache.dir().join(format!("{:016x}.kv", 5));
    let mut bytes = fs::read(&path).unwrap();
    bytes[format::HEADER_LEN + 10] ^= 1;
    fs::write(&path, &bytes).unwrap();
    assert_eq!(cache.load(5), None);
    assert!(!path.exists() && !cache.contains(5));
    assert_eq!(cache.stats().rejected_files, 1);
}

#[test]
fn a_start_removes_unfinished_writes_truncated_files_and_misplaced_ones() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = open(tmp.path(), 10);
    for h in 1..=3 {
        cache.save(h, payload(h as u8), SaveMode::Wait);
    }
    cache.flush();
    let dir = cache.dir().to_path_buf();
    drop(cache);
    let name = |h: u64| dir.join(format!("{h:016x}.kv"));
    // What a kill -9 can leave: a half-written temporary file...
    fs::write(dir.join(format!(".{:016x}.kv.tmp4242", 9)), &payload(9)[..10]).unwrap();
    // ...and (on a file system without ordered writes) a short final file.
    let whole = fs::read(name(1)).unwrap();
    fs::write(name(1), &whole[..whole.len() / 2]).unwrap();
    // A file of another model, renamed into this model's folder.
    let other = Identity { fingerprint: 8, ..identity() };
    fs::write(name(2), format::encode(&other, 2, "other", &payload(2))).unwrap();
    // A file whose name is not its block.
    fs::copy(name(3), name(4)).unwrap();
    let cache = open(tmp.path(), 10);
    assert_eq!(walk(tmp.path()), vec![name(3)]);
    assert!(!cache.contains(1) && !cache.contains(2) && !cache.contains(4));
    assert_eq!(cache.load(3), Some(payload(3)));
    assert_eq!(cache.stats().rejected_files, 3);
}

#[test]
fn another_models_blocks_count_toward_the_budget_but_are_never_used() {
    let tmp = tempfile::tempdir().unwrap();
    let other = Identity { block_size: 8, ..identity() };
    let theirs = DiskCache::open(tmp.path(), 1 << 20, other, "other").unwrap();
    theirs.save(1, vec![3; other.payload_len()], SaveMode::Wait);
    drop(theirs);
    let ours = DiskCache::open(tmp.path(), 1 << 20, identity(), "ours").unwrap();
    assert!(!ours.contains(1) && ours.load(1).is_none());
    assert_eq!(ours.stats().files, 1);
    assert_eq!(ours.stats().bytes, other.file_len() as u64);
    let listed = folder::summarize(tmp.path()).unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!((listed[0].model.as_str(), listed[0].block_size, listed[0].blocks), ("other", 8, 1));
}

#[test]
fn an_unusable_folder_is_an_error_not_a_panic() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("a-file");
    fs::write(&file, b"x").unwrap();
    let err = DiskCache::open(&file.join("cache"), 1 << 20, identity(), "m").err().expect("refused");
    assert!(err.to_string().contains("a-file"), "{err}");
}

#[test]
fn remove_clears_subfolders_but_leaves_other_files() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = open(tmp.path(), 10);
    cache.save(1, payload(1), SaveMode::Wait);
    cache.flush();
    drop(cache);
    fs::write(tmp.path().join("notes.txt"), b"mine").unwrap();
    assert_eq!(folder::remove(tmp.path(), "").unwrap(), (1, identity().file_len() as u64));
    assert_eq!(walk(tmp.path()), vec![tmp.path().join("notes.txt")]);
}

#[test]
fn a_second_cache_on_the_folder_is_refused_and_leaves_the_firsts_writes_alone() {
    let tmp = tempfile::tempdir().unwrap();
    let first = open(tmp.path(), 10);
    // A write of the first in progress, as the writer leaves it between create and rename.
    let in_flight = first.dir().join(format!(".{:016x}.kv.tmp{}", 9, std::process::id()));
    fs::write(&in_flight, &payload(9)[..10]).unwrap();
    let err = DiskCache::open(tmp.path(), 1 << 20, identity(), "second").err().expect("refused while the first has it");
    let message = err.to_string();
    assert!(message.contains(&tmp.path().display().to_string()), "{message}");
    assert!(message.contains(&format!("pid {}", std::process::id())) && message.contains(".lock"), "{message}");
    assert!(in_flight.exists(), "the refused start removed nothing");
    // Another model's identity does not help: the folder (and its budget) is one.
    assert!(DiskCache::open(tmp.path(), 1 << 20, Identity { block_size: 8, ..identity() }, "other").is_err());
    // `braid cache clear` and `rm` take the same lock.
    assert!(folder::lock(tmp.path()).is_err());
    drop(first);
    let again = open(tmp.path(), 10);
    assert!(!in_flight.exists(), "once the folder is free, a start removes what a crash left");
    drop(again);
    assert!(folder::lock(tmp.path()).is_ok());
}

#[test]
fn a_writer_behind_its_byte_budget_drops_writes_instead_of_waiting() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = open(tmp.path(), 10).with_queue_bytes(2 * identity().payload_len());
    let gate = gate(&cache, true);
    for h in 1..=5 {
        cache.save(h, payload(h as u8), SaveMode::IfIdle);
    }
    // Two copies fit the queue (the writer holds the first at the gate); three are dropped.
    assert_eq!(cache.stats().dropped_writes, 3);
    assert!(!gate.timed_out(), "save never waits for the writer");
    assert!(!cache.wants(1) && !cache.wants(2) && cache.wants(3), "dropped writes can be asked for again");
    gate.open();
    cache.flush();
    assert_eq!(cache.stats().written_blocks, 2);
    assert!(cache.contains(1) && cache.contains(2) && !cache.contains(3));
    // Waiting saves (`braid cache save`) wait for room instead, and every block is written.
    for h in 3..=8 {
        cache.save(h, payload(h as u8), SaveMode::Wait);
    }
    cache.flush();
    assert_eq!((cache.stats().written_blocks, cache.stats().dropped_writes), (8, 3));
}

#[test]
fn prefetched_blocks_are_read_and_verified_on_the_reader_thread() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = open(tmp.path(), 10);
    for h in 1..=2 {
        cache.save(h, payload(h as u8), SaveMode::Wait);
    }
    cache.flush();
    let path = cache.dir().join(format!("{:016x}.kv", 2));
    let mut bytes = fs::read(&path).unwrap();
    bytes[format::HEADER_LEN + 1] ^= 1;
    fs::write(&path, &bytes).unwrap();
    let gate = gate(&cache, false);
    for h in [1, 2, 3] {
        cache.prefetch(h);
    }
    // The reader waits at the gate: nothing has arrived, and asking does not wait.
    assert!(cache.take_loaded().is_none());
    assert!(cache.wait_loaded(Duration::from_millis(1)).is_none());
    gate.open();
    let mut arrived: Vec<Loaded> =
        (0..3).map(|_| cache.wait_loaded(Duration::from_secs(60)).expect("the reader answers")).collect();
    arrived.sort_by_key(|l| l.hash);
    assert_eq!(arrived[0].bytes.as_deref(), Some(&payload(1)[..]));
    assert!(arrived[1].bytes.is_none() && !path.exists(), "the corrupt file is refused and removed by the reader");
    assert!(arrived[2].bytes.is_none(), "not on disk");
    assert_eq!((cache.stats().loaded_blocks, cache.stats().rejected_files), (1, 1));
    assert!(!gate.timed_out());
}
