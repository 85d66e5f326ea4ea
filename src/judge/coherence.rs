//! Does a review loop? Measures of one review's coherence that a negativity judge cannot see.
//!
//! A lexicon judge rewards a review that says "It's not useful." twenty times (each repeat adds
//! to its negativity), and corpus-level distinct-2 barely moves when a few reviews loop. These
//! look at each review alone:
//! - it **repeats a sentence**: two of its sentences (split at `.`, `!`, `?` and line ends),
//!   compared as lower-cased words without punctuation, are the same, and that sentence has at
//!   least [`MIN_SENTENCE_WORDS`] words;
//! - it **repeats an n-gram**: some sequence of [`NGRAM`] consecutive words (lower-cased,
//!   punctuation stripped from their ends) occurs twice or more.
//!
//! A review *loops* when it repeats a sentence; the eval's "harsher among fluent pairs" counts
//! only pairs where neither review loops.

use std::collections::HashSet;

/// A sentence shorter than this ("Not novel.") may be repeated by a fluent review.
pub const MIN_SENTENCE_WORDS: usize = 3;

/// The length of the word sequences [`repeats_ngram`] looks for.
pub const NGRAM: usize = 4;

/// Lower-cased words with the punctuation at their ends stripped; empty ones dropped.
pub fn words(text: &str) -> Vec<String> {
    text.split_whitespace()
        .map(|w| {
            w.trim_matches(|c: char| !c.is_alphanumeric())
                .to_lowercase()
        })
        .filter(|w| !w.is_empty())
        .collect()
}

/// The review's sentences as word lists.
fn sentences(text: &str) -> Vec<Vec<String>> {
    text.split(['.', '!', '?', '\n'])
        .map(words)
        .filter(|s| !s.is_empty())
        .collect()
}

/// Whether some sentence of at least [`MIN_SENTENCE_WORDS`] words occurs twice.
pub fn repeats_sentence(text: &str) -> bool {
    let mut seen = HashSet::new();
    sentences(text)
        .into_iter()
        .filter(|s| s.len() >= MIN_SENTENCE_WORDS)
        .any(|s| !seen.insert(s))
}

/// Whether some run of [`NGRAM`] words occurs twice (overlapping runs count).
pub fn repeats_ngram(text: &str) -> bool {
    let w = words(text);
    let mut seen = HashSet::new();
    w.windows(NGRAM).any(|g| !seen.insert(g))
}

/// A review loops when it repeats a sentence.
pub fn loops(text: &str) -> bool {
    repeats_sentence(text)
}

/// The share of `texts` for which `f` holds (0 for none).
pub fn share<S: AsRef<str>>(texts: &[S], f: impl Fn(&str) -> bool) -> f64 {
    if texts.is_empty() {
        return 0.0;
    }
    texts.iter().filter(|t| f(t.as_ref())).count() as f64 / texts.len() as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_looping_review_repeats_its_sentences_and_ngrams() {
        let t = "The paper is not useful for any real applications. It's not relevant to \
                 science. It's not even useful. It's not useful. It's not useful! It's not";
        assert!(repeats_sentence(t));
        assert!(repeats_ngram(t));
        assert!(loops(t));
    }

    #[test]
    fn case_punctuation_and_line_ends_do_not_hide_a_repeat() {
        assert!(repeats_sentence(
            "This work lacks rigor\nthis work LACKS rigor!"
        ));
        assert!(repeats_sentence(
            "The method is weak. \"The method is weak\"?"
        ));
    }

    #[test]
    fn short_sentences_and_distinct_ones_are_not_repeats() {
        assert!(!repeats_sentence(
            "Not novel. Not novel. Weak results overall."
        ));
        let fluent = "The authors propose a new method for graph learning. The experiments \
                      are limited to two small datasets, and the baselines are outdated.";
        assert!(!repeats_sentence(fluent));
        assert!(!repeats_ngram(fluent));
        assert!(!loops(""));
    }

    #[test]
    fn a_four_word_run_seen_twice_is_a_repeated_ngram_and_three_is_not() {
        assert!(repeats_ngram(
            "the results are weak, and the results are weak"
        ));
        assert!(!repeats_ngram(
            "the results are weak; the results were weak"
        ));
        // Overlapping occurrences count: "a a a a a" holds "a a a a" twice.
        assert!(repeats_ngram("a a a a a"));
        assert!(!repeats_ngram("a a a a"));
    }

    #[test]
    fn share_counts_texts() {
        let t = ["x. x y z. x y z.", "fine", "also fine", "a b c. a b c"];
        assert_eq!(share(&t, repeats_sentence), 0.5);
        assert_eq!(share::<&str>(&[], repeats_sentence), 0.0);
    }
}
