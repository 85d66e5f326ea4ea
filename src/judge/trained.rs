//! The `trained` judge: a logistic regression fitted on the split's own train pairs, chosen
//! (harsh) against rejected (kind), on word 1-2 grams with negation marking.
//!
//! It is a second opinion independent of VADER's lexicon: it learns what *this* dataset's
//! harsh reviews say, and it is validated like every judge by its AUROC on the test pairs it
//! never saw. It is deterministic (features in a sorted vocabulary, a fixed optimizer, no
//! randomness), so the eval stage's cache key (which holds the split's) caches it too.
//!
//! Features, exactly (tests/it/judge.rs writes them again in Python for scikit-learn):
//! 1. Lower-case; `’` becomes `'`. Tokens are runs of letters, digits and `'`, and the
//!    punctuation marks `. , ; : ! ?` (everything else separates tokens).
//! 2. Negation marking: after a negation word ([`NEGATIONS`], or any word ending in `n't`),
//!    every word up to the next punctuation mark gets the prefix `not_`.
//! 3. The words (punctuation dropped) give unigrams and bigrams (`a b` of neighbours).
//! 4. A feature is kept when at least [`MIN_DF`] training reviews hold it; its value is 1 if the
//!    review holds it, else 0.
//!
//! The fit minimises `C * sum_i log(1 + exp(-y_i (w.x_i + b))) + |w|^2 / 2` (the intercept is
//! not penalised): scikit-learn's `LogisticRegression(C=1.0)`, by L-BFGS to a gradient of
//! [`GRAD_TOL`]. The score of a review is `P(harsh) = sigmoid(w.x + b)`, in [0, 1].

use crate::error::{bail, Result};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

/// Words that negate what follows them up to the next punctuation mark.
pub const NEGATIONS: &[&str] = &[
    "not", "no", "never", "nor", "cannot", "without", "none", "nothing", "neither", "nobody",
    "nowhere", "hardly", "barely", "scarcely",
];

/// A feature must appear in this many training reviews.
pub const MIN_DF: usize = 2;

/// The inverse regularisation strength (scikit-learn's `C`).
pub const C: f64 = 1.0;

/// L-BFGS stops when every component of the gradient is below this.
pub const GRAD_TOL: f64 = 1e-8;

const MAX_ITER: usize = 2000;

const VERSION: u32 = 1;

/// A fitted trained judge: its vocabulary, weights and bias.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Trained {
    pub version: u32,
    pub c: f64,
    pub min_df: usize,
    /// Reviews it was fitted on (harsh, kind).
    pub fitted_on: [usize; 2],
    pub bias: f64,
    /// Feature -> weight, sorted by feature.
    pub weights: BTreeMap<String, f64>,
    /// L-BFGS iterations taken, and the gradient's largest component at the end.
    pub iterations: usize,
    pub grad_max: f64,
}

fn is_punct(c: char) -> bool {
    matches!(c, '.' | ',' | ';' | ':' | '!' | '?')
}

/// The review's words after negation marking (step 1 and 2 of the module's definition).
pub fn marked_words(text: &str) -> Vec<String> {
    let text = text.to_lowercase().replace('\u{2019}', "'");
    let mut out = Vec::new();
    let mut negated = false;
    let mut word = String::new();
    let flush = |word: &mut String, negated: &mut bool, out: &mut Vec<String>| {
        if word.is_empty() {
            return;
        }
        let w = std::mem::take(word);
        let negation = NEGATIONS.contains(&w.as_str()) || w.ends_with("n't");
        out.push(if *negated { format!("not_{w}") } else { w });
        if negation {
            *negated = true;
        }
    };
    for c in text.chars() {
        if c.is_alphanumeric() || c == '\'' {
            word.push(c);
        } else {
            flush(&mut word, &mut negated, &mut out);
            if is_punct(c) {
                negated = false;
            }
        }
    }
    flush(&mut word, &mut negated, &mut out);
    out
}

/// The review's distinct features: unigrams and bigrams of its marked words.
pub fn features(text: &str) -> BTreeSet<String> {
    let w = marked_words(text);
    let mut f: BTreeSet<String> = w.iter().cloned().collect();
    for p in w.windows(2) {
        f.insert(format!("{} {}", p[0], p[1]));
    }
    f
}

fn sigmoid(z: f64) -> f64 {
    if z >= 0.0 {
        1.0 / (1.0 + (-z).exp())
    } else {
        let e = z.exp();
        e / (1.0 + e)
    }
}

/// log(1 + exp(-m)), without overflow.
fn log1p_exp_neg(m: f64) -> f64 {
    if m > 0.0 {
        (-m).exp().ln_1p()
    } else {
        -m + m.exp().ln_1p()
    }
}

/// The training set as sparse rows of feature indices, with labels +1 / -1.
struct Data {
    rows: Vec<Vec<usize>>,
    y: Vec<f64>,
    dim: usize,
}

impl Data {
    /// Objective and gradient at `x` = (w, b).
    fn eval(&self, x: &[f64], g: &mut [f64]) -> f64 {
        let d = self.dim;
        let mut f = 0.0;
        g.iter_mut().for_each(|v| *v = 0.0);
        for (row, &y) in self.rows.iter().zip(&self.y) {
            let z: f64 = x[d] + row.iter().map(|&j| x[j]).sum::<f64>();
            f += C * log1p_exp_neg(y * z);
            // d/dz log(1 + exp(-y z)) = -y sigmoid(-y z).
            let dz = -C * y * sigmoid(-y * z);
            for &j in row {
                g[j] += dz;
            }
            g[d] += dz;
        }
        for j in 0..d {
            f += 0.5 * x[j] * x[j];
            g[j] += x[j];
        }
        f
    }
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Minimise the (strictly convex) objective by L-BFGS with a backtracking Armijo line search.
/// Returns the minimiser, the iterations taken and the gradient's largest component.
fn lbfgs(data: &Data) -> (Vec<f64>, usize, f64) {
    const M: usize = 10;
    let n = data.dim + 1;
    let mut x = vec![0.0; n];
    let mut g = vec![0.0; n];
    let mut f = data.eval(&x, &mut g);
    let mut hist: std::collections::VecDeque<(Vec<f64>, Vec<f64>, f64)> = Default::default();
    let gmax = |g: &[f64]| g.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    let mut it = 0;
    while it < MAX_ITER && gmax(&g) > GRAD_TOL {
        it += 1;
        // Two-loop recursion: d = -H g.
        let mut q = g.clone();
        let mut alphas = Vec::with_capacity(hist.len());
        for (s, yv, rho) in hist.iter().rev() {
            let a = rho * dot(s, &q);
            q.iter_mut().zip(yv).for_each(|(qi, yi)| *qi -= a * yi);
            alphas.push(a);
        }
        if let Some((s, yv, _)) = hist.back() {
            let gamma = dot(s, yv) / dot(yv, yv);
            q.iter_mut().for_each(|v| *v *= gamma);
        }
        for ((s, yv, rho), a) in hist.iter().zip(alphas.iter().rev()) {
            let b = rho * dot(yv, &q);
            q.iter_mut().zip(s).for_each(|(qi, si)| *qi += (a - b) * si);
        }
        let mut d: Vec<f64> = q.iter().map(|v| -v).collect();
        let mut slope = dot(&g, &d);
        if slope >= 0.0 {
            // Not a descent direction (numerical trouble): restart from steepest descent.
            hist.clear();
            d = g.iter().map(|v| -v).collect();
            slope = dot(&g, &d);
        }
        let mut step = if hist.is_empty() {
            1.0 / gmax(&g).max(1.0)
        } else {
            1.0
        };
        let mut xn = vec![0.0; n];
        let mut gn = vec![0.0; n];
        let mut fnew;
        loop {
            xn.iter_mut()
                .zip(&x)
                .zip(&d)
                .for_each(|((o, xi), di)| *o = xi + step * di);
            fnew = data.eval(&xn, &mut gn);
            if fnew <= f + 1e-4 * step * slope || step < 1e-20 {
                break;
            }
            step *= 0.5;
        }
        let s: Vec<f64> = xn.iter().zip(&x).map(|(a, b)| a - b).collect();
        let yv: Vec<f64> = gn.iter().zip(&g).map(|(a, b)| a - b).collect();
        let sy = dot(&s, &yv);
        if sy > 1e-300 {
            if hist.len() == M {
                hist.pop_front();
            }
            hist.push_back((s, yv, 1.0 / sy));
        }
        let moved = (f - fnew).abs();
        x = xn;
        g = gn;
        f = fnew;
        if moved == 0.0 && step < 1e-20 {
            break;
        }
    }
    let gm = gmax(&g);
    (x, it, gm)
}

impl Trained {
    /// Fit on harsh (label 1) and kind (label 0) reviews.
    pub fn fit(harsh: &[&str], kind: &[&str]) -> Result<Self> {
        if harsh.is_empty() || kind.is_empty() {
            bail!(
                "the trained judge needs harsh and kind reviews to learn from; the train rows hold {} and {}",
                harsh.len(),
                kind.len()
            );
        }
        let docs: Vec<BTreeSet<String>> = harsh.iter().chain(kind).map(|t| features(t)).collect();
        let mut df: BTreeMap<&str, usize> = BTreeMap::new();
        for d in &docs {
            for f in d {
                *df.entry(f.as_str()).or_default() += 1;
            }
        }
        let vocab: Vec<&str> = df
            .into_iter()
            .filter(|(_, n)| *n >= MIN_DF)
            .map(|(f, _)| f)
            .collect();
        let index: BTreeMap<&str, usize> = vocab.iter().enumerate().map(|(i, f)| (*f, i)).collect();
        let rows = docs
            .iter()
            .map(|d| {
                d.iter()
                    .filter_map(|f| index.get(f.as_str()).copied())
                    .collect()
            })
            .collect();
        let y = (0..docs.len())
            .map(|i| if i < harsh.len() { 1.0 } else { -1.0 })
            .collect();
        let data = Data {
            rows,
            y,
            dim: vocab.len(),
        };
        let (x, iterations, grad_max) = lbfgs(&data);
        if !x.iter().all(|v| v.is_finite()) {
            bail!("fitting the trained judge diverged (a weight is not finite)");
        }
        if grad_max > 1e-4 {
            // Still a usable judge (its AUROC on the test pairs is reported), but not the
            // optimum the module promises.
            tracing::warn!(
                "the trained judge stopped after {iterations} iterations with a gradient of {grad_max:.1e}, short of {GRAD_TOL:.0e}"
            );
        }
        Ok(Self {
            version: VERSION,
            c: C,
            min_df: MIN_DF,
            fitted_on: [harsh.len(), kind.len()],
            bias: x[vocab.len()],
            weights: vocab
                .iter()
                .zip(&x)
                .map(|(f, w)| (f.to_string(), *w))
                .collect(),
            iterations,
            grad_max,
        })
    }

    /// P(harsh) of each review.
    pub fn score(&self, reviews: &[&str]) -> Vec<f64> {
        reviews
            .iter()
            .map(|r| {
                let z = self.bias
                    + features(r)
                        .iter()
                        .filter_map(|f| self.weights.get(f))
                        .sum::<f64>();
                sigmoid(z)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn negation_marks_words_up_to_punctuation() {
        assert_eq!(
            marked_words("It is not novel, but it’s clear. Doesn't scale!"),
            [
                "it",
                "is",
                "not",
                "not_novel",
                "but",
                "it's",
                "clear",
                "doesn't"
            ]
            .iter()
            .chain(&["not_scale"])
            .map(|s| s.to_string())
            .collect::<Vec<_>>()
        );
        let f = features("No clear gains");
        assert!(f.contains("not_clear") && f.contains("no not_clear") && f.contains("not_gains"));
    }

    #[test]
    fn the_fit_separates_what_it_was_shown_and_reaches_the_optimum() {
        let harsh = [
            "the method is weak and not novel",
            "weak results, poor writing",
            "the claims are not supported; weak baselines",
            "poor experiments and weak analysis",
        ];
        let kind = [
            "a strong and novel method",
            "clear writing and strong results",
            "the claims are well supported, strong baselines",
            "excellent experiments and clear analysis",
        ];
        let j = Trained::fit(&harsh, &kind).unwrap();
        assert!(j.grad_max <= GRAD_TOL, "{}", j.grad_max);
        let sh = j.score(&harsh);
        let sk = j.score(&kind);
        assert!(crate::judge::auroc(&sh, &sk) == 1.0, "{sh:?} {sk:?}");
        // The stationarity condition of the objective at the optimum: w_j = -C sum_i dz_i x_ij,
        // and sum_i dz_i = 0 for the bias; checked on the whole vocabulary.
        let docs: Vec<(&str, f64)> = harsh
            .iter()
            .map(|t| (*t, 1.0))
            .chain(kind.iter().map(|t| (*t, -1.0)))
            .collect();
        let z = |t: &str| {
            j.bias
                + features(t)
                    .iter()
                    .filter_map(|f| j.weights.get(f))
                    .sum::<f64>()
        };
        let dz: Vec<f64> = docs
            .iter()
            .map(|(t, y)| -C * y * sigmoid(-y * z(t)))
            .collect();
        assert!(dz.iter().sum::<f64>().abs() < 1e-7);
        for (f, w) in &j.weights {
            let g: f64 = docs
                .iter()
                .zip(&dz)
                .filter(|((t, _), _)| features(t).contains(f))
                .map(|(_, d)| d)
                .sum();
            assert!((w + g).abs() < 1e-7, "{f}: {w} vs {}", -g);
        }
    }

    #[test]
    fn one_sided_data_is_refused() {
        assert!(Trained::fit(&["weak"], &[]).is_err());
    }
}
