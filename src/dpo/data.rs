//! Tokenization as TRL 0.8.5's DPOTrainer does it: BOS + prompt, response + EOS, prompt tokens
//! masked; if prompt + longest response exceeds `max_length`, the prompt is cut to
//! `max_prompt_length` (keep_end keeps its end) and then the responses to
//! `max_length - max_prompt_length`.

use super::config::Loss;
use crate::error::{bail, Context, Result};
use crate::model::load::tokenizer::Tok;
use serde::{Deserialize, Serialize};
use std::path::Path;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Example {
    pub prompt: Vec<u32>,
    pub chosen: Vec<u32>,
    pub rejected: Vec<u32>,
    /// KTO rows: `chosen` holds the completion, `rejected` is empty, `label` says if desirable.
    pub label: Option<bool>,
}

#[derive(Debug, Clone, Copy)]
pub struct Truncation {
    pub max_length: usize,
    pub max_prompt_length: usize,
    pub keep_end: bool,
}

#[derive(Debug, Default, Clone, Copy, Serialize)]
pub struct TruncationReport {
    pub rows: usize,
    pub prompts_cut: usize,
    pub responses_cut: usize,
}

/// Apply TRL's truncation to tokenized parts.
pub fn truncate(mut ex: Example, t: &Truncation, rep: &mut TruncationReport) -> Example {
    rep.rows += 1;
    let longest = ex.chosen.len().max(ex.rejected.len());
    if ex.prompt.len() + longest > t.max_length && ex.prompt.len() > t.max_prompt_length {
        rep.prompts_cut += 1;
        if t.keep_end {
            ex.prompt = ex.prompt[ex.prompt.len() - t.max_prompt_length..].to_vec();
        } else {
            ex.prompt.truncate(t.max_prompt_length);
        }
    }
    let longest = ex.chosen.len().max(ex.rejected.len());
    if ex.prompt.len() + longest > t.max_length {
        rep.responses_cut += 1;
        let keep = t.max_length.saturating_sub(t.max_prompt_length);
        ex.chosen.truncate(keep);
        ex.rejected.truncate(keep);
    }
    ex
}

/// One row's tokens. The prompt is the chat template's rendering, whose markers must stay
/// special tokens; a response is text from a server or a dataset file, and special-token text in
/// it (`<|im_end|>` written out) is neutralized (`specials`, from
/// [`crate::model::load::special_text::special_texts`]) so it never becomes a control token.
pub(crate) fn tokenize(
    tok: &Tok,
    specials: &[String],
    prompt: &str,
    chosen: &str,
    rejected: &str,
) -> Result<Example> {
    let mut p = tok.encode(prompt, false)?;
    if let Some(b) = tok.bos_id {
        // TRL adds BOS to every prompt, whatever the tokenizer's add_bos_token says.
        p.insert(0, b);
    }
    let resp = |s: &str| -> Result<Vec<u32>> {
        let s = crate::model::load::special_text::neutralize(s, specials);
        let mut r = tok.encode(&s, false)?;
        r.push(tok.eos_id);
        Ok(r)
    };
    Ok(Example {
        prompt: p,
        chosen: resp(chosen)?,
        rejected: if rejected.is_empty() {
            vec![]
        } else {
            resp(rejected)?
        },
        label: None,
    })
}

/// A preference (or KTO) dataset from a Parquet file or a folder of them (`train` / `test` by name).
pub struct RawSplits {
    pub train: Vec<RawRow>,
    pub test: Vec<RawRow>,
}

#[derive(Debug, Clone)]
pub struct RawRow {
    pub(crate) prompt: String,
    pub(crate) chosen: String,
    pub(crate) rejected: String,
    pub(crate) label: Option<bool>,
}

/// What a dataset file holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// prompt / chosen / rejected: for the pairwise losses (sigmoid, hinge, ipo, robust).
    Paired,
    /// prompt / completion / label: for KTO.
    Unpaired,
}

impl Kind {
    fn describe(self) -> &'static str {
        match self {
            Kind::Paired => "paired rows (prompt/chosen/rejected)",
            Kind::Unpaired => "unpaired rows (prompt/completion/label)",
        }
    }
}

/// The kind of rows a loss trains on.
fn kind_for_loss(loss: Loss) -> Kind {
    if loss.is_unpaired() {
        Kind::Unpaired
    } else {
        Kind::Paired
    }
}

/// Load a dataset of any kind (files may not mix kinds).
pub fn load_dataset(path: &Path) -> Result<RawSplits> {
    load(path, None)
}

/// Load a dataset for `train.loss = loss`: a file of the other kind is refused by name.
pub fn load_dataset_for(path: &Path, loss: Loss) -> Result<RawSplits> {
    load(path, Some(loss))
}

fn load(path: &Path, loss: Option<Loss>) -> Result<RawSplits> {
    let files = parquet_files(path)?;
    let mut train = Vec::new();
    let mut test = Vec::new();
    let mut first_kind: Option<(Kind, &Path)> = None;
    for f in &files {
        let (rows, kind) = read_rows(f)?;
        if let Some(loss) = loss {
            let want = kind_for_loss(loss);
            if kind != want {
                bail!(
                    "{} holds {}, but train.loss = \"{}\" trains on {}; {}",
                    f.display(),
                    kind.describe(),
                    loss.name(),
                    want.describe(),
                    match want {
                        Kind::Unpaired => "set a pairwise train.loss (sigmoid, hinge, ipo, robust) or give it unpaired data",
                        Kind::Paired => "set train.loss = \"kto\" for unpaired data, or give it paired data",
                    }
                );
            }
        }
        match first_kind {
            Some((k, other)) if k != kind => bail!(
                "{} holds {} but {} holds {}; a dataset must be of one kind",
                f.display(),
                kind.describe(),
                other.display(),
                k.describe()
            ),
            None => first_kind = Some((kind, f)),
            _ => {}
        }
        let name = f.file_name().unwrap().to_string_lossy().to_string();
        if name.starts_with("test") || name.starts_with("validation") || name.starts_with("eval") {
            test.extend(rows);
        } else {
            train.extend(rows);
        }
    }
    if train.is_empty() {
        bail!(
            "train.dataset {}: no training rows (files named test*/validation* are held out)",
            path.display()
        );
    }
    Ok(RawSplits { train, test })
}

/// The Parquet files a dataset path names: the file itself, or every `.parquet` below a folder,
/// sorted. Loading and cache keys both use this list, so they can never disagree.
pub(crate) fn parquet_files(path: &Path) -> Result<Vec<std::path::PathBuf>> {
    let mut files = if path.is_dir() {
        walk_parquet(path)?
    } else if path.is_file() {
        vec![path.to_path_buf()]
    } else {
        bail!("train.dataset {} does not exist", path.display());
    };
    if files.is_empty() {
        bail!("train.dataset {} holds no .parquet file", path.display());
    }
    files.sort();
    Ok(files)
}

fn walk_parquet(dir: &Path) -> Result<Vec<std::path::PathBuf>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let p = e?.path();
        if p.is_dir() {
            out.extend(walk_parquet(&p)?);
        } else if p.extension().is_some_and(|x| x == "parquet") {
            out.push(p);
        }
    }
    Ok(out)
}

/// Every row of a file, and its kind. A null or empty (or blank) text, or a null label, is an
/// error naming the file, the row (counted from 0, as pandas and pyarrow count) and the column.
fn read_rows(path: &Path) -> Result<(Vec<RawRow>, Kind)> {
    use arrow_array::cast::AsArray;
    use arrow_array::Array;
    let f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let builder = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(f)
        .with_context(|| format!("{}: not a Parquet file", path.display()))?;
    let has = |c: &str| builder.schema().column_with_name(c).is_some();
    let kind = if has("chosen") && has("rejected") {
        Kind::Paired
    } else if has("completion") {
        Kind::Unpaired
    } else {
        bail!(
            "{}: expected columns prompt/chosen/rejected (DPO) or prompt/completion/label (KTO)",
            path.display()
        );
    };
    let mut out = Vec::new();
    for batch in builder.build()? {
        let batch = batch?;
        let base = out.len();
        let strings = |name: &str| -> Result<Vec<String>> {
            let v = string_column(&batch, name, path)?
                .with_context(|| format!("{}: no `{name}` column", path.display()))?;
            // string_column reads a null as "": both are refused here.
            if let Some(i) = v.iter().position(|s| s.trim().is_empty()) {
                bail!(
                    "{}: row {}: `{name}` is empty or null; every row needs a non-empty {name} \
                     (drop or fix that row)",
                    path.display(),
                    base + i
                );
            }
            Ok(v)
        };
        let prompt = strings("prompt")?;
        match kind {
            Kind::Paired => {
                let (c, r) = (strings("chosen")?, strings("rejected")?);
                for i in 0..prompt.len() {
                    out.push(RawRow {
                        prompt: prompt[i].clone(),
                        chosen: c[i].clone(),
                        rejected: r[i].clone(),
                        label: None,
                    });
                }
            }
            Kind::Unpaired => {
                let comp = strings("completion")?;
                let label = batch.column_by_name("label").with_context(|| {
                    format!(
                        "{}: KTO data needs a boolean `label` column",
                        path.display()
                    )
                })?;
                let label = label
                    .as_boolean_opt()
                    .with_context(|| format!("{}: `label` must be boolean", path.display()))?;
                for i in 0..prompt.len() {
                    if !label.is_valid(i) {
                        bail!(
                            "{}: row {}: `label` is null; every KTO row needs true (desirable) \
                             or false (undesirable)",
                            path.display(),
                            base + i
                        );
                    }
                    out.push(RawRow {
                        prompt: prompt[i].clone(),
                        chosen: comp[i].clone(),
                        rejected: String::new(),
                        label: Some(label.value(i)),
                    });
                }
            }
        }
    }
    Ok((out, kind))
}

/// A column of `Utf8` or `LargeUtf8` strings (nulls read as ""); `None` if the batch lacks it.
pub(crate) fn string_column(
    batch: &arrow_array::RecordBatch,
    name: &str,
    path: &Path,
) -> Result<Option<Vec<String>>> {
    use arrow_array::cast::AsArray;
    let Some(c) = batch.column_by_name(name) else {
        return Ok(None);
    };
    if let Some(s) = c.as_string_opt::<i32>() {
        return Ok(Some(
            s.iter().map(|v| v.unwrap_or("").to_string()).collect(),
        ));
    }
    if let Some(s) = c.as_string_opt::<i64>() {
        return Ok(Some(
            s.iter().map(|v| v.unwrap_or("").to_string()).collect(),
        ));
    }
    bail!("{}: column `{name}` is not a string column", path.display())
}
