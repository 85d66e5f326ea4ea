//! scrape: parsing real and hand-made pages, and fetching from a real HTTP server on 127.0.0.1
//! that injects faults (500s, stalls, truncated bodies, wrong content types).

use crate::support::http::{free_port, FakeServer, Reply};
use crate::support::*;
use reviewer2::stages::scrape::{fetch, parse_titles, sample_titles};
use std::io::Write;
use std::time::Duration;

const SEL: &str = r#"a[href^="/virtual/2023/poster/"]"#;

#[test]
fn hand_made_page_decodes_folds_and_dedups() {
    let html = std::fs::read_to_string(fixture("papers-mini.html")).unwrap();
    let p = parse_titles(&html, SEL).unwrap();
    assert_eq!(
        p.titles,
        vec![
            "Attention Is All You Need's Successor",
            "Q&A: \"Quoted\" Titles <3",
            "Ünïcödé Méthods for Ångström-scale Learning",
            "Nested markup title",
        ]
    );
    assert_eq!(p.duplicates, 1);
    assert_eq!(p.empty, 1);
}

#[test]
fn invalid_selector_is_a_clear_error() {
    let e = parse_titles("<html></html>", "a[href^=")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("scrape.selector") && e.contains("not a valid CSS selector"),
        "{e}"
    );
}

fn accepted_titles() -> std::collections::HashSet<String> {
    let tsv = std::fs::read_to_string(shared("accepted-2023-titles.tsv")).unwrap();
    tsv.lines()
        .skip(1)
        .filter_map(|l| l.split('\t').next())
        .map(|t| t.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect()
}

/// The page's title count by an independent parser (Python's html.parser).
fn reference_title_count(page: &std::path::Path) -> u64 {
    let v = py_json(&python(), "ref/count_titles.py", &[page.to_str().unwrap()]);
    v["titles"].as_u64().unwrap()
}

#[test]
fn real_schedule_page_yields_3551_accepted_titles() {
    let page = shared("virtual-2023-schedule.html");
    let html = std::fs::read_to_string(&page).unwrap();
    let p = parse_titles(&html, SEL).unwrap();
    assert_eq!(p.titles.len() as u64, reference_title_count(&page));
    assert_eq!(p.titles.len(), 3551);
    let accepted = accepted_titles();
    let hits = p.titles.iter().filter(|t| accepted.contains(*t)).count();
    let share = hits as f64 / p.titles.len() as f64;
    assert!(
        share >= 0.98,
        "only {hits} of {} titles ({share:.3}) are accepted 2023 titles",
        p.titles.len()
    );
    assert!(p
        .titles
        .iter()
        .all(|t| !t.contains("&#x27;") && !t.contains("&amp;") && !t.contains('\n')));
    assert!(
        p.titles.iter().filter(|t| !t.is_ascii()).count() >= 30,
        "non-ASCII titles survive"
    );
}

#[test]
fn real_2020_page_with_its_own_selector() {
    let html = std::fs::read_to_string(shared("accepted-2020-initial.html")).unwrap();
    let p = parse_titles(&html, "p > b").unwrap();
    assert_eq!(
        p.titles.len() + p.duplicates,
        1900,
        "{} titles + {} duplicates",
        p.titles.len(),
        p.duplicates
    );
}

#[test]
fn sampling_is_reproducible_and_seed_dependent() {
    let titles: Vec<String> = (0..500).map(|i| format!("t{i}")).collect();
    let a = sample_titles(&titles, 100, 42).unwrap();
    assert_eq!(a, sample_titles(&titles, 100, 42).unwrap());
    assert_ne!(a, sample_titles(&titles, 100, 43).unwrap());
    let uniq: std::collections::HashSet<_> = a.iter().collect();
    assert_eq!(uniq.len(), 100);
    // The same titles on any machine: an independent ChaCha8 + Fisher-Yates written in Python
    // from the published algorithms draws exactly this sample.
    let idx: Vec<usize> = serde_json::from_value(py_json(
        &python(),
        "ref/chacha_draw.py",
        &["42", "500", "100"],
    ))
    .unwrap();
    let want: Vec<String> = idx.iter().map(|i| format!("t{i}")).collect();
    assert_eq!(a, want);
    let e = sample_titles(&titles, 501, 1).unwrap_err().to_string();
    assert!(e.contains("only 500"), "{e}");
}

/// The page's path on the test server.
const PAGE: &str = "/virtual/2023/papers.html";

/// This status, with a short HTML body.
fn status(code: u16) -> Reply {
    Reply::status(code)
        .header("Content-Type", "text/html")
        .body("oops!")
}

/// The page gzipped, as `Content-Encoding: gzip`.
fn gzip(body: &[u8]) -> Reply {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(body).unwrap();
    Reply::ok("text/html", e.finish().unwrap()).header("Content-Encoding", "gzip")
}

/// The whole length announced, a third of the body sent, then the connection closed.
fn truncated(body: Vec<u8>) -> Reply {
    let cut = body.len() / 3;
    Reply::ok("text/html", body).cut_after(cut)
}

fn page() -> Vec<u8> {
    std::fs::read(fixture("papers-mini.html")).unwrap()
}

const T: Duration = Duration::from_secs(1);
/// `scrape.max_page_bytes`'s default.
const MAX: u64 = 64 << 20;

#[test]
fn retries_a_500_then_succeeds_and_names_itself() {
    let s = FakeServer::scripted(vec![
        status(500),
        Reply::ok("text/html; charset=utf-8", page()),
    ]);
    let body = fetch(&s.url(PAGE), T, 2, MAX).unwrap();
    assert_eq!(body, page());
    assert_eq!(s.hits(), 2);
    assert!(s
        .requests()
        .iter()
        .filter_map(|r| r.header("user-agent"))
        .all(|a| a.contains("reviewer2-pipeline/")));
}

#[test]
fn retries_a_stall_past_the_timeout() {
    let s = FakeServer::scripted(vec![
        Reply::silence(Duration::from_secs(3)),
        Reply::ok("text/html", page()),
    ]);
    assert_eq!(fetch(&s.url(PAGE), T, 1, MAX).unwrap(), page());
    let s = FakeServer::scripted(vec![Reply::silence(Duration::from_secs(3))]);
    let e = fetch(&s.url(PAGE), T, 1, MAX).unwrap_err().to_string();
    assert!(e.contains("timed out") && e.contains("2 attempts"), "{e}");
}

#[test]
fn retries_a_truncated_body() {
    let s = FakeServer::scripted(vec![truncated(page()), Reply::ok("text/html", page())]);
    assert_eq!(fetch(&s.url(PAGE), T, 2, MAX).unwrap(), page());
    let s = FakeServer::scripted(vec![truncated(page())]);
    let e = fetch(&s.url(PAGE), T, 1, MAX).unwrap_err().to_string();
    assert!(e.contains("dropped mid-response"), "{e}");
}

#[test]
fn decodes_gzip() {
    let s = FakeServer::scripted(vec![gzip(&page())]);
    assert_eq!(fetch(&s.url(PAGE), T, 0, MAX).unwrap(), page());
}

#[test]
fn a_404_fails_at_once_and_says_what_to_change() {
    let s = FakeServer::scripted(vec![status(404)]);
    let e = fetch(&s.url(PAGE), T, 3, MAX).unwrap_err().to_string();
    assert!(e.contains("404") && e.contains("scrape.url"), "{e}");
    assert_eq!(s.hits(), 1, "4xx must not be retried");
}

#[test]
fn a_non_html_body_is_refused() {
    let s = FakeServer::scripted(vec![Reply::ok(
        "application/json",
        b"{\"papers\": []}".to_vec(),
    )]);
    let e = fetch(&s.url(PAGE), T, 0, MAX).unwrap_err().to_string();
    assert!(e.contains("not an HTML page"), "{e}");
}

/// A small recipe in `dir` that scrapes `url`.
fn url_recipe(dir: &std::path::Path, url: &str) {
    std::fs::write(
        dir.join("pipeline.toml"),
        format!(
            "[scrape]\nurl = \"{url}\"\ncount = 3\ntimeout_secs = 2\n[split]\ntrain = 2\ntest = 1\n"
        ),
    )
    .unwrap();
}

#[test]
fn pipeline_fetches_once_then_works_offline() {
    let s = FakeServer::scripted(vec![status(503), Reply::ok("text/html", page())]);
    let d = tempdir();
    url_recipe(d.path(), &s.url(PAGE));
    let out = pipeline_ok(d.path(), &["run", "--until", "scrape"]);
    assert!(out.contains("Built scrape"), "{out}");
    assert_eq!(s.hits(), 2);
    // Cached page: a forced rebuild of the stage reads it, no request is made...
    std::fs::remove_dir_all(d.path().join("data/cache/scrape")).unwrap();
    pipeline_ok(d.path(), &["run", "--until", "scrape"]);
    assert_eq!(s.hits(), 2);
    // ...and `--force scrape` fetches it again.
    pipeline_ok(d.path(), &["run", "--until", "scrape", "--force", "scrape"]);
    assert_eq!(s.hits(), 3);
}

#[test]
fn zero_matches_and_too_few_titles_are_clear_errors() {
    let d = tempdir();
    let snap = fixture("papers-mini.html");
    let cfg = |sel: &str, count: usize| {
        format!(
            "[scrape]\nsnapshot = \"{}\"\nselector = '{sel}'\ncount = {count}\n[split]\ntrain = 1\ntest = 0\n",
            snap.display()
        )
    };
    std::fs::write(d.path().join("pipeline.toml"), cfg("div.nothing", 2)).unwrap();
    let o = pipeline(d.path(), &["run", "--until", "scrape"]);
    let e = stderr_of(&o);
    assert!(
        !o.status.success() && e.contains("no element") && e.contains("div.nothing"),
        "{e}"
    );
    std::fs::write(d.path().join("pipeline.toml"), cfg(SEL, 9)).unwrap();
    let o = pipeline(d.path(), &["run", "--until", "scrape"]);
    let e = stderr_of(&o);
    assert!(
        !o.status.success() && e.contains("found only 4") && e.contains("scrape.count"),
        "{e}"
    );
}

#[test]
fn the_bundled_snapshot_holds_the_saved_pages_titles_in_order() {
    let saved = std::fs::read_to_string(shared("virtual-2023-schedule.html")).unwrap();
    let full = parse_titles(&saved, SEL).unwrap();
    let bundled = parse_titles(
        &String::from_utf8_lossy(reviewer2::stages::scrape::BUNDLED),
        SEL,
    )
    .unwrap();
    assert_eq!(bundled.titles, full.titles);
    // So the quick preset draws the titles the saved page would give.
    assert_eq!(
        sample_titles(&bundled.titles, 24, 42).unwrap(),
        sample_titles(&full.titles, 24, 42).unwrap()
    );
}

/// The key and manifest of the latest scrape build of the recipe in `dir`.
fn scrape_manifest(dir: &std::path::Path) -> (String, serde_json::Value) {
    let build = latest_build(&dir.join("data"), "scrape");
    let key = build.file_name().unwrap().to_string_lossy().into_owned();
    (key, read_json(&build.join("manifest.json")))
}

#[test]
fn an_unreachable_page_falls_back_to_the_bundled_snapshot_and_says_so() {
    // A port with nothing listening: connections are refused at once.
    let port = free_port();
    let d = tempdir();
    let recipe = format!(
        "[scrape]\nurl = \"http://127.0.0.1:{port}/virtual/2023/papers.html\"\ncount = 5\ntimeout_secs = 1\nretries = 0\n[split]\ntrain = 2\ntest = 1\n"
    );
    std::fs::write(d.path().join("pipeline.toml"), &recipe).unwrap();
    let o = pipeline(d.path(), &["run", "--until", "scrape"]);
    let err = stderr_of(&o);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("bundled NeurIPS 2023 snapshot"), "{err}");
    // Before building, run says what it will build and how long that should take here.
    assert!(err.contains("Plan scrape on the CPU (estimate"), "{err}");
    let (_, m) = scrape_manifest(d.path());
    assert_eq!(m["material"]["settings"]["source"], "bundled", "{m}");
    assert_eq!(
        m["counts"]["found"].as_u64().unwrap(),
        reference_title_count(&repo().join("data/neurips-2023-posters.html"))
    );
    // With the fallback off, the same failure is an error that names the URL.
    let o = pipeline(
        d.path(),
        &[
            "run",
            "--until",
            "scrape",
            "--force",
            "scrape",
            "--set",
            "scrape.fallback=false",
        ],
    );
    let err = stderr_of(&o);
    // A remote failure's exit code (README, "Exit codes").
    assert_eq!(o.status.code(), Some(4), "{err}");
    assert!(err.contains(&format!("127.0.0.1:{port}")), "{err}");
}

#[test]
fn a_refetched_page_that_changed_gets_a_new_key() {
    let mut other = String::from_utf8(page()).unwrap();
    other = other.replace("Nested", "Different");
    let s = FakeServer::scripted(vec![
        Reply::ok("text/html", page()),
        Reply::ok("text/html", other.into_bytes()),
    ]);
    let d = tempdir();
    url_recipe(d.path(), &s.url(PAGE));
    pipeline_ok(d.path(), &["run", "--until", "scrape"]);
    let (k1, m1) = scrape_manifest(d.path());
    assert_eq!(m1["material"]["settings"]["source"], "url");
    pipeline_ok(d.path(), &["run", "--until", "scrape", "--force", "scrape"]);
    let (k2, _) = scrape_manifest(d.path());
    assert_ne!(
        k1, k2,
        "the page changed, so every later stage must see new titles"
    );
    // `status` never fetches: it reads the cached page.
    let out = pipeline_ok(d.path(), &["status"]);
    assert!(out.contains(&k2), "{out}");
    assert_eq!(s.hits(), 2);
}

#[test]
fn status_before_the_page_is_fetched_reports_unknown_and_fetches_nothing() {
    let s = FakeServer::scripted(vec![Reply::ok("text/html", page())]);
    let d = tempdir();
    url_recipe(d.path(), &s.url(PAGE));
    for st in status_json(d.path(), &[]) {
        // No stage's key can be known before the titles are: none may claim "missing".
        assert_eq!(st["state"], "unknown", "{st}");
        assert!(st["key"].is_null(), "{st}");
    }
    assert_eq!(s.hits(), 0);
}
