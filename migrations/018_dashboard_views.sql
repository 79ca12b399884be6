-- Read-only views for dashboards and operators. The billing rules live in Rust
-- (tollgate-core's billing module); tollgate_overage_cost_cents mirrors its cost
-- formula exactly (a test compares the two).

-- First day of the current UTC month, whatever the session time zone.
CREATE FUNCTION tollgate_current_period() RETURNS date
LANGUAGE sql STABLE AS $$
    SELECT (date_trunc('month', now() AT TIME ZONE 'UTC'))::date
$$;

-- ceil(bw_over*bw_rate/2^30 + cpu_over*cpu_rate/3600000 + mem_over*mem_rate/(1024*3600)),
-- over a common denominator 2^30 * 3^2 * 5^5 so the only rounding is the final ceiling.
CREATE FUNCTION tollgate_overage_cost_cents(
    bw_over BIGINT, bw_rate BIGINT,
    cpu_over BIGINT, cpu_rate BIGINT,
    mem_over BIGINT, mem_rate BIGINT) RETURNS BIGINT
LANGUAGE sql IMMUTABLE AS $$
    SELECT LEAST(
        div(GREATEST(bw_over, 0)::numeric * GREATEST(bw_rate, 0) * 28125
            + GREATEST(cpu_over, 0)::numeric * GREATEST(cpu_rate, 0) * 8388608
            + GREATEST(mem_over, 0)::numeric * GREATEST(mem_rate, 0) * 8192000
            + 30198988799999,
            30198988800000),
        9223372036854775807)::bigint
$$;

CREATE VIEW tollgate_vps_usage_current AS
SELECT v.id                                      AS vps_id,
       v.user_id,
       u.email,
       v.name                                    AS vps_name,
       v.provider,
       v.state,
       tollgate_current_period()                 AS period_start,
       COALESCE(p.bandwidth_bytes, 0)            AS bandwidth_bytes,
       COALESCE(p.bandwidth_rx_bytes, 0)         AS bandwidth_rx_bytes,
       COALESCE(p.bandwidth_tx_bytes, 0)         AS bandwidth_tx_bytes,
       COALESCE(p.cpu_used_ms, 0)                AS cpu_used_ms,
       COALESCE(p.memory_used_mb_seconds, 0)     AS memory_used_mb_seconds,
       v.storage_used_bytes,
       pl.max_storage_bytes,
       COALESCE(v.storage_used_bytes > pl.max_storage_bytes, false) AS storage_over_limit,
       p.updated_at                              AS usage_updated_at
FROM vpses v
JOIN users u ON u.id = v.user_id
LEFT JOIN plans pl ON pl.id = u.plan_id
LEFT JOIN vps_usage_periods p ON p.vps_id = v.id AND p.period_start = tollgate_current_period();

CREATE VIEW tollgate_user_usage_current AS
WITH period AS (
    SELECT tollgate_current_period() AS period_start
), usage AS (
    SELECT v.user_id,
           SUM(p.bandwidth_bytes)::bigint        AS bandwidth_bytes,
           SUM(p.bandwidth_rx_bytes)::bigint     AS bandwidth_rx_bytes,
           SUM(p.bandwidth_tx_bytes)::bigint     AS bandwidth_tx_bytes,
           SUM(p.cpu_used_ms)::bigint            AS cpu_used_ms,
           SUM(p.memory_used_mb_seconds)::bigint AS memory_used_mb_seconds
    FROM vps_usage_periods p
    JOIN vpses v ON v.id = p.vps_id
    WHERE p.period_start = (SELECT period_start FROM period)
    GROUP BY v.user_id
), storage AS (
    SELECT user_id, MAX(storage_used_bytes) AS max_vps_storage_bytes,
           COUNT(*) FILTER (WHERE state = 'running') AS running_vpses
    FROM vpses
    WHERE state <> 'destroyed'
    GROUP BY user_id
), figures AS (
    SELECT u.id AS user_id, u.email, pl.id AS plan_id, pl.name AS plan_name,
           (SELECT period_start FROM period) AS period_start,
           COALESCE(us.bandwidth_bytes, 0)        AS bandwidth_bytes,
           COALESCE(us.bandwidth_rx_bytes, 0)     AS bandwidth_rx_bytes,
           COALESCE(us.bandwidth_tx_bytes, 0)     AS bandwidth_tx_bytes,
           COALESCE(us.cpu_used_ms, 0)            AS cpu_used_ms,
           COALESCE(us.memory_used_mb_seconds, 0) AS memory_used_mb_seconds,
           COALESCE(st.max_vps_storage_bytes, 0)  AS max_vps_storage_bytes,
           COALESCE(st.running_vpses, 0)          AS running_vpses,
           pl.max_bandwidth_bytes, pl.max_cpu_ms, pl.max_memory_mb_seconds, pl.max_storage_bytes,
           pl.overage_bandwidth_cost_per_gb_cents,
           pl.overage_cpu_cost_per_hour_cents,
           pl.overage_memory_cost_per_gb_hour_cents,
           COALESCE(b.budget_cents, 0)            AS budget_cents
    FROM users u
    LEFT JOIN plans pl ON pl.id = u.plan_id
    LEFT JOIN usage us ON us.user_id = u.id
    LEFT JOIN storage st ON st.user_id = u.id
    LEFT JOIN overage_budgets b ON b.user_id = u.id AND b.period_start = (SELECT period_start FROM period)
)
SELECT f.*,
       GREATEST(f.bandwidth_bytes - f.max_bandwidth_bytes, 0)          AS bandwidth_over_bytes,
       GREATEST(f.cpu_used_ms - f.max_cpu_ms, 0)                       AS cpu_over_ms,
       GREATEST(f.memory_used_mb_seconds - f.max_memory_mb_seconds, 0) AS memory_over_mb_seconds,
       tollgate_overage_cost_cents(
           f.bandwidth_bytes - f.max_bandwidth_bytes, f.overage_bandwidth_cost_per_gb_cents,
           f.cpu_used_ms - f.max_cpu_ms, f.overage_cpu_cost_per_hour_cents,
           f.memory_used_mb_seconds - f.max_memory_mb_seconds, f.overage_memory_cost_per_gb_hour_cents
       )                                                                AS overage_cost_cents,
       d.blocked,
       d.reason                                                         AS block_reason,
       d.decided_at,
       d.changed_at                                                     AS decision_changed_at
FROM figures f
LEFT JOIN usage_decisions d ON d.user_id = f.user_id AND d.period_start = f.period_start;
