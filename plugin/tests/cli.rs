//! The binaries' command lines: every agent flag has its RANDPORT_* variable, bad flags
//! get clear errors, the plugin answers VERSION without an agent.

use std::process::Command;

fn randportd(args: &[&str]) -> (bool, String) {
    randportd_env(args, &[])
}

fn randportd_env(args: &[&str], env: &[(&str, &str)]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_randportd"))
        .args(args)
        .envs(env.iter().copied())
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn every_flag_can_be_set_from_the_environment() {
    let (ok, help) = randportd(&["--help"]);
    assert!(ok);
    for (flag, var, default) in [
        ("--node-name", "RANDPORT_NODE_NAME", None),
        ("--pods", "RANDPORT_PODS", Some("kube")),
        ("--cni-conf-dir", "RANDPORT_CNI_CONF_DIR", None),
        (
            "--socket",
            "RANDPORT_SOCKET",
            Some("/run/randport/randportd.sock"),
        ),
        (
            "--state-dir",
            "RANDPORT_STATE_DIR",
            Some("/var/lib/randport"),
        ),
        ("--port-range", "RANDPORT_PORT_RANGE", Some("20000-29999")),
        ("--firewall", "RANDPORT_FIREWALL", Some("nftables")),
        (
            "--annotation",
            "RANDPORT_ANNOTATION",
            Some("tkestack.io/portmapping"),
        ),
        (
            "--metrics-addr",
            "RANDPORT_METRICS_ADDR",
            Some("127.0.0.1:9740"),
        ),
    ] {
        assert!(help.contains(flag), "{flag} missing from --help");
        assert!(
            help.contains(&format!("[env: {var}=")),
            "{var} missing from --help:\n{help}"
        );
        if let Some(default) = default {
            assert!(
                help.contains(&format!("[default: {default}]")),
                "default {default} of {flag} missing"
            );
        }
    }
}

#[test]
fn bad_flags_get_clear_errors() {
    let (ok, text) = randportd(&["--port-range", "30000-20000", "--pods", "dir:/nonexistent"]);
    assert!(!ok);
    assert!(text.contains("port range 30000-20000 is empty"), "{text}");
    let (ok, text) = randportd_env(
        &["--pods", "kube", "--node-name", "n"],
        &[
            ("KUBECONFIG", "/nonexistent/kubeconfig"),
            ("KUBERNETES_SERVICE_HOST", ""),
        ],
    );
    assert!(!ok);
    assert!(
        text.contains("no Kubernetes client configuration") && text.contains("set KUBECONFIG"),
        "{text}"
    );
    let (ok, text) = randportd(&["--pods", "files", "--node-name", "n"]);
    assert!(!ok);
    assert!(
        text.contains("--pods \"files\": use kube or dir:PATH"),
        "{text}"
    );
    let (ok, text) = randportd(&[
        "--localhost-access",
        "--firewall",
        "iptables",
        "--pods",
        "dir:/nonexistent",
        "--node-name",
        "n",
        "--state-dir",
        "/nonexistent/randport-cli-test",
    ]);
    assert!(
        !ok && text.contains("--localhost-access needs --firewall nftables"),
        "{text}"
    );
    let (ok, text) = randportd(&["--firewall", "ipfw"]);
    assert!(
        !ok && text.contains("possible values: nftables, iptables"),
        "{text}"
    );
    let (ok, text) = randportd(&["list", "--socket", "/nonexistent/agent.sock"]);
    assert!(
        !ok && text.contains("cannot reach randportd at /nonexistent/agent.sock"),
        "{text}"
    );
}

#[test]
fn plugin_answers_version_and_reports_a_missing_agent() {
    let out = Command::new(env!("CARGO_BIN_EXE_randport"))
        .env("CNI_COMMAND", "VERSION")
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        r#"{"cniVersion":"1.1.0","supportedVersions":["0.3.1","0.4.0","1.0.0","1.1.0"]}"#
    );
    let run = |command: &str| {
        let mut child = Command::new(env!("CARGO_BIN_EXE_randport"))
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", "abc")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(
                br#"{"cniVersion":"1.0.0","name":"n","type":"randport","socket":"/nonexistent/x.sock","stateDir":"/nonexistent/randport-state"}"#,
            )
            .unwrap();
        child.wait_with_output().unwrap()
    };
    // CHECK needs the agent: code 11, saying where it looked.
    let out = run("CHECK");
    assert!(!out.status.success());
    let error: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(error["code"], 11);
    assert!(
        error["details"]
            .as_str()
            .unwrap()
            .contains("is the randport agent running")
    );
    // DEL does not: with nothing recorded on the node it succeeds, and says why on stderr.
    let out = run("DEL");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(out.stdout.is_empty());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("randportd is not reachable"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
