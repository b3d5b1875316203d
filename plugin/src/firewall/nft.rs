//! The nftables backend: table `inet <name>`. Whole loads go through `nft -f` (the
//! [`Tool`]); a sandbox's elements, CHECK's reading of them and the watchdog's reading of
//! the table go to the kernel over netlink (the [`NftKernel`]): nothing is listed as text.
//! Both seams have fakes for the unit tests below.

use randport_core::SandboxRecord;
use randport_core::render::nft;

use super::tool::{SYSTEM, Tool};
use super::{Firewall, FirewallError};
use crate::netfilter::netlink::{Reading, ShapeRead, TableShape};
use crate::netfilter::nft_elements::{self, BatchError, ElementsRead, Op, StoredElement};

/// What the nftables backend asks of the kernel directly, over netlink.
pub trait NftKernel: Send + Sync + std::fmt::Debug {
    /// Adds or removes elements in one batch.
    fn apply_elements(&self, table: &str, ops: &[(Op, &nft::SetElement)])
    -> Result<(), BatchError>;
    /// The chains, sets and rules of `inet <table>`.
    fn shape(&self, table: &str) -> std::io::Result<ShapeRead>;
    /// The elements of our sets in `inet <table>`.
    fn elements(&self, table: &str) -> std::io::Result<ElementsRead>;
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
        crate::netfilter::netlink::nft_table_shape(table)
    }

    fn elements(&self, table: &str) -> std::io::Result<ElementsRead> {
        nft_elements::read(table, &nft::SETS.map(|(name, _, _)| name))
    }

    fn generation(&self) -> Option<u32> {
        crate::netfilter::netlink::ruleset_generation().ok()
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

    /// What `read` reads once it holds still; None when every one of five readings was
    /// interrupted by a change (each is a few small dumps, so pods coming and going
    /// rarely spoil more than one).
    fn settled<T>(
        &self,
        what: &str,
        read: impl Fn() -> std::io::Result<Reading<T>>,
    ) -> Result<Option<T>, FirewallError> {
        for _ in 0..5 {
            match read() {
                Ok(Reading::Read(value)) => return Ok(Some(value)),
                Ok(Reading::Interrupted) => continue,
                Err(e) => {
                    let what = format!("reading the {what} of table inet {}", self.table);
                    return Err(self.err(what, e.to_string()));
                }
            }
        }
        Ok(None)
    }

    /// The table's shape now (see [`NftFirewall::settled`]).
    fn shape(&self) -> Result<Option<TableShape>, FirewallError> {
        self.settled("chains, sets and rules", || self.kernel.shape(&self.table))
    }

    /// The table's shape now if it has every chain, set and rule of ours: someone may
    /// have flushed or changed it between our load and this reading, and a reference
    /// taken then would make the damage look normal.
    fn whole_shape(&self) -> Option<TableShape> {
        let shape = self.shape().ok().flatten()?;
        (shape.counts() == nft::object_counts(self.options)).then_some(shape)
    }

    /// Every element of our sets now (see [`NftFirewall::settled`]).
    fn stored_elements(&self) -> Result<Option<Vec<StoredElement>>, FirewallError> {
        self.settled("map elements", || self.kernel.elements(&self.table))
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
        self.remove_keeping(record, &[], remaining)
    }

    fn remove_keeping(
        &self,
        record: &SandboxRecord,
        shared: &[std::net::IpAddr],
        remaining: &dyn Fn() -> Vec<SandboxRecord>,
    ) -> Result<(), FirewallError> {
        // A hairpin element is keyed by the pod address alone: another sandbox with the
        // same address (the pod's new one, beside a stale record) needs it still.
        let elements: Vec<nft::SetElement> = nft::elements(record)
            .into_iter()
            .filter(|e| {
                !(e.value.is_none()
                    && matches!(e.key.first(), Some(nft::Field::Ip(ip)) if shared.contains(ip)))
            })
            .collect();
        let ops: Vec<(Op, &nft::SetElement)> = elements.iter().map(|e| (Op::Remove, e)).collect();
        match self.kernel.apply_elements(&self.table, &ops) {
            Ok(()) => Ok(()),
            // Some element now maps elsewhere, or the table is gone: rebuild without it.
            Err(_) => self.replace_all(&remaining()),
        }
    }

    fn verify(&self, record: &SandboxRecord) -> Result<bool, FirewallError> {
        // The elements tagged with this sandbox, compared field by field with what its
        // ADD sent: a missing, extra or changed one fails the check.
        let Some(stored) = self.stored_elements()? else {
            return Err(self.err(
                format!("checking pod {}", record.pod),
                "the table kept changing while it was read five times; try again".into(),
            ));
        };
        let tag = record.sandbox.tag();
        let mut found: Vec<&StoredElement> = stored
            .iter()
            .filter(|e| e.comment.as_deref() == Some(tag.as_str()))
            .collect();
        let mut expected: Vec<StoredElement> = nft::elements(record)
            .iter()
            .map(nft_elements::stored)
            .collect();
        found.sort();
        expected.sort();
        Ok(found == expected.iter().collect::<Vec<_>>())
    }

    fn intact_within(
        &self,
        settled: &[SandboxRecord],
        in_flux: &[SandboxRecord],
    ) -> Result<bool, FirewallError> {
        // Three netlink dumps (chains, sets, rules; a reading interrupted by a change is
        // taken again, five times at most) against what was there right after our last
        // whole load. They catch a deleted table, a flushed table or ruleset, a deleted or
        // changed chain, set or rule.
        let Some(now) = self.shape()? else {
            // Still changing after five readings: the generation moved, so the watchdog
            // checks again on its next round.
            return Ok(true);
        };
        // Without a reference (none could be read whole right after the load, or the
        // table was torn down) the table is not known to be ours: the rebuild that
        // follows reads one.
        if self.loaded().as_ref() != Some(&now) {
            return Ok(false);
        }
        // Then the elements, counted per set against the records (`nft flush map`, an
        // element deleted by hand): one element dump, a few ms at 7,500 elements, only
        // when the generation moved. A sandbox being added or removed may or may not
        // have its elements in; elements of one key (two sandboxes of one pod IP share a
        // hairpin element) count once.
        let Some(stored) = self.stored_elements()? else {
            return Ok(true);
        };
        let keys = |records: &[SandboxRecord]| -> std::collections::BTreeSet<(String, Vec<u8>)> {
            records
                .iter()
                .flat_map(nft::elements)
                .map(|e| {
                    let stored = nft_elements::stored(&e);
                    (stored.set, stored.key)
                })
                .collect()
        };
        let must = keys(settled);
        let mut may = must.clone();
        may.extend(keys(in_flux));
        for (set, _, _) in nft::SETS {
            let present = stored.iter().filter(|e| e.set == set).count();
            let lower = must.iter().filter(|(s, _)| s == set).count();
            let upper = may.iter().filter(|(s, _)| s == set).count();
            if present < lower || present > upper {
                tracing::info!(
                    set,
                    present,
                    expected = lower,
                    "our nftables set does not hold what the records say (flushed or edited)"
                );
                return Ok(false);
            }
        }
        Ok(true)
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
            .extend((0..5).map(|_| Ok(Reading::Interrupted)));
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
        // Without a reference nothing is intact, whatever the reading: the rebuild that
        // follows takes one. No listing.
        assert!(!fw.intact(&[]).unwrap());
        *kernel.shape_default.lock().unwrap() = Some(shape(0));
        assert!(!fw.intact(&[]).unwrap());
        fw.replace_all(&[]).unwrap();
        assert!(fw.intact(&[]).unwrap());
        assert_eq!(tool.calls().len(), 2, "two loads: {:?}", tool.calls());
    }

    #[test]
    fn a_netlink_refusal_is_an_error_that_says_what_was_read() {
        let (fw, tool, kernel) = backend();
        kernel
            .shapes
            .lock()
            .unwrap()
            .push_back(Err(std::io::Error::from_raw_os_error(nix::libc::EPERM)));
        let err = fw.intact(&[]).unwrap_err().to_string();
        assert!(
            err.contains("reading the chains, sets and rules of table inet randport")
                && err.contains("not permitted"),
            "{err}"
        );
        kernel
            .element_reads
            .lock()
            .unwrap()
            .push_back(Err(std::io::Error::from_raw_os_error(nix::libc::EPERM)));
        let err = fw.verify(&examples::one_tcp()).unwrap_err().to_string();
        assert!(err.contains("reading the map elements"), "{err}");
        assert!(tool.calls().is_empty(), "{:?}", tool.calls());
    }

    #[test]
    fn check_compares_a_sandboxs_elements_field_by_field() {
        let (fw, tool, kernel) = backend();
        let records = examples::all();
        fw.add_many(&records[1..]).unwrap();
        assert!(!fw.verify(&records[0]).unwrap(), "never added");
        for record in &records[1..] {
            assert!(fw.verify(record).unwrap(), "{}", record.pod);
        }
        let dual = records
            .iter()
            .find(|r| r.pod_ips.len() == 2)
            .expect("a dual-stack example");
        let tag = dual.sandbox.tag();
        let stored = |kernel: &FakeKernel| kernel.stored.lock().unwrap().clone();
        let whole = stored(kernel);
        let edit = |change: &dyn Fn(&mut Vec<StoredElement>)| {
            let mut elements = whole.clone();
            change(&mut elements);
            *kernel.stored.lock().unwrap() = elements;
            fw.verify(dual).unwrap()
        };
        let ours = |e: &StoredElement| e.comment.as_deref() == Some(tag.as_str());
        // One element gone, one pointing elsewhere, one more with its tag, one untagged.
        assert!(!edit(&|all| {
            let i = all.iter().position(ours).unwrap();
            all.remove(i);
        }));
        assert!(!edit(&|all| {
            let e = all
                .iter_mut()
                .find(|e| ours(e) && e.value.is_some())
                .unwrap();
            e.value.as_mut().unwrap()[0] ^= 1;
        }));
        assert!(!edit(&|all| {
            let mut extra = all.iter().find(|e| ours(e)).unwrap().clone();
            extra.key[0] ^= 1;
            all.push(extra);
        }));
        assert!(!edit(&|all| {
            all.iter_mut().find(|e| ours(e)).unwrap().comment = None;
        }));
        // Another sandbox's elements do not matter to it.
        assert!(edit(&|all| all.retain(|e| ours(e))));
        assert!(tool.calls().is_empty(), "no program: {:?}", tool.calls());
    }

    #[test]
    fn check_reads_again_while_the_table_changes_and_says_so_when_it_never_holds_still() {
        let (fw, _tool, kernel) = backend();
        let record = examples::one_tcp();
        fw.add(&record).unwrap();
        let interrupted = |n: usize| {
            kernel
                .element_reads
                .lock()
                .unwrap()
                .extend((0..n).map(|_| Ok(Reading::Interrupted)));
        };
        interrupted(4);
        assert!(fw.verify(&record).unwrap());
        interrupted(5);
        let err = fw.verify(&record).unwrap_err().to_string();
        assert!(
            err.contains("kept changing") && err.contains(&record.pod.to_string()),
            "{err}"
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
        // With no reference the same shape is not taken as ours: no listing either.
        assert!(!fw.intact(&[]).unwrap());
        assert_eq!(tool.calls().len(), 2, "{:?}", tool.calls());
    }
}
