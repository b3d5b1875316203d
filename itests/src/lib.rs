//! randport-itests: helpers for tests that need root or a cluster.
//!
//! Root tests run in network namespaces they create, named `rp-<run id>-<purpose>`, and
//! removed when the [`Netns`] guard drops, also when the test fails. They never touch the
//! root namespace's firewall. Without root they skip with a message, except under CI
//! (`CI=true`), where a skipped root test is a failure.

use std::io::Write as _;
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;

/// This process's run id: 6 random hex digits, shared by every namespace it makes.
pub fn run_id() -> &'static str {
    static ID: OnceLock<String> = OnceLock::new();
    ID.get_or_init(|| format!("{:06x}", fastrand::u32(..0x100_0000)))
}

/// Whether this process runs as root.
pub fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.trim_ascii() == b"0")
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

/// Whether `program` is on the PATH.
pub fn have(program: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// A network namespace this test made; deleted on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates `rp-<run id>-<purpose>-<n>`, unique within the process.
    pub fn create(purpose: &str) -> Netns {
        static COUNTER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = format!("rp-{}-{purpose}-{n}", run_id());
        let out = Command::new("ip")
            .args(["netns", "add", &name])
            .output()
            .expect("run ip netns add");
        assert!(
            out.status.success(),
            "ip netns add {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Netns { name }
    }

    /// The namespace's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs `program args…` inside the namespace with `stdin` as its input.
    pub fn run(&self, program: &str, args: &[&str], stdin: &str) -> Output {
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.name, program])
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("start {program} in {}: {e}", self.name));
        if let Some(mut input) = child.stdin.take() {
            input.write_all(stdin.as_bytes()).expect("write stdin");
        }
        child.wait_with_output().expect("wait for child")
    }

    /// Like [`Netns::run`], and panics with the command's stderr and input if it fails.
    pub fn run_ok(&self, program: &str, args: &[&str], stdin: &str) -> String {
        let out = self.run(program, args, stdin);
        assert!(
            out.status.success(),
            "{program} {} in {} failed: {}\ninput:\n{stdin}",
            args.join(" "),
            self.name,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Netns {
    /// Runs `f` on a new thread that has entered this namespace, and returns its
    /// result. Sockets made there stay in the namespace after the thread ends.
    pub fn enter<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = format!("/run/netns/{}", self.name);
        std::thread::spawn(move || {
            let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
            nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
                .unwrap_or_else(|e| panic!("setns {path}: {e}"));
            f()
        })
        .join()
        .expect("namespace thread panicked")
    }

    /// Runs `ip args…` inside the namespace (`ip -n <name> args…`), panicking on failure.
    pub fn ip(&self, args: &[&str]) {
        let out = Command::new("ip")
            .arg("-n")
            .arg(&self.name)
            .args(args)
            .output()
            .expect("run ip");
        assert!(
            out.status.success(),
            "ip -n {} {}: {}",
            self.name,
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// A veth pair from this namespace (`local_if`, `local_addr`) to `peer` (`peer_if`,
    /// `peer_addr`), both up; addresses in CIDR form.
    pub fn veth(
        &self,
        local_if: &str,
        local_addr: &str,
        peer: &Netns,
        peer_if: &str,
        peer_addr: &str,
    ) {
        self.ip(&[
            "link",
            "add",
            local_if,
            "type",
            "veth",
            "peer",
            "name",
            peer_if,
            "netns",
            peer.name(),
        ]);
        self.ip(&["addr", "add", local_addr, "dev", local_if]);
        self.ip(&["link", "set", local_if, "up"]);
        peer.ip(&["addr", "add", peer_addr, "dev", peer_if]);
        peer.ip(&["link", "set", peer_if, "up"]);
    }

    /// Brings loopback up.
    pub fn lo_up(&self) {
        self.ip(&["link", "set", "lo", "up"]);
    }

    /// Sets a sysctl inside the namespace.
    pub fn sysctl(&self, key: &str, value: &str) {
        self.run_ok("sysctl", &["-qw", &format!("{key}={value}")], "");
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "delete", &self.name])
            .status();
    }
}
