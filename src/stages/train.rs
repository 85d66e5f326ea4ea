//! Stage 6, train: DPO (or IPO, hinge, robust, KTO) with LoRA on the split just written, or on any
//! preference Parquet named by `train.dataset`. Outputs the PEFT adapter, the metrics log
//! (`metrics.jsonl`, TRL's names) and learning-curve charts. Reference log-probs are computed once
//! and cached under `cache/train-ref/`; checkpoints live in `cache/train/<key>.partial/`.

use super::{Built, Ctx};
use crate::cache::{KeyMaterial, Lookup};
use crate::config::TrainSettings;
use crate::dpo::{charts, data, trainer};
use crate::fsutil::{sha256_file, write_atomic, write_json_pretty};
use crate::model::{default_dtype, pick_device, LoadOptions, Model, WeightsMode};
use anyhow::{Context, Result};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub const VERSION: u32 = 1;

/// (chosen, rejected) reference log-probs per example.
type RefLogps = Vec<(f32, f32)>;

fn dataset_files(ctx: &Ctx) -> Result<Vec<PathBuf>> {
    let p = ctx.loaded.resolve(&ctx.settings().train.dataset);
    data::parquet_files(&p).map_err(|e| {
        anyhow::anyhow!(
            "{e} ({}); point it at a Parquet file or a folder holding some",
            ctx.loaded.origin("train.dataset")
        )
    })
}

pub fn model_spec(ctx: &Ctx) -> String {
    let t = &ctx.settings().train;
    let spec = if t.model.is_empty() {
        &ctx.settings().generate.model
    } else {
        &t.model
    };
    super::resolve_model_spec(ctx.loaded, spec)
}

pub fn material(ctx: &Ctx, split_key: Option<&str>) -> Result<KeyMaterial> {
    let t = &ctx.settings().train;
    let mut files = BTreeMap::new();
    let mut inputs = BTreeMap::new();
    if t.dataset.is_empty() {
        inputs.insert(
            "split".to_string(),
            split_key.unwrap_or_default().to_string(),
        );
    } else {
        for f in dataset_files(ctx)? {
            files.insert(f.display().to_string(), sha256_file(&f)?);
        }
    }
    let src = crate::model::source::resolve(&model_spec(ctx), &ctx.settings().generate.revision)?;
    let dev = pick_device(&t.device)?;
    let mut settings = serde_json::to_value(t)?;
    let o = settings.as_object_mut().unwrap();
    o.insert(
        "device".into(),
        serde_json::json!(if dev.is_cuda() { "cuda" } else { "cpu" }),
    );
    o.remove("dataset");
    o.remove("model");
    Ok(KeyMaterial {
        stage: "train".into(),
        version: VERSION,
        settings,
        files,
        model: Some(src.identity),
        inputs,
    })
}

pub fn load_train_model(ctx: &Ctx) -> Result<Model> {
    let t = &ctx.settings().train;
    let src = crate::model::source::resolve(&model_spec(ctx), &ctx.settings().generate.revision)?;
    let device = pick_device(&t.device)?;
    let opts = LoadOptions {
        dtype: default_dtype(&device),
        weights: WeightsMode::Dense,
        device,
    };
    Model::load(&src, &opts)
}

pub fn load_data(ctx: &Ctx, split_dir: Option<&Path>) -> Result<data::RawSplits> {
    let t = &ctx.settings().train;
    if t.dataset.is_empty() {
        let dir = split_dir.context("the train stage needs the split stage's output")?;
        data::load_dataset(dir)
    } else {
        data::load_dataset(&ctx.loaded.resolve(&t.dataset))
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
            "truncation_mode": s.truncation_mode, "average": s.loss == "ipo",
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
    let avg = s.loss == "ipo";
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
        t0.elapsed().as_secs_f64(),
    )?;
    Ok((tr, ev))
}

pub fn build(ctx: &Ctx, split_dir: Option<&Path>, key: &str, out: &Path) -> Result<Built> {
    let s = &ctx.settings().train;
    let raw = load_data(ctx, split_dir)?;
    let mut model = load_train_model(ctx)?;
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
            dataset_files(ctx)?
                .iter()
                .map(|f| sha256_file(f))
                .collect::<Result<Vec<_>>>()?
        ),
    };
    let (ref_train, ref_eval) = cached_reference(
        ctx,
        &model,
        s,
        &prep,
        &crate::fsutil::sha256_hex(data_key.as_bytes()),
    )?;
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
    model.save_adapter(out)?;
    let mut lines = Vec::new();
    for m in &outcome.log {
        serde_json::to_writer(&mut lines, m)?;
        lines.push(b'\n');
    }
    write_atomic(&out.join("metrics.jsonl"), &lines)?;
    charts::plot(&outcome.log, "loss", "DPO loss", &out.join("loss.png"))?;
    charts::plot(
        &outcome.log,
        "rewards/margins",
        "Reward margins",
        &out.join("margins.png"),
    )?;
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
