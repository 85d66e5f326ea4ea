//! VADER (Valence Aware Dictionary and sEntiment Reasoner), a rule-based sentiment analyser tuned
//! to social-media text: a port of the Python package `vaderSentiment` 3.3.2
//! (`vaderSentiment/vaderSentiment.py`), rule by rule, with its two lexicons embedded unchanged.
//!
//! If you use it, cite: Hutto, C.J. & Gilbert, E.E. (2014). VADER: A Parsimonious Rule-based
//! Model for Sentiment Analysis of Social Media Text. Eighth International Conference on Weblogs
//! and Social Media (ICWSM-14). Ann Arbor, MI, June 2014.
//!
//! The lexicon files `data/vader/vader_lexicon.txt` and `data/vader/emoji_utf8_lexicon.txt`
//! (copied byte for byte from the package), like the code this is ported from, are under the MIT
//! licence, Copyright (c) 2016 C.J. Hutto; the licence text is in `data/vader/LICENSE`.
//!
//! # Parity with the Python package
//!
//! The aim is the same output as `SentimentIntensityAnalyzer().polarity_scores(text)` under
//! CPython 3.11, down to the last bit and quirks included:
//!
//! - [`Scores`] holds the rounded values that `polarity_scores` returns: `round(x, 3)` for `neg`,
//!   `neu` and `pos`, `round(x, 4)` for `compound`. Python rounds the exact binary value to the
//!   nearest decimal, a tie (possible only when that value is exactly halfway, like 0.0625) going
//!   to the even digit, and returns the nearest `f64` to that decimal. Rust's `{:.N}` formatting
//!   also rounds the exact value with ties to even, so formatting and parsing back reproduces
//!   it. So `round(0.0625, 3)` is 0.062 and `round(0.0635, 3)` is 0.064 (its `f64` lies above
//!   the half).
//! - Sums run left to right starting from +0.0, as CPython 3.11's `sum()` does; CPython 3.12
//!   switched to compensated summation, which can move the last bits of `compound`.
//! - Splitting and trimming use Python's `str.isspace` set, which, unlike
//!   `char::is_whitespace`, includes U+001C..=U+001F.
//! - `str.isupper()` uses Python 3.11's Unicode 14.0 case properties. Rust's tables are newer;
//!   the code points whose properties changed since are pinned in `PY311_CASE`.
//! - Quirks kept:
//!   - The "but" rule finds each sentiment by value (`list.index`), so a value equal to an
//!     earlier, already scaled one scales that earlier one again and is itself left as it was:
//!     in "I love it, but I accept it", "love" (3.2) is halved to 1.6, which equals "accept",
//!     so "love" ends at 0.8 and "accept" stays 1.6 instead of becoming 2.4.
//!   - Lexicon entries with capitals (`:D`, `:-D`, `O_o`, ...) never match, because words are
//!     lowercased before the look-up.
//!   - Emoji are translated one code point at a time, so sequences (skin tones, flags, anything
//!     with U+FE0F) are only partly translated or not at all.
//! - Not ported because inactive in 3.3.2: `SENTIMENT_LADEN_IDIOMS` ("cut the mustard", "hand
//!   to mouth", ...) and `_sentiment_laden_idioms_check`, which nothing calls, and the
//!   commented-out "least" branch of `negated`.

use std::collections::HashMap;

const LEXICON: &str = include_str!("../../data/vader/vader_lexicon.txt");
const EMOJI_LEXICON: &str = include_str!("../../data/vader/emoji_utf8_lexicon.txt");

// Empirically derived mean changes in rated intensity (from the paper): a booster or dampener
// word, a word in ALL CAPS among words that are not, and a negation.
const B_INCR: f64 = 0.293;
const B_DECR: f64 = -0.293;
const C_INCR: f64 = 0.733;
const N_SCALAR: f64 = -0.74;

// Normalisation constant: approximates the largest expected raw sum.
const ALPHA: f64 = 15.0;

const NEGATE: [&str; 59] = [
    "aint",
    "arent",
    "cannot",
    "cant",
    "couldnt",
    "darent",
    "didnt",
    "doesnt",
    "ain't",
    "aren't",
    "can't",
    "couldn't",
    "daren't",
    "didn't",
    "doesn't",
    "dont",
    "hadnt",
    "hasnt",
    "havent",
    "isnt",
    "mightnt",
    "mustnt",
    "neither",
    "don't",
    "hadn't",
    "hasn't",
    "haven't",
    "isn't",
    "mightn't",
    "mustn't",
    "neednt",
    "needn't",
    "never",
    "none",
    "nope",
    "nor",
    "not",
    "nothing",
    "nowhere",
    "oughtnt",
    "shant",
    "shouldnt",
    "uhuh",
    "wasnt",
    "werent",
    "oughtn't",
    "shan't",
    "shouldn't",
    "uh-uh",
    "wasn't",
    "weren't",
    "without",
    "wont",
    "wouldnt",
    "won't",
    "wouldn't",
    "rarely",
    "seldom",
    "despite",
];

/// `BOOSTER_DICT`: degree adverbs that scale the next sentiment word up or down.
fn booster(word: &str) -> Option<f64> {
    Some(match word {
        "absolutely" | "amazingly" | "awfully" | "completely" | "considerable" | "considerably"
        | "decidedly" | "deeply" | "effing" | "enormous" | "enormously" | "entirely"
        | "especially" | "exceptional" | "exceptionally" | "extreme" | "extremely"
        | "fabulously" | "flipping" | "flippin" | "frackin" | "fracking" | "fricking"
        | "frickin" | "frigging" | "friggin" | "fully" | "fuckin" | "fucking" | "fuggin"
        | "fugging" | "greatly" | "hella" | "highly" | "hugely" | "incredible" | "incredibly"
        | "intensely" | "major" | "majorly" | "more" | "most" | "particularly" | "purely"
        | "quite" | "really" | "remarkably" | "so" | "substantially" | "thoroughly" | "total"
        | "totally" | "tremendous" | "tremendously" | "uber" | "unbelievably" | "unusually"
        | "utter" | "utterly" | "very" => B_INCR,
        "almost" | "barely" | "hardly" | "just enough" | "kind of" | "kinda" | "kindof"
        | "kind-of" | "less" | "little" | "marginal" | "marginally" | "occasional"
        | "occasionally" | "partly" | "scarce" | "scarcely" | "slight" | "slightly"
        | "somewhat" | "sort of" | "sorta" | "sortof" | "sort-of" => B_DECR,
        _ => return None,
    })
}

/// `SPECIAL_CASES`: idioms that contain lexicon words but mean something else as a whole.
fn special_case(phrase: &str) -> Option<f64> {
    Some(match phrase {
        "the shit" | "the bomb" | "to die for" => 3.0,
        "bad ass" | "badass" => 1.5,
        "bus stop" => 0.0,
        "yeah right" => -2.0,
        "kiss of death" => -1.5,
        "beating heart" => 3.5,
        _ => return None,
    })
}

/// Sentiment of a text, as `polarity_scores` returns it: the proportions of the text that are
/// negative, neutral and positive (rounded to 3 decimals, summing to about 1), and `compound`,
/// the normalised sum of the word valences in [-1, 1] (rounded to 4 decimals). All four are 0
/// for a text without words.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub(crate) struct Scores {
    neg: f64,
    neu: f64,
    pos: f64,
    pub(crate) compound: f64,
}

/// The analyser (`SentimentIntensityAnalyzer`) with its lexicons parsed; build it once.
#[derive(Debug, Clone)]
pub struct Vader {
    lexicon: HashMap<&'static str, f64>,
    // Only single code points: Python tests `chr in self.emojis` one character at a time, so
    // longer keys can never match.
    emojis: HashMap<char, &'static str>,
}

impl Default for Vader {
    fn default() -> Self {
        Self::new()
    }
}

impl Vader {
    fn new() -> Self {
        let mut lexicon = HashMap::new();
        for line in LEXICON.trim_end_matches('\n').split('\n') {
            if line.is_empty() {
                continue;
            }
            // The files have CRLF line ends; Python's strip() drops the CR.
            let mut fields = py_strip(line).split('\t');
            let word = fields.next().unwrap_or_default();
            let measure = fields
                .next()
                .and_then(|m| m.parse::<f64>().ok())
                .unwrap_or_else(|| panic!("vader_lexicon.txt: bad line {line:?}"));
            // A repeated word keeps its last value, as in the Python dict.
            lexicon.insert(word, measure);
        }
        let mut emojis = HashMap::new();
        for line in EMOJI_LEXICON.trim_end_matches('\n').split('\n') {
            let mut fields = py_strip(line).split('\t');
            let (Some(emoji), Some(description)) = (fields.next(), fields.next()) else {
                panic!("emoji_utf8_lexicon.txt: bad line {line:?}");
            };
            let mut chars = emoji.chars();
            if let (Some(c), None) = (chars.next(), chars.next()) {
                emojis.insert(c, description);
            }
        }
        Vader { lexicon, emojis }
    }

    /// Scores of `text`, rounded exactly as the Python package rounds them.
    pub(crate) fn polarity_scores(&self, text: &str) -> Scores {
        let s = self.polarity_scores_unrounded(text);
        Scores {
            neg: py_round(s.neg, 3),
            neu: py_round(s.neu, 3),
            pos: py_round(s.pos, 3),
            compound: py_round(s.compound, 4),
        }
    }

    /// The scores before the final rounding, for callers (and parity tests) that want every bit.
    pub(crate) fn polarity_scores_unrounded(&self, text: &str) -> Scores {
        let text_no_emoji = self.describe_emojis(text);
        let text = py_strip(&text_no_emoji);

        let words: Vec<&str> = py_split(text).map(strip_punc_if_word).collect();
        // Python lowercases the same words over and over; once is enough.
        let lower: Vec<String> = words.iter().map(|w| w.to_lowercase()).collect();
        let is_cap_diff = allcap_differential(&words);

        let mut sentiments = Vec::with_capacity(words.len());
        for i in 0..words.len() {
            // Modifiers carry no valence of their own; they act through the word they modify.
            if booster(&lower[i]).is_some()
                || (i + 1 < words.len() && lower[i] == "kind" && lower[i + 1] == "of")
            {
                sentiments.push(0.0);
                continue;
            }
            sentiments.push(self.sentiment_valence(&words, &lower, is_cap_diff, i));
        }

        but_check(&lower, &mut sentiments);
        score_valence(&sentiments, text)
    }

    /// Replaces each emoji code point by its description, space-separated from what precedes it.
    fn describe_emojis(&self, text: &str) -> String {
        let mut out = String::with_capacity(text.len());
        let mut prev_space = true;
        for c in text.chars() {
            if let Some(description) = self.emojis.get(&c) {
                if !prev_space {
                    out.push(' ');
                }
                out.push_str(description);
                prev_space = false;
            } else {
                out.push(c);
                // Only U+0020 counts, as in the Python, so a tab before an emoji gets a space too.
                prev_space = c == ' ';
            }
        }
        out
    }

    fn in_lexicon(&self, word: &str) -> bool {
        self.lexicon.contains_key(word)
    }

    fn sentiment_valence(
        &self,
        words: &[&str],
        lower: &[String],
        is_cap_diff: bool,
        i: usize,
    ) -> f64 {
        let Some(&lexicon_valence) = self.lexicon.get(lower[i].as_str()) else {
            return 0.0;
        };
        let mut valence = lexicon_valence;

        // "no" followed by a lexicon word negates that word instead of counting on its own.
        if lower[i] == "no" && i != words.len() - 1 && self.in_lexicon(&lower[i + 1]) {
            valence = 0.0;
        }
        if (i > 0 && lower[i - 1] == "no")
            || (i > 1 && lower[i - 2] == "no")
            || (i > 2 && lower[i - 3] == "no" && (lower[i - 1] == "or" || lower[i - 1] == "nor"))
        {
            valence = lexicon_valence * N_SCALAR;
        }

        if is_cap_diff && py_isupper(words[i]) {
            if valence > 0.0 {
                valence += C_INCR;
            } else {
                valence -= C_INCR;
            }
        }

        // Up to three preceding non-lexicon words may boost, dampen or negate; the further
        // away, the weaker.
        for start_i in 0..3 {
            if i <= start_i {
                break;
            }
            let j = i - (start_i + 1);
            if !self.in_lexicon(&lower[j]) {
                let mut s = scalar_inc_dec(words[j], &lower[j], valence, is_cap_diff);
                if start_i == 1 && s != 0.0 {
                    s *= 0.95;
                }
                if start_i == 2 && s != 0.0 {
                    s *= 0.9;
                }
                valence += s;
                valence = negation_check(valence, lower, start_i, i);
                if start_i == 2 {
                    valence = special_idioms_check(valence, lower, i);
                }
            }
        }

        self.least_check(valence, lower, i)
    }

    /// "least" before a word negates it, except in "at least" and "very least".
    fn least_check(&self, valence: f64, lower: &[String], i: usize) -> f64 {
        if i > 1 && !self.in_lexicon(&lower[i - 1]) && lower[i - 1] == "least" {
            if lower[i - 2] != "at" && lower[i - 2] != "very" {
                return valence * N_SCALAR;
            }
        } else if i > 0 && !self.in_lexicon(&lower[i - 1]) && lower[i - 1] == "least" {
            return valence * N_SCALAR;
        }
        valence
    }
}

/// `SentiText._strip_punc_if_word`: strips leading and trailing ASCII punctuation unless that
/// leaves two characters or fewer, which was then most likely an emoticon such as ":)".
fn strip_punc_if_word(token: &str) -> &str {
    let stripped = token.trim_matches(|c: char| c.is_ascii_punctuation());
    if stripped.chars().count() <= 2 {
        token
    } else {
        stripped
    }
}

/// True if some, but not all, words are in ALL CAPS: only then is capitalisation emphasis.
fn allcap_differential(words: &[&str]) -> bool {
    let allcap_words = words.iter().filter(|w| py_isupper(w)).count();
    let cap_differential = words.len() - allcap_words;
    0 < cap_differential && cap_differential < words.len()
}

/// How much a preceding booster or dampener changes `valence`, in the direction of its sign.
fn scalar_inc_dec(word: &str, word_lower: &str, valence: f64, is_cap_diff: bool) -> f64 {
    let Some(mut scalar) = booster(word_lower) else {
        return 0.0;
    };
    if valence < 0.0 {
        scalar *= -1.0;
    }
    if py_isupper(word) && is_cap_diff {
        if valence > 0.0 {
            scalar += C_INCR;
        } else {
            scalar -= C_INCR;
        }
    }
    scalar
}

/// `negated([word])`: a negation word, or any contraction with "n't".
fn negated(word: &str) -> bool {
    NEGATE.contains(&word) || word.contains("n't")
}

/// Negation by the word `start_i + 1` places before word `i`; "never so/this" intensifies
/// instead, and "without doubt" is not a negation.
fn negation_check(valence: f64, lower: &[String], start_i: usize, i: usize) -> f64 {
    // The word `back` places before word `i`.
    let w = |back: usize| lower[i - back].as_str();
    if start_i == 0 && negated(w(1)) {
        return valence * N_SCALAR;
    }
    if start_i == 1 {
        if w(2) == "never" && (w(1) == "so" || w(1) == "this") {
            return valence * 1.25;
        } else if w(2) == "without" && w(1) == "doubt" {
            return valence;
        } else if negated(w(2)) {
            return valence * N_SCALAR;
        }
    }
    if start_i == 2 {
        // Python's `a and (b or c) or (d or e)`: `and` binds tighter, so any "so" or "this"
        // right before the word intensifies, with or without "never".
        if (w(3) == "never" && (w(2) == "so" || w(2) == "this")) || (w(1) == "so" || w(1) == "this")
        {
            return valence * 1.25;
        } else if w(3) == "without" && (w(2) == "doubt" || w(1) == "doubt") {
            return valence;
        } else if negated(w(3)) {
            return valence * N_SCALAR;
        }
    }
    valence
}

/// Idioms around word `i` (`i >= 3`) replace its valence; booster bigrams before it add to it.
fn special_idioms_check(mut valence: f64, lower: &[String], i: usize) -> f64 {
    let onezero = format!("{} {}", lower[i - 1], lower[i]);
    let twoonezero = format!("{} {} {}", lower[i - 2], lower[i - 1], lower[i]);
    let twoone = format!("{} {}", lower[i - 2], lower[i - 1]);
    let threetwoone = format!("{} {} {}", lower[i - 3], lower[i - 2], lower[i - 1]);
    let threetwo = format!("{} {}", lower[i - 3], lower[i - 2]);

    let sequences = [&onezero, &twoonezero, &twoone, &threetwoone, &threetwo];
    if let Some(v) = sequences.iter().find_map(|seq| special_case(seq)) {
        valence = v;
    }

    if lower.len() - 1 > i {
        let zeroone = format!("{} {}", lower[i], lower[i + 1]);
        if let Some(v) = special_case(&zeroone) {
            valence = v;
        }
    }
    if lower.len() - 1 > i + 1 {
        let zeroonetwo = format!("{} {} {}", lower[i], lower[i + 1], lower[i + 2]);
        if let Some(v) = special_case(&zeroonetwo) {
            valence = v;
        }
    }

    for n_gram in [&threetwoone, &threetwo, &twoone] {
        if let Some(b) = booster(n_gram) {
            valence += b;
        }
    }
    valence
}

/// The contrastive "but": sentiments before the first "but" count half, after it 1.5 times.
/// Mirrors Python's `sentiments.index(sentiment)` inside the loop, which finds the first equal
/// value rather than the current position (see the module docs).
fn but_check(lower: &[String], sentiments: &mut [f64]) {
    let Some(bi) = lower.iter().position(|w| w == "but") else {
        return;
    };
    for p in 0..sentiments.len() {
        let sentiment = sentiments[p];
        let si = sentiments.iter().position(|&s| s == sentiment).unwrap_or(p);
        if si < bi {
            sentiments[si] = sentiment * 0.5;
        } else if si > bi {
            sentiments[si] = sentiment * 1.5;
        }
    }
}

/// Exclamation marks (up to 4) and question marks (2 or more) strengthen whatever sentiment
/// there is.
fn punctuation_emphasis(text: &str) -> f64 {
    let ep_count = text.chars().filter(|&c| c == '!').count().min(4);
    let ep_amplifier = ep_count as f64 * 0.292;
    let qm_count = text.chars().filter(|&c| c == '?').count();
    let qm_amplifier = match qm_count {
        0 | 1 => 0.0,
        2 | 3 => qm_count as f64 * 0.18,
        _ => 0.96,
    };
    ep_amplifier + qm_amplifier
}

fn normalize(score: f64) -> f64 {
    (score / (score * score + ALPHA).sqrt()).clamp(-1.0, 1.0)
}

fn score_valence(sentiments: &[f64], text: &str) -> Scores {
    if sentiments.is_empty() {
        return Scores::default();
    }
    // From +0.0 like Python's sum() (Rust's f64 Sum starts at -0.0).
    let mut sum_s = sentiments.iter().fold(0.0, |acc, &s| acc + s);
    let punct_emph_amplifier = punctuation_emphasis(text);
    if sum_s > 0.0 {
        sum_s += punct_emph_amplifier;
    } else if sum_s < 0.0 {
        sum_s -= punct_emph_amplifier;
    }
    let compound = normalize(sum_s);

    // Each word counts 1 as neutral, or 1 plus its valence as positive or negative.
    let mut pos_sum = 0.0;
    let mut neg_sum = 0.0;
    let mut neu_count = 0u32;
    for &s in sentiments {
        if s > 0.0 {
            pos_sum += s + 1.0;
        }
        if s < 0.0 {
            neg_sum += s - 1.0;
        }
        if s == 0.0 {
            neu_count += 1;
        }
    }

    if pos_sum > neg_sum.abs() {
        pos_sum += punct_emph_amplifier;
    } else if pos_sum < neg_sum.abs() {
        neg_sum -= punct_emph_amplifier;
    }

    let total = pos_sum + neg_sum.abs() + f64::from(neu_count);
    Scores {
        neg: (neg_sum / total).abs(),
        neu: (f64::from(neu_count) / total).abs(),
        pos: (pos_sum / total).abs(),
        compound,
    }
}

/// Python's `round(x, ndigits)` on a float (see the module docs).
fn py_round(x: f64, ndigits: usize) -> f64 {
    format!("{x:.ndigits$}").parse().unwrap_or(x)
}

/// Python's `str.isspace` for one code point.
fn py_isspace(c: char) -> bool {
    matches!(
        c,
        '\t' | '\n'
            | '\u{b}'
            | '\u{c}'
            | '\r'
            | '\u{1c}'..='\u{1f}'
            | ' '
            | '\u{85}'
            | '\u{a0}'
            | '\u{1680}'
            | '\u{2000}'..='\u{200a}'
            | '\u{2028}'
            | '\u{2029}'
            | '\u{202f}'
            | '\u{205f}'
            | '\u{3000}'
    )
}

/// Python's `str.strip()` without arguments.
fn py_strip(s: &str) -> &str {
    s.trim_matches(py_isspace)
}

/// Python's `str.split()` without arguments.
fn py_split(s: &str) -> impl Iterator<Item = &str> {
    s.split(py_isspace).filter(|w| !w.is_empty())
}

/// Code points whose `(Lowercase, Uppercase)` properties in Unicode 14.0 (Python 3.11) differ
/// from those of Rust's `char::is_lowercase`/`is_uppercase` (Unicode 17.0 in Rust 1.95): ranges
/// `(first, last, lowercase, uppercase)`. Mostly letters assigned after 14.0, which Python sees
/// as uncased, plus a few whose properties changed. A toolchain with a newer Unicode may need
/// more entries: compare `char::is_lowercase`/`is_uppercase` with Python's `islower`/`isupper`.
const PY311_CASE: &[(u32, u32, bool, bool)] = &[
    (0x0295, 0x0295, true, false),
    (0x10fc, 0x10fc, false, false),
    (0x1c89, 0x1c8a, false, false),
    (0xa7cb, 0xa7cf, false, false),
    (0xa7d2, 0xa7d2, false, false),
    (0xa7d4, 0xa7d4, false, false),
    (0xa7da, 0xa7dc, false, false),
    (0xa7f1, 0xa7f4, false, false),
    (0xab69, 0xab69, false, false),
    (0x10d50, 0x10d65, false, false),
    (0x10d70, 0x10d85, false, false),
    (0x16ea0, 0x16eb8, false, false),
    (0x16ebb, 0x16ed3, false, false),
    (0x1df25, 0x1df2a, false, false),
    (0x1e030, 0x1e06d, false, false),
];

/// `(Lowercase, Uppercase)` of `c` as Python 3.11 sees them.
fn py_case(c: char) -> (bool, bool) {
    if c.is_ascii() {
        return (c.is_ascii_lowercase(), c.is_ascii_uppercase());
    }
    let cp = u32::from(c);
    for &(first, last, lowercase, uppercase) in PY311_CASE {
        if (first..=last).contains(&cp) {
            return (lowercase, uppercase);
        }
    }
    (c.is_lowercase(), c.is_uppercase())
}

/// General category Lt (titlecase letters), unchanged since well before Unicode 14.0.
fn is_titlecase(c: char) -> bool {
    matches!(
        c,
        '\u{1c5}'
            | '\u{1c8}'
            | '\u{1cb}'
            | '\u{1f2}'
            | '\u{1f88}'..='\u{1f8f}'
            | '\u{1f98}'..='\u{1f9f}'
            | '\u{1fa8}'..='\u{1faf}'
            | '\u{1fbc}'
            | '\u{1fcc}'
            | '\u{1ffc}'
    )
}

/// Python's `str.isupper()`: at least one cased character, and none lowercase or titlecase.
fn py_isupper(s: &str) -> bool {
    let mut cased = false;
    for c in s.chars() {
        let (lowercase, uppercase) = py_case(c);
        if lowercase || is_titlecase(c) {
            return false;
        }
        cased |= uppercase;
    }
    cased
}

#[cfg(test)]
mod tests {
    use super::*;

    // Expected values are the output of vaderSentiment 3.3.2's
    // `SentimentIntensityAnalyzer().polarity_scores(text)` under CPython 3.11.7.
    #[test]
    fn matches_python_package() {
        let cases: &[(&str, [f64; 4])] = &[
            ("VADER is smart, handsome, and funny.", [0.0, 0.254, 0.746, 0.8316]),
            (
                "VADER is VERY SMART, uber handsome, and FRIGGIN FUNNY!!!",
                [0.0, 0.294, 0.706, 0.9469],
            ),
            ("VADER is not smart, handsome, nor funny.", [0.646, 0.354, 0.0, -0.7424]),
            ("The book was only kind of good.", [0.0, 0.697, 0.303, 0.3832]),
            (
                "The plot was good, but the characters are uncompelling and the dialog is not great.",
                [0.327, 0.579, 0.094, -0.7042],
            ),
            ("Today only kinda sux! But I'll get by, lol", [0.127, 0.556, 0.317, 0.5249]),
            ("Make sure you :) or :D today!", [0.0, 0.294, 0.706, 0.8633]),
            ("Catch utf-8 emoji such as 💘 and 💋 and 😁", [0.0, 0.583, 0.417, 0.875]),
            ("Sentiment analysis has never been this good!", [0.0, 0.621, 0.379, 0.5672]),
            ("it is never so good", [0.0, 0.475, 0.525, 0.6626]),
            ("With VADER, sentiment analysis is the shit!", [0.0, 0.583, 0.417, 0.6476]),
            ("you are the bomb", [0.0, 0.429, 0.571, 0.6124]),
            (
                "Roger Dodger is one of the least compelling variations on this theme.",
                [0.132, 0.868, 0.0, -0.1695],
            ),
            ("At least it isn't a horrible book.", [0.0, 0.678, 0.322, 0.431]),
            ("Not such a badass after all.", [0.289, 0.711, 0.0, -0.2584]),
            ("not very good", [0.567, 0.433, 0.0, -0.3865]),
            ("no good", [0.706, 0.294, 0.0, -0.3412]),
            ("no fun nor joy", [0.373, 0.276, 0.35, -0.0435]),
            ("Why???? so sad", [0.685, 0.315, 0.0, -0.6545]),
            ("It was GOOD but not great!!", [0.443, 0.353, 0.204, -0.5731]),
            ("good good good but bad", [0.409, 0.086, 0.504, -0.2263]),
            // The "but" rule's look-up by value (see the module docs).
            ("I love it, but I accept it", [0.0, 0.532, 0.468, 0.5267]),
            // SENTIMENT_LADEN_IDIOMS are inactive: only "cut" (-1.1) counts.
            ("He can cut the mustard.", [0.344, 0.656, 0.0, -0.2732]),
            ("I ❤ you", [0.0, 0.417, 0.583, 0.6369]),
            // U+FE0F stays glued to the description's last word, which then matches nothing.
            ("I ❤\u{fe0f} you", [0.0, 1.0, 0.0, 0.0]),
            // U+001C separates words in Python, not in `char::is_whitespace`.
            ("GOOD\u{1c}day", [0.0, 0.216, 0.784, 0.5622]),
            // U+0295 is Lowercase in Unicode 14.0, so "ʕA" is not all caps and GOOD stands out.
            ("ʕA GOOD", [0.0, 0.216, 0.784, 0.5622]),
            ("love", [0.0, 0.0, 1.0, 0.6369]),
            ("", [0.0, 0.0, 0.0, 0.0]),
            ("   ", [0.0, 0.0, 0.0, 0.0]),
        ];
        let vader = Vader::new();
        for &(text, [neg, neu, pos, compound]) in cases {
            let want = Scores {
                neg,
                neu,
                pos,
                compound,
            };
            assert_eq!(vader.polarity_scores(text), want, "{text:?}");
        }
    }

    #[test]
    fn rounds_like_python() {
        // Python: round(0.0625, 3) == 0.062 (exact tie, to even); round(0.0635, 3) == 0.064
        // (the f64 is above the tie); round(-0.00015, 4) == -0.0001; round(0.00025, 4) == 0.0003.
        assert_eq!(py_round(0.0625, 3), 0.062);
        assert_eq!(py_round(0.0635, 3), 0.064);
        assert_eq!(py_round(0.0005, 3), 0.001);
        assert_eq!(py_round(-0.00015, 4), -0.0001);
        assert_eq!(py_round(0.12345, 4), 0.1235);
        assert_eq!(py_round(0.00025, 4), 0.0003);
    }

    #[test]
    fn lexicons_load() {
        // Python: len(lexicon) == 7506 (7519 lines, later duplicates win), len(emojis) == 3570,
        // of which 1212 keys are one code point.
        let vader = Vader::new();
        assert_eq!(vader.lexicon.len(), 7506);
        assert_eq!(vader.emojis.len(), 1212);
        assert_eq!(vader.lexicon.get("good"), Some(&1.9));
    }
}
