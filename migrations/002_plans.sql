-- Plans: the resource limits of a user tier. Limits are per calendar month (UTC),
-- except max_storage_bytes, which is a per-VPS gauge limit.
CREATE TABLE plans (
    id                    UUID PRIMARY KEY DEFAULT gen_random_uuid(),
    name                  TEXT NOT NULL UNIQUE,
    max_agents            INT NOT NULL,
    max_vpses             INT NOT NULL,
    max_bandwidth_bytes   BIGINT NOT NULL DEFAULT 107374182400,  -- 100 GiB per month
    max_storage_bytes     BIGINT NOT NULL DEFAULT 53687091200,   -- 50 GiB per VPS
    max_cpu_ms            BIGINT NOT NULL DEFAULT 360000000,     -- 100 CPU-hours per month
    max_memory_mb_seconds BIGINT NOT NULL DEFAULT 1843200000,    -- 500 GiB-hours per month
    created_at            TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at            TIMESTAMPTZ NOT NULL DEFAULT now(),
    CHECK (max_agents >= 0 AND max_vpses >= 0),
    CHECK (max_bandwidth_bytes >= 0 AND max_storage_bytes >= 0
           AND max_cpu_ms >= 0 AND max_memory_mb_seconds >= 0)
);

CREATE TRIGGER plans_set_updated_at BEFORE UPDATE ON plans
    FOR EACH ROW EXECUTE FUNCTION set_updated_at();
