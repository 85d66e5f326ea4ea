//! Stage 4, merge: one preference pair per title. chosen = the review in `prompts.chosen`'s
//! style (negative in the published recipe), rejected = the one in `prompts.rejected`'s, prompt = the neutral pair prompt with interleaved examples. Pairs with an empty or
//! too-short review, or two identical reviews, are dropped and counted.
//!
//! With `merge.judge` on, the labels are checked: a pair whose chosen review is not judged more
//! negative than its rejected one by `merge.min_margin` is dropped, counted, and kept with its
//! scores in `rejected_pairs.jsonl` beside `pairs.jsonl`.

use super::generate::GenRow;
use super::prompts::PairPromptRow;
use super::{Built, Ctx};
use crate::cache::KeyMaterial;
use crate::config::JudgeKind;
use crate::error::Result;
use crate::fsutil::{read_jsonl, write_jsonl};
use crate::judge::Judge;
use crate::model::load::special_text::neutralize;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

const VERSION: u32 = 1;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Pair {
    pub title_id: usize,
    pub title: String,
    pub prompt: String,
    pub chosen: String,
    pub rejected: String,
}

/// A pair the label check dropped, with the judge's scores.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JudgedOut {
    #[serde(flatten)]
    pub pair: Pair,
    judge: String,
    pub chosen_score: f64,
    pub rejected_score: f64,
}

/// Split pairs into those whose chosen review the judge scores more negative than the rejected
/// one by more than `min_margin` (kept, in order) and the rest (with their scores).
pub fn check_labels(
    judge: &Judge,
    pairs: Vec<Pair>,
    min_margin: f64,
) -> Result<(Vec<Pair>, Vec<JudgedOut>)> {
    let texts: Vec<&str> = pairs
        .iter()
        .flat_map(|p| [p.chosen.as_str(), p.rejected.as_str()])
        .collect();
    let scores = judge.score(&texts)?;
    let mut kept = Vec::with_capacity(pairs.len());
    let mut out = Vec::new();
    for (p, s) in pairs.into_iter().zip(scores.chunks(2)) {
        if s[0] - s[1] > min_margin {
            kept.push(p);
        } else {
            out.push(JudgedOut {
                pair: p,
                judge: judge.kind().name().into(),
                chosen_score: s[0],
                rejected_score: s[1],
            });
        }
    }
    Ok((kept, out))
}

pub(crate) fn material(ctx: &Ctx, prompts_key: &str, generate_key: &str) -> Result<KeyMaterial> {
    let m = &ctx.settings().merge;
    let mut settings = serde_json::to_value(m)?;
    let mut model = None;
    if m.judge == JudgeKind::Llm {
        settings["judge_settings"] = ctx.settings().judge.key_value()?;
        model = Some(ctx.recipe.model(&ctx.recipe.judge)?.identity.clone());
    }
    if m.judge != JudgeKind::Off {
        ctx.settings().judge.mark_direction(&mut settings);
    }
    // Which generation is chosen; the published styles leave the key as it was.
    let p = &ctx.settings().prompts;
    if !p.default_styles() {
        settings["chosen"] = serde_json::json!(p.chosen);
        settings["rejected"] = serde_json::json!(p.rejected);
    }
    Ok(KeyMaterial {
        stage: "merge".into(),
        version: VERSION,
        settings,
        files: BTreeMap::new(),
        model,
        inputs: BTreeMap::from([
            ("prompts".to_string(), prompts_key.to_string()),
            ("generate".to_string(), generate_key.to_string()),
        ]),
    })
}

pub(crate) fn build(ctx: &Ctx, prompts_dir: &Path, gen_dir: &Path, out: &Path) -> Result<Built> {
    let min = ctx.settings().merge.min_chars.max(1);
    let pair_prompts: Vec<PairPromptRow> = read_jsonl(&prompts_dir.join("pair_prompts.jsonl"))?;
    let gens: Vec<GenRow> = read_jsonl(&gen_dir.join("generations.jsonl"))?;
    let p = &ctx.settings().prompts;
    let mut neg = BTreeMap::new();
    let mut pos = BTreeMap::new();
    for g in &gens {
        if g.polarity == p.chosen {
            neg.insert(g.title_id, g);
        } else if g.polarity == p.rejected {
            pos.insert(g.title_id, g);
        }
    }
    // Reviews from anywhere (a server could answer with `<|im_end|>` written out) enter the
    // dataset with special-token text neutralized, as the prompts are.
    let (chat, _) = super::prompts::chat_template(ctx)?;
    let review = |t: &str| neutralize(t, chat.special_texts()).into_owned();
    let (mut pairs, mut empty, mut identical, mut missing) = (Vec::new(), 0, 0, 0);
    for pp in &pair_prompts {
        let (Some(n), Some(p)) = (neg.get(&pp.title_id), pos.get(&pp.title_id)) else {
            missing += 1; // generate.limit left this title out
            continue;
        };
        if n.text.chars().count() < min || p.text.chars().count() < min {
            empty += 1;
        } else if n.text == p.text {
            identical += 1;
        } else {
            pairs.push(Pair {
                title_id: pp.title_id,
                title: pp.title.clone(),
                prompt: pp.prompt.clone(),
                chosen: review(&n.text),
                rejected: review(&p.text),
            });
        }
    }
    if empty + identical > 0 {
        ctx.say(
            "Dropped",
            format!("{empty} pairs with an empty review, {identical} with identical reviews"),
        );
    }
    let ms = &ctx.settings().merge;
    let mut mislabeled = 0;
    if ms.judge != JudgeKind::Off {
        let model = match ms.judge {
            JudgeKind::Llm => Some(ctx.recipe.load(&ctx.recipe.judge)?),
            _ => None,
        };
        let judge = Judge::new(ms.judge, &ctx.settings().judge, model.as_ref())?;
        let (kept, out_pairs) = check_labels(&judge, pairs, ms.min_margin)?;
        mislabeled = out_pairs.len();
        ctx.say(
            "Checked",
            format!(
                "labels with the {} judge: {} pairs kept, {mislabeled} whose chosen review is not judged more like the chosen style by {} (rejected_pairs.jsonl)",
                ms.judge.name(),
                kept.len(),
                ms.min_margin
            ),
        );
        write_jsonl(&out.join("rejected_pairs.jsonl"), &out_pairs)?;
        pairs = kept;
    }
    write_jsonl(&out.join("pairs.jsonl"), &pairs)?;
    Ok(Built::new("pairs", pairs.len())
        .with("dropped_empty", empty)
        .with("dropped_identical", identical)
        .with("dropped_by_judge", mislabeled)
        .with("not_generated", missing))
}
