//! A TCP relay between Tollgate and PostgreSQL that a test can cut and restore,
//! so database outages are simulated without touching the shared server.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

pub struct PgRelay {
    pub addr: SocketAddr,
    cut: Arc<AtomicBool>,
    generation: Arc<Mutex<CancellationToken>>,
    stop: CancellationToken,
}

impl Drop for PgRelay {
    fn drop(&mut self) {
        self.stop.cancel();
        self.generation.lock().unwrap().cancel();
    }
}

impl PgRelay {
    /// Relay `127.0.0.1:0` to `target`.
    pub async fn start(target: SocketAddr) -> PgRelay {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let cut = Arc::new(AtomicBool::new(false));
        let generation = Arc::new(Mutex::new(CancellationToken::new()));
        let stop = CancellationToken::new();
        let (c, g, st) = (cut.clone(), generation.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                let (client, _) = tokio::select! {
                    a = listener.accept() => match a { Ok(a) => a, Err(_) => continue },
                    _ = st.cancelled() => return,
                };
                if c.load(Ordering::SeqCst) {
                    drop(client); // refused: the "server" is down
                    continue;
                }
                let token = g.lock().unwrap().clone();
                tokio::spawn(async move {
                    let Ok(mut upstream) = TcpStream::connect(target).await else {
                        return;
                    };
                    let mut client = client;
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut upstream) => {}
                        _ = token.cancelled() => {}
                    }
                });
            }
        });
        PgRelay {
            addr,
            cut,
            generation,
            stop,
        }
    }

    /// Drop every relayed connection and refuse new ones.
    pub fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        let mut g = self.generation.lock().unwrap();
        g.cancel();
        *g = CancellationToken::new();
    }

    /// Accept and relay again.
    pub fn restore(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }

    /// `url` with its host and port replaced by the relay's.
    pub fn url_for(&self, url: &str) -> String {
        with_address(url, self.addr)
    }
}

/// `url` with its host and port replaced by `addr`.
pub fn with_address(url: &str, addr: SocketAddr) -> String {
    let scheme_end = url.find("://").unwrap() + 3;
    let rest = &url[scheme_end..];
    let at = rest.find('@').map_or(0, |i| i + 1);
    let host_end = rest[at..].find(['/', '?']).map_or(rest.len(), |i| at + i);
    format!(
        "{}{}{}{}",
        &url[..scheme_end],
        &rest[..at],
        addr,
        &rest[host_end..]
    )
}
