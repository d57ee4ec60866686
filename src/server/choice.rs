//! One choice's text as it is generated: incremental detokenization, and stop strings that
//! may span tokens and are never emitted (text that could begin a stop string is held back
//! until it cannot).

use super::openai::FinishReason;
use crate::engine::SampledToken;
use crate::tokenizer::{IncrementalDecoder, TextTokenizer};

#[derive(Debug, Default)]
pub struct Delta {
    pub text: String,
    /// Tokens received with this delta (for logprobs).
    pub tokens: Vec<SampledToken>,
    pub finish: Option<FinishReason>,
}

#[derive(Default)]
pub struct ChoiceText {
    decoder: IncrementalDecoder,
    stop: Vec<String>,
    text: String,
    emitted: usize,
    pub finish: Option<FinishReason>,
    pub completion_tokens: usize,
    pub cached_tokens: usize,
    /// Bytes of text already reported in streamed logprobs (their `text_offset` base).
    pub logprob_offset: usize,
}

impl ChoiceText {
    pub fn new(stop: Vec<String>) -> Self {
        Self { stop, ..Self::default() }
    }

    /// Adds a token. When a stop string completes, the delta ends the choice (`finish` =
    /// "stop") and the caller should stop the sequence.
    pub fn push(&mut self, tokenizer: &TextTokenizer, token: SampledToken) -> Delta {
        self.completion_tokens += 1;
        if self.finish.is_some() {
            return Delta::default();
        }
        let piece = self.decoder.push(tokenizer, token.id);
        self.text.push_str(&piece);
        let mut delta = Delta { tokens: vec![token], ..Delta::default() };
        if let Some(end) = self.find_stop() {
            delta.text = self.text[self.emitted..end].to_string();
            self.text.truncate(end);
            self.emitted = end;
            self.finish = Some(FinishReason::Stop);
            delta.finish = self.finish;
            return delta;
        }
        let safe = self.text.len() - self.held_back();
        if safe > self.emitted {
            delta.text = self.text[self.emitted..safe].to_string();
            self.emitted = safe;
        }
        delta
    }

    /// The sequence ended for `reason`: everything held back is released.
    pub fn finish(&mut self, tokenizer: &TextTokenizer, reason: crate::engine::FinishReason) -> Delta {
        if self.finish.is_some() {
            return Delta::default();
        }
        self.text.push_str(&self.decoder.flush(tokenizer));
        let mut delta = Delta::default();
        if let Some(end) = self.find_stop() {
            self.text.truncate(end);
        }
        delta.text = self.text[self.emitted.min(self.text.len())..].to_string();
        self.emitted = self.text.len();
        self.finish = Some(reason.into());
        delta.finish = self.finish;
        delta
    }

    /// Counts a stop token (end of sequence) without adding its text.
    pub fn push_stop_token(&mut self) {
        self.completion_tokens += 1;
    }

    pub fn text(&self) -> &str {
        &self.text
    }

    /// Start of the earliest stop string in the text not yet emitted.
    fn find_stop(&self) -> Option<usize> {
        let longest = self.stop.iter().map(String::len).max()?;
        let mut from = self.emitted.saturating_sub(longest);
        while !self.text.is_char_boundary(from) {
            from -= 1;
        }
        self.stop.iter().filter_map(|s| self.text[from..].find(s.as_str()).map(|i| from + i)).min()
    }

    /// Bytes at the end of the text that could be the start of a stop string.
    fn held_back(&self) -> usize {
        let pending = &self.text[self.emitted..];
        self.stop
            .iter()
            .flat_map(|s| (1..s.len()).filter(|&k| s.is_char_boundary(k) && pending.ends_with(&s[..k])))
            .max()
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds text pieces straight in (no tokenizer needed for the stop logic).
    fn feed(stop: &[&str], pieces: &[&str]) -> (String, Option<&'static str>) {
        let mut c = ChoiceText::new(stop.iter().map(|s| s.to_string()).collect());
        let mut out = String::new();
        for p in pieces {
            c.text.push_str(p);
            if let Some(end) = c.find_stop() {
                out.push_str(&c.text[c.emitted..end]);
                return (out, Some("stop"));
            }
            let safe = c.text.len() - c.held_back();
            out.push_str(&c.text[c.emitted..safe]);
            c.emitted = safe;
        }
        out.push_str(&c.text[c.emitted..]);
        (out, None)
    }

    #[test]
    fn a_stop_string_across_pieces_is_cut_and_never_emitted() {
        assert_eq!(feed(&["END"], &["Hello E", "N", "D more"]), ("Hello ".to_string(), Some("stop")));
        assert_eq!(feed(&["\n\n"], &["a\n", "\nb"]), ("a".to_string(), Some("stop")));
    }

    #[test]
    fn a_false_start_is_released() {
        assert_eq!(feed(&["END"], &["Hello E", "nd"]), ("Hello End".to_string(), None));
        assert_eq!(feed(&["ab", "é!"], &["xé", "y"]), ("xéy".to_string(), None));
    }

    #[test]
    fn the_earliest_stop_wins() {
        assert_eq!(feed(&["cd", "b"], &["abcd"]), ("a".to_string(), Some("stop")));
    }
}
