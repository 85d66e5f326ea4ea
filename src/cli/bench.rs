//! `pipeline bench`: generation and training speed over the resolved recipe.

use super::{open, Global};
use crate::error::Result;
use crate::recipe::Network;

pub(crate) fn exec(g: &Global, a: crate::bench::BenchArgs) -> Result<()> {
    // `bench generate` builds the prompts stage and `bench train` stages in the workdir.
    let _lock = crate::lock::WorkdirLock::acquire(&g.workdir)?;
    crate::bench::run(&open(g, Network::Allowed)?, &g.workdir, a)
}
