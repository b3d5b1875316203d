//! What `deploy/admission-policy.yaml` lets the agent do, evaluated here without a cluster.
//!
//! The policy's CEL runs in the `cel` crate (a Rust CEL interpreter, with the optional
//! syntax `a.?b.orValue(c)` the policy uses) in the order the API server runs it: the
//! match constraints, then the match conditions (all true, or the policy does not apply),
//! then the variables in order, then every validation (false denies with its message; an
//! error denies too, as `failurePolicy: Fail` says). The requests are the ones the API
//! server would build for a PATCH: the whole pod before and after, and the caller's
//! identity with the node name a pod-bound service-account token carries (1.30+).
//!
//! What this does not cover: cel-go's type checking and cost limits. The kind job
//! (`ci/kind-e2e.sh`, `RANDPORT_E2E_POLICY=1`) installs the policy on a real API server.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use k8s_openapi::api::admissionregistration::v1::{
    ValidatingAdmissionPolicy, ValidatingAdmissionPolicyBinding,
};
use serde::Deserialize;
use serde_json::{Value, json};

const NODE_NAME_EXTRA: &str = "authentication.kubernetes.io/node-name";

/// The policy and its binding, read from the file as the API server would store them.
fn policy_file(text: &str) -> (ValidatingAdmissionPolicy, ValidatingAdmissionPolicyBinding) {
    let mut policy = None;
    let mut binding = None;
    for doc in serde_yaml_ng::Deserializer::from_str(text) {
        let doc = Value::deserialize(doc).expect("the policy file is YAML");
        match doc["kind"].as_str() {
            Some("ValidatingAdmissionPolicy") => policy = serde_json::from_value(doc).ok(),
            Some("ValidatingAdmissionPolicyBinding") => binding = serde_json::from_value(doc).ok(),
            other => panic!("unexpected document {other:?} in the policy file"),
        }
    }
    (
        policy.expect("a ValidatingAdmissionPolicy"),
        binding.expect("a ValidatingAdmissionPolicyBinding"),
    )
}

/// A file of `deploy/`, as shipped.
fn deploy_file(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy")
        .join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn shipped() -> (ValidatingAdmissionPolicy, ValidatingAdmissionPolicyBinding) {
    policy_file(&deploy_file("admission-policy.yaml"))
}

/// One UPDATE of a pod, as the policy sees it.
struct Update {
    username: String,
    node: Option<String>,
    old: Value,
    new: Value,
}

/// The API server's verdict: `Ok` admitted (or not matched), `Err` denied with the message.
fn admit(policy: &ValidatingAdmissionPolicy, update: &Update) -> Result<(), String> {
    let spec = policy.spec.as_ref().expect("policy spec");
    let matches_pods = spec
        .match_constraints
        .as_ref()
        .and_then(|m| m.resource_rules.as_ref())
        .is_some_and(|rules| {
            rules.iter().any(|r| {
                let has = |list: &Option<Vec<String>>, want: &str| {
                    list.as_ref()
                        .is_some_and(|l| l.iter().any(|v| v == want || v == "*"))
                };
                has(&r.api_groups, "") && has(&r.resources, "pods") && has(&r.operations, "UPDATE")
            })
        });
    if !matches_pods {
        return Ok(());
    }

    let env = Arc::new(cel::Env::stdlib());
    let mut extra = serde_json::Map::new();
    if let Some(node) = &update.node {
        extra.insert(NODE_NAME_EXTRA.into(), json!([node]));
    }
    let request = json!({
        "operation": "UPDATE",
        "userInfo": {"username": update.username, "extra": extra},
    });
    let mut variables: HashMap<String, cel::Value> = HashMap::new();
    let eval = |expression: &str, variables: &HashMap<String, cel::Value>| {
        let program = env
            .compile(expression)
            .map_err(|e| format!("does not compile: {e}"))?;
        let mut context = cel::Context::with_env(env.clone());
        context.add_variable("object", &update.new).unwrap();
        context.add_variable("oldObject", &update.old).unwrap();
        context.add_variable("request", &request).unwrap();
        context.add_variable_from_value("variables", variables.clone());
        program
            .execute(&context)
            .map_err(|e| format!("{expression}: {e}"))
    };

    for condition in spec.match_conditions.iter().flatten() {
        match eval(&condition.expression, &variables)? {
            cel::Value::Bool(true) => {}
            cel::Value::Bool(false) => return Ok(()),
            other => return Err(format!("{} gave {other:?}", condition.name)),
        }
    }
    for variable in spec.variables.iter().flatten() {
        let value = eval(&variable.expression, &variables)?;
        variables.insert(variable.name.clone(), value);
    }
    for validation in spec.validations.iter().flatten() {
        match eval(&validation.expression, &variables)? {
            cel::Value::Bool(true) => {}
            _ => return Err(validation.message.clone().unwrap_or_default()),
        }
    }
    Ok(())
}

const AGENT: &str = "system:serviceaccount:kube-system:randport";

fn pod(node: &str, annotations: Value) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "name": "web-0", "namespace": "default", "uid": "u-1",
            "resourceVersion": "10",
            "labels": {"app": "web"},
            "annotations": annotations,
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web", "uid": "rs-1"}],
        },
        "spec": {"nodeName": node, "containers": [{"name": "web", "image": "agnhost", "ports": [{"containerPort": 80}]}]},
    })
}

fn written(key: &str) -> Value {
    json!({ key: r#"[{"containerPort":80,"hostPort":31000,"protocol":"TCP"}]"# })
}

/// The agent on `node` changes `old` into `new`.
fn by_agent(node: &str, old: Value, new: Value) -> Update {
    Update {
        username: AGENT.into(),
        node: Some(node.into()),
        old,
        new,
    }
}

fn with(mut pod: Value, path: &[&str], value: Value) -> Value {
    let (last, parents) = path.split_last().unwrap();
    let mut at = &mut pod;
    for p in parents {
        at = &mut at[*p];
    }
    at[*last] = value;
    pod
}

/// A pod as the API server hands it over when it has no annotations: no field at all.
fn without_annotations(mut pod: Value) -> Value {
    pod["metadata"]
        .as_object_mut()
        .unwrap()
        .remove("annotations");
    pod
}

#[test]
fn the_policy_fences_the_agent_identity_from_the_daemonset() {
    let (policy, binding) = shipped();
    let key = randport_core::DEFAULT_ANNOTATION;
    let name = policy.metadata.name.clone().unwrap();
    let binding = binding.spec.expect("binding spec");
    assert_eq!(binding.policy_name.as_deref(), Some(name.as_str()));
    assert_eq!(binding.validation_actions, Some(vec!["Deny".to_string()]));
    let spec = policy.spec.as_ref().unwrap();
    assert_eq!(spec.failure_policy.as_deref(), Some("Fail"));

    // The identity it matches is the DaemonSet's service account.
    let agent_yaml = deploy_file("randport.yaml");
    let account = serde_yaml_ng::Deserializer::from_str(&agent_yaml)
        .map(|d| Value::deserialize(d).unwrap())
        .find(|d| d["kind"] == "ServiceAccount")
        .unwrap();
    let username = format!(
        "system:serviceaccount:{}:{}",
        account["metadata"]["namespace"].as_str().unwrap(),
        account["metadata"]["name"].as_str().unwrap()
    );
    assert_eq!(username, AGENT);

    // The key it allows is the agent's default annotation.
    let key_var = spec
        .variables
        .iter()
        .flatten()
        .find(|v| v.name == "key")
        .unwrap();
    assert_eq!(key_var.expression, format!("'{key}'"));
}

#[test]
fn the_agent_may_write_only_its_annotation_on_its_own_node() {
    let (policy, _) = shipped();
    let key = randport_core::DEFAULT_ANNOTATION;
    let other = json!({"team": "a", "prometheus.io/scrape": "true"});
    let mut others_and_ours = other.clone();
    others_and_ours[key] = written(key)[key].clone();

    let allowed = [
        (
            "first write, pod without other annotations",
            by_agent(
                "node-a",
                pod("node-a", json!({ key: "" })),
                pod("node-a", written(key)),
            ),
        ),
        (
            "first write, pod had no annotations at all",
            by_agent(
                "node-a",
                without_annotations(pod("node-a", json!({}))),
                pod("node-a", written(key)),
            ),
        ),
        (
            "rewrite beside other annotations",
            by_agent(
                "node-a",
                pod("node-a", other.clone()),
                pod("node-a", others_and_ours.clone()),
            ),
        ),
        (
            "resourceVersion and managedFields move on every write",
            by_agent(
                "node-a",
                pod("node-a", json!({ key: "" })),
                with(
                    with(
                        pod("node-a", written(key)),
                        &["metadata", "resourceVersion"],
                        json!("11"),
                    ),
                    &["metadata", "managedFields"],
                    json!([{"manager": "randportd", "operation": "Update"}]),
                ),
            ),
        ),
        (
            "somebody else changes what they like",
            Update {
                username: "system:node:node-b".into(),
                node: None,
                old: pod("node-a", other.clone()),
                new: with(
                    pod("node-a", json!({})),
                    &["metadata", "labels"],
                    json!({"x": "y"}),
                ),
            },
        ),
    ];
    for (what, update) in &allowed {
        assert_eq!(admit(&policy, update), Ok(()), "{what}");
    }

    let own_node = "the randport agent may change only pods on its own node";
    let only_ours = "the randport agent may change only the tkestack.io/portmapping annotation";
    let denied = [
        (
            "a pod on another node",
            by_agent(
                "node-b",
                pod("node-a", json!({ key: "" })),
                pod("node-a", written(key)),
            ),
            own_node,
        ),
        (
            "a token without the node name",
            Update {
                node: None,
                ..by_agent(
                    "node-a",
                    pod("node-a", json!({ key: "" })),
                    pod("node-a", written(key)),
                )
            },
            own_node,
        ),
        (
            "changing another annotation",
            by_agent(
                "node-a",
                pod("node-a", other.clone()),
                pod(
                    "node-a",
                    with(others_and_ours.clone(), &["team"], json!("b")),
                ),
            ),
            only_ours,
        ),
        (
            "adding another annotation",
            by_agent(
                "node-a",
                pod("node-a", json!({ key: "" })),
                pod("node-a", with(written(key), &["team"], json!("a"))),
            ),
            only_ours,
        ),
        (
            "removing another annotation",
            by_agent(
                "node-a",
                pod("node-a", others_and_ours.clone()),
                pod("node-a", written(key)),
            ),
            only_ours,
        ),
        (
            "changing a label",
            by_agent(
                "node-a",
                pod("node-a", json!({ key: "" })),
                with(
                    pod("node-a", written(key)),
                    &["metadata", "labels", "app"],
                    json!("evil"),
                ),
            ),
            only_ours,
        ),
        (
            "adding a finalizer",
            by_agent(
                "node-a",
                pod("node-a", json!({ key: "" })),
                with(
                    pod("node-a", json!({ key: "" })),
                    &["metadata", "finalizers"],
                    json!(["x/y"]),
                ),
            ),
            only_ours,
        ),
        (
            "dropping the owner",
            by_agent(
                "node-a",
                pod("node-a", json!({ key: "" })),
                with(
                    pod("node-a", json!({ key: "" })),
                    &["metadata", "ownerReferences"],
                    json!([]),
                ),
            ),
            only_ours,
        ),
        (
            "changing the spec",
            by_agent(
                "node-a",
                pod("node-a", json!({ key: "" })),
                with(
                    pod("node-a", json!({ key: "" })),
                    &["spec", "activeDeadlineSeconds"],
                    json!(1),
                ),
            ),
            only_ours,
        ),
    ];
    for (what, update, message) in &denied {
        assert_eq!(admit(&policy, update), Err(message.to_string()), "{what}");
    }
}

/// The evaluation above is not vacuous: a policy without the node check, or with a
/// validation that does not compile, gives a different verdict.
#[test]
fn a_weakened_policy_is_noticed() {
    let text = deploy_file("admission-policy.yaml");
    let key = randport_core::DEFAULT_ANNOTATION;
    let elsewhere = by_agent(
        "node-b",
        pod("node-a", json!({ key: "" })),
        pod("node-a", written(key)),
    );

    let no_node_check = text.replace(
        "variables.node != '' && object.spec.?nodeName.orValue('') == variables.node",
        "true",
    );
    assert_ne!(
        no_node_check, text,
        "the node check is where this test expects it"
    );
    let (weak, _) = policy_file(&no_node_check);
    assert_eq!(admit(&weak, &elsewhere), Ok(()));

    let broken = text.replace("orValue({})", "orValue({)");
    let (broken, _) = policy_file(&broken);
    let verdict = admit(&broken, &elsewhere).unwrap_err();
    assert!(verdict.contains("does not compile"), "{verdict}");
}
