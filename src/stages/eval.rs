//! Stage 7, eval: is the trained bot harsher than the base model?
//!
//! On held-out titles (the test split's, or with `eval.titles = N` titles from the page that are
//! in neither split) the base model and the adapter each write `eval.samples` reviews from the
//! same prompt (the neutral, interleaved pair prompt the dataset's `prompt` column holds) with the
//! same per-sample seeds. A judge scores every review's negativity; the judge itself is validated
//! on the test pairs (chosen against rejected: its AUROC), which nothing here tunes it on. The eval
//! loss and reward accuracy of the adapter on the test pairs come from the trainer's own eval.
//!
//! Outputs: `report.json`, `samples.jsonl`, `eval.md`, `scores.png`.

use super::merge::Pair;
use super::scrape::TitleRow;
use super::{Built, Ctx};
use crate::backend::local::Local;
use crate::backend::openai::Remote;
use crate::backend::Job;
use crate::cache::KeyMaterial;
use crate::config::Backend;
use crate::config::JudgeKind;
use crate::dpo::{data, trainer};
use crate::error::{bail, Context, Result};
use crate::fsutil::{read_jsonl, sha256_file, write_atomic, write_json_pretty, write_jsonl};
use crate::judge::{auroc, distinct2, wilson95, Judge};
use crate::model::load::Model;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

const VERSION: u32 = 1;

/// Where the adapter under evaluation comes from.
pub(crate) enum AdapterSource<'a> {
    /// The train stage's output, by its key.
    Train(&'a str),
    /// `pipeline eval --adapter DIR`: any adapter folder, keyed by its files' bytes.
    Dir(&'a Path),
}

/// The upstream outputs eval reads (those that exist in this recipe).
pub(crate) struct Inputs<'a> {
    pub(crate) adapter: &'a Path,
    pub(crate) split: Option<&'a Path>,
    pub(crate) merge: Option<&'a Path>,
    pub(crate) scrape: Option<&'a Path>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct SampleRow {
    title: String,
    sample: usize,
    /// The sampler of this row (both models) is stream `stream` of `seed` (`eval.seed`).
    seed: u64,
    stream: usize,
    base: String,
    adapter: String,
    base_score: f64,
    adapter_score: f64,
}

/// `report.json`, exactly the keys the issue names.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Report {
    n: usize,
    judge: String,
    judge_auroc: f64,
    harsher_rate: f64,
    harsher_rate_ci: [f64; 2],
    negativity_base: f64,
    negativity_adapter: f64,
    eval_loss: f64,
    eval_reward_accuracy: f64,
    distinct2_base: f64,
    distinct2_adapter: f64,
    mean_chars_base: f64,
    mean_chars_adapter: f64,
}

pub(crate) fn material(
    ctx: &Ctx,
    adapter: AdapterSource,
    split_key: Option<&str>,
    scrape_key: Option<&str>,
) -> Result<KeyMaterial> {
    let s = ctx.settings();
    let t = &s.train;
    let g = &s.generate;
    let mut settings = serde_json::json!({
        "eval": s.eval,
        // What the reviews depend on.
        "sampling": {"max_new_tokens": g.max_new_tokens, "temperature": g.temperature,
                     "top_k": g.top_k, "top_p": g.top_p},
        // What the eval loss depends on.
        "loss": {"loss": t.loss, "beta": t.beta, "label_smoothing": t.label_smoothing,
                 "max_length": t.max_length, "max_prompt_length": t.max_prompt_length,
                 "truncation_mode": t.truncation_mode},
        "device": ctx.recipe.train.device_name(),
        "dtype": ctx.recipe.train.dtype_name(),
        "attention": t.attention,
    });
    super::generate::add_penalties(&mut settings["sampling"], g);
    let mut model = ctx.recipe.model(&ctx.recipe.train)?.identity.clone();
    match s.eval.judge {
        JudgeKind::Llm => {
            settings["judge"] = serde_json::to_value(&s.judge)?;
            model = format!(
                "{model}; judge {}",
                ctx.recipe.model(&ctx.recipe.judge)?.identity
            );
        }
        _ => settings["judge"] = serde_json::json!("vader 3.3.2"),
    }
    let mut files = BTreeMap::new();
    let mut inputs = BTreeMap::new();
    match adapter {
        AdapterSource::Train(k) => {
            inputs.insert("train".to_string(), k.to_string());
        }
        AdapterSource::Dir(d) => {
            for f in ["adapter_config.json", "adapter_model.safetensors"] {
                let p = d.join(f);
                files.insert(
                    f.to_string(),
                    sha256_file(&p).with_context(|| {
                        format!("{} is not an adapter folder (no {f})", d.display())
                    })?,
                );
            }
        }
    }
    match &ctx.recipe.train_dataset {
        None => {
            inputs.insert("split".into(), split_key.unwrap_or_default().into());
        }
        Some(p) => {
            for f in data::parquet_files(p)? {
                files.insert(f.display().to_string(), sha256_file(&f)?);
            }
        }
    }
    if s.eval.titles > 0 {
        inputs.insert("scrape".into(), scrape_key.unwrap_or_default().into());
    }
    Ok(KeyMaterial {
        stage: "eval".into(),
        version: VERSION,
        settings,
        files,
        model: Some(model),
        inputs,
    })
}

/// The prompts to review: (title, prompt text).
fn held_out(
    ctx: &Ctx,
    inp: &Inputs,
    test: &[data::RawRow],
    model: &Model,
) -> Result<Vec<(String, String)>> {
    let n = ctx.settings().eval.titles;
    // Titles of the pairs, by prompt (the Parquet holds only prompt, chosen, rejected).
    let by_prompt: BTreeMap<String, String> = match inp.merge {
        Some(d) => read_jsonl::<Pair>(&d.join("pairs.jsonl"))?
            .into_iter()
            .map(|p| (p.prompt, p.title))
            .collect(),
        None => BTreeMap::new(),
    };
    if n == 0 {
        let mut seen = HashSet::new();
        return Ok(test
            .iter()
            .filter(|r| seen.insert(r.prompt.clone()))
            .map(|r| {
                let title = by_prompt.get(&r.prompt).cloned().unwrap_or_default();
                (title, r.prompt.clone())
            })
            .collect());
    }
    let dir = inp
        .scrape
        .context("eval.titles > 0 draws from the scraped page: the scrape stage must be built")?;
    let all = std::fs::read_to_string(dir.join("all_titles.txt"))?;
    let used: HashSet<String> = read_jsonl::<TitleRow>(&dir.join("titles.jsonl"))?
        .into_iter()
        .map(|t| t.title)
        .collect();
    let pool: Vec<&str> = all
        .lines()
        .filter(|t| !t.trim().is_empty() && !used.contains(*t))
        .collect();
    if pool.len() < n {
        bail!(
            "eval.titles = {n} but the page holds only {} titles outside the sample ({}); lower eval.titles",
            pool.len(),
            ctx.loaded.origin("eval.titles")
        );
    }
    let mut rng = crate::rng::seeded(ctx.settings().eval.seed);
    let idx = crate::rng::permutation(pool.len(), &mut rng);
    let chat = model
        .meta
        .chat
        .as_ref()
        .context("the model has no chat template")?;
    idx[..n]
        .iter()
        .map(|&i| {
            let title = pool[i].to_string();
            let m = super::prompts::neutral_messages(ctx.recipe, &title)?;
            Ok((title, chat.render(&m, true)?))
        })
        .collect()
}

/// One review for each of `samples` samples of each prompt, from `backend`: job
/// `i * samples + k` is sample `k` of prompt `i`, seeded `(s.seed, i * samples + k)` for both
/// models, so the base and the adapter answer each title from the same seeds.
fn draw(
    backend: &dyn crate::backend::Backend,
    prompts: &[(String, String)],
    samples: usize,
    s: &crate::model::generate::Sampling,
) -> Result<Vec<String>> {
    let jobs: Vec<Job> = prompts
        .iter()
        .enumerate()
        .flat_map(|(i, (_, p))| {
            (0..samples).map(move |k| Job {
                id: i * samples + k,
                prompt: p.clone(),
                messages: Vec::new(),
            })
        })
        .collect();
    let mut out = vec![String::new(); jobs.len()];
    backend.generate(jobs, s, &mut |a| {
        out[a.id] = a.text;
        Ok(())
    })?;
    Ok(out)
}

/// The `[generate.openai]` servers, asked for the model they serve under `served`.
fn servers(ctx: &Ctx, served: &str) -> Result<Remote> {
    let mut o = ctx.settings().generate.openai.clone();
    o.model = served.to_string();
    Remote::connect(&o)
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

/// The judge's AUROC at telling the test rows' chosen reviews from their rejected ones (for
/// unpaired rows: desirable from undesirable), before it scores anything.
fn judge_auroc(judge: &Judge, test: &[data::RawRow], unpaired: bool) -> Result<f64> {
    let (harsh, kind): (Vec<&str>, Vec<&str>) = if unpaired {
        (
            test.iter()
                .filter(|r| r.label == Some(true))
                .map(|r| r.chosen.as_str())
                .collect(),
            test.iter()
                .filter(|r| r.label == Some(false))
                .map(|r| r.chosen.as_str())
                .collect(),
        )
    } else {
        (
            test.iter().map(|r| r.chosen.as_str()).collect(),
            test.iter().map(|r| r.rejected.as_str()).collect(),
        )
    };
    if harsh.is_empty() || kind.is_empty() {
        bail!(
            "the test rows hold {} desirable and {} undesirable reviews; validating the judge needs both",
            harsh.len(),
            kind.len()
        );
    }
    Ok(auroc(&judge.score(&harsh)?, &judge.score(&kind)?))
}

/// Score both models' reviews, and write `samples.jsonl`, `report.json`, `eval.md` and the
/// scores' chart. Returns how many pairs the adapter's review was the harsher of.
fn write_report(
    ctx: &Ctx,
    out: &Path,
    judge: &Judge,
    judge_auroc: f64,
    prompts: &[(String, String)],
    (base, adapted): (&[String], &[String]),
    (eval_loss, eval_reward_accuracy): (f64, f64),
) -> Result<usize> {
    let es = &ctx.settings().eval;
    let n = base.len();
    let base_refs: Vec<&str> = base.iter().map(|s| s.as_str()).collect();
    let adapted_refs: Vec<&str> = adapted.iter().map(|s| s.as_str()).collect();
    let sb = judge.score(&base_refs)?;
    let sa = judge.score(&adapted_refs)?;
    let harsher = sa.iter().zip(&sb).filter(|(a, b)| a > b).count();
    let chars = |v: &[String]| {
        mean(
            &v.iter()
                .map(|t| t.chars().count() as f64)
                .collect::<Vec<_>>(),
        )
    };
    let report = Report {
        n,
        judge: es.judge.name().into(),
        judge_auroc,
        harsher_rate: harsher as f64 / n as f64,
        harsher_rate_ci: wilson95(harsher, n),
        negativity_base: mean(&sb),
        negativity_adapter: mean(&sa),
        eval_loss,
        eval_reward_accuracy,
        distinct2_base: distinct2(base),
        distinct2_adapter: distinct2(adapted),
        mean_chars_base: chars(base),
        mean_chars_adapter: chars(adapted),
    };
    let rows: Vec<SampleRow> = (0..n)
        .map(|id| SampleRow {
            title: prompts[id / es.samples].0.clone(),
            sample: id % es.samples,
            seed: es.seed,
            stream: id,
            base: base[id].clone(),
            adapter: adapted[id].clone(),
            base_score: sb[id],
            adapter_score: sa[id],
        })
        .collect();
    write_jsonl(&out.join("samples.jsonl"), &rows)?;
    write_json_pretty(&out.join("report.json"), &report)?;
    write_atomic(&out.join("eval.md"), markdown(&report, &rows).as_bytes())?;
    crate::dpo::charts::plot_distributions(
        &sb,
        &sa,
        &format!(
            "{} judge: negativity of {n} reviews per model",
            es.judge.name()
        ),
        &out.join("scores.png"),
    );
    ctx.say(
        "Evaluated",
        format!(
            "harsher in {:.0}% of {n} (95% CI {:.0}-{:.0}%), negativity {:.3} -> {:.3}, judge AUROC {:.3}",
            100.0 * report.harsher_rate,
            100.0 * report.harsher_rate_ci[0],
            100.0 * report.harsher_rate_ci[1],
            report.negativity_base,
            report.negativity_adapter,
            judge_auroc
        ),
    );
    Ok(harsher)
}

pub(crate) fn build(ctx: &Ctx, inp: &Inputs, out: &Path) -> Result<Built> {
    let s = ctx.settings();
    let es = &s.eval;
    let ts = &s.train;
    let raw = match &ctx.recipe.train_dataset {
        None => data::load_dataset_for(
            inp.split
                .context("the eval stage needs the split stage's output")?,
            ts.loss,
        )?,
        Some(p) => data::load_dataset_for(p, ts.loss)?,
    };
    if raw.test.is_empty() {
        bail!("the dataset has no test rows: the eval stage judges on them (split.test must be at least 1)");
    }
    let mut model = ctx.recipe.load(&ctx.recipe.train)?;

    // The judge, validated on the labelled test rows before it scores anything.
    let judge_model = match es.judge {
        JudgeKind::Llm => Some(ctx.recipe.load(&ctx.recipe.judge)?),
        _ => None,
    };
    let judge = Judge::new(es.judge, &s.judge, judge_model.as_ref())?;
    let judge_auroc = judge_auroc(&judge, &raw.test, ts.loss.is_unpaired())?;
    ctx.say(
        "Judge",
        format!(
            "{}: AUROC {judge_auroc:.3} at telling chosen from rejected on {} test rows",
            es.judge.name(),
            raw.test.len()
        ),
    );

    // Reviews from the base model, then from the adapter, with the same seeds.
    let prompts = held_out(ctx, inp, &raw.test, &model)?;
    let n = prompts.len() * es.samples;
    let mut sampling = s.generate.sampling();
    sampling.seed = es.seed;
    let batch = s.generate.batch_size;
    ctx.say(
        "Generating",
        format!(
            "{} reviews from the base model and {} from the adapter ({} titles x {} samples)",
            n,
            n,
            prompts.len(),
            es.samples
        ),
    );
    let remote = es.backend == Backend::Openai;
    let base = if remote {
        draw(
            &servers(ctx, &es.served_base)?,
            &prompts,
            es.samples,
            &sampling,
        )?
    } else {
        draw(&Local::new(&model, batch), &prompts, es.samples, &sampling)?
    };

    // The eval loss needs the reference (base) log-probs, then the adapter's.
    let prep = trainer::prepare(&model, ts, &[], &raw.test)?;
    let avg = ts.loss.averages_logps();
    let ref_eval = trainer::reference_logps(&model, &prep.eval, ts.batch_size, avg)?;
    model.load_adapter(inp.adapter)?;
    let adapted = if remote {
        draw(
            &servers(ctx, &es.served_adapter)?,
            &prompts,
            es.samples,
            &sampling,
        )?
    } else {
        draw(&Local::new(&model, batch), &prompts, es.samples, &sampling)?
    };
    let tr = trainer::Trainer {
        model: &model,
        s: ts,
        train: &[],
        eval: &prep.eval,
        ref_train: &[],
        ref_eval: &ref_eval,
        ckpt_dir: PathBuf::new(),
        quiet: true,
    };
    let m = tr.evaluate()?;
    // A missing or non-finite metric is a failed evaluation, never a `null` in a report.
    let metric = |k: &str| -> Result<f64> {
        match m.get(k).and_then(|v| v.as_f64()) {
            Some(x) if x.is_finite() => Ok(x),
            other => bail!("the adapter's {k} on the test pairs is {other:?}, not a number"),
        }
    };

    let harsher = write_report(
        ctx,
        out,
        &judge,
        judge_auroc,
        &prompts,
        (&base, &adapted),
        (metric("eval_loss")?, metric("eval_rewards/accuracies")?),
    )?;
    Ok(Built::new("reviews", 2 * n)
        .with("titles", prompts.len())
        .with("harsher", harsher))
}

fn markdown(r: &Report, rows: &[SampleRow]) -> String {
    let mut s = String::new();
    s.push_str("# Is Reviewer #2 harsher than the base model?\n\n");
    s.push_str(&format!(
        "{} reviews per model on held-out titles, the same prompt and seed for both; judged by the `{}` judge (higher = more negative).\n\n",
        r.n, r.judge
    ));
    s.push_str("| | base | Reviewer #2 |\n|---|---|---|\n");
    s.push_str(&format!(
        "| mean negativity | {:.3} | {:.3} |\n| distinct-2 | {:.3} | {:.3} |\n| mean characters | {:.1} | {:.1} |\n\n",
        r.negativity_base, r.negativity_adapter, r.distinct2_base, r.distinct2_adapter,
        r.mean_chars_base, r.mean_chars_adapter
    ));
    s.push_str(&format!(
        "- Harsher than the base review: **{:.1}%** of {} (95% Wilson interval {:.1}% to {:.1}%; a tie is not harsher).\n",
        100.0 * r.harsher_rate,
        r.n,
        100.0 * r.harsher_rate_ci[0],
        100.0 * r.harsher_rate_ci[1]
    ));
    s.push_str(&format!(
        "- The judge tells chosen from rejected on the test pairs with AUROC **{:.3}** (it was not tuned on them).\n",
        r.judge_auroc
    ));
    s.push_str(&format!(
        "- On the test pairs the adapter has eval loss {:.4} and reward accuracy {:.3}.\n\n",
        r.eval_loss, r.eval_reward_accuracy
    ));
    s.push_str("## Side by side\n\n| title | base | Reviewer #2 |\n|---|---|---|\n");
    let cell = |t: &str, sc: f64| format!("{} ({sc:.2})", t.replace('|', "\\|").replace('\n', " "));
    for row in rows.iter().filter(|r| r.sample == 0).take(8) {
        s.push_str(&format!(
            "| {} | {} | {} |\n",
            row.title.replace('|', "\\|"),
            cell(&row.base, row.base_score),
            cell(&row.adapter, row.adapter_score)
        ));
    }
    s
}
