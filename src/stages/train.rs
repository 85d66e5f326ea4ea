//! Stage 6, train: DPO (or any of TRL's preference losses, SimPO, ORPO, KTO) with LoRA on the
//! split just written, or on any preference Parquet named by `train.dataset`. Outputs the PEFT
//! adapter, the metrics log (`metrics.jsonl`, TRL's names) and learning-curve charts. Reference
//! log-probs are computed once and cached under `cache/train-ref/`, unless the loss reads none
//! (SimPO, ORPO, SFT); checkpoints live in `cache/train/<key>.partial/`.

use super::{Built, Ctx};
use crate::cache::{KeyMaterial, Lookup};
use crate::config::TrainSettings;
use crate::dpo::{charts, data, trainer};
use crate::error::{Context, Result};
use crate::fsutil::{sha256_file, write_atomic, write_json_pretty};
use crate::model::load::Model;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// 2: data order and dropout masks drawn from `rng` streams of train.seed. 3: metrics are means
/// over rows (not over batches), and eval runs at step 0 too.
const VERSION: u32 = 3;

/// (chosen, rejected) reference log-probs per example.
type RefLogps = Vec<(f32, f32)>;

fn dataset_files(ctx: &Ctx, p: &Path) -> Result<Vec<PathBuf>> {
    data::parquet_files(p).map_err(|e| {
        crate::error::err!(
            "{e} ({}); point it at a Parquet file or a folder holding some",
            ctx.loaded.origin("train.dataset")
        )
    })
}

pub(crate) fn material(ctx: &Ctx, split_key: Option<&str>) -> Result<KeyMaterial> {
    let t = &ctx.settings().train;
    let mut files = BTreeMap::new();
    let mut inputs = BTreeMap::new();
    match &ctx.recipe.train_dataset {
        None => {
            inputs.insert(
                "split".to_string(),
                split_key.unwrap_or_default().to_string(),
            );
        }
        Some(p) => {
            for f in dataset_files(ctx, p)? {
                files.insert(f.display().to_string(), sha256_file(&f)?);
            }
        }
    }
    let plan = &ctx.recipe.train;
    let src = ctx.recipe.model(plan)?;
    let mut settings = serde_json::to_value(t)?;
    let o = settings
        .as_object_mut()
        .expect("settings serialize as a table");
    o.insert("device".into(), serde_json::json!(plan.device_name()));
    // The resolved dtype, on CUDA or when chosen; "auto" on the CPU is f32, as before the
    // setting existed, so those keys stay what they were.
    o.remove("dtype");
    if plan.load.device.is_cuda() || t.dtype != crate::model::options::DTypeChoice::Auto {
        o.insert("dtype".into(), serde_json::json!(plan.dtype_name()));
    }
    if t.attention == crate::model::options::AttentionChoice::Auto {
        o.remove("attention");
    }
    o.remove("dataset");
    o.remove("model");
    // Off, it is not in the key: keys from before the setting existed stay valid.
    if t.rpo_alpha == 0.0 {
        o.remove("rpo_alpha");
    }
    // The losses' own settings only where the loss reads them (see `loss_params`).
    for k in ["loss_weights", "simpo_gamma", "cpo_alpha", "discopop_tau"] {
        o.remove(k);
    }
    for (k, v) in t.loss_params() {
        o.insert(k.into(), v);
    }
    Ok(KeyMaterial {
        stage: "train".into(),
        version: VERSION,
        settings,
        files,
        model: Some(src.identity.clone()),
        inputs,
    })
}

fn load_data(ctx: &Ctx, split_dir: Option<&Path>) -> Result<data::RawSplits> {
    let loss = ctx.settings().train.loss.first();
    match &ctx.recipe.train_dataset {
        None => {
            let dir = split_dir.context("the train stage needs the split stage's output")?;
            data::load_dataset_for(dir, loss)
        }
        Some(p) => data::load_dataset_for(p, loss),
    }
}

/// Reference log-probs, cached under `cache/train-ref/<key>/` like any stage output.
fn cached_reference(
    ctx: &Ctx,
    model: &Model,
    s: &TrainSettings,
    prep: &trainer::Prepared,
    data_key: &str,
) -> Result<(RefLogps, RefLogps)> {
    let m = KeyMaterial {
        stage: "train-ref".into(),
        version: VERSION,
        settings: serde_json::json!({
            "max_length": s.max_length, "max_prompt_length": s.max_prompt_length,
            "truncation_mode": s.truncation_mode, "average": s.loss.averages_logps(),
            // Log-probs differ between devices and dtypes.
            "device": ctx.recipe.train.device_name(), "dtype": ctx.recipe.train.dtype_name(),
        }),
        files: BTreeMap::new(),
        model: Some(model.source.identity.clone()),
        inputs: BTreeMap::from([("data".to_string(), data_key.to_string())]),
    };
    let key = m.key();
    if let Lookup::Fresh(_) = ctx.cache.lookup("train-ref", &key) {
        let b = std::fs::read(ctx.cache.dir("train-ref", &key).join("ref_logps.json"))?;
        let v: (RefLogps, RefLogps) = serde_json::from_slice(&b)?;
        if v.0.len() == prep.train.len() && v.1.len() == prep.eval.len() {
            ctx.say("Fresh", format!("reference log-probs ({key})"));
            return Ok(v);
        }
    }
    ctx.say(
        "Computing",
        format!(
            "reference log-probs of {} examples",
            prep.train.len() + prep.eval.len()
        ),
    );
    let t0 = std::time::Instant::now();
    let avg = s.loss.averages_logps();
    let tr = trainer::reference_logps(model, &prep.train, s.batch_size, avg)?;
    let ev = trainer::reference_logps(model, &prep.eval, s.batch_size, avg)?;
    let staging = ctx.cache.begin("train-ref", &key)?;
    write_atomic(
        &staging.path("ref_logps.json"),
        &serde_json::to_vec(&(&tr, &ev))?,
    )?;
    staging.commit(
        &ctx.cache,
        m,
        BTreeMap::from([("examples".into(), (tr.len() + ev.len()) as u64)]),
        serde_json::Value::Null,
        t0.elapsed().as_secs_f64(),
    )?;
    Ok((tr, ev))
}

/// The stage: the data, the reference log-probs (their own cached stage), the adapter trained
/// with checkpoints, then its files, charts and summary.
// Long because these steps share the loaded model and the prepared data.
pub(crate) fn build(ctx: &Ctx, split_dir: Option<&Path>, key: &str, out: &Path) -> Result<Built> {
    let s = &ctx.settings().train;
    let raw = load_data(ctx, split_dir)?;
    let mut model = ctx.recipe.load(&ctx.recipe.train)?;
    let prep = trainer::prepare(&model, s, &raw.train, &raw.test)?;
    let r = prep.report;
    if r.prompts_cut + r.responses_cut > 0 {
        ctx.say(
            "Truncated",
            format!(
                "{} of {} rows: {} prompts cut to max_prompt_length {}, {} responses cut to {} tokens",
                r.prompts_cut.max(r.responses_cut),
                r.rows,
                r.prompts_cut,
                s.max_prompt_length,
                r.responses_cut,
                s.max_length - s.max_prompt_length
            ),
        );
    }
    let data_key = match split_dir {
        Some(d) => d.display().to_string(),
        None => format!(
            "{:?}",
            dataset_files(
                ctx,
                ctx.recipe.train_dataset.as_deref().context("no dataset")?
            )?
            .iter()
            .map(|f| sha256_file(f))
            .collect::<Result<Vec<_>>>()?
        ),
    };
    let (ref_train, ref_eval) = if s.loss.needs_reference() {
        cached_reference(
            ctx,
            &model,
            s,
            &prep,
            &crate::fsutil::sha256_hex(data_key.as_bytes()),
        )?
    } else {
        // SimPO, ORPO and SFT read no reference: nothing is computed or cached, and zeros
        // stand in, unread.
        ctx.say(
            "Skipping",
            format!(
                "reference log-probs: train.loss = {} needs none",
                s.loss.describe()
            ),
        );
        (
            vec![(0.0, 0.0); prep.train.len()],
            vec![(0.0, 0.0); prep.eval.len()],
        )
    };
    trainer::attach_lora(&mut model, s)?;
    let tr = trainer::Trainer {
        model: &model,
        s,
        train: &prep.train,
        eval: &prep.eval,
        ref_train: &ref_train,
        ref_eval: &ref_eval,
        ckpt_dir: ctx.cache.partial_dir("train", key),
        quiet: ctx.quiet,
    };
    let outcome = tr.run(None)?;
    write_outputs(ctx, &model, &outcome, &prep, out)
}

/// The trained adapter's folder: the PEFT files, `metrics.jsonl`, the charts, TensorBoard
/// events and `summary.json` (the train stage's and every round's).
pub(super) fn write_outputs(
    ctx: &Ctx,
    model: &Model,
    outcome: &trainer::Outcome,
    prep: &trainer::Prepared,
    out: &Path,
) -> Result<Built> {
    let r = prep.report;
    model.save_adapter(out)?;
    let mut lines = Vec::new();
    for m in &outcome.log {
        serde_json::to_writer(&mut lines, m)?;
        lines.push(b'\n');
    }
    write_atomic(&out.join("metrics.jsonl"), &lines)?;
    charts::plot_curves(&outcome.log, out);
    let started = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
        - outcome.seconds;
    crate::dpo::tensorboard::write_events(&outcome.log, out, started, outcome.seconds)?;
    let last_train = outcome
        .log
        .iter()
        .rev()
        .find(|m| m.get("loss").is_some())
        .cloned();
    let last_eval = outcome
        .log
        .iter()
        .rev()
        .find(|m| m.get("eval_loss").is_some())
        .cloned();
    write_json_pretty(
        &out.join("summary.json"),
        &serde_json::json!({
            "steps": outcome.steps, "seconds": outcome.seconds, "truncation": r,
            "last_train": last_train, "last_eval": last_eval, "resumed_from": outcome.resumed_from,
        }),
    )?;
    ctx.say(
        "Trained",
        format!("{} steps in {:.1}s", outcome.steps, outcome.seconds),
    );
    Ok(Built::new("steps", outcome.steps)
        .with("train_rows", prep.train.len())
        .with("eval_rows", prep.eval.len())
        .with("truncated_rows", r.prompts_cut.max(r.responses_cut)))
}
