//! The `tkestack.io/portmapping` annotation, exactly as tkestack/galaxy writes it.
//!
//! A pod asks for random host ports by carrying the key with the value `""`. Once its
//! ports are mapped the value becomes a compact JSON array of galaxy's `Port` struct, in
//! galaxy's field order, with `hostIP` left out when empty:
//!
//! ```
//! use randport_core::annotation::{decode, encode, AnnotationValue};
//! use randport_core::PodRef;
//!
//! let pod = PodRef::new("default", "hello-0");
//! let text = r#"[{"hostPort":23817,"containerPort":9040,"protocol":"TCP","podName":"hello-0","podIP":"198.18.0.5"}]"#;
//! let AnnotationValue::Mapped(entries) = decode(&pod, text).unwrap() else { panic!() };
//! assert_eq!(entries[0].host_port, 23817);
//! assert_eq!(encode(&entries), text);
//! assert_eq!(decode(&pod, "").unwrap(), AnnotationValue::Requested);
//! ```

use std::net::IpAddr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::model::{PodRef, Protocol};

/// One mapped port: galaxy's `Port` struct.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortEntry {
    /// The host port (galaxy: `HostPort > 0`).
    #[serde(rename = "hostPort")]
    pub host_port: u16,
    /// The container port.
    #[serde(rename = "containerPort")]
    pub container_port: u16,
    /// `"TCP"`, `"UDP"` or `"SCTP"`; read in any case, an empty string is TCP.
    #[serde(with = "protocol_text")]
    pub protocol: Protocol,
    /// The node address the port answers on; omitted when it answers on all of them.
    #[serde(
        rename = "hostIP",
        default,
        skip_serializing_if = "Option::is_none",
        with = "optional_ip"
    )]
    pub host_ip: Option<IpAddr>,
    /// The pod's name.
    #[serde(rename = "podName", default)]
    pub pod_name: String,
    /// The pod's primary address; written as `""` when unknown, as galaxy does.
    #[serde(rename = "podIP", default, with = "optional_ip")]
    pub pod_ip: Option<IpAddr>,
}

/// What the annotation says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AnnotationValue {
    /// `""`: mapping requested, none written yet.
    Requested,
    /// The ports written by randport or galaxy (`null`, which Go writes for a pod without
    /// ports, reads as an empty list).
    Mapped(Vec<PortEntry>),
}

/// The annotation value could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "pod {pod}: the port-mapping annotation is not a galaxy port list ({reason}); value: \
     {quoted}; set it to \"\" to ask for new ports"
)]
pub struct AnnotationError {
    /// The pod whose annotation it is.
    pub pod: PodRef,
    /// What the JSON decoder said.
    pub reason: String,
    /// The offending value, quoted and shortened.
    pub quoted: String,
}

/// How much of an offending value an error quotes.
const QUOTE_LIMIT: usize = 80;

/// Reads an annotation value.
pub fn decode(pod: &PodRef, value: &str) -> Result<AnnotationValue, AnnotationError> {
    let trimmed = value.trim();
    if trimmed.is_empty() {
        return Ok(AnnotationValue::Requested);
    }
    match serde_json::from_str::<Option<Vec<PortEntry>>>(trimmed) {
        Ok(entries) => Ok(AnnotationValue::Mapped(entries.unwrap_or_default())),
        Err(err) => Err(AnnotationError {
            pod: pod.clone(),
            reason: err.to_string(),
            quoted: quote_shortened(value, QUOTE_LIMIT),
        }),
    }
}

/// Writes the annotation value: compact JSON, galaxy's field order.
pub fn encode(entries: &[PortEntry]) -> String {
    // Serializing plain structs of numbers and strings cannot fail.
    serde_json::to_string(entries).unwrap_or_else(|_| String::from("[]"))
}

/// `text` as a JSON string literal, cut to `limit` characters with `…` when longer.
fn quote_shortened(text: &str, limit: usize) -> String {
    let mut shown: String = text.chars().take(limit).collect();
    if text.chars().count() > limit {
        shown.push('…');
    }
    serde_json::Value::String(shown).to_string()
}

mod protocol_text {
    use super::*;

    pub fn serialize<S: Serializer>(p: &Protocol, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(p.as_k8s())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Protocol, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

mod optional_ip {
    use super::*;

    pub fn serialize<S: Serializer>(ip: &Option<IpAddr>, s: S) -> Result<S::Ok, S::Error> {
        match ip {
            Some(ip) => s.collect_str(ip),
            None => s.serialize_str(""),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<IpAddr>, D::Error> {
        let text = String::deserialize(d)?;
        if text.is_empty() {
            return Ok(None);
        }
        text.parse()
            .map(Some)
            .map_err(|_| serde::de::Error::custom(format!("{text:?} is not an IP address")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod() -> PodRef {
        PodRef::new("default", "hello-5d9c7-x2x4k")
    }

    /// Values shaped exactly as galaxy's `json.Marshal([]k8s.Port)` writes them.
    const GALAXY_VALUES: &[&str] = &[
        r#"[{"hostPort":23817,"containerPort":9040,"protocol":"TCP","podName":"hello-5d9c7-x2x4k","podIP":"198.18.0.5"}]"#,
        r#"[{"hostPort":31001,"containerPort":80,"protocol":"TCP","podName":"web-0","podIP":"198.18.0.7"},{"hostPort":31002,"containerPort":53,"protocol":"UDP","podName":"web-0","podIP":"198.18.0.7"}]"#,
        r#"[{"hostPort":8080,"containerPort":80,"protocol":"TCP","hostIP":"192.0.2.1","podName":"web-1","podIP":"198.18.0.8"}]"#,
        r#"[{"hostPort":20001,"containerPort":3868,"protocol":"SCTP","podName":"diameter-0","podIP":"2001:db8:1:1::5"}]"#,
        r#"[{"hostPort":20002,"containerPort":80,"protocol":"TCP","podName":"pending-0","podIP":""}]"#,
        "[]",
    ];

    #[test]
    fn galaxy_values_round_trip_byte_for_byte() {
        for text in GALAXY_VALUES {
            let AnnotationValue::Mapped(entries) = decode(&pod(), text).unwrap() else {
                panic!("{text} read as a request");
            };
            assert_eq!(&encode(&entries), text);
        }
    }

    #[test]
    fn empty_value_is_a_request() {
        assert_eq!(decode(&pod(), "").unwrap(), AnnotationValue::Requested);
        assert_eq!(decode(&pod(), "  \n").unwrap(), AnnotationValue::Requested);
    }

    #[test]
    fn go_null_and_loose_forms_are_read() {
        assert_eq!(
            decode(&pod(), "null").unwrap(),
            AnnotationValue::Mapped(vec![])
        );
        // Pretty-printed, lower-case protocol, fields missing that Go would zero.
        let loose = r#"[ {"hostPort": 20000, "containerPort": 80, "protocol": "udp"} ]"#;
        let AnnotationValue::Mapped(entries) = decode(&pod(), loose).unwrap() else {
            panic!()
        };
        assert_eq!(entries[0].protocol, Protocol::Udp);
        assert_eq!(entries[0].pod_name, "");
        assert_eq!(entries[0].pod_ip, None);
        assert_eq!(
            encode(&entries),
            r#"[{"hostPort":20000,"containerPort":80,"protocol":"UDP","podName":"","podIP":""}]"#
        );
    }

    #[test]
    fn garbage_names_the_pod_and_quotes_the_value_shortened() {
        let long = format!("{{not json {}", "x".repeat(200));
        let err = decode(&pod(), &long).unwrap_err();
        let text = err.to_string();
        assert!(text.starts_with("pod default/hello-5d9c7-x2x4k: the port-mapping annotation"));
        assert!(text.contains(r#"value: "{not json xxxx"#), "{text}");
        assert!(text.contains("…\""), "{text}");
        assert!(text.len() < 300, "error not shortened: {text}");
        assert!(text.ends_with("set it to \"\" to ask for new ports"));
    }

    #[test]
    fn wrong_types_and_bad_fields_are_errors() {
        for bad in [
            r#"{"hostPort":1}"#,
            r#"[{"hostPort":70000,"containerPort":80,"protocol":"TCP"}]"#,
            r#"[{"hostPort":-1,"containerPort":80,"protocol":"TCP"}]"#,
            r#"[{"hostPort":1,"containerPort":80,"protocol":"ICMP"}]"#,
            r#"[{"hostPort":1,"containerPort":80,"protocol":"TCP","podIP":"nope"}]"#,
            "true",
        ] {
            let err = decode(&pod(), bad).unwrap_err();
            assert_eq!(err.pod, pod());
            assert!(err.quoted.starts_with('"'), "{err}");
        }
    }

    #[test]
    fn short_values_are_quoted_whole() {
        assert_eq!(quote_shortened("abc", 80), "\"abc\"");
        assert_eq!(quote_shortened("abcd", 3), "\"abc…\"");
    }
}
