//! What runs in the next step, and what a step's output does to the requests: the scheduler
//! owns every request the engine holds (waiting and running) and its after-step work, like
//! nano-vllm's `Scheduler.schedule()` / `postprocess()`. The engine lends it the block pool
//! (`BlockManager`), which the disk tier uses too.
//!
//! Running sequences go first, oldest first: each decode takes one token of the step's budget,
//! a prefill takes what is left, in chunks. Then waiting requests are admitted in arrival order
//! while sequences and tokens allow; one whose prompt does not fit the free blocks is passed
//! (for a while: see `SKIP_AHEAD_PATIENCE`) by smaller ones behind it. When blocks run out, the
//! newest running sequence is preempted (its blocks released, to be recomputed later) so that
//! older ones can go on.
//!
//! After the forward pass (`update_from_output`): full blocks are named for the prefix cache,
//! blocks behind a sequence's window are released, sampled tokens are appended, and sequences
//! that reach a stop token or their length finish, their blocks kept by their retention class.

use std::collections::{HashMap, VecDeque};

use super::block_manager::{BlockManager, PrefixLookup, block_hash};
use super::sampler::SampledToken;
use super::sequence::{Event, RequestId, Sequence};
use crate::backend::RELEASED_BLOCK;

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
    /// The model's end-of-sequence tokens: they finish a request (unless it ignores them).
    pub eos_ids: Vec<u32>,
    /// The model's context: a sequence that reaches it finishes.
    pub context_length: usize,
}

/// One sequence's share of a step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scheduled {
    pub id: RequestId,
    pub num_tokens: usize,
}

/// Tokens the scheduler has seen go by, since start.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    /// Prompt tokens requests took from the prefix cache at their first admission.
    pub prefix_hit_tokens: u64,
    /// Of `prefix_hit_tokens`, those in blocks loaded from the disk tier.
    pub prefix_hit_tokens_disk: u64,
    /// Tokens a preempted sequence found still cached when it was admitted again (mostly the
    /// blocks it had computed itself before it was preempted): recomputation saved, not a
    /// prefix-cache hit, so counted apart from `prefix_hit_tokens`.
    pub preempted_reuse_tokens: u64,
    pub preemptions: u64,
    /// Tokens computed by prefill (prompts, and recomputation after preemption).
    pub prefilled_tokens: u64,
    pub generated_tokens: u64,
}

pub struct Scheduler {
    config: SchedulerConfig,
    /// Admitted, holding blocks, in admission order.
    running: Vec<Sequence>,
    /// Not yet admitted (or preempted), in arrival order.
    waiting: VecDeque<Sequence>,
    /// Requests the last `schedule` admitted for the first time (not readmissions).
    started: Vec<RequestId>,
    counters: Counters,
}

impl Scheduler {
    pub fn new(config: SchedulerConfig) -> Self {
        Self {
            config,
            running: Vec::new(),
            waiting: VecDeque::new(),
            started: Vec::new(),
            counters: Counters::default(),
        }
    }

    /// The requests the last `schedule` admitted for the first time: their wait is over.
    pub fn started(&self) -> &[RequestId] {
        &self.started
    }

    /// Queues a request behind those waiting.
    pub fn add(&mut self, seq: Sequence) {
        self.waiting.push_back(seq);
    }

    /// Removes a request, waiting or running, and frees its blocks (a running one's keep their
    /// retention classes). Returns whether it was found.
    pub fn abort(&mut self, blocks: &mut BlockManager, id: RequestId) -> bool {
        if let Some(pos) = self.waiting.iter().position(|s| s.id == id) {
            let seq = self.waiting.remove(pos).expect("position is valid");
            blocks.release(&seq.block_table);
        } else if let Some(pos) = self.running.iter().position(|s| s.id == id) {
            let seq = self.running.remove(pos);
            apply_retention(blocks, &seq);
            blocks.release(&seq.block_table);
        } else {
            return false;
        }
        true
    }

    /// Whether any request is waiting or running.
    pub fn has_work(&self) -> bool {
        !self.running.is_empty() || !self.waiting.is_empty()
    }

    /// Admitted sequences, in admission order.
    pub fn running(&self) -> &[Sequence] {
        &self.running
    }

    /// The running sequences, for the step's sampling (each has its own sampler's state).
    pub(super) fn running_mut(&mut self) -> &mut [Sequence] {
        &mut self.running
    }

    /// Sequences not yet admitted (or preempted), in arrival order.
    pub fn waiting(&self) -> &VecDeque<Sequence> {
        &self.waiting
    }

    /// Sequences that could still join the running ones.
    pub fn free_slots(&self) -> usize {
        self.config.max_num_seqs.saturating_sub(self.running.len())
    }

    pub fn counters(&self) -> Counters {
        self.counters
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
        self.counters.preemptions += 1;
        tracing::debug!("preempted request {} ({} tokens)", seq.id, seq.tokens.len());
        self.waiting.push_front(seq);
    }

    /// The next step: which sequences run and how many of their tokens each (decodes first),
    /// with the blocks they need; preempts the newest when blocks run out, then admits.
    pub fn schedule(&mut self, blocks: &mut BlockManager) -> Vec<Scheduled> {
        let mut budget = self.config.max_num_batched_tokens;
        let mut out = Vec::new();
        self.started.clear();
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
                self.counters.preempted_reuse_tokens += seq.num_computed as u64;
            } else {
                seq.admitted = true;
                self.started.push(seq.id);
                seq.cached_tokens = hit_tokens;
                self.counters.prefix_hit_tokens += hit_tokens as u64;
                self.counters.prefix_hit_tokens_disk += (from_disk * blocks.block_size()).min(hit_tokens) as u64;
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

    /// The after-step work, for the sequences of `scheduled` whose forward pass went through;
    /// `tokens` is aligned with `scheduled` (Some for each sequence that sampled a token: its
    /// tokens are all computed now). Marks and names full blocks, releases blocks behind a
    /// window, appends the tokens and finishes the sequences that stop or reach their length:
    /// `on_finish` sees each before its blocks are released. Returns one event per token.
    pub fn update_from_output(
        &mut self,
        blocks: &mut BlockManager,
        scheduled: &[Scheduled],
        tokens: Vec<Option<SampledToken>>,
        mut on_finish: impl FnMut(&Sequence),
    ) -> Vec<Event> {
        debug_assert_eq!(scheduled.len(), tokens.len());
        let index: HashMap<RequestId, usize> = self.running.iter().enumerate().map(|(i, s)| (s.id, i)).collect();
        let block_size = blocks.block_size();
        let mut events = Vec::new();
        let mut finished = Vec::new();
        for (s, token) in scheduled.iter().zip(tokens) {
            let seq = &mut self.running[index[&s.id]];
            debug_assert_eq!(
                token.is_some(),
                seq.num_computed + s.num_tokens == seq.tokens.len(),
                "a token for each sequence at its end"
            );
            let is_decode = token.is_some() && s.num_tokens == 1 && seq.tokens.len() > seq.prompt_len;
            self.counters.prefilled_tokens += (s.num_tokens - usize::from(is_decode)) as u64;
            seq.num_computed += s.num_tokens;
            record_full_blocks(blocks, seq, block_size);
            release_behind_window(blocks, seq, block_size);
            let Some(token) = token else { continue };
            seq.sampler.observe(token.id);
            seq.tokens.push(token.id);
            self.counters.generated_tokens += 1;
            let finish = seq.finish_reason(&self.config.eos_ids, self.config.context_length);
            if finish.is_some() {
                finished.push(s.id);
            }
            events.push(Event { id: s.id, token: Some(token), finish, cached_tokens: seq.cached_tokens });
        }
        for id in finished {
            let pos = self.running.iter().position(|s| s.id == id).expect("finished sequence is running");
            let seq = self.running.remove(pos);
            on_finish(&seq);
            apply_retention(blocks, &seq);
            blocks.release(&seq.block_table);
        }
        events
    }

    /// Prompt tokens of a running request that came from the prefix cache.
    pub fn cached_tokens(&self, id: RequestId) -> Option<usize> {
        self.running.iter().find(|s| s.id == id).map(|s| s.cached_tokens)
    }
}

/// Gives a leaving sequence's blocks the retention classes of their tokens.
fn apply_retention(blocks: &mut BlockManager, seq: &Sequence) {
    let block_size = blocks.block_size();
    for (index, &id) in seq.block_table.iter().enumerate() {
        if id != RELEASED_BLOCK {
            let class = seq.retention.class_of(index * block_size, (index + 1) * block_size, seq.prompt_len);
            blocks.raise_retention(id, class);
        }
    }
}

/// Marks blocks whose tokens are all computed, and names newly full blocks of generated
/// tokens so a later turn of the same conversation finds them.
fn record_full_blocks(blocks: &mut BlockManager, seq: &mut Sequence, block_size: usize) {
    let full = seq.num_computed / block_size;
    for index in 0..full {
        let id = seq.block_table[index];
        if id == RELEASED_BLOCK {
            continue;
        }
        if !blocks.is_computed(id) {
            blocks.mark_computed(id);
        }
        if index >= seq.block_hashes.len() {
            let parent = seq.block_hashes.last().copied();
            let h = block_hash(parent, &seq.tokens[index * block_size..(index + 1) * block_size]);
            seq.block_hashes.push(h);
            blocks.register(id, h, true);
        }
    }
}

/// Under a window, gives back the blocks that no later token of the sequence can see: those
/// wholly after the kept tokens and before the window's start for the next token.
fn release_behind_window(blocks: &mut BlockManager, seq: &mut Sequence, block_size: usize) {
    let Some(window) = seq.window else { return };
    let first_visible = window.first_visible(seq.num_computed);
    let first_block = window.keep.div_ceil(block_size);
    for index in first_block..first_visible / block_size {
        let id = seq.block_table[index];
        if id != RELEASED_BLOCK {
            blocks.release(&[id]);
            seq.block_table[index] = RELEASED_BLOCK;
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
        let mut s = Scheduler::new(SchedulerConfig {
            max_num_seqs: 8,
            max_num_batched_tokens: 256,
            eos_ids: Vec::new(),
            context_length: 8192,
        });
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

    /// The after-step work, without a model: tokens appended, a length and a stop token
    /// finish their sequences, whose blocks go back to the pool; the counters follow.
    #[test]
    fn the_after_step_work_finishes_sequences_and_frees_their_blocks() {
        use crate::engine::sequence::FinishReason;
        let mut s = Scheduler::new(SchedulerConfig {
            max_num_seqs: 8,
            max_num_batched_tokens: 256,
            eos_ids: vec![7],
            context_length: 8192,
        });
        let mut blocks = BlockManager::new(10, 4);
        let token = |id| Some(SampledToken { id, logprob: 0.0, top: Vec::new() });
        s.add(Sequence::new(0, (1..=8).collect(), SamplingParams::greedy(3), 4));
        s.add(Sequence::new(1, (11..=14).collect(), SamplingParams::greedy(1), 4));
        let step = s.schedule(&mut blocks);
        assert_eq!(step, vec![Scheduled { id: 0, num_tokens: 8 }, Scheduled { id: 1, num_tokens: 4 }]);
        let mut finished = Vec::new();
        let events = s.update_from_output(&mut blocks, &step, vec![token(5), token(9)], |seq| finished.push(seq.id));
        let ends = |events: &[Event]| {
            events.iter().map(|e| (e.id, e.token.as_ref().map(|t| t.id), e.finish)).collect::<Vec<_>>()
        };
        assert_eq!(ends(&events), vec![(0, Some(5), None), (1, Some(9), Some(FinishReason::Length))]);
        assert_eq!((finished.as_slice(), s.running().len()), (&[1][..], 1));
        let step = s.schedule(&mut blocks);
        assert_eq!(step, vec![Scheduled { id: 0, num_tokens: 1 }], "a decode");
        let events = s.update_from_output(&mut blocks, &step, vec![token(7)], |seq| finished.push(seq.id));
        assert_eq!(ends(&events), vec![(0, Some(7), Some(FinishReason::Stop))], "an end-of-sequence token");
        assert!(!s.has_work());
        assert_eq!(blocks.num_used(), 0, "every block is back in the pool");
        let c = s.counters();
        assert_eq!((c.prefilled_tokens, c.generated_tokens), (12, 2 + 1));
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
