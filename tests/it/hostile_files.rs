//! Hostile files (issue 23): what someone else can put where the pipeline reads. A planted export
//! marker that names files outside the export folder, leftovers of killed runs, odd names in the
//! resumable folders, and a page that is a gzip bomb or announces a body over the limit. Each
//! is refused or ignored with a message naming it; nothing outside is deleted, nothing panics,
//! and memory stays bounded.

use crate::reliability::{tiny_settings, train_tiny};
use crate::support::http::{FakeServer, Reply};
use crate::support::*;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

/// A pid no process can have (Linux pids stay below 2^22): the leftovers of a run that is gone.
const DEAD_PID: u32 = (1 << 22) + 1;

// ---- export --force and the marker it trusts ----

#[test]
fn export_force_refuses_a_marker_naming_files_outside_the_folder_and_deletes_nothing() {
    let d = tempdir();
    small_recipe(d.path(), 3, 2, 1, 6, "");
    pipeline_ok(d.path(), &["run", "--until", "split"]);
    pipeline_ok(d.path(), &["export", "--out", "hub"]);
    let hub = d.path().join("hub");
    let marker = hub.join(".reviewer2-export.json");
    let original: serde_json::Value = read_json(&marker);
    let exported: Vec<String> = serde_json::from_value(original["files"].clone()).unwrap();
    let victim = d.path().join("victim.txt");
    std::fs::write(&victim, "mine").unwrap();
    let absolute = victim.display().to_string();
    // Each of these markers had `--force` delete victim.txt (but for the link, which only lost
    // itself). A link is made for its own case only, and listed, so that it is no stray file.
    let link = |name: &str, to: &Path| {
        std::os::unix::fs::symlink(to, hub.join(name)).unwrap();
        Some(name.to_string())
    };
    for (entry, why) in [
        ("../victim.txt", "not a plain relative path"),
        (absolute.as_str(), "not a plain relative path"),
        ("data/../../victim.txt", "not a plain relative path"),
        ("data/link.txt", "leads outside the folder"),
        ("data/up/victim.txt", "leads outside the folder"),
    ] {
        let made = match entry {
            "data/link.txt" => link("data/link.txt", &victim),
            "data/up/victim.txt" => link("data/up", d.path()),
            _ => None,
        };
        // The bad entry first: it is the one the error must name.
        let mut files = vec![entry.to_string()];
        files.extend(exported.iter().cloned());
        files.extend(made.clone());
        let mut m = original.clone();
        m["files"] = serde_json::json!(files);
        std::fs::write(&marker, serde_json::to_vec_pretty(&m).unwrap()).unwrap();
        let o = pipeline(d.path(), &["export", "--out", "hub", "--force"]);
        let e = stderr_of(&o);
        assert_eq!(o.status.code(), Some(1), "{entry}: {e}");
        assert!(
            e.contains("hub/.reviewer2-export.json")
                && e.contains(&format!("{entry:?}"))
                && e.contains(why)
                && e.contains("deleted nothing")
                && e.contains("Remove that entry"),
            "{entry}: {e}"
        );
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "mine", "{entry}");
        // The previous export is untouched, and nothing was staged beside it.
        for f in &exported {
            assert!(hub.join(f).is_file(), "{entry}: {f} is gone");
        }
        let beside: Vec<String> = std::fs::read_dir(d.path())
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains("export"))
            .collect();
        assert!(beside.is_empty(), "{entry}: {beside:?}");
        if let Some(l) = made {
            std::fs::remove_file(hub.join(l)).unwrap();
        }
    }
    // With the marker as export wrote it, --force replaces the export again.
    std::fs::write(&marker, serde_json::to_vec_pretty(&original).unwrap()).unwrap();
    pipeline_ok(d.path(), &["export", "--out", "hub", "--force"]);
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "mine");
    assert!(hub.join("README.md").is_file());
}

// ---- leftovers of killed runs ----

#[test]
fn leftovers_of_dead_runs_are_swept_and_nothing_else() {
    let d = tempdir();
    std::fs::write(
        d.path().join("pipeline.toml"),
        "[scrape]\nsnapshot = \"bundled\"\ncount = 3\n[split]\ntrain = 2\ntest = 1\n",
    )
    .unwrap();
    let stage = d.path().join("data/cache/scrape");
    std::fs::create_dir_all(&stage).unwrap();
    let gone = [
        format!(".old-0123456789abcdef-{DEAD_PID}"),
        format!(".tmp-0123456789abcdef-{DEAD_PID}"),
    ];
    for g in &gone {
        std::fs::create_dir_all(stage.join(g)).unwrap();
        std::fs::write(stage.join(g).join("titles.jsonl"), "{}\n").unwrap();
    }
    let tmp_file = format!(".latest.json.tmp-{DEAD_PID}");
    std::fs::write(stage.join(&tmp_file), "{").unwrap();
    // Pid 1 is alive: its leftovers may be a running process's. The others are not our names.
    let kept = [
        ".old-0123456789abcdef-1".to_string(),
        ".notes.tmp-draft".to_string(),
        "old-notes".to_string(),
    ];
    for k in &kept {
        std::fs::write(stage.join(k), "someone's").unwrap();
    }
    pipeline_ok(d.path(), &["run", "--until", "scrape"]);
    for g in gone.iter().chain([&tmp_file]) {
        assert!(stage.join(g).symlink_metadata().is_err(), "{g} was kept");
    }
    for k in &kept {
        assert!(stage.join(k).is_file(), "{k} was swept");
    }
}

// ---- odd names in the resumable folders ----

#[test]
fn odd_names_in_a_generate_partial_folder_are_ignored_with_a_warning() {
    let d = tempdir();
    small_recipe(d.path(), 3, 2, 1, 6, "");
    pipeline_ok(d.path(), &["run", "--until", "generate"]);
    let gen = latest_build(&d.path().join("data"), "generate");
    let want = std::fs::read_to_string(gen.join("generations.jsonl")).unwrap();
    let lines: Vec<&str> = want.lines().collect();
    assert_eq!(lines.len(), 6);
    let partial = PathBuf::from(format!("{}.partial", gen.display()));
    std::fs::create_dir_all(&partial).unwrap();
    std::fs::write(
        partial.join("chunk-00001.jsonl"),
        format!("{}\n{}\n", lines[0], lines[1]),
    )
    .unwrap();
    // Whole, readable records under names generate never writes: none of them may count.
    let rows = format!("{}\n{}\n", lines[2], lines[3]);
    let odd = [
        "chunk-0000é.jsonl",
        "chunk-7.jsonl",
        "chunk-00002.jsonl.bak",
        "chunk-+0002.jsonl",
        "notes.txt",
    ];
    for n in odd {
        std::fs::write(partial.join(n), &rows).unwrap();
    }
    std::fs::create_dir_all(partial.join("chunk-00003.jsonl")).unwrap();
    let o = pipeline(
        d.path(),
        &["run", "--until", "generate", "--force", "generate"],
    );
    let e = stderr_of(&o);
    assert!(o.status.success(), "{e}");
    assert!(!e.contains("panicked"), "{e}");
    for n in odd.iter().chain(&["chunk-00003.jsonl"]) {
        assert!(
            e.lines()
                .any(|l| l.contains("ignoring") && l.contains(&format!("{n}:"))),
            "no warning names {n}: {e}"
        );
    }
    assert!(e.contains("2 of 6 prompts already done"), "{e}");
    assert_eq!(
        std::fs::read_to_string(
            latest_build(&d.path().join("data"), "generate").join("generations.jsonl")
        )
        .unwrap(),
        want
    );
}

/// Copy a checkpoint folder (flat: files only).
fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

#[test]
fn odd_names_in_the_checkpoint_folder_are_not_resumed_from() {
    let s = tiny_settings(2, 2, 0);
    let a = tempdir();
    let (want, _) = train_tiny(&s, a.path(), None, |_| {});
    let b = tempdir();
    let (got, resumed) = train_tiny(&s, b.path(), Some(5), |ck| {
        // A checkpoint past the run's 8 steps (a whole, readable one), copies under names the
        // trainer never writes, and junk: none of them may be resumed from.
        copy_dir(&ck.join("checkpoint-4"), &ck.join("checkpoint-9"));
        let state = ck.join("checkpoint-9/state.json");
        let mut st: serde_json::Value = read_json(&state);
        st["step"] = 9.into();
        std::fs::write(&state, st.to_string()).unwrap();
        for odd in ["checkpoint-0é", "checkpoint-06", "checkpoint-+6"] {
            copy_dir(&ck.join("checkpoint-4"), &ck.join(odd));
        }
        std::fs::write(ck.join("notes.txt"), "x").unwrap();
    });
    assert_eq!(resumed, Some(4));
    assert_eq!(got, want);
}

// ---- a page over scrape.max_page_bytes ----

/// The page's path on the test server.
const PAGE: &str = "/virtual/2023/papers.html";

/// `n` bytes of an HTML page (its head, then zeros), gzip-compressed without ever holding them.
fn gzip_bomb(n: usize) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    let head = b"<!doctype html><html><body>";
    e.write_all(head).unwrap();
    let zeros = vec![0u8; 1 << 20];
    let mut left = n - head.len();
    while left > 0 {
        let k = left.min(zeros.len());
        e.write_all(&zeros[..k]).unwrap();
        left -= k;
    }
    e.finish().unwrap()
}

/// Run `pipeline ARGS` in `dir` and return its exit code, its stderr and its peak resident
/// memory in bytes, as the kernel counted it for that one process (`wait4`'s `ru_maxrss`).
// The child is reaped by `wait4`, which std's `Child` does not know of.
#[allow(clippy::zombie_processes)]
fn run_measured(dir: &Path, args: &[&str]) -> (Option<i32>, String, u64) {
    let err_path = dir.join("stderr.txt");
    let child = pipeline_cmd(dir)
        .args(args)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&err_path).unwrap())
        .spawn()
        .unwrap();
    let mut status = 0;
    // SAFETY: an all-zero rusage is a valid value of that plain C struct.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `child` is this process's own child, not yet waited for (std's `Child` is never
    // waited on after this); `status` and `usage` are valid for writes for the call.
    let pid = unsafe { libc::wait4(child.id() as libc::pid_t, &mut status, 0, &mut usage) };
    assert_eq!(pid, child.id() as libc::pid_t, "wait4 failed");
    let code = libc::WIFEXITED(status).then(|| libc::WEXITSTATUS(status));
    // Linux counts ru_maxrss in KiB.
    let peak = usage.ru_maxrss as u64 * 1024;
    (code, std::fs::read_to_string(err_path).unwrap(), peak)
}

const MIB: u64 = 1 << 20;

#[test]
fn a_gzip_bomb_is_refused_with_the_setting_named_and_memory_stays_low() {
    // 200 MiB of page in about 200 KiB on the wire.
    let bomb = gzip_bomb(200 << 20);
    assert!(bomb.len() < 1 << 20, "{} bytes compressed", bomb.len());
    let s = FakeServer::scripted(vec![
        Reply::ok("text/html", bomb).header("Content-Encoding", "gzip")
    ]);
    let d = tempdir();
    let recipe = format!(
        "[scrape]\nurl = \"{}\"\nfallback = false\nretries = 2\ncount = 3\ntimeout_secs = 20\n[split]\ntrain = 2\ntest = 1\n",
        s.url(PAGE)
    );
    std::fs::write(d.path().join("pipeline.toml"), recipe).unwrap();
    // The same command on a page it can read: the process's own size, the baseline.
    let (code, e, base) = run_measured(
        d.path(),
        &[
            "run",
            "--until",
            "scrape",
            "--set",
            "scrape.snapshot=\"bundled\"",
        ],
    );
    assert_eq!(code, Some(0), "{e}");
    let (code, e, peak) = run_measured(
        d.path(),
        &[
            "run",
            "--until",
            "scrape",
            "--force",
            "scrape",
            "--set",
            "scrape.max_page_bytes=8388608",
        ],
    );
    // A remote failure (README, "Exit codes"), not retried: the same request brings the same bomb.
    assert_eq!(code, Some(4), "{e}");
    assert!(
        e.contains("scrape.max_page_bytes") && e.contains("over the limit of 8388608"),
        "{e}"
    );
    assert_eq!(s.hits(), 1, "{e}");
    // Reading the whole bomb holds at least its 200 MiB (twice: the body, then its copy).
    // Bounded, the fetch holds at most the 8 MiB limit over what the same command holds on the
    // small bundled page (16 MiB here), twice were the buffer to double once more: 32 MiB over
    // leaves room for the decoder, the runtime's threads and allocator slack.
    assert!(
        peak < base + 32 * MIB,
        "peak RSS {} MiB, {} MiB on the bundled page",
        peak / MIB,
        base / MIB
    );
    assert!(
        !d.path().join("data/cache/pages").exists()
            || walk_files(&d.path().join("data/cache/pages")).is_empty(),
        "nothing of the refused page may be kept"
    );
}

fn walk_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        if e.path().is_dir() {
            out.extend(walk_files(&e.path()));
        } else {
            out.push(e.path());
        }
    }
    out
}

#[test]
fn a_content_length_over_the_limit_is_refused_before_the_body_is_read() {
    let body = [
        b"<!doctype html><html>".to_vec(),
        vec![b' '; 2 * MIB as usize],
    ]
    .concat();
    let s = FakeServer::scripted(vec![Reply::ok("text/html", body)]);
    let e = reviewer2::stages::scrape::fetch(&s.url(PAGE), Duration::from_secs(5), 3, MIB)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains(&format!("{} bytes", 2 * MIB + 21))
            && e.contains("over the limit of 1048576")
            && e.contains("scrape.max_page_bytes"),
        "{e}"
    );
    assert_eq!(s.hits(), 1, "an answer over the limit must not be retried");
}

#[test]
fn scrape_max_page_bytes_under_1_kib_is_refused_naming_the_key() {
    let d = tempdir();
    std::fs::write(
        d.path().join("pipeline.toml"),
        "[scrape]\nsnapshot = \"bundled\"\ncount = 3\nmax_page_bytes = 512\n[split]\ntrain = 2\ntest = 1\n",
    )
    .unwrap();
    let o = pipeline(d.path(), &["run", "--until", "scrape"]);
    let e = stderr_of(&o);
    assert_eq!(o.status.code(), Some(2), "{e}");
    assert!(
        e.contains("scrape.max_page_bytes") && e.contains("at least 1024"),
        "{e}"
    );
}
