//! User text must reach the model as text, never as a special token.
//!
//! A prompt is rendered by the model's chat template into one string, and that string is
//! tokenized with special tokens recognised, because the template itself writes them
//! (`<|im_start|>`, `<|im_end|>`, `</s>`). A paper title that contains the same characters would
//! otherwise become the token too, and end the user's turn in the middle of the title. Hugging
//! Face's `apply_chat_template` and llama.cpp's chat formatting both behave that way.
//!
//! So before rendering, every message's content is neutralized: a ZERO WIDTH SPACE (U+200B) goes
//! after the first character of each occurrence of a special token's text. The text reads the
//! same, the tokenizer no longer matches the special token there, and the template's own markers,
//! written by the template and not by the content, are untouched. The prompt stays a plain string,
//! so the `prompt` column of the dataset is just as safe for anyone who tokenizes it again.
//! Tokenizing template pieces and user text separately would not be: it changes how the text
//! around a boundary is split (`" {{ title }}"` merges the space into the title's first token) and
//! the published prompt strings would still carry the ambiguity.

use crate::model::load::tokenizer::Tok;
use std::borrow::Cow;

/// What is inserted into special-token text found in user content.
const BREAK: char = '\u{200B}';

/// The texts of the tokenizer's special tokens (those the tokenizer matches in any input),
/// longest first. (A one-character special could not be broken up, and no tokenizer here has one.)
pub fn special_texts(tok: &Tok) -> Vec<String> {
    let mut v: Vec<String> = tok
        .inner
        .get_added_tokens_decoder()
        .into_values()
        .filter(|t| t.special && t.content.chars().count() > 1)
        .map(|t| t.content)
        .collect();
    v.sort_by(|a, b| b.len().cmp(&a.len()).then(a.cmp(b)));
    v.dedup();
    v
}

/// `text` with every occurrence of a special token's text broken by `BREAK` after its first
/// character. Borrowed unchanged when there is none (the common case).
pub fn neutralize<'a>(text: &'a str, specials: &[String]) -> Cow<'a, str> {
    if !specials.iter().any(|s| text.contains(s.as_str())) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    let mut rest = text;
    'outer: while !rest.is_empty() {
        // The earliest match; at one position, the longest special wins (as the tokenizer does).
        let mut best: Option<(usize, &str)> = None;
        for s in specials {
            if let Some(i) = rest.find(s.as_str()) {
                if best.is_none_or(|(j, b)| i < j || (i == j && s.len() > b.len())) {
                    best = Some((i, s));
                }
            }
        }
        let Some((i, s)) = best else {
            out.push_str(rest);
            break 'outer;
        };
        out.push_str(&rest[..i]);
        let first = s.chars().next().unwrap();
        out.push(first);
        out.push(BREAK);
        // Resume right after the first character: an overlapping special (`<s><s>`) is broken too.
        rest = &rest[i + first.len_utf8()..];
    }
    Cow::Owned(out)
}
