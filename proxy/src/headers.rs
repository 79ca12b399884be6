//! What both listeners do to a request on its way upstream: hop-by-hop headers
//! stay on their hop (RFC 9110 §7.6.1), upgrades are recognised and kept, the
//! body is streamed under its user's guard.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::{Authority, PathAndQuery};
use http::{Method, Request, Uri, Version};
use hyper::upgrade::OnUpgrade;

use crate::body::{Flow, ProxyBody};
use crate::exchange::Exchange;
use crate::fields::{Fields, Lines, Named};
use crate::gate::StreamGuard;
use crate::inbound::Inbound;
use crate::rescue::ProxyError;

/// A request on its way upstream, kept as the client sent it until it goes
/// out: without a body, as a head written straight from the client's headers
/// ([`Outbound::write_head`]); otherwise as the edited request hyper's client
/// sends ([`Outbound::into_request`]). Either way hop-by-hop headers stay on
/// their hop (an HTTP/1 upgrade's own kept), `Expect` is answered here (hyper
/// sends the `100` when the body is first read), `Host` names the upstream,
/// and each header the caller [`set`](Outbound::set) replaces the client's of
/// its name.
pub struct Outbound {
    method: Method,
    target: OutboundTarget,
    /// The client's, unedited.
    fields: Fields,
    /// What [`present`] found in `fields`.
    present: u16,
    host: HeaderValue,
    set: Vec<(Named, HeaderValue)>,
    /// The client the request's `X-Forwarded-*` say it came from, if it is
    /// to carry them ([`Outbound::forward`]).
    forwarding: Option<Forwarding>,
    /// The client's body, if it has one: on the heap, as the request
    /// future moves an `Outbound` and most requests have none.
    body: Option<Box<ProxyBody>>,
    /// Whether the request asks for an upgrade (its headers for it kept).
    upgrade: bool,
    /// The client's side of that upgrade.
    pub client_upgrade: Option<OnUpgrade>,
}

/// Headers a proxied request may gain on its way: `Host`, and on ingress the
/// three `X-Forwarded-*`. A head the fast path parses has room for them, so
/// its map never grows when hyper's client sends it.
pub const ROOM: usize = 4;

impl Outbound {
    /// `req` for `target` (origin-form) on the upstream `host`, HTTP/1.1; a
    /// body is streamed under `guard`, its bytes counted in `exchange`.
    pub fn of(
        mut req: Box<Inbound>,
        target: OutboundTarget,
        host: HeaderValue,
        guard: &StreamGuard,
        exchange: &mut Exchange,
    ) -> Outbound {
        // One pass over the names finds what is to go; a header looked up
        // only when it is there (most requests carry none of them).
        let present = present_in(&req.fields);
        let upgrade = req.version < Version::HTTP_2
            && present & (UPGRADE | CONNECTION) == UPGRADE | CONNECTION
            && matches!(&req.fields, Fields::Map(map) if wants_upgrade(map));
        let client_upgrade = upgrade.then(|| req.on_upgrade());
        if let (Version::HTTP_2, Fields::Map(map)) = (req.version, &mut req.fields) {
            join_cookies(map);
        }
        let body = match req.body.is_end_stream() {
            true => None,
            false => Some(Box::new(ProxyBody::guarded(
                req.body,
                guard.clone(),
                Flow::FromClient(exchange.upload_counter()),
            ))),
        };
        Outbound {
            method: req.method,
            target,
            fields: req.fields,
            present,
            host,
            set: Vec::new(),
            forwarding: None,
            body,
            upgrade,
            client_upgrade,
        }
    }

    /// Send `value` as the request's only `name` header. At most
    /// [`ROOM`] − 1 names.
    pub fn set(&mut self, name: Named, value: HeaderValue) {
        debug_assert!(self.set.len() < ROOM - 1 && name != Named::Host);
        if self.set.capacity() == 0 {
            self.set.reserve_exact(ROOM - 1);
        }
        self.set.push((name, value));
    }

    /// Send the `X-Forwarded-*` headers of a request from `client`, each in
    /// place of any the client sent: `X-Forwarded-For`, the client's address
    /// after the first `X-Forwarded-For` it sent (if that is text);
    /// `X-Forwarded-Proto`, its scheme; `X-Forwarded-Host`, the host it asked
    /// for: its `Host`, else `authority`, the one its target named (HTTP/2).
    /// Written with the head from the client's own fields; made as header
    /// values only for hyper's client.
    pub fn forward(&mut self, client: Forwarding, authority: Option<&Authority>) {
        if self.fields.get(Named::Host).is_none() {
            if let Some(host) = authority.and_then(|a| HeaderValue::from_str(a.as_str()).ok()) {
                self.set(Named::XForwardedHost, host);
            }
        }
        self.forwarding = Some(client);
    }

    /// The client's `X-Forwarded-For` (the first, if it sent several), if it
    /// is text; looked up only if it sent one.
    fn prior_forwarded_for(&self) -> Option<HeaderValue> {
        match self.present & FORWARDED_FOR {
            0 => None,
            _ => self
                .fields
                .value(Named::XForwardedFor)
                .filter(|v| v.to_str().is_ok()),
        }
    }

    /// The names whose client headers go, as they are sent here
    /// ([`Outbound::set`], [`Outbound::forward`]): a bit per [`Named`].
    fn replaced(&self) -> u32 {
        let set = self.set.iter().fold(0, |bits, (name, _)| bits | name.bit());
        let forwarded = match self.forwarding {
            None => 0,
            Some(_) => {
                let host = match self.fields.get(Named::Host) {
                    Some(_) => Named::XForwardedHost.bit(),
                    None => 0,
                };
                Named::XForwardedFor.bit() | Named::XForwardedProto.bit() | host
            }
        };
        set | forwarded
    }

    pub fn method(&self) -> &Method {
        &self.method
    }

    /// Whether the request goes without a body, and asks for no upgrade:
    /// its head is all there is to send ([`Outbound::write_head`]).
    pub fn is_head_only(&self) -> bool {
        self.body.is_none() && !self.upgrade
    }

    /// Write the request's head into `out`, as hyper's client writes the
    /// request [`Outbound::into_request`] makes (request line, `Host`, the
    /// client's headers in their order but for those that go, then those
    /// [`set`](Outbound::set); names in lowercase). Only for a request that
    /// [`is_head_only`](Outbound::is_head_only): an upgrade keeps headers this
    /// drops.
    pub fn write_head(&self, out: &mut Vec<u8>) {
        let target = self.target.as_str().as_bytes();
        let set: usize = self
            .set
            .iter()
            .map(|(n, v)| n.as_str().len() + v.len() + 4)
            .sum();
        let fields = match &self.fields {
            Fields::Lines(lines) => lines.as_bytes().len(),
            Fields::Map(map) => map
                .iter()
                .map(|(n, v)| n.as_str().len() + v.len() + 4)
                .sum(),
        };
        let forwarded = match &self.forwarding {
            Some(client) => {
                80 + client.peer.len() + self.fields.get(Named::Host).map_or(0, <[u8]>::len)
            }
            None => 0,
        };
        out.reserve(
            self.method.as_str().len()
                + target.len()
                + self.host.len()
                + fields
                + set
                + forwarded
                + 24,
        );
        out.extend_from_slice(self.method.as_str().as_bytes());
        out.push(b' ');
        out.extend_from_slice(target);
        out.extend_from_slice(b" HTTP/1.1\r\nhost: ");
        out.extend_from_slice(self.host.as_bytes());
        out.extend_from_slice(b"\r\n");
        let replaced = self.replaced();
        match &self.fields {
            Fields::Lines(lines) => write_lines(lines, replaced, out),
            Fields::Map(map) => self.write_map(map, replaced, out),
        }
        for (name, value) in &self.set {
            write_line(name.as_str(), value.as_bytes(), out);
        }
        if let Some(client) = &self.forwarding {
            self.write_forwarded(client, out);
        }
        out.extend_from_slice(b"\r\n");
    }

    /// The client's headers in their order, but for those that go; names in
    /// lowercase.
    fn write_map(&self, map: &HeaderMap, replaced: u32, out: &mut Vec<u8>) {
        // Names the `Connection` headers give: looked up once (each a hash
        // probe, as for their removal), not once per header.
        let named = match self.present & (CONNECTION | PROXY_CONNECTION_BIT) {
            0 => Vec::new(),
            _ => named_by_connection(map),
        };
        let goes = |name: &HeaderName| {
            *name == header::HOST
                || (replaced != 0
                    && Named::of(name.as_str().as_bytes()).is_some_and(|n| replaced & n.bit() != 0))
                || (self.present & !FORWARDED_FOR != 0
                    && (is_hop_by_hop(name) || named.contains(name)))
        };
        for (name, value) in map.iter().filter(|(name, _)| !goes(name)) {
            write_line(name.as_str(), value.as_bytes(), out);
        }
    }

    /// The `X-Forwarded-*` headers for `client` ([`Outbound::forward`]), as
    /// header values.
    fn forwarded(&self, client: &Forwarding) -> [Option<(Named, HeaderValue)>; 3] {
        let for_ = match self.prior_forwarded_for() {
            Some(prior) => {
                let mut text = Vec::with_capacity(prior.len() + 2 + client.peer.len());
                text.extend_from_slice(prior.as_bytes());
                text.extend_from_slice(b", ");
                text.extend_from_slice(client.peer.as_bytes());
                HeaderValue::from_maybe_shared(bytes::Bytes::from(text))
                    .expect("a header value, a comma and ip text make a header value")
            }
            None => client.peer.clone(),
        };
        [
            Some((Named::XForwardedFor, for_)),
            Some((
                Named::XForwardedProto,
                HeaderValue::from_static(client.scheme()),
            )),
            self.fields
                .value(Named::Host)
                .map(|host| (Named::XForwardedHost, host)),
        ]
    }

    /// The `X-Forwarded-*` lines for `client` ([`Outbound::forward`]).
    fn write_forwarded(&self, client: &Forwarding, out: &mut Vec<u8>) {
        out.extend_from_slice(b"x-forwarded-for: ");
        if let Some(prior) = self.prior_forwarded_for() {
            out.extend_from_slice(prior.as_bytes());
            out.extend_from_slice(b", ");
        }
        out.extend_from_slice(client.peer.as_bytes());
        out.extend_from_slice(b"\r\nx-forwarded-proto: ");
        out.extend_from_slice(client.scheme().as_bytes());
        out.extend_from_slice(b"\r\n");
        if let Some(host) = self.fields.get(Named::Host) {
            write_line("x-forwarded-host", host, out);
        }
    }

    /// The request as hyper's client is to send it, its headers edited.
    pub fn into_request(self) -> Result<Request<ProxyBody>, ProxyError> {
        let forwarded = self
            .forwarding
            .as_ref()
            .map(|client| self.forwarded(client));
        let target = self.target.into_uri()?;
        let mut headers = self.fields.into_map();
        strip_present(&mut headers, self.present, self.upgrade);
        if self.present & EXPECT != 0 {
            headers.remove(header::EXPECT);
        }
        // The map, sized by the parser for what it read, grows once here
        // rather than on each insert (an insert makes room first, even for a
        // name already there).
        headers.reserve(ROOM);
        for (name, value) in forwarded.into_iter().flatten().flatten() {
            headers.insert(name.header().clone(), value);
        }
        headers.insert(header::HOST, self.host);
        for (name, value) in self.set {
            headers.insert(name.header().clone(), value);
        }
        let mut request = Request::new(self.body.map_or(ProxyBody::Empty, |body| *body));
        *request.method_mut() = self.method;
        *request.uri_mut() = target;
        *request.version_mut() = Version::HTTP_11;
        *request.headers_mut() = headers;
        Ok(request)
    }
}

/// Where a request goes on its upstream, in origin-form.
pub enum OutboundTarget {
    /// One parsed already (egress: the client's own path and query).
    Parsed(PathAndQuery),
    /// Text cut from a parsed target (ingress: the path after the route and
    /// the query), a target by construction: written as it is, and parsed only
    /// for hyper's client.
    Cut(String),
}

impl OutboundTarget {
    fn as_str(&self) -> &str {
        match self {
            OutboundTarget::Parsed(path) => path.as_str(),
            OutboundTarget::Cut(text) => text,
        }
    }

    fn into_uri(self) -> Result<Uri, ProxyError> {
        match self {
            OutboundTarget::Parsed(path) => Ok(Uri::from(path)),
            OutboundTarget::Cut(text) => {
                Uri::try_from(text).map_err(|_| ProxyError::BadRequest("invalid path"))
            }
        }
    }
}

/// An HTTP/2 client may send its cookies as one `Cookie` field each (RFC 9113
/// §8.2.3); an HTTP/1.1 upstream gets them as one, joined with "; ". The
/// joined value is no longer than the fields it replaces, which the head's
/// size limit bounds.
fn join_cookies(headers: &mut HeaderMap) {
    let mut cookies = headers.get_all(header::COOKIE).iter();
    let (Some(first), Some(_)) = (cookies.next(), cookies.next()) else {
        return;
    };
    let mut joined = first.as_bytes().to_vec();
    for cookie in headers.get_all(header::COOKIE).iter().skip(1) {
        joined.extend_from_slice(b"; ");
        joined.extend_from_slice(cookie.as_bytes());
    }
    // Valid values joined by "; " make a valid value.
    if let Ok(joined) = HeaderValue::from_maybe_shared(bytes::Bytes::from(joined)) {
        headers.insert(header::COOKIE, joined);
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
/// order), then `Proxy-Connection`, `Expect` and `X-Forwarded-For`.
const CONNECTION: u16 = 1;
const UPGRADE: u16 = 1 << 6;
const PROXY_CONNECTION_BIT: u16 = 1 << 8;
const EXPECT: u16 = 1 << 9;
const FORWARDED_FOR: u16 = 1 << 10;

/// Whether `name`, as it came (in any case), is one of [`HOP_BY_HOP`] or
/// `Proxy-Connection`: a header [`strip_hop_by_hop`] removes by its name.
pub(crate) fn names_hop_by_hop(name: &[u8]) -> bool {
    HOP_BY_HOP
        .iter()
        .chain([&PROXY_CONNECTION])
        .any(|h| is_named(name, h.as_str().as_bytes()))
}

/// Whether `name`, a token, is `lower` (lowercase letters and dashes) in any
/// case: setting a token's 0x20 bit makes a letter lowercase and leaves a
/// dash as it is (the other byte it maps to a dash is CR, no token's).
pub(crate) fn is_named(name: &[u8], lower: &[u8]) -> bool {
    name.len() == lower.len() && name.iter().zip(lower).all(|(&b, &l)| b | 0x20 == l)
}

/// Whether `name` is one of [`HOP_BY_HOP`], `Proxy-Connection` or `Expect`.
fn is_hop_by_hop(name: &HeaderName) -> bool {
    HOP_BY_HOP.contains(name) || *name == PROXY_CONNECTION || *name == header::EXPECT
}

/// The headers of `headers` that its `Connection` and `Proxy-Connection`
/// headers name, each once.
fn named_by_connection(headers: &HeaderMap) -> Vec<HeaderName> {
    let mut named: Vec<HeaderName> = Vec::new();
    let tokens = headers
        .get_all(header::CONNECTION)
        .iter()
        .chain(headers.get_all(PROXY_CONNECTION).iter())
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim);
    for token in tokens {
        // A token that is no header name names nothing: found by text, it
        // finds no header (and allocates no name to look it up).
        if headers.contains_key(token) {
            if let Ok(name) = HeaderName::from_bytes(token.as_bytes()) {
                if !named.contains(&name) {
                    named.push(name);
                }
            }
        }
    }
    named
}

/// The client's lines as they came, but for the marked ones that go: `Host`,
/// hop-by-hop, and those `replaced` (a bit per [`Named`]).
fn write_lines(lines: &Lines, replaced: u32, out: &mut Vec<u8>) {
    let bytes = lines.as_bytes();
    let mut at = 0;
    for mark in lines.marks() {
        let goes = mark.name == Named::Host
            || bit_of(mark.name) & !FORWARDED_FOR != 0
            || replaced & mark.name.bit() != 0;
        if goes {
            out.extend_from_slice(&bytes[at..mark.start as usize]);
            at = mark.end as usize;
        }
    }
    out.extend_from_slice(&bytes[at..]);
}

fn write_line(name: &str, value: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// The client a request's `X-Forwarded-*` name ([`Outbound::forward`]).
pub struct Forwarding {
    /// Its address as text.
    pub peer: HeaderValue,
    /// Whether it came over TLS.
    pub tls: bool,
}

impl Forwarding {
    fn scheme(&self) -> &'static str {
        match self.tls {
            true => "https",
            false => "http",
        }
    }
}

/// [`present`] for either form of fields: the lines' from their marks.
fn present_in(fields: &Fields) -> u16 {
    match fields {
        Fields::Map(map) => present(map),
        Fields::Lines(lines) => lines.marks().iter().fold(0, |p, m| p | bit_of(m.name)),
    }
}

/// `name`'s bit in [`present`]'s answer (none for most).
fn bit_of(name: Named) -> u16 {
    match name {
        Named::Connection => CONNECTION,
        Named::ProxyAuthorization => 1 << 1,
        Named::ProxyAuthenticate => 1 << 2,
        Named::Te => 1 << 3,
        Named::Trailer => 1 << 4,
        Named::TransferEncoding => 1 << 5,
        Named::Upgrade => UPGRADE,
        Named::KeepAlive => 1 << 7,
        Named::ProxyConnection => PROXY_CONNECTION_BIT,
        Named::Expect => EXPECT,
        Named::XForwardedFor => FORWARDED_FOR,
        Named::Host
        | Named::Authorization
        | Named::XForwardedHost
        | Named::XForwardedProto
        | Named::ContentLength => 0,
    }
}

/// Which of [`HOP_BY_HOP`], `Proxy-Connection`, `Expect` and
/// `X-Forwarded-For` `headers` carries, from one pass over its names.
fn present(headers: &HeaderMap) -> u16 {
    let mut present = 0;
    for name in headers.keys() {
        if let Some(i) = HOP_BY_HOP.iter().position(|h| h == name) {
            present |= 1 << i;
        } else if *name == PROXY_CONNECTION {
            present |= PROXY_CONNECTION_BIT;
        } else if *name == header::EXPECT {
            present |= EXPECT;
        } else if name == Named::XForwardedFor.header() {
            present |= FORWARDED_FOR;
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
    if present & !(EXPECT | FORWARDED_FOR) == 0 {
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
    use std::collections::BTreeMap;
    use std::sync::Arc;

    use proptest::prelude::*;
    use uuid::Uuid;

    use super::*;
    use crate::body::RequestBody;
    use crate::decision_log::DecisionLog;
    use crate::fields::Marks;
    use crate::gate::UserGate;
    use crate::telemetry::Listener;

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

    /// Names a generated request's headers are drawn from: hop-by-hop ones,
    /// those a proxy replaces, and end-to-end ones.
    const NAMES: [&str; 14] = [
        "host",
        "connection",
        "proxy-connection",
        "keep-alive",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "expect",
        "x-forwarded-for",
        "x-forwarded-host",
        "authorization",
        "x-one",
        "x-two",
    ];

    /// Values, among them what `Connection` may name (any case, invalid
    /// names, empty items).
    fn value() -> impl Strategy<Value = String> {
        prop::collection::vec(
            prop::sample::select(vec![
                "keep-alive",
                "close",
                "X-One",
                "x-two",
                "Authorization",
                "HOST",
                "x-forwarded-for",
                "bad name",
                "",
                "TE",
                "x-absent",
                "upgrade",
            ]),
            1..4,
        )
        .prop_map(|items| items.join(", "))
    }

    /// A head as lines: the request line, then each header's values under
    /// its name (in lowercase), in order (the order of different names
    /// carries no meaning, RFC 9110 §5.3).
    fn lines(head: &[u8]) -> (String, BTreeMap<String, Vec<String>>) {
        let head = std::str::from_utf8(head).unwrap();
        let head = head
            .strip_suffix("\r\n\r\n")
            .expect("a head ends with an empty line");
        let mut lines = head.split("\r\n");
        let start = lines.next().unwrap().to_owned();
        let mut headers: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for line in lines {
            let (name, value) = line.split_once(": ").unwrap();
            headers
                .entry(name.to_ascii_lowercase())
                .or_default()
                .push(value.to_owned());
        }
        (start, headers)
    }

    /// `req` on its way to `target` on the upstream `host`.
    fn outbound_of(req: impl Into<Inbound>, target: &str, host: &'static str) -> Outbound {
        let req = req.into();
        let gate = Arc::new(UserGate::new(Uuid::new_v4(), None));
        let mut exchange = Exchange::begin(Listener::Ingress, &req, &DecisionLog::off());
        Outbound::of(
            Box::new(req),
            OutboundTarget::Cut(target.into()),
            HeaderValue::from_static(host),
            &StreamGuard::new(&gate, None),
            &mut exchange,
        )
    }

    /// The head `outbound` goes out with, written from the client's headers,
    /// after checking that it is the edited request's.
    fn written(outbound: Outbound) -> Vec<u8> {
        let mut written = Vec::new();
        outbound.write_head(&mut written);
        let mut edited = Vec::new();
        crate::h1::encode_head(&outbound.into_request().unwrap(), &mut edited);
        assert_eq!(lines(&written), lines(&edited));
        written
    }

    /// Each of `set` (indices of the `X-Forwarded-*` names) set to "set";
    /// or, with `forward` (whether the client came over TLS), all three made
    /// for a client at 192.0.2.9.
    fn edit(outbound: &mut Outbound, set: &[usize], forward: Option<bool>) {
        let settable = [
            Named::XForwardedFor,
            Named::XForwardedProto,
            Named::XForwardedHost,
        ];
        match forward {
            Some(tls) => {
                let peer = HeaderValue::from_static("192.0.2.9");
                outbound.forward(Forwarding { peer, tls }, None);
            }
            None => {
                for &i in set {
                    outbound.set(settable[i], HeaderValue::from_static("set"));
                }
            }
        }
    }

    fn outbound(
        method: &str,
        headers: &[(usize, String)],
        set: &[usize],
        forward: Option<bool>,
    ) -> Outbound {
        let mut req = Request::new(RequestBody::Empty);
        *req.method_mut() = Method::from_bytes(method.as_bytes()).unwrap();
        *req.uri_mut() = "/agents/x/gateway/a?b=c".parse().unwrap();
        for (name, value) in headers {
            req.headers_mut().append(
                HeaderName::from_static(NAMES[*name]),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        let mut outbound = outbound_of(req, "/a?b=c", "10.0.0.1:18789");
        edit(&mut outbound, set, forward);
        outbound
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// The head written from the client's headers is the one the edited
        /// request goes out with, header for header.
        #[test]
        fn a_head_written_from_the_clients_headers_is_the_edited_requests(
            method in prop::sample::select(vec!["GET", "DELETE", "OPTIONS", "PURGE"]),
            headers in prop::collection::vec((0..NAMES.len(), value()), 0..10),
            set in prop::sample::subsequence(vec![0usize, 1, 2], 0..=3),
            forward in prop::option::of(any::<bool>()),
        ) {
            let outbound = outbound(method, &headers, &set, forward);
            prop_assume!(outbound.is_head_only());
            written(outbound);
        }
    }

    /// `headers` as a client's HTTP/1.1 head, read by the fast path: twice,
    /// its fields once kept as lines and once in a map; `None` if the fast
    /// path would not keep them as lines.
    fn read_twice(
        headers: &[(usize, String)],
        set: &[usize],
        forward: Option<bool>,
    ) -> Option<(Outbound, Outbound)> {
        let mut wire = String::from("GET /agents/x/gateway/a?b=c HTTP/1.1\r\n");
        for (name, value) in headers {
            wire.push_str(&format!("{}: {value}\r\n", NAMES[*name]));
        }
        wire.push_str("\r\n");
        let read = || match crate::h1_server::parse_request(&mut wire.as_str().into()) {
            crate::h1_server::Parsed::Request(req) => Some(*req),
            _ => None,
        };
        let (kept, mut mapped) = (read()?, read()?);
        if !matches!(kept.fields, Fields::Lines(_)) {
            return None;
        }
        mapped.fields = Fields::Map(mapped.fields.into_map());
        let outbound = |req| {
            let mut outbound = outbound_of(req, "/a?b=c", "10.0.0.1:18789");
            edit(&mut outbound, set, forward);
            outbound
        };
        Some((outbound(kept), outbound(mapped)))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// A client's header lines kept as they came go upstream as the map
        /// of them does, header for header (the names here are in
        /// lowercase, as the map writes them).
        #[test]
        fn kept_lines_go_out_as_their_map_does(
            // All but those that send the request to hyper, or into a map.
            headers in prop::collection::vec(
                (prop::sample::select(vec![0usize, 3, 4, 5, 9, 10, 11, 12, 13]), value()),
                0..=Marks::MAX,
            ),
            set in prop::sample::subsequence(vec![0usize, 1, 2], 0..=3),
            forward in prop::option::of(any::<bool>()),
        ) {
            // A value with blanks around it is not kept as it came.
            let plain = headers.iter().all(|(_, v)| !v.is_empty() && v.trim() == v);
            let Some((kept, mapped)) = read_twice(&headers, &set, forward) else {
                prop_assert!(!plain, "not kept as lines");
                return Ok(());
            };
            prop_assert!(kept.is_head_only() && mapped.is_head_only());
            let (mut from_lines, mut from_map) = (Vec::new(), Vec::new());
            kept.write_head(&mut from_lines);
            mapped.write_head(&mut from_map);
            // The map's order of different names is its own (RFC 9110 §5.3).
            prop_assert_eq!(lines(&from_lines), lines(&written(mapped)));
            prop_assert_eq!(lines(&written(kept)), lines(&from_map));
        }
    }

    /// A marked line's bit is the one `present` finds for its name in a map.
    #[test]
    fn each_named_header_has_the_bit_present_finds_for_it() {
        for named in Named::ALL {
            let mut map = HeaderMap::new();
            map.insert(named.header().clone(), HeaderValue::from_static("x"));
            assert_eq!(bit_of(named), present(&map), "{named:?}");
        }
    }

    #[test]
    fn a_common_clients_lines_are_kept_and_go_out_in_their_own_case() {
        let mut wire = bytes::BytesMut::from(
            "GET /agents/x/gateway/a HTTP/1.1\r\nHost: client.example\r\nUser-Agent: t\r\n\
             Authorization: Bearer k\r\nTE: trailers\r\nX-Forwarded-For: 198.51.100.7\r\n\
             proxy-authorization: Basic c2VjcmV0\r\n\r\n",
        );
        let crate::h1_server::Parsed::Request(req) = crate::h1_server::parse_request(&mut wire)
        else {
            panic!("the fast path serves it");
        };
        assert!(matches!(req.fields, Fields::Lines(_)));
        let mut outbound = outbound_of(*req, "/a", "10.0.0.1:18789");
        let peer = HeaderValue::from_static("10.1.1.1");
        outbound.forward(Forwarding { peer, tls: true }, None);
        assert_eq!(
            String::from_utf8(written(outbound)).unwrap(),
            "GET /a HTTP/1.1\r\nhost: 10.0.0.1:18789\r\nUser-Agent: t\r\n\
             Authorization: Bearer k\r\nx-forwarded-for: 198.51.100.7, 10.1.1.1\r\n\
             x-forwarded-proto: https\r\nx-forwarded-host: client.example\r\n\r\n"
        );
    }

    #[test]
    fn a_head_goes_out_with_host_first_and_without_what_connection_names() {
        let outbound = outbound(
            "GET",
            &[
                (11, "Bearer k".into()),
                (0, "client.example".into()),
                (1, "keep-alive, X-One".into()),
                (12, "1".into()),
                (13, "2".into()),
                (9, "198.51.100.7".into()),
            ],
            &[0],
            None,
        );
        let mut written = Vec::new();
        outbound.write_head(&mut written);
        assert_eq!(
            String::from_utf8(written).unwrap(),
            "GET /a?b=c HTTP/1.1\r\nhost: 10.0.0.1:18789\r\nauthorization: Bearer k\r\n\
             x-two: 2\r\nx-forwarded-for: set\r\n\r\n"
        );
    }

    /// The head of a `version` request with `headers`, as it goes upstream.
    fn written_for(version: Version, headers: &[(&'static str, &'static str)]) -> String {
        let mut req = Request::new(RequestBody::Empty);
        *req.version_mut() = version;
        for (name, value) in headers {
            req.headers_mut()
                .append(*name, HeaderValue::from_static(value));
        }
        String::from_utf8(written(outbound_of(req, "/", "gw"))).unwrap()
    }

    #[test]
    fn an_http2_clients_cookies_go_upstream_as_one_header() {
        let cookies = [("cookie", "a=1"), ("x-other", "o"), ("cookie", "b=2; c=3")];
        assert_eq!(
            written_for(Version::HTTP_2, &cookies),
            "GET / HTTP/1.1\r\nhost: gw\r\ncookie: a=1; b=2; c=3\r\nx-other: o\r\n\r\n"
        );
        assert_eq!(
            written_for(Version::HTTP_2, &cookies[..2]),
            "GET / HTTP/1.1\r\nhost: gw\r\ncookie: a=1\r\nx-other: o\r\n\r\n",
            "a single cookie field goes as it is"
        );
        assert_eq!(
            written_for(Version::HTTP_11, &cookies),
            "GET / HTTP/1.1\r\nhost: gw\r\ncookie: a=1\r\ncookie: b=2; c=3\r\nx-other: o\r\n\r\n",
            "an HTTP/1.1 client's lines are its own"
        );
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
        assert_eq!(present(&map(&[("x-forwarded-for", "x")])), FORWARDED_FOR);
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
