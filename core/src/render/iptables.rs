//! iptables: our own chains in the `nat` table, for `iptables-restore --noflush` (IPv4)
//! and `ip6tables-restore --noflush` (IPv6).
//!
//! - `RANDPORT-HOSTPORTS`: one DNAT rule per mapping and pod address.
//! - `RANDPORT-POSTROUTING`: hairpin masquerade, one rule per mapped pod address.
//! - jumps to them from the built-in `PREROUTING` and `OUTPUT` chains, gated by
//!   `-m addrtype --dst-type LOCAL` (and, in `OUTPUT`, not loopback), and from
//!   `POSTROUTING`. Built-in chains are not ours to flush, so the jumps are probed with
//!   `iptables -C` ([`hook_jumps`]) and only the missing ones are appended.
//!
//! Rules carry the comment `sb:<hash of the sandbox id>`. Declaring our chains in the full
//! payload flushes them, so [`full_payload`] replaces everything we own in one restore.

use std::fmt::Write as _;
use std::net::IpAddr;

use crate::model::{IpFamily, SandboxRecord};
use crate::render::{dnats, hairpin_ips, is};

/// The chain holding the DNAT rules.
pub const HOSTPORTS_CHAIN: &str = "RANDPORT-HOSTPORTS";
/// The chain holding the hairpin masquerade rules.
pub const POSTROUTING_CHAIN: &str = "RANDPORT-POSTROUTING";

/// A jump from a built-in chain of the `nat` table to one of ours.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HookJump {
    /// The built-in chain (`PREROUTING`, `OUTPUT`, `POSTROUTING`).
    pub chain: &'static str,
    /// The rule's arguments, as `iptables -t nat -C <chain> <args…>` takes them.
    pub args: Vec<String>,
}

impl HookJump {
    /// The rule as an `iptables-restore` line that appends it.
    pub fn append_line(&self) -> String {
        let args: Vec<String> = self.args.iter().map(|a| restore_quote(a)).collect();
        format!("-A {} {}", self.chain, args.join(" "))
    }
}

fn restore_quote(arg: &str) -> String {
    if arg.contains(' ') {
        format!("\"{arg}\"")
    } else {
        arg.to_owned()
    }
}

fn host_bits(family: IpFamily) -> u8 {
    match family {
        IpFamily::V4 => 32,
        IpFamily::V6 => 128,
    }
}

/// The jumps our chains need in the built-in chains of `family`.
pub fn hook_jumps(family: IpFamily) -> Vec<HookJump> {
    let args = |list: &[&str]| list.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
    let loopback = match family {
        IpFamily::V4 => "127.0.0.0/8",
        IpFamily::V6 => "::1/128",
    };
    let comment = "randport: node-local host ports";
    vec![
        HookJump {
            chain: "PREROUTING",
            args: args(&[
                "-m",
                "addrtype",
                "--dst-type",
                "LOCAL",
                "-m",
                "comment",
                "--comment",
                comment,
                "-j",
                HOSTPORTS_CHAIN,
            ]),
        },
        HookJump {
            chain: "OUTPUT",
            args: args(&[
                "!",
                "-d",
                loopback,
                "-m",
                "addrtype",
                "--dst-type",
                "LOCAL",
                "-m",
                "comment",
                "--comment",
                comment,
                "-j",
                HOSTPORTS_CHAIN,
            ]),
        },
        HookJump {
            chain: "POSTROUTING",
            args: args(&[
                "-m",
                "comment",
                "--comment",
                "randport: hairpin",
                "-j",
                POSTROUTING_CHAIN,
            ]),
        },
    ]
}

fn endpoint(ip: &IpAddr, port: u16) -> String {
    match ip {
        IpAddr::V4(v4) => format!("{v4}:{port}"),
        IpAddr::V6(v6) => format!("[{v6}]:{port}"),
    }
}

/// The rule specs (without `-A`/`-D`) a record owns in `family`: (chain, spec).
fn rules(family: IpFamily, record: &SandboxRecord) -> Vec<(&'static str, String)> {
    let tag = record.sandbox.tag();
    let bits = host_bits(family);
    let mut out = Vec::new();
    for d in dnats(record).filter(|d| is(family, &d.pod_ip)) {
        let m = d.mapping;
        let proto = m.protocol.as_lower();
        let dst = m
            .host_ip
            .map(|ip| format!("-d {ip}/{bits} "))
            .unwrap_or_default();
        out.push((
            HOSTPORTS_CHAIN,
            format!(
                "{dst}-p {proto} -m {proto} --dport {} -m comment --comment \"{tag}\" -j DNAT --to-destination {}",
                m.host_port,
                endpoint(&d.pod_ip, m.container_port)
            ),
        ));
    }
    for ip in hairpin_ips(record).into_iter().filter(|ip| is(family, ip)) {
        out.push((
            POSTROUTING_CHAIN,
            format!("-s {ip}/{bits} -d {ip}/{bits} -m conntrack --ctstate DNAT -m comment --comment \"{tag}\" -j MASQUERADE"),
        ));
    }
    out
}

/// The whole of our chains for `family`, plus the jumps in `missing_jumps` (those that
/// `iptables -C` did not find), for one `iptables-restore --noflush`.
pub fn full_payload(
    family: IpFamily,
    records: &[SandboxRecord],
    missing_jumps: &[HookJump],
) -> String {
    let mut sorted: Vec<&SandboxRecord> = records.iter().collect();
    sorted.sort_by(|a, b| a.sandbox.cmp(&b.sandbox));
    let mut out = String::from("*nat\n");
    let _ = writeln!(out, ":{HOSTPORTS_CHAIN} - [0:0]");
    let _ = writeln!(out, ":{POSTROUTING_CHAIN} - [0:0]");
    for record in sorted {
        for (chain, spec) in rules(family, record) {
            let _ = writeln!(out, "-A {chain} {spec}");
        }
    }
    for jump in missing_jumps {
        let _ = writeln!(out, "{}", jump.append_line());
    }
    out.push_str("COMMIT\n");
    out
}

/// The payload that appends one sandbox's rules; `None` when it has none in `family`.
pub fn add_sandbox(family: IpFamily, record: &SandboxRecord) -> Option<String> {
    change(family, record, "-A")
}

/// The payload that appends several sandboxes' rules in one `iptables-restore`; `None`
/// when none has any in `family`.
pub fn add_sandboxes(family: IpFamily, records: &[SandboxRecord]) -> Option<String> {
    payload(
        records.iter().flat_map(|r| rules(family, r)).collect(),
        "-A",
    )
}

/// The payload that deletes one sandbox's rules; `None` when it has none in `family`.
/// iptables cannot delete a rule that is gone, so the agent rebuilds with
/// [`full_payload`] when this fails.
pub fn remove_sandbox(family: IpFamily, record: &SandboxRecord) -> Option<String> {
    change(family, record, "-D")
}

fn change(family: IpFamily, record: &SandboxRecord, op: &str) -> Option<String> {
    payload(rules(family, record), op)
}

/// `op` (`-A` or `-D`) of each rule in one `*nat … COMMIT`; `None` when there are none.
fn payload(rules: Vec<(&str, String)>, op: &str) -> Option<String> {
    if rules.is_empty() {
        return None;
    }
    let mut out = String::from("*nat\n");
    for (chain, spec) in rules {
        let _ = writeln!(out, "{op} {chain} {spec}");
    }
    out.push_str("COMMIT\n");
    Some(out)
}

/// How many rules a record owns in `family` (what a listing must show).
pub fn rule_count(family: IpFamily, record: &SandboxRecord) -> usize {
    rules(family, record).len()
}

/// The payload that removes everything we own in `family`: our chains are declared
/// (which creates or flushes them), the jumps in `present_jumps` deleted, the chains
/// deleted.
pub fn teardown_payload(present_jumps: &[HookJump]) -> String {
    let mut out = String::from("*nat\n");
    for chain in [HOSTPORTS_CHAIN, POSTROUTING_CHAIN] {
        let _ = writeln!(out, ":{chain} - [0:0]");
    }
    for jump in present_jumps {
        let _ = writeln!(out, "{}", jump.append_line().replacen("-A ", "-D ", 1));
    }
    for chain in [HOSTPORTS_CHAIN, POSTROUTING_CHAIN] {
        let _ = writeln!(out, "-X {chain}");
    }
    out.push_str("COMMIT\n");
    out
}

#[cfg(test)]
mod batch_tests {
    use super::*;
    use crate::examples;

    #[test]
    fn a_batch_appends_what_each_sandbox_would_append_alone() {
        let all = examples::all();
        for family in [IpFamily::V4, IpFamily::V6] {
            let alone: Vec<String> = all
                .iter()
                .filter_map(|r| add_sandbox(family, r))
                .flat_map(|p| {
                    p.lines()
                        .filter(|l| l.starts_with("-A"))
                        .map(str::to_owned)
                        .collect::<Vec<_>>()
                })
                .collect();
            let batch = add_sandboxes(family, &all).unwrap();
            assert_eq!(batch, format!("*nat\n{}\nCOMMIT\n", alone.join("\n")));
        }
        assert_eq!(add_sandboxes(IpFamily::V4, &[]), None);
    }
}
