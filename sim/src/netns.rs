//! Network namespaces the simulator and the tests make, and what is built in them, over
//! netlink in this process: no `ip` exec on the path that makes a pod.
//!
//! - Namespaces are made with `unshare(CLONE_NEWNET)` on a dedicated thread and held by a
//!   file descriptor ([`netns_rs::NetNs`]). The long-lived ones (underlay, client, nodes,
//!   tests' namespaces) are also bind-mounted under `/run/netns/<name>` so that `ip netns`,
//!   `nsenter` and `randport-sim down` find them; pods' namespaces are not
//!   ([`Netns::anonymous`]): every mount under `/run/netns` is copied into each new mount
//!   namespace and propagated to every peer, so thousands of them slow every later `ip netns
//!   exec` and mount (measured in the README), and a namespace held only by this process
//!   disappears with it, whatever way it ends.
//! - Links, addresses and routes go to the kernel as rtnetlink messages ([`rtnetlink`]) on a
//!   socket opened inside the namespace (one per namespace, made on a thread that entered
//!   it); sysctls are written under `/proc/sys` from such a thread.
//! - Namespaces are entered on dedicated threads only: `setns` switches one thread.
//!
//! The `ip` helpers ([`Netns::ip`], [`Netns::run`]) stay for tests and for the reference
//! path the benchmark compares with ([`crate::cluster::Wiring::IpCommands`]).

use std::io::Write as _;
use std::net::IpAddr;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;

use anyhow::{Context, Result, anyhow, bail};
use netns_rs::NetNs;
use rtnetlink::packet_route::address::AddressHeaderFlags;
use rtnetlink::packet_route::link::{InfoData, InfoKind, InfoVeth};
use rtnetlink::packet_route::route::{RouteProtocol, RouteScope};
use rtnetlink::{LinkMessageBuilder, LinkUnspec, RouteMessageBuilder};

/// Where named namespaces are bind-mounted (what `ip netns` uses).
pub const NETNS_DIR: &str = "/run/netns";

/// A network namespace we made; deleted when dropped.
pub struct Netns {
    name: String,
    /// Made with `ip netns add`: removed with `ip netns delete` (the reference path).
    by_ip: bool,
    ns: Option<NetNs>,
    /// Where it is bind-mounted, for named namespaces.
    mount: Option<PathBuf>,
    rtnl: OnceLock<rtnetlink::Handle>,
}

impl std::fmt::Debug for Netns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Netns")
            .field("name", &self.name)
            .field("path", &self.path())
            .finish()
    }
}

fn check(what: &str, out: Output) -> Result<String> {
    if !out.status.success() {
        bail!(
            "{what} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The runtime the rtnetlink connections run on (one worker; the callers block on it).
fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("randport-sim-netlink")
            .enable_io()
            .build()
            .expect("starting the netlink runtime")
    })
}

/// A new namespace, made on a thread of its own, held by a descriptor only.
fn unshare_on_a_thread() -> Result<NetNs> {
    std::thread::spawn(|| -> Result<NetNs> {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
            .context("unshare(CLONE_NEWNET) (are you root?)")?;
        Ok(netns_rs::get_from_current_thread()?)
    })
    .join()
    .map_err(|_| anyhow!("the thread making a namespace panicked"))?
}

impl Netns {
    /// Creates the namespace `name` (which should carry the `rp-` prefix and a run id),
    /// bind-mounted under `/run/netns` so that `ip netns` and `randport-sim down` see it.
    pub fn create(name: &str) -> Result<Netns> {
        let ns = NetNs::new(name).with_context(|| format!("creating namespace {name}"))?;
        Ok(Netns {
            name: name.to_owned(),
            by_ip: false,
            ns: Some(ns),
            mount: Some(Path::new(NETNS_DIR).join(name)),
            rtnl: OnceLock::new(),
        })
    }

    /// Creates a namespace held only by this process (no mount): it goes when dropped or
    /// when the process ends. `name` is a label for messages.
    pub fn anonymous(name: &str) -> Result<Netns> {
        let ns = unshare_on_a_thread().with_context(|| format!("creating namespace {name}"))?;
        Ok(Netns {
            name: name.to_owned(),
            by_ip: false,
            ns: Some(ns),
            mount: None,
            rtnl: OnceLock::new(),
        })
    }

    /// Creates the namespace `name` with `ip netns add`, as the simulator did before it
    /// used netlink (the reference the benchmark compares with).
    pub fn create_with_ip(name: &str) -> Result<Netns> {
        let out = Command::new("ip")
            .args(["netns", "add", name])
            .output()
            .context("running ip (is iproute2 installed?)")?;
        check(&format!("ip netns add {name}"), out)?;
        let mount = Path::new(NETNS_DIR).join(name);
        let ns = netns_rs::get_from_path(&mount)?;
        Ok(Netns {
            name: name.to_owned(),
            by_ip: true,
            ns: Some(ns),
            mount: Some(mount),
            rtnl: OnceLock::new(),
        })
    }

    /// Closes this namespace's netlink socket (pods keep no socket once wired).
    pub fn close_netlink(&mut self) {
        self.rtnl.take();
    }

    fn netns(&self) -> &NetNs {
        self.ns.as_ref().expect("a namespace is held until dropped")
    }

    /// The namespace's name (a label only, for anonymous namespaces).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The namespace's kernel identity (the inode of its nsfs file).
    pub fn inode(&self) -> Result<u64> {
        use std::os::unix::fs::MetadataExt as _;
        Ok(self.netns().file().metadata()?.ino())
    }

    /// A path that opens the namespace, for `setns`, `nsenter --net=` and `CNI_NETNS`:
    /// its mount, or this process's descriptor for an anonymous one.
    pub fn path(&self) -> String {
        match &self.mount {
            Some(mount) => mount.display().to_string(),
            None => format!(
                "/proc/{}/fd/{}",
                std::process::id(),
                self.netns().file().as_raw_fd()
            ),
        }
    }

    /// Runs `program args…` inside the namespace with `stdin` as input.
    pub fn run(&self, program: &str, args: &[&str], stdin: &str) -> Result<Output> {
        let mut child = Command::new("nsenter")
            .arg(format!("--net={}", self.path()))
            .arg(program)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {program} in {}", self.name))?;
        if let Some(mut input) = child.stdin.take() {
            input.write_all(stdin.as_bytes())?;
        }
        Ok(child.wait_with_output()?)
    }

    /// Like [`Netns::run`]; the stdout, or an error with the command's stderr.
    pub fn run_ok(&self, program: &str, args: &[&str], stdin: &str) -> Result<String> {
        let what = format!("{program} {} in {}", args.join(" "), self.name);
        check(&what, self.run(program, args, stdin)?)
    }

    /// Runs `f` on a new thread that entered this namespace; sockets made there stay in
    /// the namespace after the thread ends.
    pub fn enter<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
        let file = self
            .netns()
            .file()
            .try_clone()
            .context("duplicating a namespace descriptor")?;
        std::thread::spawn(move || -> Result<T> {
            nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
                .context("entering a namespace")?;
            drop(file);
            Ok(f())
        })
        .join()
        .map_err(|_| anyhow!("thread in {} panicked", self.name))?
        .with_context(|| format!("in namespace {}", self.name))
    }

    /// `ip args…` in the namespace (tests, and the reference path).
    pub fn ip(&self, args: &[&str]) -> Result<()> {
        self.run_ok("ip", args, "").map(drop)
    }

    /// This namespace's rtnetlink handle (a socket opened inside it, made on first use).
    fn rtnl(&self) -> Result<&rtnetlink::Handle> {
        if let Some(handle) = self.rtnl.get() {
            return Ok(handle);
        }
        let (connection, handle) = self
            .enter(|| {
                let _runtime = runtime().enter();
                rtnetlink::new_connection().map(|(connection, handle, _)| (connection, handle))
            })?
            .with_context(|| format!("opening a netlink socket in {}", self.name))?;
        runtime().spawn(connection);
        Ok(self.rtnl.get_or_init(|| handle))
    }

    fn netlink<T>(
        &self,
        what: impl FnOnce() -> String,
        request: impl Future<Output = Result<T, rtnetlink::Error>>,
    ) -> Result<T> {
        runtime()
            .block_on(request)
            .map_err(|e| anyhow!("{} in {}: {e}", what(), self.name))
    }

    /// Sets link `index` up.
    pub fn link_up(&self, index: u32) -> Result<()> {
        let handle = self.rtnl()?;
        let message = LinkUnspec::new_with_index(index).up().build();
        self.netlink(
            || format!("setting link {index} up"),
            handle.link().set(message).execute(),
        )
    }

    /// Brings loopback up.
    pub fn lo_up(&self) -> Result<()> {
        self.link_up(1)
    }

    /// A veth pair, both ends up: `local` (name, index) here and `peer` (name, index) in
    /// `peer_ns`. Choosing the indexes spares asking the kernel for them afterwards.
    /// Two messages: the pair (this end up), then the peer up from its namespace.
    pub fn veth(&self, local: (&str, u32), peer_ns: &Netns, peer: (&str, u32)) -> Result<()> {
        let handle = self.rtnl()?;
        let peer_message = LinkMessageBuilder::<LinkUnspec>::default()
            .name(peer.0)
            .index(peer.1)
            .setns_by_fd(peer_ns.netns().file().as_raw_fd())
            .build();
        let message = LinkMessageBuilder::<LinkUnspec>::new_with_info_kind(InfoKind::Veth)
            .name(local.0)
            .index(local.1)
            .up()
            .set_info_data(InfoData::Veth(InfoVeth::Peer(peer_message)))
            .build();
        self.netlink(
            || {
                format!(
                    "adding veth {} (peer {} in {})",
                    local.0, peer.0, peer_ns.name
                )
            },
            handle.link().add(message).execute(),
        )?;
        // The peer cannot be created up: it has no peer yet when the kernel opens it.
        peer_ns.link_up(peer.1)
    }

    /// A bridge `name` with `index`, up.
    pub fn bridge(&self, name: &str, index: u32) -> Result<()> {
        let handle = self.rtnl()?;
        let message = LinkMessageBuilder::<LinkUnspec>::new_with_info_kind(InfoKind::Bridge)
            .name(name)
            .index(index)
            .up()
            .build();
        self.netlink(
            || format!("adding bridge {name}"),
            handle.link().add(message).execute(),
        )
    }

    /// Puts link `index` into the bridge `bridge`.
    pub fn enslave(&self, index: u32, bridge: u32) -> Result<()> {
        let handle = self.rtnl()?;
        let message = LinkUnspec::new_with_index(index).controller(bridge).build();
        self.netlink(
            || format!("putting link {index} into bridge {bridge}"),
            handle.link().set(message).execute(),
        )
    }

    /// Adds `ip/prefix` to link `index` (IPv6 without duplicate address detection, as
    /// `ip addr add … nodad`).
    pub fn addr(&self, index: u32, ip: IpAddr, prefix: u8) -> Result<()> {
        let handle = self.rtnl()?;
        let mut request = handle.address().add(index, ip, prefix);
        if ip.is_ipv6() {
            request.message_mut().header.flags = AddressHeaderFlags::Nodad;
        }
        self.netlink(
            || format!("adding {ip}/{prefix} to link {index}"),
            request.execute(),
        )
    }

    /// A route to `dst/prefix` through link `index`, via `gateway` or on the link (what
    /// `ip route add` makes: protocol `boot`, scope `link` for an IPv4 route on the link).
    pub fn route(
        &self,
        dst: IpAddr,
        prefix: u8,
        index: u32,
        gateway: Option<IpAddr>,
    ) -> Result<()> {
        let handle = self.rtnl()?;
        let message = match (dst, gateway) {
            (IpAddr::V4(dst), None) => RouteMessageBuilder::<std::net::Ipv4Addr>::new()
                .destination_prefix(dst, prefix)
                .output_interface(index)
                .scope(RouteScope::Link)
                .build(),
            (IpAddr::V4(dst), Some(IpAddr::V4(gw))) => {
                RouteMessageBuilder::<std::net::Ipv4Addr>::new()
                    .destination_prefix(dst, prefix)
                    .output_interface(index)
                    .gateway(gw)
                    .build()
            }
            (IpAddr::V6(dst), None) => RouteMessageBuilder::<std::net::Ipv6Addr>::new()
                .destination_prefix(dst, prefix)
                .output_interface(index)
                .build(),
            (IpAddr::V6(dst), Some(IpAddr::V6(gw))) => {
                RouteMessageBuilder::<std::net::Ipv6Addr>::new()
                    .destination_prefix(dst, prefix)
                    .output_interface(index)
                    .gateway(gw)
                    .build()
            }
            (dst, Some(gw)) => bail!("route to {dst} via {gw}: the families differ"),
        };
        let mut message = message;
        message.header.protocol = RouteProtocol::Boot;
        self.netlink(
            || match gateway {
                Some(gw) => format!("adding route {dst}/{prefix} via {gw} (link {index})"),
                None => format!("adding route {dst}/{prefix} on link {index}"),
            },
            handle.route().add(message).execute(),
        )
    }

    /// Sets sysctls (`net.ipv4.ip_forward` …) inside the namespace, by writing under
    /// `/proc/sys` from a thread in it (what `sysctl -w` does, without the exec).
    pub fn sysctls(&self, settings: &[(&str, &str)]) -> Result<()> {
        let settings: Vec<(String, String)> = settings
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        self.enter(move || -> Result<()> {
            for (key, value) in settings {
                let path = format!("/proc/sys/{}", key.replace('.', "/"));
                std::fs::write(&path, &value).with_context(|| format!("setting {key}={value}"))?;
            }
            Ok(())
        })?
    }

    /// Sets one sysctl inside the namespace.
    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        self.sysctls(&[(key, value)])
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // The descriptor first: with the mount gone too, nothing holds the namespace.
        drop(self.ns.take());
        if self.by_ip {
            let _ = Command::new("ip")
                .args(["netns", "delete", &self.name])
                .stderr(Stdio::null())
                .status();
        } else if let Some(mount) = &self.mount {
            let _ = nix::mount::umount2(mount, nix::mount::MntFlags::MNT_DETACH);
            let _ = std::fs::remove_file(mount);
        }
    }
}

/// Every bind-mounted namespace whose name starts with `prefix`.
pub fn list_with_prefix(prefix: &str) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(NETNS_DIR) else {
        return vec![];
    };
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with(prefix))
        .collect();
    names.sort();
    names
}

/// Removes the bind-mounted namespace `name` (what `ip netns delete` does).
pub fn delete_named(name: &str) -> Result<()> {
    let mount = Path::new(NETNS_DIR).join(name);
    nix::mount::umount2(&mount, nix::mount::MntFlags::MNT_DETACH)
        .with_context(|| format!("unmounting {}", mount.display()))?;
    std::fs::remove_file(&mount).with_context(|| format!("removing {}", mount.display()))
}
