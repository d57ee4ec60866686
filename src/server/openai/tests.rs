//! Request parsing and validation: malformed, unknown, out-of-range and mistyped fields are
//! 400s naming the field; property tests over arbitrary values.

use super::request::*;
use crate::server::ApiError;

/// The default model's vocabulary (SmolLM2).
const VOCAB: usize = 49152;

fn chat(body: &str) -> Result<ChatRequest, ApiError> {
    parse_chat(body.as_bytes())
}

#[test]
fn malformed_json_and_non_objects_are_400() {
    let e = chat("{\"model\": ").unwrap_err();
    assert_eq!(e.status, 400);
    assert!(e.message.contains("not valid JSON"));
    assert_eq!(chat("[1]").unwrap_err().status, 400);
}

#[test]
fn unknown_and_unsupported_fields_are_named() {
    let e = chat(r#"{"model": "m", "messages": [], "frobnicate": 1}"#).unwrap_err();
    assert_eq!((e.status.as_u16(), e.param.as_deref()), (400, Some("frobnicate")));
    let e = chat(r#"{"model": "m", "messages": [], "tools": [{"type": "function"}]}"#).unwrap_err();
    assert_eq!(e.param.as_deref(), Some("tools"));
    assert!(e.message.contains("not supported"));
    let e = chat(r#"{"model": "m", "messages": [{"role": "user", "content": "x", "mood": 1}]}"#).unwrap_err();
    assert!(e.message.contains("mood"), "{}", e.message);
}

#[test]
fn ranges_are_checked() {
    let opts = |extra: &str| {
        chat(&format!(r#"{{"model": "m", "messages": [{{"role": "user", "content": "x"}}] {extra}}}"#))
            .unwrap()
            .options(VOCAB)
    };
    assert_eq!(opts(r#", "max_tokens": -1"#).unwrap_err().param.as_deref(), Some("max_tokens"));
    assert_eq!(opts(r#", "temperature": -0.5"#).unwrap_err().param.as_deref(), Some("temperature"));
    assert_eq!(opts(r#", "n": 0"#).unwrap_err().param.as_deref(), Some("n"));
    assert_eq!(opts(r#", "top_logprobs": 3"#).unwrap_err().param.as_deref(), Some("top_logprobs"));
    assert_eq!(opts(r#", "logit_bias": {"abc": 1}"#).unwrap_err().param.as_deref(), Some("logit_bias"));
    let ok = opts(
        r#", "max_tokens": 5, "temperature": 0, "stop": "\n", "n": 2, "logprobs": true, "top_logprobs": 3, "seed": 7"#,
    )
    .unwrap();
    assert_eq!((ok.max_tokens, ok.n, ok.logprobs, ok.params.seed), (Some(5), 2, Some(3), Some(7)));
    assert_eq!(ok.stop, vec!["\n".to_string()]);
}

#[test]
fn stop_strings_logit_bias_and_tiny_values() {
    let opts = |extra: &str| {
        chat(&format!(r#"{{"model": "m", "messages": [{{"role": "user", "content": "x"}}] {extra}}}"#))
            .unwrap()
            .options(VOCAB)
    };
    let long = "é".repeat(129); // 258 bytes in 129 characters
    assert_eq!(opts(&format!(r#", "stop": "{long}""#)).unwrap_err().param.as_deref(), Some("stop"));
    assert_eq!(opts(&format!(r#", "stop": ["a", "{}"]"#, "x".repeat(257))).unwrap_err().param.as_deref(), Some("stop"));
    assert!(opts(&format!(r#", "stop": ["a", "{}"]"#, "x".repeat(256))).is_ok());
    // Outside the vocabulary, or one token named twice.
    let e = opts(r#", "logit_bias": {"49152": 5}"#).unwrap_err();
    assert_eq!(e.param.as_deref(), Some("logit_bias"));
    assert!(e.message.contains("vocabulary"), "{}", e.message);
    assert_eq!(opts(r#", "logit_bias": {"7": 1, "007": 1}"#).unwrap_err().param.as_deref(), Some("logit_bias"));
    assert_eq!(
        opts(r#", "logit_bias": {"49151": -100, "0": 100}"#).unwrap().params.logit_bias,
        vec![(0, 100.0), (49151, -100.0)]
    );
    // A top-p below f32's range still keeps the best token; a temperature below it is greedy.
    let tiny = opts(r#", "top_p": 1e-300, "temperature": 1e-300"#).unwrap();
    assert_eq!((tiny.params.top_p, tiny.params.temperature), (f32::MIN_POSITIVE, 0.0));
    assert!(tiny.params.validate().is_ok());
    assert_eq!(opts(r#", "max_tokens": 9223372036854775807"#).unwrap().max_tokens, Some(i64::MAX as usize));
    assert_eq!(opts(r#", "max_completion_tokens": 0"#).unwrap_err().param.as_deref(), Some("max_completion_tokens"));
}

#[test]
fn type_errors_name_the_field() {
    for (body, param) in [
        (r#""temperature": "hot""#, "temperature"),
        (r#""stop": 5"#, "stop"),
        (r#""stream_options": {"include_usage": true, "x": 1}"#, "stream_options.x"),
        (r#""messages": [{"role": "user", "content": 5}]"#, "messages[0].content"),
        (r#""messages": [{"role": "user", "content": "x", "mood": 1}]"#, "messages[0].mood"),
        (r#""logprobs": 3"#, "logprobs"),
    ] {
        let body = format!(r#"{{"model": "m", "messages": [{{"role": "user", "content": "x"}}], {body}}}"#);
        let e = chat(&body).unwrap_err();
        assert_eq!((e.status.as_u16(), e.param.as_deref()), (400, Some(param)), "{body}: {}", e.message);
    }
}

mod properties {
    use super::*;
    use proptest::prelude::*;
    use serde_json::{Value, json};

    /// JSON values, extremes favoured: integers at i64's and u64's ends, floats tiny,
    /// subnormal and huge, digit strings (token ids), long strings, nested lists and maps.
    fn value() -> impl Strategy<Value = Value> {
        let float = prop_oneof![
            proptest::sample::select(vec![
                0.0, -0.0, 1e-40, 5e-324, 1e-5, 0.5, 1.0, 2.0, 2.0000001, 10.0, 100.0, 100.5, 1e30, 1e308, -1e308,
                -2.0, -100.0
            ]),
            any::<f64>(),
        ];
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            prop_oneof![
                proptest::sample::select(vec![i64::MIN, i64::MAX, -1, 0, 1, 16, 17, 20, 21, 49151, 49152]),
                any::<i64>()
            ]
            .prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            float.prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
            "[0-9]{1,12}".prop_map(Value::from),
            ".{0,300}".prop_map(Value::from),
            Just(Value::from("text")),
            Just(Value::from("user")),
        ];
        leaf.prop_recursive(3, 48, 8, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
                proptest::collection::vec(("[0-9]{1,6}|type|text|role|content|include_usage|[a-z]{1,8}", inner), 0..8)
                    .prop_map(|kv| Value::Object(kv.into_iter().collect())),
            ]
        })
    }

    /// Whether `param` names `field` or something inside it.
    fn names(param: &str, field: &str) -> bool {
        param == field || param.starts_with(&format!("{field}[")) || param.starts_with(&format!("{field}."))
    }

    /// Parses and validates a body with `fields` set as given: Ok, or a 400 naming one of
    /// them; what is accepted passes the engine's check and samples a token.
    fn check(base: Value, fields: Vec<(&str, Value)>, endpoint: &str) -> Result<(), TestCaseError> {
        let mut body = base;
        for (field, v) in &fields {
            body[*field] = v.clone();
        }
        let bytes = body.to_string().into_bytes();
        let result = if endpoint == "chat" {
            parse_chat(&bytes).and_then(|r| {
                let options = r.options(VOCAB)?;
                r.template_messages()?;
                Ok(options)
            })
        } else {
            parse_completion(&bytes).and_then(|r| r.options(VOCAB))
        };
        match result {
            Ok(options) => {
                prop_assert!(options.params.validate().is_ok(), "{:?}", options.params);
                let mut row: Vec<f32> = (0..512).map(|i| ((i * 7919) % 97) as f32 * 0.25).collect();
                let t = crate::engine::Sampler::new(options.params, &[1, 2, 3]).sample(&mut row);
                prop_assert!((t.id as usize) < row.len());
            }
            Err(e) => {
                let param = e.param.clone().unwrap_or_default();
                prop_assert_eq!(e.status.as_u16(), 400);
                prop_assert!(fields.iter().any(|(f, _)| names(&param, f)), "{} -> {:?}: {}", body, e.param, e.message);
            }
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(3000))]

        #[test]
        fn any_chat_field_value_is_accepted_or_a_400_naming_a_field(
            fields in proptest::collection::vec((proptest::sample::select([CHAT, COMMON].concat()), value()), 1..5)
        ) {
            check(json!({"model": "m", "messages": [{"role": "user", "content": "x"}]}), fields, "chat")?;
        }

        #[test]
        fn any_completion_field_value_is_accepted_or_a_400_naming_a_field(
            fields in proptest::collection::vec((proptest::sample::select([COMPLETION, COMMON].concat()), value()), 1..5)
        ) {
            check(json!({"model": "m", "prompt": "x"}), fields, "completion")?;
        }
    }
}

#[test]
fn messages_become_template_input() {
    let r = chat(r#"{"model": "m", "messages": [{"role": "developer", "content": "be brief"}, {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]}"#).unwrap();
    let m = r.template_messages().unwrap();
    assert_eq!(m[0]["role"], "system");
    assert_eq!(m[1]["content"], "ab");
    let empty = chat(r#"{"model": "m", "messages": []}"#).unwrap();
    assert_eq!(empty.template_messages().unwrap_err().param.as_deref(), Some("messages"));
    let image = chat(r#"{"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}"#).unwrap();
    assert!(image.template_messages().is_err());
}

#[test]
fn completion_prompts_take_every_form() {
    for body in [r#""hi""#, r#"["a", "b"]"#, "[1, 2, 3]", "[[1], [2, 3]]"] {
        let r = parse_completion(format!(r#"{{"model": "m", "prompt": {body}}}"#).as_bytes()).unwrap();
        assert_eq!(r.options(VOCAB).unwrap().max_tokens, Some(16));
    }
    assert_eq!(
        parse_completion(br#"{"model": "m", "prompt": "x", "echo": true}"#).unwrap_err().param.as_deref(),
        Some("echo")
    );
}
