//! `randportd`: the randport node agent, and `randportd list` to show its mappings.

use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use randport_core::{DEFAULT_ANNOTATION, PortRange, ReservedPorts, SandboxRecord};
use randport_plugin::agent::{Agent, AgentConfig, Effects};
use randport_plugin::cni::DEFAULT_SOCKET;
use randport_plugin::conntrack::NetlinkConntrack;
use randport_plugin::firewall::{self, Backend, IptablesFirewall, NftFirewall};
use randport_plugin::holder::SocketHolder;
use randport_plugin::node_ports::{NodePorts, overlap_warning};
use randport_plugin::pods::DirPodSource;
use randport_plugin::rpc::{Request, Response, call};
use randport_plugin::server;
use randport_plugin::state::DirStateStore;

#[derive(Debug, Parser)]
#[command(
    name = "randportd",
    version,
    about = "randport node agent: random host ports for pods"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// This node's name (default: the host name).
    #[arg(long, env = "RANDPORT_NODE_NAME")]
    node_name: Option<String>,
    /// Where pods come from: `kube` (the API server) or `dir:PATH` (Pod JSON files at
    /// PATH/<namespace>/<name>.json).
    #[arg(long, env = "RANDPORT_PODS", default_value = "kube")]
    pods: String,
    /// The agent's unix socket.
    #[arg(long, env = "RANDPORT_SOCKET", default_value = DEFAULT_SOCKET, global = true)]
    socket: PathBuf,
    /// Where sandbox records are kept.
    #[arg(long, env = "RANDPORT_STATE_DIR", default_value = "/var/lib/randport")]
    state_dir: PathBuf,
    /// Random host ports come from this range.
    #[arg(long, env = "RANDPORT_PORT_RANGE", default_value = "20000-29999")]
    port_range: PortRange,
    /// Firewall backend.
    #[arg(
        long,
        env = "RANDPORT_FIREWALL",
        value_enum,
        default_value = "nftables"
    )]
    firewall: Backend,
    /// The pod annotation that asks for, and receives, the mappings.
    #[arg(long, env = "RANDPORT_ANNOTATION", default_value = DEFAULT_ANNOTATION)]
    annotation: String,
    /// Address for /metrics, /healthz and /readyz, or `off`.
    #[arg(long, env = "RANDPORT_METRICS_ADDR", default_value = "127.0.0.1:9740")]
    metrics_addr: String,
    /// Map 127.0.0.1:hostPort to pods too, from the node itself (nftables only). Sets
    /// net.ipv4.conf.all.route_localnet=1 and drops loopback-addressed packets that arrive
    /// from other hosts (CVE-2020-8558).
    #[arg(long, env = "RANDPORT_LOCALHOST_ACCESS")]
    localhost_access: bool,
    /// How often our rules are checked and re-applied if someone flushed them.
    #[arg(long, env = "RANDPORT_REPAIR_INTERVAL_MS", default_value_t = 1000)]
    repair_interval_ms: u64,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Lists the node's mappings from the running agent.
    List {
        /// JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::List { json }) => list(&cli.socket, json),
        None => run_agent(cli),
    }
}

fn list(socket: &std::path::Path, json: bool) -> Result<()> {
    let records = match call(socket, &Request::List, Duration::from_secs(10))? {
        Response::Ok { records, .. } => records,
        Response::Error(e) => bail!("{e}"),
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&records)?);
    } else {
        print!("{}", table(&records));
    }
    Ok(())
}

fn table(records: &[SandboxRecord]) -> String {
    let mut out = format!(
        "{:<14} {:<32} {:<12} {:<12} {}\n",
        "SANDBOX", "POD", "CONTAINER", "PORT", "HOST PORT"
    );
    for r in records {
        let sandbox: String = r.sandbox.0.chars().take(12).collect();
        for m in &r.mappings {
            let host = match m.host_ip {
                Some(ip) if ip.is_ipv6() => format!("[{ip}]:{}", m.host_port),
                Some(ip) => format!("{ip}:{}", m.host_port),
                None => format!("*:{}", m.host_port),
            };
            let port = format!("{}/{}", m.container_port, m.protocol);
            out.push_str(&format!(
                "{sandbox:<14} {:<32} {:<12} {port:<12} {host}\n",
                r.pod.to_string(),
                m.container
            ));
        }
    }
    out
}

fn run_agent(cli: Cli) -> Result<()> {
    let node_name = match cli.node_name {
        Some(name) => name,
        None => nix::unistd::gethostname()
            .context("reading the host name (or pass --node-name)")?
            .to_string_lossy()
            .into_owned(),
    };
    let pods = match cli.pods.split_once(':') {
        Some(("dir", path)) if !path.is_empty() => {
            DirPodSource::new(path, &cli.annotation, &node_name)
        }
        _ if cli.pods == "kube" => {
            bail!(
                "--pods kube: the Kubernetes API pod source is not built yet; use --pods dir:PATH"
            )
        }
        _ => bail!("--pods {:?}: use kube or dir:PATH", cli.pods),
    };
    if cli.localhost_access {
        if cli.firewall != Backend::Nftables {
            bail!(
                "--localhost-access needs --firewall nftables (its guard against CVE-2020-8558 is an nft chain)"
            );
        }
        firewall::enable_route_localnet(std::path::Path::new(
            randport_plugin::node_ports::DEFAULT_SYSCTL_DIR,
        ))
        .context("setting net.ipv4.conf.all.route_localnet=1 for --localhost-access")?;
    }
    let node = NodePorts::default();
    let reserved = node.reserved().unwrap_or_else(|e| {
        eprintln!("randportd: warning: {e}; no ports are treated as reserved");
        ReservedPorts::none()
    });
    if let Some(warning) = node
        .ephemeral()
        .ok()
        .and_then(|eph| overlap_warning(cli.port_range, eph))
    {
        eprintln!("randportd: warning: {warning}");
    }
    // Leftovers of the other backend go: a node runs one of them.
    let other: Box<dyn firewall::Firewall> = match cli.firewall {
        Backend::Nftables => Box::new(IptablesFirewall),
        Backend::Iptables => Box::new(NftFirewall::new(randport_core::render::nft::DEFAULT_TABLE)),
    };
    if let Err(e) = other.teardown() {
        eprintln!(
            "randportd: warning: removing {} leftovers: {e}",
            other.name()
        );
    }

    let config = AgentConfig {
        node_name: node_name.clone(),
        port_range: cli.port_range,
        reserved,
        annotation_key: cli.annotation,
        pod_wait: Duration::from_secs(5),
    };
    let fx = Effects {
        firewall: firewall::backend(cli.firewall, cli.localhost_access),
        holder: Box::new(SocketHolder),
        conntrack: Box::new(NetlinkConntrack),
        state: Box::new(DirStateStore::open(&cli.state_dir)?),
        pods: Box::new(pods),
    };
    let agent = Arc::new(Agent::new(config, fx));

    let listener = server::bind_socket(&cli.socket)
        .with_context(|| format!("binding the agent socket {}", cli.socket.display()))?;
    let uid = nix::unistd::geteuid().as_raw();
    {
        let agent = Arc::clone(&agent);
        std::thread::spawn(move || server::serve(agent, listener, uid));
    }
    if cli.metrics_addr != "off" {
        let http = TcpListener::bind(&cli.metrics_addr)
            .with_context(|| format!("binding --metrics-addr {}", cli.metrics_addr))?;
        let agent = Arc::clone(&agent);
        std::thread::spawn(move || server::serve_http(agent, http));
    }

    let started = std::time::Instant::now();
    let report = agent.start().context("restoring the node's mappings")?;
    for warning in &report.warnings {
        eprintln!("randportd: warning: {warning}");
    }
    eprintln!(
        "randportd: node {node_name} ready in {:.0?}: {} sandboxes restored, {} released, {} annotations rewritten; \
         firewall {:?}, range {}, socket {}",
        started.elapsed(),
        report.restored,
        report.released.len(),
        report.rewritten.len(),
        cli.firewall,
        cli.port_range,
        cli.socket.display()
    );
    server::watchdog(
        agent,
        Duration::from_millis(cli.repair_interval_ms.max(100)),
    );
    Ok(())
}
