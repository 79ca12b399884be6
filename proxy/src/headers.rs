//! What both listeners do to a request on its way upstream: hop-by-hop headers
//! stay on their hop (RFC 9110 §7.6.1), upgrades are recognised and kept, the
//! body is streamed under its user's guard.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Uri, Version};
use hyper::upgrade::OnUpgrade;

use crate::body::{Flow, ProxyBody, RequestBody};
use crate::exchange::Exchange;
use crate::gate::StreamGuard;

/// A request as it goes upstream, and the client's side of the upgrade it asks
/// for, if any.
pub struct Outbound {
    pub request: Request<ProxyBody>,
    pub client_upgrade: Option<OnUpgrade>,
}

/// Headers a proxied request may gain on its way: `Host`, and on ingress the
/// three `X-Forwarded-*`. A head the fast path parses has room for them, so
/// its map never grows.
pub const ROOM: usize = 4;

impl Outbound {
    /// `req` for `target` (origin-form) on the upstream `host`: hop-by-hop
    /// headers dropped (an HTTP/1 upgrade's own kept), `Host` set, `Expect`
    /// dropped (this hop answers it: hyper sends the `100` when the body is
    /// first read), HTTP/1.1; a body is streamed under `guard`, its bytes
    /// counted in `exchange`. `room`: how many headers the caller adds to
    /// the request afterwards.
    pub fn of(
        mut req: Request<RequestBody>,
        target: Uri,
        host: HeaderValue,
        room: usize,
        guard: &StreamGuard,
        exchange: &mut Exchange,
    ) -> Outbound {
        // One pass over the names finds what is to go; a header looked up
        // only when it is there (most requests carry none of them).
        let present = present(req.headers());
        let upgrade = req.version() < Version::HTTP_2
            && present & (UPGRADE | CONNECTION) == UPGRADE | CONNECTION
            && wants_upgrade(req.headers());
        let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
        let (mut parts, body) = req.into_parts();
        strip_present(&mut parts.headers, present, upgrade);
        if present & EXPECT != 0 {
            parts.headers.remove(header::EXPECT);
        }
        if room > 0 {
            // The map, sized by the parser for what it read, grows once here
            // rather than on each insert (an insert makes room first, even
            // for a name already there).
            parts.headers.reserve(room + 1);
        }
        parts.headers.insert(header::HOST, host);
        let body = match body.is_end_stream() {
            true => ProxyBody::Empty,
            false => ProxyBody::guarded(
                body,
                guard.clone(),
                Flow::FromClient(exchange.upload_counter()),
            ),
        };
        let mut request = Request::new(body);
        *request.method_mut() = parts.method;
        *request.uri_mut() = target;
        *request.version_mut() = Version::HTTP_11;
        *request.headers_mut() = parts.headers;
        Outbound {
            request,
            client_upgrade,
        }
    }
}

/// Headers that describe one connection, never forwarded.
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    header::PROXY_AUTHORIZATION,
    header::PROXY_AUTHENTICATE,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    HeaderName::from_static("keep-alive"),
];

const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Bits of [`present`]'s answer: one per entry of [`HOP_BY_HOP`] (in its
/// order), then `Proxy-Connection` and `Expect`.
const CONNECTION: u16 = 1;
const UPGRADE: u16 = 1 << 6;
const PROXY_CONNECTION_BIT: u16 = 1 << 8;
const EXPECT: u16 = 1 << 9;

/// Which of [`HOP_BY_HOP`], `Proxy-Connection` and `Expect` `headers` carries,
/// from one pass over its names.
fn present(headers: &HeaderMap) -> u16 {
    let mut present = 0;
    for name in headers.keys() {
        if let Some(i) = HOP_BY_HOP.iter().position(|h| h == name) {
            present |= 1 << i;
        } else if *name == PROXY_CONNECTION {
            present |= PROXY_CONNECTION_BIT;
        } else if *name == header::EXPECT {
            present |= EXPECT;
        }
    }
    present
}

/// Remove hop-by-hop headers, including those named by `Connection`. When
/// `keep_upgrade` is set (a protocol upgrade is being relayed), `Upgrade` stays
/// and `Connection: upgrade` is restored.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    strip_present(headers, present(headers), keep_upgrade);
}

/// [`strip_hop_by_hop`], `present` being what [`present`] found in `headers`.
fn strip_present(headers: &mut HeaderMap, present: u16, keep_upgrade: bool) {
    // Most messages carry none (any named by `Connection` need `Connection`),
    // and most others only `Connection: keep-alive`: only those there are
    // looked up again.
    if present & !EXPECT == 0 {
        return;
    }
    // The values naming other headers (cheap clones: they share their bytes),
    // taken out before any header is removed: the first on its own, any others
    // (rare) in a list.
    let (first, others) = match present & (CONNECTION | PROXY_CONNECTION_BIT) {
        0 => (None, Vec::new()),
        _ => {
            let mut naming = headers
                .get_all(header::CONNECTION)
                .iter()
                .chain(headers.get_all(PROXY_CONNECTION).iter())
                .cloned();
            (naming.next(), naming.collect::<Vec<HeaderValue>>())
        }
    };
    let upgrade = if keep_upgrade {
        headers.get(header::UPGRADE).cloned()
    } else {
        None
    };
    // A name that is not a valid header name names nothing: `remove` by text
    // finds no header for it (and allocates no name to look it up).
    for name in first
        .iter()
        .chain(others.iter())
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
    {
        headers.remove(name.trim());
    }
    for (i, name) in HOP_BY_HOP.iter().enumerate() {
        if present & (1 << i) != 0 {
            headers.remove(name);
        }
    }
    if present & PROXY_CONNECTION_BIT != 0 {
        headers.remove(PROXY_CONNECTION);
    }
    if let Some(protocol) = upgrade {
        headers.insert(header::UPGRADE, protocol);
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
}

/// Whether the request asks to switch protocols (e.g. WebSocket).
pub fn wants_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE)
        && headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn strips_hop_by_hop_and_connection_named_headers() {
        let mut h = map(&[
            ("connection", "keep-alive, x-hop"),
            ("x-hop", "1"),
            ("keep-alive", "timeout=5"),
            ("proxy-authorization", "Basic abc"),
            ("proxy-connection", "keep-alive"),
            ("te", "trailers"),
            ("trailer", "x-checksum"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "websocket"),
            ("x-end-to-end", "kept"),
            ("authorization", "Bearer kept"),
        ]);
        strip_hop_by_hop(&mut h, false);
        let mut left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        left.sort_unstable();
        assert_eq!(left, ["authorization", "x-end-to-end"]);
    }

    #[test]
    fn end_to_end_headers_pass_untouched_and_a_lone_hop_by_hop_header_goes() {
        let mut h = map(&[("host", "a"), ("x-one", "1"), ("authorization", "k")]);
        let before = h.clone();
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h, before);
        for hop in ["proxy-connection", "keep-alive", "te"] {
            let mut h = map(&[("host", "a"), (hop, "x")]);
            strip_hop_by_hop(&mut h, false);
            assert_eq!(h.keys().map(|k| k.as_str()).collect::<Vec<_>>(), ["host"]);
        }
    }

    #[test]
    fn each_header_found_has_its_own_bit() {
        let mut all = 0;
        for (name, bit) in HOP_BY_HOP
            .iter()
            .map(|n| n.as_str())
            .zip((0..8).map(|i| 1 << i))
            .chain([
                ("proxy-connection", PROXY_CONNECTION_BIT),
                ("expect", EXPECT),
            ])
        {
            assert_eq!(
                present(&map(&[(name, "x"), ("x-other", "y")])),
                bit,
                "{name}"
            );
            all |= bit;
        }
        assert_eq!(present(&map(&[("connection", "x")])), CONNECTION);
        assert_eq!(present(&map(&[("upgrade", "x")])), UPGRADE);
        assert_eq!(all, (1 << 10) - 1);
    }

    #[test]
    fn upgrades_keep_their_headers() {
        let mut h = map(&[
            ("connection", "Upgrade"),
            ("upgrade", "websocket"),
            ("sec-websocket-key", "k"),
        ]);
        assert!(wants_upgrade(&h));
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h["upgrade"], "websocket");
        assert_eq!(h["connection"], "upgrade");
        assert_eq!(h["sec-websocket-key"], "k");
        assert!(!wants_upgrade(&map(&[("upgrade", "websocket")])));
    }

    #[test]
    fn names_in_connection_are_matched_whatever_their_case_and_invalid_ones_ignored() {
        let mut h = map(&[
            ("connection", "X-Hop, , bad name, keep-alive"),
            ("connection", "x-second"),
            ("proxy-connection", "X-Third"),
            ("x-hop", "1"),
            ("x-second", "2"),
            ("x-third", "3"),
            ("keep-alive", "timeout=5"),
            ("x-end-to-end", "kept"),
        ]);
        strip_hop_by_hop(&mut h, false);
        assert_eq!(
            h.keys().map(|k| k.as_str()).collect::<Vec<_>>(),
            ["x-end-to-end"]
        );
    }
}
