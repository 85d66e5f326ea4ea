//! The stage graph: scrape -> prompts -> generate -> merge -> split -> train -> eval, then with
//! `rounds.count = N` the N on-policy rounds (`rounds`: sample -> label -> train -> eval each).
//!
//! Each stage module exposes `material` (what its output depends on, cheap to compute) and `build`
//! (make the output in a staging folder). This module decides what is up to date, builds what is
//! not, in order, and reports it, cargo-style.
//!
//! May import floors 0 to 6 of docs/ARCHITECTURE.md (`config`, `recipe`, `cache`, `backend`,
//! `dpo`, `judge`, `model`, `kernels`, the base modules); never `serve`, `hub`, `bench` or `cli`.

mod chunks;
pub(crate) mod eval;
pub(crate) mod generate;
pub mod items;
pub mod merge;
pub(crate) mod prompts;
pub(crate) mod rounds;
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

/// A node of the graph: a stage of the recipe, or a stage of on-policy round `r` (from 1). The
/// order is the order they run in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) enum Node {
    Stage(Stage),
    Round(usize, rounds::Step),
}

impl Node {
    /// Its folder under `cache/`, and how messages, the plan and `status` name it: `train`,
    /// `round-2-sample`.
    pub(crate) fn name(self) -> String {
        match self {
            Node::Stage(s) => s.name().to_string(),
            Node::Round(r, step) => step.folder(r),
        }
    }

    pub(crate) fn round(self) -> Option<usize> {
        match self {
            Node::Stage(_) => None,
            Node::Round(r, _) => Some(r),
        }
    }
}

/// The round nodes of a recipe, in order (none with `rounds.count = 0`).
fn round_nodes(s: &Settings) -> impl Iterator<Item = Node> {
    (1..=s.rounds.count).flat_map(|r| {
        rounds::Step::ALL
            .into_iter()
            .map(move |st| Node::Round(r, st))
    })
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

/// Keys and folders of the nodes computed so far in a run, and the page scrape read.
#[derive(Default)]
pub(crate) struct Outputs {
    keys: BTreeMap<Node, String>,
    dirs: BTreeMap<Node, PathBuf>,
    page: Option<scrape::Page>,
}

impl Outputs {
    pub(crate) fn dir(&self, s: Stage) -> &Path {
        &self.dirs[&Node::Stage(s)]
    }

    fn dir_of(&self, s: Stage) -> Option<&Path> {
        self.dirs.get(&Node::Stage(s)).map(|p| p.as_path())
    }

    fn key_of(&self, s: Stage) -> Option<&str> {
        self.keys.get(&Node::Stage(s)).map(|k| k.as_str())
    }
}

/// What a stage's output depends on. `None`: not knowable without work `status` never does
/// (the page has not been fetched yet).
fn material(ctx: &Ctx, node: Node, r: &mut Outputs, fetch: bool) -> Result<Option<KeyMaterial>> {
    let stage = match node {
        Node::Stage(s) => s,
        Node::Round(n, step) => {
            let key = |x: Node| r.keys.get(&x).cloned().unwrap_or_default();
            return rounds::material(ctx, n, step, &key).map(Some);
        }
    };
    let key = |s: Stage| r.key_of(s).unwrap_or_default().to_string();
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
        Stage::Train => train::material(ctx, r.key_of(Stage::Split))?,
        Stage::Eval => eval::material(
            ctx,
            eval::AdapterSource::Train(&key(Stage::Train)),
            r.key_of(Stage::Split),
            r.key_of(Stage::Scrape),
        )?,
    }))
}

fn build(ctx: &Ctx, node: Node, r: &Outputs, key: &str, out: &Path) -> Result<Built> {
    let stage = match node {
        Node::Stage(s) => s,
        Node::Round(n, step) => {
            let dir = |x: Node| r.dirs.get(&x).cloned().unwrap_or_default();
            return rounds::build(ctx, n, step, &dir, key, out);
        }
    };
    match stage {
        Stage::Scrape => scrape::build(ctx, r.page.as_ref().expect("material read the page"), out),
        Stage::Prompts => prompts::build(ctx, r.dir(Stage::Scrape), out),
        Stage::Generate => generate::build(ctx, r.dir(Stage::Prompts), key, out),
        Stage::Merge => merge::build(ctx, r.dir(Stage::Prompts), r.dir(Stage::Generate), out),
        Stage::Split => split::build(ctx, r.dir(Stage::Merge), out),
        Stage::Train => train::build(ctx, r.dir_of(Stage::Split), key, out),
        Stage::Eval => eval::build(
            ctx,
            &eval::Inputs {
                adapter: r.dir(Stage::Train),
                split: r.dir_of(Stage::Split),
                merge: r.dir_of(Stage::Merge),
                scrape: r.dir_of(Stage::Scrape),
                round_labels: None,
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
    /// The nodes this plan visits, in order (an `--only` run visits the inputs it reads). The
    /// rounds come after the eval, in a run that stops nowhere before them.
    fn nodes(&self, s: &Settings) -> Vec<(Node, bool)> {
        let last = self.only.or(self.until).unwrap_or(Stage::Eval);
        let mut v: Vec<(Node, bool)> = ALL
            .into_iter()
            .filter(|st| *st <= last)
            .filter_map(|st| {
                let wanted = self.only.is_none_or(|o| o == st);
                (wanted || needed_by(s, self.only.expect("not wanted only under --only"), st))
                    .then_some((Node::Stage(st), wanted))
            })
            .collect();
        if self.only.is_none() && self.until.is_none() {
            v.extend(round_nodes(s).map(|n| (n, true)));
        }
        v
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
    before_build: impl FnOnce(&[Node]) -> Result<()>,
) -> Result<Outputs> {
    ctx.cache.sweep();
    ctx.refetch = plan.force.contains(&Stage::Scrape);
    let mut r = Outputs::default();
    let mut steps = Vec::new();
    for (node, wanted) in plan.nodes(ctx.settings()) {
        let m = material(ctx, node, &mut r, true)?.expect("fetching is allowed in a run");
        let key = m.key();
        let lookup = ctx.cache.lookup(&node.name(), &key);
        let forced = matches!(node, Node::Stage(s) if plan.force.contains(&s));
        let build = forced || !matches!(lookup, Lookup::Fresh(_));
        if let (true, false, Node::Stage(stage)) = (build, wanted, node) {
            let why = match &lookup {
                Lookup::Damaged(why) => format!("damaged: {why}"),
                _ => stale_reason(ctx, node, &m),
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
        r.dirs.insert(node, ctx.cache.dir(&node.name(), &key));
        r.keys.insert(node, key);
        steps.push((node, m, lookup, build));
    }
    let todo: Vec<Node> = steps.iter().filter(|s| s.3).map(|s| s.0).collect();
    if !todo.is_empty() {
        before_build(&todo)?;
    }
    for (node, m, lookup, build_it) in steps {
        let key = r.keys[&node].clone();
        let label = node.name();
        if !build_it {
            if let Lookup::Fresh(man) = &lookup {
                ctx.say("Fresh", format!("{label} ({key}) {}", summary(man)));
            }
            continue;
        }
        match &lookup {
            Lookup::Damaged(why) => {
                ctx.say("Damaged", format!("{label} ({key}): {why}; rebuilding"))
            }
            Lookup::Fresh(_) => ctx.say("Forced", &label),
            Lookup::Missing => {
                tracing::info!("{label} out of date: {}", stale_reason(ctx, node, &m))
            }
        }
        ctx.say("Building", format!("{label} ({key})"));
        let t0 = Instant::now();
        let staging = ctx.cache.begin(&node.name(), &key)?;
        let built = build(ctx, node, &r, &key, &staging.dir)?;
        let secs = t0.elapsed().as_secs_f64();
        let man = staging.commit(&ctx.cache, m, built.counts, built.info, secs)?;
        // Resumable partial work (generation chunks, checkpoints) is done with.
        let partial = ctx.cache.partial_dir(&node.name(), &key);
        if partial.exists() {
            std::fs::remove_dir_all(&partial).ok();
        }
        ctx.say("Built", format!("{label} in {secs:.1}s: {}", summary(&man)));
    }
    Ok(r)
}

/// Whether `stage`'s output for the current recipe is built and intact (read-only: no page fetch,
/// no download; a stage whose inputs cannot be known yet is not fresh).
pub(crate) fn is_fresh(ctx: &Ctx, stage: Stage) -> Result<bool> {
    let mut r = Outputs::default();
    for st in ALL.into_iter().filter(|s| *s <= stage) {
        let Some(m) = material(ctx, Node::Stage(st), &mut r, false)? else {
            return Ok(false);
        };
        let key = m.key();
        if st == stage {
            return Ok(matches!(
                ctx.cache.lookup(st.name(), &key),
                Lookup::Fresh(_)
            ));
        }
        r.keys.insert(Node::Stage(st), key);
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

/// The latest trained adapter in this workdir: the train stage's, or an on-policy round's
/// (`round-N-train`) when one finished after it. `sample` and `serve` use it when given none.
pub(crate) fn latest_adapter(ctx: &Ctx) -> Option<PathBuf> {
    let rounds = std::fs::read_dir(&ctx.cache.root)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.starts_with("round-") && n.ends_with("-train"));
    std::iter::once("train".to_string())
        .chain(rounds)
        .filter_map(|name| {
            let m = ctx.cache.latest(&name)?;
            let dir = ctx.cache.dir(&name, &m.key);
            dir.join("manifest.json")
                .is_file()
                .then_some((m.finished_at, dir))
        })
        .max()
        .map(|(_, dir)| dir)
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
        let m = material(ctx, Node::Stage(stage), &mut r, false)?.with_context(|| {
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
                stale_reason(ctx, Node::Stage(stage), &m)
            );
        }
        r.dirs
            .insert(Node::Stage(stage), ctx.cache.dir(stage.name(), &key));
        r.keys.insert(Node::Stage(stage), key);
    }
    let m = eval::material(
        ctx,
        eval::AdapterSource::Dir(adapter),
        r.key_of(Stage::Split),
        r.key_of(Stage::Scrape),
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
            split: r.dir_of(Stage::Split),
            merge: r.dir_of(Stage::Merge),
            scrape: r.dir_of(Stage::Scrape),
            round_labels: None,
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

fn stale_reason(ctx: &Ctx, node: Node, m: &KeyMaterial) -> String {
    match ctx.cache.latest(&node.name()) {
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
    #[serde(skip)]
    pub(crate) node: Node,
    /// The node's name: `train`, `round-2-sample`.
    pub(crate) stage: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) round: Option<usize>,
    /// "up to date" | "stale" | "missing" | "damaged" | "unknown"
    pub(crate) state: String,
    pub(crate) key: Option<String>,
    pub(crate) reasons: Vec<String>,
    pub(crate) path: Option<PathBuf>,
    pub(crate) counts: BTreeMap<String, u64>,
    pub(crate) finished_at: Option<String>,
    pub(crate) seconds: Option<f64>,
}

/// The nodes a node reads, for `status` (a round reads the recipe's stages and the node
/// before it).
fn node_inputs(s: &Settings, node: Node) -> Vec<Node> {
    match node {
        Node::Stage(st) => st.inputs(s).into_iter().map(Node::Stage).collect(),
        Node::Round(r, step) => {
            let mut v: Vec<Node> = [Stage::Scrape, Stage::Split, Stage::Train, Stage::Eval]
                .into_iter()
                .map(Node::Stage)
                .collect();
            let i = rounds::Step::ALL
                .iter()
                .position(|x| *x == step)
                .unwrap_or(0);
            if i > 0 {
                v.push(Node::Round(r, rounds::Step::ALL[i - 1]));
            } else if r > 1 {
                v.push(Node::Round(r - 1, rounds::Step::Eval));
            }
            v
        }
    }
}

/// Where every stage (and every round's) stands, without building, fetching or downloading
/// anything.
// Long because each state (unknown, fresh, damaged, missing, stale) fills its own fields.
pub(crate) fn status(ctx: &Ctx) -> Vec<StageStatus> {
    let mut r = Outputs::default();
    let mut out = Vec::new();
    let nodes: Vec<Node> = ALL
        .into_iter()
        .map(Node::Stage)
        .chain(round_nodes(ctx.settings()))
        .collect();
    for node in nodes {
        let name = node.name();
        let mut st = StageStatus {
            node,
            stage: name.clone(),
            round: node.round(),
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
        let unknown_input = node_inputs(ctx.settings(), node)
            .into_iter()
            .find(|i| !r.keys.contains_key(i));
        if let Some(i) = unknown_input {
            st.reasons
                .push(format!("its input {} is not known yet", i.name()));
            out.push(st);
            continue;
        }
        match material(ctx, node, &mut r, false) {
            Err(e) => st.reasons.push(format!("{e:#}")),
            Ok(None) => st
                .reasons
                .push("the page has not been fetched yet (`pipeline run` fetches it)".into()),
            Ok(Some(m)) => {
                let key = m.key();
                st.key = Some(key.clone());
                let dir = ctx.cache.dir(&name, &key);
                match ctx.cache.lookup(&name, &key) {
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
                    Lookup::Missing => match ctx.cache.latest(&name) {
                        None => st.state = "missing".into(),
                        Some(old) => {
                            st.state = "stale".into();
                            st.reasons = m.diff(&old.material);
                            st.path = Some(ctx.cache.dir(&name, &old.key));
                            st.counts = old.counts.clone();
                            st.finished_at = Some(old.finished_at.clone());
                            st.seconds = Some(old.seconds);
                        }
                    },
                }
                r.dirs.insert(node, dir);
                r.keys.insert(node, key);
            }
        }
        out.push(st);
    }
    out
}
