//! Removing what a run left behind: its agents, its `rp-<run id>-` namespaces, its files.
//!
//! A run is found from any trace it left, so that one whose record (its directory under
//! [`RUNS_DIR`]) is gone is still found: the directory, a namespace of the simulator's shape
//! (`rp-<run>-underlay`, `-client`, `-node-N`, `-node-N-pM`), or a `randportd` whose
//! command line names a file of the run. Agents are ended only when they are `randportd`
//! and belong to the run (by the pids the run recorded, or by their command line).

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

/// A process's command line, split at NULs.
fn cmdline(pid: u32) -> Vec<String> {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|cmd| {
            cmd.split(|b| *b == 0)
                .filter(|a| !a.is_empty())
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Whether a command line is randportd's.
fn is_randportd(args: &[String]) -> bool {
    args.first()
        .is_some_and(|argv0| argv0.ends_with("randportd"))
}

/// The run id a `randportd` command line belongs to: the run directory it names.
fn run_of_agent(args: &[String]) -> Option<String> {
    let prefix = format!("{RUNS_DIR}/");
    args.iter().find_map(|a| {
        let rest = a.split_once(&prefix)?.1;
        let run = rest.split('/').next()?;
        is_run_id(run).then(|| run.to_owned())
    })
}

fn is_run_id(s: &str) -> bool {
    s.len() == 6 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The run id of a namespace the simulator makes, by its shape; None for anything else
/// (the itests' `rp-<id>-<purpose>` namespaces and the local cluster's are not ours).
pub fn run_of_netns(name: &str) -> Option<&str> {
    let rest = name.strip_prefix("rp-")?;
    let (run, what) = rest.split_once('-')?;
    if !is_run_id(run) {
        return None;
    }
    let numeric = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    let ours = match what {
        "underlay" | "client" => true,
        _ => what
            .strip_prefix("node-")
            .is_some_and(|node| match node.split_once("-p") {
                Some((n, p)) => numeric(n) && numeric(p),
                None => numeric(node),
            }),
    };
    ours.then_some(run)
}

/// Every running process: (pid, command line).
fn processes() -> Vec<(u32, Vec<String>)> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return vec![];
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .map(|pid| (pid, cmdline(pid)))
        .filter(|(_, args)| !args.is_empty())
        .collect()
}

fn kill(pid: u32) -> bool {
    let pid = nix::unistd::Pid::from_raw(pid as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL).is_ok()
}

/// Cleans up run `run_id`.
pub fn run(run_id: &str, removed: &mut Removed) {
    let dir = Path::new(RUNS_DIR).join(run_id);
    let mut pids: Vec<u32> = std::fs::read_to_string(dir.join("pids"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .filter(|pid| is_randportd(&cmdline(*pid)))
        .collect();
    for (pid, args) in processes() {
        if is_randportd(&args) && run_of_agent(&args).as_deref() == Some(run_id) {
            pids.push(pid);
        }
    }
    pids.sort_unstable();
    pids.dedup();
    for pid in pids {
        if kill(pid) {
            removed.agents += 1;
        }
    }
    for name in netns::list_with_prefix(&format!("rp-{run_id}-")) {
        if netns::delete_named(&name).is_ok() {
            removed.namespaces += 1;
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    removed.runs.push(run_id.to_owned());
}

/// The runs that left anything behind: files in [`RUNS_DIR`], namespaces of the
/// simulator's shape, or agents that name a run's files.
pub fn leftover_runs() -> Vec<String> {
    let mut runs: Vec<String> = std::fs::read_dir(RUNS_DIR)
        .map(|entries| {
            entries
                .flatten()
                .filter_map(|e| e.file_name().to_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    runs.extend(
        netns::list_with_prefix("rp-")
            .iter()
            .filter_map(|n| run_of_netns(n).map(str::to_owned)),
    );
    runs.extend(
        processes()
            .into_iter()
            .filter(|(_, args)| is_randportd(args))
            .filter_map(|(_, args)| run_of_agent(&args)),
    );
    runs.sort();
    runs.dedup();
    runs
}

/// Cleans up every run that left anything behind ([`leftover_runs`]).
pub fn all() -> Removed {
    let mut removed = Removed::default();
    for run_id in leftover_runs() {
        run(&run_id, &mut removed);
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespaces_of_the_simulator_are_told_from_others() {
        for (name, run) in [
            ("rp-8c7373-underlay", Some("8c7373")),
            ("rp-8c7373-client", Some("8c7373")),
            ("rp-8c7373-node-12", Some("8c7373")),
            ("rp-8c7373-node-3-p250", Some("8c7373")),
            // The itests' and the local cluster's namespaces are not the simulator's.
            ("rp-8c7373-install", None),
            ("rp-8c7373-node-x", None),
            ("rp-1a3e4f46-node", None),
            ("rp-8c7373-node-3-p", None),
            ("other", None),
        ] {
            assert_eq!(run_of_netns(name), run, "{name}");
        }
    }

    #[test]
    fn an_agent_belongs_to_the_run_whose_files_it_names() {
        let args = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            run_of_agent(&args(&[
                "/x/randportd",
                "--socket",
                "/tmp/randport-sim/8c7373/node-0/agent.sock"
            ])),
            Some("8c7373".into())
        );
        assert_eq!(
            run_of_agent(&args(&[
                "/x/randportd",
                "--socket",
                "/run/randport/randportd.sock"
            ])),
            None
        );
    }
}
