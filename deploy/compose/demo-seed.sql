-- Demo rows for the compose stack: one plan with overage on sale, one user with a
-- budget for the current month, one running VPS (the demo gateway container) and
-- its agent with a fixed, public token. Idempotent: fixed ids, existing rows kept.
-- Never load this into a production database.
BEGIN;

INSERT INTO plans (id, name, max_agents, max_vpses, max_bandwidth_bytes,
                   overage_bandwidth_cost_per_gb_cents, overage_cpu_cost_per_hour_cents,
                   overage_memory_cost_per_gb_hour_cents)
VALUES ('7011a7e0-0000-4000-8000-000000000001', 'demo', 3, 3, 1073741824, 10, 5, 1)
ON CONFLICT DO NOTHING;

INSERT INTO vps_configs (id, name, provider, image, cpu_millicores, memory_mb, disk_gb)
VALUES ('7011a7e0-0000-4000-8000-000000000002', 'demo-small', 'fly', 'traefik/whoami', 1000, 1024, 10)
ON CONFLICT DO NOTHING;

INSERT INTO plan_vps_configs (plan_id, vps_config_id)
VALUES ('7011a7e0-0000-4000-8000-000000000001', '7011a7e0-0000-4000-8000-000000000002')
ON CONFLICT DO NOTHING;

INSERT INTO users (id, email, name, plan_id)
VALUES ('7011a7e0-0000-4000-8000-000000000003', 'demo@tollgate.local', 'Demo User',
        '7011a7e0-0000-4000-8000-000000000001')
ON CONFLICT DO NOTHING;

-- `fly` meters bandwidth only, so the demo needs no CPU/memory source.
INSERT INTO vpses (id, user_id, vps_config_id, name, provider, provider_vm_id, address, state)
VALUES ('7011a7e0-0000-4000-8000-000000000004', '7011a7e0-0000-4000-8000-000000000003',
        '7011a7e0-0000-4000-8000-000000000002', 'demo-vps', 'fly', 'demo-vm', 'demo-gateway', 'running')
ON CONFLICT DO NOTHING;

INSERT INTO agents (id, user_id, vps_id, name, gateway_token)
VALUES ('7011a7e0-0000-4000-8000-000000000005', '7011a7e0-0000-4000-8000-000000000003',
        '7011a7e0-0000-4000-8000-000000000004', 'demo-agent',
        'de30de30de30de30de30de30de30de30de30de30de30de30de30de30de30de30')
ON CONFLICT DO NOTHING;

INSERT INTO overage_budgets (user_id, period_start, budget_cents)
VALUES ('7011a7e0-0000-4000-8000-000000000003', tollgate_current_period(), 500)
ON CONFLICT DO NOTHING;

COMMIT;
