-- Agents: one AI agent, optionally attached to one VPS. `gateway_token` authenticates
-- the agent at the proxy (egress) and users at its gateway (ingress). It is never empty:
-- 64 lowercase hex characters, generated here when the caller does not supply one.
CREATE TABLE agents (
    id            UUID PRIMARY KEY DEFAULT gen_random_uuid(),
    user_id       UUID NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    vps_id        UUID UNIQUE REFERENCES vpses (id) ON DELETE SET NULL,
    name          TEXT NOT NULL,
    gateway_token TEXT NOT NULL
        DEFAULT replace(gen_random_uuid()::text, '-', '') || replace(gen_random_uuid()::text, '-', '')
        CONSTRAINT agents_gateway_token_format CHECK (gateway_token ~ '^[0-9a-f]{64}$'),
    created_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at    TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE INDEX agents_user_id_idx ON agents (user_id);

CREATE TRIGGER agents_set_updated_at BEFORE UPDATE ON agents
    FOR EACH ROW EXECUTE FUNCTION set_updated_at();
