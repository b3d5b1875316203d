//! What several of the plugin's integration tests share.

use std::io::Write;
use std::process::{Command, Stdio};

use serde_json::Value;

/// Runs the `randport` plugin as a container runtime would: verb `command` for sandbox
/// `sandbox` of pod `shop/<pod>` (`extra_args` appended to `CNI_ARGS`), `conf` on stdin.
/// Returns (success, stdout).
pub fn run_plugin(
    command: &str,
    sandbox: &str,
    pod: &str,
    extra_args: &str,
    conf: &Value,
) -> (bool, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_randport"))
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
