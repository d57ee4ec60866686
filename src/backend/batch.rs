//! The flat batch: every scheduled sequence's new tokens concatenated, with no padding.

/// A rotating attention window (like mlx-lm's `RotatingKVCache`): each token attends to the
/// first `keep` tokens and the most recent `size - keep` (itself included).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub keep: usize,
    pub size: usize,
}

impl Window {
    /// Whether the token at logical position `j` attends to position `i` (`i <= j`).
    #[inline]
    pub fn sees(&self, j: usize, i: usize) -> bool {
        i < self.keep || i + (self.size - self.keep) > j
    }

    /// First position (past the kept ones) that tokens from `j` on can still see.
    pub fn first_visible(&self, j: usize) -> usize {
        (j + 1).saturating_sub(self.size - self.keep)
    }
}

/// One sequence's share of a flat batch.
#[derive(Debug, Clone)]
pub struct SeqSlice {
    /// New tokens of this sequence in this step (a prefill chunk, or 1 for a decode).
    pub query_len: usize,
    /// Tokens in this sequence's cache once this step's tokens are written (past + new).
    pub context_len: usize,
    /// KV-cache blocks holding the sequence's tokens, in order: logical token `j` lives in
    /// block `block_table[j / block_size]` at offset `j % block_size`. Blocks a window no
    /// longer sees may be released and marked `RELEASED_BLOCK`.
    pub block_table: Vec<u32>,
    pub window: Option<Window>,
}

/// Block-table entry of a block released because the window moved past it.
pub const RELEASED_BLOCK: u32 = u32::MAX;

/// Input of one forward pass.
#[derive(Debug, Clone, Default)]
pub struct FlatBatch {
    /// All new tokens of all sequences, concatenated in `seqs` order.
    pub tokens: Vec<u32>,
    /// Absolute (rope) position of each token.
    pub positions: Vec<u32>,
    pub seqs: Vec<SeqSlice>,
    /// Indices into `tokens` whose next-token logits are wanted, in output row order.
    pub logit_rows: Vec<usize>,
}

impl FlatBatch {
    /// Appends one sequence's new tokens. Positions continue from the tokens already cached;
    /// when `want_logits` is set, the logits of the last new token are requested.
    pub fn push(&mut self, new_tokens: &[u32], context_len: usize, block_table: Vec<u32>, want_logits: bool) {
        let past = context_len - new_tokens.len();
        self.tokens.extend_from_slice(new_tokens);
        self.positions.extend((past..context_len).map(|p| p as u32));
        self.seqs.push(SeqSlice { query_len: new_tokens.len(), context_len, block_table, window: None });
        if want_logits && !new_tokens.is_empty() {
            self.logit_rows.push(self.tokens.len() - 1);
        }
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }
}
