//! Request smuggling guard for HTTP/1 client connections.
//!
//! hyper resolves a request carrying both `Content-Length` and
//! `Transfer-Encoding` the RFC 9112 way (chunked wins, `Content-Length` is
//! dropped, the connection closes afterwards), so the request the service sees no
//! longer shows the conflict. Tollgate refuses such requests with 400 instead, so
//! this reader watches the bytes hyper reads, follows message boundaries itself
//! (request heads, `Content-Length` bodies, chunked bodies), and queues one
//! verdict per request head, in order. The egress service takes the verdict for
//! each request as it handles it.
//!
//! The guard only ever adds a refusal; when it cannot follow the stream
//! (malformed input hyper will reject anyway, a tunnel or upgrade), it stops
//! watching and queues nothing more.

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
    /// Both `Content-Length` and `Transfer-Encoding`, or conflicting lengths.
    Ambiguous,
}

/// Verdicts in request order, shared between the reader and the service.
#[derive(Debug, Default)]
pub struct Verdicts(Mutex<VecDeque<Framing>>);

impl Verdicts {
    /// The verdict for the next request the service handles (`Clear` if the guard
    /// stopped watching).
    pub fn next(&self) -> Framing {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pop_front()
            .unwrap_or(Framing::Clear)
    }

    fn push(&self, f: Framing) {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push_back(f);
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
    Off,
}

/// Longest chunk-size line or trailer section followed before giving up.
const MAX_LINE: usize = 64 * 1024;

/// Reads through to `inner`, following HTTP/1 request framing.
pub struct FramingGuard<T> {
    inner: T,
    state: State,
    max_head: usize,
    verdicts: Arc<Verdicts>,
}

impl<T> FramingGuard<T> {
    pub fn new(inner: T, max_head: usize, verdicts: Arc<Verdicts>) -> Self {
        Self {
            inner,
            state: State::Head(Vec::new()),
            max_head,
            verdicts,
        }
    }

    fn scan(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            let consumed = match &mut self.state {
                State::Off => return,
                State::Head(buf) if buf.is_empty() => {
                    // The usual case: the whole head arrived in one read. Look at it
                    // where it is instead of copying it.
                    let leading = data
                        .iter()
                        .take_while(|b| **b == b'\r' || **b == b'\n')
                        .count();
                    match find_head_end(&data[leading..]) {
                        Some(end) => {
                            let end = leading + end;
                            self.state = self.on_head(&data[leading..end]);
                            end
                        }
                        None => {
                            buf.extend_from_slice(data);
                            if buf.len() > self.max_head {
                                self.state = State::Off;
                            }
                            return;
                        }
                    }
                }
                State::Head(buf) => {
                    let before = buf.len();
                    buf.extend_from_slice(data);
                    // Blank lines before a request line are allowed (RFC 9112 §2.2).
                    let leading = buf
                        .iter()
                        .take_while(|b| **b == b'\r' || **b == b'\n')
                        .count();
                    // Search only the new bytes (and the 3 before them): a head
                    // trickling in byte by byte must not cost quadratic time.
                    let from = before.saturating_sub(3).max(leading);
                    let Some(end) = find_head_end(&buf[from..]).map(|i| from + i) else {
                        if buf.len() > self.max_head {
                            self.state = State::Off;
                        }
                        return;
                    };
                    let head = std::mem::take(buf);
                    let consumed = end - before;
                    self.state = self.on_head(&head[leading..end]);
                    consumed
                }
                State::Body(remaining) => {
                    let n = (*remaining).min(data.len() as u64);
                    *remaining -= n;
                    if *remaining == 0 {
                        self.state = State::Head(Vec::new());
                    }
                    n as usize
                }
                State::ChunkSize(line) => match data.iter().position(|b| *b == b'\n') {
                    None => {
                        line.extend_from_slice(data);
                        if line.len() > MAX_LINE {
                            self.state = State::Off;
                        }
                        data.len()
                    }
                    Some(i) => {
                        line.extend_from_slice(&data[..i]);
                        let text = String::from_utf8_lossy(line);
                        let size = text.split(';').next().unwrap_or("").trim();
                        self.state = match u64::from_str_radix(size, 16) {
                            Ok(0) => State::Trailers(Vec::new()),
                            Ok(n) => State::ChunkData(n),
                            Err(_) => State::Off,
                        };
                        i + 1
                    }
                },
                State::ChunkData(remaining) => {
                    let n = (*remaining).min(data.len() as u64);
                    *remaining -= n;
                    if *remaining == 0 {
                        self.state = State::ChunkDataEnd(2);
                    }
                    n as usize
                }
                State::ChunkDataEnd(left) => {
                    let n = (*left as usize).min(data.len());
                    *left -= n as u8;
                    if *left == 0 {
                        self.state = State::ChunkSize(Vec::new());
                    }
                    n
                }
                State::Trailers(buf) => {
                    // Ends at an empty line: either right away ("\r\n") or after trailer fields.
                    let before = buf.len();
                    buf.extend_from_slice(data);
                    let from = before.saturating_sub(3);
                    let end = if buf.starts_with(b"\r\n") {
                        Some(2)
                    } else {
                        find_head_end(&buf[from..]).map(|i| from + i)
                    };
                    match end {
                        Some(end) => {
                            self.state = State::Head(Vec::new());
                            end - before
                        }
                        None => {
                            if buf.len() > MAX_LINE {
                                self.state = State::Off;
                            }
                            data.len()
                        }
                    }
                }
            };
            data = &data[consumed.min(data.len())..];
        }
    }

    fn on_head(&self, head: &[u8]) -> State {
        // More than hyper accepts (100), so a head hyper serves is never cut short.
        let mut headers = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; 128];
        let mut req = httparse::Request::new(&mut []);
        if !matches!(
            req.parse_with_uninit_headers(head, &mut headers),
            Ok(httparse::Status::Complete(_))
        ) {
            return State::Off; // hyper answers this one itself
        }
        let mut lengths = Vec::new();
        let mut chunked = false;
        let mut transfer_encoding = false;
        let mut upgrade = false;
        for h in req.headers.iter() {
            if h.name.eq_ignore_ascii_case("content-length") {
                lengths.push(
                    std::str::from_utf8(h.value)
                        .ok()
                        .and_then(|v| v.trim().parse::<u64>().ok()),
                );
            } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                transfer_encoding = true;
                chunked = h.value.rsplit(|b| *b == b',').next().is_some_and(|last| {
                    String::from_utf8_lossy(last)
                        .trim()
                        .eq_ignore_ascii_case("chunked")
                });
            } else if h.name.eq_ignore_ascii_case("upgrade") {
                upgrade = true;
            }
        }
        let conflicting_lengths = lengths.windows(2).any(|w| w[0] != w[1]);
        let ambiguous = (transfer_encoding && !lengths.is_empty()) || conflicting_lengths;
        self.verdicts.push(if ambiguous {
            Framing::Ambiguous
        } else {
            Framing::Clear
        });
        if ambiguous || upgrade || req.method == Some("CONNECT") {
            // hyper closes after an ambiguous request; tunnels and upgrades leave HTTP.
            return State::Off;
        }
        if transfer_encoding {
            return if chunked {
                State::ChunkSize(Vec::new())
            } else {
                State::Off
            };
        }
        match lengths.first() {
            Some(Some(0)) | None => State::Head(Vec::new()),
            Some(Some(n)) => State::Body(*n),
            Some(None) => State::Off,
        }
    }
}

/// The offset just past the first `\r\n\r\n` in `data`.
fn find_head_end(data: &[u8]) -> Option<usize> {
    let mut from = 0;
    while let Some(i) = data[from..].iter().position(|b| *b == b'\n') {
        let lf = from + i;
        if lf >= 3 && &data[lf - 3..lf] == b"\r\n\r" {
            return Some(lf + 1);
        }
        from = lf + 1;
    }
    None
}

impl<T: AsyncRead + Unpin> AsyncRead for FramingGuard<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let poll = Pin::new(&mut self.inner).poll_read(cx, buf);
        if !matches!(self.state, State::Off) && buf.filled().len() > before {
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
        while let Some(v) = verdicts.0.lock().unwrap().pop_front() {
            out.push(v);
        }
        out
    }

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

        /// Well-formed pipelines of chunked and sized requests are followed exactly.
        #[test]
        fn generated_pipelines_give_one_clear_verdict_per_request(
            bodies in proptest::collection::vec((0usize..300, proptest::prelude::any::<bool>()), 1..8),
            split in 1usize..97,
        ) {
            let mut stream = Vec::new();
            for (len, chunked) in &bodies {
                let body = vec![b'\r'; *len]; // bodies full of CRs must not look like heads
                if *chunked {
                    stream.extend_from_slice(b"POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n");
                    for piece in body.chunks(37) {
                        stream.extend_from_slice(format!("{:x}\r\n", piece.len()).as_bytes());
                        stream.extend_from_slice(piece);
                        stream.extend_from_slice(b"\r\n");
                    }
                    stream.extend_from_slice(b"0\r\n\r\n");
                } else {
                    stream.extend_from_slice(format!("POST / HTTP/1.1\r\ncontent-length: {len}\r\n\r\n").as_bytes());
                    stream.extend_from_slice(&body);
                }
            }
            proptest::prop_assert_eq!(verdicts_of(&stream, split), vec![Framing::Clear; bodies.len()]);
        }
    }

    #[test]
    fn stops_at_tunnels_and_garbage() {
        let connect = b"CONNECT a:443 HTTP/1.1\r\n\r\nGET / HTTP/1.1\r\ncontent-length: 1\r\ntransfer-encoding: chunked\r\n\r\n";
        assert_eq!(verdicts_of(connect, 10), [Framing::Clear]);
        assert_eq!(
            verdicts_of(b"\x16\x03\x01garbage\r\n\r\nGET / HTTP/1.1\r\n\r\n", 4),
            []
        );
    }
}
