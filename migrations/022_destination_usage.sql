-- Egress bytes per VPS per destination host per month, as seen from the VPS
-- (rx = received from the host, tx = sent to it). Written by the proxy's flush in
-- the same transaction as vps_usage_periods, under the same flush_ledger row, so
-- a batch retried or replayed is counted once. `host` is the host as the requests
-- named it (names lowercase, IP literals canonical, IPv6 in brackets), or `other`:
-- the bytes of hosts beyond the proxy's destination_top_n for that VPS and month,
-- and of requests that named no host. Once a VPS's connections have ended and
-- been flushed, its rows sum to its egress bytes.
CREATE TABLE vps_destination_usage (
    vps_id       UUID NOT NULL REFERENCES vpses (id) ON DELETE CASCADE,
    period_start DATE NOT NULL CHECK (extract(day FROM period_start) = 1),
    host         TEXT NOT NULL CHECK (host <> ''),
    rx_bytes     BIGINT NOT NULL DEFAULT 0 CHECK (rx_bytes >= 0),
    tx_bytes     BIGINT NOT NULL DEFAULT 0 CHECK (tx_bytes >= 0),
    created_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (vps_id, period_start, host)
) WITH (fillfactor = 50); -- rows are added to about once a second: room for HOT updates

-- Reports and dashboards read one month across the fleet.
CREATE INDEX vps_destination_usage_period_start_idx ON vps_destination_usage (period_start);

CREATE TRIGGER vps_destination_usage_set_updated_at BEFORE UPDATE ON vps_destination_usage
    FOR EACH ROW EXECUTE FUNCTION set_updated_at();

-- Bytes per destination for dashboards and `tollgate destinations`: every month,
-- with the VPS, the agent on it now, and its user.
CREATE VIEW tollgate_destination_usage AS
SELECT d.vps_id,
       v.name                     AS vps_name,
       a.id                       AS agent_id,
       a.name                     AS agent_name,
       v.user_id,
       u.email,
       d.period_start,
       d.host,
       d.rx_bytes,
       d.tx_bytes,
       d.rx_bytes + d.tx_bytes    AS total_bytes,
       d.updated_at
FROM vps_destination_usage d
JOIN vpses v ON v.id = d.vps_id
JOIN users u ON u.id = v.user_id
LEFT JOIN agents a ON a.vps_id = d.vps_id;
