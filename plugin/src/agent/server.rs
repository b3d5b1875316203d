//! The agent's front doors: the unix socket the plugin talks to (root only: mode 0600
//! and the peer's uid checked), the metrics and health HTTP endpoint, and the watchdog
//! that re-applies our rules when someone flushes them.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
use randport_core::CniCode;

use crate::agent::rpc::{ErrorReply, MAX_REQUEST, Request, Response, RpcError, read_limited};
use crate::agent::{Agent, HealthLimits};

/// How long a client may take to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Binds the agent socket at `path` (replacing a stale one), mode 0600.
pub fn bind_socket(path: &Path) -> std::io::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

fn error(code: CniCode, details: String) -> Response {
    Response::Error(ErrorReply {
        code: code.code(),
        msg: code.msg().to_owned(),
        details,
    })
}

/// Reads one request from `stream`, answers it, closes. Peers other than `allowed_uid`
/// are refused.
pub fn serve_connection(agent: &Agent, mut stream: UnixStream, allowed_uid: u32) {
    let response = (|| {
        // The request is read (boundedly) before anything is answered, so that every
        // client reads its answer instead of a connection reset.
        let _ = stream.set_read_timeout(Some(REQUEST_TIMEOUT));
        let bytes = match read_limited(&mut stream, MAX_REQUEST) {
            Ok(bytes) => bytes,
            Err(RpcError::TooLong(n)) => {
                // Drain (boundedly) what the client still sends, so that it reads the
                // error instead of a connection reset.
                let limit = 16 * MAX_REQUEST as u64;
                let _ = std::io::copy(&mut (&stream).take(limit), &mut std::io::sink());
                return error(
                    CniCode::FailedToDecode,
                    format!("request longer than {n} bytes"),
                );
            }
            Err(e) => return error(CniCode::IoFailure, e.to_string()),
        };
        match getsockopt(&stream, PeerCredentials) {
            Ok(cred) if cred.uid() == allowed_uid => {}
            Ok(cred) => {
                return error(
                    CniCode::PermissionDenied,
                    format!(
                        "uid {} may not use randportd; only uid {allowed_uid} may",
                        cred.uid()
                    ),
                );
            }
            Err(e) => {
                return error(
                    CniCode::IoFailure,
                    format!("cannot read the peer's credentials: {e}"),
                );
            }
        }
        match serde_json::from_slice::<Request>(&bytes) {
            Ok(request) => agent.handle(request),
            Err(e) => error(CniCode::FailedToDecode, format!("malformed request: {e}")),
        }
    })();
    if let Ok(bytes) = serde_json::to_vec(&response) {
        let _ = stream.write_all(&bytes);
    }
}

/// Serves the socket until the process ends, a thread per connection (the socket is
/// root's only; a thread that cannot be made is an answer in line, not a panic).
pub fn serve(agent: Arc<Agent>, listener: UnixListener, allowed_uid: u32) {
    let mut backoff = AcceptBackoff::default();
    for stream in listener.incoming() {
        match stream {
            Ok(stream) => {
                backoff.reset();
                let shared = Arc::clone(&agent);
                let spawned = std::thread::Builder::new()
                    .name("randportd-rpc".into())
                    .spawn(move || serve_connection(&shared, stream, allowed_uid));
                if let Err(e) = spawned {
                    tracing::error!(error = %e, "cannot start a thread for a plugin's request");
                }
            }
            Err(e) => backoff.wait(&e, "the agent socket"),
        }
    }
}

/// A pause after a failed `accept` (out of descriptors, say), growing from 10 ms to 1 s,
/// so that a persistent failure neither spins a core nor floods the log.
#[derive(Debug, Default)]
struct AcceptBackoff {
    pause: Duration,
}

impl AcceptBackoff {
    const FIRST: Duration = Duration::from_millis(10);
    const MAX: Duration = Duration::from_secs(1);

    fn reset(&mut self) {
        self.pause = Duration::ZERO;
    }

    fn wait(&mut self, error: &std::io::Error, what: &str) {
        self.pause = (self.pause * 2).clamp(Self::FIRST, Self::MAX);
        tracing::warn!(error = %error, pause = ?self.pause, "accepting a connection on {what}");
        std::thread::sleep(self.pause);
    }
}

/// What `/healthz` checks besides [`Agent::health`].
#[derive(Debug, Clone, Default)]
pub struct HealthCheck {
    /// The agent's own socket: a STATUS request must be answered through it, as the plugin
    /// would send it (the accept loop and the request path work).
    pub socket: Option<PathBuf>,
    /// How long things may be broken.
    pub limits: HealthLimits,
}

impl HealthCheck {
    /// `Ok` when the agent can serve; else what is wrong.
    pub fn run(&self, agent: &Agent) -> Result<(), String> {
        agent.health(&self.limits)?;
        if let Some(socket) = &self.socket {
            match crate::agent::rpc::call(socket, &Request::Status, self.limits.lock) {
                Ok(Response::Ok { .. }) => {}
                Ok(Response::Error(e)) => {
                    return Err(format!("STATUS on {}: {e}", socket.display()));
                }
                Err(e) => return Err(format!("the agent's socket does not answer: {e}")),
            }
        }
        Ok(())
    }
}

/// Binds the metrics address: `IP:PORT`, `[IPv6]:PORT`, an IPv6 address without brackets
/// before its port (what `$(NODE_IP):9740` gives in a manifest), or
/// `HOST:PORT`.
pub fn metrics_listener(addr: &str) -> std::io::Result<TcpListener> {
    if let Ok(socket) = addr.parse::<std::net::SocketAddr>() {
        return TcpListener::bind(socket);
    }
    if let Some((ip, port)) = addr.rsplit_once(':')
        && let (Ok(ip), Ok(port)) = (ip.parse::<std::net::IpAddr>(), port.parse::<u16>())
    {
        return TcpListener::bind(std::net::SocketAddr::new(ip, port));
    }
    TcpListener::bind(addr)
}

/// The most a metrics or probe client may send before its request is answered: the
/// request line and headers (there is no body).
pub const MAX_HTTP_HEAD: usize = 8 * 1024;
/// How many metrics and probe connections are served at once; more are refused (closed at
/// once, counted). The kubelet's probes and a scraper need a few.
pub const MAX_HTTP_CONNECTIONS: usize = 16;
/// How long a client has to send its whole request head.
const HTTP_HEAD_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a request head could not be read.
#[derive(Debug, PartialEq, Eq)]
enum HeadError {
    /// Longer than [`MAX_HTTP_HEAD`].
    TooLarge,
    /// Not complete within [`HTTP_HEAD_TIMEOUT`].
    Timeout,
    /// The connection broke.
    Closed,
}

/// Reads a request head (up to the blank line) of at most `limit` bytes within `timeout`;
/// returns the request line. Never holds more than `limit` bytes.
fn read_head(
    stream: &mut std::net::TcpStream,
    limit: usize,
    deadline: Instant,
) -> Result<String, HeadError> {
    let mut head = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    loop {
        // Each read may wait only for what is left of the whole head's time.
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || stream.set_read_timeout(Some(left)).is_err() {
            return Err(HeadError::Timeout);
        }
        let n = match stream.read(&mut chunk) {
            Ok(0) => return Err(HeadError::Closed),
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Err(HeadError::Timeout);
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => return Err(HeadError::Closed),
        };
        head.extend_from_slice(&chunk[..n]);
        let find = |needle: &[u8]| head.windows(needle.len()).position(|w| w == needle);
        // HTTP/1.0 clients may end lines with a bare newline.
        if let Some(end) = find(b"\r\n\r\n").or_else(|| find(b"\n\n")) {
            if end > limit {
                return Err(HeadError::TooLarge);
            }
            let line = head[..end]
                .split(|b| *b == b'\n')
                .next()
                .unwrap_or_default();
            return Ok(String::from_utf8_lossy(line).trim_end().to_owned());
        }
        if head.len() > limit {
            return Err(HeadError::TooLarge);
        }
    }
}

/// Answers one metrics or probe request.
fn serve_http_connection(agent: &Agent, health: &HealthCheck, mut stream: std::net::TcpStream) {
    let deadline = Instant::now() + HTTP_HEAD_TIMEOUT;
    let _ = stream.set_write_timeout(Some(HTTP_HEAD_TIMEOUT));
    let line = match read_head(&mut stream, MAX_HTTP_HEAD, deadline) {
        Ok(line) => line,
        Err(HeadError::TooLarge) => {
            agent.metrics.count_http_refused("too_large");
            let body = format!("request line and headers are limited to {MAX_HTTP_HEAD} bytes\n");
            let _ = write!(
                stream,
                "HTTP/1.0 431 Request Header Fields Too Large\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            // Closing with unread input resets the connection, and the client may lose
            // the answer: read (and drop) a little more of what it sends, briefly.
            let _ = stream.shutdown(std::net::Shutdown::Write);
            let _ = stream.set_read_timeout(Some(Duration::from_millis(200)));
            let _ = std::io::copy(&mut (&stream).take(64 * 1024), &mut std::io::sink());
            return;
        }
        Err(HeadError::Timeout) => {
            agent.metrics.count_http_refused("timeout");
            return;
        }
        Err(HeadError::Closed) => return,
    };
    let path = line.split_whitespace().nth(1).unwrap_or("/");
    let content_type = if path == "/metrics" {
        crate::agent::metrics::CONTENT_TYPE
    } else {
        "text/plain; charset=utf-8"
    };
    let (status, body) = match path {
        "/metrics" => ("200 OK", agent.metrics.render(agent.gauges())),
        "/healthz" => match health.run(agent) {
            Ok(()) => ("200 OK", "ok\n".to_owned()),
            Err(why) => ("503 Service Unavailable", format!("{why}\n")),
        },
        "/readyz" if agent.is_ready() => ("200 OK", "ready\n".to_owned()),
        "/readyz" => ("503 Service Unavailable", "starting\n".to_owned()),
        _ => (
            "404 Not Found",
            "try /metrics, /healthz or /readyz\n".to_owned(),
        ),
    };
    let _ = write!(
        stream,
        "HTTP/1.0 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
}

/// Serves `/metrics`, `/healthz` (fails when the agent can no longer serve: see
/// [`HealthCheck`]) and `/readyz` (after the first restore and reconcile) over HTTP/1.0
/// until the process ends. Bounded: at most [`MAX_HTTP_CONNECTIONS`] at once (more are
/// closed at once), [`MAX_HTTP_HEAD`] bytes and 5 s per request head, accept errors
/// backed off; a thread that cannot be made drops that connection, nothing else.
pub fn serve_http(agent: Arc<Agent>, listener: TcpListener, health: HealthCheck) {
    let active = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut backoff = AcceptBackoff::default();
    for stream in listener.incoming() {
        let stream = match stream {
            Ok(stream) => {
                backoff.reset();
                stream
            }
            Err(e) => {
                backoff.wait(&e, "the metrics address");
                continue;
            }
        };
        use std::sync::atomic::Ordering::SeqCst;
        if active.fetch_add(1, SeqCst) >= MAX_HTTP_CONNECTIONS {
            active.fetch_sub(1, SeqCst);
            agent.metrics.count_http_refused("busy");
            drop(stream);
            continue;
        }
        let (shared, health, slot) = (Arc::clone(&agent), health.clone(), Arc::clone(&active));
        let spawned = std::thread::Builder::new()
            .name("randportd-http".into())
            .stack_size(256 * 1024)
            .spawn(move || {
                serve_http_connection(&shared, &health, stream);
                slot.fetch_sub(1, SeqCst);
            });
        if let Err(e) = spawned {
            active.fetch_sub(1, SeqCst);
            agent.metrics.count_http_refused("busy");
            tracing::error!(error = %e, "cannot start a thread for a metrics or probe request");
        }
    }
}

/// Checks our rules every `interval` and re-applies them when flushed.
pub fn watchdog(agent: Arc<Agent>, interval: Duration) {
    loop {
        std::thread::sleep(interval);
        match agent.repair() {
            Ok(true) => {
                tracing::warn!("our firewall rules were flushed by someone else; re-applied")
            }
            Ok(false) => {}
            Err(e) => tracing::error!(error = %e, "checking the firewall"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::{AgentConfig, Effects};
    use crate::firewall::FakeFirewall;
    use crate::kube::pods::FakePodSource;
    use crate::netfilter::conntrack::FakeConntrack;
    use crate::node::holder::FakeHolder;
    use crate::node::state::MemoryStateStore;

    fn agent() -> Agent {
        agent_with(Arc::new(FakeFirewall::default()))
    }

    fn agent_with(firewall: Arc<FakeFirewall>) -> Agent {
        let fx = Effects {
            firewall: Box::new(firewall),
            holder: Box::new(FakeHolder::default()),
            conntrack: Box::new(FakeConntrack::default()),
            state: Box::new(MemoryStateStore::default()),
            pods: Box::new(FakePodSource::default()),
        };
        let config = AgentConfig {
            node_name: "n".into(),
            port_range: randport_core::PortRange::DEFAULT,
            reserved: randport_core::ReservedPorts::none(),
            annotation_key: "k".into(),
            pod_wait: Duration::ZERO,
            add_deadline: crate::agent::rpc::DEFAULT_ADD_DEADLINE,
            host_ports: crate::agent::HostPorts::Auto,
            cni_conf_dir: None,
        };
        Agent::new(config, fx)
    }

    /// Sends `bytes` as a request over a socket pair and returns the parsed response.
    fn exchange(agent: &Agent, bytes: &[u8], allowed_uid: u32) -> Response {
        let (mut client, server) = UnixStream::pair().unwrap();
        let bytes = bytes.to_vec();
        let writer = std::thread::spawn(move || {
            let _ = client.write_all(&bytes);
            let _ = client.shutdown(std::net::Shutdown::Write);
            let mut out = Vec::new();
            client.read_to_end(&mut out).unwrap();
            out
        });
        serve_connection(agent, server, allowed_uid);
        serde_json::from_slice(&writer.join().unwrap()).unwrap()
    }

    fn code(response: Response) -> (u32, String) {
        match response {
            Response::Error(e) => (e.code, e.details),
            other => panic!("expected an error, got {other:?}"),
        }
    }

    #[test]
    fn answers_requests_from_the_allowed_uid() {
        let agent = agent();
        let me = nix::unistd::geteuid().as_raw();
        assert_eq!(
            exchange(&agent, br#"{"verb":"STATUS"}"#, me),
            Response::Ok {
                records: vec![],
                ready: false
            }
        );
    }

    #[test]
    fn refuses_other_peers() {
        let agent = agent();
        let other = nix::unistd::geteuid().as_raw() + 4242;
        let (code, details) = code(exchange(&agent, br#"{"verb":"STATUS"}"#, other));
        assert_eq!(code, 126);
        assert!(details.contains("may not use randportd"), "{details}");
    }

    #[test]
    fn garbage_and_oversized_requests_get_errors_not_panics() {
        let agent = agent();
        let me = nix::unistd::geteuid().as_raw();
        for garbage in [
            &b"{not json"[..],
            b"",
            b"\xff\xfe",
            br#"{"verb":"NOPE"}"#,
            br#"{"verb":"ADD","sandbox":1}"#,
        ] {
            let (code, details) = code(exchange(&agent, garbage, me));
            assert_eq!(code, 6, "{details}");
            assert!(details.starts_with("malformed request"), "{details}");
        }
        let huge = vec![b' '; MAX_REQUEST + 10];
        let (code, details) = code(exchange(&agent, &huge, me));
        assert_eq!(
            (code, details.as_str()),
            (6, "request longer than 1048576 bytes")
        );
    }

    #[test]
    fn socket_is_root_only() {
        let dir = std::env::temp_dir().join(format!(
            "randport-sock-{}-{}",
            std::process::id(),
            fastrand::u32(..)
        ));
        let path = dir.join("agent.sock");
        let _first = bind_socket(&path).unwrap();
        // A stale socket file is replaced.
        let _listener = bind_socket(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn http_serves_metrics_health_and_readiness() {
        let agent = Arc::new(agent());
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        {
            let agent = Arc::clone(&agent);
            std::thread::spawn(move || serve_http(agent, listener, HealthCheck::default()));
        }
        let get = |path: &str| {
            let mut stream = std::net::TcpStream::connect(addr).unwrap();
            write!(stream, "GET {path} HTTP/1.0\r\n\r\n").unwrap();
            let mut text = String::new();
            stream.read_to_string(&mut text).unwrap();
            text
        };
        assert!(get("/healthz").starts_with("HTTP/1.0 200 OK"));
        assert!(get("/readyz").starts_with("HTTP/1.0 503"));
        agent.start().unwrap();
        assert!(get("/readyz").starts_with("HTTP/1.0 200 OK"));
        let metrics = get("/metrics");
        assert!(
            metrics.contains("\r\n\r\n# HELP randport_mappings")
                && metrics.contains("randport_ready 1"),
            "{metrics}"
        );
        assert!(get("/nope").starts_with("HTTP/1.0 404"));
    }

    /// An agent serving HTTP on a loopback port; its address.
    fn http_agent() -> (Arc<Agent>, std::net::SocketAddr) {
        let agent = Arc::new(agent());
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let shared = Arc::clone(&agent);
        std::thread::spawn(move || serve_http(shared, listener, HealthCheck::default()));
        (agent, addr)
    }

    fn get(addr: std::net::SocketAddr, path: &str) -> String {
        let mut stream = std::net::TcpStream::connect(addr).unwrap();
        write!(stream, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").unwrap();
        let mut text = String::new();
        stream.read_to_string(&mut text).unwrap();
        text
    }

    #[test]
    fn metrics_addresses_bind_with_or_without_brackets() {
        for addr in ["127.0.0.1:0", "[::1]:0", "::1:0", "localhost:0"] {
            let listener = metrics_listener(addr).unwrap_or_else(|e| panic!("{addr}: {e}"));
            assert!(listener.local_addr().unwrap().ip().is_loopback(), "{addr}");
        }
        assert!(metrics_listener("192.0.2.1:notaport").is_err());
    }

    #[test]
    fn an_endless_request_line_is_cut_at_8_kib_and_answered_431() {
        let (agent, addr) = http_agent();
        let mut stream = std::net::TcpStream::connect(addr).unwrap();
        // 4 MiB without a newline: the agent stops reading at 8 KiB and answers.
        let junk = vec![b'A'; 64 * 1024];
        let mut sent = 0usize;
        while sent < 4 << 20 {
            match stream.write(&junk) {
                Ok(n) => sent += n,
                Err(_) => break,
            }
        }
        let mut text = String::new();
        let _ = stream.read_to_string(&mut text);
        assert!(sent < 4 << 20 || text.starts_with("HTTP/1.0 431"), "{text}");
        assert!(
            agent
                .metrics
                .render(agent.gauges())
                .contains(r#"randport_http_refused_total{reason="too_large"} 1"#)
        );
        // Headers over the limit too, even with their lines short.
        let mut stream = std::net::TcpStream::connect(addr).unwrap();
        let mut request = String::from("GET /metrics HTTP/1.0\r\n");
        for i in 0..1000 {
            request.push_str(&format!("X-{i}: yyyyyyyyyy\r\n"));
        }
        request.push_str("\r\n");
        // The agent may stop reading (and answer) before all of it is sent.
        let _ = stream.write_all(request.as_bytes());
        let mut text = String::new();
        let _ = stream.read_to_string(&mut text);
        assert!(text.starts_with("HTTP/1.0 431"), "{text}");
        // And the agent still answers.
        assert!(get(addr, "/healthz").starts_with("HTTP/1.0 200 OK"));
    }

    #[test]
    fn idle_connections_beyond_the_limit_are_refused_and_probes_come_back() {
        let (agent, addr) = http_agent();
        let idle: Vec<_> = (0..MAX_HTTP_CONNECTIONS)
            .map(|_| std::net::TcpStream::connect(addr).unwrap())
            .collect();
        // Every slot is taken by a client that sends nothing: the next one is closed at once.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let mut extra = std::net::TcpStream::connect(addr).unwrap();
            let _ = write!(extra, "GET /healthz HTTP/1.0\r\n\r\n");
            let mut text = String::new();
            let _ = extra.read_to_string(&mut text);
            if text.is_empty() {
                break;
            }
            // The accept loop had not seen all the idle ones yet.
            assert!(Instant::now() < deadline, "never refused: {text}");
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(
            agent
                .metrics
                .render(agent.gauges())
                .contains(r#"randport_http_refused_total{reason="busy"}"#)
        );
        // Their time runs out (5 s for a whole request head); then probes are served again.
        drop(idle);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !get(addr, "/healthz").starts_with("HTTP/1.0 200 OK") {
            assert!(Instant::now() < deadline, "probes never came back");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    #[test]
    fn a_client_that_stalls_is_dropped_after_its_time() {
        let (agent, addr) = http_agent();
        let mut stream = std::net::TcpStream::connect(addr).unwrap();
        write!(stream, "GET /metrics HTTP/1.0\r\n").unwrap();
        let started = Instant::now();
        let mut text = String::new();
        let _ = stream.read_to_string(&mut text);
        assert!(text.is_empty(), "{text}");
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_secs(4) && waited < Duration::from_secs(8),
            "{waited:?}"
        );
        assert!(
            agent
                .metrics
                .render(agent.gauges())
                .contains(r#"randport_http_refused_total{reason="timeout"} 1"#)
        );
    }

    #[test]
    fn healthz_fails_when_the_agent_can_no_longer_serve() {
        let firewall = Arc::new(FakeFirewall::default());
        let agent = Arc::new(agent_with(Arc::clone(&firewall)));
        agent.start().unwrap();
        let dir = std::env::temp_dir().join(format!("randport-health-{}", fastrand::u64(..)));
        let socket = dir.join("agent.sock");
        let listener = bind_socket(&socket).unwrap();
        {
            let agent = Arc::clone(&agent);
            let uid = nix::unistd::geteuid().as_raw();
            std::thread::spawn(move || serve(agent, listener, uid));
        }
        let check = HealthCheck {
            socket: Some(socket.clone()),
            limits: HealthLimits {
                lock: Duration::from_millis(200),
                repair: Duration::from_millis(300),
                pods: Duration::from_secs(60),
            },
        };
        assert_eq!(check.run(&agent), Ok(()));

        // A request stuck holding the agent's state.
        let stuck = {
            let agent = Arc::clone(&agent);
            std::thread::spawn(move || agent.hold_state_for(Duration::from_millis(800)))
        };
        std::thread::sleep(Duration::from_millis(50));
        let e = check.run(&agent).unwrap_err();
        assert!(e.contains("a request is stuck"), "{e}");
        stuck.join().unwrap();
        assert_eq!(check.run(&agent), Ok(()));

        // The watchdog cannot repair the rules: fine for a while, then unhealthy, and
        // healthy again once a repair works.
        firewall
            .present
            .lock()
            .unwrap()
            .insert(randport_core::SandboxId("stray".into()), 1);
        firewall
            .fail_replace
            .store(true, std::sync::atomic::Ordering::SeqCst);
        assert!(agent.repair().is_err());
        assert_eq!(check.run(&agent), Ok(()), "not for the first failure");
        std::thread::sleep(Duration::from_millis(350));
        assert!(agent.repair().is_err());
        let e = check.run(&agent).unwrap_err();
        assert!(
            e.contains("could not be checked or repaired") && e.contains("injected"),
            "{e}"
        );
        firewall
            .fail_replace
            .store(false, std::sync::atomic::Ordering::SeqCst);
        assert!(agent.repair().unwrap(), "the rules are repaired");
        assert_eq!(check.run(&agent), Ok(()));

        // Nobody answers on the socket.
        std::fs::remove_file(&socket).unwrap();
        let e = check.run(&agent).unwrap_err();
        assert!(e.contains("socket does not answer"), "{e}");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
