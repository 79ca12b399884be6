//! Bodiless HTTP/1.1 exchanges upstream, driven by the task that asks for them
//! (the common case on both listeners: a GET with nothing to upload).
//!
//! hyper's client runs each connection as a task of its own and hands requests,
//! responses and body frames to it and back through channels: several task
//! wake-ups and moves per exchange. Here the request's own task writes the head
//! in one write, reads the response head in place, and its response body reads
//! straight from the socket as the client takes it. The connection goes back to
//! the pool the moment the body's last byte is read, not before: an idle
//! [`Link`] holds no unread bytes.
//!
//! What is read follows RFC 9112 §6.3: no body after `HEAD`, `1xx`, `204` and
//! `304`; chunked when `Transfer-Encoding` ends in `chunked`; else the
//! `Content-Length` (one value, or several equal ones); else to the close. Any
//! other framing, an oversized head, or bytes past the end of a response are
//! errors, and the connection is not reused: gateways are the tenants' own.

use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::time::{Instant, Sleep};

use crate::body::{BoxError, KeptLines, Source};
use crate::headers::{is_named, names_hop_by_hop};

/// Largest response head, bytes (hyper's client allowed as much).
pub const MAX_HEAD: usize = 64 * 1024;
/// Most headers in a response head.
const MAX_HEADERS: usize = 100;
/// Bytes asked for per read; body frames are at most this large.
const READ_CHUNK: usize = 16 * 1024;
/// Longest chunk-size line, extensions included.
const MAX_CHUNK_LINE: usize = 4 * 1024;
/// Most trailer bytes after the last chunk (read and dropped).
const MAX_TRAILERS: usize = 16 * 1024;

/// An HTTP/1.1 connection upstream with no exchange under way. On the heap,
/// once for the connection's life: a link moves at every step of an exchange
/// (out of the pool, into the exchange, into the response body, back), and a
/// pointer moves in a register where its hundred-odd bytes took a copy each.
pub struct Link<I>(Box<Wire<I>>);

/// What a link holds: the socket, the bytes read from it and not yet taken,
/// and its timer.
struct Wire<I> {
    io: I,
    buf: BytesMut,
    /// Bounds each exchange's wait for its response head: one timer for the
    /// connection's life, set on its first exchange and moved on lazily
    /// ([`until`]).
    timer: Option<Pin<Box<Sleep>>>,
}

impl<I: AsyncRead + AsyncWrite + Unpin> Link<I> {
    pub fn new(io: I) -> Self {
        Link(Box::new(Wire {
            io,
            buf: BytesMut::new(),
            timer: None,
        }))
    }

    /// The socket, for a hyper connection to take over.
    pub fn into_io(self) -> I {
        self.0.io
    }

    /// Whether the peer closed, failed, or sent something unasked since the
    /// link went idle: it cannot carry another exchange. Costs no system call
    /// while the runtime knows the socket has nothing to read.
    pub fn is_stale(&mut self) -> bool {
        let mut probe = [0u8; 1];
        let mut probe = ReadBuf::new(&mut probe);
        let mut cx = Context::from_waker(Waker::noop());
        Pin::new(&mut self.0.io)
            .poll_read(&mut cx, &mut probe)
            .is_ready()
    }

    /// Write `head` (a whole request head, no body follows) and read the
    /// response head. `Err(Unanswered)` when the connection closed before any
    /// byte of a response: on a reused connection, the peer closed it while it
    /// was idle, and the request may be sent again on a fresh one.
    /// `Err(TimedOut)` when no response head has come by `due`.
    pub async fn exchange(
        mut self,
        head: &[u8],
        method: &Method,
        due: Instant,
    ) -> Result<Answer<I>, Failure> {
        let mut timer = match self.0.timer.take() {
            Some(timer) => timer,
            None => Box::pin(tokio::time::sleep_until(due)),
        };
        let answered = tokio::select! {
            biased;
            answered = self.answer(head, method) => answered,
            () = until(timer.as_mut(), due) => Err(Failure::TimedOut),
        };
        self.0.timer = Some(timer);
        let (head, framing, keep) = answered?;
        Ok(Answer {
            head,
            body: Reading {
                link: Some(self),
                framing,
                keep,
            },
        })
    }

    /// The response head to `head`, how its body is framed, and whether the
    /// connection carries another exchange after it.
    async fn answer(
        &mut self,
        head: &[u8],
        method: &Method,
    ) -> Result<(ResponseHead, Framing, bool), Failure> {
        let wire = &mut *self.0;
        wire.io.write_all(head).await.map_err(Failure::Unanswered)?;
        wire.io.flush().await.map_err(Failure::Unanswered)?;
        let mut parsed = loop {
            let parsed = match wire.buf.is_empty() {
                // An idle link holds no bytes: nothing to parse before a read.
                true => None,
                false => parse_head(&mut wire.buf)?,
            };
            if let Some(parsed) = parsed {
                let status = parsed.status;
                // Interim responses (100, 103): the final one follows.
                if status.is_informational() {
                    if status == StatusCode::SWITCHING_PROTOCOLS {
                        return Err(Failure::invalid("101 to a request without an upgrade"));
                    }
                    continue;
                }
                break parsed;
            }
            if wire.buf.len() >= MAX_HEAD {
                return Err(Failure::invalid("response head too large"));
            }
            let started = !wire.buf.is_empty();
            match read(&mut wire.io, &mut wire.buf, READ_CHUNK).await {
                Ok(0) if !started => return Err(Failure::Unanswered(closed())),
                Ok(0) => return Err(Failure::Broken(closed())),
                Ok(_) => {}
                Err(e) if !started => return Err(Failure::Unanswered(e)),
                Err(e) => return Err(Failure::Broken(e)),
            }
        };
        let framing = Framing::of(method, &parsed)?;
        if parsed.has(TRANSFER_ENCODING) && parsed.has(CONTENT_LENGTH) {
            // The transfer coding overrides a length, which must not be
            // forwarded with the decoded body (RFC 9112 §6.3). (Kept lines
            // never have a transfer coding.)
            if let Fields::Map(map) = &mut parsed.fields {
                map.remove(header::CONTENT_LENGTH);
            }
        }
        let keep = framing != Framing::Close && keeps_alive(&parsed);
        Ok((parsed, framing, keep))
    }
}

/// Resolves once `due` has come, on `timer`, a timer kept for a connection's
/// life: set again only when it goes off before `due`, or is set for after
/// it. A timer per exchange would go into the runtime's timer wheel and out
/// again for every request on a busy connection; moving the time it is due
/// is a clock read.
pub async fn until(mut timer: Pin<&mut Sleep>, due: Instant) {
    if timer.deadline() > due {
        timer.as_mut().reset(due);
    }
    loop {
        timer.as_mut().await;
        if timer.deadline() >= due {
            return;
        }
        timer.as_mut().reset(due);
    }
}

/// Why an exchange failed.
#[derive(Debug)]
pub enum Failure {
    /// Nothing of a response arrived before the connection closed or failed.
    Unanswered(io::Error),
    /// The connection failed after part of a response.
    Broken(io::Error),
    /// No response head came in time.
    TimedOut,
}

impl Failure {
    fn invalid(what: &'static str) -> Failure {
        Failure::Broken(io::Error::new(io::ErrorKind::InvalidData, what))
    }

    pub fn into_io(self) -> io::Error {
        match self {
            Failure::Unanswered(e) | Failure::Broken(e) => e,
            Failure::TimedOut => io::ErrorKind::TimedOut.into(),
        }
    }
}

fn closed() -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        "connection closed before the response ended",
    )
}

/// A response head, and its body still to be read from the connection.
pub struct Answer<I> {
    pub head: ResponseHead,
    pub body: Reading<I>,
}

impl<I> Answer<I>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    /// The response, its body carrying the head's kept lines, and giving its
    /// connection to `release` as [`Reading::into_body`] does.
    pub fn into_response(self, release: Release<I>) -> Response<Source> {
        let (head, lines) = self.head.into_parts();
        let body = self.body.streamed(release, lines);
        head.map(|()| body)
    }
}

/// Read what `io` has into `buf`, growing it by `chunk` bytes when less
/// than a quarter of that is free.
pub(crate) async fn read<I: AsyncRead + Unpin>(
    io: &mut I,
    buf: &mut BytesMut,
    chunk: usize,
) -> io::Result<usize> {
    std::future::poll_fn(|cx| poll_read(Pin::new(&mut *io), cx, buf, chunk)).await
}

fn poll_read<I: AsyncRead>(
    io: Pin<&mut I>,
    cx: &mut Context<'_>,
    buf: &mut BytesMut,
    chunk: usize,
) -> Poll<io::Result<usize>> {
    if buf.capacity() - buf.len() < chunk / 4 {
        buf.reserve(chunk);
    }
    tokio_util::io::poll_read_buf(io, cx, buf)
}

/// The request head `req` would be sent with, as hyper's client writes it:
/// request line, then the headers in order, names in lowercase.
pub fn encode_head<B>(req: &Request<B>, out: &mut Vec<u8>) {
    let target = req
        .uri()
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .as_bytes();
    let headers = req.headers();
    let size: usize = headers
        .iter()
        .map(|(n, v)| n.as_str().len() + v.len() + 4)
        .sum();
    out.reserve(req.method().as_str().len() + target.len() + size + 16);
    out.extend_from_slice(req.method().as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(target);
    out.extend_from_slice(b" HTTP/1.1\r\n");
    for (name, value) in headers {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// A response head, and which of the headers that decide its framing and the
/// connection's reuse it carries: found as its names are parsed, so that the
/// common response (a length, no `Connection`, no `Transfer-Encoding`) is not
/// looked up again for the ones it lacks.
///
/// It becomes a `Response` only when its body is ready to go with it
/// ([`ResponseHead::into_parts`]): until then it is moved from the parser to
/// the exchange, and a `Response`'s empty header map alone would double what
/// each move copies.
pub struct ResponseHead {
    pub status: StatusCode,
    pub version: Version,
    pub fields: Fields,
    framing: u8,
}

/// A response head's headers: its lines as they came (the common head), or a
/// header map.
pub enum Fields {
    Lines(HeadLines),
    Map(Box<HeaderMap>),
}

/// A response head's header lines exactly as the gateway sent them, kept
/// instead of a header map when they can go to an HTTP/1.1 client as they are
/// (the common response): every line `name: value` and CRLF, no hop-by-hop
/// header, at most one `Content-Length` with one value, a status that has a
/// body. Parsing them into a map and writing the map out again was a tenth of
/// the work of a proxied request.
///
/// They travel in the response's body ([`KeptLines`]) to the server that
/// writes the head: `h1_server` writes them as they are. A server that
/// writes only a header map takes them back into it first
/// ([`lines_into_headers`]): hyper's, for HTTP/2 and unusual HTTP/1
/// clients. Headers set in the map meanwhile go after the lines. (The
/// response's extensions would carry them at three allocations a response.)
#[derive(Clone, Debug)]
pub struct HeadLines {
    /// Every header line, each ending in CRLF; names in the case they came in.
    lines: Bytes,
    /// The value of its `Content-Length` line, if it has one.
    length: Option<u64>,
    /// It has a `Date` line.
    dated: bool,
}

impl HeadLines {
    /// The lines, each ending in CRLF.
    pub fn as_bytes(&self) -> &[u8] {
        &self.lines
    }

    /// The value of its `Content-Length` line, if it has one.
    pub fn length(&self) -> Option<u64> {
        self.length
    }

    /// Whether one of the lines is a `Date`.
    pub fn is_dated(&self) -> bool {
        self.dated
    }

    /// The headers the lines hold, in order, in front of those of `map`.
    pub fn into_headers(self, map: &mut HeaderMap) {
        let mut headers = HeaderMap::with_capacity(map.len() + 8);
        append_lines(self.lines, &mut headers);
        let mut last = None;
        for (name, value) in std::mem::take(map) {
            let name = match name {
                Some(name) => last.insert(name).clone(),
                None => last.clone().expect("a map's first entry is named"),
            };
            headers.append(name, value);
        }
        *map = headers;
    }
}

/// Append to `map` the headers of `lines`, header lines a head was read with
/// (each `name: value` CRLF), in order.
pub(crate) fn append_lines(mut lines: Bytes, map: &mut HeaderMap) {
    while let Some(end) = lines.windows(2).position(|w| w == b"\r\n") {
        let line = lines.split_to(end + 2);
        let colon = line
            .iter()
            .position(|&b| b == b':')
            .expect("a line has a colon");
        // Checked as the head was read: every name and value byte httparse
        // takes is one `HeaderName` and `HeaderValue` take
        // (`parsed_names_and_values_are_valid_headers` tries each byte, and
        // `h1_server`'s `parsed_request_values_are_valid_header_values`).
        let name = HeaderName::from_bytes(&line[..colon]).expect("a checked header name");
        map.append(name, parsed_value(line.slice(colon + 2..end)));
    }
}

/// Put the header lines `response` kept ([`HeadLines`]) back into its map.
pub fn lines_into_headers<B: KeptLines>(response: &mut Response<B>) {
    if let Some(lines) = response.body_mut().take_lines() {
        lines.into_headers(response.headers_mut());
    }
}

const CONNECTION: u8 = 1;
const CONTENT_LENGTH: u8 = 1 << 1;
const TRANSFER_ENCODING: u8 = 1 << 2;

impl ResponseHead {
    fn has(&self, bit: u8) -> bool {
        self.framing & bit != 0
    }

    /// Its header map, unless its lines are kept.
    pub fn map(&self) -> Option<&HeaderMap> {
        match &self.fields {
            Fields::Map(map) => Some(map),
            Fields::Lines(_) => None,
        }
    }

    /// The head as a `Response`, and its kept lines (its header map is then
    /// empty).
    pub fn into_parts(self) -> (Response<()>, Option<HeadLines>) {
        let mut head = Response::new(());
        *head.status_mut() = self.status;
        *head.version_mut() = self.version;
        match self.fields {
            Fields::Lines(lines) => (head, Some(lines)),
            Fields::Map(map) => {
                *head.headers_mut() = *map;
                (head, None)
            }
        }
    }
}

/// Which framing bit `name` is, if any.
fn framing_bit(name: &HeaderName) -> u8 {
    if *name == header::CONTENT_LENGTH {
        CONTENT_LENGTH
    } else if *name == header::CONNECTION {
        CONNECTION
    } else if *name == header::TRANSFER_ENCODING {
        TRANSFER_ENCODING
    } else {
        0
    }
}

/// Parse a response head off the front of `buf`, if it holds a whole one.
/// Its header lines, or its header values, share the head's bytes.
pub fn parse_head(buf: &mut BytesMut) -> Result<Option<ResponseHead>, Failure> {
    // Left uninitialised, as hyper does: httparse writes the entries it returns.
    let mut headers = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut parsed = httparse::Response::new(&mut []);
    let len = match httparse::ParserConfig::default().parse_response_with_uninit_headers(
        &mut parsed,
        buf,
        &mut headers,
    ) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(Failure::invalid("too many response headers"))
        }
        Err(_) => return Err(Failure::invalid("malformed response head")),
    };
    let status = parsed
        .code
        .and_then(|c| StatusCode::from_u16(c).ok())
        .ok_or_else(|| Failure::invalid("invalid status code"))?;
    let version = match parsed.version {
        Some(0) => Version::HTTP_10,
        _ => Version::HTTP_11,
    };
    let base = buf.as_ptr() as usize;
    let lines = match can_have_body(status) {
        true => Lines::of(parsed.headers, base, &buf[..len]),
        false => None,
    };
    if let Some(Lines {
        span,
        length,
        dated,
    }) = lines
    {
        let lines = HeadLines {
            lines: buf.split_to(len).freeze().slice(span),
            length,
            dated,
        };
        return Ok(Some(ResponseHead {
            status,
            version,
            fields: Fields::Lines(lines),
            framing: length.map_or(0, |_| CONTENT_LENGTH),
        }));
    }
    // Names now; values once the head's bytes are split off, as slices of them.
    let mut spans = Vec::with_capacity(parsed.headers.len());
    let mut framing = 0;
    for h in parsed.headers.iter() {
        let name = HeaderName::from_bytes(h.name.as_bytes())
            .map_err(|_| Failure::invalid("invalid response header name"))?;
        framing |= framing_bit(&name);
        let start = h.value.as_ptr() as usize - base;
        spans.push((name, start..start + h.value.len()));
    }
    let bytes = buf.split_to(len).freeze();
    let mut map = HeaderMap::with_capacity(spans.len());
    for (name, span) in spans {
        map.append(name, parsed_value(bytes.slice(span)));
    }
    Ok(Some(ResponseHead {
        status,
        version,
        fields: Fields::Map(Box::new(map)),
        framing,
    }))
}

/// A header value httparse read, made a `HeaderValue` without scanning its
/// bytes again (as hyper makes them): every byte httparse takes in a value is
/// one `HeaderValue` takes (`parsed_names_and_values_are_valid_headers` and
/// `h1_server`'s `parsed_request_values_are_valid_header_values` try each
/// byte; debug builds check every value).
/// Scanning them again cost three instructions a byte, a few thousand for a
/// browser's head.
#[allow(unsafe_code)]
pub(crate) fn parsed_value(bytes: Bytes) -> HeaderValue {
    // SAFETY: not a memory-safety contract: the bytes are valid in a header
    // value, as above.
    unsafe { HeaderValue::from_maybe_shared_unchecked(bytes) }
}

/// Whether a response with `status` can have a body (RFC 9110 §6.4.1).
pub fn can_have_body(status: StatusCode) -> bool {
    !(status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED)
}

/// Where a head's header lines are, when they can be passed on as they came
/// ([`HeadLines`]).
struct Lines {
    span: std::ops::Range<usize>,
    length: Option<u64>,
    dated: bool,
}

impl Lines {
    /// `headers`, parsed from `head` (whose first byte is at `base`), if every
    /// line is `name: value` CRLF, one after the other up to the blank line,
    /// with no hop-by-hop header and at most one plain `Content-Length`.
    fn of(headers: &[httparse::Header<'_>], base: usize, head: &[u8]) -> Option<Lines> {
        let offset = |s: &[u8]| s.as_ptr() as usize - base;
        let start = headers
            .first()
            .map_or(head.len() - 2, |h| offset(h.name.as_bytes()));
        let mut at = start;
        let mut length = None;
        let mut dated = false;
        for h in headers {
            let name = h.name.as_bytes();
            let value_at = at + name.len() + 2;
            if offset(name) != at
                || head.get(at + name.len()..value_at) != Some(b": ")
                || offset(h.value) != value_at
            {
                return None;
            }
            at = value_at + h.value.len();
            if head.get(at..at + 2) != Some(b"\r\n") {
                return None;
            }
            at += 2;
            match name.len() {
                4 if is_named(name, b"date") => dated = true,
                14 if is_named(name, b"content-length") => {
                    if length.is_some() {
                        return None;
                    }
                    length = Some(parse_decimal(h.value)?);
                }
                _ if names_hop_by_hop(name) => return None,
                _ => {}
            }
        }
        // The blank line ends the head.
        (at + 2 == head.len()).then_some(Lines {
            span: start..at,
            length,
            dated,
        })
    }
}

/// Whether the upstream keeps the connection open after `head`'s response:
/// HTTP/1.1 unless it says `close`, HTTP/1.0 only if it says `keep-alive`.
fn keeps_alive(parsed: &ResponseHead) -> bool {
    let says = |token: &[u8]| match parsed.map() {
        Some(map) if parsed.has(CONNECTION) => map
            .get_all(header::CONNECTION)
            .iter()
            .flat_map(|v| v.as_bytes().split(|&b| b == b','))
            .any(|t| t.trim_ascii().eq_ignore_ascii_case(token)),
        _ => false,
    };
    match parsed.version {
        Version::HTTP_11 => !says(b"close"),
        _ => says(b"keep-alive"),
    }
}

/// How a response body ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    /// This many bytes still to come.
    Length(u64),
    Chunked(Chunk),
    /// Until the connection closes (never reused).
    Close,
    Done,
}

/// Where a chunked body's reader stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    /// At a chunk-size line.
    Size,
    /// Inside a chunk's data, this many bytes left.
    Data(u64),
    /// At the CRLF after a chunk's data.
    DataEnd,
    /// In the trailer section, this many trailer bytes read so far.
    Trailers(usize),
}

impl Framing {
    fn of(method: &Method, parsed: &ResponseHead) -> Result<Framing, Failure> {
        let status = parsed.status;
        if *method == Method::HEAD
            || status == StatusCode::NO_CONTENT
            || status == StatusCode::NOT_MODIFIED
        {
            return Ok(Framing::Done);
        }
        let map = parsed.map();
        if let Some(headers) = map.filter(|_| parsed.has(TRANSFER_ENCODING)) {
            let last = headers
                .get_all(header::TRANSFER_ENCODING)
                .iter()
                .flat_map(|v| v.as_bytes().split(|&b| b == b','))
                .map(|c| c.trim_ascii())
                .rfind(|c| !c.is_empty());
            return Ok(match last {
                Some(c) if c.eq_ignore_ascii_case(b"chunked") => Framing::Chunked(Chunk::Size),
                _ => Framing::Close,
            });
        }
        if !parsed.has(CONTENT_LENGTH) {
            return Ok(Framing::Close);
        }
        let mut length = match &parsed.fields {
            Fields::Lines(lines) => lines.length(),
            Fields::Map(_) => None,
        };
        for value in map
            .into_iter()
            .flat_map(|m| m.get_all(header::CONTENT_LENGTH))
        {
            for part in value.as_bytes().split(|&b| b == b',') {
                let n = parse_decimal(part.trim_ascii())
                    .ok_or_else(|| Failure::invalid("invalid content-length"))?;
                if length.is_some_and(|l| l != n) {
                    return Err(Failure::invalid("conflicting content-length values"));
                }
                length = Some(n);
            }
        }
        Ok(match length {
            Some(0) => Framing::Done,
            Some(n) => Framing::Length(n),
            None => Framing::Close,
        })
    }
}

fn parse_decimal(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() || digits.len() > 19 {
        return None;
    }
    digits.iter().try_fold(0u64, |n, &d| {
        d.is_ascii_digit().then(|| n * 10 + u64::from(d - b'0'))
    })
}

/// What the next step of a body's framing gives.
enum Step {
    Data(Bytes),
    /// More bytes are needed.
    More,
    End,
}

impl Framing {
    /// Take what the framing allows off the front of `buf`.
    fn step(&mut self, buf: &mut BytesMut) -> Result<Step, io::Error> {
        let invalid = |what| io::Error::new(io::ErrorKind::InvalidData, what);
        loop {
            match self {
                Framing::Done => return Ok(Step::End),
                Framing::Close if buf.is_empty() => return Ok(Step::More),
                Framing::Close => return Ok(Step::Data(buf.split().freeze())),
                Framing::Length(left) | Framing::Chunked(Chunk::Data(left)) => {
                    if buf.is_empty() {
                        return Ok(Step::More);
                    }
                    let n = (*left).min(buf.len() as u64) as usize;
                    *left -= n as u64;
                    if *left == 0 {
                        *self = match self {
                            Framing::Length(_) => Framing::Done,
                            _ => Framing::Chunked(Chunk::DataEnd),
                        };
                    }
                    return Ok(Step::Data(buf.split_to(n).freeze()));
                }
                Framing::Chunked(Chunk::DataEnd) => {
                    if buf.len() < 2 {
                        return Ok(Step::More);
                    }
                    if &buf[..2] != b"\r\n" {
                        return Err(invalid("chunk data not followed by CRLF"));
                    }
                    buf.advance(2);
                    *self = Framing::Chunked(Chunk::Size);
                }
                Framing::Chunked(Chunk::Size) => {
                    let Some(end) = buf.iter().position(|&b| b == b'\n') else {
                        if buf.len() > MAX_CHUNK_LINE {
                            return Err(invalid("chunk-size line too long"));
                        }
                        return Ok(Step::More);
                    };
                    let size =
                        chunk_size(&buf[..end]).ok_or_else(|| invalid("invalid chunk size"))?;
                    buf.advance(end + 1);
                    *self = Framing::Chunked(match size {
                        0 => Chunk::Trailers(0),
                        n => Chunk::Data(n),
                    });
                }
                Framing::Chunked(Chunk::Trailers(read)) => {
                    let Some(end) = buf.iter().position(|&b| b == b'\n') else {
                        if *read + buf.len() > MAX_TRAILERS {
                            return Err(invalid("trailers too large"));
                        }
                        return Ok(Step::More);
                    };
                    let line = &buf[..end];
                    let last = line == b"\r" || line.is_empty();
                    *read += end + 1;
                    buf.advance(end + 1);
                    if last {
                        *self = Framing::Done;
                    } else if *read > MAX_TRAILERS {
                        return Err(invalid("trailers too large"));
                    }
                }
            }
        }
    }
}

/// A chunk-size line (without its `\n`): hex digits, then optional extensions.
fn chunk_size(line: &[u8]) -> Option<u64> {
    let line = line.strip_suffix(b"\r")?;
    let digits = line
        .iter()
        .position(|b| !b.is_ascii_hexdigit())
        .unwrap_or(line.len());
    if digits == 0 || digits > 16 {
        return None;
    }
    let rest = line[digits..].trim_ascii_start();
    if !(rest.is_empty() || rest[0] == b';') {
        return None;
    }
    line[..digits].iter().try_fold(0u64, |n, &d| {
        let v = (d as char).to_digit(16)? as u64;
        n.checked_mul(16)?.checked_add(v)
    })
}

/// Gives a link back once a response has been read to its end.
pub type Release<I> = Box<dyn FnOnce(Link<I>) + Send>;

/// A response body read from its connection as the client takes it.
pub struct Reading<I> {
    /// Until the body has ended.
    link: Option<Link<I>>,
    framing: Framing,
    /// The connection can carry another exchange after this one.
    keep: bool,
}

impl<I> Reading<I>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    /// The body, giving its connection to `release` when read to the end with
    /// nothing left over (a close-delimited body's connection is spent).
    pub fn into_body(self, release: Release<I>) -> Source {
        self.streamed(release, None)
    }

    fn streamed(self, release: Release<I>, lines: Option<HeadLines>) -> Source {
        let mut body = Streamed {
            reading: self,
            release: Some(release),
            lines,
        };
        body.end_if_done();
        Source::Read(Box::new(body))
    }
}

struct Streamed<I> {
    reading: Reading<I>,
    release: Option<Release<I>>,
    /// The head's lines, until the server writing the head takes them (here,
    /// in the box the body is anyway: the response that moves on stays small).
    lines: Option<HeadLines>,
}

impl<I> KeptLines for Streamed<I> {
    fn take_lines(&mut self) -> Option<HeadLines> {
        self.lines.take()
    }
}

impl<I> Streamed<I> {
    /// Hand the link back if the body has ended cleanly.
    fn end_if_done(&mut self) {
        if self.reading.framing != Framing::Done {
            return;
        }
        if let Some(link) = self.reading.link.take() {
            if self.reading.keep && link.0.buf.is_empty() {
                if let Some(release) = self.release.take() {
                    release(link);
                }
            }
        }
    }
}

impl<I> Body for Streamed<I>
where
    I: AsyncRead + Unpin + Send + 'static,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        loop {
            let Some(link) = this.reading.link.as_mut() else {
                return Poll::Ready(None);
            };
            match this.reading.framing.step(&mut link.0.buf)? {
                Step::Data(data) => {
                    this.end_if_done();
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Step::End => {
                    this.end_if_done();
                    return Poll::Ready(None);
                }
                Step::More => {
                    let n = std::task::ready!(poll_read(
                        Pin::new(&mut link.0.io),
                        cx,
                        &mut link.0.buf,
                        READ_CHUNK
                    ))?;
                    if n == 0 {
                        if this.reading.framing == Framing::Close {
                            this.reading.framing = Framing::Done;
                            // Spent: a close-delimited body's link is not reused.
                            this.reading.link = None;
                            return Poll::Ready(None);
                        }
                        return Poll::Ready(Some(Err(closed().into())));
                    }
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.reading.framing == Framing::Done
    }

    fn size_hint(&self) -> SizeHint {
        match self.reading.framing {
            Framing::Done => SizeHint::with_exact(0),
            Framing::Length(n) => SizeHint::with_exact(n),
            _ => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use http_body_util::BodyExt;
    use proptest::prelude::*;
    use tokio::io::{AsyncReadExt, DuplexStream};

    use crate::body::ProxyBody;

    use super::*;

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(f)
    }

    /// Read a request head off `server`.
    async fn read_head_of(server: &mut DuplexStream) -> Vec<u8> {
        let mut seen = Vec::new();
        let mut byte = [0u8; 1];
        while !seen.ends_with(b"\r\n\r\n") {
            assert_eq!(server.read(&mut byte).await.unwrap(), 1, "head cut short");
            seen.push(byte[0]);
        }
        seen
    }

    /// The head hyper's client writes for `req` (no body).
    async fn hyper_head(req: Request<ProxyBody>) -> Vec<u8> {
        let (client, mut server) = tokio::io::duplex(1 << 20);
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(client))
                .await
                .unwrap();
        tokio::spawn(conn);
        tokio::spawn(async move { sender.send_request(req).await });
        read_head_of(&mut server).await
    }

    fn request(method: &str, target: &str, headers: &[(String, String)]) -> Request<ProxyBody> {
        let mut req = Request::new(ProxyBody::Empty);
        *req.method_mut() = Method::from_bytes(method.as_bytes()).unwrap();
        *req.uri_mut() = target.parse().unwrap();
        for (name, value) in headers {
            req.headers_mut().append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        req
    }

    /// What a client makes of `wire` as the answer to `method`: status,
    /// headers, body (`None`: the exchange failed).
    type Seen = Option<(u16, Vec<(String, Vec<u8>)>, Vec<u8>)>;

    fn seen(head: Response<()>, body: Vec<u8>) -> Seen {
        let headers = head
            .headers()
            .iter()
            .map(|(n, v)| (n.to_string(), v.as_bytes().to_vec()))
            .collect();
        Some((head.status().as_u16(), headers, body))
    }

    /// Serve `wire` in `pieces`-byte writes to whoever sends a request, then
    /// close if `close`.
    fn answer(mut server: DuplexStream, wire: Vec<u8>, pieces: usize, close: bool) {
        tokio::spawn(async move {
            read_head_of(&mut server).await;
            for piece in wire.chunks(pieces.max(1)) {
                if server.write_all(piece).await.is_err() {
                    return;
                }
                tokio::task::yield_now().await;
            }
            if !close {
                // Keep the connection open until the client is done with it.
                let mut rest = Vec::new();
                let _ = server.read_to_end(&mut rest).await;
            }
        });
    }

    async fn through_link(method: &Method, wire: Vec<u8>, pieces: usize, close: bool) -> Seen {
        let (client, server) = tokio::io::duplex(1 << 20);
        answer(server, wire, pieces, close);
        let head = format!("{method} / HTTP/1.1\r\nhost: x\r\n\r\n");
        let answer = Link::new(client)
            .exchange(head.as_bytes(), method, far())
            .await
            .ok()?;
        let mut response = answer.into_response(Box::new(|_| {}));
        // Lines kept as they came, as a client served by hyper gets them.
        lines_into_headers(&mut response);
        let (parts, body) = response.into_parts();
        let body = body.collect().await.ok()?.to_bytes().to_vec();
        seen(Response::from_parts(parts, ()), body)
    }

    async fn through_hyper(method: &Method, wire: Vec<u8>, pieces: usize, close: bool) -> Seen {
        let (client, server) = tokio::io::duplex(1 << 20);
        answer(server, wire, pieces, close);
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(client))
                .await
                .ok()?;
        tokio::spawn(conn);
        let mut req = request(method.as_str(), "/", &[("host".into(), "x".into())]);
        *req.body_mut() = ProxyBody::Empty;
        let response = sender.send_request(req).await.ok()?;
        let (parts, body) = response.into_parts();
        let body = body.collect().await.ok()?.to_bytes().to_vec();
        seen(Response::from_parts(parts, ()), body)
    }

    fn header_name() -> impl Strategy<Value = String> {
        "x-[a-z0-9-]{1,12}"
    }

    fn header_value() -> impl Strategy<Value = String> {
        "[ -~]{0,24}".prop_map(|v| v.trim().to_owned())
    }

    /// How a generated response frames its body.
    #[derive(Debug, Clone)]
    enum Framed {
        Length,
        Chunked(Vec<usize>),
        Close,
    }

    fn response_wire(
        status: u16,
        headers: &[(String, String)],
        body: &[u8],
        framed: &Framed,
    ) -> Vec<u8> {
        let mut wire = format!("HTTP/1.1 {status} Whatever\r\n").into_bytes();
        for (n, v) in headers {
            wire.extend_from_slice(format!("{n}: {v}\r\n").as_bytes());
        }
        match framed {
            Framed::Length => {
                wire.extend_from_slice(format!("content-length: {}\r\n\r\n", body.len()).as_bytes())
            }
            Framed::Chunked(_) => wire.extend_from_slice(b"transfer-encoding: chunked\r\n\r\n"),
            Framed::Close => wire.extend_from_slice(b"connection: close\r\n\r\n"),
        }
        match framed {
            Framed::Chunked(cuts) => {
                let mut rest = body;
                let mut cuts = cuts.iter().cycle();
                while !rest.is_empty() {
                    let n = (*cuts.next().unwrap()).clamp(1, rest.len());
                    wire.extend_from_slice(format!("{n:x};ext=1\r\n").as_bytes());
                    wire.extend_from_slice(&rest[..n]);
                    wire.extend_from_slice(b"\r\n");
                    rest = &rest[n..];
                }
                wire.extend_from_slice(b"0\r\n\r\n");
            }
            _ => wire.extend_from_slice(body),
        }
        wire
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn request_heads_are_written_as_hyper_writes_them(
            method in prop::sample::select(vec!["GET", "HEAD", "DELETE", "OPTIONS", "POST", "PUT", "PATCH", "PURGE"]),
            path in "(/[A-Za-z0-9%._~-]{0,10}){1,4}",
            query in prop::option::of("[A-Za-z0-9=&%]{0,16}"),
            headers in prop::collection::vec((header_name(), header_value()), 0..12),
        ) {
            let target = match &query {
                Some(q) => format!("{path}?{q}"),
                None => path.clone(),
            };
            let mut all = vec![("host".to_owned(), "10.0.0.1:18789".to_owned())];
            all.extend(headers);
            let mut ours = Vec::new();
            encode_head(&request(method, &target, &all), &mut ours);
            let theirs = block_on(hyper_head(request(method, &target, &all)));
            prop_assert_eq!(String::from_utf8_lossy(&ours), String::from_utf8_lossy(&theirs));
        }

        #[test]
        fn responses_are_read_as_hyper_reads_them(
            status in prop::sample::select(vec![200u16, 201, 204, 206, 301, 304, 400, 404, 500, 503]),
            headers in prop::collection::vec((header_name(), header_value()), 0..10),
            body in prop::collection::vec(any::<u8>(), 0..3000),
            framed in prop_oneof![
                Just(Framed::Length),
                prop::collection::vec(1usize..700, 1..4).prop_map(Framed::Chunked),
                Just(Framed::Close),
            ],
            head_method in any::<bool>(),
            pieces in 1usize..2000,
        ) {
            let method = if head_method { Method::HEAD } else { Method::GET };
            // No body after HEAD, 204 or 304: the generated response has none.
            let body = if head_method || status == 204 || status == 304 { Vec::new() } else { body };
            let framed = match (&framed, status) {
                (Framed::Close, 204 | 304) => Framed::Length,
                _ => framed,
            };
            let wire = response_wire(status, &headers, &body, &framed);
            let close = matches!(framed, Framed::Close);
            let ours = block_on(through_link(&method, wire.clone(), pieces, close));
            let theirs = block_on(through_hyper(&method, wire, pieces, close));
            prop_assert!(ours.is_some());
            prop_assert_eq!(ours, theirs);
        }

        #[test]
        fn arbitrary_bytes_never_panic_and_never_read_past_a_length(
            wire in prop::collection::vec(any::<u8>(), 0..600),
            pieces in 1usize..64,
        ) {
            let mut wire = wire;
            wire.splice(0..0, b"HTTP/1.1 200 OK\r\n".iter().copied());
            let _ = block_on(through_link(&Method::GET, wire, pieces, true));
        }
    }

    /// A timer comes due at the time asked, whether it was set for before
    /// that time or after it.
    #[tokio::test(start_paused = true)]
    async fn until_resolves_at_its_due_time_whatever_the_timer_was_set_for() {
        use std::time::Duration;
        let start = Instant::now();
        let mut timer = Box::pin(tokio::time::sleep(Duration::from_secs(3)));
        until(timer.as_mut(), start + Duration::from_secs(10)).await;
        assert_eq!(start.elapsed(), Duration::from_secs(10), "set for before");
        let start = Instant::now();
        timer.as_mut().reset(start + Duration::from_secs(60));
        until(timer.as_mut(), start + Duration::from_secs(2)).await;
        assert_eq!(start.elapsed(), Duration::from_secs(2), "set for after");
    }

    /// A response head due so late it never matters.
    fn far() -> Instant {
        Instant::now() + std::time::Duration::from_secs(3600)
    }

    #[tokio::test(start_paused = true)]
    async fn each_exchange_on_a_link_waits_for_its_head_until_its_own_due_time() {
        use std::time::Duration;
        const GET: &[u8] = b"GET / HTTP/1.1\r\nhost: x\r\n\r\n";
        let (client, mut server) = tokio::io::duplex(1 << 16);
        let started = Instant::now();
        // Two answers 5 s after their requests, then none.
        let origin = tokio::spawn(async move {
            for _ in 0..2 {
                read_head_of(&mut server).await;
                tokio::time::sleep(Duration::from_secs(5)).await;
                server
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                    .await
                    .unwrap();
            }
            read_head_of(&mut server).await;
            server
        });
        // Each due 7 s after it starts: the second is answered 10 s after the
        // first started, past the first's due time, and still in time.
        let mut link = Link::new(client);
        for n in 1..=2 {
            let answer = link
                .exchange(GET, &Method::GET, Instant::now() + Duration::from_secs(7))
                .await
                .unwrap_or_else(|e| panic!("exchange {n}: {e:?}"));
            assert_eq!(answer.head.status, StatusCode::OK);
            let back = Arc::new(Mutex::new(None));
            let slot = back.clone();
            let body = answer
                .body
                .into_body(Box::new(move |link| *slot.lock().unwrap() = Some(link)));
            assert_eq!(&body.collect().await.unwrap().to_bytes()[..], b"ok");
            link = back.lock().unwrap().take().expect("the link comes back");
            assert_eq!(started.elapsed(), Duration::from_secs(5 * n));
        }
        // The third is never answered: it fails when due, not before.
        let failed = link
            .exchange(GET, &Method::GET, Instant::now() + Duration::from_secs(7))
            .await;
        assert!(matches!(failed, Err(Failure::TimedOut)));
        assert_eq!(started.elapsed(), Duration::from_secs(17));
        drop(origin.await.unwrap());
    }

    /// A link after `wire` was read as the answer to a GET: `Some` if it was
    /// given back for another exchange.
    fn released_after(wire: &'static [u8]) -> bool {
        block_on(async move {
            let (client, server) = tokio::io::duplex(1 << 16);
            answer(server, wire.to_vec(), 7, false);
            let answer = Link::new(client)
                .exchange(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n", &Method::GET, far())
                .await
                .unwrap();
            let back = Arc::new(Mutex::new(false));
            let flag = back.clone();
            let body = answer
                .body
                .into_body(Box::new(move |_| *flag.lock().unwrap() = true));
            let _ = body.collect().await;
            let released = *back.lock().unwrap();
            released
        })
    }

    #[test]
    fn a_link_goes_back_only_after_a_clean_end_that_keeps_the_connection() {
        assert!(released_after(
            b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nabc"
        ));
        assert!(released_after(b"HTTP/1.1 204 No Content\r\n\r\n"));
        assert!(released_after(
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\nx-t: 1\r\n\r\n"
        ));
        assert!(released_after(
            b"HTTP/1.0 200 OK\r\nconnection: keep-alive\r\ncontent-length: 1\r\n\r\na"
        ));
        // Bytes past the end, a close, HTTP/1.0 without keep-alive: not reused.
        assert!(!released_after(
            b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nabcd"
        ));
        assert!(!released_after(
            b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 3\r\n\r\nabc"
        ));
        assert!(!released_after(
            b"HTTP/1.0 200 OK\r\ncontent-length: 3\r\n\r\nabc"
        ));
    }

    /// The lines `wire`'s head keeps as they came, if it keeps them.
    fn kept_lines(wire: &[u8]) -> Option<HeadLines> {
        let parsed = parse_head(&mut BytesMut::from(wire)).unwrap().unwrap();
        parsed.into_parts().1
    }

    #[test]
    fn the_common_head_keeps_its_lines_as_they_came() {
        let wire = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\ncontent-length: 12\r\nDate: Sat, 05 Dec 2026 03:00:00 GMT\r\nx-empty: \r\n\r\nhello world!";
        let lines = kept_lines(wire).expect("a plain head keeps its lines");
        assert_eq!(
            lines.as_bytes(),
            b"Content-Type: text/plain\r\ncontent-length: 12\r\nDate: Sat, 05 Dec 2026 03:00:00 GMT\r\nx-empty: \r\n"
        );
        assert_eq!(lines.length(), Some(12));
        assert!(lines.is_dated());
        let mut map = HeaderMap::new();
        map.insert(header::CONNECTION, HeaderValue::from_static("close"));
        lines.into_headers(&mut map);
        let names: Vec<_> = map.keys().map(|n| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "content-type",
                "content-length",
                "date",
                "x-empty",
                "connection"
            ]
        );
        assert_eq!(map["x-empty"], "");
        // No headers at all, and no length: lines too (empty).
        let lines = kept_lines(b"HTTP/1.1 200 OK\r\n\r\n").unwrap();
        assert_eq!(
            (lines.as_bytes(), lines.length(), lines.is_dated()),
            (&b""[..], None, false)
        );
        // Whatever would not go out as it came is parsed into the map.
        for wire in [
            &b"HTTP/1.1 200 OK\r\ncontent-length:  3\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\ncontent-length:3\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nx-a: 1 \r\ncontent-length: 3\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nx-a: 1\ncontent-length: 3\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\n",
            b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\ncontent-length: 3\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ncontent-length: 3, 3\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nKeep-Alive: timeout=5\r\ncontent-length: 3\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nconnection: x-a\r\ncontent-length: 3\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ntrailer: x-t\r\ncontent-length: 3\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nupgrade: h2c\r\ncontent-length: 3\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nproxy-connection: close\r\ncontent-length: 3\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nproxy-authenticate: Basic\r\ncontent-length: 3\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nte: trailers\r\ncontent-length: 3\r\n\r\n",
            b"HTTP/1.1 204 No Content\r\ndate: x\r\n\r\n",
            b"HTTP/1.1 304 Not Modified\r\ncontent-length: 3\r\n\r\n",
        ] {
            let text = String::from_utf8_lossy(wire);
            assert!(kept_lines(wire).is_none(), "kept the lines of {text:?}");
        }
        // DEL in a value fails the head (httparse refuses it, as
        // `HeaderValue` does).
        let mut del =
            BytesMut::from(&b"HTTP/1.1 200 OK\r\nx-a: a\x7fb\r\ncontent-length: 3\r\n\r\n"[..]);
        assert!(parse_head(&mut del).is_err());
    }

    /// Every name and value byte httparse takes in a head whose lines are
    /// kept is one `HeaderName` and `HeaderValue` take, whichever of
    /// httparse's scanners (byte by byte, SIMD) reads it: putting the lines
    /// into a map cannot fail.
    #[test]
    fn parsed_names_and_values_are_valid_headers() {
        for byte in 0..=255u8 {
            let name = [b'x', byte, b'y'];
            let mut value = [b'v'; 40];
            value[20] = byte;
            for (name, value) in [
                (&name[..], &b"v"[..]),
                (b"x-a", &value[..]),
                (b"x-a", &[byte][..]),
            ] {
                let mut wire = b"HTTP/1.1 200 OK\r\n".to_vec();
                wire.extend_from_slice(name);
                wire.extend_from_slice(b": ");
                wire.extend_from_slice(value);
                wire.extend_from_slice(b"\r\ncontent-length: 0\r\n\r\n");
                let Ok(Some(parsed)) = parse_head(&mut BytesMut::from(&wire[..])) else {
                    continue;
                };
                let Fields::Lines(lines) = parsed.fields else {
                    continue;
                };
                let mut map = HeaderMap::new();
                lines.into_headers(&mut map);
                let lower = name.to_ascii_lowercase();
                let got = map.get(std::str::from_utf8(&lower).unwrap());
                assert_eq!(got.map(|v| v.as_bytes()), Some(value), "byte {byte:#x}");
            }
        }
    }

    #[test]
    fn a_transfer_coding_overrides_a_length_which_is_not_passed_on() {
        block_on(async {
            let (client, server) = tokio::io::duplex(1 << 16);
            let wire = b"HTTP/1.1 200 OK\r\ncontent-length: 99\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n";
            answer(server, wire.to_vec(), 4, false);
            let answer = Link::new(client)
                .exchange(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n", &Method::GET, far())
                .await
                .unwrap();
            let map = answer.head.map().expect("a chunked head is no kept lines");
            assert!(!map.contains_key(header::CONTENT_LENGTH));
            let body = answer.body.into_body(Box::new(|_| {}));
            assert_eq!(body.collect().await.unwrap().to_bytes(), "abc");
        });
    }

    #[test]
    fn malformed_framing_is_refused() {
        let exchange = |wire: &'static [u8]| {
            block_on(async move {
                let (client, server) = tokio::io::duplex(1 << 16);
                answer(server, wire.to_vec(), 5, true);
                match Link::new(client)
                    .exchange(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n", &Method::GET, far())
                    .await
                {
                    Ok(answer) => answer
                        .body
                        .into_body(Box::new(|_| {}))
                        .collect()
                        .await
                        .map(|b| b.to_bytes().len())
                        .map_err(|_| ()),
                    Err(_) => Err(()),
                }
            })
        };
        assert_eq!(
            exchange(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nab"),
            Ok(2)
        );
        assert_eq!(
            exchange(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 3\r\n\r\nabc"),
            Err(())
        );
        assert_eq!(
            exchange(b"HTTP/1.1 200 OK\r\ncontent-length: -1\r\n\r\n"),
            Err(())
        );
        assert_eq!(
            exchange(b"HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\nabc"),
            Err(())
        );
        assert_eq!(
            exchange(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n"),
            Err(())
        );
        assert_eq!(
            exchange(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n11111111111111111\r\n"),
            Err(())
        );
        assert_eq!(
            exchange(b"HTTP/1.1 101 Switching Protocols\r\n\r\n"),
            Err(())
        );
        assert_eq!(
            exchange(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\na"),
            Ok(1)
        );
        assert_eq!(exchange(b""), Err(()));
        // A head that never ends stops at the limit.
        let endless: &'static [u8] = Box::leak(
            [
                b"HTTP/1.1 200 OK\r\n".as_slice(),
                &b"x-a: b\r\n".repeat(MAX_HEAD / 8 + 1),
            ]
            .concat()
            .into_boxed_slice(),
        );
        assert_eq!(exchange(endless), Err(()));
    }
}
