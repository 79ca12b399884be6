-- Monthly usage counters per VPS. period_start is the first day of a UTC calendar month.
CREATE TABLE vps_usage_periods (
    vps_id                 UUID NOT NULL REFERENCES vpses (id) ON DELETE CASCADE,
    period_start           DATE NOT NULL CHECK (extract(day FROM period_start) = 1),
    bandwidth_bytes        BIGINT NOT NULL DEFAULT 0 CHECK (bandwidth_bytes >= 0),
    cpu_used_ms            BIGINT NOT NULL DEFAULT 0 CHECK (cpu_used_ms >= 0),
    memory_used_mb_seconds BIGINT NOT NULL DEFAULT 0 CHECK (memory_used_mb_seconds >= 0),
    created_at             TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at             TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (vps_id, period_start)
);

CREATE INDEX vps_usage_periods_period_start_idx ON vps_usage_periods (period_start);

CREATE TRIGGER vps_usage_periods_set_updated_at BEFORE UPDATE ON vps_usage_periods
    FOR EACH ROW EXECUTE FUNCTION set_updated_at();
