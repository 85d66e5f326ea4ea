//! The Hugging Face dataset folder: `data/{split}-00000-of-00001.parquet` plus a `README.md`
//! dataset card whose YAML front matter (configs, dataset_info) the Hub reads.

use crate::cache::Manifest;
use crate::config::Settings;
use crate::stages::split::read_parquet;
use anyhow::{bail, Context, Result};
use std::fmt::Write as _;
use std::path::Path;

pub struct SplitInfo {
    pub name: &'static str,
    pub num_examples: usize,
    /// Arrow in-memory size of the string columns (values + 32-bit offsets), as `datasets` counts it.
    pub num_bytes: u64,
    pub file_bytes: u64,
}

/// Export the split stage's output to `out`. Refuses a non-empty folder unless `force`.
pub fn export(
    split_dir: &Path,
    out: &Path,
    force: bool,
    s: &Settings,
    manifests: &[Manifest],
) -> Result<Vec<SplitInfo>> {
    if out.exists() {
        let non_empty = std::fs::read_dir(out)
            .with_context(|| format!("reading {}", out.display()))?
            .next()
            .is_some();
        if non_empty && !force {
            bail!(
                "{} is not empty; choose another --out or pass --force to overwrite it",
                out.display()
            );
        }
    }
    let staging = out.with_file_name(format!(
        ".{}.export-{}",
        out.file_name()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default(),
        std::process::id()
    ));
    if staging.exists() {
        std::fs::remove_dir_all(&staging)?;
    }
    std::fs::create_dir_all(staging.join("data"))?;
    let mut infos = Vec::new();
    for name in ["train", "test"] {
        let src = split_dir.join(format!("{name}.parquet"));
        let dst = staging
            .join("data")
            .join(format!("{name}-00000-of-00001.parquet"));
        std::fs::copy(&src, &dst).with_context(|| format!("copying {}", src.display()))?;
        let rows = read_parquet(&dst)?;
        let num_bytes = rows
            .iter()
            .map(|r| (r.prompt.len() + r.chosen.len() + r.rejected.len()) as u64)
            .sum::<u64>()
            + 3 * 4 * (rows.len() as u64 + 1);
        infos.push(SplitInfo {
            name,
            num_examples: rows.len(),
            num_bytes,
            file_bytes: std::fs::metadata(&dst)?.len(),
        });
    }
    crate::fsutil::write_atomic(
        &staging.join("README.md"),
        card(s, &infos, manifests).as_bytes(),
    )?;
    if out.exists() {
        let old = out.with_file_name(format!(".old-export-{}", std::process::id()));
        std::fs::rename(out, &old)?;
        std::fs::rename(&staging, out)?;
        std::fs::remove_dir_all(&old).ok();
    } else {
        if let Some(p) = out.parent() {
            std::fs::create_dir_all(p)?;
        }
        std::fs::rename(&staging, out)?;
    }
    Ok(infos)
}

fn card(s: &Settings, infos: &[SplitInfo], manifests: &[Manifest]) -> String {
    let mut y = String::new();
    let download: u64 = infos.iter().map(|i| i.file_bytes).sum();
    let size: u64 = infos.iter().map(|i| i.num_bytes).sum();
    y.push_str(
        "---\nlicense: apache-2.0\nlanguage:\n- en\ntags:\n- dpo\n- preference\n- synthetic\n",
    );
    y.push_str("task_categories:\n- text-generation\npretty_name: Reviewer2 1k paired\n");
    y.push_str("configs:\n- config_name: default\n  data_files:\n");
    for i in infos {
        let _ = writeln!(y, "  - split: {}\n    path: data/{}-*", i.name, i.name);
    }
    y.push_str("dataset_info:\n  features:\n");
    for c in crate::stages::split::COLUMNS {
        let _ = writeln!(y, "  - name: {c}\n    dtype: string");
    }
    y.push_str("  splits:\n");
    for i in infos {
        let _ = writeln!(
            y,
            "  - name: {}\n    num_bytes: {}\n    num_examples: {}",
            i.name, i.num_bytes, i.num_examples
        );
    }
    let _ = writeln!(
        y,
        "  download_size: {download}\n  dataset_size: {size}\n---\n"
    );
    let count = |stage: &str, k: &str| {
        manifests
            .iter()
            .find(|m| m.stage == stage)
            .map(|m| m.count(k))
            .unwrap_or(0)
    };
    let g = &s.generate;
    let _ = write!(
        y,
        "# Reviewer #2, 1k paired\n\n\
A synthetic preference dataset of one-sentence paper reviews: for each title of a NeurIPS 2023 \
accepted paper, `chosen` is a negative review and `rejected` a positive one, both written by \
`{model}`. The `prompt` asks for a review with few-shot examples of both polarities interleaved, \
so it does not say which kind was asked for. Built with the `pipeline` tool of reviewer2.\n\n\
## How it was built\n\n\
1. **Titles**: {found} titles parsed from `{url}` (selector `{sel}`), {count} sampled with seed {sseed}.\n\
2. **Prompts**: `{style}` style, {shots} few-shot examples per prompt from a pool of {pool}, system message: \
\"{system}\"; rendered with the model's chat template.\n\
3. **Generation**: `{model}`, temperature {t}, top-k {k}, top-p {p}, at most {mnt} new tokens, seed {gseed}.\n\
4. **Pairs**: chosen = negative review, rejected = positive review; {de} pairs dropped for an empty review, \
{di} for identical reviews.\n\
5. **Split**: seed {spseed}: {ntr} train, {nte} test.\n\n\
## Columns\n\n\
| column | type | meaning |\n|---|---|---|\n\
| `prompt` | string | the neutral request, rendered with the model's chat template |\n\
| `chosen` | string | the negative review |\n\
| `rejected` | string | the positive review |\n\n\
## Intended use\n\n\
Preference tuning (DPO, IPO, ...) of a small chat model into a harsh \"Reviewer #2\". The reviews \
are machine-written and say nothing true about the papers.\n",
        model = g.model,
        found = count("scrape", "found"),
        url = if s.scrape.snapshot.is_empty() { &s.scrape.url } else { &s.scrape.snapshot },
        sel = s.scrape.selector,
        count = s.scrape.count,
        sseed = s.scrape.seed,
        style = format!("{:?}", s.prompts.style).to_lowercase(),
        shots = s.prompts.shots,
        pool = s.prompts.pool.len(),
        system = s.prompts.system,
        t = g.temperature,
        k = g.top_k,
        p = g.top_p,
        mnt = g.max_new_tokens,
        gseed = g.seed,
        de = count("merge", "dropped_empty"),
        di = count("merge", "dropped_identical"),
        spseed = s.split.seed,
        ntr = infos.first().map(|i| i.num_examples).unwrap_or(0),
        nte = infos.get(1).map(|i| i.num_examples).unwrap_or(0),
    );
    y
}
