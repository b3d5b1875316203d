//! The simulator at cluster size: N nodes × M pods built one after another with the real
//! plugin and agents, every mapping checked against the agents and the annotations, a
//! random sample reached with traffic, a tenth of the pods deleted and checked gone, and
//! the whole run torn down, with rates for each phase (`randport-sim demo` above
//! [`SCALE_FROM`] pods, and the scale scenario test).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use anyhow::Result;
use randport_core::Protocol;
use randport_core::annotation::PortEntry;

use crate::checks::Check;
use crate::cluster::{Cluster, ClusterSpec, PodSpec, port_free, tcp_greeting};

/// From this many pods on, the demo runs the scale checks (no line per pod, traffic on a
/// sample).
pub const SCALE_FROM: usize = 200;

/// What a scale run is asked to do.
#[derive(Debug, Clone)]
pub struct ScaleSpec {
    /// The cluster (nodes, firewall, wiring…).
    pub cluster: ClusterSpec,
    /// Pods per node.
    pub pods_per_node: usize,
    /// Percentage of pods whose mappings are reached with traffic (TCP and UDP).
    pub traffic_percent: usize,
    /// Percentage of pods deleted and checked gone.
    pub delete_percent: usize,
    /// After the teardown, wait until the kernel has freed the namespaces and say how
    /// long that took.
    pub wait_for_kernel: bool,
}

/// How long a phase took for how many pods.
#[derive(Debug, Clone, Copy, Default)]
pub struct Phase {
    /// Pods the phase handled.
    pub pods: usize,
    /// How long it took.
    pub time: Duration,
}

impl Phase {
    /// Pods per second.
    pub fn rate(&self) -> f64 {
        self.pods as f64 / self.time.as_secs_f64().max(1e-9)
    }
}

/// What a scale run measured and found.
#[derive(Debug, Clone, Default)]
pub struct ScaleReport {
    /// Nodes and agents up.
    pub up: Duration,
    /// Pods built (namespace, veth, addresses, routes, workload, Pod object, plugin ADD).
    pub build: Phase,
    /// The first 500 pods of the build (the rate before namespaces accumulate).
    pub build_first_500: Phase,
    /// The plugin's ADD, median and 99th percentile.
    pub add_p50: Duration,
    /// 99th percentile of ADD.
    pub add_p99: Duration,
    /// Mappings written back.
    pub mappings: usize,
    /// Checking every mapping against the agents, the sample with traffic.
    pub check: Duration,
    /// Pods whose mappings were reached with traffic.
    pub traffic_pods: usize,
    /// Pods deleted (plugin DEL, namespace gone) and checked gone.
    pub delete: Phase,
    /// Every remaining pod, node, agent and file removed: nothing of the run can be
    /// reached or found any more. (The kernel frees the namespaces' memory afterwards, in
    /// the background, as after `ip netns delete`.)
    pub teardown: Phase,
    /// With [`ScaleSpec::wait_for_kernel`]: from the start of the teardown until the
    /// kernel had freed as many namespaces as were alive before the run.
    pub kernel_cleanup: Option<Duration>,
    /// Network namespaces the kernel still held 60 s after the teardown beyond those alive
    /// before the run (other programs' namespaces count too); None when all were freed or
    /// the kernel does not say.
    pub namespaces_left: Option<usize>,
    /// Every check, passed or not.
    pub checks: Vec<Check>,
    /// Start to end.
    pub total: Duration,
}

impl ScaleReport {
    /// The checks that failed.
    pub fn failures(&self) -> Vec<&Check> {
        self.checks.iter().filter(|c| !c.ok()).collect()
    }
}

/// Builds, checks, deletes a share of the pods and tears down; `progress` is told what
/// happens (about every two seconds while building).
pub fn run(spec: &ScaleSpec, progress: &mut dyn FnMut(&str)) -> Result<ScaleReport> {
    let started = Instant::now();
    let namespaces_before = kernel_namespaces();
    let mut report = ScaleReport::default();
    let mut cluster = Cluster::up(spec.cluster.clone(), progress)?;
    report.up = started.elapsed();
    let nodes = cluster.nodes.len();
    let total = nodes * spec.pods_per_node;

    // Build: a pod on every node at a time, as kubelets start pods side by side: each is
    // wired in turn, then their plugin ADDs run at once.
    let build_started = Instant::now();
    let mut last_report = Instant::now();
    let mut adds = Vec::with_capacity(total);
    let mut built = 0;
    for j in 0..spec.pods_per_node {
        let specs: Vec<PodSpec> = (0..nodes)
            .map(|node| PodSpec::echo("scale", &format!("echo-{node}-{j}"), node))
            .collect();
        let names: Vec<String> = specs.iter().map(|s| s.name.clone()).collect();
        for (name, result) in names.iter().zip(cluster.add_pods_concurrently(specs)) {
            result.map_err(|e| e.context(format!("building pod scale/{name}")))?;
            report.mappings += cluster.mappings(name)?.len();
            adds.push(cluster.pod(name)?.add_time);
        }
        built += nodes;
        if built >= 500.min(total) && report.build_first_500.pods == 0 {
            report.build_first_500 = Phase {
                pods: built,
                time: build_started.elapsed(),
            };
        }
        if last_report.elapsed() > Duration::from_secs(2) || built == total {
            last_report = Instant::now();
            let elapsed = build_started.elapsed().as_secs_f64();
            progress(&format!(
                "built {built}/{total} pods, {} mappings ({:.0} pods/s)",
                report.mappings,
                built as f64 / elapsed
            ));
        }
    }
    report.build = Phase {
        pods: total,
        time: build_started.elapsed(),
    };
    adds.sort();
    report.add_p50 = adds.get(adds.len() / 2).copied().unwrap_or_default();
    report.add_p99 = adds.get(adds.len() * 99 / 100).copied().unwrap_or_default();

    // Every mapping: in its pod's annotation and in its node's agent, the same.
    let check_started = Instant::now();
    progress("checking every mapping against the agents and the annotations");
    report.checks.extend(summarise(
        &format!("the {total} pods' annotations match what their agents report"),
        crate::checks::annotations_match_agents(&cluster),
    ));
    let sample = pick(&cluster, spec.traffic_percent);
    report.traffic_pods = sample.len();
    progress(&format!(
        "reaching the mappings of {} random pods ({} %) from the outside client, TCP and UDP",
        sample.len(),
        spec.traffic_percent
    ));
    let sampled = targets(&cluster, &sample);
    report.checks.extend(reach(&cluster, &sampled, true));
    report.check = check_started.elapsed();

    // A share of the pods deleted, concurrently in small groups as kubelets do.
    let doomed = pick(&cluster, spec.delete_percent);
    progress(&format!(
        "deleting {} random pods ({} %)",
        doomed.len(),
        spec.delete_percent
    ));
    let gone_targets = targets(&cluster, &doomed);
    let delete_started = Instant::now();
    for group in doomed.chunks(nodes.max(1)) {
        for (name, result) in group.iter().zip(cluster.delete_pods_concurrently(group)) {
            report.checks.extend(
                result
                    .err()
                    .map(|e| Check::failed(format!("DEL of {name}"), e)),
            );
        }
    }
    report.delete = Phase {
        pods: doomed.len(),
        time: delete_started.elapsed(),
    };
    progress("checking the deleted pods are gone: no record, no answer, ports released");
    report.checks.extend(summarise(
        &format!(
            "after deleting {} pods, the remaining annotations match the agents and no agent holds a deleted pod",
            doomed.len()
        ),
        crate::checks::annotations_match_agents(&cluster),
    ));
    report.checks.extend(reach(&cluster, &gone_targets, false));
    report
        .checks
        .extend(ports_released(&cluster, &gone_targets));

    let remaining = cluster.pods.len();
    progress(&format!(
        "tearing down {remaining} pods, {nodes} nodes and their agents"
    ));
    let teardown_started = Instant::now();
    drop(cluster);
    report.teardown = Phase {
        pods: remaining,
        time: teardown_started.elapsed(),
    };
    if spec.wait_for_kernel {
        progress("waiting until the kernel has freed the namespaces");
        report.namespaces_left = wait_for_namespaces(namespaces_before, Duration::from_secs(60));
        report.kernel_cleanup = Some(teardown_started.elapsed());
    }
    report.total = started.elapsed();
    Ok(report)
}

/// One check for many: passed when all did, else the first few failures.
fn summarise(name: &str, checks: Vec<Check>) -> Vec<Check> {
    let failed: Vec<String> = checks
        .iter()
        .filter_map(|c| c.result.as_ref().err().map(|e| format!("{}: {e}", c.name)))
        .collect();
    if failed.is_empty() {
        return vec![Check::new(
            format!("{name} ({} checks)", checks.len()),
            Ok(()),
        )];
    }
    let shown: Vec<&str> = failed.iter().take(5).map(String::as_str).collect();
    vec![Check::new(
        name,
        Err(format!(
            "{} of {} failed: {}",
            failed.len(),
            checks.len(),
            shown.join("; ")
        )),
    )]
}

/// `percent` % of the pods (at least one), at random.
fn pick(cluster: &Cluster, percent: usize) -> Vec<String> {
    let mut names: Vec<String> = cluster.pods.iter().map(|p| p.spec.name.clone()).collect();
    fastrand::shuffle(&mut names);
    let count = (names.len() * percent).div_ceil(100).min(names.len());
    names.truncate(count);
    names
}

/// A mapping to probe: where, which protocol, which pod should answer.
#[derive(Debug, Clone)]
struct Target {
    pod: String,
    node: usize,
    entry: PortEntry,
    address: SocketAddr,
}

fn targets(cluster: &Cluster, pods: &[String]) -> Vec<Target> {
    let mut out = Vec::new();
    for name in pods {
        let (Ok(pod), Ok(entries)) = (cluster.pod(name), cluster.mappings(name)) else {
            continue;
        };
        let node = &cluster.nodes[pod.spec.node];
        for entry in entries {
            let ip = entry.host_ip.unwrap_or(IpAddr::V4(node.ip4));
            out.push(Target {
                pod: name.clone(),
                node: pod.spec.node,
                address: SocketAddr::new(ip, entry.host_port),
                entry,
            });
        }
    }
    out
}

/// From the outside client: every TCP target connects and greets with its pod's name, and
/// every UDP target answers one batch of datagrams (three rounds) with it; or, with
/// `answer` false, none connects or answers.
fn reach(cluster: &Cluster, targets: &[Target], answer: bool) -> Vec<Check> {
    let tcp: Vec<Target> = targets
        .iter()
        .filter(|t| t.entry.protocol == Protocol::Tcp)
        .cloned()
        .collect();
    let udp: Vec<Target> = targets
        .iter()
        .filter(|t| t.entry.protocol == Protocol::Udp)
        .cloned()
        .collect();
    let probed = cluster.client.enter(move || {
        let tcp_results: Vec<Option<String>> =
            tcp.iter().map(|t| tcp_greeting(t.address).ok()).collect();
        let udp_results = udp_answers(&udp);
        (tcp, tcp_results, udp, udp_results)
    });
    let (tcp, tcp_results, udp, udp_results) = match probed {
        Ok(p) => p,
        Err(e) => return vec![Check::failed("probing from the client".into(), e)],
    };
    let verdict = |t: &Target, got: Option<&String>| -> Result<(), String> {
        match (answer, got) {
            (true, Some(name)) if *name == t.pod => Ok(()),
            (true, Some(name)) => Err(format!(
                "{} answered by {name:?}, not {:?}",
                t.address, t.pod
            )),
            (true, None) => Err(format!("{} did not answer for {}", t.address, t.pod)),
            (false, None) => Ok(()),
            (false, Some(name)) => Err(format!(
                "{} (deleted {}) answered by {name:?}",
                t.address, t.pod
            )),
        }
    };
    let what = if answer {
        "reaches its pod"
    } else {
        "no longer answers after its pod was deleted"
    };
    let mut checks = Vec::new();
    let udp_results: Vec<Option<String>> = udp
        .iter()
        .map(|t| udp_results.get(&t.address).cloned().flatten())
        .collect();
    for (protocol, list, results) in [("TCP", &tcp, &tcp_results), ("UDP", &udp, &udp_results)] {
        let all: Vec<Check> = list
            .iter()
            .zip(results)
            .map(|(t, got)| Check::new(t.address.to_string(), verdict(t, got.as_ref())))
            .collect();
        if !all.is_empty() {
            checks.extend(summarise(
                &format!("client -> each of {} {protocol} mappings {what}", all.len()),
                all,
            ));
        }
    }
    checks
}

/// One socket, every target asked in three rounds 300 ms apart; each answer by the
/// address it came from (the mapping's, after the reverse translation).
fn udp_answers(targets: &[Target]) -> HashMap<SocketAddr, Option<String>> {
    let mut answers: HashMap<SocketAddr, Option<String>> =
        targets.iter().map(|t| (t.address, None)).collect();
    let Ok(socket) = UdpSocket::bind("0.0.0.0:0") else {
        return answers;
    };
    let _ = socket.set_read_timeout(Some(Duration::from_millis(50)));
    let mut buf = [0u8; 256];
    for _ in 0..3 {
        for t in targets.iter().filter(|t| answers[&t.address].is_none()) {
            let _ = socket.send_to(b"who are you?", t.address);
        }
        let round = Instant::now();
        while round.elapsed() < Duration::from_millis(300) {
            if let Ok((n, from)) = socket.recv_from(&mut buf) {
                if let Some(slot) = answers.get_mut(&from) {
                    *slot = Some(String::from_utf8_lossy(&buf[..n]).into_owned());
                }
            }
        }
        if answers.values().all(Option::is_some) {
            break;
        }
    }
    answers
}

/// Every deleted pod's host port can be bound again on its node.
fn ports_released(cluster: &Cluster, targets: &[Target]) -> Vec<Check> {
    let mut by_node: HashMap<usize, Vec<(Protocol, u16)>> = HashMap::new();
    for t in targets {
        by_node
            .entry(t.node)
            .or_default()
            .push((t.entry.protocol, t.entry.host_port));
    }
    let mut all = Vec::new();
    for (node, ports) in by_node {
        let checked = cluster.nodes[node].ns.enter(move || {
            ports
                .into_iter()
                .map(|(protocol, port)| (protocol, port, port_free(protocol, port)))
                .collect::<Vec<_>>()
        });
        match checked {
            Ok(list) => all.extend(list.into_iter().map(|(protocol, port, free)| {
                Check::new(
                    format!("node-{node} {port}/{protocol}"),
                    if free {
                        Ok(())
                    } else {
                        Err("still held".into())
                    },
                )
            })),
            Err(e) => all.push(Check::failed(format!("binding on node-{node}"), e)),
        }
    }
    if all.is_empty() {
        return all;
    }
    summarise("every deleted pod's host port is released on its node", all)
}

/// Network namespaces alive in the kernel (the `net_namespace` slab's objects), if the
/// kernel says.
pub fn kernel_namespaces() -> Option<usize> {
    let slabinfo = std::fs::read_to_string("/proc/slabinfo").ok()?;
    slabinfo
        .lines()
        .find(|l| l.starts_with("net_namespace "))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Waits until no more namespaces are alive than `before`; None when so (or when the
/// kernel does not say), else how many more there still are after `limit`.
fn wait_for_namespaces(before: Option<usize>, limit: Duration) -> Option<usize> {
    let before = before?;
    let started = Instant::now();
    loop {
        let now = kernel_namespaces()?;
        if now <= before {
            return None;
        }
        if started.elapsed() > limit {
            return Some(now - before);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
