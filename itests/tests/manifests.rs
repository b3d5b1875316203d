//! Every manifest in `deploy/` parses into the k8s-openapi type of its kind, and says
//! nothing those types do not know: each document is read into its type and written back,
//! and the two must be the same JSON (a misspelt or misplaced field would be dropped on the
//! way and show up as a difference).
//!
//! `deploy/*.yaml` are rendered from the Helm chart `charts/randport`; the chart tests lint
//! it, render every distribution preset and the optional parts, check each rendering the same
//! way, and fail when `deploy/` drifts from the chart. They need helm (`just test` fetches
//! it into target/tools; `HELM` names another); without it they skip, except under CI.

use std::path::{Path, PathBuf};

use k8s_openapi::api::admissionregistration::v1::{
    ValidatingAdmissionPolicy, ValidatingAdmissionPolicyBinding,
};
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{Service, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use serde::Deserialize;
use serde_json::Value;
use std::process::Command;

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

fn round_trip<T: serde::de::DeserializeOwned + serde::Serialize>(
    doc: &Value,
) -> Result<Value, String> {
    let typed: T = serde_json::from_value(doc.clone()).map_err(|e| e.to_string())?;
    serde_json::to_value(typed).map_err(|e| e.to_string())
}

/// Where `a` has something `b` lacks or differs, as JSON paths.
fn differences(a: &Value, b: &Value, path: &str, out: &mut Vec<String>) {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            for (k, v) in x {
                match y.get(k) {
                    Some(w) => differences(v, w, &format!("{path}.{k}"), out),
                    None => out.push(format!("{path}.{k} is unknown to the type")),
                }
            }
        }
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => {
            for (i, (v, w)) in x.iter().zip(y).enumerate() {
                differences(v, w, &format!("{path}[{i}]"), out);
            }
        }
        _ if a != b => out.push(format!("{path}: {a} became {b}")),
        _ => {}
    }
}

/// Checks one document; returns its kind and name.
fn check(file: &Path, doc: &Value) -> Result<String, String> {
    let kind = doc["kind"].as_str().ok_or("no kind")?;
    let back = match kind {
        "ServiceAccount" => round_trip::<ServiceAccount>(doc),
        "Service" => round_trip::<Service>(doc),
        // The Prometheus Operator's CRD: no k8s-openapi type; its shape is checked in
        // service_monitor_shape.
        "ServiceMonitor" => service_monitor_shape(doc).map(|()| doc.clone()),
        "ClusterRole" => round_trip::<ClusterRole>(doc),
        "ClusterRoleBinding" => round_trip::<ClusterRoleBinding>(doc),
        "DaemonSet" => round_trip::<DaemonSet>(doc),
        "ValidatingAdmissionPolicy" => round_trip::<ValidatingAdmissionPolicy>(doc),
        "ValidatingAdmissionPolicyBinding" => round_trip::<ValidatingAdmissionPolicyBinding>(doc),
        other => Err(format!("kind {other} is not checked: add it to this test")),
    }
    .map_err(|e| format!("{}: {kind}: {e}", file.display()))?;
    let mut diffs = Vec::new();
    differences(doc, &back, "", &mut diffs);
    if !diffs.is_empty() {
        return Err(format!("{}: {kind}: {}", file.display(), diffs.join("; ")));
    }
    Ok(format!(
        "{kind}/{}",
        doc["metadata"]["name"].as_str().unwrap_or("?")
    ))
}

/// The fields of a monitoring.coreos.com/v1 ServiceMonitor that we set, and nothing else.
fn service_monitor_shape(doc: &Value) -> Result<(), String> {
    if doc["apiVersion"] != "monitoring.coreos.com/v1" {
        return Err(format!("apiVersion {}", doc["apiVersion"]));
    }
    let spec = doc["spec"].as_object().ok_or("no spec")?;
    for key in spec.keys() {
        if !["selector", "namespaceSelector", "endpoints"].contains(&key.as_str()) {
            return Err(format!(".spec.{key} is not a ServiceMonitor field we use"));
        }
    }
    if spec["selector"]["matchLabels"]
        .as_object()
        .is_none_or(|m| m.is_empty())
    {
        return Err("no .spec.selector.matchLabels".into());
    }
    let endpoints = spec["endpoints"].as_array().ok_or("no .spec.endpoints")?;
    for e in endpoints {
        for key in e.as_object().ok_or("endpoint is not an object")?.keys() {
            if !["port", "path", "interval"].contains(&key.as_str()) {
                return Err(format!(".spec.endpoints[].{key} is not a field we use"));
            }
        }
    }
    Ok(())
}

fn documents(file: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(file).unwrap();
    parse_documents(&text).unwrap_or_else(|e| panic!("{}: {e}", file.display()))
}

fn parse_documents(text: &str) -> Result<Vec<Value>, String> {
    serde_yaml_ng::Deserializer::from_str(text)
        .map(|doc| Value::deserialize(doc).map_err(|e| e.to_string()))
        .filter(|doc| !doc.as_ref().is_ok_and(Value::is_null))
        .collect()
}

#[test]
fn every_manifest_parses_into_its_kubernetes_type() {
    let mut files: Vec<PathBuf> = std::fs::read_dir(deploy_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    files.sort();
    assert!(
        files.len() >= 3,
        "deploy/ has the agent, the policy and the uninstaller"
    );
    let mut seen = Vec::new();
    let mut errors = Vec::new();
    for file in &files {
        for doc in documents(file) {
            match check(file, &doc) {
                Ok(name) => seen.push(name),
                Err(e) => errors.push(e),
            }
        }
    }
    assert!(errors.is_empty(), "{}", errors.join("\n"));
    for expected in [
        "ServiceAccount/randport",
        "ClusterRole/randport",
        "ClusterRoleBinding/randport",
        "DaemonSet/randport",
        "ValidatingAdmissionPolicy/randport-agent-writes",
        "ValidatingAdmissionPolicyBinding/randport-agent-writes",
        "DaemonSet/randport-uninstall",
    ] {
        assert!(
            seen.iter().any(|s| s == expected),
            "{expected} missing from deploy/: {seen:?}"
        );
    }
}

#[test]
fn the_check_catches_a_misspelt_field() {
    let doc: Value = serde_json::json!({
        "apiVersion": "v1", "kind": "ServiceAccount",
        "metadata": {"name": "x", "namespace": "kube-system", "lables": {"a": "b"}}
    });
    let e = check(Path::new("inline.yaml"), &doc).unwrap_err();
    assert!(e.contains(".metadata.lables is unknown"), "{e}");
}

#[test]
fn the_rbac_is_exactly_what_the_agent_does() {
    let docs = documents(&deploy_dir().join("randport.yaml"));
    let role: ClusterRole = serde_json::from_value(
        docs.iter()
            .find(|d| d["kind"] == "ClusterRole")
            .unwrap()
            .clone(),
    )
    .unwrap();
    let mut grants: Vec<String> = Vec::new();
    for rule in role.rules.unwrap() {
        for group in rule.api_groups.unwrap_or_default() {
            for resource in rule.resources.clone().unwrap_or_default() {
                for verb in &rule.verbs {
                    grants.push(format!("{group}/{resource}:{verb}"));
                }
            }
        }
    }
    grants.sort();
    assert_eq!(
        grants,
        [
            "/pods:get",
            "/pods:list",
            "/pods:patch",
            "/pods:watch",
            "events.k8s.io/events:create",
            "events.k8s.io/events:patch"
        ]
    );
}

// ---- the Helm chart ----

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// helm: `HELM`, else the copy `just test` fetched into target/tools. None (with a message)
/// when neither is there; under CI that is a failure.
fn helm(test: &str) -> Option<PathBuf> {
    let path = randport_itests::helm_path();
    if path.is_file() {
        return Some(path);
    }
    assert!(
        !randport_itests::in_ci(),
        "{test}: helm is missing ({}); `just test` fetches it (ci/lib.sh ensure_helm)",
        path.display()
    );
    eprintln!(
        "SKIPPED {test}: helm is missing ({}); `just test` fetches it",
        path.display()
    );
    None
}

fn run_helm(helm: &Path, args: &[&str]) -> Result<String, String> {
    let out = Command::new(helm)
        .args(args)
        .current_dir(repo())
        .output()
        .map_err(|e| format!("running {}: {e}", helm.display()))?;
    if !out.status.success() {
        return Err(format!(
            "helm {}: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Renders the chart with `args` and checks every document; returns them.
fn render(helm: &Path, args: &[&str]) -> Vec<Value> {
    let mut all = vec![
        "template",
        "randport",
        "charts/randport",
        "-n",
        "kube-system",
    ];
    all.extend_from_slice(args);
    let text = run_helm(helm, &all).unwrap_or_else(|e| panic!("{e}"));
    let docs = parse_documents(&text).unwrap_or_else(|e| panic!("{args:?}: {e}"));
    let what = Path::new("charts/randport");
    let errors: Vec<String> = docs
        .iter()
        .filter_map(|d| check(what, d).err())
        .map(|e| format!("{args:?}: {e}"))
        .collect();
    assert!(errors.is_empty(), "{}", errors.join("\n"));
    docs
}

fn find<'a>(docs: &'a [Value], kind: &str) -> Option<&'a Value> {
    docs.iter().find(|d| d["kind"] == kind)
}

fn host_path(daemonset: &Value, volume: &str) -> String {
    daemonset["spec"]["template"]["spec"]["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == volume)
        .and_then(|v| v["hostPath"]["path"].as_str())
        .unwrap_or_else(|| panic!("no hostPath volume {volume}"))
        .to_owned()
}

fn agent_env(daemonset: &Value, name: &str) -> Option<String> {
    daemonset["spec"]["template"]["spec"]["containers"][0]["env"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == name)
        .and_then(|e| e["value"].as_str())
        .map(str::to_owned)
}

#[test]
fn the_chart_lints_and_every_preset_renders_into_kubernetes_types() {
    let Some(helm) = helm("the_chart_lints_and_every_preset_renders_into_kubernetes_types") else {
        return;
    };
    run_helm(&helm, &["lint", "--strict", "charts/randport"]).unwrap();
    for (preset, bin, conf) in [
        ("kubeadm", "/opt/cni/bin", "/etc/cni/net.d"),
        ("kind", "/opt/cni/bin", "/etc/cni/net.d"),
        (
            "k3s",
            "/var/lib/rancher/k3s/data/current/bin",
            "/var/lib/rancher/k3s/agent/etc/cni/net.d",
        ),
        ("rke2", "/opt/cni/bin", "/etc/cni/net.d"),
        ("openshift", "/var/lib/cni/bin", "/run/multus/cni/net.d"),
    ] {
        let values = format!("charts/randport/presets/{preset}.yaml");
        run_helm(
            &helm,
            &["lint", "--strict", "charts/randport", "-f", &values],
        )
        .unwrap();
        let docs = render(&helm, &["-f", &values]);
        let ds = find(&docs, "DaemonSet").unwrap();
        assert_eq!(host_path(ds, "cni-bin"), bin, "{preset}");
        assert_eq!(host_path(ds, "cni-conf"), conf, "{preset}");
        assert_eq!(
            ds["spec"]["template"]["spec"]["nodeSelector"]["kubernetes.io/os"], "linux",
            "{preset}"
        );
        let image = ds["spec"]["template"]["spec"]["containers"][0]["image"]
            .as_str()
            .unwrap();
        assert_eq!(
            image, "ghcr.io/randport/randport:0.1.0",
            "{preset}: the chart's appVersion"
        );
        let role = find(&docs, "ClusterRole").unwrap().to_string();
        assert_eq!(
            role.contains("securitycontextconstraints"),
            preset == "openshift",
            "{preset}: only OpenShift gets the SCC rule"
        );
        assert!(
            find(&docs, "Service").is_some(),
            "{preset}: metrics Service"
        );
        assert!(
            find(&docs, "ServiceMonitor").is_none(),
            "{preset}: ServiceMonitor is opt-in"
        );
        assert!(
            find(&docs, "ValidatingAdmissionPolicy").is_none(),
            "{preset}: no policy where the API does not serve it"
        );
    }
}

#[test]
fn the_chart_values_reach_the_agent_and_the_optional_parts_render_where_they_can() {
    let Some(helm) = helm("the_chart_values_reach_the_agent") else {
        return;
    };
    let digest = format!("sha256:{}", "ab".repeat(32));
    let docs = render(
        &helm,
        &[
            "--set",
            "image.tag=1.2.3",
            "--set",
            &format!("image.digest={digest}"),
            "--set",
            "portRange=40000-40999",
            "--set",
            "firewall=iptables",
            "--set",
            "hostPorts=annotated",
            "--set",
            "cni.confDir=/etc/custom/net.d",
            "--set",
            "metrics.serviceMonitor.enabled=true",
            "--api-versions",
            "monitoring.coreos.com/v1/ServiceMonitor",
            "--api-versions",
            "admissionregistration.k8s.io/v1/ValidatingAdmissionPolicy",
        ],
    );
    let ds = find(&docs, "DaemonSet").unwrap();
    assert_eq!(
        ds["spec"]["template"]["spec"]["containers"][0]["image"],
        format!("ghcr.io/randport/randport:1.2.3@{digest}")
    );
    assert_eq!(agent_env(ds, "RANDPORT_PORT_RANGE").unwrap(), "40000-40999");
    assert_eq!(agent_env(ds, "RANDPORT_FIREWALL").unwrap(), "iptables");
    assert_eq!(agent_env(ds, "RANDPORT_HOST_PORTS").unwrap(), "annotated");
    assert_eq!(host_path(ds, "cni-conf"), "/etc/custom/net.d");
    assert_eq!(host_path(ds, "cni-bin"), "/opt/cni/bin");
    let monitor = find(&docs, "ServiceMonitor").unwrap();
    let service = find(&docs, "Service").unwrap();
    for (k, v) in monitor["spec"]["selector"]["matchLabels"]
        .as_object()
        .unwrap()
    {
        assert_eq!(
            &service["metadata"]["labels"][k], v,
            "the ServiceMonitor selects the Service"
        );
    }
    assert_eq!(
        monitor["spec"]["endpoints"][0]["port"],
        service["spec"]["ports"][0]["name"]
    );
    let policy = find(&docs, "ValidatingAdmissionPolicy").unwrap();
    assert!(
        policy
            .to_string()
            .contains("system:serviceaccount:kube-system:randport"),
        "the policy names the release's service account"
    );
    assert!(find(&docs, "ValidatingAdmissionPolicyBinding").is_some());

    // Uninstall mode: the uninstall DaemonSet instead of the agent, nothing that serves.
    let docs = render(&helm, &["--set", "uninstall.enabled=true"]);
    let daemonsets: Vec<_> = docs.iter().filter(|d| d["kind"] == "DaemonSet").collect();
    assert_eq!(daemonsets.len(), 1);
    assert_eq!(daemonsets[0]["metadata"]["name"], "randport-uninstall");
    assert!(find(&docs, "Service").is_none());

    // What the chart refuses, with a message that says what to do.
    for (args, says) in [
        (vec!["--set", "image.tag=latest"], "latest is not allowed"),
        (
            vec!["--set", "distribution=minikube"],
            "distribution must be one of",
        ),
        (vec!["--set", "firewall=pf"], "firewall must be one of"),
        (vec!["--set", "image.digest=abc"], "image.digest"),
        (
            vec!["--set", "metrics.serviceMonitor.enabled=true"],
            "does not serve monitoring.coreos.com/v1",
        ),
    ] {
        let mut all = vec!["template", "randport", "charts/randport"];
        all.extend(args.iter().copied());
        let e = run_helm(&helm, &all).unwrap_err();
        assert!(e.contains(says), "{args:?}: {e}");
    }
}

/// What the release workflow attaches: `helm package` of the chart, which installs from the
/// archive as from the directory (same rendering, presets and README inside).
#[test]
fn the_packaged_chart_renders_like_the_directory() {
    let Some(helm) = helm("the_packaged_chart_renders_like_the_directory") else {
        return;
    };
    let out_dir = std::env::temp_dir().join(format!("randport-chart-{}", std::process::id()));
    let out = out_dir.display().to_string();
    run_helm(
        &helm,
        &[
            "package",
            "charts/randport",
            "--version",
            "9.9.9",
            "--app-version",
            "9.9.9",
            "-d",
            &out,
        ],
    )
    .unwrap();
    let archive = out_dir.join("randport-9.9.9.tgz");
    let listing = Command::new("tar")
        .arg("tzf")
        .arg(&archive)
        .output()
        .unwrap();
    let listing = String::from_utf8_lossy(&listing.stdout);
    for file in [
        "randport/README.md",
        "randport/values.schema.json",
        "randport/presets/k3s.yaml",
    ] {
        assert!(
            listing.lines().any(|l| l == file),
            "{file} missing from the package:\n{listing}"
        );
    }
    let archive = archive.display().to_string();
    let docs = render(&helm, &[]);
    let mut args = vec!["template", "randport", &archive, "-n", "kube-system"];
    args.push("--set");
    args.push("image.tag=0.1.0");
    let packaged = parse_documents(&run_helm(&helm, &args).unwrap()).unwrap();
    let strip = |docs: &[Value]| -> Vec<Value> {
        docs.iter()
            .map(|d| {
                let mut d = d.clone();
                // Helm's own labels carry the chart version.
                for path in ["/metadata/labels", "/spec/template/metadata/labels"] {
                    if let Some(Value::Object(labels)) = d.pointer_mut(path) {
                        labels.remove("helm.sh/chart");
                        labels.remove("app.kubernetes.io/version");
                    }
                }
                d
            })
            .collect()
    };
    assert_eq!(strip(&packaged), strip(&docs));
    std::fs::remove_dir_all(out_dir).unwrap();
}

#[test]
fn deploy_is_what_the_chart_renders() {
    if helm("deploy_is_what_the_chart_renders").is_none() {
        return;
    }
    let out = Command::new("bash")
        .arg(repo().join("ci/render-manifests.sh"))
        .arg("--check")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "deploy/ drifted from charts/randport:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_chart_refuses_localhost_access_with_a_message_instead_of_a_crash_loop() {
    let Some(helm) = helm("the_chart_refuses_localhost_access") else {
        return;
    };
    let err = run_helm(
        &helm,
        &[
            "template",
            "randport",
            "charts/randport",
            "-n",
            "kube-system",
            "--set",
            "localhostAccess=true",
        ],
    )
    .unwrap_err();
    assert!(
        err.contains("localhostAccess: true is not supported by this chart")
            && err.contains("/proc/sys is read-only")
            && err.contains("nodeIP:hostPort"),
        "{err}"
    );
}
