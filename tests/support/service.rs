//! Tools and long-running child processes the suites drive for real
//! (promtool, Prometheus, linters), stopped with the test.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Find `name` on PATH or in the scripts directory of the Python that pip uses.
pub fn find_tool(name: &str) -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    for python in ["python3", "/usr/bin/python3"] {
        if let Ok(out) = Command::new(python)
            .args([
                "-c",
                "import sysconfig; print(sysconfig.get_path('scripts'))",
            ])
            .output()
        {
            let dir = String::from_utf8_lossy(&out.stdout).trim().to_string();
            if out.status.success() && !dir.is_empty() {
                dirs.push(PathBuf::from(dir));
            }
        }
    }
    dirs.into_iter().map(|d| d.join(name)).find(|p| p.is_file())
}

/// The tool, or `None` with a note (outside CI) so the caller skips its check.
pub fn require_tool(name: &str, install: &str) -> Option<PathBuf> {
    if let Some(path) = find_tool(name) {
        return Some(path);
    }
    if std::env::var_os("CI").is_some() {
        panic!("{name} is required under CI: {install} (.ci/run installs it)");
    }
    eprintln!("SKIPPED: {name} is not installed ({install}; .ci/run installs it)");
    None
}

/// A long-running child that stops with the test: SIGTERM on drop (then SIGKILL),
/// and `timeout(1)` around it so it also stops if the test process dies first.
pub struct Service {
    child: Child,
    name: &'static str,
    log: PathBuf,
}

impl Service {
    pub fn start(
        name: &'static str,
        program: &str,
        args: &[&str],
        envs: &[(&str, String)],
        dir: &Path,
    ) -> Service {
        let log = dir.join(format!("{name}.log"));
        let file = std::fs::File::create(&log).unwrap();
        let mut cmd = Command::new("timeout");
        cmd.args(["--kill-after=5", "300", program])
            .args(args)
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file);
        // Only the config keys set below reach the process (an unknown TOLLGATE_* is fatal).
        for (key, _) in std::env::vars() {
            if key.starts_with("TOLLGATE_") {
                cmd.env_remove(key);
            }
        }
        for (key, value) in envs {
            cmd.env(key, value);
        }
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("starting {name}: {e}"));
        Service { child, name, log }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Panic with the log if the process has exited.
    pub fn assert_running(&mut self) {
        if let Some(status) = self.child.try_wait().unwrap() {
            panic!("{} exited ({status}):\n{}", self.name, self.log());
        }
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        // timeout(1) passes SIGTERM on to the service and exits with it.
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
