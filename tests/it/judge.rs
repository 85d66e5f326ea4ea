//! The judges: the lexicon judge against the reference VADER (PyPI `vaderSentiment`), the LLM
//! judge on the real SmolLM2, and the label check merge applies with them.

use crate::support::*;
use reviewer2::config::{JudgeKind, JudgeSettings};
use reviewer2::judge::Judge;

/// Written examples with known polarity, and VADER's rules: negation, "but", capitals,
/// exclamation marks, degree words, emoticons.
const REVIEWS: [&str; 12] = [
    "The paper is poorly written and irrelevant. It's not interesting at all.",
    "The paper is well written, relevant and interesting.",
    "The proposed method has serious technical flaws and is not properly evaluated.",
    "The approach is novel and well defined and does work for blackbox LLMs.",
    "The results are NOT convincing!!!",
    "The method is good, but the evaluation is terrible.",
    "An extremely impressive and elegant contribution :)",
    "I hate how confusing and sloppy this manuscript is.",
    "The paper only provides theoretical results and lacks in experimental validation.",
    "The method is not bad at all.",
    "A solid, useful and clearly presented study.",
    "The authors fail to cite obvious prior work; the claims are wrong and misleading.",
];

#[test]
fn lexicon_judge_agrees_with_the_reference_vader() {
    let py = python_with(&[("vaderSentiment", "vaderSentiment")]);
    let judge = Judge::new(JudgeKind::Lexicon, &JudgeSettings::default(), None).unwrap();
    let ours = judge.score(&REVIEWS).unwrap();
    let script = r#"
import json, sys
from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
a = SentimentIntensityAnalyzer()
print(json.dumps([a.polarity_scores(t)["compound"] for t in json.load(sys.stdin)]))
"#;
    let mut child = std::process::Command::new(&py)
        .args(["-c", script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(serde_json::to_string(&REVIEWS).unwrap().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let reference: Vec<f64> = serde_json::from_slice(&out.stdout).unwrap();
    for ((t, o), r) in REVIEWS.iter().zip(&ours).zip(&reference) {
        // Negativity is the negated compound score, rounded as VADER rounds it: equal.
        assert_eq!(-o, *r, "{t:?}");
    }
    // Known polarity: each harsh review scores above each kind one.
    let harsh = [0usize, 2, 4, 7, 11];
    let kind = [1usize, 3, 6, 10];
    for h in harsh {
        for k in kind {
            assert!(ours[h] > ours[k], "{:?} vs {:?}", REVIEWS[h], REVIEWS[k]);
        }
    }
}

#[test]
fn llm_judge_reads_the_verdict_from_the_real_model() {
    let model = smollm2_model();
    let judge = Judge::new(JudgeKind::Llm, &JudgeSettings::default(), Some(&model)).unwrap();
    let harsh = "This paper is terrible: it is wrong, badly written, and a waste of time.";
    let kind = "This paper is excellent: it is correct, beautifully written, and important.";
    let s = judge.score(&[harsh, kind, harsh]).unwrap();
    assert!(s.iter().all(|p| (0.0..=1.0).contains(p)), "{s:?}");
    assert!(s[0] > s[1], "P(negative): harsh {} vs kind {}", s[0], s[1]);
    // Batched and alone give the same score (padding does not leak into the verdict).
    let alone = judge.score(&[harsh]).unwrap();
    assert!((alone[0] - s[0]).abs() < 1e-4, "{} vs {}", alone[0], s[0]);
    assert_eq!(s[0], s[2]);
}

#[test]
fn label_check_drops_a_mislabeled_pair_and_keeps_the_rest() {
    use reviewer2::stages::merge::{check_labels, Pair};
    let pair = |i: usize, chosen: &str, rejected: &str| Pair {
        title_id: i,
        title: format!("Title {i}"),
        prompt: format!("prompt {i}"),
        chosen: chosen.into(),
        rejected: rejected.into(),
    };
    let pairs = vec![
        pair(0, REVIEWS[0], REVIEWS[1]),
        // Mislabeled: the kind review sits in `chosen`.
        pair(1, REVIEWS[3], REVIEWS[2]),
        pair(2, REVIEWS[7], REVIEWS[10]),
        // Equal scores are not "more negative".
        pair(3, REVIEWS[8], REVIEWS[8]),
    ];
    let judge = Judge::new(JudgeKind::Lexicon, &JudgeSettings::default(), None).unwrap();
    let (kept, out) = check_labels(&judge, pairs.clone(), 0.0).unwrap();
    assert_eq!(kept, vec![pairs[0].clone(), pairs[2].clone()]);
    let ids: Vec<usize> = out.iter().map(|o| o.pair.title_id).collect();
    assert_eq!(ids, [1, 3]);
    assert!(out[0].chosen_score < out[0].rejected_score, "{:?}", out[0]);
    // A margin larger than any pair's difference drops them all.
    let (kept, out) = check_labels(&judge, pairs, 5.0).unwrap();
    assert!(kept.is_empty());
    assert_eq!(out.len(), 4);
}
