//! Finding or starting a PostgreSQL server on this machine, for `tollgate dev` and
//! the test suite (SPEC §9). In order:
//!
//! 1. `DATABASE_URL`, when set;
//! 2. a server on `127.0.0.1:5432` as user `postgres` (trust auth);
//! 3. a private server started from the installed server binaries, with its data
//!    directory under the build's `target/` and its socket inside it, listening on
//!    `127.0.0.1:54329`. When running as root it runs as the `postgres` OS user,
//!    since PostgreSQL refuses to run as root. Tests leave it running for the next
//!    test process; `tollgate dev` stops it on exit if it started it.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::str::FromStr;
use std::time::Duration;

use anyhow::{bail, Context};
use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions, Connection};

/// Port of the private server.
pub const PRIVATE_PORT: u16 = 54329;

/// Where the server came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// `DATABASE_URL` was set.
    DatabaseUrl,
    /// A server already listening on 127.0.0.1:5432.
    Local,
    /// A private server under `target/`; `started_here` if this process started it.
    Private {
        data_dir: PathBuf,
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
            Origin::Private { .. } => {
                format!("postgres://postgres@127.0.0.1:{PRIVATE_PORT}/{name}")
            }
        }
    }

    /// Stop the private server if this process started it.
    pub fn stop_if_started_here(&self) -> anyhow::Result<()> {
        if let (
            Origin::Private {
                data_dir,
                started_here: true,
            },
            Some(bin),
        ) = (&self.origin, &self.bin_dir)
        {
            let status = as_postgres_user(Command::new(bin.join("pg_ctl")))
                .args(["-D"])
                .arg(data_dir)
                .args(["stop", "-m", "fast", "-w"])
                .status()
                .context("running pg_ctl stop")?;
            if !status.success() {
                bail!("pg_ctl stop failed ({status}) for {}", data_dir.display());
            }
        }
        Ok(())
    }
}

/// Find a server as described in the module docs, starting a private one under
/// `target_dir` if nothing else is there.
pub async fn find_or_start(target_dir: &Path) -> anyhow::Result<Server> {
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
    if reachable(local).await {
        return Ok(Server {
            options: PgConnectOptions::from_str(local)?,
            url: local.into(),
            origin: Origin::Local,
            bin_dir: None,
        });
    }
    let private = format!("postgres://postgres@127.0.0.1:{PRIVATE_PORT}/postgres");
    let data_dir = target_dir.join("tollgate-postgres");
    let bin_dir = find_bin_dir().context(
        "no PostgreSQL reachable (DATABASE_URL unset, nothing on 127.0.0.1:5432) and no server \
         binaries found to start one: install the `postgresql` package or set DATABASE_URL",
    )?;
    let started_here = if reachable(&private).await {
        false
    } else {
        let (dir, bin) = (data_dir.clone(), bin_dir.clone());
        tokio::task::spawn_blocking(move || start_private(&bin, &dir))
            .await
            .context("private PostgreSQL start task")??;
        true
    };
    for _ in 0..100 {
        if reachable(&private).await {
            return Ok(Server {
                options: PgConnectOptions::from_str(&private)?,
                url: private,
                origin: Origin::Private {
                    data_dir,
                    started_here,
                },
                bin_dir: Some(bin_dir),
            });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!(
        "started a private PostgreSQL in {} but cannot connect to it on 127.0.0.1:{PRIVATE_PORT}; see its log there",
        data_dir.display()
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

/// The newest installed PostgreSQL server binaries.
fn find_bin_dir() -> Option<PathBuf> {
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

fn start_private(bin: &Path, data_dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(data_dir)
        .with_context(|| format!("creating {}", data_dir.display()))?;
    let owner = postgres_os_user();
    if let Some((uid, gid)) = owner {
        std::os::unix::fs::chown(data_dir, Some(uid), Some(gid))
            .with_context(|| format!("handing {} to the postgres user", data_dir.display()))?;
    }
    let pgdata = data_dir.join("data");
    if !pgdata.join("PG_VERSION").exists() {
        let status = as_postgres_user(Command::new(bin.join("initdb")))
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
            .status()
            .context("running initdb")?;
        if !status.success() {
            bail!("initdb failed ({status}) for {}", pgdata.display());
        }
    }
    let options = format!(
        "-p {PRIVATE_PORT} -c listen_addresses=127.0.0.1 -k {} -c max_connections=400 -c fsync=off",
        data_dir.display()
    );
    let status = as_postgres_user(Command::new(bin.join("pg_ctl")))
        .arg("-D")
        .arg(&pgdata)
        .args(["-o", &options, "-l"])
        .arg(data_dir.join("postgres.log"))
        .args(["-w", "start"])
        .status()
        .context("running pg_ctl start")?;
    if !status.success() {
        bail!(
            "pg_ctl start failed ({status}); see {}",
            data_dir.join("postgres.log").display()
        );
    }
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
