//! The agent's metrics, in the Prometheus text format: active mappings, range use, ADD
//! and DEL counts and latency, failures by reason.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds of the latency histogram buckets, in seconds.
const BUCKETS: [f64; 10] = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0];

/// A latency histogram.
#[derive(Debug, Default)]
pub struct Histogram {
    counts: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    sum_micros: AtomicU64,
}

impl Histogram {
    /// Records one observation.
    pub fn observe(&self, elapsed: Duration) {
        let secs = elapsed.as_secs_f64();
        for (bound, count) in BUCKETS.iter().zip(&self.counts) {
            if secs <= *bound {
                count.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_micros.fetch_add(
            u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        for (bound, count) in BUCKETS.iter().zip(&self.counts) {
            let _ = writeln!(
                out,
                "{name}_bucket{{{labels}le=\"{bound}\"}} {}",
                count.load(Ordering::Relaxed)
            );
        }
        let count = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{{labels}le=\"+Inf\"}} {count}");
        let sum = self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum{{{}}} {sum}", labels.trim_end_matches(','));
        let _ = writeln!(
            out,
            "{name}_count{{{}}} {count}",
            labels.trim_end_matches(',')
        );
    }
}

/// Everything the agent counts.
#[derive(Debug, Default)]
pub struct Metrics {
    /// ADD latency.
    pub add_seconds: Histogram,
    /// DEL latency.
    pub del_seconds: Histogram,
    /// ADDs answered with success.
    pub adds: AtomicU64,
    /// DELs answered with success.
    pub dels: AtomicU64,
    /// Failures by reason.
    pub failures: Mutex<BTreeMap<&'static str, u64>>,
    /// Times the firewall was found flushed and re-applied.
    pub repairs: AtomicU64,
    /// Watchdog checks that listed our rules.
    pub checks: AtomicU64,
    /// Watchdog checks skipped because no rule of the node had changed since the last
    /// check that found ours in place.
    pub checks_skipped: AtomicU64,
    /// The firewall backend in use, and whether it is a fallback from nftables.
    pub backend: Mutex<Option<(&'static str, bool)>>,
}

/// Point-in-time values the agent supplies when rendering.
#[derive(Debug, Clone, Copy, Default)]
pub struct Gauges {
    /// Active mappings.
    pub mappings: usize,
    /// Sandboxes with mappings.
    pub sandboxes: usize,
    /// Ports of the range in use, per protocol (TCP, UDP, SCTP).
    pub range_used: [usize; 3],
    /// Ports in the range.
    pub range_size: usize,
    /// Whether the agent serves.
    pub ready: bool,
}

impl Metrics {
    /// Records the backend in use (`fallback`: nftables was asked for, the kernel refused).
    pub fn set_backend(&self, backend: &'static str, fallback: bool) {
        *self.backend.lock().unwrap_or_else(|e| e.into_inner()) = Some((backend, fallback));
    }

    /// Counts a failure.
    pub fn fail(&self, reason: &'static str) {
        *self
            .failures
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(reason)
            .or_default() += 1;
    }

    /// The Prometheus text exposition.
    pub fn render(&self, gauges: Gauges) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# HELP randport_mappings Active host port mappings.\n# TYPE randport_mappings gauge"
        );
        let _ = writeln!(out, "randport_mappings {}", gauges.mappings);
        let _ = writeln!(
            out,
            "# HELP randport_sandboxes Sandboxes with mappings.\n# TYPE randport_sandboxes gauge"
        );
        let _ = writeln!(out, "randport_sandboxes {}", gauges.sandboxes);
        let _ = writeln!(
            out,
            "# HELP randport_range_ports_used Ports of the range in use.\n# TYPE randport_range_ports_used gauge"
        );
        for (proto, used) in ["TCP", "UDP", "SCTP"].iter().zip(gauges.range_used) {
            let _ = writeln!(
                out,
                "randport_range_ports_used{{protocol=\"{proto}\"}} {used}"
            );
        }
        let _ = writeln!(
            out,
            "# HELP randport_range_ports Ports in the range.\n# TYPE randport_range_ports gauge"
        );
        let _ = writeln!(out, "randport_range_ports {}", gauges.range_size);
        let _ = writeln!(
            out,
            "# HELP randport_ready Whether the agent serves.\n# TYPE randport_ready gauge"
        );
        let _ = writeln!(out, "randport_ready {}", u8::from(gauges.ready));
        let _ = writeln!(
            out,
            "# HELP randport_cni_requests_total CNI requests answered with success.\n# TYPE randport_cni_requests_total counter"
        );
        let _ = writeln!(
            out,
            "randport_cni_requests_total{{verb=\"ADD\"}} {}",
            self.adds.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "randport_cni_requests_total{{verb=\"DEL\"}} {}",
            self.dels.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP randport_failures_total Failed requests by reason.\n# TYPE randport_failures_total counter"
        );
        for (reason, count) in self
            .failures
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            let _ = writeln!(
                out,
                "randport_failures_total{{reason=\"{reason}\"}} {count}"
            );
        }
        let _ = writeln!(
            out,
            "# HELP randport_firewall_repairs_total Times our rules were found flushed and re-applied.\n# TYPE randport_firewall_repairs_total counter"
        );
        let _ = writeln!(
            out,
            "randport_firewall_repairs_total {}",
            self.repairs.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP randport_firewall_checks_total Watchdog checks of our rules, by whether they listed the rules or were skipped (no rule of the node changed since the last good check).\n# TYPE randport_firewall_checks_total counter"
        );
        let _ = writeln!(
            out,
            "randport_firewall_checks_total{{result=\"listed\"}} {}\nrandport_firewall_checks_total{{result=\"skipped\"}} {}",
            self.checks.load(Ordering::Relaxed),
            self.checks_skipped.load(Ordering::Relaxed)
        );
        if let Some((backend, fallback)) = *self.backend.lock().unwrap_or_else(|e| e.into_inner()) {
            let _ = writeln!(
                out,
                "# HELP randport_firewall_backend The firewall backend in use; fallback=\"true\" when nftables was asked for and the kernel refused its ruleset.\n# TYPE randport_firewall_backend gauge\nrandport_firewall_backend{{backend=\"{backend}\",fallback=\"{fallback}\"}} 1"
            );
        }
        let _ = writeln!(
            out,
            "# HELP randport_cni_duration_seconds CNI request latency in the agent.\n# TYPE randport_cni_duration_seconds histogram"
        );
        self.add_seconds
            .render(&mut out, "randport_cni_duration_seconds", "verb=\"ADD\",");
        self.del_seconds
            .render(&mut out, "randport_cni_duration_seconds", "verb=\"DEL\",");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counts_and_histograms() {
        let m = Metrics::default();
        m.add_seconds.observe(Duration::from_millis(3));
        m.add_seconds.observe(Duration::from_millis(30));
        m.adds.fetch_add(2, Ordering::Relaxed);
        m.fail("ports_exhausted");
        m.set_backend("iptables-nft", true);
        let text = m.render(Gauges {
            mappings: 4,
            sandboxes: 2,
            range_used: [3, 1, 0],
            range_size: 10000,
            ready: true,
        });
        for line in [
            "randport_mappings 4",
            "randport_range_ports_used{protocol=\"TCP\"} 3",
            "randport_ready 1",
            "randport_cni_requests_total{verb=\"ADD\"} 2",
            "randport_failures_total{reason=\"ports_exhausted\"} 1",
            "randport_firewall_backend{backend=\"iptables-nft\",fallback=\"true\"} 1",
            "randport_cni_duration_seconds_bucket{verb=\"ADD\",le=\"0.001\"} 0",
            "randport_cni_duration_seconds_bucket{verb=\"ADD\",le=\"0.005\"} 1",
            "randport_cni_duration_seconds_bucket{verb=\"ADD\",le=\"+Inf\"} 2",
            "randport_cni_duration_seconds_count{verb=\"ADD\"} 2",
            "randport_cni_duration_seconds_sum{verb=\"ADD\"} 0.033",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
    }
}
