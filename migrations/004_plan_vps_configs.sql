-- Which VM presets a plan may use (many-to-many).
CREATE TABLE plan_vps_configs (
    plan_id       UUID NOT NULL REFERENCES plans (id) ON DELETE CASCADE,
    vps_config_id UUID NOT NULL REFERENCES vps_configs (id) ON DELETE CASCADE,
    PRIMARY KEY (plan_id, vps_config_id)
);

CREATE INDEX plan_vps_configs_vps_config_id_idx ON plan_vps_configs (vps_config_id);
