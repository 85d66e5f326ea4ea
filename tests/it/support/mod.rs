//! Helpers shared by the integration tests: the real model and saved pages (`model`), temporary
//! folders, the `pipeline` binary and the artifacts it leaves, JSON files, the Python references,
//! fake HTTP servers (`http`, and the Hub-like one in `hub`), llama.cpp's real server (`llama_server`), `pipeline serve` as a child (`serve`), and a test that must run alone in
//! its own process (`alone`).

pub mod gguf;
pub mod http;
pub mod hub;
pub mod llama_server;
mod model;
pub mod serve;

pub use model::*;

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `../shared/data/neurips/<name>`: real saved pages. Missing = a failure that says why.
/// `REVIEWER2_SHARED` names that `shared` folder when it is not beside the checkout (a worktree
/// elsewhere), as `REVIEWER2_MODELS` does for `models`.
pub fn shared(name: &str) -> PathBuf {
    let p = std::env::var_os("REVIEWER2_SHARED")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("../shared"))
        .join("data/neurips")
        .join(name);
    assert!(
        p.is_file(),
        "{} is missing: these tests read the real saved NeurIPS pages from ../shared beside the checkout (or REVIEWER2_SHARED)",
        p.display()
    );
    p
}

pub fn fixture(name: &str) -> PathBuf {
    repo().join("tests/fixtures").join(name)
}

pub fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("reviewer2-test-")
        .tempdir()
        .unwrap()
}

/// The `pipeline` binary, to run in `dir`, without the caller's `REVIEWER2_LOG`.
pub fn pipeline_cmd(dir: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_pipeline"));
    c.current_dir(dir).env_remove("REVIEWER2_LOG");
    c
}

/// Run the `pipeline` binary; returns its output (not asserting success).
pub fn pipeline(dir: &Path, args: &[&str]) -> Output {
    pipeline_cmd(dir)
        .args(args)
        .output()
        .expect("spawn pipeline")
}

/// Run the `pipeline` binary, asserting success; returns its stdout then its stderr.
pub fn pipeline_ok(dir: &Path, args: &[&str]) -> String {
    let o = pipeline(dir, args);
    let err = stderr_of(&o);
    assert!(
        o.status.success(),
        "pipeline {args:?} failed ({}):\n{err}\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout)
    );
    format!("{}{err}", String::from_utf8_lossy(&o.stdout))
}

pub fn stderr_of(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// `pipeline status --json ARGS` in `dir`, asserting success: the stages, as it prints them
/// alone on stdout.
pub fn status_json(dir: &Path, args: &[&str]) -> Vec<Value> {
    let o = pipeline(dir, &[&["status", "--json"][..], args].concat());
    assert!(
        o.status.success(),
        "pipeline status --json {args:?} failed ({}):\n{}",
        o.status,
        stderr_of(&o)
    );
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| {
        panic!(
            "status --json printed no JSON array alone on stdout ({e}):\n{}",
            String::from_utf8_lossy(&o.stdout)
        )
    })
}

/// The folder `pipeline status --json ARGS` names for `stage`, which must be up to date.
pub fn status_path(dir: &Path, stage: &str, args: &[&str]) -> PathBuf {
    let st = status_json(dir, args);
    let s = st
        .iter()
        .find(|s| s["stage"] == stage)
        .unwrap_or_else(|| panic!("no stage {stage} in {st:?}"));
    assert_eq!(s["state"], "up to date", "{s}");
    dir.join(s["path"].as_str().unwrap())
}

/// The folder of a stage's latest build: `<workdir>/cache/<stage>/<key>`, the key read from
/// `<workdir>/cache/<stage>/latest.json`. (A recipe written by [`small_recipe`] in `dir` has
/// its workdir at `dir/data`.)
pub fn latest_build(workdir: &Path, stage: &str) -> PathBuf {
    let d = workdir.join("cache").join(stage);
    let latest: Value = read_json(&d.join("latest.json"));
    let key = latest["key"]
        .as_str()
        .unwrap_or_else(|| panic!("{}: no key in {latest}", d.display()));
    d.join(key)
}

/// The one artifact folder in a stage's cache folder (`<workdir>/cache/<stage>`), skipping
/// temporary and partial ones (named with a leading dot).
pub fn only_build(stage_dir: &Path) -> PathBuf {
    let v: Vec<PathBuf> = std::fs::read_dir(stage_dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_dir() && !p.file_name().unwrap().to_string_lossy().starts_with('.'))
        .collect();
    assert_eq!(v.len(), 1, "{v:?}");
    v[0].clone()
}

/// Folders of a stage that hold a committed artifact (a manifest).
pub fn built_dirs(workdir: &Path, stage: &str) -> Vec<PathBuf> {
    std::fs::read_dir(workdir.join("cache").join(stage))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.join("manifest.json").is_file())
        .collect()
}

/// A JSON file, parsed (a failure names the file).
pub fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> T {
    let bytes =
        std::fs::read(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_json::from_slice(&bytes).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A JSON Lines file: one JSON value per line.
pub fn read_jsonl(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
        .lines()
        .enumerate()
        .map(|(i, l)| {
            serde_json::from_str(l)
                .unwrap_or_else(|e| panic!("{} line {}: {e}", path.display(), i + 1))
        })
        .collect()
}

/// `--set`s that shrink the quick preset to the least that still runs every stage with several
/// generation chunks and checkpoints to resume from (seconds of work on 2 cores).
pub const TINY_QUICK: &[&str] = &[
    "scrape.count=5",
    "generate.max_new_tokens=8",
    "generate.batch_size=2",
    "generate.chunk_size=2",
    "split.train=3",
    "split.test=1",
    "train.max_steps=4",
    "train.save_steps=1",
    "train.logging_steps=1",
    "train.eval_steps=2",
    "train.batch_size=1",
    "train.max_length=96",
    "train.max_prompt_length=64",
];

/// A small recipe on the saved page and the SmolLM2 model, written as `pipeline.toml` in `dir`
/// (with the repo's templates copied beside it).
pub fn small_recipe(
    dir: &Path,
    titles: usize,
    train: usize,
    test: usize,
    new_tokens: usize,
    extra: &str,
) {
    let tdir = dir.join("templates");
    std::fs::create_dir_all(&tdir).unwrap();
    for f in ["chat_user.jinja", "plain.jinja"] {
        std::fs::copy(repo().join("templates").join(f), tdir.join(f)).unwrap();
    }
    let toml = format!(
        r#"[scrape]
snapshot = "{snap}"
count = {titles}
seed = 3

[generate]
model = "{model}"
max_new_tokens = {new_tokens}
batch_size = 4
chunk_size = 2

[split]
train = {train}
test = {test}
{extra}
"#,
        snap = shared("virtual-2023-schedule.html").display(),
        model = smollm2().display(),
    );
    std::fs::write(dir.join("pipeline.toml"), toml).unwrap();
}

/// A Python interpreter that imports `modules` (import names; `pip` names as scripts/setup.sh
/// installs them), for the independent checks. Fails, naming the install command, without them.
pub fn python_with(modules: &[(&str, &str)]) -> String {
    let py = python();
    for (import, pip) in modules {
        let ok = Command::new(&py)
            .args(["-c", &format!("import {import}")])
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        assert!(
            ok,
            "{py} lacks {import}: run `bash scripts/setup.sh` (or `python3 -m pip install {pip}`)"
        );
    }
    py
}

/// A Python interpreter with pyarrow (and yaml) for the independent checks.
pub fn python() -> String {
    let py = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    let ok = Command::new(&py)
        .args(["-c", "import pyarrow, yaml"])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(ok, "{py} lacks pyarrow or pyyaml: run `python3 -m pip install pyarrow pyyaml` (scripts/setup.sh does)");
    py
}

/// `py ARGS` (a script and its arguments, or `-c CODE` and its), asserting success; its stdout.
pub fn run_python(py: &str, args: &[&str]) -> String {
    let o = Command::new(py).args(args).output().unwrap();
    assert!(
        o.status.success(),
        "{py} {}... failed:\n{}",
        args.first().copied().unwrap_or_default(),
        stderr_of(&o)
    );
    String::from_utf8(o.stdout).unwrap()
}

/// `tests/fixtures/<script>` run by `py` with `args`; its stdout, parsed as JSON.
pub fn py_json(py: &str, script: &str, args: &[&str]) -> Value {
    let path = fixture(script);
    let out = run_python(py, &[&[path.to_str().unwrap()][..], args].concat());
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{script} printed no JSON ({e}):\n{out}"))
}

/// For a test that changes what its whole process shares (environment variables): all the tests
/// are one binary, so the test runs again in a process of its own, alone, and its copy here
/// only checks that it passed there. `test` is its name as the test binary lists it
/// (`engine::loads_and_generates_from_an_hf_folder_and_the_hub_cache`). Returns true in that
/// process, where the test goes on; false here, once it passed there.
///
/// ```ignore
/// if !alone("area::the_test") {
///     return;
/// }
/// ```
pub fn alone(test: &str) -> bool {
    const VAR: &str = "REVIEWER2_TEST_ALONE";
    if std::env::var(VAR).is_ok_and(|v| v == test) {
        return true;
    }
    let o = Command::new(std::env::current_exe().unwrap())
        .args([test, "--exact", "--test-threads=1", "--nocapture"])
        .env(VAR, test)
        .output()
        .expect("run the test binary again");
    let (out, err) = (String::from_utf8_lossy(&o.stdout), stderr_of(&o));
    eprint!("{err}");
    assert!(
        o.status.success() && out.contains("test result: ok. 1 passed"),
        "{test}, run alone in its own process ({}):\n{out}\n{err}",
        o.status
    );
    false
}
