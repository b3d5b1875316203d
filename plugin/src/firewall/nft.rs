//! The nftables backend: table `inet <name>`. Whole loads go through `nft -f` (the
//! [`Tool`]); a sandbox's elements and the watchdog's reading of the table go to the
//! kernel over netlink (the [`NftKernel`]). Both seams have fakes for the unit tests below.

use randport_core::SandboxRecord;
use randport_core::render::nft;

use super::tool::{SYSTEM, Tool, ToolError};
use super::{Firewall, FirewallError};
use crate::netlink::{ShapeRead, TableShape};
use crate::nft_elements::{self, BatchError, Op};

/// What the nftables backend asks of the kernel directly, over netlink.
pub trait NftKernel: Send + Sync + std::fmt::Debug {
    /// Adds or removes elements in one batch.
    fn apply_elements(&self, table: &str, ops: &[(Op, &nft::SetElement)])
    -> Result<(), BatchError>;
    /// The chains, sets and rules of `inet <table>`.
    fn shape(&self, table: &str) -> std::io::Result<ShapeRead>;
    /// The ruleset generation.
    fn generation(&self) -> Option<u32>;
}

/// The kernel of the calling thread's network namespace.
#[derive(Debug, Clone, Copy, Default)]
pub struct NetlinkKernel;

/// The one [`NetlinkKernel`].
pub static NETLINK: NetlinkKernel = NetlinkKernel;

impl NftKernel for NetlinkKernel {
    fn apply_elements(
        &self,
        table: &str,
        ops: &[(Op, &nft::SetElement)],
    ) -> Result<(), BatchError> {
        nft_elements::apply(table, ops)
    }

    fn shape(&self, table: &str) -> std::io::Result<ShapeRead> {
        crate::netlink::nft_table_shape(table)
    }

    fn generation(&self) -> Option<u32> {
        crate::netlink::ruleset_generation().ok()
    }
}

/// nftables: table `inet <name>`.
#[derive(Debug, Clone)]
pub struct NftFirewall {
    table: String,
    options: nft::NftOptions,
    tool: &'static dyn Tool,
    kernel: &'static dyn NftKernel,
    /// The table's shape (chains, sets, rules; no elements) as read right after this
    /// backend last loaded it whole: what the watchdog compares with.
    loaded: std::sync::Arc<std::sync::Mutex<Option<TableShape>>>,
}

impl NftFirewall {
    /// The backend for table `table`.
    pub fn new(table: &str) -> Self {
        NftFirewall::with_options(table, nft::NftOptions::default())
    }

    /// The backend for table `table`, with `options` (localhost access).
    pub fn with_options(table: &str, options: nft::NftOptions) -> Self {
        NftFirewall::with_parts(table, options, &SYSTEM, &NETLINK)
    }

    /// The backend with its programs run by `tool` and its netlink requests answered by
    /// `kernel` (fakes, in tests).
    pub fn with_parts(
        table: &str,
        options: nft::NftOptions,
        tool: &'static dyn Tool,
        kernel: &'static dyn NftKernel,
    ) -> Self {
        NftFirewall {
            table: table.to_owned(),
            options,
            tool,
            kernel,
            loaded: std::sync::Arc::default(),
        }
    }

    fn apply(&self, what: impl Into<String>, text: &str) -> Result<(), FirewallError> {
        if text.is_empty() {
            return Ok(());
        }
        self.tool
            .run("nft", &["-f", "-"], text)
            .map(drop)
            .map_err(|e| self.err(what, e.to_string()))
    }

    fn err(&self, what: impl Into<String>, reason: String) -> FirewallError {
        FirewallError {
            backend: "nftables",
            what: what.into(),
            reason,
        }
    }

    fn loaded(&self) -> std::sync::MutexGuard<'_, Option<TableShape>> {
        self.loaded.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The table's shape now; None when every one of five readings was interrupted by
    /// a change (each is three small dumps, so pods coming and going rarely spoil more
    /// than one).
    fn shape(&self) -> Result<Option<TableShape>, FirewallError> {
        for _ in 0..5 {
            match self.kernel.shape(&self.table) {
                Ok(ShapeRead::Shape(shape)) => return Ok(Some(shape)),
                Ok(ShapeRead::Interrupted) => continue,
                Err(e) => {
                    return Err(self.err(
                        format!(
                            "reading the chains, sets and rules of table inet {}",
                            self.table
                        ),
                        e.to_string(),
                    ));
                }
            }
        }
        Ok(None)
    }

    /// The table's shape now if it has every chain, set and rule of ours: someone may
    /// have flushed or changed it between our load and this reading, and a reference
    /// taken then would make the damage look normal.
    fn whole_shape(&self) -> Option<TableShape> {
        let shape = self.shape().ok().flatten()?;
        (shape.counts() == nft::object_counts(self.options)).then_some(shape)
    }

    /// The intact check by a terse listing, compared with the rendered rules as text:
    /// used until this backend has loaded the table itself (an agent that found its table
    /// in place at start).
    fn intact_by_listing(&self) -> Result<bool, FirewallError> {
        // A terse listing prints no set contents, but nft still reads every element and
        // lists again while the ruleset changes: fine once, not under churn.
        let text = match self
            .tool
            .run("nft", &["-t", "list", "table", "inet", &self.table], "")
        {
            Ok(text) => text,
            Err(ToolError::NoSuchTable { .. }) => return Ok(false),
            Err(e) => {
                return Err(self.err(format!("listing table inet {}", self.table), e.to_string()));
            }
        };
        // Every rule of our chains but the guard's, whose counter a listing prints with its
        // values; nft lists a rule without the `meta nfproto` its chain's family implies.
        let rules = nft::chains(self.options)
            .into_iter()
            .flat_map(|c| c.rules.iter())
            .filter(|r| !r.contains(" counter "))
            .map(|r| {
                r.replace("meta nfproto ipv4 ", "")
                    .replace("meta nfproto ipv6 ", "")
            });
        if self.options.localhost && !text.contains("chain localhost_guard") {
            return Ok(false);
        }
        Ok(nft::SETS
            .iter()
            .all(|(name, kind, _)| text.contains(&format!("{kind} {name}")))
            && rules.into_iter().all(|r| text.contains(&r)))
    }

    fn listing(&self) -> Result<Option<String>, FirewallError> {
        match self
            .tool
            .run("nft", &["list", "table", "inet", &self.table], "")
        {
            Ok(text) => Ok(Some(text)),
            Err(ToolError::NoSuchTable { .. }) => Ok(None),
            Err(e) => Err(self.err(format!("listing table inet {}", self.table), e.to_string())),
        }
    }
}

impl Firewall for NftFirewall {
    fn name(&self) -> &'static str {
        "nftables"
    }

    fn replace_all(&self, records: &[SandboxRecord]) -> Result<(), FirewallError> {
        *self.loaded() = None;
        self.apply(
            format!(
                "rebuilding table inet {} ({} sandboxes)",
                self.table,
                records.len()
            ),
            &nft::ruleset_with(&self.table, records, self.options),
        )?;
        // What we loaded, as the kernel describes it: the watchdog's reference. (If it
        // cannot be read now, the next check lists the table instead.)
        *self.loaded() = self.whole_shape();
        Ok(())
    }

    fn add(&self, record: &SandboxRecord) -> Result<(), FirewallError> {
        self.add_many(std::slice::from_ref(record))
    }

    fn add_many(&self, records: &[SandboxRecord]) -> Result<(), FirewallError> {
        let elements: Vec<nft::SetElement> = records.iter().flat_map(nft::elements).collect();
        let ops: Vec<(Op, &nft::SetElement)> = elements.iter().map(|e| (Op::Add, e)).collect();
        self.kernel.apply_elements(&self.table, &ops).map_err(|e| {
            let what = match records {
                [one] => format!("adding mappings of pod {}", one.pod),
                _ => format!("adding the mappings of {} pods", records.len()),
            };
            self.err(what, e.to_string())
        })
    }

    fn remove(
        &self,
        record: &SandboxRecord,
        remaining: &[SandboxRecord],
    ) -> Result<(), FirewallError> {
        self.remove_or_rebuild(record, &|| remaining.to_vec())
    }

    fn remove_or_rebuild(
        &self,
        record: &SandboxRecord,
        remaining: &dyn Fn() -> Vec<SandboxRecord>,
    ) -> Result<(), FirewallError> {
        let elements = nft::elements(record);
        let ops: Vec<(Op, &nft::SetElement)> = elements.iter().map(|e| (Op::Remove, e)).collect();
        match self.kernel.apply_elements(&self.table, &ops) {
            Ok(()) => Ok(()),
            // Some element now maps elsewhere, or the table is gone: rebuild without it.
            Err(_) => self.replace_all(&remaining()),
        }
    }

    fn verify(&self, record: &SandboxRecord) -> Result<bool, FirewallError> {
        let needle = format!("comment \"{}\"", record.sandbox.tag());
        let found = self
            .listing()?
            .map_or(0, |text| text.matches(&needle).count());
        Ok(found == nft::element_count(record))
    }

    fn intact(&self, _records: &[SandboxRecord]) -> Result<bool, FirewallError> {
        // Three netlink dumps (chains, sets, rules: no elements; a reading interrupted by
        // a change is taken again, five times at most) against what was there right after
        // our last whole load; they cost the same at any number of
        // mappings and while mappings come and go. They catch a deleted table, a flushed
        // table or ruleset, a deleted or changed chain, set or rule. A lost element is what
        // CHECK (`verify`) finds.
        let reference = self.loaded().clone();
        let now = match self.shape() {
            Ok(Some(now)) => now,
            // Still changing after five readings: the generation moved, so the watchdog
            // checks again on its next round.
            Ok(None) => return Ok(true),
            // Netlink refused (it should not, with the agent's capabilities): list instead.
            Err(_) => return self.intact_by_listing(),
        };
        match reference {
            Some(reference) => Ok(now == reference),
            None if now.counts() != nft::object_counts(self.options) => Ok(false),
            // A table this backend did not load (an agent restarted with its table in
            // place): compared with the rendered rules once, by listing, then by shape.
            None => {
                let intact = self.intact_by_listing()?;
                if intact {
                    *self.loaded() = Some(now);
                }
                Ok(intact)
            }
        }
    }

    fn teardown(&self) -> Result<(), FirewallError> {
        *self.loaded() = None;
        self.apply(
            format!("deleting table inet {}", self.table),
            &nft::teardown(&self.table),
        )
    }

    fn generation(&self) -> Option<u32> {
        self.kernel.generation()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::firewall::fake::{FakeKernel, RecordingTool};
    use randport_core::examples;

    /// A table shape with our numbers of chains, sets and rules; `variant` changes one rule.
    fn shape(variant: u8) -> TableShape {
        let (chains, sets, rules) = nft::object_counts(nft::NftOptions::default());
        let mut objects = Vec::new();
        objects.extend((0..chains).map(|i| (3, vec![i as u8])));
        objects.extend((0..sets).map(|i| (9, vec![i as u8])));
        objects.extend((0..rules).map(|i| (6, vec![i as u8, variant])));
        TableShape { objects }
    }

    /// What `nft` says when asked to list a table that is not there.
    fn no_table() -> ToolError {
        ToolError::NoSuchTable {
            program: "nft".into(),
            stderr: "Error: No such file or directory".into(),
        }
    }

    fn backend() -> (NftFirewall, &'static RecordingTool, &'static FakeKernel) {
        let (tool, kernel) = (RecordingTool::leaked(), FakeKernel::leaked());
        let fw = NftFirewall::with_parts("randport", nft::NftOptions::default(), tool, kernel);
        (fw, tool, kernel)
    }

    #[test]
    fn additions_go_to_the_kernel_as_one_batch_without_a_program() {
        let (fw, tool, kernel) = backend();
        let records = examples::all();
        fw.add_many(&records[..2]).unwrap();
        let batches = kernel.batches.lock().unwrap().clone();
        assert_eq!(batches.len(), 1);
        let expected: usize = records[..2].iter().map(nft::element_count).sum();
        assert_eq!(batches[0].len(), expected);
        assert!(
            batches[0].iter().all(|l| l.starts_with("add ")),
            "{batches:?}"
        );
        assert!(tool.calls().is_empty(), "{:?}", tool.calls());
    }

    #[test]
    fn a_refused_removal_rebuilds_the_table_without_the_sandbox() {
        let (fw, tool, kernel) = backend();
        let records = examples::all();
        *kernel.refuse_with.lock().unwrap() = Some(nix::libc::EEXIST);
        fw.remove(&records[0], &records[1..]).unwrap();
        let rebuilt = nft::ruleset_with("randport", &records[1..], nft::NftOptions::default());
        assert_eq!(tool.calls(), vec![format!("nft -f -\n{rebuilt}")]);
        // Accepted: no program at all.
        *kernel.refuse_with.lock().unwrap() = None;
        fw.remove(&records[0], &records[1..]).unwrap();
        assert_eq!(tool.calls().len(), 1);
        let batches = kernel.batches.lock().unwrap().clone();
        assert!(
            batches[0].iter().all(|l| l.starts_with("remove ")),
            "{batches:?}"
        );
    }

    #[test]
    fn the_check_compares_with_what_was_read_right_after_the_load() {
        let (fw, tool, kernel) = backend();
        *kernel.shape_default.lock().unwrap() = Some(shape(0));
        fw.replace_all(&[]).unwrap();
        assert!(fw.intact(&[]).unwrap(), "the same shape");
        // A changed rule, a missing table.
        *kernel.shape_default.lock().unwrap() = Some(shape(1));
        assert!(!fw.intact(&[]).unwrap(), "a changed rule");
        *kernel.shape_default.lock().unwrap() = None;
        assert!(!fw.intact(&[]).unwrap(), "no table");
        // Readings interrupted by changes five times: checked again next round.
        *kernel.shape_default.lock().unwrap() = Some(shape(1));
        kernel
            .shapes
            .lock()
            .unwrap()
            .extend((0..5).map(|_| Ok(ShapeRead::Interrupted)));
        assert!(fw.intact(&[]).unwrap(), "no verdict while it changes");
        assert!(!fw.intact(&[]).unwrap(), "then the change is seen");
        // Never a listing, whatever the table looked like.
        assert_eq!(tool.calls().len(), 1, "{:?}", tool.calls());
    }

    #[test]
    fn a_table_read_incomplete_after_the_load_is_not_taken_as_the_reference() {
        let (fw, tool, kernel) = backend();
        let mut partial = shape(0);
        partial.objects.pop();
        *kernel.shape_default.lock().unwrap() = Some(partial);
        fw.replace_all(&[]).unwrap();
        // Without a reference, a shape without all our objects is not intact, unlisted.
        assert!(!fw.intact(&[]).unwrap());
        assert_eq!(tool.calls().len(), 1);
        // A whole one is compared with the rendered rules once, by listing.
        *kernel.shape_default.lock().unwrap() = Some(shape(0));
        tool.answer("nft", "-t", Err(no_table()));
        assert!(!fw.intact(&[]).unwrap(), "the listing found no table");
        assert_eq!(tool.calls()[1], "nft -t list table inet randport");
    }

    #[test]
    fn a_netlink_refusal_falls_back_to_the_listing() {
        let (fw, tool, kernel) = backend();
        kernel
            .shapes
            .lock()
            .unwrap()
            .push_back(Err(std::io::Error::from_raw_os_error(nix::libc::EPERM)));
        let listing = nft::ruleset_with("randport", &[], nft::NftOptions::default());
        tool.answer("nft", "-t", Ok(listing));
        assert!(fw.intact(&[]).unwrap(), "the listing has every rule");
        assert_eq!(
            tool.calls(),
            vec!["nft -t list table inet randport".to_owned()]
        );
    }

    #[test]
    fn teardown_deletes_the_table_and_forgets_the_reference() {
        let (fw, tool, kernel) = backend();
        *kernel.shape_default.lock().unwrap() = Some(shape(0));
        fw.replace_all(&[]).unwrap();
        fw.teardown().unwrap();
        assert_eq!(
            tool.calls().last().unwrap(),
            &format!("nft -f -\n{}", nft::teardown("randport"))
        );
        // With no reference the same shape is checked by listing again.
        tool.answer("nft", "-t", Err(no_table()));
        assert!(!fw.intact(&[]).unwrap());
    }
}
