//! The usage API (`[proxy.usage_api]`): usage per user and per VPS, the
//! published decision, and the CSV export of a period, on a listener of its
//! own behind one bearer token. `docs/usage-api.json` is its OpenAPI document,
//! also served at `/v1/openapi.json` (without a token).
//!
//! ```text
//!  GET ─▶ route ─▶ authorize (bearer, constant time) ─▶ endpoint ─▶ JSON | CSV
//!                                                           └─ ApiError ─▶ rescue
//! ```
//!
//! The figures are [`tollgate_core::usage_report`]'s, the same rows
//! `tollgate usage` prints, read from the statement enforcement decides from.
//! The CSV streams: the body fetches the next page of users only when hyper has
//! written the previous one, so one page at most is held per download.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body::{Body, Frame};
use http_body_util::{Either, Full};
use hyper::service::service_fn;
use serde::Serialize;
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use uuid::Uuid;

use tollgate_core::admin;
use tollgate_core::billing::Period;
use tollgate_core::clock::Clock;
use tollgate_core::db::{self, decisions, usage};
use tollgate_core::usage_report::{self, CsvExport};

/// The OpenAPI 3 document of this API.
pub const OPENAPI: &str = include_str!("../../docs/usage-api.json");

/// What the endpoints read from.
pub struct UsageApi {
    pub pool: PgPool,
    /// The bearer token clients must present. Never logged.
    token: String,
    /// The current period comes from here.
    pub clock: Arc<dyn Clock>,
}

impl UsageApi {
    pub fn new(pool: PgPool, token: String, clock: Arc<dyn Clock>) -> Self {
        UsageApi { pool, token, clock }
    }
}

/// A response body: a small buffer, or the CSV export as it is read.
pub type ApiBody = Either<Full<Bytes>, CsvBody>;

/// Why a request got no answer but an error. Turned into a response in
/// [`rescue`] only; database error text stays in the proxy's log.
#[derive(Debug, thiserror::Error)]
enum ApiError {
    #[error("missing or wrong bearer token")]
    Unauthorized,
    #[error("only GET")]
    MethodNotAllowed,
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    NotFound(String),
    #[error("the database is unreachable")]
    DatabaseUnavailable(#[source] sqlx::Error),
    #[error("the database failed")]
    Database(#[source] sqlx::Error),
}

impl From<sqlx::Error> for ApiError {
    fn from(e: sqlx::Error) -> Self {
        if db::is_connection_error(&e) {
            ApiError::DatabaseUnavailable(e)
        } else {
            ApiError::Database(e)
        }
    }
}

/// Serve the usage API on `listener` until `shutdown`; then let requests in
/// flight finish for up to `grace` and cut what is left.
pub async fn serve(
    api: Arc<UsageApi>,
    listener: TcpListener,
    shutdown: CancellationToken,
    grace: Duration,
) {
    let connections = TaskTracker::new();
    let hard_stop = CancellationToken::new();
    while let Some(stream) = admin::accept(&listener, &shutdown, "usage API").await {
        let (api, shutdown, hard_stop) = (api.clone(), shutdown.clone(), hard_stop.clone());
        let service = service_fn(move |req| {
            let api = api.clone();
            async move { Ok::<_, Infallible>(handle(&api, req).await) }
        });
        connections
            .spawn(async move { admin::serve_http1(stream, service, &shutdown, &hard_stop).await });
    }
    connections.close();
    if tokio::time::timeout(grace, connections.wait())
        .await
        .is_err()
    {
        hard_stop.cancel();
        connections.wait().await;
    }
}

/// Answer one request.
pub async fn handle<B>(api: &UsageApi, req: Request<B>) -> Response<ApiBody> {
    match route(api, &req).await {
        Ok(response) => response,
        Err(e) => rescue(e),
    }
}

async fn route<B>(api: &UsageApi, req: &Request<B>) -> Result<Response<ApiBody>, ApiError> {
    if req.method() != Method::GET {
        return Err(ApiError::MethodNotAllowed);
    }
    let path = req.uri().path();
    if path == "/v1/openapi.json" {
        return Ok(full(StatusCode::OK, "application/json", OPENAPI));
    }
    authorize(&api.token, req)?;
    let query = req.uri().query();
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    match segments.as_slice() {
        ["v1", "users", id, "usage"] => {
            let (id, period) = (uuid(id)?, period(query, api.clock.as_ref())?);
            let mut rows = usage_report::rows(&api.pool, period, Some(&[id])).await?;
            match rows.pop() {
                Some(row) => Ok(json(StatusCode::OK, &row)),
                None => Err(ApiError::NotFound(format!("no user {id}"))),
            }
        }
        ["v1", "users", id, "decision"] => {
            let (id, period) = (uuid(id)?, period(query, api.clock.as_ref())?);
            let published = decisions::load(&api.pool, period, Some(&[id])).await?;
            match published.into_iter().next() {
                Some(d) => Ok(json(
                    StatusCode::OK,
                    &PublishedView {
                        user_id: d.user_id,
                        period: d.period,
                        blocked: d.blocked.is_some(),
                        reason: d.blocked.map(|r| r.as_str()),
                        action: d.blocked.map(|_| d.on_exhausted.as_str()),
                        throttle_bytes_per_second: d.on_exhausted.rate(),
                        status: usage_report::status_of(d.blocked, d.on_exhausted),
                        figures: d.figures,
                        decided_by: d.decided_by,
                        decided_at: d.decided_at,
                        changed_at: d.changed_at,
                    },
                )),
                None => Err(ApiError::NotFound(format!(
                    "no decision published for user {id} in {period}"
                ))),
            }
        }
        ["v1", "vpses", id, "usage"] => {
            let (id, period) = (uuid(id)?, period(query, api.clock.as_ref())?);
            match usage::vps_usage(&api.pool, id, period).await? {
                Some(row) => Ok(json(StatusCode::OK, &row)),
                None => Err(ApiError::NotFound(format!("no VPS {id}"))),
            }
        }
        ["v1", "usage.csv"] => {
            let period = period(query, api.clock.as_ref())?;
            let mut export = CsvExport::new(api.pool.clone(), period, None);
            // The first page is read before the status is sent, so an
            // unreachable database is a 503, not a cut 200.
            let first = export.next_chunk().await?.unwrap_or_default();
            let mut response = Response::new(Either::Right(CsvBody {
                first: Some(Bytes::from(first)),
                export: Some(export),
                pending: None,
            }));
            let headers = response.headers_mut();
            headers.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/csv; charset=utf-8"),
            );
            if let Ok(value) =
                HeaderValue::from_str(&format!("attachment; filename=\"usage-{period}.csv\""))
            {
                headers.insert(header::CONTENT_DISPOSITION, value);
            }
            Ok(response)
        }
        _ => Err(ApiError::NotFound(
            "no such endpoint: see /v1/openapi.json".into(),
        )),
    }
}

/// A published decision as the API shows it.
#[derive(Serialize)]
struct PublishedView {
    user_id: Uuid,
    period: Period,
    blocked: bool,
    reason: Option<&'static str>,
    /// `block` or `throttle` when blocked.
    action: Option<&'static str>,
    /// The plan's throttle rate, when it throttles.
    throttle_bytes_per_second: Option<u64>,
    status: String,
    figures: serde_json::Value,
    decided_by: String,
    decided_at: chrono::DateTime<chrono::Utc>,
    changed_at: chrono::DateTime<chrono::Utc>,
}

/// The request carries `Authorization: Bearer <token>`, compared in constant time.
fn authorize<B>(token: &str, req: &Request<B>) -> Result<(), ApiError> {
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, t)| t.trim());
    match presented {
        Some(t) if crate::auth::same_secret(t.as_bytes(), token.as_bytes()) => Ok(()),
        _ => Err(ApiError::Unauthorized),
    }
}

fn uuid(id: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(id).map_err(|_| ApiError::BadRequest(format!("`{id}` is not a UUID")))
}

/// The `period` query parameter (`YYYY-MM`), or the current period.
fn period(query: Option<&str>, clock: &dyn Clock) -> Result<Period, ApiError> {
    let value = query
        .unwrap_or_default()
        .split('&')
        .find_map(|pair| pair.strip_prefix("period="));
    match value {
        None => Ok(clock.period()),
        Some(v) => v.parse::<Period>().map_err(ApiError::BadRequest),
    }
}

/// The one place an [`ApiError`] becomes a response.
fn rescue(e: ApiError) -> Response<ApiBody> {
    let (status, code) = match &e {
        ApiError::Unauthorized => (StatusCode::UNAUTHORIZED, "unauthorized"),
        ApiError::MethodNotAllowed => (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed"),
        ApiError::BadRequest(_) => (StatusCode::BAD_REQUEST, "bad_request"),
        ApiError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
        ApiError::DatabaseUnavailable(source) => {
            tracing::warn!(error = %source, "usage API: database unreachable");
            (StatusCode::SERVICE_UNAVAILABLE, "database_unavailable")
        }
        ApiError::Database(source) => {
            tracing::error!(error = %source, "usage API: database error");
            (StatusCode::INTERNAL_SERVER_ERROR, "internal")
        }
    };
    let mut response = json(
        status,
        &serde_json::json!({ "error": code, "message": e.to_string() }),
    );
    let headers = response.headers_mut();
    match e {
        ApiError::Unauthorized => {
            headers.insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"tollgate-usage\""),
            );
        }
        ApiError::MethodNotAllowed => {
            headers.insert(header::ALLOW, HeaderValue::from_static("GET"));
        }
        ApiError::DatabaseUnavailable(_) => {
            headers.insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
        }
        _ => {}
    }
    response
}

fn json(status: StatusCode, value: &impl Serialize) -> Response<ApiBody> {
    let mut body = serde_json::to_vec(value).expect("API values serialize");
    body.push(b'\n');
    full(status, "application/json", body)
}

fn full(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<ApiBody> {
    let mut response = Response::new(Either::Left(Full::new(body.into())));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

/// The export stopped part-way: the database failed after the status was sent.
/// The response ends with an error, so the client sees a cut body, not a short
/// file that looks complete.
#[derive(Debug, thiserror::Error)]
#[error("the usage export stopped: the database failed")]
pub struct ExportCut;

type NextChunk = Pin<
    Box<dyn Future<Output = (CsvExport, Result<Option<String>, sqlx::Error>)> + Send + 'static>,
>;

/// The CSV export as a body: the next page is read when hyper asks for more.
pub struct CsvBody {
    first: Option<Bytes>,
    export: Option<CsvExport>,
    pending: Option<NextChunk>,
}

impl Body for CsvBody {
    type Data = Bytes;
    type Error = ExportCut;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, ExportCut>>> {
        let this = self.get_mut();
        if let Some(first) = this.first.take() {
            return Poll::Ready(Some(Ok(Frame::data(first))));
        }
        if this.pending.is_none() {
            let Some(mut export) = this.export.take() else {
                return Poll::Ready(None);
            };
            this.pending = Some(Box::pin(async move {
                let next = export.next_chunk().await;
                (export, next)
            }));
        }
        let pending = this.pending.as_mut().expect("set above");
        let (export, next) = ready!(pending.as_mut().poll(cx));
        this.pending = None;
        match next {
            Ok(Some(chunk)) => {
                this.export = Some(export);
                Poll::Ready(Some(Ok(Frame::data(Bytes::from(chunk)))))
            }
            Ok(None) => Poll::Ready(None),
            Err(e) => {
                tracing::warn!(error = %e, "usage API: the CSV export stopped part-way");
                Poll::Ready(Some(Err(ExportCut)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.first.is_none() && self.export.is_none() && self.pending.is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(auth: Option<&str>) -> Request<()> {
        let mut b = Request::get("/v1/usage.csv");
        if let Some(a) = auth {
            b = b.header(header::AUTHORIZATION, a);
        }
        b.body(()).unwrap()
    }

    #[test]
    fn only_the_exact_bearer_token_is_accepted() {
        let token = "t".repeat(40);
        assert!(authorize(&token, &request(Some(&format!("Bearer {token}")))).is_ok());
        assert!(authorize(&token, &request(Some(&format!("bearer {token}")))).is_ok());
        for wrong in [
            None,
            Some(format!("Basic {token}")),
            Some(format!("Bearer {}", &token[1..])),
            Some(format!("Bearer {token}x")),
            Some("Bearer".to_owned()),
            Some(token.clone()),
        ] {
            assert!(
                authorize(&token, &request(wrong.as_deref())).is_err(),
                "{wrong:?}"
            );
        }
    }

    #[test]
    fn the_period_parameter_defaults_to_the_clock() {
        let clock = tollgate_core::clock::SystemClock;
        assert_eq!(period(None, &clock).unwrap(), clock.period());
        assert_eq!(
            period(Some("x=1&period=2024-02"), &clock).unwrap(),
            "2024-02".parse().unwrap()
        );
        assert!(period(Some("period=2024-13"), &clock).is_err());
        assert!(period(Some("period="), &clock).is_err());
    }

    #[test]
    fn the_openapi_document_is_json_naming_every_route() {
        let doc: serde_json::Value = serde_json::from_str(OPENAPI).unwrap();
        assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
        let paths = doc["paths"].as_object().unwrap();
        for p in [
            "/v1/users/{id}/usage",
            "/v1/users/{id}/decision",
            "/v1/vpses/{id}/usage",
            "/v1/usage.csv",
            "/v1/openapi.json",
        ] {
            assert!(paths.contains_key(p), "{p}");
        }
    }
}
