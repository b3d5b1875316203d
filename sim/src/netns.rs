//! Network namespaces the simulator and the tests make: created with `ip netns add`,
//! entered on dedicated threads only (`setns` switches one thread), deleted on drop.

use std::io::Write as _;
use std::process::{Command, Output, Stdio};

use anyhow::{Context, Result, bail};

/// A network namespace we made; deleted when dropped.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

fn check(what: &str, out: Output) -> Result<String> {
    if !out.status.success() {
        bail!(
            "{what} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

impl Netns {
    /// Creates the namespace `name` (which should carry the `rp-` prefix and a run id).
    pub fn create(name: &str) -> Result<Netns> {
        let out = Command::new("ip")
            .args(["netns", "add", name])
            .output()
            .context("running ip (is iproute2 installed?)")?;
        check(&format!("ip netns add {name}"), out)?;
        Ok(Netns {
            name: name.to_owned(),
        })
    }

    /// The namespace's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The namespace's path, for `setns` and `CNI_NETNS`.
    pub fn path(&self) -> String {
        format!("/run/netns/{}", self.name)
    }

    /// Runs `program args…` inside the namespace with `stdin` as input.
    pub fn run(&self, program: &str, args: &[&str], stdin: &str) -> Result<Output> {
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.name, program])
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {program} in {}", self.name))?;
        if let Some(mut input) = child.stdin.take() {
            input.write_all(stdin.as_bytes())?;
        }
        Ok(child.wait_with_output()?)
    }

    /// Like [`Netns::run`]; the stdout, or an error with the command's stderr.
    pub fn run_ok(&self, program: &str, args: &[&str], stdin: &str) -> Result<String> {
        let what = format!("{program} {} in {}", args.join(" "), self.name);
        check(&what, self.run(program, args, stdin)?)
    }

    /// Runs `f` on a new thread that entered this namespace; sockets made there stay in
    /// the namespace after the thread ends.
    pub fn enter<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
        let path = self.path();
        std::thread::spawn(move || -> Result<T> {
            let file = std::fs::File::open(&path).with_context(|| format!("opening {path}"))?;
            nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
                .with_context(|| format!("entering {path}"))?;
            Ok(f())
        })
        .join()
        .map_err(|_| anyhow::anyhow!("thread in {} panicked", self.name))?
    }

    /// `ip -n <name> args…`.
    pub fn ip(&self, args: &[&str]) -> Result<()> {
        let out = Command::new("ip")
            .arg("-n")
            .arg(&self.name)
            .args(args)
            .output()?;
        check(&format!("ip -n {} {}", self.name, args.join(" ")), out).map(drop)
    }

    /// A veth pair from this namespace (`local_if`) to `peer` (`peer_if`), both up.
    pub fn veth(&self, local_if: &str, peer: &Netns, peer_if: &str) -> Result<()> {
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
        ])?;
        self.ip(&["link", "set", local_if, "up"])?;
        peer.ip(&["link", "set", peer_if, "up"])
    }

    /// Adds an address (CIDR) to an interface, without duplicate address detection.
    pub fn addr(&self, dev: &str, cidr: &str) -> Result<()> {
        if cidr.contains(':') {
            self.ip(&["addr", "add", cidr, "dev", dev, "nodad"])
        } else {
            self.ip(&["addr", "add", cidr, "dev", dev])
        }
    }

    /// Brings loopback up.
    pub fn lo_up(&self) -> Result<()> {
        self.ip(&["link", "set", "lo", "up"])
    }

    /// Sets a sysctl inside the namespace.
    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        self.run_ok("sysctl", &["-qw", &format!("{key}={value}")], "")
            .map(drop)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "delete", &self.name])
            .stderr(Stdio::null())
            .status();
    }
}

/// Every namespace whose name starts with `prefix`.
pub fn list_with_prefix(prefix: &str) -> Vec<String> {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return vec![];
    };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(prefix))
        .map(str::to_owned)
        .collect()
}
