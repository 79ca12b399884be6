-- The published enforcement decision per user and period, with the figures behind it.
-- Written by the monitor after each cycle and by proxies after each flush.
CREATE TABLE usage_decisions (
    user_id      UUID NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    period_start DATE NOT NULL CHECK (extract(day FROM period_start) = 1),
    blocked      BOOLEAN NOT NULL,
    reason       TEXT CHECK (reason IN ('no_plan', 'bandwidth', 'cpu', 'memory', 'storage', 'budget_exhausted')),
    figures      JSONB NOT NULL,
    decided_by   TEXT NOT NULL,
    decided_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    changed_at   TIMESTAMPTZ NOT NULL DEFAULT now(),  -- when blocked/reason last changed
    PRIMARY KEY (user_id, period_start),
    CONSTRAINT usage_decisions_reason_iff_blocked CHECK (blocked = (reason IS NOT NULL))
);

CREATE INDEX usage_decisions_blocked_idx ON usage_decisions (period_start) WHERE blocked;
