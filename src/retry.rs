//! The one retry policy of every network read: the page (scrape), the model download (the Hub)
//! and the OpenAI-compatible servers. A try fails as [`Failure::Retry`] (a connect error, a
//! timeout, a dropped connection, 408, 429, 5xx: worth another try, after the server's
//! `Retry-After` when it sent one) or [`Failure::Fatal`] (anything a retry cannot fix); between
//! tries the wait grows exponentially with full jitter, so many clients that failed together do
//! not come back together.

use std::time::{Duration, SystemTime};

/// Read a response body to its end, but never more than `limit` bytes of it *as decoded*: a
/// gzip-encoded answer is bounded by what it inflates to, so a small compressed "bomb" cannot
/// take the process's memory. A `Content-Length` over the limit is refused before any byte is
/// read. Over the limit is [`Failure::Fatal`] (the same request would bring the same body); a
/// connection that drops mid-body is [`Failure::Retry`]. `what` names the request and `setting`
/// the key that raises the limit, for the message.
pub(crate) fn read_limited(
    resp: reqwest::blocking::Response,
    limit: u64,
    what: &str,
    setting: &str,
) -> Result<Vec<u8>, Failure> {
    use std::io::Read;
    let too_large = |n: String| {
        Failure::fatal(format!(
            "{what}: the answer is {n} bytes, over the limit of {limit} ({setting}); raise it if that answer is expected"
        ))
    };
    // Content-Length is of the encoded body; a decoded one can only be as large or larger.
    if let Some(n) = resp.content_length().filter(|&n| n > limit) {
        return Err(too_large(n.to_string()));
    }
    let mut body = Vec::new();
    resp.take(limit + 1).read_to_end(&mut body).map_err(|e| {
        let mut why = e.to_string();
        let mut src = std::error::Error::source(&e);
        while let Some(s) = src {
            why = format!("{why}: {s}");
            src = s.source();
        }
        Failure::retry(
            if why.contains("timed out") || e.kind() == std::io::ErrorKind::TimedOut {
                format!("{what}: the answer stalled past the timeout ({why})")
            } else {
                format!("{what}: the connection dropped mid-response ({why})")
            },
        )
    })?;
    if body.len() as u64 > limit {
        return Err(too_large(format!("more than {limit}")));
    }
    Ok(body)
}

/// How one try went wrong.
#[derive(Debug, Clone)]
pub(crate) enum Failure {
    /// Worth another try; `after` is the server's `Retry-After`, `status` its HTTP status.
    Retry {
        why: String,
        after: Option<Duration>,
        status: Option<u16>,
    },
    /// No retry can fix it.
    Fatal { why: String, status: Option<u16> },
}

impl Failure {
    pub(crate) fn retry(why: impl Into<String>) -> Self {
        Failure::Retry {
            why: why.into(),
            after: None,
            status: None,
        }
    }

    pub(crate) fn fatal(why: impl Into<String>) -> Self {
        Failure::Fatal {
            why: why.into(),
            status: None,
        }
    }

    /// An HTTP answer that is not a success: retryable for 408, 429 and 5xx.
    pub(crate) fn from_status(code: u16, why: String, after: Option<Duration>) -> Self {
        if retryable_status(code) {
            Failure::Retry {
                why,
                after,
                status: Some(code),
            }
        } else {
            Failure::Fatal {
                why,
                status: Some(code),
            }
        }
    }

    pub(crate) fn why(&self) -> &str {
        match self {
            Failure::Retry { why, .. } | Failure::Fatal { why, .. } => why,
        }
    }

    pub(crate) fn status(&self) -> Option<u16> {
        match self {
            Failure::Retry { status, .. } | Failure::Fatal { status, .. } => *status,
        }
    }
}

/// Why [`Policy::run`] stopped trying.
#[derive(Debug, Clone)]
pub(crate) enum GiveUp {
    /// A try failed in a way no retry fixes.
    Fatal(Failure),
    /// Every try failed; `last` is the last failure.
    Exhausted { tries: u32, last: Failure },
    /// `stop` said so while waiting between tries.
    Stopped,
}

/// Whether an HTTP status is worth another try: 408 (request timeout), 429 (too many
/// requests) and every 5xx.
pub(crate) fn retryable_status(code: u16) -> bool {
    code == 408 || code == 429 || (500..600).contains(&code)
}

/// How many tries, and how long between them.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Policy {
    /// Tries after the first.
    pub(crate) retries: u32,
    /// The first wait's ceiling; each later one doubles it.
    pub(crate) base: Duration,
    /// No wait is longer, whatever `Retry-After` says.
    pub(crate) max_wait: Duration,
}

impl Policy {
    pub(crate) fn new(retries: u32) -> Self {
        Self {
            retries,
            base: Duration::from_millis(250),
            max_wait: Duration::from_secs(120),
        }
    }

    /// How long to wait before try `attempt + 2`: the server's `Retry-After` when it sent one,
    /// else exponential backoff with full jitter (half to all of `base * 2^attempt`); never
    /// longer than `max_wait`.
    pub(crate) fn wait(&self, attempt: u32, retry_after: Option<Duration>) -> Duration {
        use rand::Rng;
        if let Some(d) = retry_after {
            return d.min(self.max_wait);
        }
        let cap = self
            .base
            .saturating_mul(1 << attempt.min(16))
            .min(self.max_wait)
            .as_secs_f64();
        Duration::from_secs_f64(rand::rng().random_range(cap / 2.0..=cap))
    }

    /// `f(attempt)` until it succeeds, fails for good, has failed `retries + 1` times, or
    /// `stop()` turns true during a wait (checked every 50 ms). `what` names the work in the
    /// warning logged before each retry.
    pub(crate) fn run<T>(
        &self,
        what: &str,
        stop: &dyn Fn() -> bool,
        mut f: impl FnMut(u32) -> Result<T, Failure>,
    ) -> Result<(T, u32), GiveUp> {
        let mut attempt = 0;
        loop {
            match f(attempt) {
                Ok(v) => return Ok((v, attempt)),
                Err(e @ Failure::Fatal { .. }) => return Err(GiveUp::Fatal(e)),
                Err(e @ Failure::Retry { .. }) => {
                    if attempt >= self.retries {
                        return Err(GiveUp::Exhausted {
                            tries: attempt + 1,
                            last: e,
                        });
                    }
                    let after = match &e {
                        Failure::Retry { after, .. } => *after,
                        Failure::Fatal { .. } => None,
                    };
                    tracing::warn!("{what}: {}; retrying", e.why());
                    let until = std::time::Instant::now() + self.wait(attempt, after);
                    loop {
                        let now = std::time::Instant::now();
                        if now >= until {
                            break;
                        }
                        if stop() {
                            return Err(GiveUp::Stopped);
                        }
                        std::thread::sleep(Duration::from_millis(50).min(until - now));
                    }
                    attempt += 1;
                }
            }
        }
    }
}

/// `Retry-After`: seconds, or an HTTP date; `None` when it is neither.
pub(crate) fn parse_retry_after(v: &str, max: Duration) -> Option<Duration> {
    let v = v.trim();
    if let Ok(s) = v.parse::<f64>() {
        // Clamped before the conversion, which panics on values past u64 seconds.
        return (s.is_finite() && s >= 0.0)
            .then(|| Duration::from_secs_f64(s.min(max.as_secs_f64())));
    }
    let at = httpdate::parse_http_date(v).ok()?;
    Some(
        at.duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO)
            .min(max),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    fn quick(retries: u32) -> Policy {
        Policy {
            retries,
            base: Duration::from_millis(1),
            max_wait: Duration::from_millis(5),
        }
    }

    #[test]
    fn retries_until_success_then_reports_the_tries_that_failed() {
        let n = Cell::new(0);
        let r = quick(3).run("x", &|| false, |_| {
            n.set(n.get() + 1);
            if n.get() < 3 {
                Err(Failure::retry("down"))
            } else {
                Ok(7)
            }
        });
        assert_eq!(r.unwrap(), (7, 2));
    }

    #[test]
    fn a_fatal_failure_is_not_retried_and_the_last_retryable_one_is_kept() {
        let n = Cell::new(0);
        let r = quick(5).run("x", &|| false, |_| -> Result<(), _> {
            n.set(n.get() + 1);
            Err(Failure::from_status(404, "gone".into(), None))
        });
        assert!(matches!(
            r,
            Err(GiveUp::Fatal(Failure::Fatal {
                status: Some(404),
                ..
            }))
        ));
        assert_eq!(n.get(), 1);
        let r = quick(2).run("x", &|| false, |a| -> Result<(), _> {
            Err(Failure::from_status(503, format!("busy {a}"), None))
        });
        match r {
            Err(GiveUp::Exhausted { tries, last }) => {
                assert_eq!((tries, last.why(), last.status()), (3, "busy 2", Some(503)));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn statuses_worth_another_try() {
        for c in [408, 429, 500, 502, 503, 599] {
            assert!(retryable_status(c), "{c}");
        }
        for c in [200, 400, 401, 403, 404, 422, 600] {
            assert!(!retryable_status(c), "{c}");
        }
    }

    #[test]
    fn waits_grow_with_jitter_and_honour_retry_after_up_to_the_cap() {
        let p = Policy::new(6);
        for a in 0..6 {
            let cap = p.base.saturating_mul(1 << a).min(p.max_wait);
            let w = p.wait(a, None);
            assert!(
                w >= cap / 2 && w <= cap,
                "attempt {a}: {w:?} outside [{:?}, {cap:?}]",
                cap / 2
            );
        }
        assert_eq!(
            p.wait(0, Some(Duration::from_secs(3))),
            Duration::from_secs(3)
        );
        assert_eq!(p.wait(0, Some(Duration::from_secs(900))), p.max_wait);
        let max = Duration::from_secs(120);
        assert_eq!(parse_retry_after("2", max), Some(Duration::from_secs(2)));
        assert_eq!(
            parse_retry_after(" 0.5 ", max),
            Some(Duration::from_millis(500))
        );
        let soon = SystemTime::now() + Duration::from_secs(30);
        let d = parse_retry_after(&httpdate::fmt_http_date(soon), max).unwrap();
        assert!(
            d > Duration::from_secs(25) && d <= Duration::from_secs(30),
            "{d:?}"
        );
        assert_eq!(parse_retry_after("1e300", max), Some(max));
        assert_eq!(parse_retry_after("-1", max), None);
        assert_eq!(parse_retry_after("soon", max), None);
        let past = httpdate::fmt_http_date(SystemTime::now() - Duration::from_secs(60));
        assert_eq!(parse_retry_after(&past, max), Some(Duration::ZERO));
    }

    #[test]
    fn a_stop_ends_the_wait() {
        let p = Policy {
            retries: 3,
            base: Duration::from_secs(10),
            max_wait: Duration::from_secs(10),
        };
        let t0 = std::time::Instant::now();
        let r = p.run("x", &|| true, |_| -> Result<(), _> {
            Err(Failure::retry("down"))
        });
        assert!(matches!(r, Err(GiveUp::Stopped)));
        assert!(t0.elapsed() < Duration::from_secs(5));
    }
}
