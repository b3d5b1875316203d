//! The iptables backend: our own chains in the nat table, changed with one
//! `iptables-restore --noflush` per address family and read with `iptables-save`, through
//! the [`Tool`] (a recording fake in the unit tests below).

use randport_core::render::iptables;
use randport_core::{IpFamily, SandboxRecord};

use super::tool::{SYSTEM, Tool, ToolError};
use super::{FAMILIES, Firewall, FirewallError};

/// Which `iptables` commands: the node's default (`iptables`, as its alternatives pick),
/// or one flavour's own (`iptables-legacy`, `iptables-nft`). Rules must go where the
/// node's other rules are: the two flavours do not see each other's rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IptablesFlavour {
    /// `iptables-restore`, `iptables-save`, ...
    #[default]
    System,
    /// `iptables-legacy-restore`, ...
    Legacy,
    /// `iptables-nft-restore`, ...
    Nft,
}

/// iptables: chains `RANDPORT-*` in the nat table, IPv4 and IPv6.
#[derive(Debug, Clone, Copy)]
pub struct IptablesFirewall {
    flavour: IptablesFlavour,
    tool: &'static dyn Tool,
}

impl Default for IptablesFirewall {
    /// The node's own `iptables` commands.
    fn default() -> Self {
        IptablesFirewall::new(IptablesFlavour::System)
    }
}

/// The arguments of every `iptables-restore`: wait up to 5 s for the xtables lock that
/// kube-proxy and others take (without `-w` a restore during theirs fails at once), and
/// change only what the payload names.
pub const RESTORE_ARGS: [&str; 3] = ["-w", "5", "--noflush"];

/// The (restore, save) programs of `family` in `flavour`.
pub(crate) fn tools(family: IpFamily, flavour: IptablesFlavour) -> (&'static str, &'static str) {
    use IptablesFlavour::*;
    match (family, flavour) {
        (IpFamily::V4, System) => ("iptables-restore", "iptables-save"),
        (IpFamily::V6, System) => ("ip6tables-restore", "ip6tables-save"),
        (IpFamily::V4, Legacy) => ("iptables-legacy-restore", "iptables-legacy-save"),
        (IpFamily::V6, Legacy) => ("ip6tables-legacy-restore", "ip6tables-legacy-save"),
        (IpFamily::V4, Nft) => ("iptables-nft-restore", "iptables-nft-save"),
        (IpFamily::V6, Nft) => ("ip6tables-nft-restore", "ip6tables-nft-save"),
    }
}

impl IptablesFirewall {
    /// The backend with `flavour`'s commands.
    pub const fn new(flavour: IptablesFlavour) -> Self {
        IptablesFirewall::with_tool(flavour, &SYSTEM)
    }

    /// The backend with its programs run by `tool` (a fake, in tests).
    pub const fn with_tool(flavour: IptablesFlavour, tool: &'static dyn Tool) -> Self {
        IptablesFirewall { flavour, tool }
    }

    fn err(what: impl Into<String>, reason: String) -> FirewallError {
        FirewallError {
            backend: "iptables",
            what: what.into(),
            reason,
        }
    }

    fn restore(&self, family: IpFamily, what: &str, payload: &str) -> Result<(), FirewallError> {
        self.tool
            .run(tools(family, self.flavour).0, &RESTORE_ARGS, payload)
            .map(drop)
            .map_err(|e| Self::err(what, e.to_string()))
    }

    /// Our view of the nat table of `family`: `iptables-save` read into rules.
    fn table(&self, family: IpFamily) -> Result<iptables::NatTable, FirewallError> {
        let saved = self
            .save_raw(family)
            .map_err(|e| Self::err("listing the nat table", e.to_string()))?;
        Self::parse(&saved)
    }

    fn parse(saved: &str) -> Result<iptables::NatTable, FirewallError> {
        iptables::NatTable::parse(saved)
            .map_err(|e| Self::err("reading the listed nat table", e.to_string()))
    }

    fn save_raw(&self, family: IpFamily) -> Result<String, ToolError> {
        self.tool
            .run(tools(family, self.flavour).1, &["-t", "nat"], "")
    }
}

impl Firewall for IptablesFirewall {
    fn name(&self) -> &'static str {
        "iptables"
    }

    fn replace_all(&self, records: &[SandboxRecord]) -> Result<(), FirewallError> {
        for family in FAMILIES {
            let missing = self.table(family)?.missing_jumps(family);
            let payload = iptables::full_payload(family, records, &missing);
            self.restore(
                family,
                &format!("rebuilding our chains ({} sandboxes)", records.len()),
                &payload,
            )?;
        }
        Ok(())
    }

    fn add(&self, record: &SandboxRecord) -> Result<(), FirewallError> {
        for family in FAMILIES {
            if let Some(payload) = iptables::add_sandbox(family, record) {
                self.restore(
                    family,
                    &format!("adding mappings of pod {}", record.pod),
                    &payload,
                )?;
            }
        }
        Ok(())
    }

    fn add_many(&self, records: &[SandboxRecord]) -> Result<(), FirewallError> {
        for family in FAMILIES {
            if let Some(payload) = iptables::add_sandboxes(family, records) {
                self.restore(
                    family,
                    &format!("adding the mappings of {} pods", records.len()),
                    &payload,
                )?;
            }
        }
        Ok(())
    }

    fn remove(
        &self,
        record: &SandboxRecord,
        remaining: &[SandboxRecord],
    ) -> Result<(), FirewallError> {
        for family in FAMILIES {
            if let Some(payload) = iptables::remove_sandbox(family, record) {
                if self.restore(family, "removing mappings", &payload).is_err() {
                    // A rule was already gone: rebuild our chains without this sandbox.
                    return self.replace_all(remaining);
                }
            }
        }
        Ok(())
    }

    /// Every rule is tagged with its sandbox, hairpin ones too: removing one sandbox's
    /// never touches another's, whatever addresses they share.
    fn remove_keeping(
        &self,
        record: &SandboxRecord,
        _shared: &[std::net::IpAddr],
        remaining: &dyn Fn() -> Vec<SandboxRecord>,
    ) -> Result<(), FirewallError> {
        self.remove_or_rebuild(record, remaining)
    }

    fn verify(&self, record: &SandboxRecord) -> Result<bool, FirewallError> {
        let tag = record.sandbox.tag();
        for family in FAMILIES {
            let table = self.table(family)?;
            let mut own = iptables::rules(family, record);
            own.sort();
            if table.tagged(&tag) != own.iter().collect::<Vec<_>>() {
                return Ok(false);
            }
        }
        Ok(true)
    }

    fn intact_within(
        &self,
        settled: &[SandboxRecord],
        in_flux: &[SandboxRecord],
    ) -> Result<bool, FirewallError> {
        let moving: Vec<String> = in_flux.iter().map(|r| r.sandbox.tag()).collect();
        let moving = |rule: &iptables::Rule| {
            rule.comment()
                .is_some_and(|c| moving.iter().any(|t| t == c))
        };
        for family in FAMILIES {
            let mut drift = self.table(family)?.drift(family, settled);
            drift.unexpected_rules.retain(|r| !moving(r));
            if !drift.is_empty() {
                tracing::info!(
                    ?family,
                    missing_chains = ?drift.missing_chains,
                    missing_rules = drift.missing_rules.len(),
                    unexpected_rules = drift.unexpected_rules.len(),
                    missing_jumps = drift.missing_jumps.len(),
                    "our iptables chains differ from our records",
                );
                return Ok(false);
            }
        }
        Ok(true)
    }

    fn teardown(&self) -> Result<(), FirewallError> {
        for family in FAMILIES {
            let saved = match self.save_raw(family) {
                Ok(saved) => saved,
                // No iptables on this node: nothing of ours can be there.
                Err(ToolError::NotInstalled { .. }) => continue,
                Err(e) => return Err(Self::err("listing the nat table", e.to_string())),
            };
            let table = Self::parse(&saved)?;
            if !iptables::CHAINS.iter().any(|c| table.has_chain(c)) {
                continue;
            }
            let payload = iptables::teardown_payload(&table.present_jumps(family));
            self.restore(family, "removing our chains", &payload)?;
        }
        Ok(())
    }

    /// Only with the nf_tables flavour of iptables: the legacy one changes rules without
    /// touching the nftables generation.
    fn generation(&self) -> Option<u32> {
        static NF_TABLES: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        let flavour = self.flavour;
        let nf_tables = NF_TABLES.get_or_init(|| {
            FAMILIES.iter().all(|family| {
                self.tool
                    .run(tools(*family, flavour).1, &["--version"], "")
                    .is_ok_and(|v| v.contains("nf_tables"))
            })
        });
        if *nf_tables {
            crate::netfilter::netlink::ruleset_generation().ok()
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::firewall::fake::RecordingTool;
    use randport_core::examples;

    fn backend() -> (IptablesFirewall, &'static RecordingTool) {
        let tool = RecordingTool::leaked();
        (
            IptablesFirewall::with_tool(IptablesFlavour::System, tool),
            tool,
        )
    }

    fn failed(program: &str) -> ToolError {
        ToolError::Failed {
            program: program.into(),
            status: Some(1),
            stderr: "iptables-restore: line 2 failed".into(),
        }
    }

    #[test]
    fn a_removal_whose_rule_is_gone_rebuilds_our_chains() {
        let (fw, tool) = backend();
        let records = examples::all();
        tool.answer("iptables-restore", "-w", Err(failed("iptables-restore")));
        fw.remove(&records[0], &records[1..]).unwrap();
        let calls = tool.calls();
        // The refused removal, then per family: a save and the whole payload of the rest.
        assert!(
            calls[0].starts_with("iptables-restore -w 5 --noflush\n"),
            "{calls:?}"
        );
        assert_eq!(calls[1], "iptables-save -t nat");
        let rebuilt = iptables::full_payload(
            IpFamily::V4,
            &records[1..],
            &iptables::hook_jumps(IpFamily::V4),
        );
        assert_eq!(
            calls[2],
            format!("iptables-restore -w 5 --noflush\n{rebuilt}")
        );
        assert_eq!(calls[3], "ip6tables-save -t nat");
    }

    #[test]
    fn teardown_leaves_a_node_without_iptables_alone() {
        let (fw, tool) = backend();
        for program in ["iptables-save", "ip6tables-save"] {
            tool.answer(
                program,
                "-t",
                Err(ToolError::NotInstalled {
                    program: program.into(),
                    reason: "No such file or directory (os error 2)".into(),
                }),
            );
        }
        fw.teardown().unwrap();
        assert_eq!(
            tool.calls(),
            vec!["iptables-save -t nat", "ip6tables-save -t nat"]
        );
        // Another failure to list is an error.
        tool.answer("iptables-save", "-t", Err(failed("iptables-save")));
        assert!(
            fw.teardown()
                .unwrap_err()
                .to_string()
                .contains("listing the nat table")
        );
    }

    #[test]
    fn intact_counts_our_tagged_rules_and_the_jumps_to_our_chains() {
        let (fw, tool) = backend();
        let records = examples::all();
        let saved = |family: IpFamily, records: &[SandboxRecord]| {
            iptables::full_payload(family, records, &iptables::hook_jumps(family))
        };
        for family in FAMILIES {
            let program = tools(family, IptablesFlavour::System).1;
            tool.answer(program, "-t", Ok(saved(family, &records)));
        }
        assert!(fw.intact(&records).unwrap());
        // One sandbox's rules gone.
        tool.answer(
            "iptables-save",
            "-t",
            Ok(saved(IpFamily::V4, &records[1..])),
        );
        assert!(!fw.intact(&records).unwrap());
        // The jumps gone.
        tool.answer(
            "iptables-save",
            "-t",
            Ok(iptables::full_payload(IpFamily::V4, &records, &[])),
        );
        assert!(!fw.intact(&records).unwrap());
    }

    /// The saved nat table with our chains for `records`, one DNAT rule's target changed.
    fn with_changed_target(family: IpFamily, records: &[SandboxRecord]) -> String {
        let whole = iptables::full_payload(family, records, &iptables::hook_jumps(family));
        let mut table = iptables::NatTable::parse(&whole).unwrap();
        let rule = table
            .rules
            .iter_mut()
            .find(|r| r.chain == iptables::HOSTPORTS_CHAIN)
            .unwrap();
        *rule.args.last_mut().unwrap() = "198.18.9.9:1".into();
        let mut text = String::from("*nat\n");
        for chain in &table.chains {
            text.push_str(&format!(":{chain} - [0:0]\n"));
        }
        for rule in &table.rules {
            text.push_str(&rule.line("-A"));
            text.push('\n');
        }
        text + "COMMIT\n"
    }

    #[test]
    fn a_rule_changed_in_place_is_not_intact_though_the_counts_match() {
        let (fw, tool) = backend();
        let records = examples::all();
        for family in FAMILIES {
            let program = tools(family, IptablesFlavour::System).1;
            let whole = iptables::full_payload(family, &records, &iptables::hook_jumps(family));
            tool.answer(program, "-t", Ok(whole));
        }
        assert!(fw.intact(&records).unwrap());
        tool.answer(
            "iptables-save",
            "-t",
            Ok(with_changed_target(IpFamily::V4, &records)),
        );
        assert!(!fw.intact(&records).unwrap());
        // The sandbox whose rule changed fails its CHECK; the others pass.
        let changed = iptables::NatTable::parse(&with_changed_target(IpFamily::V4, &records))
            .unwrap()
            .rules
            .into_iter()
            .find(|r| r.chain == iptables::HOSTPORTS_CHAIN)
            .and_then(|r| r.comment().map(str::to_owned))
            .unwrap();
        for record in &records {
            tool.answer(
                "iptables-save",
                "-t",
                Ok(with_changed_target(IpFamily::V4, &records)),
            );
            let v6 =
                iptables::full_payload(IpFamily::V6, &records, &iptables::hook_jumps(IpFamily::V6));
            tool.answer("ip6tables-save", "-t", Ok(v6));
            let ok = fw.verify(record).unwrap();
            assert_eq!(ok, record.sandbox.tag() != changed, "{}", record.pod);
        }
    }

    #[test]
    fn an_unreadable_listing_is_an_error_not_a_verdict() {
        let (fw, tool) = backend();
        tool.answer(
            "iptables-save",
            "-t",
            Ok("*nat\n-A RANDPORT-HOSTPORTS -m comment --comment \"sb:1\n".into()),
        );
        let err = fw.intact(&examples::all()).unwrap_err().to_string();
        assert!(
            err.contains("reading the listed nat table") && err.contains("line 2"),
            "{err}"
        );
    }
}
