//! The library's error type. Callers match on what went wrong (a bad recipe or command line, a
//! remote server's failure, a model that cannot be used, training that diverged, a run the user
//! stopped): [`Error::kind`] names it through any layers of `Context`, `main` maps the kind to
//! the exit code the README documents ([`ErrorKind::exit_code`]), and `pipeline serve` to an
//! HTTP status. Every layer adds context with `Context`, and the binary prints the chain
//! (`error: ...`, `caused by: ...`).

use std::fmt::Display;
use std::path::PathBuf;

/// Why a recipe cannot be loaded. Every variant names where the bad value came from.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}; pass --config FILE or create it")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{origin}: invalid TOML: {msg}")]
    Syntax { origin: String, msg: String },
    #[error("{origin}: unknown key `{key}`{suggestion}")]
    UnknownKey {
        origin: String,
        key: String,
        suggestion: String,
    },
    #[error("{origin}: {msg}")]
    Type { origin: String, msg: String },
    #[error("{origin}: {key}: {why}")]
    Invalid {
        origin: String,
        key: String,
        why: String,
    },
    #[error("--set {arg}: expected KEY=VALUE, e.g. --set split.seed=7")]
    SetSyntax { arg: String },
    #[error("--preset {name}: no such preset; choose one of: {choices}")]
    UnknownPreset { name: String, choices: String },
}

/// What went wrong.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The recipe (file, preset, `--set`) cannot be used.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The command line asks for something it cannot have (a flag's value, a combination).
    #[error("{0}")]
    Usage(String),
    /// Input that cannot be used as it is: a file, a row, a page, a model. The message names it
    /// and says what to do.
    #[error("{0}")]
    Invalid(String),
    /// A model this engine does not run (another architecture, tokenizer or activation).
    #[error("{0}")]
    Unsupported(String),
    /// A remote server failed or answered what cannot be used: which endpoint (its URL with
    /// any credentials removed), the HTTP status when there was one, and why (the message
    /// names the endpoint too).
    #[error("{message}")]
    Remote {
        endpoint: String,
        status: Option<u16>,
        message: String,
    },
    /// Training went non-finite at `step`; the message says what and what to change.
    #[error("{message}")]
    Diverged { step: usize, message: String },
    /// The user stopped the work (answered no, or interrupted it); nothing was marked built.
    #[error("{0}")]
    Cancelled(String),
    /// A failure, with what was being done when it happened. Displays as the whole chain,
    /// `context: cause`, so a message that embeds an error keeps its reason.
    #[error("{context}: {cause}")]
    Context { context: String, cause: Box<Error> },
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// A candle error. Its message only: a backtrace candle captured (it does when
    /// `RUST_BACKTRACE` or `RUST_LIB_BACKTRACE` is set) is kept apart, for `main` to print
    /// behind `-vv` or `RUST_BACKTRACE` ([`Error::backtrace`]), never inside the message.
    #[error("{source}")]
    Tensor {
        source: candle_core::Error,
        trace: Option<Box<std::backtrace::Backtrace>>,
    },
    #[error(transparent)]
    Json(#[from] serde_json::Error),
    #[error(transparent)]
    Parquet(#[from] parquet::errors::ParquetError),
    #[error(transparent)]
    Arrow(#[from] arrow_schema::ArrowError),
    #[error(transparent)]
    Template(#[from] minijinja::Error),
    #[error(transparent)]
    Http(#[from] reqwest::Error),
    #[error(transparent)]
    Hub(#[from] hf_hub::api::sync::ApiError),
    #[error(transparent)]
    Safetensors(#[from] safetensors::SafeTensorError),
    /// Errors of libraries that box theirs (tokenizers, the chart backend).
    #[error(transparent)]
    Other(#[from] Box<dyn std::error::Error + Send + Sync>),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What kind of failure an error is, whatever context was added on the way up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// A bad command line.
    Usage,
    /// A recipe that cannot be loaded or holds an impossible value.
    Settings,
    /// A model this engine does not run.
    Unsupported,
    /// A remote server or the network (the page, the Hub, an OpenAI-compatible server).
    Remote,
    /// Training went non-finite.
    Diverged,
    /// The user stopped it.
    Cancelled,
    /// Anything else: bad input, I/O, a failed computation.
    Failure,
}

impl ErrorKind {
    /// The process's exit code for this kind (README, "Exit codes"): 2 usage or settings (as
    /// clap exits on a bad flag), 3 an unsupported model, 4 a remote failure, 5 training
    /// diverged, 130 cancelled (as a shell reports an interrupt), 1 anything else.
    pub fn exit_code(self) -> i32 {
        match self {
            ErrorKind::Usage | ErrorKind::Settings => 2,
            ErrorKind::Unsupported => 3,
            ErrorKind::Remote => 4,
            ErrorKind::Diverged => 5,
            ErrorKind::Cancelled => 130,
            ErrorKind::Failure => 1,
        }
    }
}

impl Error {
    /// What kind of failure this is, looking through `Context`.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Context { cause, .. } => cause.kind(),
            Error::Config(_) => ErrorKind::Settings,
            Error::Usage(_) => ErrorKind::Usage,
            Error::Unsupported(_) => ErrorKind::Unsupported,
            Error::Remote { .. } | Error::Http(_) | Error::Hub(_) => ErrorKind::Remote,
            Error::Diverged { .. } => ErrorKind::Diverged,
            Error::Cancelled(_) => ErrorKind::Cancelled,
            _ => ErrorKind::Failure,
        }
    }
}

impl Error {
    /// The backtrace a candle error captured, looking through `Context`.
    pub fn backtrace(&self) -> Option<&std::backtrace::Backtrace> {
        match self {
            Error::Context { cause, .. } => cause.backtrace(),
            Error::Tensor { trace, .. } => trace.as_deref(),
            _ => None,
        }
    }
}

impl From<candle_core::Error> for Error {
    fn from(e: candle_core::Error) -> Self {
        let (source, trace) = without_backtrace(e);
        Error::Tensor { source, trace }
    }
}

/// candle displays a captured backtrace as part of its message (`WithBacktrace`, also when it is
/// wrapped in `Context` or `WithPath`): take it out, keeping the innermost one.
fn without_backtrace(
    e: candle_core::Error,
) -> (candle_core::Error, Option<Box<std::backtrace::Backtrace>>) {
    use candle_core::Error as C;
    match e {
        C::WithBacktrace { inner, backtrace } => {
            let (inner, deeper) = without_backtrace(*inner);
            (inner, deeper.or(Some(backtrace)))
        }
        C::Context { inner, context } => {
            let (inner, trace) = without_backtrace(*inner);
            (
                C::Context {
                    inner: Box::new(inner),
                    context,
                },
                trace,
            )
        }
        C::WithPath { inner, path } => {
            let (inner, trace) = without_backtrace(*inner);
            (
                C::WithPath {
                    inner: Box::new(inner),
                    path,
                },
                trace,
            )
        }
        other => (other, None),
    }
}

/// Run `f`, a call into a library that reads a file we cannot fully vouch for (candle's GGUF and
/// safetensors readers), turning a panic into an error naming `what`. The last line of defence:
/// the files are validated before; this only keeps an unforeseen malformation from aborting.
pub(crate) fn no_panic<T>(what: impl Display, f: impl FnOnce() -> Result<T>) -> Result<T> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(p) => {
            let why = p
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "no message".into());
            Err(Error::Invalid(format!(
                "{what}: the reader failed on malformed data ({why}); re-download or re-convert the model"
            )))
        }
    }
}

/// Small standard errors a message's context explains (a malformed number, bad UTF-8).
macro_rules! other_from {
    ($($t:ty),*) => {$(
        impl From<$t> for Error {
            fn from(e: $t) -> Self {
                Error::Other(Box::new(e))
            }
        }
    )*};
}
other_from!(
    std::num::ParseIntError,
    std::num::ParseFloatError,
    std::string::FromUtf8Error,
    std::str::Utf8Error
);

// The chart backend's error is generic over the drawing backend.
impl<E: std::error::Error + Send + Sync + 'static> From<plotters::drawing::DrawingAreaErrorKind<E>>
    for Error
{
    fn from(e: plotters::drawing::DrawingAreaErrorKind<E>) -> Self {
        Error::Other(Box::new(e))
    }
}

/// Context for results and options: `.context("reading x")?`, `.with_context(|| ...)?`.
pub(crate) trait Context<T> {
    fn context(self, c: impl Display) -> Result<T>;
    fn with_context<C: Display>(self, f: impl FnOnce() -> C) -> Result<T>;
}

impl<T, E: Into<Error>> Context<T> for std::result::Result<T, E> {
    fn context(self, c: impl Display) -> Result<T> {
        self.map_err(|e| Error::Context {
            context: c.to_string(),
            cause: Box::new(e.into()),
        })
    }

    fn with_context<C: Display>(self, f: impl FnOnce() -> C) -> Result<T> {
        self.map_err(|e| Error::Context {
            context: f().to_string(),
            cause: Box::new(e.into()),
        })
    }
}

impl<T> Context<T> for Option<T> {
    fn context(self, c: impl Display) -> Result<T> {
        self.ok_or_else(|| Error::Invalid(c.to_string()))
    }

    fn with_context<C: Display>(self, f: impl FnOnce() -> C) -> Result<T> {
        self.ok_or_else(|| Error::Invalid(f().to_string()))
    }
}

/// `Error::Invalid(format!(...))`.
macro_rules! err {
    ($($t:tt)*) => { $crate::error::Error::Invalid(format!($($t)*)) };
}

/// `return Err(err!(...))`.
macro_rules! bail {
    ($($t:tt)*) => { return Err($crate::error::err!($($t)*).into()) };
}

/// `bail!(...)` unless the condition holds.
macro_rules! ensure {
    ($cond:expr, $($t:tt)*) => { if !$cond { $crate::error::bail!($($t)*) } };
}

/// `return Err(Error::Usage(format!(...)))`.
macro_rules! usage {
    ($($t:tt)*) => { return Err($crate::error::Error::Usage(format!($($t)*)).into()) };
}

/// `return Err(Error::Unsupported(format!(...)))`.
macro_rules! unsupported {
    ($($t:tt)*) => { return Err($crate::error::Error::Unsupported(format!($($t)*)).into()) };
}

pub(crate) use {bail, ensure, err, unsupported, usage};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_candle_backtrace_is_kept_out_of_the_message() {
        let bt = std::backtrace::Backtrace::force_capture();
        let inner = candle_core::Error::WithBacktrace {
            inner: Box::new(candle_core::Error::Msg("bad header".into())),
            backtrace: Box::new(bt),
        };
        let e: Error = candle_core::Error::Context {
            inner: Box::new(inner),
            context: Box::new("reading x.gguf"),
        }
        .into();
        let e = Err::<(), _>(e).context("loading").unwrap_err();
        assert_eq!(e.to_string(), "loading: reading x.gguf\nbad header");
        assert!(e.backtrace().is_some());
        let plain: Error = candle_core::Error::Msg("plain".into()).into();
        assert_eq!(plain.to_string(), "plain");
        assert!(plain.backtrace().is_none());
    }
}
