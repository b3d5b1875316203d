//! The workload in every simulated pod: on each TCP container port it greets a
//! connection with the pod's name and then echoes lines; on each UDP port it answers
//! every datagram with the pod's name. Sockets are made inside the pod's namespace and
//! served by one thread of the simulator per pod (poll over its sockets; a thread per
//! TCP connection); dropping the [`Workload`] shuts them down and that thread closes them.
//! A pod costs one thread and one descriptor per port, so thousands of pods fit.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use randport_core::Protocol;

use crate::netns::Netns;

/// A running workload; its sockets close when it is dropped.
#[derive(Debug)]
pub struct Workload {
    stop: Arc<AtomicBool>,
    sockets: Arc<Sockets>,
}

#[derive(Debug, Default)]
struct Sockets {
    tcp: Vec<TcpListener>,
    udp: Vec<UdpSocket>,
}

impl Drop for Workload {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wakes the thread polling these sockets (a shut-down socket polls as hung up).
        for fd in self
            .sockets
            .tcp
            .iter()
            .map(AsFd::as_fd)
            .chain(self.sockets.udp.iter().map(AsFd::as_fd))
        {
            let _ = nix::sys::socket::shutdown(
                std::os::fd::AsRawFd::as_raw_fd(&fd),
                nix::sys::socket::Shutdown::Both,
            );
        }
    }
}

/// Starts serving `ports` (container port, protocol) in `ns`, answering with `name`.
/// SCTP ports are not served (the standard library has no SCTP).
pub fn start(ns: &Netns, name: &str, ports: &[(u16, Protocol)]) -> Result<Workload> {
    // A port declared twice is served once.
    let mut wanted = ports.to_vec();
    wanted.sort();
    wanted.dedup();
    let sockets = ns
        .enter(move || -> std::io::Result<Sockets> {
            let mut sockets = Sockets::default();
            for (port, protocol) in wanted {
                match protocol {
                    // [::] is dual-stack: IPv4 clients arrive as mapped addresses.
                    Protocol::Tcp => sockets.tcp.push(TcpListener::bind(("::", port))?),
                    Protocol::Udp => sockets.udp.push(UdpSocket::bind(("::", port))?),
                    Protocol::Sctp => {}
                }
            }
            Ok(sockets)
        })?
        .with_context(|| format!("binding the workload's ports in {}", ns.name()))?;
    let workload = Workload {
        stop: Arc::new(AtomicBool::new(false)),
        sockets: Arc::new(sockets),
    };
    if workload.sockets.tcp.is_empty() && workload.sockets.udp.is_empty() {
        return Ok(workload);
    }
    let (name, stop, sockets) = (
        name.to_owned(),
        Arc::clone(&workload.stop),
        Arc::clone(&workload.sockets),
    );
    std::thread::Builder::new()
        .name(format!("pod {name}"))
        .stack_size(64 << 10)
        .spawn(move || serve(&name, &stop, &sockets))
        .context("starting the workload's thread")?;
    Ok(workload)
}

fn serve(name: &str, stop: &AtomicBool, sockets: &Sockets) {
    let mut buf = [0u8; 1500];
    while !stop.load(Ordering::SeqCst) {
        let mut fds: Vec<PollFd<'_>> = sockets
            .tcp
            .iter()
            .map(AsFd::as_fd)
            .chain(sockets.udp.iter().map(AsFd::as_fd))
            .map(|fd| PollFd::new(fd, PollFlags::POLLIN))
            .collect();
        if poll(&mut fds, PollTimeout::NONE).is_err() {
            continue;
        }
        let ready: Vec<bool> = fds
            .iter()
            .map(|fd| fd.revents().is_some_and(|r| !r.is_empty()))
            .collect();
        drop(fds);
        if stop.load(Ordering::SeqCst) {
            break;
        }
        let (tcp_ready, udp_ready) = ready.split_at(sockets.tcp.len());
        for (listener, _) in sockets.tcp.iter().zip(tcp_ready).filter(|(_, r)| **r) {
            if let Ok((stream, _)) = listener.accept() {
                let name = name.to_owned();
                let _ = std::thread::Builder::new()
                    .stack_size(64 << 10)
                    .spawn(move || echo(&name, stream));
            }
        }
        for (socket, _) in sockets.udp.iter().zip(udp_ready).filter(|(_, r)| **r) {
            if let Ok((_, from)) = socket.recv_from(&mut buf) {
                let _ = socket.send_to(name.as_bytes(), from);
            }
        }
    }
}

/// One TCP connection: the pod's name, then every line back.
fn echo(name: &str, stream: TcpStream) {
    let Ok(mut writer) = stream.try_clone() else {
        return;
    };
    if writeln!(writer, "{name}").is_err() {
        return;
    }
    for line in BufReader::new(stream).lines().map_while(Result::ok) {
        if writeln!(writer, "{line}").is_err() {
            break;
        }
    }
}
