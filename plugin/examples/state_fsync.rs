//! What an fsync of each state record would cost under 100 concurrent ADDs: 100 threads
//! each write one record the way the agent does (a temporary file renamed over the
//! record), in three ways: as the agent does (no fsync), with an fsync of the file before
//! the rename, and with that plus an fsync of the directory after it (what surviving a
//! power loss needs). Prints p50, p99 and the slowest write of each, and the whole batch's
//! time. `cargo run --release -p randport-plugin --example state_fsync [DIR]` (DIR: a
//! directory on the disk to measure, default the system's temporary directory).

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use randport_plugin::node::state::encode_record;

#[derive(Clone, Copy, Debug)]
enum Sync {
    None,
    File,
    FileAndDir,
}

fn write(path: &Path, bytes: &[u8], sync: Sync) -> std::io::Result<()> {
    let tmp = path.with_extension(format!("tmp.{:?}", std::thread::current().id()));
    let mut file = File::create(&tmp)?;
    file.write_all(bytes)?;
    if !matches!(sync, Sync::None) {
        file.sync_all()?;
    }
    fs::rename(&tmp, path)?;
    if matches!(sync, Sync::FileAndDir) {
        File::open(path.parent().unwrap())?.sync_all()?;
    }
    Ok(())
}

fn main() {
    let base: PathBuf = std::env::args()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let dir = base.join(format!("randport-fsync-{}", std::process::id()));
    fs::create_dir_all(&dir).unwrap();
    let record = encode_record(&randport_core::examples::all()[1]).unwrap();
    println!("| writes at once | fsync | p50 | p99 | slowest | whole batch |");
    println!("|---:|---|---:|---:|---:|---:|");
    for (sync, at_once) in [
        (Sync::None, 1),
        (Sync::File, 1),
        (Sync::FileAndDir, 1),
        (Sync::None, 100),
        (Sync::File, 100),
        (Sync::FileAndDir, 100),
    ] {
        for _round in 0..3 {
            let started = Instant::now();
            let mut times: Vec<Duration> = std::thread::scope(|s| {
                let handles: Vec<_> = (0..at_once)
                    .map(|i| {
                        let (dir, record) = (&dir, &record);
                        s.spawn(move || {
                            let t = Instant::now();
                            write(&dir.join(format!("sb{i}.json")), record, sync).unwrap();
                            t.elapsed()
                        })
                    })
                    .collect();
                handles.into_iter().map(|h| h.join().unwrap()).collect()
            });
            let batch = started.elapsed();
            times.sort();
            let ms = |d: Duration| format!("{:.2} ms", d.as_secs_f64() * 1e3);
            let at = |q: f64| times[((times.len() - 1) as f64 * q) as usize];
            println!(
                "| {at_once} | {sync:?} | {} | {} | {} | {} |",
                ms(at(0.5)),
                ms(at(0.99)),
                ms(times[times.len() - 1]),
                ms(batch)
            );
        }
    }
    fs::remove_dir_all(&dir).unwrap();
}
