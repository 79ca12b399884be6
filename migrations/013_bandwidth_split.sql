-- Bandwidth split by direction, as seen from the VPS: rx = bytes the VPS received,
-- tx = bytes the VPS sent. bandwidth_bytes stays the plan-limited total (rx + tx)
-- for every byte Tollgate records.
ALTER TABLE vps_usage_periods
    ADD COLUMN bandwidth_rx_bytes BIGINT NOT NULL DEFAULT 0 CHECK (bandwidth_rx_bytes >= 0),
    ADD COLUMN bandwidth_tx_bytes BIGINT NOT NULL DEFAULT 0 CHECK (bandwidth_tx_bytes >= 0);
