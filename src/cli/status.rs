//! `pipeline status`: each stage up to date, stale (and why), damaged or missing, from the
//! manifests and local files only (no page fetch, no download).

use super::{open, Global};
use crate::error::Result;
use crate::recipe::Network;
use crate::stages::{self, Ctx};
use clap::Args;

#[derive(Args, Debug)]
pub(crate) struct StatusArgs {
    /// Machine-readable output
    #[arg(long)]
    pub(crate) json: bool,
}

pub(crate) fn exec(g: &Global, a: StatusArgs) -> Result<()> {
    let recipe = open(g, Network::Never)?;
    let ctx = Ctx::new(&recipe, &g.workdir, g.quiet);
    let st = stages::status(&ctx);
    if a.json {
        println!("{}", serde_json::to_string_pretty(&st)?);
    } else {
        for s in &st {
            let counts = s
                .counts
                .iter()
                .map(|(k, v)| format!("{v} {k}"))
                .collect::<Vec<_>>()
                .join(", ");
            println!(
                "{:<15} {:<11} {}",
                s.stage,
                s.state,
                s.key.as_deref().unwrap_or("-")
            );
            for r in &s.reasons {
                println!("{:16}because {r}", "");
            }
            if let Some(p) = &s.path {
                println!("{:16}at {}", "", p.display());
            }
            if !counts.is_empty() {
                println!("{:16}{counts}", "");
            }
            if let (Some(f), Some(sec)) = (&s.finished_at, s.seconds) {
                println!("{:16}built {f} in {sec:.1}s", "");
            }
        }
    }
    Ok(())
}
