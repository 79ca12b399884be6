//! `--profile`: a `perf record` (call graphs from DWARF, the bench profile keeps
//! debug info) of the Tollgate process for the duration of one load run, saved
//! under `target/load-profiles/<label>.data`.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::Context;

use crate::Args;

pub struct Recording {
    child: Child,
    path: PathBuf,
}

impl Recording {
    pub fn start(args: &Args, pid: u32, label: &str) -> anyhow::Result<Recording> {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .parent()
            .context("CARGO_TARGET_TMPDIR is inside target/")?
            .join("load-profiles");
        std::fs::create_dir_all(&dir)?;
        let path = dir.join(format!("{label}.data"));
        let child = Command::new("taskset")
            .arg("-c")
            .arg(args.load_cpu.to_string())
            .args(["perf", "record", "-e", "cpu-clock", "-F", "999"])
            .args(["--call-graph", "dwarf,16384", "-p", &pid.to_string(), "-o"])
            .arg(&path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting perf record")?;
        // perf needs a moment to attach before the load starts.
        std::thread::sleep(Duration::from_millis(300));
        Ok(Recording { child, path })
    }
}

impl Drop for Recording {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
        eprintln!(
            "   profile: perf report -i {} --no-children",
            self.path.display()
        );
    }
}
