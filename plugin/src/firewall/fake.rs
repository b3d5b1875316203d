//! Fakes for tests (the `testing` feature): a firewall in memory ([`FakeFirewall`]) for
//! the agent's tests, and a recording [`RecordingTool`] and [`FakeKernel`] for the backends'
//! own unit tests.

use std::collections::VecDeque;
use std::sync::Mutex;

use randport_core::render::nft::{self, SetElement};
use randport_core::{SandboxId, SandboxRecord};

use super::nft::NftKernel;
use super::tool::{Tool, ToolError};
use super::{Firewall, FirewallError};
use crate::netfilter::netlink::{Reading, ShapeRead, TableShape};
use crate::netfilter::nft_elements::{self, BatchError, ElementsRead, Op, StoredElement};

/// Queued answers of a program, by `program first-arg`.
type Answers = Vec<(String, VecDeque<Result<String, ToolError>>)>;

/// Programs that record every call and answer from a script: the first answer queued for
/// a call's program and first argument, else `default` (empty output).
#[derive(Debug, Default)]
pub struct RecordingTool {
    /// Every call: `program args…`, then the input on the following lines.
    pub calls: Mutex<Vec<String>>,
    /// Answers by `program first-arg`, used up in order.
    pub answers: Mutex<Answers>,
}

impl RecordingTool {
    /// Queues `answer` for the next call of `program` whose first argument is `first`.
    pub fn answer(&self, program: &str, first: &str, answer: Result<String, ToolError>) {
        let key = format!("{program} {first}");
        let mut answers = self.answers.lock().unwrap_or_else(|e| e.into_inner());
        match answers.iter_mut().find(|(k, _)| *k == key) {
            Some((_, queue)) => queue.push_back(answer),
            None => answers.push((key, VecDeque::from([answer]))),
        }
    }

    /// The calls so far.
    pub fn calls(&self) -> Vec<String> {
        self.calls.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// A leaked one, for backends that keep a `&'static dyn Tool`.
    pub fn leaked() -> &'static RecordingTool {
        Box::leak(Box::default())
    }
}

impl Tool for RecordingTool {
    fn run(&self, program: &str, args: &[&str], input: &str) -> Result<String, ToolError> {
        let mut call = format!("{program} {}", args.join(" "));
        if !input.is_empty() {
            call.push('\n');
            call.push_str(input);
        }
        self.calls
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(call);
        let key = format!("{program} {}", args.first().copied().unwrap_or_default());
        let mut answers = self.answers.lock().unwrap_or_else(|e| e.into_inner());
        answers
            .iter_mut()
            .find(|(k, _)| *k == key)
            .and_then(|(_, queue)| queue.pop_front())
            .unwrap_or_else(|| Ok(String::new()))
    }
}

/// A kernel for the nftables backend's unit tests: records element batches (as nft would
/// write them) and answers shape readings from a script.
#[derive(Debug, Default)]
pub struct FakeKernel {
    /// Every batch: one line per element operation, `add|remove set key`.
    pub batches: Mutex<Vec<Vec<String>>>,
    /// When set, every batch is refused with this errno.
    pub refuse_with: Mutex<Option<i32>>,
    /// Answers to shape readings, used up in order; then `shape_default`.
    pub shapes: Mutex<VecDeque<std::io::Result<ShapeRead>>>,
    /// The shape read once `shapes` is used up.
    pub shape_default: Mutex<Option<TableShape>>,
    /// What `generation` answers.
    pub generation: Mutex<Option<u32>>,
    /// The elements in the sets: what accepted batches left there.
    pub stored: Mutex<Vec<StoredElement>>,
    /// Answers to element readings, used up in order; then `stored`.
    pub element_reads: Mutex<VecDeque<std::io::Result<ElementsRead>>>,
}

impl FakeKernel {
    /// A leaked one, for backends that keep a `&'static dyn NftKernel`.
    pub fn leaked() -> &'static FakeKernel {
        Box::leak(Box::default())
    }
}

impl NftKernel for FakeKernel {
    fn apply_elements(&self, _table: &str, ops: &[(Op, &SetElement)]) -> Result<(), BatchError> {
        if let Some(errno) = *self.refuse_with.lock().unwrap_or_else(|e| e.into_inner()) {
            return Err(BatchError::Refused {
                what: "the batch".into(),
                source: std::io::Error::from_raw_os_error(errno),
            });
        }
        let mut stored = self.stored.lock().unwrap_or_else(|e| e.into_inner());
        for (op, e) in ops {
            let element = nft_elements::stored(e);
            stored.retain(|s| (&s.set, &s.key) != (&element.set, &element.key));
            if *op == Op::Add {
                stored.push(element);
            }
        }
        let lines = ops
            .iter()
            .map(|(op, e)| {
                let verb = if *op == Op::Add { "add" } else { "remove" };
                format!("{verb} {} {}", e.set, e.key_text())
            })
            .collect();
        self.batches
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(lines);
        Ok(())
    }

    fn shape(&self, _table: &str) -> std::io::Result<ShapeRead> {
        if let Some(next) = self
            .shapes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pop_front()
        {
            return next;
        }
        Ok(Reading::Read(
            self.shape_default
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone()
                .unwrap_or(TableShape {
                    objects: Vec::new(),
                }),
        ))
    }

    fn elements(&self, _table: &str) -> std::io::Result<ElementsRead> {
        let scripted = self
            .element_reads
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pop_front();
        scripted.unwrap_or_else(|| {
            Ok(Reading::Read(
                self.stored
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .clone(),
            ))
        })
    }

    fn generation(&self) -> Option<u32> {
        *self.generation.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A firewall in memory that records every call; `fail_add` makes additions fail.
#[derive(Debug, Default)]
pub struct FakeFirewall {
    /// The sandboxes present, by tag.
    pub present: Mutex<std::collections::BTreeMap<SandboxId, usize>>,
    /// Every call, in order: `replace_all(n)`, `add(id)`, `remove(id)`, `teardown`.
    pub calls: Mutex<Vec<String>>,
    /// When set, `add` fails.
    pub fail_add: std::sync::atomic::AtomicBool,
    /// When set, `replace_all` fails (a kernel that refuses our rules).
    pub fail_replace: std::sync::atomic::AtomicBool,
    /// Sandboxes whose addition fails (alone or in a batch).
    pub fail_for: Mutex<std::collections::HashSet<SandboxId>>,
    /// How long `add_many` takes, to let concurrent ADDs pile up.
    pub batch_delay: Mutex<std::time::Duration>,
    /// What `generation` answers (`None` by default, as without a change counter).
    pub generation: Mutex<Option<u32>>,
    /// Where `add` and `add_many` stop while closed (a slow commit).
    pub add_gate: crate::testing::Gate,
    /// How many of the next removals fail (and the rebuilds they fall back to).
    pub fail_removals: std::sync::atomic::AtomicUsize,
}

impl FakeFirewall {
    fn log(&self, call: String) {
        self.calls
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(call);
    }

    fn present(&self) -> std::sync::MutexGuard<'_, std::collections::BTreeMap<SandboxId, usize>> {
        self.present.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Firewall for FakeFirewall {
    fn name(&self) -> &'static str {
        "fake"
    }

    fn replace_all(&self, records: &[SandboxRecord]) -> Result<(), FirewallError> {
        self.log(format!("replace_all({})", records.len()));
        if self.fail_replace.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(FirewallError {
                backend: "fake",
                what: "replace_all".into(),
                reason: "injected failure".into(),
            });
        }
        let mut present = self.present();
        present.clear();
        for r in records {
            present.insert(r.sandbox.clone(), nft::element_count(r));
        }
        Ok(())
    }

    fn add(&self, record: &SandboxRecord) -> Result<(), FirewallError> {
        self.log(format!("add({})", record.sandbox));
        self.add_gate.pass();
        let failing = self
            .fail_for
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(&record.sandbox);
        if failing || self.fail_add.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(FirewallError {
                backend: "fake",
                what: "add".into(),
                reason: "injected failure".into(),
            });
        }
        self.present()
            .insert(record.sandbox.clone(), nft::element_count(record));
        Ok(())
    }

    fn add_many(&self, records: &[SandboxRecord]) -> Result<(), FirewallError> {
        self.log(format!("add_many({})", records.len()));
        self.add_gate.pass();
        std::thread::sleep(*self.batch_delay.lock().unwrap_or_else(|e| e.into_inner()));
        let fail_for = self
            .fail_for
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if self.fail_add.load(std::sync::atomic::Ordering::SeqCst)
            || records.iter().any(|r| fail_for.contains(&r.sandbox))
        {
            return Err(FirewallError {
                backend: "fake",
                what: "add_many".into(),
                reason: "injected failure".into(),
            });
        }
        let mut present = self.present();
        for r in records {
            present.insert(r.sandbox.clone(), nft::element_count(r));
        }
        Ok(())
    }

    fn remove(
        &self,
        record: &SandboxRecord,
        _remaining: &[SandboxRecord],
    ) -> Result<(), FirewallError> {
        self.log(format!("remove({})", record.sandbox));
        use std::sync::atomic::Ordering::SeqCst;
        if self
            .fail_removals
            .fetch_update(SeqCst, SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            return Err(FirewallError {
                backend: "fake",
                what: "remove".into(),
                reason: "injected failure".into(),
            });
        }
        self.present().remove(&record.sandbox);
        Ok(())
    }

    fn verify(&self, record: &SandboxRecord) -> Result<bool, FirewallError> {
        Ok(self.present().get(&record.sandbox) == Some(&nft::element_count(record)))
    }

    fn intact_within(
        &self,
        settled: &[SandboxRecord],
        in_flux: &[SandboxRecord],
    ) -> Result<bool, FirewallError> {
        let present = self.present();
        let moving = |s: &SandboxId| in_flux.iter().any(|r| &r.sandbox == s);
        Ok(settled
            .iter()
            .all(|r| present.get(&r.sandbox) == Some(&nft::element_count(r)))
            && present
                .keys()
                .all(|s| moving(s) || settled.iter().any(|r| &r.sandbox == s)))
    }

    fn teardown(&self) -> Result<(), FirewallError> {
        self.log("teardown".into());
        self.present().clear();
        Ok(())
    }

    fn generation(&self) -> Option<u32> {
        *self.generation.lock().unwrap_or_else(|e| e.into_inner())
    }
}
