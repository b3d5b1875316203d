//! iptables: our own chains in the `nat` table, for `iptables-restore --noflush` (IPv4)
//! and `ip6tables-restore --noflush` (IPv6).
//!
//! - `RANDPORT-HOSTPORTS`: one DNAT rule per mapping and pod address.
//! - `RANDPORT-POSTROUTING`: hairpin masquerade, one rule per mapped pod address.
//! - jumps to them from the built-in `PREROUTING` and `OUTPUT` chains, gated by
//!   `-m addrtype --dst-type LOCAL` (and, in `OUTPUT`, not loopback), and from
//!   `POSTROUTING`. Built-in chains are not ours to flush, so only the missing jumps
//!   ([`NatTable::missing_jumps`]) are appended.
//!
//! Rules are data ([`Rule`]: a chain and its arguments, in the order `iptables-save`
//! prints them); the payloads are written from them, and what `iptables-save` prints is
//! read back into the same structure ([`NatTable::parse`]), so the agent compares rules,
//! not text. Rules carry the comment `sb:<hash of the sandbox id>`. Declaring our chains
//! in the full payload flushes them, so [`full_payload`] replaces everything we own in
//! one restore.

use std::fmt::Write as _;
use std::net::IpAddr;

use crate::model::{IpFamily, SandboxRecord};
use crate::render::{dnats, hairpin_ips, is};

/// The chain holding the DNAT rules.
pub const HOSTPORTS_CHAIN: &str = "RANDPORT-HOSTPORTS";
/// The chain holding the hairpin masquerade rules.
pub const POSTROUTING_CHAIN: &str = "RANDPORT-POSTROUTING";
/// Our chains.
pub const CHAINS: [&str; 2] = [HOSTPORTS_CHAIN, POSTROUTING_CHAIN];

/// One rule of the nat table: its chain and its arguments, unquoted, in the order
/// `iptables-save` prints them (the order they are written in here).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Rule {
    /// The chain it is in.
    pub chain: String,
    /// Its arguments, as `iptables -t nat -C <chain> <args…>` takes them.
    pub args: Vec<String>,
}

/// A line of `iptables-save` output that is not what it prints.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("iptables-save line {line}: {reason}: {text:?}")]
pub struct SaveParseError {
    /// The line's number, from 1.
    pub line: usize,
    /// What is wrong with it.
    pub reason: &'static str,
    /// The line.
    pub text: String,
}

impl Rule {
    fn new(chain: &str, args: impl IntoIterator<Item = impl Into<String>>) -> Rule {
        Rule {
            chain: chain.to_owned(),
            args: args.into_iter().map(Into::into).collect(),
        }
    }

    /// The rule as an `iptables-restore` line: `op` is `-A` (append), `-D` (delete).
    /// A comment is quoted, as `iptables-save` quotes it.
    pub fn line(&self, op: &str) -> String {
        let mut out = format!("{op} {}", self.chain);
        let mut after_comment = false;
        for arg in &self.args {
            out.push(' ');
            if after_comment || arg.is_empty() || arg.contains([' ', '"', '\\', '\'']) {
                out.push('"');
                for c in arg.chars() {
                    if matches!(c, '"' | '\\') {
                        out.push('\\');
                    }
                    out.push(c);
                }
                out.push('"');
            } else {
                out.push_str(arg);
            }
            after_comment = arg == "--comment";
        }
        out
    }

    /// The value of its `--comment`, if it has one.
    pub fn comment(&self) -> Option<&str> {
        self.args
            .iter()
            .position(|a| a == "--comment")
            .and_then(|i| self.args.get(i + 1))
            .map(String::as_str)
    }

    /// Reads an `-A <chain> <args…>` line as `iptables-save` prints it.
    pub fn parse(line: &str) -> Result<Rule, &'static str> {
        let mut words = split_words(line)?.into_iter();
        if words.next().as_deref() != Some("-A") {
            return Err("not an -A line");
        }
        let chain = words.next().ok_or("no chain")?;
        Ok(Rule {
            chain,
            args: words.collect(),
        })
    }
}

/// Splits a line into words as `iptables-restore` does: at blanks outside double quotes;
/// inside them a backslash takes the next character as it is.
fn split_words(line: &str) -> Result<Vec<String>, &'static str> {
    let mut words = Vec::new();
    let mut word: Option<String> = None;
    let mut chars = line.chars();
    let mut quoted = false;
    while let Some(c) = chars.next() {
        match c {
            '"' => {
                quoted = !quoted;
                word.get_or_insert_default();
            }
            '\\' if quoted => word
                .get_or_insert_default()
                .push(chars.next().ok_or("a backslash at the end")?),
            c if c.is_whitespace() && !quoted => words.extend(word.take()),
            c => word.get_or_insert_default().push(c),
        }
    }
    if quoted {
        return Err("an unterminated quote");
    }
    words.extend(word);
    Ok(words)
}

/// The nat table as `iptables-save -t nat` prints it: its chains and its rules, in order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NatTable {
    /// Every chain declared (built-in and user-defined).
    pub chains: Vec<String>,
    /// Every rule, chain by chain, in order.
    pub rules: Vec<Rule>,
}

impl NatTable {
    /// Reads the `*nat` section of `iptables-save` output (none: an empty table, as a
    /// node without the nat table loaded prints nothing).
    pub fn parse(saved: &str) -> Result<NatTable, SaveParseError> {
        let mut table = NatTable::default();
        let mut in_nat = false;
        for (i, text) in saved.lines().enumerate() {
            let err = |reason| SaveParseError {
                line: i + 1,
                reason,
                text: text.to_owned(),
            };
            let line = text.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            if let Some(name) = line.strip_prefix('*') {
                in_nat = name == "nat";
            } else if !in_nat || line == "COMMIT" {
                continue;
            } else if let Some(declared) = line.strip_prefix(':') {
                let name = declared
                    .split_whitespace()
                    .next()
                    .ok_or(err("no chain name"))?;
                table.chains.push(name.to_owned());
            } else {
                table.rules.push(Rule::parse(line).map_err(err)?);
            }
        }
        Ok(table)
    }

    /// Whether `chain` is declared.
    pub fn has_chain(&self, chain: &str) -> bool {
        self.chains.iter().any(|c| c == chain)
    }

    /// The rules whose comment is `tag` (one sandbox's), sorted.
    pub fn tagged(&self, tag: &str) -> Vec<&Rule> {
        let mut found: Vec<&Rule> = self
            .rules
            .iter()
            .filter(|r| r.comment() == Some(tag))
            .collect();
        found.sort();
        found
    }

    /// The jumps to our chains that `family` needs and this table has.
    pub fn present_jumps(&self, family: IpFamily) -> Vec<Rule> {
        hook_jumps(family)
            .into_iter()
            .filter(|j| self.rules.contains(j))
            .collect()
    }

    /// The jumps to our chains that `family` needs and this table lacks.
    pub fn missing_jumps(&self, family: IpFamily) -> Vec<Rule> {
        hook_jumps(family)
            .into_iter()
            .filter(|j| !self.rules.contains(j))
            .collect()
    }

    /// How this table differs from what `records` need in `family`: our chains, every
    /// rule in them, the jumps to them.
    pub fn drift(&self, family: IpFamily, records: &[SandboxRecord]) -> Drift {
        let mut expected: Vec<Rule> = records.iter().flat_map(|r| rules(family, r)).collect();
        let mut found: Vec<Rule> = self
            .rules
            .iter()
            .filter(|r| CHAINS.contains(&r.chain.as_str()))
            .cloned()
            .collect();
        expected.sort();
        found.sort();
        let (missing, unexpected) = sorted_difference(expected, found);
        Drift {
            missing_chains: CHAINS.into_iter().filter(|c| !self.has_chain(c)).collect(),
            missing_rules: missing,
            unexpected_rules: unexpected,
            missing_jumps: self.missing_jumps(family),
        }
    }
}

/// (in `a` only, in `b` only) of two sorted lists, counting repeats.
fn sorted_difference(a: Vec<Rule>, b: Vec<Rule>) -> (Vec<Rule>, Vec<Rule>) {
    let (mut only_a, mut only_b) = (Vec::new(), Vec::new());
    let (mut a, mut b) = (a.into_iter().peekable(), b.into_iter().peekable());
    loop {
        match (a.peek(), b.peek()) {
            (Some(x), Some(y)) if x == y => {
                a.next();
                b.next();
            }
            (Some(x), Some(y)) if x < y => only_a.extend(a.next()),
            (Some(_), Some(_)) | (None, Some(_)) => only_b.extend(b.next()),
            (Some(_), None) => only_a.extend(a.next()),
            (None, None) => return (only_a, only_b),
        }
    }
}

/// What the nat table lacks, or has that it should not, in our chains and jumps.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Drift {
    /// Our chains that are not declared.
    pub missing_chains: Vec<&'static str>,
    /// Rules of our sandboxes that are not in our chains.
    pub missing_rules: Vec<Rule>,
    /// Rules in our chains that no sandbox of ours has (or has fewer times).
    pub unexpected_rules: Vec<Rule>,
    /// Jumps to our chains that are not in the built-in chains.
    pub missing_jumps: Vec<Rule>,
}

impl Drift {
    /// Whether the table holds exactly what it should.
    pub fn is_empty(&self) -> bool {
        self == &Drift::default()
    }
}

fn host_bits(family: IpFamily) -> u8 {
    match family {
        IpFamily::V4 => 32,
        IpFamily::V6 => 128,
    }
}

/// The jumps our chains need in the built-in chains of `family`.
pub fn hook_jumps(family: IpFamily) -> Vec<Rule> {
    let loopback = match family {
        IpFamily::V4 => "127.0.0.0/8",
        IpFamily::V6 => "::1/128",
    };
    let local = ["-m", "addrtype", "--dst-type", "LOCAL"];
    let comment = [
        "-m",
        "comment",
        "--comment",
        "randport: node-local host ports",
    ];
    let to_hostports = ["-j", HOSTPORTS_CHAIN];
    vec![
        // Never loopback destinations arriving from outside: `--dst-type LOCAL` is true
        // for 127.0.0.1, and a SYN another host sends to 127.0.0.1:hostPort would
        // otherwise be translated to the pod (CVE-2020-8558, moby#41872).
        Rule::new(
            "PREROUTING",
            [&["!", "-d", loopback][..], &local, &comment, &to_hostports].concat(),
        ),
        Rule::new(
            "OUTPUT",
            [&["!", "-d", loopback][..], &local, &comment, &to_hostports].concat(),
        ),
        Rule::new(
            "POSTROUTING",
            [
                "-m",
                "comment",
                "--comment",
                "randport: hairpin",
                "-j",
                POSTROUTING_CHAIN,
            ],
        ),
    ]
}

fn endpoint(ip: &IpAddr, port: u16) -> String {
    match ip {
        IpAddr::V4(v4) => format!("{v4}:{port}"),
        IpAddr::V6(v6) => format!("[{v6}]:{port}"),
    }
}

/// The rules a record owns in `family`: its DNATs, then its hairpin masquerades.
pub fn rules(family: IpFamily, record: &SandboxRecord) -> Vec<Rule> {
    let tag = record.sandbox.tag();
    let bits = host_bits(family);
    let mut out = Vec::new();
    for d in dnats(record).filter(|d| is(family, &d.pod_ip)) {
        let m = d.mapping;
        let proto = m.protocol.as_lower();
        let dst = m.host_ip.map(|ip| format!("{ip}/{bits}"));
        let port = m.host_port.to_string();
        let to = endpoint(&d.pod_ip, m.container_port);
        let mut args: Vec<&str> = Vec::new();
        if let Some(dst) = &dst {
            args.extend(["-d", dst]);
        }
        args.extend(["-p", proto, "-m", proto, "--dport", &port]);
        args.extend(["-m", "comment", "--comment", &tag]);
        args.extend(["-j", "DNAT", "--to-destination", &to]);
        out.push(Rule::new(HOSTPORTS_CHAIN, args));
    }
    for ip in hairpin_ips(record).into_iter().filter(|ip| is(family, ip)) {
        let host = format!("{ip}/{bits}");
        out.push(Rule::new(
            POSTROUTING_CHAIN,
            [
                "-s",
                &host,
                "-d",
                &host,
                "-m",
                "conntrack",
                "--ctstate",
                "DNAT",
                "-m",
                "comment",
                "--comment",
                &tag,
                "-j",
                "MASQUERADE",
            ],
        ));
    }
    out
}

/// The whole of our chains for `family`, plus the jumps in `missing_jumps` (those the
/// table lacks), for one `iptables-restore --noflush`.
pub fn full_payload(family: IpFamily, records: &[SandboxRecord], missing_jumps: &[Rule]) -> String {
    let mut sorted: Vec<&SandboxRecord> = records.iter().collect();
    sorted.sort_by(|a, b| a.sandbox.cmp(&b.sandbox));
    let mut out = String::from("*nat\n");
    for chain in CHAINS {
        let _ = writeln!(out, ":{chain} - [0:0]");
    }
    for record in sorted {
        for rule in rules(family, record) {
            let _ = writeln!(out, "{}", rule.line("-A"));
        }
    }
    for jump in missing_jumps {
        let _ = writeln!(out, "{}", jump.line("-A"));
    }
    out.push_str("COMMIT\n");
    out
}

/// The payload that appends one sandbox's rules; `None` when it has none in `family`.
pub fn add_sandbox(family: IpFamily, record: &SandboxRecord) -> Option<String> {
    payload(&rules(family, record), "-A")
}

/// The payload that appends several sandboxes' rules in one `iptables-restore`; `None`
/// when none has any in `family`.
pub fn add_sandboxes(family: IpFamily, records: &[SandboxRecord]) -> Option<String> {
    let all: Vec<Rule> = records.iter().flat_map(|r| rules(family, r)).collect();
    payload(&all, "-A")
}

/// The payload that deletes one sandbox's rules; `None` when it has none in `family`.
/// iptables cannot delete a rule that is gone, so the agent rebuilds with
/// [`full_payload`] when this fails.
pub fn remove_sandbox(family: IpFamily, record: &SandboxRecord) -> Option<String> {
    payload(&rules(family, record), "-D")
}

/// `op` (`-A` or `-D`) of each rule in one `*nat … COMMIT`; `None` when there are none.
fn payload(rules: &[Rule], op: &str) -> Option<String> {
    if rules.is_empty() {
        return None;
    }
    let mut out = String::from("*nat\n");
    for rule in rules {
        let _ = writeln!(out, "{}", rule.line(op));
    }
    out.push_str("COMMIT\n");
    Some(out)
}

/// How many rules a record owns in `family`.
pub fn rule_count(family: IpFamily, record: &SandboxRecord) -> usize {
    rules(family, record).len()
}

/// The payload that removes everything we own in `family`: our chains are declared
/// (which creates or flushes them), the jumps in `present_jumps` deleted, the chains
/// deleted.
pub fn teardown_payload(present_jumps: &[Rule]) -> String {
    let mut out = String::from("*nat\n");
    for chain in CHAINS {
        let _ = writeln!(out, ":{chain} - [0:0]");
    }
    for jump in present_jumps {
        let _ = writeln!(out, "{}", jump.line("-D"));
    }
    for chain in CHAINS {
        let _ = writeln!(out, "-X {chain}");
    }
    out.push_str("COMMIT\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::examples;
    use proptest::prelude::*;

    #[test]
    fn a_batch_appends_what_each_sandbox_would_append_alone() {
        let all = examples::all();
        for family in [IpFamily::V4, IpFamily::V6] {
            let alone: Vec<Rule> = all.iter().flat_map(|r| rules(family, r)).collect();
            let batch = add_sandboxes(family, &all).unwrap();
            assert_eq!(batch, payload(&alone, "-A").unwrap());
            let each: String = all
                .iter()
                .filter_map(|r| add_sandbox(family, r))
                .map(|p| p.replace("*nat\n", "").replace("COMMIT\n", ""))
                .collect();
            assert_eq!(batch, format!("*nat\n{each}COMMIT\n"));
        }
        assert_eq!(add_sandboxes(IpFamily::V4, &[]), None);
    }

    /// `iptables-save -t nat` of a node with our chains, a foreign comment that needs
    /// quoting and one that does not, as iptables 1.8 prints them.
    const SAVED: &str = r#"# Generated by iptables-save v1.8.11 (nf_tables) on Mon Dec  7 04:40:00 2026
*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:RANDPORT-HOSTPORTS - [0:0]
:RANDPORT-POSTROUTING - [0:0]
-A PREROUTING ! -d 127.0.0.0/8 -m addrtype --dst-type LOCAL -m comment --comment "randport: node-local host ports" -j RANDPORT-HOSTPORTS
-A OUTPUT ! -d 127.0.0.0/8 -m addrtype --dst-type LOCAL -m comment --comment "randport: node-local host ports" -j RANDPORT-HOSTPORTS
-A POSTROUTING -m comment --comment not-ours -j RETURN
-A POSTROUTING -m comment --comment "say \"hi\" \\ there" -j RETURN
-A POSTROUTING -m comment --comment "randport: hairpin" -j RANDPORT-POSTROUTING
-A RANDPORT-HOSTPORTS -p tcp -m tcp --dport 23817 -m comment --comment "sb:5f0c" -j DNAT --to-destination 198.18.0.5:9040
COMMIT
# Completed on Mon Dec  7 04:40:00 2026
"#;

    #[test]
    fn a_saved_table_reads_into_chains_and_rules() {
        let table = NatTable::parse(SAVED).unwrap();
        assert_eq!(table.chains.len(), 6);
        assert!(table.has_chain(HOSTPORTS_CHAIN) && table.has_chain(POSTROUTING_CHAIN));
        assert_eq!(table.rules.len(), 6);
        assert_eq!(table.rules[2].comment(), Some("not-ours"));
        assert_eq!(table.rules[3].comment(), Some("say \"hi\" \\ there"));
        assert_eq!(
            table.rules[5].args,
            [
                "-p",
                "tcp",
                "-m",
                "tcp",
                "--dport",
                "23817",
                "-m",
                "comment",
                "--comment",
                "sb:5f0c",
                "-j",
                "DNAT",
                "--to-destination",
                "198.18.0.5:9040"
            ]
        );
        assert_eq!(table.present_jumps(IpFamily::V4), hook_jumps(IpFamily::V4));
        assert!(table.missing_jumps(IpFamily::V4).is_empty());
        assert_eq!(table.tagged("sb:5f0c"), vec![&table.rules[5]]);
        // Lines outside the nat table, and an empty listing, are no rules of it.
        let filter = SAVED.replace("*nat", "*filter");
        assert_eq!(NatTable::parse(&filter).unwrap(), NatTable::default());
        assert_eq!(NatTable::parse("").unwrap(), NatTable::default());
    }

    #[test]
    fn unreadable_lines_are_errors_that_name_the_line() {
        let broken = SAVED.replace("\"randport: hairpin\"", "\"randport: hairpin");
        let err = NatTable::parse(&broken).unwrap_err();
        assert_eq!((err.line, err.reason), (13, "an unterminated quote"));
        let err = NatTable::parse("*nat\n-I OUTPUT -j ACCEPT\n").unwrap_err();
        assert_eq!((err.line, err.reason), (2, "not an -A line"));
    }

    #[test]
    fn every_rendered_rule_reads_back_as_itself() {
        for family in [IpFamily::V4, IpFamily::V6] {
            let table =
                NatTable::parse(&full_payload(family, &examples::all(), &hook_jumps(family)))
                    .unwrap();
            assert!(
                table.drift(family, &examples::all()).is_empty(),
                "{family:?}"
            );
            for record in examples::all() {
                let mut own = rules(family, &record);
                own.sort();
                assert_eq!(
                    table.tagged(&record.sandbox.tag()),
                    own.iter().collect::<Vec<_>>()
                );
            }
        }
    }

    #[test]
    fn drift_names_what_is_missing_and_what_is_not_ours() {
        let all = examples::all();
        let family = IpFamily::V4;
        let whole = NatTable::parse(&full_payload(family, &all, &hook_jumps(family))).unwrap();
        // One rule gone, one changed, a jump and a chain gone.
        let mut table = whole.clone();
        let gone = table
            .rules
            .iter()
            .position(|r| r.chain == HOSTPORTS_CHAIN)
            .unwrap();
        let gone = table.rules.remove(gone);
        let changed = table
            .rules
            .iter_mut()
            .find(|r| r.chain == HOSTPORTS_CHAIN)
            .unwrap();
        let before = changed.clone();
        *changed.args.last_mut().unwrap() = "198.18.9.9:1".into();
        let after = changed.clone();
        table.rules.retain(|r| r.chain != "POSTROUTING");
        table.chains.retain(|c| c != POSTROUTING_CHAIN);
        let drift = table.drift(family, &all);
        let mut missing = vec![gone, before];
        missing.sort();
        assert_eq!(drift.missing_rules, missing);
        assert_eq!(drift.unexpected_rules, vec![after]);
        assert_eq!(drift.missing_chains, vec![POSTROUTING_CHAIN]);
        assert_eq!(drift.missing_jumps, vec![hook_jumps(family)[2].clone()]);
        // A rule twice is one too many.
        let mut doubled = whole.clone();
        let first = doubled
            .rules
            .iter()
            .find(|r| r.chain == POSTROUTING_CHAIN)
            .unwrap()
            .clone();
        doubled.rules.push(first.clone());
        assert_eq!(doubled.drift(family, &all).unexpected_rules, vec![first]);
        assert!(!doubled.drift(family, &all).is_empty());
    }

    proptest! {
        #[test]
        fn any_rule_survives_a_restore_line(
            chain in "[A-Z][A-Z0-9-]{0,20}",
            args in proptest::collection::vec("[ -~]{0,12}", 0..8),
        ) {
            let rule = Rule { chain, args };
            prop_assert_eq!(Rule::parse(&rule.line("-A")), Ok(rule));
        }

        #[test]
        fn no_line_makes_the_reader_panic(text in "[ -~\n]{0,200}") {
            let _ = NatTable::parse(&format!("*nat\n{text}"));
        }
    }
}
