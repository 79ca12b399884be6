//! The monitor's Prometheus metrics (SPEC §6). Bounded labels only.

use std::sync::Once;

use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};

pub const LEADER: &str = "tollgate_monitor_leader";
pub const CYCLES: &str = "tollgate_monitor_cycles_total";
pub const CYCLE_DURATION: &str = "tollgate_monitor_cycle_duration_seconds";
pub const CYCLE_OVERRUNS: &str = "tollgate_monitor_cycle_overruns_total";
pub const LAST_CYCLE: &str = "tollgate_monitor_last_cycle_timestamp_seconds";
pub const SAMPLES: &str = "tollgate_monitor_samples_total";
pub const SAMPLE_FAILURES: &str = "tollgate_monitor_sample_failures_total";
pub const DECISIONS: &str = "tollgate_monitor_decisions_total";
pub const USERS_BLOCKED: &str = "tollgate_monitor_users_blocked";
pub const HELD: &str = "tollgate_monitor_held_vpses";
pub const DATABASE_UP: &str = "tollgate_database_up";
pub const WEBHOOKS: &str = "tollgate_monitor_quota_webhooks_total";
pub const WEBHOOK_LAG: &str = "tollgate_monitor_quota_webhook_lag_seconds";

pub fn describe() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        describe_gauge!(
            LEADER,
            "1 while this monitor holds the leader lock and samples, else 0."
        );
        describe_counter!(CYCLES, "Sampling cycles completed.");
        describe_histogram!(
            CYCLE_DURATION,
            Unit::Seconds,
            "Time one sampling and decision cycle took."
        );
        describe_counter!(
            CYCLE_OVERRUNS,
            "Cycles that took longer than monitor.interval."
        );
        describe_gauge!(
            LAST_CYCLE,
            Unit::Seconds,
            "Unix time the last cycle completed."
        );
        describe_counter!(
            SAMPLES,
            "VPS samples, by source and outcome (ok, retryable_error, permanent_error, timeout)."
        );
        describe_counter!(
            SAMPLE_FAILURES,
            "Failed VPS samples, by provider (fly, hetzner, sprites, k8s, or other for any \
             other name), source (cgroup, prometheus, agent, none) and reason (no_source, \
             timeout, unavailable, not_found, http_error, bad_response, bad_config)."
        );
        describe_counter!(
            DECISIONS,
            "Decisions computed, by outcome (allowed, blocked)."
        );
        describe_gauge!(USERS_BLOCKED, "Users blocked in the current period's decisions.");
        describe_gauge!(
            HELD,
            "Running VPSes whose sampled usage the monitor holds between writes (monitor.write_interval)."
        );
        describe_gauge!(DATABASE_UP, "1 if the last database operation succeeded.");
        describe_counter!(
            WEBHOOKS,
            "Quota notification delivery attempts, by outcome (delivered, failed)."
        );
        describe_histogram!(
            WEBHOOK_LAG,
            Unit::Seconds,
            "Time from a quota event's creation (its decision's commit) to its delivery."
        );
    });
}

/// A provider name as a metric label: provider names are free text in the
/// database, so only the providers the metering policy knows
/// (`billing::metered_resources_for`) get their own label; any other is `other`.
pub fn provider_label(provider: &str) -> &'static str {
    match provider.trim().to_ascii_lowercase().as_str() {
        "fly" => "fly",
        "hetzner" => "hetzner",
        "sprites" => "sprites",
        "k8s" => "k8s",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn provider_labels_are_bounded() {
        assert_eq!(provider_label(" K8s "), "k8s");
        assert_eq!(provider_label("sprites"), "sprites");
        assert_eq!(provider_label("my-new-cloud-42"), "other");
        assert_eq!(provider_label(""), "other");
    }
}
