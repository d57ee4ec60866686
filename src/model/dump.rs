//! Intermediate tensors written to files, to compare braid's forward pass with llama.cpp's tensor
//! by tensor (`scripts/llama-dump`). Off unless `BRAID_DUMP_DIR` names a folder when the first
//! forward runs; then forward call n writes `s<n>_<name>.bin` (raw little-endian f32) there,
//! names as llama.cpp's graph names them.

use std::path::PathBuf;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};

static DIR: OnceLock<Option<PathBuf>> = OnceLock::new();
static STEP: AtomicUsize = AtomicUsize::new(0);

/// The number of this forward call when dumping is on.
pub fn next_step() -> Option<usize> {
    DIR.get_or_init(|| std::env::var_os("BRAID_DUMP_DIR").map(PathBuf::from)).as_ref()?;
    Some(STEP.fetch_add(1, Ordering::Relaxed))
}

/// Writes `data` as tensor `name()` of forward call `step` (nothing when dumping is off).
pub fn tensor(step: Option<usize>, name: impl FnOnce() -> String, data: &[f32]) {
    let (Some(step), Some(Some(dir))) = (step, DIR.get()) else { return };
    let bytes: Vec<u8> = data.iter().flat_map(|v| v.to_le_bytes()).collect();
    let path = dir.join(format!("s{step}_{}.bin", name()));
    if let Err(e) = std::fs::write(&path, bytes) {
        tracing::warn!("cannot write {}: {e}", path.display());
    }
}
