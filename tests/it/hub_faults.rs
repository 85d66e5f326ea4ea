//! Model downloads from a Hub-like server on 127.0.0.1 that misbehaves: 5xx answers, bodies cut
//! short, a body whose bytes do not match the SHA-256 the Hub announced (its etag), and a short
//! body with consistent framing. Transient faults are retried, a wrong file is refused and
//! deleted, a lasting fault ends in an error naming the repo, the file and what to do, and no
//! file at its final name in the hf-hub cache is ever truncated or wrong.

use crate::support::hub::{self, Fault, Plan, REPO, SHA};
use crate::support::*;
use reviewer2::fsutil::sha256_hex;
use reviewer2::model::load::source::{
    resolve_spec, FingerprintMemo, HubAccess, ModelSource, ModelSpec,
};
use std::path::{Path, PathBuf};

const FILES: [&str; 4] = [
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "model.safetensors",
];

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
    let hub = hub::serve(src.clone(), plan);
    let cache = d.path().join("hub");
    let got = download(&cache, &hub.url());
    let log = hub.log();
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
        let hub = hub::serve(src.clone(), on_weights(fault));
        let url = hub.url();
        let e = format!("{:#}", download(&cache, &url).unwrap_err());
        for want in [REPO, "model.safetensors", "in 4 tries", "run again", &url] {
            assert!(e.contains(want), "{fault:?}: {want:?} not in: {e}");
        }
        let gets = hub
            .log()
            .iter()
            .filter(|l| l.starts_with("get model.safetensors"))
            .count();
        assert_eq!(gets, 4, "{fault:?}: bounded tries");
        // The small files are in place, the weights are not: nothing truncated at a final name.
        assert_eq!(final_files_are_whole(&cache, &src), 3, "{fault:?}");
    }
    // What the cut tries brought stays as hf-hub's .part file, and a later run resumes it.
    assert_eq!(parts(&cache).len(), 1);
    let hub = hub::serve(src.clone(), hub::no_faults());
    download(&cache, &hub.url()).unwrap();
    assert_eq!(final_files_are_whole(&cache, &src), FILES.len());
    assert!(parts(&cache).is_empty());
    let log = hub.log();
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
        let hub = hub::serve(src.clone(), on_weights(fault));
        let e = format!("{:#}", download(&cache, &hub.url()).unwrap_err());
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
