//! Moving a tunnel's bytes socket → pipe → socket with `splice(2)`, so a bulk
//! transfer never crosses user space: the kernel hands page references from
//! one socket to the other instead of copying every byte out and back in.
//!
//! A relay direction takes a [`Pipe`] only while it moves bulk (see
//! `relay::Pump`), so an idle or chatty tunnel holds no extra descriptors, and
//! both of its sides must be plain TCP sockets ([`Conduit::socket`]): TLS, a
//! hyper upgrade with bytes already buffered, or a test's in-memory stream keep
//! the copying relay. This module holds the only `unsafe` code in the crate:
//! the three system calls std does not wrap.
#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::TcpStream;

use crate::meter::MeteredIo;

/// What a relay side is, beyond a byte stream: the TCP socket right under it,
/// if nothing sits between, and where the bytes spliced through it are counted.
pub trait Conduit: AsyncRead + AsyncWrite + Unpin {
    /// The socket whose bytes are exactly this stream's bytes, or `None`.
    fn socket(&self) -> Option<&TcpStream> {
        None
    }

    /// `n` bytes were spliced out of [`Conduit::socket`] (read from it).
    fn spliced_out(&mut self, _n: usize) {}

    /// `n` bytes were spliced into [`Conduit::socket`] (written to it).
    fn spliced_in(&mut self, _n: usize) {}
}

impl Conduit for TcpStream {
    fn socket(&self) -> Option<&TcpStream> {
        Some(self)
    }
}

/// A metered socket counts spliced bytes as it counts read and written ones.
impl Conduit for MeteredIo<TcpStream> {
    fn socket(&self) -> Option<&TcpStream> {
        Some(self.get_ref())
    }

    fn spliced_out(&mut self, n: usize) {
        self.sent(n);
    }

    fn spliced_in(&mut self, n: usize) {
        self.received(n);
    }
}

impl<T: hyper::rt::Read + hyper::rt::Write + Unpin> Conduit for hyper_util::rt::TokioIo<T> {}

impl Conduit for tokio::io::DuplexStream {}

impl<L: Conduit, R: Conduit> Conduit for tokio_util::either::Either<L, R> {
    fn socket(&self) -> Option<&TcpStream> {
        match self {
            Self::Left(l) => l.socket(),
            Self::Right(r) => r.socket(),
        }
    }

    fn spliced_out(&mut self, n: usize) {
        match self {
            Self::Left(l) => l.spliced_out(n),
            Self::Right(r) => r.spliced_out(n),
        }
    }

    fn spliced_in(&mut self, n: usize) {
        match self {
            Self::Left(l) => l.spliced_in(n),
            Self::Right(r) => r.spliced_in(n),
        }
    }
}

/// A stream with bytes already read from it (by hyper, past a CONNECT head)
/// served first: its socket can be spliced only once they are gone.
#[derive(Debug)]
pub struct Prefixed<T> {
    early: Bytes,
    inner: T,
}

impl<T> Prefixed<T> {
    pub fn new(early: Bytes, inner: T) -> Self {
        Self { early, inner }
    }

    /// The early bytes not yet read, and the stream.
    pub fn into_parts(self) -> (Bytes, T) {
        (self.early, self.inner)
    }
}

impl<T: Conduit> Conduit for Prefixed<T> {
    fn socket(&self) -> Option<&TcpStream> {
        match self.early.is_empty() {
            true => self.inner.socket(),
            false => None,
        }
    }

    fn spliced_out(&mut self, n: usize) {
        self.inner.spliced_out(n);
    }

    fn spliced_in(&mut self, n: usize) {
        self.inner.spliced_in(n);
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Prefixed<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.early.is_empty() {
            return Pin::new(&mut self.inner).poll_read(cx, buf);
        }
        let n = self.early.len().min(buf.remaining());
        buf.put_slice(&self.early.split_to(n));
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Prefixed<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// A kernel pipe holding the bytes one relay direction has taken from its
/// source and not yet given to its destination.
#[derive(Debug)]
pub struct Pipe {
    read_end: OwnedFd,
    write_end: OwnedFd,
    capacity: usize,
}

impl Pipe {
    /// A pipe that holds `capacity` bytes. Fails if the descriptors run out or
    /// the kernel will not size it so (`/proc/sys/fs/pipe-max-size`, or the
    /// user's pipe pages past `pipe-user-pages-soft`): the caller keeps copying.
    pub fn new(capacity: usize) -> io::Result<Pipe> {
        let mut fds: [libc::c_int; 2] = [-1; 2];
        // SAFETY: pipe2 writes two descriptors into the two-element array.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: both descriptors were just opened here and nothing else owns them.
        let (read_end, write_end) =
            unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        let size = libc::c_int::try_from(capacity).map_err(|_| io::ErrorKind::InvalidInput)?;
        // SAFETY: F_SETPIPE_SZ takes one int argument; the descriptor is open.
        let sized = unsafe { libc::fcntl(write_end.as_raw_fd(), libc::F_SETPIPE_SZ, size) };
        if sized < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Pipe {
            read_end,
            write_end,
            capacity: usize::try_from(sized).unwrap_or(capacity),
        })
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Move up to `len` bytes from `socket` into the pipe, which must be empty:
    /// `Ready(Ok(0))` at the end of the socket's stream.
    pub fn poll_fill(
        &self,
        cx: &mut Context<'_>,
        socket: &TcpStream,
        len: usize,
    ) -> Poll<io::Result<usize>> {
        poll_splice(cx, socket, Interest::READABLE, || {
            splice(socket.as_fd(), self.write_end.as_fd(), len)
        })
    }

    /// Move up to `len` of the bytes in the pipe into `socket`.
    pub fn poll_drain(
        &self,
        cx: &mut Context<'_>,
        socket: &TcpStream,
        len: usize,
    ) -> Poll<io::Result<usize>> {
        poll_splice(cx, socket, Interest::WRITABLE, || {
            splice(self.read_end.as_fd(), socket.as_fd(), len)
        })
    }
}

/// Run `op` once `socket` is ready for `interest`, until it stops saying
/// "would block". The pipe side never blocks: a relay fills only an empty
/// pipe and drains only bytes it holds, so `EAGAIN` is always the socket's.
fn poll_splice(
    cx: &mut Context<'_>,
    socket: &TcpStream,
    interest: Interest,
    mut op: impl FnMut() -> io::Result<usize>,
) -> Poll<io::Result<usize>> {
    loop {
        let ready = match interest.is_readable() {
            true => socket.poll_read_ready(cx),
            false => socket.poll_write_ready(cx),
        };
        std::task::ready!(ready)?;
        match socket.try_io(interest, &mut op) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            done => return Poll::Ready(done),
        }
    }
}

/// One `splice(2)` of up to `len` bytes between a socket and a pipe, without
/// blocking on either.
fn splice(from: BorrowedFd<'_>, to: BorrowedFd<'_>, len: usize) -> io::Result<usize> {
    loop {
        // SAFETY: both descriptors are borrowed and open; null offsets mean
        // "the current position", which sockets and pipes require.
        let n = unsafe {
            libc::splice(
                from.as_raw_fd(),
                std::ptr::null_mut(),
                to.as_raw_fd(),
                std::ptr::null_mut(),
                len,
                libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
            )
        };
        match usize::try_from(n) {
            Ok(n) => return Ok(n),
            Err(_) => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn socket_pair() -> (TcpStream, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (a, b) = tokio::join!(
            TcpStream::connect(listener.local_addr().unwrap()),
            listener.accept()
        );
        (a.unwrap(), b.unwrap().0)
    }

    #[tokio::test]
    async fn moves_bytes_between_sockets_through_the_pipe_and_sees_the_end() {
        let (mut source, from) = socket_pair().await;
        let (to, mut sink) = socket_pair().await;
        let pipe = Pipe::new(64 * 1024).unwrap();
        assert!(pipe.capacity() >= 64 * 1024);
        let message: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let writer = {
            let message = message.clone();
            tokio::spawn(async move {
                source.write_all(&message).await.unwrap();
                source.shutdown().await.unwrap();
            })
        };
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            sink.read_to_end(&mut got).await.unwrap();
            got
        });
        let mut moved = 0;
        loop {
            let n = std::future::poll_fn(|cx| pipe.poll_fill(cx, &from, pipe.capacity()))
                .await
                .unwrap();
            if n == 0 {
                break;
            }
            let mut queued = n;
            while queued > 0 {
                queued -= std::future::poll_fn(|cx| pipe.poll_drain(cx, &to, queued))
                    .await
                    .unwrap();
            }
            moved += n;
        }
        drop(to);
        writer.await.unwrap();
        assert_eq!(moved, message.len());
        assert_eq!(reader.await.unwrap(), message);
    }
}
