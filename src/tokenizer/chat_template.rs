//! The model's own chat template (`tokenizer.chat_template`), rendered with minijinja under
//! Hugging Face's conventions: `messages`, `add_generation_prompt`, `bos_token`, `eos_token`,
//! `raise_exception`, trimmed blocks, and Python string methods.

use std::ops::Range;

use minijinja::{Environment, Error, ErrorKind, Value};
use serde::Serialize;

#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    #[error("the model's chat template is invalid: {0}")]
    Invalid(String),
    #[error("chat template rejected the messages: {0}")]
    Render(String),
    #[error("this model has no chat template")]
    Missing,
}

pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
}

const TEMPLATE_NAME: &str = "chat";

impl ChatTemplate {
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Result<Self, TemplateError> {
        let mut env = Environment::new();
        let syntax = minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(|e| TemplateError::Invalid(e.to_string()))?;
        env.set_syntax(syntax);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |message: String| -> Result<Value, Error> {
            Err(Error::new(ErrorKind::InvalidOperation, message))
        });
        env.add_function("strftime_now", |format: String| -> Result<Value, Error> {
            // Templates use it for "today's date"; braid has no time-zone database, so UTC.
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
            Ok(Value::from(format_utc(&format, now.as_secs())))
        });
        env.add_template_owned(TEMPLATE_NAME, source.to_string()).map_err(|e| TemplateError::Invalid(e.to_string()))?;
        Ok(Self { env, bos_token: bos_token.to_string(), eos_token: eos_token.to_string() })
    }

    /// Renders `messages` (any serialisable list of `{role, content, ...}`).
    pub fn render<M: Serialize + ?Sized>(
        &self,
        messages: &M,
        add_generation_prompt: bool,
    ) -> Result<String, TemplateError> {
        let template = self.env.get_template(TEMPLATE_NAME).map_err(|e| TemplateError::Invalid(e.to_string()))?;
        template
            .render(minijinja::context! {
                messages => Value::from(minijinja::value::Serde(messages)),
                add_generation_prompt => add_generation_prompt,
                bos_token => &self.bos_token,
                eos_token => &self.eos_token,
            })
            .map_err(|e| TemplateError::Render(e.to_string()))
    }
}

/// A message's index and the byte range of its content in a rendered conversation.
pub type ContentSpan = (usize, Range<usize>);

/// A rendered conversation, with where each message's content lies in the text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RenderedChat {
    pub text: String,
    /// Byte ranges of `text` that are message contents, as (message index, range) in text
    /// order. None when the template changes contents (trims, splits, tests them), so that where
    /// a content lies is not known for certain.
    pub contents: Option<Vec<ContentSpan>>,
    /// Byte offset in `text` where each message's turn ends (its content and the markers the
    /// template closes it with), one per message, non-decreasing. Only when asked and
    /// `contents` is known.
    pub turn_ends: Option<Vec<usize>>,
}

impl ChatTemplate {
    /// Renders `messages` (`{role, content: string, ...}` objects) and finds each content in
    /// the result. Contents are found by rendering a second time with each content replaced by
    /// a marker no message holds, then putting the contents back in the markers' places: if that
    /// gives the first rendering byte for byte, the template copies contents verbatim and the
    /// markers' places are exactly where they lie. (Searching the text for each content instead
    /// could find it in the template's own text: a content of `<|im_start|>` would match its
    /// own turn's header.) `turn_ends` costs one more rendering per distinct role.
    pub fn render_chat(
        &self,
        messages: &[serde_json::Value],
        add_generation_prompt: bool,
        turn_ends: bool,
    ) -> Result<RenderedChat, TemplateError> {
        let text = self.render(&messages, add_generation_prompt)?;
        let Some(contents) = self.locate_contents(messages, add_generation_prompt, &text) else {
            return Ok(RenderedChat { text, contents: None, turn_ends: None });
        };
        let ends = turn_ends.then(|| self.turn_ends(messages, &text, &contents.1, &contents.0));
        Ok(RenderedChat { text, contents: Some(contents.1), turn_ends: ends })
    }

    /// The marked messages and the content spans, or None if the template changes contents.
    fn locate_contents(
        &self,
        messages: &[serde_json::Value],
        add_generation_prompt: bool,
        text: &str,
    ) -> Option<(Marked, Vec<ContentSpan>)> {
        let marked = Marked::new(messages, text)?;
        let rendered = self.render(&marked.messages, add_generation_prompt).ok()?;
        let mut rebuilt = String::with_capacity(text.len());
        let mut spans = Vec::with_capacity(messages.len());
        let mut rest = rendered.as_str();
        while let Some(at) = rest.find(&marked.open) {
            rebuilt.push_str(&rest[..at]);
            let after = &rest[at + marked.open.len()..];
            let close = after.find(MARK_CLOSE)?;
            let index: usize = after[..close].parse().ok()?;
            let content = messages.get(index)?.get("content")?.as_str()?;
            spans.push((index, rebuilt.len()..rebuilt.len() + content.len()));
            rebuilt.push_str(content);
            rest = &after[close + MARK_CLOSE.len()..];
        }
        rebuilt.push_str(rest);
        (rebuilt == text).then_some((marked, spans))
    }

    /// Where each message's turn ends: after its content and the text the template closes a
    /// turn of its role with (`<|im_end|>\n` in ChatML), learnt by rendering the conversation up
    /// to the first message of each role and reading what follows that message's marker.
    fn turn_ends(
        &self,
        messages: &[serde_json::Value],
        text: &str,
        spans: &[ContentSpan],
        marked: &Marked,
    ) -> Vec<usize> {
        let mut closings: Vec<(&str, String)> = Vec::new();
        for (i, m) in messages.iter().enumerate() {
            let role = m.get("role").and_then(|r| r.as_str()).unwrap_or("");
            if closings.iter().any(|(r, _)| *r == role) {
                continue;
            }
            let marker = marked.marker(i);
            let closing = match self.render(&marked.messages[..=i], false) {
                Ok(prefix) => {
                    prefix.rfind(&marker).map_or_else(String::new, |at| prefix[at + marker.len()..].to_string())
                }
                Err(_) => String::new(),
            };
            closings.push((role, closing));
        }
        // A content may appear more than once (or not at all); its turn ends after its last copy.
        let mut content_end = vec![None; messages.len()];
        for (i, range) in spans {
            content_end[*i] = Some(range.end);
        }
        let mut ends = Vec::with_capacity(messages.len());
        let mut last = 0;
        for (i, m) in messages.iter().enumerate() {
            if let Some(end) = content_end[i] {
                let role = m.get("role").and_then(|r| r.as_str()).unwrap_or("");
                let closing = closings.iter().find(|(r, _)| *r == role).map_or("", |(_, c)| c.as_str());
                let end = if text[end..].starts_with(closing) { end + closing.len() } else { end };
                last = last.max(end);
            }
            ends.push(last);
        }
        ends
    }
}

const MARK_CLOSE: &str = "]]";

/// The messages with each content replaced by `[[braid-<nonce>:<index>]]`, the nonce chosen so
/// that it appears nowhere in the real rendering (so in no content, name or template text).
struct Marked {
    open: String,
    messages: Vec<serde_json::Value>,
}

impl Marked {
    fn new(messages: &[serde_json::Value], text: &str) -> Option<Self> {
        let open = (0..8)
            .map(|_| format!("[[braid-{:016x}:", rand::random::<u64>()))
            .find(|open| !text.contains(open.as_str()))?;
        let mut marked = Self { open, messages: messages.to_vec() };
        for i in 0..marked.messages.len() {
            let marker = marked.marker(i);
            let content = marked.messages[i].get_mut("content")?;
            if !content.is_string() {
                return None;
            }
            *content = serde_json::Value::String(marker);
        }
        Some(marked)
    }

    fn marker(&self, index: usize) -> String {
        format!("{}{index}{MARK_CLOSE}", self.open)
    }
}

/// Minimal strftime for `%Y %m %d %B %b`, enough for date lines in system prompts.
fn format_utc(format: &str, secs: u64) -> String {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = (secs / 86_400) as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let name = MONTHS[(month - 1) as usize];
    format
        .replace("%Y", &year.to_string())
        .replace("%m", &format!("{month:02}"))
        .replace("%d", &format!("{day:02}"))
        .replace("%B", name)
        .replace("%b", &name[..3])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raise_exception_becomes_an_error() {
        let t = ChatTemplate::new(
            "{% if messages|length == 0 %}{{ raise_exception('no messages') }}{% endif %}ok",
            "<s>",
            "</s>",
        )
        .unwrap();
        let err = t.render(&Vec::<serde_json::Value>::new(), true).unwrap_err();
        assert!(err.to_string().contains("no messages"), "{err}");
        assert_eq!(t.render(&vec![serde_json::json!({"role": "user", "content": "x"})], true).unwrap(), "ok");
    }

    #[test]
    fn python_string_methods_and_special_tokens_work() {
        let t = ChatTemplate::new(
            "{{ bos_token }}{% for m in messages %}{{ m.content.strip().upper() }}{% endfor %}{{ eos_token }}",
            "<s>",
            "</s>",
        )
        .unwrap();
        let out = t.render(&vec![serde_json::json!({"role": "user", "content": "  hi  "})], false).unwrap();
        assert_eq!(out, "<s>HI</s>");
    }

    #[test]
    fn utc_dates_format() {
        assert_eq!(format_utc("%d %B %Y", 0), "01 January 1970");
        assert_eq!(format_utc("%Y-%m-%d", 1_700_000_000), "2023-11-14");
    }

    #[test]
    fn a_broken_template_is_a_clear_error() {
        assert!(matches!(ChatTemplate::new("{% for %}", "", ""), Err(TemplateError::Invalid(_))));
    }
}
