//! Property tests of the allocator and planner against a simple model of which
//! (protocol, hostIP, port) triples are held.

use std::collections::HashSet;
use std::net::IpAddr;

use proptest::prelude::*;
use randport_core::{
    AllocError, ContainerPort, HostPortAllocator, PodRef, PortKey, PortRange, Protocol,
    ReservedPorts, SandboxId, SandboxRequest, plan,
};

/// The keys operations draw from: all addresses, and two single addresses, per protocol.
fn keys() -> Vec<PortKey> {
    let ips: [Option<IpAddr>; 3] = [
        None,
        Some("192.0.2.1".parse().unwrap()),
        Some("2001:db8::1".parse().unwrap()),
    ];
    Protocol::ALL
        .iter()
        .flat_map(|p| ips.iter().map(move |ip| PortKey::on(*p, *ip)))
        .collect()
}

/// Whether holding `port` for `a` blocks it for `b`.
fn conflicts(a: PortKey, b: PortKey) -> bool {
    a.protocol == b.protocol
        && (a.host_ip.is_none() || b.host_ip.is_none() || a.host_ip == b.host_ip)
}

#[derive(Debug, Clone)]
enum Op {
    Allocate { key: usize },
    Release { pick: usize },
    Claim { key: usize, port: u16 },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..9usize).prop_map(|key| Op::Allocate { key }),
        2 => any::<usize>().prop_map(|pick| Op::Release { pick }),
        1 => (0..9usize, 1u16..=60).prop_map(|(key, port)| Op::Claim { key, port }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Ports are unique per conflicting key, inside the range, never reserved; an
    /// allocation fails exactly when the model has no free port; a released port is free.
    #[test]
    fn allocator_matches_the_model(
        lo in 1u16..40,
        len in 1u16..24,
        reserved in proptest::collection::vec(1u16..64, 0..6),
        refused in proptest::collection::vec(1u16..64, 0..4),
        ops in proptest::collection::vec(op(), 1..120),
        seed in any::<u64>(),
    ) {
        let range = PortRange::new(lo, lo + len - 1).unwrap();
        let reserved_set: HashSet<u16> = reserved.iter().copied().collect();
        let refused_set: HashSet<u16> = refused.iter().copied().collect();
        let mut alloc = HostPortAllocator::new(range, reserved.iter().copied().collect::<ReservedPorts>());
        let mut rng = fastrand::Rng::with_seed(seed);
        let keys = keys();
        let mut held: Vec<(PortKey, u16)> = Vec::new();
        let free_in_model = |held: &[(PortKey, u16)], key: PortKey, port: u16| {
            !held.iter().any(|(k, p)| *p == port && conflicts(*k, key))
        };

        for op in ops {
            match op {
                Op::Allocate { key } => {
                    let key = keys[key];
                    let available = range
                        .iter()
                        .filter(|p| !reserved_set.contains(p) && !refused_set.contains(p) && free_in_model(&held, key, *p))
                        .count();
                    match alloc.allocate(key, &mut rng, |_, p| !refused_set.contains(&p)) {
                        Ok(port) => {
                            prop_assert!(available > 0);
                            prop_assert!(range.contains(port), "{port} outside {range}");
                            prop_assert!(!reserved_set.contains(&port) && !refused_set.contains(&port));
                            prop_assert!(free_in_model(&held, key, port), "{port} handed out twice");
                            held.push((key, port));
                        }
                        Err(AllocError::Exhausted { .. }) => prop_assert_eq!(available, 0),
                        Err(other) => prop_assert!(false, "unexpected {other}"),
                    }
                }
                Op::Release { pick } => {
                    if held.is_empty() {
                        continue;
                    }
                    let (key, port) = held.swap_remove(pick % held.len());
                    prop_assert!(alloc.release(key, port));
                    prop_assert!(!alloc.release(key, port), "released twice");
                    if free_in_model(&held, key, port) {
                        prop_assert!(alloc.is_free(key, port));
                        // Reusable: claiming it again works.
                        alloc.claim(key, port).unwrap();
                        prop_assert!(alloc.release(key, port));
                    }
                }
                Op::Claim { key, port } => {
                    let key = keys[key];
                    let ok = alloc.claim(key, port).is_ok();
                    prop_assert_eq!(ok, free_in_model(&held, key, port));
                    if ok {
                        held.push((key, port));
                    }
                }
            }
            for key in &keys {
                let expected = range.iter().filter(|p| held.iter().any(|(k, q)| q == p && k.protocol == key.protocol)).count();
                prop_assert_eq!(alloc.in_use(key.protocol), expected);
            }
        }
    }

    /// Filling a range port by port hands out every free port exactly once and then
    /// reports exhaustion; releasing one makes exactly that one available again.
    #[test]
    fn exhaustion_exactly_when_full(lo in 1u16..60000, len in 1u16..300, seed in any::<u64>(), pick in any::<usize>()) {
        let range = PortRange::new(lo, lo.saturating_add(len - 1)).unwrap();
        let mut alloc = HostPortAllocator::new(range, ReservedPorts::none());
        let mut rng = fastrand::Rng::with_seed(seed);
        let key = PortKey::any(Protocol::Udp);
        let mut got = Vec::new();
        for _ in 0..range.len() {
            got.push(alloc.allocate(key, &mut rng, |_, _| true).unwrap());
        }
        let unique: HashSet<u16> = got.iter().copied().collect();
        prop_assert_eq!(unique.len(), range.len());
        prop_assert!(alloc.allocate(key, &mut rng, |_, _| true).is_err());
        let back = got[pick % got.len()];
        prop_assert!(alloc.release(key, back));
        prop_assert_eq!(alloc.allocate(key, &mut rng, |_, _| true).unwrap(), back);
    }

    /// The planner maps every wanted port once, honours explicit host ports, keeps the
    /// order of the spec, and leaves the allocator as it found it when it fails.
    #[test]
    fn planner_maps_each_port_once(
        ports in proptest::collection::vec((1u16..100, 0usize..3, proptest::option::of(100u16..110)), 0..12),
        requested in any::<bool>(),
        seed in any::<u64>(),
    ) {
        let mut seen = HashSet::new();
        let ports: Vec<ContainerPort> = ports
            .into_iter()
            .filter(|(p, proto, hp)| seen.insert((*p, *proto, *hp)))
            .map(|(p, proto, hp)| {
                let mut cp = ContainerPort::new("c", p, Protocol::ALL[proto]);
                cp.host_port = hp;
                cp
            })
            .collect();
        let request = SandboxRequest {
            pod: PodRef::new("ns", "pod"),
            sandbox: SandboxId("sb".into()),
            pod_ips: vec!["198.18.0.2".parse().unwrap()],
            ports: ports.clone(),
            mapping_requested: requested,
            leave_explicit: false,
        };
        let range = PortRange::new(20000, 20005).unwrap();
        let mut alloc = HostPortAllocator::new(range, ReservedPorts::none());
        match plan(&request, &mut alloc, &mut fastrand::Rng::with_seed(seed), |_, _| true) {
            Ok(maps) => {
                let wanted: Vec<&ContainerPort> = ports.iter().filter(|p| requested || p.host_port.is_some()).collect();
                prop_assert_eq!(maps.len(), wanted.len());
                let mut hosts = HashSet::new();
                for (m, p) in maps.iter().zip(&wanted) {
                    prop_assert_eq!((m.container_port, m.protocol), (p.container_port, p.protocol));
                    match p.host_port {
                        Some(hp) => prop_assert_eq!(m.host_port, hp),
                        None => prop_assert!(range.contains(m.host_port)),
                    }
                    prop_assert!(hosts.insert((m.protocol, m.host_port)), "host port twice");
                    prop_assert!(!alloc.is_free(PortKey::any(m.protocol), m.host_port));
                }
            }
            Err(_) => {
                for proto in Protocol::ALL {
                    prop_assert_eq!(alloc.in_use(proto), 0, "plan failed but left ports allocated");
                    for hp in 100u16..110 {
                        prop_assert!(alloc.is_free(PortKey::any(proto), hp));
                    }
                }
            }
        }
    }
}
