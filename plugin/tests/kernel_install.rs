//! Root-only: `randportd install` and `uninstall` on a node's CNI directories (temporary
//! ones) and firewall (a fresh network namespace). Install is idempotent and leaves the
//! network plugin's entries as they were; a running agent puts its entry back when the
//! network plugin rewrites its conflist (kindnet does on every start); uninstall refuses
//! while an agent answers, SIGTERM stops the agent at once and leaves its rules, and
//! uninstall then removes our entry, the binary, our nftables table and the
//! records, and nothing else.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use randport_itests::{Netns, TestNetns, root_and_tools_or_skip, test_netns};
use serde_json::Value;

/// kindnet's conflist as kind writes it.
const KINDNET: &str = include_str!("data/10-kindnet.conflist");

struct Node {
    ns: Netns,
    dir: PathBuf,
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

struct Agent(Child);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Node {
    fn new() -> Node {
        let ns = test_netns("install");
        ns.lo_up().unwrap();
        let dir = std::env::temp_dir().join(format!("randport-install-{}", ns.name()));
        for sub in ["bin", "conf", "pods", "state"] {
            std::fs::create_dir_all(dir.join(sub)).unwrap();
        }
        std::fs::write(dir.join("conf/10-kindnet.conflist"), KINDNET).unwrap();
        Node { ns, dir }
    }

    fn conflist(&self) -> PathBuf {
        self.dir.join("conf/10-kindnet.conflist")
    }

    fn types(&self) -> Vec<String> {
        let value: Value =
            serde_json::from_slice(&std::fs::read(self.conflist()).unwrap()).unwrap();
        value["plugins"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["type"].as_str().unwrap().to_owned())
            .collect()
    }

    fn dirs(&self) -> Vec<String> {
        let path = |p: &str| self.dir.join(p).display().to_string();
        vec![
            "--cni-bin-dir".into(),
            path("bin"),
            "--cni-conf-dir".into(),
            path("conf"),
        ]
    }

    fn common(&self) -> Vec<String> {
        let path = |p: &str| self.dir.join(p).display().to_string();
        vec![
            "--socket".into(),
            path("randportd.sock"),
            "--state-dir".into(),
            path("state"),
        ]
    }

    /// `randportd` inside the node's namespace, with its socket and state directory.
    fn command(&self) -> Command {
        let mut command = Command::new("ip");
        command
            .args([
                "netns",
                "exec",
                self.ns.name(),
                env!("CARGO_BIN_EXE_randportd"),
            ])
            .args(self.common());
        command
    }

    /// `randportd <args>` inside the node's namespace.
    fn randportd(&self, args: &[&str], subcommand_args: &[String]) -> Output {
        self.command()
            .args(args)
            .args(subcommand_args)
            .output()
            .unwrap()
    }

    fn agent(&self) -> Agent {
        let log = std::fs::File::create(self.dir.join("agent.log")).unwrap();
        let child = self
            .command()
            .args(["--node-name", "node-0", "--metrics-addr", "off"])
            // Turns route_localnet on in the namespace; uninstall turns it off again.
            .arg("--localhost-access")
            .arg("--pods")
            .arg(format!("dir:{}", self.dir.join("pods").display()))
            .arg("--cni-conf-dir")
            .arg(self.dir.join("conf"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let agent = Agent(child);
        self.wait("the agent to answer", Duration::from_secs(10), || {
            Command::new(env!("CARGO_BIN_EXE_randportd"))
                .arg("list")
                .arg("--socket")
                .arg(self.dir.join("randportd.sock"))
                .output()
                .is_ok_and(|o| o.status.success())
        });
        agent
    }

    fn wait(&self, what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + limit;
        while !done() {
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; agent log:\n{}",
                std::fs::read_to_string(self.dir.join("agent.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn has_table(&self) -> bool {
        self.ns
            .out("nft", &["list", "table", "inet", "randport"], "")
            .status
            .success()
    }
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn install_keep_and_uninstall_on_a_node() {
    if !root_and_tools_or_skip("install_keep_and_uninstall_on_a_node", &["nft", "ip"]) {
        return;
    }
    let node = Node::new();
    let plugin = env!("CARGO_BIN_EXE_randport");
    let binary = vec!["--binary".to_owned(), plugin.to_owned()];
    let install = |extra: &[String]| {
        let mut args = binary.clone();
        args.extend(node.dirs());
        args.extend(extra.iter().cloned());
        node.randportd(&["install"], &args)
    };

    let first = install(&[]);
    assert!(first.status.success(), "{}", text(&first));
    assert!(
        text(&first).contains("added randport to"),
        "{}",
        text(&first)
    );
    assert_eq!(node.types(), ["ptp", "portmap", "randport"]);
    assert_eq!(
        std::fs::read(node.dir.join("bin/randport")).unwrap(),
        std::fs::read(plugin).unwrap()
    );
    let installed = std::fs::read(node.conflist()).unwrap();
    let again = install(&[]);
    assert!(again.status.success(), "{}", text(&again));
    assert!(text(&again).contains("already in"), "{}", text(&again));
    assert_eq!(
        std::fs::read(node.conflist()).unwrap(),
        installed,
        "idempotent"
    );

    // The agent keeps its entry: the network plugin rewrites its file, the entry returns.
    let agent = node.agent();
    std::fs::write(node.conflist(), KINDNET).unwrap();
    node.wait("the entry to come back", Duration::from_secs(8), || {
        node.types() == ["ptp", "portmap", "randport"]
    });
    assert!(node.has_table(), "the agent made its table");

    // Uninstall refuses while the agent runs (it would put the entry back).
    let refused = node.randportd(&["uninstall"], &node.dirs());
    assert!(!refused.status.success());
    assert!(
        text(&refused).contains("stop it first"),
        "{}",
        text(&refused)
    );
    assert_eq!(node.types(), ["ptp", "portmap", "randport"]);

    // SIGTERM (what the kubelet sends): the agent exits at once, cleanly, and leaves its
    // rules for the next agent.
    let mut agent = agent;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(agent.0.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let started = Instant::now();
    let status = loop {
        if let Some(status) = agent.0.try_wait().unwrap() {
            break status;
        }
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "SIGTERM did not stop the agent"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(
        status.success(),
        "the agent did not exit cleanly: {status:?}"
    );
    assert!(node.has_table(), "the rules stay after SIGTERM");
    drop(agent);
    std::fs::write(node.dir.join("state/leftover.json"), "{}").unwrap();
    let route_localnet = || {
        node.ns
            .run_ok("sysctl", &["-n", "net.ipv4.conf.all.route_localnet"], "")
            .unwrap()
            .trim()
            .to_owned()
    };
    assert_eq!(route_localnet(), "1", "--localhost-access turned it on");
    let removed = node.randportd(&["uninstall"], &node.dirs());
    assert!(removed.status.success(), "{}", text(&removed));
    assert_eq!(route_localnet(), "0", "{}", text(&removed));
    assert!(text(&removed).contains("back to 0"), "{}", text(&removed));
    let original: Value = serde_json::from_str(KINDNET).unwrap();
    let now: Value = serde_json::from_slice(&std::fs::read(node.conflist()).unwrap()).unwrap();
    assert_eq!(
        now, original,
        "the network plugin's entries are as they were"
    );
    assert!(!Path::new(&node.dir.join("bin/randport")).exists());
    assert!(!node.has_table(), "the table is gone");
    assert!(!node.dir.join("state").exists(), "the records are gone");

    // Twice is fine.
    let again = node.randportd(&["uninstall"], &node.dirs());
    assert!(again.status.success(), "{}", text(&again));
}

/// The uninstall DaemonSet mounts the state directory from the node: uninstall empties it
/// and leaves the mount point (removing it fails with EBUSY; found on the real node).
#[test]
fn uninstall_empties_a_state_directory_that_is_a_mount_point() {
    if !root_and_tools_or_skip(
        "uninstall_empties_a_state_directory_that_is_a_mount_point",
        &["nft", "ip", "mount"],
    ) {
        return;
    }
    let node = Node::new();
    let state = node.dir.join("state");
    std::fs::write(state.join("0a1b2c.json"), "{}").unwrap();
    std::fs::create_dir_all(state.join("sub")).unwrap();
    std::fs::write(state.join("sub/x"), "x").unwrap();
    let mount = |args: &[&str]| {
        let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
        assert!(out.status.success(), "{args:?}: {}", text(&out));
    };
    let path = state.display().to_string();
    mount(&["mount", "--bind", &path, &path]);
    struct Umount(String);
    impl Drop for Umount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }
    let _umount = Umount(path.clone());

    let out = node.randportd(&["uninstall"], &node.dirs());
    assert!(out.status.success(), "{}", text(&out));
    assert!(state.is_dir(), "the mount point stays");
    assert_eq!(
        std::fs::read_dir(&state).unwrap().count(),
        0,
        "and is empty"
    );
}
