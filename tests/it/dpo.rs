//! DPO: gradients checked by finite differences, losses against hand-computed values, TRL's
//! truncation and masking, and on the real SmolLM2 model: learning, kill/resume, the PEFT files.

use crate::support::*;
use candle_core::{DType, Device, Tensor};
use reviewer2::config::TrainSettings;
use reviewer2::dpo::config::Loss;
use reviewer2::dpo::data::{truncate, Example, Truncation, TruncationReport};
use reviewer2::dpo::logps::{sequence_logps, sequence_logps_with, SeqLogps};
use reviewer2::dpo::loss::{dpo_loss, kto_loss};
use reviewer2::model::llama::{Llama, Mode, TrainPass};
use reviewer2::model::lora::{LoraSpec, Projection};

const LN2: f64 = std::f64::consts::LN_2;

/// `m` with a fresh rank-`r` adapter on every projection, drawn from `seed`.
fn with_lora(mut m: Llama, r: usize, dropout: f64, seed: u64) -> Llama {
    let spec = LoraSpec {
        r,
        alpha: 2.0 * r as f64,
        dropout,
        targets: Projection::ALL.to_vec(),
    };
    let adapter = m.new_adapter(&spec, seed).unwrap();
    m.attach(adapter).unwrap();
    m
}

fn seqs() -> Vec<(Vec<u32>, Vec<u32>)> {
    vec![
        (vec![1, 5, 9, 3], vec![7, 8, 2]),
        (vec![1, 4], vec![11, 12, 13, 14, 2]),
        (vec![1, 6, 6, 6, 6, 30], vec![2]),
        // Shares the first prompt: packed into its row, as a pair's rejected response is.
        (vec![1, 5, 9, 3], vec![21, 22, 23, 24, 25, 2]),
    ]
}

/// A tiny f64 model with rank-2 LoRA on every target. B starts at zero, which would zero A's
/// gradient: B gets random values so both are exercised.
fn tiny_f64_with_lora(seed: u64, dropout: f64) -> (Llama, Vec<(String, candle_core::Var)>) {
    let m = with_lora(tiny_llama(11, DType::F64), 2, dropout, seed);
    let vars = m.adapter().unwrap().vars();
    for (name, v) in vars.iter() {
        if name.ends_with("lora_B.weight") {
            let t = Tensor::randn(0f64, 0.3, v.as_tensor().shape(), &Device::Cpu).unwrap();
            v.set(&t).unwrap();
        }
    }
    (m, vars)
}

#[test]
fn lora_gradients_match_finite_differences_through_the_whole_training_forward() {
    let (m, vars) = tiny_f64_with_lora(3, 0.0);
    let data = seqs();
    let refs: Vec<(&[u32], &[u32])> = data.iter().map(|(p, r)| (&p[..], &r[..])).collect();
    let w = seq_weights();
    let mode = train_mode(None, false);
    let f = || -> f64 {
        let lp = sequence_logps(&m, &refs, mode, false).unwrap().logps;
        (lp * &w)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    };
    let lp = sequence_logps(&m, &refs, mode, false).unwrap().logps;
    let grads = (lp * &w).unwrap().sum_all().unwrap().backward().unwrap();
    let h = 1e-5;
    assert_eq!(vars.len(), 2 * 7 * 2);
    for (name, v) in &vars {
        let g = grads
            .get(v.as_tensor())
            .unwrap_or_else(|| panic!("{name} got no gradient"));
        let gv: Vec<f64> = g.flatten_all().unwrap().to_vec1().unwrap();
        assert!(gv.iter().any(|x| x.abs() > 1e-8), "{name}: zero gradient");
        let base: Vec<f64> = v.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
        for &k in &[0usize, base.len() / 2, base.len() - 1] {
            let set = |x: f64| {
                let mut b = base.clone();
                b[k] = x;
                v.set(&Tensor::from_vec(b, v.as_tensor().shape(), &Device::Cpu).unwrap())
                    .unwrap();
            };
            set(base[k] + h);
            let up = f();
            set(base[k] - h);
            let down = f();
            set(base[k]);
            let fd = (up - down) / (2.0 * h);
            let err = (fd - gv[k]).abs() / (fd.abs().max(gv[k].abs()).max(1e-6));
            assert!(
                err < 1e-5,
                "{name}[{k}]: analytic {} vs finite difference {fd} (rel err {err})",
                gv[k]
            );
        }
    }
}

/// Weights of the four `seqs()` log-probs in the scalar the gradient tests differentiate.
fn seq_weights() -> Tensor {
    Tensor::new(&[0.7f64, -1.3, 0.4, 0.9], &Device::Cpu).unwrap()
}

/// The log-probs of `out` and every LoRA tensor's gradient of their weighted sum, carried on
/// through the layers when the forward was checkpointed.
fn logps_and_lora_grads(
    m: &Llama,
    vars: &[(String, candle_core::Var)],
    out: SeqLogps,
) -> (Vec<f64>, Vec<Vec<f64>>) {
    let mut grads = (&out.logps * seq_weights())
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    if let Some(c) = out.ckpt {
        c.backward(m, &mut grads).unwrap();
    }
    let g = vars
        .iter()
        .map(|(name, v)| {
            let g = grads
                .get(v.as_tensor())
                .unwrap_or_else(|| panic!("{name}: no gradient"));
            g.flatten_all().unwrap().to_vec1().unwrap()
        })
        .collect();
    (out.logps.to_vec1().unwrap(), g)
}

fn train_mode(dropout_seed: Option<u64>, checkpoint: bool) -> Mode {
    Mode::Train(TrainPass {
        lora: true,
        dropout_seed,
        checkpoint,
    })
}

#[test]
fn shared_prompts_pack_into_one_row_with_the_same_logps_and_gradients() {
    let (m, vars) = tiny_f64_with_lora(5, 0.0);
    let data = seqs();
    let refs: Vec<(&[u32], &[u32])> = data.iter().map(|(p, r)| (&p[..], &r[..])).collect();
    let run = |share: bool| {
        let out = sequence_logps_with(&m, &refs, train_mode(None, false), false, share).unwrap();
        let (ml, tk) = (out.mean_logits.clone(), out.tokens.clone());
        let (lp, g) = logps_and_lora_grads(&m, &vars, out);
        (lp, ml, tk, g)
    };
    let (lp1, ml1, tk1, g1) = run(true);
    let (lp2, ml2, tk2, g2) = run(false);
    assert_eq!(tk1, tk2);
    for (a, b) in lp1.iter().zip(&lp2) {
        assert!((a - b).abs() < 1e-10, "packed {a} vs separate {b}");
    }
    for (a, b) in ml1.iter().zip(&ml2) {
        assert!(
            (a - b).abs() < 1e-5,
            "mean logits: packed {a} vs separate {b}"
        );
    }
    for ((name, _), (a, b)) in vars.iter().zip(g1.iter().zip(&g2)) {
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() < 1e-9, "{name}: packed {x} vs separate {y}");
        }
    }
}

#[test]
fn gradient_checkpointing_gives_the_same_gradients() {
    // Dropout on, so the recomputed layers must draw the same masks as the first pass.
    let (m, vars) = tiny_f64_with_lora(9, 0.2);
    let data = seqs();
    let refs: Vec<(&[u32], &[u32])> = data.iter().map(|(p, r)| (&p[..], &r[..])).collect();
    let run = |checkpoint: bool| {
        let out = sequence_logps(&m, &refs, train_mode(Some(7), checkpoint), false).unwrap();
        assert_eq!(out.ckpt.is_some(), checkpoint);
        logps_and_lora_grads(&m, &vars, out)
    };
    let (lp1, g1) = run(true);
    let (lp2, g2) = run(false);
    assert_eq!(lp1, lp2);
    for ((name, _), (a, b)) in vars.iter().zip(g1.iter().zip(&g2)) {
        assert!(a.iter().any(|x| x.abs() > 1e-8), "{name}: zero gradient");
        for (x, y) in a.iter().zip(b) {
            assert!(
                (x - y).abs() < 1e-12,
                "{name}: checkpointed {x} vs kept {y}"
            );
        }
    }
}

#[test]
fn losses_match_hand_computed_values() {
    let d = Device::Cpu;
    let t = |x: f64| Tensor::new(&[x], &d).unwrap();
    let (pc, pr, rc, rr) = (t(-10.0), t(-12.0), t(-11.0), t(-11.5));
    let beta = 0.1;
    let x: f64 = (-10.0 - -12.0) - (-11.0 - -11.5); // 1.5
    let ls = |z: f64| -(1.0 + (-z).exp()).ln(); // log sigmoid
    let val = |kind: Loss, eps: f64| -> f64 {
        dpo_loss(kind, beta, eps, &pc, &pr, &rc, &rr)
            .unwrap()
            .loss
            .to_scalar::<f64>()
            .unwrap()
    };
    let close = |a: f64, b: f64| assert!((a - b).abs() < 1e-12, "{a} vs {b}");
    close(val(Loss::Sigmoid, 0.0), -ls(beta * x));
    close(
        val(Loss::Sigmoid, 0.1),
        -0.9 * ls(beta * x) - 0.1 * ls(-beta * x),
    );
    close(val(Loss::Hinge, 0.0), 1.0 - beta * x);
    close(val(Loss::Ipo, 0.0), (x - 1.0 / (2.0 * beta)).powi(2));
    close(
        val(Loss::Robust, 0.1),
        (-0.9 * ls(beta * x) + 0.1 * ls(-beta * x)) / 0.8,
    );
    let l = dpo_loss(Loss::Sigmoid, beta, 0.0, &pc, &pr, &rc, &rr).unwrap();
    assert!(
        (l.chosen_rewards[0] - 0.1).abs() < 1e-6 && (l.rejected_rewards[0] + 0.05).abs() < 1e-6
    );
    // At x = 0 the sigmoid loss is ln 2 whatever beta.
    close(
        dpo_loss(
            Loss::Sigmoid,
            0.5,
            0.0,
            &t(-3.0),
            &t(-4.0),
            &t(-3.0),
            &t(-4.0),
        )
        .unwrap()
        .loss
        .to_scalar::<f64>()
        .unwrap(),
        LN2,
    );
    // KTO: desirable 1 - s(b(lr - z)), undesirable 1 - s(b(z - lr)).
    let p = Tensor::new(&[-5.0f64, -7.0], &d).unwrap();
    let r = Tensor::new(&[-6.0f64, -6.0], &d).unwrap();
    let s = |z: f64| 1.0 / (1.0 + (-z).exp());
    let k = kto_loss(beta, &p, &r, &[true, false], 0.2)
        .unwrap()
        .loss
        .to_scalar::<f64>()
        .unwrap();
    close(
        k,
        ((1.0 - s(beta * (1.0 - 0.2))) + (1.0 - s(beta * (0.2 - -1.0)))) / 2.0,
    );
}

#[test]
fn truncation_follows_trl_and_counts_rows() {
    let t = Truncation {
        max_length: 10,
        max_prompt_length: 6,
        keep_end: true,
    };
    let ex = |p: usize, c: usize, r: usize| Example {
        prompt: (0..p as u32).collect(),
        chosen: (100..100 + c as u32).collect(),
        rejected: (200..200 + r as u32).collect(),
        label: None,
    };
    let mut rep = TruncationReport::default();
    // Fits: untouched.
    assert_eq!(truncate(ex(5, 5, 3), &t, &mut rep), ex(5, 5, 3));
    // Prompt too long: keep_end keeps its last 6 tokens; then prompt 6 + 4 fits.
    let a = truncate(ex(9, 4, 2), &t, &mut rep);
    assert_eq!(a.prompt, (3..9).collect::<Vec<u32>>());
    assert_eq!(a.chosen.len(), 4);
    // Still too long after the prompt cut: responses cut to max_length - max_prompt_length = 4.
    let b = truncate(ex(9, 7, 5), &t, &mut rep);
    assert_eq!(
        (b.prompt.len(), b.chosen, b.rejected),
        (6, vec![100, 101, 102, 103], vec![200, 201, 202, 203])
    );
    // keep_start keeps the beginning.
    let ks = Truncation {
        keep_end: false,
        ..t
    };
    assert_eq!(
        truncate(ex(9, 4, 2), &ks, &mut rep).prompt,
        (0..6).collect::<Vec<u32>>()
    );
    // A short prompt with a long response: only the response is cut.
    let c = truncate(ex(3, 12, 2), &t, &mut rep);
    assert_eq!(
        (c.prompt.len(), c.chosen.len(), c.rejected.len()),
        (3, 4, 2)
    );
    assert_eq!((rep.rows, rep.prompts_cut, rep.responses_cut), (5, 3, 2));
}

#[test]
fn only_response_tokens_count_and_step_zero_is_ln2() {
    let m = tiny_llama(11, DType::F64);
    let data = seqs();
    let refs: Vec<(&[u32], &[u32])> = data.iter().map(|(p, r)| (&p[..], &r[..])).collect();
    let mode = train_mode(None, false);
    let lp: Vec<f64> = sequence_logps(&m, &refs, mode, false)
        .unwrap()
        .logps
        .to_vec1()
        .unwrap();
    // By hand from the full logits of each sequence alone: sum over response positions only.
    for (i, (p, r)) in data.iter().enumerate() {
        let ids: Vec<u32> = p.iter().chain(r).copied().collect();
        let x = Tensor::new(ids.as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let logits = m.forward_all(&x, mode).unwrap().squeeze(0).unwrap();
        let lsm: Vec<Vec<f64>> = candle_nn::ops::log_softmax(&logits, 1)
            .unwrap()
            .to_vec2()
            .unwrap();
        let want: f64 = r
            .iter()
            .enumerate()
            .map(|(j, &t)| lsm[p.len() + j - 1][t as usize])
            .sum();
        assert!((lp[i] - want).abs() < 1e-10, "row {i}: {} vs {want}", lp[i]);
    }
    // Step 0 of training: policy == reference, loss ln 2, rewards 0.
    let s = TrainSettings {
        batch_size: 2,
        max_steps: 3,
        ..TrainSettings::default()
    };
    let exs: Vec<Example> = data
        .iter()
        .map(|(p, r)| Example {
            prompt: p.clone(),
            chosen: r.clone(),
            rejected: vec![17, 18, 2],
            label: None,
        })
        .collect();
    // Reference log-probs are stored as f32, so train in f32 as real runs do. They are
    // batched as the step batches its rows: gemm's rounding of a row depends on how many rows
    // it multiplies with, so other batchings differ in the last bit.
    let model = with_smollm2_tokenizer(with_lora(tiny_llama(11, DType::F32), 4, 0.05, 1));
    let refs = reviewer2::dpo::trainer::reference_logps(&model, &exs, 2, false).unwrap();
    let d = tempdir();
    let tr = reviewer2::dpo::trainer::Trainer {
        model: &model,
        s: &s,
        train: &exs,
        eval: &[],
        ref_train: &refs,
        ref_eval: &[],
        ckpt_dir: d.path().to_path_buf(),
        quiet: true,
    };
    let m0 = tr.probe(0).unwrap();
    assert_eq!(m0["loss"].as_f64().unwrap() as f32, LN2 as f32, "{m0:?}");
    for k in ["rewards/chosen", "rewards/rejected", "rewards/margins"] {
        assert_eq!(m0[k].as_f64().unwrap(), 0.0, "{k}: {m0:?}");
    }
}

/// TRL's `rpo_alpha`: the loss gains `rpo_alpha` times the chosen responses' NLL, the mean over
/// every chosen token of the batch (TRL's `F.cross_entropy(..., ignore_index)` over the chosen
/// half), and `nll_loss` is logged. Training with it keeps the chosen responses likelier.
#[test]
fn rpo_alpha_adds_the_chosen_tokens_nll_and_keeps_them_likely() {
    // The same weights and adapter for every run (training changes the adapter in place).
    let fresh = || with_smollm2_tokenizer(with_lora(tiny_llama(11, DType::F32), 4, 0.0, 3));
    // Chosen responses of different lengths: a mean of per-row means would differ.
    let exs: Vec<Example> = (0..4u32)
        .map(|i| Example {
            prompt: vec![1, 3 + i, 5],
            chosen: (0..(2 + 3 * i)).map(|k| 10 + (k + i) % 9).collect(),
            rejected: vec![17 + i, 18, 2],
            label: None,
        })
        .collect();
    let refs = reviewer2::dpo::trainer::reference_logps(&fresh(), &exs, 4, false).unwrap();
    let d = tempdir();
    let run = |rpo: f64, steps: usize| {
        let model = fresh();
        let s = TrainSettings {
            batch_size: 4,
            max_steps: steps,
            learning_rate: 2e-2,
            logging_steps: 1,
            rpo_alpha: rpo,
            ..TrainSettings::default()
        };
        let tr = reviewer2::dpo::trainer::Trainer {
            model: &model,
            s: &s,
            train: &exs,
            eval: &[],
            ref_train: &refs,
            ref_eval: &[],
            ckpt_dir: d.path().join(format!("rpo-{rpo}")),
            quiet: true,
        };
        if steps == 0 {
            vec![serde_json::Value::Object(tr.probe(0).unwrap())]
        } else {
            tr.run(None).unwrap().log
        }
    };
    // Step 0: the policy is the reference, so the NLL is the reference's, by hand.
    let tokens: usize = exs.iter().map(|e| e.chosen.len()).sum();
    let nll = -refs.iter().map(|r| r.0 as f64).sum::<f64>() / tokens as f64;
    let m0 = &run(0.5, 0)[0];
    let got = m0["nll_loss"].as_f64().unwrap();
    assert!(
        (got - nll).abs() < 1e-4 * nll.abs(),
        "nll_loss {got} vs {nll}"
    );
    let loss = m0["loss"].as_f64().unwrap();
    assert!(
        (loss - (LN2 + 0.5 * nll)).abs() < 1e-4,
        "loss {loss} vs ln 2 + 0.5 x {nll}"
    );
    assert!(run(0.0, 0)[0].get("nll_loss").is_none(), "off: not logged");
    // Trained alike, with and without it: the chosen log-probs end higher with it.
    let with = run(1.0, 8);
    let without = run(0.0, 8);
    let last = |l: &[serde_json::Value]| l.last().unwrap()["logps/chosen"].as_f64().unwrap();
    assert!(
        last(&with) > last(&without) + 0.1,
        "chosen log-probs with RPO {} vs without {}",
        last(&with),
        last(&without)
    );
}

#[test]
fn kto_trains_on_unpaired_rows() {
    let s = TrainSettings {
        loss: reviewer2::dpo::config::Losses::one(Loss::Kto),
        batch_size: 4,
        max_steps: 4,
        learning_rate: 1e-2,
        ..TrainSettings::default()
    };
    let model = with_smollm2_tokenizer(with_lora(tiny_llama(11, DType::F32), 4, 0.0, 2));
    let exs: Vec<Example> = (0..8u32)
        .map(|i| Example {
            prompt: vec![1, 3 + i],
            chosen: vec![10 + i, 20, 2],
            rejected: vec![],
            label: Some(i % 2 == 0),
        })
        .collect();
    let refs = reviewer2::dpo::trainer::reference_logps(&model, &exs, 4, false).unwrap();
    let d = tempdir();
    let tr = reviewer2::dpo::trainer::Trainer {
        model: &model,
        s: &s,
        train: &exs,
        eval: &[],
        ref_train: &refs,
        ref_eval: &[],
        ckpt_dir: d.path().to_path_buf(),
        quiet: true,
    };
    let out = tr.run(None).unwrap();
    let first = out.log[0]["loss"].as_f64().unwrap();
    assert!(
        first.is_finite() && (first - 0.5).abs() < 0.05,
        "KTO starts near 0.5: {first}"
    );
    let margins = out.log.last().unwrap()["rewards/margins"].as_f64().unwrap();
    assert!(
        margins > 0.0,
        "desirable rewards rise above undesirable ones: {:?}",
        out.log.last()
    );
}

#[test]
fn eval_metrics_are_means_over_rows_whatever_the_batch_size() {
    // 5 eval rows: at batch 2 the last batch holds one row, which a mean of batch means would
    // weigh double (TRL's Trainer weighs rows).
    let model = with_smollm2_tokenizer(with_lora(tiny_llama(11, DType::F32), 4, 0.0, 3));
    let exs: Vec<Example> = (0..5u32)
        .map(|i| Example {
            prompt: vec![1, 3 + i],
            chosen: vec![10 + i, 20, 2],
            rejected: vec![30 + i, 2],
            label: None,
        })
        .collect();
    // Reference log-probs shifted per row, so every row has a different loss, and no margin
    // is zero (whose sign, and so accuracy, would rest on gemm's last bit: a row's rounding
    // depends on the rows batched with it).
    let refs: Vec<(f32, f32)> = reviewer2::dpo::trainer::reference_logps(&model, &exs, 5, false)
        .unwrap()
        .into_iter()
        .enumerate()
        .map(|(i, (c, r))| (c - 3.0 * i as f32 - 1.5, r + 2.0 * i as f32 + 1.0))
        .collect();
    let d = tempdir();
    let eval_at = |batch_size: usize| {
        let s = TrainSettings {
            batch_size,
            ..TrainSettings::default()
        };
        let tr = reviewer2::dpo::trainer::Trainer {
            model: &model,
            s: &s,
            train: &[],
            eval: &exs,
            ref_train: &[],
            ref_eval: &refs,
            ckpt_dir: d.path().to_path_buf(),
            quiet: true,
        };
        tr.evaluate().unwrap()
    };
    let one = eval_at(1);
    // The row losses by hand: before training the policy equals the true reference (B = 0),
    // and the stored chosen reference fell by 3i + 1.5 while the rejected one rose by 2i + 1,
    // so x = (pc - pr) - (rc - rr) = 5i + 2.5 and the loss is -log sigmoid(0.1 x).
    let want: f64 = (0..5)
        .map(|i| (1.0 + (-0.1 * (5.0 * i as f64 + 2.5)).exp()).ln())
        .sum::<f64>()
        / 5.0;
    let l1 = one["eval_loss"].as_f64().unwrap();
    assert!((l1 - want).abs() < 1e-5, "{l1} vs {want}");
    for bs in [2, 3, 5] {
        let m = eval_at(bs);
        for k in [
            "eval_loss",
            "eval_rewards/accuracies",
            "eval_rewards/margins",
        ] {
            let (a, b) = (m[k].as_f64().unwrap(), one[k].as_f64().unwrap());
            assert!(
                (a - b).abs() < 1e-5,
                "batch {bs}, {k}: {a} vs {b} at batch 1"
            );
        }
    }
}

// ---- the real model ----

const PEFT_010_KEYS: [&str; 24] = [
    "alpha_pattern",
    "auto_mapping",
    "base_model_name_or_path",
    "bias",
    "fan_in_fan_out",
    "inference_mode",
    "init_lora_weights",
    "layer_replication",
    "layers_pattern",
    "layers_to_transform",
    "loftq_config",
    "lora_alpha",
    "lora_dropout",
    "megatron_config",
    "megatron_core",
    "modules_to_save",
    "peft_type",
    "r",
    "rank_pattern",
    "revision",
    "target_modules",
    "task_type",
    "use_dora",
    "use_rslora",
];

fn train_recipe(dir: &std::path::Path, extra: &str) {
    small_recipe(dir, 12, 10, 2, 20, &format!("[prompts]\nstyle = \"plain\"\nshots = 2\n\n[train]\nbatch_size = 2\nlearning_rate = 1e-3\nlogging_steps = 4\nmax_length = 160\nmax_prompt_length = 128\n{extra}"));
}

#[test]
fn real_model_learns_resumes_and_saves_a_peft_adapter() {
    let d = tempdir();
    train_recipe(
        d.path(),
        "max_steps = 24\neval_steps = 12\nsave_steps = 6\n",
    );
    // The eval stage is the eval tests' (`--until train` saves its minute here, twice).
    let out = pipeline_ok(d.path(), &["run", "--until", "train"]);
    assert!(out.contains("Built train"), "{out}");
    let tdir = latest_build(&d.path().join("data"), "train");
    let log = read_jsonl(&tdir.join("metrics.jsonl"));
    let train: Vec<&serde_json::Value> = log.iter().filter(|m| m.get("loss").is_some()).collect();
    let evals: Vec<&serde_json::Value> = log
        .iter()
        .filter(|m| m.get("eval_loss").is_some())
        .collect();
    assert_eq!(train.len(), 6);
    // The baseline before the first update, then every eval_steps.
    let steps: Vec<i64> = evals.iter().map(|m| m["step"].as_i64().unwrap()).collect();
    assert_eq!(steps, [0, 12, 24]);
    for k in [
        "rewards/chosen",
        "rewards/rejected",
        "rewards/accuracies",
        "rewards/margins",
        "logps/chosen",
        "logps/rejected",
        "logits/chosen",
        "logits/rejected",
        "learning_rate",
        "grad_norm",
        "epoch",
    ] {
        assert!(train[0].get(k).is_some(), "missing {k}");
        if !["learning_rate", "grad_norm", "epoch"].contains(&k) {
            assert!(
                evals[0].get(format!("eval_{k}")).is_some(),
                "missing eval_{k}"
            );
        }
    }
    let last: Vec<&&serde_json::Value> = train.iter().rev().take(2).collect();
    let loss = last
        .iter()
        .map(|m| m["loss"].as_f64().unwrap())
        .sum::<f64>()
        / 2.0;
    let acc = last
        .iter()
        .map(|m| m["rewards/accuracies"].as_f64().unwrap())
        .sum::<f64>()
        / 2.0;
    assert!(
        loss < LN2 - 0.05,
        "training loss did not fall below ln 2: {loss} ({log:?})"
    );
    assert!(acc > 0.5, "accuracies did not rise above 0.5: {acc}");
    assert!(tdir.join("loss.png").is_file() && tdir.join("margins.png").is_file());

    // PEFT format: exactly PEFT 0.10's keys; names and shapes.
    let cfg: serde_json::Map<String, serde_json::Value> =
        read_json(&tdir.join("adapter_config.json"));
    let mut keys: Vec<&str> = cfg.keys().map(|k| k.as_str()).collect();
    keys.sort();
    assert_eq!(keys, PEFT_010_KEYS.to_vec());
    assert_eq!(
        cfg["target_modules"],
        serde_json::json!(["q_proj", "k_proj", "v_proj"])
    );
    let bytes = std::fs::read(tdir.join("adapter_model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(st.len(), 30 * 3 * 2);
    let mut params = 0;
    for (name, view) in st.tensors() {
        let shape = view.shape().to_vec();
        params += shape.iter().product::<usize>();
        let m = regex_like(&name);
        let out = if m.1 == "q_proj" { 576 } else { 192 };
        match m.2.as_str() {
            "A" => assert_eq!(shape, vec![8, 576], "{name}"),
            _ => assert_eq!(shape, vec![out, 8], "{name}"),
        }
        assert_eq!(view.dtype(), safetensors::Dtype::F32);
        assert!(m.0 < 30);
    }
    assert_eq!(params, 30 * (8 * 576 * 3 + 576 * 8 + 192 * 8 * 2));

    // Loaded back onto the base, the adapter reproduces the trained model's eval log-probs.
    let mut model = smollm2_model();
    model.load_adapter(&tdir).unwrap();
    let loaded = reviewer2::config::load(&reviewer2::config::Sources {
        file: d.path().join("pipeline.toml"),
        must_exist: true,
        ..Default::default()
    })
    .unwrap();
    let raw =
        reviewer2::dpo::data::load_dataset(&latest_build(&d.path().join("data"), "split")).unwrap();
    let prep =
        reviewer2::dpo::trainer::prepare(&model, &loaded.settings.train, &raw.train, &raw.test)
            .unwrap();
    let refs: Vec<(&[u32], &[u32])> = prep
        .eval
        .iter()
        .map(|e| (&e.prompt[..], &e.chosen[..]))
        .collect();
    let lp: Vec<f32> = sequence_logps(&model.llama, &refs, train_mode(None, false), false)
        .unwrap()
        .logps
        .to_vec1()
        .unwrap();
    let mean = lp.iter().map(|x| *x as f64).sum::<f64>() / lp.len() as f64;
    let logged = evals.last().unwrap()["eval_logps/chosen"].as_f64().unwrap();
    assert!(
        (mean - logged).abs() < 1e-3,
        "reloaded adapter gives {mean}, training logged {logged}"
    );

    // merge-adapter: a plain folder whose model gives the same log-probs.
    let merged = d.path().join("merged");
    pipeline_ok(
        d.path(),
        &[
            "merge-adapter",
            "--adapter",
            tdir.to_str().unwrap(),
            "--out",
            merged.to_str().unwrap(),
        ],
    );
    let msrc = reviewer2::model::load::source::resolve(merged.to_str().unwrap(), "main").unwrap();
    let mm = reviewer2::model::load::Model::load(
        &msrc,
        &reviewer2::model::options::LoadOptions::cpu_f32(),
    )
    .unwrap();
    let lp2: Vec<f32> = sequence_logps(&mm.llama, &refs, Mode::infer(), false)
        .unwrap()
        .logps
        .to_vec1()
        .unwrap();
    for (a, b) in lp.iter().zip(&lp2) {
        assert!((a - b).abs() < 2e-2, "merged {b} vs adapter {a}");
    }
    // The merge is PEFT's, W' = W + (alpha / r) B A, checked with plain loops on layer 0's v_proj
    // (no RoPE permutation in its layout): W read from the GGUF by candle's own reader, A and B
    // from the adapter file, W' from the merged folder.
    let acfg: serde_json::Value = read_json(&tdir.join("adapter_config.json"));
    let scale = acfg["lora_alpha"].as_f64().unwrap() / acfg["r"].as_f64().unwrap();
    let cpu = candle_core::Device::Cpu;
    let ad = candle_core::safetensors::load(tdir.join("adapter_model.safetensors"), &cpu).unwrap();
    let name =
        |ab: &str| format!("base_model.model.model.layers.0.self_attn.v_proj.lora_{ab}.weight");
    let a: Vec<Vec<f32>> = ad[&name("A")].to_vec2().unwrap();
    let b: Vec<Vec<f32>> = ad[&name("B")].to_vec2().unwrap();
    let merged_w: Vec<Vec<f32>> =
        candle_core::safetensors::load(merged.join("model.safetensors"), &cpu).unwrap()
            ["model.layers.0.self_attn.v_proj.weight"]
            .to_dtype(DType::F32)
            .unwrap()
            .to_vec2()
            .unwrap();
    let mut f = std::fs::File::open(smollm2()).unwrap();
    let gguf = candle_core::quantized::gguf_file::Content::read(&mut f).unwrap();
    let base_w: Vec<Vec<f32>> = gguf
        .tensor(&mut f, "blk.0.attn_v.weight", &cpu)
        .unwrap()
        .dequantize(&cpu)
        .unwrap()
        .to_vec2()
        .unwrap();
    let mut moved = 0f64;
    for (i, row) in merged_w.iter().enumerate() {
        for (j, m) in row.iter().enumerate() {
            let ba: f64 = (0..a.len()).map(|k| b[i][k] as f64 * a[k][j] as f64).sum();
            let want = base_w[i][j] as f64 + scale * ba;
            assert!(
                (*m as f64 - want).abs() < 1e-5,
                "v_proj[{i}][{j}]: {m} vs {want}"
            );
            moved += (scale * ba).abs();
        }
    }
    assert!(moved > 0.0, "training moved the merged weights");
    // sample --adapter --compare runs and prints both.
    let s = pipeline_ok(
        d.path(),
        &[
            "sample",
            "--title",
            "Attention Is All You Need",
            "--adapter",
            tdir.to_str().unwrap(),
            "--compare",
            "-q",
        ],
    );
    assert!(s.contains("base:") && s.contains("adapter:"), "{s}");

    // Kill mid-training, resume: the same final adapter as the uninterrupted run.
    let e = tempdir();
    train_recipe(
        e.path(),
        "max_steps = 24\neval_steps = 12\nsave_steps = 6\n",
    );
    copy_dir(&d.path().join("data"), &e.path().join("data"));
    std::fs::remove_dir_all(e.path().join("data/cache/train")).unwrap();
    let mut child = pipeline_cmd(e.path())
        .args(["run", "--until", "train", "-q"])
        .spawn()
        .unwrap();
    let t0 = std::time::Instant::now();
    loop {
        let found = std::fs::read_dir(e.path().join("data/cache/train"))
            .into_iter()
            .flatten()
            .flatten()
            .any(|p| {
                std::fs::read_dir(p.path())
                    .into_iter()
                    .flatten()
                    .flatten()
                    .any(|c| c.file_name().to_string_lossy() == "checkpoint-12")
            });
        if found || t0.elapsed().as_secs() > 600 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let out = pipeline_ok(e.path(), &["run", "--until", "train"]);
    assert!(
        out.contains("Resuming") && out.contains("checkpoint-1"),
        "{out}"
    );
    let a = std::fs::read(tdir.join("adapter_model.safetensors")).unwrap();
    let b = std::fs::read(
        latest_build(&e.path().join("data"), "train").join("adapter_model.safetensors"),
    )
    .unwrap();
    assert!(a == b, "resumed adapter differs from the uninterrupted one");
    let la = std::fs::read_to_string(tdir.join("metrics.jsonl")).unwrap();
    let lb = std::fs::read_to_string(
        latest_build(&e.path().join("data"), "train").join("metrics.jsonl"),
    )
    .unwrap();
    assert_eq!(la, lb);
}

/// (layer, module, "A"|"B") from a PEFT tensor name, checking its whole shape.
fn regex_like(name: &str) -> (usize, String, String) {
    let rest = name
        .strip_prefix("base_model.model.model.layers.")
        .unwrap_or_else(|| panic!("{name}"));
    let (layer, rest) = rest.split_once('.').unwrap();
    let rest = rest
        .strip_prefix("self_attn.")
        .unwrap_or_else(|| panic!("{name}"));
    let (module, rest) = rest.split_once('.').unwrap();
    let ab = match rest {
        "lora_A.weight" => "A",
        "lora_B.weight" => "B",
        _ => panic!("{name}"),
    };
    (layer.parse().unwrap(), module.to_string(), ab.to_string())
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            copy_dir(&p, &to.join(e.file_name()));
        } else {
            std::fs::copy(&p, to.join(e.file_name())).unwrap();
        }
    }
}
