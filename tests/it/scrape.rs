//! scrape: parsing real and hand-made pages, and fetching from a real HTTP server on 127.0.0.1
//! that injects faults (500s, stalls, truncated bodies, wrong content types).

use crate::support::*;
use reviewer2::stages::scrape::{fetch, parse_titles, sample_titles};
use std::io::{Read, Write};
use std::net::TcpListener;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
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
    let o = std::process::Command::new(python())
        .args([
            fixture("ref/count_titles.py").to_str().unwrap(),
            page.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
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
    let o = std::process::Command::new(python())
        .args([
            fixture("ref/chacha_draw.py").to_str().unwrap(),
            "42",
            "500",
            "100",
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let idx: Vec<usize> = serde_json::from_slice(&o.stdout).unwrap();
    let want: Vec<String> = idx.iter().map(|i| format!("t{i}")).collect();
    assert_eq!(a, want);
    let e = sample_titles(&titles, 501, 1).unwrap_err().to_string();
    assert!(e.contains("only 500"), "{e}");
}

/// What the test server does for one request.
#[derive(Clone)]
enum Reply {
    Ok(&'static str, Vec<u8>),
    Gzip(Vec<u8>),
    Status(u16),
    Stall(Duration),
    Truncated(Vec<u8>),
}

/// A real HTTP/1.1 server on 127.0.0.1: answers request n with script[min(n, len-1)].
struct Server {
    url: String,
    hits: Arc<AtomicUsize>,
    agents: Arc<Mutex<Vec<String>>>,
}

fn serve(script: Vec<Reply>) -> Server {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!(
        "http://{}/virtual/2023/papers.html",
        l.local_addr().unwrap()
    );
    let hits = Arc::new(AtomicUsize::new(0));
    let agents = Arc::new(Mutex::new(Vec::new()));
    let (h, a) = (hits.clone(), agents.clone());
    std::thread::spawn(move || {
        // Bounded: a test never makes more than a handful of requests.
        for stream in l.incoming().take(16) {
            let Ok(mut s) = stream else { continue };
            let n = h.fetch_add(1, Ordering::SeqCst);
            let script = script.clone();
            let a = a.clone();
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 8192];
                let k = s.read(&mut buf).unwrap_or(0);
                let req = String::from_utf8_lossy(&buf[..k]).to_string();
                if let Some(ua) = req
                    .lines()
                    .find(|l| l.to_ascii_lowercase().starts_with("user-agent:"))
                {
                    a.lock().unwrap().push(ua.to_string());
                }
                let reply = script[n.min(script.len() - 1)].clone();
                let head = |code: u16, ctype: &str, len: usize, extra: &str| {
                    format!("HTTP/1.1 {code} X\r\nContent-Type: {ctype}\r\nContent-Length: {len}\r\n{extra}Connection: close\r\n\r\n")
                };
                let _ = match reply {
                    Reply::Ok(ct, body) => {
                        s.write_all(&[head(200, ct, body.len(), "").into_bytes(), body].concat())
                    }
                    Reply::Gzip(body) => {
                        let mut e = flate2::write::GzEncoder::new(
                            Vec::new(),
                            flate2::Compression::default(),
                        );
                        e.write_all(&body).unwrap();
                        let z = e.finish().unwrap();
                        s.write_all(
                            &[
                                head(200, "text/html", z.len(), "Content-Encoding: gzip\r\n")
                                    .into_bytes(),
                                z,
                            ]
                            .concat(),
                        )
                    }
                    Reply::Status(c) => s
                        .write_all(head(c, "text/html", 5, "").as_bytes())
                        .and_then(|_| s.write_all(b"oops!")),
                    Reply::Stall(d) => {
                        std::thread::sleep(d);
                        Ok(())
                    }
                    Reply::Truncated(body) => {
                        let cut = body.len() / 3;
                        s.write_all(
                            &[
                                head(200, "text/html", body.len(), "").into_bytes(),
                                body[..cut].to_vec(),
                            ]
                            .concat(),
                        )
                    }
                };
            });
        }
    });
    Server { url, hits, agents }
}

fn page() -> Vec<u8> {
    std::fs::read(fixture("papers-mini.html")).unwrap()
}

const T: Duration = Duration::from_secs(1);

#[test]
fn retries_a_500_then_succeeds_and_names_itself() {
    let s = serve(vec![
        Reply::Status(500),
        Reply::Ok("text/html; charset=utf-8", page()),
    ]);
    let body = fetch(&s.url, T, 2).unwrap();
    assert_eq!(body, page());
    assert_eq!(s.hits.load(Ordering::SeqCst), 2);
    assert!(s
        .agents
        .lock()
        .unwrap()
        .iter()
        .all(|a| a.contains("reviewer2-pipeline/")));
}

#[test]
fn retries_a_stall_past_the_timeout() {
    let s = serve(vec![
        Reply::Stall(Duration::from_secs(3)),
        Reply::Ok("text/html", page()),
    ]);
    assert_eq!(fetch(&s.url, T, 1).unwrap(), page());
    let s = serve(vec![Reply::Stall(Duration::from_secs(3))]);
    let e = fetch(&s.url, T, 1).unwrap_err().to_string();
    assert!(e.contains("timed out") && e.contains("2 attempts"), "{e}");
}

#[test]
fn retries_a_truncated_body() {
    let s = serve(vec![
        Reply::Truncated(page()),
        Reply::Ok("text/html", page()),
    ]);
    assert_eq!(fetch(&s.url, T, 2).unwrap(), page());
    let s = serve(vec![Reply::Truncated(page())]);
    let e = fetch(&s.url, T, 1).unwrap_err().to_string();
    assert!(e.contains("cut short"), "{e}");
}

#[test]
fn decodes_gzip() {
    let s = serve(vec![Reply::Gzip(page())]);
    assert_eq!(fetch(&s.url, T, 0).unwrap(), page());
}

#[test]
fn a_404_fails_at_once_and_says_what_to_change() {
    let s = serve(vec![Reply::Status(404)]);
    let e = fetch(&s.url, T, 3).unwrap_err().to_string();
    assert!(e.contains("404") && e.contains("scrape.url"), "{e}");
    assert_eq!(s.hits.load(Ordering::SeqCst), 1, "4xx must not be retried");
}

#[test]
fn a_non_html_body_is_refused() {
    let s = serve(vec![Reply::Ok(
        "application/json",
        b"{\"papers\": []}".to_vec(),
    )]);
    let e = fetch(&s.url, T, 0).unwrap_err().to_string();
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
    let s = serve(vec![Reply::Status(503), Reply::Ok("text/html", page())]);
    let d = tempdir();
    url_recipe(d.path(), &s.url);
    let out = pipeline_ok(d.path(), &["run", "--until", "scrape"]);
    assert!(out.contains("Built scrape"), "{out}");
    assert_eq!(s.hits.load(Ordering::SeqCst), 2);
    // Cached page: a forced rebuild of the stage reads it, no request is made...
    std::fs::remove_dir_all(d.path().join("data/cache/scrape")).unwrap();
    pipeline_ok(d.path(), &["run", "--until", "scrape"]);
    assert_eq!(s.hits.load(Ordering::SeqCst), 2);
    // ...and `--force scrape` fetches it again.
    pipeline_ok(d.path(), &["run", "--until", "scrape", "--force", "scrape"]);
    assert_eq!(s.hits.load(Ordering::SeqCst), 3);
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
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && e.contains("no element") && e.contains("div.nothing"),
        "{e}"
    );
    std::fs::write(d.path().join("pipeline.toml"), cfg(SEL, 9)).unwrap();
    let o = pipeline(d.path(), &["run", "--until", "scrape"]);
    let e = String::from_utf8_lossy(&o.stderr);
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

fn scrape_manifest(dir: &std::path::Path) -> (String, serde_json::Value) {
    let latest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("data/cache/scrape/latest.json")).unwrap())
            .unwrap();
    let key = latest["key"].as_str().unwrap().to_string();
    let m: serde_json::Value = serde_json::from_slice(
        &std::fs::read(dir.join(format!("data/cache/scrape/{key}/manifest.json"))).unwrap(),
    )
    .unwrap();
    (key, m)
}

#[test]
fn an_unreachable_page_falls_back_to_the_bundled_snapshot_and_says_so() {
    // A port with nothing listening: connections are refused at once.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let d = tempdir();
    let recipe = format!(
        "[scrape]\nurl = \"http://127.0.0.1:{port}/virtual/2023/papers.html\"\ncount = 5\ntimeout_secs = 1\nretries = 0\n[split]\ntrain = 2\ntest = 1\n"
    );
    std::fs::write(d.path().join("pipeline.toml"), &recipe).unwrap();
    let o = pipeline(d.path(), &["run", "--until", "scrape"]);
    let err = String::from_utf8_lossy(&o.stderr);
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
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains(&format!("127.0.0.1:{port}")), "{err}");
}

#[test]
fn a_refetched_page_that_changed_gets_a_new_key() {
    let mut other = String::from_utf8(page()).unwrap();
    other = other.replace("Nested", "Different");
    let s = serve(vec![
        Reply::Ok("text/html", page()),
        Reply::Ok("text/html", other.into_bytes()),
    ]);
    let d = tempdir();
    url_recipe(d.path(), &s.url);
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
    assert_eq!(s.hits.load(Ordering::SeqCst), 2);
}

#[test]
fn status_before_the_page_is_fetched_reports_unknown_and_fetches_nothing() {
    let s = serve(vec![Reply::Ok("text/html", page())]);
    let d = tempdir();
    url_recipe(d.path(), &s.url);
    let out = pipeline_ok(d.path(), &["status", "--json"]);
    let json = &out[..out.rfind(']').unwrap() + 1];
    let v: serde_json::Value = serde_json::from_str(json).unwrap();
    for st in v.as_array().unwrap() {
        // No stage's key can be known before the titles are: none may claim "missing".
        assert_eq!(st["state"], "unknown", "{st}");
        assert!(st["key"].is_null(), "{st}");
    }
    assert_eq!(s.hits.load(Ordering::SeqCst), 0);
}
