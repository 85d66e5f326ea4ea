//! `pipeline serve`: the page and the OpenAI-compatible API over the base model and adapters.

use super::{open, Global};
use crate::error::Result;
use crate::recipe::Network;
use crate::stages::{self, Ctx, Stage};
use clap::Args;
use std::path::PathBuf;

#[derive(Args, Debug)]
pub(crate) struct ServeArgs {
    /// Adapter folder to serve (repeat for more; default: the workdir's latest trained
    /// adapter). The first is the model `reviewer2`, others are named by their folder
    #[arg(long, value_name = "DIR")]
    pub(crate) adapter: Vec<PathBuf>,
    /// Serve the base model alone
    #[arg(long, conflicts_with = "adapter")]
    pub(crate) no_adapter: bool,
    /// Address to listen on (anything but loopback is reachable from other machines)
    #[arg(long, default_value = "127.0.0.1")]
    pub(crate) host: std::net::IpAddr,
    /// Port (0 = any free port; the address is printed)
    #[arg(long, default_value_t = 8080)]
    pub(crate) port: u16,
    /// Require `Authorization: Bearer <key>`, the key read from this environment variable
    #[arg(long, value_name = "VAR")]
    pub(crate) api_key_env: Option<String>,
    /// Requests decoded together per model (default: generate.batch_size)
    #[arg(long)]
    pub(crate) batch_size: Option<usize>,
    /// Requests that may wait for a slot; beyond that, 503
    #[arg(long, default_value_t = 256)]
    pub(crate) queue: usize,
    /// The most new tokens a request may ask for (and what it gets without max_tokens)
    #[arg(long, default_value_t = 256)]
    pub(crate) max_tokens: usize,
}

pub(crate) fn exec(g: &Global, a: ServeArgs) -> Result<()> {
    let recipe = open(g, Network::Allowed)?;
    let ctx = Ctx::new(&recipe, &g.workdir, g.quiet);
    let mut dirs = a.adapter.clone();
    if dirs.is_empty() && !a.no_adapter {
        match stages::latest_output(&ctx, Stage::Train) {
            Some(d) => dirs.push(d),
            None => ctx.say(
                "Note",
                "no trained adapter in this workdir: serving the base model alone (train one with `pipeline run`, or pass --adapter DIR)",
            ),
        }
    }
    let adapters = crate::serve::adapter_names(&dirs)?;
    let api_key = match &a.api_key_env {
        None => None,
        Some(var) => match std::env::var(var) {
            Ok(k) if !k.trim().is_empty() => Some(k.trim().to_string()),
            _ => crate::error::usage!(
                "--api-key-env names {var}, which is not set (or empty); export the key in it"
            ),
        },
    };
    if !a.host.is_loopback() {
        tracing::warn!(
            "serving on {}: reachable from other machines{}",
            a.host,
            if api_key.is_none() {
                ", with no API key (--api-key-env VAR)"
            } else {
                ""
            }
        );
    }
    if a.queue == 0 {
        crate::error::usage!("--queue must be at least 1");
    }
    if a.max_tokens == 0 {
        crate::error::usage!("--max-tokens must be at least 1");
    }
    let batch = a
        .batch_size
        .unwrap_or(recipe.settings().generate.batch_size)
        .max(1);
    let model = recipe.load_interactive(!adapters.is_empty())?;
    for (name, dir) in &adapters {
        ctx.say("Adapter", format!("{name}: {}", dir.display()));
    }
    let site = crate::serve::Site::new(
        &recipe,
        stages::latest_output(&ctx, Stage::Split),
        stages::latest_output(&ctx, Stage::Train),
        stages::latest_output(&ctx, Stage::Eval),
    );
    crate::serve::run(
        model,
        crate::serve::Options {
            addr: std::net::SocketAddr::new(a.host, a.port),
            adapters,
            api_key,
            batch,
            queue: a.queue,
            max_tokens: a.max_tokens,
            site,
            quiet: g.quiet,
        },
    )
}
