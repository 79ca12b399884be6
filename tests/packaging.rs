//! The Debian package from `deploy/debian/build-deb.sh`, installed for real:
//! files, conffile, the `tollgate` system user and its spill directory, the
//! installed units under `systemd-analyze`, the installed binary's
//! `check-config` and `migrate` (as the service user, against a fresh
//! database), then `dpkg --purge` leaving nothing behind.
//!
//! It installs a package on this machine, so it runs under CI (`CI=true`, as
//! root) and on a developer machine only as root with dpkg; otherwise it skips
//! with a note. The package is built from the test build's binary
//! (`CARGO_BIN_EXE_tollgate`, debug) to spare CI a release build; the script
//! packages `target/release/tollgate` by default. The services are not started.
//! One lock file keeps parallel test runs from installing at the same time.

mod support;

use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use uuid::Uuid;

const UNITS: [&str; 2] = ["tollgate-proxy.service", "tollgate-monitor.service"];
/// Every path the package puts on the system (directories last).
const INSTALLED: [&str; 10] = [
    "/usr/bin/tollgate",
    "/etc/tollgate/tollgate.toml",
    "/lib/systemd/system/tollgate-proxy.service",
    "/lib/systemd/system/tollgate-monitor.service",
    "/usr/share/doc/tollgate/copyright",
    "/usr/share/doc/tollgate/README.md",
    "/usr/share/doc/tollgate/operations.md",
    "/usr/share/doc/tollgate",
    "/etc/tollgate",
    "/var/lib/tollgate",
];

#[test]
fn debian_package_installs_runs_and_purges_cleanly() {
    if !may_install_packages() {
        return;
    }
    let _lock = InstallLock::take();
    if let Some(status) = package_status() {
        panic!(
            "a tollgate package is already on this machine ({status}); this test installs and \
             purges its own, so remove that one first: dpkg --purge tollgate"
        );
    }

    let work = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!(
        "packaging-{}",
        &Uuid::new_v4().simple().to_string()[..8]
    ));
    std::fs::create_dir_all(&work).unwrap();
    let built = ok(Command::new(repo("deploy/debian/build-deb.sh"))
        .args(["--binary", env!("CARGO_BIN_EXE_tollgate"), "--out"])
        .arg(&work));
    let deb = PathBuf::from(stdout(&built).lines().last().unwrap_or_default().trim());
    assert!(
        deb.is_file(),
        "build-deb.sh printed no .deb path:\n{}",
        text(&built)
    );
    let size = std::fs::metadata(&deb).unwrap().len();
    eprintln!("package {} ({} KiB)", deb.display(), size / 1024);

    let info = ok(Command::new("dpkg-deb").arg("--info").arg(&deb));
    for field in ["Package: tollgate", "Depends: libc6 (>= 2.", "adduser"] {
        assert!(stdout(&info).contains(field), "{field}:\n{}", stdout(&info));
    }
    let conffiles = ok(Command::new("dpkg-deb")
        .args(["--info"])
        .arg(&deb)
        .arg("conffiles"));
    assert_eq!(stdout(&conffiles).trim(), "/etc/tollgate/tollgate.toml");
    let contents = ok(Command::new("dpkg-deb").arg("--contents").arg(&deb));
    for line in stdout(&contents).lines() {
        assert!(line.contains(" root/root "), "not owned by root: {line}");
    }

    let _package = Installed;
    transcript(
        &format!("dpkg -i {}", deb.display()),
        &ok(Command::new("dpkg").arg("-i").arg(&deb)),
    );

    // Files: the binary, the config as shipped, the units rewritten for the package.
    let bin = std::fs::metadata("/usr/bin/tollgate").unwrap();
    assert_eq!(bin.permissions().mode() & 0o777, 0o755);
    let version = ok(Command::new("/usr/bin/tollgate").arg("--version"));
    assert!(
        stdout(&version).starts_with("tollgate "),
        "{}",
        text(&version)
    );
    assert_eq!(
        std::fs::read_to_string("/etc/tollgate/tollgate.toml").unwrap(),
        std::fs::read_to_string(repo("deploy/tollgate.example.toml")).unwrap(),
        "the installed config is the example config"
    );
    for unit in UNITS {
        let installed = std::fs::read_to_string(format!("/lib/systemd/system/{unit}")).unwrap();
        let source = std::fs::read_to_string(repo(&format!("deploy/systemd/{unit}"))).unwrap();
        assert!(
            installed
                .contains("\nExecStart=/usr/bin/tollgate --config /etc/tollgate/tollgate.toml "),
            "{unit}:\n{installed}"
        );
        assert!(
            installed.contains("\nUser=tollgate\nGroup=tollgate\n"),
            "{unit}:\n{installed}"
        );
        assert!(
            !installed.contains("DynamicUser") && !installed.contains("/usr/local/bin"),
            "{unit}:\n{installed}"
        );
        // Every hardening line of the source unit is kept.
        let body = source.split_once("[Unit]").unwrap().1;
        for line in body
            .lines()
            .filter(|l| !l.starts_with('#') && l.contains('='))
        {
            let line = line.replace("/usr/local/bin/", "/usr/bin/");
            assert!(
                line == "DynamicUser=yes" || installed.lines().any(|l| l == line),
                "{unit} lost `{line}`"
            );
        }
    }

    // The system user, and what it owns or may read.
    let passwd = ok(Command::new("getent").args(["passwd", "tollgate"]));
    let fields: Vec<String> = stdout(&passwd)
        .trim()
        .split(':')
        .map(str::to_owned)
        .collect();
    let uid: u32 = fields[2].parse().unwrap();
    let gid: u32 = fields[3].parse().unwrap();
    assert!(uid > 0 && uid < 1000, "a system user: {fields:?}");
    assert_eq!(fields[6], "/usr/sbin/nologin", "{fields:?}");
    let spill = std::fs::metadata("/var/lib/tollgate").unwrap();
    assert!(spill.is_dir());
    assert_eq!(
        (spill.uid(), spill.gid()),
        (uid, gid),
        "/var/lib/tollgate owner"
    );
    assert_eq!(spill.permissions().mode() & 0o777, 0o750);
    let config = std::fs::metadata("/etc/tollgate/tollgate.toml").unwrap();
    assert_eq!((config.uid(), config.gid()), (0, gid), "config owner");
    assert_eq!(config.permissions().mode() & 0o777, 0o640);

    // The installed units as systemd reads them.
    if let Some(analyze) =
        support::service::require_tool("systemd-analyze", "apt-get install systemd")
    {
        for unit in UNITS {
            let path = format!("/lib/systemd/system/{unit}");
            let verify = run(Command::new(&analyze).args(["verify", "--man=no", &path]));
            assert!(
                verify.status.success() && !stderr(&verify).contains(unit),
                "systemd-analyze verify {path}:\n{}",
                text(&verify)
            );
            let security = run(Command::new(&analyze).args([
                "security",
                "--offline=yes",
                "--threshold=20",
                &path,
            ]));
            assert!(
                security.status.success(),
                "systemd-analyze security {path}:\n{}",
                text(&security)
            );
            transcript(&format!("systemd-analyze verify {path}"), &verify);
        }
    }

    // The installed binary, as the service user: the config it ships with, then
    // migrations on a fresh database.
    let check = ok(&mut as_tollgate(&["check-config"]));
    assert!(
        stdout(&check).contains("spill_dir = \"/var/lib/tollgate\""),
        "{}",
        text(&check)
    );
    transcript("tollgate check-config (as tollgate)", &check);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let db = runtime.block_on(support::TestDb::empty());
    let migrate = ok(as_tollgate(&["migrate"]).env("DATABASE_URL", &db.url));
    let latest = tollgate_core::db::MIGRATOR
        .iter()
        .map(|m| m.version)
        .max()
        .unwrap();
    assert!(
        stdout(&migrate).contains(&format!("database is at migration {latest:03}")),
        "{}",
        text(&migrate)
    );
    transcript(
        "DATABASE_URL=<fresh test database> tollgate migrate (as tollgate)",
        &migrate,
    );
    let applied: i64 = runtime
        .block_on(
            sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations WHERE success")
                .fetch_one(&db.pool),
        )
        .unwrap();
    assert_eq!(
        applied,
        i64::try_from(tollgate_core::db::MIGRATOR.iter().count()).unwrap()
    );

    // Purge: nothing of the package, its user or its state is left.
    let purge = ok(Command::new("dpkg").args(["--purge", "tollgate"]));
    transcript("dpkg --purge tollgate", &purge);
    for path in INSTALLED {
        assert!(
            !Path::new(path).exists(),
            "{path} is left after dpkg --purge"
        );
    }
    assert!(!Path::new("/var/lib/private/tollgate").exists());
    for database in ["passwd", "group"] {
        let entry = run(Command::new("getent").args([database, "tollgate"]));
        assert!(
            !entry.status.success(),
            "{database} entry left: {}",
            stdout(&entry)
        );
    }
    assert_eq!(package_status(), None, "dpkg still knows the package");
    let _ = std::fs::remove_dir_all(&work);
}

/// Whether this test may install a package here: under CI it must (root and
/// dpkg are required); elsewhere only as root with dpkg, else it skips.
fn may_install_packages() -> bool {
    let root = std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().next().map(|uid| uid == "0"))
        .unwrap_or(false);
    let dpkg = ["dpkg", "dpkg-deb", "dpkg-query"]
        .iter()
        .all(|tool| support::service::find_tool(tool).is_some());
    if root && dpkg {
        return true;
    }
    let why =
        format!("installing a Debian package needs root (root: {root}) and dpkg (found: {dpkg})");
    if std::env::var_os("CI").is_some() {
        panic!("{why}; both are required under CI");
    }
    eprintln!("SKIPPED: {why}");
    false
}

/// dpkg's status of the tollgate package unless it is unknown or purged
/// (`install ok installed`, `deinstall ok config-files`, ...).
fn package_status() -> Option<String> {
    let out = run(Command::new("dpkg-query").args(["-W", "-f=${Status}", "tollgate"]));
    let status = stdout(&out).trim().to_owned();
    (out.status.success() && !status.is_empty() && !status.ends_with("not-installed"))
        .then_some(status)
}

/// Purges the package when dropped, so a failing test leaves nothing installed.
struct Installed;

impl Drop for Installed {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let out = run(Command::new("dpkg").args(["--purge", "tollgate"]));
            eprintln!("cleanup: dpkg --purge tollgate: {}", text(&out));
        }
    }
}

/// One installer at a time across test processes: a lock file holding the
/// owner's PID, taken over when that process is gone.
struct InstallLock(PathBuf);

impl InstallLock {
    fn take() -> InstallLock {
        let path = PathBuf::from("/run/lock/tollgate-packaging-test.lock");
        let deadline = Instant::now() + Duration::from_secs(600);
        loop {
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
            {
                Ok(mut file) => {
                    write!(file, "{}", std::process::id()).unwrap();
                    return InstallLock(path);
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    let owner = std::fs::read_to_string(&path).unwrap_or_default();
                    let alive = owner
                        .trim()
                        .parse::<u32>()
                        .is_ok_and(|pid| Path::new(&format!("/proc/{pid}")).exists());
                    if !alive && !owner.is_empty() {
                        let _ = std::fs::remove_file(&path);
                        continue;
                    }
                    assert!(
                        Instant::now() < deadline,
                        "{} is held by PID {owner} for 10 minutes; remove it if that is not a test run",
                        path.display()
                    );
                    std::thread::sleep(Duration::from_millis(200));
                }
                Err(e) => panic!("creating {}: {e}", path.display()),
            }
        }
    }
}

impl Drop for InstallLock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The installed binary with the installed config, run as the `tollgate` user.
fn as_tollgate(args: &[&str]) -> Command {
    let mut cmd = Command::new("runuser");
    cmd.args([
        "-u",
        "tollgate",
        "--",
        "/usr/bin/tollgate",
        "--config",
        "/etc/tollgate/tollgate.toml",
    ])
    .args(args)
    .current_dir("/");
    for (key, _) in std::env::vars() {
        if key.starts_with("TOLLGATE_") || key == "DATABASE_URL" {
            cmd.env_remove(key);
        }
    }
    cmd
}

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// Run to completion within five minutes (a build of the package strips and
/// compresses a debug binary); the output, whatever the status.
fn run(cmd: &mut Command) -> Output {
    support::deploy::run(cmd, Duration::from_secs(300))
}

/// Run and require success.
fn ok(cmd: &mut Command) -> Output {
    let shown = format!("{cmd:?}");
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{shown}: {}\n{}",
        out.status,
        text(&out)
    );
    out
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn text(out: &Output) -> String {
    format!("stdout:\n{}stderr:\n{}", stdout(out), stderr(out))
}

/// Shown with `--nocapture`: what each step printed.
fn transcript(step: &str, out: &Output) {
    eprintln!("$ {step}\n{}{}", stdout(out), stderr(out));
}
