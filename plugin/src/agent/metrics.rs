//! The agent's metrics, with the prometheus-client crate, in the OpenMetrics text format
//! (which Prometheus scrapes): mappings and ports in use and free, CNI requests and their
//! latency, failures by reason and CNI code, API retries, the watchdog's checks and repairs,
//! the firewall backend. [`METRICS`] lists every family with its help text; `docs` and the
//! README are checked against it by a test.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::time::Duration;

/// A metric's label set.
type Labels = Vec<(String, String)>;

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

/// Upper bounds of the latency histogram buckets, in seconds.
const BUCKETS: [f64; 10] = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0];

/// Every metric family the agent exposes: (name as scraped, type, labels, help without
/// its final period, which the encoder adds).
pub const METRICS: &[(&str, &str, &str, &str)] = &[
    (
        "randport_mappings",
        "gauge",
        "",
        "Host port mappings randport holds and maps",
    ),
    ("randport_sandboxes", "gauge", "", "Sandboxes with mappings"),
    (
        "randport_range_ports",
        "gauge",
        "range",
        "Ports in the random range",
    ),
    (
        "randport_range_ports_used",
        "gauge",
        "protocol, range",
        "Ports of the range in use",
    ),
    (
        "randport_range_ports_free",
        "gauge",
        "protocol, range",
        "Ports of the range still free",
    ),
    (
        "randport_ready",
        "gauge",
        "",
        "Whether the agent serves (restored and reconciled)",
    ),
    (
        "randport_cni_requests_total",
        "counter",
        "verb",
        "CNI requests answered with success",
    ),
    (
        "randport_cni_duration_seconds",
        "histogram",
        "verb",
        "CNI request latency in the agent",
    ),
    (
        "randport_failures_total",
        "counter",
        "reason, code",
        "Failed requests by reason and CNI error code",
    ),
    (
        "randport_api_retries_total",
        "counter",
        "call",
        "Kubernetes API calls retried after a conflict or a transient error: read (a pod), write (its annotation), event",
    ),
    (
        "randport_firewall_repairs_total",
        "counter",
        "",
        "Times our rules were found flushed and re-applied",
    ),
    (
        "randport_firewall_checks_total",
        "counter",
        "result",
        "Watchdog checks of our rules: listed, or skipped because no rule of the node changed since the last good check",
    ),
    (
        "randport_removals_failed_total",
        "counter",
        "",
        "Sandbox removals with a failed step: the record stays, marked removing, its ports held, until a retried DEL finishes",
    ),
    (
        "randport_state_records_corrupt_total",
        "counter",
        "",
        "State records that could not be read at start and were moved aside as *.corrupt",
    ),
    (
        "randport_http_refused_total",
        "counter",
        "reason",
        "Metrics and probe connections refused: busy (too many at once), too_large (request line or headers over 8 KiB), timeout",
    ),
    (
        "randport_firewall_backend",
        "gauge",
        "backend, fallback",
        "The firewall backend in use; fallback=\"true\" when nftables was asked for and the kernel refused its ruleset",
    ),
];

/// Everything the agent counts.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    mappings: Gauge,
    sandboxes: Gauge,
    range_ports: Family<Labels, Gauge>,
    range_used: Family<Labels, Gauge>,
    range_free: Family<Labels, Gauge>,
    ready: Gauge,
    requests: Family<Labels, Counter>,
    duration: Family<Labels, Histogram, fn() -> Histogram>,
    failures: Family<Labels, Counter>,
    api_retries: Family<Labels, Counter>,
    repairs: Counter,
    removals_failed: Counter,
    corrupt_records: Counter,
    http_refused: Family<Labels, Counter>,
    checks: Family<Labels, Counter>,
    backend: Family<Labels, Gauge>,
}

/// Point-in-time values the agent supplies when rendering.
#[derive(Debug, Clone, Default)]
pub struct Gauges {
    /// Active mappings.
    pub mappings: usize,
    /// Sandboxes with mappings.
    pub sandboxes: usize,
    /// Ports of the range in use, per protocol (TCP, UDP, SCTP).
    pub range_used: [usize; 3],
    /// Ports in the range.
    pub range_size: usize,
    /// The range, as configured (`20000-29999`).
    pub range: String,
    /// Whether the agent serves.
    pub ready: bool,
    /// Kubernetes API calls retried so far: reads, writes, events.
    pub api_retries: [u64; 3],
}

fn histogram() -> Histogram {
    Histogram::new(BUCKETS)
}

impl Default for Metrics {
    fn default() -> Self {
        let m = Metrics {
            registry: Registry::default(),
            mappings: Gauge::default(),
            sandboxes: Gauge::default(),
            range_ports: Family::default(),
            range_used: Family::default(),
            range_free: Family::default(),
            ready: Gauge::default(),
            requests: Family::default(),
            duration: Family::new_with_constructor(histogram),
            failures: Family::default(),
            api_retries: Family::default(),
            repairs: Counter::default(),
            removals_failed: Counter::default(),
            corrupt_records: Counter::default(),
            http_refused: Family::default(),
            checks: Family::default(),
            backend: Family::default(),
        };
        let mut registry = Registry::default();
        for (name, _, _, help) in METRICS {
            // Counters are registered without `_total`: the encoder appends it.
            let short = name.strip_suffix("_total").unwrap_or(name);
            let (name, help) = (short.to_owned(), (*help).to_owned());
            match short {
                "randport_mappings" => registry.register(name, help, m.mappings.clone()),
                "randport_sandboxes" => registry.register(name, help, m.sandboxes.clone()),
                "randport_range_ports" => registry.register(name, help, m.range_ports.clone()),
                "randport_range_ports_used" => registry.register(name, help, m.range_used.clone()),
                "randport_range_ports_free" => registry.register(name, help, m.range_free.clone()),
                "randport_ready" => registry.register(name, help, m.ready.clone()),
                "randport_cni_requests" => registry.register(name, help, m.requests.clone()),
                "randport_cni_duration_seconds" => {
                    registry.register(name, help, m.duration.clone())
                }
                "randport_failures" => registry.register(name, help, m.failures.clone()),
                "randport_api_retries" => registry.register(name, help, m.api_retries.clone()),
                "randport_firewall_repairs" => registry.register(name, help, m.repairs.clone()),
                "randport_firewall_checks" => registry.register(name, help, m.checks.clone()),
                "randport_removals_failed" => {
                    registry.register(name, help, m.removals_failed.clone())
                }
                "randport_state_records_corrupt" => {
                    registry.register(name, help, m.corrupt_records.clone())
                }
                "randport_http_refused" => registry.register(name, help, m.http_refused.clone()),
                "randport_firewall_backend" => registry.register(name, help, m.backend.clone()),
                other => unreachable!("metric {other} listed but not registered"),
            }
        }
        for reason in ["busy", "too_large", "timeout"] {
            m.http_refused
                .get_or_create(&labels(&[("reason", reason)]))
                .inc_by(0);
        }
        Metrics { registry, ..m }
    }
}

impl Metrics {
    /// A successful request of `verb` (ADD, DEL).
    pub fn count_request(&self, verb: &str) {
        self.requests
            .get_or_create(&labels(&[("verb", verb)]))
            .inc();
    }

    /// How long a request of `verb` took in the agent.
    pub fn observe(&self, verb: &str, elapsed: Duration) {
        self.duration
            .get_or_create(&labels(&[("verb", verb)]))
            .observe(elapsed.as_secs_f64());
    }

    /// A failed request: why, and the CNI error code it was answered with.
    pub fn fail(&self, reason: &str, code: u32) {
        self.failures
            .get_or_create(&labels(&[("reason", reason), ("code", &code.to_string())]))
            .inc();
    }

    /// A watchdog check: `listed` our rules, or skipped (nothing changed).
    pub fn count_check(&self, listed: bool) {
        let result = if listed { "listed" } else { "skipped" };
        self.checks
            .get_or_create(&labels(&[("result", result)]))
            .inc();
    }

    /// Watchdog checks so far: (listed, skipped).
    pub fn checks(&self) -> (u64, u64) {
        let get = |result: &str| {
            self.checks
                .get(&labels(&[("result", result)]))
                .map_or(0, |c| c.get())
        };
        (get("listed"), get("skipped"))
    }

    /// Our rules were found flushed and re-applied.
    pub fn count_repair(&self) {
        self.repairs.inc();
    }

    /// A removal that failed a step and waits for a retried DEL.
    pub fn count_removal_retry(&self) {
        self.removals_failed.inc();
    }

    /// State records moved aside at start.
    pub fn count_corrupt_records(&self, n: usize) {
        self.corrupt_records.inc_by(n as u64);
    }

    /// A metrics or probe connection refused, by `reason` (busy, too_large, timeout).
    pub fn count_http_refused(&self, reason: &str) {
        self.http_refused
            .get_or_create(&labels(&[("reason", reason)]))
            .inc();
    }

    /// Records the backend in use (`fallback`: nftables was asked for, the kernel refused).
    pub fn set_backend(&self, backend: &str, fallback: bool) {
        self.backend.clear();
        self.backend
            .get_or_create(&labels(&[
                ("backend", backend),
                ("fallback", if fallback { "true" } else { "false" }),
            ]))
            .set(1);
    }

    /// The OpenMetrics text exposition, with `gauges` as the current values.
    pub fn render(&self, gauges: Gauges) -> String {
        let as_i64 = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
        self.mappings.set(as_i64(gauges.mappings));
        self.sandboxes.set(as_i64(gauges.sandboxes));
        self.ready.set(i64::from(gauges.ready));
        let range = gauges.range.as_str();
        self.range_ports
            .get_or_create(&labels(&[("range", range)]))
            .set(as_i64(gauges.range_size));
        for (protocol, used) in ["TCP", "UDP", "SCTP"].iter().zip(gauges.range_used) {
            let key = labels(&[("protocol", protocol), ("range", range)]);
            self.range_used.get_or_create(&key).set(as_i64(used));
            self.range_free
                .get_or_create(&key)
                .set(as_i64(gauges.range_size.saturating_sub(used)));
        }
        for (call, total) in ["read", "write", "event"].iter().zip(gauges.api_retries) {
            let counter = self.api_retries.get_or_create(&labels(&[("call", call)]));
            counter.inc_by(total.saturating_sub(counter.get()));
        }
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String does not fail");
        out
    }
}

/// The HTTP Content-Type of [`Metrics::render`]'s text.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counts_and_histograms() {
        let m = Metrics::default();
        m.observe("ADD", Duration::from_millis(3));
        m.observe("ADD", Duration::from_millis(30));
        m.count_request("ADD");
        m.count_request("ADD");
        m.fail("ports_exhausted", 101);
        m.set_backend("iptables-nft", true);
        m.count_check(true);
        m.count_check(false);
        m.count_check(false);
        let text = m.render(Gauges {
            mappings: 4,
            sandboxes: 2,
            range_used: [3, 1, 0],
            range_size: 10000,
            range: "20000-29999".into(),
            ready: true,
            api_retries: [0, 5, 1],
        });
        for line in [
            "randport_mappings 4",
            "randport_range_ports_used{protocol=\"TCP\",range=\"20000-29999\"} 3",
            "randport_range_ports_free{protocol=\"UDP\",range=\"20000-29999\"} 9999",
            "randport_range_ports{range=\"20000-29999\"} 10000",
            "randport_ready 1",
            "randport_cni_requests_total{verb=\"ADD\"} 2",
            "randport_failures_total{reason=\"ports_exhausted\",code=\"101\"} 1",
            "randport_api_retries_total{call=\"write\"} 5",
            "randport_api_retries_total{call=\"event\"} 1",
            "randport_firewall_checks_total{result=\"listed\"} 1",
            "randport_firewall_checks_total{result=\"skipped\"} 2",
            "randport_firewall_backend{backend=\"iptables-nft\",fallback=\"true\"} 1",
            "randport_cni_duration_seconds_bucket{le=\"0.001\",verb=\"ADD\"} 0",
            "randport_cni_duration_seconds_bucket{le=\"0.005\",verb=\"ADD\"} 1",
            "randport_cni_duration_seconds_bucket{le=\"+Inf\",verb=\"ADD\"} 2",
            "randport_cni_duration_seconds_count{verb=\"ADD\"} 2",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
        assert_eq!(m.checks(), (1, 2));
        // A counter fed from a total only grows.
        let text = m.render(Gauges {
            api_retries: [0, 7, 1],
            ..Gauges::default()
        });
        assert!(
            text.contains("randport_api_retries_total{call=\"write\"} 7\n"),
            "{text}"
        );
        assert!(text.ends_with("# EOF\n"), "{text}");
    }

    #[test]
    fn every_listed_metric_is_exposed_with_its_help() {
        let m = Metrics::default();
        m.count_request("ADD");
        m.observe("ADD", Duration::from_millis(1));
        m.fail("x", 1);
        m.count_check(true);
        m.set_backend("nftables", false);
        let text = m.render(Gauges::default());
        for (name, kind, _, help) in METRICS {
            let family = name.strip_suffix("_total").unwrap_or(name);
            assert!(
                text.contains(&format!("# TYPE {family} {kind}\n")),
                "{family} {kind} missing:\n{text}"
            );
            // The encoder ends every help text with a period.
            assert!(
                text.contains(&format!("# HELP {family} {help}.\n")),
                "help of {family} missing:\n{text}"
            );
            assert!(
                text.lines().any(|l| l.starts_with(name)),
                "no sample of {name}:\n{text}"
            );
        }
    }
}
