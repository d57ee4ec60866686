//! Retention classes: which cached blocks to keep longest when memory runs short.

/// How long a free block's contents are worth keeping; lower classes are evicted first.
/// Requests without a session are `Anonymous`; a session's blocks take the class of the
/// message their tokens belong to (the highest one, for a block spanning several), so old
/// assistant turns go before user turns, and those before the system prompt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default, Hash)]
pub enum Retention {
    #[default]
    Anonymous = 1,
    Assistant = 2,
    User = 3,
    System = 4,
}

/// The classes of one request's tokens: spans of the prompt, and the class of what it generates.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RetentionPlan {
    /// `(end, class)`: tokens from the previous span's end up to `end` (exclusive) have `class`.
    /// Prompt tokens past the last span are `Anonymous`.
    pub spans: Vec<(usize, Retention)>,
    pub generated: Retention,
}

impl RetentionPlan {
    /// One class for a whole prompt and its output.
    pub fn uniform(prompt_len: usize, class: Retention) -> Self {
        Self { spans: vec![(prompt_len, class)], generated: class }
    }

    /// The class of tokens `start..end` of a sequence whose prompt has `prompt_len` tokens:
    /// the highest of any of them.
    pub fn class_of(&self, start: usize, end: usize, prompt_len: usize) -> Retention {
        let mut class = if end > prompt_len { self.generated } else { Retention::Anonymous };
        let mut from = 0;
        for &(to, c) in &self.spans {
            if from < end.min(prompt_len) && start < to {
                class = class.max(c);
            }
            from = to;
        }
        class
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_block_takes_the_highest_class_of_its_tokens() {
        let plan = RetentionPlan {
            spans: vec![(20, Retention::System), (40, Retention::User), (50, Retention::Assistant)],
            generated: Retention::Assistant,
        };
        assert_eq!(plan.class_of(0, 16, 60), Retention::System);
        assert_eq!(plan.class_of(16, 32, 60), Retention::System, "spans the end of the system prompt");
        assert_eq!(plan.class_of(32, 48, 60), Retention::User);
        assert_eq!(plan.class_of(48, 50, 60), Retention::Assistant);
        assert_eq!(plan.class_of(50, 60, 60), Retention::Anonymous, "not covered by any span");
        assert_eq!(plan.class_of(56, 72, 60), Retention::Assistant, "holds generated tokens");
        assert_eq!(RetentionPlan::default().class_of(0, 16, 10), Retention::Anonymous);
    }
}
