//! What runs in the next step: which sequences, how many of their tokens, which blocks.
//!
//! Running sequences go first, oldest first: each decode takes one token of the step's budget,
//! a prefill takes what is left, in chunks. Then waiting requests are admitted in arrival order
//! while sequences and tokens allow; one whose prompt does not fit the free blocks is passed
//! (for a while: see `SKIP_AHEAD_PATIENCE`) by smaller ones behind it. When blocks run out, the
//! newest running sequence is preempted (its blocks released, to be recomputed later) so that
//! older ones can go on.

use std::collections::VecDeque;

use super::block_manager::{BlockManager, PrefixLookup};
use super::sequence::{RequestId, Sequence};

/// Steps a waiting request whose prompt does not fit may be passed by requests behind it;
/// from then on the queue waits for it (nothing behind it is admitted) until running sequences
/// free enough blocks. (A preempted sequence is never passed.)
///
/// Why skip-ahead with an age bound rather than chunked reservation (blocks for one prefill
/// chunk at a time): a prompt's blocks are reserved and named at admission so that identical
/// prefixes arriving meanwhile wait for them instead of computing them again, and a sequence
/// admitted with all its prompt blocks never has to be preempted to finish its own prefill.
/// Chunked reservation would give up both, and under a full pool would let several long
/// prompts each hold part of what they need and preempt one another. Skipping keeps the
/// reservation and only changes the order; the bound keeps that order from starving a large
/// prompt behind a stream of small ones. Counted in steps, not seconds, so a test (and a
/// replay) sees the same schedule on any machine; 64 steps are a fraction of a second to a
/// few seconds of decoding.
pub const SKIP_AHEAD_PATIENCE: u32 = 64;

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
    /// Prompt tokens requests took from the prefix cache at their first admission.
    pub prefix_hit_tokens: u64,
    /// Of `prefix_hit_tokens`, those in blocks loaded from the disk tier.
    pub prefix_hit_tokens_disk: u64,
    /// Tokens a preempted sequence found still cached when it was admitted again (mostly the
    /// blocks it had computed itself before it was preempted): recomputation saved, not a
    /// prefix-cache hit, so counted apart from `prefix_hit_tokens`.
    pub preempted_reuse_tokens: u64,
    pub preemptions: u64,
}

impl Scheduler {
    pub fn new(config: SchedulerConfig) -> Self {
        Self {
            config,
            running: Vec::new(),
            waiting: VecDeque::new(),
            prefix_hit_tokens: 0,
            prefix_hit_tokens_disk: 0,
            preempted_reuse_tokens: 0,
            preemptions: 0,
        }
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
    /// being computed by another waits (others behind it may still be admitted); so does one
    /// whose prompt does not fit the free blocks, until it has waited `SKIP_AHEAD_PATIENCE`
    /// steps: from then on nothing behind it is admitted before it.
    fn admit(&mut self, blocks: &mut BlockManager, budget: &mut usize, out: &mut Vec<Scheduled>) {
        // Requests passed over this step, in arrival order: they go back to the queue's head.
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
                // A preempted sequence is never passed: the pool is already overcommitted, so
                // newcomers admitted past it would be preempted in turn, and would evict the
                // blocks it left cached, which it is about to reuse.
                let holds_the_queue = seq.admitted || seq.unfit_steps >= SKIP_AHEAD_PATIENCE;
                seq.unfit_steps = seq.unfit_steps.saturating_add(1);
                deferred.push_back(seq);
                if holds_the_queue {
                    break;
                }
                continue;
            }
            let hit_tokens = seq.num_computed.min(seq.prompt_len);
            if seq.admitted {
                // Readmitted after preemption: what it finds is mostly its own earlier work.
                // Its usage keeps what the cache gave it the first time.
                self.preempted_reuse_tokens += seq.num_computed as u64;
            } else {
                seq.admitted = true;
                seq.cached_tokens = hit_tokens;
                self.prefix_hit_tokens += hit_tokens as u64;
                self.prefix_hit_tokens_disk += (from_disk * blocks.block_size()).min(hit_tokens) as u64;
            }
            seq.unfit_steps = 0;
            out.push(Scheduled { id: seq.id, num_tokens: n });
            *budget -= n;
            self.running.push(seq);
        }
        while let Some(seq) = deferred.pop_back() {
            self.waiting.push_front(seq);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::sampler::SamplingParams;

    fn seq(id: RequestId, len: usize) -> Sequence {
        Sequence::new(id, (0..len as u32).map(|t| t + 1000 * id as u32).collect(), SamplingParams::greedy(1), 4)
    }

    fn ids(s: &[Scheduled]) -> Vec<RequestId> {
        s.iter().map(|s| s.id).collect()
    }

    /// 10 blocks of 4 tokens; request 0 (20 tokens) holds 5 of them once admitted.
    fn setup() -> (Scheduler, BlockManager) {
        let mut s = Scheduler::new(SchedulerConfig { max_num_seqs: 8, max_num_batched_tokens: 256 });
        let mut blocks = BlockManager::new(10, 4);
        s.waiting.push_back(seq(0, 20));
        assert_eq!(ids(&s.schedule(&mut blocks)), vec![0]);
        (s, blocks)
    }

    #[test]
    fn a_request_that_does_not_fit_is_passed_until_its_patience_runs_out() {
        let (mut s, mut blocks) = setup();
        s.waiting.push_back(seq(1, 24)); // 6 blocks: does not fit in the 5 left
        s.waiting.push_back(seq(2, 4));
        assert_eq!(ids(&s.schedule(&mut blocks)), vec![0, 2], "the small one passes the large one");
        for _ in 1..SKIP_AHEAD_PATIENCE {
            s.schedule(&mut blocks);
        }
        s.waiting.push_back(seq(3, 4));
        assert_eq!(ids(&s.schedule(&mut blocks)), vec![0, 2], "past its patience, the large one holds the queue");
        assert_eq!(s.waiting.iter().map(|q| q.id).collect::<Vec<_>>(), vec![1, 3], "arrival order is kept");
        // Once blocks free up it goes first.
        let done = s.running.remove(0);
        blocks.release(&done.block_table);
        assert_eq!(ids(&s.schedule(&mut blocks)), vec![2, 1, 3]);
    }

    #[test]
    fn a_preempted_request_is_never_passed() {
        let (mut s, mut blocks) = setup();
        let mut preempted = seq(1, 24);
        preempted.admitted = true;
        s.waiting.push_back(preempted);
        s.waiting.push_back(seq(2, 4));
        assert_eq!(ids(&s.schedule(&mut blocks)), vec![0]);
        assert_eq!(s.waiting.len(), 2);
    }
}
