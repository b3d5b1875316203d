//! From a pod's container ports to the mappings a new sandbox gets.
//!
//! A pod with the port-mapping annotation gets a mapping for every container port: the
//! explicit hostPort where the spec has one, a random port of the range otherwise. A pod
//! without the annotation gets only its explicit hostPorts, as galaxy does. Explicit ports
//! are claimed first, so a random pick never takes a port the same pod names. If any port
//! cannot be had, everything this call allocated is given back before the error returns;
//! the caller drops whatever its probe held.

use std::net::IpAddr;

use crate::allocator::{AllocError, HostPortAllocator, PortKey};
use crate::model::{ContainerPort, IpFamily, Mapping, PodRef, Protocol, SandboxRequest};

/// Why a sandbox's ports cannot be planned.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    /// There are ports to map but the main plugin gave the pod no address.
    #[error(
        "pod {pod}: no pod IP in the previous plugin's result, so its ports cannot be \
         mapped; check that randport comes after the main plugin in the conflist"
    )]
    NoPodIp {
        /// The pod.
        pod: PodRef,
    },
    /// A container port of 0.
    #[error(
        "pod {pod}: container {container} declares containerPort 0; use a port from 1 to 65535"
    )]
    ZeroContainerPort {
        /// The pod.
        pod: PodRef,
        /// The container.
        container: String,
    },
    /// The same port is declared twice.
    #[error(
        "pod {pod}: containerPort {port}/{protocol} is declared twice (containers {first} and \
         {second}) with the same hostPort and hostIP; remove one of them"
    )]
    DuplicateContainerPort {
        /// The pod.
        pod: PodRef,
        /// The container port.
        port: u16,
        /// Its protocol.
        protocol: Protocol,
        /// The container that declares it first.
        first: String,
        /// The container that declares it again.
        second: String,
    },
    /// A hostIP of a family the pod has no address in.
    #[error(
        "pod {pod}: container {container} port {port}/{protocol} asks for hostIP {host_ip} but \
         the pod has no address of that family"
    )]
    HostIpFamily {
        /// The pod.
        pod: PodRef,
        /// The container.
        container: String,
        /// The container port.
        port: u16,
        /// Its protocol.
        protocol: Protocol,
        /// The host IP asked for.
        host_ip: IpAddr,
    },
    /// An explicit hostPort is mapped for another pod already.
    #[error(
        "pod {pod}: container {container} asks for hostPort {port}/{key}, which is already \
         mapped for another pod on this node; pick another hostPort or leave it empty for a \
         random one"
    )]
    HostPortTaken {
        /// The pod.
        pod: PodRef,
        /// The container.
        container: String,
        /// The host port.
        port: u16,
        /// Protocol and host IP.
        key: PortKey,
    },
    /// An explicit hostPort is held by some other process on the node.
    #[error(
        "pod {pod}: container {container} asks for hostPort {port}/{key}, which another process \
         on this node holds; free the port or pick another one"
    )]
    HostPortBusy {
        /// The pod.
        pod: PodRef,
        /// The container.
        container: String,
        /// The host port.
        port: u16,
        /// Protocol and host IP.
        key: PortKey,
    },
    /// No random port is left.
    #[error("pod {pod}: container {container} port {port}: {source}")]
    Exhausted {
        /// The pod.
        pod: PodRef,
        /// The container.
        container: String,
        /// The container port.
        port: u16,
        /// The allocator's account of the range.
        source: Box<AllocError>,
    },
}

/// Decides the mappings for a new sandbox and reserves their host ports in `alloc`.
///
/// `probe(key, port)` is asked for every host port before it is used (explicit ones too);
/// the agent binds the port there and returns false if it cannot. The mappings come back
/// in the order of `request.ports`.
pub fn plan(
    request: &SandboxRequest,
    alloc: &mut HostPortAllocator,
    rng: &mut fastrand::Rng,
    mut probe: impl FnMut(PortKey, u16) -> bool,
) -> Result<Vec<Mapping>, PlanError> {
    let wanted: Vec<&ContainerPort> = request
        .ports
        .iter()
        .filter(|p| request.mapping_requested || p.host_port.is_some())
        .collect();
    validate(request, &wanted)?;

    let mut taken: Vec<(PortKey, u16)> = Vec::new();
    let mut chosen: Vec<Option<u16>> = vec![None; wanted.len()];
    let result = (|| {
        // Explicit host ports first, so that no random pick takes one of them; those left
        // to another port mapper are listed and reserved (one port, one owner: a random
        // pick must never land on a port portmap maps), but not held or probed. A port
        // left to the other mapper that is reserved already (two pods asking it for the
        // same port) is the other mapper's conflict, not an error here.
        for (i, port) in wanted.iter().enumerate() {
            let Some(host_port) = port.host_port else {
                continue;
            };
            let key = PortKey::on(port.protocol, port.host_ip);
            if request.leave_explicit {
                if alloc.claim(key, host_port).is_ok() {
                    taken.push((key, host_port));
                }
                chosen[i] = Some(host_port);
                continue;
            }
            let err = |busy: bool| {
                let (pod, container) = (request.pod.clone(), port.container.clone());
                if busy {
                    PlanError::HostPortBusy {
                        pod,
                        container,
                        port: host_port,
                        key,
                    }
                } else {
                    PlanError::HostPortTaken {
                        pod,
                        container,
                        port: host_port,
                        key,
                    }
                }
            };
            alloc.claim(key, host_port).map_err(|_| err(false))?;
            taken.push((key, host_port));
            if !probe(key, host_port) {
                return Err(err(true));
            }
            chosen[i] = Some(host_port);
        }
        for (i, port) in wanted.iter().enumerate() {
            if chosen[i].is_some() {
                continue;
            }
            let key = PortKey::on(port.protocol, port.host_ip);
            let host_port =
                alloc
                    .allocate(key, rng, &mut probe)
                    .map_err(|source| PlanError::Exhausted {
                        pod: request.pod.clone(),
                        container: port.container.clone(),
                        port: port.container_port,
                        source: Box::new(source),
                    })?;
            taken.push((key, host_port));
            chosen[i] = Some(host_port);
        }
        Ok(())
    })();
    if let Err(err) = result {
        for (key, port) in taken {
            alloc.release(key, port);
        }
        return Err(err);
    }

    Ok(wanted
        .iter()
        .zip(chosen)
        .filter_map(|(port, host_port)| {
            Some(Mapping {
                container: port.container.clone(),
                host_ip: PortKey::on(port.protocol, port.host_ip).host_ip,
                host_port: host_port?,
                container_port: port.container_port,
                protocol: port.protocol,
                explicit: port.host_port.is_some(),
                delegated: request.leave_explicit && port.host_port.is_some(),
            })
        })
        .collect())
}

fn validate(request: &SandboxRequest, wanted: &[&ContainerPort]) -> Result<(), PlanError> {
    let pod = || request.pod.clone();
    if !wanted.is_empty() && request.pod_ips.is_empty() {
        return Err(PlanError::NoPodIp { pod: pod() });
    }
    for (i, port) in wanted.iter().enumerate() {
        if port.container_port == 0 {
            return Err(PlanError::ZeroContainerPort {
                pod: pod(),
                container: port.container.clone(),
            });
        }
        let host_ip = PortKey::on(port.protocol, port.host_ip).host_ip;
        if let Some(host_ip) = host_ip {
            let family = IpFamily::of(&host_ip);
            if !request.pod_ips.iter().any(|ip| IpFamily::of(ip) == family) {
                return Err(PlanError::HostIpFamily {
                    pod: pod(),
                    container: port.container.clone(),
                    port: port.container_port,
                    protocol: port.protocol,
                    host_ip,
                });
            }
        }
        let same = |other: &&&ContainerPort| {
            other.container_port == port.container_port
                && other.protocol == port.protocol
                && other.host_port == port.host_port
                && PortKey::on(other.protocol, other.host_ip).host_ip == host_ip
        };
        if let Some(first) = wanted[..i].iter().find(same) {
            return Err(PlanError::DuplicateContainerPort {
                pod: pod(),
                port: port.container_port,
                protocol: port.protocol,
                first: first.container.clone(),
                second: port.container.clone(),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::SandboxId;
    use crate::range::{PortRange, ReservedPorts};

    fn request(ports: Vec<ContainerPort>, mapping_requested: bool) -> SandboxRequest {
        SandboxRequest {
            pod: PodRef::new("default", "web-0"),
            sandbox: SandboxId("c0ffee".into()),
            pod_ips: vec!["198.18.0.5".parse().unwrap()],
            ports,
            mapping_requested,
            leave_explicit: false,
        }
    }

    fn allocator() -> HostPortAllocator {
        HostPortAllocator::new(PortRange::new(20000, 20099).unwrap(), ReservedPorts::none())
    }

    fn explicit(mut port: ContainerPort, host_port: u16) -> ContainerPort {
        port.host_port = Some(host_port);
        port
    }

    #[test]
    fn annotated_pod_gets_every_port_in_order() {
        let req = request(
            vec![
                ContainerPort::new("web", 80, Protocol::Tcp),
                explicit(ContainerPort::new("web", 443, Protocol::Tcp), 8443),
                ContainerPort::new("dns", 53, Protocol::Udp),
            ],
            true,
        );
        let mut alloc = allocator();
        let maps = plan(
            &req,
            &mut alloc,
            &mut fastrand::Rng::with_seed(1),
            |_, _| true,
        )
        .unwrap();
        let summary: Vec<_> = maps
            .iter()
            .map(|m| (m.container.as_str(), m.container_port, m.explicit))
            .collect();
        assert_eq!(
            summary,
            vec![("web", 80, false), ("web", 443, true), ("dns", 53, false)]
        );
        assert_eq!(maps[1].host_port, 8443);
        assert!(
            PortRange::new(20000, 20099)
                .unwrap()
                .contains(maps[0].host_port)
        );
        assert!(!alloc.is_free(PortKey::any(Protocol::Udp), maps[2].host_port));
    }

    #[test]
    fn explicit_ports_left_to_another_mapper_are_listed_and_reserved_but_not_probed() {
        let mut req = request(
            vec![
                ContainerPort::new("web", 80, Protocol::Tcp),
                explicit(ContainerPort::new("web", 443, Protocol::Tcp), 20050),
            ],
            true,
        );
        req.leave_explicit = true;
        let mut alloc = allocator();
        let mut probed = Vec::new();
        let maps = plan(
            &req,
            &mut alloc,
            &mut fastrand::Rng::with_seed(1),
            |_, p| {
                probed.push(p);
                true
            },
        )
        .unwrap();
        let summary: Vec<_> = maps
            .iter()
            .map(|m| (m.container_port, m.explicit, m.delegated, m.owned()))
            .collect();
        assert_eq!(
            summary,
            vec![(80, false, false, true), (443, true, true, false)]
        );
        assert_eq!(maps[1].host_port, 20050);
        // The other plugin owns 20050: not held here, but reserved, so that no random
        // pick lands on it.
        assert_eq!(probed, vec![maps[0].host_port]);
        assert!(!alloc.is_free(PortKey::any(Protocol::Tcp), 20050));
        assert!(!alloc.is_free(PortKey::any(Protocol::Tcp), maps[0].host_port));

        // Mapped by randport when nobody else maps them.
        req.leave_explicit = false;
        let maps = plan(
            &req,
            &mut allocator(),
            &mut fastrand::Rng::with_seed(1),
            |_, _| true,
        )
        .unwrap();
        assert!(maps.iter().all(Mapping::owned));
    }

    #[test]
    fn pod_without_annotation_gets_only_explicit_ports() {
        let req = request(
            vec![
                ContainerPort::new("web", 80, Protocol::Tcp),
                explicit(ContainerPort::new("web", 443, Protocol::Tcp), 8443),
            ],
            false,
        );
        let maps = plan(
            &req,
            &mut allocator(),
            &mut fastrand::Rng::with_seed(1),
            |_, _| true,
        )
        .unwrap();
        assert_eq!(maps.len(), 1);
        assert_eq!((maps[0].host_port, maps[0].container_port), (8443, 443));
    }

    #[test]
    fn explicit_ports_are_claimed_before_random_ones() {
        // Range of two ports; the explicit one takes 20001, so the random one must get 20000.
        let mut alloc =
            HostPortAllocator::new(PortRange::new(20000, 20001).unwrap(), ReservedPorts::none());
        let req = request(
            vec![
                ContainerPort::new("a", 80, Protocol::Tcp),
                explicit(ContainerPort::new("b", 81, Protocol::Tcp), 20001),
            ],
            true,
        );
        let maps = plan(
            &req,
            &mut alloc,
            &mut fastrand::Rng::with_seed(9),
            |_, _| true,
        )
        .unwrap();
        assert_eq!((maps[0].host_port, maps[1].host_port), (20000, 20001));
    }

    #[test]
    fn failure_gives_back_every_port_it_took() {
        let mut alloc =
            HostPortAllocator::new(PortRange::new(20000, 20000).unwrap(), ReservedPorts::none());
        let req = request(
            vec![
                explicit(ContainerPort::new("a", 80, Protocol::Tcp), 8080),
                ContainerPort::new("a", 81, Protocol::Tcp),
                ContainerPort::new("a", 82, Protocol::Tcp),
            ],
            true,
        );
        let err = plan(
            &req,
            &mut alloc,
            &mut fastrand::Rng::with_seed(2),
            |_, _| true,
        )
        .unwrap_err();
        assert!(
            matches!(err, PlanError::Exhausted { port: 82, .. }),
            "{err}"
        );
        assert!(alloc.is_free(PortKey::any(Protocol::Tcp), 8080));
        assert!(alloc.is_free(PortKey::any(Protocol::Tcp), 20000));
        assert!(err.to_string().starts_with(
            "pod default/web-0: container a port 82: no free TCP host port in range 20000-20000"
        ));
    }

    #[test]
    fn explicit_port_held_elsewhere_fails_the_plan() {
        let mut alloc = allocator();
        let req = request(
            vec![explicit(ContainerPort::new("a", 80, Protocol::Tcp), 8080)],
            true,
        );
        let err = plan(
            &req,
            &mut alloc,
            &mut fastrand::Rng::with_seed(2),
            |_, p| p != 8080,
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "pod default/web-0: container a asks for hostPort 8080/TCP, which another process on \
             this node holds; free the port or pick another one"
        );
        assert!(alloc.is_free(PortKey::any(Protocol::Tcp), 8080));
        alloc.claim(PortKey::any(Protocol::Tcp), 8080).unwrap();
        let err = plan(
            &req,
            &mut alloc,
            &mut fastrand::Rng::with_seed(2),
            |_, _| true,
        )
        .unwrap_err();
        assert!(matches!(err, PlanError::HostPortTaken { port: 8080, .. }));
    }

    #[test]
    fn random_ports_skip_what_the_probe_refuses() {
        let req = request(vec![ContainerPort::new("a", 80, Protocol::Tcp)], true);
        let mut alloc =
            HostPortAllocator::new(PortRange::new(20000, 20003).unwrap(), ReservedPorts::none());
        let maps = plan(
            &req,
            &mut alloc,
            &mut fastrand::Rng::with_seed(4),
            |_, p| p == 20002,
        )
        .unwrap();
        assert_eq!(maps[0].host_port, 20002);
    }

    #[test]
    fn invalid_pods_are_rejected_before_anything_is_allocated() {
        let mut alloc = allocator();
        let mut rng = fastrand::Rng::with_seed(5);
        let mut no_ip = request(vec![ContainerPort::new("a", 80, Protocol::Tcp)], true);
        no_ip.pod_ips.clear();
        assert!(matches!(
            plan(&no_ip, &mut alloc, &mut rng, |_, _| true),
            Err(PlanError::NoPodIp { .. })
        ));
        // Nothing to map: no address needed.
        no_ip.mapping_requested = false;
        assert_eq!(plan(&no_ip, &mut alloc, &mut rng, |_, _| true), Ok(vec![]));

        let zero = request(vec![ContainerPort::new("a", 0, Protocol::Tcp)], true);
        assert!(matches!(
            plan(&zero, &mut alloc, &mut rng, |_, _| true),
            Err(PlanError::ZeroContainerPort { .. })
        ));

        let dup = request(
            vec![
                ContainerPort::new("a", 80, Protocol::Tcp),
                ContainerPort::new("b", 80, Protocol::Tcp),
            ],
            true,
        );
        let err = plan(&dup, &mut alloc, &mut rng, |_, _| true).unwrap_err();
        assert_eq!(
            err.to_string(),
            "pod default/web-0: containerPort 80/TCP is declared twice (containers a and b) with \
             the same hostPort and hostIP; remove one of them"
        );
        // Same port over two protocols is fine.
        let both = request(
            vec![
                ContainerPort::new("a", 53, Protocol::Tcp),
                ContainerPort::new("a", 53, Protocol::Udp),
            ],
            true,
        );
        assert_eq!(
            plan(&both, &mut alloc, &mut rng, |_, _| true)
                .unwrap()
                .len(),
            2
        );

        let mut v6_host = ContainerPort::new("a", 80, Protocol::Tcp);
        v6_host.host_ip = Some("2001:db8::1".parse().unwrap());
        let fam = request(vec![v6_host], true);
        assert!(matches!(
            plan(&fam, &mut alloc, &mut rng, |_, _| true),
            Err(PlanError::HostIpFamily { .. })
        ));
        assert_eq!(alloc.in_use(Protocol::Tcp), 1);
    }

    #[test]
    fn unspecified_host_ip_is_dropped() {
        let mut port = ContainerPort::new("a", 80, Protocol::Tcp);
        port.host_ip = Some("0.0.0.0".parse().unwrap());
        let maps = plan(
            &request(vec![port], true),
            &mut allocator(),
            &mut fastrand::Rng::with_seed(1),
            |k, _| k.host_ip.is_none(),
        )
        .unwrap();
        assert_eq!(maps[0].host_ip, None);
    }
}
