//! Logs and metrics setup shared by every subcommand.
//!
//! Logs go through `tracing` (human or JSON). Metrics go through the `metrics`
//! facade into one process-wide Prometheus recorder whose text the admin
//! listeners serve. Names are prefixed `tollgate_`; labels are bounded (listener,
//! direction, outcome, reason, source), never per VPS or per user.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::EnvFilter;

use crate::config::{LogConfig, LogFormat};

/// Install the global `tracing` subscriber. `RUST_LOG` overrides `log.filter`.
pub fn init_tracing(config: &LogConfig) {
    let filter = std::env::var("RUST_LOG")
        .ok()
        .and_then(|f| EnvFilter::try_new(f).ok())
        .unwrap_or_else(|| EnvFilter::new(&config.filter));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // A second call (tests running several servers in one process) keeps the first.
    let _ = match config.format {
        LogFormat::Human => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}

/// Histogram buckets in seconds for latency-like metrics.
const SECONDS_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Histogram buckets in bytes for overshoot-like metrics: 0, then 1 KiB to 1 GiB
/// by factors of 4.
const BYTES_BUCKETS: [f64; 12] = [
    0.0,
    1024.0,
    4096.0,
    16384.0,
    65536.0,
    262144.0,
    1048576.0,
    4194304.0,
    16777216.0,
    67108864.0,
    268435456.0,
    1073741824.0,
];

/// The process-wide Prometheus recorder, installed on first use.
pub fn metrics_handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &SECONDS_BUCKETS)
                .expect("buckets are non-empty")
                .set_buckets_for_metric(Matcher::Suffix("_overshoot_bytes".into()), &BYTES_BUCKETS)
                .expect("buckets are non-empty")
                .install_recorder()
                .expect("no other metrics recorder is installed")
        })
        .clone()
}

/// Render the current metrics in Prometheus text format.
pub fn render_metrics() -> String {
    let handle = metrics_handle();
    handle.run_upkeep();
    handle.render()
}

/// Sum and count of histogram `name` over all its label sets, as this
/// process's recorder holds them (for benches and tests that run the proxy in
/// process).
pub fn histogram_totals(name: &str) -> (f64, f64) {
    let text = render_metrics();
    let total = |suffix: &str| -> f64 {
        let series = format!("{name}{suffix}");
        text.lines()
            .filter(|l| l.starts_with(&series))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    (total("_sum"), total("_count"))
}
