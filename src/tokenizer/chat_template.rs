//! The model's own chat template (`tokenizer.chat_template`), rendered with minijinja under
//! Hugging Face's conventions: `messages`, `add_generation_prompt`, `bos_token`, `eos_token`,
//! `raise_exception`, trimmed blocks, and Python string methods.

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
    pub fn render<M: Serialize>(&self, messages: &M, add_generation_prompt: bool) -> Result<String, TemplateError> {
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

/// Minimal strftime for `%Y %m %d %B %b`, enough for date lines in system prompts.
fn format_utc(format: &str, secs: u64) -> String {
    const MONTHS: [&str; 12] = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October", "November", "December"];
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
        let t = ChatTemplate::new("{% if messages|length == 0 %}{{ raise_exception('no messages') }}{% endif %}ok", "<s>", "</s>").unwrap();
        let err = t.render(&Vec::<serde_json::Value>::new(), true).unwrap_err();
        assert!(err.to_string().contains("no messages"), "{err}");
        assert_eq!(t.render(&vec![serde_json::json!({"role": "user", "content": "x"})], true).unwrap(), "ok");
    }

    #[test]
    fn python_string_methods_and_special_tokens_work() {
        let t = ChatTemplate::new("{{ bos_token }}{% for m in messages %}{{ m.content.strip().upper() }}{% endfor %}{{ eos_token }}", "<s>", "</s>").unwrap();
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
