-- Egress policies: where each agent may go (SPEC §10).
--
-- A plan's policy is the default for its users' agents; an agent's own
-- policy, when set, replaces it. The built-in SSRF list and the proxy's
-- configured CIDR and port lists apply before any policy, which cannot open
-- what they refuse.
--
-- Evaluation of a destination (host as requested, each address it resolved to,
-- port) against one policy:
--   1. a matching `deny` rule refuses it (deny wins, whatever the order);
--   2. else a matching `allow` rule lets it through;
--   3. else the policy's `default_action` decides.
-- A rule matches when its host pattern matches the requested name (`host`,
-- exact, or `*.suffix` for any name below suffix, not suffix itself) or its
-- CIDR contains the address, and the port is in its `ports` (any port when
-- null). A rule with only `ports` matches every destination on those ports.
-- A name that resolves to several addresses passes only if every address does.
-- In `report` mode nothing is refused: would-be refusals are logged and counted.

CREATE TABLE egress_policies (
    id             BIGSERIAL PRIMARY KEY,
    name           TEXT NOT NULL UNIQUE,
    mode           TEXT NOT NULL DEFAULT 'enforce' CHECK (mode IN ('enforce', 'report')),
    default_action TEXT NOT NULL DEFAULT 'allow' CHECK (default_action IN ('allow', 'deny')),
    created_at     TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at     TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE TRIGGER egress_policies_set_updated_at BEFORE UPDATE ON egress_policies
    FOR EACH ROW EXECUTE FUNCTION set_updated_at();

CREATE TABLE egress_policy_rules (
    id         BIGSERIAL PRIMARY KEY,
    policy_id  BIGINT NOT NULL REFERENCES egress_policies (id) ON DELETE CASCADE,
    action     TEXT NOT NULL CHECK (action IN ('allow', 'deny')),
    -- Lowercase, no trailing dot: `api.example.com` or `*.example.com`.
    host       TEXT CHECK (host ~ '^(\*\.)?[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?(\.[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?)*$'
                           AND length(host) <= 255),
    cidr       CIDR,
    ports      INT[] CHECK (ports IS NULL OR (cardinality(ports) > 0
                            AND 1 <= ALL (ports) AND 65535 >= ALL (ports))),
    note       TEXT,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    CHECK (host IS NULL OR cidr IS NULL),
    CHECK (host IS NOT NULL OR cidr IS NOT NULL OR ports IS NOT NULL)
);

CREATE INDEX egress_policy_rules_policy_idx ON egress_policy_rules (policy_id);

ALTER TABLE plans ADD COLUMN egress_policy_id BIGINT
    REFERENCES egress_policies (id) ON DELETE SET NULL;
ALTER TABLE agents ADD COLUMN egress_policy_id BIGINT
    REFERENCES egress_policies (id) ON DELETE SET NULL;

-- Every change that can alter which rules apply to which agent: proxies
-- re-read the policies within a second of it.
CREATE FUNCTION tollgate_notify_egress_policy() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('tollgate_egress_policy', TG_TABLE_NAME);
    RETURN NULL;
END;
$$;

CREATE TRIGGER egress_policies_notify AFTER INSERT OR UPDATE OR DELETE ON egress_policies
    FOR EACH STATEMENT EXECUTE FUNCTION tollgate_notify_egress_policy();
CREATE TRIGGER egress_policy_rules_notify AFTER INSERT OR UPDATE OR DELETE ON egress_policy_rules
    FOR EACH STATEMENT EXECUTE FUNCTION tollgate_notify_egress_policy();
CREATE TRIGGER plans_notify_egress_policy AFTER UPDATE OF egress_policy_id ON plans
    FOR EACH STATEMENT EXECUTE FUNCTION tollgate_notify_egress_policy();
CREATE TRIGGER users_notify_egress_policy AFTER UPDATE OF plan_id ON users
    FOR EACH STATEMENT EXECUTE FUNCTION tollgate_notify_egress_policy();
CREATE TRIGGER agents_notify_egress_policy
    AFTER UPDATE OF egress_policy_id, user_id ON agents
    FOR EACH STATEMENT EXECUTE FUNCTION tollgate_notify_egress_policy();
