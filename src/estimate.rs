//! How long the stages a run is about to build will take, roughly, on this device.
//!
//! A FLOP count over the recipe (model parameters x tokens to generate or train on) divided by
//! an effective rate. The CPU rates were measured with `pipeline bench` on the 2-core machine of
//! docs/PERF.md (SmolLM2-135M: about 200 generated tok/s at batch 64, a DPO step at batch 4 x 256
//! tokens in 6.8 s) and scale with the core count; the GPU rates are guesses until a GPU run is
//! recorded. The point is the order of magnitude: minutes, hours, or days.

use crate::config::Settings;
use crate::stages::rounds::Step;
use crate::stages::{Node, Stage};

/// Effective FLOP/s of batched generation and of a checkpointed LoRA DPO step.
#[derive(Clone, Copy)]
struct Rates {
    generate: f64,
    /// The generate stage's rate: on a GGUF's blocks (`weights = "blocks"`, `auto` on AVX2 and
    /// AVX-512 VNNI CPUs, with the run-wide prefix store) this one; else `generate`'s. The eval
    /// and the rounds' reviews run on dense weights at `generate`.
    generate_blocks: f64,
    train: f64,
    measured: bool,
}

fn rates(cuda: bool, cores: usize) -> Rates {
    if cuda {
        return Rates {
            generate: 2e12,
            generate_blocks: 2e12,
            train: 5e13,
            measured: false,
        };
    }
    let cores = cores as f64;
    // docs/PERF.md: 2 * 135M params * ~150 tok/s at batch 16, and 6 * 135M * ~1000 tok / 6.8 s.
    // On the blocks (2026-12-06): 300 reviews of (64 + 60) counted tokens in 16 to 21 s, about
    // 5e11 at the slower end.
    Rates {
        generate: 4.0e10 * cores / 2.0,
        generate_blocks: 5.0e11 * cores / 2.0,
        train: 1.2e11 * cores / 2.0,
        measured: true,
    }
}

/// One stage's estimate, in seconds, with what it counted.
pub(crate) struct StageEstimate {
    pub(crate) stage: Node,
    pub(crate) seconds: f64,
    pub(crate) what: String,
}

pub(crate) struct Estimate {
    pub(crate) stages: Vec<StageEstimate>,
    pub(crate) total: f64,
    pub(crate) device: &'static str,
    /// The figures come from measurements on this kind of device (else they are guesses).
    pub(crate) measured: bool,
}

/// The estimate for building `todo`. `params`: the generation and training models' parameter
/// counts (None when unknown, e.g. a Hub model not downloaded yet). `blocks`: the generate stage
/// runs on a GGUF's blocks.
pub(crate) fn estimate(
    s: &Settings,
    todo: &[Node],
    params: (Option<u64>, Option<u64>),
    cuda: bool,
    blocks: bool,
) -> Estimate {
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2);
    let mut r = rates(cuda, cores);
    if !blocks {
        r.generate_blocks = r.generate;
    }
    estimate_with(s, todo, params, cuda, r)
}

/// A few-shot chat prompt is about 170 tokens, of which the shared prefix is computed once.
const PROMPT_TOKENS: f64 = 60.0;

/// [`estimate`] for a CPU with `cores` cores (the rates scale with them), dense weights.
#[cfg(test)]
fn estimate_on(
    s: &Settings,
    todo: &[Node],
    params: (Option<u64>, Option<u64>),
    cuda: bool,
    cores: usize,
) -> Estimate {
    let mut r = rates(cuda, cores);
    r.generate_blocks = r.generate;
    estimate_with(s, todo, params, cuda, r)
}

fn estimate_with(
    s: &Settings,
    todo: &[Node],
    params: (Option<u64>, Option<u64>),
    cuda: bool,
    r: Rates,
) -> Estimate {
    let out: Vec<StageEstimate> = todo
        .iter()
        .map(|&node| {
            let (seconds, what) = match node {
                Node::Stage(st) => stage(s, st, params, &r),
                Node::Round(_, step) => round(s, step, params.1, &r),
            };
            StageEstimate {
                stage: node,
                seconds,
                what,
            }
        })
        .collect();
    let total = out
        .iter()
        .map(|e| e.seconds)
        .filter(|x| x.is_finite())
        .sum();
    Estimate {
        stages: out,
        total,
        device: if cuda { "GPU" } else { "CPU" },
        measured: r.measured,
    }
}

/// Seconds to write `n` reviews with a model of `params` parameters, each prompt `prompt`
/// tokens of new work.
fn reviews(
    s: &Settings,
    n: f64,
    prompt: f64,
    params: Option<u64>,
    r: &Rates,
    what: String,
) -> (f64, String) {
    let tokens = n * (s.generate.max_new_tokens as f64 + prompt);
    match params {
        Some(p) => (2.0 * p as f64 * tokens / r.generate, what),
        None => (f64::NAN, "model size unknown until it is downloaded".into()),
    }
}

/// Seconds of DPO on `rows` pairs for `max_steps` steps (or `epochs` passes when 0).
fn training(
    s: &Settings,
    rows: f64,
    (max_steps, epochs): (usize, usize),
    params: Option<u64>,
    r: &Rates,
) -> (f64, String) {
    let t = &s.train;
    let per_step = (t.batch_size * t.gradient_accumulation_steps) as f64;
    let steps = if max_steps > 0 {
        max_steps as f64
    } else {
        (epochs as f64 * rows.max(1.0) / per_step).ceil()
    };
    // A pair: a shared prompt and two responses, cut to max_length.
    let per_pair = (t.max_prompt_length as f64).min(170.0)
        + 2.0 * ((t.max_length - t.max_prompt_length) as f64).min(48.0);
    let tokens = steps * per_step * per_pair;
    match params {
        Some(p) => (
            6.0 * p as f64 * tokens / r.train,
            format!("{steps} steps of {per_step} pairs"),
        ),
        None => (f64::NAN, "model size unknown until it is downloaded".into()),
    }
}

/// The eval: base and adapter each review the held-out titles.
fn evaluation(s: &Settings, params: Option<u64>, r: &Rates) -> (f64, String) {
    let titles = if s.eval.titles > 0 {
        s.eval.titles
    } else {
        s.split.test
    };
    let n = (2 * titles * s.eval.samples) as f64;
    reviews(
        s,
        n,
        3.0 * PROMPT_TOKENS,
        params,
        r,
        format!("{n} reviews, base and adapter, judged"),
    )
}

fn stage(s: &Settings, st: Stage, params: (Option<u64>, Option<u64>), r: &Rates) -> (f64, String) {
    match st {
        Stage::Scrape => (2.0, "one page".to_string()),
        Stage::Prompts | Stage::Merge | Stage::Split => (1.0, String::new()),
        Stage::Generate => {
            let n = if s.generate.limit > 0 {
                s.generate.limit.min(2 * s.scrape.count)
            } else {
                2 * s.scrape.count
            } as f64;
            if s.generate.backend == crate::config::Backend::Openai {
                // The servers' speed is theirs: nothing here measures it.
                (
                    f64::NAN,
                    format!("{n} reviews on the openai backend's servers"),
                )
            } else {
                let stage_rate = Rates {
                    generate: r.generate_blocks,
                    ..*r
                };
                reviews(
                    s,
                    n,
                    PROMPT_TOKENS,
                    params.0,
                    &stage_rate,
                    format!("{n} reviews of up to {} tokens", s.generate.max_new_tokens),
                )
            }
        }
        Stage::Train => training(
            s,
            s.split.train as f64,
            (s.train.max_steps, s.train.epochs),
            params.1,
            r,
        ),
        Stage::Eval => evaluation(s, params.1, r),
    }
}

/// A round's stages: its reviews (from the neutral prompt, with the adapter), its pairs (at most
/// one a title), its training and its eval.
fn round(s: &Settings, step: Step, params: Option<u64>, r: &Rates) -> (f64, String) {
    let rs = &s.rounds;
    match step {
        Step::Sample => {
            let n = (rs.titles * rs.samples) as f64;
            reviews(
                s,
                n,
                3.0 * PROMPT_TOKENS,
                params,
                r,
                format!("{n} reviews of {} fresh titles", rs.titles),
            )
        }
        Step::Label => (1.0, String::new()),
        Step::Train => training(s, rs.titles as f64, (0, rs.epochs), params, r),
        Step::Eval => evaluation(s, params, r),
    }
}

/// "40 s", "12 min", "3.5 h", "2.1 days".
pub(crate) fn human(secs: f64) -> String {
    if !secs.is_finite() {
        "unknown".into()
    } else if secs < 90.0 {
        format!("{secs:.0} s")
    } else if secs < 5400.0 {
        format!("{:.0} min", secs / 60.0)
    } else if secs < 2.0 * 86400.0 {
        format!("{:.1} h", secs / 3600.0)
    } else {
        format!("{:.1} days", secs / 86400.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stages::ALL;

    const TINYLLAMA: u64 = 1_100_048_384;
    const SMOLLM2: u64 = 134_515_008;

    #[test]
    fn the_default_recipe_on_two_cpu_cores_takes_days_and_the_quick_one_minutes() {
        let all: Vec<Node> = ALL.into_iter().map(Node::Stage).collect();
        let full = estimate_on(
            &Settings::default(),
            &all,
            (Some(TINYLLAMA), Some(TINYLLAMA)),
            false,
            2,
        );
        assert!(full.total > 86_400.0, "{}", human(full.total));
        let mut quick = Settings::default();
        quick.scrape.count = 24;
        quick.generate.max_new_tokens = 32;
        (quick.split.train, quick.split.test) = (20, 4);
        (quick.train.max_steps, quick.train.batch_size) = (20, 2);
        let q = estimate_on(&quick, &all, (Some(SMOLLM2), Some(SMOLLM2)), false, 2);
        assert!(q.total > 30.0 && q.total < 900.0, "{}", human(q.total));
        // On the blocks the generate stage is counted at its own, faster rate; nothing else moves.
        let gen = [Node::Stage(Stage::Generate), Node::Stage(Stage::Eval)];
        let dense = estimate_on(&quick, &gen, (Some(SMOLLM2), Some(SMOLLM2)), false, 2);
        let blocks = estimate_with(
            &quick,
            &gen,
            (Some(SMOLLM2), Some(SMOLLM2)),
            false,
            rates(false, 2),
        );
        assert!(blocks.stages[0].seconds * 5.0 < dense.stages[0].seconds);
        assert_eq!(blocks.stages[1].seconds, dense.stages[1].seconds);
        // An unknown model size is said, not guessed as zero.
        let u = estimate_on(
            &quick,
            &[Node::Stage(Stage::Generate)],
            (None, None),
            false,
            2,
        );
        assert!(u.stages[0].seconds.is_nan() && human(u.stages[0].seconds) == "unknown");
        // Fresh stages cost nothing: only what is to be built is counted.
        let split_only = estimate_on(
            &Settings::default(),
            &[Node::Stage(Stage::Split)],
            (None, None),
            false,
            2,
        );
        assert!(split_only.total < 5.0);
    }
}
