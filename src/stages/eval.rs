//! Stage 7, eval: is the trained bot harsher than the base model?
//!
//! On held-out titles (the test split's, or with `eval.titles = N` titles from the page that are
//! in neither split) the base model and the adapter each write `eval.samples` reviews from the
//! same prompt (the neutral, interleaved pair prompt the dataset's `prompt` column holds) with the
//! same per-sample seeds, on the batch stages' weights (`Recipe::sampler`: a GGUF's blocks where
//! they pay; the eval loss stays on the training model's dense weights). Judges score every
//! review's negativity: `eval.judge` (the headline numbers), and always the lexicon judge and
//! the `trained` judge (fitted here on the train pairs), each validated on the test pairs
//! (chosen against rejected: its AUROC), which nothing here tunes it on. A judge that labelled
//! the training data (merge's label check, or an on-policy
//! round's labels when the eval runs for a round: `stages::rounds`) is marked so:
//! the report always holds one that did not. Coherence (`judge::coherence`) is measured for both
//! models, and the harsher rate again over the pairs where neither review loops. The eval loss
//! and reward accuracy of the adapter on the test pairs come from the trainer's own eval.
//!
//! Outputs: `report.json`, `samples.jsonl`, `eval.md`, `scores.png`, `coherence.png`,
//! `trained_judge.json`.

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
use crate::judge::coherence::{loops, repeats_ngram, repeats_sentence, share};
use crate::judge::trained::Trained;
use crate::judge::{auroc, distinct2, wilson95, Judge};
use crate::model::generate::Finish;
use crate::model::load::Model;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

// 2: coherence measures, every judge's numbers, the trained judge.
const VERSION: u32 = 2;

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
    /// The judge that labelled on-policy rounds this adapter trained on (`rounds.judge`), if
    /// any: like merge's, its verdict on the adapter is not independent.
    pub(crate) round_labels: Option<JudgeKind>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct SampleRow {
    pub(crate) title: String,
    pub(crate) sample: usize,
    /// The sampler of this row (both models) is stream `stream` of `seed` (`eval.seed`).
    pub(crate) seed: u64,
    pub(crate) stream: usize,
    pub(crate) base: String,
    pub(crate) adapter: String,
    /// By `eval.judge`.
    pub(crate) base_score: f64,
    pub(crate) adapter_score: f64,
    /// Every judge's scores, `[base, adapter]`.
    pub(crate) scores: BTreeMap<String, [f64; 2]>,
    pub(crate) base_tokens: usize,
    pub(crate) adapter_tokens: usize,
    pub(crate) base_finish: Finish,
    pub(crate) adapter_finish: Finish,
}

/// One judge's verdict.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct JudgeReport {
    pub(crate) auroc: f64,
    pub(crate) harsher_rate: f64,
    pub(crate) harsher_rate_ci: [f64; 2],
    /// Over the pairs where neither review loops; null when every pair has a loop (a rate of
    /// nothing is not 0).
    pub(crate) harsher_rate_fluent: Option<f64>,
    pub(crate) harsher_rate_fluent_ci: Option<[f64; 2]>,
    pub(crate) negativity_base: f64,
    pub(crate) negativity_adapter: f64,
    /// It chose which pairs the training data kept (merge's label check): its verdict on the
    /// bot trained on them is not independent.
    pub(crate) labeled_training_data: bool,
}

/// `report.json`. The top-level judge numbers are `eval.judge`'s; `judges` holds every judge's.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Report {
    pub(crate) n: usize,
    pub(crate) judge: String,
    pub(crate) judge_auroc: f64,
    pub(crate) harsher_rate: f64,
    pub(crate) harsher_rate_ci: [f64; 2],
    pub(crate) negativity_base: f64,
    pub(crate) negativity_adapter: f64,
    pub(crate) eval_loss: f64,
    pub(crate) eval_reward_accuracy: f64,
    pub(crate) distinct2_base: f64,
    pub(crate) distinct2_adapter: f64,
    pub(crate) mean_chars_base: f64,
    pub(crate) mean_chars_adapter: f64,
    pub(crate) mean_tokens_base: f64,
    pub(crate) mean_tokens_adapter: f64,
    /// Shares of reviews that repeat a sentence, that repeat a 4-gram, and that stopped at
    /// `max_new_tokens` rather than at the end-of-sequence token (`judge::coherence`).
    pub(crate) repeat_sentence_base: f64,
    pub(crate) repeat_sentence_adapter: f64,
    pub(crate) repeat_ngram_base: f64,
    pub(crate) repeat_ngram_adapter: f64,
    pub(crate) hit_max_tokens_base: f64,
    pub(crate) hit_max_tokens_adapter: f64,
    /// Pairs where neither review loops (repeats a sentence).
    pub(crate) fluent_pairs: usize,
    /// Null when there is no such pair.
    pub(crate) harsher_rate_fluent: Option<f64>,
    pub(crate) harsher_rate_fluent_ci: Option<[f64; 2]>,
    pub(crate) judges: BTreeMap<String, JudgeReport>,
    /// The judges that did not label the training data.
    pub(crate) independent_judges: Vec<String>,
    /// Where the recipe's styles are not the published ones (`prompts.chosen` not "negative"):
    /// the chosen style, and the share of pairs where the adapter's review is more like it by
    /// `eval.judge`. `harsher_rate` and `negativity_*` keep their names for the published
    /// recipe's readers (scripts, README, RESULTS) and hold the same numbers: every judge
    /// scores "like the chosen style". Absent for the published recipe, whose report stays
    /// byte for byte as it was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) chosen_style: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) toward_chosen_rate: Option<f64>,
}

/// One review and how it ended.
#[derive(Debug, Clone)]
struct Review {
    text: String,
    tokens: usize,
    finish: Finish,
}

/// What the eval's output depends on: long because it is that list, each part with the
/// reason it is there.
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
    if s.eval.backend != Backend::Openai {
        // What the local reviews are computed on.
        settings["sampler"] = ctx.recipe.sampler.sampling_numerics(g.batch_size);
    }
    if t.rpo_alpha > 0.0 {
        settings["loss"]["rpo_alpha"] = serde_json::json!(t.rpo_alpha);
    }
    for (k, v) in t.loss_params() {
        settings["loss"][k] = v;
    }
    super::generate::add_penalties(&mut settings["sampling"], g);
    let mut model = ctx.recipe.model(&ctx.recipe.train)?.identity.clone();
    match s.eval.judge {
        JudgeKind::Llm => {
            settings["judge"] = s.judge.key_value()?;
            model = format!(
                "{model}; judge {}",
                ctx.recipe.model(&ctx.recipe.judge)?.identity
            );
        }
        _ => settings["judge"] = serde_json::json!("vader 3.3.2"),
    }
    settings["judge_kind"] = serde_json::json!(s.eval.judge.name());
    s.judge.mark_direction(&mut settings);
    // The other judges every report holds, and what marks one as the labels' judge.
    settings["also_judged_by"] = serde_json::json!([
        "vader 3.3.2",
        format!(
            "trained v1 C={} min_df={}",
            crate::judge::trained::C,
            crate::judge::trained::MIN_DF
        )
    ]);
    settings["merge_judge"] = serde_json::json!(s.merge.judge.name());
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
    let (drawn, _) = page_titles(ctx, dir)?;
    let chat = model
        .meta
        .chat
        .as_ref()
        .context("the model has no chat template")?;
    drawn
        .into_iter()
        .map(|title| {
            let m = super::prompts::neutral_messages(ctx.recipe, &title)?;
            Ok((title, chat.render(&m, true)?))
        })
        .collect()
}

/// The page's titles outside the scrape stage's sample: `(the eval's, the rest)`. With
/// `eval.titles = N`, the eval's are N of them drawn with `eval.seed`; the rest (the titles the
/// rounds draw from) keep the page's order.
pub(crate) fn page_titles(ctx: &Ctx, scrape_dir: &Path) -> Result<(Vec<String>, Vec<String>)> {
    let n = ctx.settings().eval.titles;
    let all = std::fs::read_to_string(scrape_dir.join("all_titles.txt"))
        .with_context(|| format!("reading {}", scrape_dir.join("all_titles.txt").display()))?;
    let used: HashSet<String> = read_jsonl::<TitleRow>(&scrape_dir.join("titles.jsonl"))?
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
    if n == 0 {
        return Ok((Vec::new(), pool.iter().map(|t| t.to_string()).collect()));
    }
    let mut rng = crate::rng::seeded(ctx.settings().eval.seed);
    let idx = crate::rng::permutation(pool.len(), &mut rng);
    let drawn: HashSet<usize> = idx[..n].iter().copied().collect();
    let rest = (0..pool.len())
        .filter(|i| !drawn.contains(i))
        .map(|i| pool[i].to_string())
        .collect();
    Ok((
        idx[..n].iter().map(|&i| pool[i].to_string()).collect(),
        rest,
    ))
}

/// One review for each of `samples` samples of each prompt, from `backend`: job
/// `i * samples + k` is sample `k` of prompt `i`, seeded `(s.seed, i * samples + k)` for both
/// models, so the base and the adapter answer each title from the same seeds.
fn draw(
    backend: &dyn crate::backend::Backend,
    prompts: &[(String, String)],
    samples: usize,
    s: &crate::model::generate::Sampling,
) -> Result<Vec<Review>> {
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
    let mut out = vec![None; jobs.len()];
    backend.generate(jobs, s, &mut |a| {
        out[a.id] = Some(Review {
            text: a.text,
            tokens: a.tokens,
            finish: a.finish,
        });
        Ok(())
    })?;
    out.into_iter()
        .enumerate()
        .map(|(i, r)| r.with_context(|| format!("the backend returned no review for job {i}")))
        .collect()
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

/// The rows' harsh (chosen; for unpaired rows: desirable) and kind reviews.
fn harsh_and_kind(rows: &[data::RawRow], unpaired: bool) -> (Vec<&str>, Vec<&str>) {
    if unpaired {
        (
            rows.iter()
                .filter(|r| r.label == Some(true))
                .map(|r| r.chosen.as_str())
                .collect(),
            rows.iter()
                .filter(|r| r.label == Some(false))
                .map(|r| r.chosen.as_str())
                .collect(),
        )
    } else {
        (
            rows.iter().map(|r| r.chosen.as_str()).collect(),
            rows.iter().map(|r| r.rejected.as_str()).collect(),
        )
    }
}

/// The judge's AUROC at telling the test rows' chosen reviews from their rejected ones (for
/// unpaired rows: desirable from undesirable), before it scores anything.
fn judge_auroc(judge: &Judge, test: &[data::RawRow], unpaired: bool) -> Result<f64> {
    let (harsh, kind) = harsh_and_kind(test, unpaired);
    if harsh.is_empty() || kind.is_empty() {
        bail!(
            "the test rows hold {} desirable and {} undesirable reviews; validating the judge needs both",
            harsh.len(),
            kind.len()
        );
    }
    Ok(auroc(&judge.score(&harsh)?, &judge.score(&kind)?))
}

/// A judge of this eval, with its validation.
struct Judged<'a, 'm> {
    judge: &'a Judge<'m>,
    auroc: f64,
    /// It labelled the training data (merge's label check).
    labeled: bool,
}

fn share_where(v: &[Review], f: impl Fn(&Review) -> bool) -> f64 {
    v.iter().filter(|r| f(r)).count() as f64 / v.len().max(1) as f64
}

type Scores = (Vec<f64>, Vec<f64>);

/// Every judge's verdict on the pairs, and its scores `(base, adapter)`, in `judges`' order.
fn judge_all(
    judges: &[Judged],
    (bt, at): (&[&str], &[&str]),
    fluent: &[bool],
) -> Result<(BTreeMap<String, JudgeReport>, Vec<Scores>)> {
    let n = bt.len();
    let fluent_pairs = fluent.iter().filter(|f| **f).count();
    let mut verdicts = BTreeMap::new();
    let mut all_scores = Vec::new();
    for j in judges {
        let sb = j.judge.score(bt)?;
        let sa = j.judge.score(at)?;
        let harsher = (0..n).filter(|&i| sa[i] > sb[i]).count();
        let harsher_fluent = (0..n).filter(|&i| fluent[i] && sa[i] > sb[i]).count();
        verdicts.insert(
            j.judge.kind().name().to_string(),
            JudgeReport {
                auroc: j.auroc,
                harsher_rate: harsher as f64 / n as f64,
                harsher_rate_ci: wilson95(harsher, n),
                harsher_rate_fluent: (fluent_pairs > 0)
                    .then(|| harsher_fluent as f64 / fluent_pairs as f64),
                harsher_rate_fluent_ci: (fluent_pairs > 0)
                    .then(|| wilson95(harsher_fluent, fluent_pairs)),
                negativity_base: mean(&sb),
                negativity_adapter: mean(&sa),
                labeled_training_data: j.labeled,
            },
        );
        all_scores.push((sb, sa));
    }
    Ok((verdicts, all_scores))
}

/// `samples.jsonl`'s rows: review `id` is sample `id % samples` of prompt `id / samples`.
fn sample_rows(
    es: &crate::config::EvalSettings,
    prompts: &[(String, String)],
    judges: &[Judged],
    all_scores: &[Scores],
    (base, adapted): (&[Review], &[Review]),
) -> Vec<SampleRow> {
    let (sb, sa) = &all_scores[0];
    (0..base.len())
        .map(|id| SampleRow {
            title: prompts[id / es.samples].0.clone(),
            sample: id % es.samples,
            seed: es.seed,
            stream: id,
            base: base[id].text.clone(),
            adapter: adapted[id].text.clone(),
            base_score: sb[id],
            adapter_score: sa[id],
            scores: judges
                .iter()
                .zip(all_scores)
                .map(|(j, (b, a))| (j.judge.kind().name().to_string(), [b[id], a[id]]))
                .collect(),
            base_tokens: base[id].tokens,
            adapter_tokens: adapted[id].tokens,
            base_finish: base[id].finish,
            adapter_finish: adapted[id].finish,
        })
        .collect()
}

/// `scores.png` (`eval.judge`'s scores of both models) and `coherence.png`.
fn charts(r: &Report, (sb, sa): (&[f64], &[f64]), judge: &str, out: &Path) {
    crate::dpo::charts::plot_distributions(
        sb,
        sa,
        &format!(
            "{judge} judge: {} of {} reviews per model",
            score_name(r),
            r.n
        ),
        &out.join("scores.png"),
    );
    crate::dpo::charts::plot_shares(
        &[
            (
                "repeats a sentence",
                r.repeat_sentence_base,
                r.repeat_sentence_adapter,
            ),
            (
                "repeats a 4-gram",
                r.repeat_ngram_base,
                r.repeat_ngram_adapter,
            ),
            (
                "stopped at max_new_tokens",
                r.hit_max_tokens_base,
                r.hit_max_tokens_adapter,
            ),
            ("distinct-2", r.distinct2_base, r.distinct2_adapter),
        ],
        &format!("coherence of {} reviews per model", r.n),
        &out.join("coherence.png"),
    );
}

/// Score both models' reviews by every judge, measure their coherence, and write
/// `samples.jsonl`, `report.json`, `eval.md` and the charts. `judges[0]` is `eval.judge`.
/// Returns how many pairs the adapter's review was the harsher of, by `eval.judge`.
// Long because the report's fields take a line each.
fn write_report(
    ctx: &Ctx,
    out: &Path,
    judges: &[Judged],
    prompts: &[(String, String)],
    (base, adapted): (&[Review], &[Review]),
    (eval_loss, eval_reward_accuracy): (f64, f64),
) -> Result<usize> {
    let es = &ctx.settings().eval;
    let n = base.len();
    let bt: Vec<&str> = base.iter().map(|r| r.text.as_str()).collect();
    let at: Vec<&str> = adapted.iter().map(|r| r.text.as_str()).collect();
    let fluent: Vec<bool> = (0..n).map(|i| !loops(bt[i]) && !loops(at[i])).collect();
    let fluent_pairs = fluent.iter().filter(|f| **f).count();

    let (verdicts, all_scores) = judge_all(judges, (&bt, &at), &fluent)?;
    let (sb, sa) = &all_scores[0];
    let main = &verdicts[judges[0].judge.kind().name()];
    let harsher = (0..n).filter(|&i| sa[i] > sb[i]).count();
    let chars = |v: &[&str]| {
        mean(
            &v.iter()
                .map(|t| t.chars().count() as f64)
                .collect::<Vec<_>>(),
        )
    };
    let tokens = |v: &[Review]| mean(&v.iter().map(|r| r.tokens as f64).collect::<Vec<_>>());
    let styles = &ctx.settings().prompts;
    let restyled = !styles.default_styles();
    let report = Report {
        chosen_style: restyled.then(|| styles.chosen.clone()),
        toward_chosen_rate: restyled.then(|| harsher as f64 / n.max(1) as f64),
        n,
        judge: es.judge.name().into(),
        judge_auroc: main.auroc,
        harsher_rate: main.harsher_rate,
        harsher_rate_ci: main.harsher_rate_ci,
        negativity_base: main.negativity_base,
        negativity_adapter: main.negativity_adapter,
        eval_loss,
        eval_reward_accuracy,
        distinct2_base: distinct2(&bt),
        distinct2_adapter: distinct2(&at),
        mean_chars_base: chars(&bt),
        mean_chars_adapter: chars(&at),
        mean_tokens_base: tokens(base),
        mean_tokens_adapter: tokens(adapted),
        repeat_sentence_base: share(&bt, repeats_sentence),
        repeat_sentence_adapter: share(&at, repeats_sentence),
        repeat_ngram_base: share(&bt, repeats_ngram),
        repeat_ngram_adapter: share(&at, repeats_ngram),
        hit_max_tokens_base: share_where(base, |r| r.finish == Finish::Length),
        hit_max_tokens_adapter: share_where(adapted, |r| r.finish == Finish::Length),
        fluent_pairs,
        harsher_rate_fluent: main.harsher_rate_fluent,
        harsher_rate_fluent_ci: main.harsher_rate_fluent_ci,
        independent_judges: verdicts
            .iter()
            .filter(|(_, v)| !v.labeled_training_data)
            .map(|(k, _)| k.clone())
            .collect(),
        judges: verdicts,
    };
    let rows = sample_rows(es, prompts, judges, &all_scores, (base, adapted));
    write_jsonl(&out.join("samples.jsonl"), &rows)?;
    write_json_pretty(&out.join("report.json"), &report)?;
    write_atomic(&out.join("eval.md"), markdown(&report, &rows).as_bytes())?;
    charts(&report, (sb, sa), es.judge.name(), out);
    let others: Vec<String> = report
        .judges
        .iter()
        .filter(|(k, _)| *k != es.judge.name())
        .map(|(k, v)| format!("{k} {:.0}%", 100.0 * v.harsher_rate))
        .collect();
    let verdict = match &report.chosen_style {
        Some(style) => format!("more {style} (the chosen style)"),
        None => "harsher".to_string(),
    };
    ctx.say(
        "Evaluated",
        format!(
            "{verdict} in {:.0}% of {n} (95% CI {:.0}-{:.0}%; {}), {} of the {fluent_pairs} pairs where neither loops; {} {:.3} -> {:.3}, judge AUROC {:.3}; loops {:.0}% -> {:.0}%",
            100.0 * report.harsher_rate,
            100.0 * report.harsher_rate_ci[0],
            100.0 * report.harsher_rate_ci[1],
            others.join(", "),
            pct(report.harsher_rate_fluent),
            score_name(&report),
            report.negativity_base,
            report.negativity_adapter,
            report.judge_auroc,
            100.0 * report.repeat_sentence_base,
            100.0 * report.repeat_sentence_adapter,
        ),
    );
    Ok(harsher)
}

/// `eval.judge`, then the lexicon and trained judges where it is neither.
fn load_judges<'m>(
    ctx: &Ctx,
    trained: &Trained,
    judge_model: Option<&'m Model>,
) -> Result<Vec<Judge<'m>>> {
    let s = ctx.settings();
    let mut kinds = vec![s.eval.judge];
    for k in [JudgeKind::Lexicon, JudgeKind::Trained] {
        if !kinds.contains(&k) {
            kinds.push(k);
        }
    }
    kinds
        .iter()
        .map(|&k| match k {
            JudgeKind::Trained => Ok(Judge::Trained(Box::new(trained.clone()))),
            k => Judge::new(k, &s.judge, judge_model),
        })
        .collect()
}

/// Each judge's AUROC on the test rows, and whether it labelled the training data (merge's
/// label check kept only the pairs its judge agreed with).
fn validate_judges<'a, 'm>(
    ctx: &Ctx,
    loaded: &'a [Judge<'m>],
    test: &[data::RawRow],
    unpaired: bool,
    round_labels: Option<JudgeKind>,
) -> Result<Vec<Judged<'a, 'm>>> {
    let from_merge = ctx.recipe.train_dataset.is_none();
    let mut judges = Vec::new();
    for j in loaded {
        let a = judge_auroc(j, test, unpaired)?;
        ctx.say(
            "Judge",
            format!(
                "{}: AUROC {a:.3} at telling chosen from rejected on {} test rows",
                j.kind().name(),
                test.len()
            ),
        );
        judges.push(Judged {
            judge: j,
            auroc: a,
            labeled: (from_merge && ctx.settings().merge.judge == j.kind())
                || round_labels == Some(j.kind()),
        });
    }
    Ok(judges)
}

/// The stage, step by step (long because the steps share the loaded model, whose adapter is
/// attached half way: the base's reviews and reference log-probs come before it).
pub(crate) fn build(ctx: &Ctx, inp: &Inputs, out: &Path) -> Result<Built> {
    let s = ctx.settings();
    let es = &s.eval;
    let ts = &s.train;
    let raw = match &ctx.recipe.train_dataset {
        None => data::load_dataset_for(
            inp.split
                .context("the eval stage needs the split stage's output")?,
            ts.loss.first(),
        )?,
        Some(p) => data::load_dataset_for(p, ts.loss.first())?,
    };
    if raw.test.is_empty() {
        bail!("the dataset has no test rows: the eval stage judges on them (split.test must be at least 1)");
    }
    let unpaired = ts.loss.is_unpaired();
    let mut model = ctx.recipe.load(&ctx.recipe.train)?;

    // The judges, `eval.judge` first, each validated on the labelled test rows before it
    // scores anything. The trained one learns from the train rows only.
    let (harsh, kind) = harsh_and_kind(&raw.train, unpaired);
    let trained = Trained::fit(&harsh, &kind)
        .context("fitting the trained judge on the dataset's train rows")?;
    write_json_pretty(&out.join("trained_judge.json"), &trained)?;
    let judge_model = match es.judge {
        JudgeKind::Llm => Some(ctx.recipe.load(&ctx.recipe.judge)?),
        _ => None,
    };
    let loaded = load_judges(ctx, &trained, judge_model.as_ref())?;
    let judges = validate_judges(ctx, &loaded, &raw.test, unpaired, inp.round_labels)?;

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
    // Local reviews come from the sampler's weights (blocks where they pay), the eval loss from
    // the training model's; one model where those are the same.
    let mut sampler = if remote || ctx.recipe.sampler.same_weights_as(&ctx.recipe.train) {
        None
    } else {
        Some(ctx.recipe.load(&ctx.recipe.sampler)?)
    };
    let base = if remote {
        draw(
            &servers(ctx, &es.served_base)?,
            &prompts,
            es.samples,
            &sampling,
        )?
    } else {
        let m = sampler.as_ref().unwrap_or(&model);
        draw(&Local::new(m, batch), &prompts, es.samples, &sampling)?
    };

    // The eval loss needs the reference (base) log-probs, then the adapter's.
    let prep = trainer::prepare(&model, ts, &[], &raw.test)?;
    let avg = ts.loss.averages_logps();
    // A reference-free loss (SimPO, ORPO, SFT) reads none: zeros stand in, unread.
    let ref_eval = if ts.loss.needs_reference() {
        trainer::reference_logps(&model, &prep.eval, ts.batch_size, avg)?
    } else {
        vec![(0.0, 0.0); prep.eval.len()]
    };
    model.load_adapter(inp.adapter)?;
    if let Some(m) = &mut sampler {
        m.load_adapter(inp.adapter)?;
    }
    let adapted = if remote {
        draw(
            &servers(ctx, &es.served_adapter)?,
            &prompts,
            es.samples,
            &sampling,
        )?
    } else {
        let m = sampler.as_ref().unwrap_or(&model);
        draw(&Local::new(m, batch), &prompts, es.samples, &sampling)?
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
        &judges,
        &prompts,
        (&base, &adapted),
        (metric("eval_loss")?, metric("eval_rewards/accuracies")?),
    )?;
    Ok(Built::new("reviews", 2 * n)
        .with("titles", prompts.len())
        .with("harsher", harsher))
}

/// A rate as a percentage, or "n/a" where there was nothing to count.
fn pct(x: Option<f64>) -> String {
    x.map_or("n/a".into(), |v| format!("{:.1}%", 100.0 * v))
}

/// eval.md's title, what a higher score means, and the adapter's column name: the published
/// recipe's text as it was; another recipe's names its own chosen style.
fn heading(r: &Report) -> (String, String, &'static str) {
    match (&r.chosen_style, r.toward_chosen_rate) {
        (Some(style), Some(rate)) => (
            format!(
                "# Did the bot move toward its chosen style, `{style}`?\n\nThe adapter's review is more `{style}` than the base model's in **{:.1}%** of pairs (the `harsher` columns below: every judge scores how much a review is like the chosen style).\n\n",
                100.0 * rate
            ),
            format!("more `{style}`"),
            "the adapter",
        ),
        _ => (
            "# Is Reviewer #2 harsher than the base model?\n\n".to_string(),
            "more negative".to_string(),
            "Reviewer #2",
        ),
    }
}

/// What the judges' scores measure: negativity for the published recipe, likeness to the chosen
/// style for a recipe with its own styles (the fields keep their `negativity_*` names).
fn score_name(r: &Report) -> String {
    match &r.chosen_style {
        Some(style) => format!("{style}-likeness"),
        None => "negativity".to_string(),
    }
}

fn markdown(r: &Report, rows: &[SampleRow]) -> String {
    let mut s = String::new();
    let (heading, higher, bot) = heading(r);
    s.push_str(&heading);
    s.push_str(&format!(
        "{} reviews per model on held-out titles, the same prompt and seed for both; judged by the `{}` judge (higher = {higher}).\n\n",
        r.n, r.judge
    ));
    s.push_str(&format!("| | base | {bot} |\n|---|---|---|\n"));
    s.push_str(&format!(
        "| mean {} | {:.3} | {:.3} |\n| distinct-2 | {:.3} | {:.3} |\n| mean characters | {:.1} | {:.1} |\n| mean tokens | {:.1} | {:.1} |\n",
        score_name(r), r.negativity_base, r.negativity_adapter, r.distinct2_base, r.distinct2_adapter,
        r.mean_chars_base, r.mean_chars_adapter, r.mean_tokens_base, r.mean_tokens_adapter
    ));
    s.push_str(&format!(
        "| repeats a sentence | {:.1}% | {:.1}% |\n| repeats a 4-gram | {:.1}% | {:.1}% |\n| stopped at max_new_tokens | {:.1}% | {:.1}% |\n\n",
        100.0 * r.repeat_sentence_base, 100.0 * r.repeat_sentence_adapter,
        100.0 * r.repeat_ngram_base, 100.0 * r.repeat_ngram_adapter,
        100.0 * r.hit_max_tokens_base, 100.0 * r.hit_max_tokens_adapter
    ));
    s.push_str(&format!(
        "- Harsher than the base review: **{:.1}%** of {} (95% Wilson interval {:.1}% to {:.1}%; a tie is not harsher).\n",
        100.0 * r.harsher_rate,
        r.n,
        100.0 * r.harsher_rate_ci[0],
        100.0 * r.harsher_rate_ci[1]
    ));
    match (r.harsher_rate_fluent, r.harsher_rate_fluent_ci) {
        (Some(h), Some([lo, hi])) => s.push_str(&format!(
            "- Over the {} pairs where neither review repeats a sentence: **{:.1}%** ({:.1}% to {:.1}%).\n",
            r.fluent_pairs,
            100.0 * h,
            100.0 * lo,
            100.0 * hi
        )),
        _ => s.push_str("- In every pair one review or both repeat a sentence: no harsher rate without loops.\n"),
    }
    s.push_str(&format!(
        "- The judge tells chosen from rejected on the test pairs with AUROC **{:.3}** (it was not tuned on them).\n",
        r.judge_auroc
    ));
    s.push_str("\n## Every judge\n\n| judge | AUROC on the test pairs | harsher | 95% interval | harsher where neither loops | labelled the training data |\n|---|---|---|---|---|---|\n");
    for (name, j) in &r.judges {
        s.push_str(&format!(
            "| {name} | {:.3} | {:.1}% | {:.1}% to {:.1}% | {} | {} |\n",
            j.auroc,
            100.0 * j.harsher_rate,
            100.0 * j.harsher_rate_ci[0],
            100.0 * j.harsher_rate_ci[1],
            pct(j.harsher_rate_fluent),
            if j.labeled_training_data {
                "yes: not independent"
            } else {
                "no"
            }
        ));
    }
    s.push('\n');
    s.push_str(&format!(
        "- On the test pairs the adapter has eval loss {:.4} and reward accuracy {:.3}.\n\n",
        r.eval_loss, r.eval_reward_accuracy
    ));
    s.push_str(&format!(
        "## Side by side\n\n| title | base | {bot} |\n|---|---|---|\n"
    ));
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_pair_without_a_loop_gives_no_fluent_rate_not_zero() {
        let j = Judge::Lexicon(Box::default(), crate::judge::Sentiment::Negative);
        let judged = [Judged {
            judge: &j,
            auroc: 0.5,
            labeled: false,
        }];
        let (v, _) = judge_all(
            &judged,
            (&["it is good. it is good."], &["it is bad. it is bad."]),
            &[false],
        )
        .unwrap();
        assert!(v["lexicon"].harsher_rate_fluent.is_none());
        assert!(v["lexicon"].harsher_rate_fluent_ci.is_none());
        assert_eq!(v["lexicon"].harsher_rate, 1.0);
        let (v, _) = judge_all(&judged, (&["it is good."], &["it is bad."]), &[true]).unwrap();
        assert_eq!(v["lexicon"].harsher_rate_fluent, Some(1.0));
    }
}
