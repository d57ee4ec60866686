//! The disk tier of the prefix cache: KV blocks kept in a folder, one file per block, named by
//! the block's chained hash, under a subfolder per model identity (`format::Identity`).
//!
//! - One process at a time: `open` takes an advisory lock on `<root>/.lock` (`folder::lock`),
//!   and a second process pointed at the folder is refused, naming the holder's pid, before its
//!   start-up scan could remove the first one's temporary files.
//! - Writes go through a background thread (the engine only copies the block's bytes out), each
//!   one written to a temporary file, fsynced and renamed, so a crash leaves either the whole
//!   file or a temporary one, which the next start removes. The copies waiting for the writer
//!   are bounded in bytes; beyond that a write is dropped (counted), never waited for, unless
//!   the cache was opened to wait (`braid cache save`).
//! - Loads go through another background thread (`prefetch`, `take_loaded`): the engine asks
//!   for a waiting request's blocks and copies the verified bytes in when they are ready, so no
//!   step waits for a file to be read.
//! - The folder stays within its byte budget: before a write, the least recently used files
//!   (of any model) are removed until the new one fits. Temporary files count too.
//! - On open, the index is rebuilt from the folder: every file's header and length are checked
//!   (another model's file in this model's subfolder, or a truncated one, is removed with a
//!   warning), and recency comes from modification times, which a hit refreshes.
//! - A load verifies the whole file (identity, name, length, checksum) before its bytes are
//!   used; a file that fails is removed with a warning and the block is computed instead.

mod fingerprint;
pub mod folder;
mod format;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime};

pub use fingerprint::{dummy_fingerprint, folder_fingerprint, gguf_fingerprint};
pub use format::{FormatError, Header, Identity};

/// Bytes of block copies that may wait for the writer by default; beyond that a write is
/// dropped (`SaveMode::IfIdle`) or waits for room (`SaveMode::Wait`).
pub const QUEUE_BYTES: usize = 128 << 20;

/// How long a waiting request waits by default for its blocks to be read from disk before it
/// is scheduled anyway and computes what has not arrived (a slow or stuck disk costs that
/// request at most this much; running requests never wait for the disk).
pub const PREFETCH_WAIT: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct DiskStats {
    /// Block files in the folder (of every model) and their bytes.
    pub files: usize,
    pub bytes: u64,
    pub budget: u64,
    pub written_blocks: u64,
    pub loaded_blocks: u64,
    /// Files refused (truncated, failed checksum, another model's) and removed.
    pub rejected_files: u64,
    /// Files removed to stay within the budget.
    pub evicted_files: u64,
    /// Block writes (of evicted blocks and finished requests) dropped because the copies
    /// waiting for the writer were already at their byte budget.
    pub dropped_writes: u64,
    /// Block loads started and given up: not read by the time their request stopped waiting
    /// for them, cancelled to give their memory to running requests, or behind a block whose
    /// file was bad. Those blocks were computed instead.
    pub abandoned_loads: u64,
}

/// The cause is part of the message, and not also an error `source` (which anyhow would print
/// a second time after it).
#[derive(Debug, thiserror::Error)]
#[error("prompt cache folder {path}: {cause}")]
pub struct DiskError {
    pub path: PathBuf,
    pub cause: std::io::Error,
}

/// How `save` behaves when the copies waiting for the writer are at their byte budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SaveMode {
    /// Wait for room (`braid cache save`, where storing every block is the point).
    Wait,
    /// Drop the write and count it (a server: a step never waits for the disk).
    IfIdle,
}

/// A file operation of the I/O threads, as the test hook sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Io {
    Read(u64),
    Write(u64),
}

/// A block the reader thread has read for `prefetch`: its verified K/V bytes, or None when the
/// file was gone or bad (and is removed).
#[derive(Debug)]
pub struct Loaded {
    pub hash: u64,
    pub bytes: Option<Vec<u8>>,
}

type IoHook = Box<dyn Fn(Io) + Send + Sync>;

pub struct DiskCache {
    shared: Arc<Shared>,
    write_through: SaveMode,
    prefetch_wait: Duration,
    jobs: Option<Sender<Job>>,
    writer: Option<JoinHandle<()>>,
    loads: Option<Sender<u64>>,
    /// Dropped first when the cache closes, so the reader stops after the read in progress.
    loaded: Option<Receiver<Loaded>>,
    reader: Option<JoinHandle<()>>,
    /// Held for as long as this cache is open; dropped after the threads are done.
    _lock: folder::FolderLock,
}

struct Shared {
    identity: Identity,
    model_name: String,
    dir: PathBuf,
    budget: u64,
    state: Mutex<State>,
    /// Signalled when the writer takes a job off the queue (for `SaveMode::Wait`).
    room: Condvar,
    queue_limit: AtomicUsize,
    hook: OnceLock<IoHook>,
}

struct FileEntry {
    size: u64,
    stamp: u64,
    /// The block's hash when it belongs to this identity.
    own: Option<u64>,
}

#[derive(Default)]
struct State {
    files: HashMap<PathBuf, FileEntry>,
    /// Files by last use: the first is removed first.
    lru: BTreeMap<u64, PathBuf>,
    clock: u64,
    /// Bytes of the files, plus the one being written.
    used: u64,
    own: HashSet<u64>,
    /// Handed to the writer, not yet on disk, and the bytes of their copies.
    queued: HashSet<u64>,
    queued_bytes: usize,
    stats: DiskStats,
}

enum Job {
    Write { hash: u64, payload: Vec<u8> },
    Flush(mpsc::Sender<()>),
}

/// The block a file name names (`{hash:016x}.kv`).
pub(crate) fn block_name(path: &Path) -> Option<u64> {
    let stem = path.file_name()?.to_str()?.strip_suffix(".kv")?;
    if stem.len() != 16 {
        return None;
    }
    u64::from_str_radix(stem, 16).ok()
}

/// A temporary file of `util::write_atomic` (`.NAME.tmpPID`), left by an interrupted write.
pub(crate) fn is_temporary(path: &Path) -> bool {
    path.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with('.') && n.contains(".tmp"))
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    // A panic elsewhere while holding the lock leaves consistent-enough bookkeeping.
    state.lock().unwrap_or_else(|e| e.into_inner())
}

impl State {
    fn insert(&mut self, path: PathBuf, size: u64, own: Option<u64>) {
        self.clock += 1;
        self.lru.insert(self.clock, path.clone());
        if let Some(h) = own {
            self.own.insert(h);
        }
        if let Some(old) = self.files.insert(path, FileEntry { size, stamp: self.clock, own }) {
            self.lru.remove(&old.stamp);
            self.used -= old.size;
        }
        self.used += size;
    }

    fn forget(&mut self, path: &Path) {
        if let Some(entry) = self.files.remove(path) {
            self.lru.remove(&entry.stamp);
            self.used -= entry.size;
            if let Some(h) = entry.own {
                self.own.remove(&h);
            }
        }
    }

    fn touch(&mut self, path: &Path) {
        if let Some(entry) = self.files.get_mut(path) {
            self.lru.remove(&entry.stamp);
            self.clock += 1;
            entry.stamp = self.clock;
            self.lru.insert(self.clock, path.to_path_buf());
        }
    }

    /// Removes least recently used files until at most `limit` bytes are used.
    fn evict_until(&mut self, limit: u64) {
        while self.used > limit {
            let Some((_, path)) = self.lru.pop_first() else { break };
            if let Err(e) = fs::remove_file(&path)
                && e.kind() != std::io::ErrorKind::NotFound
            {
                tracing::warn!("prompt cache: cannot remove {}: {e}", path.display());
            }
            self.forget(&path);
            self.stats.evicted_files += 1;
        }
    }
}

impl DiskCache {
    /// Opens (creating it if need be) the cache folder for one model identity, checks that it
    /// is writable, and rebuilds the index from what is there.
    /// Refused while another `DiskCache` (of this process or another) has the folder open.
    pub fn open(root: &Path, budget: u64, identity: Identity, model_name: &str) -> Result<Self, DiskError> {
        let err = |cause| DiskError { path: root.to_path_buf(), cause };
        let dir = root.join(identity.folder_name());
        fs::create_dir_all(&dir).map_err(err)?;
        // Before anything is removed: the scan below removes temporary files, which, were
        // another process using the folder, would be its writes in progress.
        let folder_lock = folder::lock(root).map_err(err)?;
        let probe = dir.join("write-check");
        crate::util::write_atomic(&probe, b"braid").map_err(err)?;
        fs::remove_file(&probe).map_err(err)?;
        let mut state = State { stats: DiskStats { budget, ..Default::default() }, ..Default::default() };
        let found = folder::scan(root, true, |path, why| {
            tracing::warn!("prompt cache: removed {}: {why}", path.display());
            if matches!(why, folder::Removed::Bad(_)) {
                state.stats.rejected_files += 1;
            }
        })
        .map_err(err)?;
        let mut blocks: Vec<_> = found.into_iter().collect();
        blocks.sort_by_key(|b| b.modified);
        for b in blocks {
            let own =
                (b.header.identity == identity && b.path.parent() == Some(dir.as_path())).then_some(b.header.hash);
            if own.is_none() && b.path.parent() == Some(dir.as_path()) {
                // Another identity's file in this identity's folder: never usable here.
                tracing::warn!("prompt cache: removed {}: {}", b.path.display(), FormatError::OtherModel);
                let _ = fs::remove_file(&b.path);
                state.stats.rejected_files += 1;
                continue;
            }
            state.insert(b.path, b.size, own);
        }
        state.evict_until(budget);
        tracing::info!(
            "prompt cache {}: {} blocks of this model, {} files in all, {:.1} of {:.1} MiB",
            root.display(),
            state.own.len(),
            state.files.len(),
            state.used as f64 / (1 << 20) as f64,
            budget as f64 / (1 << 20) as f64
        );
        let shared = Arc::new(Shared {
            identity,
            model_name: model_name.to_string(),
            dir,
            budget,
            state: Mutex::new(state),
            room: Condvar::new(),
            queue_limit: AtomicUsize::new(QUEUE_BYTES),
            hook: OnceLock::new(),
        });
        let (jobs, rx) = mpsc::channel();
        let worker = shared.clone();
        let writer = std::thread::Builder::new()
            .name("braid-cache-writer".into())
            .spawn(move || write_loop(&worker, rx))
            .map_err(err)?;
        let (loads, requests) = mpsc::channel::<u64>();
        let (done, loaded) = mpsc::channel();
        let worker = shared.clone();
        let reader = std::thread::Builder::new()
            .name("braid-cache-reader".into())
            .spawn(move || {
                for hash in requests {
                    if done.send(Loaded { hash, bytes: worker.load(hash) }).is_err() {
                        break;
                    }
                }
            })
            .map_err(err)?;
        Ok(Self {
            shared,
            write_through: SaveMode::IfIdle,
            prefetch_wait: PREFETCH_WAIT,
            jobs: Some(jobs),
            writer: Some(writer),
            loads: Some(loads),
            loaded: Some(loaded),
            reader: Some(reader),
            _lock: folder_lock,
        })
    }

    /// How the engine's writes (evicted blocks, finishing requests' blocks) behave when the
    /// writer is behind: by default they are dropped; `braid cache save` waits.
    pub fn with_write_through(mut self, mode: SaveMode) -> Self {
        self.write_through = mode;
        self
    }

    pub fn write_through(&self) -> SaveMode {
        self.write_through
    }

    /// Bytes of block copies that may wait for the writer (at least one block always may).
    pub fn with_queue_bytes(self, bytes: usize) -> Self {
        self.shared.queue_limit.store(bytes, Ordering::Relaxed);
        self
    }

    /// How long a waiting request waits for its blocks to be read (`PREFETCH_WAIT` by default).
    pub fn with_prefetch_wait(mut self, wait: Duration) -> Self {
        self.prefetch_wait = wait;
        self
    }

    pub fn prefetch_wait(&self) -> Duration {
        self.prefetch_wait
    }

    /// For tests: `hook` runs on the I/O threads before each block file is read or written, so
    /// a test can hold the disk on a barrier it controls. Set once.
    #[doc(hidden)]
    pub fn set_io_hook(&self, hook: impl Fn(Io) + Send + Sync + 'static) {
        assert!(self.shared.hook.set(Box::new(hook)).is_ok(), "the I/O hook is set once");
    }

    pub fn identity(&self) -> &Identity {
        &self.shared.identity
    }

    /// The folder holding this identity's blocks.
    pub fn dir(&self) -> &Path {
        &self.shared.dir
    }

    /// Whether the block is on disk.
    pub fn contains(&self, hash: u64) -> bool {
        lock(&self.shared.state).own.contains(&hash)
    }

    /// Whether a `save` of this block would do anything (not on disk, not queued).
    pub fn wants(&self, hash: u64) -> bool {
        let state = lock(&self.shared.state);
        !state.own.contains(&hash) && !state.queued.contains(&hash)
    }

    /// The block's K/V bytes, verified; None if it is not on disk or its file is bad (then
    /// removed, with a warning). Reads on the calling thread; the engine uses `prefetch`.
    pub fn load(&self, hash: u64) -> Option<Vec<u8>> {
        self.shared.load(hash)
    }

    /// Asks the reader thread for a block; its `Loaded` comes back through `take_loaded`.
    pub fn prefetch(&self, hash: u64) {
        if let Some(loads) = &self.loads {
            let _ = loads.send(hash);
        }
    }

    /// A block the reader has finished with, if any (never waits).
    pub fn take_loaded(&self) -> Option<Loaded> {
        self.loaded.as_ref()?.try_recv().ok()
    }

    /// Waits at most `timeout` for the reader to finish with a block.
    pub fn wait_loaded(&self, timeout: Duration) -> Option<Loaded> {
        self.loaded.as_ref()?.recv_timeout(timeout).ok()
    }

    /// Counts block loads given up by the engine.
    pub fn count_abandoned(&self, blocks: usize) {
        lock(&self.shared.state).stats.abandoned_loads += blocks as u64;
    }

    /// Queues a block's K/V bytes for writing (nothing happens if it is on disk or queued).
    /// When the queued copies are at their byte budget the write is dropped and counted, or,
    /// with `SaveMode::Wait`, waits for the writer to make room.
    pub fn save(&self, hash: u64, payload: Vec<u8>, mode: SaveMode) {
        debug_assert_eq!(payload.len(), self.shared.identity.payload_len());
        let Some(jobs) = &self.jobs else { return };
        let len = payload.len();
        let limit = self.shared.queue_limit.load(Ordering::Relaxed);
        // An empty queue takes any block, so a budget below one block still writes.
        let full = |s: &State| s.queued_bytes > 0 && s.queued_bytes + len > limit;
        let mut state = lock(&self.shared.state);
        if state.queued.contains(&hash) {
            return;
        }
        if full(&state) {
            match mode {
                SaveMode::IfIdle => {
                    state.stats.dropped_writes += 1;
                    return;
                }
                SaveMode::Wait => {
                    state = self.shared.room.wait_while(state, |s| full(s)).unwrap_or_else(|e| e.into_inner());
                    if state.queued.contains(&hash) {
                        return;
                    }
                }
            }
        }
        state.queued.insert(hash);
        state.queued_bytes += len;
        drop(state);
        if jobs.send(Job::Write { hash, payload }).is_err() {
            let mut state = lock(&self.shared.state);
            state.queued.remove(&hash);
            state.queued_bytes -= len;
            state.stats.dropped_writes += 1;
        }
    }

    /// Removes one block's file, if there.
    pub fn remove(&self, hash: u64) -> bool {
        let path = self.shared.path(hash);
        let mut state = lock(&self.shared.state);
        if !state.own.contains(&hash) {
            return false;
        }
        state.forget(&path);
        fs::remove_file(&path).is_ok()
    }

    /// Waits until every queued write is on disk.
    pub fn flush(&self) {
        let (tx, rx) = mpsc::channel();
        if let Some(jobs) = &self.jobs
            && jobs.send(Job::Flush(tx)).is_ok()
        {
            let _ = rx.recv();
        }
    }

    pub fn stats(&self) -> DiskStats {
        let state = lock(&self.shared.state);
        DiskStats { files: state.files.len(), bytes: state.used, ..state.stats.clone() }
    }
}

impl Drop for DiskCache {
    /// Finishes the queued writes and the read in progress (reads queued after it are not
    /// wanted any more), then lets go of the folder.
    fn drop(&mut self) {
        self.jobs.take();
        self.loads.take();
        self.loaded.take();
        for thread in [self.writer.take(), self.reader.take()].into_iter().flatten() {
            let _ = thread.join();
        }
    }
}

impl Shared {
    fn path(&self, hash: u64) -> PathBuf {
        self.dir.join(format!("{hash:016x}.kv"))
    }

    fn hook(&self, io: Io) {
        if let Some(hook) = self.hook.get() {
            hook(io);
        }
    }

    fn load(&self, hash: u64) -> Option<Vec<u8>> {
        let shared = self;
        if !lock(&shared.state).own.contains(&hash) {
            return None;
        }
        self.hook(Io::Read(hash));
        let path = shared.path(hash);
        let mut bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) => {
                // Gone: removed by the writer to make room since the lookup (not worth a warning).
                if e.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!("prompt cache: cannot read {}: {e}", path.display());
                }
                lock(&shared.state).forget(&path);
                return None;
            }
        };
        match format::decode(&bytes, &shared.identity, hash) {
            Ok(payload) => {
                let start = payload.as_ptr() as usize - bytes.as_ptr() as usize;
                let len = payload.len();
                bytes.truncate(start + len);
                bytes.drain(..start);
            }
            Err(e) => {
                tracing::warn!("prompt cache: removed {}: {e}", path.display());
                let _ = fs::remove_file(&path);
                let mut state = lock(&shared.state);
                state.forget(&path);
                state.stats.rejected_files += 1;
                return None;
            }
        }
        let mut state = lock(&shared.state);
        state.touch(&path);
        state.stats.loaded_blocks += 1;
        drop(state);
        // Recency survives a restart through the modification time.
        if let Ok(f) = fs::File::options().append(true).open(&path) {
            let _ = f.set_modified(SystemTime::now());
        }
        Some(bytes)
    }

    fn write(&self, hash: u64, payload: &[u8]) {
        self.hook(Io::Write(hash));
        let bytes = format::encode(&self.identity, hash, &self.model_name, payload);
        let size = bytes.len() as u64;
        let path = self.path(hash);
        {
            let mut state = lock(&self.state);
            if size > self.budget {
                state.queued.remove(&hash);
                return;
            }
            // Room for the temporary file, which becomes the block's file.
            state.evict_until(self.budget - size);
            state.used += size;
        }
        let result = crate::util::write_atomic(&path, &bytes);
        let mut state = lock(&self.state);
        state.queued.remove(&hash);
        state.used -= size;
        match result {
            Ok(()) => {
                state.insert(path, size, Some(hash));
                state.stats.written_blocks += 1;
            }
            Err(e) => tracing::warn!("prompt cache: cannot write {}: {e}", path.display()),
        }
    }
}

fn write_loop(shared: &Shared, jobs: Receiver<Job>) {
    for job in jobs {
        match job {
            Job::Write { hash, payload } => {
                shared.write(hash, &payload);
                lock(&shared.state).queued_bytes -= payload.len();
                shared.room.notify_all();
            }
            Job::Flush(done) => {
                let _ = done.send(());
            }
        }
    }
}

#[cfg(test)]
mod tests;
