//! Delivery of quota notifications (SPEC §11) from the `quota_events` outbox as
//! signed webhooks: configured by `[monitor.webhooks]`.
//!
//! A trigger on `usage_decisions` queues an event in the same transaction as the
//! decision that crossed a threshold, blocked or unblocked a user (migration
//! 023), and notifies `tollgate_quota_event`. Every monitor runs this worker,
//! leader or standby:
//!
//! ```text
//!  NOTIFY tollgate_quota_event ─┐
//!  poll_interval / next retry ──┴▶ claim due events (FOR UPDATE SKIP LOCKED, one transaction)
//!       ─▶ POST each (in parallel, `timeout` each), signed with HMAC-SHA256
//!       ─▶ 2xx: delivered_at; else attempts+1, last_error, next_attempt_at = now + backoff
//!       ─▶ commit (releases the rows) ─▶ again at once if the batch was full
//! ```
//!
//! The rows stay locked while their requests are in flight, so two monitors
//! never send the same event at once; an event is marked delivered only after
//! a 2xx, so a crash between the answer and the commit sends it again (at least
//! once; receivers dedupe on `Idempotency-Key`). Nothing is ever dropped: a
//! failing event is retried with doubling waits capped at `max_backoff`.

use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use ring::hmac;
use sqlx::postgres::PgListener;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use tollgate_core::config::WebhooksConfig;

use crate::{http, telemetry};

/// The channel the outbox trigger notifies, payload the event id.
pub const QUOTA_EVENT_CHANNEL: &str = "tollgate_quota_event";
/// Header carrying `sha256=<hex HMAC-SHA256 of the body>`.
pub const SIGNATURE_HEADER: &str = "X-Tollgate-Signature";
/// Header carrying the event id.
pub const EVENT_ID_HEADER: &str = "X-Tollgate-Event-Id";
/// Header carrying the event's idempotency key (stable per crossing or transition).
pub const IDEMPOTENCY_HEADER: &str = "Idempotency-Key";
/// Wait after the first failure; doubles per failure up to `max_backoff`.
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
/// Largest receiver answer read (the body is only kept for the error text).
const MAX_ANSWER: usize = 64 * 1024;
/// Characters of a receiver's answer kept in `last_error`.
const ERROR_TEXT: usize = 200;

/// `sha256=<hex>`: the signature header of `body` under `secret`.
pub fn signature(secret: &[u8], body: &[u8]) -> String {
    let key = hmac::Key::new(hmac::HMAC_SHA256, secret);
    let tag = hmac::sign(&key, body);
    let mut out = String::with_capacity(7 + 64);
    out.push_str("sha256=");
    for b in tag.as_ref() {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

/// The wait before attempt `attempts + 1` of an event that has failed
/// `attempts` times (at least 1): 1 s, 2 s, 4 s, ... capped at `max`.
pub fn backoff(attempts: u32, max: Duration) -> Duration {
    let doublings = attempts.saturating_sub(1).min(30);
    FIRST_BACKOFF.saturating_mul(1 << doublings).min(max)
}

#[derive(Debug, thiserror::Error)]
enum DeliveryError {
    #[error("{0}")]
    Http(#[from] http::HttpError),
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    #[error("answered {status}: {body}")]
    Status {
        status: ::http::StatusCode,
        body: String,
    },
}

/// A claimed event.
#[derive(sqlx::FromRow)]
struct Due {
    id: Uuid,
    idempotency_key: Uuid,
    attempts: i32,
    body: String,
}

/// Deliver until `shutdown` (a batch in flight is finished first, bounded by
/// `timeout`). Returns at once when no `url` is configured.
/// Where events go: the configured URL, the signing key, and TLS for an
/// `https://` URL.
pub struct Endpoint {
    url: String,
    secret: Vec<u8>,
    tls: Option<http::Tls>,
}

impl Endpoint {
    /// The endpoint `config` names, `None` when delivery is off. Fails if the
    /// CA file of an `https://` URL cannot be read.
    pub fn of(config: &WebhooksConfig) -> anyhow::Result<Option<Endpoint>> {
        let (Some(url), Some(secret)) = (&config.url, &config.secret) else {
            return Ok(None);
        };
        let tls = match url.starts_with("https://") {
            true => Some(http::Tls::new(config.ca_file.as_deref()).map_err(|e| {
                anyhow::anyhow!(
                    "monitor.webhooks.ca_file: {e}; point it at a PEM file of CA certificates"
                )
            })?),
            false => None,
        };
        Ok(Some(Endpoint {
            url: url.clone(),
            secret: secret.as_bytes().to_vec(),
            tls,
        }))
    }
}

pub async fn run(
    config: WebhooksConfig,
    endpoint: Option<Endpoint>,
    pool: PgPool,
    shutdown: CancellationToken,
) {
    let Some(endpoint) = endpoint else {
        return;
    };
    tracing::info!(url = %endpoint.url, "delivering quota notifications");
    let mut listener: Option<PgListener> = None;
    while !shutdown.is_cancelled() {
        if listener.is_none() {
            listener = listen(&pool).await;
        }
        let wait = match deliver_due(&config, &endpoint, &pool).await {
            Ok(Claimed::Full) => continue,
            Ok(Claimed::Partial) => next_due(&pool)
                .await
                .unwrap_or(config.poll_interval)
                .min(config.poll_interval),
            Err(e) => {
                tracing::warn!(error = %e, "quota notification outbox unreachable; retrying");
                config.poll_interval.min(Duration::from_secs(1))
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            n = async {
                match listener.as_mut() {
                    Some(l) => l.try_recv().await,
                    None => std::future::pending().await,
                }
            } => {
                if !matches!(n, Ok(Some(_))) {
                    // Reconnected (events may have been missed: the claim below finds
                    // them) or lost: listen again on the next turn.
                    if n.is_err() {
                        listener = None;
                    }
                }
            }
            _ = shutdown.cancelled() => {}
        }
    }
}

async fn listen(pool: &PgPool) -> Option<PgListener> {
    let mut l = PgListener::connect_with(pool).await.ok()?;
    l.listen(QUOTA_EVENT_CHANNEL).await.ok()?;
    Some(l)
}

enum Claimed {
    /// A whole batch: more may be due.
    Full,
    /// Fewer than a batch: none left due now.
    Partial,
}

/// Claim up to a batch of due events, deliver them, record the outcomes, commit.
async fn deliver_due(
    config: &WebhooksConfig,
    endpoint: &Endpoint,
    pool: &PgPool,
) -> Result<Claimed, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let due: Vec<Due> = sqlx::query_as(
        "SELECT id, idempotency_key, attempts, payload::text AS body
         FROM quota_events
         WHERE delivered_at IS NULL AND next_attempt_at <= now()
         ORDER BY next_attempt_at, created_at
         LIMIT $1
         FOR UPDATE SKIP LOCKED",
    )
    .bind(config.batch_size as i64)
    .fetch_all(&mut *tx)
    .await?;
    if due.is_empty() {
        tx.rollback().await?;
        return Ok(Claimed::Partial);
    }
    let claimed = due.len();
    let outcomes: Vec<(Uuid, i32, Result<(), DeliveryError>)> =
        futures_util::stream::iter(due.into_iter().map(|event| async move {
            let outcome = deliver(config, endpoint, &event).await;
            (event.id, event.attempts, outcome)
        }))
        .buffer_unordered(config.batch_size)
        .collect()
        .await;
    let (mut delivered, mut failed) = (Vec::new(), Vec::new());
    for (id, attempts, outcome) in outcomes {
        match outcome {
            Ok(()) => delivered.push(id),
            Err(e) => {
                let tries = u32::try_from(attempts).unwrap_or(0).saturating_add(1);
                let wait = backoff(tries, config.max_backoff);
                tracing::info!(event = %id, attempts = tries, retry_in = ?wait, error = %e, "quota notification not delivered; will retry");
                failed.push((id, e.to_string(), wait.as_secs_f64()));
            }
        }
    }
    if !delivered.is_empty() {
        let lags: Vec<f64> = sqlx::query_scalar(
            "UPDATE quota_events
             SET delivered_at = clock_timestamp(), attempts = attempts + 1, last_error = NULL
             WHERE id = ANY($1)
             RETURNING EXTRACT(EPOCH FROM clock_timestamp() - created_at)::float8",
        )
        .bind(&delivered)
        .fetch_all(&mut *tx)
        .await?;
        for lag in lags {
            metrics::histogram!(telemetry::WEBHOOK_LAG).record(lag.max(0.0));
        }
    }
    if !failed.is_empty() {
        let ids: Vec<Uuid> = failed.iter().map(|f| f.0).collect();
        let errors: Vec<&str> = failed.iter().map(|f| f.1.as_str()).collect();
        let waits: Vec<f64> = failed.iter().map(|f| f.2).collect();
        sqlx::query(
            "UPDATE quota_events e
             SET attempts = e.attempts + 1, last_error = f.error,
                 next_attempt_at = clock_timestamp() + make_interval(secs => f.wait)
             FROM UNNEST($1::uuid[], $2::text[], $3::float8[]) AS f(id, error, wait)
             WHERE e.id = f.id",
        )
        .bind(&ids)
        .bind(&errors)
        .bind(&waits)
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    metrics::counter!(telemetry::WEBHOOKS, "outcome" => "delivered")
        .increment(delivered.len() as u64);
    metrics::counter!(telemetry::WEBHOOKS, "outcome" => "failed").increment(failed.len() as u64);
    Ok(if claimed >= config.batch_size {
        Claimed::Full
    } else {
        Claimed::Partial
    })
}

/// Time until the earliest undelivered event is due (zero if one is due now).
async fn next_due(pool: &PgPool) -> Option<Duration> {
    let secs: Option<f64> = sqlx::query_scalar(
        "SELECT EXTRACT(EPOCH FROM min(next_attempt_at) - now())::float8
         FROM quota_events WHERE delivered_at IS NULL",
    )
    .fetch_one(pool)
    .await
    .ok()?;
    secs.map(|s| Duration::from_secs_f64(s.max(0.0)))
}

async fn deliver(
    config: &WebhooksConfig,
    endpoint: &Endpoint,
    event: &Due,
) -> Result<(), DeliveryError> {
    let signature = signature(&endpoint.secret, event.body.as_bytes());
    let id = event.id.to_string();
    let key = event.idempotency_key.to_string();
    let headers = [
        ("content-type", "application/json"),
        (SIGNATURE_HEADER, signature.as_str()),
        (EVENT_ID_HEADER, id.as_str()),
        (IDEMPOTENCY_HEADER, key.as_str()),
    ];
    let body = Bytes::copy_from_slice(event.body.as_bytes());
    let post = http::post(
        &endpoint.url,
        &headers,
        body,
        MAX_ANSWER,
        endpoint.tls.as_ref(),
    );
    let (status, answer) = tokio::time::timeout(config.timeout, post)
        .await
        .map_err(|_| DeliveryError::Timeout(config.timeout))??;
    if status.is_success() {
        Ok(())
    } else {
        Err(DeliveryError::Status {
            status,
            body: String::from_utf8_lossy(&answer)
                .chars()
                .take(ERROR_TEXT)
                .collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_is_hex_hmac_sha256() {
        // RFC 4231, test case 2.
        assert_eq!(
            signature(b"Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn backoff_doubles_from_a_second_up_to_the_cap() {
        let max = Duration::from_secs(600);
        let waits: Vec<u64> = (1..=12).map(|a| backoff(a, max).as_secs()).collect();
        assert_eq!(waits, [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 600, 600]);
        assert_eq!(backoff(u32::MAX, max), max);
        assert_eq!(
            backoff(3, Duration::from_millis(1500)),
            Duration::from_millis(1500)
        );
    }
}
