-- The monitor's last sample per VPS, updated in the same transaction as the usage
-- increment it produced, so a restarted monitor neither loses nor repeats usage.
CREATE TABLE vps_sample_state (
    vps_id         UUID PRIMARY KEY REFERENCES vpses (id) ON DELETE CASCADE,
    source         TEXT NOT NULL,
    sampled_at     TIMESTAMPTZ NOT NULL,
    cpu_total_us   BIGINT CHECK (cpu_total_us >= 0),      -- last cumulative CPU counter, microseconds
    cpu_residue_us BIGINT NOT NULL DEFAULT 0,             -- CPU time below 1 ms not yet credited
    memory_bytes   BIGINT CHECK (memory_bytes >= 0),      -- last memory reading
    memory_residue BIGINT NOT NULL DEFAULT 0,             -- byte-milliseconds below 1 MB-second not yet credited
    created_at     TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at     TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE TRIGGER vps_sample_state_set_updated_at BEFORE UPDATE ON vps_sample_state
    FOR EACH ROW EXECUTE FUNCTION set_updated_at();
