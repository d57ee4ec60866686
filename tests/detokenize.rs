//! Incremental detokenization on the real vocabulary: the pieces always join to the full text
//! and no piece ever holds a broken character.

mod common;

use braid::tokenizer::IncrementalDecoder;
use common::{golden, ids, model};

#[test]
fn incremental_pieces_join_to_the_full_text() {
    let m = model();
    let mut multi_token_chars = 0;
    for case in golden("tokenize.jsonl") {
        let ids = ids(&case["ids"]);
        let mut decoder = IncrementalDecoder::new();
        let mut joined = String::new();
        for &id in &ids {
            let piece = decoder.push(&m.tokenizer, id);
            assert!(!piece.contains('\u{FFFD}'), "broken character in {piece:?}");
            if piece.is_empty() {
                multi_token_chars += 1;
            }
            joined.push_str(&piece);
        }
        joined.push_str(&decoder.flush(&m.tokenizer));
        assert_eq!(joined, m.tokenizer.decode(&ids));
        assert_eq!(joined, case["text"].as_str().unwrap());
    }
    // The golden texts hold emoji and CJK split across byte tokens: the hold-back was exercised.
    assert!(multi_token_chars > 0);
}
