//! A round's first stage, `round-sample`: the bot (the adapter the round starts from, on the
//! training model) writes `rounds.samples` reviews of each of the round's titles from the
//! neutral pair prompt, the prompt the pairs will hold. Rows go through the same resumable chunks
//! as the generate stage; review j of title i is row `i * k + j`, sampled from stream `i * k + j`
//! of `mix(rounds.seed, r)`, so a resumed run writes the same bytes.
//!
//! Output: `samples.jsonl` ([`SampleRow`]).

use super::super::chunks::{self, Chunks};
use super::super::{Built, Ctx};
use crate::backend::local::Local;
use crate::backend::{Backend, Job};
use crate::cache::KeyMaterial;
use crate::error::{Context, Result};
use crate::fsutil::write_jsonl;
use crate::judge::coherence::loops;
use crate::model::generate::Finish;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

const VERSION: u32 = 1;

/// One review the bot wrote.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub(crate) struct SampleRow {
    /// `title_index * rounds.samples + sample`.
    pub(crate) id: usize,
    pub(crate) title_index: usize,
    pub(crate) title: String,
    pub(crate) sample: usize,
    /// The prompt the review was sampled from, exactly (chat template applied).
    pub(crate) prompt: String,
    pub(crate) text: String,
    pub(crate) tokens: usize,
    pub(crate) finish: Finish,
}

impl chunks::Row for SampleRow {
    fn id(&self) -> usize {
        self.id
    }
    fn tokens(&self) -> usize {
        self.tokens
    }
}

/// What round `r`'s reviews depend on: the adapter they come from (its key chains every round
/// before), the page's titles, the draw, the sampling, and the model and numerics.
pub(crate) fn material(
    ctx: &Ctx,
    r: usize,
    adapter_key: &str,
    scrape_key: &str,
) -> Result<KeyMaterial> {
    let s = ctx.settings();
    let rs = &s.rounds;
    let g = &s.generate;
    let mut settings = serde_json::json!({
        "round": r,
        "titles": rs.titles,
        "samples": rs.samples,
        "seed": rs.seed,
        "sampling": {"max_new_tokens": g.max_new_tokens, "temperature": g.temperature,
                     "top_k": g.top_k, "top_p": g.top_p},
        "device": ctx.recipe.train.device_name(),
        "dtype": ctx.recipe.train.dtype_name(),
        "attention": s.train.attention,
        "sampler": ctx.recipe.sampler.sampling_numerics(g.batch_size),
    });
    super::super::generate::add_penalties(&mut settings["sampling"], g);
    // The eval's titles are left out of the draw.
    if s.eval.titles > 0 {
        settings["eval_titles"] = serde_json::json!({"titles": s.eval.titles, "seed": s.eval.seed});
    }
    Ok(KeyMaterial {
        stage: "round-sample".into(),
        version: VERSION,
        settings,
        files: BTreeMap::new(),
        model: Some(ctx.recipe.model(&ctx.recipe.train)?.identity.clone()),
        inputs: BTreeMap::from([
            ("adapter".to_string(), adapter_key.to_string()),
            ("scrape".to_string(), scrape_key.to_string()),
        ]),
    })
}

pub(crate) fn build(
    ctx: &Ctx,
    r: usize,
    (adapter_dir, scrape_dir): (&Path, &Path),
    key: &str,
    out: &Path,
) -> Result<Built> {
    let s = ctx.settings();
    let k = s.rounds.samples;
    let titles = super::titles(ctx, scrape_dir, r)?;
    let mut model = ctx.recipe.load(&ctx.recipe.sampler)?;
    let chat = model
        .meta
        .chat
        .as_ref()
        .context("the model has no chat template: the rounds' prompts go through it")?;
    let prompts: Vec<String> = titles
        .iter()
        .map(|t| {
            chat.render(
                &super::super::prompts::neutral_messages(ctx.recipe, t)?,
                true,
            )
        })
        .collect::<Result<_>>()?;
    let total = titles.len() * k;
    let mut w = Chunks::<SampleRow>::open(
        ctx,
        ("round-sample", "reviews"),
        ctx.cache.partial_dir(&super::Step::Sample.folder(r), key),
        s.generate.chunk_size,
        total,
    )?;
    let done = w.done_ids();
    let jobs: Vec<Job> = (0..total)
        .filter(|id| !done.contains(id))
        .map(|id| Job {
            id,
            prompt: prompts[id / k].clone(),
            messages: Vec::new(),
        })
        .collect();
    if !jobs.is_empty() {
        model.load_adapter(adapter_dir)?;
        ctx.say(
            "Sampling",
            format!(
                "round {r}: {} reviews of {} fresh titles from the bot ({k} a title)",
                jobs.len(),
                titles.len()
            ),
        );
        let mut sampling = s.generate.sampling();
        sampling.seed = crate::rng::mix(s.rounds.seed, r as u64);
        let engine = Local::new(&model, s.generate.batch_size);
        let result = engine.generate(jobs, &sampling, &mut |a| {
            w.push(SampleRow {
                id: a.id,
                title_index: a.id / k,
                title: titles[a.id / k].clone(),
                sample: a.id % k,
                prompt: prompts[a.id / k].clone(),
                text: a.text,
                tokens: a.tokens,
                finish: a.finish,
            })
        });
        // What finished before a failure stays on disk for the next run.
        w.flush()?;
        result?;
    }
    let rows = w.finish(&(0..total).collect::<Vec<_>>())?;
    write_jsonl(&out.join("samples.jsonl"), &rows)?;
    Ok(Built::new("reviews", rows.len())
        .with("titles", titles.len())
        .with("loops", rows.iter().filter(|r| loops(&r.text)).count())
        .with(
            "finished_length",
            rows.iter().filter(|r| r.finish == Finish::Length).count(),
        ))
}
