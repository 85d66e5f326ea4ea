//! The model's context is a hard limit: a prompt plus the tokens to generate must fit in
//! `max_position_embeddings` positions (the RoPE table and the KV cache are sized by it). A row
//! that does not fit is an error that names the row and the limit, checked before anything is
//! allocated, never an out-of-range position or a KV cache too large for memory.

use crate::error::{bail, Result};

/// Refuse when any row's prompt plus `max_new_tokens` exceeds `context`. `rows` are (prompt
/// tokens, how to name the row); the first row that does not fit is named and the rest counted.
pub(crate) fn check_generation_fits<N: FnOnce() -> String>(
    context: usize,
    max_new_tokens: usize,
    rows: impl IntoIterator<Item = (usize, N)>,
) -> Result<()> {
    let mut first: Option<(String, usize)> = None;
    let mut over = 0usize;
    for (n, name) in rows {
        if n.saturating_add(max_new_tokens) > context {
            over += 1;
            if first.is_none() {
                first = Some((name(), n));
            }
        }
    }
    if let Some((name, n)) = first {
        let others = if over > 1 {
            format!(" ({} more rows do not fit either)", over - 1)
        } else {
            String::new()
        };
        bail!(
            "{name}: its prompt of {n} tokens plus generate.max_new_tokens {max_new_tokens} \
             exceeds the model's context of {context} tokens (max_position_embeddings){others}; \
             shorten the prompt (a shorter title, fewer prompts.shots, a shorter prompts.system) \
             or lower generate.max_new_tokens"
        );
    }
    Ok(())
}
