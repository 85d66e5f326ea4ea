//! Generation backends: where reviews come from, behind one trait. [`local::Local`] is this
//! binary's engine (a loaded model, batched decoding); [`openai::Remote`] is the client of
//! OpenAI-compatible servers (vLLM, TGI, SGLang, llama.cpp): endpoint spreading, retries, the
//! wire format. The generate stage, the eval stage and `bench generate` hold a `&dyn Backend`
//! and never ask which one runs.
//!
//! May import `model` (all of it), `kernels` and the base modules; never `config`, `stages` or
//! anything above.

pub(crate) mod local;
pub(crate) mod openai;

use crate::error::Result;
use crate::model::generate::{Finish, Sampling, Stats};

pub(crate) use openai::Job;

/// One finished row, whichever backend wrote it.
#[derive(Debug, Clone)]
pub(crate) struct Finished {
    /// The job's id.
    pub(crate) id: usize,
    /// The completion, trimmed.
    pub(crate) text: String,
    pub(crate) tokens: usize,
    pub(crate) prompt_tokens: usize,
    pub(crate) finish: Finish,
    /// Which endpoint answered (an index into the server list; 0 for the local engine).
    pub(crate) endpoint: usize,
    /// Tries that failed before this answer (0 for the local engine).
    pub(crate) retries: u32,
    /// The `finish_reason` of each server answer refused and asked again (`content_filter`,
    /// ...), for the stage's summary.
    pub(crate) unexpected: Vec<String>,
}

/// What the backend measured of a run, beyond its rows.
#[derive(Debug, Clone, Default)]
pub(crate) struct Report {
    /// The local engine's phase timings and token counts (none from a server).
    pub(crate) engine: Option<Stats>,
}

/// Writes completions for prompts.
pub(crate) trait Backend {
    /// Complete every job with the sampling `s`, handing each finished row to `each` as it
    /// finishes (in no particular order). Job `id`'s sampler is seeded from `(s.seed, id)`, so
    /// a row's text does not depend on batching, order or resumption. On an error, the rows
    /// already handed over stay handed over (a resumed run need not ask again), no new work
    /// starts, and the first error is returned; after `each` fails, nothing more reaches it.
    fn generate(
        &self,
        jobs: Vec<Job>,
        s: &Sampling,
        each: &mut dyn FnMut(Finished) -> Result<()>,
    ) -> Result<Report>;
}

impl From<openai::Answer> for Finished {
    fn from(a: openai::Answer) -> Self {
        Finished {
            id: a.id,
            text: a.text,
            tokens: a.tokens,
            prompt_tokens: a.prompt_tokens,
            finish: a.finish,
            endpoint: a.endpoint,
            retries: a.retries,
            unexpected: a.unexpected,
        }
    }
}

impl Backend for openai::Remote {
    fn generate(
        &self,
        jobs: Vec<Job>,
        s: &Sampling,
        each: &mut dyn FnMut(Finished) -> Result<()>,
    ) -> Result<Report> {
        openai::Remote::generate(self, jobs, s, |a| each(a.into()))?;
        Ok(Report::default())
    }
}
