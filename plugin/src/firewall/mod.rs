//! Firewall backends: nftables (default) and iptables, only ever touching our own table
//! or chains, with text that `randport-core` rendered.
//!
//! - [`nft`]: one nftables table; whole loads with `nft -f`; a sandbox's elements, CHECK's
//!   reading of them and the watchdog's check over netlink ([`nft::NftKernel`]).
//! - [`iptables`]: our own chains in the nat table, with `iptables-restore`/`-save`; what
//!   `iptables-save` prints is read into rules and compared rule by rule.
//! - [`tool`]: the one place that runs programs ([`tool::Tool`], typed errors).
//! - the backend choice at start ([`preflight`]) is here; the fakes for tests are behind
//!   the `testing` feature ([`fake`]).

pub mod iptables;
pub mod nft;
pub mod tool;

#[cfg(any(test, feature = "testing"))]
pub mod fake;

use randport_core::render::nft as render_nft;
use randport_core::{IpFamily, SandboxRecord};

#[cfg(any(test, feature = "testing"))]
pub use fake::FakeFirewall;
pub use iptables::{IptablesFirewall, IptablesFlavour};
pub use nft::NftFirewall;
pub use tool::{SystemTool, Tool, ToolError};

use iptables::tools;

/// Both address families, IPv4 first.
pub(crate) const FAMILIES: [IpFamily; 2] = [IpFamily::V4, IpFamily::V6];

/// A firewall change that failed.
#[derive(Debug, thiserror::Error)]
#[error("{backend}: {what} failed: {reason}")]
pub struct FirewallError {
    /// `nftables` or `iptables`.
    pub backend: &'static str,
    /// What was being done.
    pub what: String,
    /// The tool's own words.
    pub reason: String,
}

/// Which backend.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// One nft table with maps.
    Nftables,
    /// Our own chains in the nat table.
    Iptables,
}

/// The firewall as the agent sees it.
pub trait Firewall: Send + Sync {
    /// The backend's name.
    fn name(&self) -> &'static str;
    /// Replaces everything we own with exactly these sandboxes, in one transaction.
    fn replace_all(&self, records: &[SandboxRecord]) -> Result<(), FirewallError>;
    /// Adds one sandbox.
    fn add(&self, record: &SandboxRecord) -> Result<(), FirewallError>;
    /// Adds several sandboxes, in one transaction where the backend can.
    fn add_many(&self, records: &[SandboxRecord]) -> Result<(), FirewallError> {
        records.iter().try_for_each(|r| self.add(r))
    }
    /// Removes one sandbox; `remaining` is every other sandbox, for a rebuild when the
    /// small change cannot be made.
    fn remove(
        &self,
        record: &SandboxRecord,
        remaining: &[SandboxRecord],
    ) -> Result<(), FirewallError>;
    /// [`Firewall::remove`] with the other sandboxes made only if a rebuild is needed
    /// (the agent's DEL: copying every record for each DEL grows with the node).
    fn remove_or_rebuild(
        &self,
        record: &SandboxRecord,
        remaining: &dyn Fn() -> Vec<SandboxRecord>,
    ) -> Result<(), FirewallError> {
        self.remove(record, &remaining())
    }
    /// [`Firewall::remove_or_rebuild`] while other sandboxes have some of this one's pod
    /// addresses (`shared`: a stale record beside the pod's new sandbox): what is keyed
    /// by the address alone (nftables' hairpin element) stays, for them. By default a
    /// rebuild without the sandbox.
    fn remove_keeping(
        &self,
        record: &SandboxRecord,
        shared: &[std::net::IpAddr],
        remaining: &dyn Fn() -> Vec<SandboxRecord>,
    ) -> Result<(), FirewallError> {
        if shared.is_empty() {
            self.remove_or_rebuild(record, remaining)
        } else {
            self.replace_all(&remaining())
        }
    }
    /// Whether this sandbox's rules or elements are present exactly as rendered: none
    /// missing, changed or extra.
    fn verify(&self, record: &SandboxRecord) -> Result<bool, FirewallError>;
    /// Whether everything we own is present for these sandboxes (nobody flushed it).
    fn intact(&self, records: &[SandboxRecord]) -> Result<bool, FirewallError> {
        self.intact_within(records, &[])
    }
    /// [`Firewall::intact`] while `in_flux` sandboxes are being added or removed: their
    /// rules or elements may be there or not; those of `settled` must all be there, and
    /// nothing else.
    fn intact_within(
        &self,
        settled: &[SandboxRecord],
        in_flux: &[SandboxRecord],
    ) -> Result<bool, FirewallError>;
    /// Removes everything we own (used to clean up after a switch of backend).
    fn teardown(&self) -> Result<(), FirewallError>;
    /// A number that changes whenever any rule of the node may have changed (the nftables
    /// ruleset generation), so that the watchdog can skip `intact` while it stays the
    /// same; `None` when the backend has none (then every check lists the rules).
    fn generation(&self) -> Option<u32> {
        None
    }
}

/// Creates the backend.
pub fn backend(kind: Backend, localhost: bool) -> Box<dyn Firewall> {
    match kind {
        Backend::Nftables => Box::new(NftFirewall::with_options(
            render_nft::DEFAULT_TABLE,
            render_nft::NftOptions { localhost },
        )),
        Backend::Iptables => Box::new(IptablesFirewall::default()),
    }
}

/// Creates the backend a [`preflight`] chose.
pub fn chosen_backend(choice: &Preflight, localhost: bool) -> Box<dyn Firewall> {
    match choice.backend {
        Backend::Iptables => Box::new(IptablesFirewall::new(choice.flavour)),
        nftables => backend(nftables, localhost),
    }
}

/// Runs a program: (program, args, stdin) to its stdout, or the error text.
pub type Runner<'a> = &'a dyn Fn(&str, &[&str], &str) -> Result<String, String>;

/// The programs of this node, run for real.
pub fn run_tool(program: &str, args: &[&str], input: &str) -> Result<String, String> {
    tool::SYSTEM
        .run(program, args, input)
        .map_err(|e| e.to_string())
}

/// What the agent's start-up check chose, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Preflight {
    /// The backend to use.
    pub backend: Backend,
    /// With iptables: whose commands.
    pub flavour: IptablesFlavour,
    /// Why nftables was not used although asked for (the kernel refused our ruleset).
    pub fell_back: Option<String>,
    /// How the flavour was chosen, for the log.
    pub flavour_reason: String,
}

/// Checks, before anything is changed, that the kernel takes what the agent will load: for
/// nftables, a check load (`nft -c`) of its whole, empty ruleset (not a version string);
/// when that fails, iptables instead. For iptables, the flavour whose tables already hold
/// the node's rules (as kube-proxy's wrapper decides: its hint chains first, then the
/// number of rules), so that our chains sit beside kube-proxy's and the CNI plugins'.
pub fn preflight(requested: Backend, localhost: bool, run: Runner<'_>) -> Preflight {
    let mut fell_back = None;
    if requested == Backend::Nftables {
        let text = render_nft::ruleset_with(
            render_nft::DEFAULT_TABLE,
            &[],
            render_nft::NftOptions { localhost },
        );
        match run("nft", &["-c", "-f", "-"], &text) {
            Ok(_) => {
                return Preflight {
                    backend: Backend::Nftables,
                    flavour: IptablesFlavour::System,
                    fell_back: None,
                    flavour_reason: String::new(),
                };
            }
            Err(e) => fell_back = Some(e),
        }
    }
    let (flavour, flavour_reason) = iptables_flavour(run);
    Preflight {
        backend: Backend::Iptables,
        flavour,
        fell_back,
        flavour_reason,
    }
}

/// The iptables flavour the node's rules are in, and why.
fn iptables_flavour(run: Runner<'_>) -> (IptablesFlavour, String) {
    // (has a kube hint chain, number of rules) of one flavour, both families.
    let look = |flavour: IptablesFlavour| -> Option<(bool, usize)> {
        let mut hint = false;
        let mut rules = 0;
        for family in FAMILIES {
            let saved = run(tools(family, flavour).1, &[], "").ok()?;
            hint |= saved.contains("KUBE-IPTABLES-HINT") || saved.contains("KUBE-KUBELET-CANARY");
            rules += saved.lines().filter(|l| l.starts_with("-A")).count();
        }
        Some((hint, rules))
    };
    use IptablesFlavour::*;
    match (look(Legacy), look(Nft)) {
        (None, None) => (
            System,
            "no iptables-legacy/-nft commands: the node's `iptables`".into(),
        ),
        (Some(_), None) => (Legacy, "only the legacy commands are installed".into()),
        (None, Some(_)) => (Nft, "only the nf_tables commands are installed".into()),
        (Some((true, _)), Some((false, _))) => (Legacy, "kube's hint chain is in legacy".into()),
        (Some((false, _)), Some((true, _))) => (Nft, "kube's hint chain is in nf_tables".into()),
        (Some((_, legacy)), Some((_, nft))) if legacy > nft => (
            Legacy,
            format!("{legacy} rules in legacy, {nft} in nf_tables"),
        ),
        (Some((_, legacy)), Some((_, nft))) if nft > legacy => {
            (Nft, format!("{nft} rules in nf_tables, {legacy} in legacy"))
        }
        (Some((_, n)), Some(_)) => (System, format!("{n} rules in each: the node's `iptables`")),
    }
}

impl<T: Firewall + ?Sized> Firewall for std::sync::Arc<T> {
    fn name(&self) -> &'static str {
        (**self).name()
    }
    fn replace_all(&self, records: &[SandboxRecord]) -> Result<(), FirewallError> {
        (**self).replace_all(records)
    }
    fn add(&self, record: &SandboxRecord) -> Result<(), FirewallError> {
        (**self).add(record)
    }
    fn add_many(&self, records: &[SandboxRecord]) -> Result<(), FirewallError> {
        (**self).add_many(records)
    }
    fn remove(
        &self,
        record: &SandboxRecord,
        remaining: &[SandboxRecord],
    ) -> Result<(), FirewallError> {
        (**self).remove(record, remaining)
    }
    fn remove_or_rebuild(
        &self,
        record: &SandboxRecord,
        remaining: &dyn Fn() -> Vec<SandboxRecord>,
    ) -> Result<(), FirewallError> {
        (**self).remove_or_rebuild(record, remaining)
    }
    fn remove_keeping(
        &self,
        record: &SandboxRecord,
        shared: &[std::net::IpAddr],
        remaining: &dyn Fn() -> Vec<SandboxRecord>,
    ) -> Result<(), FirewallError> {
        (**self).remove_keeping(record, shared, remaining)
    }
    fn verify(&self, record: &SandboxRecord) -> Result<bool, FirewallError> {
        (**self).verify(record)
    }
    fn intact_within(
        &self,
        settled: &[SandboxRecord],
        in_flux: &[SandboxRecord],
    ) -> Result<bool, FirewallError> {
        (**self).intact_within(settled, in_flux)
    }
    fn teardown(&self) -> Result<(), FirewallError> {
        (**self).teardown()
    }
    fn generation(&self) -> Option<u32> {
        (**self).generation()
    }
}

#[cfg(test)]
mod preflight_tests {
    use super::*;
    use std::collections::HashMap;
    use std::sync::Mutex;

    /// A node's programs: what each (program and first arg) prints, or its error.
    struct FakeTools {
        answers: HashMap<&'static str, Result<String, String>>,
        calls: Mutex<Vec<String>>,
    }

    impl FakeTools {
        fn new(answers: &[(&'static str, Result<&str, &str>)]) -> Self {
            FakeTools {
                answers: answers
                    .iter()
                    .map(|(k, v)| (*k, v.map(str::to_owned).map_err(str::to_owned)))
                    .collect(),
                calls: Mutex::new(Vec::new()),
            }
        }

        fn run(&self, program: &str, args: &[&str], input: &str) -> Result<String, String> {
            self.calls
                .lock()
                .unwrap()
                .push(format!("{program} {}", args.join(" ")));
            if program == "nft" {
                assert!(input.contains("table inet randport"), "{input}");
            }
            self.answers
                .get(program)
                .cloned()
                .unwrap_or_else(|| Err(format!("cannot run {program}: not installed")))
        }
    }

    fn choose(tools: &FakeTools, requested: Backend) -> Preflight {
        preflight(requested, false, &|p, a, i| tools.run(p, a, i))
    }

    const KUBE_NFT: &str = "*mangle\n:KUBE-IPTABLES-HINT - [0:0]\nCOMMIT\n";

    #[test]
    fn nftables_is_used_when_the_kernel_takes_a_check_load_of_the_ruleset() {
        let tools = FakeTools::new(&[("nft", Ok(""))]);
        let choice = choose(&tools, Backend::Nftables);
        assert_eq!(choice.backend, Backend::Nftables);
        assert_eq!(choice.fell_back, None);
        assert_eq!(*tools.calls.lock().unwrap(), vec!["nft -c -f -".to_owned()]);
    }

    #[test]
    fn a_refused_ruleset_falls_back_to_iptables_and_says_why() {
        let tools = FakeTools::new(&[
            (
                "nft",
                Err("Error: Could not process rule: No such file or directory"),
            ),
            ("iptables-nft-save", Ok(KUBE_NFT)),
            ("ip6tables-nft-save", Ok("")),
            ("iptables-legacy-save", Ok("")),
            ("ip6tables-legacy-save", Ok("")),
        ]);
        let choice = choose(&tools, Backend::Nftables);
        assert_eq!(choice.backend, Backend::Iptables);
        assert_eq!(choice.flavour, IptablesFlavour::Nft);
        assert!(choice.fell_back.unwrap().contains("Could not process rule"));
        // nft missing altogether is a refusal too.
        let tools = FakeTools::new(&[]);
        let choice = choose(&tools, Backend::Nftables);
        assert_eq!(choice.backend, Backend::Iptables);
        assert!(choice.fell_back.unwrap().contains("cannot run nft"));
        assert_eq!(choice.flavour, IptablesFlavour::System);
    }

    #[test]
    fn iptables_goes_where_the_nodes_rules_are() {
        let rules = |n: usize| "-A KUBE-SERVICES -j ACCEPT\n".repeat(n);
        let (many, few) = (rules(5), rules(1));
        // Asked for iptables: no nft check at all.
        let case = |legacy: &str, nft: &str| {
            let tools = FakeTools::new(&[
                ("iptables-legacy-save", Ok(legacy)),
                ("ip6tables-legacy-save", Ok("")),
                ("iptables-nft-save", Ok(nft)),
                ("ip6tables-nft-save", Ok("")),
            ]);
            let choice = choose(&tools, Backend::Iptables);
            assert!(
                !tools
                    .calls
                    .lock()
                    .unwrap()
                    .iter()
                    .any(|c| c.starts_with("nft"))
            );
            assert_eq!(choice.fell_back, None);
            (choice.backend, choice.flavour)
        };
        use IptablesFlavour::*;
        assert_eq!(case(&many, &few), (Backend::Iptables, Legacy));
        assert_eq!(case(&few, &many), (Backend::Iptables, Nft));
        // kube's hint chain wins over counts.
        assert_eq!(case(&many, KUBE_NFT), (Backend::Iptables, Nft));
        let legacy_hint = format!("{KUBE_NFT}{few}");
        assert_eq!(case(&legacy_hint, &many), (Backend::Iptables, Legacy));
        // A tie: the node's own `iptables`.
        assert_eq!(case(&few, &few), (Backend::Iptables, System));
        // One flavour installed: that one; none: the node's `iptables`.
        let only_legacy = FakeTools::new(&[
            ("iptables-legacy-save", Ok("")),
            ("ip6tables-legacy-save", Ok("")),
        ]);
        assert_eq!(choose(&only_legacy, Backend::Iptables).flavour, Legacy);
        assert_eq!(
            choose(&FakeTools::new(&[]), Backend::Iptables).flavour,
            System
        );
    }

    #[test]
    fn each_flavour_runs_its_own_commands() {
        assert_eq!(
            tools(IpFamily::V4, IptablesFlavour::System).0,
            "iptables-restore"
        );
        assert_eq!(
            tools(IpFamily::V6, IptablesFlavour::Legacy).1,
            "ip6tables-legacy-save"
        );
        assert_eq!(
            tools(IpFamily::V4, IptablesFlavour::Nft).0,
            "iptables-nft-restore"
        );
    }
}
