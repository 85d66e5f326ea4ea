//! A round's second stage, `round-label`: the labelling judge (`rounds.judge`) ranks each
//! title's reviews and makes a pair of the best (chosen) and the worst (rejected).
//!
//! A review's score is the judge's negativity, less `rounds.loop_penalty` when it repeats a
//! sentence, less `rounds.length_penalty` x |ln(characters / the split's mean chosen length)|:
//! the bot is pushed harsher, but not into loops or rambling. A title whose best and worst
//! differ by less than `rounds.margin` (or whose reviews are all the same text) gives no pair.
//!
//! Output: a dataset folder like the split's (`train.parquet` = the round's pairs,
//! `test.parquet` = the split's test pairs, so the round's eval loss is comparable), and
//! `pairs.jsonl` with every review's score.

use super::super::merge::Pair;
use super::super::{Built, Ctx};
use super::sample::SampleRow;
use crate::cache::KeyMaterial;
use crate::config::JudgeKind;
use crate::dpo::data;
use crate::error::{bail, Context, Result};
use crate::fsutil::{read_jsonl, write_jsonl};
use crate::judge::coherence::loops;
use crate::judge::trained::Trained;
use crate::judge::Judge;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

const VERSION: u32 = 1;

/// A round's pair, with how it was chosen.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Labeled {
    pub(crate) title: String,
    pub(crate) prompt: String,
    pub(crate) chosen: String,
    pub(crate) rejected: String,
    /// The sample numbers of the chosen and rejected reviews.
    pub(crate) chosen_sample: usize,
    pub(crate) rejected_sample: usize,
    /// Every review's score (judge less penalties), by sample number.
    pub(crate) scores: Vec<f64>,
    pub(crate) margin: f64,
}

pub(crate) fn material(
    ctx: &Ctx,
    r: usize,
    sample_key: &str,
    split_key: &str,
) -> Result<KeyMaterial> {
    let rs = &ctx.settings().rounds;
    let judge = match rs.judge {
        JudgeKind::Trained => format!(
            "trained v1 C={} min_df={}",
            crate::judge::trained::C,
            crate::judge::trained::MIN_DF
        ),
        _ => "vader 3.3.2".to_string(),
    };
    let mut settings = serde_json::json!({
        "round": r,
        "judge": judge,
        "loop_penalty": rs.loop_penalty,
        "length_penalty": rs.length_penalty,
        "margin": rs.margin,
    });
    ctx.settings().judge.mark_direction(&mut settings);
    Ok(KeyMaterial {
        stage: "round-label".into(),
        version: VERSION,
        settings,
        files: BTreeMap::new(),
        model: None,
        inputs: BTreeMap::from([
            ("round-sample".to_string(), sample_key.to_string()),
            ("split".to_string(), split_key.to_string()),
        ]),
    })
}

/// Scores of `texts`: the judge's negativity less the loop and length penalties.
fn scores(ctx: &Ctx, judge: &Judge, texts: &[&str], target_chars: f64) -> Result<Vec<f64>> {
    let rs = &ctx.settings().rounds;
    let raw = judge.score(texts)?;
    Ok(texts
        .iter()
        .zip(raw)
        .map(|(t, s)| {
            let chars = t.chars().count().max(1) as f64;
            let looped = if loops(t) { rs.loop_penalty } else { 0.0 };
            s - looped - rs.length_penalty * (chars / target_chars).ln().abs()
        })
        .collect())
}

/// The best and worst of one title's reviews (the first of equals either way).
fn best_and_worst(scores: &[f64]) -> (usize, usize) {
    let mut best = 0;
    let mut worst = 0;
    for (i, &s) in scores.iter().enumerate() {
        if s > scores[best] {
            best = i;
        }
        if s < scores[worst] {
            worst = i;
        }
    }
    (best, worst)
}

/// `rounds.judge`: the lexicon judge, or the trained one fitted on the split's train pairs as
/// the eval fits it.
fn labelling_judge(ctx: &Ctx, train: &[data::RawRow]) -> Result<Judge<'static>> {
    Ok(match ctx.settings().rounds.judge {
        JudgeKind::Trained => {
            let harsh: Vec<&str> = train.iter().map(|p| p.chosen.as_str()).collect();
            let kind: Vec<&str> = train.iter().map(|p| p.rejected.as_str()).collect();
            Judge::Trained(Box::new(
                Trained::fit(&harsh, &kind)
                    .context("fitting the trained judge on the split's train pairs")?,
            ))
        }
        k => Judge::new(k, &ctx.settings().judge, None)?,
    })
}

/// The pairs as a dataset folder like the split's: `train.parquet`, and the split's
/// `test.parquet` copied.
fn write_dataset(pairs: &[Labeled], split_dir: &Path, out: &Path) -> Result<()> {
    let as_pairs: Vec<Pair> = pairs
        .iter()
        .enumerate()
        .map(|(i, p)| Pair {
            title_id: i,
            title: p.title.clone(),
            prompt: p.prompt.clone(),
            chosen: p.chosen.clone(),
            rejected: p.rejected.clone(),
        })
        .collect();
    let refs: Vec<&Pair> = as_pairs.iter().collect();
    super::super::split::write_parquet(&out.join("train.parquet"), &refs)?;
    let test = split_dir.join("test.parquet");
    crate::fsutil::write_atomic(
        &out.join("test.parquet"),
        &std::fs::read(&test).with_context(|| format!("reading {}", test.display()))?,
    )
}

/// The pairs of round `r`: each title's best and worst review where they differ enough.
pub(crate) fn build(
    ctx: &Ctx,
    r: usize,
    sample_dir: &Path,
    split_dir: &Path,
    out: &Path,
) -> Result<Built> {
    let rs = &ctx.settings().rounds;
    let rows: Vec<SampleRow> = read_jsonl(&sample_dir.join("samples.jsonl"))?;
    let split = data::load_dataset(split_dir)?;
    let chosen_chars: f64 = split
        .train
        .iter()
        .map(|p| p.chosen.chars().count() as f64)
        .sum();
    let target = (chosen_chars / split.train.len().max(1) as f64).max(1.0);
    let judge = labelling_judge(ctx, &split.train)?;
    let texts: Vec<&str> = rows.iter().map(|r| r.text.as_str()).collect();
    let all = scores(ctx, &judge, &texts, target)?;
    let k = rs.samples;
    let mut pairs = Vec::new();
    let mut dropped = 0;
    for (i, group) in rows.chunks(k).enumerate() {
        let s = &all[i * k..i * k + group.len()];
        let (b, w) = best_and_worst(s);
        let margin = s[b] - s[w];
        if margin < rs.margin || margin <= 0.0 || group[b].text == group[w].text {
            dropped += 1;
            continue;
        }
        pairs.push(Labeled {
            title: group[b].title.clone(),
            prompt: group[b].prompt.clone(),
            chosen: group[b].text.clone(),
            rejected: group[w].text.clone(),
            chosen_sample: b,
            rejected_sample: w,
            scores: s.to_vec(),
            margin,
        });
    }
    if pairs.is_empty() {
        bail!(
            "round {r}: no title's best and worst reviews differ by rounds.margin = {} ({} titles); lower rounds.margin or raise rounds.samples ({})",
            rs.margin,
            rows.len() / k.max(1),
            ctx.loaded.origin("rounds.margin")
        );
    }
    write_jsonl(&out.join("pairs.jsonl"), &pairs)?;
    write_dataset(&pairs, split_dir, out)?;
    Ok(Built::new("pairs", pairs.len())
        .with("dropped_under_margin", dropped)
        .with("reviews", rows.len()))
}

#[cfg(test)]
mod tests {
    #[test]
    fn best_and_worst_take_the_first_of_equals() {
        assert_eq!(super::best_and_worst(&[0.1, 0.5, 0.5, -0.2, -0.2]), (1, 3));
        assert_eq!(super::best_and_worst(&[1.0, 1.0]), (0, 0));
    }
}
