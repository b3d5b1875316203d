//! randport-itests: helpers for tests that need root or a cluster, and the scenario tests
//! on the simulator.
//!
//! Root tests run in network namespaces they create, named `rp-<run id>-<purpose>`, and
//! removed when the [`Netns`] guard drops, also when the test fails. They never touch the
//! root namespace's firewall. Without root they skip with a message, except under CI
//! (`CI=true`), where a skipped root test is a failure.

use std::process::{Command, Output};
use std::sync::OnceLock;

pub use randport_sim::netns::Netns;

/// This process's run id: 6 random hex digits, shared by every namespace it makes.
pub fn run_id() -> &'static str {
    static ID: OnceLock<String> = OnceLock::new();
    ID.get_or_init(|| format!("{:06x}", fastrand::u32(..0x100_0000)))
}

/// Whether this process runs as root.
pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Whether we run under CI, where root tests must run.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0")
}

/// True when the root-only test `test` can run. Otherwise prints why it is skipped and
/// returns false, or panics under CI, where skipping is not allowed.
pub fn root_or_skip(test: &str) -> bool {
    if is_root() {
        return true;
    }
    assert!(
        !in_ci(),
        "{test} needs root, and CI=true forbids skipping it: run the tests as root"
    );
    eprintln!("SKIPPED {test}: needs root (network namespaces, nftables); run `just test` as root");
    false
}

/// True when the root-only test `test` can run and every tool in `tools` is installed;
/// otherwise says why it is skipped and returns false (under CI: panics).
pub fn root_and_tools_or_skip(test: &str, tools: &[&str]) -> bool {
    if !root_or_skip(test) {
        return false;
    }
    for tool in tools {
        if !have(tool) {
            assert!(
                !in_ci(),
                "{test}: {tool} is not installed; `just test` installs it"
            );
            eprintln!("SKIPPED {test}: {tool} is not installed; `just test` installs it");
            return false;
        }
    }
    true
}

/// Panics listing every failed check, if any failed.
pub fn assert_checks(what: &str, checks: &[randport_sim::checks::Check]) {
    let failed: Vec<String> = checks
        .iter()
        .filter(|c| !c.ok())
        .map(ToString::to_string)
        .collect();
    assert!(
        failed.is_empty(),
        "{what}: {} of {} checks failed:\n{}",
        failed.len(),
        checks.len(),
        failed.join("\n")
    );
}

/// Whether `program` is on the PATH.
pub fn have(program: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// A fresh namespace `rp-<run id>-<purpose>-<n>`, unique within the process.
pub fn test_netns(purpose: &str) -> Netns {
    static COUNTER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    Netns::create(&format!("rp-{}-{purpose}-{n}", run_id())).expect("create a network namespace")
}

/// [`Netns`] operations that panic with the error, for tests.
pub trait TestNetns {
    /// `run_ok`, panicking on failure.
    fn sh(&self, program: &str, args: &[&str], stdin: &str) -> String;
    /// `run`, panicking when the program cannot start.
    fn out(&self, program: &str, args: &[&str], stdin: &str) -> Output;
    /// `enter`, panicking on failure.
    fn inside<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T;
    /// `ip`, panicking on failure.
    fn ipc(&self, args: &[&str]);
    /// A veth pair with an address (CIDR) on each end, both up.
    fn link_to(
        &self,
        local_if: &str,
        local_addr: &str,
        peer: &Netns,
        peer_if: &str,
        peer_addr: &str,
    );
}

impl TestNetns for Netns {
    fn sh(&self, program: &str, args: &[&str], stdin: &str) -> String {
        self.run_ok(program, args, stdin)
            .unwrap_or_else(|e| panic!("{e:#}\ninput:\n{stdin}"))
    }

    fn out(&self, program: &str, args: &[&str], stdin: &str) -> Output {
        self.run(program, args, stdin)
            .unwrap_or_else(|e| panic!("{e:#}"))
    }

    fn inside<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        self.enter(f).unwrap_or_else(|e| panic!("{e:#}"))
    }

    fn ipc(&self, args: &[&str]) {
        self.ip(args).unwrap_or_else(|e| panic!("{e:#}"));
    }

    fn link_to(
        &self,
        local_if: &str,
        local_addr: &str,
        peer: &Netns,
        peer_if: &str,
        peer_addr: &str,
    ) {
        let peer_path = peer.path();
        self.ipc(&[
            "link", "add", local_if, "type", "veth", "peer", "name", peer_if, "netns", &peer_path,
        ]);
        self.ipc(&["link", "set", local_if, "up"]);
        peer.ipc(&["link", "set", peer_if, "up"]);
        for (ns, dev, cidr) in [(self, local_if, local_addr), (peer, peer_if, peer_addr)] {
            let nodad = if cidr.contains(':') {
                &["nodad"][..]
            } else {
                &[]
            };
            ns.ipc(&[&["addr", "add", cidr, "dev", dev][..], nodad].concat());
        }
    }
}

/// Where the chart and docs tests find helm: `HELM`, else the copy `just test` fetches
/// into target/tools (ci/lib.sh ensure_helm). It may not exist; callers say what then.
pub fn helm_path() -> std::path::PathBuf {
    std::env::var_os("HELM")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../target/tools/helm-3.17.3/helm")
        })
}

/// The fenced code blocks of a markdown text, as (info string, body): how the tests find
/// the commands in docs/ (`sh test` blocks run in plugin/tests/docs.rs, `sh e2e` blocks on
/// a real cluster in tests/e2e.rs).
pub fn fenced_blocks(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut lines = text.lines();
    while let Some(line) = lines.next() {
        if let Some(info) = line.strip_prefix("```") {
            let body: Vec<&str> = lines
                .by_ref()
                .take_while(|l| !l.starts_with("```"))
                .collect();
            out.push((info.trim().to_owned(), body.join("\n")));
        }
    }
    out
}
