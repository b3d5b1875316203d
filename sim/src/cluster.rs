//! A simulated cluster on the real kernel: an underlay bridge in its own namespace
//! joining N node namespaces and an outside client; in each node a real `randportd
//! --pods dir:…`; pods as namespaces with a veth to their node. The simulator plays the
//! container runtime: it wires each pod (the main plugin's job), writes the Pod object,
//! and execs the real `randport` plugin with ADD and DEL.
//!
//! Every namespace is named `rp-<run id>-…`; the run's files live in
//! `/tmp/randport-sim/<run id>/` (agent logs, state, pod files, agent pids). Dropping the
//! [`Cluster`] stops the agents and removes everything; [`crate::down`] does the same for a
//! run that crashed.

use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Write as _};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use randport_core::annotation::{AnnotationValue, PortEntry, decode};
use randport_core::wire::{MAX_RESPONSE, Request, Response};
use randport_core::{DEFAULT_ANNOTATION, PodRef, Protocol, SandboxId, SandboxRecord};
use serde_json::{Value, json};

use crate::addresses;
use crate::netns::Netns;
use crate::workload::{self, Workload};

/// Where runs keep their files.
pub const RUNS_DIR: &str = "/tmp/randport-sim";

/// Where each node's agent serves `/metrics`, `/healthz` and `/readyz`, inside the node's
/// namespace.
pub const METRICS_ADDR: &str = "127.0.0.1:9740";

/// What to build.
#[derive(Debug, Clone)]
pub struct ClusterSpec {
    /// Number of nodes (1 to 16).
    pub nodes: usize,
    /// Give nodes and pods IPv6 addresses too.
    pub ipv6: bool,
    /// `nftables` or `iptables`.
    pub firewall: String,
    /// The agents' `--port-range`.
    pub port_range: String,
    /// The run id (6 hex digits); a random one when `None`.
    pub run_id: Option<String>,
    /// The agents' `--repair-interval-ms`.
    pub repair_interval_ms: u64,
    /// Start the agents with `--localhost-access`.
    pub localhost_access: bool,
    /// How pods are wired.
    pub wiring: Wiring,
}

/// How the simulator wires a pod (the main CNI plugin's part).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Wiring {
    /// rtnetlink messages from this process; the pod's namespace is held by a descriptor,
    /// not mounted. The default.
    #[default]
    Netlink,
    /// `ip netns add` and about eight `ip` execs per pod, the namespace mounted under
    /// `/run/netns`: what the simulator did before, kept as the benchmark's reference and
    /// to check that both give the same links, addresses and routes.
    IpCommands,
}

/// Interface indexes the simulator chooses, so that it never has to look one up: in every
/// namespace `eth0` is 2 (loopback is 1); in the underlay the bridge is 2, the client's
/// port 3 and node `i`'s port `10 + i`; on a node, pod `j`'s end of its veth is `1000 + j`.
pub mod ifindex {
    /// `eth0` in a node, pod or the client.
    pub const ETH0: u32 = 2;
    /// The underlay's bridge.
    pub const BRIDGE: u32 = 2;
    /// The client's port on the bridge.
    pub const CLIENT_PORT: u32 = 3;
    /// Node `i`'s port on the bridge.
    pub fn node_port(i: usize) -> u32 {
        10 + i as u32
    }
    /// Pod `j`'s veth end on its node.
    pub fn pod_port(j: usize) -> u32 {
        1000 + j as u32
    }
}

impl Default for ClusterSpec {
    fn default() -> Self {
        ClusterSpec {
            nodes: 2,
            ipv6: false,
            firewall: "nftables".into(),
            port_range: "20000-29999".into(),
            run_id: None,
            repair_interval_ms: 500,
            localhost_access: false,
            wiring: Wiring::Netlink,
        }
    }
}

/// One container port of a simulated pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SimPort {
    /// Container port the workload serves.
    pub container_port: u16,
    /// Protocol.
    pub protocol: Protocol,
    /// An explicit hostPort.
    pub host_port: Option<u16>,
    /// An explicit hostIP.
    pub host_ip: Option<IpAddr>,
}

impl SimPort {
    /// A port with neither hostPort nor hostIP.
    pub fn new(container_port: u16, protocol: Protocol) -> Self {
        SimPort {
            container_port,
            protocol,
            host_port: None,
            host_ip: None,
        }
    }
}

/// A pod to create.
#[derive(Debug, Clone)]
pub struct PodSpec {
    /// Kubernetes namespace.
    pub namespace: String,
    /// Pod name.
    pub name: String,
    /// Node index.
    pub node: usize,
    /// Container ports (one container, `app`).
    pub ports: Vec<SimPort>,
    /// Whether the pod carries the port-mapping annotation.
    pub annotate: bool,
}

impl PodSpec {
    /// An annotated pod with a TCP port 8080 and a UDP port 8081.
    pub fn echo(namespace: &str, name: &str, node: usize) -> Self {
        PodSpec {
            namespace: namespace.into(),
            name: name.into(),
            node,
            ports: vec![
                SimPort::new(8080, Protocol::Tcp),
                SimPort::new(8081, Protocol::Udp),
            ],
            annotate: true,
        }
    }

    /// namespace/name.
    pub fn pod_ref(&self) -> PodRef {
        PodRef::new(self.namespace.clone(), self.name.clone())
    }
}

/// A simulated node.
#[derive(Debug)]
pub struct SimNode {
    /// 0-based index.
    pub index: usize,
    /// `node-<index>`.
    pub name: String,
    /// Its namespace.
    pub ns: Netns,
    /// Underlay IPv4 address.
    pub ip4: Ipv4Addr,
    /// Underlay IPv6 address, with `ipv6`.
    pub ip6: Option<Ipv6Addr>,
    /// The node's files: pods/, state/, agent.sock, agent.log.
    pub dir: PathBuf,
    agent: Option<Child>,
    next_pod: usize,
}

impl SimNode {
    /// The agent's socket.
    pub fn socket(&self) -> PathBuf {
        self.dir.join("agent.sock")
    }

    /// The agent's log.
    pub fn log(&self) -> PathBuf {
        self.dir.join("agent.log")
    }

    /// The running agent's process id.
    pub fn agent_pid(&self) -> Option<u32> {
        self.agent.as_ref().map(Child::id)
    }

    /// The node's addresses (IPv4 first).
    pub fn ips(&self) -> Vec<IpAddr> {
        std::iter::once(IpAddr::V4(self.ip4))
            .chain(self.ip6.map(IpAddr::V6))
            .collect()
    }
}

/// A simulated pod.
#[derive(Debug)]
pub struct SimPod {
    /// What it was made from.
    pub spec: PodSpec,
    /// Its namespace.
    pub ns: Netns,
    /// Its addresses, IPv4 first.
    pub ips: Vec<IpAddr>,
    /// Its sandbox id.
    pub sandbox: SandboxId,
    /// How long the plugin's ADD took.
    pub add_time: Duration,
    _workload: Workload,
}

/// Where a probe starts.
#[derive(Debug, Clone, Copy)]
pub enum Origin<'a> {
    /// The outside client.
    Client,
    /// A pod, by name.
    Pod(&'a str),
    /// A node, by index.
    Node(usize),
}

/// The paths of the binaries the simulator drives.
#[derive(Debug, Clone)]
pub struct Binaries {
    /// `randportd`.
    pub agent: PathBuf,
    /// `randport`.
    pub plugin: PathBuf,
}

impl Binaries {
    /// Finds `randportd` and `randport` in `$RANDPORT_BIN_DIR`, beside this executable, or
    /// one directory up (where test executables live in `target/*/deps`).
    pub fn find() -> Result<Binaries> {
        let mut dirs = Vec::new();
        if let Some(dir) = std::env::var_os("RANDPORT_BIN_DIR") {
            dirs.push(PathBuf::from(dir));
        }
        if let Ok(exe) = std::env::current_exe() {
            if let Some(dir) = exe.parent() {
                dirs.push(dir.to_owned());
                if let Some(up) = dir.parent() {
                    dirs.push(up.to_owned());
                }
            }
        }
        let find = |name: &str| {
            dirs.iter().map(|d| d.join(name)).find(|p| p.is_file()).ok_or_else(|| {
                anyhow!(
                    "{name} not found in {}; build it first: cargo build -p randport-plugin (or set RANDPORT_BIN_DIR)",
                    dirs.iter().map(|d| d.display().to_string()).collect::<Vec<_>>().join(", ")
                )
            })
        };
        Ok(Binaries {
            agent: find("randportd")?,
            plugin: find("randport")?,
        })
    }
}

/// The simulated cluster.
#[derive(Debug)]
pub struct Cluster {
    /// This run's id.
    pub run_id: String,
    /// This run's files.
    pub dir: PathBuf,
    /// What it was built from.
    pub spec: ClusterSpec,
    /// The binaries it drives.
    pub bins: Binaries,
    /// Pods, in creation order. (Dropped before the nodes.)
    pub pods: Vec<SimPod>,
    /// Nodes.
    pub nodes: Vec<SimNode>,
    /// The outside client.
    pub client: Netns,
    underlay: Netns,
}

/// A fresh run id: 6 random hex digits.
pub fn new_run_id() -> String {
    format!("{:06x}", fastrand::u32(..0x100_0000))
}

/// Raises this process's open-files limit as far as the kernel lets it (`fs.nr_open`, at
/// most 2^20): a pod holds three descriptors (its namespace and two sockets), so 5,120 pods
/// need more than the usual 1,024 or 20,000. The plugin and agents the simulator starts
/// inherit it. Returns the limit now in force.
pub fn raise_open_files_limit() -> u64 {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return 0;
    };
    let ceiling = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(hard)
        .min(1 << 20);
    // Raising the hard limit needs CAP_SYS_RESOURCE; else the soft one goes up to it.
    if hard < ceiling && setrlimit(Resource::RLIMIT_NOFILE, ceiling, ceiling).is_ok() {
        return ceiling;
    }
    if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
        return hard;
    }
    soft
}

/// Loopback up and, with IPv6, no duplicate address detection (links come up at once).
fn prepare(ns: &Netns, ipv6: bool) -> Result<()> {
    if ipv6 {
        ns.sysctls(&[
            ("net.ipv6.conf.all.accept_dad", "0"),
            ("net.ipv6.conf.default.accept_dad", "0"),
        ])?;
    }
    ns.lo_up()
}

fn ns_name(run_id: &str, what: &str) -> String {
    format!("rp-{run_id}-{what}")
}

impl Cluster {
    /// Builds the underlay, the nodes and the client, and starts one agent per node.
    /// `progress` is told what happens.
    pub fn up(spec: ClusterSpec, progress: &mut dyn FnMut(&str)) -> Result<Cluster> {
        if spec.nodes == 0 || spec.nodes > addresses::MAX_NODES {
            bail!(
                "a cluster has 1 to {} nodes, not {}",
                addresses::MAX_NODES,
                spec.nodes
            );
        }
        let bins = Binaries::find()?;
        let files = raise_open_files_limit();
        let run_id = spec.run_id.clone().unwrap_or_else(new_run_id);
        let dir = Path::new(RUNS_DIR).join(&run_id);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        progress(&format!(
            "run {run_id}: files in {}; up to {files} open descriptors",
            dir.display()
        ));

        let underlay = Netns::create(&ns_name(&run_id, "underlay"))?;
        let client = Netns::create(&ns_name(&run_id, "client"))?;
        let mut cluster = Cluster {
            run_id,
            dir,
            spec,
            bins,
            pods: Vec::new(),
            nodes: Vec::new(),
            client,
            underlay,
        };
        prepare(&cluster.underlay, cluster.spec.ipv6)?;
        cluster.underlay.bridge("br0", ifindex::BRIDGE)?;

        // The outside client.
        prepare(&cluster.client, cluster.spec.ipv6)?;
        cluster.underlay.veth(
            ("client", ifindex::CLIENT_PORT),
            &cluster.client,
            ("eth0", ifindex::ETH0),
        )?;
        cluster
            .underlay
            .enslave(ifindex::CLIENT_PORT, ifindex::BRIDGE)?;
        let (c4, c6) = addresses::client_ips();
        cluster.client.addr(ifindex::ETH0, c4.into(), 24)?;
        if cluster.spec.ipv6 {
            cluster.client.addr(ifindex::ETH0, c6.into(), 64)?;
        }
        progress(&format!("underlay bridge and outside client {c4} ready"));

        for i in 0..cluster.spec.nodes {
            let node = cluster.make_node(i)?;
            cluster.nodes.push(node);
        }
        cluster.route_between_nodes()?;
        for i in 0..cluster.nodes.len() {
            cluster.start_agent(i)?;
            let node = &cluster.nodes[i];
            progress(&format!(
                "{} ({}): randportd ready, firewall {}",
                node.name, node.ip4, cluster.spec.firewall
            ));
        }
        Ok(cluster)
    }

    fn make_node(&self, i: usize) -> Result<SimNode> {
        let name = format!("node-{i}");
        let ns = Netns::create(&ns_name(&self.run_id, &name))?;
        prepare(&ns, self.spec.ipv6)?;
        let port = ifindex::node_port(i);
        self.underlay
            .veth((&format!("n{i}"), port), &ns, ("eth0", ifindex::ETH0))?;
        self.underlay.enslave(port, ifindex::BRIDGE)?;
        let ip4 = addresses::node_ipv4(i);
        ns.addr(ifindex::ETH0, ip4.into(), 24)?;
        ns.sysctl("net.ipv4.ip_forward", "1")?;
        let ip6 = if self.spec.ipv6 {
            let ip6 = addresses::node_ipv6(i);
            ns.addr(ifindex::ETH0, ip6.into(), 64)?;
            ns.sysctl("net.ipv6.conf.all.forwarding", "1")?;
            Some(ip6)
        } else {
            None
        };
        let dir = self.dir.join(&name);
        std::fs::create_dir_all(dir.join("pods"))?;
        Ok(SimNode {
            index: i,
            name,
            ns,
            ip4,
            ip6,
            dir,
            agent: None,
            next_pod: 0,
        })
    }

    fn route_between_nodes(&self) -> Result<()> {
        for node in &self.nodes {
            for other in self.nodes.iter().filter(|o| o.index != node.index) {
                let (subnet, bits) = addresses::pod_subnet_v4(other.index);
                node.ns
                    .route(subnet.into(), bits, ifindex::ETH0, Some(other.ip4.into()))?;
                if let Some(via) = other.ip6 {
                    let subnet6 = Ipv6Addr::new(0x2001, 0xdb8, 1, other.index as u16, 0, 0, 0, 0);
                    node.ns
                        .route(subnet6.into(), 64, ifindex::ETH0, Some(via.into()))?;
                }
            }
        }
        Ok(())
    }

    /// Starts (or restarts) node `i`'s agent and waits until it is ready.
    pub fn start_agent(&mut self, i: usize) -> Result<Duration> {
        let node = &self.nodes[i];
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(node.log())?;
        let started = Instant::now();
        let child = Command::new("ip")
            .args(["netns", "exec", node.ns.name()])
            .arg(&self.bins.agent)
            .args(["--node-name", &node.name, "--firewall", &self.spec.firewall])
            .args([
                "--port-range",
                &self.spec.port_range,
                // The node's own loopback: each node is a namespace of its own.
                "--metrics-addr",
                METRICS_ADDR,
            ])
            .arg(format!(
                "--repair-interval-ms={}",
                self.spec.repair_interval_ms
            ))
            .args(self.spec.localhost_access.then_some("--localhost-access"))
            .arg(format!("--pods=dir:{}", node.dir.join("pods").display()))
            .arg("--socket")
            .arg(node.socket())
            .arg("--state-dir")
            .arg(node.dir.join("state"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting randportd")?;
        let mut pids = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("pids"))?;
        writeln!(pids, "{}", child.id())?;
        let node = &mut self.nodes[i];
        node.agent = Some(child);
        loop {
            if let Ok(Response::Ok { ready: true, .. }) =
                call_agent(&node.socket(), &Request::Status, Duration::from_secs(2))
            {
                return Ok(started.elapsed());
            }
            if let Some(agent) = node.agent.as_mut() {
                if let Ok(Some(status)) = agent.try_wait() {
                    bail!(
                        "randportd on {} exited ({status}):\n{}",
                        node.name,
                        tail(&node.log())
                    );
                }
            }
            if started.elapsed() > Duration::from_secs(15) {
                bail!(
                    "randportd on {} not ready after 15 s:\n{}",
                    node.name,
                    tail(&node.log())
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops node `i`'s agent with SIGTERM, as the kubelet does when a DaemonSet rolls, and
    /// waits for it to exit (its mappings stay in the kernel).
    pub fn terminate_agent(&mut self, i: usize) -> Result<()> {
        if let Some(mut agent) = self.nodes[i].agent.take() {
            let pid = nix::unistd::Pid::from_raw(i32::try_from(agent.id())?);
            nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM)?;
            let status = agent.wait()?;
            if !status.success() {
                bail!(
                    "randportd on {} exited {status} on SIGTERM:\n{}",
                    self.nodes[i].name,
                    tail(&self.nodes[i].log())
                );
            }
        }
        Ok(())
    }

    /// Kills node `i`'s agent with SIGKILL (its mappings stay in the kernel).
    pub fn kill_agent(&mut self, i: usize) {
        if let Some(mut agent) = self.nodes[i].agent.take() {
            let _ = agent.kill();
            let _ = agent.wait();
        }
    }

    /// The node a pod runs on.
    pub fn node_of(&self, pod: &str) -> Result<&SimNode> {
        let pod = self.pod(pod)?;
        Ok(&self.nodes[pod.spec.node])
    }

    /// A pod by name.
    pub fn pod(&self, name: &str) -> Result<&SimPod> {
        self.pods
            .iter()
            .find(|p| p.spec.name == name)
            .ok_or_else(|| anyhow!("no pod {name} in this run"))
    }

    fn pod_file(&self, spec: &PodSpec) -> PathBuf {
        self.nodes[spec.node]
            .dir
            .join("pods")
            .join(&spec.namespace)
            .join(format!("{}.json", spec.name))
    }

    /// Creates a pod the way a runtime does: namespace and veth (the main plugin's job),
    /// workload, Pod object, then the real plugin's ADD. Returns its mappings.
    pub fn add_pod(&mut self, spec: PodSpec) -> Result<Vec<PortEntry>> {
        self.add_pod_then(spec, &mut || {})
    }

    /// [`Cluster::add_pod`], calling `before_add` right before the plugin's ADD is exec'd
    /// (fault tests time a kill of the agent from there).
    pub fn add_pod_then(
        &mut self,
        spec: PodSpec,
        before_add: &mut dyn FnMut(),
    ) -> Result<Vec<PortEntry>> {
        let mut pod = self.wire_pod(spec)?;
        before_add();
        pod.add_time = self.run_add(&pod)?;
        let (annotated, name) = (pod.spec.annotate, pod.spec.name.clone());
        self.pods.push(pod);
        if !annotated {
            // Nothing is written back for a pod without the annotation.
            return Ok(Vec::new());
        }
        self.mappings(&name)
    }

    /// Adds pods the way a busy runtime does: each is wired in turn, then every plugin
    /// ADD runs at once. Returns each pod's result, in order; failed pods are gone.
    pub fn add_pods_concurrently(&mut self, specs: Vec<PodSpec>) -> Vec<Result<()>> {
        let mut wired = Vec::new();
        let mut results: Vec<Option<Result<()>>> = Vec::new();
        for spec in specs {
            match self.wire_pod(spec) {
                Ok(pod) => {
                    wired.push((results.len(), pod));
                    results.push(None);
                }
                Err(e) => results.push(Some(Err(e))),
            }
        }
        let this = &*self;
        let outcomes: Vec<(usize, SimPod, Result<Duration>)> = std::thread::scope(|scope| {
            let handles: Vec<_> = wired
                .into_iter()
                .map(|(i, pod)| {
                    scope.spawn(move || {
                        let r = this.run_add(&pod);
                        (i, pod, r)
                    })
                })
                .collect();
            handles.into_iter().filter_map(|h| h.join().ok()).collect()
        });
        for (i, mut pod, outcome) in outcomes {
            results[i] = Some(outcome.map(|t| {
                pod.add_time = t;
                self.pods.push(pod);
            }));
        }
        results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(anyhow!("ADD thread panicked"))))
            .collect()
    }

    /// The main plugin's part: namespace, veth, addresses, routes; then the workload and
    /// the Pod object.
    fn wire_pod(&mut self, spec: PodSpec) -> Result<SimPod> {
        if spec.node >= self.nodes.len() {
            bail!("pod {}: no node {}", spec.name, spec.node);
        }
        if self
            .pods
            .iter()
            .any(|p| p.spec.name == spec.name && p.spec.namespace == spec.namespace)
        {
            bail!("pod {} exists already", spec.pod_ref());
        }
        let node = &mut self.nodes[spec.node];
        let j = node.next_pod;
        node.next_pod += 1;
        let node = &self.nodes[spec.node];
        let (v4, v6) = addresses::pod_ips(node.index, j);
        let name = ns_name(&self.run_id, &format!("{}-p{j}", node.name));
        let gw6 = Ipv6Addr::new(0x2001, 0xdb8, 1, node.index as u16, 0, 0, 0, 1);
        let wired = PodWiring {
            node: &node.ns,
            j,
            v4,
            gw: addresses::pod_gateway_v4(node.index),
            v6: self.spec.ipv6.then_some((v6, gw6)),
        };
        let ns = match self.spec.wiring {
            Wiring::Netlink => wired.with_netlink(&name)?,
            Wiring::IpCommands => wired.with_ip_commands(&name)?,
        };
        let mut ips = vec![IpAddr::V4(v4)];
        if self.spec.ipv6 {
            ips.push(IpAddr::V6(v6));
        }
        let ports: Vec<(u16, Protocol)> = spec
            .ports
            .iter()
            .map(|p| (p.container_port, p.protocol))
            .collect();
        let workload = workload::start(&ns, &spec.name, &ports)?;
        self.write_pod_object(&spec)?;

        let sandbox = SandboxId(format!("{}{}{j:04}", self.run_id, node.index));
        Ok(SimPod {
            spec,
            ns,
            ips,
            sandbox,
            add_time: Duration::ZERO,
            _workload: workload,
        })
    }

    /// The plugin's ADD for a wired pod, as a runtime runs it; on failure the runtime's
    /// cleanup (DEL, best effort) and the pod object goes.
    fn run_add(&self, pod: &SimPod) -> Result<Duration> {
        let started = Instant::now();
        let (ok, stdout) = self.cni(&pod.spec, &pod.sandbox, "ADD", &pod.ips)?;
        let add_time = started.elapsed();
        if !ok {
            let message = serde_json::from_str::<Value>(&stdout)
                .ok()
                .and_then(|v| v["details"].as_str().map(str::to_owned))
                .unwrap_or(stdout);
            let _ = self.run_del(pod);
            let _ = std::fs::remove_file(self.pod_file(&pod.spec));
            bail!("ADD of pod {} failed: {message}", pod.spec.pod_ref());
        }
        let printed: Value = serde_json::from_str(&stdout).context("ADD printed no JSON")?;
        let primary = pod.ips.first().map(|ip| format!("{ip}/32"));
        if printed["ips"][0]["address"].as_str() != primary.as_deref() {
            bail!(
                "ADD of pod {} did not print prevResult unchanged: {stdout}",
                pod.spec.pod_ref()
            );
        }
        Ok(add_time)
    }

    fn write_pod_object(&self, spec: &PodSpec) -> Result<()> {
        let ports: Vec<Value> = spec
            .ports
            .iter()
            .map(|p| {
                let mut port =
                    json!({"containerPort": p.container_port, "protocol": p.protocol.as_k8s()});
                if let Some(hp) = p.host_port {
                    port["hostPort"] = json!(hp);
                }
                if let Some(ip) = p.host_ip {
                    port["hostIP"] = json!(ip.to_string());
                }
                port
            })
            .collect();
        let mut annotations = json!({"sim.randport.dev/run": self.run_id});
        if spec.annotate {
            annotations[DEFAULT_ANNOTATION] = json!("");
        }
        let object = json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": spec.name, "namespace": spec.namespace, "uid": format!("uid-{}-{}", self.run_id, spec.name),
                         "annotations": annotations},
            "spec": {"nodeName": self.nodes[spec.node].name, "containers": [{"name": "app", "image": "randport-sim/echo", "ports": ports}]}
        });
        let path = self.pod_file(spec);
        std::fs::create_dir_all(path.parent().unwrap_or(Path::new("/")))?;
        std::fs::write(&path, serde_json::to_vec_pretty(&object)?)?;
        Ok(())
    }

    /// Execs the plugin for `pod` as a runtime would: (success, stdout).
    fn cni(
        &self,
        spec: &PodSpec,
        sandbox: &SandboxId,
        command: &str,
        ips: &[IpAddr],
    ) -> Result<(bool, String)> {
        let node = &self.nodes[spec.node];
        let prev_ips: Vec<Value> = ips
            .iter()
            .map(|ip| match ip {
                IpAddr::V4(v4) => json!({"address": format!("{v4}/32"), "gateway": addresses::pod_gateway_v4(node.index).to_string(), "interface": 0}),
                IpAddr::V6(v6) => json!({"address": format!("{v6}/128"), "interface": 0}),
            })
            .collect();
        let conf = json!({
            "cniVersion": "1.1.0", "name": "randport-sim", "type": "randport", "socket": node.socket(),
            "stateDir": node.dir.join("state"),
            "prevResult": {"cniVersion": "1.1.0", "interfaces": [{"name": "eth0"}], "ips": prev_ips}
        });
        // In the node's network namespace, as a runtime runs it on its node: a DEL with
        // the agent down removes the mappings from that namespace's firewall itself.
        let mut child = Command::new("nsenter")
            .arg(format!("--net={}", node.ns.path()))
            .arg(&self.bins.plugin)
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", &sandbox.0)
            .env("CNI_NETNS", "/run/netns/sim")
            .env("CNI_IFNAME", "eth0")
            .env(
                "CNI_PATH",
                self.bins.plugin.parent().unwrap_or(Path::new("/")),
            )
            .env(
                "CNI_ARGS",
                format!(
                    "IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={}",
                    spec.namespace, spec.name
                ),
            )
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("running the randport plugin")?;
        child
            .stdin
            .take()
            .context("plugin stdin")?
            .write_all(conf.to_string().as_bytes())?;
        let out = child.wait_with_output()?;
        Ok((
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        ))
    }

    /// Deletes a pod the way a runtime does: the plugin's DEL, then the Pod object and
    /// the namespace.
    pub fn delete_pod(&mut self, name: &str) -> Result<()> {
        // A failed DEL keeps the pod, so that it can be retried, as a runtime does.
        self.run_del(self.pod(name)?)?;
        self.forget(name);
        Ok(())
    }

    /// The plugin's DEL for a pod.
    fn run_del(&self, pod: &SimPod) -> Result<()> {
        let (ok, stdout) = self.cni(&pod.spec, &pod.sandbox, "DEL", &pod.ips)?;
        if !ok {
            bail!("DEL of pod {} failed: {stdout}", pod.spec.pod_ref());
        }
        Ok(())
    }

    /// Drops a deleted pod: its namespace and its Pod object.
    fn forget(&mut self, name: &str) {
        if let Some(index) = self.pods.iter().position(|p| p.spec.name == name) {
            let pod = self.pods.remove(index);
            let _ = std::fs::remove_file(self.pod_file(&pod.spec));
        }
    }

    /// Deletes pods at once (every plugin DEL concurrently); returns each result, in
    /// order. Pods whose DEL failed stay, so that it can be retried.
    pub fn delete_pods_concurrently(&mut self, names: &[String]) -> Vec<Result<()>> {
        let this = &*self;
        let results: Vec<Result<()>> = std::thread::scope(|scope| {
            let handles: Vec<_> = names
                .iter()
                .map(|name| scope.spawn(move || this.run_del(this.pod(name)?)))
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err(anyhow!("DEL thread panicked")))
                })
                .collect()
        });
        for (name, result) in names.iter().zip(&results) {
            if result.is_ok() {
                self.forget(name);
            }
        }
        results
    }

    /// The mappings written into a pod's annotation (or an error if none were).
    pub fn mappings(&self, name: &str) -> Result<Vec<PortEntry>> {
        let pod = self.pod(name)?;
        let object: Value = serde_json::from_slice(&std::fs::read(self.pod_file(&pod.spec))?)?;
        let Some(value) = object["metadata"]["annotations"][DEFAULT_ANNOTATION].as_str() else {
            bail!(
                "pod {} carries no port-mapping annotation",
                pod.spec.pod_ref()
            );
        };
        match decode(&pod.spec.pod_ref(), value)? {
            AnnotationValue::Mapped(entries) => Ok(entries),
            AnnotationValue::Requested => {
                bail!("no mapping was written back for pod {}", pod.spec.pod_ref())
            }
        }
    }

    /// What node `i`'s agent reports.
    pub fn agent_records(&self, i: usize) -> Result<Vec<SandboxRecord>> {
        match call_agent(
            &self.nodes[i].socket(),
            &Request::List,
            Duration::from_secs(5),
        )? {
            Response::Ok { records, .. } => Ok(records),
            Response::Error(e) => bail!("{e}"),
        }
    }

    fn origin_ns(&self, origin: Origin<'_>) -> Result<&Netns> {
        Ok(match origin {
            Origin::Client => &self.client,
            Origin::Pod(name) => &self.pod(name)?.ns,
            Origin::Node(i) => &self.nodes.get(i).ok_or_else(|| anyhow!("no node {i}"))?.ns,
        })
    }

    /// Connects over TCP from `origin` to `addr` and returns the greeting line.
    pub fn tcp(&self, origin: Origin<'_>, addr: SocketAddr) -> Result<String> {
        self.origin_ns(origin)?.enter(move || tcp_greeting(addr))?
    }

    /// Opens a TCP connection from `origin` to `addr` and keeps it (greeting consumed).
    pub fn tcp_connection(
        &self,
        origin: Origin<'_>,
        addr: SocketAddr,
    ) -> Result<(TcpStream, String)> {
        let stream = self
            .origin_ns(origin)?
            .enter(move || TcpStream::connect_timeout(&addr, Duration::from_secs(2)))??;
        stream.set_read_timeout(Some(Duration::from_secs(2)))?;
        let mut line = String::new();
        BufReader::new(stream.try_clone()?).read_line(&mut line)?;
        Ok((stream, line.trim_end().to_owned()))
    }

    /// Sends a UDP datagram from `origin` to `addr` and returns the answer (three tries).
    pub fn udp(&self, origin: Origin<'_>, addr: SocketAddr) -> Result<String> {
        let bind: SocketAddr = if addr.is_ipv6() {
            "[::]:0".parse()?
        } else {
            "0.0.0.0:0".parse()?
        };
        let socket = self
            .origin_ns(origin)?
            .enter(move || UdpSocket::bind(bind))??;
        socket.set_read_timeout(Some(Duration::from_millis(400)))?;
        let mut buf = [0u8; 256];
        let mut last = None;
        for _ in 0..3 {
            socket.send_to(b"who are you?", addr)?;
            match socket.recv(&mut buf) {
                Ok(n) => return Ok(String::from_utf8_lossy(&buf[..n]).into_owned()),
                Err(e) => last = Some(e),
            }
        }
        Err(anyhow!(
            "no UDP answer from {addr}: {}",
            last.map(|e| e.to_string()).unwrap_or_default()
        ))
    }

    /// Whether `port` can be bound for `protocol` on node `i` (false while randport holds it).
    pub fn port_free_on_node(&self, i: usize, protocol: Protocol, port: u16) -> Result<bool> {
        self.nodes[i].ns.enter(move || port_free(protocol, port))
    }

    /// A short description of the run, for logs.
    pub fn describe(&self) -> String {
        let mut out = String::new();
        let _ = write!(
            out,
            "run {} ({} nodes, {} pods, firewall {})",
            self.run_id,
            self.nodes.len(),
            self.pods.len(),
            self.spec.firewall
        );
        out
    }
}

/// What the main plugin sets up for pod `j` of a node.
struct PodWiring<'a> {
    node: &'a Netns,
    j: usize,
    v4: Ipv4Addr,
    gw: Ipv4Addr,
    /// The pod's IPv6 address and gateway, with IPv6.
    v6: Option<(Ipv6Addr, Ipv6Addr)>,
}

impl PodWiring<'_> {
    /// Over rtnetlink: a namespace held by a descriptor, then seven messages (nine more
    /// with IPv6) on a socket in the pod's namespace and the node's.
    fn with_netlink(&self, name: &str) -> Result<Netns> {
        use ifindex::ETH0;
        let mut ns = Netns::anonymous(name)?;
        prepare(&ns, self.v6.is_some())?;
        let port = ifindex::pod_port(self.j);
        ns.veth(("eth0", ETH0), self.node, (&format!("p{}", self.j), port))?;
        let (v4, gw) = (IpAddr::V4(self.v4), IpAddr::V4(self.gw));
        self.node.addr(port, gw, 32)?;
        self.node.route(v4, 32, port, None)?;
        ns.addr(ETH0, v4, 32)?;
        ns.route(gw, 32, ETH0, None)?;
        ns.route(Ipv4Addr::UNSPECIFIED.into(), 0, ETH0, Some(gw))?;
        if let Some((v6, gw6)) = self.v6 {
            let (v6, gw6) = (IpAddr::V6(v6), IpAddr::V6(gw6));
            self.node.addr(port, gw6, 128)?;
            self.node.route(v6, 128, port, None)?;
            ns.addr(ETH0, v6, 128)?;
            ns.route(gw6, 128, ETH0, None)?;
            ns.route(Ipv6Addr::UNSPECIFIED.into(), 0, ETH0, Some(gw6))?;
        }
        ns.close_netlink();
        Ok(ns)
    }

    /// The same with `ip` commands (the reference path).
    fn with_ip_commands(&self, name: &str) -> Result<Netns> {
        let ns = Netns::create_with_ip(name)?;
        let node = self.node.name();
        let in_ns = |args: &[&str]| ip_command(&[&["-n", name], args].concat());
        let on_node = |args: &[&str]| ip_command(&[&["-n", node], args].concat());
        let ipv6 = self.v6.is_some();
        if ipv6 {
            ip_command(&[
                "netns",
                "exec",
                name,
                "sysctl",
                "-qw",
                "net.ipv6.conf.all.accept_dad=0",
                "net.ipv6.conf.default.accept_dad=0",
            ])?;
        }
        in_ns(&["link", "set", "lo", "up"])?;
        let host_if = format!("p{}", self.j);
        on_node(&[
            "link", "add", &host_if, "type", "veth", "peer", "name", "eth0", "netns", name,
        ])?;
        on_node(&["link", "set", &host_if, "up"])?;
        in_ns(&["link", "set", "eth0", "up"])?;
        let (v4, gw) = (self.v4.to_string(), self.gw.to_string());
        on_node(&["addr", "add", &format!("{gw}/32"), "dev", &host_if])?;
        on_node(&["route", "add", &format!("{v4}/32"), "dev", &host_if])?;
        in_ns(&["addr", "add", &format!("{v4}/32"), "dev", "eth0"])?;
        in_ns(&["route", "add", &gw, "dev", "eth0"])?;
        in_ns(&["route", "add", "default", "via", &gw, "dev", "eth0"])?;
        if let Some((v6, gw6)) = self.v6 {
            let (v6, gw6) = (v6.to_string(), gw6.to_string());
            on_node(&[
                "addr",
                "add",
                &format!("{gw6}/128"),
                "dev",
                &host_if,
                "nodad",
            ])?;
            on_node(&["-6", "route", "add", &format!("{v6}/128"), "dev", &host_if])?;
            in_ns(&["addr", "add", &format!("{v6}/128"), "dev", "eth0", "nodad"])?;
            in_ns(&["-6", "route", "add", &gw6, "dev", "eth0"])?;
            in_ns(&["-6", "route", "add", "default", "via", &gw6, "dev", "eth0"])?;
        }
        Ok(ns)
    }
}

/// Connects over TCP to `addr` from the calling thread's namespace and returns the
/// workload's greeting line.
pub fn tcp_greeting(addr: SocketAddr) -> Result<String> {
    let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line)?;
    if line.is_empty() {
        bail!("{addr} closed the connection without a word");
    }
    Ok(line.trim_end().to_owned())
}

/// Whether `port` can be bound for `protocol` in the calling thread's namespace (false
/// while something, randport's holder for one, holds it).
pub fn port_free(protocol: Protocol, port: u16) -> bool {
    match protocol {
        Protocol::Udp => UdpSocket::bind(("::", port)).is_ok(),
        _ => TcpListener::bind(("::", port)).is_ok(),
    }
}

/// `ip args…`, or an error with its stderr.
fn ip_command(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running ip (is iproute2 installed?)")?;
    if !out.status.success() {
        bail!(
            "ip {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Sends one request to the agent at `socket`, as the plugin does (one JSON request, the
/// write side closed, one JSON answer), and waits up to `timeout` for the answer.
pub fn call_agent(socket: &Path, request: &Request, timeout: Duration) -> Result<Response> {
    use std::io::Read as _;
    let mut stream = std::os::unix::net::UnixStream::connect(socket)
        .with_context(|| format!("connecting to randportd at {}", socket.display()))?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    stream.write_all(&serde_json::to_vec(request)?)?;
    stream.shutdown(std::net::Shutdown::Write)?;
    let mut answer = Vec::new();
    (&mut stream)
        .take(MAX_RESPONSE as u64 + 1)
        .read_to_end(&mut answer)
        .with_context(|| format!("reading randportd's answer on {}", socket.display()))?;
    if answer.len() > MAX_RESPONSE {
        bail!(
            "randportd's answer on {} is longer than {MAX_RESPONSE} bytes",
            socket.display()
        );
    }
    serde_json::from_slice(&answer)
        .with_context(|| format!("malformed answer from randportd on {}", socket.display()))
}

fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            self.kill_agent(i);
        }
        self.pods.clear();
        self.nodes.clear();
        // The client and underlay namespaces go with the fields; then the files.
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
