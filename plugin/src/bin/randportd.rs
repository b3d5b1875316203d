//! `randportd`: the randport node agent, and `randportd list` to show its mappings.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use randport_core::{DEFAULT_ANNOTATION, PortRange, ReservedPorts, SandboxRecord};
use randport_plugin::agent::rpc::{Request, Response, call};
use randport_plugin::agent::server;
use randport_plugin::agent::{Agent, AgentConfig, Effects, HostPorts};
use randport_plugin::cni::offline;
use randport_plugin::cni::{DEFAULT_ADD_DEADLINE, DEFAULT_SOCKET, DEFAULT_STATE_DIR};
use randport_plugin::firewall::{self, Backend, IptablesFirewall, NftFirewall};
#[cfg(feature = "kube")]
use randport_plugin::kube::api::{KubePodSource, KubeSettings};
use randport_plugin::kube::pods::{DirPodSource, PodSource};
use randport_plugin::netfilter::conntrack::NetlinkConntrack;
use randport_plugin::node::holder::SocketHolder;
use randport_plugin::node::install;
use randport_plugin::node::ports::{NodePorts, overlap_warning};
use randport_plugin::node::state::DirStateStore;

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
    #[arg(
        long,
        env = "RANDPORT_STATE_DIR",
        default_value = DEFAULT_STATE_DIR,
        global = true
    )]
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
    /// How long one ADD may take in the agent before it stops and undoes what it did
    /// (milliseconds); keep it below the plugin's 30 s wait for the agent.
    #[arg(long, env = "RANDPORT_ADD_DEADLINE_MS", default_value_t = DEFAULT_ADD_DEADLINE.as_millis() as u64)]
    add_deadline_ms: u64,
    /// Who maps explicit hostPorts: `auto` leaves them to an earlier plugin in the
    /// conflist with the portMappings capability (portmap) and maps them only when there is
    /// none (needs --cni-conf-dir to see the chain); `all` maps them always; `annotated`
    /// never (only the annotation's random ports).
    #[arg(long, env = "RANDPORT_HOST_PORTS", value_enum, default_value = "auto")]
    host_ports: HostPorts,
    /// Log lines as `text` or `json` (one object a line, with fields pod, sandbox, port,
    /// code); RUST_LOG filters them (default: info).
    #[arg(long, env = "RANDPORT_LOG_FORMAT", value_enum, default_value = "text")]
    log_format: LogFormat,
    /// Keep our entry in the node's conflist in this directory (put back within 5 s when a
    /// network plugin rewrites the file). Unset: the conflist is left alone.
    #[arg(long, env = "RANDPORT_CNI_CONF_DIR")]
    cni_conf_dir: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Lists the node's mappings from the running agent.
    List {
        /// JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Installs the plugin on this node: copies `randport` into the CNI bin directory and
    /// adds it to the end of the runtime's conflist. Idempotent.
    Install {
        /// The CNI plugin binary to install (default: `randport` beside this program).
        #[arg(long)]
        binary: Option<PathBuf>,
        /// The node's CNI bin directory (as mounted into the container).
        #[arg(long, env = "RANDPORT_CNI_BIN_DIR", default_value = "/opt/cni/bin")]
        cni_bin_dir: PathBuf,
        /// The node's CNI config directory.
        #[arg(long, env = "RANDPORT_CNI_CONF_DIR", default_value = "/etc/cni/net.d")]
        cni_conf_dir: PathBuf,
    },
    /// Removes randport from this node: our conflist entry, the binary, our firewall
    /// table and chains, and the records. Refuses while an agent is running.
    Uninstall {
        /// The node's CNI bin directory.
        #[arg(long, env = "RANDPORT_CNI_BIN_DIR", default_value = "/opt/cni/bin")]
        cni_bin_dir: PathBuf,
        /// The node's CNI config directory.
        #[arg(long, env = "RANDPORT_CNI_CONF_DIR", default_value = "/etc/cni/net.d")]
        cni_conf_dir: PathBuf,
        /// Afterwards, wait until stopped (for a DaemonSet that stays Running when done).
        #[arg(long)]
        wait: bool,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::List { json }) => list(&cli.socket, json),
        Some(Command::Install {
            ref binary,
            ref cni_bin_dir,
            ref cni_conf_dir,
        }) => install_on_node(
            binary.as_deref(),
            cni_bin_dir,
            cni_conf_dir,
            &cli.socket,
            &cli.state_dir,
        ),
        Some(Command::Uninstall {
            ref cni_bin_dir,
            ref cni_conf_dir,
            wait,
        }) => {
            uninstall_from_node(cni_bin_dir, cni_conf_dir, &cli.socket, &cli.state_dir)?;
            if wait {
                loop {
                    std::thread::park();
                }
            }
            Ok(())
        }
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

fn install_on_node(
    binary: Option<&std::path::Path>,
    bin_dir: &std::path::Path,
    conf_dir: &std::path::Path,
    socket: &std::path::Path,
    state_dir: &std::path::Path,
) -> Result<()> {
    let binary = match binary {
        Some(b) => b.to_owned(),
        None => std::env::current_exe()
            .context("finding this program (or pass --binary)")?
            .with_file_name(install::PLUGIN_TYPE),
    };
    let copied = install::install_binary(&binary, bin_dir)
        .with_context(|| format!("installing {} into {}", binary.display(), bin_dir.display()))?;
    println!(
        "{} {}",
        if copied { "installed" } else { "up to date:" },
        bin_dir.join(install::PLUGIN_TYPE).display()
    );
    match install::ensure_entry(conf_dir, &install::entry(socket, state_dir))? {
        Some(file) => println!("added randport to {}", file.display()),
        None => println!(
            "randport is already in {}",
            install::active_config(conf_dir)?.display()
        ),
    }
    Ok(())
}

fn uninstall_from_node(
    bin_dir: &std::path::Path,
    conf_dir: &std::path::Path,
    socket: &std::path::Path,
    state_dir: &std::path::Path,
) -> Result<()> {
    if call(socket, &Request::Status, Duration::from_secs(2)).is_ok() {
        bail!(
            "an agent answers on {}: stop it first (kubectl -n kube-system delete daemonset \
             randport), or it puts its conflist entry back",
            socket.display()
        );
    }
    // New pods stop calling us first; then the binary, the rules and the records go.
    for file in install::remove_entries(conf_dir)? {
        println!("removed randport from {}", file.display());
    }
    if install::remove_binary(bin_dir)? {
        println!("removed {}", bin_dir.join(install::PLUGIN_TYPE).display());
    }
    let backends: [Box<dyn firewall::Firewall>; 2] = [
        Box::new(NftFirewall::new(randport_core::render::nft::DEFAULT_TABLE)),
        Box::new(IptablesFirewall::default()),
    ];
    for backend in backends {
        match backend.teardown() {
            Ok(()) => println!("removed the {} rules", backend.name()),
            Err(e) => eprintln!(
                "randportd: warning: removing the {} rules: {e}",
                backend.name()
            ),
        }
    }
    let sysctl_dir = std::path::Path::new(randport_plugin::node::ports::DEFAULT_SYSCTL_DIR);
    match randport_plugin::node::ports::restore_route_localnet(
        sysctl_dir,
        state_dir,
        randport_plugin::node::ports::kube_proxy_uses_route_localnet,
    ) {
        Ok(Some(said)) => println!("{said}"),
        Ok(None) => {}
        Err(e) => {
            eprintln!("randportd: warning: undoing route_localnet=1 of --localhost-access: {e}")
        }
    }
    match install::remove_state_dir(state_dir) {
        Ok(true) => println!("removed {} and the records in it", state_dir.display()),
        Ok(false) => {}
        Err(e) => bail!("removing {}: {e}", state_dir.display()),
    }
    Ok(())
}

/// Puts our entry back when a network plugin rewrites its conflist (kindnet does on start).
fn keep_conflist_entry(dir: &std::path::Path, ours: &serde_json::Value) {
    let mut last_error = String::new();
    loop {
        std::thread::sleep(Duration::from_secs(5));
        match install::ensure_entry(dir, ours) {
            Ok(Some(file)) => {
                tracing::info!("our entry was missing from {}; put it back", file.display())
            }
            Ok(None) => last_error.clear(),
            Err(e) if e.to_string() != last_error => {
                last_error = e.to_string();
                tracing::warn!("{e}");
            }
            Err(_) => {}
        }
    }
}

fn table(records: &[SandboxRecord]) -> String {
    let mut out = format!(
        "{:<14} {:<32} {:<12} {:<12} {}\n",
        "SANDBOX", "POD", "CONTAINER", "PORT", "HOST PORT"
    );
    for r in records {
        let sandbox: String = r.sandbox.0.chars().take(12).collect();
        for m in &r.mappings {
            let mut host = match m.host_ip {
                Some(ip) if ip.is_ipv6() => format!("[{ip}]:{}", m.host_port),
                Some(ip) => format!("{ip}:{}", m.host_port),
                None => format!("*:{}", m.host_port),
            };
            if m.delegated {
                host.push_str(" (mapped by an earlier plugin)");
            }
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

/// Exits at once on SIGTERM or SIGINT. The mappings stay: the rules, and the records the
/// next agent restores. Without this, the agent as PID 1 of its container would ignore the
/// kubelet's SIGTERM and be killed only after the grace period. Call before any thread
/// starts, so that every thread blocks the signals and this one takes them.
fn exit_on_termination() -> Result<()> {
    use nix::sys::signal::{SigSet, Signal};
    let mut set = SigSet::empty();
    set.add(Signal::SIGTERM);
    set.add(Signal::SIGINT);
    set.thread_block().context("blocking SIGTERM and SIGINT")?;
    std::thread::spawn(move || {
        if let Ok(signal) = set.wait() {
            tracing::info!("{signal}: exiting; the mappings stay for the next agent");
            std::process::exit(0);
        }
    });
    Ok(())
}

/// Logs to stderr, filtered by RUST_LOG (default: info), as text or one JSON object a line.
fn init_logs(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new("info,kube=warn,tower=warn,hyper=warn")
    });
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .with_target(false);
    match format {
        LogFormat::Text => logs.init(),
        LogFormat::Json => logs.json().flatten_event(true).init(),
    }
}

fn run_agent(cli: Cli) -> Result<()> {
    init_logs(cli.log_format);
    exit_on_termination()?;
    // Flags that do not go together are refused before anything on the node is touched.
    if cli.localhost_access && cli.firewall != Backend::Nftables {
        bail!(
            "--localhost-access needs --firewall nftables (its guard against CVE-2020-8558 is an nft chain)"
        );
    }
    let node_name = match cli.node_name {
        Some(name) => name,
        None => nix::unistd::gethostname()
            .context("reading the host name (or pass --node-name)")?
            .to_string_lossy()
            .into_owned(),
    };
    let pods: Box<dyn PodSource> = match cli.pods.split_once(':') {
        Some(("dir", path)) if !path.is_empty() => {
            Box::new(DirPodSource::new(path, &cli.annotation, &node_name))
        }
        #[cfg(feature = "kube")]
        _ if cli.pods == "kube" => Box::new(
            KubePodSource::connect(KubeSettings::new(&node_name, &cli.annotation))
                .map_err(anyhow::Error::msg)
                .context("--pods kube")?,
        ),
        #[cfg(not(feature = "kube"))]
        _ if cli.pods == "kube" => {
            bail!("--pods kube: this randportd was built without the kube feature")
        }
        _ => bail!("--pods {:?}: use kube or dir:PATH", cli.pods),
    };
    if let Some(dir) = &cli.cni_conf_dir {
        // Before serving: a conflist without us means pods started now get no ports.
        let ours = install::entry(&cli.socket, &cli.state_dir);
        match install::ensure_entry(dir, &ours) {
            Ok(Some(file)) => tracing::info!("added randport to {}", file.display()),
            Ok(None) => {}
            Err(e) => tracing::warn!("{e}"),
        }
        let dir = dir.clone();
        std::thread::spawn(move || keep_conflist_entry(&dir, &ours));
    }
    let state = DirStateStore::open(&cli.state_dir)?;
    // Before the records are read, and for the agent's whole life: a plugin that removes a
    // sandbox while no agent answers takes this lock (see randport_plugin::cni::offline).
    let _state_lock = offline::StateLock::acquire(&cli.state_dir).with_context(|| {
        format!(
            "locking {}",
            cli.state_dir.join(offline::LOCK_FILE).display()
        )
    })?;
    let sysctl_dir = std::path::Path::new(randport_plugin::node::ports::DEFAULT_SYSCTL_DIR);
    if cli.localhost_access {
        if randport_plugin::node::ports::enable_route_localnet(sysctl_dir, &cli.state_dir)
            .context("setting net.ipv4.conf.all.route_localnet=1 for --localhost-access")?
        {
            tracing::info!("set net.ipv4.conf.all.route_localnet=1 for --localhost-access");
        }
    } else {
        match randport_plugin::node::ports::restore_route_localnet(
            sysctl_dir,
            &cli.state_dir,
            randport_plugin::node::ports::kube_proxy_uses_route_localnet,
        ) {
            Ok(Some(said)) => tracing::info!("{said}"),
            Ok(None) => {}
            Err(e) => {
                tracing::warn!("undoing route_localnet=1 of an earlier --localhost-access: {e}")
            }
        }
    }
    let node = NodePorts::default();
    let reserved = node.reserved().unwrap_or_else(|e| {
        tracing::warn!("{e}; no ports are treated as reserved");
        ReservedPorts::none()
    });
    if let Some(warning) = node
        .ephemeral()
        .ok()
        .and_then(|eph| overlap_warning(cli.port_range, eph))
    {
        tracing::warn!("{warning}");
    }
    // Does the kernel take our ruleset? Which iptables do the node's rules use?
    let choice = firewall::preflight(cli.firewall, cli.localhost_access, &firewall::run_tool);
    if let Some(why) = &choice.fell_back {
        tracing::warn!(
            "the kernel refused randport's nftables ruleset (a check load \
             with nft -c: {why}); using iptables instead (randport_firewall_backend says so)"
        );
        if cli.localhost_access {
            bail!(
                "--localhost-access needs nftables (its guard against CVE-2020-8558 is an nft \
                 chain), and this node's kernel refused randport's nftables ruleset: {why}"
            );
        }
    }
    if choice.backend == Backend::Iptables {
        tracing::info!(
            "iptables commands: {:?} ({})",
            choice.flavour,
            choice.flavour_reason
        );
    }
    offline::write_info(
        &cli.state_dir,
        &offline::AgentInfo {
            firewall: choice.backend,
            localhost_access: cli.localhost_access,
            iptables_flavour: choice.flavour,
            iptables_backend: (choice.backend == Backend::Iptables)
                .then(|| firewall::run_tool("iptables-save", &["--version"], "").ok())
                .flatten()
                .filter(|_| choice.flavour == firewall::IptablesFlavour::System)
                .and_then(|v| offline::iptables_backend_of(&v)),
        },
    )
    .with_context(|| {
        format!(
            "writing {}",
            cli.state_dir.join(offline::INFO_FILE).display()
        )
    })?;
    // Leftovers of the other backend go: a node runs one of them.
    let other: Box<dyn firewall::Firewall> = match choice.backend {
        Backend::Nftables => Box::new(IptablesFirewall::default()),
        Backend::Iptables => Box::new(NftFirewall::new(randport_core::render::nft::DEFAULT_TABLE)),
    };
    if let Err(e) = other.teardown() {
        tracing::warn!("removing {} leftovers: {e}", other.name());
    }

    let config = AgentConfig {
        node_name: node_name.clone(),
        port_range: cli.port_range,
        reserved,
        annotation_key: cli.annotation,
        pod_wait: Duration::from_secs(5),
        add_deadline: Duration::from_millis(cli.add_deadline_ms.max(1)),
        host_ports: cli.host_ports,
        cni_conf_dir: cli.cni_conf_dir.clone(),
    };
    let fx = Effects {
        firewall: firewall::chosen_backend(&choice, cli.localhost_access),
        holder: Box::new(SocketHolder),
        conntrack: Box::new(NetlinkConntrack),
        state: Box::new(state),
        pods,
    };
    let agent = Arc::new(Agent::new(config, fx));
    agent.metrics.set_backend(
        match (choice.backend, choice.flavour) {
            (Backend::Nftables, _) => "nftables",
            (Backend::Iptables, firewall::IptablesFlavour::System) => "iptables",
            (Backend::Iptables, firewall::IptablesFlavour::Legacy) => "iptables-legacy",
            (Backend::Iptables, firewall::IptablesFlavour::Nft) => "iptables-nft",
        },
        choice.fell_back.is_some(),
    );

    let listener = server::bind_socket(&cli.socket)
        .with_context(|| format!("binding the agent socket {}", cli.socket.display()))?;
    let uid = nix::unistd::geteuid().as_raw();
    {
        let agent = Arc::clone(&agent);
        std::thread::spawn(move || server::serve(agent, listener, uid));
    }
    if cli.metrics_addr != "off" {
        let http = server::metrics_listener(&cli.metrics_addr)
            .with_context(|| format!("binding --metrics-addr {}", cli.metrics_addr))?;
        let agent = Arc::clone(&agent);
        let health = server::HealthCheck {
            socket: Some(cli.socket.clone()),
            limits: randport_plugin::agent::HealthLimits::default(),
        };
        std::thread::spawn(move || server::serve_http(agent, http, health));
    }

    let started = std::time::Instant::now();
    let report = agent.start().context("restoring the node's mappings")?;
    for warning in &report.warnings {
        tracing::warn!("{warning}");
    }
    tracing::info!(
        "node {node_name} ready in {:.0?}: {} sandboxes restored, {} released, {} annotations rewritten; \
         firewall {:?}, range {}, socket {}",
        started.elapsed(),
        report.restored,
        report.released.len(),
        report.rewritten.len(),
        choice.backend,
        cli.port_range,
        cli.socket.display()
    );
    let earlier = cli
        .cni_conf_dir
        .as_deref()
        .and_then(install::earlier_port_mapper_in);
    tracing::info!("explicit hostPorts ({:?}): {}",
        cli.host_ports,
        match (cli.host_ports, cli.cni_conf_dir.is_some(), earlier) {
            (HostPorts::All, ..) => "randport maps them".to_owned(),
            (HostPorts::Annotated, ..) => "left to other plugins; randport maps only the annotation's random ports".to_owned(),
            (HostPorts::Auto, false, _) => "randport maps them (no --cni-conf-dir to see whether the chain has portmap)".to_owned(),
            (HostPorts::Auto, true, Some(mapper)) => format!("left to {mapper}, before randport in the conflist (checked at each ADD)"),
            (HostPorts::Auto, true, None) => "randport maps them: no plugin before it in the conflist has the portMappings capability (checked at each ADD)".to_owned(),
        }
    );
    server::watchdog(
        agent,
        Duration::from_millis(cli.repair_interval_ms.max(100)),
    );
    Ok(())
}
