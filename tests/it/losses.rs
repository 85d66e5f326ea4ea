//! Every pairwise loss against TRL's own loss code (tests/fixtures/trl_losses.py runs it on
//! plain torch tensors): the same fixed log-probs in, the loss and its gradient with respect to
//! each policy log-prob out, to float tolerance.

use crate::support::*;
use candle_core::{DType, Device, Tensor, Var};
use rand::{Rng, SeedableRng};
use reviewer2::dpo::config::Loss;
use reviewer2::dpo::loss::{preference_loss, LossParams, PairLogps};
use serde_json::{json, Value};

/// A case: the loss list, its weights, beta, label_smoothing, simpo_gamma, cpo_alpha, discopop_tau.
type Case = (Vec<Loss>, Vec<f64>, f64, f64, f64, f64, f64);

fn cases() -> Vec<Case> {
    use Loss::*;
    let one = |l: Loss, beta: f64, eps: f64| (vec![l], vec![], beta, eps, 0.5, 1.0, 0.05);
    let mut v = vec![
        // TRL's sigmoid no longer reads label_smoothing (ours keeps cDPO's): compared at 0.
        one(Sigmoid, 0.1, 0.0),
        one(Sigmoid, 0.5, 0.0),
        one(Hinge, 0.1, 0.0),
        one(Ipo, 0.1, 0.0),
        one(Ipo, 0.5, 0.0),
        one(Robust, 0.1, 0.0),
        one(Robust, 0.1, 0.2),
        one(ExoPair, 0.1, 1e-3),
        one(ExoPair, 0.3, 0.1),
        one(NcaPair, 0.1, 0.0),
        one(BcoPair, 0.2, 0.0),
        one(SppoHard, 0.1, 0.0),
        one(SppoHard, 1.0, 0.0),
        one(Aot, 0.1, 0.0),
        one(Aot, 0.2, 0.1),
        one(ApoZero, 0.1, 0.0),
        one(ApoDown, 0.1, 0.0),
        one(Discopop, 0.1, 0.0),
        one(Sft, 0.1, 0.0),
        one(SigmoidNorm, 0.1, 0.0),
        one(SigmoidNorm, 2.0, 0.0),
        one(Simpo, 2.0, 0.0),
        one(Simpo, 2.5, 0.1),
        one(Orpo, 0.1, 0.0),
        one(Orpo, 0.5, 0.0),
    ];
    v.push((vec![Simpo], vec![], 2.0, 0.0, 1.4, 0.0, 0.05));
    v.push((vec![Discopop], vec![], 0.2, 0.0, 0.5, 1.0, 0.3));
    // Lists: summed and averaged losses mixed, with and without weights (as TRL's MPO recipe).
    v.push((vec![Sigmoid, Sft], vec![], 0.1, 0.0, 0.5, 1.0, 0.05));
    v.push((
        vec![Sigmoid, BcoPair, Sft],
        vec![0.8, 0.2, 1.0],
        0.1,
        0.0,
        0.5,
        1.0,
        0.05,
    ));
    v.push((
        vec![Ipo, Hinge, SigmoidNorm, Aot],
        vec![0.3, 1.0, 2.0, 0.5],
        0.2,
        0.0,
        0.5,
        1.0,
        0.05,
    ));
    v.push((vec![Ipo, SigmoidNorm], vec![], 0.1, 0.0, 0.5, 1.0, 0.05));
    v
}

/// Per-pair summed log-probs and token counts: fixed seed, lengths 1 to 40 tokens.
fn pairs() -> Value {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(27);
    let n = 7;
    let mut p = json!({});
    for k in ["nc", "nr"] {
        p[k] = json!((0..n)
            .map(|_| rng.random_range(1..=40usize))
            .collect::<Vec<_>>());
    }
    // Mean log-probs between -3 and -0.05 a token; the reference a little off the policy.
    for (k, nk) in [("pc", "nc"), ("pr", "nr")] {
        let counts: Vec<f64> = serde_json::from_value(p[nk].clone()).unwrap();
        let pol: Vec<f64> = counts
            .iter()
            .map(|c| c * rng.random_range(-3.0..-0.05))
            .collect();
        let r: Vec<f64> = pol
            .iter()
            .map(|x| x + rng.random_range(-2.0..2.0))
            .collect();
        p[k] = json!(pol);
        p[if k == "pc" { "rc" } else { "rr" }] = json!(r);
    }
    p
}

fn vecf(v: &Value) -> Vec<f64> {
    serde_json::from_value(v.clone()).unwrap()
}

/// Our loss, its gradient with respect to the summed policy log-probs, and its logged metrics.
fn ours(p: &Value, c: &Case) -> (f64, Vec<f64>, Vec<f64>, Value) {
    let dev = Device::Cpu;
    let t = |k: &str| Tensor::new(vecf(&p[k]), &dev).unwrap();
    let nc: Vec<usize> = serde_json::from_value(p["nc"].clone()).unwrap();
    let nr: Vec<usize> = serde_json::from_value(p["nr"].clone()).unwrap();
    let (pc, pr) = (
        Var::from_tensor(&t("pc")).unwrap(),
        Var::from_tensor(&t("pr")).unwrap(),
    );
    let averaged = c.0.iter().all(|l| l.averages_logps());
    // The trainer hands over per-token means when every loss averages: means of these sums.
    let form = |x: &Tensor, n: &[usize]| -> Tensor {
        if averaged {
            let n: Vec<f64> = n.iter().map(|&k| k as f64).collect();
            (x / Tensor::new(n, &dev).unwrap()).unwrap()
        } else {
            x.clone()
        }
    };
    let lp = LossParams {
        losses: c.0.clone(),
        weights: c.1.clone(),
        beta: c.2,
        label_smoothing: c.3,
        simpo_gamma: c.4,
        cpo_alpha: c.5,
        discopop_tau: c.6,
    };
    let l = preference_loss(
        &lp,
        &PairLogps {
            pc: &form(pc.as_tensor(), &nc),
            pr: &form(pr.as_tensor(), &nr),
            rc: &form(&t("rc"), &nc),
            rr: &form(&t("rr"), &nr),
            chosen_tokens: &nc,
            rejected_tokens: &nr,
            averaged,
        },
    )
    .unwrap();
    let g = l.loss.backward().unwrap();
    let grad = |v: &Var| -> Vec<f64> {
        // No gradient: the loss does not read it (sft and the rejected responses).
        g.get(v.as_tensor())
            .cloned()
            .unwrap_or_else(|| v.as_tensor().zeros_like().unwrap())
            .to_dtype(DType::F64)
            .unwrap()
            .to_vec1()
            .unwrap()
    };
    let mut logs = json!({});
    if let Some(nll) = l.nll {
        logs["nll_loss"] = json!(nll);
    }
    for (k, v) in &l.logs {
        logs[*k] = json!(v);
    }
    let value = l
        .loss
        .to_dtype(DType::F64)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    (value, grad(&pc), grad(&pr), logs)
}

/// Both sides compute in f64, except TRL's ORPO, which casts the log-probs to f32 first.
fn close(a: f64, b: f64, tol: f64) -> bool {
    (a - b).abs() <= tol * (1.0 + a.abs().max(b.abs()))
}

#[test]
fn every_pairwise_loss_matches_trl_in_value_and_gradient() {
    let py = python();
    // The script's own imports: a torch on the path, or Debian's from another interpreter's.
    let ok = std::process::Command::new(&py)
        .args([
            "-c",
            "import sys, importlib.util as u\ntry:\n import torch\nexcept ImportError:\n \
             sys.path.append('/usr/lib/python3/dist-packages'); sys.modules['numpy'] = None; import torch\n\
             assert u.find_spec('trl')",
        ])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(
        ok,
        "{py} lacks torch or trl, the reference these losses are checked against: run `bash scripts/setup.sh` \
         (Debian's python3-torch and `python3 -m pip install --no-deps trl`)"
    );
    let d = tempdir();
    let p = pairs();
    let cs = cases();
    let input = json!({
        "pairs": p,
        "cases": cs.iter().map(|c| json!({
            "losses": c.0.iter().map(|l| l.name()).collect::<Vec<_>>(),
            "weights": if c.1.is_empty() { Value::Null } else { json!(c.1) },
            "beta": c.2, "label_smoothing": c.3, "simpo_gamma": c.4, "cpo_alpha": c.5,
            "discopop_tau": c.6,
        })).collect::<Vec<_>>(),
    });
    let (inp, out) = (d.path().join("in.json"), d.path().join("out.json"));
    std::fs::write(&inp, input.to_string()).unwrap();
    run_python(
        &py,
        &[
            repo()
                .join("tests/fixtures/trl_losses.py")
                .to_str()
                .unwrap(),
            inp.to_str().unwrap(),
            out.to_str().unwrap(),
        ],
    );
    let trl: Value = serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
    let results = trl["results"].as_array().unwrap();
    assert_eq!(results.len(), cs.len());
    let mut seen = Vec::new();
    for (c, r) in cs.iter().zip(results) {
        let what = format!("{:?} (weights {:?}, beta {}, label_smoothing {}, simpo_gamma {}, cpo_alpha {}, discopop_tau {})", c.0, c.1, c.2, c.3, c.4, c.5, c.6);
        let (v, gc, gr, logs) = ours(&p, c);
        let tol = if c.0.contains(&Loss::Orpo) {
            1e-6
        } else {
            1e-9
        };
        let close = |a: f64, b: f64| close(a, b, tol);
        let want = r["loss"].as_f64().unwrap();
        assert!(close(v, want), "{what}: loss {v}, TRL {want}");
        for (name, g, w) in [
            ("chosen", &gc, vecf(&r["grad_pc"])),
            ("rejected", &gr, vecf(&r["grad_pr"])),
        ] {
            for (i, (a, b)) in g.iter().zip(&w).enumerate() {
                assert!(
                    close(*a, *b),
                    "{what}: d loss / d {name} log-prob of pair {i}: {a}, TRL {b}"
                );
            }
        }
        for k in ["nll_loss", "log_odds_ratio", "log_odds_chosen"] {
            if let Some(want) = r.get(k).and_then(|x| x.as_f64()) {
                let got = logs[k].as_f64().unwrap_or(f64::NAN);
                // TRL logs 0 where cpo_alpha is 0 and never computes it; ours logs it anyway.
                if !(k == "nll_loss" && c.5 == 0.0 && c.0 == [Loss::Simpo]) {
                    assert!(close(got, want), "{what}: {k} {got}, TRL {want}");
                }
            }
        }
        seen.extend(c.0.iter().copied());
    }
    let untested: Vec<_> = Loss::ALL
        .iter()
        .filter(|l| **l != Loss::Kto && !seen.contains(l))
        .collect();
    assert!(untested.is_empty(), "no TRL comparison for {untested:?}");
}
