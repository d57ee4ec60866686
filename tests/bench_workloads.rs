//! `braid bench` workload generators on the real vocabulary.

mod common;

use braid::bench::workload::{self, Body, Lengths, TextSource};

fn tokenizer() -> &'static braid::tokenizer::TextTokenizer {
    &common::model().tokenizer
}

fn chat_parts(body: &Body) -> (String, String) {
    match body {
        Body::Chat(m) => (m[0]["content"].as_str().unwrap().to_string(), m[1]["content"].as_str().unwrap().to_string()),
        Body::Completion(_) => panic!("expected chat"),
    }
}

#[test]
fn random_prompts_have_the_asked_lengths_and_repeat_with_the_seed() {
    let t = tokenizer();
    let make =
        |seed| workload::random(&mut TextSource::new(t, seed), 12, "100:140".parse().unwrap(), "16".parse().unwrap());
    let a = make(1);
    assert_eq!(a, make(1), "same seed, same prompts");
    assert_ne!(a, make(2), "another seed, other prompts");
    for item in &a {
        let Body::Completion(text) = &item.body else { panic!("random makes completions") };
        assert!((100..=140).contains(&item.prompt_tokens));
        assert_eq!(item.max_tokens, 16);
        // Re-tokenizing random token text gives about as many tokens back.
        let n = t.encode(text).unwrap().len() as f64;
        assert!(
            (n - item.prompt_tokens as f64).abs() <= 0.3 * item.prompt_tokens as f64,
            "{n} vs {}",
            item.prompt_tokens
        );
    }
}

#[test]
fn shared_prefix_prompts_share_the_system_prompt_only() {
    let items = workload::shared_prefix(
        &mut TextSource::new(tokenizer(), 3),
        6,
        200,
        Lengths { min: 8, max: 8 },
        Lengths { min: 4, max: 4 },
    );
    let parts: Vec<(String, String)> = items.iter().map(|i| chat_parts(&i.body)).collect();
    assert!(parts.iter().all(|p| p.0 == parts[0].0), "one system prompt for all");
    let questions: std::collections::HashSet<&String> = parts.iter().map(|p| &p.1).collect();
    assert_eq!(questions.len(), 6, "distinct questions");
    assert!(tokenizer().encode(&parts[0].0).unwrap().len() > 100);
}

#[test]
fn multi_turn_sessions_have_their_turns() {
    let sessions = workload::multi_turn(
        &mut TextSource::new(tokenizer(), 5),
        3,
        4,
        50,
        Lengths { min: 8, max: 8 },
        Lengths { min: 5, max: 9 },
    );
    assert_eq!(sessions.len(), 3);
    for s in &sessions {
        assert_eq!(s.questions.len(), 4);
        assert!(s.max_tokens.iter().all(|m| (5..=9).contains(m)));
    }
    assert_ne!(sessions[0].system, sessions[1].system);
}

#[test]
fn prompt_files_are_read_and_checked() {
    let dir = std::env::temp_dir().join(format!("braid-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("p.jsonl");
    std::fs::write(
        &path,
        "{\"prompt\": \"hi\", \"max_tokens\": 3}\n{\"messages\": [{\"role\": \"user\", \"content\": \"yo\"}]}\n",
    )
    .unwrap();
    let items = workload::from_file(&path, Lengths { min: 7, max: 7 }, 0).unwrap();
    assert_eq!(items[0].body, Body::Completion("hi".into()));
    assert_eq!((items[0].max_tokens, items[1].max_tokens), (3, 7));
    std::fs::write(&path, "{\"prompt\": \"hi\", \"messages\": []}\n").unwrap();
    assert!(workload::from_file(&path, Lengths { min: 7, max: 7 }, 0).unwrap_err().to_string().contains("line 1"));
}
