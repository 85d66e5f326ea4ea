//! scrape.file: a user's own list of items, in every format it reads, held against Python's own
//! readers of the same files (csv, json, pyarrow); and every bad file refused by name, with the
//! line or element and the column, never a panic.

use crate::support::*;
use serde_json::Value;
use std::path::Path;

/// A recipe in `dir` that reads items from a file (the model only for the later stages' keys).
fn items_recipe(dir: &Path) {
    std::fs::write(
        dir.join("pipeline.toml"),
        format!(
            "[generate]\nmodel = \"{}\"\n\n[split]\ntrain = 1\ntest = 1\n",
            smollm2().display()
        ),
    )
    .unwrap();
}

fn scrape_with(dir: &Path, sets: &[String]) -> std::process::Output {
    let mut args = vec![
        "run".to_string(),
        "--until".into(),
        "scrape".into(),
        "-q".into(),
    ];
    for s in sets {
        args.push("--set".into());
        args.push(s.clone());
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    pipeline(dir, &args)
}

#[test]
fn every_format_reads_as_pythons_own_reader_reads_it() {
    let d = tempdir();
    items_recipe(d.path());
    let files = d.path().join("files");
    std::fs::create_dir_all(&files).unwrap();
    let py = python();
    let reference: Value = serde_json::from_str(&run_python(
        &py,
        &[
            fixture("ref/items_files.py").to_str().unwrap(),
            files.to_str().unwrap(),
        ],
    ))
    .unwrap();
    for fmt in ["txt", "csv", "tsv", "jsonl", "json", "parquet"] {
        let want = &reference[fmt];
        let want_items: Vec<String> = serde_json::from_value(want["items"].clone()).unwrap();
        let workdir = format!("w-{fmt}");
        let mut sets = vec![
            format!("scrape.file=files/items.{fmt}"),
            format!("scrape.count={}", want_items.len()),
        ];
        if fmt != "txt" {
            sets.push("scrape.column=title".into());
        }
        let o = pipeline(
            d.path(),
            &[
                &["--workdir", &workdir, "run", "--until", "scrape", "-q"][..],
                &sets
                    .iter()
                    .flat_map(|s| ["--set", s.as_str()])
                    .collect::<Vec<_>>()[..],
            ]
            .concat(),
        );
        assert!(o.status.success(), "{fmt}: {}", stderr_of(&o));
        let build = latest_build(&d.path().join(&workdir), "scrape");
        // The list in file order, as parsed: Python's reading, item for item.
        let all = std::fs::read_to_string(build.join("all_titles.txt")).unwrap();
        let got: Vec<&str> = all.lines().collect();
        assert_eq!(
            got, want_items,
            "{fmt}: all_titles.txt against Python's reader"
        );
        // The draw takes them all, each once.
        let mut drawn: Vec<String> = read_jsonl(&build.join("titles.jsonl"))
            .iter()
            .map(|r| r["title"].as_str().unwrap().to_string())
            .collect();
        drawn.sort();
        let mut sorted = want_items.clone();
        sorted.sort();
        assert_eq!(drawn, sorted, "{fmt}: the drawn titles");
        let manifest = std::fs::read_to_string(build.join("manifest.json")).unwrap();
        let m: Value = serde_json::from_str(&manifest).unwrap();
        let count =
            |k: &str| find_number(&m, k).unwrap_or_else(|| panic!("{fmt}: no {k} in {manifest}"));
        assert_eq!(
            count("duplicates_dropped"),
            want["duplicates"].as_u64().unwrap(),
            "{fmt}"
        );
        assert_eq!(
            count("empty_dropped"),
            want["empty"].as_u64().unwrap(),
            "{fmt}"
        );
    }
}

/// The first number under key `k` anywhere in `v`.
fn find_number(v: &Value, k: &str) -> Option<u64> {
    match v {
        Value::Object(m) => m
            .get(k)
            .and_then(Value::as_u64)
            .or_else(|| m.values().find_map(|x| find_number(x, k))),
        Value::Array(a) => a.iter().find_map(|x| find_number(x, k)),
        _ => None,
    }
}

#[test]
fn the_key_is_the_files_bytes_not_its_path() {
    let d = tempdir();
    items_recipe(d.path());
    std::fs::write(d.path().join("a.txt"), "One\nTwo\nThree\n").unwrap();
    std::fs::write(d.path().join("b.txt"), "One\nTwo\nThree\n").unwrap();
    let key = |file: &str| {
        let st = status_json(
            d.path(),
            &[
                "--set",
                &format!("scrape.file={file}"),
                "--set",
                "scrape.count=3",
            ],
        );
        let s = st.iter().find(|s| s["stage"] == "scrape").unwrap().clone();
        s["key"]
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| s["path"].to_string())
    };
    let a = key("a.txt");
    assert_eq!(key("b.txt"), a, "the same bytes elsewhere keep the key");
    std::fs::write(d.path().join("b.txt"), "One\nTwo\nThree\nFour\n").unwrap();
    assert_ne!(key("b.txt"), a, "an edited file rebuilds");
}

/// `pipeline run --until scrape` with these settings fails with exit `code`, and its message
/// holds every one of `want`; never a panic.
fn refused(dir: &Path, sets: &[&str], code: i32, want: &[&str]) {
    let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
    let o = scrape_with(dir, &sets);
    let err = stderr_of(&o);
    assert_eq!(o.status.code(), Some(code), "{sets:?}: {err}");
    for w in want {
        assert!(err.contains(w), "{sets:?}: no {w:?} in:\n{err}");
    }
    assert!(
        !err.contains("panicked") && !err.contains("RUST_BACKTRACE"),
        "{err}"
    );
}

#[test]
fn bad_files_are_refused_naming_the_file_line_and_column() {
    let d = tempdir();
    items_recipe(d.path());
    let w = |name: &str, text: &[u8]| std::fs::write(d.path().join(name), text).unwrap();
    w("nocol.csv", b"id,name\n1,A title\n");
    refused(
        d.path(),
        &[
            "scrape.file=nocol.csv",
            "scrape.column=title",
            "scrape.count=2",
        ],
        1,
        &["nocol.csv", "no column `title`", "`id`, `name`"],
    );
    w("short.csv", b"id,title\n1,A title\n2\n3,Another\n");
    refused(
        d.path(),
        &[
            "scrape.file=short.csv",
            "scrape.column=title",
            "scrape.count=2",
        ],
        1,
        &["short.csv", "line 3", "`title` (column 2)"],
    );
    w("open.csv", b"title\n\"A title\nwhose quote never closes\n");
    refused(
        d.path(),
        &[
            "scrape.file=open.csv",
            "scrape.column=title",
            "scrape.count=2",
        ],
        1,
        &["open.csv", "line 2", "never ends"],
    );
    w("num.jsonl", b"{\"title\": \"Fine\"}\n{\"title\": 42}\n");
    refused(
        d.path(),
        &[
            "scrape.file=num.jsonl",
            "scrape.column=title",
            "scrape.count=2",
        ],
        1,
        &["num.jsonl", "line 2", "`title` is a number, not a string"],
    );
    w("bad.jsonl", b"{\"title\": \"Fine\"}\n\n{\"title\": \n");
    refused(
        d.path(),
        &[
            "scrape.file=bad.jsonl",
            "scrape.column=title",
            "scrape.count=2",
        ],
        1,
        &["bad.jsonl", "line 3", "not JSON"],
    );
    w("obj.json", b"{\"title\": \"not an array\"}");
    refused(
        d.path(),
        &[
            "scrape.file=obj.json",
            "scrape.column=title",
            "scrape.count=2",
        ],
        1,
        &["obj.json", "expected an array"],
    );
    w("miss.json", b"[{\"title\": \"A\"}, {\"name\": \"B\"}]");
    refused(
        d.path(),
        &[
            "scrape.file=miss.json",
            "scrape.column=title",
            "scrape.count=2",
        ],
        1,
        &["miss.json", "element 2", "no field `title`", "`name`"],
    );
    w("empty.txt", b"\n  \n\n");
    refused(
        d.path(),
        &["scrape.file=empty.txt", "scrape.count=2"],
        1,
        &["empty.txt", "holds no items"],
    );
    w("few.txt", b"One\nTwo\nOne\n");
    refused(
        d.path(),
        &["scrape.file=few.txt", "scrape.count=3"],
        1,
        &["few.txt", "found only 2", "scrape.count"],
    );
    w("latin1.txt", b"One\nCaf\xe9\n");
    refused(
        d.path(),
        &["scrape.file=latin1.txt", "scrape.count=2"],
        1,
        &["latin1.txt", "line 2", "UTF-8"],
    );
    refused(
        d.path(),
        &["scrape.file=missing.txt", "scrape.count=2"],
        1,
        &["missing.txt", "cannot be read"],
    );
    w("big.txt", &vec![b'a'; 4096]);
    refused(
        d.path(),
        &[
            "scrape.file=big.txt",
            "scrape.count=2",
            "scrape.max_file_bytes=4095",
        ],
        1,
        &["big.txt", "scrape.max_file_bytes"],
    );
    w("notparquet.parquet", b"PAR1 but not really");
    refused(
        d.path(),
        &[
            "scrape.file=notparquet.parquet",
            "scrape.column=title",
            "scrape.count=2",
        ],
        1,
        &["notparquet.parquet", "not a Parquet file"],
    );
    // Settings, refused before anything runs (exit 2), naming the key.
    refused(
        d.path(),
        &["scrape.file=list.xml", "scrape.count=2"],
        2,
        &["scrape.file", "list.xml", "unknown extension"],
    );
    refused(
        d.path(),
        &[
            "scrape.file=few.txt",
            "scrape.column=title",
            "scrape.count=2",
        ],
        2,
        &["scrape.column", "remove scrape.column"],
    );
    refused(
        d.path(),
        &["scrape.file=nocol.csv", "scrape.count=2"],
        2,
        &["scrape.column", "name the column"],
    );
    refused(
        d.path(),
        &[
            "scrape.file=few.txt",
            "scrape.snapshot=bundled",
            "scrape.count=2",
        ],
        2,
        &["scrape.file", "scrape.snapshot"],
    );
    refused(
        d.path(),
        &["scrape.column=title", "scrape.count=2"],
        2,
        &["scrape.column", "only applies with scrape.file"],
    );
}

#[test]
fn parquet_columns_that_are_missing_or_not_strings_are_refused() {
    let d = tempdir();
    items_recipe(d.path());
    let py = python();
    let p = d.path().join("t.parquet");
    run_python(
        &py,
        &[
            "-c",
            "import pyarrow as pa, pyarrow.parquet as pq, sys; pq.write_table(pa.table({'title': ['A', 'B'], 'year': [2023, 2024]}), sys.argv[1])",
            p.to_str().unwrap(),
        ],
    );
    refused(
        d.path(),
        &[
            "scrape.file=t.parquet",
            "scrape.column=name",
            "scrape.count=2",
        ],
        1,
        &["t.parquet", "no column `name`", "`title`, `year`"],
    );
    refused(
        d.path(),
        &[
            "scrape.file=t.parquet",
            "scrape.column=year",
            "scrape.count=2",
        ],
        1,
        &["t.parquet", "`year` is not a string column"],
    );
    let o = scrape_with(
        d.path(),
        &[
            "scrape.file=t.parquet".into(),
            "scrape.column=title".into(),
            "scrape.count=2".into(),
        ],
    );
    assert!(o.status.success(), "{}", stderr_of(&o));
}
