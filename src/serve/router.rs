//! The routes, and what stands in front of them: the connection cap and the header / idle
//! timeouts (in the accept loop, per connection), then for every request the `Host` allow-list
//! (DNS rebinding: a page on another name that resolves here reads nothing), the refusal of
//! cross-origin browser requests unless `--cors-origin` names the origin (any page the user
//! opens could otherwise drive the server with a "simple" cross-site POST), JSON-only request
//! bodies, a body timeout and size limit, and the API key (`auth`).

use super::response::ApiError;
use super::{auth, site, App};
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

/// The largest request body: a long chat with few-shot turns is a few KB.
const MAX_BODY: usize = 1 << 20;

/// What a connection and a request may take.
#[derive(Debug, Clone)]
pub(crate) struct Limits {
    /// From the moment a connection waits for a request (a new one, or the next on a kept-alive
    /// one) to the end of that request's headers: slow or idle clients give their socket back.
    pub(crate) header_timeout: Duration,
    /// To read a request's body once its headers are in.
    pub(crate) body_timeout: Duration,
    /// Connections served at once; more wait in the kernel's backlog.
    pub(crate) max_connections: usize,
}

/// Who may talk to the server from a browser.
#[derive(Debug, Clone, Default)]
pub(crate) struct Origins {
    /// Host names accepted in `Host` besides the bound address, `localhost`, `127.0.0.1`, `::1`.
    pub(crate) allowed_hosts: Vec<String>,
    /// Origins (`https://app.example`) whose pages may call the API (CORS).
    pub(crate) cors: Vec<String>,
}

struct Guard {
    bound: SocketAddr,
    origins: Origins,
}

/// Every route, with its layers.
pub(super) fn router(
    app: Arc<App>,
    bound: SocketAddr,
    origins: Origins,
    limits: &Limits,
) -> Router {
    let keyed = Router::new()
        .route("/api/status", get(super::status))
        .route("/api/prompt", post(site::prompt))
        .route("/api/pairs", get(site::pairs))
        .route("/api/run", get(site::run_info))
        .route("/api/chart/{name}", get(site::chart))
        .route("/v1/models", get(super::models))
        .route("/v1/chat/completions", post(super::chat))
        .route("/v1/completions", post(super::completions))
        .route_layer(middleware::from_fn_with_state(
            app.clone(),
            auth::require_key,
        ));
    let mut r = Router::new()
        .route("/", get(site::page))
        .route("/health", get(super::health))
        .merge(keyed)
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .layer(tower_http::timeout::RequestBodyTimeoutLayer::new(
            limits.body_timeout,
        ));
    if !origins.cors.is_empty() {
        let allowed: Vec<HeaderValue> = origins
            .cors
            .iter()
            .filter_map(|o| HeaderValue::from_str(o).ok())
            .collect();
        r = r.layer(
            tower_http::cors::CorsLayer::new()
                .allow_origin(allowed)
                .allow_methods([Method::GET, Method::POST])
                .allow_headers([header::AUTHORIZATION, header::CONTENT_TYPE]),
        );
    }
    let guard = Arc::new(Guard { bound, origins });
    r.layer(middleware::from_fn_with_state(guard, check))
        .with_state(app)
}

/// The host, origin and content-type checks every request passes first.
async fn check(State(g): State<Arc<Guard>>, req: Request, next: Next) -> Response {
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("");
    if !g.host_allowed(host) {
        return ApiError::status(
            StatusCode::MISDIRECTED_REQUEST,
            "host_not_allowed",
            format!(
                "this server answers to its own address, localhost and 127.0.0.1, not the Host {host:?}; start it with --allowed-host NAME to answer to that name"
            ),
        )
        .into_response();
    }
    if let Some(origin) = req.headers().get(header::ORIGIN) {
        let origin = origin.to_str().unwrap_or("");
        if !g.origin_allowed(origin, host) {
            return ApiError::status(
                StatusCode::FORBIDDEN,
                "cross_origin",
                format!(
                    "cross-origin requests are refused (Origin {origin:?}); start the server with --cors-origin {origin} to let that page call it"
                ),
            )
            .into_response();
        }
    }
    let path = req.uri().path();
    let has_body = matches!(*req.method(), Method::POST | Method::PUT | Method::PATCH);
    if has_body && (path.starts_with("/v1/") || path.starts_with("/api/")) && !is_json(&req) {
        return ApiError::status(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "the body must be JSON, sent with Content-Type: application/json",
        )
        .into_response();
    }
    next.run(req).await
}

fn is_json(req: &Request) -> bool {
    let Some(ct) = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    ct.split(';')
        .next()
        .is_some_and(|m| m.trim().eq_ignore_ascii_case("application/json"))
}

impl Guard {
    /// `Host` without its port, compared to the allow-list.
    fn host_allowed(&self, host: &str) -> bool {
        let name = host_name(host).to_ascii_lowercase();
        if name.is_empty() {
            return false;
        }
        if name == "localhost"
            || self
                .origins
                .allowed_hosts
                .iter()
                .any(|h| h.eq_ignore_ascii_case(&name))
        {
            return true;
        }
        match name
            .trim_matches(|c| c == '[' || c == ']')
            .parse::<IpAddr>()
        {
            // DNS rebinding needs a name: an address literal is the client's own choice. On an
            // unspecified bind (0.0.0.0) any of the machine's addresses may be the one used.
            Ok(ip) => ip.is_loopback() || ip == self.bound.ip() || self.bound.ip().is_unspecified(),
            Err(_) => false,
        }
    }

    /// A browser's `Origin`: the server's own page (same host and port as `Host`), or one
    /// `--cors-origin` names.
    fn origin_allowed(&self, origin: &str, host: &str) -> bool {
        if self
            .origins
            .cors
            .iter()
            .any(|o| o.trim_end_matches('/') == origin)
        {
            return true;
        }
        origin
            .strip_prefix("http://")
            .is_some_and(|rest| rest.eq_ignore_ascii_case(host))
    }
}

/// `host[:port]` or `[v6]:port` without the port.
fn host_name(host: &str) -> &str {
    if host.starts_with('[') {
        return host
            .split(']')
            .next()
            .map_or(host, |h| &host[..h.len() + 1]);
    }
    host.rsplit_once(':').map_or(host, |(h, _)| h)
}

/// Accept connections until the process ends: at most `limits.max_connections` at once, each
/// served by hyper with the header timeout on its timer.
pub(super) async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    limits: Limits,
) -> std::io::Result<()> {
    use hyper_util::rt::{TokioIo, TokioTimer};
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    loop {
        let permit = slots
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                // Out of file descriptors and the like: wait rather than spin.
                tracing::warn!("serve: accepting a connection: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let service = hyper_util::service::TowerToHyperService::new(router.clone());
        let header_timeout = limits.header_timeout;
        tokio::spawn(async move {
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(header_timeout)
                .serve_connection(TokioIo::new(stream), service);
            if let Err(e) = conn.await {
                tracing::debug!("serve: connection ended: {e}");
            }
            drop(permit);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guard(bound: &str, hosts: &[&str], cors: &[&str]) -> Guard {
        Guard {
            bound: bound.parse().unwrap(),
            origins: Origins {
                allowed_hosts: hosts.iter().map(|s| s.to_string()).collect(),
                cors: cors.iter().map(|s| s.to_string()).collect(),
            },
        }
    }

    #[test]
    fn hosts_and_origins() {
        let g = guard("127.0.0.1:8080", &["bot.lan"], &["https://app.example"]);
        for ok in [
            "127.0.0.1:8080",
            "localhost:8080",
            "LOCALHOST",
            "[::1]:8080",
            "bot.lan:8080",
        ] {
            assert!(g.host_allowed(ok), "{ok}");
        }
        for no in [
            "evil.example",
            "evil.example:8080",
            "10.0.0.5:8080",
            "",
            "localhost.evil.example",
        ] {
            assert!(!g.host_allowed(no), "{no}");
        }
        let any = guard("0.0.0.0:8080", &[], &[]);
        assert!(any.host_allowed("10.0.0.5:8080") && !any.host_allowed("rebind.example"));
        assert!(g.origin_allowed("http://127.0.0.1:8080", "127.0.0.1:8080"));
        assert!(g.origin_allowed("https://app.example", "127.0.0.1:8080"));
        assert!(!g.origin_allowed("http://evil.example", "127.0.0.1:8080"));
        assert!(!g.origin_allowed("null", "127.0.0.1:8080"));
        assert!(!g.origin_allowed("http://127.0.0.1:9999", "127.0.0.1:8080"));
        assert_eq!(host_name("[::1]:80"), "[::1]");
        assert_eq!(host_name("a:80"), "a");
    }
}
