-- Per-user monthly overage spending cap in cents. A missing row is a budget of 0.
CREATE TABLE overage_budgets (
    user_id      UUID NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    period_start DATE NOT NULL CHECK (extract(day FROM period_start) = 1),
    budget_cents BIGINT NOT NULL DEFAULT 0 CHECK (budget_cents >= 0),
    created_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, period_start)
);

CREATE TRIGGER overage_budgets_set_updated_at BEFORE UPDATE ON overage_budgets
    FOR EACH ROW EXECUTE FUNCTION set_updated_at();
