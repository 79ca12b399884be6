//! First run: the built `tollgate dev` with no PostgreSQL reachable starts a
//! private server, and stops the one it started however it ends (SIGTERM,
//! SIGINT, an error during start-up); a second `dev` gets past a stale
//! `postmaster.pid`, restarts a server of its folder running on another port,
//! and reuses one it finds running without stopping it.
//!
//! Each test gives dev its own private server (`--private-postgres`, its own
//! folder under `CARGO_TARGET_TMPDIR` and a free port) and free ports for every
//! listener, so it touches neither the server on 5432, nor the private server
//! the other suites share, nor a parallel test run.

mod support;

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use tollgate_core::local_postgres::{self, Search};
use uuid::Uuid;

/// Migrations and seeding in a debug build on a busy machine take a while.
const READY_WITHIN: Duration = Duration::from_secs(180);
/// A drain with nothing in flight, the final flush, then `pg_ctl stop`.
const EXIT_WITHIN: Duration = Duration::from_secs(90);

#[test]
fn dev_stops_the_private_postgres_it_started_on_sigterm_and_sigint() {
    let Some(case) = Case::new("signals") else {
        return;
    };

    let mut dev = Dev::start(&case);
    let banner = dev.wait_ready();
    assert!(
        banner.contains("stopped when dev exits"),
        "dev should say it started the private server:\n{banner}"
    );
    let postmaster = case
        .postmaster_pid()
        .expect("postmaster.pid while dev runs");
    assert!(
        case.postgres_processes().contains(&postmaster),
        "postmaster {postmaster} should run on {}",
        case.data_dir().display()
    );
    dev.signal("TERM");
    let status = dev.wait_exit();
    assert!(
        status.success(),
        "dev after SIGTERM: {status}\n{}",
        dev.log()
    );
    assert!(
        dev.log().contains("stopped the private PostgreSQL"),
        "{}",
        dev.log()
    );
    case.assert_no_postgres(&dev);

    // A postmaster.pid left behind by a server that is gone, naming a PID that
    // now belongs to another process (as after a container restart).
    case.plant_stale_pid_file(std::process::id());
    let mut dev = Dev::start(&case);
    let banner = dev.wait_ready();
    assert!(banner.contains("stopped when dev exits"), "{banner}");
    assert!(
        dev.log().contains("removed a stale postmaster.pid"),
        "{}",
        dev.log()
    );
    dev.signal("INT");
    let status = dev.wait_exit();
    assert!(
        status.success(),
        "dev after SIGINT: {status}\n{}",
        dev.log()
    );
    case.assert_no_postgres(&dev);
}

#[test]
fn dev_stops_the_private_postgres_when_start_up_fails() {
    let Some(case) = Case::new("startup-error") else {
        return;
    };
    // The demo gateway's port is taken: dev fails after PostgreSQL is up.
    let taken = TcpListener::bind(("127.0.0.1", case.ports.gateway)).unwrap();
    let mut dev = Dev::start(&case);
    let status = dev.wait_exit();
    drop(taken);
    assert!(!status.success(), "dev should fail:\n{}", dev.log());
    assert!(
        dev.log().contains(&format!(
            "binding the demo gateway on 127.0.0.1:{}",
            case.ports.gateway
        )),
        "the error should name the port dev could not bind:\n{}",
        dev.log()
    );
    assert!(
        dev.log().contains("started a private PostgreSQL"),
        "PostgreSQL should have been started before the failure:\n{}",
        dev.log()
    );
    case.assert_no_postgres(&dev);
}

#[test]
fn dev_reuses_a_running_private_postgres_and_leaves_it_running() {
    let Some(case) = Case::new("reuse") else {
        return;
    };
    // A dev killed outright leaves its private server running.
    let mut dev = Dev::start(&case);
    dev.wait_ready();
    let postmaster = case
        .postmaster_pid()
        .expect("postmaster.pid while dev runs");
    dev.kill();
    assert!(
        case.postgres_processes().contains(&postmaster),
        "the private server should outlive a killed dev"
    );

    let mut dev = Dev::start(&case);
    let banner = dev.wait_ready();
    assert!(
        banner.contains("already running, left running"),
        "dev should reuse the running server:\n{banner}"
    );
    dev.signal("TERM");
    let status = dev.wait_exit();
    assert!(
        status.success(),
        "dev after SIGTERM: {status}\n{}",
        dev.log()
    );
    assert_eq!(
        case.postmaster_pid(),
        Some(postmaster),
        "dev must not stop a server it did not start:\n{}",
        dev.log()
    );
    assert!(case.postgres_processes().contains(&postmaster));

    assert!(case
        .search
        .stop_private()
        .expect("stopping the private server"));
    case.assert_no_postgres(&dev);
}

#[test]
fn dev_restarts_a_private_postgres_running_on_another_port() {
    let Some(mut case) = Case::new("other-port") else {
        return;
    };
    let mut dev = Dev::start(&case);
    dev.wait_ready();
    let old = case
        .postmaster_pid()
        .expect("postmaster.pid while dev runs");
    dev.kill();

    // The same folder on another port: the running server is in the way.
    case.search.port = Ports::free().postgres;
    let mut dev = Dev::start(&case);
    let banner = dev.wait_ready();
    assert!(
        banner.contains(&format!("127.0.0.1:{}/", case.search.port))
            && banner.contains("stopped when dev exits"),
        "dev should run its own server on the new port:\n{banner}"
    );
    assert!(
        dev.log().contains("restarting a private PostgreSQL"),
        "{}",
        dev.log()
    );
    assert!(!case.postgres_processes().contains(&old));
    dev.signal("TERM");
    let status = dev.wait_exit();
    assert!(
        status.success(),
        "dev after SIGTERM: {status}\n{}",
        dev.log()
    );
    case.assert_no_postgres(&dev);
}

// ---------------------------------------------------------------------------

/// Free ports for dev's listeners.
struct Ports {
    egress: u16,
    ingress: u16,
    admin: u16,
    monitor_admin: u16,
    gateway: u16,
    postgres: u16,
}

impl Ports {
    fn free() -> Ports {
        // Held together so they differ, released for dev to bind.
        let listeners: Vec<TcpListener> = (0..6)
            .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
            .collect();
        let port = |i: usize| listeners[i].local_addr().unwrap().port();
        Ports {
            egress: port(0),
            ingress: port(1),
            admin: port(2),
            monitor_admin: port(3),
            gateway: port(4),
            postgres: port(5),
        }
    }
}

/// One test's folder, private server and ports. Dropping it stops any server
/// left on its cluster and removes the folder.
struct Case {
    dir: PathBuf,
    search: Search,
    ports: Ports,
}

impl Case {
    /// `None` (skipped with a note) without PostgreSQL's server binaries outside CI.
    fn new(name: &str) -> Option<Case> {
        if local_postgres::find_bin_dir().is_none() {
            let why = "PostgreSQL's server binaries (initdb, pg_ctl) are not installed \
                       (apt-get install postgresql)";
            if std::env::var_os("CI").is_some() {
                panic!("{why}; they are required under CI");
            }
            eprintln!("SKIPPED: {why}");
            return None;
        }
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!(
            "first-run-{name}-{}",
            &Uuid::new_v4().simple().to_string()[..8]
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let ports = Ports::free();
        let search = Search {
            try_local: false,
            dir: dir.join("postgres"),
            port: ports.postgres,
        };
        Some(Case { dir, search, ports })
    }

    fn data_dir(&self) -> PathBuf {
        self.search.data_dir()
    }

    fn postmaster_pid(&self) -> Option<u32> {
        let text = std::fs::read_to_string(self.data_dir().join("postmaster.pid")).ok()?;
        text.lines().next()?.trim().parse().ok()
    }

    /// PIDs of the processes working in this case's cluster: a postmaster and
    /// its children run with the data directory as their working directory.
    fn postgres_processes(&self) -> Vec<u32> {
        let Ok(data_dir) = std::fs::canonicalize(self.data_dir()) else {
            return Vec::new();
        };
        std::fs::read_dir("/proc")
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
            .filter(|pid| {
                std::fs::read_link(format!("/proc/{pid}/cwd")).is_ok_and(|d| d == data_dir)
            })
            .collect()
    }

    fn assert_no_postgres(&self, dev: &Dev) {
        let pid_file = self.data_dir().join("postmaster.pid");
        assert!(
            !pid_file.exists(),
            "{} should be gone once the server stopped:\n{}",
            pid_file.display(),
            dev.log()
        );
        // Backends notice the postmaster's exit on their own; give them a moment.
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut left = self.postgres_processes();
        while !left.is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
            left = self.postgres_processes();
        }
        assert!(
            left.is_empty(),
            "PostgreSQL processes still run on {}: {left:?}\n{}",
            self.data_dir().display(),
            dev.log()
        );
        assert!(
            !dev.log().contains("could not stop"),
            "dev reported a failed stop:\n{}",
            dev.log()
        );
    }

    /// Write a `postmaster.pid` as a server that is gone would leave it, but
    /// naming `pid`, owned like the cluster.
    fn plant_stale_pid_file(&self, pid: u32) {
        use std::os::unix::fs::MetadataExt;
        let data_dir = self.data_dir();
        let path = data_dir.join("postmaster.pid");
        let contents = format!(
            "{pid}\n{}\n1700000000\n{}\n{}\n127.0.0.1\n  5432001         0\nready   \n",
            data_dir.display(),
            self.search.port,
            self.search.dir.display()
        );
        std::fs::write(&path, contents).unwrap();
        let owner = std::fs::metadata(&data_dir).unwrap();
        std::os::unix::fs::chown(&path, Some(owner.uid()), Some(owner.gid())).unwrap();
    }
}

impl Drop for Case {
    fn drop(&mut self) {
        if let Err(e) = self.search.stop_private() {
            eprintln!(
                "stopping the private PostgreSQL of {}: {e:#}",
                self.dir.display()
            );
        }
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// A running `tollgate dev` under `timeout(1)` (so it ends even if the test
/// process dies), its stdout lines read as they come and its stderr in a file.
/// Dropping it kills dev if it still runs.
struct Dev {
    child: Child,
    lines: mpsc::Receiver<String>,
    stdout: String,
    log_path: PathBuf,
    status: Option<ExitStatus>,
}

impl Dev {
    fn start(case: &Case) -> Dev {
        let log_path = case.dir.join(format!(
            "dev-{}.log",
            &Uuid::new_v4().simple().to_string()[..8]
        ));
        let log = std::fs::File::create(&log_path).unwrap();
        let p = &case.ports;
        let mut cmd = Command::new("timeout");
        cmd.args([
            "--kill-after=120",
            "600",
            env!("CARGO_BIN_EXE_tollgate"),
            "dev",
        ])
        .arg("--private-postgres")
        .arg("--postgres-dir")
        .arg(&case.search.dir)
        .args(["--postgres-port", &case.search.port.to_string()])
        .env_remove("DATABASE_URL")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log);
        // Only the config keys set below reach dev (an unknown TOLLGATE_* is fatal).
        for (key, _) in std::env::vars() {
            if key.starts_with("TOLLGATE_") {
                cmd.env_remove(key);
            }
        }
        let listen = |port: u16| format!("127.0.0.1:{port}");
        cmd.env("TOLLGATE_PROXY__EGRESS__LISTEN", listen(p.egress))
            .env("TOLLGATE_PROXY__INGRESS__LISTEN", listen(p.ingress))
            .env("TOLLGATE_PROXY__ADMIN__LISTEN", listen(p.admin))
            .env("TOLLGATE_MONITOR__ADMIN__LISTEN", listen(p.monitor_admin))
            .env(
                "TOLLGATE_PROXY__INGRESS__GATEWAY_PORT",
                p.gateway.to_string(),
            )
            .env("TOLLGATE_PROXY__METER__SPILL_DIR", case.dir.join("spill"))
            .env("TOLLGATE_LOG__FILTER", "info");
        let mut child = cmd.spawn().expect("starting tollgate dev under timeout(1)");
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Dev {
            child,
            lines,
            stdout: String::new(),
            log_path,
            status: None,
        }
    }

    /// Wait for the banner's last line; return what dev printed.
    fn wait_ready(&mut self) -> String {
        let deadline = Instant::now() + READY_WITHIN;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self
                .lines
                .recv_timeout(left.min(Duration::from_millis(500)))
            {
                Ok(line) => {
                    let done = line.contains("-- usage");
                    self.stdout.push_str(&line);
                    self.stdout.push('\n');
                    if done {
                        return self.stdout.clone();
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) if Instant::now() < deadline => {}
                Err(e) => panic!(
                    "dev did not print its ready lines within {READY_WITHIN:?} ({e}); \
                     status {:?}\nstdout:\n{}\nstderr:\n{}",
                    self.child.try_wait(),
                    self.stdout,
                    self.log()
                ),
            }
        }
    }

    /// Send `signal` to dev (timeout(1) passes it on).
    fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args(["-s", signal, &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill -s {signal}");
    }

    /// Kill dev outright (SIGKILL to timeout(1)'s process group), as a crash would.
    fn kill(&mut self) {
        let _ = Command::new("kill")
            .args(["-s", "KILL", "--", &format!("-{}", self.child.id())])
            .status();
        self.status = Some(self.child.wait().unwrap());
    }

    fn wait_exit(&mut self) -> ExitStatus {
        let deadline = Instant::now() + EXIT_WITHIN;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                self.status = Some(status);
                return status;
            }
            if Instant::now() > deadline {
                panic!(
                    "dev did not exit within {EXIT_WITHIN:?}\nstderr:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// What dev wrote to stderr so far.
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }
}

impl Drop for Dev {
    fn drop(&mut self) {
        if self.status.is_none() {
            self.kill();
        }
    }
}
