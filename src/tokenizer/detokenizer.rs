//! Incremental detokenization: turns a growing list of token ids into text deltas without ever
//! emitting a broken UTF-8 sequence (a character split across tokens is held back until whole).

use super::TextTokenizer;

#[derive(Debug, Default, Clone)]
pub struct IncrementalDecoder {
    ids: Vec<u32>,
    /// Start of the window decoded for context (so leading-space rules apply as in full text).
    prefix_offset: usize,
    /// End of the text already emitted.
    read_offset: usize,
}

impl IncrementalDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds one token; returns the text it completes (possibly empty).
    pub fn push(&mut self, tokenizer: &TextTokenizer, id: u32) -> String {
        self.ids.push(id);
        let prefix = tokenizer.decode(&self.ids[self.prefix_offset..self.read_offset]);
        let full = tokenizer.decode(&self.ids[self.prefix_offset..]);
        if full.ends_with('\u{FFFD}') {
            return String::new(); // an incomplete character: wait for the next token
        }
        match full.strip_prefix(prefix.as_str()) {
            Some(new) if !new.is_empty() => {
                let new = new.to_string();
                self.prefix_offset = self.read_offset;
                self.read_offset = self.ids.len();
                new
            }
            _ => String::new(),
        }
    }

    /// Whatever is still held back (a sequence that ended inside a character).
    pub fn flush(&mut self, tokenizer: &TextTokenizer) -> String {
        let prefix = tokenizer.decode(&self.ids[self.prefix_offset..self.read_offset]);
        let full = tokenizer.decode(&self.ids[self.prefix_offset..]);
        self.prefix_offset = self.ids.len();
        self.read_offset = self.ids.len();
        full.strip_prefix(prefix.as_str()).unwrap_or("").to_string()
    }
}
