//! A request's header fields, as the stages read them: a header map (hyper's
//! requests, and any head the fast path cannot keep as it came), or the
//! header lines exactly as the client sent them ([`Lines`]), with the few
//! the proxy reads or drops marked as they were parsed.

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};

use crate::h1::{append_lines, parsed_value};
use crate::headers::is_named;

#[derive(Clone)]
pub enum Fields {
    Map(HeaderMap),
    Lines(Lines),
}

impl Fields {
    /// The value of the first `name` field, if there is one.
    pub fn get(&self, name: Named) -> Option<&[u8]> {
        match self {
            Fields::Map(map) => map.get(name.header()).map(HeaderValue::as_bytes),
            Fields::Lines(lines) => lines.get(name),
        }
    }

    /// [`Fields::get`], as a header value of its own (sharing the head's
    /// bytes).
    pub fn value(&self, name: Named) -> Option<HeaderValue> {
        match self {
            Fields::Map(map) => map.get(name.header()).cloned(),
            Fields::Lines(lines) => lines
                .value_span(name)
                .map(|span| parsed_value(lines.bytes.slice(span))),
        }
    }

    /// The fields as a header map, in their order.
    pub fn into_map(self) -> HeaderMap {
        match self {
            Fields::Map(map) => map,
            Fields::Lines(lines) => lines.into_map(),
        }
    }
}

/// A head's header lines as the client sent them, kept when every line is
/// `name: value` CRLF (the common head): parsing them into a map and writing
/// the map out again was a tenth of the work of a proxied request. The lines
/// named one of [`Named`] are marked as they are parsed, so that the proxy
/// finds those it reads (`Authorization`, `Host`) and drops those it must
/// (`Host`, hop-by-hop, any it sets) without looking at the others again.
#[derive(Clone)]
pub struct Lines {
    /// Every header line, each ending in CRLF; names in the case they came in.
    bytes: Bytes,
    marks: Marks,
}

impl Lines {
    /// `bytes`, every one a header line `name: value` CRLF, with `marks`
    /// where they are (at most `u16::MAX` bytes).
    pub fn new(bytes: Bytes, marks: Marks) -> Lines {
        debug_assert!(bytes.len() <= u16::MAX as usize);
        Lines { bytes, marks }
    }

    /// Every line, each ending in CRLF.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// The marked lines, in order.
    pub fn marks(&self) -> &[Mark] {
        &self.marks.marks[..self.marks.len as usize]
    }

    fn get(&self, name: Named) -> Option<&[u8]> {
        self.value_span(name).map(|span| &self.bytes[span])
    }

    fn value_span(&self, name: Named) -> Option<std::ops::Range<usize>> {
        let mark = self.marks().iter().find(|mark| mark.name == name)?;
        Some(mark.value_start()..mark.end as usize - 2)
    }

    fn into_map(self) -> HeaderMap {
        let mut map = HeaderMap::with_capacity(self.bytes.len() / 16 + crate::headers::ROOM);
        append_lines(self.bytes, &mut map);
        map
    }
}

/// What a request head's header lines make, as httparse parsed them.
pub enum Scanned {
    /// Lines to keep as they came: where they are in the head, and their
    /// marks (relative to the first line).
    Lines(std::ops::Range<usize>, Marks),
    /// Lines to read into a map: not all `name: value` CRLF, too many marked,
    /// a `Proxy-Connection`, or a head too long for a mark's offsets.
    Map,
    /// A header hyper is to serve the request for ([`Named::is_unusual`]).
    Unusual,
}

/// What `headers`, parsed from `head` (whose first byte is at `base`), make.
pub fn scan(headers: &[httparse::Header<'_>], base: usize, head: &[u8]) -> Scanned {
    let offset = |s: &[u8]| s.as_ptr() as usize - base;
    let start = headers
        .first()
        .map_or(head.len() - 2, |h| offset(h.name.as_bytes()));
    let mut kept = head.len() <= u16::MAX as usize;
    let mut marks = Marks::default();
    let mut at = start;
    for h in headers {
        let name = h.name.as_bytes();
        let named = Named::of(name);
        if named.is_some_and(Named::is_unusual) {
            return Scanned::Unusual;
        }
        if !kept {
            continue;
        }
        let value_at = at + name.len() + 2;
        let end = value_at + h.value.len() + 2;
        kept = offset(name) == at
            && head.get(at + name.len()..value_at) == Some(b": ")
            && offset(h.value) == value_at
            && head.get(end - 2..end) == Some(b"\r\n")
            && match named {
                Some(Named::ProxyConnection) => false,
                Some(named) => marks.push(named, at - start, end - start),
                None => true,
            };
        at = end;
    }
    // The blank line ends the head.
    match kept && at + 2 == head.len() {
        true => Scanned::Lines(start..at, marks),
        false => Scanned::Map,
    }
}

/// Where the lines named one of [`Named`] are, in order; at most [`Marks::MAX`].
#[derive(Clone, Default)]
pub struct Marks {
    marks: [Mark; Marks::MAX],
    len: u8,
}

impl Marks {
    /// More marked lines than this (a head sending many `Host`s, say) and
    /// the head is read into a map instead.
    pub const MAX: usize = 8;

    /// Mark the line from `start` to `end` (after its CRLF) as `name`'s;
    /// false if there is no room.
    pub fn push(&mut self, name: Named, start: usize, end: usize) -> bool {
        let Some(mark) = self.marks.get_mut(self.len as usize) else {
            return false;
        };
        *mark = Mark {
            name,
            start: start as u16,
            end: end as u16,
        };
        self.len += 1;
        true
    }
}

/// A marked line: its name, and where it starts and ends (after its CRLF) in
/// [`Lines::as_bytes`].
#[derive(Clone, Copy, Default)]
pub struct Mark {
    pub name: Named,
    pub start: u16,
    pub end: u16,
}

impl Mark {
    fn value_start(&self) -> usize {
        self.start as usize + self.name.as_str().len() + 2
    }
}

/// The header names the proxy reads, drops or sets on a request, and those
/// that send a request to hyper: a name is one of them in any case.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u8)]
pub enum Named {
    #[default]
    Host,
    Authorization,
    ProxyAuthorization,
    ProxyAuthenticate,
    Te,
    Trailer,
    KeepAlive,
    XForwardedFor,
    XForwardedHost,
    XForwardedProto,
    /// It names headers to drop: a head with one is read into a map.
    ProxyConnection,
    // Those that change how a request is read or what its connection does:
    // hyper serves a request that has one.
    Connection,
    Upgrade,
    ContentLength,
    TransferEncoding,
    Expect,
}

/// Each [`Named`]'s header name, in its order.
static NAMES: [HeaderName; 16] = [
    header::HOST,
    header::AUTHORIZATION,
    header::PROXY_AUTHORIZATION,
    header::PROXY_AUTHENTICATE,
    header::TE,
    header::TRAILER,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("x-forwarded-for"),
    HeaderName::from_static("x-forwarded-host"),
    HeaderName::from_static("x-forwarded-proto"),
    HeaderName::from_static("proxy-connection"),
    header::CONNECTION,
    header::UPGRADE,
    header::CONTENT_LENGTH,
    header::TRANSFER_ENCODING,
    header::EXPECT,
];

impl Named {
    /// Every one, in order.
    #[cfg(test)]
    pub const ALL: [Named; 16] = [
        Named::Host,
        Named::Authorization,
        Named::ProxyAuthorization,
        Named::ProxyAuthenticate,
        Named::Te,
        Named::Trailer,
        Named::KeepAlive,
        Named::XForwardedFor,
        Named::XForwardedHost,
        Named::XForwardedProto,
        Named::ProxyConnection,
        Named::Connection,
        Named::Upgrade,
        Named::ContentLength,
        Named::TransferEncoding,
        Named::Expect,
    ];

    /// Which one `name` (in any case) is, if any: by its length first, so a
    /// name that is none of them costs a compare or two.
    pub fn of(name: &[u8]) -> Option<Named> {
        let candidates: &[Named] = match name.len() {
            2 => &[Named::Te],
            4 => &[Named::Host],
            6 => &[Named::Expect],
            7 => &[Named::Upgrade, Named::Trailer],
            10 => &[Named::Connection, Named::KeepAlive],
            13 => &[Named::Authorization],
            14 => &[Named::ContentLength],
            15 => &[Named::XForwardedFor],
            16 => &[Named::XForwardedHost, Named::ProxyConnection],
            17 => &[Named::TransferEncoding, Named::XForwardedProto],
            18 => &[Named::ProxyAuthenticate],
            19 => &[Named::ProxyAuthorization],
            _ => return None,
        };
        candidates
            .iter()
            .copied()
            .find(|candidate| is_named(name, candidate.as_str().as_bytes()))
    }

    /// Its bit in a set of names.
    pub fn bit(self) -> u32 {
        1 << self as u32
    }

    pub fn header(self) -> &'static HeaderName {
        &NAMES[self as usize]
    }

    /// The name in lowercase.
    pub fn as_str(self) -> &'static str {
        self.header().as_str()
    }

    /// Whether a request with this header is hyper's to serve.
    pub fn is_unusual(self) -> bool {
        self >= Named::Connection
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_name_is_found_in_any_case_and_no_other() {
        for (i, named) in Named::ALL.into_iter().enumerate() {
            assert_eq!(named as usize, i);
            let lower = named.as_str();
            assert_eq!(HeaderName::from_bytes(lower.as_bytes()).unwrap(), lower);
            assert_eq!(Named::of(lower.as_bytes()), Some(named));
            assert_eq!(Named::of(lower.to_uppercase().as_bytes()), Some(named));
            let mut odd = lower.as_bytes().to_vec();
            *odd.last_mut().unwrap() ^= 1;
            assert_eq!(Named::of(&odd), None, "{lower}");
        }
        for other in ["accept", "user-agent", "cookie", "x-forwarded-fox", "hosts"] {
            assert_eq!(Named::of(other.as_bytes()), None, "{other}");
        }
    }

    fn lines(text: &'static str) -> Lines {
        let mut marks = Marks::default();
        let mut at = 0;
        for line in text.split_inclusive("\r\n") {
            let name = &line[..line.find(':').unwrap()];
            if let Some(named) = Named::of(name.as_bytes()) {
                assert!(marks.push(named, at, at + line.len()));
            }
            at += line.len();
        }
        Lines::new(Bytes::from_static(text.as_bytes()), marks)
    }

    #[test]
    fn lines_give_what_the_map_of_them_gives() {
        let text = "Host: a.example\r\nUser-Agent: t\r\nauthorization: Bearer x\r\n\
                    HOST: b.example\r\nX-Forwarded-For: 10.0.0.1\r\n";
        let map = Fields::Map(lines(text).into_map());
        let kept = Fields::Lines(lines(text));
        for named in Named::ALL {
            assert_eq!(kept.get(named), map.get(named), "{named:?}");
            assert_eq!(kept.value(named), map.value(named), "{named:?}");
        }
        assert_eq!(kept.get(Named::Host), Some(&b"a.example"[..]));
        let map = map.into_map();
        assert_eq!(map.len(), 5);
        assert_eq!(map["user-agent"], "t");
        assert_eq!(
            map.get_all(header::HOST).iter().collect::<Vec<_>>(),
            ["a.example", "b.example"]
        );
    }

    fn scanned(head: &str) -> Scanned {
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut req = httparse::Request::new(&mut headers);
        let len = match req.parse(head.as_bytes()) {
            Ok(httparse::Status::Complete(len)) => len,
            other => panic!("{head:?}: {other:?}"),
        };
        scan(req.headers, head.as_ptr() as usize, &head.as_bytes()[..len])
    }

    #[test]
    fn a_common_head_is_kept_as_its_lines_with_the_named_ones_marked() {
        let head = "GET / HTTP/1.1\r\nHost: h\r\nUser-Agent: u\r\n\
                    Authorization: Bearer t\r\nTE: trailers\r\n\r\n";
        let Scanned::Lines(span, marks) = scanned(head) else {
            panic!("not kept");
        };
        assert_eq!(&head[span.clone()], &head[16..head.len() - 2]);
        let lines = Lines::new(Bytes::copy_from_slice(head[span].as_bytes()), marks);
        let marked: Vec<_> = lines
            .marks()
            .iter()
            .map(|m| {
                let line = &lines.as_bytes()[m.start as usize..m.end as usize];
                (m.name, std::str::from_utf8(line).unwrap())
            })
            .collect();
        assert_eq!(
            marked,
            [
                (Named::Host, "Host: h\r\n"),
                (Named::Authorization, "Authorization: Bearer t\r\n"),
                (Named::Te, "TE: trailers\r\n"),
            ]
        );
        assert!(matches!(scanned("GET / HTTP/1.1\r\n\r\n"), Scanned::Lines(s, _) if s.is_empty()));
    }

    #[test]
    fn lines_not_as_the_common_head_has_them_are_read_into_a_map() {
        for head in [
            "GET / HTTP/1.1\r\nHost:h\r\n\r\n",
            "GET / HTTP/1.1\r\nHost:  h\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: h \r\n\r\n",
            "GET / HTTP/1.1\r\nHost: h\nA: b\r\n\r\n",
            "GET / HTTP/1.1\r\nA: b\r\n\n",
            "GET / HTTP/1.1\r\nProxy-Connection: keep-alive\r\n\r\n",
            &format!(
                "GET / HTTP/1.1\r\n{}\r\n",
                "Host: h\r\n".repeat(Marks::MAX + 1)
            ),
        ] {
            assert!(matches!(scanned(head), Scanned::Map), "{head:?}");
        }
        let most = format!("GET / HTTP/1.1\r\n{}\r\n", "Host: h\r\n".repeat(Marks::MAX));
        assert!(matches!(scanned(&most), Scanned::Lines(..)));
    }

    #[test]
    fn a_header_that_changes_how_the_request_is_read_is_unusual_in_any_form() {
        for name in [
            "Connection",
            "upgrade",
            "Content-Length",
            "TRANSFER-ENCODING",
            "Expect",
        ] {
            for line in [format!("{name}: x"), format!("{name}:x")] {
                let head = format!("GET / HTTP/1.1\r\nHost: h\r\n{line}\r\n\r\n");
                assert!(matches!(scanned(&head), Scanned::Unusual), "{head:?}");
            }
        }
    }

    #[test]
    fn marks_have_room_for_so_many() {
        let mut marks = Marks::default();
        for i in 0..Marks::MAX {
            assert!(marks.push(Named::Host, i, i + 1));
        }
        assert!(!marks.push(Named::Host, 9, 10));
    }
}
