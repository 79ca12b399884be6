//! Load generators, pinned to the load core: `wrk` for HTTP/1.1 (a Lua script
//! sets the request target, so forward proxies get absolute-form requests with
//! `Proxy-Authorization`) and `h2load` for HTTP/2 over cleartext (prior
//! knowledge).

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context};

use crate::servers;

/// What to request, and where to send it.
#[derive(Debug, Clone)]
pub struct Target {
    pub connect: SocketAddr,
    /// Origin-form (`/small`) or absolute-form (`http://host:port/small`).
    pub path: String,
    pub headers: Vec<(String, String)>,
    /// The server under test behind `connect`, whose CPU time per request a
    /// `wrk` run measures (none for the origin itself).
    pub server: Option<u32>,
}

impl Target {
    /// This target, with the CPU time of `pid` (and its descendants) measured.
    pub fn served_by(mut self, pid: u32) -> Target {
        self.server = Some(pid);
        self
    }
}

/// A server's CPU time per request during a measured run, microseconds: its
/// own work (user) and the kernel's on its behalf (system; on loopback this
/// includes delivering what it sends to the reader).
#[derive(Debug, Clone, Copy, Default)]
pub struct ServerCpu {
    pub user_us: f64,
    pub system_us: f64,
}

/// One load run's figures.
#[derive(Debug, Clone, Copy, Default)]
pub struct Run {
    pub requests_per_sec: f64,
    pub bytes_per_sec: f64,
    /// Latency percentiles, microseconds (wrk); h2load reports the mean in `p50_us`
    /// and leaves `p99_us` at 0.
    pub p50_us: f64,
    pub p99_us: f64,
    /// 99.9th percentile, microseconds (wrk and paced runs; 0 for h2load).
    pub p999_us: f64,
    pub mean_us: f64,
    /// Non-2xx responses, connect and write errors, and timeouts.
    pub errors: u64,
    /// Connections the server closed after a response without saying so (wrk
    /// counts them as read errors; tinyproxy closes after every response).
    pub closed: u64,
    pub requests: u64,
    /// The server's CPU time per request (`wrk` runs of a target with a server).
    pub server_cpu: Option<ServerCpu>,
}

/// Run `wrk` on `cpu` (a core, or a `taskset` list) with `threads` threads
/// and `connections` connections for `duration`, after an unrecorded warm-up
/// run of `warmup`.
#[allow(clippy::too_many_arguments)]
pub fn wrk(
    cpu: &str,
    threads: usize,
    target: &Target,
    connections: usize,
    duration: Duration,
    warmup: Duration,
    dir: &Path,
) -> anyhow::Result<Run> {
    let script = dir.join("wrk.lua");
    std::fs::write(&script, wrk_script(target))?;
    measured(target, warmup, duration, |d| {
        run_wrk(cpu, threads, target, connections, d, &script)
    })
}

/// `run` once for `warmup`, unrecorded, then for `duration`, with the CPU time
/// the target's server (if it names one) spent per request of that run.
pub fn measured(
    target: &Target,
    warmup: Duration,
    duration: Duration,
    mut run: impl FnMut(Duration) -> anyhow::Result<Run>,
) -> anyhow::Result<Run> {
    if !warmup.is_zero() {
        run(warmup)?;
    }
    let before = target.server.map(servers::tree_cpu);
    let mut measured = run(duration)?;
    if let (Some(pid), Some(before)) = (target.server, before) {
        let spent = servers::tree_cpu(pid).since(before);
        let requests = measured.requests.max(1) as f64;
        measured.server_cpu = Some(ServerCpu {
            user_us: spent.user_secs * 1e6 / requests,
            system_us: spent.system_secs * 1e6 / requests,
        });
    }
    Ok(measured)
}

fn run_wrk(
    cpu: &str,
    threads: usize,
    target: &Target,
    connections: usize,
    duration: Duration,
    script: &Path,
) -> anyhow::Result<Run> {
    let output = Command::new("taskset")
        .arg("-c")
        .arg(cpu)
        .arg("wrk")
        .arg(format!("-t{threads}"))
        .args(["--timeout", "5s"])
        .arg(format!("-c{connections}"))
        .arg(format!("-d{}s", duration.as_secs().max(1)))
        .arg("-s")
        .arg(script)
        .arg(format!("http://{}", target.connect))
        .output()
        .context("running wrk")?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        bail!(
            "wrk failed ({}): {stdout}{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let line = stdout
        .lines()
        .find(|l| l.starts_with("wrk-result "))
        .with_context(|| format!("no result line in wrk output: {stdout}"))?;
    let field = |key: &str| -> f64 {
        line.split_whitespace()
            .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    };
    let secs = field("duration_us") / 1e6;
    let requests = field("requests");
    Ok(Run {
        requests_per_sec: requests / secs,
        bytes_per_sec: field("bytes") / secs,
        p50_us: field("p50_us"),
        p99_us: field("p99_us"),
        p999_us: field("p999_us"),
        mean_us: field("mean_us"),
        errors: (field("status_errors")
            + field("connect_errors")
            + field("write_errors")
            + field("timeouts")) as u64,
        closed: field("read_errors") as u64,
        requests: requests as u64,
        server_cpu: None,
    })
}

fn lua_string(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

fn wrk_script(target: &Target) -> String {
    let mut script = format!(
        "wrk.method = \"GET\"\nwrk.path = {}\n",
        lua_string(&target.path)
    );
    for (name, value) in &target.headers {
        script.push_str(&format!(
            "wrk.headers[{}] = {}\n",
            lua_string(name),
            lua_string(value)
        ));
    }
    script.push_str(
        r#"done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "wrk-result requests=%d duration_us=%d bytes=%d p50_us=%d p99_us=%d p999_us=%d mean_us=%f status_errors=%d connect_errors=%d read_errors=%d write_errors=%d timeouts=%d\n",
    summary.requests, summary.duration, summary.bytes,
    latency:percentile(50), latency:percentile(99), latency:percentile(99.9), latency.mean,
    e.status, e.connect, e.read, e.write, e.timeout))
end
"#,
    );
    script
}

/// Run `h2load` (HTTP/2 prior knowledge) with `connections` connections of
/// `streams` concurrent streams each, for `duration` after `warmup`.
pub fn h2load(
    cpu: usize,
    target: &Target,
    connections: usize,
    streams: usize,
    duration: Duration,
    warmup: Duration,
) -> anyhow::Result<Run> {
    let mut cmd = Command::new("taskset");
    cmd.arg("-c")
        .arg(cpu.to_string())
        .arg("h2load")
        .args(["-t", "1"])
        .arg(format!("-c{connections}"))
        .arg(format!("-m{streams}"))
        .arg(format!("--duration={}", duration.as_secs().max(1)))
        .arg(format!("--warm-up-time={}", warmup.as_secs().max(1)));
    for (name, value) in &target.headers {
        if !name.eq_ignore_ascii_case("host") {
            cmd.arg("-H").arg(format!("{name}: {value}"));
        }
    }
    cmd.arg(format!("http://{}{}", target.connect, target.path));
    let output = cmd.output().context("running h2load")?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        bail!("h2load failed ({}): {stdout}", output.status);
    }
    // "finished in 5.00s, 12345.67 req/s, 1.23MB/s"
    let finished = stdout
        .lines()
        .find(|l| l.starts_with("finished in"))
        .with_context(|| format!("no summary in h2load output: {stdout}"))?;
    let mut parts = finished.split(", ");
    let _ = parts.next();
    let rps: f64 = parts
        .next()
        .and_then(|p| p.strip_suffix(" req/s"))
        .and_then(|v| v.parse().ok())
        .context("h2load req/s")?;
    // "requests: 100 total, 100 started, 100 done, 100 succeeded, 0 failed, 0 errored, 0 timeout"
    let requests_line = stdout
        .lines()
        .find(|l| l.starts_with("requests:"))
        .context("h2load requests line")?;
    let count = |what: &str| -> u64 {
        requests_line
            .split(", ")
            .find_map(|p| {
                p.trim_start_matches("requests: ")
                    .strip_suffix(what)?
                    .trim()
                    .parse()
                    .ok()
            })
            .unwrap_or(0)
    };
    // "time for request:   123us   4.5ms   456us   78us   90.00%"
    let mean_us = stdout
        .lines()
        .find(|l| l.starts_with("time for request:"))
        .and_then(|l| l.split_whitespace().nth(5))
        .and_then(parse_h2load_time)
        .unwrap_or(0.0);
    let errors = count(" failed") + count(" errored") + count(" timeout");
    Ok(Run {
        requests_per_sec: rps,
        bytes_per_sec: 0.0,
        p50_us: mean_us,
        p99_us: 0.0,
        p999_us: 0.0,
        mean_us,
        errors,
        closed: 0,
        requests: count(" done"),
        server_cpu: None,
    })
}

fn parse_h2load_time(s: &str) -> Option<f64> {
    if let Some(v) = s.strip_suffix("us") {
        v.parse().ok()
    } else if let Some(v) = s.strip_suffix("ms") {
        v.parse::<f64>().ok().map(|v| v * 1e3)
    } else if let Some(v) = s.strip_suffix('s') {
        v.parse::<f64>().ok().map(|v| v * 1e6)
    } else {
        None
    }
}
