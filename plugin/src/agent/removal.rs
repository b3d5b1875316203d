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

/// Removes `record`'s rules, conntrack entries (`flush`, which returns what failed) and
/// record. `remaining` gives every other sandbox, for a rebuild when the removal cannot
/// be made as a small change. Returns every failure, in order; empty when all is gone.
pub fn remove_sandbox(
    firewall: &dyn Firewall,
    state: &dyn StateStore,
    record: &SandboxRecord,
    remaining: &dyn Fn() -> Vec<SandboxRecord>,
    flush: &mut dyn FnMut(&SandboxRecord) -> Vec<String>,
) -> Vec<String> {
    let mut errors = Vec::new();
    // A record of ports only another plugin maps has no rule of ours.
    if record.owned().next().is_some()
        && let Err(e) = firewall.remove_or_rebuild(record, remaining)
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
