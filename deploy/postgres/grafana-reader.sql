-- Read-only role for Grafana's PostgreSQL datasource: it sees the dashboard
-- views and nothing else (no gateway tokens, no raw tables). The views run with
-- their owner's rights, so SELECT on them is all the role needs. Run after
-- `tollgate migrate` as the owner of the schema; running it again changes nothing.
-- Set the password separately: ALTER ROLE tollgate_grafana PASSWORD '...';
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'tollgate_grafana') THEN
        CREATE ROLE tollgate_grafana LOGIN;
    END IF;
END
$$;

GRANT USAGE ON SCHEMA public TO tollgate_grafana;
GRANT SELECT ON tollgate_user_usage_current, tollgate_vps_usage_current,
                tollgate_destination_usage TO tollgate_grafana;
-- Dashboards never need more than a few seconds.
ALTER ROLE tollgate_grafana SET statement_timeout = '10s';
