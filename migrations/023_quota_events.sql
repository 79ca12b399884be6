-- Quota notifications (SPEC §11): threshold crossings, blocks and unblocks are
-- written to a transactional outbox by a trigger on usage_decisions, in the same
-- transaction as the decision that caused them, and delivered as signed
-- webhooks by the monitor (docs/operations.md, "Quota notifications").
--
--   tollgate_quota_event  payload: '<quota_events.id>'  (an event was queued)

-- Percentages of each limit (and of the budget) that notify when reached.
-- Edit the rows to change them; a change applies to decisions published after it.
CREATE TABLE quota_thresholds (
    percent INT PRIMARY KEY CHECK (percent BETWEEN 1 AND 1000)
);
INSERT INTO quota_thresholds (percent) VALUES (50), (80), (100);

-- The outbox. Rows are never deleted by Tollgate; delivered ones may be pruned
-- by the operator (the crossings below keep each crossing from firing again).
-- No foreign key to users: an event outlives its user until it is delivered.
CREATE TABLE quota_events (
    id              UUID PRIMARY KEY DEFAULT gen_random_uuid(),
    -- Stable per crossing or per block/unblock transition: receivers dedupe on it.
    idempotency_key UUID NOT NULL UNIQUE,
    kind            TEXT NOT NULL CHECK (kind IN ('threshold', 'blocked', 'unblocked')),
    user_id         UUID NOT NULL,
    period_start    DATE NOT NULL,
    payload         JSONB NOT NULL,
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    attempts        INT NOT NULL DEFAULT 0,
    next_attempt_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    delivered_at    TIMESTAMPTZ,
    last_error      TEXT
);

-- What the delivery worker claims: due, undelivered events.
CREATE INDEX quota_events_due_idx ON quota_events (next_attempt_at) WHERE delivered_at IS NULL;

-- One row per threshold a user reached on an axis in a period: the unique key
-- that makes every crossing notify exactly once, whoever published the decision.
CREATE TABLE quota_crossings (
    user_id      UUID NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    period_start DATE NOT NULL,
    axis         TEXT NOT NULL CHECK (axis IN ('bandwidth', 'storage', 'cpu', 'memory', 'budget')),
    threshold    INT NOT NULL,
    event_id     UUID NOT NULL,
    crossed_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, period_start, axis, threshold)
);

CREATE FUNCTION tollgate_quota_events() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    old_figures jsonb := CASE WHEN TG_OP = 'UPDATE' THEN OLD.figures END;
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
                    'figures', NEW.figures));
                PERFORM pg_notify('tollgate_quota_event', event::text);
            END IF;
        END LOOP;
    END LOOP;

    -- Block and unblock: the outcome flipped (the same condition that moves changed_at).
    IF NEW.blocked AND (TG_OP = 'INSERT' OR NEW.reason IS DISTINCT FROM OLD.reason) THEN
        kind := 'blocked';
    ELSIF TG_OP = 'UPDATE' AND OLD.blocked AND NOT NEW.blocked THEN
        kind := 'unblocked';
    END IF;
    IF kind IS NOT NULL THEN
        event := gen_random_uuid();
        key := md5(kind || ':' || NEW.user_id || ':' || NEW.period_start || ':'
                   || COALESCE(NEW.reason, '') || ':' || NEW.changed_at)::uuid;
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
            'previous_reason', CASE WHEN TG_OP = 'UPDATE' THEN OLD.reason END,
            'figures', NEW.figures))
        ON CONFLICT (idempotency_key) DO NOTHING;
        IF FOUND THEN
            PERFORM pg_notify('tollgate_quota_event', event::text);
        END IF;
    END IF;
    RETURN NULL;
END;
$$;

CREATE TRIGGER usage_decisions_quota_events AFTER INSERT OR UPDATE ON usage_decisions
    FOR EACH ROW EXECUTE FUNCTION tollgate_quota_events();
