//! Shared by the checks of `deploy/` (tests/deploy_*.rs): paths, the real tools
//! run with a time limit, YAML and the simple TOML of deploy/, and the Grafana
//! dashboard.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use uuid::Uuid;

pub use serde_json::Value;

// ---------------------------------------------------------------------------
// Paths, tools and processes

pub fn repo_path(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(relative)
}

pub fn read(relative: &str) -> String {
    std::fs::read_to_string(repo_path(relative))
        .unwrap_or_else(|e| panic!("reading {relative}: {e}"))
}

/// A scratch directory for one test, under target/.
pub fn scratch(what: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!(
        "deploy-{what}-{}",
        &Uuid::new_v4().simple().to_string()[..8]
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Run a command to completion within `limit`; the output, whatever the status.
/// Its output is read as it comes, so a chatty tool never blocks on a full pipe.
pub fn run(cmd: &mut Command, limit: Duration) -> Output {
    let shown = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {shown}: {e}"));
    let stdout = read_in_background(child.stdout.take());
    let stderr = read_in_background(child.stderr.take());
    // The tool's stdout closes when it exits.
    let finished = stdout.recv_timeout(limit);
    let timed_out = finished.is_err();
    if timed_out {
        let _ = child.kill();
    }
    let status = child.wait().unwrap();
    let grace = Duration::from_secs(5);
    let out = Output {
        status,
        stdout: finished
            .or_else(|_| stdout.recv_timeout(grace))
            .unwrap_or_default(),
        stderr: stderr.recv_timeout(grace).unwrap_or_default(),
    };
    assert!(
        !timed_out,
        "{shown} did not finish within {limit:?}\nstdout: {}\nstderr: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Everything `pipe` yields until it closes, from a thread of its own.
fn read_in_background(pipe: Option<impl Read + Send + 'static>) -> mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut bytes = Vec::new();
        if let Some(mut pipe) = pipe {
            let _ = pipe.read_to_end(&mut bytes);
        }
        let _ = tx.send(bytes);
    });
    rx
}

/// Run and require exit status 0.
pub fn run_ok(cmd: &mut Command, limit: Duration) -> String {
    let shown = format!("{cmd:?}");
    let out = run(cmd, limit);
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{shown} failed ({})\nstdout: {stdout}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

// ---------------------------------------------------------------------------
// File formats

/// Every document of a YAML file as JSON, parsed by PyYAML (which yamllint brings).
pub fn yaml_docs(relative_or_abs: &Path) -> Vec<Value> {
    const SCRIPT: &str = "import json, sys, yaml\n\
        docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d is not None]\n\
        print(json.dumps(docs, default=str))";
    let path = if relative_or_abs.is_absolute() {
        relative_or_abs.to_path_buf()
    } else {
        repo_path(relative_or_abs.to_str().unwrap())
    };
    for python in ["python3", "/usr/bin/python3"] {
        let Ok(out) = Command::new(python)
            .args(["-c", SCRIPT])
            .arg(&path)
            .output()
        else {
            continue;
        };
        if out.status.success() {
            return serde_json::from_slice(&out.stdout).unwrap();
        }
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("No module named 'yaml'"),
            "{} is not valid YAML: {err}",
            path.display()
        );
    }
    panic!("no python3 with PyYAML (apt-get install python3-yaml, or yamllint)");
}

pub fn yaml(relative: &str) -> Value {
    let mut docs = yaml_docs(Path::new(relative));
    assert_eq!(docs.len(), 1, "{relative} has one document");
    docs.remove(0)
}

/// `key` in `[section]` of a TOML file written in the simple style of deploy/
/// (one `key = value` per line); the raw value text without quotes.
pub fn toml_value(text: &str, section: &str, key: &str) -> Option<String> {
    let mut current = String::new();
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('[') {
            current = line.trim_matches(|c| c == '[' || c == ']').to_string();
        } else if current == section {
            if let Some((k, v)) = line.split_once('=') {
                if k.trim() == key {
                    let v = v.split(" #").next().unwrap().trim();
                    return Some(v.trim_matches(|c| c == '"' || c == '\'').to_string());
                }
            }
        }
    }
    None
}

/// Seconds in a duration such as "30s", "1m", "45", "1m30s".
pub fn seconds(text: &str) -> u64 {
    let text = text.trim().trim_matches('"');
    if let Ok(n) = text.parse::<u64>() {
        return n;
    }
    let mut total = 0;
    let mut number = String::new();
    for c in text.chars() {
        if c.is_ascii_digit() {
            number.push(c);
            continue;
        }
        let n: u64 = number.parse().unwrap_or_else(|_| panic!("duration {text}"));
        number.clear();
        total += match c {
            'h' => n * 3600,
            'm' => n * 60,
            's' => n,
            _ => panic!("duration {text}"),
        };
    }
    assert!(number.is_empty(), "duration {text} lacks a unit");
    total
}

/// `tollgate check-config FILE` accepts the file.
pub fn assert_tollgate_accepts(config_text: &str, what: &str) {
    let dir = scratch("config");
    let path = dir.join("tollgate.toml");
    std::fs::write(&path, config_text).unwrap();
    let mut cmd = Command::new(super::tollgate_bin());
    cmd.arg("check-config").arg(&path);
    for (key, _) in std::env::vars() {
        if key.starts_with("TOLLGATE_") {
            cmd.env_remove(key);
        }
    }
    let out = run(&mut cmd, Duration::from_secs(30));
    assert!(
        out.status.success(),
        "tollgate check-config rejects {what}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = std::fs::remove_dir_all(dir);
}

// ---------------------------------------------------------------------------
// The dashboard

pub fn dashboard() -> Value {
    serde_json::from_str(&read("deploy/grafana/dashboards/tollgate.json")).unwrap()
}

/// Every panel, including those nested in collapsed rows.
pub fn panels(dashboard: &Value) -> Vec<Value> {
    let mut out = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        out.push(panel.clone());
        if let Some(nested) = panel["panels"].as_array() {
            out.extend(nested.iter().cloned());
        }
    }
    out
}

pub fn datasource_type(panel: &Value, target: &Value) -> String {
    let ds = if target["datasource"].is_object() {
        &target["datasource"]
    } else {
        &panel["datasource"]
    };
    ds["type"].as_str().unwrap_or_default().to_string()
}
