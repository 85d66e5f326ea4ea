//! Layering: built-in defaults, the config file, the preset, each `--set`, each parsed into the
//! typed [`Settings`] as it comes, so an error names its file and line, preset or `--set`.

use super::types::Settings;
use crate::error::ConfigError;

type Result<T, E = ConfigError> = std::result::Result<T, E>;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The presets shipped with the binary: name, what it is for, its TOML.
const PRESETS: [(&str, &str, &str); 2] = [
    (
        "quick",
        "the whole pipeline offline in a few minutes on 2 CPU cores: the bundled NeurIPS 2023 \
         snapshot, SmolLM2-135M from scripts/setup.sh, 24 titles, 20 training steps",
        include_str!("../../presets/quick.toml"),
    ),
    (
        "kind",
        "the opposite bot, offline, as quick: 24 titles from data/kind-titles.txt, chosen = \
         the kind review, rejected = the harsh one, the judges scoring positivity",
        include_str!("../../presets/kind.toml"),
    ),
];

/// Where a recipe comes from: a config file, an optional preset, and `--set` overrides.
#[derive(Debug, Clone, Default)]
pub struct Sources {
    pub file: PathBuf,
    /// A missing file is an error (an explicit `--config`) rather than "all defaults".
    pub must_exist: bool,
    pub preset: Option<String>,
    pub overrides: Vec<String>,
}

/// Settings plus where each came from, so later errors can point at a line.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub settings: Settings,
    file: PathBuf,
    /// Folder of the config file: relative paths in the recipe resolve against it.
    pub(crate) base_dir: PathBuf,
    /// dotted key -> where it was last set.
    origins: BTreeMap<String, Origin>,
}

#[derive(Debug, Clone)]
enum Origin {
    Line(usize),
    Preset(String),
    Set,
}

impl Loaded {
    /// Where a key was set, for error messages: `pipeline.toml:12`, `--preset quick` or `--set`.
    pub fn origin(&self, key: &str) -> String {
        match self.origins.get(key) {
            Some(Origin::Set) => format!("--set {key}"),
            Some(Origin::Preset(p)) => format!("--preset {p}"),
            Some(Origin::Line(l)) => format!("{}:{l}", self.file.display()),
            None => format!("{} (default for {key})", self.file.display()),
        }
    }

    /// Resolve a path setting relative to the config file's folder.
    pub(crate) fn resolve(&self, p: &str) -> PathBuf {
        let p = Path::new(p);
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.base_dir.join(p)
        }
    }
}

/// All dotted keys the schema knows (array-of-table entries as `prompts.pool.title` etc.).
fn known_keys() -> Vec<String> {
    let v = toml::Value::try_from(Settings::default()).expect("defaults serialize");
    let mut out = Vec::new();
    fn walk(prefix: &str, v: &toml::Value, out: &mut Vec<String>) {
        match v {
            toml::Value::Table(t) => {
                for (k, v) in t {
                    let key = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    out.push(key.clone());
                    walk(&key, v, out);
                }
            }
            toml::Value::Array(a) => {
                if let Some(first @ toml::Value::Table(_)) = a.first() {
                    walk(prefix, first, out);
                }
            }
            _ => {}
        }
    }
    walk("", &v, &mut out);
    out
}

fn suggest(key: &str, known: &[String]) -> String {
    let best = known
        .iter()
        .map(|k| (strsim::jaro_winkler(key, k), k))
        .max_by(|a, b| a.0.total_cmp(&b.0));
    match best {
        Some((score, k)) if score > 0.75 => format!("; did you mean `{k}`?"),
        _ => String::new(),
    }
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

/// Walk a document: record each key's line and reject unknown keys with a suggestion.
fn check_keys(
    text: &str,
    origin: &dyn Fn(usize) -> String,
    table: &toml_edit::Table,
    prefix: &str,
    known: &[String],
    lines: &mut BTreeMap<String, usize>,
) -> Result<()> {
    for (k, item) in table.iter() {
        let key = if prefix.is_empty() {
            k.to_string()
        } else {
            format!("{prefix}.{k}")
        };
        let line = table
            .key(k)
            .and_then(|kk| kk.span())
            .map(|s| line_of(text, s.start))
            .unwrap_or(0);
        // Pool entries and per-style messages are keyed by the recipe's style names: validation
        // checks them against prompts.chosen / prompts.rejected, naming the entry.
        let styled = prefix == "prompts.pool" && k != "title" || prefix == "prompts.style_system";
        if styled {
            lines.insert(key.clone(), line);
            continue;
        }
        if !known.contains(&key) {
            return Err(ConfigError::UnknownKey {
                origin: origin(line),
                suggestion: suggest(&key, known),
                key,
            });
        }
        lines.insert(key.clone(), line);
        match item {
            toml_edit::Item::Table(t) => check_keys(text, origin, t, &key, known, lines)?,
            toml_edit::Item::Value(toml_edit::Value::InlineTable(t)) => {
                let t = t.clone().into_table();
                check_keys(text, origin, &t, &key, known, lines)?
            }
            toml_edit::Item::ArrayOfTables(a) => {
                for t in a.iter() {
                    check_keys(text, origin, t, &key, known, lines)?;
                }
            }
            _ => {}
        }
    }
    Ok(())
}

/// The key whose line is the last at or before `line` (for type errors toml reports by span).
fn key_at(lines: &BTreeMap<String, usize>, line: usize) -> Option<&str> {
    lines
        .iter()
        .filter(|(_, l)| **l <= line)
        .max_by_key(|(_, l)| **l)
        .map(|(k, _)| k.as_str())
}

/// Parse one TOML layer (the file or a preset): keys checked, typed parse attributed to lines.
fn parse_layer(
    text: &str,
    origin: &dyn Fn(usize) -> String,
    known: &[String],
) -> Result<(toml::Table, BTreeMap<String, usize>)> {
    let doc = toml_edit::ImDocument::parse(text).map_err(|e| ConfigError::Syntax {
        origin: origin(e.span().map(|s| line_of(text, s.start)).unwrap_or(0)),
        msg: e.message().to_string(),
    })?;
    let mut lines = BTreeMap::new();
    check_keys(text, origin, doc.as_table(), "", known, &mut lines)?;
    // A typed parse of the layer alone, so a wrong type or an unknown choice is reported
    // against its own line and key.
    if let Err(e) = toml::from_str::<Settings>(text) {
        let line = e.span().map(|s| line_of(text, s.start)).unwrap_or(0);
        let msg = match key_at(&lines, line) {
            Some(k) => format!("{k}: {}", e.message()),
            None => e.message().to_string(),
        };
        return Err(ConfigError::Type {
            origin: origin(line),
            msg,
        });
    }
    let table: toml::Table = toml::from_str(text).map_err(|e| ConfigError::Syntax {
        origin: origin(0),
        msg: e.message().to_string(),
    })?;
    Ok((table, lines))
}

/// Overlay `top` onto `base`, table by table; arrays and scalars replace.
fn merge(base: &mut toml::Table, top: toml::Table) {
    for (k, v) in top {
        match (base.get_mut(&k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(t)) => merge(b, t),
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}

/// Load the recipe: defaults, then the file, then the preset, then each `--set`.
// Long because the layers apply in one order, each with its own error naming the source.
pub fn load(src: &Sources) -> Result<Loaded> {
    let file = &src.file;
    let text = match std::fs::read_to_string(file) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !src.must_exist => String::new(),
        Err(source) => {
            return Err(ConfigError::Read {
                path: file.clone(),
                source,
            })
        }
    };
    let known = known_keys();
    let at_line = |l: usize| format!("{}:{l}", file.display());
    let (mut value, lines) = parse_layer(&text, &at_line, &known)?;
    let mut origins: BTreeMap<String, Origin> = lines
        .into_iter()
        .map(|(k, l)| (k, Origin::Line(l)))
        .collect();

    if let Some(name) = &src.preset {
        let (_, _, ptext) = PRESETS.iter().find(|(n, _, _)| n == name).ok_or_else(|| {
            ConfigError::UnknownPreset {
                name: name.clone(),
                choices: PRESETS.map(|p| p.0).join(", "),
            }
        })?;
        let in_preset = |l: usize| format!("preset {name} (line {l})");
        let (table, lines) = parse_layer(ptext, &in_preset, &known)?;
        merge(&mut value, table);
        for k in lines.into_keys() {
            origins.insert(k, Origin::Preset(name.clone()));
        }
        typed(&value).map_err(|msg| ConfigError::Type {
            origin: format!("--preset {name}"),
            msg,
        })?;
    }

    for ov in &src.overrides {
        let (key, raw) = ov
            .split_once('=')
            .ok_or_else(|| ConfigError::SetSyntax { arg: ov.clone() })?;
        let key = key.trim();
        if !known.iter().any(|k| k == key) {
            return Err(ConfigError::UnknownKey {
                origin: format!("--set {ov}"),
                key: key.into(),
                suggestion: suggest(key, &known),
            });
        }
        // A bare word is a string: `--set generate.device=cpu` needs no quotes.
        let parsed: toml::Value = match toml::from_str::<toml::Table>(&format!("v = {raw}")) {
            Ok(mut t) => t.remove("v").expect("the key just parsed"),
            Err(_) => toml::Value::String(raw.to_string()),
        };
        set_dotted(&mut value, key, parsed);
        origins.insert(key.to_string(), Origin::Set);
        // Checked after each override so an error is reported against the key that caused it.
        typed(&value).map_err(|msg| ConfigError::Type {
            origin: format!("--set {ov}"),
            msg: format!("{key}: {msg}"),
        })?;
    }
    let settings = typed(&value).map_err(|msg| ConfigError::Type {
        origin: file.display().to_string(),
        msg,
    })?;
    let base_dir = match file.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let loaded = Loaded {
        settings,
        file: file.clone(),
        base_dir,
        origins,
    };
    if let Err(e) = loaded.settings.validate() {
        return Err(ConfigError::Invalid {
            origin: loaded.origin(e.key),
            key: e.key.into(),
            why: e.why,
        });
    }
    Ok(loaded)
}

fn typed(v: &toml::Table) -> std::result::Result<Settings, String> {
    toml::Value::Table(v.clone())
        .try_into::<Settings>()
        .map_err(|e| e.message().to_string())
}

fn set_dotted(t: &mut toml::Table, key: &str, v: toml::Value) {
    let mut parts = key.split('.').peekable();
    let mut cur = t;
    while let Some(p) = parts.next() {
        if parts.peek().is_none() {
            cur.insert(p.to_string(), v);
            return;
        }
        let entry = cur
            .entry(p.to_string())
            .or_insert_with(|| toml::Value::Table(Default::default()));
        if !entry.is_table() {
            *entry = toml::Value::Table(Default::default());
        }
        cur = entry.as_table_mut().expect("made a table above");
    }
}
