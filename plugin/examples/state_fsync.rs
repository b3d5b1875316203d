//! What an fsync of each state record would cost under 100 concurrent ADDs: 100 threads
//! each write one record the way the agent does (a temporary file renamed over the
//! record), in four ways: as the agent does (no fsync), with an fsync of the file before
//! the rename, with that plus an fsync of the directory after it (what surviving a power
//! loss needs), and the last with a group commit (each file fsynced and renamed by its
//! writer, then one fsync of the directory for every rename of the batch, which each writer
//! waits for). Prints p50, p99 and the slowest write of each, and the whole batch's time. `cargo run --release -p randport-plugin --example state_fsync [DIR]` (DIR: a
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
    GroupCommit,
}

/// One fsync of the directory for every write that renamed before it started.
#[derive(Default)]
struct DirCommit {
    state: std::sync::Mutex<(u64, u64)>, // (renames so far, renames covered by an fsync)
    done: std::sync::Condvar,
    leader: std::sync::Mutex<()>,
}

impl DirCommit {
    fn commit(&self, dir: &Path) -> std::io::Result<()> {
        let mine = {
            let mut s = self.state.lock().unwrap();
            s.0 += 1;
            s.0
        };
        loop {
            if self.state.lock().unwrap().1 >= mine {
                return Ok(());
            }
            // Whoever gets the leader lock fsyncs for everyone who renamed so far.
            let Ok(_leader) = self.leader.try_lock() else {
                let s = self.state.lock().unwrap();
                let _ = self.done.wait_timeout(s, Duration::from_millis(1)).unwrap();
                continue;
            };
            let upto = self.state.lock().unwrap().0;
            File::open(dir)?.sync_all()?;
            self.state.lock().unwrap().1 = upto;
            self.done.notify_all();
        }
    }
}

fn write(path: &Path, bytes: &[u8], sync: Sync, group: &DirCommit) -> std::io::Result<()> {
    let tmp = path.with_extension(format!("tmp.{:?}", std::thread::current().id()));
    let mut file = File::create(&tmp)?;
    file.write_all(bytes)?;
    if !matches!(sync, Sync::None) {
        file.sync_all()?;
    }
    fs::rename(&tmp, path)?;
    match sync {
        Sync::FileAndDir => File::open(path.parent().unwrap())?.sync_all()?,
        Sync::GroupCommit => group.commit(path.parent().unwrap())?,
        Sync::None | Sync::File => {}
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
        (Sync::GroupCommit, 100),
    ] {
        for _round in 0..3 {
            let group = DirCommit::default();
            let started = Instant::now();
            let mut times: Vec<Duration> = std::thread::scope(|s| {
                let handles: Vec<_> = (0..at_once)
                    .map(|i| {
                        let (dir, record, group) = (&dir, &record, &group);
                        s.spawn(move || {
                            let t = Instant::now();
                            write(&dir.join(format!("sb{i}.json")), record, sync, group).unwrap();
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
