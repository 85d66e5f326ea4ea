//! The API key. With `--api-key-env`, every route but the page's HTML and `/health` wants
//! `Authorization: Bearer <key>`, compared in constant time. It runs as a layer in front of the
//! handlers, so a request without the key is refused (401) before its body is read or parsed.

use super::response::ApiError;
use super::App;
use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use std::sync::Arc;

pub(super) async fn require_key(State(app): State<Arc<App>>, req: Request, next: Next) -> Response {
    let Some(key) = &app.api_key else {
        return next.run(req).await;
    };
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.get(..7)
                .filter(|p| p.eq_ignore_ascii_case("bearer "))
                .map(|_| &v[7..])
        })
        .unwrap_or("");
    if constant_time_eq(given.as_bytes(), key.as_bytes()) {
        next.run(req).await
    } else {
        ApiError::status(
            StatusCode::UNAUTHORIZED,
            "invalid_api_key",
            "missing or wrong API key: send Authorization: Bearer <key>",
        )
        .into_response()
    }
}

/// Equal bytes, in time that depends only on the lengths.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = a.len() ^ b.len();
    for i in 0..a.len().max(b.len()) {
        let x = a.get(i).copied().unwrap_or(0);
        let y = b.get(i).copied().unwrap_or(0);
        diff |= usize::from(x ^ y);
    }
    diff == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_compare_whole() {
        assert!(constant_time_eq(b"key", b"key"));
        assert!(!constant_time_eq(b"key", b"kex") && !constant_time_eq(b"key", b"key2"));
        assert!(!constant_time_eq(b"", b"k"));
    }
}
