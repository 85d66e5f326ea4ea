//! The floors of docs/ARCHITECTURE.md, held against the code: every `crate::` (and `super::`)
//! path a library file names outside its test module must point at its own floor or one below,
//! and no two files may import each other, directly or around a circle.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Module prefixes and their floors, lowest first: the table of docs/ARCHITECTURE.md. The
/// longest matching prefix decides a module's floor.
const FLOORS: &[(&str, u8)] = &[
    ("error", 0),
    ("fsutil", 0),
    ("rng", 0),
    ("lock", 0),
    ("term", 0),
    ("retry", 0),
    ("protocol", 0),
    ("kernels", 1),
    ("model", 2),
    ("model::load", 3),
    ("model::save", 3),
    ("model::generate", 4),
    ("backend", 5),
    ("dpo", 5),
    ("judge", 5),
    ("config", 6),
    ("recipe", 6),
    ("cache", 6),
    ("export_guard", 6),
    ("stages", 7),
    ("serve", 8),
    ("hub", 8),
    ("estimate", 8),
    ("bench", 8),
    ("cli", 9),
    ("lib", 10),
];

fn src() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// `src/model/load/chat.rs` -> `model::load::chat`; `src/kernels/quant/mod.rs` ->
/// `kernels::quant`.
fn module_of(file: &Path) -> String {
    let rel = file.strip_prefix(src()).unwrap().with_extension("");
    let mut parts: Vec<String> = rel
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    if parts.last().map(String::as_str) == Some("mod") {
        parts.pop();
    }
    parts.join("::")
}

fn floor(module: &str) -> Option<u8> {
    FLOORS
        .iter()
        .filter(|(p, _)| module == *p || module.starts_with(&format!("{p}::")))
        .max_by_key(|(p, _)| p.len())
        .map(|&(_, f)| f)
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The code of a file before its `#[cfg(test)] mod tests` (tests may reach anywhere), with
/// comments dropped so that a path in a doc comment is not an import.
fn code(text: &str) -> String {
    let mut out = String::new();
    let mut lines = text.lines().peekable();
    while let Some(l) = lines.next() {
        let t = l.trim_start();
        if t.starts_with("#[cfg(test)]")
            && lines.peek().is_some_and(|n| {
                n.trim_start()
                    .trim_start_matches("pub(crate) ")
                    .starts_with("mod tests")
            })
        {
            break;
        }
        if t.starts_with("//") {
            continue;
        }
        out.push_str(l.split(" //").next().unwrap());
        out.push('\n');
    }
    out
}

/// Every module path a file's code names: `crate::a::b::c`, `crate::a::{b, c::d}` and
/// `super::x` (resolved against the file's module), as segment lists.
fn named_paths(module: &str, code: &str) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    let bytes: Vec<char> = code.chars().collect();
    let ident = |c: char| c.is_ascii_alphanumeric() || c == '_';
    let mut i = 0;
    while i < bytes.len() {
        let rest: String = bytes[i..bytes.len().min(i + 7)].iter().collect();
        let start_ok = i == 0 || !ident(bytes[i - 1]) && bytes[i - 1] != ':';
        let base: Option<(Vec<String>, usize)> = if start_ok && rest.starts_with("crate::") {
            Some((Vec::new(), i + 7))
        } else if start_ok && rest.starts_with("super::") {
            let mut b: Vec<String> = module.split("::").map(String::from).collect();
            let mut j = i;
            // `super` of module `a::b` is `a`, whether `b` is a file or a folder's `mod.rs`.
            while bytes[j..].iter().take(7).collect::<String>() == "super::" {
                b.pop();
                j += 7;
            }
            Some((b, j))
        } else {
            None
        };
        let Some((prefix, mut j)) = base else {
            i += 1;
            continue;
        };
        let mut segs = prefix;
        loop {
            let s = j;
            while j < bytes.len() && ident(bytes[j]) {
                j += 1;
            }
            if s == j {
                break;
            }
            segs.push(bytes[s..j].iter().collect());
            if bytes[j..].iter().take(2).collect::<String>() == "::" {
                j += 2;
                if j < bytes.len() && bytes[j] == '{' {
                    // A group: each top-level item is a path of its own under `segs`.
                    let mut depth = 0;
                    let mut item = String::new();
                    let mut k = j;
                    loop {
                        let c = bytes[k];
                        match c {
                            '{' => {
                                depth += 1;
                                if depth > 1 {
                                    item.push(c);
                                }
                            }
                            '}' => {
                                depth -= 1;
                                if depth == 0 {
                                    break;
                                }
                                item.push(c);
                            }
                            ',' if depth == 1 => {
                                push_item(&segs, &item, &mut out);
                                item.clear();
                            }
                            _ => item.push(c),
                        }
                        k += 1;
                    }
                    push_item(&segs, &item, &mut out);
                    j = k;
                    segs.clear();
                    break;
                }
                continue;
            }
            break;
        }
        if !segs.is_empty() {
            out.push(segs);
        }
        i = j.max(i + 1);
    }
    out
}

fn push_item(segs: &[String], item: &str, out: &mut Vec<Vec<String>>) {
    let first: String = item
        .trim()
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .next()
        .unwrap_or("")
        .to_string();
    if first.is_empty() {
        return;
    }
    let mut v = segs.to_vec();
    if first != "self" {
        v.extend(
            first
                .split("::")
                .filter(|s| !s.is_empty())
                .map(String::from),
        );
    }
    out.push(v);
}

/// The longest prefix of `segs` that is a module of the crate.
fn resolve(segs: &[String], modules: &BTreeSet<String>) -> Option<String> {
    (1..=segs.len())
        .rev()
        .map(|n| segs[..n].join("::"))
        .find(|m| modules.contains(m))
}

struct Graph {
    edges: BTreeMap<String, BTreeSet<String>>,
}

fn graph() -> Graph {
    let mut files = Vec::new();
    rust_files(&src(), &mut files);
    files.retain(|f| !f.ends_with("main.rs"));
    let modules: BTreeSet<String> = files.iter().map(|f| module_of(f)).collect();
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for f in &files {
        let m = module_of(f);
        let text = std::fs::read_to_string(f).unwrap();
        for segs in named_paths(&m, &code(&text)) {
            if let Some(to) = resolve(&segs, &modules) {
                // A folder's `mod.rs` names its own children; a child names its folder's face.
                if to != m && !to.starts_with(&format!("{m}::")) {
                    edges.entry(m.clone()).or_default().insert(to);
                }
            }
        }
        edges.entry(m).or_default();
    }
    Graph { edges }
}

#[test]
fn every_module_has_a_floor() {
    let g = graph();
    let missing: Vec<&String> = g.edges.keys().filter(|m| floor(m).is_none()).collect();
    assert!(
        missing.is_empty(),
        "modules without a floor (add them to FLOORS here and to docs/ARCHITECTURE.md): {missing:?}"
    );
}

#[test]
fn no_import_goes_up_a_floor() {
    let g = graph();
    let mut bad = Vec::new();
    for (from, tos) in &g.edges {
        let Some(f) = floor(from) else { continue };
        for to in tos {
            let Some(t) = floor(to) else { continue };
            if t > f {
                bad.push(format!("{from} (floor {f}) imports {to} (floor {t})"));
            }
        }
    }
    assert!(
        bad.is_empty(),
        "imports that go up a floor (docs/ARCHITECTURE.md):\n  {}",
        bad.join("\n  ")
    );
}

#[test]
fn no_two_files_import_each_other() {
    let g = graph();
    // Tarjan's strongly connected components: a component of more than one file is a circle.
    struct T<'a> {
        g: &'a BTreeMap<String, BTreeSet<String>>,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        on: BTreeSet<&'a str>,
        next: usize,
        circles: Vec<Vec<&'a str>>,
    }
    fn visit<'a>(t: &mut T<'a>, v: &'a str) {
        t.index.insert(v, t.next);
        t.low.insert(v, t.next);
        t.next += 1;
        t.stack.push(v);
        t.on.insert(v);
        let g = t.g;
        for w in g.get(v).into_iter().flatten() {
            let w = w.as_str();
            if !g.contains_key(w) {
                continue;
            }
            if !t.index.contains_key(w) {
                visit(t, w);
                let lw = t.low[w];
                let lv = t.low.get_mut(v).unwrap();
                *lv = (*lv).min(lw);
            } else if t.on.contains(w) {
                let iw = t.index[w];
                let lv = t.low.get_mut(v).unwrap();
                *lv = (*lv).min(iw);
            }
        }
        if t.low[v] == t.index[v] {
            let mut comp = Vec::new();
            loop {
                let w = t.stack.pop().unwrap();
                t.on.remove(w);
                comp.push(w);
                if w == v {
                    break;
                }
            }
            if comp.len() > 1 {
                comp.sort();
                t.circles.push(comp);
            }
        }
    }
    let mut t = T {
        g: &g.edges,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on: BTreeSet::new(),
        next: 0,
        circles: Vec::new(),
    };
    for v in g.edges.keys() {
        if !t.index.contains_key(v.as_str()) {
            visit(&mut t, v);
        }
    }
    assert!(
        t.circles.is_empty(),
        "files that import each other, around a circle: {:?}",
        t.circles
    );
}

#[test]
fn the_reader_sees_imports_of_every_form() {
    // The checks above are only as good as the reader: each form resolves.
    let m = named_paths(
        "model::load::chat",
        "use crate::model::{llama::Llama, options::{A, B}};\nuse super::special_text;\nlet x = crate::kernels::quant::QK;\n",
    );
    let joined: Vec<String> = m.iter().map(|s| s.join("::")).collect();
    for want in [
        "model::llama::Llama",
        "model::options",
        "model::load::special_text",
        "kernels::quant::QK",
    ] {
        assert!(
            joined.iter().any(|j| j == want),
            "{want} not read from the sample; read {joined:?}"
        );
    }
}

/// Functions of `text` longer than `limit` lines (signature to closing brace, rustfmt's layout)
/// whose comment block above does not say why ("Long because ..."): `(line, name, length)`.
fn long_functions_without_a_reason(text: &str, limit: usize) -> Vec<(usize, String, usize)> {
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::new();
    for (i, l) in lines.iter().enumerate() {
        let t = l.trim_start();
        let indent = l.len() - t.len();
        let sig = t
            .trim_start_matches("pub ")
            .trim_start_matches("pub(crate) ")
            .trim_start_matches("pub(super) ")
            .trim_start_matches("const ")
            .trim_start_matches("async ")
            .trim_start_matches("unsafe ");
        let Some(rest) = sig.strip_prefix("fn ") else {
            continue;
        };
        // A declaration without a body (a trait's) ends with `;` before any `{`.
        let Some(end) = (i..lines.len()).find(|&j| {
            let s = lines[j];
            s.len() > indent && s.starts_with(&" ".repeat(indent)) && s[indent..].starts_with('}')
                || (j == i && s.trim_end().ends_with(';'))
        }) else {
            continue;
        };
        let n = end - i;
        if n <= limit || lines[end].trim_end().ends_with(';') {
            continue;
        }
        let mut reason = false;
        let mut k = i;
        while k > 0 {
            k -= 1;
            let a = lines[k].trim_start();
            if !(a.starts_with("//") || a.starts_with("#[")) {
                break;
            }
            reason |= a.to_lowercase().contains("long because");
        }
        if !reason {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            out.push((i + 1, name, n));
        }
    }
    out
}

/// No function over about 80 lines without the reason in its comment (issue 22).
#[test]
fn long_functions_say_why_they_are_long() {
    let mut files = Vec::new();
    rust_files(&src(), &mut files);
    let mut bad = Vec::new();
    for f in &files {
        let text = std::fs::read_to_string(f).unwrap();
        for (line, name, n) in long_functions_without_a_reason(&text, 80) {
            bad.push(format!("{}:{line} fn {name}: {n} lines", f.display()));
        }
    }
    assert!(
        bad.is_empty(),
        "split these, or say \"Long because ...\" in the comment above each:\n{}",
        bad.join("\n")
    );
    // The reader itself: a long body without a reason is found, one with a reason is not.
    let body = "    x();\n".repeat(85);
    let plain = format!("/// Does x.\nfn f() {{\n{body}}}\n");
    assert_eq!(long_functions_without_a_reason(&plain, 80).len(), 1);
    let said = format!("/// Does x.\n// Long because x.\nfn f() {{\n{body}}}\n");
    assert!(long_functions_without_a_reason(&said, 80).is_empty());
}
