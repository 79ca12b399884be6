//! The server name a TLS ClientHello asks for (RFC 8446 §4.1.2, RFC 6066 §3),
//! read without terminating TLS, so a CONNECT tunnel to an allowed name cannot
//! carry a TLS session to a host the agent's policy refuses (domain fronting).
//!
//! [`first_flight`] waits for whichever side of a fresh tunnel speaks first. If
//! the client does and its bytes are a TLS handshake, they are read until the
//! ClientHello is complete (at most [`MAX_HELLO`] bytes) and parsed; the bytes
//! are handed back to be passed on unchanged. A server that speaks first (SSH,
//! SMTP) means the client is not opening TLS: there is nothing to check.

use std::io;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt};

/// The most a ClientHello may take before it is refused as malformed: 16 KiB
/// of handshake (hellos with post-quantum key shares are about 2 KiB) plus
/// record headers.
pub const MAX_HELLO: usize = 16 * 1024 + 64;

/// What the first bytes of a tunnel are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hello {
    /// Not a TLS handshake record.
    NotTls,
    /// A TLS handshake whose ClientHello is not complete yet.
    Partial,
    /// A complete ClientHello, with the host name it asks for, if any.
    Complete(Option<String>),
    /// A TLS handshake record that is not a well-formed ClientHello.
    Malformed,
}

const HANDSHAKE: u8 = 22;
const CLIENT_HELLO: u8 = 1;
const SERVER_NAME: u16 = 0;
const HOST_NAME: u8 = 0;

/// Parse the start of a client's byte stream.
pub fn parse(buf: &[u8]) -> Hello {
    match buf.first() {
        None => return Hello::Partial,
        Some(&HANDSHAKE) => {}
        Some(_) => return Hello::NotTls,
    }
    // Gather the handshake bytes from consecutive handshake records.
    let mut handshake = Vec::new();
    let mut rest = buf;
    loop {
        if rest.len() < 5 {
            return Hello::Partial;
        }
        if rest[0] != HANDSHAKE || rest[1] != 3 {
            return Hello::Malformed;
        }
        let len = usize::from(u16::from_be_bytes([rest[3], rest[4]]));
        if len == 0 {
            return Hello::Malformed;
        }
        let Some(fragment) = rest.get(5..5 + len) else {
            return Hello::Partial;
        };
        handshake.extend_from_slice(fragment);
        rest = &rest[5 + len..];
        if handshake.len() >= 4 {
            if handshake[0] != CLIENT_HELLO {
                return Hello::Malformed;
            }
            let body = (usize::from(handshake[1]) << 16)
                | (usize::from(handshake[2]) << 8)
                | usize::from(handshake[3]);
            if handshake.len() >= 4 + body {
                return match server_name(&handshake[4..4 + body]) {
                    Some(name) => Hello::Complete(name),
                    None => Hello::Malformed,
                };
            }
        }
    }
}

/// A cursor over a ClientHello body; every read is bounds-checked.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, tail) = (self.0.get(..n)?, self.0.get(n..)?);
        self.0 = tail;
        Some(head)
    }

    fn u8(&mut self) -> Option<u8> {
        Some(self.take(1)?[0])
    }

    fn u16(&mut self) -> Option<u16> {
        let b = self.take(2)?;
        Some(u16::from_be_bytes([b[0], b[1]]))
    }

    /// A vector with a one- or two-byte length.
    fn vec8(&mut self) -> Option<&'a [u8]> {
        let n = self.u8()?;
        self.take(usize::from(n))
    }

    fn vec16(&mut self) -> Option<&'a [u8]> {
        let n = self.u16()?;
        self.take(usize::from(n))
    }
}

/// The SNI host name of a ClientHello body: `Some(None)` if it has none,
/// `None` if the body does not parse.
fn server_name(body: &[u8]) -> Option<Option<String>> {
    let mut r = Reader(body);
    r.take(2 + 32)?; // legacy_version, random
    r.vec8()?; // legacy_session_id
    r.vec16()?; // cipher_suites
    r.vec8()?; // legacy_compression_methods
    if r.0.is_empty() {
        return Some(None); // no extensions at all
    }
    let mut extensions = Reader(r.vec16()?);
    let mut found = None;
    while !extensions.0.is_empty() {
        let kind = extensions.u16()?;
        let data = extensions.vec16()?;
        if kind != SERVER_NAME {
            continue;
        }
        if found.is_some() {
            return None; // a second server_name extension
        }
        let mut list = Reader(Reader(data).vec16()?);
        while !list.0.is_empty() {
            let name_type = list.u8()?;
            let name = list.vec16()?;
            if name_type == HOST_NAME && found.is_none() {
                let name = std::str::from_utf8(name).ok()?;
                found = Some(name.to_ascii_lowercase());
            }
        }
        // A server_name extension without a host name does not parse.
        found.as_ref()?;
    }
    Some(found)
}

/// Who spoke first on a fresh tunnel.
#[derive(Debug)]
pub enum FirstFlight {
    /// The client: its bytes (to be passed on) and what they are.
    Client { bytes: Vec<u8>, hello: Hello },
    /// The upstream: its bytes, to be passed to the client.
    Upstream(Vec<u8>),
    /// The client closed (or the upstream did) before either spoke.
    Nothing,
    /// Neither side spoke within `wait`.
    Silent,
}

/// Wait up to `wait` for the first bytes of a tunnel; if the client's are a TLS
/// handshake, read on until its ClientHello is complete.
pub async fn first_flight<C, U>(
    client: &mut C,
    upstream: &mut U,
    wait: Duration,
) -> io::Result<FirstFlight>
where
    C: AsyncRead + Unpin,
    U: AsyncRead + Unpin,
{
    let deadline = tokio::time::Instant::now() + wait;
    let mut bytes = Vec::with_capacity(2048);
    // Banners of server-first protocols (SSH, SMTP) are short.
    let mut from_upstream = vec![0; 4 * 1024];
    loop {
        let waiting_for_client = bytes.is_empty();
        tokio::select! {
            // The client's bytes first, when both sides have spoken: they are
            // what must be judged.
            biased;
            read = client.read_buf(&mut bytes) => {
                let n = read?;
                let hello = parse(&bytes);
                if n == 0 || hello != Hello::Partial {
                    return Ok(match (n, bytes.is_empty()) {
                        (0, true) => FirstFlight::Nothing,
                        // Closed mid-hello: pass on what came, nothing to judge.
                        (0, false) => FirstFlight::Client { bytes, hello: Hello::Malformed },
                        _ => FirstFlight::Client { bytes, hello },
                    });
                }
                if bytes.len() >= MAX_HELLO {
                    return Ok(FirstFlight::Client { bytes, hello: Hello::Malformed });
                }
                bytes.reserve(4096);
            }
            // Only until the client has started: then the upstream waits in its
            // socket buffer.
            read = upstream.read(&mut from_upstream), if waiting_for_client => {
                let n = read?;
                if n == 0 {
                    return Ok(FirstFlight::Nothing);
                }
                from_upstream.truncate(n);
                return Ok(FirstFlight::Upstream(from_upstream));
            }
            _ = tokio::time::sleep_until(deadline) => {
                return Ok(match bytes.is_empty() {
                    true => FirstFlight::Silent,
                    false => FirstFlight::Client { bytes, hello: Hello::Malformed },
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A ClientHello with `name` in its SNI (none if empty), split into records
    /// of at most `record` bytes of handshake each.
    pub fn client_hello(name: &str, record: usize) -> Vec<u8> {
        let mut ext = Vec::new();
        // A dummy extension before server_name.
        ext.extend_from_slice(&[0x00, 0x0b, 0x00, 0x02, 0x01, 0x00]);
        if !name.is_empty() {
            let n = name.len() as u16;
            ext.extend_from_slice(&SERVER_NAME.to_be_bytes());
            ext.extend_from_slice(&(n + 5).to_be_bytes());
            ext.extend_from_slice(&(n + 3).to_be_bytes());
            ext.push(HOST_NAME);
            ext.extend_from_slice(&n.to_be_bytes());
            ext.extend_from_slice(name.as_bytes());
        }
        let mut body = vec![3, 3];
        body.extend_from_slice(&[7; 32]);
        body.push(0);
        body.extend_from_slice(&[0, 2, 0x13, 0x01]);
        body.extend_from_slice(&[1, 0]);
        body.extend_from_slice(&(ext.len() as u16).to_be_bytes());
        body.extend_from_slice(&ext);
        let mut hs = vec![CLIENT_HELLO];
        hs.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
        hs.extend_from_slice(&body);
        let mut out = Vec::new();
        for chunk in hs.chunks(record) {
            out.extend_from_slice(&[HANDSHAKE, 3, 1]);
            out.extend_from_slice(&(chunk.len() as u16).to_be_bytes());
            out.extend_from_slice(chunk);
        }
        out
    }

    #[test]
    fn reads_the_host_name() {
        let hello = client_hello("Api.Example.com", 16 * 1024);
        assert_eq!(
            parse(&hello),
            Hello::Complete(Some("api.example.com".into()))
        );
        assert_eq!(parse(&client_hello("", 16 * 1024)), Hello::Complete(None));
    }

    #[test]
    fn a_hello_split_over_records_and_reads_is_gathered() {
        let hello = client_hello("fronted.example", 20);
        for cut in 0..hello.len() {
            assert_eq!(parse(&hello[..cut]), Hello::Partial, "cut at {cut}");
        }
        assert_eq!(
            parse(&hello),
            Hello::Complete(Some("fronted.example".into()))
        );
    }

    #[test]
    fn other_bytes_are_not_tls_and_broken_hellos_are_malformed() {
        assert_eq!(parse(b"SSH-2.0-OpenSSH\r\n"), Hello::NotTls);
        assert_eq!(parse(b"GET / HTTP/1.1\r\n"), Hello::NotTls);
        let mut hello = client_hello("a.example", 16 * 1024);
        hello[5] = 2; // ServerHello, not ClientHello
        assert_eq!(parse(&hello), Hello::Malformed);
        let mut hello = client_hello("a.example", 16 * 1024);
        let last = hello.len() - 1;
        hello.truncate(last);
        // The record says more is coming.
        assert_eq!(parse(&hello), Hello::Partial);
        // A record that claims the name is longer than the extension.
        let mut hello = client_hello("a.example", 16 * 1024);
        let at = hello.len() - "a.example".len() - 1;
        hello[at] = 200;
        assert_eq!(parse(&hello), Hello::Malformed);
    }

    proptest::proptest! {
        /// Whatever the bytes, parsing neither panics nor reads out of bounds.
        #[test]
        fn any_bytes_parse_without_panic(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..600)) {
            let mut framed = vec![HANDSHAKE, 3, 1, 0, 0];
            framed[3..5].copy_from_slice(&(bytes.len() as u16).to_be_bytes());
            framed.extend_from_slice(&bytes);
            let _ = parse(&framed);
            let _ = parse(&bytes);
        }
    }

    #[tokio::test]
    async fn the_side_that_speaks_first_is_reported() {
        use tokio::io::AsyncWriteExt;
        let (mut client, mut client_peer) = tokio::io::duplex(64 * 1024);
        let (mut upstream, mut upstream_peer) = tokio::io::duplex(64 * 1024);
        upstream_peer.write_all(b"SSH-2.0-x\r\n").await.unwrap();
        let first = first_flight(&mut client, &mut upstream, Duration::from_secs(5))
            .await
            .unwrap();
        assert!(matches!(first, FirstFlight::Upstream(b) if b == b"SSH-2.0-x\r\n"));

        let hello = client_hello("b.example", 100);
        let (head, tail) = hello.split_at(50);
        client_peer.write_all(head).await.unwrap();
        let tail = tail.to_vec();
        let writer = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            client_peer.write_all(&tail).await.unwrap();
            client_peer
        });
        let first = first_flight(&mut client, &mut upstream, Duration::from_secs(5))
            .await
            .unwrap();
        match first {
            FirstFlight::Client {
                bytes,
                hello: parsed,
            } => {
                assert_eq!(bytes, hello);
                assert_eq!(parsed, Hello::Complete(Some("b.example".into())));
            }
            other => panic!("{other:?}"),
        }
        drop(writer.await.unwrap());
    }
}
