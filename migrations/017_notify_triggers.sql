-- Change notifications for proxies and the monitor.
--   tollgate_agent    payload: agent id           (token rotated, VPS re-assigned, agent gone,
--                                                  or its VPS's address/state/provider changed)
--   tollgate_billing  payload: 'user:<id>' or 'plan:<id>'  (plan, plan limits or budget changed)
--   tollgate_decision payload: '<user id>:<period_start>'  (a decision flipped)

CREATE FUNCTION tollgate_notify_agent() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        PERFORM pg_notify('tollgate_agent', OLD.id::text);
    ELSIF TG_OP = 'INSERT'
        OR NEW.gateway_token IS DISTINCT FROM OLD.gateway_token
        OR NEW.vps_id IS DISTINCT FROM OLD.vps_id
        OR NEW.user_id IS DISTINCT FROM OLD.user_id THEN
        PERFORM pg_notify('tollgate_agent', NEW.id::text);
    END IF;
    RETURN NULL;
END;
$$;

CREATE TRIGGER agents_notify AFTER INSERT OR UPDATE OR DELETE ON agents
    FOR EACH ROW EXECUTE FUNCTION tollgate_notify_agent();

CREATE FUNCTION tollgate_notify_vps() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.address IS DISTINCT FROM OLD.address
        OR NEW.state IS DISTINCT FROM OLD.state
        OR NEW.provider IS DISTINCT FROM OLD.provider
        OR NEW.user_id IS DISTINCT FROM OLD.user_id THEN
        PERFORM pg_notify('tollgate_agent', a.id::text) FROM agents a WHERE a.vps_id = NEW.id;
    END IF;
    RETURN NULL;
END;
$$;

CREATE TRIGGER vpses_notify AFTER UPDATE ON vpses
    FOR EACH ROW EXECUTE FUNCTION tollgate_notify_vps();

CREATE FUNCTION tollgate_notify_billing() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_TABLE_NAME = 'plans' THEN
        PERFORM pg_notify('tollgate_billing', 'plan:' || NEW.id::text);
    ELSIF TG_TABLE_NAME = 'users' THEN
        IF NEW.plan_id IS DISTINCT FROM OLD.plan_id THEN
            PERFORM pg_notify('tollgate_billing', 'user:' || NEW.id::text);
        END IF;
    ELSIF TG_OP = 'DELETE' THEN
        PERFORM pg_notify('tollgate_billing', 'user:' || OLD.user_id::text);
    ELSE
        PERFORM pg_notify('tollgate_billing', 'user:' || NEW.user_id::text);
    END IF;
    RETURN NULL;
END;
$$;

CREATE TRIGGER plans_notify_billing AFTER UPDATE ON plans
    FOR EACH ROW EXECUTE FUNCTION tollgate_notify_billing();
CREATE TRIGGER users_notify_billing AFTER UPDATE OF plan_id ON users
    FOR EACH ROW EXECUTE FUNCTION tollgate_notify_billing();
CREATE TRIGGER overage_budgets_notify_billing AFTER INSERT OR UPDATE OR DELETE ON overage_budgets
    FOR EACH ROW EXECUTE FUNCTION tollgate_notify_billing();

CREATE FUNCTION tollgate_notify_decision() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT'
        OR NEW.blocked IS DISTINCT FROM OLD.blocked
        OR NEW.reason IS DISTINCT FROM OLD.reason THEN
        PERFORM pg_notify('tollgate_decision', NEW.user_id::text || ':' || NEW.period_start::text);
    END IF;
    RETURN NULL;
END;
$$;

CREATE TRIGGER usage_decisions_notify AFTER INSERT OR UPDATE ON usage_decisions
    FOR EACH ROW EXECUTE FUNCTION tollgate_notify_decision();
