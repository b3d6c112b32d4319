//! `lazarus-sim`: runs the cluster simulation (`lazarus_sim::cluster`), one seed per
//! process so that every seed replays exactly.
//!
//! ```text
//! lazarus-sim seed SEED [FAULTS [LOAD_SECS]] one seed; its events, and the log with LAZARUS_SIM_LOG=debug
//! lazarus-sim sweep FIRST COUNT [JOBS [FAULTS [LOAD_SECS]]]
//!                                       seeds FIRST.. on JOBS processes (default 2), FAULTS
//!                                       fault events (default 3) in LOAD_SECS of load
//!                                       (default 20) each; exit 1 on a failure
//! LAZARUS_SIM_DISK_FAULTS=1             disk faults (bit rot, EIO) among the faults
//! LAZARUS_SIM_DEVICE_FAULTS=1           failed devices (one node's store, every I/O EIO)
//! LAZARUS_SIM_FULL_DISK=1               full disks (one node's disk filled by a ballast file)
//! LAZARUS_SIM_CUTS=1                    connections cut without a crash (all of one host's)
//! LAZARUS_SIM_SNAPSHOTS=1               snapshots taken and deleted by the primary among the faults
//! LAZARUS_SIM_REVERTS=1                 with snapshots: the volume reverted to one by the primary
//! LAZARUS_SIM_CLONES=1                  with snapshots: one cloned into a new volume by the primary
//! LAZARUS_SIM_NODES=5                   five storage nodes (3 to 5), the volume on the first three
//! LAZARUS_SIM_OUT_AFTER=6               out-time in seconds: a node down longer is marked out
//!                                       and its copies are rebuilt on the other nodes
//! lazarus-sim run OPTIONS_JSON          (internal) one seed, its report as one JSON line
//! ```

use lazarus_sim::cluster::{self, Options, Report};
use std::time::Instant;

fn init_log() {
    struct SimTime;
    impl tracing_subscriber::fmt::time::FormatTime for SimTime {
        fn format_time(
            &self,
            w: &mut tracing_subscriber::fmt::format::Writer<'_>,
        ) -> std::fmt::Result {
            write!(w, "{:>9.3}", lazarus_sim::now().as_secs_f64())
        }
    }
    if let Ok(level) = std::env::var("LAZARUS_SIM_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(level)
            .with_timer(SimTime)
            .with_ansi(false)
            .with_writer(std::io::stderr)
            .try_init();
    }
}

fn summary(seed: u64, r: &Report) -> String {
    format!(
        "seed {seed}: ok: {} writes, {} flushes acknowledged, {} reads checked, {} errors during faults, healed in {} ms{}{}",
        r.writes_acked, r.flushes_acked, r.reads_checked, r.errors_during_faults, r.heal_ms,
        if r.reverts_done + r.clones_done > 0 { format!(", {} reverts, {} clones", r.reverts_done, r.clones_done) } else { String::new() },
        if r.unrecoverable_reads > 0 {
            format!(", {} reads of listed unrecoverable blocks answered EIO", r.unrecoverable_reads)
        } else {
            String::new()
        }
    )
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let num = |i: usize, default: u64| -> u64 {
        args.get(i).map_or(default, |s| {
            s.parse().unwrap_or_else(|_| {
                eprintln!("not a number: {s:?}");
                std::process::exit(2)
            })
        })
    };
    match args.first().map(String::as_str) {
        Some("run") => {
            init_log();
            let opts: Options = match args.get(1).map(|s| serde_json::from_str(s)) {
                Some(Ok(o)) => o,
                _ => {
                    eprintln!("usage: lazarus-sim run OPTIONS_JSON");
                    std::process::exit(2)
                }
            };
            let r = cluster::run(opts);
            println!("{}", serde_json::to_string(&r).expect("report serializes"));
        }
        Some("seed") => {
            init_log();
            let seed = num(1, 1);
            let mut o = Options::new(seed);
            o.disk_faults = std::env::var("LAZARUS_SIM_DISK_FAULTS").is_ok_and(|v| v == "1");
            o.device_faults = std::env::var("LAZARUS_SIM_DEVICE_FAULTS").is_ok_and(|v| v == "1");
            o.full_disk = std::env::var("LAZARUS_SIM_FULL_DISK").is_ok_and(|v| v == "1");
            o.conn_cuts = std::env::var("LAZARUS_SIM_CUTS").is_ok_and(|v| v == "1");
            o.handovers = std::env::var("LAZARUS_SIM_HANDOVERS").is_ok_and(|v| v == "1");
            o.snapshots = std::env::var("LAZARUS_SIM_SNAPSHOTS").is_ok_and(|v| v == "1");
            o.reverts = std::env::var("LAZARUS_SIM_REVERTS").is_ok_and(|v| v == "1");
            o.clones = std::env::var("LAZARUS_SIM_CLONES").is_ok_and(|v| v == "1");
            shape_from_env(&mut o);
            o.faults = num(2, o.faults as u64) as usize;
            o.load = std::time::Duration::from_secs(num(3, o.load.as_secs()));
            match cluster::run(o) {
                Ok(r) => {
                    println!("{}\n{}", r.events.join("\n"), summary(seed, &r));
                }
                Err(e) => {
                    println!("{e}");
                    std::process::exit(1)
                }
            }
        }
        Some("sweep") => {
            let (first, count, jobs) = (num(1, 1), num(2, 100), num(3, 2) as usize);
            let exe = std::env::current_exe().expect("own path");
            let t = Instant::now();
            let mut base = Options::new(0);
            base.disk_faults = std::env::var("LAZARUS_SIM_DISK_FAULTS").is_ok_and(|v| v == "1");
            base.device_faults = std::env::var("LAZARUS_SIM_DEVICE_FAULTS").is_ok_and(|v| v == "1");
            base.full_disk = std::env::var("LAZARUS_SIM_FULL_DISK").is_ok_and(|v| v == "1");
            base.conn_cuts = std::env::var("LAZARUS_SIM_CUTS").is_ok_and(|v| v == "1");
            base.handovers = std::env::var("LAZARUS_SIM_HANDOVERS").is_ok_and(|v| v == "1");
            base.snapshots = std::env::var("LAZARUS_SIM_SNAPSHOTS").is_ok_and(|v| v == "1");
            base.reverts = std::env::var("LAZARUS_SIM_REVERTS").is_ok_and(|v| v == "1");
            base.clones = std::env::var("LAZARUS_SIM_CLONES").is_ok_and(|v| v == "1");
            shape_from_env(&mut base);
            base.faults = num(4, base.faults as u64) as usize;
            base.load = std::time::Duration::from_secs(num(5, base.load.as_secs()));
            let results = cluster::sweep(&exe, &base, first, count, jobs);
            let mut failed = Vec::new();
            for (seed, r) in &results {
                match r {
                    Ok(r) => println!("{}", summary(*seed, r)),
                    Err(e) => {
                        println!("{e}");
                        failed.push(*seed);
                    }
                }
            }
            let secs = t.elapsed().as_secs_f64();
            println!(
                "{count} seeds from {first} in {secs:.1} s ({:.0} seeds per minute on {jobs} processes); failed: {failed:?}",
                count as f64 * 60.0 / secs
            );
            if !failed.is_empty() {
                std::process::exit(1)
            }
        }
        _ => {
            eprintln!("usage: lazarus-sim seed SEED | sweep FIRST COUNT [JOBS] | run OPTIONS_JSON");
            std::process::exit(2)
        }
    }
}

/// `LAZARUS_SIM_NODES` and `LAZARUS_SIM_OUT_AFTER`.
fn shape_from_env(o: &mut Options) {
    if let Some(n) = std::env::var("LAZARUS_SIM_NODES")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        o.nodes = n;
    }
    if let Some(s) = std::env::var("LAZARUS_SIM_OUT_AFTER")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        o.out_after_secs = s;
    }
}
