//! Accepting connections for a listener: the connection limit (503 beyond it),
//! optional TLS, hyper's HTTP/1.1 settings (head size limit -> 431, head read
//! timeout), and graceful shutdown (stop accepting, let in-flight exchanges
//! finish, close idle keep-alives).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use hyper::server::conn::http1;
use hyper_util::rt::TokioTimer;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use tollgate_core::config::TlsConfig;

use crate::telemetry::{self, Listener};

/// Limits a listener applies to every connection.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_connections: usize,
    pub max_header_bytes: usize,
    pub header_read_timeout: Duration,
}

/// The HTTP/1.1 server settings for `limits`.
pub fn http1_builder(limits: &Limits) -> http1::Builder {
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_header_size(limits.max_header_bytes)
        .max_buf_size(limits.max_header_bytes.max(64 * 1024))
        .keep_alive(true);
    builder
}

/// A rustls server config from PEM files, offering `alpn` protocols.
pub fn tls_acceptor(tls: &TlsConfig, alpn: &[&[u8]]) -> anyhow::Result<tokio_rustls::TlsAcceptor> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&tls.cert)
        .with_context(|| format!("reading TLS certificates from {}", tls.cert.display()))?
        .collect::<Result<_, _>>()
        .with_context(|| format!("parsing TLS certificates in {}", tls.cert.display()))?;
    let key = PrivateKeyDer::from_pem_file(&tls.key)
        .with_context(|| format!("reading the TLS private key from {}", tls.key.display()))?;
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .context("TLS protocol versions")?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .context("TLS certificate and key do not match")?;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

const OVER_LIMIT: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
connection: close\r\nretry-after: 1\r\ncontent-length: 46\r\n\r\n{\"error\":\"unavailable\",\"reason\":\"connections\"}";

/// Accept on `listener` until `shutdown`, handing each connection (with its slot
/// under the connection limit) to `handle`, tracked by `tracker`.
pub async fn accept_loop<F, Fut>(
    listener: TcpListener,
    kind: Listener,
    limits: Limits,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    handle: F,
) where
    F: Fn(TcpStream, SocketAddr, OwnedSemaphorePermit) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.cancelled() => return,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!(listener = kind.as_str(), error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        match slots.clone().try_acquire_owned() {
            Ok(permit) => {
                tracker.spawn(handle(stream, peer, permit));
            }
            Err(_) => {
                telemetry::rejected_connection(kind);
                tracker.spawn(async move {
                    let mut stream = stream;
                    let _ =
                        tokio::time::timeout(Duration::from_secs(1), stream.write_all(OVER_LIMIT))
                            .await;
                    let _ = stream.shutdown().await;
                });
            }
        }
    }
}

/// Drive `conn` until it ends or `shutdown` asks it to finish gracefully.
pub async fn serve_until<C>(conn: C, shutdown: &CancellationToken)
where
    C: GracefulConnection,
{
    let mut conn = std::pin::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r {
                tracing::debug!(error = %e, "client connection ended with an error");
            }
        }
        _ = shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "client connection ended with an error during drain");
            }
        }
    }
}

/// A hyper connection future that can be asked to finish gracefully.
pub trait GracefulConnection: Future<Output = Result<(), Self::Error>> {
    type Error: std::fmt::Display;
    fn graceful_shutdown(self: std::pin::Pin<&mut Self>);
}

impl<I, S, B> GracefulConnection for http1::UpgradeableConnection<I, S>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    S: hyper::service::HttpService<hyper::body::Incoming, ResBody = B>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: http_body::Body + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Error = hyper::Error;
    fn graceful_shutdown(self: std::pin::Pin<&mut Self>) {
        http1::UpgradeableConnection::graceful_shutdown(self)
    }
}

impl<I, S, B, E> GracefulConnection for hyper::server::conn::http2::Connection<I, S, E>
where
    S: hyper::service::HttpService<hyper::body::Incoming, ResBody = B>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    I: hyper::rt::Read + hyper::rt::Write + Unpin,
    B: http_body::Body + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    E: hyper::rt::bounds::Http2ServerConnExec<S::Future, B>,
{
    type Error = hyper::Error;
    fn graceful_shutdown(self: std::pin::Pin<&mut Self>) {
        hyper::server::conn::http2::Connection::graceful_shutdown(self)
    }
}
