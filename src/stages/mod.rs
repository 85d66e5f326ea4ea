//! The stage graph: scrape -> prompts -> generate -> merge -> split -> train -> eval.
//!
//! Each stage module exposes `material` (what its output depends on, cheap to compute) and `build`
//! (make the output in a staging folder). This module decides what is up to date, builds what is
//! not, in order, and reports it, cargo-style.
//!
//! May import floors 0 to 6 of docs/ARCHITECTURE.md (`config`, `recipe`, `cache`, `backend`,
//! `dpo`, `judge`, `model`, `kernels`, the base modules); never `serve`, `hub`, `bench` or `cli`.

pub(crate) mod eval;
pub(crate) mod generate;
pub mod merge;
pub(crate) mod prompts;
pub mod scrape;
pub(crate) mod split;
pub(crate) mod train;

use crate::cache::{Cache, KeyMaterial, Lookup, Manifest};
use crate::config::{Loaded, Settings};
use crate::error::{bail, Context, Result};
use crate::recipe::Recipe;
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Stage {
    Scrape,
    Prompts,
    Generate,
    Merge,
    Split,
    Train,
    Eval,
}

pub(crate) const ALL: [Stage; 7] = [
    Stage::Scrape,
    Stage::Prompts,
    Stage::Generate,
    Stage::Merge,
    Stage::Split,
    Stage::Train,
    Stage::Eval,
];

impl Stage {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Stage::Scrape => "scrape",
            Stage::Prompts => "prompts",
            Stage::Generate => "generate",
            Stage::Merge => "merge",
            Stage::Split => "split",
            Stage::Train => "train",
            Stage::Eval => "eval",
        }
    }

    /// The stages whose outputs this one reads.
    fn inputs(self, s: &Settings) -> Vec<Stage> {
        match self {
            Stage::Scrape => vec![],
            Stage::Prompts => vec![Stage::Scrape],
            Stage::Generate => vec![Stage::Prompts],
            Stage::Merge => vec![Stage::Prompts, Stage::Generate],
            Stage::Split => vec![Stage::Merge],
            Stage::Train if s.train.dataset.is_empty() => vec![Stage::Split],
            Stage::Train => vec![],
            Stage::Eval => {
                let mut v = vec![Stage::Train];
                if s.train.dataset.is_empty() {
                    v.extend([Stage::Split, Stage::Merge]);
                }
                if s.eval.titles > 0 {
                    v.push(Stage::Scrape);
                }
                v
            }
        }
    }
}

/// What one run of the graph shares.
pub(crate) struct Ctx<'a> {
    recipe: &'a Recipe,
    loaded: &'a Loaded,
    pub(crate) cache: Cache,
    quiet: bool,
    /// Fetch the page again even if cached (`--force scrape`).
    refetch: bool,
}

impl<'a> Ctx<'a> {
    pub(crate) fn new(recipe: &'a Recipe, workdir: &Path, quiet: bool) -> Self {
        Self {
            recipe,
            loaded: &recipe.loaded,
            cache: Cache::new(workdir),
            quiet,
            refetch: false,
        }
    }

    fn settings(&self) -> &Settings {
        &self.loaded.settings
    }

    pub(crate) fn say(&self, verb: &str, msg: impl AsRef<str>) {
        if !self.quiet {
            eprintln!("{verb:>12} {}", msg.as_ref());
        }
    }
}

/// What a stage's build reports: named counts, the first being the main one.
pub(crate) struct Built {
    counts: BTreeMap<String, u64>,
    info: serde_json::Value,
}

impl Built {
    fn new(main: &str, n: usize) -> Self {
        Self {
            counts: BTreeMap::from([(main.to_string(), n as u64)]),
            info: serde_json::Value::Null,
        }
    }
    fn info(mut self, info: serde_json::Value) -> Self {
        self.info = info;
        self
    }
    fn with(mut self, name: &str, n: usize) -> Self {
        self.counts.insert(name.into(), n as u64);
        self
    }
}

/// Keys and folders of the stages computed so far in a run, and the page scrape read.
#[derive(Default)]
pub(crate) struct Outputs {
    keys: BTreeMap<Stage, String>,
    dirs: BTreeMap<Stage, PathBuf>,
    page: Option<scrape::Page>,
}

impl Outputs {
    pub(crate) fn dir(&self, s: Stage) -> &Path {
        &self.dirs[&s]
    }
}

/// What a stage's output depends on. `None`: not knowable without work `status` never does
/// (the page has not been fetched yet).
fn material(ctx: &Ctx, stage: Stage, r: &mut Outputs, fetch: bool) -> Result<Option<KeyMaterial>> {
    let key = |s: Stage| r.keys.get(&s).cloned().unwrap_or_default();
    Ok(Some(match stage {
        Stage::Scrape => {
            let Some(page) = scrape::page(ctx, fetch)? else {
                return Ok(None);
            };
            let m = scrape::material(ctx, &page)?;
            r.page = Some(page);
            m
        }
        Stage::Prompts => prompts::material(ctx, &key(Stage::Scrape))?,
        Stage::Generate => generate::material(ctx, &key(Stage::Prompts))?,
        Stage::Merge => merge::material(ctx, &key(Stage::Prompts), &key(Stage::Generate))?,
        Stage::Split => split::material(ctx, &key(Stage::Merge))?,
        Stage::Train => train::material(ctx, r.keys.get(&Stage::Split).map(|s| s.as_str()))?,
        Stage::Eval => eval::material(
            ctx,
            eval::AdapterSource::Train(&key(Stage::Train)),
            r.keys.get(&Stage::Split).map(|s| s.as_str()),
            r.keys.get(&Stage::Scrape).map(|s| s.as_str()),
        )?,
    }))
}

fn build(ctx: &Ctx, stage: Stage, r: &Outputs, key: &str, out: &Path) -> Result<Built> {
    match stage {
        Stage::Scrape => scrape::build(ctx, r.page.as_ref().expect("material read the page"), out),
        Stage::Prompts => prompts::build(ctx, r.dir(Stage::Scrape), out),
        Stage::Generate => generate::build(ctx, r.dir(Stage::Prompts), key, out),
        Stage::Merge => merge::build(ctx, r.dir(Stage::Prompts), r.dir(Stage::Generate), out),
        Stage::Split => split::build(ctx, r.dir(Stage::Merge), out),
        Stage::Train => train::build(
            ctx,
            r.dirs.get(&Stage::Split).map(|p| p.as_path()),
            key,
            out,
        ),
        Stage::Eval => eval::build(
            ctx,
            &eval::Inputs {
                adapter: r.dir(Stage::Train),
                split: r.dirs.get(&Stage::Split).map(|p| p.as_path()),
                merge: r.dirs.get(&Stage::Merge).map(|p| p.as_path()),
                scrape: r.dirs.get(&Stage::Scrape).map(|p| p.as_path()),
            },
            out,
        ),
    }
}

#[derive(Debug, Default, Clone)]
pub(crate) struct Plan {
    pub(crate) until: Option<Stage>,
    pub(crate) only: Option<Stage>,
    pub(crate) force: Vec<Stage>,
    /// The command that asked for `only` (`pipeline eval`), for its errors; `--only <stage>`
    /// when unset.
    pub(crate) asked_as: Option<&'static str>,
}

impl Plan {
    /// The stages this plan visits, in order (an `--only` run visits the inputs it reads).
    fn stages(&self, s: &Settings) -> Vec<(Stage, bool)> {
        let last = self.only.or(self.until).unwrap_or(Stage::Eval);
        ALL.into_iter()
            .filter(|st| *st <= last)
            .filter_map(|st| {
                let wanted = self.only.is_none_or(|o| o == st);
                (wanted || needed_by(s, self.only.expect("not wanted only under --only"), st))
                    .then_some((st, wanted))
            })
            .collect()
    }
}

/// Run the graph: skip what is up to date, build the rest in order. A stage's key depends only
/// on its settings and its inputs' keys, never on their bytes, so every key is known before
/// anything is built: `before_build` sees exactly the stages that will be built (the CLI prints
/// the plan and its time estimate there, and may stop).
// Long because it is the graph walk: keys, the plan, then each build with its lock and report.
pub(crate) fn run(
    ctx: &mut Ctx,
    plan: &Plan,
    before_build: impl FnOnce(&[Stage]) -> Result<()>,
) -> Result<Outputs> {
    ctx.cache.sweep();
    ctx.refetch = plan.force.contains(&Stage::Scrape);
    let mut r = Outputs::default();
    let mut steps = Vec::new();
    for (stage, wanted) in plan.stages(ctx.settings()) {
        let m = material(ctx, stage, &mut r, true)?.expect("fetching is allowed in a run");
        let key = m.key();
        let lookup = ctx.cache.lookup(stage.name(), &key);
        let build = plan.force.contains(&stage) || !matches!(lookup, Lookup::Fresh(_));
        if build && !wanted {
            let why = match &lookup {
                Lookup::Damaged(why) => format!("damaged: {why}"),
                _ => stale_reason(ctx, stage, &m),
            };
            let only = plan.only.expect("not wanted only under --only");
            let asked = plan
                .asked_as
                .map(|c| format!("`{c}`"))
                .unwrap_or_else(|| format!("`--only {}`", only.name()));
            // Build every input `only` reads, not just the first stale one.
            let last_input = ALL
                .into_iter()
                .rfind(|&st| st < only && needed_by(ctx.settings(), only, st))
                .unwrap_or(stage);
            bail!(
                "{asked} needs the output of {}, which is not up to date ({why}); run `pipeline run --until {}` first",
                stage.name(),
                last_input.name()
            );
        }
        r.dirs.insert(stage, ctx.cache.dir(stage.name(), &key));
        r.keys.insert(stage, key);
        steps.push((stage, m, lookup, build));
    }
    let todo: Vec<Stage> = steps.iter().filter(|s| s.3).map(|s| s.0).collect();
    if !todo.is_empty() {
        before_build(&todo)?;
    }
    for (stage, m, lookup, build_it) in steps {
        let key = r.keys[&stage].clone();
        if !build_it {
            if let Lookup::Fresh(man) = &lookup {
                ctx.say(
                    "Fresh",
                    format!("{} ({key}) {}", stage.name(), summary(man)),
                );
            }
            continue;
        }
        match &lookup {
            Lookup::Damaged(why) => ctx.say(
                "Damaged",
                format!("{} ({key}): {why}; rebuilding", stage.name()),
            ),
            Lookup::Fresh(_) => ctx.say("Forced", stage.name()),
            Lookup::Missing => {
                tracing::info!(
                    "{} out of date: {}",
                    stage.name(),
                    stale_reason(ctx, stage, &m)
                )
            }
        }
        ctx.say("Building", format!("{} ({key})", stage.name()));
        let t0 = Instant::now();
        let staging = ctx.cache.begin(stage.name(), &key)?;
        let built = build(ctx, stage, &r, &key, &staging.dir)?;
        let secs = t0.elapsed().as_secs_f64();
        let man = staging.commit(&ctx.cache, m, built.counts, built.info, secs)?;
        // Resumable partial work (generation chunks, checkpoints) is done with.
        let partial = ctx.cache.partial_dir(stage.name(), &key);
        if partial.exists() {
            std::fs::remove_dir_all(&partial).ok();
        }
        ctx.say(
            "Built",
            format!("{} in {secs:.1}s: {}", stage.name(), summary(&man)),
        );
    }
    Ok(r)
}

/// Whether `stage`'s output for the current recipe is built and intact (read-only: no page fetch,
/// no download; a stage whose inputs cannot be known yet is not fresh).
pub(crate) fn is_fresh(ctx: &Ctx, stage: Stage) -> Result<bool> {
    let mut r = Outputs::default();
    for st in ALL.into_iter().filter(|s| *s <= stage) {
        let Some(m) = material(ctx, st, &mut r, false)? else {
            return Ok(false);
        };
        let key = m.key();
        if st == stage {
            return Ok(matches!(
                ctx.cache.lookup(st.name(), &key),
                Lookup::Fresh(_)
            ));
        }
        r.keys.insert(st, key);
    }
    Ok(false)
}

/// The folder of the latest build of `stage` in this workdir, if it is still there (the latest
/// trained adapter is what `sample`, `eval` and `serve` use when given none).
pub(crate) fn latest_output(ctx: &Ctx, stage: Stage) -> Option<PathBuf> {
    let m = ctx.cache.latest(stage.name())?;
    let dir = ctx.cache.dir(stage.name(), &m.key);
    dir.join("manifest.json").is_file().then_some(dir)
}

/// The eval stage on `adapter` (`pipeline eval --adapter DIR`), or on the train stage's output
/// when `None` (`--only eval`). The dataset stages it reads must be up to date; the result is
/// cached under `cache/eval/` by the adapter's bytes like any stage. Returns the output folder.
pub(crate) fn eval_adapter(ctx: &mut Ctx, adapter: Option<&Path>) -> Result<PathBuf> {
    let Some(adapter) = adapter else {
        let plan = Plan {
            only: Some(Stage::Eval),
            asked_as: Some("pipeline eval"),
            ..Plan::default()
        };
        let r = run(ctx, &plan, |_| Ok(()))?;
        return Ok(r.dir(Stage::Eval).to_path_buf());
    };
    ctx.cache.sweep();
    let mut r = Outputs::default();
    for stage in ALL {
        if !needed_by(ctx.settings(), Stage::Eval, stage) || stage == Stage::Train {
            continue;
        }
        let m = material(ctx, stage, &mut r, false)?.with_context(|| {
            format!(
                "the {} stage has not run in this workdir; run `pipeline run --until split` first",
                stage.name()
            )
        })?;
        let key = m.key();
        if !matches!(ctx.cache.lookup(stage.name(), &key), Lookup::Fresh(_)) {
            bail!(
                "`pipeline eval --adapter` reads the {} stage's output, which is not up to date ({}); run `pipeline run --until split` first",
                stage.name(),
                stale_reason(ctx, stage, &m)
            );
        }
        r.dirs.insert(stage, ctx.cache.dir(stage.name(), &key));
        r.keys.insert(stage, key);
    }
    let m = eval::material(
        ctx,
        eval::AdapterSource::Dir(adapter),
        r.keys.get(&Stage::Split).map(|s| s.as_str()),
        r.keys.get(&Stage::Scrape).map(|s| s.as_str()),
    )?;
    let key = m.key();
    let dir = ctx.cache.dir("eval", &key);
    if let Lookup::Fresh(man) = ctx.cache.lookup("eval", &key) {
        ctx.say("Fresh", format!("eval ({key}) {}", summary(&man)));
        return Ok(dir);
    }
    ctx.say("Building", format!("eval ({key}) of {}", adapter.display()));
    let t0 = Instant::now();
    let staging = ctx.cache.begin("eval", &key)?;
    let built = eval::build(
        ctx,
        &eval::Inputs {
            adapter,
            split: r.dirs.get(&Stage::Split).map(|p| p.as_path()),
            merge: r.dirs.get(&Stage::Merge).map(|p| p.as_path()),
            scrape: r.dirs.get(&Stage::Scrape).map(|p| p.as_path()),
        },
        &staging.dir,
    )?;
    let secs = t0.elapsed().as_secs_f64();
    let man = staging.commit(&ctx.cache, m, built.counts, built.info, secs)?;
    ctx.say("Built", format!("eval in {secs:.1}s: {}", summary(&man)));
    Ok(dir)
}

fn needed_by(s: &Settings, target: Stage, stage: Stage) -> bool {
    let mut todo = target.inputs(s);
    while let Some(x) = todo.pop() {
        if x == stage {
            return true;
        }
        todo.extend(x.inputs(s));
    }
    false
}

fn summary(m: &Manifest) -> String {
    m.counts
        .iter()
        .filter(|(_, v)| **v > 0)
        .map(|(k, v)| format!("{v} {k}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn stale_reason(ctx: &Ctx, stage: Stage, m: &KeyMaterial) -> String {
    match ctx.cache.latest(stage.name()) {
        None => "never built".into(),
        Some(old) => {
            let d = m.diff(&old.material);
            if d.is_empty() {
                "an earlier build with these inputs was removed".into()
            } else {
                d.join("; ")
            }
        }
    }
}

#[derive(Debug, Serialize)]
pub(crate) struct StageStatus {
    pub(crate) stage: Stage,
    /// "up to date" | "stale" | "missing" | "damaged" | "unknown"
    pub(crate) state: String,
    pub(crate) key: Option<String>,
    pub(crate) reasons: Vec<String>,
    pub(crate) path: Option<PathBuf>,
    pub(crate) counts: BTreeMap<String, u64>,
    pub(crate) finished_at: Option<String>,
    pub(crate) seconds: Option<f64>,
}

/// Where every stage stands, without building, fetching or downloading anything.
pub(crate) fn status(ctx: &Ctx) -> Vec<StageStatus> {
    let mut r = Outputs::default();
    let mut out = Vec::new();
    for stage in ALL {
        let mut st = StageStatus {
            stage,
            state: "unknown".into(),
            key: None,
            reasons: vec![],
            path: None,
            counts: BTreeMap::new(),
            finished_at: None,
            seconds: None,
        };
        // A stage whose input's key is unknown has no key either: computing one from an empty
        // input key would report a made-up state.
        let unknown_input = stage
            .inputs(ctx.settings())
            .into_iter()
            .find(|i| !r.keys.contains_key(i));
        if let Some(i) = unknown_input {
            st.reasons
                .push(format!("its input {} is not known yet", i.name()));
            out.push(st);
            continue;
        }
        match material(ctx, stage, &mut r, false) {
            Err(e) => st.reasons.push(format!("{e:#}")),
            Ok(None) => st
                .reasons
                .push("the page has not been fetched yet (`pipeline run` fetches it)".into()),
            Ok(Some(m)) => {
                let key = m.key();
                st.key = Some(key.clone());
                let dir = ctx.cache.dir(stage.name(), &key);
                match ctx.cache.lookup(stage.name(), &key) {
                    Lookup::Fresh(man) => {
                        st.state = "up to date".into();
                        st.path = Some(dir.clone());
                        st.counts = man.counts.clone();
                        st.finished_at = Some(man.finished_at.clone());
                        st.seconds = Some(man.seconds);
                    }
                    Lookup::Damaged(why) => {
                        st.state = "damaged".into();
                        st.reasons.push(why);
                    }
                    Lookup::Missing => match ctx.cache.latest(stage.name()) {
                        None => st.state = "missing".into(),
                        Some(old) => {
                            st.state = "stale".into();
                            st.reasons = m.diff(&old.material);
                            st.path = Some(ctx.cache.dir(stage.name(), &old.key));
                            st.counts = old.counts.clone();
                            st.finished_at = Some(old.finished_at.clone());
                            st.seconds = Some(old.seconds);
                        }
                    },
                }
                r.dirs.insert(stage, dir);
                r.keys.insert(stage, key);
            }
        }
        out.push(st);
    }
    out
}
