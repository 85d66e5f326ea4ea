//! Items from a file (`scrape.file`): a user's own list instead of a page. Owns the bounded read
//! and the parsing of every format it takes (`.txt` one item a line; `.csv` / `.tsv` a column by
//! its header, RFC 4180 quoting; `.jsonl` / `.json` a field of each object; `.parquet` a string
//! column), folded and de-duplicated as page titles are. Every refusal names the file, and the
//! line (1-based, as an editor shows it), element or row and the column.

use crate::config::ItemFormat;
use crate::error::{bail, Context, Result};
use std::collections::HashSet;
use std::io::Read;
use std::path::Path;

/// The items of a file in file order, folded (whitespace runs to one space) and de-duplicated.
#[derive(Debug)]
pub struct Items {
    pub items: Vec<String>,
    pub duplicates: usize,
    /// Empty or null values (blank lines of a `.txt` are not items and not counted).
    pub empty: usize,
}

#[derive(Default)]
struct Collect {
    seen: HashSet<String>,
    out: Vec<String>,
    duplicates: usize,
    empty: usize,
}

impl Collect {
    fn push(&mut self, raw: &str) {
        let folded = raw.split_whitespace().collect::<Vec<_>>().join(" ");
        if folded.is_empty() {
            self.empty += 1;
        } else if self.seen.insert(folded.clone()) {
            self.out.push(folded);
        } else {
            self.duplicates += 1;
        }
    }

    fn done(self, label: &str) -> Result<Items> {
        if self.out.is_empty() {
            bail!(
                "{label} holds no items ({} empty values); scrape.file must name a file with at \
                 least scrape.count distinct non-empty items",
                self.empty
            );
        }
        Ok(Items {
            items: self.out,
            duplicates: self.duplicates,
            empty: self.empty,
        })
    }
}

/// The file's bytes, at most `max` of them: a larger file is refused before it is read whole.
pub(crate) fn read_bounded(path: &Path, max: u64) -> Result<Vec<u8>> {
    let what = || {
        format!(
            "scrape.file {} cannot be read; fix the path (relative paths resolve against the \
             recipe's folder)",
            path.display()
        )
    };
    let f = std::fs::File::open(path).with_context(what)?;
    let mut bytes = Vec::new();
    f.take(max.saturating_add(1))
        .read_to_end(&mut bytes)
        .with_context(what)?;
    if bytes.len() as u64 > max {
        bail!(
            "scrape.file {} is over scrape.max_file_bytes ({max} bytes); raise the setting or \
             trim the file",
            path.display()
        );
    }
    Ok(bytes)
}

/// Parse `bytes` as `format`, the items in `column` (ignored for `.txt`). `label` names the
/// file in errors.
pub(crate) fn parse_items(
    bytes: &[u8],
    format: ItemFormat,
    column: &str,
    label: &str,
) -> Result<Items> {
    let mut c = Collect::default();
    match format {
        ItemFormat::Parquet => parquet_items(bytes, column, label, &mut c)?,
        _ => {
            let text = utf8(bytes, label)?;
            match format {
                ItemFormat::Txt => text
                    .lines()
                    .filter(|l| !l.trim().is_empty())
                    .for_each(|l| c.push(l)),
                ItemFormat::Csv => delimited(text, b',', column, label, &mut c)?,
                ItemFormat::Tsv => delimited(text, b'\t', column, label, &mut c)?,
                ItemFormat::Jsonl => jsonl_items(text, column, label, &mut c)?,
                ItemFormat::Json => json_items(text, column, label, &mut c)?,
                ItemFormat::Parquet => unreachable!("read above"),
            }
        }
    }
    c.done(label)
}

/// The text without a byte-order mark; invalid UTF-8 is refused at its line.
fn utf8<'a>(bytes: &'a [u8], label: &str) -> Result<&'a str> {
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
    std::str::from_utf8(bytes).map_err(|e| {
        let line = bytes[..e.valid_up_to()]
            .iter()
            .filter(|&&b| b == b'\n')
            .count()
            + 1;
        crate::error::err!(
            "{label}: line {line}: not UTF-8 text (byte {}); save the file as UTF-8",
            e.valid_up_to()
        )
    })
}

/// Appended after the text before parsing: a last record of its own when every quoted field
/// is closed, swallowed into a field when one is not (the csv crate ends an open quoted field at
/// the end of input without a word, and a file whose quote never closes would silently become
/// one long item).
const SENTINEL: &str = "\u{1}reviewer2 end of file\u{1}";

/// Records of RFC 4180 text (the csv crate): fields split at `delim`, a quoted field may hold the
/// delimiter, line ends and `""` for a quote. Each record comes with the line it starts on; blank
/// lines give no record (as Python's csv.DictReader skips them).
fn records(text: &str, delim: u8, label: &str) -> Result<Vec<(usize, Vec<String>)>> {
    let guarded = format!("{text}\n{SENTINEL}");
    let mut reader = csv::ReaderBuilder::new()
        .delimiter(delim)
        .has_headers(false)
        .flexible(true)
        .from_reader(guarded.as_bytes());
    let mut out = Vec::new();
    for rec in reader.records() {
        // The input is a &str already checked as UTF-8, so the reader has nothing to refuse.
        let rec = rec.map_err(|e| crate::error::err!("{label}: {e}"))?;
        let line = rec.position().map_or(0, |p| p.line() as usize);
        out.push((line, rec.iter().map(str::to_string).collect::<Vec<_>>()));
    }
    match out.pop() {
        Some((_, last)) if last.len() == 1 && last[0] == SENTINEL => Ok(out),
        other => {
            let start = other.map_or(1, |(line, _)| line);
            bail!("{label}: line {start}: a quoted field never ends (a `\"` is missing)")
        }
    }
}

fn delimited(text: &str, delim: u8, column: &str, label: &str, c: &mut Collect) -> Result<()> {
    let mut recs = records(text, delim, label)?.into_iter();
    let Some((_, header)) = recs.next() else {
        bail!("{label} is empty: it needs a header line naming the columns, then the items");
    };
    let Some(col) = header.iter().position(|h| h.trim() == column) else {
        bail!(
            "{label}: no column `{column}` in the header (it has {}); set scrape.column to one \
             of them",
            header
                .iter()
                .map(|h| format!("`{h}`"))
                .collect::<Vec<_>>()
                .join(", ")
        );
    };
    for (line, rec) in recs {
        let Some(v) = rec.get(col) else {
            bail!(
                "{label}: line {line}: the row has {} field(s) and no `{column}` (column {}); \
                 every row needs one",
                rec.len(),
                col + 1
            );
        };
        c.push(v);
    }
    Ok(())
}

/// One object's `field`: a string is an item, null an empty value, anything else refused.
fn field_of(
    v: &serde_json::Value,
    field: &str,
    at: &str,
    label: &str,
    c: &mut Collect,
) -> Result<()> {
    let Some(obj) = v.as_object() else {
        bail!(
            "{label}: {at}: expected an object with a `{field}` field, found {}",
            kind(v)
        );
    };
    match obj.get(field) {
        None => bail!(
            "{label}: {at}: no field `{field}` (the object has {}); set scrape.column to the \
             field that holds the items",
            obj.keys()
                .map(|k| format!("`{k}`"))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        Some(serde_json::Value::String(s)) => c.push(s),
        Some(serde_json::Value::Null) => c.push(""),
        Some(other) => bail!(
            "{label}: {at}: field `{field}` is {}, not a string",
            kind(other)
        ),
    }
    Ok(())
}

fn kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

fn jsonl_items(text: &str, field: &str, label: &str, c: &mut Collect) -> Result<()> {
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = format!("line {}", i + 1);
        let v: serde_json::Value = serde_json::from_str(line)
            .map_err(|e| crate::error::err!("{label}: {at}: not JSON: {e}"))?;
        field_of(&v, field, &at, label, c)?;
    }
    Ok(())
}

fn json_items(text: &str, field: &str, label: &str, c: &mut Collect) -> Result<()> {
    let v: serde_json::Value =
        serde_json::from_str(text).map_err(|e| crate::error::err!("{label}: not JSON: {e}"))?;
    let Some(a) = v.as_array() else {
        bail!("{label}: expected an array of objects, found {}", kind(&v));
    };
    for (i, v) in a.iter().enumerate() {
        field_of(
            v,
            field,
            &format!("element {} (counted from 1)", i + 1),
            label,
            c,
        )?;
    }
    Ok(())
}

fn parquet_items(bytes: &[u8], column: &str, label: &str, c: &mut Collect) -> Result<()> {
    let path = Path::new(label);
    let builder = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(
        bytes::Bytes::copy_from_slice(bytes),
    )
    .with_context(|| format!("{label}: not a Parquet file"))?;
    if builder.schema().column_with_name(column).is_none() {
        bail!(
            "{label}: no column `{column}` (it has {}); set scrape.column to one of them",
            builder
                .schema()
                .fields()
                .iter()
                .map(|f| format!("`{}`", f.name()))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    for batch in builder.build()? {
        let batch = batch.with_context(|| format!("{label}: reading a row group"))?;
        // Nulls read as "": counted as empty values, as an empty CSV cell is.
        let v = crate::dpo::data::string_column(&batch, column, path)?
            .with_context(|| format!("{label}: no column `{column}`"))?;
        v.iter().for_each(|s| c.push(s));
    }
    Ok(())
}
