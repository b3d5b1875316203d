//! The wire protocol between the CNI plugin and the agent, as plain serde types: one JSON
//! request per connection on a unix socket, answered by one JSON response. Requests are at
//! most [`MAX_REQUEST`] bytes; the client half-closes its side after writing. The socket
//! I/O lives with the programs (the plugin's `rpc` module, the simulator's client).

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::{PodRef, SandboxId, SandboxRecord};

/// The largest request the agent reads.
pub const MAX_REQUEST: usize = 1 << 20;
/// The largest response the client reads (a node's full listing).
pub const MAX_RESPONSE: usize = 64 << 20;

/// What the plugin asks the agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "verb", rename_all = "UPPERCASE")]
pub enum Request {
    /// Map the pod's ports for a new sandbox.
    Add(AddRequest),
    /// Release a sandbox's mappings.
    Del {
        /// The sandbox.
        sandbox: SandboxId,
    },
    /// Verify a sandbox's rules and holds.
    Check {
        /// The sandbox.
        sandbox: SandboxId,
    },
    /// Release every sandbox not listed.
    Gc {
        /// The sandboxes that remain valid; `None` when the runtime sent no
        /// `cni.dev/valid-attachments` (then nothing is released).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        valid: Option<Vec<SandboxId>>,
        /// The network (the conflist's `name`) the GC is for: only its sandboxes are
        /// concerned (Multus and others run one GC per network).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        network: Option<String>,
    },
    /// Is the agent ready?
    Status,
    /// Every mapping on the node.
    List,
}

/// An ADD: which sandbox, which pod, its addresses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AddRequest {
    /// The sandbox (CNI_CONTAINERID).
    pub sandbox: SandboxId,
    /// The pod, from CNI_ARGS.
    pub pod: PodRef,
    /// The pod's addresses from prevResult, primary first.
    pub pod_ips: Vec<IpAddr>,
    /// The network (the conflist's `name`), kept in the record for a GC of that network.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<String>,
}

/// The agent's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "lowercase")]
pub enum Response {
    /// Success: the records concerned (ADD: the sandbox's; LIST: all) and readiness.
    Ok {
        /// Records.
        #[serde(default)]
        records: Vec<SandboxRecord>,
        /// Whether the agent has finished its start-up and serves.
        ready: bool,
    },
    /// Failure, as a CNI error.
    Error(ErrorReply),
}

/// A CNI error: code, short message, details a person can act on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{msg}: {details}")]
pub struct ErrorReply {
    /// CNI error code (spec codes below 100, randport's own from 100).
    pub code: u32,
    /// Short message.
    pub msg: String,
    /// What failed, for which pod or port, and what to do.
    pub details: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_have_a_stable_wire_form() {
        let add = Request::Add(AddRequest {
            sandbox: SandboxId("abc".into()),
            pod: PodRef::new("default", "web-0"),
            pod_ips: vec!["198.18.0.5".parse().unwrap()],
            network: None,
        });
        insta::assert_snapshot!(serde_json::to_string(&add).unwrap(), @r#"{"verb":"ADD","sandbox":"abc","pod":{"namespace":"default","name":"web-0","uid":""},"podIps":["198.18.0.5"]}"#);
        let gc = Request::Gc {
            valid: Some(vec![SandboxId("a".into())]),
            network: None,
        };
        assert_eq!(
            serde_json::to_string(&gc).unwrap(),
            r#"{"verb":"GC","valid":["a"]}"#
        );
        for text in [
            r#"{"verb":"STATUS"}"#,
            r#"{"verb":"DEL","sandbox":"x"}"#,
            r#"{"verb":"LIST"}"#,
        ] {
            let req: Request = serde_json::from_str(text).unwrap();
            assert_eq!(serde_json::to_string(&req).unwrap(), text);
        }
    }
}
