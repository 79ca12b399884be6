//! Two-way byte relay for CONNECT tunnels and WebSockets: copies both directions
//! with half-close (EOF one way shuts down the write side of the other and the
//! rest keeps flowing), ends on an idle timeout, when the user is cut off (a
//! block decision at once, bytes past the headroom within [`HEADROOM_CHECK`]), or
//! at the end of the shutdown drain.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_util::sync::CancellationToken;

use crate::enforcement::StreamGuard;

/// Buffer per direction.
const BUF: usize = 64 * 1024;
/// How often a relay compares its user's unflushed bytes with the headroom.
pub const HEADROOM_CHECK: Duration = Duration::from_millis(100);

/// How a relay ended.
#[derive(Debug)]
pub enum RelayEnd {
    /// Both sides finished: bytes client->upstream, upstream->client.
    Done(u64, u64),
    Error(io::Error),
    Idle,
    /// The user became blocked.
    Cut,
    /// The proxy is shutting down and the drain deadline passed.
    Shutdown,
}

/// Relay between `client` and `upstream` until one of the ends in [`RelayEnd`].
pub async fn relay<C, U>(
    client: C,
    upstream: U,
    idle: Duration,
    guard: &StreamGuard,
    hard_stop: &CancellationToken,
) -> RelayEnd
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let progress = Arc::new(AtomicU64::new(0));
    let mut client = Watched {
        inner: client,
        progress: progress.clone(),
    };
    let mut upstream = Watched {
        inner: upstream,
        progress: progress.clone(),
    };
    tokio::select! {
        r = tokio::io::copy_bidirectional_with_sizes(&mut client, &mut upstream, BUF, BUF) => match r {
            Ok((up, down)) => RelayEnd::Done(up, down),
            Err(e) => RelayEnd::Error(e),
        },
        _ = idle_watch(&progress, idle) => RelayEnd::Idle,
        _ = guard.tripped(HEADROOM_CHECK) => RelayEnd::Cut,
        _ = hard_stop.cancelled() => RelayEnd::Shutdown,
    }
}

/// Resolves once `progress` has not moved for `idle`.
async fn idle_watch(progress: &AtomicU64, idle: Duration) {
    let step = (idle / 4).max(Duration::from_millis(10));
    let mut last = progress.load(Ordering::Relaxed);
    let mut quiet = Duration::ZERO;
    loop {
        tokio::time::sleep(step).await;
        let now = progress.load(Ordering::Relaxed);
        if now == last {
            quiet += step;
            if quiet >= idle {
                return;
            }
        } else {
            last = now;
            quiet = Duration::ZERO;
        }
    }
}

/// Bumps `progress` whenever bytes move.
struct Watched<T> {
    inner: T,
    progress: Arc<AtomicU64>,
}

impl<T: AsyncRead + Unpin> AsyncRead for Watched<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let poll = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() != before {
            self.progress.fetch_add(1, Ordering::Relaxed);
        }
        poll
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Watched<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(poll, Poll::Ready(Ok(n)) if n > 0) {
            self.progress.fetch_add(1, Ordering::Relaxed);
        }
        poll
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
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn relays_both_ways_with_half_close() {
        let (client, mut client_peer) = tokio::io::duplex(1024);
        let (upstream, mut upstream_peer) = tokio::io::duplex(1024);
        let (cut, stop) = (
            StreamGuard::from_token(CancellationToken::new()),
            CancellationToken::new(),
        );
        let task = tokio::spawn(async move {
            relay(client, upstream, Duration::from_secs(5), &cut, &stop).await
        });
        client_peer.write_all(b"ping").await.unwrap();
        client_peer.shutdown().await.unwrap(); // client done sending
        let mut got = Vec::new();
        upstream_peer.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"ping");
        // The other direction still works after the half-close.
        upstream_peer.write_all(b"pong").await.unwrap();
        upstream_peer.shutdown().await.unwrap();
        let mut back = Vec::new();
        client_peer.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, b"pong");
        assert!(matches!(task.await.unwrap(), RelayEnd::Done(4, 4)));
    }

    #[tokio::test(start_paused = true)]
    async fn idle_relays_end() {
        let (client, _c) = tokio::io::duplex(64);
        let (upstream, _u) = tokio::io::duplex(64);
        let (cut, stop) = (
            StreamGuard::from_token(CancellationToken::new()),
            CancellationToken::new(),
        );
        let end = relay(client, upstream, Duration::from_secs(60), &cut, &stop).await;
        assert!(matches!(end, RelayEnd::Idle));
    }

    #[tokio::test]
    async fn cut_ends_the_relay() {
        let (client, _c) = tokio::io::duplex(64);
        let (upstream, _u) = tokio::io::duplex(64);
        let (cut, stop) = (CancellationToken::new(), CancellationToken::new());
        cut.cancel();
        let guard = StreamGuard::from_token(cut);
        assert!(matches!(
            relay(client, upstream, Duration::from_secs(60), &guard, &stop).await,
            RelayEnd::Cut
        ));
    }
}
