//! `randport-sim bench`: randport against the targets of DESIGN.md, side by side with the
//! reference CNI `portmap` plugin, on simulated nodes, in one run. Every plugin is
//! exec'd from a thread inside the node's namespace, as a runtime on that node would.
//!
//! Measured: ADD and DEL latency (the whole plugin exec) at several numbers of existing
//! mappings; new TCP connections per second and connect() latency through a mapping and
//! directly to the pod; the agent's memory; an agent restart; 100 concurrent ADDs.

use std::fmt::Write as _;
use std::io::{Read, Write as _};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use randport_core::Protocol;
use serde_json::{Value, json};

use crate::addresses;
use crate::cluster::{Cluster, ClusterSpec, Origin, PodSpec, SimPort};
use crate::netns::Netns;

/// Where the reference plugin is installed (Debian's containernetworking-plugins).
pub const PORTMAP: &str = "/usr/lib/cni/portmap";

/// What to measure.
#[derive(Debug, Clone)]
pub struct BenchSpec {
    /// Existing mappings at which ADD/DEL latency is measured.
    pub sizes: Vec<usize>,
    /// The largest size portmap is measured at (it slows down with size).
    pub portmap_max: usize,
    /// ADD+DEL pairs measured at each size.
    pub samples: usize,
    /// Seconds of connection load per connection measurement.
    pub conn_seconds: f64,
    /// Sizes at which connections are measured.
    pub conn_sizes: Vec<usize>,
    /// Concurrent ADDs.
    pub concurrent: usize,
    /// Mappings at which the churn is measured (nftables backend).
    pub churn_sizes: Vec<usize>,
    /// Seconds of back-to-back ADD+DEL pairs per churn measurement.
    pub churn_seconds: f64,
}

impl Default for BenchSpec {
    fn default() -> Self {
        BenchSpec {
            sizes: vec![0, 100, 1000, 5000],
            portmap_max: 1000,
            samples: 60,
            conn_seconds: 2.0,
            conn_sizes: vec![1, 1000, 5000],
            concurrent: 100,
            churn_sizes: vec![1000, 5000],
            churn_seconds: 60.0,
        }
    }
}

/// p50, p90, p99 and max of a sample, in milliseconds.
#[derive(Debug, Clone, Copy, Default)]
pub struct Percentiles {
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Largest.
    pub max: f64,
}

/// The percentiles of `samples`.
pub fn percentiles(samples: &[Duration]) -> Percentiles {
    if samples.is_empty() {
        return Percentiles::default();
    }
    let mut ms: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1000.0).collect();
    ms.sort_by(f64::total_cmp);
    let at = |q: f64| ms[((ms.len() as f64 - 1.0) * q).round() as usize];
    Percentiles {
        p50: at(0.5),
        p90: at(0.9),
        p99: at(0.99),
        max: ms[ms.len() - 1],
    }
}

/// One row of the latency table.
#[derive(Debug, Clone)]
pub struct LatencyRow {
    /// `randport (nftables)`, `randport (iptables)` or `portmap`.
    pub plugin: String,
    /// Mappings on the node before the measured ADD.
    pub existing: usize,
    /// ADD latency.
    pub add: Percentiles,
    /// DEL latency.
    pub del: Percentiles,
}

/// One row of the connection table.
#[derive(Debug, Clone)]
pub struct ConnRow {
    /// The plugin.
    pub plugin: String,
    /// Mappings on the node.
    pub mappings: usize,
    /// Connections per second through the mapping.
    pub mapped_rate: f64,
    /// Connections per second straight to the pod, same run.
    pub direct_rate: f64,
    /// connect() latency through the mapping.
    pub mapped_connect: Percentiles,
    /// connect() latency straight to the pod.
    pub direct_connect: Percentiles,
}

/// Everything measured.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// ADD/DEL latency.
    pub latency: Vec<LatencyRow>,
    /// Connection rates.
    pub connections: Vec<ConnRow>,
    /// Agent RSS in MiB and idle CPU in % of a core, by (backend, mappings).
    pub memory: Vec<(String, usize, f64, f64)>,
    /// Agent restart time by (backend, mappings).
    pub restarts: Vec<(String, usize, Duration)>,
    /// Concurrent ADDs: (plugin, latency, duplicates found).
    pub concurrent: Vec<(String, Percentiles, usize)>,
    /// The agent under churn.
    pub churn: Vec<ChurnRow>,
}

/// The agent while pods come and go back to back.
#[derive(Debug, Clone)]
pub struct ChurnRow {
    /// The backend.
    pub backend: String,
    /// Mappings on the node.
    pub mappings: usize,
    /// ADD+DEL pairs done.
    pub pairs: usize,
    /// How long.
    pub seconds: f64,
    /// The agent's CPU (its own and the tools it ran), % of one core.
    pub cpu_percent: f64,
    /// With a flush of the table half-way: how long until the watchdog had restored it.
    pub repair: Option<Duration>,
}

/// Runs `program` with `env` and `stdin` from a thread inside `ns`; (success, stdout, wall time).
fn exec_in(
    ns: &Netns,
    program: &Path,
    env: Vec<(String, String)>,
    stdin: String,
) -> Result<(bool, String, Duration)> {
    let program = program.to_owned();
    ns.enter(move || -> Result<(bool, String, Duration)> {
        let started = Instant::now();
        let mut child = Command::new(&program)
            .envs(env)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {}", program.display()))?;
        child
            .stdin
            .take()
            .context("stdin")?
            .write_all(stdin.as_bytes())?;
        let out = child.wait_with_output()?;
        let elapsed = started.elapsed();
        Ok((
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            elapsed,
        ))
    })?
}

fn cni_env(command: &str, sandbox: &str, pod: &str) -> Vec<(String, String)> {
    vec![
        ("CNI_COMMAND".into(), command.into()),
        ("CNI_CONTAINERID".into(), sandbox.into()),
        ("CNI_NETNS".into(), format!("/run/netns/{sandbox}")),
        ("CNI_IFNAME".into(), "eth0".into()),
        ("CNI_PATH".into(), "/usr/lib/cni".into()),
        (
            "CNI_ARGS".into(),
            format!("IgnoreUnknown=1;K8S_POD_NAMESPACE=bench;K8S_POD_NAME={pod}"),
        ),
    ]
}

fn prev_result(ip: IpAddr) -> Value {
    json!({"cniVersion": "1.0.0", "interfaces": [{"name": "eth0", "sandbox": "/run/netns/bench"}],
           "ips": [{"address": format!("{ip}/32"), "interface": 0}]})
}

/// A plugin under test on node 0 of a cluster.
trait Plugin {
    fn name(&self) -> String;
    /// ADD of light pod `i` (no namespace: the plugins only program the node).
    fn add(&self, c: &Cluster, i: usize) -> Result<Duration>;
    /// DEL of light pod `i`.
    fn del(&self, c: &Cluster, i: usize) -> Result<Duration>;
}

fn light_ip(i: usize) -> IpAddr {
    // Node 0's pods from index 16 on; the real pods take the first ones. Every light pod
    // index is unique in a run (see `Indexes`), so no two pods share an address.
    IpAddr::V4(addresses::pod_ips(0, 16 + i).0)
}

/// Where each kind of light pod's indexes start, so that none overlap.
struct Indexes {
    samples: usize,
    concurrent: usize,
}

impl Indexes {
    fn new(spec: &BenchSpec) -> Result<Indexes> {
        let largest = spec
            .sizes
            .iter()
            .chain(&spec.conn_sizes)
            .copied()
            .max()
            .unwrap_or(0);
        let samples = largest + 10;
        let concurrent = samples + spec.samples + 10;
        if 16 + concurrent + spec.concurrent >= addresses::MAX_PODS_PER_NODE {
            bail!(
                "the simulated node holds at most about {} pods: use smaller sizes",
                addresses::MAX_PODS_PER_NODE - 200
            );
        }
        Ok(Indexes {
            samples,
            concurrent,
        })
    }
}

struct Randport {
    backend: String,
}

impl Randport {
    fn conf(c: &Cluster, i: usize) -> String {
        json!({"cniVersion": "1.0.0", "name": "bench", "type": "randport", "socket": c.nodes[0].socket(),
               "prevResult": prev_result(light_ip(i))})
        .to_string()
    }
}

impl Plugin for Randport {
    fn name(&self) -> String {
        format!("randport ({})", self.backend)
    }

    fn add(&self, c: &Cluster, i: usize) -> Result<Duration> {
        let pod = format!("light-{i}");
        write_light_pod(&c.nodes[0].dir.join("pods"), &pod)?;
        let (ok, out, t) = exec_in(
            &c.nodes[0].ns,
            &c.bins.plugin,
            cni_env("ADD", &format!("lightsb{i}"), &pod),
            Self::conf(c, i),
        )?;
        if !ok {
            bail!("randport ADD of {pod} failed: {out}");
        }
        Ok(t)
    }

    fn del(&self, c: &Cluster, i: usize) -> Result<Duration> {
        let pod = format!("light-{i}");
        let (ok, out, t) = exec_in(
            &c.nodes[0].ns,
            &c.bins.plugin,
            cni_env("DEL", &format!("lightsb{i}"), &pod),
            Self::conf(c, i),
        )?;
        if !ok {
            bail!("randport DEL of {pod} failed: {out}");
        }
        let _ = std::fs::remove_file(
            c.nodes[0]
                .dir
                .join("pods/bench")
                .join(format!("{pod}.json")),
        );
        Ok(t)
    }
}

fn write_light_pod(pods: &Path, name: &str) -> Result<()> {
    let object = json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "bench", "uid": format!("uid-{name}"), "annotations": {randport_core::DEFAULT_ANNOTATION: ""}},
        "spec": {"nodeName": "node-0", "containers": [{"name": "app", "ports": [{"containerPort": 8080, "protocol": "TCP"}]}]}});
    std::fs::create_dir_all(pods.join("bench"))?;
    std::fs::write(
        pods.join("bench").join(format!("{name}.json")),
        object.to_string(),
    )?;
    Ok(())
}

struct Portmap;

impl Portmap {
    fn conf(i: usize, host_port: u16, ip: IpAddr) -> String {
        json!({"cniVersion": "1.0.0", "name": "bench", "type": "portmap", "capabilities": {"portMappings": true},
               "runtimeConfig": {"portMappings": [{"hostPort": host_port, "containerPort": 8080, "protocol": "tcp"}]},
               "prevResult": prev_result(ip), "bench": i})
        .to_string()
    }

    fn run(c: &Cluster, command: &str, sandbox: &str, conf: String) -> Result<Duration> {
        let (ok, out, t) = exec_in(
            &c.nodes[0].ns,
            Path::new(PORTMAP),
            cni_env(command, sandbox, sandbox),
            conf,
        )?;
        if !ok {
            bail!("portmap {command} of {sandbox} failed: {out}");
        }
        Ok(t)
    }
}

impl Plugin for Portmap {
    fn name(&self) -> String {
        "portmap 1.1.1 (iptables-nft)".into()
    }

    fn add(&self, c: &Cluster, i: usize) -> Result<Duration> {
        Self::run(
            c,
            "ADD",
            &format!("lightsb{i}"),
            Self::conf(i, 30000 + i as u16, light_ip(i)),
        )
    }

    fn del(&self, c: &Cluster, i: usize) -> Result<Duration> {
        Self::run(
            c,
            "DEL",
            &format!("lightsb{i}"),
            Self::conf(i, 30000 + i as u16, light_ip(i)),
        )
    }
}

/// Opens and closes connections to `addr` from `ns` for `seconds`: (rate, connect() times).
fn connection_load(ns: &Netns, addr: SocketAddr, seconds: f64) -> Result<(f64, Vec<Duration>)> {
    ns.enter(move || -> Result<(f64, Vec<Duration>)> {
        let started = Instant::now();
        let mut connects = Vec::new();
        let mut count = 0u64;
        while started.elapsed().as_secs_f64() < seconds {
            let t = Instant::now();
            let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
                .with_context(|| format!("connecting to {addr}"))?;
            connects.push(t.elapsed());
            stream.set_read_timeout(Some(Duration::from_secs(2)))?;
            let mut byte = [0u8; 1];
            stream.read_exact(&mut byte)?;
            // Close with RST (linger 0): no TIME_WAIT piling up on the client.
            let socket = socket2::SockRef::from(&stream);
            socket.set_linger(Some(Duration::ZERO))?;
            drop(stream);
            count += 1;
        }
        Ok((count as f64 / started.elapsed().as_secs_f64(), connects))
    })?
}

/// Fills node 0 up to `target` mappings with light pods, returning how many exist.
fn fill(
    c: &Cluster,
    plugin: &dyn Plugin,
    have: usize,
    target: usize,
    progress: &mut dyn FnMut(&str),
) -> Result<usize> {
    let mut last = Instant::now();
    for i in have..target {
        plugin.add(c, i)?;
        if last.elapsed() > Duration::from_secs(5) {
            progress(&format!(
                "{}: {} of {target} mappings in place",
                plugin.name(),
                i + 1
            ));
            last = Instant::now();
        }
    }
    Ok(target.max(have))
}

/// One reading of the agent while its metrics endpoint is abused.
#[derive(Debug, Clone)]
pub struct EndpointRow {
    /// What was going on.
    pub what: String,
    /// The agent's RSS, MiB.
    pub rss_mib: f64,
    /// ADD+DEL pairs through the plugin meanwhile: ADD latency.
    pub add: Percentiles,
    /// And DEL latency.
    pub del: Percentiles,
}

/// The agent's metrics and probe endpoint under abuse (DESIGN: 1 GiB without a newline,
/// 3,000 idle connections): the agent's RSS and the latency of ADD and DEL through the
/// plugin before, during a flood of `flood_mib` MiB sent without a newline on each of 4
/// connections at once, and while `idle` connections sit open sending nothing; then
/// `/healthz` once they are gone. Node 0 of a one-node cluster, 20 ADD+DEL pairs a row.
pub fn endpoint(
    flood_mib: u64,
    idle: usize,
    progress: &mut dyn FnMut(&str),
) -> Result<Vec<EndpointRow>> {
    let spec = ClusterSpec {
        nodes: 1,
        ..ClusterSpec::default()
    };
    let c = Cluster::up(spec, &mut |_| {})?;
    let pid = c.nodes[0].agent_pid().context("no agent")?;
    let plugin = Randport {
        backend: "nftables".into(),
    };
    let addr: SocketAddr = crate::cluster::METRICS_ADDR.parse()?;
    let mut next = 0usize;
    let mut row = |what: &str, c: &Cluster| -> Result<EndpointRow> {
        let (adds, dels) = measure_add_del(c, &plugin, next, 20)?;
        next += 20;
        Ok(EndpointRow {
            what: what.to_owned(),
            rss_mib: rss_mib(pid)?,
            add: percentiles(&adds),
            del: percentiles(&dels),
        })
    };
    let mut rows = vec![row("at rest", &c)?];
    progress(&format!(
        "flooding the endpoint with {flood_mib} MiB x 4, no newline"
    ));
    let ns = &c.nodes[0].ns;
    let flood = move || -> Result<u64> {
        ns.enter(move || -> Result<u64> {
            let connect = || -> Result<TcpStream> {
                let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
                stream.set_write_timeout(Some(Duration::from_secs(5)))?;
                Ok(stream)
            };
            let mut stream = connect()?;
            let chunk = vec![b'A'; 1 << 20];
            let mut sent = 0u64;
            // The agent cuts each connection at 8 KiB; reconnect and go on.
            while sent < flood_mib << 20 {
                match stream.write(&chunk) {
                    Ok(n) => sent += n as u64,
                    Err(_) => stream = connect()?,
                }
            }
            Ok(sent)
        })?
    };
    let during = std::thread::scope(|s| -> Result<EndpointRow> {
        let floods: Vec<_> = (0..4).map(|_| s.spawn(flood)).collect();
        let during = row(
            &format!("while 4 x {flood_mib} MiB without a newline are sent"),
            &c,
        )?;
        for f in floods {
            f.join()
                .map_err(|_| anyhow::anyhow!("a flood thread panicked"))??;
        }
        Ok(during)
    })?;
    rows.push(during);
    rows.push(row(
        &format!("after {} MiB without a newline", 4 * flood_mib),
        &c,
    )?);
    progress(&format!("opening {idle} idle connections"));
    let held: Vec<TcpStream> = c.nodes[0].ns.enter(move || {
        (0..idle)
            .filter_map(|_| TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok())
            .collect()
    })?;
    let opened = held.len();
    rows.push(row(&format!("{opened} idle connections open"), &c)?);
    drop(held);
    std::thread::sleep(Duration::from_secs(6));
    let healthz = c.nodes[0].ns.enter(move || -> Result<String> {
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
        stream.write_all(b"GET /healthz HTTP/1.0\r\n\r\n")?;
        let mut text = String::new();
        stream.read_to_string(&mut text)?;
        Ok(text)
    })??;
    if !healthz.starts_with("HTTP/1.0 200") {
        bail!("/healthz after the abuse: {healthz}");
    }
    rows.push(row("after, /healthz 200 again", &c)?);
    Ok(rows)
}

/// The endpoint rows as a markdown table.
pub fn endpoint_markdown(rows: &[EndpointRow], command: &str) -> String {
    let f = |p: &Percentiles| format!("{:.1} / {:.1}", p.p50, p.p99);
    let mut out = format!(
        "Command: `{command}`  \nMachine: {}  \n\n| the agent's endpoint | agent RSS, MiB | ADD p50 / p99, ms | DEL p50 / p99, ms |\n| --- | ---: | ---: | ---: |\n",
        machine()
    );
    for r in rows {
        out.push_str(&format!(
            "| {} | {:.1} | {} | {} |\n",
            r.what,
            r.rss_mib,
            f(&r.add),
            f(&r.del)
        ));
    }
    out
}

/// ADD+DEL pairs of fresh pods: (ADD times, DEL times).
fn measure_add_del(
    c: &Cluster,
    plugin: &dyn Plugin,
    first: usize,
    samples: usize,
) -> Result<(Vec<Duration>, Vec<Duration>)> {
    let mut adds = Vec::new();
    let mut dels = Vec::new();
    for s in 0..samples {
        adds.push(plugin.add(c, first + s)?);
        dels.push(plugin.del(c, first + s)?);
    }
    Ok((adds, dels))
}

/// The agent's CPU use while idle, in % of one core over `window`: its own time and its
/// waited-for children's (the iptables backend's watchdog runs `iptables-save`).
fn idle_cpu_percent(pid: u32, window: Duration) -> Result<f64> {
    let before = cpu_seconds(pid)?;
    std::thread::sleep(window);
    Ok((cpu_seconds(pid)? - before) / window.as_secs_f64() * 100.0)
}

/// The CPU time of process `pid` and of its waited-for children (the tools it ran), s.
fn cpu_seconds(pid: u32) -> Result<f64> {
    let ticks = || -> Result<u64> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
        // After the command name: field 3 (state) first, so utime..cstime (14..17) are
        // at 11..15.
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .context("unreadable /proc/PID/stat")?
            .1
            .split_whitespace()
            .collect();
        fields
            .get(11..15)
            .context("short /proc/PID/stat")?
            .iter()
            .map(|f| f.parse::<u64>().context("/proc/PID/stat field"))
            .sum()
    };
    let hz: f64 = std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0);
    Ok(ticks()? as f64 / hz)
}

/// Back-to-back ADD+DEL pairs of one light pod for `spec.churn_seconds` on a node with
/// `have` mappings: the agent's CPU; with `flush`, the table is flushed half-way and the
/// time until `target` answers through its mapping again is taken (a connection every
/// 20 ms from the client; an `nft` listing would itself wait for the churn to pause).
fn churn_row(
    c: &Cluster,
    plugin: &dyn Plugin,
    backend: &str,
    spec: &BenchSpec,
    index: usize,
    have: usize,
    flush: Option<SocketAddr>,
) -> Result<ChurnRow> {
    let pid = c.nodes[0].agent_pid().context("agent pid")?;
    let deadline = Duration::from_secs_f64(spec.churn_seconds);
    let cpu_before = cpu_seconds(pid)?;
    let started = Instant::now();
    let stop = std::sync::atomic::AtomicBool::new(false);
    let (pairs, repair) = std::thread::scope(|scope| -> Result<(usize, Option<Duration>)> {
        let stop = &stop;
        let flusher = flush.map(|target| {
            scope.spawn(move || -> Result<Duration> {
                std::thread::sleep(deadline / 2);
                let node = &c.nodes[0].ns;
                node.run_ok("nft", &["flush", "table", "inet", "randport"], "")?;
                let flushed = Instant::now();
                if c.tcp(Origin::Client, target)
                    .is_ok_and(|who| who == "target")
                {
                    bail!("the mapping still answered right after the flush");
                }
                loop {
                    if c.tcp(Origin::Client, target)
                        .is_ok_and(|who| who == "target")
                    {
                        return Ok(flushed.elapsed());
                    }
                    if flushed.elapsed() > Duration::from_secs(30)
                        || stop.load(std::sync::atomic::Ordering::SeqCst)
                    {
                        bail!("the flushed table was not restored within 30 s");
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            })
        });
        let mut pairs = 0;
        while started.elapsed() < deadline {
            plugin.add(c, index)?;
            plugin.del(c, index)?;
            pairs += 1;
        }
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let repair = match flusher {
            Some(handle) => Some(
                handle
                    .join()
                    .map_err(|_| anyhow::anyhow!("the flushing thread panicked"))??,
            ),
            None => None,
        };
        Ok((pairs, repair))
    })?;
    let seconds = started.elapsed().as_secs_f64();
    Ok(ChurnRow {
        backend: backend.into(),
        mappings: have,
        pairs,
        seconds,
        cpu_percent: (cpu_seconds(pid)? - cpu_before) / seconds * 100.0,
        repair,
    })
}

/// RSS and idle CPU of the agent, for the memory table. The CPU window starts 2.5 s after
/// the last request, so that a watchdog listing that ran during the requests before (and
/// is counted when it ends) is not taken for idle work.
fn agent_usage(pid: u32) -> Result<(f64, f64)> {
    std::thread::sleep(Duration::from_millis(2500));
    Ok((
        rss_mib(pid)?,
        idle_cpu_percent(pid, Duration::from_secs(3))?,
    ))
}

fn rss_mib(pid: u32) -> Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("no VmRSS")?;
    Ok(kb / 1024.0)
}

/// The first mapping of a real pod: its node address and host port.
fn mapped_addr(c: &Cluster, pod: &str) -> Result<SocketAddr> {
    let entry = c
        .mappings(pod)?
        .into_iter()
        .find(|e| e.protocol == Protocol::Tcp)
        .context("no TCP mapping")?;
    Ok(SocketAddr::new(IpAddr::V4(c.nodes[0].ip4), entry.host_port))
}

/// Lets the outside client reach node 0's pods directly (for the direct-to-pod baseline).
fn route_client_to_pods(c: &Cluster) -> Result<()> {
    let (subnet, bits) = addresses::pod_subnet_v4(0);
    c.client.ip(&[
        "route",
        "add",
        &format!("{subnet}/{bits}"),
        "via",
        &c.nodes[0].ip4.to_string(),
    ])
}

/// Measures `spec.samples` ADD+DEL pairs with `existing` mappings on the node and adds
/// the row to the report.
fn latency_row(
    c: &Cluster,
    plugin: &dyn Plugin,
    spec: &BenchSpec,
    samples_at: usize,
    existing: usize,
    report: &mut Report,
    progress: &mut dyn FnMut(&str),
) -> Result<()> {
    progress(&format!(
        "{}: {} ADD+DEL pairs at {existing} mappings",
        plugin.name(),
        spec.samples
    ));
    if plugin.name() != "randport (nftables)" {
        let (adds, dels) = measure_add_del(c, plugin, samples_at, spec.samples)?;
        report.latency.push(LatencyRow {
            plugin: plugin.name(),
            existing,
            add: percentiles(&adds),
            del: percentiles(&dels),
        });
        return Ok(());
    }
    // Against the floor on this kernel, interleaved so that both see the same moments:
    // each ADD and DEL next to one element added and deleted with a bare nft exec, in a
    // map of the same type and size in a table of its own (the agent's watchdog removes
    // elements of its own maps that no record names).
    floor_table(c, existing)?;
    let (mut adds, mut dels, mut bare_adds, mut bare_dels) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for s in 0..spec.samples {
        adds.push(plugin.add(c, samples_at + s)?);
        bare_adds.push(bare_nft(c, "add", s)?);
        dels.push(plugin.del(c, samples_at + s)?);
        bare_dels.push(bare_nft(c, "delete", s)?);
    }
    report.latency.push(LatencyRow {
        plugin: plugin.name(),
        existing,
        add: percentiles(&adds),
        del: percentiles(&dels),
    });
    report.latency.push(LatencyRow {
        plugin: BARE_NFT.into(),
        existing,
        add: percentiles(&bare_adds),
        del: percentiles(&bare_dels),
    });
    Ok(())
}

/// The table the bare `nft` floor is measured in, on node 0.
const FLOOR_TABLE: &str = "randport_floor";

/// (Re)creates [`FLOOR_TABLE`] on node 0 with a `hostports4`-typed map of `size`
/// elements, in one `nft -f`.
fn floor_table(c: &Cluster, size: usize) -> Result<()> {
    let mut script = format!(
        "table inet {FLOOR_TABLE} {{}}\ndelete table inet {FLOOR_TABLE}\ntable inet {FLOOR_TABLE} {{\n\tmap hostports4 {{\n\t\ttype inet_proto . inet_service : ipv4_addr . inet_service\n\t}}\n}}\n"
    );
    for i in 0..size {
        let _ = writeln!(
            script,
            "add element inet {FLOOR_TABLE} hostports4 {{ udp . {} : 198.18.31.2 . 80 }}",
            20_000 + i
        );
    }
    c.nodes[0].ns.run_ok("nft", &["-f", "-"], &script)?;
    Ok(())
}

/// The latency table's name for a bare `nft add element` / `nft delete element`.
pub const BARE_NFT: &str = "bare `nft add/delete element`";

/// Element `s` added to or deleted from the floor table's map on
/// node 0 with one `nft` exec from a thread in the node: how long it took.
fn bare_nft(c: &Cluster, verb: &'static str, s: usize) -> Result<Duration> {
    let value = if verb == "add" {
        " : 198.18.31.1 . 80"
    } else {
        ""
    };
    let element = format!("hostports4 {{ tcp . {}{value} }}", 10_000 + s);
    let args = format!("{verb} element inet {FLOOR_TABLE} {element}");
    let (ok, took) = c.nodes[0].ns.enter(move || {
        let started = Instant::now();
        let status = Command::new("nft")
            .args(args.split(' '))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        (status.is_ok_and(|s| s.success()), started.elapsed())
    })?;
    if !ok {
        bail!("nft {verb} element inet {FLOOR_TABLE} {element} failed");
    }
    Ok(took)
}

/// Fills node 0 size by size (the sizes of `spec` up to `max`, the real target pod counting
/// as the first mapping) and measures at each: ADD/DEL latency, the agent's memory (with
/// `memory_of` naming the backend), connections through `target` vs `direct`. Returns
/// the number of mappings reached.
#[allow(clippy::too_many_arguments)]
fn sweep(
    c: &Cluster,
    plugin: &dyn Plugin,
    spec: &BenchSpec,
    samples_at: usize,
    max: usize,
    (target, direct): (SocketAddr, SocketAddr),
    memory_of: Option<&str>,
    report: &mut Report,
    progress: &mut dyn FnMut(&str),
) -> Result<usize> {
    let mut sizes: Vec<usize> = spec
        .sizes
        .iter()
        .chain(&spec.conn_sizes)
        .chain(&spec.churn_sizes)
        .copied()
        .filter(|s| *s >= 1 && *s <= max)
        .collect();
    sizes.sort_unstable();
    sizes.dedup();
    let (mut have, mut next_light) = (1usize, 0usize);
    for size in sizes {
        if size > have {
            progress(&format!(
                "{}: filling the node to {size} mappings",
                plugin.name()
            ));
            next_light = fill(c, plugin, next_light, next_light + (size - have), progress)?;
            have = size;
        }
        if let (Some(backend), true) = (memory_of, spec.churn_sizes.contains(&size)) {
            if backend == "nftables" {
                progress(&format!(
                    "{}: {:.0} s of back-to-back ADD+DEL at {have} mappings{}",
                    plugin.name(),
                    spec.churn_seconds,
                    if size == *spec.churn_sizes.iter().max().unwrap_or(&0) {
                        ", the table flushed half-way"
                    } else {
                        ""
                    }
                ));
                let flush =
                    (size == *spec.churn_sizes.iter().max().unwrap_or(&0)).then_some(target);
                report.churn.push(churn_row(
                    c, plugin, backend, spec, samples_at, have, flush,
                )?);
            }
        }
        if spec.sizes.contains(&size) {
            latency_row(c, plugin, spec, samples_at, have, report, progress)?;
            if let Some(backend) = memory_of {
                progress(&format!("{}: agent memory and idle CPU", plugin.name()));
                let (rss, cpu) = agent_usage(c.nodes[0].agent_pid().context("agent pid")?)?;
                report.memory.push((backend.into(), have, rss, cpu));
            }
        }
        if spec.conn_sizes.contains(&size) {
            progress(&format!(
                "{}: connections at {have} mappings",
                plugin.name()
            ));
            let (mapped_rate, mapped) = connection_load(&c.client, target, spec.conn_seconds)?;
            let (direct_rate, direct_times) =
                connection_load(&c.client, direct, spec.conn_seconds)?;
            report.connections.push(ConnRow {
                plugin: plugin.name(),
                mappings: have,
                mapped_rate,
                direct_rate,
                mapped_connect: percentiles(&mapped),
                direct_connect: percentiles(&direct_times),
            });
        }
    }
    Ok(have)
}

fn randport_backend(
    spec: &BenchSpec,
    backend: &str,
    report: &mut Report,
    progress: &mut dyn FnMut(&str),
) -> Result<()> {
    let plugin = Randport {
        backend: backend.into(),
    };
    progress(&format!("{}: building a node", plugin.name()));
    let cluster_spec = ClusterSpec {
        nodes: 1,
        firewall: backend.into(),
        port_range: "20000-29999".into(),
        repair_interval_ms: 1000,
        ..ClusterSpec::default()
    };
    let mut c = Cluster::up(cluster_spec, &mut |_| {})?;
    route_client_to_pods(&c)?;
    let pid = c.nodes[0].agent_pid().context("agent pid")?;
    let (rss, cpu) = agent_usage(pid)?;
    report.memory.push((backend.into(), 0, rss, cpu));

    // 100 concurrent ADDs first, on an empty node.
    progress(&format!(
        "{}: {} concurrent ADDs",
        plugin.name(),
        spec.concurrent
    ));
    let idx = Indexes::new(spec)?;
    let base = idx.concurrent;
    let times = std::thread::scope(|scope| -> Result<Vec<Duration>> {
        let handles: Vec<_> = (0..spec.concurrent)
            .map(|k| {
                scope.spawn({
                    let (c, plugin) = (&c, &plugin);
                    move || plugin.add(c, base + k)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .map_err(|_| anyhow::anyhow!("ADD thread panicked"))?
            })
            .collect()
    })?;
    let records = c.agent_records(0)?;
    let mut seen = std::collections::HashSet::new();
    let duplicates = records
        .iter()
        .flat_map(|r| &r.mappings)
        .filter(|m| !seen.insert((m.protocol, m.host_port)))
        .count();
    if records.len() != spec.concurrent {
        bail!(
            "{} concurrent ADDs left {} records",
            spec.concurrent,
            records.len()
        );
    }
    report
        .concurrent
        .push((plugin.name(), percentiles(&times), duplicates));
    for k in 0..spec.concurrent {
        plugin.del(&c, base + k)?;
    }

    if spec.sizes.contains(&0) {
        latency_row(&c, &plugin, spec, idx.samples, 0, report, progress)?;
    }
    // One real pod to connect to.
    let mut real = PodSpec::echo("bench", "target", 0);
    real.ports = vec![SimPort::new(8080, Protocol::Tcp)];
    c.add_pod(real)?;
    let target = mapped_addr(&c, "target")?;
    let direct = SocketAddr::new(c.pod("target")?.ips[0], 8080);

    let memory_of = Some(backend);
    let have = sweep(
        &c,
        &plugin,
        spec,
        idx.samples,
        usize::MAX,
        (target, direct),
        memory_of,
        report,
        progress,
    )?;
    progress(&format!(
        "{}: agent restart at {have} mappings",
        plugin.name()
    ));
    c.kill_agent(0);
    let restart = c.start_agent(0)?;
    report.restarts.push((backend.into(), have, restart));
    if c.tcp(Origin::Client, target)? != "target" {
        bail!("the mapping did not answer after the restart");
    }
    Ok(())
}

fn portmap(spec: &BenchSpec, report: &mut Report, progress: &mut dyn FnMut(&str)) -> Result<()> {
    if !Path::new(PORTMAP).is_file() {
        bail!(
            "{PORTMAP} not found: install Debian's containernetworking-plugins (just bench does)"
        );
    }
    let plugin = Portmap;
    progress(&format!("{}: building a node", plugin.name()));
    let mut c = Cluster::up(
        ClusterSpec {
            nodes: 1,
            firewall: "nftables".into(),
            repair_interval_ms: 1000,
            ..ClusterSpec::default()
        },
        &mut |_| {},
    )?;
    route_client_to_pods(&c)?;
    let samples_at = Indexes::new(spec)?.samples;
    if spec.sizes.contains(&0) {
        latency_row(&c, &plugin, spec, samples_at, 0, report, progress)?;
    }
    let mut real = PodSpec::echo("bench", "target", 0);
    real.ports = vec![SimPort::new(8080, Protocol::Tcp)];
    real.annotate = false;
    c.add_pod(real)?;
    let pod_ip = c.pod("target")?.ips[0];
    Portmap::run(&c, "ADD", "target", Portmap::conf(0, 29999, pod_ip))?;
    let target = SocketAddr::new(IpAddr::V4(c.nodes[0].ip4), 29999);
    let direct = SocketAddr::new(pod_ip, 8080);

    sweep(
        &c,
        &plugin,
        spec,
        samples_at,
        spec.portmap_max,
        (target, direct),
        None,
        report,
        progress,
    )?;
    Ok(())
}

/// Runs everything; `progress` is told what happens.
pub fn run(spec: &BenchSpec, progress: &mut dyn FnMut(&str)) -> Result<Report> {
    let mut report = Report::default();
    for backend in ["nftables", "iptables"] {
        randport_backend(spec, backend, &mut report, progress)?;
    }
    portmap(spec, &mut report, progress)?;
    Ok(report)
}

fn tool_version(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .unwrap_or_default()
                .trim()
                .to_owned()
        })
        .unwrap_or_else(|_| "not installed".into())
}

/// The machine and tool versions, for the report's header.
pub fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines().find_map(|l| {
                l.strip_prefix("model name")
                    .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
            })
        })
        .unwrap_or_default();
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let kernel = tool_version("uname", &["-r"]);
    format!(
        "{cores} vCPU ({cpu}), Linux {kernel}; {}; {}; portmap from Debian containernetworking-plugins 1.1.1",
        tool_version("nft", &["--version"]),
        tool_version("iptables", &["--version"])
    )
}

/// The report as markdown.
pub fn markdown(report: &Report, command: &str, spec: &BenchSpec) -> String {
    let mut out = String::new();
    let f = |p: &Percentiles| format!("{:.1} / {:.1} / {:.1}", p.p50, p.p90, p.p99);
    let _ = writeln!(out, "Command: `{command}`  ");
    let _ = writeln!(out, "Machine: {}  ", machine());
    let _ = writeln!(
        out,
        "Each ADD/DEL is the whole plugin exec as a runtime on the node does it, {} pairs per row; a light pod has one TCP port.\n",
        spec.samples
    );
    let _ = writeln!(out, "**CNI ADD and DEL latency, ms (p50 / p90 / p99)**\n");
    let _ = writeln!(
        out,
        "| plugin | existing mappings | ADD | DEL |\n| --- | ---: | ---: | ---: |"
    );
    for r in &report.latency {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} |",
            r.plugin,
            r.existing,
            f(&r.add),
            f(&r.del)
        );
    }
    let _ = writeln!(
        out,
        "\n**New TCP connections through a mapping vs. straight to the pod (same run, one client, {:.0} s each)**\n",
        spec.conn_seconds
    );
    let _ = writeln!(
        out,
        "| plugin | mappings | mapped conn/s | direct conn/s | ratio | connect() µs mapped p50 / p99 | direct p50 / p99 |\n| --- | ---: | ---: | ---: | ---: | ---: | ---: |"
    );
    for r in &report.connections {
        let _ = writeln!(
            out,
            "| {} | {} | {:.0} | {:.0} | {:.2} | {:.0} / {:.0} | {:.0} / {:.0} |",
            r.plugin,
            r.mappings,
            r.mapped_rate,
            r.direct_rate,
            r.mapped_rate / r.direct_rate,
            r.mapped_connect.p50 * 1000.0,
            r.mapped_connect.p99 * 1000.0,
            r.direct_connect.p50 * 1000.0,
            r.direct_connect.p99 * 1000.0
        );
    }
    let _ = writeln!(
        out,
        "\n**Agent memory (RSS), idle CPU (3 s from 2.5 s after the last request, watchdog every 1 s; the agent and the tools it runs) and restart**\n"
    );
    let _ = writeln!(
        out,
        "| backend | mappings | RSS MiB | idle CPU, % of a core |\n| --- | ---: | ---: | ---: |"
    );
    for (backend, n, mib, cpu) in &report.memory {
        let _ = writeln!(out, "| {backend} | {n} | {mib:.1} | {cpu:.1} |");
    }
    let _ = writeln!(
        out,
        "\n| backend | mappings | restart until ready, ms |\n| --- | ---: | ---: |"
    );
    for (backend, n, t) in &report.restarts {
        let _ = writeln!(out, "| {backend} | {n} | {:.0} |", t.as_secs_f64() * 1000.0);
    }
    let _ = writeln!(
        out,
        "\n**The agent under churn: one pod's ADD+DEL back to back for {:.0} s (nftables; CPU of the agent and the tools it runs)**\n",
        spec.churn_seconds
    );
    let _ = writeln!(
        out,
        "| backend | mappings | pairs/s | agent CPU, % of a core | after a flush half-way, the mapping answers again in |\n| --- | ---: | ---: | ---: | ---: |"
    );
    for r in &report.churn {
        let _ = writeln!(
            out,
            "| {} | {} | {:.1} | {:.1} | {} |",
            r.backend,
            r.mappings,
            r.pairs as f64 / r.seconds,
            r.cpu_percent,
            r.repair
                .map_or("-".to_owned(), |d| format!("{:.2} s", d.as_secs_f64()))
        );
    }
    let _ = writeln!(out, "\n**{} concurrent ADDs**\n", spec.concurrent);
    let _ = writeln!(
        out,
        "| plugin | p50 ms | p99 ms | max ms | host ports given twice |\n| --- | ---: | ---: | ---: | ---: |"
    );
    for (plugin, p, dups) in &report.concurrent {
        let _ = writeln!(
            out,
            "| {plugin} | {:.1} | {:.1} | {:.1} | {dups} |",
            p.p50, p.p99, p.max
        );
    }
    out
}

/// Writes the report to `path`.
pub fn write(path: &PathBuf, text: &str) -> Result<()> {
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_of_a_known_sample() {
        let samples: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        let p = percentiles(&samples);
        assert_eq!(
            (p.p50.round(), p.p90.round(), p.p99.round(), p.max),
            (51.0, 90.0, 99.0, 100.0)
        );
        assert_eq!(percentiles(&[]).p50, 0.0);
        assert_eq!(percentiles(&[Duration::from_millis(7)]).p99, 7.0);
    }

    #[test]
    fn idle_cpu_tells_a_busy_process_from_an_idle_one() {
        let me = std::process::id();
        let idle = idle_cpu_percent(me, Duration::from_millis(500)).unwrap();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let spinning = {
            let stop = std::sync::Arc::clone(&stop);
            std::thread::spawn(move || {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    std::hint::spin_loop();
                }
            })
        };
        let busy = idle_cpu_percent(me, Duration::from_millis(500)).unwrap();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        spinning.join().unwrap();
        assert!(idle < 20.0, "idle: {idle:.1} %");
        assert!(busy > 50.0, "busy: {busy:.1} %");
    }

    #[test]
    fn report_renders_every_section() {
        let p = percentiles(&[Duration::from_millis(2)]);
        let report = Report {
            latency: vec![LatencyRow {
                plugin: "randport (nftables)".into(),
                existing: 5000,
                add: p,
                del: p,
            }],
            connections: vec![ConnRow {
                plugin: "x".into(),
                mappings: 1,
                mapped_rate: 900.0,
                direct_rate: 1000.0,
                mapped_connect: p,
                direct_connect: p,
            }],
            memory: vec![("nftables".into(), 5000, 12.5, 0.3)],
            restarts: vec![("nftables".into(), 5000, Duration::from_millis(800))],
            concurrent: vec![("randport (nftables)".into(), p, 0)],
            churn: vec![ChurnRow {
                backend: "nftables".into(),
                mappings: 5000,
                pairs: 600,
                seconds: 60.0,
                cpu_percent: 9.5,
                repair: Some(Duration::from_millis(1250)),
            }],
        };
        let text = markdown(&report, "just bench", &BenchSpec::default());
        for needle in [
            "| randport (nftables) | 5000 | 2.0 / 2.0 / 2.0 | 2.0 / 2.0 / 2.0 |",
            "| x | 1 | 900 | 1000 | 0.90 |",
            "| nftables | 5000 | 12.5 | 0.3 |",
            "| nftables | 5000 | 800 |",
            "| randport (nftables) | 2.0 | 2.0 | 2.0 | 0 |",
            "| nftables | 5000 | 10.0 | 9.5 | 1.25 s |",
        ] {
            assert!(text.contains(needle), "{needle} missing from\n{text}");
        }
    }
}
