//! Walking a cache folder: the start-up scan, and what `braid cache ls` and `clear` see; and
//! the lock that gives a folder to one process at a time.

use std::fs;
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use super::format::{FormatError, HEADER_LEN, Header, check_header, read_header};
use super::{block_name, is_temporary};

/// The lock file at the top of a cache folder. Only its advisory lock matters; it holds the pid
/// of its holder, for the message another process gets, and is never removed (removing it
/// while another process opens it would let two processes hold "the" lock at once).
pub const LOCK_FILE: &str = ".lock";

/// A cache folder held by this process (until dropped): `DiskCache` holds one, and so do the
/// `braid cache` commands that remove files, so that no other process's start-up scan removes
/// this one's temporary files, or its budget evicts files under it.
#[derive(Debug)]
pub struct FolderLock {
    _file: fs::File,
}

/// Takes the folder's lock (an OS advisory lock on `<root>/.lock`, released when the process
/// ends however it ends), or says which process holds it. `root` must exist.
pub fn lock(root: &Path) -> std::io::Result<FolderLock> {
    let path = root.join(LOCK_FILE);
    let mut file = fs::File::options().read(true).write(true).create(true).truncate(false).open(&path)?;
    match file.try_lock() {
        Ok(()) => {}
        Err(fs::TryLockError::WouldBlock) => {
            let mut text = String::new();
            let _ = file.read_to_string(&mut text);
            let holder = match text.trim().parse::<u32>() {
                Ok(pid) => format!("another process (pid {pid})"),
                Err(_) => "another process".to_string(),
            };
            let message = format!(
                "in use by {holder}, which holds the lock on {}; give each braid process its own prompt cache folder",
                path.display()
            );
            return Err(std::io::Error::new(std::io::ErrorKind::ResourceBusy, message));
        }
        // A file system without advisory locks: the folder stays usable, unguarded.
        Err(fs::TryLockError::Error(e)) if e.kind() == std::io::ErrorKind::Unsupported => {
            tracing::warn!(
                "prompt cache: cannot lock {} ({e}): make sure no other process uses the folder",
                path.display()
            );
        }
        Err(fs::TryLockError::Error(e)) => return Err(e),
    }
    // Informational only (the lock is what excludes), so neither fsynced nor renamed: a
    // rename would swap the file under the lock.
    file.set_len(0)?;
    file.rewind()?;
    write!(file, "{}", std::process::id())?;
    Ok(FolderLock { _file: file })
}

/// A block file whose header and length agree with each other.
pub struct Found {
    pub path: PathBuf,
    pub size: u64,
    pub modified: SystemTime,
    pub header: Header,
}

/// Why the scan removed a file.
pub enum Removed {
    /// A temporary file of a write that never finished (the process was killed).
    Unfinished,
    Bad(FormatError),
}

impl std::fmt::Display for Removed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Removed::Unfinished => f.write_str("left by an unfinished write"),
            Removed::Bad(e) => e.fmt(f),
        }
    }
}

/// Reads a block file's header and checks it against the file's name and length.
fn check(path: &Path, hash: u64) -> std::io::Result<Result<Found, FormatError>> {
    let file = fs::File::open(path)?;
    let meta = file.metadata()?;
    let mut head = Vec::with_capacity(HEADER_LEN);
    file.take(HEADER_LEN as u64).read_to_end(&mut head)?;
    let header = match read_header(&head) {
        Ok(h) => h,
        Err(e) => return Ok(Err(e)),
    };
    if let Err(e) = check_header(&header, &header.identity, hash, meta.len() as usize) {
        return Ok(Err(e));
    }
    Ok(Ok(Found { path: path.to_path_buf(), size: meta.len(), modified: meta.modified()?, header }))
}

/// The sound block files in the subfolders of `root`. Temporary files and block files whose
/// header or length is wrong are removed (each reported to `removed`) when `clean` is set, and
/// skipped otherwise. Anything else in the folder is left alone.
pub fn scan(root: &Path, clean: bool, mut removed: impl FnMut(&Path, Removed)) -> std::io::Result<Vec<Found>> {
    let mut out = Vec::new();
    let mut drop_file = |path: &Path, why: Removed| {
        if clean && fs::remove_file(path).is_ok() {
            removed(path, why);
        }
    };
    for entry in fs::read_dir(root)? {
        let path = entry?.path();
        if !path.is_dir() {
            if is_temporary(&path) {
                drop_file(&path, Removed::Unfinished);
            }
            continue;
        }
        for file in fs::read_dir(&path)? {
            let file = file?.path();
            if is_temporary(&file) {
                drop_file(&file, Removed::Unfinished);
                continue;
            }
            let Some(hash) = block_name(&file) else { continue };
            match check(&file, hash) {
                Ok(Ok(found)) => out.push(found),
                Ok(Err(e)) => drop_file(&file, Removed::Bad(e)),
                // Unreadable (permissions, a race with another process): not ours to judge.
                Err(e) => tracing::warn!("prompt cache: cannot read {}: {e}", file.display()),
            }
        }
    }
    Ok(out)
}

/// One model identity's blocks, for `braid cache ls`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Summary {
    pub folder: String,
    pub model: String,
    pub block_size: u32,
    pub window: u32,
    pub blocks: usize,
    pub bytes: u64,
    /// Seconds since the most recent use of any of its blocks.
    pub idle_secs: u64,
}

/// What the folder holds, per identity subfolder, most recently used first. Changes nothing.
pub fn summarize(root: &Path) -> std::io::Result<Vec<Summary>> {
    let mut out: Vec<(SystemTime, Summary)> = Vec::new();
    for found in scan(root, false, |_, _| {})? {
        let folder = found
            .path
            .parent()
            .and_then(|p| p.file_name())
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let at = match out.iter().position(|(_, s)| s.folder == folder) {
            Some(i) => i,
            None => {
                let h = &found.header;
                out.push((
                    SystemTime::UNIX_EPOCH,
                    Summary {
                        folder,
                        model: h.model_name.clone(),
                        block_size: h.identity.block_size,
                        window: h.identity.window,
                        blocks: 0,
                        bytes: 0,
                        idle_secs: 0,
                    },
                ));
                out.len() - 1
            }
        };
        let (newest, summary) = &mut out[at];
        summary.blocks += 1;
        summary.bytes += found.size;
        *newest = (*newest).max(found.modified);
    }
    out.sort_by_key(|(newest, _)| std::cmp::Reverse(*newest));
    let now = SystemTime::now();
    Ok(out
        .into_iter()
        .map(|(newest, mut s)| {
            s.idle_secs = now.duration_since(newest).map_or(0, |d| d.as_secs());
            s
        })
        .collect())
}

/// Removes block files and temporary files from the subfolders of `root` whose name starts
/// with `prefix` ("" for all), then those subfolders if left empty. Returns (files, bytes).
pub fn remove(root: &Path, prefix: &str) -> std::io::Result<(usize, u64)> {
    let (mut files, mut bytes) = (0, 0);
    for entry in fs::read_dir(root)? {
        let dir = entry?.path();
        let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        if !dir.is_dir() || !name.starts_with(prefix) {
            continue;
        }
        for file in fs::read_dir(&dir)? {
            let file = file?.path();
            if block_name(&file).is_some() || is_temporary(&file) {
                let size = file.metadata().map_or(0, |m| m.len());
                fs::remove_file(&file)?;
                files += 1;
                bytes += size;
            }
        }
        // Fails, harmlessly, if something else lives there.
        let _ = fs::remove_dir(&dir);
    }
    Ok((files, bytes))
}
