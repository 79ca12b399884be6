-- What happens when a user's plan limits and overage budget are exhausted, and
-- the bandwidth limits that apply at all times.
--
-- `plans.on_exhausted`: `block` (the default: 403, streams cut) or `throttle`
-- (traffic goes on at `throttle_bytes_per_second`, the user's connections on
-- all proxies together, both ways together).
ALTER TABLE plans
    ADD COLUMN on_exhausted TEXT NOT NULL DEFAULT 'block'
        CHECK (on_exhausted IN ('block', 'throttle')),
    ADD COLUMN throttle_bytes_per_second BIGINT
        CHECK (throttle_bytes_per_second > 0),
    ADD CONSTRAINT plans_throttle_has_a_rate
        CHECK (on_exhausted = 'block' OR throttle_bytes_per_second IS NOT NULL);

-- An agent's own bandwidth limit, in bytes per second each way (to the agent,
-- from the agent), at all times, on each proxy. NULL: none.
ALTER TABLE agents ADD COLUMN bandwidth_bytes_per_second BIGINT
    CHECK (bandwidth_bytes_per_second > 0);

-- Proxies read it with the agent: a change refreshes their directories.
CREATE FUNCTION tollgate_notify_agent_bandwidth() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.bandwidth_bytes_per_second IS DISTINCT FROM OLD.bandwidth_bytes_per_second THEN
        PERFORM pg_notify('tollgate_agent', NEW.id::text);
    END IF;
    RETURN NULL;
END;
$$;

CREATE TRIGGER agents_notify_bandwidth AFTER UPDATE OF bandwidth_bytes_per_second ON agents
    FOR EACH ROW EXECUTE FUNCTION tollgate_notify_agent_bandwidth();

-- A decision says what its block means: `action` is `block` or `throttle` for a
-- blocked user (NULL reads as `block`: rows written before this column), NULL
-- for an allowed one; `throttle_bytes_per_second` is the plan's rate when the
-- plan throttles, whether or not the user is exhausted yet.
ALTER TABLE usage_decisions
    ADD COLUMN action TEXT CHECK (action IN ('block', 'throttle')),
    ADD COLUMN throttle_bytes_per_second BIGINT CHECK (throttle_bytes_per_second > 0),
    ADD CONSTRAINT usage_decisions_action_only_when_blocked CHECK (action IS NULL OR blocked);

-- Destinations a plan's agents reach through the egress proxy even while their
-- user is blocked or throttled (the platform's own API, a top-up page). Their
-- bytes are counted as any others; the SSRF lists and the agent's egress policy
-- still apply. `host` is an exact name or `*.suffix`, as in egress policy rules.
CREATE TABLE plan_open_destinations (
    id         BIGSERIAL PRIMARY KEY,
    plan_id    UUID NOT NULL REFERENCES plans (id) ON DELETE CASCADE,
    host       TEXT NOT NULL
               CHECK (host ~ '^(\*\.)?[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?(\.[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?)*$'
                      AND length(host) <= 255),
    ports      INT[] CHECK (ports IS NULL OR (cardinality(ports) > 0
                            AND 1 <= ALL (ports) AND 65535 >= ALL (ports))),
    note       TEXT,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE INDEX plan_open_destinations_plan_idx ON plan_open_destinations (plan_id);

-- Proxies read the lists with the egress policies, on the same channel.
CREATE TRIGGER plan_open_destinations_notify AFTER INSERT OR UPDATE OR DELETE ON plan_open_destinations
    FOR EACH STATEMENT EXECUTE FUNCTION tollgate_notify_egress_policy();

-- A user's agents carry their plan in the proxies' directories: a plan change
-- refreshes them.
CREATE FUNCTION tollgate_notify_user_agents() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.plan_id IS DISTINCT FROM OLD.plan_id THEN
        PERFORM pg_notify('tollgate_agent', a.id::text) FROM agents a WHERE a.user_id = NEW.id;
    END IF;
    RETURN NULL;
END;
$$;

CREATE TRIGGER users_notify_agents AFTER UPDATE OF plan_id ON users
    FOR EACH ROW EXECUTE FUNCTION tollgate_notify_user_agents();

-- Notifications say what a block means: `action` in the payload of `blocked`
-- events, and a change between block and throttle is an event of its own kind
-- `blocked` (with `previous_action`).
CREATE OR REPLACE FUNCTION tollgate_quota_events() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    old_figures jsonb := CASE WHEN TG_OP = 'UPDATE' THEN OLD.figures END;
    new_action text := CASE WHEN NEW.blocked THEN COALESCE(NEW.action, 'block') END;
    old_action text := CASE WHEN TG_OP = 'UPDATE' AND OLD.blocked THEN COALESCE(OLD.action, 'block') END;
    a record;
    t int;
    event uuid;
    key uuid;
    kind text;
BEGIN
    -- Threshold crossings. An axis without a limit (no plan, or a limit or
    -- budget of 0) has no percentage and never crosses. Only thresholds the
    -- previous figures had not reached are tried (a cheap filter); the unique
    -- crossing key is what guarantees once per crossing.
    FOR a IN
        SELECT x.axis, x.used, x.lim, x.old_used, x.old_lim
        FROM (VALUES
            ('bandwidth', NEW.figures #>> '{usage,bandwidth_bytes}', NEW.figures #>> '{limits,max_bandwidth_bytes}',
                          old_figures #>> '{usage,bandwidth_bytes}', old_figures #>> '{limits,max_bandwidth_bytes}'),
            ('storage',   NEW.figures #>> '{usage,max_vps_storage_bytes}', NEW.figures #>> '{limits,max_storage_bytes}',
                          old_figures #>> '{usage,max_vps_storage_bytes}', old_figures #>> '{limits,max_storage_bytes}'),
            ('cpu',       NEW.figures #>> '{usage,cpu_ms}', NEW.figures #>> '{limits,max_cpu_ms}',
                          old_figures #>> '{usage,cpu_ms}', old_figures #>> '{limits,max_cpu_ms}'),
            ('memory',    NEW.figures #>> '{usage,memory_mb_seconds}', NEW.figures #>> '{limits,max_memory_mb_seconds}',
                          old_figures #>> '{usage,memory_mb_seconds}', old_figures #>> '{limits,max_memory_mb_seconds}'),
            ('budget',    NEW.figures #>> '{overage_cost_cents}', NEW.figures #>> '{budget_cents}',
                          old_figures #>> '{overage_cost_cents}', old_figures #>> '{budget_cents}')
        ) AS v(axis, used_t, lim_t, old_used_t, old_lim_t)
        CROSS JOIN LATERAL (SELECT v.axis, v.used_t::numeric AS used, v.lim_t::numeric AS lim,
                                   v.old_used_t::numeric AS old_used, v.old_lim_t::numeric AS old_lim) x
        WHERE x.lim > 0 AND x.used > 0
    LOOP
        FOR t IN
            SELECT q.percent FROM quota_thresholds q
            WHERE a.used * 100 >= q.percent * a.lim
              AND NOT COALESCE(a.old_lim > 0 AND a.old_used * 100 >= q.percent * a.old_lim, false)
            ORDER BY q.percent
        LOOP
            event := gen_random_uuid();
            INSERT INTO quota_crossings (user_id, period_start, axis, threshold, event_id)
            VALUES (NEW.user_id, NEW.period_start, a.axis, t, event)
            ON CONFLICT DO NOTHING;
            IF FOUND THEN
                key := md5('threshold:' || NEW.user_id || ':' || NEW.period_start || ':' || a.axis || ':' || t)::uuid;
                INSERT INTO quota_events (id, idempotency_key, kind, user_id, period_start, payload)
                VALUES (event, key, 'threshold', NEW.user_id, NEW.period_start, jsonb_build_object(
                    'id', event,
                    'idempotency_key', key,
                    'kind', 'threshold',
                    'occurred_at', now(),
                    'user_id', NEW.user_id,
                    'period_start', NEW.period_start,
                    'axis', a.axis,
                    'threshold_percent', t,
                    'used', a.used,
                    'limit', a.lim,
                    'percent', floor(a.used * 100 / a.lim),
                    'blocked', NEW.blocked,
                    'reason', NEW.reason,
                    'action', new_action,
                    'figures', NEW.figures));
                PERFORM pg_notify('tollgate_quota_event', event::text);
            END IF;
        END LOOP;
    END LOOP;

    -- Block and unblock: the outcome flipped, or what the block means did.
    IF NEW.blocked AND (TG_OP = 'INSERT' OR NEW.reason IS DISTINCT FROM OLD.reason
                        OR new_action IS DISTINCT FROM old_action) THEN
        kind := 'blocked';
    ELSIF TG_OP = 'UPDATE' AND OLD.blocked AND NOT NEW.blocked THEN
        kind := 'unblocked';
    END IF;
    IF kind IS NOT NULL THEN
        event := gen_random_uuid();
        key := md5(kind || ':' || NEW.user_id || ':' || NEW.period_start || ':'
                   || COALESCE(NEW.reason, '') || ':' || COALESCE(new_action, '') || ':'
                   || NEW.changed_at)::uuid;
        INSERT INTO quota_events (id, idempotency_key, kind, user_id, period_start, payload)
        VALUES (event, key, kind, NEW.user_id, NEW.period_start, jsonb_build_object(
            'id', event,
            'idempotency_key', key,
            'kind', kind,
            'occurred_at', now(),
            'user_id', NEW.user_id,
            'period_start', NEW.period_start,
            'blocked', NEW.blocked,
            'reason', NEW.reason,
            'action', new_action,
            'throttle_bytes_per_second', CASE WHEN new_action = 'throttle' THEN NEW.throttle_bytes_per_second END,
            'previous_reason', CASE WHEN TG_OP = 'UPDATE' THEN OLD.reason END,
            'previous_action', old_action,
            'figures', NEW.figures))
        ON CONFLICT (idempotency_key) DO NOTHING;
        IF FOUND THEN
            PERFORM pg_notify('tollgate_quota_event', event::text);
        END IF;
    END IF;
    RETURN NULL;
END;
$$;
