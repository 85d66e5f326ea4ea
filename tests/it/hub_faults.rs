//! Model downloads from a Hub-like server on 127.0.0.1 that misbehaves: 5xx answers, bodies cut
//! short, a body whose bytes do not match the SHA-256 the Hub announced (its etag), and a short
//! body with consistent framing. Transient faults are retried, a wrong file is refused and
//! deleted, a lasting fault ends in an error naming the repo, the file and what to do, and no
//! file at its final name in the hf-hub cache is ever truncated or wrong.

use crate::support::*;
use reviewer2::fsutil::sha256_hex;
use reviewer2::model::source::{resolve_spec, FingerprintMemo, HubAccess, ModelSource, ModelSpec};
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

const REPO: &str = "tiny-org/tiny-llama";
const SHA: &str = "0123456789abcdef0123456789abcdef01234567";
const FILES: [&str; 4] = [
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "model.safetensors",
];

/// What the server does with one request.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Fault {
    None,
    /// This status and an empty body.
    Status(u16),
    /// The full Content-Length announced, half the bytes sent, then the connection closed.
    Cut,
    /// The right length, one byte changed.
    Corrupt,
    /// Half the bytes, with a Content-Length and Content-Range that say so.
    Short,
}

/// `plan(file, probe, n)`: the fault for the n-th (from 0) probe or body request of `file`.
type Plan = Box<dyn Fn(&str, bool, usize) -> Fault + Send>;
type Log = Arc<Mutex<Vec<String>>>;

/// Serves `<repo>/resolve/main/<file>` from `dir` as the Hub does for hf-hub (a `Range:
/// bytes=0-0` probe answered with the etag, the commit and the size, then a ranged GET), with
/// the faults `plan` asks for. At most 100 connections, then it stops.
fn hub(dir: PathBuf, plan: Plan) -> (String, Log) {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    let log: Log = Default::default();
    let seen = log.clone();
    std::thread::spawn(move || {
        let mut count: BTreeMap<(String, bool), usize> = BTreeMap::new();
        for stream in l.incoming().take(100) {
            let Ok(mut s) = stream else { continue };
            let mut buf = vec![0u8; 16384];
            let n = s.read(&mut buf).unwrap_or(0);
            let req = String::from_utf8_lossy(&buf[..n]).to_string();
            let path = req.split_whitespace().nth(1).unwrap_or("").to_string();
            let range = req
                .lines()
                .find(|l| l.to_ascii_lowercase().starts_with("range:"))
                .map(|l| l.split_once(':').unwrap().1.trim().to_string());
            let file = path.rsplit('/').next().unwrap_or("").to_string();
            let body = path
                .strip_prefix(&format!("/{REPO}/resolve/main/"))
                .and_then(|_| std::fs::read(dir.join(&file)).ok());
            let Some(body) = body else {
                let _ = s.write_all(
                    b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                );
                continue;
            };
            let probe = range.as_deref() == Some("bytes=0-0");
            let start: usize = range
                .as_deref()
                .and_then(|r| r.strip_prefix("bytes="))
                .and_then(|r| r.split('-').next())
                .and_then(|x| x.parse().ok())
                .unwrap_or(0);
            let k = count.entry((file.clone(), probe)).or_default();
            let fault = plan(&file, probe, *k);
            *k += 1;
            seen.lock().unwrap().push(format!(
                "{} {file} from {start}: {fault:?}",
                if probe { "probe" } else { "get" }
            ));
            if let Fault::Status(code) = fault {
                let _ = s.write_all(
                    format!(
                        "HTTP/1.1 {code} Oops\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                    )
                    .as_bytes(),
                );
                continue;
            }
            let mut part = if probe {
                body[..1].to_vec()
            } else {
                body[start..].to_vec()
            };
            let mut len = part.len();
            let mut total = body.len();
            match fault {
                Fault::Corrupt if !probe => {
                    let i = part.len() / 2;
                    part[i] ^= 0x55;
                }
                Fault::Cut if !probe => part.truncate(part.len() / 2),
                Fault::Short if !probe => {
                    part.truncate(part.len() / 2);
                    len = part.len();
                    total = start + len;
                }
                _ => {}
            }
            let end = if probe { 0 } else { start + len - 1 };
            let head = format!(
                "HTTP/1.1 206 Partial Content\r\nContent-Length: {len}\r\nContent-Range: bytes {start}-{end}/{total}\r\nETag: \"{}\"\r\nX-Repo-Commit: {SHA}\r\nConnection: close\r\n\r\n",
                sha256_hex(&body)
            );
            let _ = s.write_all(&[head.into_bytes(), part].concat());
        }
    });
    (url, log)
}

fn download(cache: &Path, endpoint: &str) -> reviewer2::error::Result<ModelSource> {
    let hub = HubAccess {
        cache_dir: cache.to_path_buf(),
        endpoint: Some(endpoint.to_string()),
        token: None,
        offline: false,
    };
    let spec = ModelSpec::Hub {
        repo: REPO.into(),
        revision: "main".into(),
    };
    resolve_spec(&spec, &hub, &FingerprintMemo::new(None))
}

fn repo_dir(cache: &Path) -> PathBuf {
    cache.join("models--tiny-org--tiny-llama")
}

/// Every file at its final name (snapshot links and blobs named by a full etag) holds exactly
/// the served bytes; returns how many of the model's files are there.
fn final_files_are_whole(cache: &Path, src: &Path) -> usize {
    let mut n = 0;
    for f in FILES {
        let good = std::fs::read(src.join(f)).unwrap();
        let blob = repo_dir(cache).join("blobs").join(sha256_hex(&good));
        let link = repo_dir(cache).join("snapshots").join(SHA).join(f);
        for p in [&blob, &link] {
            if p.exists() {
                assert_eq!(
                    std::fs::read(p).unwrap(),
                    good,
                    "{} is at its final name but not whole",
                    p.display()
                );
            }
        }
        n += link.exists() as usize;
    }
    n
}

/// `fault` on every body request of the weights, nothing else.
fn on_weights(fault: Fault) -> Plan {
    Box::new(move |file, probe, _| {
        if file == "model.safetensors" && !probe {
            fault
        } else {
            Fault::None
        }
    })
}

fn parts(cache: &Path) -> Vec<String> {
    std::fs::read_dir(repo_dir(cache).join("blobs"))
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.ends_with(".part"))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn transient_faults_are_retried_and_the_download_completes() {
    let d = tempdir();
    let src = d.path().join("tiny");
    tiny_folder(&src, 32, 1);
    let plan: Plan = Box::new(|file, probe, n| match (file, probe, n) {
        ("config.json", true, 0) => Fault::Status(503),
        ("tokenizer.json", false, 0) => Fault::Cut,
        ("model.safetensors", false, 0) => Fault::Status(500),
        ("model.safetensors", false, 1) => Fault::Cut,
        // Resumed from the cut: the rest arrives with one byte wrong, so the whole file fails
        // its hash and is downloaded again from the start.
        ("model.safetensors", false, 2) => Fault::Corrupt,
        _ => Fault::None,
    });
    let (url, log) = hub(src.clone(), plan);
    let cache = d.path().join("hub");
    let got = download(&cache, &url);
    let log = log.lock().unwrap().clone();
    let got = got.unwrap_or_else(|e| panic!("{e:#}\n{log:#?}"));
    assert_eq!(got.identity, format!("hub:{REPO}@{SHA}"));
    assert_eq!(final_files_are_whole(&cache, &src), FILES.len());
    assert!(parts(&cache).is_empty(), "{:?}", parts(&cache));
    // The resumed request asked for the rest only.
    assert!(
        log.iter()
            .any(|l| l.starts_with("get model.safetensors from ") && !l.contains("from 0:")),
        "{log:#?}"
    );
    let gets = log
        .iter()
        .filter(|l| l.starts_with("get model.safetensors"))
        .count();
    assert_eq!(gets, 4, "{log:#?}");
}

#[test]
fn lasting_faults_end_in_an_error_naming_the_repo_and_file_and_a_cut_file_resumes_later() {
    let d = tempdir();
    let src = d.path().join("tiny");
    tiny_folder(&src, 32, 1);
    let cache = d.path().join("hub");
    for fault in [Fault::Status(502), Fault::Cut] {
        let (url, log) = hub(src.clone(), on_weights(fault));
        let e = format!("{:#}", download(&cache, &url).unwrap_err());
        for want in [REPO, "model.safetensors", "in 4 tries", "run again", &url] {
            assert!(e.contains(want), "{fault:?}: {want:?} not in: {e}");
        }
        let gets = log
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.starts_with("get model.safetensors"))
            .count();
        assert_eq!(gets, 4, "{fault:?}: bounded tries");
        // The small files are in place, the weights are not: nothing truncated at a final name.
        assert_eq!(final_files_are_whole(&cache, &src), 3, "{fault:?}");
    }
    // What the cut tries brought stays as hf-hub's .part file, and a later run resumes it.
    assert_eq!(parts(&cache).len(), 1);
    let (url, log) = hub(src.clone(), Box::new(|_, _, _| Fault::None));
    download(&cache, &url).unwrap();
    assert_eq!(final_files_are_whole(&cache, &src), FILES.len());
    assert!(parts(&cache).is_empty());
    let log = log.lock().unwrap().clone();
    assert!(
        log.iter()
            .any(|l| l.starts_with("get model.safetensors") && !l.contains("from 0:")),
        "{log:#?}"
    );
}

#[test]
fn a_file_that_does_not_match_its_hash_is_refused_and_deleted() {
    let d = tempdir();
    let src = d.path().join("tiny");
    tiny_folder(&src, 32, 1);
    for fault in [Fault::Corrupt, Fault::Short] {
        let cache = d.path().join(format!("hub-{fault:?}"));
        let (url, _) = hub(src.clone(), on_weights(fault));
        let e = format!("{:#}", download(&cache, &url).unwrap_err());
        for want in [REPO, "model.safetensors", "SHA-256", "was deleted"] {
            assert!(e.contains(want), "{fault:?}: {want:?} not in: {e}");
        }
        assert_eq!(final_files_are_whole(&cache, &src), 3, "{fault:?}");
        assert!(parts(&cache).is_empty(), "{fault:?}: {:?}", parts(&cache));
        // Nothing of it at all under the snapshot or the blobs but the lock file hf-hub keeps.
        let good = sha256_hex(&std::fs::read(src.join("model.safetensors")).unwrap());
        let left: Vec<String> = std::fs::read_dir(repo_dir(&cache).join("blobs"))
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(&good) && !n.ends_with(".lock"))
            .collect();
        assert!(left.is_empty(), "{fault:?}: {left:?}");
    }
}
