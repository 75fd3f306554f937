//! The web console and its JSON API, served beside `GET /metrics` on the
//! metrics listener (loopback by default; TLS with `[metrics] tls`).
//! Read-only. Routes (docs/operating.md has the JSON):
//!
//! - `GET /`, `/console.js`, `/console.css`: the console, static files
//!   embedded in the binary (no CDN, no build step). It polls the API.
//! - `GET /api/v1/queues`: every queue's figures, exactly GetStats's
//!   (the same code builds them: [`Service::stats_json`]).
//! - `GET /api/v1/queues/{name}`: one queue's figures and its history
//!   ([`history`]), sampled by the stats tick while someone reads it.
//!
//! Access: without an auth file everything is open, like `/metrics`. With
//! one, the API wants `Authorization: Bearer <token>` of a principal of
//! the auth file and answers only the queues it has `stats` on, as the
//! Stats RPC does (the list leaves the others out; one queue is 403). The
//! static files hold no data and stay open; the page asks for a token
//! when the API answers 401. Failed tokens count towards the same
//! hold-off as the gRPC listener's (docs/security.md).

pub mod history;

use std::{net::SocketAddr, sync::Arc, time::Instant};

use axum::{
    extract::{ConnectInfo, Path, Request, State, connect_info::Connected},
    http::{HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
    serve::IncomingStream,
};
use serde_json::{Value, json};

use crate::{
    auth::{Auth, Principal},
    grpc::{Service, auth::Caller, peer::Peer, tls::MetricsTlsListener},
    limits::STATS_TICK_MS,
    queue::QueueName,
};
pub use history::History;

const INDEX_HTML: &str = include_str!("assets/index.html");
const CONSOLE_JS: &str = include_str!("assets/console.js");
const CONSOLE_CSS: &str = include_str!("assets/console.css");

/// The page's Content-Security-Policy: its own files only, no inline code.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; \
                   base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// What the console's routes share.
#[derive(Debug, Clone)]
pub struct Console {
    service: Service,
    auth: Option<Arc<Auth>>,
    history: Arc<History>,
}

/// The address of the client of a metrics-listener connection, for the
/// failed-authentication hold-off and the audit log.
#[derive(Debug, Clone, Copy)]
pub struct RemoteAddr(pub SocketAddr);

impl Connected<IncomingStream<'_, tokio::net::TcpListener>> for RemoteAddr {
    fn connect_info(stream: IncomingStream<'_, tokio::net::TcpListener>) -> RemoteAddr {
        RemoteAddr(*stream.remote_addr())
    }
}

impl Connected<IncomingStream<'_, MetricsTlsListener>> for RemoteAddr {
    fn connect_info(stream: IncomingStream<'_, MetricsTlsListener>) -> RemoteAddr {
        RemoteAddr(*stream.remote_addr())
    }
}

impl Console {
    /// The console over `service` (whose Stats code answers the API),
    /// checking tokens against `auth` when the broker has an auth file.
    pub fn new(service: Service, auth: Option<Arc<Auth>>, history: Arc<History>) -> Console {
        Console { service, auth, history }
    }

    /// The console's routes.
    pub fn router(self) -> axum::Router {
        use axum::routing::get;
        axum::Router::new()
            .route("/", get(|| async { asset("text/html; charset=utf-8", INDEX_HTML) }))
            .route("/console.js", get(|| async { asset("text/javascript; charset=utf-8", CONSOLE_JS) }))
            .route("/console.css", get(|| async { asset("text/css; charset=utf-8", CONSOLE_CSS) }))
            .route("/api/v1/queues", get(list))
            .route("/api/v1/queues/{name}", get(one))
            .with_state(self)
    }

    /// The caller of `request` (`None` without an auth file) and its
    /// address, or the status that refuses it.
    fn authenticate(
        &self,
        request: &mut Request,
    ) -> Result<(Option<Arc<Principal>>, Option<SocketAddr>), tonic::Status> {
        let addr = request.extensions().get::<ConnectInfo<RemoteAddr>>().map(|info| info.0.0);
        let Some(auth) = &self.auth else { return Ok((None, addr)) };
        request.extensions_mut().insert(Peer { addr, cert_identities: Arc::from([]) });
        crate::grpc::auth::admit(Some(auth), request)?;
        let principal = request.extensions().get::<Caller>().map(|caller| Arc::clone(&caller.0));
        Ok((principal, addr))
    }
}

/// `GET /api/v1/queues`: GetStats of every queue the caller may see.
async fn list(State(console): State<Console>, mut request: Request) -> Response {
    let (principal, addr) = match console.authenticate(&mut request) {
        Ok(caller) => caller,
        Err(status) => return refusal(&status),
    };
    match console.service.stats_json(principal, addr, "").await {
        Ok(value) => json_response(&value),
        Err(status) => refusal(&status),
    }
}

/// `GET /api/v1/queues/{name}`: GetStats of one queue, with its history.
async fn one(State(console): State<Console>, Path(name): Path<String>, mut request: Request) -> Response {
    let (principal, addr) = match console.authenticate(&mut request) {
        Ok(caller) => caller,
        Err(status) => return refusal(&status),
    };
    let mut stats = match console.service.stats_json(principal, addr, &name).await {
        Ok(value) => value,
        Err(status) => return refusal(&status),
    };
    // The Stats call parsed the name and found the queue: only then does
    // it get a ring.
    let samples = match QueueName::parse(&name) {
        Ok(name) => console.history.read(&name, Instant::now()),
        Err(_) => Vec::new(),
    };
    let queue = stats["queues"].get_mut(0).map(Value::take).unwrap_or(Value::Null);
    json_response(&json!({
        "at_ms": stats["at_ms"],
        "disk_free_bytes": stats["disk_free_bytes"],
        "disk_free_min_bytes": stats["disk_free_min_bytes"],
        "queue": queue,
        "history": {
            "tick_ms": STATS_TICK_MS,
            "samples": samples.iter().map(sample).collect::<Vec<_>>(),
        },
    }))
}

fn sample(s: &history::Sample) -> Value {
    json!({
        "at_ms": s.at_ms,
        "depth": s.depth,
        "bytes": s.bytes,
        "saturation": finite(s.saturation),
        "oldest_age_ms": s.oldest_age_ms,
        "drain_estimate_ms": s.drain_estimate_ms,
        "publish_rate": finite(s.publish_rate),
        "ack_rate": finite(s.ack_rate),
        "lane_depths": s.lane_depths,
    })
}

fn finite(value: f64) -> Value {
    serde_json::Number::from_f64(value).map_or(Value::Null, Value::Number)
}

/// An embedded file, never cached stale (a new `ballastd` may serve a new
/// console), under the page's security headers.
fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
            (header::CONTENT_SECURITY_POLICY, CSP),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "no-referrer"),
        ],
        body,
    )
        .into_response()
}

fn json_response(value: &Value) -> Response {
    (
        [
            (header::CONTENT_TYPE, "application/json"),
            (header::CACHE_CONTROL, "no-store"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        value.to_string(),
    )
        .into_response()
}

/// A gRPC status as the API's HTTP answer: the matching HTTP code and
/// `{"code": "<grpc code>", "message": "..."}`; 401 says `Bearer`, a
/// retry-after hint becomes `Retry-After` (whole seconds, rounded up).
fn refusal(status: &tonic::Status) -> Response {
    use tonic::Code;
    let http = match status.code() {
        Code::InvalidArgument | Code::OutOfRange => StatusCode::BAD_REQUEST,
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        Code::FailedPrecondition => StatusCode::CONFLICT,
        Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    let body = json!({ "code": crate::metrics::code_name(status.code()), "message": status.message() });
    let mut response = (http, json_response(&body)).into_response();
    let headers = response.headers_mut();
    if http == StatusCode::UNAUTHORIZED {
        headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    }
    let retry_after_ms = status
        .metadata()
        .get(crate::grpc::status::RETRY_AFTER_MS)
        .and_then(|value| value.to_str().ok())
        .and_then(|text| text.parse::<u64>().ok());
    if let Some(ms) = retry_after_ms {
        headers.insert(header::RETRY_AFTER, HeaderValue::from(ms.div_ceil(1000).max(1)));
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(status: tonic::Status, http: StatusCode, headers: &[(&str, &str)]) {
        let response = refusal(&status);
        assert_eq!(response.status(), http, "{status:?}");
        for (name, value) in headers {
            assert_eq!(response.headers().get(*name).and_then(|v| v.to_str().ok()), Some(*value), "{name}");
        }
    }

    /// Each gRPC status the API can meet maps to its HTTP status; 401
    /// says `Bearer`; a retry-after hint becomes `Retry-After` in whole
    /// seconds, rounded up.
    #[test]
    fn statuses_become_http_answers() {
        check(tonic::Status::unauthenticated("no"), StatusCode::UNAUTHORIZED, &[("www-authenticate", "Bearer")]);
        check(tonic::Status::permission_denied("no"), StatusCode::FORBIDDEN, &[]);
        check(tonic::Status::not_found("no"), StatusCode::NOT_FOUND, &[("content-type", "application/json")]);
        check(tonic::Status::invalid_argument("no"), StatusCode::BAD_REQUEST, &[]);
        check(tonic::Status::unavailable("no"), StatusCode::SERVICE_UNAVAILABLE, &[]);
        check(tonic::Status::internal("no"), StatusCode::INTERNAL_SERVER_ERROR, &[]);
        let mut held_off = tonic::Status::resource_exhausted("too many failures");
        held_off.metadata_mut().insert(crate::grpc::status::RETRY_AFTER_MS, "1500".parse().unwrap());
        check(held_off, StatusCode::TOO_MANY_REQUESTS, &[("retry-after", "2")]);
        let mut soon = tonic::Status::resource_exhausted("soon");
        soon.metadata_mut().insert(crate::grpc::status::RETRY_AFTER_MS, "1".parse().unwrap());
        check(soon, StatusCode::TOO_MANY_REQUESTS, &[("retry-after", "1")]);
    }
}
