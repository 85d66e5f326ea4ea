//! On-policy rounds (`[rounds]`): after the eval, the bot goes on learning from its own reviews.
//!
//! Round r takes fresh titles from the page (in neither split, not the eval's, not an earlier
//! round's), and runs four cached stages, each keyed on the round before through the adapter it
//! starts from:
//!
//! 1. `round-sample` ([`sample`]): the bot writes `rounds.samples` reviews of each title from the
//!    neutral pair prompt, so a pair's prompt is exactly the prompt both its reviews came from.
//! 2. `round-label` ([`label`]): the labelling judge scores them (negativity, less penalties for
//!    a loop and for drifting length) and keeps best = chosen, worst = rejected where the margin
//!    allows; the pairs are a dataset folder like the split's.
//! 3. `round-train` ([`train`]): DPO goes on from the adapter the round started from, with the
//!    base or that adapter as the reference.
//! 4. `round-eval`: the eval stage on the round's adapter, plus the rounds side by side
//!    ([`report`]: `rounds.json`, `rounds.md`, `rounds.png`).
//!
//! May import what `stages` may, and its sibling stages.

pub(crate) mod label;
pub(crate) mod report;
pub(crate) mod sample;
pub(crate) mod train;

use super::{Built, Ctx, Node, Stage};
use crate::cache::KeyMaterial;
use crate::error::{bail, Result};
use std::path::{Path, PathBuf};

/// A stage of one round, in the order they run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Step {
    Sample,
    Label,
    Train,
    Eval,
}

impl Step {
    pub(crate) const ALL: [Step; 4] = [Step::Sample, Step::Label, Step::Train, Step::Eval];

    /// The stage's name in its key material.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Step::Sample => "round-sample",
            Step::Label => "round-label",
            Step::Train => "round-train",
            Step::Eval => "round-eval",
        }
    }

    /// Round `r`'s folder of this stage under `cache/`, and its name in messages:
    /// `round-2-sample`.
    pub(crate) fn folder(self, r: usize) -> String {
        format!("round-{r}-{}", &self.name()["round-".len()..])
    }
}

/// Round `r`'s titles (1-based): slice r of one seeded permutation of the page's titles outside
/// the split and the eval's, so no two rounds share a title and adding a round changes none
/// before it.
pub(crate) fn titles(ctx: &Ctx, scrape_dir: &Path, r: usize) -> Result<Vec<String>> {
    let rs = &ctx.settings().rounds;
    let (_, rest) = super::eval::page_titles(ctx, scrape_dir)?;
    let need = rs.count * rs.titles;
    if rest.len() < need {
        bail!(
            "rounds.count = {} x rounds.titles = {} needs {need} fresh titles, but the page holds only {} outside the split and the eval's titles ({}); lower rounds.titles or rounds.count",
            rs.count,
            rs.titles,
            rest.len(),
            ctx.loaded.origin("rounds.titles")
        );
    }
    let idx = crate::rng::permutation(rest.len(), &mut crate::rng::seeded(rs.seed));
    Ok(idx[(r - 1) * rs.titles..r * rs.titles]
        .iter()
        .map(|&i| rest[i].clone())
        .collect())
}

/// The adapter round `r` starts from: the train stage's for round 1, round r - 1's after.
fn adapter(r: usize) -> Node {
    if r == 1 {
        Node::Stage(Stage::Train)
    } else {
        Node::Round(r - 1, Step::Train)
    }
}

/// What round `r`'s `step` depends on. `key(node)` is the key of a node before it.
pub(crate) fn material(
    ctx: &Ctx,
    r: usize,
    step: Step,
    key: &dyn Fn(Node) -> String,
) -> Result<KeyMaterial> {
    let stage = |s: Stage| key(Node::Stage(s));
    match step {
        Step::Sample => sample::material(ctx, r, &key(adapter(r)), &stage(Stage::Scrape)),
        Step::Label => label::material(
            ctx,
            r,
            &key(Node::Round(r, Step::Sample)),
            &stage(Stage::Split),
        ),
        Step::Train => train::material(ctx, r, &key(Node::Round(r, Step::Label)), &key(adapter(r))),
        Step::Eval => {
            let s = ctx.settings();
            let mut m = super::eval::material(
                ctx,
                super::eval::AdapterSource::Train(&key(Node::Round(r, Step::Train))),
                Some(&stage(Stage::Split)),
                Some(&stage(Stage::Scrape)),
            )?;
            m.stage = Step::Eval.name().into();
            m.settings["round"] = serde_json::json!(r);
            m.settings["round_labels"] = serde_json::json!(s.rounds.judge.name());
            // The side-by-side table reads every earlier eval.
            m.inputs.insert("eval".into(), stage(Stage::Eval));
            for q in 1..r {
                m.inputs
                    .insert(format!("round-{q}-eval"), key(Node::Round(q, Step::Eval)));
            }
            Ok(m)
        }
    }
}

/// Build round `r`'s `step` into `out`. `dir(node)` is the output folder of a node before it.
pub(crate) fn build(
    ctx: &Ctx,
    r: usize,
    step: Step,
    dir: &dyn Fn(Node) -> PathBuf,
    key: &str,
    out: &Path,
) -> Result<Built> {
    let stage = |s: Stage| dir(Node::Stage(s));
    match step {
        Step::Sample => sample::build(ctx, r, (&dir(adapter(r)), &stage(Stage::Scrape)), key, out),
        Step::Label => label::build(
            ctx,
            r,
            &dir(Node::Round(r, Step::Sample)),
            &stage(Stage::Split),
            out,
        ),
        Step::Train => train::build(
            ctx,
            r,
            (&dir(Node::Round(r, Step::Label)), &dir(adapter(r))),
            key,
            out,
        ),
        Step::Eval => {
            let (split, merge, scrape) = (
                stage(Stage::Split),
                stage(Stage::Merge),
                stage(Stage::Scrape),
            );
            let built = super::eval::build(
                ctx,
                &super::eval::Inputs {
                    adapter: &dir(Node::Round(r, Step::Train)),
                    split: Some(&split),
                    merge: Some(&merge),
                    scrape: Some(&scrape),
                    round_labels: Some(ctx.settings().rounds.judge),
                },
                out,
            )?;
            let mut evals: Vec<PathBuf> = vec![stage(Stage::Eval)];
            evals.extend((1..r).map(|q| dir(Node::Round(q, Step::Eval))));
            evals.push(out.to_path_buf());
            let evals: Vec<&Path> = evals.iter().map(|p| p.as_path()).collect();
            report::write(ctx.settings().rounds.judge.name(), &evals, out)?;
            Ok(built)
        }
    }
}
