//! What several of the plugin's integration tests share.

use std::io::Write;
use std::process::{Command, Stdio};

use serde_json::Value;

/// Runs the `randport` plugin as a container runtime would: verb `command` for sandbox
/// `sandbox` of pod `shop/<pod>` (`extra_args` appended to `CNI_ARGS`), `conf` on stdin.
/// Returns (success, stdout).
#[allow(dead_code)] // not every test binary that includes this module uses it
pub fn run_plugin(
    command: &str,
    sandbox: &str,
    pod: &str,
    extra_args: &str,
    conf: &Value,
) -> (bool, String) {
    run_plugin_in(None, command, sandbox, pod, extra_args, conf)
}

/// [`run_plugin`] inside network namespace `netns` (as a runtime runs it on its node),
/// when one is given: a DEL without the agent changes that namespace's firewall.
#[allow(dead_code)] // not every test binary that includes this module uses it
pub fn run_plugin_in(
    netns: Option<&str>,
    command: &str,
    sandbox: &str,
    pod: &str,
    extra_args: &str,
    conf: &Value,
) -> (bool, String) {
    let mut plugin = match netns {
        Some(netns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", netns, env!("CARGO_BIN_EXE_randport")]);
            c
        }
        None => Command::new(env!("CARGO_BIN_EXE_randport")),
    };
    let mut child = plugin
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", sandbox)
        .env("CNI_NETNS", "/run/netns/unused")
        .env("CNI_IFNAME", "eth0")
        .env(
            "CNI_ARGS",
            format!("IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME={pod}{extra_args}"),
        )
        .env("CNI_PATH", "/opt/cni/bin")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(conf.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}
