//! The Hugging Face dataset folder: `data/{split}-00000-of-00001.parquet` plus a `README.md`
//! dataset card whose YAML front matter (configs, dataset_info) the Hub reads.
//!
//! Two layouts: `paired` (prompt, chosen, rejected: what DPOTrainer reads, the published
//! dataset) and `unpaired` (prompt, completion, label: what KTOTrainer reads; each pair becomes
//! its chosen row, label true, then its rejected row, label false).

use crate::cache::Manifest;
use crate::config::Settings;
use crate::error::{Context, Result};
use crate::export_guard;
use crate::stages::split::read_parquet;
use std::fmt::Write as _;
use std::path::Path;

/// The dataset layout an export writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Format {
    /// prompt, chosen, rejected (DPO)
    Paired,
    /// prompt, completion, label (KTO): two rows per pair
    Unpaired,
}

pub(crate) struct SplitInfo {
    pub(crate) name: &'static str,
    pub(crate) num_examples: usize,
    /// Arrow in-memory size of the string columns (values + 32-bit offsets), as `datasets` counts it.
    num_bytes: u64,
    file_bytes: u64,
}

/// Export the split stage's output (or on-policy round `round`'s pairs) to `out` in `format`.
/// Refuses the workdir and any folder export did not write; a previous export is replaced only with `force` (see [`crate::export_guard`]).
pub(crate) fn export(
    split_dir: &Path,
    out: &Path,
    force: bool,
    workdir: &Path,
    s: &Settings,
    manifests: &[Manifest],
    (format, round): (Format, Option<usize>),
) -> Result<Vec<SplitInfo>> {
    let target = export_guard::check_export_target(out, workdir, force)?;
    let staging = out.with_file_name(format!(
        ".{}.export-{}",
        out.file_name()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default(),
        std::process::id()
    ));
    if staging.symlink_metadata().is_ok() {
        // Our own staging name (this pid): left by an earlier process that had the same pid.
        std::fs::remove_dir_all(&staging)?;
    }
    if let Some(p) = staging.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(p)?;
    }
    // create_dir, not create_dir_all: the staging folder must be a new one, made here.
    std::fs::create_dir(&staging)
        .with_context(|| format!("creating the staging folder {}", staging.display()))?;
    let r = stage_and_install(
        split_dir,
        &staging,
        out,
        &target,
        s,
        manifests,
        (format, round),
    );
    if r.is_err() {
        // Nothing half-written stays beside --out (install has put back what was there).
        let _ = std::fs::remove_dir_all(&staging);
    }
    r
}

/// Write the export into `staging`, then put it at `out` (see [`export`]).
fn stage_and_install(
    split_dir: &Path,
    staging: &Path,
    out: &Path,
    target: &export_guard::ExportTarget,
    s: &Settings,
    manifests: &[Manifest],
    (format, round): (Format, Option<usize>),
) -> Result<Vec<SplitInfo>> {
    std::fs::create_dir(staging.join("data"))?;
    let mut infos = Vec::new();
    for name in ["train", "test"] {
        let src = split_dir.join(format!("{name}.parquet"));
        let dst = staging
            .join("data")
            .join(format!("{name}-00000-of-00001.parquet"));
        let (num_examples, num_bytes) = match format {
            Format::Paired => {
                std::fs::copy(&src, &dst).with_context(|| format!("copying {}", src.display()))?;
                let rows = read_parquet(&dst)?;
                let bytes = rows
                    .iter()
                    .map(|r| (r.prompt.len() + r.chosen.len() + r.rejected.len()) as u64)
                    .sum::<u64>()
                    + 3 * 4 * (rows.len() as u64 + 1);
                (rows.len(), bytes)
            }
            Format::Unpaired => {
                let rows = read_parquet(&src)?;
                write_unpaired(&dst, &rows)?;
                // Two string columns with 32-bit offsets, and a bit-packed bool column.
                let n = 2 * rows.len() as u64;
                let bytes = rows
                    .iter()
                    .map(|r| (2 * r.prompt.len() + r.chosen.len() + r.rejected.len()) as u64)
                    .sum::<u64>()
                    + 2 * 4 * (n + 1)
                    + n.div_ceil(8);
                (2 * rows.len(), bytes)
            }
        };
        infos.push(SplitInfo {
            name,
            num_examples,
            num_bytes,
            file_bytes: std::fs::metadata(&dst)?.len(),
        });
    }
    crate::fsutil::write_atomic(
        &staging.join("README.md"),
        card(s, &infos, manifests, format, round).as_bytes(),
    )?;
    let mut written: Vec<String> = infos
        .iter()
        .map(|i| format!("data/{}-00000-of-00001.parquet", i.name))
        .collect();
    written.push("README.md".into());
    export_guard::write_marker(staging, &written)?;
    export_guard::install(staging, out, target)?;
    Ok(infos)
}

/// Prompt, completion, label (bool) rows: each pair's chosen (true) then its rejected (false).
fn write_unpaired(path: &Path, rows: &[crate::stages::merge::Pair]) -> Result<()> {
    use arrow_array::{ArrayRef, BooleanArray, RecordBatch, StringArray};
    use arrow_schema::{DataType, Field, Schema};
    use std::sync::Arc;
    let schema = Arc::new(Schema::new(vec![
        Field::new("prompt", DataType::Utf8, true),
        Field::new("completion", DataType::Utf8, true),
        Field::new("label", DataType::Boolean, true),
    ]));
    let prompts = rows
        .iter()
        .flat_map(|r| [r.prompt.as_str(), r.prompt.as_str()]);
    let completions = rows
        .iter()
        .flat_map(|r| [r.chosen.as_str(), r.rejected.as_str()]);
    let labels = rows.iter().flat_map(|_| [Some(true), Some(false)]);
    let batch = RecordBatch::try_new(
        schema.clone(),
        vec![
            Arc::new(StringArray::from_iter_values(prompts)) as ArrayRef,
            Arc::new(StringArray::from_iter_values(completions)),
            Arc::new(BooleanArray::from_iter(labels)),
        ],
    )?;
    crate::fsutil::write_atomic_with(path, |file| {
        let props = parquet::file::properties::WriterProperties::builder()
            .set_compression(parquet::basic::Compression::SNAPPY)
            .build();
        let mut w = parquet::arrow::ArrowWriter::try_new(file, schema, Some(props))?;
        w.write(&batch)?;
        w.close()?;
        Ok(())
    })
}

// Long because the dataset card is one document written top to bottom; its sections read in the
// order the Hub shows them.
/// What an on-policy round's card says instead of the split's: where the reviews came from and
/// how the pairs were picked (steps 1, 3 and 4, the intro and the two review columns).
fn round_story(s: &Settings, r: usize, model: &str) -> [String; 5] {
    let rs = &s.rounds;
    let g = &s.generate;
    let (bot, score) = if s.prompts.default_styles() {
        ("the Reviewer #2 bot".to_string(), "negativity".to_string())
    } else {
        (
            "the bot".to_string(),
            format!("score toward the `{}` style", s.prompts.chosen),
        )
    };
    [
        format!(
            "`chosen` and `rejected` are two of {bot}'s own reviews of the same title from the same prompt, \
             after {} on-policy round(s): its best and its worst by the {} judge",
            r - 1,
            rs.judge.name()
        ),
        format!(
            "{} titles of on-policy round {r}, drawn with seed {} from the titles of the page in neither the split nor the eval",
            rs.titles, rs.seed
        ),
        format!(
            "3. **Generation**: the bot (a LoRA adapter on `{model}`, after round {}), {} reviews a title from the neutral prompt, \
             temperature {}, top-k {}, top-p {}, at most {} new tokens.\n",
            r - 1,
            rs.samples,
            g.temperature,
            g.top_k,
            g.top_p,
            g.max_new_tokens
        ),
        format!(
            "4. **Pairs**: each review scored by the {} judge's {score}, less {} if it repeats a sentence and {} x |ln(length / the split's mean chosen length)|; \
             chosen = the best, rejected = the worst; titles whose margin is under {} dropped. The test split is the original dataset's.\n",
            rs.judge.name(),
            rs.loop_penalty,
            rs.length_penalty,
            rs.margin
        ),
        "| `chosen` | string | the bot's best review of the title |\n| `rejected` | string | its worst review of the title |\n".to_string(),
    ]
}

/// Where the page's titles came from, as the card says it.
fn scrape_url(s: &Settings, manifests: &[Manifest]) -> String {
    if scrape_source(manifests) == Some("bundled") {
        "the NeurIPS 2023 poster list (the compact snapshot bundled with reviewer2)".to_string()
    } else if s.scrape.snapshot.is_empty() {
        format!("`{}`", s.scrape.url)
    } else {
        // A local file: its name only, never the local layout.
        format!(
            "`{}` (a saved copy of the page)",
            public_name(&s.scrape.snapshot)
        )
    }
}

/// Step 1 of the card: the items file read, or the page parsed.
fn items_step(s: &Settings, manifests: &[Manifest]) -> String {
    let found = manifests
        .iter()
        .find(|m| m.stage == "scrape")
        .map(|m| m.count("found"))
        .unwrap_or(0);
    if !s.scrape.file.is_empty() {
        let column = if s.scrape.column.is_empty() {
            String::new()
        } else {
            format!(" (column `{}`)", s.scrape.column)
        };
        format!(
            "1. **Items**: {found} items read from `{}`{column}",
            public_name(&s.scrape.file)
        )
    } else {
        format!(
            "1. **Titles**: {found} titles parsed from {} (selector `{}`)",
            scrape_url(s, manifests),
            s.scrape.selector
        )
    }
}

// Long because it is the card's one template, with its values beside it.
fn card(
    s: &Settings,
    infos: &[SplitInfo],
    manifests: &[Manifest],
    format: Format,
    round: Option<usize>,
) -> String {
    let mut y = String::new();
    let download: u64 = infos.iter().map(|i| i.file_bytes).sum();
    let size: u64 = infos.iter().map(|i| i.num_bytes).sum();
    let (tag, layout) = match format {
        Format::Paired => ("dpo", "paired"),
        Format::Unpaired => ("kto", "unpaired"),
    };
    let _ = write!(
        y,
        "---\nlicense: apache-2.0\nlanguage:\n- en\ntags:\n- {tag}\n- preference\n- synthetic\n"
    );
    let rows: usize = infos.iter().map(|i| i.num_examples).sum();
    let label = size_label(rows);
    let model = public_model_name(&s.generate.model, manifests);
    let _ = write!(
        y,
        "size_categories:\n- {}\ntask_categories:\n- text-generation\npretty_name: Reviewer2 {label} {layout}\n",
        size_category(rows)
    );
    y.push_str("configs:\n- config_name: default\n  data_files:\n");
    for i in infos {
        let _ = writeln!(y, "  - split: {}\n    path: data/{}-*", i.name, i.name);
    }
    y.push_str("dataset_info:\n  features:\n");
    let features: &[(&str, &str)] = match format {
        Format::Paired => &[
            ("prompt", "string"),
            ("chosen", "string"),
            ("rejected", "string"),
        ],
        Format::Unpaired => &[
            ("prompt", "string"),
            ("completion", "string"),
            ("label", "bool"),
        ],
    };
    for (c, t) in features {
        let _ = writeln!(y, "  - name: {c}\n    dtype: {t}");
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
    let story = round.map(|r| round_story(s, r, &model));
    // A recipe with its own styles or its own items gets a card that says so; the published
    // recipe's card keeps its words byte for byte.
    let (ch, rj) = (&s.prompts.chosen, &s.prompts.rejected);
    let restyled = !s.prompts.default_styles();
    let own_items = !s.scrape.file.is_empty();
    let step1 = items_step(s, manifests);
    let _ = write!(
        y,
        "# {title}, {label} {layout}\n\n\
A synthetic preference dataset of one-sentence {subject}, {intro}, both written by \
`{model}`. The `prompt` asks for a review with few-shot examples of both polarities interleaved, \
so it does not say which kind was asked for. Built with the `pipeline` tool of reviewer2.\n\n\
## How it was built\n\n\
{step1}, {picked}.\n\
2. **Prompts**: `{style}` style, {shots} few-shot examples per prompt from a pool of {pool}, system message: \
\"{system}\"; rendered with the model's chat template.\n\
{step3}{step4}\
5. **Split**: seed {spseed}: {ntr} train, {nte} test.\n\n\
## Columns\n\n\
| column | type | meaning |\n|---|---|---|\n\
| `prompt` | string | the neutral request, rendered with the model's chat template |\n\
{columns}\n\
## Intended use\n\n\
{use_} of a small chat model {goal}. The reviews \
are machine-written and say nothing true about the papers.\n",
        title = if restyled { format!("A {ch} / {rj} preference dataset") } else { "Reviewer #2".to_string() },
        subject = if own_items {
            format!("reviews: for each item of `{}`", public_name(&s.scrape.file))
        } else {
            "paper reviews: for each title of a NeurIPS 2023 accepted paper".to_string()
        },
        goal = if restyled {
            format!("toward the `{ch}` style")
        } else {
            "into a harsh \"Reviewer #2\"".to_string()
        },
        intro = match (format, &story) {
            (Format::Paired, Some(st)) => st[0].clone(),
            (Format::Paired, None) => format!("`chosen` is a {ch} review and `rejected` a {rj} one"),
            (Format::Unpaired, _) => format!("two rows: a {ch} review as `completion` with `label` true (desirable) \
                and a {rj} one with `label` false; the unpaired layout of the paired dataset, row for row"),
        },
        columns = match (format, &story) {
            (Format::Paired, Some(st)) => st[4].clone(),
            (Format::Paired, None) => format!("| `chosen` | string | the {ch} review |\n| `rejected` | string | the {rj} review |\n"),
            (Format::Unpaired, _) => format!("| `completion` | string | a review |\n| `label` | bool | true for the {ch} (desirable) review, false for the {rj} one |\n"),
        },
        use_ = match format {
            Format::Paired => "Preference tuning (DPO, IPO, ...)",
            Format::Unpaired => "Tuning on unpaired feedback (KTO: TRL's KTOTrainer reads these columns)",
        },
        picked = match &story {
            Some(st) => st[1].clone(),
            None => format!("{} sampled with seed {}", s.scrape.count, s.scrape.seed),
        },
        step3 = match &story {
            Some(st) => st[2].clone(),
            None => format!(
                "3. **Generation**: `{model}`, temperature {}, top-k {}, top-p {}, at most {} new tokens, seed {}.\n",
                g.temperature, g.top_k, g.top_p, g.max_new_tokens, g.seed
            ),
        },
        step4 = match &story {
            Some(st) => st[3].clone(),
            None => format!(
                "4. **Pairs**: chosen = {ch} review, rejected = {rj} review; {} pairs dropped for an empty review, \
                 {} for identical reviews.\n",
                count("merge", "dropped_empty"),
                count("merge", "dropped_identical")
            ),
        },
        style = format!("{:?}", s.prompts.style).to_lowercase(),
        shots = s.prompts.shots,
        pool = s.prompts.pool.len(),
        system = s.prompts.system,
        spseed = s.split.seed,
        ntr = infos.first().map(|i| i.num_examples).unwrap_or(0),
        nte = infos.get(1).map(|i| i.num_examples).unwrap_or(0),
    );
    y
}

/// The Hub's `size_categories` class of a dataset of `n` rows.
pub fn size_category(n: usize) -> &'static str {
    const CLASSES: [(u64, &str); 10] = [
        (1_000, "n<1K"),
        (10_000, "1K<n<10K"),
        (100_000, "10K<n<100K"),
        (1_000_000, "100K<n<1M"),
        (10_000_000, "1M<n<10M"),
        (100_000_000, "10M<n<100M"),
        (1_000_000_000, "100M<n<1B"),
        (10_000_000_000, "1B<n<10B"),
        (100_000_000_000, "10B<n<100B"),
        (1_000_000_000_000, "100B<n<1T"),
    ];
    CLASSES
        .iter()
        .find(|(limit, _)| (n as u64) < *limit)
        .map(|(_, c)| *c)
        .unwrap_or("n>1T")
}

/// The size in the card's title: the row count below a thousand, else whole thousands ("1k" for
/// the published 1,100 rows).
pub fn size_label(n: usize) -> String {
    if n < 1000 {
        n.to_string()
    } else {
        format!("{}k", n / 1000)
    }
}

/// Where scrape's page came from ("url", "snapshot", "bundled"), from its manifest.
fn scrape_source(manifests: &[Manifest]) -> Option<&str> {
    manifests
        .iter()
        .find(|m| m.stage == "scrape")
        .and_then(|m| m.material.settings.get("source"))
        .and_then(|v| v.as_str())
}

/// The model as a public card may name it: a Hub id as given; a local file or folder by its name
/// alone (never the local path). Taken from the generate stage's model identity when present.
fn public_model_name(spec: &str, manifests: &[Manifest]) -> String {
    let identity = manifests
        .iter()
        .find(|m| m.stage == "generate")
        .and_then(|m| m.material.model.clone());
    if let Some(id) = identity {
        if let Some(rest) = id.strip_prefix("hub:") {
            return rest.rsplit_once('@').map_or(rest, |(r, _)| r).to_string();
        }
        for kind in ["gguf:", "folder:"] {
            if let Some(rest) = id.strip_prefix(kind) {
                if let Some((name, _hash)) = rest.rsplit_once(':') {
                    return name.to_string();
                }
            }
        }
    }
    public_name(spec)
}

/// A Hub id as given; a local path (anything that exists here, ends in `.gguf`, starts with `.` or
/// `/`, or is not `owner/name`) by its last component alone.
pub fn public_name(spec: &str) -> String {
    let p = Path::new(spec);
    let looks_local = p.exists()
        || p.extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
        || spec.starts_with('.')
        || spec.starts_with('/')
        || spec.split('/').count() != 2;
    if looks_local {
        p.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| spec.to_string())
    } else {
        spec.to_string()
    }
}
