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
    /// Also answer to this host name (repeat for more). Without it, a request whose Host is not
    /// the bound address, localhost, 127.0.0.1 or ::1 gets 421: another name that resolves here
    /// (DNS rebinding) reads nothing
    #[arg(long, value_name = "NAME")]
    pub(crate) allowed_host: Vec<String>,
    /// Let pages of this origin (`https://app.example`) call the API from a browser (CORS;
    /// repeat for more). Without it, cross-origin browser requests get 403
    #[arg(long, value_name = "ORIGIN")]
    pub(crate) cors_origin: Vec<String>,
    /// Connections served at once; more wait until one closes
    #[arg(long, default_value_t = 512)]
    pub(crate) max_connections: usize,
    /// Seconds a connection may take to send a request's headers, counted from when it opens or
    /// its last answer ends (so an idle kept-alive connection closes after this too)
    #[arg(long, value_name = "SECS", default_value_t = 10)]
    pub(crate) header_timeout: u64,
    /// Seconds a request may take to send its body once its headers are in
    #[arg(long, value_name = "SECS", default_value_t = 30)]
    pub(crate) body_timeout: u64,
}

/// `--cors-origin`: `scheme://host[:port]`, as a browser writes `Origin`.
fn check_origin(o: &str) -> Result<String> {
    let origin = reqwest::Url::parse(o).ok().filter(|u| {
        matches!(u.scheme(), "http" | "https")
            && u.host_str().is_some()
            && u.path() == "/"
            && u.query().is_none()
            && u.fragment().is_none()
            && u.username().is_empty()
    });
    match origin {
        // As the browser will send it: lower-case host, default port left out.
        Some(u) => Ok(u.origin().ascii_serialization()),
        None => crate::error::usage!(
            "--cors-origin {o:?} is not an origin; write it as a browser sends it, e.g. https://app.example or http://localhost:3000 (no path)"
        ),
    }
}

/// `--max-connections`, the timeouts, `--allowed-host` and `--cors-origin`, checked.
fn guards(a: &ServeArgs) -> Result<(crate::serve::Limits, crate::serve::Origins)> {
    if a.max_connections == 0 || a.header_timeout == 0 || a.body_timeout == 0 {
        crate::error::usage!(
            "--max-connections, --header-timeout and --body-timeout must be at least 1"
        );
    }
    let cors = a
        .cors_origin
        .iter()
        .map(|o| check_origin(o))
        .collect::<Result<Vec<_>>>()?;
    if let Some(h) = a
        .allowed_host
        .iter()
        .find(|h| h.is_empty() || h.contains(|c: char| c == '/' || c == ':' || c.is_whitespace()))
    {
        crate::error::usage!(
            "--allowed-host {h:?} is not a host name; give the name alone, without scheme or port (bot.lan)"
        );
    }
    Ok((
        crate::serve::Limits {
            header_timeout: std::time::Duration::from_secs(a.header_timeout),
            body_timeout: std::time::Duration::from_secs(a.body_timeout),
            max_connections: a.max_connections,
        },
        crate::serve::Origins {
            allowed_hosts: a.allowed_host.clone(),
            cors,
        },
    ))
}

pub(crate) fn exec(g: &Global, a: ServeArgs) -> Result<()> {
    let recipe = open(g, Network::Allowed)?;
    let ctx = Ctx::new(&recipe, &g.workdir, g.quiet);
    let mut dirs = a.adapter.clone();
    if dirs.is_empty() && !a.no_adapter {
        match stages::latest_adapter(&ctx) {
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
    let (limits, origins) = guards(&a)?;
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
            limits,
            origins,
            site,
            quiet: g.quiet,
        },
    )
}
