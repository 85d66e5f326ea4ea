//! The rounds side by side, written by each round's eval: `rounds.json`, `rounds.md` and
//! `rounds.png`. Round 0 is the train stage's bot (the main eval); round r the bot after r
//! rounds. Each row holds that round's eval against the base (every judge's harsher rate, the
//! coherence figures, the eval loss) and the bot head to head with round 0: for every eval
//! review (same title, same sampler seed) whether round r's is harsher than round 0's, by each
//! judge, with Wilson's interval. The judges that did not label the rounds are named: they are
//! the ones whose verdict on the rounds counts.

use super::super::eval::{Report as EvalReport, SampleRow as Sample};
use crate::error::{Context, Result};
use crate::fsutil::{read_jsonl, write_atomic, write_json_pretty};
use crate::judge::wilson95;
use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

/// Round r against round 0, by one judge.
#[derive(Debug, Serialize)]
pub(crate) struct HeadToHead {
    pub(crate) harsher_rate: f64,
    pub(crate) harsher_rate_ci: [f64; 2],
    pub(crate) n: usize,
    /// Pairs the judge scored the same (the same text, often): not harsher.
    pub(crate) ties: usize,
}

#[derive(Debug, Serialize)]
pub(crate) struct RoundRow {
    pub(crate) round: usize,
    /// Against the base, by each judge.
    pub(crate) harsher_rate: BTreeMap<String, f64>,
    pub(crate) harsher_rate_ci: BTreeMap<String, [f64; 2]>,
    pub(crate) repeat_sentence: f64,
    pub(crate) distinct2: f64,
    pub(crate) mean_chars: f64,
    pub(crate) eval_loss: f64,
    pub(crate) eval_reward_accuracy: f64,
    /// Against round 0's bot, by each judge (empty for round 0).
    pub(crate) vs_round0: BTreeMap<String, HeadToHead>,
}

#[derive(Debug, Serialize)]
struct Rounds {
    /// The judge that labelled the rounds' pairs; its verdicts on rounds 1.. are not
    /// independent.
    labelled_by: String,
    independent_judges: Vec<String>,
    base: BaseRow,
    rounds: Vec<RoundRow>,
}

#[derive(Debug, Serialize)]
struct BaseRow {
    repeat_sentence: f64,
    distinct2: f64,
    mean_chars: f64,
}

fn read_report(dir: &Path) -> Result<EvalReport> {
    let p = dir.join("report.json");
    serde_json::from_slice(&std::fs::read(&p).with_context(|| format!("reading {}", p.display()))?)
        .with_context(|| format!("{} is not an eval report", p.display()))
}

/// Round `r`'s bot against round 0's on the same eval reviews (same title, same seed stream).
fn head_to_head(round0: &Path, dir: &Path) -> Result<BTreeMap<String, HeadToHead>> {
    let a: Vec<Sample> = read_jsonl(&round0.join("samples.jsonl"))?;
    let b: Vec<Sample> = read_jsonl(&dir.join("samples.jsonl"))?;
    if a.len() != b.len()
        || a.iter()
            .zip(&b)
            .any(|(x, y)| x.title != y.title || x.stream != y.stream)
    {
        crate::error::bail!(
            "the evals in {} and {} did not review the same titles with the same seeds",
            round0.display(),
            dir.display()
        );
    }
    let mut out = BTreeMap::new();
    for judge in a.first().map(|s| s.scores.keys()).into_iter().flatten() {
        let mut n = 0;
        let mut harsher = 0;
        let mut ties = 0;
        for (x, y) in a.iter().zip(&b) {
            if let (Some(s0), Some(sr)) = (x.scores.get(judge), y.scores.get(judge)) {
                n += 1;
                harsher += usize::from(sr[1] > s0[1]);
                ties += usize::from(sr[1] == s0[1]);
            }
        }
        if n > 0 {
            out.insert(
                judge.clone(),
                HeadToHead {
                    harsher_rate: harsher as f64 / n as f64,
                    harsher_rate_ci: wilson95(harsher, n),
                    n,
                    ties,
                },
            );
        }
    }
    Ok(out)
}

/// Write the table of rounds 0..=r into `out` (round r's eval folder, its report already
/// there). `evals[q]` is round q's eval folder; `evals[r]` is `out`.
pub(crate) fn write(labelled_by: &str, evals: &[&Path], out: &Path) -> Result<()> {
    let mut rows = Vec::new();
    let mut base = None;
    for (q, dir) in evals.iter().enumerate() {
        let rep = read_report(dir)?;
        base.get_or_insert(BaseRow {
            repeat_sentence: rep.repeat_sentence_base,
            distinct2: rep.distinct2_base,
            mean_chars: rep.mean_chars_base,
        });
        let vs_round0 = if q == 0 {
            BTreeMap::new()
        } else {
            head_to_head(evals[0], dir)?
        };
        rows.push(RoundRow {
            round: q,
            harsher_rate: rep
                .judges
                .iter()
                .map(|(k, v)| (k.clone(), v.harsher_rate))
                .collect(),
            harsher_rate_ci: rep
                .judges
                .iter()
                .map(|(k, v)| (k.clone(), v.harsher_rate_ci))
                .collect(),
            repeat_sentence: rep.repeat_sentence_adapter,
            distinct2: rep.distinct2_adapter,
            mean_chars: rep.mean_chars_adapter,
            eval_loss: rep.eval_loss,
            eval_reward_accuracy: rep.eval_reward_accuracy,
            vs_round0,
        });
    }
    let judges: Vec<String> = rows
        .first()
        .map(|r| r.harsher_rate.keys().cloned().collect())
        .unwrap_or_default();
    let t = Rounds {
        labelled_by: labelled_by.to_string(),
        independent_judges: judges
            .iter()
            .filter(|j| *j != labelled_by)
            .cloned()
            .collect(),
        base: base.context("no eval to compare")?,
        rounds: rows,
    };
    write_json_pretty(&out.join("rounds.json"), &t)?;
    write_atomic(&out.join("rounds.md"), markdown(&t, &judges).as_bytes())?;
    chart(&t, &judges, out);
    Ok(())
}

fn markdown(t: &Rounds, judges: &[String]) -> String {
    let mut s = String::from("# The rounds side by side\n\n");
    let _ = writeln!(
        s,
        "Round 0 is the train stage's bot; round r the bot after r on-policy rounds. The rounds' pairs were labelled by the {} judge; {} did not label them.\n",
        t.labelled_by,
        t.independent_judges.join(" and ")
    );
    let pct = |x: f64| format!("{:.1}%", 100.0 * x);
    let _ = write!(s, "| round |");
    for j in judges {
        let _ = write!(s, " harsher than base ({j}) |");
    }
    for j in judges {
        let _ = write!(s, " harsher than round 0 ({j}) |");
    }
    let _ = writeln!(
        s,
        " repeats a sentence | distinct-2 | mean chars | eval loss | reward accuracy |"
    );
    let _ = writeln!(s, "|{}", "---|".repeat(1 + 2 * judges.len() + 5));
    let _ = write!(s, "| base |");
    for _ in 0..2 * judges.len() {
        s.push_str(" |");
    }
    let _ = writeln!(
        s,
        " {} | {:.3} | {:.0} | | |",
        pct(t.base.repeat_sentence),
        t.base.distinct2,
        t.base.mean_chars
    );
    for r in &t.rounds {
        let _ = write!(s, "| {} |", r.round);
        for j in judges {
            let ci = r.harsher_rate_ci[j];
            let _ = write!(
                s,
                " {} [{:.0}, {:.0}] |",
                pct(r.harsher_rate[j]),
                100.0 * ci[0],
                100.0 * ci[1]
            );
        }
        for j in judges {
            match r.vs_round0.get(j) {
                Some(h) => {
                    let _ = write!(
                        s,
                        " {} [{:.0}, {:.0}] of {} ({} ties) |",
                        pct(h.harsher_rate),
                        100.0 * h.harsher_rate_ci[0],
                        100.0 * h.harsher_rate_ci[1],
                        h.n,
                        h.ties
                    );
                }
                None => s.push_str(" |"),
            }
        }
        let _ = writeln!(
            s,
            " {} | {:.3} | {:.0} | {:.4} | {:.3} |",
            pct(r.repeat_sentence),
            r.distinct2,
            r.mean_chars,
            r.eval_loss,
            r.eval_reward_accuracy
        );
    }
    s
}

fn chart(t: &Rounds, judges: &[String], out: &Path) {
    let mut series: Vec<(String, Vec<f64>)> = Vec::new();
    for j in judges {
        series.push((
            format!("harsher than base ({j})"),
            t.rounds.iter().map(|r| r.harsher_rate[j]).collect(),
        ));
        series.push((
            format!("harsher than round 0 ({j})"),
            t.rounds
                .iter()
                .map(|r| r.vs_round0.get(j).map_or(f64::NAN, |h| h.harsher_rate))
                .collect(),
        ));
    }
    series.push((
        "repeats a sentence".into(),
        t.rounds.iter().map(|r| r.repeat_sentence).collect(),
    ));
    series.push((
        "distinct-2".into(),
        t.rounds.iter().map(|r| r.distinct2).collect(),
    ));
    crate::dpo::charts::plot_rounds(
        &series,
        "the bot after each round (round 0: the train stage's)",
        &out.join("rounds.png"),
    );
}
