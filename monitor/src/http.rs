//! A minimal HTTP/1.1 client for the monitor's sources (Prometheus API, in-VM
//! agent: GET) and quota webhooks (POST, over TLS for `https://`): one
//! connection per request, bounded response size. Timeouts are the caller's
//! (the per-sample or delivery timeout).

use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// Largest response body read from an in-VM agent.
const MAX_BODY: usize = 4 * 1024 * 1024;
/// Largest response body read from Prometheus: a fleet query's answer holds a
/// series per VPS, about 70 bytes each (100,000 VPSes: 7 MB).
const MAX_LARGE_BODY: usize = 256 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error(
        "invalid URL `{0}`: expected http://host[:port]/path (or https:// where TLS is set up)"
    )]
    Url(String),
    #[error("TLS handshake with {authority} failed: {source}")]
    Tls {
        authority: String,
        source: std::io::Error,
    },
    #[error("cannot connect to {authority}: {source}")]
    Connect {
        authority: String,
        source: std::io::Error,
    },
    #[error("request failed: {0}")]
    Exchange(#[from] hyper::Error),
    #[error("response body unreadable or larger than {0} bytes")]
    Body(usize),
}

/// GET `url` with extra `headers`; returns the status and body (at most 4 MiB).
pub async fn get(url: &str, headers: &[(&str, &str)]) -> Result<(StatusCode, Bytes), HttpError> {
    get_limited(url, headers, MAX_BODY).await
}

/// [`get`] for answers that grow with the fleet (Prometheus): at most 256 MiB.
pub async fn get_large(
    url: &str,
    headers: &[(&str, &str)],
) -> Result<(StatusCode, Bytes), HttpError> {
    get_limited(url, headers, MAX_LARGE_BODY).await
}

async fn get_limited(
    url: &str,
    headers: &[(&str, &str)],
    max_body: usize,
) -> Result<(StatusCode, Bytes), HttpError> {
    exchange(
        http::Method::GET,
        url,
        headers,
        Bytes::new(),
        max_body,
        None,
    )
    .await
}

/// How `https://` endpoints are reached: TLS 1.2 or 1.3, the server's
/// certificate checked against the trusted roots.
#[derive(Clone)]
pub struct Tls(TlsConnector);

impl Tls {
    /// Trust the certificate authorities in the PEM file `ca_file`, or the
    /// built-in Mozilla roots when `None`.
    pub fn new(ca_file: Option<&Path>) -> anyhow::Result<Tls> {
        let mut roots = rustls::RootCertStore::empty();
        match ca_file {
            Some(path) => {
                let certs = CertificateDer::pem_file_iter(path)
                    .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
                    .map_err(|e| {
                        anyhow::anyhow!("reading CA certificates from {}: {e}", path.display())
                    })?;
                let (added, _) = roots.add_parsable_certificates(certs);
                if added == 0 {
                    anyhow::bail!("{} holds no usable CA certificate", path.display());
                }
            }
            None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
        }
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
        Ok(Tls(TlsConnector::from(Arc::new(config))))
    }
}

/// POST `body` to `url` with extra `headers`; returns the status and body (at
/// most `max_body` bytes). For the quota webhooks: `tls` reaches `https://`
/// URLs.
pub async fn post(
    url: &str,
    headers: &[(&str, &str)],
    body: Bytes,
    max_body: usize,
    tls: Option<&Tls>,
) -> Result<(StatusCode, Bytes), HttpError> {
    exchange(http::Method::POST, url, headers, body, max_body, tls).await
}

async fn exchange(
    method: http::Method,
    url: &str,
    headers: &[(&str, &str)],
    body: Bytes,
    max_body: usize,
    tls: Option<&Tls>,
) -> Result<(StatusCode, Bytes), HttpError> {
    let (rest, tls, default_port) = match (url.strip_prefix("https://"), tls) {
        (Some(rest), Some(tls)) => (rest, Some(tls), 443),
        (Some(_), None) => return Err(HttpError::Url(url.to_owned())),
        (None, _) => (
            url.strip_prefix("http://")
                .ok_or_else(|| HttpError::Url(url.to_owned()))?,
            None,
            80,
        ),
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if authority.is_empty() {
        return Err(HttpError::Url(url.to_owned()));
    }
    let target = if authority
        .rsplit_once(':')
        .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
    {
        authority.to_owned()
    } else {
        format!("{authority}:{default_port}")
    };
    let stream = TcpStream::connect(target.as_str())
        .await
        .map_err(|source| HttpError::Connect {
            authority: authority.to_owned(),
            source,
        })?;
    let request = request(method, url, authority, path, headers, body)?;
    match tls {
        None => send(stream, request, max_body).await,
        Some(Tls(connector)) => {
            let host = authority
                .rsplit_once(':')
                .filter(|(_, p)| p.parse::<u16>().is_ok())
                .map_or(authority, |(h, _)| h);
            let name = ServerName::try_from(host.trim_matches(['[', ']']).to_owned())
                .map_err(|_| HttpError::Url(url.to_owned()))?;
            let stream =
                connector
                    .connect(name, stream)
                    .await
                    .map_err(|source| HttpError::Tls {
                        authority: authority.to_owned(),
                        source,
                    })?;
            send(stream, request, max_body).await
        }
    }
}

fn request(
    method: http::Method,
    url: &str,
    authority: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Bytes,
) -> Result<Request<Full<Bytes>>, HttpError> {
    let mut request = Request::builder()
        .method(method)
        .uri(path)
        .header(http::header::HOST, authority);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    request
        .body(Full::new(body))
        .map_err(|_| HttpError::Url(url.to_owned()))
}

async fn send<S>(
    stream: S,
    request: Request<Full<Bytes>>,
    max_body: usize,
) -> Result<(StatusCode, Bytes), HttpError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let response = sender.send_request(request).await?;
    let status = response.status();
    let body = Limited::new(response.into_body(), max_body)
        .collect()
        .await
        .map_err(|_| HttpError::Body(max_body))?
        .to_bytes();
    Ok((status, body))
}

/// Percent-encode a query parameter value.
pub fn encode_query_value(value: &str) -> String {
    let mut out = String::with_capacity(value.len() * 3);
    for b in value.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_values_are_percent_encoded() {
        assert_eq!(
            encode_query_value("sum(rate(x{pod=\"a b\"}[1m]))"),
            "sum%28rate%28x%7Bpod%3D%22a%20b%22%7D%5B1m%5D%29%29"
        );
    }
}
