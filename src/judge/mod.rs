//! Judges of negativity, and the statistics that say how far to trust them.
//!
//! A judge maps a review to a score of how much it is like the chosen style, higher = more so.
//! With `judge.chosen_sentiment = "negative"` (the published recipe) that is negativity, as
//! below; with `"positive"` the lexicon and llm judges' scores are turned around (the negated
//! negativity, and P(positive)), and the trained judge learns whatever the split's chosen is:
//! - `lexicon`: VADER (Hutto and Gilbert, 2014), its published lexicon and rules (`vader`, a
//!   port of vaderSentiment 3.3.2 that matches it bit for bit); the score is the negated compound
//!   score, in [-1, 1].
//! - `trained`: a logistic regression on word 1-2 grams with negation marking, fitted on the
//!   split's train pairs (`trained`); the score is P(harsh), in [0, 1].
//! - `llm`: a question about the review, sent through a model's chat template, then the start of
//!   the answer; the score is P(negative) from the next token's log-probabilities of the two
//!   verdict words, renormalised over the two (no sampling), in [0, 1].
//!
//! `coherence` measures what no negativity judge sees: whether a review repeats itself.
//!
//! A judge is only as good as its validation: `auroc` on pairs whose labels are known (the
//! split's test pairs, never used to tune it) is reported next to every number it produces.
//!
//! May import `model` (all of it), `kernels` and the base modules (floor 5 and below); never
//! `config`, `stages` or anything above.

pub mod coherence;
pub mod trained;
pub(crate) mod vader;

use crate::error::{bail, Context, Result};
use crate::model::generate::{prefill_padded, Request};
use crate::model::load::chat::Message;
use crate::model::load::Model;
use serde::{Deserialize, Serialize};

/// Which judge scores a review's negativity (`crate::judge`).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum JudgeKind {
    Off,
    /// VADER's lexicon and rules: the negated compound score, in [-1, 1].
    Lexicon,
    /// P(negative) from a model's next-token log-probabilities after a judge prompt, in [0, 1].
    Llm,
    /// P(harsh) from a logistic regression fitted on the split's train pairs, in [0, 1]
    /// (`trained`): only where a split exists, so the eval stage, not merge's label check.
    Trained,
}

impl JudgeKind {
    pub(crate) fn name(self) -> &'static str {
        match self {
            JudgeKind::Off => "off",
            JudgeKind::Lexicon => "lexicon",
            JudgeKind::Llm => "llm",
            JudgeKind::Trained => "trained",
        }
    }
}

/// Which sentiment the recipe's chosen style has: the direction of the lexicon and llm judges.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Sentiment {
    /// Chosen = the harsher review (the published recipe).
    #[default]
    Negative,
    /// Chosen = the kinder review: the judges score positivity.
    Positive,
}

impl Sentiment {
    /// The factor that turns negativity into "like the chosen style".
    fn sign(self) -> f64 {
        match self {
            Sentiment::Negative => 1.0,
            Sentiment::Positive => -1.0,
        }
    }
}

/// The judges' direction and the LLM judge.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct JudgeSettings {
    /// The sentiment of `prompts.chosen`'s style: the lexicon and llm judges score toward it.
    pub chosen_sentiment: Sentiment,
    /// The model that judges ("" = generate.model).
    pub(crate) model: String,
    /// The question, sent as the user turn through the model's chat template; `{review}` is
    /// replaced by the review. The answer is read from the next token's log-probabilities.
    pub(crate) question: String,
    /// The start of the answer (after the assistant turn opens); the verdict is the next word.
    pub(crate) answer_prefix: String,
    /// The two verdict words, read as the first token of " word".
    pub(crate) negative: String,
    pub(crate) positive: String,
    pub(crate) batch_size: usize,
}

impl Default for JudgeSettings {
    fn default() -> Self {
        Self {
            model: String::new(),
            question: "Here is a review of a scientific paper:\n\n\"{review}\"\n\nIs this review negative or positive? Answer with one word.".into(),
            answer_prefix: "The review is".into(),
            negative: "negative".into(),
            positive: "positive".into(),
            batch_size: 16,
            chosen_sentiment: Sentiment::Negative,
        }
    }
}

impl JudgeSettings {
    /// These settings as a cache key holds them: `chosen_sentiment` only when it is not the
    /// published recipe's, so keys from before it was a setting stay valid.
    pub(crate) fn key_value(&self) -> Result<serde_json::Value> {
        let mut v = serde_json::to_value(self)?;
        if self.chosen_sentiment == Sentiment::Negative {
            v.as_object_mut()
                .context("judge settings serialize to an object")?
                .remove("chosen_sentiment");
        }
        Ok(v)
    }

    /// Marks `settings` (a key's) with the judges' direction where it is not the published one.
    pub(crate) fn mark_direction(&self, settings: &mut serde_json::Value) {
        if self.chosen_sentiment == Sentiment::Positive {
            settings["chosen_sentiment"] = serde_json::json!("positive");
        }
    }
}

/// A loaded judge.
pub enum Judge<'m> {
    /// VADER, scoring toward the chosen style's sentiment.
    Lexicon(Box<vader::Vader>, Sentiment),
    Llm(LlmJudge<'m>),
    Trained(Box<trained::Trained>),
}

impl<'m> Judge<'m> {
    /// `model` is needed for (and only for) the `llm` judge. The `trained` judge is fitted, not
    /// loaded: [`trained::Trained::fit`], then [`Judge::Trained`].
    pub fn new(kind: JudgeKind, s: &JudgeSettings, model: Option<&'m Model>) -> Result<Self> {
        Ok(match kind {
            JudgeKind::Off => bail!("no judge is configured (the judge is \"off\")"),
            JudgeKind::Trained => {
                bail!("the trained judge is fitted on a split's train pairs, not loaded")
            }
            JudgeKind::Lexicon => Judge::Lexicon(Box::default(), s.chosen_sentiment),
            JudgeKind::Llm => Judge::Llm(LlmJudge::new(
                model.context("the llm judge needs a model")?,
                s,
            )?),
        })
    }

    pub(crate) fn kind(&self) -> JudgeKind {
        match self {
            Judge::Lexicon(..) => JudgeKind::Lexicon,
            Judge::Llm(_) => JudgeKind::Llm,
            Judge::Trained(_) => JudgeKind::Trained,
        }
    }

    /// How much each review is like the chosen style, in order (negativity in the published
    /// recipe).
    pub fn score(&self, reviews: &[&str]) -> Result<Vec<f64>> {
        match self {
            Judge::Lexicon(a, toward) => Ok(reviews
                .iter()
                .map(|r| -toward.sign() * a.polarity_scores(r).compound)
                .collect()),
            Judge::Llm(j) => j.score(reviews),
            Judge::Trained(t) => Ok(t.score(reviews)),
        }
    }
}

/// The `llm` judge: P(negative) read from a model's next-token distribution.
pub struct LlmJudge<'m> {
    model: &'m Model,
    question: String,
    answer_prefix: String,
    negative: u32,
    positive: u32,
    batch_size: usize,
    toward: Sentiment,
}

impl<'m> LlmJudge<'m> {
    fn new(model: &'m Model, s: &JudgeSettings) -> Result<Self> {
        let mut j = Self {
            model,
            question: s.question.clone(),
            answer_prefix: s.answer_prefix.clone(),
            negative: 0,
            positive: 0,
            batch_size: s.batch_size.max(1),
            toward: s.chosen_sentiment,
        };
        // The verdict token is whatever the tokenizer puts after the prompt for " word": found
        // by encoding the prompt with and without it, so BPE and SentencePiece agree on it.
        let probe = j.prompt("A review.")?;
        let base = model.meta.tok.encode(&probe, true)?;
        let first_after = |word: &str| -> Result<u32> {
            let ids = model
                .meta
                .tok
                .encode(&format!("{probe} {}", word.trim()), true)?;
            let common = base.iter().zip(&ids).take_while(|(a, b)| a == b).count();
            ids.get(common.min(base.len())).copied().with_context(|| {
                format!("judge verdict {word:?} adds no token after the judge prompt")
            })
        };
        j.negative = first_after(&s.negative)?;
        j.positive = first_after(&s.positive)?;
        if j.negative == j.positive {
            bail!(
                "judge.negative {:?} and judge.positive {:?} start with the same token; choose words that differ at their first token",
                s.negative,
                s.positive
            );
        }
        Ok(j)
    }

    fn prompt(&self, review: &str) -> Result<String> {
        let chat = self
            .model
            .meta
            .chat
            .as_ref()
            .context("the judge model has no chat template")?;
        let q = self.question.replace("{review}", review.trim());
        let mut p = chat.render(&[Message::new("user", q)], true)?;
        p.push_str(&self.answer_prefix);
        Ok(p)
    }

    fn score(&self, reviews: &[&str]) -> Result<Vec<f64>> {
        let mut reqs = Vec::with_capacity(reviews.len());
        for (i, r) in reviews.iter().enumerate() {
            let ids = self.model.meta.tok.encode(&self.prompt(r)?, true)?;
            reqs.push(Request { id: i, ids });
        }
        // Similar lengths together: less padding per batch.
        reqs.sort_by_key(|r| r.ids.len());
        let mut out = vec![0.0; reviews.len()];
        for chunk in reqs.chunks(self.batch_size) {
            let (_, _, logits) =
                prefill_padded(self.model, chunk, 1, crate::model::llama::Mode::infer())?;
            for (r, l) in chunk.iter().zip(&logits) {
                let (n, p) = (
                    l[self.negative as usize] as f64,
                    l[self.positive as usize] as f64,
                );
                // softmax over the two verdicts: the rest of the vocabulary cancels out.
                let (n, p) = match self.toward {
                    Sentiment::Negative => (n, p),
                    Sentiment::Positive => (p, n),
                };
                out[r.id] = 1.0 / (1.0 + (p - n).exp());
            }
        }
        Ok(out)
    }
}

/// The area under the ROC curve for telling `pos` (should score higher) from `neg`: the
/// probability that a random positive outscores a random negative, ties counting one half.
pub(crate) fn auroc(pos: &[f64], neg: &[f64]) -> f64 {
    if pos.is_empty() || neg.is_empty() {
        return f64::NAN;
    }
    let mut wins = 0.0;
    for p in pos {
        for n in neg {
            wins += if p > n {
                1.0
            } else if p == n {
                0.5
            } else {
                0.0
            };
        }
    }
    wins / (pos.len() * neg.len()) as f64
}

/// Wilson's 95% score interval for `k` successes in `n` trials.
pub(crate) fn wilson95(k: usize, n: usize) -> [f64; 2] {
    if n == 0 {
        return [0.0, 1.0];
    }
    let z = 1.959_963_984_540_054_f64;
    let (n, p) = (n as f64, k as f64 / n as f64);
    let d = 1.0 + z * z / n;
    let c = (p + z * z / (2.0 * n)) / d;
    let h = z * ((p * (1.0 - p) / n + z * z / (4.0 * n * n)).sqrt()) / d;
    [(c - h).max(0.0), (c + h).min(1.0)]
}

/// Distinct-2: distinct word bigrams over all bigrams of all texts (lower-cased, split on
/// whitespace). 1.0 = no bigram repeats; a bot that writes one review for every paper scores
/// near 1 / (number of texts).
pub(crate) fn distinct2<S: AsRef<str>>(texts: &[S]) -> f64 {
    let mut seen = std::collections::HashSet::new();
    let mut total = 0usize;
    for t in texts {
        let words: Vec<String> = t
            .as_ref()
            .split_whitespace()
            .map(|w| w.to_lowercase())
            .collect();
        for w in words.windows(2) {
            total += 1;
            seen.insert((w[0].clone(), w[1].clone()));
        }
    }
    if total == 0 {
        0.0
    } else {
        seen.len() as f64 / total as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auroc_counts_ties_half() {
        assert_eq!(auroc(&[1.0, 2.0], &[0.0, 0.5]), 1.0);
        assert_eq!(auroc(&[0.0], &[1.0]), 0.0);
        assert_eq!(auroc(&[1.0], &[1.0]), 0.5);
        assert!((auroc(&[3.0, 1.0], &[2.0]) - 0.5).abs() < 1e-12);
    }

    #[test]
    fn wilson_interval_brackets_the_rate() {
        // Wilson's interval for 70 of 100 as statistics texts print it: [0.6042, 0.7811].
        let [lo, hi] = wilson95(70, 100);
        assert!((lo - 0.6042).abs() < 1e-4, "{lo}");
        assert!((hi - 0.7811).abs() < 1e-4, "{hi}");
    }

    #[test]
    fn distinct2_of_repeats_falls() {
        assert_eq!(distinct2(&["a b c", "d e f"]), 1.0);
        assert_eq!(distinct2(&["a b", "a b", "A B", "a b"]), 0.25);
    }
}
