//! The systemd units under `deploy/systemd/`: they run the right command, give
//! the proxy time to drain, are hardened, and pass `systemd-analyze verify` and
//! `security` when it is installed (`.ci/run` installs it; elsewhere a missing
//! tool skips that part with a note on stderr, except under `CI`).

mod support;

use std::process::Command;
use std::time::Duration;

use support::deploy::{read, run, scratch, seconds, toml_value};
use support::service::require_tool;

// ---------------------------------------------------------------------------
// systemd

fn unit_values(unit: &str, key: &str) -> Vec<String> {
    unit.lines()
        .filter_map(|l| l.strip_prefix(&format!("{key}=")))
        .map(str::to_string)
        .collect()
}

#[test]
fn systemd_units_verify_drain_and_are_hardened() {
    let example = read("deploy/tollgate.example.toml");
    let drain = seconds(&toml_value(&example, "proxy", "drain_timeout").unwrap());
    let spill_dir = toml_value(&example, "proxy.meter", "spill_dir").unwrap();
    for (file, command, min_stop) in [
        ("tollgate-proxy.service", "proxy", drain + 15),
        ("tollgate-monitor.service", "monitor", 20),
    ] {
        let unit = read(&format!("deploy/systemd/{file}"));
        let exec = unit_values(&unit, "ExecStart");
        assert_eq!(exec.len(), 1, "{file}");
        assert!(
            exec[0].ends_with(&format!(" {command}")),
            "{file}: {exec:?}"
        );
        assert_eq!(unit_values(&unit, "KillSignal"), ["SIGTERM"], "{file}");
        assert_eq!(unit_values(&unit, "Restart"), ["always"], "{file}");
        let stop = seconds(&unit_values(&unit, "TimeoutStopSec")[0]);
        assert!(
            stop >= min_stop,
            "{file}: TimeoutStopSec {stop}s < {min_stop}s"
        );
        for (key, value) in [
            ("NoNewPrivileges", "yes"),
            ("ProtectSystem", "strict"),
            ("ProtectHome", "yes"),
            ("PrivateTmp", "yes"),
            ("DynamicUser", "yes"),
            ("CapabilityBoundingSet", ""),
        ] {
            assert_eq!(unit_values(&unit, key), [value], "{file}: {key}");
        }
        if command == "proxy" {
            assert_eq!(
                format!("/var/lib/{}", unit_values(&unit, "StateDirectory")[0]),
                spill_dir,
                "{file}: spill dir"
            );
        }
    }

    let Some(analyze) = require_tool("systemd-analyze", "apt-get install systemd") else {
        return;
    };
    // Verify a copy whose ExecStart points at the built binary (verify checks it exists).
    let dir = scratch("systemd");
    for file in ["tollgate-proxy.service", "tollgate-monitor.service"] {
        let unit = read(&format!("deploy/systemd/{file}"))
            .replace("/usr/local/bin/tollgate", support::tollgate_bin());
        let path = dir.join(file);
        std::fs::write(&path, unit).unwrap();
        let out = run(
            Command::new(&analyze)
                .args(["verify", "--man=no"])
                .arg(&path),
            Duration::from_secs(60),
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && !stderr.contains(file),
            "systemd-analyze verify {file}: {stderr}"
        );
        // Exposure score at most 2.0 of 10 ("OK"); --threshold counts in tenths.
        let out = run(
            Command::new(&analyze)
                .args(["security", "--offline=yes", "--threshold=20"])
                .arg(&path),
            Duration::from_secs(60),
        );
        assert!(
            out.status.success(),
            "systemd-analyze security {file}: {}",
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .last()
                .unwrap_or_default()
        );
    }
    let _ = std::fs::remove_dir_all(dir);
}
