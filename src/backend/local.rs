//! The local backend: this binary's engine on a loaded model (`model::generate`): prompts
//! tokenized with the model's tokenizer, checked against its context, decoded in batches with
//! refill, each row's text decoded and trimmed.

use super::{Backend, Finished, Job, Report};
use crate::error::Result;
use crate::model::generate::{generate, limits, Request, Sampling};
use crate::model::load::Model;

/// The engine on `model`, `batch` rows decoded together.
pub(crate) struct Local<'m> {
    pub(crate) model: &'m Model,
    pub(crate) batch: usize,
    /// How a prompt is named in an error (the context check): by default `prompt {id}`.
    pub(crate) label: Option<&'m dyn Fn(usize) -> String>,
    /// Token ids at or past this are wrapped into it: a benchmark on a random model shaped like
    /// another (a smaller vocabulary than the tokenizer's) still runs the real prompts.
    pub(crate) wrap_vocab: Option<u32>,
}

impl<'m> Local<'m> {
    pub(crate) fn new(model: &'m Model, batch: usize) -> Self {
        Self {
            model,
            batch,
            label: None,
            wrap_vocab: None,
        }
    }
}

impl Backend for Local<'_> {
    fn generate(
        &self,
        jobs: Vec<Job>,
        s: &Sampling,
        each: &mut dyn FnMut(Finished) -> Result<()>,
    ) -> Result<Report> {
        let tok = &self.model.meta.tok;
        let reqs = jobs
            .iter()
            .map(|j| {
                let mut ids = tok.encode(&j.prompt, true)?;
                if let Some(v) = self.wrap_vocab {
                    ids.iter_mut().for_each(|t| *t %= v);
                }
                Ok(Request { id: j.id, ids })
            })
            .collect::<Result<Vec<_>>>()?;
        limits::check_generation_fits(
            self.model.llama.cfg.max_position_embeddings,
            s.max_new_tokens,
            reqs.iter().map(|r| {
                (r.ids.len(), || match self.label {
                    Some(l) => l(r.id),
                    None => format!("prompt {}", r.id),
                })
            }),
        )?;
        let stats = generate(self.model, reqs, s, self.batch, |o, _| {
            each(Finished {
                id: o.id,
                text: tok.decode(&o.tokens, true)?.trim().to_string(),
                tokens: o.tokens.len(),
                prompt_tokens: o.prompt_tokens,
                finish: o.finish,
                endpoint: 0,
                retries: 0,
                unexpected: Vec::new(),
            })
        })?;
        Ok(Report {
            engine: Some(stats),
        })
    }
}
