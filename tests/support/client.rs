//! Raw clients that count every byte they write to and read from their own
//! socket, so tests can compare the database's counts with the truth.

use std::net::SocketAddr;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use uuid::Uuid;

/// `Proxy-Authorization` value for an agent.
pub fn basic(agent: Uuid, token: &str) -> String {
    format!("Basic {}", STANDARD.encode(format!("{agent}:{token}")))
}

/// What one connection moved, measured at the client.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Exchange {
    pub written: u64,
    pub read: u64,
    pub status: u16,
    pub head: String,
    pub body: Vec<u8>,
}

impl Exchange {
    pub fn body_text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn header(&self, name: &str) -> Option<String> {
        self.head.lines().skip(1).find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_owned())
        })
    }
}

/// Send `request` (which should say `connection: close`) and read to EOF.
pub async fn exchange(proxy: SocketAddr, request: &[u8]) -> Exchange {
    let mut s = TcpStream::connect(proxy).await.expect("connect to proxy");
    s.write_all(request).await.expect("write request");
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf).await;
    parse(request.len() as u64, buf)
}

fn parse(written: u64, buf: Vec<u8>) -> Exchange {
    let read = buf.len() as u64;
    let split = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(buf.len(), |i| i + 4);
    let head = String::from_utf8_lossy(&buf[..split]).into_owned();
    let status = head.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
    Exchange {
        written,
        read,
        status,
        head,
        body: buf[split..].to_vec(),
    }
}

/// A plain-HTTP GET through the proxy with `connection: close`.
pub fn get_request(url: &str, auth: &str) -> Vec<u8> {
    let host = url.trim_start_matches("http://").split('/').next().unwrap();
    format!("GET {url} HTTP/1.1\r\nhost: {host}\r\nproxy-authorization: {auth}\r\nconnection: close\r\n\r\n").into_bytes()
}

/// A plain-HTTP POST of `body` through the proxy with `connection: close`.
pub fn post_request(url: &str, auth: &str, body: &[u8]) -> Vec<u8> {
    let host = url.trim_start_matches("http://").split('/').next().unwrap();
    let mut r = format!(
        "POST {url} HTTP/1.1\r\nhost: {host}\r\nproxy-authorization: {auth}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    r.extend_from_slice(body);
    r
}

/// Open a CONNECT tunnel to `target`, send `payload`, half-close, read the echo
/// to EOF. Returns the exchange (head = the CONNECT response head, body = echo).
/// Assert that the egress proxy at `proxy` refuses `host` with `reason`, as a
/// plain HTTP destination (403 JSON `egress_denied`) and as a CONNECT target.
pub async fn assert_refused_both_ways(proxy: SocketAddr, auth: &str, host: &str, reason: &str) {
    let plain = exchange(proxy, &get_request(&format!("http://{host}/x"), auth)).await;
    assert_eq!(plain.status, 403, "http://{host}: {}", plain.head);
    assert_eq!(
        plain.header("x-tollgate-deny-reason").as_deref(),
        Some(reason),
        "http://{host}"
    );
    let body: serde_json::Value = serde_json::from_slice(&plain.body).unwrap();
    assert_eq!(
        (body["error"].as_str(), body["reason"].as_str()),
        (Some("egress_denied"), Some(reason)),
        "http://{host}"
    );
    let tunneled = tunnel(proxy, auth, &format!("{host}:443"), b"").await;
    assert_eq!(
        tunneled.status, 403,
        "CONNECT {host}:443: {}",
        tunneled.head
    );
    assert_eq!(
        tunneled.header("x-tollgate-deny-reason").as_deref(),
        Some(reason),
        "CONNECT {host}"
    );
}

pub async fn tunnel(proxy: SocketAddr, auth: &str, target: &str, payload: &[u8]) -> Exchange {
    tunnel_sending_early(proxy, auth, target, &[], payload).await
}

/// As [`tunnel`], but `early` goes out in the same write as the CONNECT head,
/// before the proxy has answered (as clients that start TLS at once do).
pub async fn tunnel_sending_early(
    proxy: SocketAddr,
    auth: &str,
    target: &str,
    early: &[u8],
    payload: &[u8],
) -> Exchange {
    let mut s = TcpStream::connect(proxy).await.expect("connect to proxy");
    let mut request = format!(
        "CONNECT {target} HTTP/1.1\r\nhost: {target}\r\nproxy-authorization: {auth}\r\n\r\n"
    )
    .into_bytes();
    request.extend_from_slice(early);
    s.write_all(&request).await.unwrap();
    let mut written = request.len() as u64;
    let head = read_head(&mut s).await;
    let mut ex = parse(0, head.clone());
    if ex.status != 200 {
        // A refused CONNECT leaves the connection open for further requests: read
        // exactly the body the response declares.
        let len: usize = ex
            .header("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let mut rest = vec![0u8; len];
        let _ = s.read_exact(&mut rest).await;
        ex.written = written;
        ex.read = (head.len() + rest.len()) as u64;
        ex.body = rest;
        return ex;
    }
    let (mut r, mut w) = s.into_split();
    let payload = payload.to_vec();
    let writer = tokio::spawn(async move {
        w.write_all(&payload).await.unwrap();
        w.shutdown().await.unwrap();
        payload.len() as u64
    });
    let mut echoed = Vec::new();
    r.read_to_end(&mut echoed).await.unwrap();
    written += writer.await.unwrap();
    Exchange {
        written,
        read: (head.len() + echoed.len()) as u64,
        status: 200,
        head: ex.head,
        body: echoed,
    }
}

/// Read exactly one response head (up to and including the blank line).
pub async fn read_head(s: &mut TcpStream) -> Vec<u8> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match s.read(&mut byte).await {
            Ok(1) => head.push(byte[0]),
            _ => break,
        }
    }
    head
}
