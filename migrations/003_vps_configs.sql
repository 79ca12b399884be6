-- VM size presets: a provider, an image and a size.
CREATE TABLE vps_configs (
    id             UUID PRIMARY KEY DEFAULT gen_random_uuid(),
    name           TEXT NOT NULL UNIQUE,
    provider       TEXT NOT NULL,
    image          TEXT NOT NULL,
    cpu_millicores INT NOT NULL CHECK (cpu_millicores > 0),
    memory_mb      INT NOT NULL CHECK (memory_mb > 0),
    disk_gb        INT NOT NULL CHECK (disk_gb > 0),
    created_at     TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at     TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE TRIGGER vps_configs_set_updated_at BEFORE UPDATE ON vps_configs
    FOR EACH ROW EXECUTE FUNCTION set_updated_at();
