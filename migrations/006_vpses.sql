-- Provisioned VPS instances and their usage gauges.
CREATE TYPE vps_state AS ENUM ('provisioning', 'running', 'stopped', 'destroyed');

CREATE TABLE vpses (
    id                     UUID PRIMARY KEY DEFAULT gen_random_uuid(),
    user_id                UUID NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    vps_config_id          UUID NOT NULL REFERENCES vps_configs (id),
    name                   TEXT NOT NULL,
    provider               TEXT NOT NULL,
    provider_vm_id         TEXT,
    address                TEXT,
    state                  vps_state NOT NULL DEFAULT 'provisioning',
    storage_used_bytes     BIGINT NOT NULL DEFAULT 0 CHECK (storage_used_bytes >= 0),
    cpu_used_ms            BIGINT CHECK (cpu_used_ms >= 0),             -- NULL: provider does not meter CPU
    memory_used_mb_seconds BIGINT CHECK (memory_used_mb_seconds >= 0),  -- NULL: provider does not meter memory
    created_at             TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at             TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE INDEX vpses_user_id_idx ON vpses (user_id);
CREATE INDEX vpses_vps_config_id_idx ON vpses (vps_config_id);
CREATE INDEX vpses_running_idx ON vpses (provider) WHERE state = 'running';

CREATE TRIGGER vpses_set_updated_at BEFORE UPDATE ON vpses
    FOR EACH ROW EXECUTE FUNCTION set_updated_at();
