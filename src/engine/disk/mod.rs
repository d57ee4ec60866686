//! The disk tier of the prefix cache: KV blocks kept in a folder, one file per block, named by
//! the block's chained hash, under a subfolder per model identity (`format::Identity`).
//!
//! - Writes go through a background thread (the engine only copies the block's bytes out), each
//!   one written to a temporary file, fsynced and renamed, so a crash leaves either the whole
//!   file or a temporary one, which the next start removes.
//! - The folder stays within its byte budget: before a write, the least recently used files
//!   (of any model) are removed until the new one fits. Temporary files count too.
//! - On open, the index is rebuilt from the folder: every file's header and length are checked
//!   (another model's file in this model's subfolder, or a truncated one, is removed with a
//!   warning), and recency comes from modification times, which a hit refreshes.
//! - A load verifies the whole file (identity, name, length, checksum) before its bytes are
//!   used; a file that fails is removed with a warning and the block is computed instead.

mod fingerprint;
mod format;
pub mod folder;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::SystemTime;

pub use fingerprint::{dummy_fingerprint, gguf_fingerprint};
pub use format::{FormatError, Header, Identity};

/// Bytes of block copies that may wait for the writer; beyond that, an eviction waits for room
/// and a write-through is dropped (its block is still in memory, and will be written when
/// evicted).
const QUEUE_BYTES: usize = 128 << 20;

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
    /// Write-throughs skipped because the writer was behind.
    pub dropped_writes: u64,
}

#[derive(Debug, thiserror::Error)]
#[error("prompt cache folder {path}: {source}")]
pub struct DiskError {
    pub path: PathBuf,
    pub source: std::io::Error,
}

/// How `save` behaves when the writer is behind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SaveMode {
    /// Wait for room (the block is about to be overwritten in memory).
    Wait,
    /// Skip the write (the block stays in memory).
    IfIdle,
}

pub struct DiskCache {
    shared: Arc<Shared>,
    write_through: SaveMode,
    jobs: Option<SyncSender<Job>>,
    writer: Option<JoinHandle<()>>,
}

struct Shared {
    identity: Identity,
    model_name: String,
    dir: PathBuf,
    budget: u64,
    state: Mutex<State>,
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
    /// Handed to the writer, not yet on disk.
    queued: HashSet<u64>,
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
    pub fn open(root: &Path, budget: u64, identity: Identity, model_name: &str) -> Result<Self, DiskError> {
        let err = |source| DiskError { path: root.to_path_buf(), source };
        let dir = root.join(identity.folder_name());
        fs::create_dir_all(&dir).map_err(err)?;
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
            let own = (b.header.identity == identity && b.path.parent() == Some(dir.as_path())).then_some(b.header.hash);
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
        let shared = Arc::new(Shared { identity, model_name: model_name.to_string(), dir, budget, state: Mutex::new(state) });
        let (jobs, rx) = mpsc::sync_channel((QUEUE_BYTES / identity.payload_len().max(1)).max(4));
        let worker = shared.clone();
        let writer = std::thread::Builder::new()
            .name("braid-cache-writer".into())
            .spawn(move || write_loop(&worker, rx))
            .map_err(err)?;
        Ok(Self { shared, write_through: SaveMode::IfIdle, jobs: Some(jobs), writer: Some(writer) })
    }

    /// How writes of finishing requests' blocks behave when the writer is behind (by default
    /// they are skipped; `braid cache save` waits).
    pub fn with_write_through(mut self, mode: SaveMode) -> Self {
        self.write_through = mode;
        self
    }

    pub fn write_through(&self) -> SaveMode {
        self.write_through
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
    /// removed, with a warning).
    pub fn load(&self, hash: u64) -> Option<Vec<u8>> {
        let shared = &*self.shared;
        if !lock(&shared.state).own.contains(&hash) {
            return None;
        }
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

    /// Queues a block's K/V bytes for writing (nothing happens if it is on disk or queued).
    pub fn save(&self, hash: u64, payload: Vec<u8>, mode: SaveMode) {
        debug_assert_eq!(payload.len(), self.shared.identity.payload_len());
        if !lock(&self.shared.state).queued.insert(hash) {
            return;
        }
        let Some(jobs) = &self.jobs else { return };
        let job = Job::Write { hash, payload };
        let sent = match mode {
            SaveMode::Wait => jobs.send(job).is_ok(),
            SaveMode::IfIdle => jobs.try_send(job).is_ok(),
        };
        if !sent {
            let mut state = lock(&self.shared.state);
            state.queued.remove(&hash);
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
    /// Finishes the queued writes.
    fn drop(&mut self) {
        self.jobs.take();
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
    }
}

impl Shared {
    fn path(&self, hash: u64) -> PathBuf {
        self.dir.join(format!("{hash:016x}.kv"))
    }

    fn write(&self, hash: u64, payload: &[u8]) {
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
            Job::Write { hash, payload } => shared.write(hash, &payload),
            Job::Flush(done) => {
                let _ = done.send(());
            }
        }
    }
}

#[cfg(test)]
mod tests;
