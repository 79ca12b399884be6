//! Where CPU and memory readings come from, chosen per provider in config:
//!
//! - `cgroup`: a cgroup on this host per VPS; v1 `cpuacct.usage` (ns) and
//!   `memory.usage_in_bytes`, v2 `cpu.stat` `usage_usec` and `memory.current`.
//! - `prometheus`: instant PromQL queries (cumulative CPU seconds, memory bytes).
//! - `agent`: the in-VM agent's `/metrics` JSON (`cpu_usage_percent`,
//!   `memory_used_bytes`, `disk_used_bytes`). The VM's owner controls these
//!   numbers; values are clamped to sane ranges, and host-side sources are
//!   preferred wherever one exists.
//!
//! Templates may use `{vps_id}`, `{vm_id}` and `{address}`. Failures are
//! [`SampleError`]s naming the VPS, the source and a [`FailureReason`], and
//! saying whether retrying can help.

use std::path::{Path, PathBuf};

use chrono::Utc;
use serde::Deserialize;

use tollgate_core::config::{CgroupVersion, SourceConfig};
use tollgate_core::db::samples::SampleTarget;

use crate::accounting::{Cpu, Reading};
use crate::http;

/// Which kind of source, for errors and metric labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceKind {
    Cgroup,
    Prometheus,
    Agent,
    /// No source is configured for the VPS's provider.
    Unconfigured,
}

impl SourceKind {
    pub fn as_str(self) -> &'static str {
        match self {
            SourceKind::Cgroup => "cgroup",
            SourceKind::Prometheus => "prometheus",
            SourceKind::Agent => "agent",
            SourceKind::Unconfigured => "none",
        }
    }
}

/// Why a sample failed, in a few words that fit a metric label and group the
/// failures of a cycle into one log line each.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FailureReason {
    /// No source is configured for the VPS's provider.
    NoSource,
    /// No answer within `monitor.sample_timeout`.
    Timeout,
    /// The source could not be reached or read (connection refused, I/O error).
    Unavailable,
    /// The source has nothing for this VPS (no cgroup, no series).
    NotFound,
    /// The source answered with an HTTP error status.
    HttpError,
    /// The source answered with something unreadable.
    BadResponse,
    /// The source's configuration cannot work for this VPS (e.g. a path outside the hierarchy).
    BadConfig,
}

impl FailureReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FailureReason::NoSource => "no_source",
            FailureReason::Timeout => "timeout",
            FailureReason::Unavailable => "unavailable",
            FailureReason::NotFound => "not_found",
            FailureReason::HttpError => "http_error",
            FailureReason::BadResponse => "bad_response",
            FailureReason::BadConfig => "bad_config",
        }
    }
}

/// A sample that failed.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{} sample of VPS {vps_id} failed ({}, {}): {message}", source_kind.as_str(), reason.as_str(), if *retryable { "retryable" } else { "not retryable" })]
pub struct SampleError {
    pub vps_id: uuid::Uuid,
    pub source_kind: SourceKind,
    pub reason: FailureReason,
    pub retryable: bool,
    pub message: String,
}

/// A configured source.
#[derive(Debug, Clone)]
pub struct Source {
    config: SourceConfig,
}

fn render(template: &str, target: &SampleTarget) -> String {
    template
        .replace("{vps_id}", &target.vps_id.to_string())
        .replace("{vm_id}", target.vm_id.as_deref().unwrap_or(""))
        .replace("{address}", target.address.as_deref().unwrap_or(""))
}

impl Source {
    pub fn new(config: SourceConfig) -> Self {
        Self { config }
    }

    pub fn kind(&self) -> SourceKind {
        match self.config {
            SourceConfig::Cgroup { .. } => SourceKind::Cgroup,
            SourceConfig::Prometheus { .. } => SourceKind::Prometheus,
            SourceConfig::Agent { .. } => SourceKind::Agent,
        }
    }

    fn error(
        &self,
        target: &SampleTarget,
        reason: FailureReason,
        retryable: bool,
        message: impl Into<String>,
    ) -> SampleError {
        SampleError {
            vps_id: target.vps_id,
            source_kind: self.kind(),
            reason,
            retryable,
            message: message.into(),
        }
    }

    /// Read the VPS's counters now.
    pub async fn sample(&self, target: &SampleTarget) -> Result<Reading, SampleError> {
        match &self.config {
            SourceConfig::Cgroup {
                root,
                version,
                path,
            } => self.cgroup(target, root, *version, path).await,
            SourceConfig::Prometheus {
                url,
                cpu_query,
                memory_query,
            } => self.prometheus(target, url, cpu_query, memory_query).await,
            SourceConfig::Agent {
                url,
                token_header,
                token,
            } => {
                self.agent(target, url, token_header, token.as_deref())
                    .await
            }
        }
    }

    async fn cgroup(
        &self,
        target: &SampleTarget,
        root: &Path,
        version: CgroupVersion,
        path: &str,
    ) -> Result<Reading, SampleError> {
        let relative = render(path, target);
        let relative = relative.trim_start_matches('/');
        if relative.split('/').any(|part| part == "..") {
            return Err(self.error(
                target,
                FailureReason::BadConfig,
                false,
                format!("cgroup path `{relative}` leaves the hierarchy"),
            ));
        }
        let v2 = match version {
            CgroupVersion::V1 => false,
            CgroupVersion::V2 => true,
            CgroupVersion::Auto => root.join("cgroup.controllers").exists(),
        };
        let (cpu_file, memory_file): (PathBuf, PathBuf) = if v2 {
            (
                root.join(relative).join("cpu.stat"),
                root.join(relative).join("memory.current"),
            )
        } else {
            (
                root.join("cpuacct").join(relative).join("cpuacct.usage"),
                root.join("memory")
                    .join(relative)
                    .join("memory.usage_in_bytes"),
            )
        };
        let read = |file: PathBuf| async move {
            tokio::fs::read_to_string(&file).await.map_err(|e| {
                // A missing cgroup is configuration (or a VPS not on this host), not a blip.
                let missing = e.kind() == std::io::ErrorKind::NotFound;
                let reason = if missing {
                    FailureReason::NotFound
                } else {
                    FailureReason::Unavailable
                };
                self.error(
                    target,
                    reason,
                    !missing,
                    format!("reading {}: {e}", file.display()),
                )
            })
        };
        let cpu_text = read(cpu_file.clone()).await?;
        let memory_text = read(memory_file.clone()).await?;
        let parse_error = |file: &Path| {
            self.error(
                target,
                FailureReason::BadResponse,
                false,
                format!("unexpected contents in {}", file.display()),
            )
        };
        let cpu_us = if v2 {
            cpu_text
                .lines()
                .find_map(|l| l.strip_prefix("usage_usec "))
                .and_then(|v| v.trim().parse::<u64>().ok())
                .ok_or_else(|| parse_error(&cpu_file))?
        } else {
            cpu_text
                .trim()
                .parse::<u64>()
                .map_err(|_| parse_error(&cpu_file))?
                / 1000
        };
        let memory = memory_text
            .trim()
            .parse::<u64>()
            .map_err(|_| parse_error(&memory_file))?;
        Ok(Reading {
            at: Utc::now(),
            cpu: Some(Cpu::CumulativeUs(cpu_us)),
            memory_bytes: Some(memory),
            storage_bytes: None,
        })
    }

    async fn prometheus(
        &self,
        target: &SampleTarget,
        url: &str,
        cpu_query: &str,
        memory_query: &str,
    ) -> Result<Reading, SampleError> {
        let query = |q: String| async move {
            let full = format!(
                "{}/api/v1/query?query={}",
                url.trim_end_matches('/'),
                http::encode_query_value(&q)
            );
            let (status, body) = http::get(&full, &[])
                .await
                .map_err(|e| self.error(target, FailureReason::Unavailable, true, e.to_string()))?;
            let parsed: PromResponse = serde_json::from_slice(&body).map_err(|e| {
                let reason = if status.is_success() {
                    FailureReason::BadResponse
                } else {
                    FailureReason::HttpError
                };
                self.error(
                    target,
                    reason,
                    status.is_server_error(),
                    format!("HTTP {status}, unreadable answer: {e}"),
                )
            })?;
            if parsed.status != "success" {
                let why = parsed.error.unwrap_or_default();
                return Err(self.error(
                    target,
                    FailureReason::BadResponse,
                    status.is_server_error(),
                    format!("query `{q}` failed: {why}"),
                ));
            }
            let values: Vec<f64> = parsed
                .data
                .map(|d| {
                    d.result
                        .into_iter()
                        .filter_map(|r| r.value.1.parse::<f64>().ok())
                        .collect()
                })
                .unwrap_or_default();
            if values.is_empty() {
                return Err(self.error(
                    target,
                    FailureReason::NotFound,
                    true,
                    format!("query `{q}` returned no series (not scraped yet?)"),
                ));
            }
            Ok(values
                .into_iter()
                .filter(|v| v.is_finite() && *v >= 0.0)
                .sum::<f64>())
        };
        let cpu_seconds = query(render(cpu_query, target)).await?;
        let memory = query(render(memory_query, target)).await?;
        Ok(Reading {
            at: Utc::now(),
            cpu: Some(Cpu::CumulativeUs((cpu_seconds * 1e6).round() as u64)),
            memory_bytes: Some(memory.round() as u64),
            storage_bytes: None,
        })
    }

    async fn agent(
        &self,
        target: &SampleTarget,
        url: &str,
        token_header: &str,
        token: Option<&str>,
    ) -> Result<Reading, SampleError> {
        let url = render(url, target);
        let headers: Vec<(&str, &str)> = token.map(|t| vec![(token_header, t)]).unwrap_or_default();
        let (status, body) = http::get(&url, &headers)
            .await
            .map_err(|e| self.error(target, FailureReason::Unavailable, true, e.to_string()))?;
        if !status.is_success() {
            let retryable =
                status.is_server_error() || status == ::http::StatusCode::TOO_MANY_REQUESTS;
            return Err(self.error(
                target,
                FailureReason::HttpError,
                retryable,
                format!("agent answered HTTP {status}"),
            ));
        }
        let m: AgentMetrics = serde_json::from_slice(&body).map_err(|e| {
            self.error(
                target,
                FailureReason::BadResponse,
                false,
                format!("agent metrics JSON unreadable: {e}"),
            )
        })?;
        Ok(Reading {
            at: Utc::now(),
            cpu: m
                .cpu_usage_percent
                .filter(|p| p.is_finite())
                .map(|p| Cpu::Percent(p.clamp(0.0, 100.0))),
            memory_bytes: m.memory_used_bytes,
            storage_bytes: m.disk_used_bytes,
        })
    }
}

#[derive(Deserialize)]
struct PromResponse {
    status: String,
    data: Option<PromData>,
    error: Option<String>,
}

#[derive(Deserialize)]
struct PromData {
    result: Vec<PromSample>,
}

#[derive(Deserialize)]
struct PromSample {
    value: (f64, String),
}

/// The in-VM agent's `/metrics` (fields Tollgate uses; others are ignored).
#[derive(Deserialize)]
struct AgentMetrics {
    cpu_usage_percent: Option<f64>,
    memory_used_bytes: Option<u64>,
    disk_used_bytes: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use uuid::Uuid;

    fn target() -> SampleTarget {
        SampleTarget {
            vps_id: Uuid::nil(),
            user_id: Uuid::nil(),
            provider: "k8s".into(),
            vm_id: Some("pod-7".into()),
            address: Some("10.1.2.3".into()),
            cpu_millicores: 1000,
        }
    }

    #[test]
    fn templates_fill_in_the_vps() {
        assert_eq!(
            render("{vps_id}/{vm_id}@{address}", &target()),
            "00000000-0000-0000-0000-000000000000/pod-7@10.1.2.3"
        );
    }

    #[tokio::test]
    async fn cgroup_v1_and_v2_files_are_read() {
        let root = std::env::temp_dir().join(format!("tollgate-cg-{}", Uuid::new_v4()));
        let v1 = root.join("v1");
        std::fs::create_dir_all(v1.join("cpuacct/vps/pod-7")).unwrap();
        std::fs::create_dir_all(v1.join("memory/vps/pod-7")).unwrap();
        std::fs::write(v1.join("cpuacct/vps/pod-7/cpuacct.usage"), "2500000123\n").unwrap();
        std::fs::write(v1.join("memory/vps/pod-7/memory.usage_in_bytes"), "4096\n").unwrap();
        let source = Source::new(SourceConfig::Cgroup {
            root: v1,
            version: CgroupVersion::Auto,
            path: "vps/{vm_id}".into(),
        });
        let r = source.sample(&target()).await.unwrap();
        assert_eq!(
            (r.cpu, r.memory_bytes),
            (Some(Cpu::CumulativeUs(2_500_000)), Some(4096))
        );

        let v2 = root.join("v2");
        std::fs::create_dir_all(v2.join("vps/pod-7")).unwrap();
        std::fs::write(v2.join("cgroup.controllers"), "cpu memory\n").unwrap();
        std::fs::write(
            v2.join("vps/pod-7/cpu.stat"),
            "usage_usec 777\nuser_usec 700\nsystem_usec 77\n",
        )
        .unwrap();
        std::fs::write(v2.join("vps/pod-7/memory.current"), "8192\n").unwrap();
        let source = Source::new(SourceConfig::Cgroup {
            root: v2,
            version: CgroupVersion::Auto,
            path: "vps/{vm_id}".into(),
        });
        let r = source.sample(&target()).await.unwrap();
        assert_eq!(
            (r.cpu, r.memory_bytes),
            (Some(Cpu::CumulativeUs(777)), Some(8192))
        );

        let missing = Source::new(SourceConfig::Cgroup {
            root: root.clone(),
            version: CgroupVersion::V1,
            path: "nope/{vps_id}".into(),
        });
        let e = missing.sample(&target()).await.unwrap_err();
        assert!(!e.retryable && e.source_kind == SourceKind::Cgroup, "{e}");
        let escape = Source::new(SourceConfig::Cgroup {
            root: root.clone(),
            version: CgroupVersion::V1,
            path: "../{vm_id}".into(),
        });
        assert!(escape
            .sample(&target())
            .await
            .unwrap_err()
            .message
            .contains("leaves the hierarchy"));
        std::fs::remove_dir_all(root).unwrap();
    }
}
