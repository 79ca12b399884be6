//! HTTP/1.1 requests read and answered by the connection's own task: the
//! common exchange on both listeners, a request with no body and nothing
//! unusual in its head.
//!
//! hyper's server keeps a general state machine per connection (bodies both
//! ways, upgrades, `Expect`, keep-alive rules for HTTP/1.0) and goes through it
//! for every request. Here one loop reads a head into the connection's buffer,
//! parses it in place (header values are slices of the buffer), runs the
//! request, and writes the response head with the first body bytes in one
//! write. The response is framed exactly as hyper frames it: the same status
//! line, headers in the same order, the same `content-length`,
//! `transfer-encoding: chunked`, `connection: close` and `date` rules.
//!
//! The first head that is anything else is handed back with every byte read
//! so far, and hyper serves the rest of the connection: a request with a body
//! (`Content-Length`, `Transfer-Encoding`), an upgrade or `CONNECT`, `HEAD`,
//! `Expect`, `Connection`, HTTP/1.0, a head that does not parse or is past the
//! size limit. hyper answers those as it always has (400, 431, ...), so errors
//! and rare forms keep one implementation.

use std::fmt;
use std::future::Future;
use std::io::{self, IoSlice};
use std::mem::MaybeUninit;
use std::pin::{pin, Pin};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::response::Parts;
use http::{Extensions, Method, Response, StatusCode, Uri, Version};
use http_body::Body;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;

use crate::body::{KeptLines, RequestBody};
use crate::fields::{self, Fields, Lines, Scanned};
use crate::h1::{can_have_body, parsed_value, read, until, HeadLines};
use crate::inbound::{Inbound, Target};
use crate::signal::Signal;

/// Most headers in a request head (hyper's limit too).
const MAX_HEADERS: usize = 100;
/// Bytes the read buffer grows by; an idle connection holds no more.
const READ_CHUNK: usize = 4 * 1024;
/// Body frames at least this large go out from their own buffer (a vectored
/// write) instead of being copied behind the head.
const COPY_BELOW: usize = 4 * 1024;

/// How a connection's fast-path service ended.
pub enum Served<I> {
    /// The connection is finished (closed by either side, timed out, shut
    /// down, or failed).
    Done,
    /// A head the fast path does not serve: hyper takes the connection over,
    /// first reading the bytes already read from it.
    Unusual(I, Bytes),
}

/// Serve requests on `io` with `handle` until the connection ends or a
/// request needs hyper. `header_read_timeout` bounds each head, the wait for
/// it included; a head past `max_head` bytes goes to hyper (which answers
/// 431). Once `shutdown` is raised, an idle connection closes, and a
/// request under way gets its response with `connection: close`.
pub async fn serve<I, H, F, B>(
    io: I,
    max_head: usize,
    header_read_timeout: Duration,
    shutdown: &Signal,
    mut handle: H,
) -> Served<I>
where
    I: AsyncRead + AsyncWrite + Unpin,
    H: FnMut(Box<Inbound>) -> F,
    F: Future<Output = Response<B>>,
    B: Body<Data = Bytes> + KeptLines + Unpin,
    B::Error: fmt::Display,
{
    let mut conn = Conn {
        io,
        buf: BytesMut::new(),
        out: Vec::new(),
    };
    // One timer for the connection's life, moved on per head (`h1::until`).
    let mut timer = pin!(tokio::time::sleep(header_read_timeout));
    // And one watch of the shutdown, registered once (`signal::Watch`).
    let mut stop = pin!(shutdown.watch());
    loop {
        let due = Instant::now() + header_read_timeout;
        let head = tokio::select! {
            biased;
            head = conn.head(max_head) => head,
            () = until(timer.as_mut(), due) => break,
            // Only a connection with nothing of a request read is idle.
            () = stop.as_mut(), if conn.buf.is_empty() => break,
        };
        let req = match head {
            Ok(Head::Request(req)) => req,
            Ok(Head::Unusual) => {
                let early = conn.buf.split().freeze();
                return Served::Unusual(conn.io, early);
            }
            Ok(Head::Closed) => return Served::Done,
            Err(e) => {
                tracing::debug!(error = %e, "client connection failed while sending a request head");
                return Served::Done;
            }
        };
        let response = tokio::select! {
            biased;
            response = handle(req) => response,
            // The exchange is dropped: it ends as aborted.
            () = conn.gone() => return Served::Done,
        };
        match conn.respond(response, shutdown.is_raised()).await {
            Ok(Next::KeepAlive) if !shutdown.is_raised() => {}
            Ok(_) => break,
            Err(e) => {
                tracing::debug!(error = %e, "client connection ended during a response");
                return Served::Done;
            }
        }
    }
    let _ = tokio::time::timeout(Duration::from_secs(1), conn.io.shutdown()).await;
    Served::Done
}

/// What arrived on a connection waiting for a request. Returned once per
/// request and moved on, the request on the heap: at one allocation, it is
/// built there and moved as a pointer to the stage that takes it.
enum Head {
    Request(Box<Inbound>),
    Unusual,
    /// The client closed (mid-head or between requests).
    Closed,
}

/// After a response: whether the connection carries another request.
#[derive(Debug, PartialEq, Eq)]
enum Next {
    KeepAlive,
    Close,
}

struct Conn<I> {
    io: I,
    /// Bytes read and not yet parsed.
    buf: BytesMut,
    /// A response head being written (its capacity kept for the next).
    out: Vec<u8>,
}

impl<I: AsyncRead + AsyncWrite + Unpin> Conn<I> {
    /// Read until the buffer holds a whole head.
    async fn head(&mut self, max_head: usize) -> io::Result<Head> {
        loop {
            if !self.buf.is_empty() {
                match parse_request(&mut self.buf) {
                    Parsed::Request(req) => return Ok(Head::Request(req)),
                    Parsed::Unusual => return Ok(Head::Unusual),
                    Parsed::Partial if self.buf.len() >= max_head => return Ok(Head::Unusual),
                    Parsed::Partial => {}
                }
            }
            if read(&mut self.io, &mut self.buf, READ_CHUNK).await? == 0 {
                return Ok(Head::Closed);
            }
        }
    }

    /// Resolves when the client closes or fails while its request is under
    /// way (as hyper, without half-close). Bytes it sends meanwhile (the next
    /// request, pipelined) are kept for later, and end the watch.
    async fn gone(&mut self) {
        if self.buf.is_empty() {
            if let Ok(0) | Err(_) = read(&mut self.io, &mut self.buf, READ_CHUNK).await {
                return;
            }
        }
        std::future::pending().await
    }

    /// Write `response`, its body as the body produces it. (Not an `async
    /// fn`: its future keeps `response` where it was given rather than
    /// copying it into the body's own variable; the body is `Unpin`, so it
    /// is not moved again to be pinned.)
    #[allow(clippy::manual_async_fn)]
    fn respond<'a, B>(
        &'a mut self,
        response: Response<B>,
        closing: bool,
    ) -> impl Future<Output = io::Result<Next>> + 'a
    where
        B: Body<Data = Bytes> + KeptLines + Unpin + 'a,
        B::Error: fmt::Display,
    {
        async move {
            let (mut parts, mut body) = response.into_parts();
            let lines = body.take_lines();
            let length = match body.is_end_stream() {
                true => None,
                false => Some(body.size_hint().exact()),
            };
            if closing {
                ask_to_close(&mut parts.headers);
            }
            let mut out = std::mem::take(&mut self.out);
            out.clear();
            let sending = encode_head(parts, lines, length, closing, &mut out);
            let result = self.send(Pin::new(&mut body), sending, &mut out).await;
            self.out = out;
            result
        }
    }

    async fn send<B>(
        &mut self,
        mut body: Pin<&mut B>,
        sending: io::Result<Sending>,
        out: &mut Vec<u8>,
    ) -> io::Result<Next>
    where
        B: Body<Data = Bytes>,
        B::Error: fmt::Display,
    {
        let Sending { mut encoder, last } = sending?;
        let next = match last {
            true => Next::Close,
            false => Next::KeepAlive,
        };
        if encoder == Encoder::Length(0) {
            // No body goes out (204, 304, or an empty one); one left unread is
            // dropped, as hyper drops it.
            self.write(out, &[], b"").await?;
            return Ok(next);
        }
        loop {
            let ready = body
                .as_mut()
                .poll_frame(&mut Context::from_waker(Waker::noop()));
            let frame = match ready {
                Poll::Ready(frame) => frame,
                Poll::Pending => {
                    // Nothing ready: what is buffered goes out while the body
                    // is awaited.
                    if !out.is_empty() {
                        self.write(out, &[], b"").await?;
                    }
                    tokio::select! {
                        biased;
                        frame = std::future::poll_fn(|cx| body.as_mut().poll_frame(cx)) => frame,
                        () = self.gone() => return Err(io::ErrorKind::ConnectionAborted.into()),
                    }
                }
            };
            let (data, ended) = match frame {
                None => (Bytes::new(), true),
                Some(Err(e)) => return Err(io::Error::other(format!("response body failed: {e}"))),
                Some(Ok(frame)) => (frame.into_data().unwrap_or_default(), body.is_end_stream()),
            };
            let data = encoder.encode(data, out);
            // A body longer than its length ends there, as in hyper.
            let done = ended || encoder == Encoder::Length(0);
            if !data.is_empty() || done {
                self.write(out, &data, encoder.tail(!data.is_empty(), done))
                    .await?;
            }
            if done {
                // A body shorter than its length fails the connection after
                // what it had went out, as in hyper.
                encoder.check_ended()?;
                return Ok(match encoder {
                    Encoder::Close => Next::Close,
                    _ => next,
                });
            }
        }
    }

    /// Write `out`, `data` and `tail` in order, and flush. Small data is
    /// copied behind `out` for one plain write; large data goes from its own
    /// buffer, vectored.
    async fn write(&mut self, out: &mut Vec<u8>, data: &[u8], tail: &[u8]) -> io::Result<()> {
        if data.len() < COPY_BELOW {
            out.extend_from_slice(data);
            out.extend_from_slice(tail);
            self.io.write_all(out).await?;
        } else {
            let mut pieces = [IoSlice::new(out), IoSlice::new(data), IoSlice::new(tail)];
            let mut pieces = &mut pieces[..];
            IoSlice::advance_slices(&mut pieces, 0);
            while !pieces.is_empty() {
                let n = std::future::poll_fn(|cx| {
                    Pin::new(&mut self.io).poll_write_vectored(cx, pieces)
                })
                .await?;
                if n == 0 {
                    return Err(io::ErrorKind::WriteZero.into());
                }
                IoSlice::advance_slices(&mut pieces, n);
            }
        }
        out.clear();
        self.io.flush().await
    }
}

pub(crate) enum Parsed {
    Request(Box<Inbound>),
    Partial,
    Unusual,
}

/// Parse a request head off the front of `buf`, if it holds a whole one the
/// fast path serves. Its URI and header values share the head's bytes.
pub(crate) fn parse_request(buf: &mut BytesMut) -> Parsed {
    // Left uninitialised, as hyper does: httparse writes the entries it returns.
    let mut headers = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut []);
    let len = match httparse::ParserConfig::default().parse_request_with_uninit_headers(
        &mut parsed,
        buf,
        &mut headers,
    ) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Parsed::Partial,
        Err(_) => return Parsed::Unusual,
    };
    let (Some(method), Some(path), Some(1)) = (parsed.method, parsed.path, parsed.version) else {
        return Parsed::Unusual;
    };
    let method = match method {
        "GET" => Method::GET,
        "HEAD" | "CONNECT" => return Parsed::Unusual,
        other => match Method::from_bytes(other.as_bytes()) {
            Ok(m) => m,
            Err(_) => return Parsed::Unusual,
        },
    };
    // hyper refuses longer targets (414).
    if path.len() >= 65534 {
        return Parsed::Unusual;
    }
    // Names now; the target and values once the head's bytes are split off,
    // as slices of them.
    let base = buf.as_ptr() as usize;
    let span = |s: &[u8]| {
        let start = s.as_ptr() as usize - base;
        start..start + s.len()
    };
    let target = span(path.as_bytes());
    let scanned = fields::scan(parsed.headers, base, &buf[..len]);
    let mut spans = Vec::new();
    match scanned {
        Scanned::Unusual => return Parsed::Unusual,
        Scanned::Lines(..) => {}
        Scanned::Map => {
            spans.reserve_exact(parsed.headers.len());
            for h in parsed.headers.iter() {
                let Ok(name) = HeaderName::from_bytes(h.name.as_bytes()) else {
                    return Parsed::Unusual;
                };
                spans.push((name, span(h.value)));
            }
        }
    }
    let head = buf.split_to(len).freeze();
    let target = match Target::origin(head.slice(target)) {
        Ok(origin) => origin,
        Err(other) => match Uri::from_maybe_shared(other) {
            Ok(uri) => Target::Uri(uri),
            Err(_) => return hyper_reads_again(head, buf),
        },
    };
    let fields = match scanned {
        Scanned::Lines(lines, marks) => Fields::Lines(Lines::new(head.slice(lines), marks)),
        _ => {
            // Room for what the proxy adds, so the map never grows on the way out.
            let mut headers = HeaderMap::with_capacity(spans.len() + crate::headers::ROOM);
            for (name, span) in spans {
                headers.append(name, parsed_value(head.slice(span)));
            }
            Fields::Map(headers)
        }
    };
    Parsed::Request(Box::new(Inbound {
        method,
        target,
        version: Version::HTTP_11,
        fields,
        extensions: Extensions::new(),
        body: RequestBody::Empty,
    }))
}

/// A head the fast path parsed but hyper is to answer (a target it cannot
/// take: 400): hyper reads it again from the start.
fn hyper_reads_again(head: Bytes, buf: &mut BytesMut) -> Parsed {
    let mut whole = BytesMut::with_capacity(head.len() + buf.len());
    whole.extend_from_slice(&head);
    whole.extend_from_slice(buf);
    *buf = whole;
    Parsed::Unusual
}

/// `connection: close` on a response, as hyper adds it when the connection
/// will not carry another request.
fn ask_to_close(headers: &mut HeaderMap) {
    match headers.entry(header::CONNECTION) {
        header::Entry::Occupied(mut entry) => {
            if !entry.iter().any(|v| has_token(v, b"close")) {
                entry.append(HeaderValue::from_static("close"));
            }
        }
        header::Entry::Vacant(entry) => {
            entry.insert(HeaderValue::from_static("close"));
        }
    }
}

fn has_token(value: &HeaderValue, token: &[u8]) -> bool {
    value
        .as_bytes()
        .split(|&b| b == b',')
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(token))
}

/// How a response body goes on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Encoder {
    /// This many bytes still to send.
    Length(u64),
    Chunked,
    /// Until the connection closes.
    Close,
}

impl Encoder {
    /// Frame `data`, a chunk's size line going into `out`, and return what of
    /// it goes out: a body longer than its length is cut there, as hyper cuts it.
    fn encode(&mut self, mut data: Bytes, out: &mut Vec<u8>) -> Bytes {
        if data.is_empty() {
            return data;
        }
        match self {
            Encoder::Length(remaining) => {
                if data.len() as u64 > *remaining {
                    data.truncate(*remaining as usize);
                }
                *remaining -= data.len() as u64;
            }
            Encoder::Chunked => {
                let mut hex = [0u8; 16];
                out.extend_from_slice(hex_upper(data.len(), &mut hex));
                out.extend_from_slice(b"\r\n");
            }
            Encoder::Close => {}
        }
        data
    }

    /// What follows a frame's data (`sent`: it had some) when the body has
    /// `ended` or not: a chunk's CRLF, then the last chunk.
    fn tail(&self, sent: bool, ended: bool) -> &'static [u8] {
        match (self, sent, ended) {
            (Encoder::Chunked, true, true) => b"\r\n0\r\n\r\n",
            (Encoder::Chunked, true, false) => b"\r\n",
            (Encoder::Chunked, false, true) => b"0\r\n\r\n",
            _ => b"",
        }
    }

    /// At the body's end: the promised length went out (a short body fails
    /// the connection, as in hyper).
    fn check_ended(&self) -> io::Result<()> {
        match self {
            Encoder::Length(n) if *n > 0 => Err(io::Error::other(
                "response body ended before its content-length",
            )),
            _ => Ok(()),
        }
    }
}

fn hex_upper(mut n: usize, buf: &mut [u8; 16]) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b"0123456789ABCDEF"[n & 0xf];
        n >>= 4;
        if n == 0 {
            return &buf[i..];
        }
    }
}

/// How a response goes out, as its head chose.
#[derive(Debug)]
struct Sending {
    encoder: Encoder,
    /// The connection closes after this response.
    last: bool,
}

/// Write the head of a response to a GET-like HTTP/1.1 request into `out`,
/// byte for byte as hyper's server does (`proto::h1::role::Server::encode`,
/// lowercase names, date on), but for a gateway's header lines kept as they
/// came (`lines`), which go out as they are. `length`: `None` for a body
/// already ended, `Some(None)` for one of unknown length.
fn encode_head(
    mut parts: Parts,
    lines: Option<HeadLines>,
    length: Option<Option<u64>>,
    closing: bool,
    out: &mut Vec<u8>,
) -> io::Result<Sending> {
    // Kept lines frame the body as it goes out, or go into the map (a body
    // that ended before its length: hyper writes its own).
    let lines = lines.and_then(|lines| {
        if lines.length().is_none() || length == Some(lines.length()) {
            return Some(lines);
        }
        lines.into_headers(&mut parts.headers);
        None
    });
    let status = parts.status;
    if status.is_informational() && status != StatusCode::SWITCHING_PROTOCOLS {
        return Err(io::Error::other(
            "a 1xx response cannot be sent as a final one",
        ));
    }
    let mut last = closing || status == StatusCode::SWITCHING_PROTOCOLS;
    let http10 = parts.version == Version::HTTP_10;
    let reason = parts.extensions.get::<hyper::ext::ReasonPhrase>();
    let kept = lines.as_ref().map_or(0, |lines| lines.as_bytes().len());
    out.reserve(30 + kept + parts.headers.len() * 32);
    if !http10 && status == StatusCode::OK && reason.is_none() {
        out.extend_from_slice(b"HTTP/1.1 200 OK\r\n");
    } else {
        out.extend_from_slice(match http10 {
            true => b"HTTP/1.0 ",
            false => b"HTTP/1.1 ",
        });
        out.extend_from_slice(status.as_str().as_bytes());
        out.push(b' ');
        match reason {
            Some(reason) => out.extend_from_slice(reason.as_bytes()),
            None => out.extend_from_slice(status.canonical_reason().unwrap_or("<none>").as_bytes()),
        }
        out.extend_from_slice(b"\r\n");
    }
    let invalid = |what: &str| io::Error::other(format!("response head not sent: {what}"));
    let mut encoder = Encoder::Length(0);
    let mut wrote_len = false;
    let mut wrote_date = false;
    if let Some(lines) = &lines {
        out.extend_from_slice(lines.as_bytes());
        wrote_date = lines.is_dated();
        if let Some(n) = lines.length() {
            encoder = Encoder::Length(n);
            wrote_len = true;
        }
    }
    let mut must_chunk = false;
    let mut prev_len = None;
    // A header whose values are being joined on one line, unterminated.
    let mut open: Option<HeaderName> = None;
    let chunkable = !http10 && can_have_body(status);
    for (name, value) in &parts.headers {
        let continued = open.as_ref() == Some(name);
        if !continued && open.take().is_some() {
            out.extend_from_slice(match must_chunk {
                true => b", chunked\r\n",
                false => b"\r\n",
            });
        }
        match *name {
            header::CONTENT_LENGTH => {
                if wrote_len && !continued {
                    return Err(invalid("content-length after the body's length was set"));
                }
                match length {
                    Some(Some(known)) if !continued => {
                        encoder = Encoder::Length(known);
                        out.extend_from_slice(b"content-length: ");
                        out.extend_from_slice(value.as_bytes());
                        wrote_len = true;
                        open = Some(name.clone());
                    }
                    Some(Some(_)) => {}
                    Some(None) => {
                        let len = std::str::from_utf8(value.as_bytes())
                            .ok()
                            .and_then(|v| v.parse::<u64>().ok())
                            .ok_or_else(|| invalid("illegal content-length"))?;
                        match prev_len {
                            Some(prev) if prev != len => {
                                return Err(invalid("conflicting content-length values"))
                            }
                            Some(_) => {}
                            None => {
                                encoder = Encoder::Length(len);
                                out.extend_from_slice(b"content-length: ");
                                out.extend_from_slice(value.as_bytes());
                                wrote_len = true;
                                open = Some(name.clone());
                                prev_len = Some(len);
                            }
                        }
                    }
                    // An ended body: hyper drops the header and writes its own.
                    None => {}
                }
                continue;
            }
            header::TRANSFER_ENCODING => {
                if wrote_len && !continued {
                    return Err(invalid("transfer-encoding after the body's length was set"));
                }
                if !chunkable {
                    continue;
                }
                wrote_len = true;
                must_chunk = !ends_chunked(value);
                if continued {
                    out.extend_from_slice(b", ");
                } else {
                    encoder = Encoder::Chunked;
                    out.extend_from_slice(b"transfer-encoding: ");
                    open = Some(name.clone());
                }
                out.extend_from_slice(value.as_bytes());
                continue;
            }
            header::CONNECTION | header::TRAILER => {
                if *name == header::TRAILER && !chunkable {
                    continue;
                }
                if *name == header::CONNECTION && has_token(value, b"close") {
                    last = true;
                }
                if continued {
                    out.extend_from_slice(b", ");
                } else {
                    out.extend_from_slice(name.as_str().as_bytes());
                    out.extend_from_slice(b": ");
                    open = Some(name.clone());
                }
                out.extend_from_slice(value.as_bytes());
                continue;
            }
            header::DATE => wrote_date = true,
            _ => {}
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if open.is_some() {
        out.extend_from_slice(match must_chunk {
            true => b", chunked\r\n",
            false => b"\r\n",
        });
    }
    if !wrote_len {
        encoder = match length {
            Some(None) if !chunkable => Encoder::Close,
            Some(None) => {
                out.extend_from_slice(b"transfer-encoding: chunked\r\n");
                Encoder::Chunked
            }
            None | Some(Some(0)) => {
                if can_have_body(status) {
                    out.extend_from_slice(b"content-length: 0\r\n");
                }
                Encoder::Length(0)
            }
            Some(Some(_)) if !can_have_body(status) => Encoder::Length(0),
            Some(Some(n)) => {
                out.extend_from_slice(b"content-length: ");
                out.extend_from_slice(itoa(n, &mut [0; 20]));
                out.extend_from_slice(b"\r\n");
                Encoder::Length(n)
            }
        };
    }
    if !can_have_body(status) {
        encoder = Encoder::Length(0);
    }
    if !wrote_date {
        out.extend_from_slice(b"date: ");
        out.extend_from_slice(&date::now());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    Ok(Sending { encoder, last })
}

fn ends_chunked(value: &HeaderValue) -> bool {
    value
        .as_bytes()
        .rsplit(|&b| b == b',')
        .next()
        .is_some_and(|t| t.trim_ascii().eq_ignore_ascii_case(b"chunked"))
}

fn itoa(mut n: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            return &buf[i..];
        }
    }
}

/// The `date` header's value, made once a second per serving thread.
mod date {
    use std::cell::RefCell;
    use std::time::{Duration, SystemTime, UNIX_EPOCH};

    /// `Sun, 06 Nov 1994 08:49:37 GMT`
    const LEN: usize = 29;

    thread_local! {
        static NOW: RefCell<(u64, [u8; LEN])> = const { RefCell::new((u64::MAX, [0; LEN])) };
    }

    pub fn now() -> [u8; LEN] {
        let now = SystemTime::now();
        let second = now
            .duration_since(UNIX_EPOCH)
            .unwrap_or(Duration::ZERO)
            .as_secs();
        NOW.with_borrow_mut(|(at, text)| {
            if *at != second {
                let made = httpdate::fmt_http_date(now);
                text.copy_from_slice(&made.as_bytes()[..LEN]);
                *at = second;
            }
            *text
        })
    }
}

#[cfg(test)]
mod tests {
    //! The fast path against hyper's server, on generated requests and
    //! responses: the same requests reach the service, and the client reads
    //! the same bytes (the `date` value aside).

    use std::collections::VecDeque;
    use std::convert::Infallible;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};

    use http::Request;
    use http_body::{Frame, SizeHint};
    use hyper::server::conn::http1;
    use hyper::service::service_fn;
    use hyper_util::rt::{TokioIo, TokioTimer};
    use proptest::prelude::*;
    use tokio::io::{AsyncReadExt, DuplexStream};

    use super::*;
    use crate::splice::Prefixed;

    /// A response body: its chunks, a size it announces or not, and whether
    /// it keeps the writer waiting before each chunk.
    #[derive(Debug, Clone)]
    struct Reply {
        status: u16,
        http10: bool,
        headers: Vec<(&'static str, String)>,
        chunks: Vec<Vec<u8>>,
        exact: bool,
        stalls: bool,
        /// Its head comes as a gateway's would, read by `h1::parse_head`
        /// (which keeps the lines of a plain one as they came).
        read: bool,
    }

    struct TestBody {
        chunks: VecDeque<Bytes>,
        exact: bool,
        stalls: bool,
        stalled: bool,
        /// Its head's lines, when a gateway's head kept them.
        lines: Option<HeadLines>,
    }

    impl KeptLines for http_body_util::Full<Bytes> {}
    impl KeptLines for http_body_util::Empty<Bytes> {}

    impl KeptLines for TestBody {
        fn take_lines(&mut self) -> Option<HeadLines> {
            self.lines.take()
        }
    }

    impl Body for TestBody {
        type Data = Bytes;
        type Error = Infallible;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
            if self.stalls && !self.stalled && !self.chunks.is_empty() {
                self.stalled = true;
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            self.stalled = false;
            Poll::Ready(self.chunks.pop_front().map(|c| Ok(Frame::data(c))))
        }

        fn is_end_stream(&self) -> bool {
            self.chunks.is_empty()
        }

        fn size_hint(&self) -> SizeHint {
            match self.exact {
                true => SizeHint::with_exact(self.chunks.iter().map(|c| c.len() as u64).sum()),
                false => SizeHint::default(),
            }
        }
    }

    impl Reply {
        fn total(&self) -> usize {
            self.chunks.iter().map(Vec::len).sum()
        }

        fn response(&self) -> Response<TestBody> {
            let mut res = Response::new(TestBody {
                chunks: self.chunks.iter().map(|c| Bytes::from(c.clone())).collect(),
                exact: self.exact,
                stalls: self.stalls,
                stalled: false,
                lines: None,
            });
            *res.status_mut() = StatusCode::from_u16(self.status).unwrap();
            if self.http10 {
                *res.version_mut() = Version::HTTP_10;
            }
            for (name, value) in &self.headers {
                let value = match (*name, self.exact) {
                    // hyper insists (in debug builds) on a length that matches.
                    ("content-length", true) => self.total().to_string(),
                    _ => value.clone(),
                };
                res.headers_mut()
                    .append(*name, HeaderValue::from_str(&value).unwrap());
            }
            if self.read {
                let mut wire = format!("HTTP/1.1 {} X\r\n", self.status);
                for (name, value) in res.headers() {
                    wire.push_str(&format!("{name}: {}\r\n", value.to_str().unwrap()));
                }
                wire.push_str("\r\n");
                // A head a gateway could not send stays as it was made.
                if let Ok(Some(parsed)) = crate::h1::parse_head(&mut BytesMut::from(&wire[..])) {
                    let (head, lines) = parsed.into_parts();
                    let (mut parts, ()) = head.into_parts();
                    parts.version = res.version();
                    let mut body = res.into_body();
                    body.lines = lines;
                    res = Response::from_parts(parts, body);
                }
            }
            res
        }
    }

    /// What the service saw of a request.
    type Seen = (Method, String, Version, Vec<(String, Vec<u8>)>);

    fn seen(req: &Inbound) -> Seen {
        let headers = req
            .fields
            .clone()
            .into_map()
            .iter()
            .map(|(n, v)| (n.to_string(), v.as_bytes().to_vec()))
            .collect();
        let target = match &req.target {
            Target::Uri(uri) => uri.to_string(),
            Target::Origin(_) => req.target.path_and_query().unwrap().to_owned(),
        };
        (req.method.clone(), target, req.version, headers)
    }

    async fn by_hyper<I>(io: I, reply: Reply, log: Arc<Mutex<Vec<Seen>>>)
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let service = service_fn(move |req: Request<hyper::body::Incoming>| {
            let req = Inbound::from(req.map(|_| RequestBody::Empty));
            log.lock().unwrap().push(seen(&req));
            // As the listeners' service does for hyper.
            let mut response = reply.response();
            crate::h1::lines_into_headers(&mut response);
            std::future::ready(Ok::<_, Infallible>(response))
        });
        let _ = http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(Duration::from_secs(30))
            .max_header_size(16 * 1024)
            .keep_alive(true)
            .serve_connection(TokioIo::new(io), service)
            .with_upgrades()
            .await;
    }

    async fn by_fast_path(io: DuplexStream, reply: Reply, log: Arc<Mutex<Vec<Seen>>>) {
        let shutdown = Arc::new(Signal::new());
        let served = serve(io, 16 * 1024, Duration::from_secs(30), &shutdown, |req| {
            log.lock().unwrap().push(seen(&req));
            std::future::ready(reply.response())
        })
        .await;
        if let Served::Unusual(io, early) = served {
            by_hyper(Prefixed::new(early, io), reply, log).await;
        }
    }

    /// Send `input`, and read until the server closes or has nothing more
    /// to say (time is paused: the wait ends as soon as every task is idle).
    async fn exchange(mut client: DuplexStream, input: &[u8]) -> Vec<u8> {
        client.write_all(input).await.unwrap();
        let mut out = Vec::new();
        loop {
            match tokio::time::timeout(Duration::from_secs(1), client.read_buf(&mut out)).await {
                Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return out,
                Ok(Ok(_)) => {}
            }
        }
    }

    fn masked(mut out: Vec<u8>) -> Vec<u8> {
        let mut at = 0;
        while let Some(i) = out[at..].windows(6).position(|w| w == b"date: ") {
            let start = at + i + 6;
            let end = (start + 29).min(out.len());
            out[start..end].fill(b'#');
            at = end;
        }
        out
    }

    fn run_both(input: &[u8], reply: &Reply) -> [(Vec<Seen>, Vec<u8>); 2] {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .unwrap();
        rt.block_on(async {
            let mut results = Vec::new();
            for fast in [false, true] {
                let (client, server) = tokio::io::duplex(1 << 20);
                let log = Arc::new(Mutex::new(Vec::new()));
                let server = match fast {
                    false => tokio::spawn(by_hyper(server, reply.clone(), log.clone())),
                    true => tokio::spawn(by_fast_path(server, reply.clone(), log.clone())),
                };
                let out = exchange(client, input).await;
                server.abort();
                let seen = std::mem::take(&mut *log.lock().unwrap());
                results.push((seen, masked(out)));
            }
            let fast = results.pop().unwrap();
            [results.pop().unwrap(), fast]
        })
    }

    fn header_value() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("close".to_string()),
            Just("keep-alive".to_string()),
            Just("chunked".to_string()),
            Just("gzip".to_string()),
            Just("0".to_string()),
            Just("7".to_string()),
            Just("Tue, 01 Dec 2026 00:00:00 GMT".to_string()),
            "[ -~]{0,12}".prop_map(|s| s.trim().to_string()),
        ]
    }

    fn reply() -> impl Strategy<Value = Reply> {
        let name = prop_oneof![
            Just("x-a"),
            Just("x-b"),
            Just("set-cookie"),
            Just("content-length"),
            Just("connection"),
            Just("date"),
            Just("transfer-encoding"),
            Just("cache-control"),
        ];
        let chunk = prop_oneof![
            8 => proptest::collection::vec(any::<u8>(), 0..40),
            1 => proptest::collection::vec(any::<u8>(), 4096..6000),
        ];
        (
            proptest::sample::select(vec![200u16, 201, 204, 206, 301, 304, 404, 500, 503]),
            proptest::bool::weighted(0.1),
            proptest::collection::vec((name, header_value()), 0..6),
            proptest::collection::vec(chunk, 0..4),
            any::<bool>(),
            any::<bool>(),
            any::<bool>(),
        )
            .prop_map(
                |(status, http10, headers, chunks, exact, stalls, read)| Reply {
                    status,
                    http10,
                    headers,
                    chunks,
                    exact,
                    stalls,
                    read,
                },
            )
    }

    /// One request head (and its body, if it announces one).
    fn request() -> impl Strategy<Value = Vec<u8>> {
        let method = proptest::sample::select(vec![
            "GET", "GET", "GET", "DELETE", "OPTIONS", "POST", "HEAD", "PUT", "CONNECT",
        ]);
        let name = prop_oneof![
            4 => Just("host"),
            2 => Just("accept"),
            2 => Just("authorization"),
            1 => Just("x-forwarded-for"),
            1 => Just("connection"),
            1 => Just("content-length"),
            1 => Just("transfer-encoding"),
            1 => Just("expect"),
            1 => Just("upgrade"),
            1 => Just("Mixed-Case"),
        ];
        let value = prop_oneof![
            header_value(),
            Just("a\tb".to_string()),
            Just("caf\u{e9}".to_string()),
        ];
        (
            method,
            // Plain targets, any printable byte (a fragment, bytes a URI
            // refuses), non-ASCII, absolute-form.
            prop_oneof![
                4 => "/[a-z0-9/._~%-]{0,24}(\\?[a-z0-9=&%]{0,16})?",
                2 => "/[!-~]{0,24}",
                1 => "/caf\u{e9}(\\?[a-z]{0,4})?",
                1 => "http://example\\.test/[a-z?=]{0,8}",
            ],
            proptest::bool::weighted(0.1),
            proptest::collection::vec((name, value), 0..6),
            proptest::collection::vec(any::<u8>(), 0..12),
            proptest::bool::weighted(0.1),
        )
            .prop_map(|(method, target, http10, headers, body, lf)| {
                let eol = if lf { "\n" } else { "\r\n" };
                let mut head = format!(
                    "{method} {target} HTTP/1.{}{eol}",
                    if http10 { 0 } else { 1 }
                );
                let mut with_body = false;
                for (name, value) in headers {
                    let value = match name {
                        "content-length" => {
                            with_body = true;
                            body.len().to_string()
                        }
                        _ => value,
                    };
                    head.push_str(&format!("{name}: {value}{eol}"));
                }
                head.push_str(eol);
                let mut bytes = head.into_bytes();
                if with_body {
                    bytes.extend_from_slice(&body);
                }
                bytes
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1024))]

        #[test]
        fn the_fast_path_serves_what_hyper_serves_byte_for_byte(
            requests in proptest::collection::vec(request(), 1..4),
            reply in reply(),
        ) {
            let input = requests.concat();
            let [hyper, fast] = run_both(&input, &reply);
            prop_assert_eq!(&fast.0, &hyper.0, "requests the service saw");
            prop_assert_eq!(
                String::from_utf8_lossy(&fast.1),
                String::from_utf8_lossy(&hyper.1),
                "bytes the client read"
            );
        }
    }

    /// Every value byte httparse takes in a request head is one
    /// `HeaderValue` takes, whichever of its scanners reads it: the values
    /// need no second scan (`h1::parsed_value`).
    #[test]
    fn parsed_request_values_are_valid_header_values() {
        for byte in 0..=255u8 {
            let mut long = [b'v'; 40];
            long[20] = byte;
            for value in [&long[..], &[byte][..]] {
                let mut wire = b"GET / HTTP/1.1\r\nx-a: ".to_vec();
                wire.extend_from_slice(value);
                wire.extend_from_slice(b"\r\n\r\n");
                if let Parsed::Request(req) = parse_request(&mut BytesMut::from(&wire[..])) {
                    let map = req.fields.into_map();
                    let got = map["x-a"].as_bytes();
                    assert!(HeaderValue::from_bytes(got).is_ok(), "byte {byte:#x}");
                    assert_eq!(got, value.trim_ascii(), "byte {byte:#x}");
                }
            }
        }
    }

    #[test]
    fn common_requests_are_served_without_hyper_and_the_rest_with_it() {
        let usual: &[&[u8]] = &[
            b"GET /agents/x/gateway/ HTTP/1.1\r\nhost: a\r\nauthorization: Bearer t\r\n\r\n",
            b"DELETE /a?b=c HTTP/1.1\r\n\r\n",
            b"GET http://example.test/ HTTP/1.1\nhost: example.test\n\n",
        ];
        for head in usual {
            let mut buf = BytesMut::from(&head[..]);
            assert!(
                matches!(parse_request(&mut buf), Parsed::Request(_)),
                "{head:?}"
            );
            assert!(buf.is_empty());
        }
        let unusual: &[&[u8]] = &[
            b"POST / HTTP/1.1\r\ncontent-length: 2\r\n\r\nhi",
            b"POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n",
            b"GET / HTTP/1.1\r\nconnection: close\r\n\r\n",
            b"GET / HTTP/1.1\r\nupgrade: websocket\r\n\r\n",
            b"GET / HTTP/1.1\r\nexpect: 100-continue\r\n\r\n",
            b"HEAD / HTTP/1.1\r\n\r\n",
            b"CONNECT example.test:443 HTTP/1.1\r\n\r\n",
            b"GET / HTTP/1.0\r\n\r\n",
            b"GET / HTTP/1.1\r\nbad header\r\n\r\n",
            b"GET /\x7f HTTP/1.1\r\n\r\n",
            b"GET / HTTP/1.1\r\nx: a\x7fb\r\n\r\n",
            b"GET http://[::1/ HTTP/1.1\r\n\r\n",
        ];
        for head in unusual {
            let mut buf = BytesMut::from(&head[..]);
            assert!(
                matches!(parse_request(&mut buf), Parsed::Unusual),
                "{head:?}"
            );
            // Every byte stays for hyper to read.
            assert_eq!(&buf[..], *head);
        }
        let mut partial = BytesMut::from(&b"GET / HTTP/1.1\r\nhost: a\r\n"[..]);
        assert!(matches!(parse_request(&mut partial), Parsed::Partial));
    }

    /// Serve `io` with a handler that answers `hello` once `release` fires,
    /// noting whether its future was dropped unfinished.
    async fn serve_held(
        io: DuplexStream,
        shutdown: Arc<Signal>,
        release: Arc<tokio::sync::Notify>,
        dropped: Arc<AtomicBool>,
    ) -> Served<DuplexStream> {
        struct OnDrop(Arc<AtomicBool>);
        impl Drop for OnDrop {
            fn drop(&mut self) {
                self.0.store(true, Ordering::SeqCst);
            }
        }
        serve(
            io,
            16 * 1024,
            Duration::from_secs(30),
            &shutdown,
            move |_req| {
                let release = release.clone();
                let guard = OnDrop(dropped.clone());
                async move {
                    release.notified().await;
                    std::mem::forget(guard);
                    Response::builder()
                        .header("x-a", "1")
                        .body(http_body_util::Full::new(Bytes::from_static(b"hello")))
                        .unwrap()
                }
            },
        )
        .await
    }

    async fn read_to_end(client: &mut DuplexStream) -> Vec<u8> {
        let mut out = Vec::new();
        tokio::time::timeout(Duration::from_secs(60), client.read_to_end(&mut out))
            .await
            .expect("the server closes the connection")
            .unwrap();
        out
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_leaves_mid_request_drops_the_exchange() {
        let (mut client, server) = tokio::io::duplex(1 << 16);
        let dropped = Arc::new(AtomicBool::new(false));
        let release = Arc::new(tokio::sync::Notify::new());
        let serving = tokio::spawn(serve_held(
            server,
            Arc::new(Signal::new()),
            release,
            dropped.clone(),
        ));
        client.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(!dropped.load(Ordering::SeqCst));
        drop(client);
        let served = tokio::time::timeout(Duration::from_secs(5), serving)
            .await
            .expect("the connection ends when its client leaves")
            .unwrap();
        assert!(matches!(served, Served::Done));
        assert!(dropped.load(Ordering::SeqCst));
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_closes_idle_connections_and_finishes_requests_under_way() {
        // Idle: closed at once, nothing written.
        let (mut client, server) = tokio::io::duplex(1 << 16);
        let shutdown = Arc::new(Signal::new());
        let dropped = Arc::new(AtomicBool::new(false));
        let release = Arc::new(tokio::sync::Notify::new());
        let serving = tokio::spawn(serve_held(
            server,
            shutdown.clone(),
            release.clone(),
            dropped.clone(),
        ));
        tokio::time::sleep(Duration::from_millis(10)).await;
        shutdown.raise();
        assert_eq!(read_to_end(&mut client).await, b"");
        assert!(matches!(serving.await.unwrap(), Served::Done));

        // A request under way: answered, told the connection closes, closed.
        let (mut client, server) = tokio::io::duplex(1 << 16);
        let shutdown = Arc::new(Signal::new());
        let serving = tokio::spawn(serve_held(
            server,
            shutdown.clone(),
            release.clone(),
            dropped.clone(),
        ));
        client.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        tokio::time::sleep(Duration::from_millis(10)).await;
        shutdown.raise();
        tokio::time::sleep(Duration::from_millis(10)).await;
        release.notify_one();
        let out = String::from_utf8(read_to_end(&mut client).await).unwrap();
        assert!(
            out.starts_with(
                "HTTP/1.1 200 OK\r\nx-a: 1\r\nconnection: close\r\ncontent-length: 5\r\n"
            ),
            "{out}"
        );
        assert!(out.ends_with("\r\n\r\nhello"), "{out}");
        assert!(matches!(serving.await.unwrap(), Served::Done));
        assert!(!dropped.load(Ordering::SeqCst));
    }

    #[tokio::test(start_paused = true)]
    async fn the_header_read_timeout_starts_again_after_each_response() {
        let (mut client, server) = tokio::io::duplex(1 << 16);
        let started = tokio::time::Instant::now();
        let serving = tokio::spawn(async move {
            let shutdown = Arc::new(Signal::new());
            let answer_late = |_| async {
                tokio::time::sleep(Duration::from_secs(5)).await;
                Response::new(http_body_util::Full::new(Bytes::from_static(b"ok")))
            };
            let served = serve(
                server,
                16 * 1024,
                Duration::from_secs(7),
                &shutdown,
                answer_late,
            )
            .await;
            (served, started.elapsed())
        });
        // Two requests, each answered 5 s after it came: 10 s in all, past
        // one timeout of 7 s, and the connection still takes the second.
        for n in 1..=2 {
            client.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
            let mut out = Vec::new();
            while !out.ends_with(b"\r\n\r\nok") {
                assert_ne!(client.read_buf(&mut out).await.unwrap(), 0, "response {n}");
            }
            assert_eq!(started.elapsed(), Duration::from_secs(5 * n));
        }
        // Then idle: closed 7 s after the second response.
        assert_eq!(read_to_end(&mut client).await, b"");
        let (served, elapsed) = serving.await.unwrap();
        assert!(matches!(served, Served::Done));
        assert_eq!(elapsed, Duration::from_secs(17));
    }

    #[tokio::test(start_paused = true)]
    async fn a_head_not_sent_within_the_header_read_timeout_closes_the_connection() {
        for sent in [&b""[..], b"GET / HTTP/1.1\r\nhost: a\r\n"] {
            let (mut client, server) = tokio::io::duplex(1 << 16);
            let started = tokio::time::Instant::now();
            let serving = tokio::spawn(async move {
                let shutdown = Arc::new(Signal::new());
                let served = serve(server, 16 * 1024, Duration::from_secs(7), &shutdown, |_| {
                    std::future::ready(Response::new(http_body_util::Empty::<Bytes>::new()))
                })
                .await;
                (served, started.elapsed())
            });
            client.write_all(sent).await.unwrap();
            assert_eq!(read_to_end(&mut client).await, b"");
            let (served, elapsed) = serving.await.unwrap();
            assert!(matches!(served, Served::Done));
            assert_eq!(elapsed, Duration::from_secs(7), "{sent:?}");
        }
    }
}
