//! HTTP listener: `/metrics` (Prometheus), `/healthz`, `/readyz`, `/status`, and the admin call
//! `POST /drain` used by `shadowsync drain` and `cutover` (`DELETE /drain` forgets a pending one),
//! `POST /hold` and `DELETE /hold` used by `verify`; plus the small client that calls them.
//!
//! Invariants: nothing served here reveals row values or secrets; `/drain` only asks the
//! supervisor, which alone decides when the drain is complete. With an admin token configured
//! (required off loopback, see `config`), every call that changes state (`POST` and `DELETE`)
//! must carry it as `Authorization: Bearer ...`, compared in constant time; the read-only
//! endpoints stay open for scrapers and probes.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State as AxumState;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};

use crate::drain::DrainRequest;
use crate::metrics::Shared;
use crate::shutdown::Shutdown;

#[derive(Clone)]
struct AppState {
    shared: Arc<Shared>,
    drain: mpsc::Sender<DrainRequest>,
    /// The hold `verify` asked for through `/hold` (see `hold`), between its calls.
    hold: Arc<std::sync::Mutex<Option<crate::hold::HoldControl>>>,
    /// The bearer token mutating calls need; `None`: none needed (loopback only).
    token: Option<Arc<str>>,
}

impl AppState {
    /// `Err` with the 401 response when a token is needed and the request lacks it.
    #[allow(clippy::result_large_err)]
    fn authorize(&self, headers: &HeaderMap) -> Result<(), Response> {
        let Some(token) = &self.token else {
            return Ok(());
        };
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        if constant_time_eq(given.as_bytes(), token.as_bytes()) {
            return Ok(());
        }
        Err((
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Bearer")],
            "this call changes the migration's state and needs the admin token: send \
             `Authorization: Bearer <token>` (shadowsync's own commands read it from \
             SHADOWSYNC_ADMIN_TOKEN or metrics.admin_token_file)\n",
        )
            .into_response())
    }
}

/// Equality whose time does not depend on where the inputs first differ.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = a.len() ^ b.len();
    for (i, &x) in a.iter().enumerate() {
        diff |= usize::from(x ^ b.get(i % b.len().max(1)).copied().unwrap_or(0));
    }
    diff == 0
}

/// Serves until `stop` turns true, then finishes in-flight requests (a `/drain` waiting for its
/// report) before returning.
pub async fn serve(
    listener: tokio::net::TcpListener,
    shared: Arc<Shared>,
    drain: mpsc::Sender<DrainRequest>,
    token: Option<String>,
    mut stop: Shutdown,
) {
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/status", get(status))
        .route("/drain", post(drain_handler).delete(cancel_handler))
        .route("/hold", post(hold_handler).delete(release_handler))
        .with_state(AppState {
            shared,
            drain,
            hold: Default::default(),
            token: token.map(Arc::from),
        });
    let shutdown = async move {
        stop.recv().await;
    };
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
    {
        tracing::error!(error = %e, "http listener failed");
    }
}

/// OpenMetrics when the scraper asks for it (Prometheus does), the text format otherwise.
async fn metrics(AxumState(s): AxumState<AppState>, headers: axum::http::HeaderMap) -> Response {
    use crate::metrics::text;
    let accept = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok());
    if text::wants_openmetrics(accept) {
        (
            [(header::CONTENT_TYPE, text::OPENMETRICS)],
            s.shared.encode(),
        )
            .into_response()
    } else {
        ([(header::CONTENT_TYPE, text::TEXT)], s.shared.encode_text()).into_response()
    }
}

fn status_json(shared: &Shared) -> serde_json::Value {
    use std::sync::atomic::Ordering::Relaxed;
    serde_json::json!({
        "state": shared.state(),
        "ready": shared.ready(),
        "blue_connected": shared.blue_connected.load(Relaxed),
        "green_connected": shared.green_connected.load(Relaxed),
        "streaming": shared.streaming.load(Relaxed),
        "confirmed_lsn": shared.confirmed_lsn(),
        "blue_wal_lsn": shared.blue_wal_lsn(),
        "lag_bytes": shared.lag_bytes(),
        "lag_seconds": shared.lag_seconds(),
        "applied": shared.applied(),
    })
}

async fn readyz(AxumState(s): AxumState<AppState>) -> Response {
    let code = if s.shared.ready() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, axum::Json(status_json(&s.shared))).into_response()
}

async fn status(AxumState(s): AxumState<AppState>) -> Response {
    axum::Json(status_json(&s.shared)).into_response()
}

async fn drain_handler(AxumState(s): AxumState<AppState>, headers: HeaderMap) -> Response {
    if let Err(refused) = s.authorize(&headers) {
        return refused;
    }
    let (reply, rx) = oneshot::channel();
    if s.drain.send(DrainRequest::Start { reply }).await.is_err() {
        return (StatusCode::SERVICE_UNAVAILABLE, "pipeline stopped\n").into_response();
    }
    match rx.await {
        Ok(Ok(report)) => axum::Json(report).into_response(),
        Ok(Err(e)) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")).into_response(),
        Err(_) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            "pipeline stopped before the drain finished\n",
        )
            .into_response(),
    }
}

/// `DELETE /drain`: forgets a pending drain, so the sidecar keeps streaming.
async fn cancel_handler(AxumState(s): AxumState<AppState>, headers: HeaderMap) -> Response {
    if let Err(refused) = s.authorize(&headers) {
        return refused;
    }
    let (reply, rx) = oneshot::channel();
    if s.drain.send(DrainRequest::Cancel { reply }).await.is_err() {
        return (StatusCode::SERVICE_UNAVAILABLE, "pipeline stopped\n").into_response();
    }
    match rx.await {
        Ok(Ok(n)) => axum::Json(serde_json::json!({ "cancelled": n })).into_response(),
        Ok(Err(e)) => (StatusCode::CONFLICT, format!("{e}\n")).into_response(),
        Err(_) => (StatusCode::SERVICE_UNAVAILABLE, "pipeline stopped\n").into_response(),
    }
}

/// `POST /hold?from=LSN[&exact=true]` asks the apply stage for a hold (see `hold`);
/// `POST /hold?at=LSN` tells it the exact point and answers once held there (410 Gone when the
/// stream had passed an exact point).
async fn hold_handler(
    AxumState(s): AxumState<AppState>,
    headers: HeaderMap,
    axum::extract::Query(q): axum::extract::Query<std::collections::HashMap<String, String>>,
) -> Response {
    if let Err(refused) = s.authorize(&headers) {
        return refused;
    }
    let lsn = |key: &str| q.get(key).map(|v| crate::lsn::Lsn::parse(v));
    let exact = q.get("exact").is_some_and(|v| v == "true");
    match (lsn("from"), lsn("at")) {
        (Some(Ok(from)), None) => {
            let (req, control) = crate::hold::request(from, exact);
            s.shared.request_hold(req);
            *s.hold.lock().expect("hold lock") = Some(control);
            axum::Json(serde_json::json!({ "requested": from })).into_response()
        }
        (None, Some(Ok(at))) => {
            let Some(mut control) = s.hold.lock().expect("hold lock").take() else {
                return (StatusCode::CONFLICT, "no hold was asked (POST /hold?from=LSN first)\n")
                    .into_response();
            };
            match control.hold_at(at, crate::hold::HOLD_MAX).await {
                Ok(()) => {
                    *s.hold.lock().expect("hold lock") = Some(control);
                    axum::Json(serde_json::json!({ "held_at": at })).into_response()
                }
                // 410: the point is gone (the stream passed it); anything else is 503.
                Err(e @ crate::hold::Refusal::Passed(_)) => {
                    (StatusCode::GONE, format!("{e}\n")).into_response()
                }
                Err(e) => (StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n")).into_response(),
            }
        }
        _ => (
            StatusCode::BAD_REQUEST,
            "give one of from=LSN or at=LSN (as PostgreSQL prints an LSN), and exact=true for a one-phase hold\n",
        )
            .into_response(),
    }
}

/// `DELETE /hold`: lets the apply stage go on; answers how long it held.
async fn release_handler(AxumState(s): AxumState<AppState>, headers: HeaderMap) -> Response {
    if let Err(refused) = s.authorize(&headers) {
        return refused;
    }
    let control = s.hold.lock().expect("hold lock").take();
    let held = control.map(|c| c.release().as_secs_f64());
    axum::Json(serde_json::json!({ "held_seconds": held })).into_response()
}

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error(
        "cannot reach the sidecar at {addr} (metrics.listen): {source}; is `shadowsync run` running with this config?"
    )]
    Connect {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("the sidecar did not answer within {0:?}")]
    Timeout(Duration),
    /// `shadowsync drain` adds what to do (the drain is still pending in the sidecar).
    #[error("the drain did not finish within {0:?}")]
    DrainTimeout(Duration),
    #[error("the sidecar answered {status}: {body}")]
    Refused { status: String, body: String },
}

/// The sidecar's admin endpoint as its clients call it: the address, and the token the
/// mutating calls send (never printed).
#[derive(Clone)]
pub struct Endpoint {
    pub addr: SocketAddr,
    token: Option<String>,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.addr)
    }
}

impl Endpoint {
    pub fn new(addr: SocketAddr, token: Option<String>) -> Endpoint {
        Endpoint { addr, token }
    }

    /// The endpoint of the sidecar of `config`, as its clients (`drain`, `cutover`, `verify`)
    /// call it.
    pub fn of(config: &crate::config::Config) -> Result<Endpoint, crate::config::ConfigError> {
        Ok(Endpoint::new(config.listen_addr()?, config.admin_token()?))
    }

    /// One call, with the token when there is one.
    pub async fn call(
        &self,
        method: &str,
        path: &str,
        timeout: Duration,
    ) -> Result<(u16, String), AdminError> {
        request(self.addr, self.token.as_deref(), method, path, timeout).await
    }
}

/// Asks a running sidecar to drain; returns the JSON report it printed.
pub async fn request_drain(sidecar: &Endpoint, timeout: Duration) -> Result<String, AdminError> {
    let (status, body) = sidecar
        .call("POST", "/drain", timeout)
        .await
        .map_err(|e| match e {
            AdminError::Timeout(t) => AdminError::DrainTimeout(t),
            e => e,
        })?;
    if status == 200 {
        Ok(body)
    } else {
        Err(AdminError::Refused {
            status: status.to_string(),
            body,
        })
    }
}

/// Asks a running sidecar to forget a pending drain (it keeps streaming).
pub async fn cancel_drain(sidecar: &Endpoint, timeout: Duration) -> Result<(), AdminError> {
    let (status, body) = sidecar.call("DELETE", "/drain", timeout).await?;
    if status == 200 {
        Ok(())
    } else {
        Err(AdminError::Refused {
            status: status.to_string(),
            body,
        })
    }
}

/// One HTTP/1.1 request without a body and without a token to the sidecar's listener (the
/// read-only endpoints): (status code, body).
pub async fn http_call(
    addr: SocketAddr,
    method: &str,
    path: &str,
    timeout: Duration,
) -> Result<(u16, String), AdminError> {
    request(addr, None, method, path, timeout).await
}

/// One HTTP/1.1 request without a body: (status code, body). Small on purpose: the listener is
/// ours, so no general HTTP client is needed.
async fn request(
    addr: SocketAddr,
    token: Option<&str>,
    method: &str,
    path: &str,
    timeout: Duration,
) -> Result<(u16, String), AdminError> {
    let call = async {
        let io = |source| AdminError::Connect { addr, source };
        let mut stream = tokio::net::TcpStream::connect(addr).await.map_err(io)?;
        let auth = token
            .map(|t| format!("Authorization: Bearer {t}\r\n"))
            .unwrap_or_default();
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Content-Length: 0\r\nConnection: close\r\n\r\n"
        );
        stream.write_all(request.as_bytes()).await.map_err(io)?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await.map_err(io)?;
        let text = String::from_utf8_lossy(&response).into_owned();
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        let status = head.lines().next().unwrap_or("");
        let code = status
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| AdminError::Refused {
                status: status.to_string(),
                body: body.to_string(),
            })?;
        let body = if head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked")
        {
            dechunk(body)
        } else {
            body.to_string()
        };
        Ok((code, body))
    };
    tokio::time::timeout(timeout, call)
        .await
        .map_err(|_| AdminError::Timeout(timeout))?
}

fn dechunk(body: &str) -> String {
    let mut out = String::new();
    let mut rest = body;
    while let Some((size, tail)) = rest.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || tail.len() < n {
            break;
        }
        out.push_str(&tail[..n]);
        rest = tail[n..].trim_start_matches("\r\n");
    }
    out
}
