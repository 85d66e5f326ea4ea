//! Stage 5, split: a seeded train/test split written as Parquet with Arrow `Utf8` columns
//! `prompt`, `chosen`, `rejected`. The same settings give byte-identical files.

use super::merge::Pair;
use super::{Built, Ctx};
use crate::cache::KeyMaterial;
use crate::error::{Context, Result};
use crate::fsutil::{read_jsonl, write_atomic_with};
use arrow_array::{ArrayRef, RecordBatch, StringArray};
use arrow_schema::{DataType, Field, Schema};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

const VERSION: u32 = 1;
const COLUMNS: [&str; 3] = ["prompt", "chosen", "rejected"];

pub(crate) fn material(ctx: &Ctx, merge_key: &str) -> Result<KeyMaterial> {
    Ok(KeyMaterial {
        stage: "split".into(),
        version: VERSION,
        settings: serde_json::to_value(&ctx.settings().split)?,
        files: BTreeMap::new(),
        model: None,
        inputs: BTreeMap::from([("merge".to_string(), merge_key.to_string())]),
    })
}

pub(crate) fn build(ctx: &Ctx, merge_dir: &Path, out: &Path) -> Result<Built> {
    let s = &ctx.settings().split;
    let pairs: Vec<Pair> = read_jsonl(&merge_dir.join("pairs.jsonl"))?;
    let (n_train, n_test) = sizes(s, pairs.len()).ok_or_else(|| {
        crate::error::err!(
            "merge kept {} pairs but split asks for {} train + {} test; lower split.train / split.test ({}), raise scrape.count, or set split.shrink = true to take the {} that survived",
            pairs.len(),
            s.train,
            s.test,
            ctx.loaded.origin("split.train"),
            pairs.len()
        )
    })?;
    if (n_train, n_test) != (s.train, s.test) {
        ctx.say(
            "Shrunk",
            format!(
                "the split to {n_train} train + {n_test} test: merge kept {} pairs, fewer than the {} + {} asked for (split.shrink)",
                pairs.len(),
                s.train,
                s.test
            ),
        );
    }
    let idx = crate::rng::permutation(pairs.len(), &mut crate::rng::seeded(s.seed));
    let train: Vec<&Pair> = idx[..n_train].iter().map(|&i| &pairs[i]).collect();
    let test: Vec<&Pair> = idx[n_train..n_train + n_test]
        .iter()
        .map(|&i| &pairs[i])
        .collect();
    write_parquet(&out.join("train.parquet"), &train)?;
    write_parquet(&out.join("test.parquet"), &test)?;
    Ok(Built::new("train", train.len()).with("test", test.len()))
}

/// (train, test) sizes for `n` pairs: as asked when there are enough; with `shrink`, both sides
/// scaled by the same factor (test rounded, at least one of each when n >= 2); otherwise `None`.
fn sizes(s: &crate::config::SplitSettings, n: usize) -> Option<(usize, usize)> {
    let want = s.train + s.test;
    if n >= want {
        return Some((s.train, s.test));
    }
    if !s.shrink || n == 0 {
        return None;
    }
    let mut test = ((n * s.test) as f64 / want as f64).round() as usize;
    if s.test > 0 && n >= 2 {
        test = test.clamp(1, n - 1);
    }
    Some((n - test, test))
}

fn schema() -> Arc<Schema> {
    Arc::new(Schema::new(
        COLUMNS
            .iter()
            .map(|c| Field::new(*c, DataType::Utf8, true))
            .collect::<Vec<_>>(),
    ))
}

/// Write pairs as Parquet (snappy), atomically.
pub(crate) fn write_parquet(path: &Path, rows: &[&Pair]) -> Result<()> {
    let col = |f: fn(&Pair) -> &str| -> ArrayRef {
        Arc::new(StringArray::from_iter_values(rows.iter().map(|p| f(p))))
    };
    let batch = RecordBatch::try_new(
        schema(),
        vec![col(|p| &p.prompt), col(|p| &p.chosen), col(|p| &p.rejected)],
    )?;
    write_atomic_with(path, |file| {
        let props = parquet::file::properties::WriterProperties::builder()
            .set_compression(parquet::basic::Compression::SNAPPY)
            .build();
        let mut w = parquet::arrow::ArrowWriter::try_new(file, schema(), Some(props))?;
        w.write(&batch)?;
        w.close()?;
        Ok(())
    })
}

/// Read a preference Parquet file (any string columns named prompt/chosen/rejected).
pub(crate) fn read_parquet(path: &Path) -> Result<Vec<Pair>> {
    let f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(f)
        .with_context(|| format!("{}: not a Parquet file", path.display()))?
        .build()?;
    let mut out = Vec::new();
    for batch in reader {
        let batch = batch?;
        let get = |name: &str| -> Result<Vec<String>> {
            crate::dpo::data::string_column(&batch, name, path)?.with_context(|| {
                format!(
                    "{}: no column `{name}` (a preference set needs prompt, chosen, rejected)",
                    path.display()
                )
            })
        };
        let (p, c, r) = (get("prompt")?, get("chosen")?, get("rejected")?);
        for ((prompt, chosen), rejected) in p.into_iter().zip(c).zip(r) {
            out.push(Pair {
                title_id: out.len(),
                title: String::new(),
                prompt,
                chosen,
                rejected,
            });
        }
    }
    Ok(out)
}
