//! The agent's state records across releases: records written in every format a release
//! has used (fixtures in tests/data/state/format-N, one file per example sandbox) load as
//! the same records, and older ones are rewritten in the current format. The current
//! writer's output must equal the newest fixtures byte for byte, so a change to the record's
//! shape fails here until it gets a format number (and a conversion) of its own.
//!
//! `RANDPORT_WRITE_STATE_FIXTURES=1` writes the current format's fixtures (once, when
//! FORMAT_VERSION goes up); the older formats' fixtures are never rewritten.

use std::path::{Path, PathBuf};

use randport_core::{SandboxRecord, examples};
use randport_plugin::node::state::{
    DirStateStore, FORMAT_VERSION, StateError, StateStore, decode_record, encode_record,
};

fn fixtures(format: u64) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("tests/data/state/format-{format}"))
}

fn temp_copy(of: &Path) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "randport-state-format-{}-{}",
        std::process::id(),
        fastrand::u32(..)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    for entry in std::fs::read_dir(of).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, dir.join(path.file_name().unwrap())).unwrap();
    }
    dir
}

fn expected() -> Vec<SandboxRecord> {
    let mut all = examples::all();
    all.sort_by(|a, b| a.sandbox.cmp(&b.sandbox));
    all
}

fn files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let p = e.unwrap().path();
            (
                p.file_name().unwrap().to_string_lossy().into_owned(),
                std::fs::read(&p).unwrap(),
            )
        })
        .collect();
    out.sort();
    out
}

#[test]
fn the_current_writer_writes_the_current_fixtures() {
    let dir = fixtures(FORMAT_VERSION);
    if std::env::var_os("RANDPORT_WRITE_STATE_FIXTURES").is_some() {
        std::fs::create_dir_all(&dir).unwrap();
        for r in examples::all() {
            let bytes = encode_record(&r).unwrap();
            std::fs::write(dir.join(format!("{}.json", r.sandbox.0)), bytes).unwrap();
        }
    }
    let fixtures = files(&dir);
    assert_eq!(fixtures.len(), examples::all().len(), "{}", dir.display());
    for r in examples::all() {
        let name = format!("{}.json", r.sandbox.0);
        let (_, bytes) = fixtures.iter().find(|(n, _)| *n == name).unwrap();
        assert_eq!(
            String::from_utf8_lossy(&encode_record(&r).unwrap()),
            String::from_utf8_lossy(bytes),
            "{name}: the record's format changed; give it format {} and a conversion \
             (plugin/src/node/state.rs), then write its fixtures",
            FORMAT_VERSION + 1
        );
    }
}

/// Records in sandbox order (a store lists them oldest first; the copied fixtures are all
/// of one moment).
fn by_sandbox(mut records: Vec<randport_core::SandboxRecord>) -> Vec<randport_core::SandboxRecord> {
    records.sort_by(|a, b| a.sandbox.cmp(&b.sandbox));
    records
}

#[test]
fn every_earlier_format_loads_and_is_rewritten_in_the_current_one() {
    let current = files(&fixtures(FORMAT_VERSION));
    for format in 1..=FORMAT_VERSION {
        let dir = temp_copy(&fixtures(format));
        let store = DirStateStore::open(&dir).unwrap();
        assert_eq!(
            by_sandbox(store.load_all().unwrap()),
            expected(),
            "format {format}"
        );
        assert_eq!(
            files(&dir),
            current,
            "format {format}: after loading, the files are in format {FORMAT_VERSION}"
        );
        // Loading again reads the same and leaves the files alone.
        assert_eq!(by_sandbox(store.load_all().unwrap()), expected());
        assert_eq!(files(&dir), current);
        std::fs::remove_dir_all(dir).unwrap();
    }
}

#[test]
fn format_one_is_the_record_without_a_version() {
    for (name, bytes) in files(&fixtures(1)) {
        let doc: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert!(doc.get("formatVersion").is_none(), "{name}");
        let (_, version) = decode_record(Path::new(&name), &bytes).unwrap();
        assert_eq!(version, 1);
    }
}

#[test]
fn a_newer_format_is_read_when_it_can_be_and_named_when_it_cannot() {
    let record = examples::one_tcp();
    let mut doc: serde_json::Value =
        serde_json::from_slice(&encode_record(&record).unwrap()).unwrap();
    doc["formatVersion"] = (FORMAT_VERSION + 1).into();
    doc["someFutureField"] = "x".into();
    let bytes = serde_json::to_vec(&doc).unwrap();
    let (read, version) = decode_record(Path::new("a.json"), &bytes).unwrap();
    assert_eq!((read, version), (record, FORMAT_VERSION + 1));

    doc["mappings"] = "a new shape".into();
    let bytes = serde_json::to_vec(&doc).unwrap();
    let e = decode_record(Path::new("a.json"), &bytes).unwrap_err();
    assert!(matches!(e, StateError::Newer { found, .. } if found == FORMAT_VERSION + 1));
    let msg = e.to_string();
    assert!(
        msg.contains(&format!("has format {}", FORMAT_VERSION + 1))
            && msg.contains("docs/upgrade.md"),
        "{msg}"
    );

    doc["formatVersion"] = "two".into();
    let e = decode_record(Path::new("a.json"), &serde_json::to_vec(&doc).unwrap()).unwrap_err();
    assert!(e.to_string().contains("is not a format number"), "{e}");
}
