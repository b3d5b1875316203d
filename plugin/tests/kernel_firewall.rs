//! Root-only: both firewall backends against the real kernel in a fresh namespace:
//! rebuild, verify, the watchdog's intact check, add, remove, teardown.

use randport_core::SandboxRecord;
use randport_core::examples;
use randport_itests::{TestNetns, root_and_tools_or_skip, test_netns};
use randport_plugin::firewall::{Firewall, IptablesFirewall, IptablesFlavour, NftFirewall};

/// The backend with the node's own `iptables` commands.
const SYSTEM_IPTABLES: IptablesFirewall = IptablesFirewall::new(IptablesFlavour::System);

fn check_backend(
    firewall: &'static (dyn Firewall + Sync),
    flush: &'static [&'static str],
    delete_one: &'static [&'static str],
) {
    let ns = test_netns("fw");
    let all = examples::all();
    // An empty table, then every sandbox in one batched addition.
    ns.inside(move || firewall.replace_all(&[])).unwrap();
    let records = all.clone();
    ns.inside(move || firewall.add_many(&records)).unwrap();
    let records = all.clone();
    assert!(
        ns.inside(move || firewall.intact(&records)).unwrap(),
        "{}: intact after a batched add",
        firewall.name()
    );
    for record in &all {
        let record = record.clone();
        assert!(ns.inside(move || firewall.verify(&record)).unwrap());
    }
    // One rule or element lost: CHECK (verify) notices.
    ns.sh(delete_one[0], &delete_one[1..], "");
    let first = all[0].clone();
    assert!(
        !ns.inside(move || firewall.verify(&first)).unwrap(),
        "{}: verify missed a lost rule",
        firewall.name()
    );
    // The generation the watchdog skips on: steady while nothing changes, new after any
    // change (here a flush by somebody else). iptables has one only in its nf_tables
    // flavour, as on this machine's distribution; the legacy one changes nothing nft sees.
    let expect_generation = firewall.name() == "nftables"
        || std::process::Command::new("iptables-save")
            .arg("--version")
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("nf_tables"));
    let before = ns.inside(move || firewall.generation());
    assert_eq!(before.is_some(), expect_generation, "{}", firewall.name());
    assert_eq!(ns.inside(move || firewall.generation()), before, "steady");
    // Flushed: the watchdog's check notices, a rebuild restores.
    ns.sh(flush[0], &flush[1..], "");
    if expect_generation {
        let after = ns.inside(move || firewall.generation());
        assert_ne!(
            after,
            before,
            "{}: a flush left the generation",
            firewall.name()
        );
    }
    let records = all.clone();
    assert!(
        !ns.inside(move || firewall.intact(&records)).unwrap(),
        "{}: intact after a flush",
        firewall.name()
    );
    let records = all.clone();
    ns.inside(move || firewall.replace_all(&records)).unwrap();
    let records = all.clone();
    assert!(ns.inside(move || firewall.intact(&records)).unwrap());
    // Remove one sandbox, twice (idempotent), add it back.
    let (one, rest) = (
        all[1].clone(),
        vec![all[0].clone(), all[2].clone(), all[3].clone()],
    );
    for _ in 0..2 {
        let (one, rest) = (one.clone(), rest.clone());
        ns.inside(move || firewall.remove(&one, &rest)).unwrap();
    }
    let probe = one.clone();
    assert!(!ns.inside(move || firewall.verify(&probe)).unwrap());
    let probe = one.clone();
    ns.inside(move || firewall.add(&probe)).unwrap();
    assert!(ns.inside(move || firewall.verify(&one)).unwrap());
    ns.inside(move || firewall.teardown()).unwrap();
    let records = all.clone();
    assert!(!ns.inside(move || firewall.intact(&records)).unwrap());
}

static NFT: std::sync::LazyLock<NftFirewall> =
    std::sync::LazyLock::new(|| NftFirewall::new("randport"));

#[test]
fn nftables_backend_on_the_kernel() {
    if root_and_tools_or_skip("nftables_backend_on_the_kernel", &["nft"]) {
        check_backend(
            &*NFT,
            &["nft", "flush", "table", "inet", "randport"],
            &[
                "nft",
                "delete",
                "element",
                "inet",
                "randport",
                "hostports4",
                "{ tcp . 23817 }",
            ],
        );
    }
}

#[test]
fn iptables_backend_on_the_kernel() {
    if root_and_tools_or_skip("iptables_backend_on_the_kernel", &["iptables-restore"]) {
        check_backend(
            &SYSTEM_IPTABLES,
            &["iptables", "-t", "nat", "-F", "RANDPORT-HOSTPORTS"],
            &["iptables", "-t", "nat", "-D", "RANDPORT-HOSTPORTS", "1"],
        );
    }
}

/// The watchdog's check of the nftables table reads its chains, sets and rules with
/// netlink dumps and compares them with what it read right after loading the table, and
/// counts each set's elements against the records: any change to a chain, set or rule is
/// seen, and so is a lost element (`nft flush map`) or an extra one; sandboxes being added
/// or removed may have theirs or not.
#[test]
fn the_nftables_check_compares_chains_sets_rules_and_element_counts() {
    if !root_and_tools_or_skip(
        "the_nftables_check_compares_chains_sets_rules_and_element_counts",
        &["nft"],
    ) {
        return;
    }
    let ns = test_netns("fwshape");
    let fw = NftFirewall::new("randport");
    let intact_with = |fw: &NftFirewall, settled: &[SandboxRecord], in_flux: &[SandboxRecord]| {
        let (fw, settled, in_flux) = (fw.clone(), settled.to_vec(), in_flux.to_vec());
        ns.inside(move || fw.intact_within(&settled, &in_flux))
            .unwrap()
    };
    let intact = |fw: &NftFirewall| intact_with(fw, &[], &[]);
    let load = |fw: &NftFirewall| {
        let fw = fw.clone();
        ns.inside(move || fw.replace_all(&[])).unwrap();
    };
    load(&fw);
    assert!(intact(&fw), "intact right after the load");
    // Elements come and go with the records.
    let all = examples::all();
    let (f, records) = (fw.clone(), all.clone());
    ns.inside(move || f.add_many(&records)).unwrap();
    assert!(intact_with(&fw, &all, &[]), "elements added");
    assert!(!intact(&fw), "elements no record names are seen");
    assert!(
        intact_with(&fw, &[], &all),
        "elements of sandboxes being added may be there"
    );
    let (f, one) = (fw.clone(), all[0].clone());
    ns.inside(move || f.remove(&one, &[])).unwrap();
    assert!(intact_with(&fw, &all[1..], &[]), "elements removed");
    assert!(
        !intact_with(&fw, &all, &[]),
        "a lost sandbox's elements are seen"
    );
    assert!(
        intact_with(&fw, &all[1..], &all[..1]),
        "not while it is being added"
    );
    for (kind, name) in [("map", "hostports4"), ("set", "hairpin4")] {
        ns.sh("nft", &["flush", kind, "inet", "randport", name], "");
        assert!(
            !intact_with(&fw, &all[1..], &[]),
            "nft flush {kind} {name} went unnoticed"
        );
        let (f, records) = (fw.clone(), all[1..].to_vec());
        ns.inside(move || f.replace_all(&records)).unwrap();
        assert!(intact_with(&fw, &all[1..], &[]), "intact after the rebuild");
    }
    load(&fw);
    // Each kind of damage is seen, and a rebuild makes the table intact again.
    let damages: [&[&str]; 5] = [
        &["flush", "table", "inet", "randport"],
        &["flush", "chain", "inet", "randport", "prerouting"],
        &["add", "rule", "inet", "randport", "hostports", "accept"],
        &[
            "insert",
            "rule",
            "inet",
            "randport",
            "postrouting",
            "counter",
        ],
        &["delete", "table", "inet", "randport"],
    ];
    for damage in damages {
        ns.sh("nft", damage, "");
        assert!(!intact(&fw), "nft {} went unnoticed", damage.join(" "));
        load(&fw);
        assert!(
            intact(&fw),
            "intact after the rebuild that followed nft {}",
            damage.join(" ")
        );
    }
    // A backend that did not load the table itself has no reference: it does not take
    // the table for its own until its rebuild (what an agent does at start) reads one.
    let fresh = NftFirewall::new("randport");
    assert!(!intact(&fresh), "no reference: not intact");
    load(&fresh);
    assert!(intact(&fresh), "intact after its own load");
    ns.sh("nft", &["flush", "chain", "inet", "randport", "output"], "");
    assert!(!intact(&fresh), "then damage is seen by shape");
}

/// Element additions and removals go to the kernel as netlink batches; the table they
/// leave must be the one `nft -f` of the rendered text leaves, element for element,
/// comments included.
#[test]
fn netlink_element_batches_leave_the_table_nft_f_of_the_rendered_text_leaves() {
    if !root_and_tools_or_skip(
        "netlink_element_batches_leave_the_table_nft_f_of_the_rendered_text_leaves",
        &["nft"],
    ) {
        return;
    }
    use randport_core::render::nft;
    use randport_plugin::netfilter::nft_elements::{self, BatchError, Op};
    let by_netlink = test_netns("nlbatch");
    let by_text = test_netns("nfttext");
    let all = examples::all();
    let fw = NftFirewall::new("randport");
    let list =
        |ns: &randport_itests::Netns| ns.sh("nft", &["list", "table", "inet", "randport"], "");

    let (f, records) = (fw.clone(), all.clone());
    by_netlink.inside(move || {
        f.replace_all(&[]).unwrap();
        f.add_many(&records).unwrap();
    });
    by_text.sh("nft", &["-f", "-"], &nft::ruleset("randport", &[]));
    let added: String = all
        .iter()
        .map(|r| nft::add_sandbox("randport", r))
        .collect();
    by_text.sh("nft", &["-f", "-"], &added);
    let text = list(&by_text);
    assert!(
        text.contains("comment \"sb:"),
        "elements with their comments:\n{text}"
    );
    assert_eq!(
        list(&by_netlink),
        text,
        "after adding every example sandbox"
    );
    // What nft wrote from the text reads back, over netlink, as exactly the elements we
    // render, field by field: what CHECK compares.
    let sets = nft::SETS.map(|(name, _, _)| name);
    let read = by_text.inside(move || nft_elements::read("randport", &sets).unwrap());
    let randport_plugin::netfilter::netlink::Reading::Read(mut read) = read else {
        panic!("the reading was interrupted in a namespace nothing else changes");
    };
    let mut rendered: Vec<nft_elements::StoredElement> = all
        .iter()
        .flat_map(nft::elements)
        .map(|e| nft_elements::stored(&e))
        .collect();
    read.sort();
    rendered.sort();
    assert_eq!(read, rendered);

    // Removing one sandbox, twice (the second finds its elements gone).
    for _ in 0..2 {
        let (f, one) = (fw.clone(), all[1].clone());
        by_netlink.inside(move || f.remove(&one, &[])).unwrap();
    }
    by_text.sh(
        "nft",
        &["-f", "-"],
        &nft::remove_sandbox("randport", &all[1]),
    );
    assert_eq!(
        list(&by_netlink),
        list(&by_text),
        "after removing one sandbox"
    );

    // A removal whose key now maps elsewhere is refused whole and changes nothing.
    let before = list(&by_netlink);
    let mut elements = nft::elements(&all[0]);
    let moved = elements
        .iter_mut()
        .find(|e| e.value.is_some())
        .expect("the first example maps a port");
    moved.value = Some(vec![
        nft::Field::Ip("198.18.7.7".parse().unwrap()),
        nft::Field::Port(1),
    ]);
    let ops: Vec<(Op, nft::SetElement)> = elements.into_iter().map(|e| (Op::Remove, e)).collect();
    let refused = by_netlink
        .inside(move || {
            let ops: Vec<(Op, &nft::SetElement)> = ops.iter().map(|(o, e)| (*o, e)).collect();
            nft_elements::apply("randport", &ops)
        })
        .unwrap_err();
    assert!(
        matches!(refused, BatchError::Refused { .. }),
        "refused by the kernel: {refused}"
    );
    assert!(
        refused.to_string().contains("add element inet randport"),
        "{refused}"
    );
    assert_eq!(list(&by_netlink), before, "a refused batch changes nothing");

    // With the table gone, an addition is refused with ENOENT (the agent rebuilds).
    by_netlink.sh("nft", &["delete", "table", "inet", "randport"], "");
    let (f, one) = (fw.clone(), all[0].clone());
    let err = by_netlink.inside(move || f.add(&one)).unwrap_err();
    assert!(
        err.to_string().contains("No such file or directory"),
        "{err}"
    );
}

/// Two sandboxes with one pod address (a stale record beside the pod's new sandbox) share
/// the hairpin element `podIP . podIP`: removing the stale one keeps it for the other.
#[test]
fn removing_a_sandbox_keeps_the_hairpin_element_another_sandbox_shares() {
    if !root_and_tools_or_skip(
        "removing_a_sandbox_keeps_the_hairpin_element_another_sandbox_shares",
        &["nft"],
    ) {
        return;
    }
    use randport_plugin::netfilter::netlink::Reading;
    use randport_plugin::netfilter::nft_elements;
    let ns = test_netns("hairpin");
    let fw = NftFirewall::new("randport");
    let old = examples::one_tcp();
    let mut new = examples::one_tcp();
    new.sandbox = randport_core::SandboxId("newer0sandbox".into());
    new.mappings[0].host_port += 1;
    let hairpins = |ns: &randport_itests::Netns| -> usize {
        let read = ns.inside(|| nft_elements::read("randport", &["hairpin4"]).unwrap());
        match read {
            Reading::Read(elements) => elements.len(),
            Reading::Interrupted => panic!("interrupted"),
        }
    };
    for keep in [true, false] {
        let (f, both) = (fw.clone(), vec![old.clone(), new.clone()]);
        ns.inside(move || f.replace_all(&both)).unwrap();
        assert_eq!(hairpins(&ns), 1, "one element for the shared address");
        let shared = if keep { old.pod_ips.clone() } else { vec![] };
        let (f, o, n) = (fw.clone(), old.clone(), new.clone());
        ns.inside(move || f.remove_keeping(&o, &shared, &|| vec![n.clone()]))
            .unwrap();
        // Kept when the agent says the address is shared; without it, gone (the bug).
        assert_eq!(hairpins(&ns), usize::from(keep), "keep = {keep}");
    }
}
