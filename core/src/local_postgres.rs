//! Finding or starting a PostgreSQL server on this machine, for `tollgate dev` and
//! the test suite (SPEC §9). In order:
//!
//! 1. `DATABASE_URL`, when set;
//! 2. a server on `127.0.0.1:5432` as user `postgres` (trust auth), unless the
//!    caller asks for the private server only ([`Search::try_local`]);
//! 3. a private server started from the installed server binaries. Its folder
//!    ([`Search::dir`], by default `tollgate-postgres` under the build's `target/`)
//!    holds the cluster in `data/`, the log `postgres.log` and the socket; it listens
//!    on `127.0.0.1:54329` ([`Search::port`]). When running as root it runs as the
//!    `postgres` OS user, since PostgreSQL refuses to run as root.
//!
//! Tests leave the private server running for the next test process; `tollgate
//! dev` stops it on exit if it started it. A `postmaster.pid` left behind by a
//! server that is gone (a killed process, a restarted container whose PIDs were
//! reused) is removed before starting; a server of that folder that runs but does
//! not answer on the expected port is stopped and started again.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::str::FromStr;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions, Connection};

/// Default port of the private server.
pub const PRIVATE_PORT: u16 = 54329;

/// Folder of the private server below the build's `target/` directory.
pub const PRIVATE_DIR: &str = "tollgate-postgres";

/// Where to look for a server, and where to start the private one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Search {
    /// Try a server on `127.0.0.1:5432` before the private one.
    pub try_local: bool,
    /// Folder of the private server: the cluster in `data/`, its log and socket.
    pub dir: PathBuf,
    /// Port of the private server on 127.0.0.1.
    pub port: u16,
}

impl Search {
    /// The default search: the local server, else the private server in
    /// `target_dir/tollgate-postgres` on port 54329.
    pub fn under(target_dir: &Path) -> Search {
        Search {
            try_local: true,
            dir: target_dir.join(PRIVATE_DIR),
            port: PRIVATE_PORT,
        }
    }

    /// The private server's cluster (data directory), `dir/data`.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// Stop the private server of this folder if one runs, whoever started it.
    /// Returns whether there was one to stop.
    pub fn stop_private(&self) -> anyhow::Result<bool> {
        let Some(pid) = running_postmaster(&self.data_dir()) else {
            return Ok(false);
        };
        let bin = find_bin_dir().with_context(|| {
            format!(
                "a private PostgreSQL (PID {pid}) runs in {} but no server binaries (pg_ctl) are installed to stop it",
                self.data_dir().display()
            )
        })?;
        stop_cluster(&bin, &self.data_dir())?;
        Ok(true)
    }
}

/// Where the server came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// `DATABASE_URL` was set.
    DatabaseUrl,
    /// A server already listening on 127.0.0.1:5432.
    Local,
    /// The private server: `dir` holds its cluster (`dir/data`), log and socket.
    /// `started_here` if this process started it.
    Private {
        dir: PathBuf,
        port: u16,
        started_here: bool,
    },
}

/// A reachable server.
#[derive(Debug, Clone)]
pub struct Server {
    /// Options for the URL to use as-is (`DATABASE_URL`) or for the `postgres`
    /// maintenance database of a local server.
    pub options: PgConnectOptions,
    /// The URL behind `options` (for printing and for child processes).
    pub url: String,
    pub origin: Origin,
    bin_dir: Option<PathBuf>,
}

impl Server {
    /// URL of database `name` on this server (not for `DatabaseUrl`, whose database is fixed).
    pub fn database_url(&self, name: &str) -> String {
        match self.origin {
            Origin::DatabaseUrl => self.url.clone(),
            Origin::Local => format!("postgres://postgres@127.0.0.1:5432/{name}"),
            Origin::Private { port, .. } => {
                format!("postgres://postgres@127.0.0.1:{port}/{name}")
            }
        }
    }

    /// Stop the private server if this process started it (`pg_ctl stop -m fast`
    /// on its cluster, waiting until it is gone). Returns whether it stopped one.
    pub fn stop_if_started_here(&self) -> anyhow::Result<bool> {
        match (&self.origin, &self.bin_dir) {
            (
                Origin::Private {
                    dir,
                    started_here: true,
                    ..
                },
                Some(bin),
            ) => {
                let data_dir = dir.join("data");
                if running_postmaster(&data_dir).is_none() {
                    return Ok(false);
                }
                stop_cluster(bin, &data_dir)?;
                Ok(true)
            }
            _ => Ok(false),
        }
    }
}

/// Find a server as described in the module docs, starting a private one under
/// `target_dir` if nothing else is there.
pub async fn find_or_start(target_dir: &Path) -> anyhow::Result<Server> {
    find_or_start_with(&Search::under(target_dir)).await
}

/// Find a server as `search` says, starting the private one if nothing else is
/// there. If it starts the server but then cannot use it, it stops it again.
pub async fn find_or_start_with(search: &Search) -> anyhow::Result<Server> {
    if let Ok(url) = std::env::var("DATABASE_URL") {
        let options =
            PgConnectOptions::from_str(&url).context("DATABASE_URL is not a PostgreSQL URL")?;
        return Ok(Server {
            options,
            url,
            origin: Origin::DatabaseUrl,
            bin_dir: None,
        });
    }
    let local = "postgres://postgres@127.0.0.1:5432/postgres";
    if search.try_local && reachable(local).await {
        return Ok(Server {
            options: PgConnectOptions::from_str(local)?,
            url: local.into(),
            origin: Origin::Local,
            bin_dir: None,
        });
    }
    // The server runs with `/` as its working directory: give it absolute paths.
    let search = Search {
        dir: std::path::absolute(&search.dir)
            .with_context(|| format!("resolving {}", search.dir.display()))?,
        ..search.clone()
    };
    let private = search.url();
    let bin_dir = find_bin_dir().context(
        "no PostgreSQL reachable (DATABASE_URL unset, nothing on 127.0.0.1:5432) and no server \
         binaries found to start one: install the `postgresql` package or set DATABASE_URL",
    )?;
    let started_here = if reachable(&private).await || make_way(&bin_dir, &search).await? {
        false
    } else {
        let (search, bin) = (search.clone(), bin_dir.clone());
        let started = tokio::task::spawn_blocking(move || start_private(&bin, &search))
            .await
            .context("private PostgreSQL start task")?;
        match started {
            Ok(()) => true,
            // Another process started it meanwhile (test processes start in parallel).
            Err(_) if reachable(&private).await => false,
            Err(e) => return Err(e),
        }
    };
    let server = Server {
        options: PgConnectOptions::from_str(&private)?,
        url: private.clone(),
        origin: Origin::Private {
            dir: search.dir.clone(),
            port: search.port,
            started_here,
        },
        bin_dir: Some(bin_dir),
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if reachable(&private).await {
            return Ok(server);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if let Err(e) = server.stop_if_started_here() {
        tracing::warn!(error = %format!("{e:#}"), "could not stop the private PostgreSQL it started");
    }
    bail!(
        "started a private PostgreSQL in {} but cannot connect to it on 127.0.0.1:{}; see {}",
        search.data_dir().display(),
        search.port,
        search.dir.join("postgres.log").display()
    )
}

async fn reachable(url: &str) -> bool {
    let Ok(options) = PgConnectOptions::from_str(url) else {
        return false;
    };
    let attempt = async { options.connect().await?.close().await };
    matches!(
        tokio::time::timeout(Duration::from_secs(3), attempt).await,
        Ok(Ok(()))
    )
}

/// Folder of the newest installed PostgreSQL server binaries (`initdb`, `pg_ctl`).
pub fn find_bin_dir() -> Option<PathBuf> {
    let has_server = |dir: &Path| dir.join("initdb").is_file() && dir.join("pg_ctl").is_file();
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if out.status.success() && has_server(&dir) {
            return Some(dir);
        }
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| Some((e.file_name().to_str()?.parse().ok()?, e.path().join("bin"))))
        .filter(|(_, dir)| has_server(dir))
        .collect();
    versions.sort();
    versions.pop().map(|(_, dir)| dir)
}

/// Clear the way for starting the private server: a `postmaster.pid` whose
/// process is gone is removed; a server of this folder that runs but does not
/// answer on `search.port` gets a while to finish starting, then is stopped.
/// Returns whether the server answered meanwhile (nothing to start).
async fn make_way(bin: &Path, search: &Search) -> anyhow::Result<bool> {
    let data_dir = search.data_dir();
    let pid_file = data_dir.join("postmaster.pid");
    let Ok(contents) = std::fs::read_to_string(&pid_file) else {
        return Ok(false);
    };
    let Some(pid) = running_postmaster(&data_dir) else {
        std::fs::remove_file(&pid_file).with_context(|| {
            format!(
                "removing {}, left by a PostgreSQL that is no longer running",
                pid_file.display()
            )
        })?;
        tracing::info!(file = %pid_file.display(), "removed a stale postmaster.pid");
        return Ok(false);
    };
    // postmaster.pid: PID, data dir, start time, port, socket dir, address, shm key, status.
    let port: Option<u16> = contents.lines().nth(3).and_then(|l| l.trim().parse().ok());
    if port == Some(search.port) {
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if reachable(&search.url()).await {
                return Ok(true);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    tracing::info!(pid, ?port, data_dir = %data_dir.display(), "restarting a private PostgreSQL that does not answer on port {}", search.port);
    let (bin, data_dir) = (bin.to_path_buf(), data_dir.clone());
    tokio::task::spawn_blocking(move || stop_cluster(&bin, &data_dir))
        .await
        .context("private PostgreSQL stop task")??;
    Ok(false)
}

/// PID of the postmaster running on cluster `data_dir`, from its `postmaster.pid`,
/// if that process exists and works in `data_dir` (a postmaster's working
/// directory is its cluster; a reused PID has another one).
fn running_postmaster(data_dir: &Path) -> Option<u32> {
    let contents = std::fs::read_to_string(data_dir.join("postmaster.pid")).ok()?;
    let pid: u32 = contents.lines().next()?.trim().parse().ok()?;
    let proc_dir = PathBuf::from(format!("/proc/{pid}"));
    let cwd = std::fs::read_link(proc_dir.join("cwd"));
    let ours = match cwd {
        Ok(cwd) => std::fs::canonicalize(data_dir).is_ok_and(|d| d == cwd),
        // Someone else's process we may not inspect: a postgres is taken at its word.
        Err(_) => std::fs::read(proc_dir.join("cmdline"))
            .is_ok_and(|c| String::from_utf8_lossy(&c).contains("postgres")),
    };
    ours.then_some(pid)
}

/// `pg_ctl stop -m fast` on cluster `data_dir`, waiting up to a minute until the
/// server is gone.
fn stop_cluster(bin: &Path, data_dir: &Path) -> anyhow::Result<()> {
    let output = as_postgres_user(Command::new(bin.join("pg_ctl")))
        .arg("-D")
        .arg(data_dir)
        .args(["stop", "-m", "fast", "-w", "-t", "60"])
        .output()
        .context("running pg_ctl stop")?;
    if !output.status.success() && running_postmaster(data_dir).is_some() {
        bail!(
            "pg_ctl stop failed ({}) for the PostgreSQL cluster {}: {}; stop it with `pg_ctl -D {} stop -m immediate` as the postgres user",
            output.status,
            data_dir.display(),
            String::from_utf8_lossy(&output.stderr).trim(),
            data_dir.display()
        );
    }
    tracing::info!(data_dir = %data_dir.display(), "stopped the private PostgreSQL");
    Ok(())
}

fn start_private(bin: &Path, search: &Search) -> anyhow::Result<()> {
    let dir = &search.dir;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let owner = postgres_os_user();
    if let Some((uid, gid)) = owner {
        std::os::unix::fs::chown(dir, Some(uid), Some(gid))
            .with_context(|| format!("handing {} to the postgres user", dir.display()))?;
    }
    let pgdata = search.data_dir();
    if !pgdata.join("PG_VERSION").exists() {
        let output = as_postgres_user(Command::new(bin.join("initdb")))
            .args([
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
                "-D",
            ])
            .arg(&pgdata)
            .output()
            .context("running initdb")?;
        if !output.status.success() {
            bail!(
                "initdb failed ({}) for {}: {}",
                output.status,
                pgdata.display(),
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
    }
    let options = format!(
        "-p {} -c listen_addresses=127.0.0.1 -k {} -c max_connections=400 -c fsync=off",
        search.port,
        dir.display()
    );
    let log = dir.join("postgres.log");
    let output = as_postgres_user(Command::new(bin.join("pg_ctl")))
        .arg("-D")
        .arg(&pgdata)
        .args(["-o", &options, "-l"])
        .arg(&log)
        .args(["-w", "-t", "60", "start"])
        .output()
        .context("running pg_ctl start")?;
    if !output.status.success() {
        bail!(
            "pg_ctl start failed ({}): {}; see {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim(),
            log.display()
        );
    }
    tracing::info!(data_dir = %pgdata.display(), port = search.port, "started a private PostgreSQL");
    Ok(())
}

/// uid/gid of the `postgres` OS user when running as root, from /etc/passwd.
fn postgres_os_user() -> Option<(u32, u32)> {
    let uid_line = std::fs::read_to_string("/proc/self/status").ok()?;
    let running_as_root = uid_line
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().next())
        == Some("0");
    if !running_as_root {
        return None;
    }
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        (fields.first() == Some(&"postgres") && fields.len() > 3)
            .then(|| Some((fields[2].parse().ok()?, fields[3].parse().ok()?)))
            .flatten()
    })
}

fn as_postgres_user(mut cmd: Command) -> Command {
    use std::os::unix::process::CommandExt;
    if let Some((uid, gid)) = postgres_os_user() {
        cmd.uid(uid).gid(gid).current_dir("/");
    }
    cmd
}

/// Create database `name` on `server` if it does not exist. Concurrent callers
/// racing on the same name are fine.
pub async fn ensure_database(server: &Server, name: &str) -> anyhow::Result<()> {
    if server.origin == Origin::DatabaseUrl {
        return Ok(());
    }
    let mut conn = server
        .options
        .connect()
        .await
        .context("connecting to the maintenance database")?;
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
            .bind(name)
            .fetch_one(&mut conn)
            .await?;
    if !exists {
        let create = format!("CREATE DATABASE \"{}\"", name.replace('"', "\"\""));
        if let Err(e) = sqlx::query(&create).execute(&mut conn).await {
            // 42P04 duplicate_database: someone else created it meanwhile.
            let duplicate =
                matches!(&e, sqlx::Error::Database(d) if d.code().as_deref() == Some("42P04"));
            if !duplicate {
                return Err(e).context(format!("creating database {name}"));
            }
        }
    }
    conn.close().await?;
    Ok(())
}
