//! Moving KV blocks between memory and the disk tier.
//!
//! - Before a waiting request is admitted, the blocks of its prefix that are on disk (and not in
//!   memory) are read by the disk tier's reader thread and copied into free blocks and named,
//!   so the scheduler finds them like any cached block (`Prefetch`). The engine thread never
//!   reads a file: a request whose blocks are not read yet waits (boundedly), the others run.
//! - A named block about to be reused for something else is copied out and queued for the
//!   disk first (`spill_evicted`, between scheduling and the forward pass that overwrites it);
//!   when the writer is behind, the write is dropped rather than waited for.
//! - When a request finishes, its full blocks are written too (write-through, in the
//!   background), so a restart, or a crash, finds recent prompts and conversations on disk.

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use super::block_manager::BlockManager;
use super::disk::{DiskCache, Loaded};
use super::sequence::{RequestId, Sequence};
use crate::backend::{BlockId, BlockStore, RELEASED_BLOCK};

/// Queues a copy of a block for the disk (a block that cannot be read is left out, and said
/// so). The copy is made here, in memory; the writer thread writes it. With the server's
/// `SaveMode::IfIdle`, a writer behind by its byte budget drops the write instead of waiting.
fn save(disk: &DiskCache, kv: &dyn BlockStore, id: BlockId, hash: u64) {
    match kv.block_bytes(id) {
        Ok(bytes) => disk.save(hash, bytes, disk.write_through()),
        Err(e) => tracing::warn!("KV block {id} not written to the prompt cache: {e}"),
    }
}

/// Writes the named blocks that allocation just evicted, while their contents are intact.
pub fn spill_evicted(disk: &DiskCache, blocks: &mut BlockManager, kv: &dyn BlockStore) {
    for (id, hash) in blocks.take_evicted() {
        if disk.wants(hash) {
            save(disk, kv, id, hash);
        }
    }
}

/// Writes a finishing sequence's full, computed blocks that are not on disk yet.
pub fn save_sequence(disk: &DiskCache, kv: &dyn BlockStore, seq: &Sequence, block_size: usize) {
    let full = (seq.num_computed / block_size).min(seq.block_hashes.len()).min(seq.block_table.len());
    for (&id, &hash) in seq.block_table[..full].iter().zip(&seq.block_hashes) {
        if id != RELEASED_BLOCK && disk.wants(hash) {
            save(disk, kv, id, hash);
        }
    }
}

/// Blocks held for one waiting request while the reader thread reads its prefix from disk.
struct Group {
    seq: RequestId,
    /// Every block held: the prefix already in memory, then those being filled, in order.
    held: Vec<BlockId>,
    /// Blocks still waiting for their bytes, in prefix order: named but not computed, so the
    /// scheduler defers the request (and any other sharing the prefix) until they are filled.
    loading: VecDeque<(u64, BlockId)>,
    deadline: Instant,
}

/// Loads of the disk tier, prefetched for waiting requests by the reader thread (`DiskCache::
/// prefetch`) so that no step waits for a file:
///
/// - When a waiting request's prefix continues on disk, free blocks are taken for those blocks
///   and named as pending (the scheduler defers a request whose next block is pending, and
///   admits others past it), and the reader is asked for their files, which it reads and
///   verifies (a bad file is removed there).
/// - At the start of each step, the blocks that have arrived are copied into their blocks,
///   which become computed; once a request's blocks have all arrived (or failed: the prefix
///   then stops there), they are released, cached, and the scheduler finds them as any other.
/// - A request waits at most `DiskCache::prefetch_wait` for its blocks, then the ones not
///   arrived are given up and it computes them; so does one whose blocks are wanted by running
///   requests (the pool runs short). A request is prefetched once while it waits.
#[derive(Default)]
pub struct Prefetch {
    groups: Vec<Group>,
    /// The request each block being read is for.
    loading: HashMap<u64, RequestId>,
    /// Waiting requests whose prefix was looked up on disk already.
    tried: HashSet<RequestId>,
    /// Arrivals taken while waiting in an idle step, handled at the next one.
    arrived: Vec<Loaded>,
}

/// Longest an idle step (nothing to compute, loads pending) waits for the reader, so that the
/// engine thread soon takes new requests again.
const IDLE_WAIT: Duration = Duration::from_millis(20);

impl Prefetch {
    /// Before scheduling: copies the arrived blocks in, gives up the late ones, and starts the
    /// loads of the requests the scheduler may admit next (the first `slots` waiting ones, next
    /// to `running` running requests). Returns the blocks filled. Never waits for the disk.
    pub fn step(
        &mut self,
        disk: &DiskCache,
        blocks: &mut BlockManager,
        kv: &mut dyn BlockStore,
        waiting: &VecDeque<Sequence>,
        running: usize,
        slots: usize,
    ) -> usize {
        let mut filled = 0;
        let arrived: Vec<Loaded> =
            std::mem::take(&mut self.arrived).into_iter().chain(std::iter::from_fn(|| disk.take_loaded())).collect();
        for loaded in arrived {
            filled += usize::from(self.fill(disk, blocks, kv, loaded));
        }
        // Running requests come first: one new block each may be needed in this step.
        let now = Instant::now();
        let short = blocks.num_free() < running;
        for g in &mut self.groups {
            if short || now >= g.deadline {
                give_up(disk, blocks, &mut self.loading, g, 0, false);
            }
        }
        self.release_done(blocks);
        if !self.tried.is_empty() {
            let ids: HashSet<RequestId> = waiting.iter().map(|s| s.id).collect();
            self.tried.retain(|id| ids.contains(id));
        }
        self.start(disk, blocks, kv, waiting, running, slots);
        filled
    }

    /// In a step that computed nothing while loads are pending: waits a little for the reader
    /// (rather than have the engine thread spin), at most until the first request gives up.
    pub fn idle(&mut self, disk: &DiskCache) {
        let Some(deadline) = self.groups.iter().map(|g| g.deadline).min() else { return };
        let wait = deadline.saturating_duration_since(Instant::now()).min(IDLE_WAIT);
        if let Some(loaded) = disk.wait_loaded(wait) {
            self.arrived.push(loaded);
        }
    }

    /// Copies one arrived block into its block; returns whether it was filled.
    fn fill(&mut self, disk: &DiskCache, blocks: &mut BlockManager, kv: &mut dyn BlockStore, loaded: Loaded) -> bool {
        // Given up already (its request computes it): nothing to do.
        let Some(&seq) = self.loading.get(&loaded.hash) else { return false };
        let Some(group) = self.groups.iter_mut().find(|g| g.seq == seq) else { return false };
        let Some(at) = group.loading.iter().position(|&(h, _)| h == loaded.hash) else { return false };
        let id = group.loading[at].1;
        let filled = match loaded.bytes {
            Some(bytes) => match kv.fill_block(id, &bytes) {
                Ok(()) => true,
                Err(e) => {
                    tracing::warn!("KV block {id} not loaded from the prompt cache: {e}");
                    false
                }
            },
            None => false, // a bad file (removed by now), or gone: the prefix stops here
        };
        if filled {
            group.loading.remove(at);
            self.loading.remove(&loaded.hash);
            blocks.mark_computed(id);
            blocks.add_loaded(id, loaded.hash);
        } else {
            give_up(disk, blocks, &mut self.loading, group, at, true);
        }
        filled
    }

    /// Releases the blocks of the requests whose loads are all done: cached, they are found by
    /// the scheduler's lookup in this step.
    fn release_done(&mut self, blocks: &mut BlockManager) {
        self.groups.retain(|g| {
            if g.loading.is_empty() {
                blocks.release(&g.held);
            }
            !g.loading.is_empty()
        });
    }

    /// Starts the loads of waiting requests whose prefix continues on disk, as far as it does
    /// (in memory, then on disk). A request is served only while free blocks remain for all of
    /// it and for the running requests' next blocks, so loading never evicts what the step is
    /// about to use.
    fn start(
        &mut self,
        disk: &DiskCache,
        blocks: &mut BlockManager,
        kv: &mut dyn BlockStore,
        waiting: &VecDeque<Sequence>,
        running: usize,
        slots: usize,
    ) {
        let block_size = blocks.block_size();
        let mut reserved = running;
        for seq in waiting.iter().take(slots) {
            if self.tried.contains(&seq.id) {
                continue;
            }
            // As the scheduler does: the last token is always computed, for its logits.
            let usable = ((seq.tokens.len() - 1) / block_size).min(seq.block_hashes.len());
            let mut resident = Vec::new();
            let mut wanted = Vec::new();
            for &hash in &seq.block_hashes[..usable] {
                if let Some(id) = blocks.cached_block(hash) {
                    resident.push(id);
                } else if blocks.is_named(hash) || !disk.contains(hash) {
                    break; // being computed or loaded for another request, or nowhere
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
            self.tried.insert(seq.id);
            for &id in &resident {
                blocks.hold(id);
            }
            let mut group = Group {
                seq: seq.id,
                held: resident,
                loading: VecDeque::new(),
                deadline: Instant::now() + disk.prefetch_wait(),
            };
            for hash in wanted {
                let Some(id) = blocks.allocate() else { break };
                spill_evicted(disk, blocks, kv);
                blocks.register(id, hash, false);
                group.held.push(id);
                group.loading.push_back((hash, id));
                self.loading.insert(hash, seq.id);
                disk.prefetch(hash);
            }
            if group.loading.is_empty() {
                blocks.release(&group.held);
                continue;
            }
            tracing::debug!("request {}: loading {} blocks of its prefix from disk", group.seq, group.loading.len());
            self.groups.push(group);
        }
    }
}

/// Gives up a group's loads from position `at` on (the one at `at` `failed`, or none): their
/// blocks, never filled, are released (and so unnamed: the request computes them).
fn give_up(
    disk: &DiskCache,
    blocks: &mut BlockManager,
    loading: &mut HashMap<u64, RequestId>,
    group: &mut Group,
    at: usize,
    failed: bool,
) {
    if at >= group.loading.len() {
        return;
    }
    let dropped: Vec<BlockId> = group
        .loading
        .drain(at..)
        .map(|(hash, id)| {
            loading.remove(&hash);
            id
        })
        .collect();
    disk.count_abandoned(dropped.len() - usize::from(failed));
    group.held.retain(|id| !dropped.contains(id));
    blocks.release(&dropped);
}
