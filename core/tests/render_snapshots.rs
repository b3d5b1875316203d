//! Snapshots of everything randport renders, for the example sandboxes: nft rulesets and
//! transactions, iptables-restore payloads, annotation JSON. Review changes with
//! `cargo insta review`; CI fails on any unreviewed change.

use randport_core::annotation::encode;
use randport_core::examples;
use randport_core::render::iptables::{self, hook_jumps};
use randport_core::render::nft;
use randport_core::{IpFamily, SandboxRecord};

const TABLE: &str = nft::DEFAULT_TABLE;

fn both_families(f: impl Fn(IpFamily) -> Option<String>) -> String {
    format!(
        "# IPv4 (iptables-restore --noflush)\n{}\n# IPv6 (ip6tables-restore --noflush)\n{}",
        f(IpFamily::V4).unwrap_or_else(|| "(nothing)\n".into()),
        f(IpFamily::V6).unwrap_or_else(|| "(nothing)\n".into()),
    )
}

fn add_all_backends(record: &SandboxRecord) -> String {
    format!(
        "## nft add transaction\n{}\n## iptables add payloads\n{}",
        nft::add_sandbox(TABLE, record),
        both_families(|family| iptables::add_sandbox(family, record)),
    )
}

#[test]
fn one_tcp_port() {
    insta::assert_snapshot!(add_all_backends(&examples::one_tcp()));
}

#[test]
fn tcp_and_udp_ports_on_several_containers() {
    insta::assert_snapshot!(add_all_backends(&examples::tcp_udp_containers()));
}

#[test]
fn host_ip_specific_port() {
    insta::assert_snapshot!(add_all_backends(&examples::host_ip()));
}

#[test]
fn ipv6_dual_stack() {
    insta::assert_snapshot!(add_all_backends(&examples::dual_stack()));
}

#[test]
fn removal() {
    let record = examples::tcp_udp_containers();
    insta::assert_snapshot!(format!(
        "## nft remove transaction\n{}\n## iptables remove payloads\n{}",
        nft::remove_sandbox(TABLE, &record),
        both_families(|family| iptables::remove_sandbox(family, &record)),
    ));
}

#[test]
fn full_nft_ruleset_with_hairpin_sets() {
    insta::assert_snapshot!(nft::ruleset(TABLE, &examples::all()));
}

#[test]
fn empty_nft_ruleset() {
    insta::assert_snapshot!(nft::ruleset(TABLE, &[]));
}

#[test]
fn full_iptables_payload_with_hairpin_rules_and_jumps() {
    insta::assert_snapshot!(both_families(|family| Some(iptables::full_payload(
        family,
        &examples::all(),
        &hook_jumps(family)
    ))));
}

#[test]
fn full_iptables_payload_when_the_jumps_exist() {
    let payload = iptables::full_payload(IpFamily::V4, &[examples::one_tcp()], &[]);
    insta::assert_snapshot!(payload);
}

#[test]
fn annotation_json() {
    let text: Vec<String> = examples::all()
        .iter()
        .map(|r| format!("{}: {}", r.pod, encode(&r.annotation_entries())))
        .collect();
    insta::assert_snapshot!(text.join("\n"));
}

#[test]
fn ruleset_does_not_depend_on_record_order() {
    let mut reversed = examples::all();
    reversed.reverse();
    assert_eq!(
        nft::ruleset(TABLE, &reversed),
        nft::ruleset(TABLE, &examples::all())
    );
    assert_eq!(
        iptables::full_payload(IpFamily::V6, &reversed, &[]),
        iptables::full_payload(IpFamily::V6, &examples::all(), &[])
    );
}

#[test]
fn every_element_and_rule_is_tagged_with_its_sandbox() {
    for record in examples::all() {
        let tag = record.sandbox.tag();
        for line in nft::add_sandbox(TABLE, &record).lines() {
            assert!(line.contains(&format!("comment \"{tag}\"")), "{line}");
        }
        for family in [IpFamily::V4, IpFamily::V6] {
            for line in iptables::add_sandbox(family, &record)
                .unwrap_or_default()
                .lines()
            {
                if line.starts_with("-A") {
                    assert!(line.contains(&format!("--comment \"{tag}\"")), "{line}");
                }
            }
        }
    }
}

#[test]
fn teardowns() {
    insta::assert_snapshot!(format!(
        "## nft\n{}\n## iptables (all jumps present)\n{}",
        nft::teardown(TABLE),
        iptables::teardown_payload(&hook_jumps(IpFamily::V4))
    ));
}

#[test]
fn counts_match_the_rendered_lines() {
    for record in examples::all() {
        assert_eq!(
            nft::element_count(&record),
            nft::add_sandbox(TABLE, &record).lines().count()
        );
        for family in [IpFamily::V4, IpFamily::V6] {
            let lines = iptables::add_sandbox(family, &record)
                .map_or(0, |p| p.lines().filter(|l| l.starts_with("-A")).count());
            assert_eq!(iptables::rule_count(family, &record), lines);
        }
    }
}

#[test]
fn localhost_access_ruleset() {
    let options = nft::NftOptions { localhost: true };
    insta::assert_snapshot!(nft::ruleset_with(TABLE, &[examples::one_tcp()], options));
}
