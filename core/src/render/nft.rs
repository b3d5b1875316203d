//! nftables: one table of our own (family `inet`), map lookups per new connection.
//!
//! Layout (after CRI-O's, the best found):
//! - maps `hostipports4/6`: `hostIP . protocol . hostPort -> podIP . containerPort`, looked
//!   up first; maps `hostports4/6`: `protocol . hostPort -> podIP . containerPort`.
//! - chain `hostports` does the lookups; base chains `prerouting` and `output` jump there
//!   only when `fib daddr type local`, so traffic routed *through* the node is never
//!   translated; `output` also skips loopback destinations.
//! - sets `hairpin4/6` of `podIP . podIP` and a `postrouting` rule masquerading DNATed
//!   traffic whose source and destination are the same pod.
//! - every element carries the comment `sb:<hash of the sandbox id>`.
//!
//! [`ruleset`] replaces the whole table in one transaction; [`add_sandbox`] and
//! [`remove_sandbox`] change one sandbox's elements. A removal re-adds each element with
//! its value before deleting it, so it succeeds when the element is already gone and fails
//! (changing nothing) when the key now maps somewhere else.

use std::fmt::{self, Write as _};
use std::net::IpAddr;

use crate::model::{IpFamily, Protocol, SandboxRecord};
use crate::render::{Dnat, dnats, hairpin_ips};

/// The default table name.
pub const DEFAULT_TABLE: &str = "randport";

/// One field of a set element's key or value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Field {
    /// An `ipv4_addr` or `ipv6_addr`.
    Ip(IpAddr),
    /// An `inet_proto`.
    Proto(Protocol),
    /// An `inet_service`.
    Port(u16),
}

impl fmt::Display for Field {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Field::Ip(ip) => write!(f, "{ip}"),
            Field::Proto(p) => f.write_str(p.as_lower()),
            Field::Port(port) => write!(f, "{port}"),
        }
    }
}

/// One element of one of our maps or sets, as data: what `nft -f` is given as text and
/// what the agent sends the kernel as a netlink message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetElement {
    /// The map or set (one of [`SETS`]).
    pub set: &'static str,
    /// The key, field by field (a concatenation).
    pub key: Vec<Field>,
    /// The value, for maps.
    pub value: Option<Vec<Field>>,
    /// The sandbox's tag, written as the element's comment.
    pub tag: String,
}

fn joined(fields: &[Field]) -> String {
    fields
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(" . ")
}

impl SetElement {
    /// The key as nft writes it (`tcp . 24427`).
    pub fn key_text(&self) -> String {
        joined(&self.key)
    }
}

fn suffix(ip: &IpAddr) -> &'static str {
    match IpFamily::of(ip) {
        IpFamily::V4 => "4",
        IpFamily::V6 => "6",
    }
}

fn dnat_element(tag: &str, d: Dnat<'_>) -> SetElement {
    let m = d.mapping;
    let (set, key) = match m.host_ip {
        Some(host_ip) => (
            if suffix(&host_ip) == "4" {
                "hostipports4"
            } else {
                "hostipports6"
            },
            vec![
                Field::Ip(host_ip),
                Field::Proto(m.protocol),
                Field::Port(m.host_port),
            ],
        ),
        None => (
            if suffix(&d.pod_ip) == "4" {
                "hostports4"
            } else {
                "hostports6"
            },
            vec![Field::Proto(m.protocol), Field::Port(m.host_port)],
        ),
    };
    SetElement {
        set,
        key,
        value: Some(vec![Field::Ip(d.pod_ip), Field::Port(m.container_port)]),
        tag: tag.to_owned(),
    }
}

/// Every element one sandbox owns in our maps and sets: its DNATs, then its hairpin pairs.
pub fn elements(record: &SandboxRecord) -> Vec<SetElement> {
    let tag = record.sandbox.tag();
    let mut out: Vec<SetElement> = dnats(record).map(|d| dnat_element(&tag, d)).collect();
    out.extend(hairpin_ips(record).into_iter().map(|ip| SetElement {
        set: if suffix(&ip) == "4" {
            "hairpin4"
        } else {
            "hairpin6"
        },
        key: vec![Field::Ip(ip), Field::Ip(ip)],
        value: None,
        tag: tag.clone(),
    }));
    out
}

fn element_text(e: &SetElement, with_comment: bool) -> String {
    let comment = if with_comment {
        format!(" comment \"{}\"", e.tag)
    } else {
        String::new()
    };
    match &e.value {
        Some(value) => format!("{}{comment} : {}", e.key_text(), joined(value)),
        None => format!("{}{comment}", e.key_text()),
    }
}

/// Our maps and sets: name, declared type, what it holds.
pub const SETS: [(&str, &str, &str); 6] = [
    (
        "hostipports4",
        "map",
        "ipv4_addr . inet_proto . inet_service : ipv4_addr . inet_service",
    ),
    (
        "hostipports6",
        "map",
        "ipv6_addr . inet_proto . inet_service : ipv6_addr . inet_service",
    ),
    (
        "hostports4",
        "map",
        "inet_proto . inet_service : ipv4_addr . inet_service",
    ),
    (
        "hostports6",
        "map",
        "inet_proto . inet_service : ipv6_addr . inet_service",
    ),
    ("hairpin4", "set", "ipv4_addr . ipv4_addr"),
    ("hairpin6", "set", "ipv6_addr . ipv6_addr"),
];

/// Choices that change the table's chains.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NftOptions {
    /// Map `127.0.0.0/8:hostPort` from the node itself too (IPv4 only; the node needs
    /// `net.ipv4.conf.all.route_localnet=1`, which the agent sets). The table then also
    /// drops every packet for 127.0.0.0/8 that did not come from the loopback interface,
    /// before anything else sees it, against CVE-2020-8558-style access from other hosts.
    pub localhost: bool,
}

/// The whole table with every sandbox's elements, as one `nft -f` transaction that
/// creates the table if missing, deletes it and builds it anew (atomically).
pub fn ruleset(table: &str, records: &[SandboxRecord]) -> String {
    ruleset_with(table, records, NftOptions::default())
}

/// [`ruleset`] with `options`.
pub fn ruleset_with(table: &str, records: &[SandboxRecord], options: NftOptions) -> String {
    let mut sorted: Vec<&SandboxRecord> = records.iter().collect();
    sorted.sort_by(|a, b| a.sandbox.cmp(&b.sandbox));
    let all: Vec<SetElement> = sorted.iter().flat_map(|r| elements(r)).collect();

    let mut out = String::new();
    let _ = writeln!(out, "table inet {table} {{}}");
    let _ = writeln!(out, "delete table inet {table}");
    let _ = writeln!(out, "table inet {table} {{");
    for (name, kind, ty) in SETS {
        let _ = writeln!(out, "\t{kind} {name} {{");
        let _ = writeln!(out, "\t\ttype {ty}");
        let members: Vec<String> = all
            .iter()
            .filter(|e| e.set == name)
            .map(|e| element_text(e, true))
            .collect();
        if !members.is_empty() {
            let _ = writeln!(
                out,
                "\t\telements = {{\n\t\t\t{}\n\t\t}}",
                members.join(",\n\t\t\t")
            );
        }
        let _ = writeln!(out, "\t}}");
    }
    for chain in chains(options) {
        chain.render(&mut out);
    }
    out.push_str("}\n");
    out
}

/// One chain of our table, as data: the text rendering writes it, the watchdog counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chain {
    /// Its name.
    pub name: &'static str,
    /// For a base chain: `type … hook … priority …; policy …;`.
    pub base: Option<&'static str>,
    /// Its rules, in order.
    pub rules: &'static [&'static str],
}

impl Chain {
    fn render(&self, out: &mut String) {
        let _ = writeln!(out, "\tchain {} {{", self.name);
        if let Some(base) = self.base {
            let _ = writeln!(out, "\t\t{base}");
        }
        for rule in self.rules {
            let _ = writeln!(out, "\t\t{rule}");
        }
        let _ = writeln!(out, "\t}}");
    }
}

/// The chains: lookups reached only for local destinations, and hairpin masquerade.
pub const CHAINS: [Chain; 4] = [
    Chain {
        name: "hostports",
        base: None,
        rules: &[
            "meta nfproto ipv4 dnat ip to ip daddr . meta l4proto . th dport map @hostipports4",
            "meta nfproto ipv4 dnat ip to meta l4proto . th dport map @hostports4",
            "meta nfproto ipv6 dnat ip6 to ip6 daddr . meta l4proto . th dport map @hostipports6",
            "meta nfproto ipv6 dnat ip6 to meta l4proto . th dport map @hostports6",
        ],
    },
    Chain {
        name: "prerouting",
        base: Some("type nat hook prerouting priority -100; policy accept;"),
        // Never loopback destinations arriving from outside: `fib daddr type local` is
        // true for 127.0.0.1, and a SYN another host sends to 127.0.0.1:hostPort would
        // otherwise be translated to the pod (CVE-2020-8558, moby#41872).
        rules: &[
            "meta nfproto ipv4 ip daddr != 127.0.0.0/8 fib daddr type local goto hostports",
            "meta nfproto ipv6 ip6 daddr != ::1 fib daddr type local goto hostports",
        ],
    },
    Chain {
        name: "output",
        base: Some("type nat hook output priority -100; policy accept;"),
        rules: &[
            "meta nfproto ipv4 ip daddr != 127.0.0.0/8 fib daddr type local goto hostports",
            "meta nfproto ipv6 ip6 daddr != ::1 fib daddr type local goto hostports",
        ],
    },
    Chain {
        name: "postrouting",
        base: Some("type nat hook postrouting priority 100; policy accept;"),
        rules: &[
            "meta nfproto ipv4 ct status dnat ip saddr . ip daddr @hairpin4 masquerade",
            "meta nfproto ipv6 ct status dnat ip6 saddr . ip6 daddr @hairpin6 masquerade",
        ],
    },
];

/// With localhost access: loopback destinations reach the lookups from the node itself,
/// their source is masqueraded (a pod cannot answer 127.0.0.1), and loopback destinations
/// arriving on any other interface are dropped first of all.
pub const LOCALHOST_CHAINS: [Chain; 3] = [
    Chain {
        name: "localhost_output",
        base: Some("type nat hook output priority -99; policy accept;"),
        rules: &["meta nfproto ipv4 ip daddr 127.0.0.0/8 goto hostports"],
    },
    Chain {
        name: "localhost_postrouting",
        base: Some("type nat hook postrouting priority 101; policy accept;"),
        rules: &["meta nfproto ipv4 ct status dnat ip saddr 127.0.0.0/8 masquerade"],
    },
    Chain {
        name: "localhost_guard",
        base: Some("type filter hook prerouting priority -300; policy accept;"),
        rules: &["meta nfproto ipv4 iifname != \"lo\" ip daddr 127.0.0.0/8 counter drop"],
    },
];

/// Our chains with `options`, in the order the table lists them.
pub fn chains(options: NftOptions) -> Vec<&'static Chain> {
    let extra: &[Chain] = if options.localhost {
        &LOCALHOST_CHAINS
    } else {
        &[]
    };
    CHAINS.iter().chain(extra).collect()
}

/// How many chains, maps and sets, and rules our table holds with `options`: what a
/// reading of the table's shape must find for it to be ours, whole.
pub fn object_counts(options: NftOptions) -> (usize, usize, usize) {
    let chains = chains(options);
    let rules = chains.iter().map(|c| c.rules.len()).sum();
    (chains.len(), SETS.len(), rules)
}

/// The transaction that adds one sandbox's elements to an existing table.
pub fn add_sandbox(table: &str, record: &SandboxRecord) -> String {
    let mut out = String::new();
    for e in elements(record) {
        let _ = writeln!(
            out,
            "add element inet {table} {} {{ {} }}",
            e.set,
            element_text(&e, true)
        );
    }
    out
}

/// The transaction that removes one sandbox's elements; idempotent, see the module docs.
pub fn remove_sandbox(table: &str, record: &SandboxRecord) -> String {
    let mut out = String::new();
    for e in elements(record) {
        let _ = writeln!(
            out,
            "add element inet {table} {} {{ {} }}",
            e.set,
            element_text(&e, false)
        );
        let _ = writeln!(
            out,
            "delete element inet {table} {} {{ {} }}",
            e.set,
            e.key_text()
        );
    }
    out
}

/// How many tagged elements a record owns in the table (what a listing must show).
pub fn element_count(record: &SandboxRecord) -> usize {
    elements(record).len()
}

/// The transaction that deletes the whole table, whether it exists or not.
pub fn teardown(table: &str) -> String {
    format!("table inet {table} {{}}\ndelete table inet {table}\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_has_four_chains_six_sets_and_ten_rules_three_chains_more_for_localhost() {
        assert_eq!(object_counts(NftOptions::default()), (4, 6, 10));
        assert_eq!(object_counts(NftOptions { localhost: true }), (7, 6, 13));
    }
}
