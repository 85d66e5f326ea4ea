//! Validation: every range of every setting checked once, after the layers are merged, each
//! failure naming the key and what would be valid.

use super::types::{Backend, ItemFormat, OpenAiApi, Settings};
use crate::dpo::config::{check, Invalid};
use crate::judge::JudgeKind;

impl Settings {
    /// Impossible values, each reported with what would be valid. The one place each setting
    /// outside `[train]` is checked (`[train]` checks itself, in `dpo::config`); sections in
    /// the recipe's order, so the first bad key reported is the first in the file.
    pub(super) fn validate(&self) -> Result<(), Invalid> {
        self.validate_scrape_and_prompts()?;
        self.validate_generate()?;
        self.validate_split_and_merge()?;
        self.validate_eval()?;
        self.validate_judge()?;
        self.validate_rounds()?;
        self.train.validate()
    }

    /// `[scrape]` and `[prompts]`.
    fn validate_scrape_and_prompts(&self) -> Result<(), Invalid> {
        let s = self;
        check(s.scrape.count > 0, "scrape.count", || {
            "must be at least 1".into()
        })?;
        check(
            !s.scrape.selector.trim().is_empty(),
            "scrape.selector",
            || "must not be empty".into(),
        )?;
        check(
            !(s.scrape.url.is_empty() && s.scrape.snapshot.is_empty() && s.scrape.file.is_empty()),
            "scrape.url",
            || "set scrape.url, scrape.snapshot or scrape.file".into(),
        )?;
        self.validate_items_file()?;
        check(s.scrape.timeout_secs > 0, "scrape.timeout_secs", || {
            "must be at least 1".into()
        })?;
        check(
            s.scrape.max_page_bytes >= 1024,
            "scrape.max_page_bytes",
            || "must be at least 1024 (1 KiB)".into(),
        )?;
        self.validate_styles()?;
        check(!s.prompts.pool.is_empty(), "prompts.pool", || {
            "needs at least one few-shot example".into()
        })?;
        check(
            s.prompts.shots <= s.prompts.pool.len(),
            "prompts.shots",
            || {
                format!(
                    "is {} but the pool holds only {} examples",
                    s.prompts.shots,
                    s.prompts.pool.len()
                )
            },
        )?;
        Ok(())
    }

    /// `prompts.chosen`, `prompts.rejected`, the pool's entries and `prompts.style_system`: two
    /// different names, each entry holding an example of both and nothing else.
    fn validate_styles(&self) -> Result<(), Invalid> {
        let p = &self.prompts;
        let name_ok = |n: &str| {
            !n.is_empty()
                && n.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        };
        check(name_ok(&p.chosen), "prompts.chosen", || {
            format!("{:?}: a style's name is a word of letters, digits, _ or - (it keys the pool's examples)", p.chosen)
        })?;
        check(name_ok(&p.rejected), "prompts.rejected", || {
            format!("{:?}: a style's name is a word of letters, digits, _ or - (it keys the pool's examples)", p.rejected)
        })?;
        check(p.chosen != p.rejected, "prompts.rejected", || {
            format!("must differ from prompts.chosen (both are {:?})", p.chosen)
        })?;
        for (i, shot) in p.pool.iter().enumerate() {
            for style in p.styles() {
                check(
                    shot.styles.get(style).is_some_and(|r| !r.trim().is_empty()),
                    "prompts.pool",
                    || {
                        format!(
                            "entry {} ({:?}) has no `{style}` example; every entry needs `title`, `{}` and `{}`",
                            i + 1, shot.title, p.chosen, p.rejected
                        )
                    },
                )?;
            }
            if let Some(other) = shot
                .styles
                .keys()
                .find(|k| !p.styles().contains(&k.as_str()))
            {
                return check(false, "prompts.pool", || {
                    format!(
                        "entry {} ({:?}) has `{other}`, which is neither prompts.chosen ({:?}) nor prompts.rejected ({:?})",
                        i + 1, shot.title, p.chosen, p.rejected
                    )
                });
            }
        }
        if let Some(other) = p
            .style_system
            .keys()
            .find(|k| !p.styles().contains(&k.as_str()))
        {
            return check(false, "prompts.style_system", || {
                format!(
                    "names `{other}`, which is neither prompts.chosen ({:?}) nor prompts.rejected ({:?})",
                    p.chosen, p.rejected
                )
            });
        }
        Ok(())
    }

    /// `scrape.file`, `scrape.column`, `scrape.max_file_bytes`: a file or a page, never both.
    fn validate_items_file(&self) -> Result<(), Invalid> {
        let sc = &self.scrape;
        check(sc.max_file_bytes >= 1, "scrape.max_file_bytes", || {
            "must be at least 1".into()
        })?;
        if sc.file.is_empty() {
            return check(sc.column.is_empty(), "scrape.column", || {
                "only applies with scrape.file (the page's titles come from scrape.selector)".into()
            });
        }
        check(sc.snapshot.is_empty(), "scrape.file", || {
            format!(
                "is set ({:?}) and so is scrape.snapshot ({:?}): items come from one source, \
                 a file or a page; remove one of them",
                sc.file, sc.snapshot
            )
        })?;
        let Some(format) = ItemFormat::of(&sc.file) else {
            return check(false, "scrape.file", || {
                format!(
                    "{:?}: unknown extension; the format is read from it: {}",
                    sc.file,
                    ItemFormat::EXTENSIONS
                )
            });
        };
        if format == ItemFormat::Txt {
            check(sc.column.is_empty(), "scrape.column", || {
                format!(
                    "{:?} is a text file, one item a line, with no columns: remove scrape.column",
                    sc.file
                )
            })
        } else {
            check(!sc.column.trim().is_empty(), "scrape.column", || {
                format!(
                    "{:?} is a .{} file: name the column (or field) that holds the items",
                    sc.file,
                    format.name()
                )
            })
        }
    }

    /// `[generate]` and `[generate.openai]`.
    // Long because one check per setting, in the recipe's order, each naming its key.
    fn validate_generate(&self) -> Result<(), Invalid> {
        let s = self;
        let g = &s.generate;
        check(!g.model.trim().is_empty(), "generate.model", || {
            "must name a Hub repo id, a folder or a .gguf file".into()
        })?;
        check(g.batch_size > 0, "generate.batch_size", || {
            "must be at least 1".into()
        })?;
        check(g.chunk_size > 0, "generate.chunk_size", || {
            "must be at least 1".into()
        })?;
        check(g.max_new_tokens > 0, "generate.max_new_tokens", || {
            "must be at least 1".into()
        })?;
        check(
            g.temperature.is_finite() && g.temperature >= 0.0,
            "generate.temperature",
            || format!("is {}; must be finite and >= 0 (0 = greedy)", g.temperature),
        )?;
        check(g.top_p > 0.0 && g.top_p <= 1.0, "generate.top_p", || {
            format!("is {}; must be in (0, 1]", g.top_p)
        })?;
        // transformers refuses a penalty that is not strictly positive.
        check(
            g.repetition_penalty.is_finite() && g.repetition_penalty > 0.0,
            "generate.repetition_penalty",
            || {
                format!(
                    "is {}; must be finite and > 0 (1 = off)",
                    g.repetition_penalty
                )
            },
        )?;
        // OpenAI's range for both.
        for (key, v) in [
            ("generate.frequency_penalty", g.frequency_penalty),
            ("generate.presence_penalty", g.presence_penalty),
        ] {
            check((-2.0..=2.0).contains(&v), key, || {
                format!("is {v}; must be in [-2, 2] (0 = off)")
            })?;
        }
        let o = &g.openai;
        if g.backend == Backend::Openai {
            check(!o.endpoints.is_empty(), "generate.openai.endpoints", || {
                "is empty; the openai backend needs at least one base URL, e.g. \
                 --set 'generate.openai.endpoints=[\"http://127.0.0.1:8000/v1\"]'"
                    .into()
            })?;
        }
        for e in &o.endpoints {
            let bad = |why: String| Invalid {
                key: "generate.openai.endpoints",
                why: format!("{:?} {why}", crate::backend::openai::redact(e)),
            };
            let u = reqwest::Url::parse(e).map_err(|err| {
                bad(format!(
                    "is not a URL ({err}); write it as http://HOST:PORT/v1"
                ))
            })?;
            if !matches!(u.scheme(), "http" | "https") || u.host_str().is_none() {
                return Err(bad("must be an http:// or https:// URL with a host".into()));
            }
            if u.query().is_some() || u.fragment().is_some() {
                return Err(bad("must be a base URL without a query or fragment".into()));
            }
        }
        if g.backend == Backend::Openai {
            check(!o.model.trim().is_empty(), "generate.openai.model", || {
                "must name the served model, as the servers' GET /v1/models lists it".into()
            })?;
        }
        check(o.concurrency > 0, "generate.openai.concurrency", || {
            "must be at least 1".into()
        })?;
        check(o.timeout_secs > 0, "generate.openai.timeout_secs", || {
            "must be at least 1".into()
        })?;
        check(
            o.max_answer_bytes >= 1024,
            "generate.openai.max_answer_bytes",
            || "must be at least 1024 (an answer's JSON alone takes a few hundred bytes)".into(),
        )?;
        Ok(())
    }

    /// `[split]` and `[merge]`.
    fn validate_split_and_merge(&self) -> Result<(), Invalid> {
        let s = self;
        check(s.split.train + s.split.test > 0, "split.train", || {
            "train + test must be at least 1".into()
        })?;
        check(
            s.split.train + s.split.test <= s.scrape.count,
            "split.train",
            || {
                format!(
                    "train {} + test {} exceeds scrape.count {}: there are not enough titles",
                    s.split.train, s.split.test, s.scrape.count
                )
            },
        )?;
        check(s.merge.judge != JudgeKind::Trained, "merge.judge", || {
            "is \"trained\", but that judge is fitted on the split, which merge comes before; use \"lexicon\" or \"llm\"".into()
        })?;
        check(
            s.merge.min_margin.is_finite() && s.merge.min_margin >= 0.0,
            "merge.min_margin",
            || format!("is {}; must be finite and >= 0", s.merge.min_margin),
        )?;
        Ok(())
    }

    /// `[eval]`, and the servers it needs with `eval.backend = "openai"`.
    /// `[rounds]`: checked only when rounds run, so a recipe without them never fails here.
    fn validate_rounds(&self) -> Result<(), Invalid> {
        let r = &self.rounds;
        if r.count == 0 {
            return Ok(());
        }
        check(r.count <= 100, "rounds.count", || {
            format!("is {}; at most 100", r.count)
        })?;
        check(r.titles > 0, "rounds.titles", || {
            "must be at least 1".into()
        })?;
        check(r.samples >= 2, "rounds.samples", || {
            format!(
                "is {}; a pair needs at least 2 reviews of a title to pick the best and the worst",
                r.samples
            )
        })?;
        check(
            matches!(r.judge, JudgeKind::Lexicon | JudgeKind::Trained),
            "rounds.judge",
            || "must be \"lexicon\" or \"trained\": the judge that labels a round's pairs".into(),
        )?;
        for (k, v) in [
            ("rounds.loop_penalty", r.loop_penalty),
            ("rounds.length_penalty", r.length_penalty),
            ("rounds.margin", r.margin),
        ] {
            check(v.is_finite() && v >= 0.0, k, || {
                format!("is {v}; must be finite and >= 0")
            })?;
        }
        check(r.epochs > 0, "rounds.epochs", || {
            "must be at least 1".into()
        })?;
        // Every eval must keep a judge that labelled nothing it evaluates.
        let m = self.merge.judge;
        check(
            m == JudgeKind::Off || m == r.judge || self.eval.judge == JudgeKind::Llm,
            "rounds.judge",
            || {
                format!(
                    "is \"{}\" and merge.judge \"{}\": with both labelling, no judge of the eval would be independent of the labels; use the same judge for both, or set eval.judge = \"llm\" as a third",
                    r.judge.name(),
                    m.name()
                )
            },
        )?;
        check(self.train.dataset.is_empty(), "rounds.count", || {
            "rounds draw fresh titles from the scraped page and extend the split's bot; with train.dataset set there is neither (set rounds.count = 0)".into()
        })?;
        check(!self.train.loss.is_unpaired(), "rounds.count", || {
            format!(
                "rounds make pairs (chosen, rejected), but train.loss = \"{}\" trains on unpaired rows; use a pairwise loss",
                self.train.loss.describe()
            )
        })?;
        check(self.eval.backend == Backend::Local, "rounds.count", || {
            "rounds sample from the bot with this binary's engine and evaluate each round here: set eval.backend = \"local\"".into()
        })
    }

    fn validate_eval(&self) -> Result<(), Invalid> {
        let s = self;
        check(s.eval.judge != JudgeKind::Off, "eval.judge", || {
            "must be \"lexicon\", \"trained\" or \"llm\": the eval stage scores every review".into()
        })?;
        let o = &s.generate.openai;
        if s.eval.backend == Backend::Openai {
            let e = &s.eval;
            check(!o.endpoints.is_empty(), "eval.backend", || {
                "is \"openai\" but generate.openai.endpoints is empty: the eval's reviews go to those servers".into()
            })?;
            for (k, v) in [
                ("eval.served_base", &e.served_base),
                ("eval.served_adapter", &e.served_adapter),
            ] {
                check(!v.trim().is_empty(), k, || {
                    "must name a model the servers serve (GET /v1/models) when eval.backend = \"openai\"".into()
                })?;
            }
            check(
                e.served_base != e.served_adapter,
                "eval.served_adapter",
                || "must differ from eval.served_base: the eval compares two models".into(),
            )?;
            check(o.api == OpenAiApi::Completions, "eval.backend", || {
                "\"openai\" sends the test prompts' text, so it needs generate.openai.api = \"completions\"".into()
            })?;
        }
        check(s.eval.samples > 0, "eval.samples", || {
            "must be at least 1".into()
        })?;
        Ok(())
    }

    /// `[judge]`: the LLM judge's prompt and verdict words.
    fn validate_judge(&self) -> Result<(), Invalid> {
        let s = self;
        check(s.judge.batch_size > 0, "judge.batch_size", || {
            "must be at least 1".into()
        })?;
        check(
            s.judge.question.contains("{review}"),
            "judge.question",
            || "must contain {review}, where the review goes".into(),
        )?;
        for (k, w) in [
            ("judge.negative", &s.judge.negative),
            ("judge.positive", &s.judge.positive),
        ] {
            check(!w.trim().is_empty(), k, || "must not be empty".into())?;
        }
        check(
            s.judge.negative.trim() != s.judge.positive.trim(),
            "judge.positive",
            || "must differ from judge.negative".into(),
        )?;
        Ok(())
    }
}
