//! Moving KV blocks between memory and the disk tier.
//!
//! - Before a waiting request is admitted, the blocks of its prefix that are on disk (and not in
//!   memory) are loaded into free blocks and named, so the scheduler finds them like any cached
//!   block.
//! - A named block about to be reused for something else is copied out and written to disk
//!   first (`spill_evicted`, between scheduling and the forward pass that overwrites it).
//! - When a request finishes, its full blocks are written too (write-through, in the
//!   background), so a restart, or a crash, finds recent prompts and conversations on disk.

use std::collections::VecDeque;

use half::f16;

use super::block_manager::{BlockId, BlockManager};
use super::disk::{DiskCache, SaveMode};
use super::sequence::Sequence;
use crate::model::batch::RELEASED_BLOCK;
use crate::model::KvCache;

/// Where a backend keeps its KV blocks, as the disk tier reads and fills them. A block's bytes
/// are its K and V, layer by layer, K then V, f16 little-endian, whatever holds them.
pub trait BlockStore {
    fn block_bytes(&self, id: BlockId) -> Result<Vec<u8>, String>;
    /// Fills a block from bytes laid out as `block_bytes` makes them.
    fn fill_block(&mut self, id: BlockId, bytes: &[u8]) -> Result<(), String>;
}

/// Appends `values` to `out` as a block's bytes hold them: f16 little-endian.
pub fn push_f16_bytes(values: &[f16], out: &mut Vec<u8>) {
    out.extend(values.iter().flat_map(|x| x.to_bits().to_le_bytes()));
}

/// Fills `values` from bytes as `push_f16_bytes` writes them (twice as many).
pub fn read_f16_bytes(bytes: &[u8], values: &mut [f16]) {
    assert_eq!(bytes.len(), 2 * values.len());
    for (dst, b) in values.iter_mut().zip(bytes.chunks_exact(2)) {
        *dst = f16::from_bits(u16::from_le_bytes([b[0], b[1]]));
    }
}

impl BlockStore for KvCache {
    fn block_bytes(&self, id: BlockId) -> Result<Vec<u8>, String> {
        let n = self.block_size * self.token_width;
        let start = id as usize * n;
        let mut out = Vec::with_capacity(self.layers.len() * 4 * n);
        for layer in &self.layers {
            for half in [&layer.k, &layer.v] {
                push_f16_bytes(&half[start..start + n], &mut out);
            }
        }
        Ok(out)
    }

    fn fill_block(&mut self, id: BlockId, bytes: &[u8]) -> Result<(), String> {
        let n = self.block_size * self.token_width;
        assert_eq!(bytes.len(), self.layers.len() * 4 * n, "block payload of the wrong size");
        let start = id as usize * n;
        let mut chunks = bytes.chunks_exact(2 * n);
        for layer in &mut self.layers {
            for half in [&mut layer.k, &mut layer.v] {
                read_f16_bytes(chunks.next().expect("sized above"), &mut half[start..start + n]);
            }
        }
        Ok(())
    }
}

/// Queues a block for the disk (a block that cannot be read is left out, and said so).
fn save(disk: &DiskCache, kv: &dyn BlockStore, id: BlockId, hash: u64, mode: SaveMode) {
    match kv.block_bytes(id) {
        Ok(bytes) => disk.save(hash, bytes, mode),
        Err(e) => tracing::warn!("KV block {id} not written to the prompt cache: {e}"),
    }
}

/// Writes the named blocks that allocation just evicted, while their contents are intact.
pub fn spill_evicted(disk: &DiskCache, blocks: &mut BlockManager, kv: &dyn BlockStore) {
    for (id, hash) in blocks.take_evicted() {
        if disk.wants(hash) {
            save(disk, kv, id, hash, SaveMode::Wait);
        }
    }
}

/// Writes a finishing sequence's full, computed blocks that are not on disk yet.
pub fn save_sequence(disk: &DiskCache, kv: &dyn BlockStore, seq: &Sequence, block_size: usize) {
    let full = (seq.num_computed / block_size).min(seq.block_hashes.len()).min(seq.block_table.len());
    for (&id, &hash) in seq.block_table[..full].iter().zip(&seq.block_hashes) {
        if id != RELEASED_BLOCK && disk.wants(hash) {
            save(disk, kv, id, hash, disk.write_through());
        }
    }
}

/// Loads from disk the prefix blocks of the requests the scheduler may admit next (the first
/// `slots` waiting ones), as far as each prefix continues on disk or in memory. A request is
/// served only while free blocks remain for all of it, so loading never evicts what the step
/// is about to use. Returns the blocks loaded.
pub fn fill_from_disk(disk: &DiskCache, blocks: &mut BlockManager, kv: &mut dyn BlockStore, waiting: &VecDeque<Sequence>, slots: usize) -> usize {
    let block_size = blocks.block_size();
    // Blocks held until the end, so one request's loads never evict another's (or its own
    // cached head); released together, they are the most recently freed and found by lookup.
    let mut held: Vec<BlockId> = Vec::new();
    let mut reserved = 0;
    let mut loaded = 0;
    for seq in waiting.iter().take(slots) {
        // As the scheduler does: the last token is always computed, for its logits.
        let usable = ((seq.tokens.len() - 1) / block_size).min(seq.block_hashes.len());
        let mut resident = Vec::new();
        let mut wanted = Vec::new();
        for &hash in &seq.block_hashes[..usable] {
            if let Some(id) = blocks.cached_block(hash) {
                resident.push(id);
            } else if blocks.is_named(hash) || !disk.contains(hash) {
                break; // being computed by another request, or nowhere
            } else {
                wanted.push(hash);
            }
        }
        if wanted.is_empty() {
            continue;
        }
        let needed = seq.tokens.len().div_ceil(block_size) - resident.len();
        if blocks.num_free() < reserved + needed {
            break;
        }
        reserved += needed - wanted.len();
        for &id in &resident {
            blocks.hold(id);
            held.push(id);
        }
        for hash in wanted {
            let Some(id) = blocks.allocate() else { break };
            spill_evicted(disk, blocks, kv);
            held.push(id);
            let Some(bytes) = disk.load(hash) else {
                break; // a bad file (removed by now): the prefix continues in memory only
            };
            if let Err(e) = kv.fill_block(id, &bytes) {
                tracing::warn!("KV block {id} not loaded from the prompt cache: {e}");
                break;
            }
            blocks.add_loaded(id, hash);
            loaded += 1;
        }
    }
    blocks.release(&held);
    loaded
}
