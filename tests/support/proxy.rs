//! Running Tollgate's proxy for a test: in-process (bound to port 0, stopped on
//! demand) or as a real `tollgate proxy` child process (for RSS and signals).

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use tollgate_core::config::Config;
use tollgate_proxy::{Listeners, Options, Seams};

use super::wait::eventually;

/// A config for tests: loopback listeners on port 0, fast flushes, loopback
/// destinations allowed, a private spill directory.
pub fn test_config(database_url: &str) -> Config {
    let mut c = Config::default();
    c.database.url = database_url.to_owned();
    c.database.max_connections = 5;
    c.log.filter = "warn".into();
    let p = &mut c.proxy;
    p.egress.listen = "127.0.0.1:0".parse().unwrap();
    p.ingress.listen = "127.0.0.1:0".parse().unwrap();
    p.admin.listen = "127.0.0.1:0".parse().unwrap();
    p.usage_api.listen = "127.0.0.1:0".parse().unwrap();
    p.egress.allow_cidrs = vec!["127.0.0.0/8".parse().unwrap(), "::1/128".parse().unwrap()];
    p.meter.flush_interval = Duration::from_millis(100);
    p.meter.max_retry_backoff = Duration::from_millis(500);
    p.meter.spill_dir = temp_dir("spill");
    p.drain_timeout = Duration::from_secs(10);
    c
}

/// A fresh directory under the system temp dir.
pub fn temp_dir(what: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tollgate-test-{what}-{}", Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A proxy running inside the test process.
pub struct TestProxy {
    pub egress: SocketAddr,
    pub ingress: Option<SocketAddr>,
    pub admin: SocketAddr,
    /// The usage API, when `proxy.usage_api.enabled`.
    pub usage_api: Option<SocketAddr>,
    pub config: Config,
    shutdown: CancellationToken,
    task: Option<JoinHandle<anyhow::Result<()>>>,
}

impl TestProxy {
    pub async fn start(config: Config) -> TestProxy {
        Self::start_with(config, Seams::default()).await
    }

    pub async fn start_with(config: Config, seams: Seams) -> TestProxy {
        let p = &config.proxy;
        let egress = TcpListener::bind(p.egress.listen).await.unwrap();
        let ingress = if p.ingress.enabled {
            Some(TcpListener::bind(p.ingress.listen).await.unwrap())
        } else {
            None
        };
        let admin = TcpListener::bind(p.admin.listen).await.unwrap();
        let usage_api = if p.usage_api.enabled {
            Some(TcpListener::bind(p.usage_api.listen).await.unwrap())
        } else {
            None
        };
        let usage_api_addr = usage_api.as_ref().map(|l| l.local_addr().unwrap());
        let (egress_addr, ingress_addr, admin_addr) = (
            egress.local_addr().unwrap(),
            ingress.as_ref().map(|l| l.local_addr().unwrap()),
            admin.local_addr().unwrap(),
        );
        let listeners = Listeners {
            egress: Some(egress),
            ingress,
            admin,
            usage_api,
        };
        let shutdown = CancellationToken::new();
        // Two serving threads, as on this two-core machine in production:
        // connections land on either, and each keeps its own upstream pool.
        let options = Options {
            migrate: false,
            seams,
            workers: 2,
        };
        let task = tokio::spawn(tollgate_proxy::run(
            config.clone(),
            listeners,
            options,
            shutdown.clone(),
        ));
        let proxy = TestProxy {
            egress: egress_addr,
            ingress: ingress_addr,
            admin: admin_addr,
            usage_api: usage_api_addr,
            config,
            shutdown,
            task: Some(task),
        };
        proxy.wait_ready().await;
        proxy
    }

    async fn wait_ready(&self) {
        let admin = self.admin;
        eventually(
            Duration::from_secs(10),
            "proxy /readyz answers 200",
            || async move {
                match http_get(admin, "/readyz").await.map(|(status, _)| status) {
                    Ok(200) => Ok(()),
                    other => Err(other),
                }
            },
        )
        .await;
    }

    /// Shut down (drain, final flush) and wait for it.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(task) = self.task.take() {
            task.await.expect("proxy task").expect("proxy run");
        }
    }

    pub fn proxy_url(&self, agent: Uuid, token: &str) -> String {
        format!("http://{agent}:{token}@{}", self.egress)
    }
}

impl Drop for TestProxy {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// A minimal HTTP/1.1 GET over a fresh connection: (status, body).
pub async fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").as_bytes())
        .await?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

/// Reserve a free loopback port (bind, read, release).
pub fn free_port() -> u16 {
    let [port] = free_ports();
    port
}

/// `N` distinct free loopback ports: all bound at once before any is
/// released, so no two are the same (as two calls to [`free_port`] can be).
pub fn free_ports<const N: usize>() -> [u16; N] {
    let held: [StdListener; N] = std::array::from_fn(|_| StdListener::bind("127.0.0.1:0").unwrap());
    held.map(|l| l.local_addr().unwrap().port())
}

/// `tollgate proxy` as a child process, configured through the environment.
pub struct ProxyProcess {
    pub child: Child,
    pub egress: SocketAddr,
    pub admin: SocketAddr,
    pub spill_dir: PathBuf,
}

impl ProxyProcess {
    /// Start with `database_url`, `spill_dir` and extra `TOLLGATE_*` overrides;
    /// waits until `/readyz` answers 200 (or, with `expect_ready = false`, until
    /// `/healthz` answers).
    pub async fn start(
        database_url: &str,
        spill_dir: &std::path::Path,
        extra: &[(&str, &str)],
        expect_ready: bool,
    ) -> ProxyProcess {
        let [egress, admin] = free_ports();
        let mut env: HashMap<String, String> = HashMap::from([
            ("DATABASE_URL".into(), database_url.into()),
            (
                "TOLLGATE_PROXY__EGRESS__LISTEN".into(),
                format!("127.0.0.1:{egress}"),
            ),
            ("TOLLGATE_PROXY__INGRESS__ENABLED".into(), "false".into()),
            (
                "TOLLGATE_PROXY__ADMIN__LISTEN".into(),
                format!("127.0.0.1:{admin}"),
            ),
            (
                "TOLLGATE_PROXY__EGRESS__ALLOW_CIDRS".into(),
                "[\"127.0.0.0/8\"]".into(),
            ),
            (
                "TOLLGATE_PROXY__METER__FLUSH_INTERVAL".into(),
                "100ms".into(),
            ),
            (
                "TOLLGATE_PROXY__METER__MAX_RETRY_BACKOFF".into(),
                "500ms".into(),
            ),
            (
                "TOLLGATE_PROXY__METER__SPILL_DIR".into(),
                spill_dir.display().to_string(),
            ),
            ("TOLLGATE_DATABASE__CONNECT_TIMEOUT".into(), "1s".into()),
            ("TOLLGATE_LOG__FILTER".into(), "info".into()),
        ]);
        for (k, v) in extra {
            env.insert((*k).into(), (*v).into());
        }
        let child = Command::new(super::tollgate_bin())
            .arg("proxy")
            .env_remove("TOLLGATE_CONFIG")
            .envs(env)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn tollgate proxy");
        let p = ProxyProcess {
            child,
            egress: SocketAddr::from(([127, 0, 0, 1], egress)),
            admin: SocketAddr::from(([127, 0, 0, 1], admin)),
            spill_dir: spill_dir.to_path_buf(),
        };
        let path = if expect_ready { "/readyz" } else { "/healthz" };
        let admin = p.admin;
        eventually(
            Duration::from_secs(20),
            format!("tollgate proxy answers {path} with 200"),
            || async move {
                match http_get(admin, path).await.map(|(status, _)| status) {
                    Ok(200) => Ok(()),
                    other => Err(other),
                }
            },
        )
        .await;
        p
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Resident set size in KiB, from /proc.
    pub fn rss_kib(&self) -> u64 {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }

    pub fn signal(&self, signal: &str) {
        Command::new("kill")
            .args([&format!("-{signal}"), &self.pid().to_string()])
            .status()
            .unwrap();
    }

    /// SIGTERM and wait for exit (bounded).
    pub async fn terminate(mut self) -> std::process::ExitStatus {
        self.signal("TERM");
        let child = &mut self.child;
        eventually(Duration::from_secs(40), "proxy exits after SIGTERM", || {
            let exited = child.try_wait().unwrap();
            async move { exited.ok_or("still running") }
        })
        .await
    }
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
