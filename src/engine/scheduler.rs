//! What runs in the next step: which sequences, how many of their tokens, which blocks.
//!
//! Running sequences go first, oldest first: each decode takes one token of the step's budget,
//! a prefill takes what is left, in chunks. Then waiting requests are admitted in arrival order
//! while sequences and tokens allow. When blocks run out, the newest running sequence is
//! preempted (its blocks released, to be recomputed later) so that older ones can go on.

use std::collections::VecDeque;

use super::block_manager::{BlockManager, PrefixLookup};
use super::sequence::{RequestId, Sequence};

#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    pub max_num_seqs: usize,
    /// Tokens in one forward pass (decodes plus prefill chunks).
    pub max_num_batched_tokens: usize,
}

/// One sequence's share of a step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scheduled {
    pub id: RequestId,
    pub num_tokens: usize,
}

pub struct Scheduler {
    pub config: SchedulerConfig,
    /// Admitted, holding blocks, in admission order.
    pub running: Vec<Sequence>,
    /// Not yet admitted (or preempted), in arrival order.
    pub waiting: VecDeque<Sequence>,
    pub prefix_hit_tokens: u64,
    /// Of `prefix_hit_tokens`, those in blocks loaded from the disk tier.
    pub prefix_hit_tokens_disk: u64,
    pub preemptions: u64,
}

impl Scheduler {
    pub fn new(config: SchedulerConfig) -> Self {
        Self { config, running: Vec::new(), waiting: VecDeque::new(), prefix_hit_tokens: 0, prefix_hit_tokens_disk: 0, preemptions: 0 }
    }

    /// Gives a sequence the blocks it needs to hold `tokens` tokens.
    fn grow(blocks: &mut BlockManager, seq: &mut Sequence, tokens: usize) -> bool {
        let needed = tokens.div_ceil(blocks.block_size());
        while seq.block_table.len() < needed {
            let Some(id) = blocks.allocate() else { return false };
            let index = seq.block_table.len();
            seq.block_table.push(id);
            // A prompt block is named now, so identical prompts wait for it instead of
            // computing it again.
            if let Some(&h) = seq.block_hashes.get(index) {
                blocks.register(id, h, false);
            }
        }
        true
    }

    /// Releases a sequence's blocks and puts it back at the head of the queue, to be
    /// recomputed from its tokens (prompt and output so far) when there is room.
    fn preempt(&mut self, blocks: &mut BlockManager, index: usize) {
        let mut seq = self.running.remove(index);
        blocks.release(&seq.block_table);
        seq.block_table.clear();
        seq.num_computed = 0;
        self.preemptions += 1;
        tracing::debug!("preempted request {} ({} tokens)", seq.id, seq.tokens.len());
        self.waiting.push_front(seq);
    }

    pub fn schedule(&mut self, blocks: &mut BlockManager) -> Vec<Scheduled> {
        let mut budget = self.config.max_num_batched_tokens;
        let mut out = Vec::new();
        // Decodes before prefill chunks, so a long prompt never delays the next token of a
        // running sequence by more than one chunk.
        let mut order: Vec<usize> = (0..self.running.len()).collect();
        order.sort_by_key(|&i| self.running[i].is_prefilling());
        let mut i = 0;
        while i < order.len() && budget > 0 {
            let seq = &mut self.running[order[i]];
            let n = seq.remaining().min(budget);
            let tokens = seq.num_computed + n;
            if Self::grow(blocks, seq, tokens) {
                out.push(Scheduled { id: seq.id, num_tokens: n });
                budget -= n;
                i += 1;
                continue;
            }
            // Out of blocks: preempt the newest sequence not yet scheduled (perhaps this one),
            // then try again. Everything before position `i` is scheduled, so it stays.
            let victim = (0..self.running.len())
                .rev()
                .find(|&v| !out.iter().any(|s| s.id == self.running[v].id))
                .expect("the current sequence is not scheduled yet");
            self.preempt(blocks, victim);
            order.retain(|&o| o != victim);
            for o in order.iter_mut().filter(|o| **o > victim) {
                *o -= 1;
            }
        }
        self.admit(blocks, &mut budget, &mut out);
        out
    }

    /// Admits waiting requests in arrival order while room remains. A request whose prefix is
    /// being computed by another waits (others behind it may still be admitted).
    fn admit(&mut self, blocks: &mut BlockManager, budget: &mut usize, out: &mut Vec<Scheduled>) {
        let mut deferred = VecDeque::new();
        while *budget > 0 && self.running.len() < self.config.max_num_seqs {
            let Some(mut seq) = self.waiting.pop_front() else { break };
            // Keep the last token uncached: its logits are needed.
            let lookup = blocks.lookup(&seq.block_hashes, seq.tokens.len() - 1);
            let hit = match lookup {
                PrefixLookup::InFlight => {
                    deferred.push_back(seq);
                    continue;
                }
                PrefixLookup::Hit(hit) => hit,
            };
            let from_disk = blocks.share(&hit);
            seq.block_table = hit;
            seq.num_computed = seq.block_table.len() * blocks.block_size();
            let n = seq.remaining().min(*budget);
            // Blocks for the whole prompt now, so each is named (and shareable) from the start.
            let tokens = seq.tokens.len();
            if !Self::grow(blocks, &mut seq, tokens) {
                blocks.release(&seq.block_table);
                seq.block_table.clear();
                seq.num_computed = 0;
                self.waiting.push_front(seq);
                break;
            }
            seq.cached_tokens = seq.num_computed.min(seq.prompt_len);
            self.prefix_hit_tokens += seq.cached_tokens as u64;
            self.prefix_hit_tokens_disk += (from_disk * blocks.block_size()).min(seq.cached_tokens) as u64;
            out.push(Scheduled { id: seq.id, num_tokens: n });
            *budget -= n;
            self.running.push(seq);
        }
        while let Some(seq) = deferred.pop_back() {
            self.waiting.push_front(seq);
        }
    }
}
