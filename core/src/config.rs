//! Configuration: one TOML file, then `DATABASE_URL`, then `TOLLGATE_*`
//! environment overrides, validated as a whole before anything binds a port.
//!
//! Every section mirrors a runtime module: `[proxy.egress]` configures the egress
//! listener, `[proxy.meter]` the meter and flusher, `[monitor]` the sampler.
//! Environment overrides address a key by its path with `__` between parts:
//! `TOLLGATE_PROXY__EGRESS__LISTEN=0.0.0.0:3128` sets `proxy.egress.listen`.
//! Values are read as TOML where they parse (`443`, `true`, `[443, 8443]`) and as
//! strings otherwise. `TOLLGATE_CONFIG` names the file when no path is given.
//! Precedence, lowest first: built-in defaults, the file, `DATABASE_URL`,
//! `TOLLGATE_*`.
//!
//! `deploy/tollgate.example.toml` lists every field with its unit and default.

pub mod duration;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

/// Environment variable naming the config file when no path is given.
pub const CONFIG_PATH_ENV: &str = "TOLLGATE_CONFIG";
/// Prefix of the environment overrides.
pub const ENV_PREFIX: &str = "TOLLGATE_";

/// A configuration that cannot be used, with one line saying where and why.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} is not valid TOML: {message}")]
    Syntax { path: PathBuf, message: String },
    #[error("environment variable {var}: {message}")]
    Env { var: String, message: String },
    #[error("config key `{key}`: {message}")]
    Field { key: String, message: String },
}

fn field_error(key: &str, message: impl Into<String>) -> ConfigError {
    ConfigError::Field {
        key: key.to_owned(),
        message: message.into(),
    }
}

/// The whole configuration.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub database: DatabaseConfig,
    pub log: LogConfig,
    pub proxy: ProxyConfig,
    pub monitor: MonitorConfig,
}

/// `[database]`: the PostgreSQL server holding users, plans and usage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DatabaseConfig {
    /// Connection URL. `DATABASE_URL` overrides the file.
    /// Default `postgres://postgres@127.0.0.1:5432/tollgate`.
    pub url: String,
    /// Pool size per process. Default 10.
    pub max_connections: u32,
    /// Time to establish a connection before giving up. Default `5s`.
    #[serde(with = "duration")]
    pub connect_timeout: Duration,
    /// Server-side `statement_timeout` for every statement. Default `15s`.
    #[serde(with = "duration")]
    pub statement_timeout: Duration,
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        Self {
            url: "postgres://postgres@127.0.0.1:5432/tollgate".into(),
            max_connections: 10,
            connect_timeout: Duration::from_secs(5),
            statement_timeout: Duration::from_secs(15),
        }
    }
}

/// `[log]`: tracing output.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// `human` or `json`. Default `human`.
    pub format: LogFormat,
    /// `tracing` filter directives, e.g. `info,tollgate_proxy=debug`. `RUST_LOG`,
    /// when set, takes precedence. Default `info`.
    pub filter: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: LogFormat::Human,
            filter: "info".into(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Human,
    Json,
}

/// `[proxy]`: the metering proxy process.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProxyConfig {
    /// On SIGTERM/SIGINT, how long in-flight requests and tunnels may finish before
    /// they are cut and the final flush runs. Default `30s`.
    #[serde(with = "duration")]
    pub drain_timeout: Duration,
    pub egress: EgressConfig,
    pub ingress: IngressConfig,
    pub admin: AdminConfig,
    pub meter: MeterConfig,
    pub directory: DirectoryConfig,
    pub agent_limits: AgentLimitsConfig,
    pub leases: LeaseConfig,
    pub decision_log: DecisionLogConfig,
    pub usage_api: UsageApiConfig,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        Self {
            drain_timeout: Duration::from_secs(30),
            egress: EgressConfig::default(),
            ingress: IngressConfig::default(),
            admin: AdminConfig {
                listen: ([0, 0, 0, 0], 9900).into(),
            },
            meter: MeterConfig::default(),
            directory: DirectoryConfig::default(),
            agent_limits: AgentLimitsConfig::default(),
            leases: LeaseConfig::default(),
            decision_log: DecisionLogConfig::default(),
            usage_api: UsageApiConfig::default(),
        }
    }
}

/// TLS for a listener: PEM files.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// Certificate chain, PEM.
    pub cert: PathBuf,
    /// Private key, PEM (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

/// `[proxy.egress]`: the forward proxy agents use as `HTTP_PROXY`/`HTTPS_PROXY`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EgressConfig {
    /// Serve the egress listener. Default true.
    pub enabled: bool,
    /// Listen address. Default `0.0.0.0:3128`.
    pub listen: SocketAddr,
    /// Serve TLS (for `https://` proxy URLs). Default: plain TCP.
    pub tls: Option<TlsConfig>,
    /// Open client connections beyond which new ones get `503`. Default 10000.
    pub max_connections: usize,
    /// Largest request head (request line + headers), bytes; larger gets `431`.
    /// At least 8192. Default 65536.
    pub max_header_bytes: usize,
    /// Time a client has to send a complete request head, counted from connect or
    /// from the end of the previous exchange: it closes idle keep-alive connections
    /// and slow-header (slowloris) clients alike. Default `30s`.
    #[serde(with = "duration")]
    pub header_read_timeout: Duration,
    /// CONNECT tunnels with no traffic either way for this long are closed. Default `5m`.
    #[serde(with = "duration")]
    pub tunnel_idle_timeout: Duration,
    /// Time to resolve and connect to an origin; beyond it `504`. Default `10s`.
    #[serde(with = "duration")]
    pub connect_timeout: Duration,
    /// Time for an origin to answer with response headers (plain HTTP and
    /// `ws://` upgrades); beyond it `504`. Default `60s`.
    #[serde(with = "duration")]
    pub response_timeout: Duration,
    /// Pooled origin connections idle this long are closed. Default `90s`.
    #[serde(with = "duration")]
    pub upstream_idle_timeout: Duration,
    /// Idle pooled connections kept per origin (host as resolved from any
    /// spelling of an address, and port). Default 32.
    pub upstream_max_idle_per_host: usize,
    /// Idle pooled origin connections kept for one agent's exchanges, over all
    /// origins, so no agent fills the pool (and the file descriptors) for
    /// everyone. Default 64.
    pub upstream_max_idle_per_agent: usize,
    /// Idle pooled origin connections kept in all; beyond it the one returned
    /// longest ago is closed. Default 1024.
    pub upstream_max_idle_total: usize,
    /// Ports CONNECT may reach. Default `[443]`.
    pub connect_ports: Vec<u16>,
    /// Ports plain HTTP requests may reach; empty means any. Default `[]`.
    pub http_ports: Vec<u16>,
    /// Destinations allowed even though the built-in deny list covers them
    /// (e.g. an internal package mirror). Default `[]`.
    pub allow_cidrs: Vec<IpNet>,
    /// Destinations denied in addition to the built-in deny list. Wins over
    /// `allow_cidrs`. Default `[]`.
    pub deny_cidrs: Vec<IpNet>,
}

impl Default for EgressConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            listen: ([0, 0, 0, 0], 3128).into(),
            tls: None,
            max_connections: 10_000,
            max_header_bytes: 64 * 1024,
            header_read_timeout: Duration::from_secs(30),
            tunnel_idle_timeout: Duration::from_secs(300),
            connect_timeout: Duration::from_secs(10),
            response_timeout: Duration::from_secs(60),
            upstream_idle_timeout: Duration::from_secs(90),
            upstream_max_idle_per_host: 32,
            upstream_max_idle_per_agent: 64,
            upstream_max_idle_total: 1024,
            connect_ports: vec![443],
            http_ports: Vec::new(),
            allow_cidrs: Vec::new(),
            deny_cidrs: Vec::new(),
        }
    }
}

/// `[proxy.agent_limits]`: what one agent may hold on one proxy, whatever the
/// others do. Beyond a cap the request gets `429` with a JSON reason.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AgentLimitsConfig {
    /// Open egress client connections bound to one agent, and ingress requests
    /// to one agent under way, each. Default 1024.
    pub max_connections: usize,
    /// Open CONNECT tunnels and WebSockets of one agent, both listeners
    /// together. Default 512.
    pub max_tunnels: usize,
    /// New egress client connections one agent may bind per second (a bucket
    /// holding one second's worth). Default 1000.
    pub new_connections_per_second: u32,
}

impl Default for AgentLimitsConfig {
    fn default() -> Self {
        Self {
            max_connections: 1024,
            max_tunnels: 512,
            new_connections_per_second: 1000,
        }
    }
}

/// `[proxy.leases]`: how replicas share a user's bandwidth headroom. A proxy
/// lets a user's bytes through only against a slice of their headroom that it
/// has leased from PostgreSQL, so overshoot does not grow with the number of
/// replicas (`docs/operations.md`, "Headroom leases").
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LeaseConfig {
    /// Lease headroom from PostgreSQL. With `false` each proxy spends the whole
    /// headroom of its last decision on its own (exact with one replica only).
    /// Default true.
    pub enabled: bool,
    /// A lease not renewed for this long lapses and its bytes return to the
    /// user's other replicas; a proxy stops spending its leases before then.
    /// Renewed every third of it. Default `30s`.
    #[serde(with = "duration")]
    pub ttl: Duration,
    /// Smallest slice asked for, in bytes, unless less is left. Default 262144
    /// (256 KiB).
    pub min_slice_bytes: u64,
    /// Largest slice asked for, in bytes. A slice is an eighth of what the user
    /// has left, between these two bounds. Default 1073741824 (1 GiB).
    pub max_slice_bytes: u64,
    /// How long a request waits for a grant; if none comes by then (a slow or
    /// unreachable database), its user falls back to the last decision until
    /// the next renewal. Default `2s`.
    #[serde(with = "duration")]
    pub wait: Duration,
}

impl Default for LeaseConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            ttl: Duration::from_secs(30),
            min_slice_bytes: 256 * 1024,
            max_slice_bytes: 1 << 30,
            wait: Duration::from_secs(2),
        }
    }
}

/// `[proxy.decision_log]`: one JSON line per request and per tunnel, written
/// where each exchange ends (`docs/operations.md`, "Decision log"). Events are
/// queued without blocking the request path and written by one task; when the
/// queue is full (a flood of requests, a slow disk), new events are dropped and
/// counted in `tollgate_decision_log_dropped_total`, so no tenant can make the
/// proxy log without bound or wait for the log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DecisionLogConfig {
    /// `off`, `stdout` or `file`. Default `off`.
    pub sink: DecisionLogSink,
    /// The file the `file` sink appends to: created if missing (mode 0640), its
    /// directory must exist; reopened on SIGHUP, for log rotation. Required
    /// with `sink = "file"`. Default: none.
    pub path: Option<PathBuf>,
    /// Keep the query string in the `path` field. Query strings often carry
    /// secrets (signed URLs, API keys). Default false.
    pub include_query: bool,
    /// Events waiting for the writer, at most (1 to 16777216); beyond it new
    /// events are dropped and counted. Each takes about 1 KiB at most while it
    /// waits. Default 65536.
    pub queue_events: usize,
}

impl Default for DecisionLogConfig {
    fn default() -> Self {
        Self {
            sink: DecisionLogSink::Off,
            path: None,
            include_query: false,
            queue_events: 65_536,
        }
    }
}

/// Where decision events go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DecisionLogSink {
    /// Not recorded.
    Off,
    /// Standard output (tracing logs go to standard error).
    Stdout,
    /// The file at `path`.
    File,
}

/// `[proxy.usage_api]`: the usage API (`docs/operations.md`, "Usage API"), on
/// its own listener behind one bearer token: usage per user and per VPS, the
/// published decision, and a CSV export of a period.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UsageApiConfig {
    /// Serve the usage API. Default false.
    pub enabled: bool,
    /// Listen address. Default `127.0.0.1:9902`: loopback, next to the admin
    /// listeners (`:9900` proxy, `:9901` monitor).
    pub listen: SocketAddr,
    /// The bearer token clients send (`Authorization: Bearer <token>`), at
    /// least 32 characters. Set this or `token_file` when enabled. Default: none.
    pub token: Option<String>,
    /// A file holding the bearer token (surrounding whitespace ignored), read
    /// at start; keeps the token out of the config file and the environment.
    /// Default: none.
    pub token_file: Option<PathBuf>,
}

impl Default for UsageApiConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            listen: ([127, 0, 0, 1], 9902).into(),
            token: None,
            token_file: None,
        }
    }
}

/// Fewest characters a usage API bearer token may have.
pub const USAGE_API_MIN_TOKEN_CHARS: usize = 32;

impl UsageApiConfig {
    /// The bearer token: `token`, or the contents of `token_file` trimmed, at
    /// least [`USAGE_API_MIN_TOKEN_CHARS`] characters.
    pub fn bearer_token(&self) -> Result<String, ConfigError> {
        let token = match (&self.token, &self.token_file) {
            (Some(_), Some(_)) => {
                return Err(field_error(
                    "proxy.usage_api.token_file",
                    "set token or token_file, not both",
                ))
            }
            (Some(token), None) => token.clone(),
            (None, Some(path)) => std::fs::read_to_string(path)
                .map_err(|e| {
                    field_error(
                        "proxy.usage_api.token_file",
                        format!("cannot read {}: {e}", path.display()),
                    )
                })?
                .trim()
                .to_owned(),
            (None, None) => {
                return Err(field_error(
                    "proxy.usage_api.token",
                    "required when the usage API is enabled (or token_file)",
                ))
            }
        };
        let key = match self.token_file {
            Some(_) => "proxy.usage_api.token_file",
            None => "proxy.usage_api.token",
        };
        if token.chars().count() < USAGE_API_MIN_TOKEN_CHARS {
            return Err(field_error(
                key,
                format!("the token must be at least {USAGE_API_MIN_TOKEN_CHARS} characters"),
            ));
        }
        if token.chars().any(|c| !c.is_ascii_graphic()) {
            return Err(field_error(
                key,
                "the token must be printable ASCII without spaces",
            ));
        }
        Ok(token)
    }
}

/// Most events a decision log queue may hold.
pub const DECISION_LOG_MAX_QUEUE: usize = 1 << 24;

/// `[proxy.ingress]`: the reverse proxy users reach agents' gateways through.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct IngressConfig {
    /// Serve the ingress listener. Default true.
    pub enabled: bool,
    /// Listen address. Default `0.0.0.0:8080`.
    pub listen: SocketAddr,
    /// Serve TLS with ALPN h2 and http/1.1. Default: plain TCP (HTTP/1.1 and h2c).
    pub tls: Option<TlsConfig>,
    /// Open client connections beyond which new ones get `503`. Default 10000.
    pub max_connections: usize,
    /// Largest request head, bytes; larger gets `431`. At least 8192. Default 65536.
    pub max_header_bytes: usize,
    /// Time a client has to send a complete request head, counted from connect or
    /// from the end of the previous exchange: it closes idle keep-alive connections
    /// and slow-header (slowloris) clients alike. Default `30s`.
    #[serde(with = "duration")]
    pub header_read_timeout: Duration,
    /// Port of the agent gateway on each VPS. Default 18789.
    pub gateway_port: u16,
    /// Time to connect to a gateway; beyond it `504`. Default `5s`.
    #[serde(with = "duration")]
    pub connect_timeout: Duration,
    /// Time for a gateway to answer with response headers; beyond it `504`. Default `60s`.
    #[serde(with = "duration")]
    pub response_timeout: Duration,
    /// WebSockets with no traffic either way for this long are closed. Default `1h`.
    #[serde(with = "duration")]
    pub websocket_idle_timeout: Duration,
    /// Pooled gateway connections idle this long are closed. Default `90s`.
    #[serde(with = "duration")]
    pub upstream_idle_timeout: Duration,
    /// Idle pooled connections kept per VPS (in all: the per-agent bound of
    /// the pool, one agent per VPS). Default 16.
    pub upstream_max_idle_per_vps: usize,
    /// Idle pooled gateway connections kept in all; beyond it the one returned
    /// longest ago is closed. Default 4096.
    pub upstream_max_idle_total: usize,
}

impl Default for IngressConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            listen: ([0, 0, 0, 0], 8080).into(),
            tls: None,
            max_connections: 10_000,
            max_header_bytes: 64 * 1024,
            header_read_timeout: Duration::from_secs(30),
            gateway_port: 18789,
            connect_timeout: Duration::from_secs(5),
            response_timeout: Duration::from_secs(60),
            websocket_idle_timeout: Duration::from_secs(3600),
            upstream_idle_timeout: Duration::from_secs(90),
            upstream_max_idle_per_vps: 16,
            upstream_max_idle_total: 4096,
        }
    }
}

/// An admin listener: `/metrics`, `/healthz`, `/readyz`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// Listen address. Default `0.0.0.0:9900` for the proxy, `0.0.0.0:9901` for the monitor.
    pub listen: SocketAddr,
}

/// `[proxy.meter]`: per-VPS byte counters and their flush to PostgreSQL.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MeterConfig {
    /// How often counters are written to `vps_usage_periods`. Default `1s`.
    #[serde(with = "duration")]
    pub flush_interval: Duration,
    /// Longest wait between retries of a failed flush (backoff doubles up to it).
    /// Default `30s`.
    #[serde(with = "duration")]
    pub max_retry_backoff: Duration,
    /// Where a batch that could not be written at shutdown is saved, to be replayed
    /// exactly once at the next start. Created if missing. Default `/var/lib/tollgate`.
    pub spill_dir: PathBuf,
    /// A user's decision is re-published at least this often while they have
    /// traffic, so dashboards see fresh figures (and after any flush that
    /// takes them a percentage point further into their bandwidth limit or
    /// budget, so threshold notifications are prompt). Default `30s`.
    #[serde(with = "duration")]
    pub decision_refresh: Duration,
    /// Destination hosts kept apart per VPS in `vps_destination_usage`, each
    /// month and, in memory, between two flushes; the bytes of the others go to
    /// the host `other` (`docs/operations.md`, "Bytes per destination"). Hosts,
    /// 1 to 10000. Default 50.
    pub destination_top_n: u32,
}

/// Most destination hosts `proxy.meter.destination_top_n` may keep apart.
pub const MAX_DESTINATION_TOP_N: u32 = 10_000;

impl Default for MeterConfig {
    fn default() -> Self {
        Self {
            flush_interval: Duration::from_secs(1),
            max_retry_backoff: Duration::from_secs(30),
            spill_dir: PathBuf::from("/var/lib/tollgate"),
            decision_refresh: Duration::from_secs(30),
            destination_top_n: 50,
        }
    }
}

/// `[proxy.directory]`: the in-memory cache of agents, tokens and VPSes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DirectoryConfig {
    /// Entries older than this are re-read in the background while still served.
    /// Default `60s`.
    #[serde(with = "duration")]
    pub refresh_after: Duration,
    /// While the database is unreachable, known agents keep working from cache this
    /// long; after it they get `503`. Default `10m`.
    #[serde(with = "duration")]
    pub max_stale: Duration,
    /// How long an agent id unknown to the database is remembered as unknown.
    /// Default `5s`.
    #[serde(with = "duration")]
    pub negative_ttl: Duration,
    /// Most unknown ids remembered at once. Default 100000.
    pub negative_capacity: usize,
}

impl Default for DirectoryConfig {
    fn default() -> Self {
        Self {
            refresh_after: Duration::from_secs(60),
            max_stale: Duration::from_secs(600),
            negative_ttl: Duration::from_secs(5),
            negative_capacity: 100_000,
        }
    }
}

/// `[monitor]`: CPU/memory sampling and decisions.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MonitorConfig {
    /// Time between sampling cycles. Default `15s`.
    #[serde(with = "duration")]
    pub interval: Duration,
    /// Longest gap between two samples integrated as memory use; longer gaps count
    /// only this much. Default `5m`.
    #[serde(with = "duration")]
    pub max_gap: Duration,
    /// Samples in flight at once. Default 16.
    pub concurrency: usize,
    /// Time one sample may take before it fails as retryable. Default `5s`.
    #[serde(with = "duration")]
    pub sample_timeout: Duration,
    /// PostgreSQL advisory lock key that elects the active monitor. Default 7_405_112.
    pub leader_lock_key: i64,
    /// Longest time a VPS's sampled CPU and memory usage is held in the monitor
    /// before it is written, for users far from every limit; users at 80 % of a
    /// limit or of their budget, or blocked, are written every cycle, as are new
    /// VPSes and ones that stopped. Each cycle writes an equal share of the
    /// fleet. At most `max_gap`; set it to `interval` to write every sample.
    /// Default `1m`.
    #[serde(with = "duration")]
    pub write_interval: Duration,
    /// Every active user is decided again at least this often, in equal shares
    /// per cycle, whatever changed; between sweeps only users whose inputs
    /// changed are decided (usage written, a plan or budget change, a new
    /// month). Default `10m`.
    #[serde(with = "duration")]
    pub full_sweep_interval: Duration,
    pub admin: AdminConfig,
    /// Source per provider name (lower case). A metered provider with no entry
    /// uses `default_source`; with neither, its samples fail as not retryable.
    pub providers: BTreeMap<String, SourceConfig>,
    /// Source for metered providers not listed in `providers`. Default: none.
    pub default_source: Option<SourceConfig>,
    pub webhooks: WebhooksConfig,
}

impl Default for MonitorConfig {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(15),
            max_gap: Duration::from_secs(300),
            concurrency: 16,
            sample_timeout: Duration::from_secs(5),
            leader_lock_key: 7_405_112,
            write_interval: Duration::from_secs(60),
            full_sweep_interval: Duration::from_secs(600),
            admin: AdminConfig {
                listen: ([0, 0, 0, 0], 9901).into(),
            },
            providers: BTreeMap::new(),
            default_source: None,
            webhooks: WebhooksConfig::default(),
        }
    }
}

/// `[monitor.webhooks]`: delivery of quota notifications (threshold crossings,
/// blocks, unblocks) from the `quota_events` outbox as signed webhooks. Every
/// monitor delivers, leader or standby.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WebhooksConfig {
    /// Endpoint the events are POSTed to, an `http://` or `https://` URL.
    /// Default: none (delivery off; events wait in the outbox).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// PEM file of the certificate authorities an `https://` endpoint's
    /// certificate must chain to, instead of the built-in Mozilla roots (a
    /// private CA). Default: none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// HMAC-SHA256 key of the `X-Tollgate-Signature` header, at least 32
    /// characters; required with `url`. Secret: masked by `check-config`.
    /// Default: none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
    /// Time one delivery (connect, request, response) may take before it counts
    /// as failed. Default `10s`.
    #[serde(with = "duration")]
    pub timeout: Duration,
    /// Longest wait between two attempts at one event; the wait doubles from
    /// 1 s after each failure up to this. Default `10m`.
    #[serde(with = "duration")]
    pub max_backoff: Duration,
    /// Longest time between two looks at the outbox when no notification
    /// arrives (the fallback to `NOTIFY tollgate_quota_event`). Default `5s`.
    #[serde(with = "duration")]
    pub poll_interval: Duration,
    /// Events claimed and delivered at once, in parallel. Default 32.
    pub batch_size: usize,
}

/// Largest `monitor.webhooks.batch_size`.
pub const WEBHOOKS_MAX_BATCH: usize = 1000;
/// Shortest `monitor.webhooks.secret`.
pub const WEBHOOKS_MIN_SECRET: usize = 32;

impl Default for WebhooksConfig {
    fn default() -> Self {
        Self {
            url: None,
            ca_file: None,
            secret: None,
            timeout: Duration::from_secs(10),
            max_backoff: Duration::from_secs(600),
            poll_interval: Duration::from_secs(5),
            batch_size: 32,
        }
    }
}

/// Where the monitor reads a VPS's CPU and memory. Templates may use `{vps_id}`,
/// `{vm_id}` (the provider's VM id) and `{address}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "source", rename_all = "lowercase", deny_unknown_fields)]
pub enum SourceConfig {
    /// A cgroup on this host per VPS.
    Cgroup {
        /// cgroup mount root. Default `/sys/fs/cgroup`.
        #[serde(default = "default_cgroup_root")]
        root: PathBuf,
        /// `v1`, `v2` or `auto` (v2 if `{root}/cgroup.controllers` exists). Default `auto`.
        #[serde(default)]
        version: CgroupVersion,
        /// Path of the VPS's cgroup below the hierarchy root (v1: below each
        /// controller's mount, `cpuacct/` and `memory/`). Default `tollgate/{vps_id}`.
        #[serde(default = "default_cgroup_path")]
        path: String,
    },
    /// Instant PromQL queries against a Prometheus HTTP API.
    ///
    /// With `vps_label` set, each query runs once per cycle for the whole fleet
    /// and returns one series per VPS, e.g.
    /// `sum by (pod) (container_cpu_usage_seconds_total{container!=""})` with
    /// `vps_label = "pod"`. Without it, the queries are templates run once per
    /// VPS (`{pod="{vm_id}"}`), which costs one query per VPS per cycle.
    Prometheus {
        /// Base URL, e.g. `http://prometheus:9090`.
        url: String,
        /// Query returning cumulative CPU seconds, e.g.
        /// `sum by (pod) (container_cpu_usage_seconds_total{container!=""})`.
        cpu_query: String,
        /// Query returning memory in use in bytes, e.g.
        /// `sum by (pod) (container_memory_working_set_bytes{container!=""})`.
        memory_query: String,
        /// Label of the fleet queries' series that names the VPS, e.g. `pod`.
        /// Default: none (per-VPS query templates).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        vps_label: Option<String>,
        /// What `vps_label` holds for a VPS, a template. Default `{vm_id}`.
        #[serde(default = "default_vps_label_value")]
        vps_label_value: String,
    },
    /// The in-VM agent's `/metrics` JSON. The VM's owner can tamper with these
    /// figures; prefer a host-side source where one exists.
    Agent {
        /// URL of the metrics endpoint. Default `http://{address}:7575/metrics`.
        #[serde(default = "default_agent_url")]
        url: String,
        /// Header carrying the token. Default `Authorization`.
        #[serde(default = "default_agent_token_header")]
        token_header: String,
        /// Header value, e.g. `Bearer …`. Secret: masked by `check-config`.
        #[serde(default)]
        token: Option<String>,
    },
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CgroupVersion {
    #[default]
    Auto,
    V1,
    V2,
}

fn default_cgroup_root() -> PathBuf {
    PathBuf::from("/sys/fs/cgroup")
}
fn default_cgroup_path() -> String {
    "tollgate/{vps_id}".into()
}
fn default_vps_label_value() -> String {
    "{vm_id}".into()
}
fn default_agent_url() -> String {
    "http://{address}:7575/metrics".into()
}
fn default_agent_token_header() -> String {
    "Authorization".into()
}

/// Placeholders a source template may use.
pub const TEMPLATE_PLACEHOLDERS: [&str; 3] = ["{vps_id}", "{vm_id}", "{address}"];

impl Config {
    /// Load from `path` (or `$TOLLGATE_CONFIG`, or defaults only), then apply
    /// `DATABASE_URL` and `TOLLGATE_*` from the process environment, and validate.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let env_path = std::env::var_os(CONFIG_PATH_ENV).map(PathBuf::from);
        let path = path.map(Path::to_path_buf).or(env_path);
        let text = match &path {
            Some(p) => std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
                path: p.clone(),
                source,
            })?,
            None => String::new(),
        };
        let display_path = path.unwrap_or_else(|| PathBuf::from("<defaults>"));
        Self::from_sources(&text, &display_path, std::env::vars())
    }

    /// Build from TOML text and environment variables (testable without touching
    /// the process environment).
    pub fn from_sources(
        text: &str,
        path: &Path,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let mut root: toml::Table = toml::from_str(text).map_err(|e| ConfigError::Syntax {
            path: path.to_owned(),
            message: one_line(e.message()),
        })?;
        let mut env: Vec<(String, String)> = env.into_iter().collect();
        env.sort();
        if let Some((_, url)) = env.iter().find(|(k, _)| k == "DATABASE_URL") {
            set_path(
                &mut root,
                &["database", "url"],
                toml::Value::String(url.clone()),
            )
            .map_err(|message| ConfigError::Env {
                var: "DATABASE_URL".into(),
                message,
            })?;
        }
        for (var, raw) in &env {
            let Some(key) = var.strip_prefix(ENV_PREFIX) else {
                continue;
            };
            if var == CONFIG_PATH_ENV {
                continue;
            }
            let parts: Vec<String> = key.split("__").map(str::to_ascii_lowercase).collect();
            if parts.iter().any(String::is_empty) {
                return Err(ConfigError::Env {
                    var: var.clone(),
                    message: "empty key part: separate keys with `__`, e.g. TOLLGATE_PROXY__EGRESS__LISTEN".into(),
                });
            }
            let parts: Vec<&str> = parts.iter().map(String::as_str).collect();
            set_path(&mut root, &parts, env_value(raw)).map_err(|message| ConfigError::Env {
                var: var.clone(),
                message,
            })?;
        }
        let config: Config = serde_path_to_error::deserialize(toml::Value::Table(root))
            .map_err(|e| field_error(&e.path().to_string(), one_line(&e.inner().to_string())))?;
        config.validate()?;
        Ok(config)
    }

    /// Check what types cannot: ranges, file existence, distinct ports, templates.
    pub fn validate(&self) -> Result<(), ConfigError> {
        use std::str::FromStr;
        let url = &self.database.url;
        if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            return Err(field_error(
                "database.url",
                "must start with postgres:// or postgresql://",
            ));
        }
        sqlx::postgres::PgConnectOptions::from_str(url)
            .map_err(|e| field_error("database.url", format!("not a PostgreSQL URL: {e}")))?;
        if self.database.max_connections == 0 {
            return Err(field_error(
                "database.max_connections",
                "must be at least 1",
            ));
        }
        tracing_subscriber::EnvFilter::try_new(&self.log.filter)
            .map_err(|e| field_error("log.filter", e.to_string()))?;

        let p = &self.proxy;
        positive("proxy.meter.flush_interval", p.meter.flush_interval)?;
        positive("proxy.meter.max_retry_backoff", p.meter.max_retry_backoff)?;
        if !(1..=MAX_DESTINATION_TOP_N).contains(&p.meter.destination_top_n) {
            return Err(field_error(
                "proxy.meter.destination_top_n",
                format!("must be from 1 to {MAX_DESTINATION_TOP_N}"),
            ));
        }
        positive("proxy.directory.max_stale", p.directory.max_stale)?;
        for (section, max_header, max_conns, tls) in [
            (
                "proxy.egress",
                p.egress.max_header_bytes,
                p.egress.max_connections,
                &p.egress.tls,
            ),
            (
                "proxy.ingress",
                p.ingress.max_header_bytes,
                p.ingress.max_connections,
                &p.ingress.tls,
            ),
        ] {
            if max_header < 8192 {
                return Err(field_error(
                    &format!("{section}.max_header_bytes"),
                    "must be at least 8192",
                ));
            }
            if max_conns == 0 {
                return Err(field_error(
                    &format!("{section}.max_connections"),
                    "must be at least 1",
                ));
            }
            if let Some(tls) = tls {
                for (name, file) in [("cert", &tls.cert), ("key", &tls.key)] {
                    if !file.is_file() {
                        return Err(field_error(
                            &format!("{section}.tls.{name}"),
                            format!("{} is not a readable file", file.display()),
                        ));
                    }
                }
            }
        }
        positive(
            "proxy.egress.header_read_timeout",
            p.egress.header_read_timeout,
        )?;
        positive(
            "proxy.ingress.header_read_timeout",
            p.ingress.header_read_timeout,
        )?;
        positive("proxy.egress.connect_timeout", p.egress.connect_timeout)?;
        positive("proxy.ingress.connect_timeout", p.ingress.connect_timeout)?;
        positive("proxy.ingress.response_timeout", p.ingress.response_timeout)?;
        positive("proxy.egress.response_timeout", p.egress.response_timeout)?;
        for (key, value) in [
            (
                "proxy.agent_limits.max_connections",
                p.agent_limits.max_connections,
            ),
            ("proxy.agent_limits.max_tunnels", p.agent_limits.max_tunnels),
            (
                "proxy.agent_limits.new_connections_per_second",
                p.agent_limits.new_connections_per_second as usize,
            ),
        ] {
            if value == 0 {
                return Err(field_error(key, "must be at least 1"));
            }
        }
        positive("proxy.leases.ttl", p.leases.ttl)?;
        positive("proxy.leases.wait", p.leases.wait)?;
        if p.leases.min_slice_bytes == 0 || p.leases.min_slice_bytes > p.leases.max_slice_bytes {
            return Err(field_error(
                "proxy.leases.min_slice_bytes",
                "must be at least 1 and at most proxy.leases.max_slice_bytes",
            ));
        }
        let log = &p.decision_log;
        if log.queue_events == 0 || log.queue_events > DECISION_LOG_MAX_QUEUE {
            return Err(field_error(
                "proxy.decision_log.queue_events",
                format!("must be from 1 to {DECISION_LOG_MAX_QUEUE}"),
            ));
        }
        if log.sink == DecisionLogSink::File {
            let path = log
                .path
                .as_deref()
                .filter(|p| !p.as_os_str().is_empty())
                .ok_or_else(|| {
                    field_error("proxy.decision_log.path", "required with sink = \"file\"")
                })?;
            let dir = match path.parent() {
                Some(dir) if !dir.as_os_str().is_empty() => dir,
                _ => Path::new("."),
            };
            if path.is_dir() || !dir.is_dir() {
                return Err(field_error(
                    "proxy.decision_log.path",
                    format!("{} is not a file in an existing directory", path.display()),
                ));
            }
        }
        if p.ingress.gateway_port == 0 {
            return Err(field_error(
                "proxy.ingress.gateway_port",
                "must be a port from 1 to 65535",
            ));
        }
        if p.egress.connect_ports.contains(&0) || p.egress.http_ports.contains(&0) {
            return Err(field_error(
                "proxy.egress.connect_ports",
                "port 0 is not a destination port",
            ));
        }
        let mut bound: Vec<(&str, SocketAddr)> = vec![("proxy.admin.listen", p.admin.listen)];
        if p.egress.enabled {
            bound.push(("proxy.egress.listen", p.egress.listen));
        }
        if p.ingress.enabled {
            bound.push(("proxy.ingress.listen", p.ingress.listen));
        }
        if p.usage_api.enabled {
            p.usage_api.bearer_token()?;
            bound.push(("proxy.usage_api.listen", p.usage_api.listen));
        }
        for (i, (a_key, a)) in bound.iter().enumerate() {
            for (b_key, b) in &bound[i + 1..] {
                if a.port() != 0
                    && a.port() == b.port()
                    && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
                {
                    return Err(field_error(b_key, format!("{b} overlaps {a_key} ({a})")));
                }
            }
        }

        let m = &self.monitor;
        positive("monitor.interval", m.interval)?;
        positive("monitor.max_gap", m.max_gap)?;
        positive("monitor.sample_timeout", m.sample_timeout)?;
        positive("monitor.write_interval", m.write_interval)?;
        positive("monitor.full_sweep_interval", m.full_sweep_interval)?;
        if m.write_interval > m.max_gap {
            // A restart integrates memory from the last written sample, capped at max_gap.
            return Err(field_error(
                "monitor.write_interval",
                format!(
                    "must be at most monitor.max_gap ({})",
                    duration::format(m.max_gap)
                ),
            ));
        }
        if m.concurrency == 0 {
            return Err(field_error("monitor.concurrency", "must be at least 1"));
        }
        let sources = m
            .providers
            .iter()
            .map(|(name, s)| (format!("monitor.providers.{name}"), s))
            .chain(
                m.default_source
                    .iter()
                    .map(|s| ("monitor.default_source".to_owned(), s)),
            );
        for (key, source) in sources {
            source.validate(&key)?;
        }
        let w = &m.webhooks;
        positive("monitor.webhooks.timeout", w.timeout)?;
        positive("monitor.webhooks.max_backoff", w.max_backoff)?;
        positive("monitor.webhooks.poll_interval", w.poll_interval)?;
        if !(1..=WEBHOOKS_MAX_BATCH).contains(&w.batch_size) {
            return Err(field_error(
                "monitor.webhooks.batch_size",
                format!("must be from 1 to {WEBHOOKS_MAX_BATCH}"),
            ));
        }
        if let Some(url) = &w.url {
            let host = url
                .strip_prefix("https://")
                .or_else(|| url.strip_prefix("http://"))
                .unwrap_or_default();
            if host.is_empty() || host.starts_with('/') {
                return Err(field_error(
                    "monitor.webhooks.url",
                    "must be an http:// or https://host[:port]/path URL",
                ));
            }
            if let Some(ca) = &w.ca_file {
                if !url.starts_with("https://") {
                    return Err(field_error(
                        "monitor.webhooks.ca_file",
                        "applies to an https:// url only",
                    ));
                }
                if !ca.is_file() {
                    return Err(field_error(
                        "monitor.webhooks.ca_file",
                        format!("{} is not a readable file", ca.display()),
                    ));
                }
            }
            if w.secret.as_deref().map_or(0, |s| s.chars().count()) < WEBHOOKS_MIN_SECRET {
                return Err(field_error(
                    "monitor.webhooks.secret",
                    format!("required with monitor.webhooks.url, at least {WEBHOOKS_MIN_SECRET} characters"),
                ));
            }
        }
        for name in m.providers.keys() {
            if name.to_ascii_lowercase() != *name {
                return Err(field_error(
                    &format!("monitor.providers.{name}"),
                    "provider names are lower case",
                ));
            }
        }
        Ok(())
    }

    /// The effective configuration as TOML with secrets masked (`check-config`).
    pub fn to_masked_toml(&self) -> String {
        let mut masked = self.clone();
        masked.database.url = mask_url_password(&masked.database.url);
        if let Some(secret) = masked.monitor.webhooks.secret.as_mut() {
            *secret = "********".into();
        }
        if let Some(token) = masked.proxy.usage_api.token.as_mut() {
            *token = "********".into();
        }
        let sources = masked
            .monitor
            .providers
            .values_mut()
            .chain(masked.monitor.default_source.as_mut());
        for source in sources {
            if let SourceConfig::Agent {
                token: Some(token), ..
            } = source
            {
                *token = "********".into();
            }
        }
        toml::to_string_pretty(&masked).expect("config serializes")
    }
}

impl SourceConfig {
    fn validate(&self, key: &str) -> Result<(), ConfigError> {
        let templates: Vec<(&str, &str)> = match self {
            SourceConfig::Cgroup { path, .. } => vec![("path", path)],
            SourceConfig::Prometheus {
                url,
                cpu_query,
                memory_query,
                vps_label,
                vps_label_value,
            } => {
                if !url.starts_with("http://") {
                    return Err(field_error(&format!("{key}.url"), "must be an http:// URL"));
                }
                let per_vps = |q: &str| TEMPLATE_PLACEHOLDERS.iter().any(|p| q.contains(p));
                for (field, query) in [("cpu_query", cpu_query), ("memory_query", memory_query)] {
                    match (vps_label, per_vps(query)) {
                        (Some(_), true) => {
                            return Err(field_error(
                                &format!("{key}.{field}"),
                                "with vps_label the query runs once for the whole fleet: \
                                 drop the {vps_id}/{vm_id}/{address} placeholders and group \
                                 by the label, e.g. `sum by (pod) (...)`",
                            ))
                        }
                        (None, false) => {
                            return Err(field_error(
                                &format!("{key}.{field}"),
                                "names no VPS: set vps_label and group by it (`sum by (pod) \
                                 (...)`, one query per cycle), or use {vm_id} in the query \
                                 (one query per VPS)",
                            ))
                        }
                        _ => {}
                    }
                }
                if let Some(label) = vps_label {
                    let valid = label
                        .chars()
                        .next()
                        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                        && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
                    if !valid {
                        return Err(field_error(
                            &format!("{key}.vps_label"),
                            "must be a Prometheus label name",
                        ));
                    }
                }
                vec![
                    ("cpu_query", cpu_query),
                    ("memory_query", memory_query),
                    ("vps_label_value", vps_label_value),
                ]
            }
            SourceConfig::Agent { url, .. } => {
                if !url.starts_with("http://") {
                    return Err(field_error(&format!("{key}.url"), "must be an http:// URL"));
                }
                vec![("url", url)]
            }
        };
        for (field, template) in templates {
            let mut rest = template;
            while let Some(open) = rest.find('{') {
                let close = rest[open..]
                    .find('}')
                    .map(|c| open + c + 1)
                    .unwrap_or(rest.len());
                let placeholder = &rest[open..close];
                // PromQL label matchers also use braces; only `{word}` is a placeholder.
                let is_word = placeholder.len() > 2
                    && placeholder[1..placeholder.len() - 1]
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '_');
                if is_word && !TEMPLATE_PLACEHOLDERS.contains(&placeholder) {
                    return Err(field_error(
                        &format!("{key}.{field}"),
                        format!("unknown placeholder {placeholder}: use {{vps_id}}, {{vm_id}} or {{address}}"),
                    ));
                }
                rest = &rest[open + 1..];
            }
        }
        Ok(())
    }
}

fn positive(key: &str, d: Duration) -> Result<(), ConfigError> {
    if d.is_zero() {
        return Err(field_error(key, "must be longer than 0"));
    }
    Ok(())
}

fn one_line(message: &str) -> String {
    message.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// An environment value: TOML where it parses as a value, a string otherwise.
fn env_value(raw: &str) -> toml::Value {
    toml::from_str::<toml::Table>(&format!("v = {raw}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_owned()))
}

fn set_path(root: &mut toml::Table, path: &[&str], value: toml::Value) -> Result<(), String> {
    let (last, parents) = path.split_last().expect("non-empty path");
    let mut table = root;
    for part in parents {
        let entry = table
            .entry((*part).to_owned())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        table = entry
            .as_table_mut()
            .ok_or_else(|| format!("`{part}` is a value, not a section"))?;
    }
    table.insert((*last).to_owned(), value);
    Ok(())
}

/// `postgres://user:secret@host/db` -> `postgres://user:********@host/db`.
pub fn mask_url_password(url: &str) -> String {
    let Some(scheme_end) = url.find("://").map(|i| i + 3) else {
        return url.to_owned();
    };
    let authority_end = url[scheme_end..]
        .find('/')
        .map(|i| scheme_end + i)
        .unwrap_or(url.len());
    let authority = &url[scheme_end..authority_end];
    let (Some(at), Some(colon)) = (authority.rfind('@'), authority.find(':')) else {
        return mask_query_password(url);
    };
    if colon > at {
        return mask_query_password(url);
    }
    let masked = format!(
        "{}********{}",
        &url[..scheme_end + colon + 1],
        &url[scheme_end + at..]
    );
    mask_query_password(&masked)
}

fn mask_query_password(url: &str) -> String {
    let Some(q) = url.find('?') else {
        return url.to_owned();
    };
    let params: Vec<String> = url[q + 1..]
        .split('&')
        .map(|kv| match kv.split_once('=') {
            Some((k, _)) if k.eq_ignore_ascii_case("password") => format!("{k}=********"),
            _ => kv.to_owned(),
        })
        .collect();
    format!("{}?{}", &url[..q], params.join("&"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let env = env.iter().map(|(k, v)| (k.to_string(), v.to_string()));
        Config::from_sources(text, Path::new("test.toml"), env)
    }

    #[test]
    fn empty_file_gives_documented_defaults() {
        let c = load("", &[]).unwrap();
        assert_eq!(c, Config::default());
        assert_eq!(c.proxy.egress.listen, "0.0.0.0:3128".parse().unwrap());
        assert_eq!(c.proxy.ingress.listen, "0.0.0.0:8080".parse().unwrap());
        assert_eq!(c.proxy.admin.listen, "0.0.0.0:9900".parse().unwrap());
        assert_eq!(c.proxy.meter.flush_interval, Duration::from_secs(1));
        assert_eq!(c.proxy.directory.max_stale, Duration::from_secs(600));
        assert_eq!(c.proxy.egress.connect_ports, vec![443]);
        assert_eq!(c.proxy.ingress.gateway_port, 18789);
        assert_eq!(c.monitor.interval, Duration::from_secs(15));
        assert_eq!(c.monitor.max_gap, Duration::from_secs(300));
    }

    #[test]
    fn destination_top_n_defaults_to_50_and_is_at_least_1() {
        let c = load("", &[]).unwrap();
        assert_eq!(c.proxy.meter.destination_top_n, 50);
        let c = load("", &[("TOLLGATE_PROXY__METER__DESTINATION_TOP_N", "3")]).unwrap();
        assert_eq!(c.proxy.meter.destination_top_n, 3);
        for bad in ["0", "10001"] {
            let err = load(&format!("[proxy.meter]\ndestination_top_n = {bad}"), &[])
                .unwrap_err()
                .to_string();
            assert!(err.contains("proxy.meter.destination_top_n"), "{err}");
        }
    }

    #[test]
    fn file_then_database_url_then_tollgate_env() {
        let text = r#"
            [database]
            url = "postgres://file@db/tollgate"
            [proxy.egress]
            connect_ports = [443, 8443]
            [proxy.meter]
            flush_interval = "250ms"
        "#;
        let c = load(text, &[("DATABASE_URL", "postgres://env@db/x")]).unwrap();
        assert_eq!(c.database.url, "postgres://env@db/x");
        assert_eq!(c.proxy.egress.connect_ports, vec![443, 8443]);
        assert_eq!(c.proxy.meter.flush_interval, Duration::from_millis(250));

        let c = load(
            text,
            &[
                ("DATABASE_URL", "postgres://env@db/x"),
                ("TOLLGATE_DATABASE__URL", "postgres://tollgate@db/y"),
                ("TOLLGATE_PROXY__EGRESS__LISTEN", "127.0.0.1:4000"),
                ("TOLLGATE_PROXY__EGRESS__CONNECT_PORTS", "[22]"),
                ("TOLLGATE_PROXY__EGRESS__ALLOW_CIDRS", "[\"10.1.0.0/16\"]"),
                ("TOLLGATE_MONITOR__PROVIDERS__K8S__SOURCE", "cgroup"),
                ("TOLLGATE_LOG__FORMAT", "json"),
                ("TOLLGATE_CONFIG", "/ignored/here.toml"),
                ("UNRELATED", "x"),
            ],
        )
        .unwrap();
        assert_eq!(c.database.url, "postgres://tollgate@db/y");
        assert_eq!(c.proxy.egress.listen, "127.0.0.1:4000".parse().unwrap());
        assert_eq!(c.proxy.egress.connect_ports, vec![22]);
        assert_eq!(
            c.proxy.egress.allow_cidrs,
            vec!["10.1.0.0/16".parse::<IpNet>().unwrap()]
        );
        assert_eq!(c.log.format, LogFormat::Json);
        assert!(matches!(
            c.monitor.providers["k8s"],
            SourceConfig::Cgroup { .. }
        ));
    }

    #[test]
    fn errors_name_the_key_in_one_line() {
        let err = load("[proxy.egress]\nlisten = \"nowhere\"", &[])
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("config key `proxy.egress.listen`"), "{err}");
        assert!(!err.contains('\n'), "{err}");

        let err = load("[proxy.egress]\nlisen = \"0.0.0.0:1\"", &[])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("proxy.egress") && err.contains("lisen"),
            "{err}"
        );

        let err = load("[proxy.meter]\nflush_interval = 5", &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("proxy.meter.flush_interval"), "{err}");

        let err = load("", &[("TOLLGATE_PROXY__METER__FLUSH_INTERVAL", "0s")])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("proxy.meter.flush_interval") && err.contains("longer than 0"),
            "{err}"
        );

        let err = load("", &[("TOLLGATE_NOPE", "1")]).unwrap_err().to_string();
        assert!(err.contains("nope"), "{err}");

        let err = load("[proxy\n", &[]).unwrap_err().to_string();
        assert!(
            err.starts_with("config file test.toml is not valid TOML"),
            "{err}"
        );
        assert!(!err.contains('\n'), "{err}");
    }

    #[test]
    fn validation_catches_what_types_cannot() {
        let err = load("[database]\nurl = \"mysql://x\"", &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("database.url"), "{err}");
        let err = load("[proxy.ingress]\nlisten = \"0.0.0.0:3128\"", &[])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("proxy.ingress.listen") && err.contains("overlaps"),
            "{err}"
        );
        let err = load(
            "[proxy.egress.tls]\ncert = \"/nonexistent.pem\"\nkey = \"/nonexistent.key\"",
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("proxy.egress.tls.cert"), "{err}");
        let err = load("[proxy.egress]\nmax_header_bytes = 100", &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("at least 8192"), "{err}");
        let err = load(
            "[monitor.providers.k8s]\nsource = \"cgroup\"\npath = \"vps/{vpsid}\"",
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("monitor.providers.k8s.path") && err.contains("{vpsid}"),
            "{err}"
        );
        // PromQL label braces are not placeholders.
        load(
            "[monitor.providers.k8s]\nsource = \"prometheus\"\nurl = \"http://p:9090\"\n\
             cpu_query = 'sum(rate(x{pod=\"{vm_id}\"}[1m]))'\nmemory_query = 'm{pod=\"{vm_id}\"}'",
            &[],
        )
        .unwrap();
    }

    #[test]
    fn decision_log_is_off_by_default_and_a_file_sink_needs_a_path() {
        let c = load("", &[]).unwrap();
        assert_eq!(c.proxy.decision_log.sink, DecisionLogSink::Off);
        assert_eq!(c.proxy.decision_log.queue_events, 65_536);
        assert!(!c.proxy.decision_log.include_query);

        let dir = std::env::temp_dir();
        let file = dir.join("tollgate-decisions.jsonl");
        let c = load(
            "",
            &[
                ("TOLLGATE_PROXY__DECISION_LOG__SINK", "file"),
                ("TOLLGATE_PROXY__DECISION_LOG__PATH", file.to_str().unwrap()),
                ("TOLLGATE_PROXY__DECISION_LOG__INCLUDE_QUERY", "true"),
                ("TOLLGATE_PROXY__DECISION_LOG__QUEUE_EVENTS", "16"),
            ],
        )
        .unwrap();
        let log = &c.proxy.decision_log;
        assert_eq!(log.sink, DecisionLogSink::File);
        assert_eq!(log.path.as_deref(), Some(file.as_path()));
        assert!(log.include_query);
        assert_eq!(log.queue_events, 16);

        let err = load("[proxy.decision_log]\nsink = \"file\"", &[])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("proxy.decision_log.path") && err.contains("required"),
            "{err}"
        );
        let err = load(
            "[proxy.decision_log]\nsink = \"file\"\npath = \"/nonexistent-dir/d.jsonl\"",
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("proxy.decision_log.path") && err.contains("existing directory"),
            "{err}"
        );
        let err = load(
            &format!("[proxy.decision_log]\nsink = \"file\"\npath = {:?}", dir),
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("proxy.decision_log.path"), "{err}");
        let err = load("[proxy.decision_log]\nqueue_events = 0", &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("proxy.decision_log.queue_events"), "{err}");
        let err = load("[proxy.decision_log]\nsink = \"syslog\"", &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("proxy.decision_log.sink"), "{err}");
    }

    #[test]
    fn prometheus_queries_are_either_fleet_wide_or_per_vps() {
        let source = |queries: &str| {
            load(
                &format!("[monitor.providers.k8s]\nsource = \"prometheus\"\nurl = \"http://p:9090\"\n{queries}"),
                &[],
            )
        };
        let fleet = source(
            "cpu_query = 'sum by (pod) (c{container!=\"\"})'\nmemory_query = 'sum by (pod) (m)'\nvps_label = \"pod\"",
        )
        .unwrap();
        assert!(matches!(
            &fleet.monitor.providers["k8s"],
            SourceConfig::Prometheus { vps_label: Some(l), vps_label_value: v, .. } if l == "pod" && v == "{vm_id}"
        ));
        // A template with a fleet label, or a fleet query with none, is refused by name.
        let err = source("cpu_query = 'c{pod=\"{vm_id}\"}'\nmemory_query = 'sum by (pod) (m)'\nvps_label = \"pod\"")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("monitor.providers.k8s.cpu_query")
                && err.contains("once for the whole fleet"),
            "{err}"
        );
        let err = source("cpu_query = 'c{pod=\"{vm_id}\"}'\nmemory_query = 'sum by (pod) (m)'")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("monitor.providers.k8s.memory_query") && err.contains("vps_label"),
            "{err}"
        );
        let err = source("cpu_query = 'sum by (pod) (c)'\nmemory_query = 'sum by (pod) (m)'\nvps_label = \"po d\"")
            .unwrap_err()
            .to_string();
        assert!(err.contains("vps_label"), "{err}");
        // Held samples may not wait longer than a gap is integrated.
        let err = load("[monitor]\nwrite_interval = \"10m\"", &[])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("monitor.write_interval") && err.contains("max_gap"),
            "{err}"
        );
    }

    #[test]
    fn masked_output_hides_secrets_and_reparses() {
        let text =
            "[database]\nurl = \"postgres://tollgate:s3cret@db:5432/tollgate?password=s3cret\"\n\
                    [monitor.default_source]\nsource = \"agent\"\ntoken = \"Bearer abc\"\n";
        let c = load(text, &[]).unwrap();
        let out = c.to_masked_toml();
        assert!(!out.contains("s3cret") && !out.contains("abc"), "{out}");
        assert!(
            out.contains("postgres://tollgate:********@db:5432/tollgate"),
            "{out}"
        );
        let again = load(&out, &[]).unwrap();
        assert_eq!(again.proxy, c.proxy);
    }

    #[test]
    fn usage_api_is_off_by_default_and_needs_a_long_token() {
        let c = load("", &[]).unwrap();
        assert!(!c.proxy.usage_api.enabled);
        assert_eq!(c.proxy.usage_api.listen, "127.0.0.1:9902".parse().unwrap());
        let on = ("TOLLGATE_PROXY__USAGE_API__ENABLED", "true");
        let err = load("", &[on]).unwrap_err().to_string();
        assert!(
            err.contains("proxy.usage_api.token") && err.contains("required"),
            "{err}"
        );
        let short = (
            "TOLLGATE_PROXY__USAGE_API__TOKEN",
            "x-too-short-to-guess-safely",
        );
        let err = load("", &[on, short]).unwrap_err().to_string();
        assert!(err.contains("at least 32 characters"), "{err}");
        assert!(
            !err.contains("x-too-short"),
            "the token is never echoed: {err}"
        );
        let token = "u".repeat(32);
        let c = load("", &[on, ("TOLLGATE_PROXY__USAGE_API__TOKEN", &token)]).unwrap();
        assert_eq!(c.proxy.usage_api.bearer_token().unwrap(), token);
        let masked = c.to_masked_toml();
        assert!(!masked.contains(&token), "{masked}");

        let file =
            std::env::temp_dir().join(format!("tollgate-usage-token-{}", std::process::id()));
        std::fs::write(&file, format!("{}\n", "f".repeat(40))).unwrap();
        let path = (
            "TOLLGATE_PROXY__USAGE_API__TOKEN_FILE",
            file.to_str().unwrap(),
        );
        let c = load("", &[on, path]).unwrap();
        assert_eq!(c.proxy.usage_api.bearer_token().unwrap(), "f".repeat(40));
        let err = load(
            "",
            &[on, path, ("TOLLGATE_PROXY__USAGE_API__TOKEN", &token)],
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("not both"), "{err}");
        std::fs::remove_file(&file).unwrap();
        let err = load("", &[on, path]).unwrap_err().to_string();
        assert!(err.contains("cannot read"), "{err}");

        let clash = ("TOLLGATE_PROXY__USAGE_API__LISTEN", "0.0.0.0:9900");
        let err = load(
            "",
            &[on, ("TOLLGATE_PROXY__USAGE_API__TOKEN", &token), clash],
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("proxy.usage_api.listen"), "{err}");
    }

    #[test]
    fn url_masking_leaves_passwordless_urls_alone() {
        assert_eq!(
            mask_url_password("postgres://postgres@127.0.0.1/x"),
            "postgres://postgres@127.0.0.1/x"
        );
        assert_eq!(
            mask_url_password("postgres:///x?host=/run"),
            "postgres:///x?host=/run"
        );
    }

    #[test]
    fn webhooks_are_off_by_default_and_need_an_http_or_https_url_and_a_long_secret() {
        let c = load("", &[]).unwrap();
        assert_eq!(c.monitor.webhooks.url, None);
        assert_eq!(c.monitor.webhooks.timeout, Duration::from_secs(10));
        let url = (
            "TOLLGATE_MONITOR__WEBHOOKS__URL",
            "http://hooks.internal:8000/tollgate",
        );
        let err = load("", &[url]).unwrap_err().to_string();
        assert!(err.contains("monitor.webhooks.secret"), "{err}");
        let short = ("TOLLGATE_MONITOR__WEBHOOKS__SECRET", "too-short");
        let err = load("", &[url, short]).unwrap_err().to_string();
        assert!(err.contains("at least 32"), "{err}");
        let secret = "k".repeat(32);
        let secret = ("TOLLGATE_MONITOR__WEBHOOKS__SECRET", secret.as_str());
        let c = load(
            "",
            &[
                url,
                secret,
                ("TOLLGATE_MONITOR__WEBHOOKS__MAX_BACKOFF", "30s"),
            ],
        )
        .unwrap();
        assert_eq!(c.monitor.webhooks.url.as_deref(), Some(url.1));
        assert_eq!(c.monitor.webhooks.max_backoff, Duration::from_secs(30));
        let masked = c.to_masked_toml();
        assert!(!masked.contains(secret.1), "{masked}");
        let tls = (
            "TOLLGATE_MONITOR__WEBHOOKS__URL",
            "https://hooks.example.com/",
        );
        let c = load("", &[tls, secret]).unwrap();
        assert_eq!(c.monitor.webhooks.url.as_deref(), Some(tls.1));
        let nowhere = ("TOLLGATE_MONITOR__WEBHOOKS__CA_FILE", "/nonexistent/ca.pem");
        let err = load("", &[tls, secret, nowhere]).unwrap_err().to_string();
        assert!(err.contains("monitor.webhooks.ca_file"), "{err}");
        let err = load("", &[url, secret, nowhere]).unwrap_err().to_string();
        assert!(err.contains("https:// url only"), "{err}");
        let batch = ("TOLLGATE_MONITOR__WEBHOOKS__BATCH_SIZE", "0");
        let err = load("", &[batch]).unwrap_err().to_string();
        assert!(err.contains("monitor.webhooks.batch_size"), "{err}");
    }
}

#[cfg(test)]
mod example_file {
    use super::*;

    /// The documented example lists every field at its default.
    #[test]
    fn example_config_is_exactly_the_defaults() {
        let text = include_str!("../../deploy/tollgate.example.toml");
        let parsed = Config::from_sources(text, Path::new("tollgate.example.toml"), []).unwrap();
        assert_eq!(parsed, Config::default());
        // And every default field appears in it.
        let defaults: toml::Table =
            toml::from_str(&toml::to_string(&Config::default()).unwrap()).unwrap();
        let example: toml::Table = toml::from_str(text).unwrap();
        fn keys(prefix: &str, t: &toml::Table, out: &mut Vec<String>) {
            for (k, v) in t {
                let path = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                match v {
                    toml::Value::Table(inner) => keys(&path, inner, out),
                    _ => out.push(path),
                }
            }
        }
        let (mut want, mut have) = (Vec::new(), Vec::new());
        keys("", &defaults, &mut want);
        keys("", &example, &mut have);
        want.sort();
        have.sort();
        assert_eq!(want, have);
    }
}
