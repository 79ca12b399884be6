//! Where CPU and memory readings come from, chosen per provider in config:
//!
//! - `cgroup`: a cgroup on this host per VPS; v1 `cpuacct.usage` (ns) and
//!   `memory.usage_in_bytes`, v2 `cpu.stat` `usage_usec` and `memory.current`.
//! - `prometheus`: instant PromQL queries (cumulative CPU seconds, memory bytes):
//!   with `vps_label`, two queries per cycle for the whole fleet, one series per
//!   VPS; without, per-VPS templates.
//! - `agent`: the in-VM agent's `/metrics` JSON (`cpu_usage_percent`,
//!   `memory_used_bytes`, `disk_used_bytes`). The VM's owner controls these
//!   numbers; values are clamped to sane ranges, and host-side sources are
//!   preferred wherever one exists.
//!
//! Templates may use `{vps_id}`, `{vm_id}` and `{address}`. Failures are
//! [`SampleError`]s naming the VPS, the source and a [`FailureReason`], and
//! saying whether retrying can help.
//!
//! A cycle hands each source all of its VPSes at once ([`Source::sample_all`]):
//! a fleet Prometheus source asks two queries, a cgroup source lists each
//! parent directory once and reads the counters in one blocking task, and only
//! the in-VM agent (inherently one VM at a time) is asked per VPS, a bounded
//! number at once.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use chrono::Utc;
use futures_util::StreamExt;
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

    /// Read the counters of every VPS in `targets` (this source's share of a
    /// cycle), returning each target with its result. Requests to the source:
    /// two for a fleet Prometheus source, one per VPS (at most `concurrency` at
    /// once, each within `timeout`) for the agent and per-VPS Prometheus
    /// templates; a cgroup source lists each parent directory once and reads
    /// files in one blocking task. Also returns how many requests or directory
    /// listings were made.
    ///
    /// A fleet source uses `prefetched` answers ([`Source::prefetch`]) when
    /// given, so the queries can run while the cycle reads the fleet.
    pub async fn sample_all(
        &self,
        targets: &[SampleTarget],
        concurrency: usize,
        timeout: Duration,
        prefetched: Option<Prefetched>,
    ) -> (Vec<Result<Reading, SampleError>>, usize) {
        if let Some(fleet) = self.fleet() {
            let (answer, queries) = match prefetched {
                Some(Prefetched(answer)) => (answer, 0),
                None => (fetch_fleet(&fleet, timeout).await, 2),
            };
            return (self.readings_from(targets, &fleet, answer), queries);
        }
        match &self.config {
            SourceConfig::Cgroup {
                root,
                version,
                path,
            } => {
                let (this, owned) = (self.clone(), targets.to_vec());
                let (root, version, path) = (root.clone(), *version, path.clone());
                let work = tokio::task::spawn_blocking(move || {
                    let mut listed = Listings::default();
                    let results = owned
                        .iter()
                        .map(|t| this.cgroup(t, &root, version, &path, Some(&mut listed)))
                        .collect::<Vec<_>>();
                    (results, listed.walks())
                });
                match tokio::time::timeout(timeout, work).await {
                    Ok(Ok(done)) => done,
                    Ok(Err(e)) => {
                        let reason = FailureReason::Unavailable;
                        let message = format!("reading cgroups failed: {e}");
                        (self.all_failed(targets, reason, true, &message), 0)
                    }
                    Err(_) => {
                        let message =
                            format!("cgroups not read within {timeout:?} (monitor.sample_timeout)");
                        (
                            self.all_failed(targets, FailureReason::Timeout, true, &message),
                            0,
                        )
                    }
                }
            }
            _ => {
                let mut results: Vec<(usize, Result<Reading, SampleError>)> =
                    futures_util::stream::iter(targets.iter().cloned().enumerate())
                        .map(|(i, target)| async move {
                            let result =
                                match tokio::time::timeout(timeout, self.sample(&target)).await {
                                    Ok(result) => result,
                                    Err(_) => Err(self.error(
                                        &target,
                                        FailureReason::Timeout,
                                        true,
                                        format!(
                                            "no answer within {timeout:?} (monitor.sample_timeout)"
                                        ),
                                    )),
                                };
                            (i, result)
                        })
                        .buffer_unordered(concurrency.max(1))
                        .collect()
                        .await;
                results.sort_unstable_by_key(|(i, _)| *i);
                let per_vps = match self.config {
                    SourceConfig::Prometheus { .. } => 2,
                    _ => 1,
                };
                (
                    results.into_iter().map(|(_, r)| r).collect(),
                    per_vps * targets.len(),
                )
            }
        }
    }

    fn all_failed(
        &self,
        targets: &[SampleTarget],
        reason: FailureReason,
        retryable: bool,
        message: &str,
    ) -> Vec<Result<Reading, SampleError>> {
        targets
            .iter()
            .map(|t| Err(self.error(t, reason, retryable, message)))
            .collect()
    }

    /// The fleet queries' answers now, for [`Source::sample_all`]: `None` for
    /// sources that are not fleet Prometheus sources.
    pub async fn prefetch(&self, timeout: Duration) -> Option<Prefetched> {
        let fleet = self.fleet()?;
        Some(Prefetched(fetch_fleet(&fleet, timeout).await))
    }

    /// The fleet queries of a Prometheus source with a `vps_label`.
    fn fleet(&self) -> Option<PrometheusFleet<'_>> {
        match &self.config {
            SourceConfig::Prometheus {
                url,
                cpu_query,
                memory_query,
                vps_label: Some(label),
                vps_label_value,
            } => Some(PrometheusFleet {
                url,
                cpu_query,
                memory_query,
                label,
                label_value: vps_label_value,
            }),
            _ => None,
        }
    }

    /// Each VPS takes its series from the fleet answers. A VPS without a series
    /// in either answer fails (`not_found`, retryable): a missing series is
    /// never read as zero.
    fn readings_from(
        &self,
        targets: &[SampleTarget],
        fleet: &PrometheusFleet<'_>,
        answer: FleetAnswer,
    ) -> Vec<Result<Reading, SampleError>> {
        let (at, cpu, memory) = match answer {
            Ok(answers) => answers,
            Err(e) => return self.all_failed(targets, e.reason, e.retryable, &e.message),
        };
        targets
            .iter()
            .map(|target| {
                let key = match (fleet.label_value, &target.vm_id) {
                    ("{vm_id}", Some(vm)) => Cow::Borrowed(vm.as_str()),
                    _ => Cow::Owned(render(fleet.label_value, target)),
                };
                let value = |answer: &HashMap<String, f64>, query: &str| {
                    answer.get(key.as_ref()).copied().ok_or_else(|| {
                        self.error(
                            target,
                            FailureReason::NotFound,
                            true,
                            format!(
                                "no series with {}=\"{key}\" in the answer to `{query}` (not scraped yet?)",
                                fleet.label
                            ),
                        )
                    })
                };
                let cpu_seconds = value(&cpu, fleet.cpu_query)?;
                let memory = value(&memory, fleet.memory_query)?;
                Ok(Reading {
                    at,
                    cpu: Some(Cpu::CumulativeUs((cpu_seconds * 1e6).round() as u64)),
                    memory_bytes: Some(memory.round() as u64),
                    storage_bytes: None,
                })
            })
            .collect()
    }

    /// Read the VPS's counters now.
    pub async fn sample(&self, target: &SampleTarget) -> Result<Reading, SampleError> {
        match &self.config {
            SourceConfig::Cgroup {
                root,
                version,
                path,
            } => self.cgroup(target, root, *version, path, None),
            SourceConfig::Prometheus {
                url,
                cpu_query,
                memory_query,
                vps_label: None,
                ..
            } => self.prometheus(target, url, cpu_query, memory_query).await,
            SourceConfig::Prometheus {
                url,
                cpu_query,
                memory_query,
                vps_label: Some(label),
                vps_label_value,
            } => {
                let fleet = PrometheusFleet {
                    url,
                    cpu_query,
                    memory_query,
                    label,
                    label_value: vps_label_value,
                };
                // The caller bounds the time; this is only a backstop.
                let backstop = Duration::from_secs(24 * 3600);
                let answer = fetch_fleet(&fleet, backstop).await;
                self.readings_from(std::slice::from_ref(target), &fleet, answer)
                    .pop()
                    .expect("one result per target")
            }
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

    /// Read one VPS's cgroup files (blocking: call from a blocking task, or for
    /// one VPS). `listed` holds the directories listed this cycle: a VPS whose
    /// directory is not in its parent's listing fails without opening files.
    fn cgroup(
        &self,
        target: &SampleTarget,
        root: &Path,
        version: CgroupVersion,
        path: &str,
        listed: Option<&mut Listings>,
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
        if let Some(listed) = listed {
            let dir = cpu_file.parent().unwrap_or(root);
            if !listed.contains(dir) {
                return Err(self.error(
                    target,
                    FailureReason::NotFound,
                    false,
                    format!("no cgroup {}", dir.display()),
                ));
            }
        }
        let read = |file: PathBuf| {
            std::fs::read_to_string(&file).map_err(|e| {
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
        let cpu_text = read(cpu_file.clone())?;
        let memory_text = read(memory_file.clone())?;
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
            prometheus_query(url, &q, None)
                .await
                .map(|values| values.values().sum::<f64>())
                .map_err(|e| self.error(target, e.reason, e.retryable, e.message))
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

/// A fleet Prometheus source's settings, borrowed from its config.
struct PrometheusFleet<'a> {
    url: &'a str,
    cpu_query: &'a str,
    memory_query: &'a str,
    label: &'a str,
    label_value: &'a str,
}

/// Directories of a cgroup hierarchy listed during one cycle, each at most once.
#[derive(Default)]
struct Listings {
    /// Per parent directory, the names of its subdirectories (`None`: unreadable).
    parents: HashMap<PathBuf, Option<HashSet<std::ffi::OsString>>>,
}

impl Listings {
    /// Whether `dir` exists, listing its parent the first time it is asked about.
    fn contains(&mut self, dir: &Path) -> bool {
        let (Some(parent), Some(name)) = (dir.parent(), dir.file_name()) else {
            return dir.is_dir();
        };
        let listing = self.parents.entry(parent.to_path_buf()).or_insert_with(|| {
            std::fs::read_dir(parent).ok().map(|entries| {
                entries
                    .filter_map(Result::ok)
                    .map(|e| e.file_name())
                    .collect()
            })
        });
        match listing {
            Some(names) => names.contains(name),
            // An unreadable parent: let the file reads report why.
            None => true,
        }
    }

    fn walks(&self) -> usize {
        self.parents.len()
    }
}

/// Both answers of a fleet source (CPU seconds and memory bytes by label
/// value) and when they were asked for, or why they could not be had.
type FleetAnswer = Result<
    (
        chrono::DateTime<Utc>,
        HashMap<String, f64>,
        HashMap<String, f64>,
    ),
    QueryError,
>;

/// A fleet source's answers fetched ahead of [`Source::sample_all`].
pub struct Prefetched(FleetAnswer);

/// Both fleet queries at once, within `timeout`.
async fn fetch_fleet(fleet: &PrometheusFleet<'_>, timeout: Duration) -> FleetAnswer {
    let at = Utc::now();
    let both = futures_util::future::try_join(
        prometheus_query(fleet.url, fleet.cpu_query, Some(fleet.label)),
        prometheus_query(fleet.url, fleet.memory_query, Some(fleet.label)),
    );
    match tokio::time::timeout(timeout, both).await {
        Ok(Ok((cpu, memory))) => Ok((at, cpu, memory)),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(QueryError {
            reason: FailureReason::Timeout,
            retryable: true,
            message: format!(
                "Prometheus did not answer within {timeout:?} (monitor.sample_timeout)"
            ),
        }),
    }
}

/// Why a query failed, before it is charged to each VPS.
struct QueryError {
    reason: FailureReason,
    retryable: bool,
    message: String,
}

/// Run one instant query. With `by_label`, returns each series' value keyed by
/// that label's value (series without it are ignored; several with the same
/// value are summed); without, the sum of all series under the empty key, or
/// an error when there is none.
async fn prometheus_query(
    url: &str,
    query: &str,
    by_label: Option<&str>,
) -> Result<HashMap<String, f64>, QueryError> {
    let full = format!(
        "{}/api/v1/query?query={}",
        url.trim_end_matches('/'),
        http::encode_query_value(query)
    );
    let (status, body) = http::get_large(&full, &[]).await.map_err(|e| QueryError {
        reason: FailureReason::Unavailable,
        retryable: true,
        message: e.to_string(),
    })?;
    let parsed: PromResponse = serde_json::from_slice(&body).map_err(|e| QueryError {
        reason: if status.is_success() {
            FailureReason::BadResponse
        } else {
            FailureReason::HttpError
        },
        retryable: status.is_server_error(),
        message: format!("HTTP {status}, unreadable answer: {e}"),
    })?;
    if parsed.status != "success" {
        return Err(QueryError {
            reason: FailureReason::BadResponse,
            retryable: status.is_server_error(),
            message: format!(
                "query `{query}` failed: {}",
                parsed.error.unwrap_or_default()
            ),
        });
    }
    let series = parsed.data.map(|d| d.result).unwrap_or_default();
    let mut values: HashMap<String, f64> = HashMap::with_capacity(series.len());
    for sample in series {
        let Ok(value) = sample.value.1.parse::<f64>() else {
            continue;
        };
        if !value.is_finite() || value < 0.0 {
            continue;
        }
        let key = match by_label {
            Some(label) => match sample.metric.get(label) {
                Some(v) => v.to_string(),
                None => continue,
            },
            None => String::new(),
        };
        *values.entry(key).or_default() += value;
    }
    if by_label.is_none() && values.is_empty() {
        return Err(QueryError {
            reason: FailureReason::NotFound,
            retryable: true,
            message: format!("query `{query}` returned no series (not scraped yet?)"),
        });
    }
    Ok(values)
}

/// An instant query's answer, borrowing from the body where it can (a fleet
/// answer has a series per VPS).
#[derive(Deserialize)]
struct PromResponse<'a> {
    #[serde(borrow)]
    status: Cow<'a, str>,
    #[serde(borrow)]
    data: Option<PromData<'a>>,
    error: Option<String>,
}

#[derive(Deserialize)]
struct PromData<'a> {
    #[serde(borrow)]
    result: Vec<PromSample<'a>>,
}

#[derive(Deserialize)]
struct PromSample<'a> {
    #[serde(default, borrow)]
    metric: HashMap<Cow<'a, str>, Cow<'a, str>>,
    #[serde(borrow)]
    value: (f64, Cow<'a, str>),
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
