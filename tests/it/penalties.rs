//! Sampling penalties (`generate.repetition_penalty`, `frequency_penalty`, `presence_penalty`):
//! the repetition penalty against transformers' own processor transcribed to numpy, the real
//! SmolLM2 looping less with it, each row of a batch penalized by its own history, and with the
//! penalties off the text the engine wrote before they existed.

use crate::support::*;
use reviewer2::model::generate::{
    generate, penalize, prefill_padded, History, Penalties, Request, Sampling,
};
use reviewer2::model::llama::Mode;
use reviewer2::model::load::Model;
use serde_json::json;

/// transformers' `RepetitionPenaltyLogitsProcessor.__call__` on 2-D scores (the path
/// `generate` takes, `normalize=False`) and its `_apply_penalty`, transcribed line by line from
/// huggingface/transformers, src/transformers/generation/logits_process.py (commit
/// 00857b6cf63a4fa05cbd9bdc8a4fd78b6168c5af), with torch's gather / where / scatter replaced by
/// numpy's take_along_axis / where / put_along_axis. float32 scores and a Python float penalty,
/// as in torch: the arithmetic stays in float32.
const TRANSFORMERS_REPETITION: &str = r#"
import json, sys
import numpy as np

a = json.loads(sys.argv[1])
out = []
for case in a:
    input_ids = np.array(case["input_ids"], dtype=np.int64)
    scores = np.array(case["scores"], dtype=np.float32)
    penalty = float(case["penalty"])

    # if input_ids.dim() == 1: input_ids = input_ids.unsqueeze(1)
    if input_ids.ndim == 1:
        input_ids = input_ids[:, None]
    # score = torch.gather(scores, 1, input_ids)
    score = np.take_along_axis(scores, input_ids, axis=1)
    # _apply_penalty, normalize=False:
    # torch.where(score < 0, score * penalty, score / penalty)
    score = np.where(score < 0, score * penalty, score / penalty)
    # scores_processed = scores.scatter(1, input_ids, score)
    scores_processed = scores.copy()
    np.put_along_axis(scores_processed, input_ids, score, axis=1)
    assert scores_processed.dtype == np.float32
    out.append(scores_processed.tolist())
print(json.dumps(out))
"#;

/// The repetition penalty equals transformers' processor to the bit, on logits of both signs
/// and zero, with ids repeated in the sequence (penalized once, not once per occurrence), for a
/// penalty above 1, one below (a reward), and with the sequence split anywhere between prompt
/// and generated tokens.
#[test]
fn the_repetition_penalty_is_transformers_processor() {
    let py = python_with(&[("numpy", "numpy")]);
    let vocab = 40;
    let scores = |seed: u32| -> Vec<f32> {
        (0..vocab)
            .map(|i| {
                // Spread over [-6, 6) with exact zeros: a fixed pattern, no generator needed.
                let k = (i * 7 + seed * 13) % 24;
                (k as f32 - 12.0) * 0.5 + if k % 5 == 2 { 0.0 } else { 0.123 }
            })
            .collect()
    };
    // Rows of one batch have the same length in transformers; ids repeat within a row.
    let rows: Vec<Vec<u32>> = vec![
        vec![3, 17, 3, 3, 0, 39, 17, 12],
        vec![12, 12, 12, 12, 5, 24, 30, 1],
    ];
    let seen: Vec<f32> = rows
        .iter()
        .enumerate()
        .flat_map(|(r, ids)| ids.iter().map(move |&t| scores(r as u32)[t as usize]))
        .collect();
    assert!(
        seen.contains(&0.0) && seen.iter().any(|&x| x < 0.0) && seen.iter().any(|&x| x > 0.0),
        "the penalized logits cover both signs and zero: {seen:?}"
    );
    let mut cases = Vec::new();
    for penalty in [1.3f64, 0.6, 2.0] {
        cases.push(json!({
            "penalty": penalty,
            "input_ids": rows,
            "scores": (0..rows.len() as u32).map(scores).collect::<Vec<_>>(),
        }));
    }
    let out = run_python(
        &py,
        &["-c", TRANSFORMERS_REPETITION, &json!(cases).to_string()],
    );
    let want: Vec<Vec<Vec<f64>>> = serde_json::from_str(out.trim()).unwrap();
    let mut moved = 0;
    for (case, want) in cases.iter().zip(&want) {
        let penalty = case["penalty"].as_f64().unwrap();
        let p = Penalties {
            repetition: penalty,
            ..Penalties::OFF
        };
        for (r, ids) in rows.iter().enumerate() {
            let want: Vec<f32> = want[r].iter().map(|&x| x as f32).collect();
            // Whatever part of the sequence is the prompt: the repetition penalty reads both.
            for split in [0, 3, ids.len()] {
                let mut h = History::new(&ids[..split]);
                ids[split..].iter().for_each(|&t| h.push(t));
                let mut got = scores(r as u32);
                penalize(&mut got, &p, &h);
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(
                    bits(&got),
                    bits(&want),
                    "penalty {penalty}, row {r}, prompt of {split}:\n ours {got:?}\n transformers {want:?}"
                );
                moved += got
                    .iter()
                    .zip(scores(r as u32))
                    .filter(|(a, b)| *a != b)
                    .count();
            }
        }
    }
    assert!(
        moved > 0,
        "the penalty moved no logit: the test checks nothing"
    );
}

/// Repeated token 4-grams: occurrences beyond each 4-gram's first.
fn repeated_4grams(t: &[u32]) -> usize {
    let grams: Vec<&[u32]> = t.windows(4).collect();
    let distinct: std::collections::HashSet<&[u32]> = grams.iter().copied().collect();
    grams.len() - distinct.len()
}

/// Each prompt's tokens (prompt `i` is request `i`), `batch` rows at a time.
fn run(m: &Model, prompts: &[Vec<u32>], s: &Sampling, batch: usize) -> Vec<Vec<u32>> {
    let mut out = vec![Vec::new(); prompts.len()];
    let reqs: Vec<Request> = prompts
        .iter()
        .enumerate()
        .map(|(id, ids)| Request {
            id,
            ids: ids.clone(),
        })
        .collect();
    generate(m, reqs, s, batch, |o, _| {
        out[o.id] = o.tokens;
        Ok(())
    })
    .unwrap();
    out
}

/// The real SmolLM2, greedy, on a prompt that makes it loop ("I'm a big apple." over and over):
/// a repetition penalty of 1.3 (transformers' CTRL paper suggests about 1.2) leaves far fewer
/// repeated 4-grams, and so does a presence penalty. Each token of the penalized run is the
/// argmax of the logits of the prompt and the tokens before it, recomputed whole and penalized
/// from a history built from scratch: the decoder's incremental history (prompt ids from the
/// start, each accepted token counted once) is what transformers' `input_ids` would be.
#[test]
fn a_repetition_penalty_stops_the_real_model_looping() {
    let m = smollm2_model();
    let ids = m
        .meta
        .tok
        .encode("I like apples. I like apples. I like", true)
        .unwrap();
    let s = |p: Penalties| Sampling {
        penalties: p,
        ..Sampling::greedy(64)
    };
    let base = run(&m, std::slice::from_ref(&ids), &s(Penalties::OFF), 1).remove(0);
    let rep = Penalties {
        repetition: 1.3,
        ..Penalties::OFF
    };
    let pres = Penalties {
        presence: 0.5,
        ..Penalties::OFF
    };
    let with_rep = run(&m, std::slice::from_ref(&ids), &s(rep), 1).remove(0);
    let with_pres = run(&m, std::slice::from_ref(&ids), &s(pres), 1).remove(0);
    let (b, r, p) = (
        repeated_4grams(&base),
        repeated_4grams(&with_rep),
        repeated_4grams(&with_pres),
    );
    let text = |t: &[u32]| m.meta.tok.decode(t, true).unwrap();
    eprintln!(
        "repeated 4-grams: off {b}, repetition 1.3 {r}, presence 0.5 {p}\n off: {:?}\n rep: {:?}",
        text(&base),
        text(&with_rep)
    );
    assert!(
        b >= 20,
        "the prompt no longer makes the model loop ({b}): {:?}",
        text(&base)
    );

    // Every penalized token against the logits recomputed from scratch. Whole-prompt prefill
    // and cached decoding round differently in the last bits: a near-tie may go either way.
    for (step, &tok) in with_rep.iter().enumerate() {
        let seq: Vec<u32> = ids.iter().chain(&with_rep[..step]).copied().collect();
        let (_, _, lg) = prefill_padded(
            &m,
            &[Request {
                id: 0,
                ids: seq.clone(),
            }],
            seq.len() + 1,
            Mode::infer(),
        )
        .unwrap();
        let mut lg = lg.into_iter().next().unwrap();
        let mut h = History::new(&ids);
        with_rep[..step].iter().for_each(|&t| h.push(t));
        penalize(&mut lg, &rep, &h);
        let max = lg.iter().copied().fold(f32::MIN, f32::max);
        assert!(
            lg[tok as usize] >= max - 1e-3,
            "step {step}: token {tok} has penalized logit {} but the best is {max}",
            lg[tok as usize]
        );
    }
    assert!(r * 4 <= b, "repetition 1.3: {r} repeated 4-grams, off {b}");
    assert!(p * 4 <= b, "presence 0.5: {p} repeated 4-grams, off {b}");
}

/// Two prompts decoded in one batch with penalties give each the tokens it gets alone (f32
/// weights: every row its solo text at any batch size), so no row reads another's history.
#[test]
fn each_row_of_a_batch_is_penalized_by_its_own_history() {
    let m = smollm2_model();
    let enc = |t: &str| m.meta.tok.encode(t, true).unwrap();
    let prompts = vec![
        enc("I like apples. I like apples. I like"),
        enc("The paper is good. The paper is good. The paper is"),
    ];
    let s = Sampling {
        penalties: Penalties {
            repetition: 1.2,
            frequency: 0.4,
            presence: 0.3,
        },
        ..Sampling::greedy(24)
    };
    let together = run(&m, &prompts, &s, 2);
    for (i, p) in prompts.iter().enumerate() {
        let alone = run(&m, std::slice::from_ref(p), &s, 1).remove(0);
        assert_eq!(together[i], alone, "prompt {i}");
    }
    assert_ne!(together[0], together[1]);
}

/// Penalties at their off values write the same text as penalties left out, and a penalty
/// changes it. Three reviews drawn at temperature 1.5 without top-k or top-p, so every draw of
/// every token shows in the text. (That the default path writes what it wrote before penalties
/// existed was checked against the binary of 73cfd6d when they landed: the same `sample` text
/// and the quick recipe's `generations.jsonl` byte for byte. A text pinned here would hold
/// only on the CPU that recorded it.)
#[test]
fn with_penalties_off_sample_writes_todays_text() {
    let d = tempdir();
    let cfg = repo().join("pipeline.toml");
    let model = format!("generate.model={}", smollm2().display());
    let mut args = vec![
        "sample",
        "--config",
        cfg.to_str().unwrap(),
        "--preset",
        "quick",
        "--workdir",
        d.path().to_str().unwrap(),
        "--no-adapter",
        "--title",
        "Attention Is All You Need",
        "--n",
        "3",
        "-q",
        "--set",
        &model,
    ];
    for s in [
        "generate.weights=f32",
        "generate.temperature=1.5",
        "generate.top_k=0",
        "generate.top_p=1",
        "generate.max_new_tokens=24",
    ] {
        args.extend(["--set", s]);
    }
    let o = pipeline(d.path(), &args);
    assert!(o.status.success(), "{}", stderr_of(&o));
    let today = String::from_utf8_lossy(&o.stdout).to_string();
    assert_eq!(today.lines().count(), 3, "{today}");
    let mut off = args.clone();
    for s in [
        "generate.repetition_penalty=1",
        "generate.frequency_penalty=0",
        "generate.presence_penalty=0",
    ] {
        off.extend(["--set", s]);
    }
    let o = pipeline(d.path(), &off);
    assert!(o.status.success(), "{}", stderr_of(&o));
    assert_eq!(String::from_utf8_lossy(&o.stdout), today);
    // And a penalty changes it: the same command is not blind to the setting.
    args.extend(["--set", "generate.presence_penalty=0.5"]);
    let o = pipeline(d.path(), &args);
    assert!(o.status.success(), "{}", stderr_of(&o));
    assert_ne!(String::from_utf8_lossy(&o.stdout), today);
}
