-- Headroom leases: the slice of a user's bandwidth headroom each proxy instance
-- may let through before its bytes are written. A proxy grants itself a slice
-- under a per-user advisory lock, only out of what the user's usage and the
-- other instances' live leases leave; its flushes move bytes from its lease to
-- vps_usage_periods in the same transaction, so usage plus live leases never
-- exceeds the headroom, whatever the number of proxies.
--
-- A lease is live while its holder is: `lease_holders` has one row per proxy
-- instance, renewed in one statement however many leases it holds. `epoch` names
-- one run of an instance's leases: when a proxy stops trusting its leases (it
-- could not renew them in time, or a month began) it starts a new epoch, and its
-- leases of an older one are dead at once.
CREATE TABLE lease_holders (
    instance_id UUID PRIMARY KEY,
    epoch       BIGINT NOT NULL,
    expires_at  TIMESTAMPTZ NOT NULL
);

CREATE INDEX lease_holders_expires_at_idx ON lease_holders (expires_at);

-- Keyed by user first, so the table distributes by user_id with the rest of a
-- user's rows (docs/operations.md, "When one PostgreSQL is not enough").
CREATE TABLE bandwidth_leases (
    user_id      UUID NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    period_start DATE NOT NULL CHECK (extract(day FROM period_start) = 1),
    instance_id  UUID NOT NULL REFERENCES lease_holders (instance_id) ON DELETE CASCADE,
    epoch        BIGINT NOT NULL,
    bytes        BIGINT NOT NULL CHECK (bytes >= 0),
    granted_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, period_start, instance_id)
);

-- Clean-up goes by instance.
CREATE INDEX bandwidth_leases_instance_idx ON bandwidth_leases (instance_id);
