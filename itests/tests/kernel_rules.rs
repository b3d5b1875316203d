//! Root-only: every rule text randport-core renders is loaded by the real kernel, in a
//! fresh network namespace per test (never the root namespace's firewall).

use randport_core::examples;
use randport_core::render::{iptables, nft};
use randport_core::{IpFamily, SandboxRecord};
use randport_itests::{Netns, TestNetns, root_and_tools_or_skip, test_netns};

const TABLE: &str = nft::DEFAULT_TABLE;

fn tagged_elements(ns: &Netns) -> usize {
    ns.sh("nft", &["list", "table", "inet", TABLE], "")
        .matches("comment \"sb:")
        .count()
}

fn element_count(records: &[SandboxRecord]) -> usize {
    records
        .iter()
        .map(|r| nft::add_sandbox(TABLE, r).lines().count())
        .sum()
}

#[test]
fn every_rendered_nft_ruleset_passes_nft_check() {
    if !root_and_tools_or_skip("every_rendered_nft_ruleset_passes_nft_check", &["nft"]) {
        return;
    }
    let ns = test_netns("nftc");
    let mut rulesets = vec![
        nft::ruleset(TABLE, &[]),
        nft::ruleset(TABLE, &examples::all()),
        nft::ruleset(TABLE, &examples::many(2000)),
    ];
    rulesets.extend(
        examples::all()
            .iter()
            .map(|r| nft::ruleset(TABLE, std::slice::from_ref(r))),
    );
    rulesets.push(nft::ruleset_with(
        TABLE,
        &examples::all(),
        nft::NftOptions { localhost: true },
    ));
    for ruleset in &rulesets {
        ns.sh("nft", &["-c", "-f", "-"], ruleset);
    }
    // Transactions need the table: load the empty one, check every addition; load the
    // full one, check every removal.
    ns.sh("nft", &["-f", "-"], &nft::ruleset(TABLE, &[]));
    for record in examples::all() {
        ns.sh("nft", &["-c", "-f", "-"], &nft::add_sandbox(TABLE, &record));
    }
    ns.sh("nft", &["-f", "-"], &nft::ruleset(TABLE, &examples::all()));
    for record in examples::all() {
        ns.sh(
            "nft",
            &["-c", "-f", "-"],
            &nft::remove_sandbox(TABLE, &record),
        );
    }
}

#[test]
fn nft_transactions_add_and_remove_exactly_one_sandbox() {
    if !root_and_tools_or_skip(
        "nft_transactions_add_and_remove_exactly_one_sandbox",
        &["nft"],
    ) {
        return;
    }
    let ns = test_netns("nfttx");
    let all = examples::all();
    ns.sh("nft", &["-f", "-"], &nft::ruleset(TABLE, &[]));
    assert_eq!(tagged_elements(&ns), 0);
    for (i, record) in all.iter().enumerate() {
        ns.sh("nft", &["-f", "-"], &nft::add_sandbox(TABLE, record));
        assert_eq!(tagged_elements(&ns), element_count(&all[..=i]));
    }
    // Adding the same sandbox again changes nothing (ADD is idempotent).
    ns.sh("nft", &["-f", "-"], &nft::add_sandbox(TABLE, &all[1]));
    assert_eq!(tagged_elements(&ns), element_count(&all));
    // The full ruleset replaces the table: same content, nothing doubled.
    ns.sh("nft", &["-f", "-"], &nft::ruleset(TABLE, &all));
    assert_eq!(tagged_elements(&ns), element_count(&all));

    let removed = &all[1];
    ns.sh("nft", &["-f", "-"], &nft::remove_sandbox(TABLE, removed));
    let listing = ns.sh("nft", &["list", "table", "inet", TABLE], "");
    assert!(!listing.contains(&removed.sandbox.tag()), "{listing}");
    assert_eq!(
        tagged_elements(&ns),
        element_count(&all) - element_count(std::slice::from_ref(removed))
    );
    // Removing again succeeds and changes nothing (DEL is idempotent).
    ns.sh("nft", &["-f", "-"], &nft::remove_sandbox(TABLE, removed));
    assert_eq!(
        tagged_elements(&ns),
        element_count(&all) - element_count(std::slice::from_ref(removed))
    );
}

#[test]
fn nft_removal_never_deletes_another_sandboxs_mapping() {
    if !root_and_tools_or_skip(
        "nft_removal_never_deletes_another_sandboxs_mapping",
        &["nft"],
    ) {
        return;
    }
    let ns = test_netns("nftown");
    let owner = examples::one_tcp();
    ns.sh(
        "nft",
        &["-f", "-"],
        &nft::ruleset(TABLE, std::slice::from_ref(&owner)),
    );
    // A stale sandbox that once had the same host port, for another pod address.
    let mut stale = owner.clone();
    stale.sandbox.0.push_str("-old");
    stale.pod_ips = vec!["198.18.0.99".parse().unwrap()];
    let out = ns.out("nft", &["-f", "-"], &nft::remove_sandbox(TABLE, &stale));
    assert!(
        !out.status.success(),
        "removing a key that maps elsewhere must fail"
    );
    let listing = ns.sh("nft", &["list", "map", "inet", TABLE, "hostports4"], "");
    assert!(
        listing.contains("tcp . 23817") && listing.contains("198.18.0.5 . 9040"),
        "{listing}"
    );
}

fn restore(ns: &Netns, family: IpFamily, payload: &str) {
    let tool = match family {
        IpFamily::V4 => "iptables-restore",
        IpFamily::V6 => "ip6tables-restore",
    };
    ns.sh(tool, &["--noflush"], payload);
}

fn our_rules(ns: &Netns, family: IpFamily) -> Vec<String> {
    let tool = match family {
        IpFamily::V4 => "iptables-save",
        IpFamily::V6 => "ip6tables-save",
    };
    ns.sh(tool, &["-t", "nat"], "")
        .lines()
        .filter(|l| l.starts_with("-A") && l.contains("RANDPORT"))
        .map(str::to_owned)
        .collect()
}

fn saved_table(ns: &Netns, family: IpFamily) -> iptables::NatTable {
    let tool = match family {
        IpFamily::V4 => "iptables-save",
        IpFamily::V6 => "ip6tables-save",
    };
    iptables::NatTable::parse(&ns.sh(tool, &["-t", "nat"], "")).expect("iptables-save reads")
}

#[test]
fn iptables_payloads_load_and_change_only_our_chains() {
    if !root_and_tools_or_skip(
        "iptables_payloads_load_and_change_only_our_chains",
        &["iptables-restore"],
    ) {
        return;
    }
    let ns = test_netns("ipt");
    let all = examples::all();
    for family in [IpFamily::V4, IpFamily::V6] {
        let (check, jumps) = match family {
            IpFamily::V4 => ("iptables", iptables::hook_jumps(family)),
            IpFamily::V6 => ("ip6tables", iptables::hook_jumps(family)),
        };
        // Someone else's rule in a built-in chain must survive everything we do.
        ns.sh(
            check,
            &[
                "-t",
                "nat",
                "-A",
                "POSTROUTING",
                "-m",
                "comment",
                "--comment",
                "not-ours",
                "-j",
                "RETURN",
            ],
            "",
        );
        restore(&ns, family, &iptables::full_payload(family, &all, &jumps));
        for jump in &jumps {
            let mut args = vec!["-t", "nat", "-C", jump.chain.as_str()];
            args.extend(jump.args.iter().map(String::as_str));
            ns.sh(check, &args, "");
        }
        let first = our_rules(&ns, family);
        assert!(!first.is_empty());
        // What iptables-save prints reads back as exactly the rules we rendered.
        let saved = saved_table(&ns, family);
        let drift = saved.drift(family, &all);
        assert!(drift.is_empty(), "{family:?}: {drift:#?}");
        for record in &all {
            let mut own = iptables::rules(family, record);
            own.sort();
            assert_eq!(
                saved.tagged(&record.sandbox.tag()),
                own.iter().collect::<Vec<_>>(),
                "{family:?}: {}",
                record.pod
            );
        }
        // Re-applying the full payload (jumps present now) flushes and refills our chains.
        restore(&ns, family, &iptables::full_payload(family, &all, &[]));
        assert_eq!(
            our_rules(&ns, family),
            first,
            "{family:?}: full payload is not a replacement"
        );

        let dual = examples::dual_stack();
        let removal =
            iptables::remove_sandbox(family, &dual).expect("dual-stack has rules in both families");
        restore(&ns, family, &removal);
        let after = our_rules(&ns, family);
        assert!(after.iter().all(|l| !l.contains(&dual.sandbox.tag())));
        let mut removed = iptables::rules(family, &dual);
        removed.sort();
        assert_eq!(
            saved_table(&ns, family).drift(family, &all).missing_rules,
            removed
        );
        assert_eq!(
            after.len(),
            first.len() - removal.lines().filter(|l| l.starts_with("-D")).count()
        );
        restore(
            &ns,
            family,
            &iptables::add_sandbox(family, &dual).unwrap_or_default(),
        );
        assert_eq!(our_rules(&ns, family).len(), first.len());

        let save = match family {
            IpFamily::V4 => "iptables-save",
            IpFamily::V6 => "ip6tables-save",
        };
        assert!(ns.sh(save, &["-t", "nat"], "").contains("not-ours"));
    }
}
