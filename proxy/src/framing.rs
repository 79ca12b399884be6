//! Request smuggling guard for HTTP/1 client connections.
//!
//! hyper resolves a request carrying both `Content-Length` and
//! `Transfer-Encoding` the RFC 9112 way (chunked wins, `Content-Length` is
//! dropped, the connection closes afterwards), so the request the service sees no
//! longer shows the conflict. Tollgate refuses such requests with 400 instead, so
//! this reader watches the bytes hyper reads, follows message boundaries the way
//! hyper does (request heads with CRLF or bare-LF line ends, `Content-Length`
//! bodies, chunked bodies and trailers), and queues one verdict per request head,
//! in order. The service takes the verdict for each request as it handles it.
//!
//! Every message is judged on its own: no header of one request (`Upgrade`, a
//! `CONNECT` that is then refused, odd line endings) changes how the next one is
//! judged. After a `CONNECT` or an `Upgrade` the guard cannot know whether the
//! connection left HTTP, so it keeps following the bytes as HTTP: if the
//! exchange was refused, hyper reads the next request from exactly there, and
//! if it was a tunnel, nobody asks for the verdicts (their number is capped).
//!
//! When the guard cannot follow the stream (input hyper rejects, a tunnel that
//! does not look like HTTP), it stops reading and fails closed: any further
//! request on the connection is refused.

use std::collections::VecDeque;
use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// What the guard concluded about one request head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    Clear,
    /// Both `Content-Length` and `Transfer-Encoding`, conflicting lengths, or a
    /// message the guard cannot place (it lost track of the connection's framing).
    Ambiguous,
}

/// Verdicts in request order, shared between the reader and the service.
#[derive(Debug, Default)]
pub struct Verdicts(Mutex<VecDeque<Framing>>);

impl Verdicts {
    /// The verdict for the next request the service handles. Every request hyper
    /// parses crossed the guard first, so a missing verdict means the guard lost
    /// track of the stream: `Ambiguous`.
    pub fn next(&self) -> Framing {
        self.lock().pop_front().unwrap_or(Framing::Ambiguous)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Framing>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queue a verdict; `false` (and nothing queued) once `cap` are waiting.
    fn push(&self, f: Framing, cap: usize) -> bool {
        let mut queue = self.lock();
        if queue.len() >= cap {
            return false;
        }
        queue.push_back(f);
        true
    }
}

#[derive(Debug)]
enum State {
    Head(Vec<u8>),
    Body(u64),
    ChunkSize(Vec<u8>),
    ChunkData(u64),
    ChunkDataEnd(u8),
    Trailers(Vec<u8>),
    /// No longer following: every later request is refused.
    Lost,
}

/// Longest chunk-size line followed before giving up (hyper refuses far less).
const MAX_LINE: usize = 64 * 1024;
/// Shortest request head hyper accepts (`GET / HTTP/1.1\n\n`).
const MIN_HEAD: usize = 16;

/// Reads through to `inner`, following HTTP/1 request framing.
pub struct FramingGuard<T> {
    inner: T,
    state: State,
    max_head: usize,
    /// Most verdicts waiting at once. hyper reads at most its buffer ahead of the
    /// request it serves, so a client still speaking HTTP to hyper stays far
    /// below it; beyond it the bytes belong to a tunnel.
    max_queued: usize,
    verdicts: Arc<Verdicts>,
}

impl<T> FramingGuard<T> {
    pub fn new(inner: T, max_head: usize, verdicts: Arc<Verdicts>) -> Self {
        // hyper buffers up to max(max_head, 64 KiB) (see `server::http1_builder`).
        let max_queued = max_head.max(64 * 1024) / MIN_HEAD + 1;
        Self {
            inner,
            state: State::Head(Vec::new()),
            max_head,
            max_queued,
            verdicts,
        }
    }

    /// The stream under the guard, once it no longer carries HTTP (a tunnel).
    pub fn into_inner(self) -> T {
        self.inner
    }

    fn scan(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            let (consumed, next) = self.step(data);
            if let Some(next) = next {
                self.state = next;
            }
            data = &data[consumed.min(data.len())..];
        }
    }

    /// Follow one piece of `data`: how much of it was consumed, and the state
    /// that follows (if it changes).
    fn step(&mut self, data: &[u8]) -> (usize, Option<State>) {
        let max_head = self.max_head;
        match &mut self.state {
            State::Lost => (data.len(), None),
            State::Head(buf) if buf.is_empty() => {
                // Blank lines before a request line are allowed (RFC 9112 §2.2).
                let leading = data
                    .iter()
                    .take_while(|b| **b == b'\r' || **b == b'\n')
                    .count();
                let Some(first) = data.get(leading) else {
                    return (data.len(), None);
                };
                if !is_token(*first) {
                    // Not a request line (TLS, WebSocket frames, garbage): hyper
                    // refuses it, or the connection is a tunnel now.
                    return (data.len(), Some(State::Lost));
                }
                // The usual case: the whole head arrived in one read. Look at it
                // where it is instead of copying it.
                match find_head_end(&data[leading..]) {
                    Some(end) => {
                        let end = leading + end;
                        (end, Some(self.on_head(&data[leading..end])))
                    }
                    None => {
                        buf.extend_from_slice(&data[leading..]);
                        let lost = buf.len() > max_head;
                        (data.len(), lost.then_some(State::Lost))
                    }
                }
            }
            State::Head(buf) => {
                let before = buf.len();
                buf.extend_from_slice(data);
                // Search only the new bytes (and the 2 before them): a head
                // trickling in byte by byte must not cost quadratic time.
                let from = before.saturating_sub(2);
                let Some(end) = find_head_end(&buf[from..]).map(|i| from + i) else {
                    let lost = buf.len() > max_head;
                    return (data.len(), lost.then_some(State::Lost));
                };
                let head = std::mem::take(buf);
                (end - before, Some(self.on_head(&head[..end])))
            }
            State::Body(remaining) => {
                let n = (*remaining).min(data.len() as u64);
                *remaining -= n;
                let done = *remaining == 0;
                (n as usize, done.then(|| State::Head(Vec::new())))
            }
            State::ChunkSize(line) => match data.iter().position(|b| *b == b'\n') {
                None => {
                    line.extend_from_slice(data);
                    let lost = line.len() > MAX_LINE;
                    (data.len(), lost.then_some(State::Lost))
                }
                Some(i) => {
                    line.extend_from_slice(&data[..i]);
                    let text = String::from_utf8_lossy(line);
                    let size = text.split(';').next().unwrap_or("").trim();
                    let next = match u64::from_str_radix(size, 16) {
                        Ok(0) => State::Trailers(Vec::new()),
                        Ok(n) => State::ChunkData(n),
                        Err(_) => State::Lost,
                    };
                    (i + 1, Some(next))
                }
            },
            State::ChunkData(remaining) => {
                let n = (*remaining).min(data.len() as u64);
                *remaining -= n;
                let done = *remaining == 0;
                (n as usize, done.then_some(State::ChunkDataEnd(2)))
            }
            State::ChunkDataEnd(left) => {
                let n = (*left as usize).min(data.len());
                *left -= n as u8;
                let done = *left == 0;
                (n, done.then(|| State::ChunkSize(Vec::new())))
            }
            State::Trailers(buf) => {
                // hyper ends the trailer section at an empty CRLF line: right away
                // ("\r\n") or after trailer fields. Bare LFs do not end it.
                let before = buf.len();
                buf.extend_from_slice(data);
                let from = before.saturating_sub(3);
                let end = if buf.starts_with(b"\r\n") {
                    Some(2)
                } else {
                    find_crlf_blank_line(&buf[from..]).map(|i| from + i)
                };
                match end {
                    Some(end) => (end - before, Some(State::Head(Vec::new()))),
                    None => {
                        let lost = buf.len() > max_head.max(MAX_LINE);
                        (data.len(), lost.then_some(State::Lost))
                    }
                }
            }
        }
    }

    /// Judge one request head on its own and say how its body is framed, the way
    /// hyper frames it (RFC 9112 §6.3).
    fn on_head(&self, head: &[u8]) -> State {
        // More than hyper accepts (100), so a head hyper serves is never cut short.
        let mut headers = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; 128];
        let mut req = httparse::Request::new(&mut []);
        if !matches!(
            req.parse_with_uninit_headers(head, &mut headers),
            Ok(httparse::Status::Complete(_))
        ) {
            return State::Lost; // hyper answers this one itself
        }
        let mut lengths = Vec::new();
        let mut chunked = false;
        let mut transfer_encoding = false;
        for h in req.headers.iter() {
            if h.name.eq_ignore_ascii_case("content-length") {
                lengths.push(decimal(h.value));
            } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                transfer_encoding = true;
                // As hyper: the last Transfer-Encoding field decides.
                chunked = h.value.rsplit(|b| *b == b',').next().is_some_and(|last| {
                    String::from_utf8_lossy(last)
                        .trim()
                        .eq_ignore_ascii_case("chunked")
                });
            }
        }
        let conflicting_lengths = lengths.windows(2).any(|w| w[0] != w[1]);
        let ambiguous = (transfer_encoding && !lengths.is_empty()) || conflicting_lengths;
        let verdict = if ambiguous {
            Framing::Ambiguous
        } else {
            Framing::Clear
        };
        if !self.verdicts.push(verdict, self.max_queued) {
            return State::Lost;
        }
        // Whatever the method and headers (`CONNECT`, `Upgrade`), the body is
        // framed as hyper frames it: if the exchange is refused, hyper reads the
        // next request right after it.
        if transfer_encoding {
            // hyper refuses a request whose last encoding is not chunked, and
            // Transfer-Encoding in HTTP/1.0.
            return if chunked && req.version == Some(1) {
                State::ChunkSize(Vec::new())
            } else {
                State::Lost
            };
        }
        match lengths.first() {
            Some(Some(0)) | None => State::Head(Vec::new()),
            Some(Some(n)) => State::Body(*n),
            Some(None) => State::Lost, // hyper refuses it
        }
    }
}

/// A `Content-Length` value as hyper reads it: decimal digits only.
fn decimal(value: &[u8]) -> Option<u64> {
    if value.is_empty() {
        return None;
    }
    value.iter().try_fold(0u64, |n, b| match b {
        b'0'..=b'9' => n.checked_mul(10)?.checked_add(u64::from(b - b'0')),
        _ => None,
    })
}

/// Whether `b` may start a request line (a method is a token, RFC 9110 §5.6.2).
fn is_token(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// The offset just past the blank line that ends a request head. Lines may end
/// in CRLF or a bare LF, as httparse (and so hyper) accepts both.
fn find_head_end(data: &[u8]) -> Option<usize> {
    let mut from = 0;
    while let Some(i) = data[from..].iter().position(|b| *b == b'\n') {
        let lf = from + i;
        match data.get(lf + 1) {
            Some(b'\n') => return Some(lf + 2),
            Some(b'\r') if data.get(lf + 2) == Some(&b'\n') => return Some(lf + 3),
            _ => {}
        }
        from = lf + 1;
    }
    None
}

/// The offset just past the first `\r\n\r\n` in `data`.
fn find_crlf_blank_line(data: &[u8]) -> Option<usize> {
    data.windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| i + 4)
}

impl<T: AsyncRead + Unpin> AsyncRead for FramingGuard<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let poll = Pin::new(&mut self.inner).poll_read(cx, buf);
        if !matches!(self.state, State::Lost) && buf.filled().len() > before {
            self.as_mut().get_mut().scan(&buf.filled()[before..]);
        }
        poll
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for FramingGuard<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verdicts_of(stream: &[u8], split_every: usize) -> Vec<Framing> {
        let verdicts = Arc::new(Verdicts::default());
        let mut guard = FramingGuard::new((), 64 * 1024, verdicts.clone());
        for piece in stream.chunks(split_every.max(1)) {
            guard.scan(piece);
        }
        let mut out = Vec::new();
        while let Some(v) = verdicts.lock().pop_front() {
            out.push(v);
        }
        out
    }

    const SMUGGLED: &[u8] =
        b"POST http://a/ HTTP/1.1\r\nhost: a\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\n";

    #[test]
    fn follows_pipelined_requests_with_bodies_in_any_split() {
        let stream = b"GET http://a/ HTTP/1.1\r\nhost: a\r\n\r\n\
            POST http://a/ HTTP/1.1\r\nhost: a\r\ncontent-length: 40\r\n\r\n\
            transfer-encoding: x\r\ncontent-length: 99\
            POST http://a/ HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\n\r\n\
            5;ext=1\r\nhello\r\n1A\r\ncontent-length: 1\r\n\r\n\r\nxxx\r\n0\r\nx-trailer: 1\r\n\r\n\
            POST http://a/ HTTP/1.1\r\nhost: a\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\n";
        for split in [1, 2, 3, 7, 64, stream.len()] {
            assert_eq!(
                verdicts_of(stream, split),
                [
                    Framing::Clear,
                    Framing::Clear,
                    Framing::Clear,
                    Framing::Ambiguous
                ],
                "split every {split}"
            );
        }
    }

    #[test]
    fn conflicting_lengths_are_ambiguous_and_equal_ones_are_not() {
        let dup = b"POST / HTTP/1.1\r\ncontent-length: 3\r\ncontent-length: 3\r\n\r\nabc\
                    GET / HTTP/1.1\r\n\r\n";
        assert_eq!(verdicts_of(dup, 5), [Framing::Clear, Framing::Clear]);
        let conflict = b"POST / HTTP/1.1\r\ncontent-length: 3\r\ncontent-length: 4\r\n\r\n";
        assert_eq!(verdicts_of(conflict, 100), [Framing::Ambiguous]);
        let te_first =
            b"POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\ncontent-length: 4\r\n\r\n";
        assert_eq!(verdicts_of(te_first, 100), [Framing::Ambiguous]);
    }

    /// Each trick that once switched the guard off for the rest of the
    /// connection, followed by a smuggling attempt: the attempt is still caught.
    #[test]
    fn no_earlier_message_switches_the_guard_off() {
        let tricks: [(&str, &[u8]); 5] = [
            (
                "stray Upgrade header",
                b"GET http://a/ HTTP/1.1\r\nhost: a\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\n",
            ),
            (
                "refused CONNECT",
                b"CONNECT a:443 HTTP/1.1\r\nhost: a:443\r\n\r\n",
            ),
            (
                "CONNECT with a body",
                b"CONNECT a:443 HTTP/1.1\r\nhost: a:443\r\ncontent-length: 5\r\n\r\nabcde",
            ),
            (
                "bare LF line endings",
                b"GET http://a/ HTTP/1.1\nhost: a\n\n",
            ),
            (
                "bare LF head with a chunked body",
                b"POST http://a/ HTTP/1.1\nhost: a\ntransfer-encoding: chunked\n\n3\r\nabc\r\n0\r\n\r\n",
            ),
        ];
        for (name, trick) in tricks {
            let mut stream = trick.to_vec();
            stream.extend_from_slice(SMUGGLED);
            for split in [1, 2, 5, stream.len()] {
                assert_eq!(
                    verdicts_of(&stream, split),
                    [Framing::Clear, Framing::Ambiguous],
                    "{name}, split every {split}"
                );
            }
        }
        // Bare-LF smuggling itself, and a head ending in LF CRLF.
        let bare = b"POST / HTTP/1.1\ncontent-length: 3\ntransfer-encoding: chunked\n\n";
        assert_eq!(verdicts_of(bare, 3), [Framing::Ambiguous]);
        let mixed = b"GET / HTTP/1.1\nhost: a\n\r\nGET / HTTP/1.1\r\n\n";
        assert_eq!(verdicts_of(mixed, 1), [Framing::Clear, Framing::Clear]);
    }

    #[test]
    fn a_guard_that_lost_track_refuses_what_follows() {
        let verdicts = Arc::new(Verdicts::default());
        let mut guard = FramingGuard::new((), 64 * 1024, verdicts.clone());
        // A CONNECT whose client starts TLS at once: the CONNECT keeps its
        // verdict, the tunnel bytes are not HTTP.
        guard.scan(b"CONNECT a:443 HTTP/1.1\r\n\r\n\x16\x03\x01\x02\x00garbage\r\n\r\n");
        guard.scan(b"GET / HTTP/1.1\r\n\r\n");
        assert_eq!(verdicts.next(), Framing::Clear);
        assert_eq!(verdicts.next(), Framing::Ambiguous);
        assert_eq!(verdicts.next(), Framing::Ambiguous);
    }

    #[test]
    fn a_tunnel_carrying_http_cannot_grow_the_queue_without_bound() {
        let verdicts = Arc::new(Verdicts::default());
        let mut guard = FramingGuard::new((), 8 * 1024, verdicts.clone());
        let request = b"GET / HTTP/1.1\r\n\r\n";
        for _ in 0..100_000 {
            guard.scan(request);
        }
        assert!(matches!(guard.state, State::Lost));
        assert_eq!(verdicts.lock().len(), guard.max_queued);
    }

    proptest::proptest! {
        /// Arbitrary client bytes never panic the guard, and how they arrive
        /// (split into pieces) never changes its verdicts.
        #[test]
        fn arbitrary_input_is_followed_the_same_way_in_any_split(
            data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..2048),
            split in 1usize..64,
        ) {
            proptest::prop_assert_eq!(verdicts_of(&data, split), verdicts_of(&data, data.len().max(1)));
        }

        /// Well-formed pipelines of chunked and sized requests, with either line
        /// ending and stray `Upgrade` headers, are followed exactly, and a
        /// smuggling attempt after them is caught.
        #[test]
        fn generated_pipelines_give_one_clear_verdict_per_request(
            requests in proptest::collection::vec(
                (0usize..300, proptest::prelude::any::<(bool, bool, bool)>()),
                1..8,
            ),
            split in 1usize..97,
        ) {
            let mut stream = Vec::new();
            for (len, (chunked, bare_lf, upgrade)) in &requests {
                let eol = if *bare_lf { "\n" } else { "\r\n" };
                let body = vec![b'\r'; *len]; // bodies full of CRs must not look like heads
                let upgrade = if *upgrade { format!("upgrade: websocket{eol}") } else { String::new() };
                if *chunked {
                    stream.extend_from_slice(format!("POST / HTTP/1.1{eol}{upgrade}transfer-encoding: chunked{eol}{eol}").as_bytes());
                    for piece in body.chunks(37) {
                        stream.extend_from_slice(format!("{:x}\r\n", piece.len()).as_bytes());
                        stream.extend_from_slice(piece);
                        stream.extend_from_slice(b"\r\n");
                    }
                    stream.extend_from_slice(b"0\r\n\r\n");
                } else {
                    stream.extend_from_slice(format!("POST / HTTP/1.1{eol}{upgrade}content-length: {len}{eol}{eol}").as_bytes());
                    stream.extend_from_slice(&body);
                }
            }
            stream.extend_from_slice(SMUGGLED);
            let mut expected = vec![Framing::Clear; requests.len()];
            expected.push(Framing::Ambiguous);
            proptest::prop_assert_eq!(verdicts_of(&stream, split), expected);
        }
    }

    #[test]
    fn garbage_gets_no_verdict() {
        assert_eq!(
            verdicts_of(b"\x16\x03\x01garbage\r\n\r\nGET / HTTP/1.1\r\n\r\n", 4),
            []
        );
    }
}
