//! Running the monitor in-process for a test, and real cgroups on this host.

use std::path::PathBuf;
use std::process::{Child, Command};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use tollgate_core::config::{CgroupVersion, Config, SourceConfig};
use tollgate_monitor::{Options, Status};

use super::wait::{eventually, holds};

/// A monitor config for tests: fast cycles, every sample written at once
/// (`write_interval` = `interval`), loopback admin.
pub fn monitor_config(database_url: &str, interval: Duration) -> Config {
    let mut c = Config::default();
    c.database.url = database_url.to_owned();
    c.database.max_connections = 4;
    c.log.filter = "warn".into();
    c.monitor.interval = interval;
    c.monitor.write_interval = interval.min(c.monitor.max_gap);
    c.monitor.sample_timeout = Duration::from_secs(2);
    c.monitor.admin.listen = "127.0.0.1:0".parse().unwrap();
    c
}

pub struct TestMonitor {
    pub status: Arc<Status>,
    pub admin: std::net::SocketAddr,
    shutdown: CancellationToken,
    task: Option<JoinHandle<anyhow::Result<()>>>,
}

impl TestMonitor {
    pub async fn start(config: Config) -> TestMonitor {
        let admin = TcpListener::bind(config.monitor.admin.listen)
            .await
            .unwrap();
        let addr = admin.local_addr().unwrap();
        let status = Arc::new(Status::default());
        let shutdown = CancellationToken::new();
        let options = Options {
            migrate: false,
            status: Some(status.clone()),
        };
        let task = tokio::spawn(tollgate_monitor::run(
            config,
            admin,
            options,
            shutdown.clone(),
        ));
        TestMonitor {
            status,
            admin: addr,
            shutdown,
            task: Some(task),
        }
    }

    /// Wait until this monitor has completed `n` cycles as leader.
    pub async fn wait_cycles(&self, n: u64, within: Duration) {
        eventually(within, format!("monitor completes {n} cycles"), || async {
            let cycles = self.status.cycles();
            holds(cycles >= n, cycles)
        })
        .await;
    }

    /// Graceful stop.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(task) = self.task.take() {
            task.await.unwrap().unwrap();
        }
    }

    /// Abrupt stop, as if the process died: the task and its connections go away.
    pub async fn kill(mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
            let _ = task.await;
        }
    }
}

impl Drop for TestMonitor {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// A cgroup (v1 `cpuacct` + `memory` hierarchies) of this host, removed on drop.
pub struct Cgroup {
    pub name: String,
    children: Vec<Child>,
}

pub const CGROUP_ROOT: &str = "/sys/fs/cgroup";

impl Cgroup {
    /// Create `tollgate-test-<vps_id>` in both hierarchies. Panics with a clear
    /// message if this host's v1 hierarchies are not writable.
    pub fn create(vps_id: Uuid) -> Cgroup {
        let name = format!("tollgate-test-{vps_id}");
        for hierarchy in ["cpuacct", "memory"] {
            let dir = PathBuf::from(CGROUP_ROOT).join(hierarchy).join(&name);
            std::fs::create_dir_all(&dir).unwrap_or_else(|e| {
                panic!("cannot create cgroup {}: {e} (these tests need writable v1 cpuacct and memory hierarchies)", dir.display())
            });
        }
        Cgroup {
            name,
            children: Vec::new(),
        }
    }

    /// The monitor source reading this cgroup (path template `tollgate-test-{vps_id}`).
    pub fn source() -> SourceConfig {
        SourceConfig::Cgroup {
            root: PathBuf::from(CGROUP_ROOT),
            version: CgroupVersion::V1,
            path: "tollgate-test-{vps_id}".into(),
        }
    }

    fn file(&self, hierarchy: &str, file: &str) -> PathBuf {
        PathBuf::from(CGROUP_ROOT)
            .join(hierarchy)
            .join(&self.name)
            .join(file)
    }

    /// Run `sh -c script` inside the cgroup.
    pub fn spawn(&mut self, script: &str) -> u32 {
        let child = Command::new("sh").args(["-c", script]).spawn().unwrap();
        let pid = child.id();
        for hierarchy in ["cpuacct", "memory"] {
            std::fs::write(self.file(hierarchy, "cgroup.procs"), pid.to_string()).unwrap();
        }
        self.children.push(child);
        pid
    }

    /// Stop every process started in the cgroup.
    pub fn kill_all(&mut self) {
        for mut c in self.children.drain(..) {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The kernel's own CPU counter, nanoseconds.
    pub fn cpu_ns(&self) -> u64 {
        std::fs::read_to_string(self.file("cpuacct", "cpuacct.usage"))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    }

    /// The kernel's own memory reading, bytes.
    pub fn memory_bytes(&self) -> u64 {
        std::fs::read_to_string(self.file("memory", "memory.usage_in_bytes"))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        self.kill_all();
        for hierarchy in ["cpuacct", "memory"] {
            let dir = PathBuf::from(CGROUP_ROOT).join(hierarchy).join(&self.name);
            for _ in 0..50 {
                if std::fs::remove_dir(&dir).is_ok() || !dir.exists() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

/// A directory laid out like a v1 cgroup hierarchy whose counters the test
/// writes itself, for exact restart and reset scenarios. (The kernel's own
/// counters are exercised with [`Cgroup`].)
pub struct CounterFiles {
    pub root: PathBuf,
}

impl CounterFiles {
    pub fn new() -> CounterFiles {
        CounterFiles {
            root: super::proxy::temp_dir("cgroup-files"),
        }
    }

    pub fn source(&self) -> SourceConfig {
        SourceConfig::Cgroup {
            root: self.root.clone(),
            version: CgroupVersion::V1,
            path: "vps/{vps_id}".into(),
        }
    }

    /// Set the counters of `vps`: CPU in nanoseconds, memory in bytes.
    pub fn set(&self, vps: Uuid, cpu_ns: u64, memory: u64) {
        let cpu = self.root.join("cpuacct/vps").join(vps.to_string());
        let mem = self.root.join("memory/vps").join(vps.to_string());
        std::fs::create_dir_all(&cpu).unwrap();
        std::fs::create_dir_all(&mem).unwrap();
        std::fs::write(cpu.join("cpuacct.usage"), format!("{cpu_ns}\n")).unwrap();
        std::fs::write(mem.join("memory.usage_in_bytes"), format!("{memory}\n")).unwrap();
    }
}

impl Default for CounterFiles {
    fn default() -> Self {
        Self::new()
    }
}
