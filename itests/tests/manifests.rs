//! Every manifest in `deploy/` parses into the k8s-openapi type of its kind, and says
//! nothing those types do not know: each document is read into its type and written back,
//! and the two must be the same JSON (a misspelt or misplaced field would be dropped on the
//! way and show up as a difference).

use std::path::{Path, PathBuf};

use k8s_openapi::api::admissionregistration::v1::{
    ValidatingAdmissionPolicy, ValidatingAdmissionPolicyBinding,
};
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::ServiceAccount;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use serde::Deserialize;
use serde_json::Value;

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

fn documents(file: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(file).unwrap();
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(|doc| Value::deserialize(doc).unwrap_or_else(|e| panic!("{}: {e}", file.display())))
        .filter(|doc| !doc.is_null())
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
