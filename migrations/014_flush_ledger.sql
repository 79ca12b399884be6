-- One row per applied counter flush, written in the same transaction as the usage
-- upsert. A batch whose (instance_id, seq) is already here was applied before and is
-- skipped, so a retried or replayed batch is never counted twice.
CREATE TABLE flush_ledger (
    instance_id       UUID NOT NULL,
    seq               BIGINT NOT NULL CHECK (seq >= 0),
    applied_at        TIMESTAMPTZ NOT NULL DEFAULT now(),
    vps_count         INT NOT NULL,
    dropped_vps_count INT NOT NULL DEFAULT 0,
    rx_bytes          BIGINT NOT NULL,
    tx_bytes          BIGINT NOT NULL,
    PRIMARY KEY (instance_id, seq)
);

CREATE INDEX flush_ledger_applied_at_idx ON flush_ledger (applied_at);
