//! The agent's state: one JSON record per sandbox in the state directory, written
//! atomically (a temporary file renamed over the record), so an agent crash at any point
//! leaves either the old record or the new one.
//!
//! There is no fsync: the records must outlive the agent process (a crash, an upgrade, a
//! SIGKILL), which the page cache guarantees, but not the node: a node that loses power
//! loses every sandbox, hold and rule too, and the runtime adds the pods again. What a power
//! loss can leave (an empty or truncated record) must not stop the node: a record that
//! cannot be read is moved aside as `*.corrupt` by [`StateStore::load_all`] and reported
//! through [`StateStore::set_aside`], and unfinished writes (`*.tmp.*`) are removed. The
//! cost an fsync would add is measured by `examples/state_fsync.rs` (docs/troubleshooting.md).
//!
//! Each record carries `formatVersion` ([`FORMAT_VERSION`]). Format 1 (randport before the
//! format was versioned: main up to e0c128a) had no version field and the same fields
//! otherwise; an agent that finds records of an older format reads them and rewrites them
//! in the current one. A record of a newer format
//! (after a downgrade) is read when its fields still decode, with a warning; otherwise it is
//! an error that names both formats. Fields are only ever added, each with a default, so an
//! older agent reads a newer record (serde ignores what it does not know): a rollback works.
//! A change that cannot be read that way needs a new format number and a conversion here;
//! the fixtures in plugin/tests/data/state/ fail the tests when the shape changes without one.

use std::fs::{self, File};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use randport_core::{SandboxId, SandboxRecord};

/// The format of the records this agent writes.
pub const FORMAT_VERSION: u64 = 2;

/// The name of the version field in a record file.
const VERSION_FIELD: &str = "formatVersion";

/// A record that could not be stored or read.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// A file operation failed.
    #[error("state store {path}: {source}; check that the state directory is writable")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A record file is not valid JSON of a record.
    #[error("state record {path} is corrupt ({source}); move it away and restart randportd")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// The decoder's error.
        source: serde_json::Error,
    },
    /// A record of a newer format whose fields this agent cannot read.
    #[error(
        "state record {path} has format {found}, newer than this randportd reads \
         ({FORMAT_VERSION}), and does not decode ({source}): run the newer randport again, \
         or see docs/upgrade.md for downgrades"
    )]
    Newer {
        /// The file.
        path: PathBuf,
        /// Its format.
        found: u64,
        /// The decoder's error.
        source: serde_json::Error,
    },
    /// A sandbox id that cannot be a file name.
    #[error("sandbox id {0:?} is not a valid container id (letters, digits, '_', '.', '-')")]
    BadId(String),
}

/// Where sandbox records live.
pub trait StateStore: Send + Sync {
    /// Writes (or replaces) a record.
    fn save(&self, record: &SandboxRecord) -> Result<(), StateError>;
    /// Deletes a record; fine when there is none.
    fn delete(&self, sandbox: &SandboxId) -> Result<(), StateError>;
    /// Every record stored, oldest first (by when it was last written). A record that
    /// cannot be read does not stop the others: it is set aside (see
    /// [`StateStore::set_aside`]).
    fn load_all(&self) -> Result<Vec<SandboxRecord>, StateError>;
    /// What the loads so far set aside because it could not be read: one line each, for
    /// the log and the metrics. Taken once.
    fn set_aside(&self) -> Vec<String> {
        Vec::new()
    }
}

/// Checks that a sandbox id is safe as a file name (the CNI spec's container id rule).
pub fn validate_id(sandbox: &SandboxId) -> Result<(), StateError> {
    let id = &sandbox.0;
    let mut chars = id.chars();
    let ok = id.len() <= 256
        && chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if ok {
        Ok(())
    } else {
        Err(StateError::BadId(id.clone()))
    }
}

/// Records as files `<dir>/<sandbox id>.json`.
#[derive(Debug)]
pub struct DirStateStore {
    dir: PathBuf,
    set_aside: Mutex<Vec<String>>,
}

/// The suffix a record that cannot be read is renamed to.
pub const CORRUPT_SUFFIX: &str = "corrupt";

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StateError + '_ {
    move |source| StateError::Io {
        path: path.to_owned(),
        source,
    }
}

impl DirStateStore {
    /// A store in `dir`, created (mode 0700) when missing.
    pub fn open(dir: impl Into<PathBuf>) -> Result<Self, StateError> {
        use std::os::unix::fs::DirBuilderExt;
        let dir = dir.into();
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(io(&dir))?;
        Ok(DirStateStore {
            dir,
            set_aside: Mutex::default(),
        })
    }

    /// Renames a record that cannot be read to `<name>.corrupt` (replacing an older one of
    /// that name), so that it stops nothing and stays for a person to look at.
    fn put_aside(&self, path: &Path, why: &StateError) {
        let mut aside = path.as_os_str().to_owned();
        aside.push(".");
        aside.push(CORRUPT_SUFFIX);
        let aside = PathBuf::from(aside);
        let line = match fs::rename(path, &aside) {
            Ok(()) => format!(
                "{why}: moved aside to {}; the sandbox's mapping is not restored (its pod \
                 keeps running; delete the pod to map it again), look at the file and remove it",
                aside.display()
            ),
            Err(e) => format!(
                "{why}: skipped; moving it aside to {} failed too ({e}): remove it by hand",
                aside.display()
            ),
        };
        tracing::error!(path = %path.display(), "{line}");
        self.set_aside
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(line);
    }

    fn path(&self, sandbox: &SandboxId) -> Result<PathBuf, StateError> {
        validate_id(sandbox)?;
        Ok(self.dir.join(format!("{}.json", sandbox.0)))
    }
}

/// Writes `bytes` to `path` atomically: a temporary file beside it, renamed over `path`.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    let result = (|| {
        let mut file = File::create(&tmp)?;
        file.write_all(bytes)?;
        fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// A record in the current format: `formatVersion` first, then the record's fields.
pub fn encode_record(record: &SandboxRecord) -> serde_json::Result<Vec<u8>> {
    let mut doc = serde_json::Map::new();
    doc.insert(VERSION_FIELD.into(), FORMAT_VERSION.into());
    match serde_json::to_value(record)? {
        serde_json::Value::Object(fields) => doc.extend(fields),
        _ => unreachable!("a SandboxRecord serializes to an object"),
    }
    let mut bytes = serde_json::to_vec_pretty(&doc)?;
    bytes.push(b'\n');
    Ok(bytes)
}

/// A record file of any format this agent reads, and the format it was in.
pub fn decode_record(path: &Path, bytes: &[u8]) -> Result<(SandboxRecord, u64), StateError> {
    let corrupt = |source| StateError::Corrupt {
        path: path.to_owned(),
        source,
    };
    let mut doc: serde_json::Value = serde_json::from_slice(bytes).map_err(corrupt)?;
    let version = match doc.as_object_mut().map(|o| o.remove(VERSION_FIELD)) {
        // Format 1 (before the format was versioned) had no version field.
        Some(None) => 1,
        Some(Some(v)) => v.as_u64().ok_or_else(|| {
            corrupt(serde::de::Error::custom(format!(
                "{VERSION_FIELD} {v} is not a format number"
            )))
        })?,
        None => return Err(corrupt(serde::de::Error::custom("not a JSON object"))),
    };
    // Formats 1 and 2 have the same fields; a later conversion goes here, by version.
    match serde_json::from_value(doc) {
        Ok(record) => Ok((record, version)),
        Err(source) if version > FORMAT_VERSION => Err(StateError::Newer {
            path: path.to_owned(),
            found: version,
            source,
        }),
        Err(source) => Err(corrupt(source)),
    }
}

impl StateStore for DirStateStore {
    fn save(&self, record: &SandboxRecord) -> Result<(), StateError> {
        let path = self.path(&record.sandbox)?;
        let bytes = encode_record(record).map_err(|source| StateError::Corrupt {
            path: path.clone(),
            source,
        })?;
        write_atomic(&path, &bytes).map_err(io(&path))
    }

    fn delete(&self, sandbox: &SandboxId) -> Result<(), StateError> {
        let path = self.path(sandbox)?;
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io(&path)(e)),
        }
    }

    fn load_all(&self) -> Result<Vec<SandboxRecord>, StateError> {
        let mut records = Vec::new();
        let mut upgraded = Vec::new();
        for entry in fs::read_dir(&self.dir).map_err(io(&self.dir))? {
            let path = entry.map_err(io(&self.dir))?.path();
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default();
            if name.contains(".tmp.") {
                // A write that never reached its rename (the agent died in it): the record
                // it was replacing, if any, is still there.
                match fs::remove_file(&path) {
                    Ok(()) => tracing::info!(path = %path.display(), "removed an unfinished write"),
                    Err(e) => {
                        tracing::warn!(path = %path.display(), error = %e, "removing an unfinished write")
                    }
                }
                continue;
            }
            if path.extension().is_none_or(|e| e != "json") {
                continue;
            }
            let read = fs::read(&path).map_err(io(&path)).and_then(|bytes| {
                let written = fs::metadata(&path)
                    .and_then(|m| m.modified())
                    .unwrap_or(std::time::UNIX_EPOCH);
                decode_record(&path, &bytes).map(|(record, version)| (record, version, written))
            });
            let (record, version, written) = match read {
                Ok(read) => read,
                Err(e) => {
                    self.put_aside(&path, &e);
                    continue;
                }
            };
            if version < FORMAT_VERSION {
                upgraded.push(path.clone());
                self.save(&record)?;
            } else if version > FORMAT_VERSION {
                tracing::warn!(
                    path = %path.display(),
                    "state record has format {version}, newer than this randportd's \
                     ({FORMAT_VERSION}); read it as far as its fields are known (a downgrade?)"
                );
            }
            records.push((written, record));
        }
        if !upgraded.is_empty() {
            tracing::info!(
                "rewrote {} state record(s) of an older format in format {FORMAT_VERSION}",
                upgraded.len()
            );
        }
        // Oldest first; records written in the same instant by sandbox id.
        records
            .sort_by(|(at_a, a), (at_b, b)| at_a.cmp(at_b).then_with(|| a.sandbox.cmp(&b.sandbox)));
        Ok(records.into_iter().map(|(_, record)| record).collect())
    }

    fn set_aside(&self) -> Vec<String> {
        std::mem::take(&mut *self.set_aside.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

/// A store in memory that records every call, for tests; `fail_save` makes saves fail.
#[cfg(any(test, feature = "testing"))]
#[derive(Debug, Default)]
pub struct MemoryStateStore {
    /// Where `save` stops while closed.
    pub save_gate: crate::testing::Gate,
    /// How many of the next deletes fail.
    pub fail_deletes: std::sync::atomic::AtomicUsize,
    /// The records, by sandbox.
    pub records: Mutex<std::collections::BTreeMap<SandboxId, SandboxRecord>>,
    /// When set, `save` fails.
    pub fail_save: std::sync::atomic::AtomicBool,
    /// The sandboxes in the order they were last saved (what `load_all` keeps).
    pub saved_order: Mutex<Vec<SandboxId>>,
}

#[cfg(any(test, feature = "testing"))]
impl StateStore for MemoryStateStore {
    fn save(&self, record: &SandboxRecord) -> Result<(), StateError> {
        self.save_gate.pass();
        if self.fail_save.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(StateError::Io {
                path: "memory".into(),
                source: std::io::Error::other("disk full (test)"),
            });
        }
        self.records
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(record.sandbox.clone(), record.clone());
        let mut order = self.saved_order.lock().unwrap_or_else(|e| e.into_inner());
        order.retain(|s| s != &record.sandbox);
        order.push(record.sandbox.clone());
        Ok(())
    }

    fn delete(&self, sandbox: &SandboxId) -> Result<(), StateError> {
        use std::sync::atomic::Ordering::SeqCst;
        if self
            .fail_deletes
            .fetch_update(SeqCst, SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            return Err(StateError::Io {
                path: "memory".into(),
                source: std::io::Error::other("read-only file system (test)"),
            });
        }
        self.records
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(sandbox);
        Ok(())
    }

    fn load_all(&self) -> Result<Vec<SandboxRecord>, StateError> {
        let records = self.records.lock().unwrap_or_else(|e| e.into_inner());
        let order = self.saved_order.lock().unwrap_or_else(|e| e.into_inner());
        // Saved ones in their order; any put in `records` directly first, by id.
        let mut all: Vec<SandboxRecord> = records
            .values()
            .filter(|r| !order.contains(&r.sandbox))
            .cloned()
            .collect();
        all.extend(order.iter().filter_map(|s| records.get(s).cloned()));
        Ok(all)
    }
}

impl<T: StateStore + ?Sized> StateStore for std::sync::Arc<T> {
    fn save(&self, record: &SandboxRecord) -> Result<(), StateError> {
        (**self).save(record)
    }
    fn delete(&self, sandbox: &SandboxId) -> Result<(), StateError> {
        (**self).delete(sandbox)
    }
    fn load_all(&self) -> Result<Vec<SandboxRecord>, StateError> {
        (**self).load_all()
    }
    fn set_aside(&self) -> Vec<String> {
        (**self).set_aside()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use randport_core::examples;

    fn temp_dir(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!(
            "randport-state-{name}-{}-{}",
            std::process::id(),
            fastrand::u32(..)
        ))
    }

    #[test]
    fn records_round_trip_and_delete_is_idempotent() {
        let dir = temp_dir("rt");
        let store = DirStateStore::open(&dir).unwrap();
        for r in examples::all() {
            store.save(&r).unwrap();
        }
        // Oldest first: the order they were written in.
        let expected = examples::all();
        assert_eq!(store.load_all().unwrap(), expected);
        let first = &expected[0].sandbox;
        store.delete(first).unwrap();
        store.delete(first).unwrap();
        assert_eq!(store.load_all().unwrap().len(), expected.len() - 1);
        // No temporary files are left behind.
        assert!(
            fs::read_dir(&dir)
                .unwrap()
                .all(|e| e.unwrap().path().extension().unwrap() == "json")
        );
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn bad_ids_are_clear_errors() {
        let dir = temp_dir("bad");
        let store = DirStateStore::open(&dir).unwrap();
        let mut r = examples::one_tcp();
        r.sandbox = SandboxId("../../etc/passwd".into());
        assert!(matches!(store.save(&r), Err(StateError::BadId(_))));
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn unreadable_records_are_moved_aside_and_stop_nothing() {
        let dir = temp_dir("aside");
        let store = DirStateStore::open(&dir).unwrap();
        let good = examples::one_tcp();
        store.save(&good).unwrap();
        let mut newer = serde_json::to_value(examples::one_tcp()).unwrap();
        newer["formatVersion"] = (FORMAT_VERSION + 1).into();
        newer["mappings"] = "changed shape".into();
        let bad: [(&str, Vec<u8>); 5] = [
            // What a power loss leaves after a rename that reached the disk before the data.
            ("empty.json", vec![]),
            (
                "truncated.json",
                encode_record(&good).unwrap()[..40].to_vec(),
            ),
            ("garbage.json", b"\x00\x00\x7fELF".to_vec()),
            ("not-an-object.json", b"[1, 2]".to_vec()),
            ("newer.json", serde_json::to_vec(&newer).unwrap()),
        ];
        for (name, bytes) in &bad {
            fs::write(dir.join(name), bytes).unwrap();
        }
        // A write that died before its rename.
        fs::write(dir.join("dead.json.tmp.4242"), b"{\"sand").unwrap();

        assert_eq!(store.load_all().unwrap(), vec![good.clone()]);
        let lines = store.set_aside();
        assert_eq!(lines.len(), bad.len(), "{lines:#?}");
        for (name, bytes) in &bad {
            let aside = dir.join(format!("{name}.corrupt"));
            assert_eq!(&fs::read(&aside).unwrap(), bytes, "{name} kept as it was");
            assert!(!dir.join(name).exists());
            let line = lines.iter().find(|l| l.contains(name)).unwrap();
            assert!(
                line.contains("moved aside to") && line.contains("remove it"),
                "{line}"
            );
        }
        assert!(!dir.join("dead.json.tmp.4242").exists(), "leftover removed");
        // Taken once; the next load finds only the good record and sets nothing aside.
        assert!(store.set_aside().is_empty());
        assert_eq!(store.load_all().unwrap(), vec![good]);
        assert!(store.set_aside().is_empty());
        fs::remove_dir_all(dir).unwrap();
    }
}
