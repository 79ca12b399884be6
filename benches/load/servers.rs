//! The servers under test, each a child process pinned to the server core with
//! a private config under the harness's work directory, on loopback ports:
//! Tollgate (egress and ingress in one process, one tokio worker), nginx and
//! haproxy as reverse proxies, squid and tinyproxy as forward proxies (one
//! worker or thread each). Every child is stopped when its [`Process`] drops,
//! also when the harness fails half way.

use std::fmt::Write as _;
use std::fs;
use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use uuid::Uuid;

/// A child process, terminated (TERM, then KILL) on drop.
pub struct Process {
    pub name: String,
    pub child: Child,
    log: PathBuf,
}

impl Process {
    /// Spawn `cmd` with stdout and stderr going to `log`.
    pub fn spawn(name: &str, mut cmd: Command, log: &Path) -> anyhow::Result<Process> {
        let file = fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
        cmd.stdout(file.try_clone()?);
        Self::spawn_with_stdout(name, cmd, log)
    }

    /// Spawn `cmd` with stderr going to `log` and stdout as the caller set it.
    pub fn spawn_with_stdout(name: &str, mut cmd: Command, log: &Path) -> anyhow::Result<Process> {
        let file = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("opening {}", log.display()))?;
        cmd.stderr(file);
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {name} ({:?})", cmd.get_program()))?;
        Ok(Process {
            name: name.to_owned(),
            child,
            log: log.to_path_buf(),
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Resident memory of the process and all its descendants, KiB.
    pub fn tree_rss_kib(&self) -> u64 {
        let mut total = 0;
        let mut pending = vec![self.pid()];
        while let Some(pid) = pending.pop() {
            total += rss_kib(pid).unwrap_or(0);
            pending.extend(children_of(pid));
        }
        total
    }

    /// CPU time (user + system, every thread) of the process and all its
    /// descendants so far, seconds.
    pub fn tree_cpu_secs(&self) -> f64 {
        let cpu = tree_cpu(self.pid());
        cpu.user_secs + cpu.system_secs
    }

    /// Fail with the tail of the log if the process has exited.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!(
                "{} exited ({status}); last log lines:\n{}",
                self.name,
                log_tail(&self.log)
            );
        }
        Ok(())
    }

    /// Wait until `addr` accepts connections (or the process dies).
    pub fn wait_listening(&mut self, addr: SocketAddr) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            self.check_alive()?;
            if std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "{} did not listen on {addr} within 20 s; last log lines:\n{}",
                    self.name,
                    log_tail(&self.log)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        let _ = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn rss_kib(pid: u32) -> Option<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Fields of `/proc/<pid>/stat` after the parenthesised command name, which may
/// itself hold spaces: state, ppid, ...
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.get(stat.rfind(')')? + 2..)?;
    Some(rest.split_whitespace().map(str::to_owned).collect())
}

/// utime and stime of every thread of `pid`, clock ticks.
fn cpu_ticks(pid: u32) -> Option<(u64, u64)> {
    let fields = stat_fields(pid)?;
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((utime, stime))
}

/// CPU time a process tree has used, seconds.
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuTime {
    pub user_secs: f64,
    pub system_secs: f64,
}

impl CpuTime {
    pub fn since(self, earlier: CpuTime) -> CpuTime {
        CpuTime {
            user_secs: self.user_secs - earlier.user_secs,
            system_secs: self.system_secs - earlier.system_secs,
        }
    }
}

/// CPU time of `pid` and all its descendants so far (every thread).
pub fn tree_cpu(pid: u32) -> CpuTime {
    let (mut user, mut system) = (0, 0);
    let mut pending = vec![pid];
    while let Some(pid) = pending.pop() {
        let (u, s) = cpu_ticks(pid).unwrap_or((0, 0));
        user += u;
        system += s;
        pending.extend(children_of(pid));
    }
    let tick = clock_ticks_per_sec();
    CpuTime {
        user_secs: user as f64 / tick,
        system_secs: system as f64 / tick,
    }
}

/// `CLK_TCK`, the unit of the CPU times in `/proc` (100 on every usual Linux).
fn clock_ticks_per_sec() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// This process's resident memory, KiB.
pub fn own_rss_kib() -> u64 {
    rss_kib(std::process::id()).unwrap_or(0)
}

fn children_of(pid: u32) -> Vec<u32> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|p| stat_fields(*p).and_then(|f| f.get(1)?.parse::<u32>().ok()) == Some(pid))
        .collect()
}

fn log_tail(path: &Path) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

/// A free loopback port (bound, read, released).
pub fn free_port() -> anyhow::Result<u16> {
    Ok(StdListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

pub fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// A command pinned to `cpu` (one core, or a `taskset` list such as `0,1`).
pub fn pinned(cpu: impl std::fmt::Display, program: &str) -> Command {
    let mut cmd = Command::new("taskset");
    cmd.arg("-c").arg(cpu.to_string()).arg(program);
    cmd.stdin(Stdio::null());
    cmd
}

/// Whether `program` is on the PATH (or an existing path).
pub fn installed(program: &str) -> bool {
    if program.contains('/') {
        return Path::new(program).exists();
    }
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(program).is_file()))
}

/// The agent credentials the forward proxies check.
#[derive(Debug, Clone)]
pub struct Credentials {
    pub agent_id: Uuid,
    pub token: String,
}

/// Ports of a Tollgate process.
pub struct Tollgate {
    pub egress: SocketAddr,
    pub ingress: SocketAddr,
    pub process: Process,
}

impl Tollgate {
    /// `tollgate proxy` with `workers` tokio workers on `cpu`, egress and
    /// ingress on, defaults otherwise except what loopback benchmarking needs.
    #[allow(clippy::too_many_arguments)]
    pub fn start(
        binary: &Path,
        cpu: &str,
        workers: usize,
        database_url: &str,
        origin_port: u16,
        bulk_port: u16,
        dir: &Path,
    ) -> anyhow::Result<Tollgate> {
        let (egress, ingress, admin) = (free_port()?, free_port()?, free_port()?);
        fs::create_dir_all(dir)?;
        let spill = dir.join("tollgate-spill");
        let mut cmd = pinned(cpu, &binary.display().to_string());
        cmd.arg("proxy");
        for (key, _) in std::env::vars() {
            if key.starts_with("TOLLGATE_") || key == "RUST_LOG" {
                cmd.env_remove(key);
            }
        }
        cmd.env("DATABASE_URL", database_url)
            .env("TOKIO_WORKER_THREADS", workers.to_string())
            .env("TOLLGATE_LOG__FILTER", "warn")
            .env(
                "TOLLGATE_PROXY__EGRESS__LISTEN",
                loopback(egress).to_string(),
            )
            .env(
                "TOLLGATE_PROXY__INGRESS__LISTEN",
                loopback(ingress).to_string(),
            )
            .env("TOLLGATE_PROXY__ADMIN__LISTEN", loopback(admin).to_string())
            .env(
                "TOLLGATE_PROXY__INGRESS__GATEWAY_PORT",
                origin_port.to_string(),
            )
            .env("TOLLGATE_PROXY__EGRESS__ALLOW_CIDRS", r#"["127.0.0.0/8"]"#)
            .env(
                "TOLLGATE_PROXY__EGRESS__CONNECT_PORTS",
                format!("[{bulk_port}]"),
            )
            // Idle upstream connections kept per origin/VPS, as nginx's `keepalive
            // 128` below: with 64 concurrent requests to one VPS, the defaults
            // (16 per VPS, 32 per host) would close and reopen connections.
            .env("TOLLGATE_PROXY__INGRESS__UPSTREAM_MAX_IDLE_PER_VPS", "128")
            .env("TOLLGATE_PROXY__EGRESS__UPSTREAM_MAX_IDLE_PER_HOST", "128")
            // Room for the idle keep-alive measurement beside the defaults' 10,000.
            .env("TOLLGATE_PROXY__EGRESS__MAX_CONNECTIONS", "20000")
            .env("TOLLGATE_PROXY__INGRESS__MAX_CONNECTIONS", "20000")
            // The one benchmark agent holds every idle connection: its own cap
            // (1024 by default) and opening rate go up with the listeners'.
            .env("TOLLGATE_PROXY__AGENT_LIMITS__MAX_CONNECTIONS", "20000")
            .env(
                "TOLLGATE_PROXY__AGENT_LIMITS__NEW_CONNECTIONS_PER_SECOND",
                "20000",
            )
            .env(
                "TOLLGATE_PROXY__METER__SPILL_DIR",
                spill.display().to_string(),
            );
        let mut process = Process::spawn("tollgate", cmd, &dir.join("tollgate.log"))?;
        process.wait_listening(loopback(admin))?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while !ready(loopback(admin)) {
            process.check_alive()?;
            if Instant::now() > deadline {
                bail!("tollgate did not become ready within 30 s");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(Tollgate {
            egress: loopback(egress),
            ingress: loopback(ingress),
            process,
        })
    }
}

fn ready(admin: SocketAddr) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect_timeout(&admin, Duration::from_secs(1)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if s.write_all(b"GET /readyz HTTP/1.1\r\nhost: admin\r\nconnection: close\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    buf.starts_with(b"HTTP/1.1 200")
}

/// A reverse proxy (nginx, haproxy): an HTTP/1.1 port and an h2c port.
pub struct ReverseProxy {
    pub http1: SocketAddr,
    pub h2c: SocketAddr,
    pub process: Process,
}

/// nginx, `workers` worker processes, upstream keep-alive, access log off.
pub fn nginx(
    cpu: &str,
    workers: usize,
    origin_port: u16,
    dir: &Path,
) -> anyhow::Result<ReverseProxy> {
    let (http1, h2c) = (free_port()?, free_port()?);
    let d = dir.display();
    let location = "location / {
            proxy_pass http://origin;
            proxy_http_version 1.1;
            proxy_set_header Connection \"\";
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
        }";
    let config = format!(
        "daemon off;
master_process on;
worker_processes {workers};
worker_rlimit_nofile 20000;
pid {d}/nginx.pid;
error_log {d}/nginx-error.log warn;
events {{ worker_connections 16384; }}
http {{
    access_log off;
    client_body_temp_path {d}/nginx-body;
    proxy_temp_path {d}/nginx-proxy;
    fastcgi_temp_path {d}/nginx-fastcgi;
    uwsgi_temp_path {d}/nginx-uwsgi;
    scgi_temp_path {d}/nginx-scgi;
    keepalive_requests 1000000;
    keepalive_timeout 120s;
    upstream origin {{
        server 127.0.0.1:{origin_port};
        keepalive 128;
        keepalive_requests 1000000;
    }}
    server {{
        listen 127.0.0.1:{http1};
        {location}
    }}
    server {{
        listen 127.0.0.1:{h2c} http2;
        {location}
    }}
}}
"
    );
    let path = dir.join("nginx.conf");
    fs::write(&path, config)?;
    let mut cmd = pinned(cpu, "nginx");
    cmd.arg("-c")
        .arg(&path)
        .arg("-p")
        .arg(dir)
        .arg("-e")
        .arg(dir.join("nginx-startup.log"));
    let mut process = Process::spawn("nginx", cmd, &dir.join("nginx.log"))?;
    process.wait_listening(loopback(http1))?;
    process.wait_listening(loopback(h2c))?;
    Ok(ReverseProxy {
        http1: loopback(http1),
        h2c: loopback(h2c),
        process,
    })
}

/// Most client connections haproxy accepts here: it needs two descriptors per
/// connection and cannot raise the descriptor limit past the hard limit (20,000
/// in the container this was written on).
pub const HAPROXY_MAX_CONNECTIONS: usize = 9_950;

/// haproxy, `workers` threads, connection reuse to the origin, `option forwardfor`.
pub fn haproxy(
    cpu: &str,
    workers: usize,
    origin_port: u16,
    dir: &Path,
) -> anyhow::Result<ReverseProxy> {
    let (http1, h2c) = (free_port()?, free_port()?);
    let config = format!(
        "global
    nbthread {workers}
    maxconn {HAPROXY_MAX_CONNECTIONS}
defaults
    mode http
    timeout connect 5s
    timeout client 120s
    timeout server 120s
    timeout http-keep-alive 120s
    option http-keep-alive
    option forwardfor
    http-reuse always
frontend reverse
    bind 127.0.0.1:{http1}
    bind 127.0.0.1:{h2c} proto h2
    default_backend origin
backend origin
    server origin 127.0.0.1:{origin_port}
"
    );
    let path = dir.join("haproxy.cfg");
    fs::write(&path, config)?;
    let mut cmd = pinned(cpu, "haproxy");
    cmd.arg("-db").arg("-f").arg(&path);
    let mut process = Process::spawn("haproxy", cmd, &dir.join("haproxy.log"))?;
    process.wait_listening(loopback(http1))?;
    Ok(ReverseProxy {
        http1: loopback(http1),
        h2c: loopback(h2c),
        process,
    })
}

/// A forward proxy (squid, tinyproxy).
pub struct ForwardProxy {
    pub addr: SocketAddr,
    pub process: Process,
}

/// squid, one process (`-N`, `workers 1`), no caching, Basic auth through
/// `basic_ncsa_auth` with the agent's id and token.
pub fn squid(cpu: usize, creds: &Credentials, dir: &Path) -> anyhow::Result<ForwardProxy> {
    let port = free_port()?;
    let d = dir.display();
    let passwd = dir.join("squid-passwd");
    let hash = Command::new("openssl")
        .args(["passwd", "-1", &creds.token])
        .output()
        .context("running openssl passwd for squid's password file")?;
    if !hash.status.success() {
        bail!("openssl passwd failed");
    }
    fs::write(
        &passwd,
        format!(
            "{}:{}",
            creds.agent_id,
            String::from_utf8_lossy(&hash.stdout).trim()
        ),
    )?;
    let helper = "/usr/lib/squid/basic_ncsa_auth";
    if !Path::new(helper).exists() {
        bail!("{helper} not found");
    }
    let mut config = String::new();
    writeln!(
        config,
        "http_port 127.0.0.1:{port}
workers 1
pid_filename {d}/squid.pid
cache_log {d}/squid-cache.log
access_log none
cache_store_log none
cache deny all
coredump_dir {d}
max_filedescriptors 20000
shutdown_lifetime 1 seconds
auth_param basic program {helper} {passwd}
auth_param basic children 2 startup=1 idle=1
auth_param basic credentialsttl 2 hours
acl agents proxy_auth REQUIRED
http_access allow agents
http_access deny all",
        passwd = passwd.display()
    )?;
    let path = dir.join("squid.conf");
    fs::write(&path, config)?;
    let mut cmd = pinned(cpu, "squid");
    cmd.arg("-N").arg("-f").arg(&path);
    let mut process = Process::spawn("squid", cmd, &dir.join("squid.log"))?;
    process.wait_listening(loopback(port))?;
    Ok(ForwardProxy {
        addr: loopback(port),
        process,
    })
}

/// tinyproxy (thread per connection), Basic auth with the agent's id and token,
/// CONNECT allowed to the bulk port.
pub fn tinyproxy(
    cpu: usize,
    creds: &Credentials,
    bulk_port: u16,
    max_clients: usize,
    dir: &Path,
) -> anyhow::Result<ForwardProxy> {
    let port = free_port()?;
    let d = dir.display();
    let config = format!(
        "User nobody
Group nogroup
Port {port}
Listen 127.0.0.1
Timeout 600
MaxClients {max_clients}
LogFile \"{d}/tinyproxy-events.log\"
LogLevel Critical
PidFile \"{d}/tinyproxy.pid\"
BasicAuth {} {}
ConnectPort {bulk_port}
",
        creds.agent_id, creds.token
    );
    let path = dir.join("tinyproxy.conf");
    fs::write(&path, config)?;
    let mut cmd = pinned(cpu, "tinyproxy");
    cmd.arg("-d").arg("-c").arg(&path);
    let mut process = Process::spawn("tinyproxy", cmd, &dir.join("tinyproxy.log"))?;
    process.wait_listening(loopback(port))?;
    Ok(ForwardProxy {
        addr: loopback(port),
        process,
    })
}
