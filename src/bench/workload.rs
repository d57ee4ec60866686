//! Request generators: random prompts of given token lengths, a long shared system prompt with
//! short distinct questions, multi-turn conversations, or prompts from a JSONL file. Text comes
//! from random token ids of the model's vocabulary (as `vllm bench` does), seeded, so runs are
//! repeatable and runs with different seeds don't hit each other's prefix cache.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{Value, json};

use crate::tokenizer::TextTokenizer;

#[derive(Debug, Clone, PartialEq)]
pub enum Body {
    /// `/v1/completions` with a text prompt.
    Completion(String),
    /// `/v1/chat/completions` with these messages.
    Chat(Vec<Value>),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Item {
    pub body: Body,
    pub max_tokens: usize,
    /// Prompt length as generated (the server's count, when it reports one, is used instead).
    pub prompt_tokens: usize,
}

/// A length, fixed (`128`) or drawn uniformly from a range (`64:256`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lengths {
    pub min: usize,
    pub max: usize,
}

impl std::str::FromStr for Lengths {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let parse = |x: &str| x.trim().parse::<usize>().map_err(|_| format!("'{x}' is not a token count"));
        let (min, max) = match s.split_once(':') {
            Some((a, b)) => (parse(a)?, parse(b)?),
            None => (parse(s)?, parse(s)?),
        };
        if min == 0 || min > max {
            return Err(format!("'{s}': lengths must be positive and min <= max"));
        }
        Ok(Self { min, max })
    }
}

impl Lengths {
    fn draw(&self, rng: &mut ChaCha8Rng) -> usize {
        rng.random_range(self.min..=self.max)
    }
}

/// Random text of a given token length.
pub struct TextSource<'a> {
    tokenizer: &'a TextTokenizer,
    ordinary: Vec<u32>,
    pub rng: ChaCha8Rng,
}

impl<'a> TextSource<'a> {
    pub fn new(tokenizer: &'a TextTokenizer, seed: u64) -> Self {
        // Ordinary tokens only: special tokens would change how the prompt is read.
        let ordinary = (0..tokenizer.vocab_size() as u32)
            .filter(|&id| {
                tokenizer.token_text(id).is_some_and(|t| !t.starts_with("<|") && !t.starts_with('<') && !t.is_empty())
            })
            .collect();
        Self { tokenizer, ordinary, rng: ChaCha8Rng::seed_from_u64(seed) }
    }

    pub fn text(&mut self, tokens: usize) -> String {
        let ids: Vec<u32> = (0..tokens).map(|_| self.ordinary[self.rng.random_range(0..self.ordinary.len())]).collect();
        self.tokenizer.decode(&ids)
    }
}

pub fn random(src: &mut TextSource, n: usize, input: Lengths, output: Lengths) -> Vec<Item> {
    (0..n)
        .map(|_| {
            let len = input.draw(&mut src.rng);
            let max_tokens = output.draw(&mut src.rng);
            Item { body: Body::Completion(src.text(len)), max_tokens, prompt_tokens: len }
        })
        .collect()
}

/// One system prompt of `prefix` tokens shared by all, each with its own question.
pub fn shared_prefix(src: &mut TextSource, n: usize, prefix: usize, question: Lengths, output: Lengths) -> Vec<Item> {
    let system = src.text(prefix);
    (0..n)
        .map(|_| {
            let q = question.draw(&mut src.rng);
            let max_tokens = output.draw(&mut src.rng);
            let messages =
                vec![json!({"role": "system", "content": system}), json!({"role": "user", "content": src.text(q)})];
            Item { body: Body::Chat(messages), max_tokens, prompt_tokens: prefix + q }
        })
        .collect()
}

/// A conversation: its user turns (each turn resends the conversation so far).
#[derive(Debug, Clone, PartialEq)]
pub struct Session {
    pub system: String,
    pub questions: Vec<String>,
    pub max_tokens: Vec<usize>,
}

pub fn multi_turn(
    src: &mut TextSource,
    sessions: usize,
    turns: usize,
    system: usize,
    question: Lengths,
    output: Lengths,
) -> Vec<Session> {
    (0..sessions)
        .map(|_| {
            let system = src.text(system);
            let questions = (0..turns)
                .map(|_| {
                    let q = question.draw(&mut src.rng);
                    src.text(q)
                })
                .collect();
            let max_tokens = (0..turns).map(|_| output.draw(&mut src.rng)).collect();
            Session { system, questions, max_tokens }
        })
        .collect()
}

/// Prompts from a JSONL file: `{"prompt": "..."}` or `{"messages": [...]}`, optional
/// `"max_tokens"`.
pub fn from_file(path: &std::path::Path, output: Lengths, seed: u64) -> anyhow::Result<Vec<Item>> {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Line {
        prompt: Option<String>,
        messages: Option<Vec<Value>>,
        max_tokens: Option<usize>,
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    crate::util::read_jsonl::<Line>(path)?
        .into_iter()
        .enumerate()
        .map(|(i, line)| {
            let body = match (line.prompt, line.messages) {
                (Some(p), None) => Body::Completion(p),
                (None, Some(m)) => Body::Chat(m),
                _ => {
                    anyhow::bail!("{} line {}: give exactly one of \"prompt\" and \"messages\"", path.display(), i + 1)
                }
            };
            let max_tokens = line.max_tokens.unwrap_or_else(|| output.draw(&mut rng));
            Ok(Item { body, max_tokens, prompt_tokens: 0 })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lengths_parse_fixed_and_ranges() {
        assert_eq!("128".parse::<Lengths>().unwrap(), Lengths { min: 128, max: 128 });
        assert_eq!("64:256".parse::<Lengths>().unwrap(), Lengths { min: 64, max: 256 });
        assert!(
            "0".parse::<Lengths>().is_err() && "9:3".parse::<Lengths>().is_err() && "x".parse::<Lengths>().is_err()
        );
    }
}
