//! Removing what a run left behind: its agents (by the pids it recorded, and only if
//! they still are randportd), its `rp-<run id>-` namespaces, its files.

use std::path::Path;

use crate::cluster::RUNS_DIR;
use crate::netns;

/// What was removed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Removed {
    /// Runs cleaned up.
    pub runs: Vec<String>,
    /// Agent processes ended.
    pub agents: usize,
    /// Namespaces deleted.
    pub namespaces: usize,
}

/// Whether `pid` is a randportd process.
fn is_randportd(pid: u32) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|cmd| {
        cmd.split(|b| *b == 0)
            .next()
            .is_some_and(|argv0| argv0.ends_with(b"randportd"))
    })
}

/// Cleans up run `run_id`.
pub fn run(run_id: &str, removed: &mut Removed) {
    let dir = Path::new(RUNS_DIR).join(run_id);
    if let Ok(pids) = std::fs::read_to_string(dir.join("pids")) {
        for pid in pids.lines().filter_map(|l| l.trim().parse::<u32>().ok()) {
            if is_randportd(pid) {
                let pid = nix::unistd::Pid::from_raw(pid as i32);
                if nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL).is_ok() {
                    removed.agents += 1;
                }
            }
        }
    }
    for name in netns::list_with_prefix(&format!("rp-{run_id}-")) {
        let status = std::process::Command::new("ip")
            .args(["netns", "delete", &name])
            .stderr(std::process::Stdio::null())
            .status();
        if status.is_ok_and(|s| s.success()) {
            removed.namespaces += 1;
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    removed.runs.push(run_id.to_owned());
}

/// Cleans up every run that left files in [`RUNS_DIR`].
pub fn all() -> Removed {
    let mut removed = Removed::default();
    let Ok(entries) = std::fs::read_dir(RUNS_DIR) else {
        return removed;
    };
    for entry in entries.flatten() {
        if let Some(run_id) = entry.file_name().to_str() {
            run(run_id, &mut removed);
        }
    }
    removed
}
