-- Messaging channel credentials per agent (one row per agent and channel kind).
CREATE TABLE agent_channels (
    id             UUID PRIMARY KEY DEFAULT gen_random_uuid(),
    agent_id       UUID NOT NULL REFERENCES agents (id) ON DELETE CASCADE,
    channel_kind   TEXT NOT NULL,
    credentials    JSONB NOT NULL DEFAULT '{}'::jsonb,
    enabled        BOOLEAN NOT NULL DEFAULT true,
    webhook_secret TEXT,
    created_at     TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at     TIMESTAMPTZ NOT NULL DEFAULT now(),
    UNIQUE (agent_id, channel_kind)
);

CREATE TRIGGER agent_channels_set_updated_at BEFORE UPDATE ON agent_channels
    FOR EACH ROW EXECUTE FUNCTION set_updated_at();
