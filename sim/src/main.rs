//! `randport-sim`: the simulator's command line.
//!
//! - `demo`: a simulated cluster (2 nodes x 3 pods by default) with the real agent and
//!   plugin; every mapping checked with traffic; everything removed afterwards.
//! - `down`: removes what a crashed run left (its agents, namespaces and files).
//! - `plan`: what randport-core decides for the demo cluster, without a kernel.

use std::process::ExitCode;
use std::sync::Mutex;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use randport_core::{PortRange, Protocol};
use randport_sim::checks::{self, Check};
use randport_sim::cluster::{Cluster, ClusterSpec, PodSpec, Wiring, new_run_id};
use randport_sim::{down, preview};

const USAGE: &str = "usage: randport-sim demo [--nodes N] [--pods N] [--ipv6] [--firewall nftables|iptables] [--port-range LO-HI] [--wiring netlink|ip] [--wait-for-kernel]
       randport-sim down [RUN_ID]
       randport-sim bench [--quick | --endpoint] [--out FILE.md]
       randport-sim plan [--nodes N] [--pods N] [--ipv6] [--seed N] [--rules]";

/// The run the signal handler cleans up.
static CURRENT_RUN: Mutex<Option<String>> = Mutex::new(None);

fn main() -> ExitCode {
    install_signal_cleanup();
    match run(std::env::args().skip(1).collect()) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(err) => {
            eprintln!("randport-sim: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// On Ctrl-C (or SIGTERM/SIGHUP) the current run is removed before the process ends.
fn install_signal_cleanup() {
    use nix::sys::signal::{SigSet, Signal};
    let mut set = SigSet::empty();
    for signal in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        set.add(signal);
    }
    // Blocked here, before any other thread exists, so that every thread inherits the
    // mask and only the waiting thread below receives them.
    if set.thread_block().is_err() {
        return;
    }
    std::thread::spawn(move || {
        if let Ok(signal) = set.wait() {
            eprintln!(
                "\nrandport-sim: {signal:?}: removing this run's namespaces, agents and files"
            );
            if let Some(run_id) = CURRENT_RUN
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone()
            {
                let mut removed = down::Removed::default();
                down::run(&run_id, &mut removed);
                eprintln!(
                    "randport-sim: removed run {run_id}: {} agents, {} namespaces",
                    removed.agents, removed.namespaces
                );
            }
            std::process::exit(130);
        }
    });
}

fn run(args: Vec<String>) -> Result<bool> {
    let Some((command, rest)) = args.split_first() else {
        println!("{USAGE}");
        return Ok(true);
    };
    match command.as_str() {
        "demo" => demo(rest),
        "down" => {
            let removed = match rest.first() {
                Some(run_id) => {
                    let mut removed = down::Removed::default();
                    down::run(run_id, &mut removed);
                    removed
                }
                None => down::all(),
            };
            println!(
                "removed {} run(s){}: {} agent(s), {} namespace(s)",
                removed.runs.len(),
                if removed.runs.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", removed.runs.join(", "))
                },
                removed.agents,
                removed.namespaces
            );
            Ok(true)
        }
        "plan" => plan(rest).map(|()| true),
        "bench" => bench(rest).map(|()| true),
        "help" | "--help" | "-h" => {
            println!("{USAGE}");
            Ok(true)
        }
        other => bail!("unknown command {other:?}\n{USAGE}"),
    }
}

struct DemoArgs {
    nodes: usize,
    pods: usize,
    ipv6: bool,
    firewall: String,
    port_range: String,
    seed: u64,
    rules: bool,
    wiring: Wiring,
    wait_for_kernel: bool,
}

fn parse(args: &[String]) -> Result<DemoArgs> {
    let mut a = DemoArgs {
        nodes: 2,
        pods: 3,
        ipv6: false,
        firewall: "nftables".into(),
        port_range: "20000-29999".into(),
        seed: fastrand::u64(..),
        rules: false,
        wiring: Wiring::Netlink,
        wait_for_kernel: false,
    };
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let mut value = |name: &str| it.next().with_context(|| format!("{name} needs a value"));
        match arg.as_str() {
            "--nodes" => {
                a.nodes = value("--nodes")?
                    .parse()
                    .context("--nodes takes a number")?
            }
            "--pods" => a.pods = value("--pods")?.parse().context("--pods takes a number")?,
            "--seed" => a.seed = value("--seed")?.parse().context("--seed takes a number")?,
            "--firewall" => a.firewall = value("--firewall")?.clone(),
            "--port-range" => a.port_range = value("--port-range")?.clone(),
            "--ipv6" => a.ipv6 = true,
            "--wait-for-kernel" => a.wait_for_kernel = true,
            "--wiring" => {
                a.wiring = match value("--wiring")?.as_str() {
                    "netlink" => Wiring::Netlink,
                    "ip" => Wiring::IpCommands,
                    other => bail!("--wiring must be netlink or ip, not {other:?}"),
                }
            }
            "--rules" => a.rules = true,
            other => bail!("unknown option {other:?}\n{USAGE}"),
        }
    }
    if a.nodes == 0 || a.nodes > randport_sim::addresses::MAX_NODES {
        bail!(
            "--nodes must be from 1 to {}",
            randport_sim::addresses::MAX_NODES
        );
    }
    if a.pods == 0 || a.pods > 500 {
        bail!("--pods must be from 1 to 500");
    }
    if a.firewall != "nftables" && a.firewall != "iptables" {
        bail!(
            "--firewall must be nftables or iptables, not {:?}",
            a.firewall
        );
    }
    a.port_range.parse::<PortRange>()?;
    Ok(a)
}

fn demo(args: &[String]) -> Result<bool> {
    let a = parse(args)?;
    if !nix::unistd::geteuid().is_root() {
        bail!("the demo makes network namespaces and firewall rules inside them: run it as root");
    }
    let started = Instant::now();
    let run_id = new_run_id();
    *CURRENT_RUN.lock().unwrap_or_else(|e| e.into_inner()) = Some(run_id.clone());
    println!(
        "==> randport-sim demo: {} node(s) x {} pod(s), firewall {}{}",
        a.nodes,
        a.pods,
        a.firewall,
        if a.ipv6 { ", IPv4 and IPv6" } else { "" }
    );
    let spec = ClusterSpec {
        nodes: a.nodes,
        ipv6: a.ipv6,
        firewall: a.firewall.clone(),
        port_range: a.port_range.clone(),
        run_id: Some(run_id),
        wiring: a.wiring,
        // The agent's default; the simulator's 500 ms is for tests that flush and wait.
        repair_interval_ms: if a.nodes * a.pods >= randport_sim::scale::SCALE_FROM {
            1000
        } else {
            ClusterSpec::default().repair_interval_ms
        },
        ..ClusterSpec::default()
    };
    if a.nodes * a.pods >= randport_sim::scale::SCALE_FROM {
        return demo_at_scale(&a, spec, started);
    }
    let mut cluster = Cluster::up(spec, &mut |message| println!("==> {message}"))?;

    for node in 0..a.nodes {
        for j in 0..a.pods {
            let spec = PodSpec::echo("demo", &format!("echo-{node}-{j}"), node);
            let name = spec.pod_ref();
            let entries = cluster.add_pod(spec)?;
            let pod = cluster.pod(&name.name)?;
            let ports: Vec<String> = entries
                .iter()
                .map(|e| {
                    format!(
                        "{}/{} -> {}:{}",
                        e.container_port, e.protocol, cluster.nodes[node].ip4, e.host_port
                    )
                })
                .collect();
            println!(
                "==> {name} on node-{node}: ADD {:.1} ms: {}",
                pod.add_time.as_secs_f64() * 1000.0,
                ports.join(", ")
            );
        }
    }

    println!("==> checking every mapping with traffic");
    let rows = checks::reach_every_mapping(&cluster);
    let mut others: Vec<Check> = Vec::new();
    let first = "echo-0-0";
    others.push(checks::hairpin(&cluster, first, Protocol::Tcp));
    others.push(checks::hairpin(&cluster, first, Protocol::Udp));
    if a.nodes > 1 {
        others.push(checks::cross_node(
            &cluster,
            first,
            "echo-1-0",
            Protocol::Tcp,
        ));
        others.push(checks::cross_node(
            &cluster,
            first,
            "echo-1-0",
            Protocol::Udp,
        ));
    }
    others.extend(checks::annotations_match_agents(&cluster));

    let last = format!("echo-{}-{}", a.nodes - 1, a.pods - 1);
    let entries = cluster.mappings(&last)?;
    println!("==> deleting demo/{last}");
    cluster.delete_pod(&last)?;
    others.extend(checks::deleted_pod_is_gone(
        &cluster,
        &last,
        a.nodes - 1,
        &entries,
    ));
    others.extend(
        checks::annotations_match_agents(&cluster)
            .into_iter()
            .filter(|c| c.name.contains("no mapping of a deleted pod")),
    );

    println!();
    println!(
        "{:<16} {:<8} {:<10}    {:<24} CHECK",
        "POD", "NODE", "PORT", "NODE ADDRESS"
    );
    for row in &rows {
        let port = format!("{}/{}", row.entry.container_port, row.entry.protocol);
        let result = match &row.check.result {
            Ok(()) => "ok".to_owned(),
            Err(e) => format!("FAIL: {e}"),
        };
        println!(
            "{:<16} {:<8} {port:<10} -> {:<24} {result}",
            row.pod,
            row.node,
            row.address.to_string()
        );
    }
    println!();
    for check in &others {
        println!("{check}");
    }
    let passed =
        rows.iter().filter(|r| r.check.ok()).count() + others.iter().filter(|c| c.ok()).count();
    let failed = rows.len() + others.len() - passed;
    let description = cluster.describe();
    if failed > 0 {
        let kept = std::path::Path::new("/tmp/randport-sim-logs").join(&cluster.run_id);
        std::fs::create_dir_all(&kept)?;
        for node in &cluster.nodes {
            std::fs::copy(node.log(), kept.join(format!("{}.log", node.name)))?;
        }
        println!("\n==> agent logs kept in {}", kept.display());
    }
    drop(cluster);
    println!("\n==> removed {description}: namespaces, agents and files");
    println!("==> took {:.1} s", started.elapsed().as_secs_f64());
    println!("checks: {passed} passed, {failed} failed");
    Ok(failed == 0)
}

/// The demo at cluster size: progress instead of a line per pod, every mapping checked
/// against the agents and annotations, a 5 % sample reached with traffic, a tenth deleted.
fn demo_at_scale(a: &DemoArgs, spec: ClusterSpec, started: Instant) -> Result<bool> {
    use randport_sim::scale::{self, ScaleSpec};
    let total = a.nodes * a.pods;
    // Three descriptors a pod (its namespace, two sockets), and some for the rest.
    let needed = total as u64 * 3 + 1024;
    let limit = randport_sim::cluster::raise_open_files_limit();
    if limit < needed {
        bail!(
            "{total} pods need about {needed} open descriptors and this process may open {limit}: \
             raise the limit (ulimit -n {needed}, as root) or run fewer pods"
        );
    }
    let spec = ScaleSpec {
        cluster: spec,
        pods_per_node: a.pods,
        traffic_percent: 5,
        delete_percent: 10,
        wait_for_kernel: a.wait_for_kernel,
    };
    let report = scale::run(&spec, &mut |m| {
        println!("==> [{:>5.1} s] {m}", started.elapsed().as_secs_f64())
    })?;
    println!();
    for check in &report.checks {
        println!("{check}");
    }
    let rate = |p: &scale::Phase| {
        format!(
            "{:>6} pods in {:>6.1} s = {:>6.0} pods/s",
            p.pods,
            p.time.as_secs_f64(),
            p.rate()
        )
    };
    println!();
    println!("nodes and agents up   {:.1} s", report.up.as_secs_f64());
    println!("build (first 500)     {}", rate(&report.build_first_500));
    println!("build (all)           {}", rate(&report.build));
    println!(
        "plugin ADD            p50 {:.1} ms, p99 {:.1} ms; {} mappings written back",
        report.add_p50.as_secs_f64() * 1e3,
        report.add_p99.as_secs_f64() * 1e3,
        report.mappings
    );
    println!(
        "checks                {:.1} s (all mappings vs agents and annotations; traffic to {} pods)",
        report.check.as_secs_f64(),
        report.traffic_pods
    );
    println!("delete                {}", rate(&report.delete));
    println!("teardown              {}", rate(&report.teardown));
    if let Some(cleanup) = report.kernel_cleanup {
        println!(
            "kernel frees them     {:.1} s after the teardown began{}",
            cleanup.as_secs_f64(),
            match report.namespaces_left {
                Some(n) => format!(" ({n} more namespaces than before were still alive)"),
                None => String::new(),
            }
        );
    }
    let failed = report.failures().len();
    println!("==> took {:.1} s", started.elapsed().as_secs_f64());
    println!(
        "checks: {} passed, {failed} failed",
        report.checks.len() - failed
    );
    Ok(failed == 0)
}

fn bench(args: &[String]) -> Result<()> {
    use randport_sim::bench::{self, BenchSpec};
    let mut spec = BenchSpec::default();
    let mut out: Option<std::path::PathBuf> = None;
    let mut endpoint = false;
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--quick" => {
                spec = BenchSpec {
                    sizes: vec![0, 100],
                    portmap_max: 100,
                    samples: 10,
                    conn_seconds: 0.5,
                    conn_sizes: vec![1, 100],
                    concurrent: 100,
                    churn_sizes: vec![100],
                    churn_seconds: 4.0,
                }
            }
            "--out" => out = Some(it.next().context("--out needs a file")?.into()),
            "--endpoint" => endpoint = true,
            other => bail!("unknown option {other:?}\n{USAGE}"),
        }
    }
    if !nix::unistd::geteuid().is_root() {
        bail!("the benchmark makes network namespaces: run it as root");
    }
    let command = format!("randport-sim bench {}", args.join(" "));
    let started = Instant::now();
    if endpoint {
        // 1 GiB in all (4 x 256 MiB) and 3,000 idle connections: DESIGN's bad-input target.
        let rows = bench::endpoint(256, 3000, &mut |m| {
            println!("==> [{:>5.0} s] {m}", started.elapsed().as_secs_f64())
        })?;
        let text = bench::endpoint_markdown(&rows, command.trim());
        println!("\n{text}");
        if let Some(path) = out {
            bench::write(&path, &text)?;
        }
        return Ok(());
    }
    let report = bench::run(&spec, &mut |m| {
        println!("==> [{:>5.0} s] {m}", started.elapsed().as_secs_f64())
    })?;
    let text = bench::markdown(&report, command.trim(), &spec);
    println!("\n{text}");
    if let Some(path) = out {
        bench::write(&path, &text)?;
        println!("==> written to {}", path.display());
    }
    Ok(())
}

fn plan(args: &[String]) -> Result<()> {
    let a = parse(args)?;
    println!(
        "What randport-core decides for {} node(s) x {} pod(s) (seed {}), without a kernel:\n",
        a.nodes, a.pods, a.seed
    );
    let cluster = preview::cluster(a.nodes, a.pods, a.port_range.parse()?, a.ipv6, a.seed)?;
    print!("{}", preview::table(&cluster));
    println!("\nAnnotations written back (tkestack.io/portmapping):");
    for (pod, value) in preview::annotations(&cluster) {
        println!("  {pod}: {value}");
    }
    if a.rules {
        for node in &cluster {
            println!(
                "\nnft ruleset of {} ({}):\n{}",
                node.name,
                node.ip,
                preview::ruleset(node)
            );
        }
    } else {
        println!("\n(add --rules to print each node's nft table)");
    }
    Ok(())
}
