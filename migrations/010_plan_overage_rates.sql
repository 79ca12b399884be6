-- Overage rates. 0 means overage is NOT on sale for that axis (not "free").
ALTER TABLE plans
    ADD COLUMN overage_bandwidth_cost_per_gb_cents     BIGINT NOT NULL DEFAULT 0,  -- cents per GiB
    ADD COLUMN overage_cpu_cost_per_hour_cents         BIGINT NOT NULL DEFAULT 0,  -- cents per CPU-hour
    ADD COLUMN overage_memory_cost_per_gb_hour_cents   BIGINT NOT NULL DEFAULT 0,  -- cents per GiB-hour
    ADD CONSTRAINT plans_overage_rates_nonnegative CHECK (
        overage_bandwidth_cost_per_gb_cents >= 0
        AND overage_cpu_cost_per_hour_cents >= 0
        AND overage_memory_cost_per_gb_hour_cents >= 0);
