//! Stage 4, merge: one preference pair per title. chosen = the negative review, rejected = the
//! positive one, prompt = the neutral pair prompt with interleaved examples. Pairs with an empty or
//! too-short review, or two identical reviews, are dropped and counted.

use super::generate::GenRow;
use super::prompts::{PairPromptRow, Polarity};
use super::{Built, Ctx};
use crate::cache::KeyMaterial;
use crate::error::Result;
use crate::fsutil::{read_jsonl, write_jsonl};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

pub const VERSION: u32 = 1;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Pair {
    pub title_id: usize,
    pub title: String,
    pub prompt: String,
    pub chosen: String,
    pub rejected: String,
}

pub fn material(ctx: &Ctx, prompts_key: &str, generate_key: &str) -> Result<KeyMaterial> {
    Ok(KeyMaterial {
        stage: "merge".into(),
        version: VERSION,
        settings: serde_json::to_value(&ctx.settings().merge)?,
        files: BTreeMap::new(),
        model: None,
        inputs: BTreeMap::from([
            ("prompts".to_string(), prompts_key.to_string()),
            ("generate".to_string(), generate_key.to_string()),
        ]),
    })
}

pub fn build(ctx: &Ctx, prompts_dir: &Path, gen_dir: &Path, out: &Path) -> Result<Built> {
    let min = ctx.settings().merge.min_chars.max(1);
    let pair_prompts: Vec<PairPromptRow> = read_jsonl(&prompts_dir.join("pair_prompts.jsonl"))?;
    let gens: Vec<GenRow> = read_jsonl(&gen_dir.join("generations.jsonl"))?;
    let mut neg = BTreeMap::new();
    let mut pos = BTreeMap::new();
    for g in &gens {
        match g.polarity {
            Polarity::Negative => neg.insert(g.title_id, g),
            Polarity::Positive => pos.insert(g.title_id, g),
        };
    }
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
                chosen: n.text.clone(),
                rejected: p.text.clone(),
            });
        }
    }
    if empty + identical > 0 {
        ctx.say(
            "Dropped",
            format!("{empty} pairs with an empty review, {identical} with identical reviews"),
        );
    }
    write_jsonl(&out.join("pairs.jsonl"), &pairs)?;
    Ok(Built::new("pairs", pairs.len())
        .with("dropped_empty", empty)
        .with("dropped_identical", identical)
        .with("not_generated", missing))
}
