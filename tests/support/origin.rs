//! Test-only peers: a TCP echo server and TLS material. The HTTP origin is the
//! demo gateway (`tollgate::demo_gateway`).

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

#[allow(unused_imports)]
pub use tollgate::demo_gateway::{body_sum, pattern, DemoGateway as Origin};

/// A TCP echo server on `127.0.0.1:0` (for CONNECT tunnels).
pub struct EchoServer {
    pub addr: SocketAddr,
    stop: CancellationToken,
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl EchoServer {
    pub async fn start() -> EchoServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let st = stop.clone();
        tokio::spawn(async move {
            loop {
                let (mut stream, _) = tokio::select! {
                    a = listener.accept() => match a { Ok(a) => a, Err(_) => continue },
                    _ = st.cancelled() => return,
                };
                tokio::spawn(async move {
                    // Echo as a bulk sender would: each read, up to 256 KiB,
                    // goes back in one write (`tokio::io::copy` would cut it
                    // into 8 KiB writes).
                    let (r, mut w) = stream.split();
                    let mut r = tokio::io::BufReader::with_capacity(256 * 1024, r);
                    let _ = tokio::io::copy_buf(&mut r, &mut w).await;
                    use tokio::io::AsyncWriteExt;
                    let _ = w.shutdown().await;
                });
            }
        });
        EchoServer { addr, stop }
    }
}

/// A self-signed certificate for `localhost` and 127.0.0.1, as (cert PEM, key PEM).
pub fn localhost_cert() -> (String, String) {
    let cert =
        rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
    (cert.cert.pem(), cert.key_pair.serialize_pem())
}

/// A rustls server config for `cert`/`key` PEM, with ALPN `alpn`.
pub fn tls_server_config(
    cert_pem: &str,
    key_pem: &str,
    alpn: &[&[u8]],
) -> Arc<rustls::ServerConfig> {
    use rustls::pki_types::pem::PemObject;
    let certs: Vec<_> = rustls::pki_types::CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .collect::<Result<_, _>>()
        .unwrap();
    let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).unwrap();
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .unwrap();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(config)
}

/// Connect helper used by raw clients.
pub async fn tcp(addr: SocketAddr) -> TcpStream {
    TcpStream::connect(addr).await.expect("connect")
}

/// A certificate for `localhost` written to a fresh directory: the TLS config
/// pointing at it and the certificate PEM (to trust it).
pub fn tls_files(what: &str) -> (tollgate_core::config::TlsConfig, String) {
    let (cert, key) = localhost_cert();
    let dir = super::proxy::temp_dir(what);
    std::fs::write(dir.join("cert.pem"), &cert).unwrap();
    std::fs::write(dir.join("key.pem"), &key).unwrap();
    let config = tollgate_core::config::TlsConfig {
        cert: dir.join("cert.pem"),
        key: dir.join("key.pem"),
    };
    (config, cert)
}

/// A rustls server config from the PEM files of `tls`.
pub fn tls_server_config_from(
    tls: &tollgate_core::config::TlsConfig,
    alpn: &[&[u8]],
) -> Arc<rustls::ServerConfig> {
    let cert = std::fs::read_to_string(&tls.cert).unwrap();
    let key = std::fs::read_to_string(&tls.key).unwrap();
    tls_server_config(&cert, &key, alpn)
}
