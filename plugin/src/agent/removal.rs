//! The one removal of a sandbox's kernel state and record, for the agent's DEL, GC,
//! reconciliation and undone ADDs, and for the plugin's DEL without the agent: its rules
//! first (one transaction, or a rebuild without it), then its UDP/SCTP conntrack entries,
//! then its record. A step that fails does not stop the steps that may still run, and
//! every failure is reported; the record is deleted only when everything before it
//! succeeded, so that a retried DEL finds it and tries again (nothing is forgotten while a
//! rule of it may still be in the kernel).

use randport_core::SandboxRecord;

use crate::firewall::Firewall;
use crate::node::state::StateStore;

/// What a removal needs to know of the other sandboxes.
pub struct Others<'a> {
    /// Every other sandbox whose rules stay, for a rebuild when the removal cannot be
    /// made as a small change (made only then: it copies every record).
    pub all: &'a dyn Fn() -> Vec<SandboxRecord>,
    /// The pod addresses of `record` that another sandbox whose rules stay also sends
    /// traffic to (a stale record beside the pod's new sandbox).
    pub sharing: &'a dyn Fn(&SandboxRecord) -> Vec<std::net::IpAddr>,
}

/// The pod addresses of `record` that one of `others` (whose rules stay) also sends
/// traffic to.
pub fn shared_addresses<'r>(
    record: &SandboxRecord,
    others: impl IntoIterator<Item = &'r SandboxRecord>,
) -> Vec<std::net::IpAddr> {
    let mine: Vec<std::net::IpAddr> = record
        .owned()
        .flat_map(|m| m.targets(&record.pod_ips))
        .copied()
        .collect();
    let mut shared: Vec<std::net::IpAddr> = others
        .into_iter()
        .filter(|o| o.sandbox != record.sandbox)
        .flat_map(|o| {
            o.owned()
                .flat_map(|m| m.targets(&o.pod_ips))
                .copied()
                .collect::<Vec<_>>()
        })
        .filter(|ip| mine.contains(ip))
        .collect();
    shared.sort();
    shared.dedup();
    shared
}

/// Removes `record`'s rules, conntrack entries (`flush`, which returns what failed) and
/// record. `others` tells what the other sandboxes need kept. Returns every failure, in
/// order; empty when all is gone.
pub fn remove_sandbox(
    firewall: &dyn Firewall,
    state: &dyn StateStore,
    record: &SandboxRecord,
    others: &Others<'_>,
    flush: &mut dyn FnMut(&SandboxRecord) -> Vec<String>,
) -> Vec<String> {
    let mut errors = Vec::new();
    // A record of ports only another plugin maps has no rule of ours.
    if record.owned().next().is_some()
        && let Err(e) = firewall.remove_keeping(record, &(others.sharing)(record), others.all)
    {
        // The rules may still be there: flushing now would let the next packet build a
        // new entry through them, and the record must stay for the retry.
        errors.push(e.to_string());
        return errors;
    }
    // Stale UDP/SCTP flows would otherwise still go to the pod's old address.
    errors.extend(flush(record));
    if errors.is_empty()
        && let Err(e) = state.delete(&record.sandbox)
    {
        errors.push(e.to_string());
    }
    errors
}
