//! Ownership of KV-cache blocks: reference counts, the prefix index, and LRU eviction.
//!
//! A full block is named by a chained hash of (parent block's hash, its token ids), so equal
//! prefixes name equal blocks. Blocks whose last holder lets go stay in the index, free but
//! still holding their contents, until they are the least recently used free block and are
//! needed for something else: a chat's next turn finds its earlier turns there.
//!
//! A block is registered under its hash as soon as a sequence is given it to compute (not only
//! once computed), marked pending; a new request that would reuse a pending block waits for it
//! instead of computing the same prefix again.
//!
//! Free blocks are evicted by retention class first, then least recently freed: empty blocks,
//! then anonymous requests' blocks, then a session's assistant turns, user turns and system
//! prompt. The hash is xxh3 (stable across builds and Rust versions), because block names are
//! also file names in the disk tier.

use std::collections::{BTreeMap, HashMap};

pub use super::retention::Retention;
pub use crate::backend::BlockId;

#[derive(Debug, Clone, Default)]
struct Block {
    refs: u32,
    hash: Option<u64>,
    /// False while the sequence that owns it has not written all its tokens yet.
    computed: bool,
    /// Key in the free order while `refs == 0`.
    free_key: Option<FreeKey>,
    retention: Retention,
    /// Filled from the disk tier and not yet taken by any request.
    from_disk: bool,
}

/// Order of eviction: (0 for an unnamed block, else its retention class; time freed).
type FreeKey = (u8, u64);

/// What the prefix index knows about a prompt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PrefixLookup {
    /// These leading blocks are cached and computed (possibly none).
    Hit(Vec<BlockId>),
    /// The next block of this prefix is being computed by another request: wait.
    InFlight,
}

pub struct BlockManager {
    block_size: usize,
    blocks: Vec<Block>,
    index: HashMap<u64, BlockId>,
    /// Free blocks in eviction order: the first is evicted first.
    free: BTreeMap<FreeKey, BlockId>,
    tick: u64,
    /// Whether `allocate` notes the cached blocks it evicts (for the disk tier to save).
    record_evictions: bool,
    evicted: Vec<(BlockId, u64)>,
}

/// Seed of the first block's hash (a block with no parent).
const ROOT_SEED: u64 = 0x6272_6169_645f_6b76;

/// Hash naming a full block of tokens that follows the block named `parent`: xxh3 of the token
/// ids (little-endian), seeded with the parent's hash.
pub fn block_hash(parent: Option<u64>, tokens: &[u32]) -> u64 {
    let bytes: Vec<u8> = tokens.iter().flat_map(|t| t.to_le_bytes()).collect();
    xxhash_rust::xxh3::xxh3_64_with_seed(&bytes, parent.unwrap_or(ROOT_SEED))
}

/// Hashes of every full block of `tokens`.
pub fn prefix_hashes(tokens: &[u32], block_size: usize) -> Vec<u64> {
    let mut parent = None;
    tokens
        .chunks_exact(block_size)
        .map(|chunk| {
            let h = block_hash(parent, chunk);
            parent = Some(h);
            h
        })
        .collect()
}

impl BlockManager {
    pub fn new(num_blocks: usize, block_size: usize) -> Self {
        let mut manager = Self {
            block_size,
            blocks: vec![Block::default(); num_blocks],
            index: HashMap::new(),
            free: BTreeMap::new(),
            tick: 0,
            record_evictions: false,
            evicted: Vec::new(),
        };
        for id in 0..num_blocks as BlockId {
            manager.push_free(id);
        }
        manager
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn num_blocks(&self) -> usize {
        self.blocks.len()
    }

    /// Blocks that can be handed out now (free, cached or not).
    pub fn num_free(&self) -> usize {
        self.free.len()
    }

    /// Free blocks that still hold a cached prefix.
    pub fn num_cached_free(&self) -> usize {
        self.free.values().filter(|&&id| self.blocks[id as usize].hash.is_some()).count()
    }

    pub fn num_used(&self) -> usize {
        self.blocks.len() - self.free.len()
    }

    fn push_free(&mut self, id: BlockId) {
        self.tick += 1;
        let block = &mut self.blocks[id as usize];
        let key = (if block.hash.is_some() { block.retention as u8 } else { 0 }, self.tick);
        self.free.insert(key, id);
        block.free_key = Some(key);
    }

    fn take_ref(&mut self, id: BlockId) {
        let block = &mut self.blocks[id as usize];
        if let Some(key) = block.free_key.take() {
            self.free.remove(&key);
        }
        block.refs += 1;
    }

    /// From now on, `allocate` notes each computed, named block it evicts; `take_evicted`
    /// hands them over while their contents are still intact (before the next forward pass).
    pub fn record_evictions(&mut self) {
        self.record_evictions = true;
    }

    pub fn take_evicted(&mut self) -> Vec<(BlockId, u64)> {
        std::mem::take(&mut self.evicted)
    }

    /// The computed block of this name, if it is in memory.
    pub fn cached_block(&self, hash: u64) -> Option<BlockId> {
        self.index.get(&hash).copied().filter(|&id| self.blocks[id as usize].computed)
    }

    /// Takes a reference on a block without counting it as a hit (`release` gives it back).
    pub fn hold(&mut self, id: BlockId) {
        self.take_ref(id);
    }

    /// Whether any block, computed or pending, holds this name.
    pub fn is_named(&self, hash: u64) -> bool {
        self.index.contains_key(&hash)
    }

    /// Raises a held block's retention class (never lowers it: a block shared by a system
    /// prompt and an anonymous request keeps the system prompt's class).
    pub fn raise_retention(&mut self, id: BlockId, class: Retention) {
        let block = &mut self.blocks[id as usize];
        debug_assert!(block.refs > 0, "retention is set by a holder");
        block.retention = block.retention.max(class);
    }

    /// Names a held block just filled from the disk tier, computed; once released it is cached
    /// like any other until a request takes it.
    pub fn add_loaded(&mut self, id: BlockId, hash: u64) {
        self.register(id, hash, true);
        self.blocks[id as usize].from_disk = true;
    }

    /// Leading cached blocks of a prompt, looking at no more than `max_tokens` tokens.
    pub fn lookup(&self, hashes: &[u64], max_tokens: usize) -> PrefixLookup {
        let mut hit = Vec::new();
        for &h in hashes.iter().take(max_tokens / self.block_size) {
            match self.index.get(&h) {
                Some(&id) if self.blocks[id as usize].computed => hit.push(id),
                Some(_) => return PrefixLookup::InFlight,
                None => break,
            }
        }
        PrefixLookup::Hit(hit)
    }

    /// Takes a reference on cached blocks found by `lookup`; returns how many of them came
    /// from the disk tier (each counts once, for the first request that takes it).
    pub fn share(&mut self, ids: &[BlockId]) -> usize {
        let mut from_disk = 0;
        for &id in ids {
            self.take_ref(id);
            from_disk += usize::from(std::mem::take(&mut self.blocks[id as usize].from_disk));
        }
        from_disk
    }

    /// A fresh block, evicting the least recently freed cached block if need be.
    pub fn allocate(&mut self) -> Option<BlockId> {
        let (&key, &id) = self.free.iter().next()?;
        self.free.remove(&key);
        let block = &mut self.blocks[id as usize];
        if let Some(h) = block.hash.take()
            && self.index.get(&h) == Some(&id)
        {
            self.index.remove(&h);
            if self.record_evictions && block.computed {
                self.evicted.push((id, h));
            }
        }
        *block = Block { refs: 1, ..Block::default() };
        Some(id)
    }

    /// Names a block by the hash of the tokens it holds (or will hold once computed). A hash
    /// already naming another block keeps that block.
    pub fn register(&mut self, id: BlockId, hash: u64, computed: bool) {
        if self.index.contains_key(&hash) || self.blocks[id as usize].hash.is_some() {
            return;
        }
        self.index.insert(hash, id);
        let block = &mut self.blocks[id as usize];
        block.hash = Some(hash);
        block.computed = computed;
    }

    pub fn mark_computed(&mut self, id: BlockId) {
        self.blocks[id as usize].computed = true;
    }

    pub fn is_computed(&self, id: BlockId) -> bool {
        self.blocks[id as usize].computed
    }

    /// Drops one reference to each block. Computed blocks with a hash stay cached; a pending
    /// block that nobody will finish loses its name so no one waits for it.
    pub fn release(&mut self, ids: &[BlockId]) {
        // Later blocks first, so a sequence's tail is evicted before its shared head.
        for &id in ids.iter().rev().filter(|&&id| id != crate::backend::RELEASED_BLOCK) {
            let block = &mut self.blocks[id as usize];
            debug_assert!(block.refs > 0, "block {id} released more often than taken");
            block.refs -= 1;
            if block.refs > 0 {
                continue;
            }
            if !block.computed
                && let Some(h) = block.hash.take()
                && self.index.get(&h) == Some(&id)
            {
                self.index.remove(&h);
            }
            self.push_free(id);
        }
    }

    /// A block's current holders (for tests and leak checks).
    pub fn refs(&self, id: BlockId) -> u32 {
        self.blocks[id as usize].refs
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_released_prefix_is_found_again_until_evicted() {
        let mut m = BlockManager::new(3, 2);
        let hashes = prefix_hashes(&[1, 2, 3, 4], 2);
        let a = m.allocate().unwrap();
        let b = m.allocate().unwrap();
        m.register(a, hashes[0], true);
        m.register(b, hashes[1], true);
        m.release(&[a, b]);
        assert_eq!(m.num_free(), 3);
        assert_eq!(m.lookup(&hashes, 4), PrefixLookup::Hit(vec![a, b]));
        assert_eq!(m.lookup(&hashes, 3), PrefixLookup::Hit(vec![a]), "at most max_tokens");
        // Three fresh allocations evict both cached blocks (oldest free first).
        let _c = m.allocate().unwrap();
        let _d = m.allocate().unwrap();
        assert_eq!(m.lookup(&hashes, 4), PrefixLookup::Hit(vec![a]), "the tail was evicted first");
        let _e = m.allocate().unwrap();
        assert_eq!(m.lookup(&hashes, 4), PrefixLookup::Hit(vec![]));
        assert!(m.allocate().is_none());
    }

    #[test]
    fn pending_blocks_make_others_wait_and_vanish_if_abandoned() {
        let mut m = BlockManager::new(4, 2);
        let hashes = prefix_hashes(&[5, 6, 7, 8], 2);
        let a = m.allocate().unwrap();
        m.register(a, hashes[0], false);
        assert_eq!(m.lookup(&hashes, 4), PrefixLookup::InFlight);
        m.mark_computed(a);
        assert_eq!(m.lookup(&hashes, 4), PrefixLookup::Hit(vec![a]));
        let b = m.allocate().unwrap();
        m.register(b, hashes[1], false);
        m.release(&[b]);
        assert_eq!(m.lookup(&hashes, 4), PrefixLookup::Hit(vec![a]), "the abandoned block is no longer named");
    }

    #[test]
    fn shared_blocks_are_freed_by_their_last_holder() {
        let mut m = BlockManager::new(2, 4);
        let a = m.allocate().unwrap();
        m.register(a, 42, true);
        m.share(&[a]);
        assert_eq!(m.refs(a), 2);
        m.release(&[a]);
        assert_eq!(m.num_free(), 1);
        m.release(&[a]);
        assert_eq!(m.num_free(), 2);
        assert_eq!(m.num_cached_free(), 1);
    }

    #[test]
    fn hashes_chain_through_parents() {
        // Fixed values: block names are file names on disk, so they must never change.
        assert_eq!(
            block_hash(None, &[1, 2]),
            xxhash_rust::xxh3::xxh3_64_with_seed(&[1, 0, 0, 0, 2, 0, 0, 0], ROOT_SEED)
        );
        let x = prefix_hashes(&[1, 2, 3, 4], 2);
        let y = prefix_hashes(&[9, 9, 3, 4], 2);
        assert_ne!(x[1], y[1], "same block, different prefix");
        assert_eq!(prefix_hashes(&[1, 2, 3], 2).len(), 1, "partial blocks have no name");
    }

    #[test]
    fn lower_retention_classes_are_evicted_first() {
        let mut m = BlockManager::new(4, 2);
        let hashes = prefix_hashes(&[1, 2, 3, 4, 5, 6], 2);
        let ids: Vec<BlockId> = (0..3).map(|_| m.allocate().unwrap()).collect();
        let classes = [Retention::System, Retention::User, Retention::Assistant];
        for ((&id, &h), class) in ids.iter().zip(&hashes).zip(classes) {
            m.register(id, h, true);
            m.raise_retention(id, class);
        }
        m.release(&ids);
        let anonymous = m.allocate().unwrap();
        assert_eq!(anonymous, 3, "the empty block goes before any cached one");
        m.register(anonymous, 99, true);
        m.release(&[anonymous]);
        // The anonymous block goes first although it was freed last, then by class: the
        // system prompt's block outlives the turns that follow it.
        assert_eq!(m.allocate(), Some(anonymous));
        assert_eq!(m.allocate(), Some(ids[2]));
        assert_eq!(m.allocate(), Some(ids[1]));
        assert_eq!(m.lookup(&hashes, 6), PrefixLookup::Hit(vec![ids[0]]));
    }

    #[test]
    fn evictions_are_recorded_and_disk_blocks_counted_once() {
        let mut m = BlockManager::new(2, 2);
        m.record_evictions();
        let hashes = prefix_hashes(&[1, 2, 3, 4], 2);
        let a = m.allocate().unwrap();
        m.register(a, hashes[0], true);
        m.release(&[a]);
        let b = m.allocate().unwrap();
        m.add_loaded(b, hashes[1]);
        m.release(&[b]);
        assert!(m.take_evicted().is_empty(), "the empty block was used first");
        let PrefixLookup::Hit(hit) = m.lookup(&hashes, 4) else { panic!("no hit") };
        assert_eq!(m.share(&hit), 1, "one of the two came from disk");
        m.release(&hit);
        assert_eq!(m.share(&hit), 0, "a second taker hits memory");
        m.release(&hit);
        m.allocate().unwrap();
        assert_eq!(m.take_evicted(), vec![(b, hashes[1])]);
    }
}
