//! The recipe: `pipeline.toml`, a named preset, `--set KEY=VALUE` overrides, and their validation.
//!
//! Every setting lives in [`Settings`], typed: a setting with a fixed set of values is an enum, so
//! an unknown value is refused here, with the valid choices, and never compared as a string later.
//! Layers apply in this order, each overriding the one before: built-in defaults, the config file,
//! the preset (`--preset NAME`), then each `--set` in command-line order. Errors name the file and
//! line (or the preset, or the `--set`), the key, and suggest the nearest valid key for a typo,
//! because a silently ignored setting is the worst kind of bug in a data pipeline.

//!
//! `types.rs` holds the settings and their defaults, `load.rs` the layering, `validate.rs` the
//! ranges. May import the settings types of the floors below (`dpo::config`, `judge`,
//! `backend::openai`, `model::options`) and the base modules.

mod load;
mod types;
mod validate;

pub use crate::error::ConfigError;
pub use load::{load, Loaded, Sources};
pub use types::*;
