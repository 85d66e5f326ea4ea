//! A round's third stage, `round-train`: DPO goes on from the adapter the round started from,
//! on the round's pairs, for `rounds.epochs` passes, with every other `train.*` setting as the
//! train stage has it. The reference is that same adapter (`rounds.reference = "previous"`, as
//! in iterative DPO: each round moves the bot a KL-bounded step from where it stands) or the
//! base (`"base"`: every round stays anchored to the model the recipe started from).
//! Checkpoints go to `cache/round-train/<key>.partial/`, so a killed round resumes.
//!
//! Output: an adapter folder like the train stage's.

use super::super::{Built, Ctx};
use crate::cache::KeyMaterial;
use crate::config::RoundReference;
use crate::dpo::{data, trainer};
use crate::error::Result;
use std::collections::BTreeMap;
use std::path::Path;

const VERSION: u32 = 1;

/// The train stage's own key settings (every `train.*` that shapes an adapter), the round's, and
/// its inputs: the pairs and the adapter it goes on from.
pub(crate) fn material(
    ctx: &Ctx,
    r: usize,
    label_key: &str,
    adapter_key: &str,
) -> Result<KeyMaterial> {
    let rs = &ctx.settings().rounds;
    let base = super::super::train::material(ctx, None)?;
    let mut settings = base.settings;
    settings["round"] = serde_json::json!(r);
    settings["epochs"] = serde_json::json!(rs.epochs);
    settings["max_steps"] = serde_json::json!(0);
    settings["reference"] = serde_json::to_value(rs.reference)?;
    Ok(KeyMaterial {
        stage: "round-train".into(),
        version: VERSION,
        settings,
        files: BTreeMap::new(),
        model: base.model,
        inputs: BTreeMap::from([
            ("round-label".to_string(), label_key.to_string()),
            ("adapter".to_string(), adapter_key.to_string()),
        ]),
    })
}

pub(crate) fn build(
    ctx: &Ctx,
    r: usize,
    (label_dir, adapter_dir): (&Path, &Path),
    key: &str,
    out: &Path,
) -> Result<Built> {
    let rs = &ctx.settings().rounds;
    let mut s = ctx.settings().train.clone();
    s.max_steps = 0;
    s.epochs = rs.epochs;
    let raw = data::load_dataset_for(label_dir, s.loss.first())?;
    let mut model = ctx.recipe.load(&ctx.recipe.train)?;
    let prep = trainer::prepare(&model, &s, &raw.train, &raw.test)?;
    let avg = s.loss.averages_logps();
    ctx.say(
        "Computing",
        format!(
            "round {r}: reference log-probs of {} examples ({})",
            prep.train.len() + prep.eval.len(),
            match rs.reference {
                RoundReference::Previous => "the adapter the round starts from",
                RoundReference::Base => "the base model",
            }
        ),
    );
    if rs.reference == RoundReference::Previous {
        model.load_adapter(adapter_dir)?;
    }
    let (ref_train, ref_eval) = if s.loss.needs_reference() {
        (
            trainer::reference_logps(&model, &prep.train, s.batch_size, avg)?,
            trainer::reference_logps(&model, &prep.eval, s.batch_size, avg)?,
        )
    } else {
        // A reference-free loss reads none: zeros stand in, unread.
        (
            vec![(0.0, 0.0); prep.train.len()],
            vec![(0.0, 0.0); prep.eval.len()],
        )
    };
    if rs.reference == RoundReference::Base {
        model.load_adapter(adapter_dir)?;
    }
    let tr = trainer::Trainer {
        model: &model,
        s: &s,
        train: &prep.train,
        eval: &prep.eval,
        ref_train: &ref_train,
        ref_eval: &ref_eval,
        ckpt_dir: ctx.cache.partial_dir(&super::Step::Train.folder(r), key),
        quiet: ctx.quiet,
    };
    let outcome = tr.run(None)?;
    super::super::train::write_outputs(ctx, &model, &outcome, &prep, out)
}
