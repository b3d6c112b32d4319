//! `lazarus-sim`: runs the cluster simulation (`lazarus_sim::cluster`), one seed per
//! process so that every seed replays exactly.
//!
//! ```text
//! lazarus-sim seed SEED                 one seed; its events, and the log with LAZARUS_SIM_LOG=debug
//! lazarus-sim sweep FIRST COUNT [JOBS]  seeds FIRST.. on JOBS processes (default 2); exit 1 on a failure
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
        "seed {seed}: ok: {} writes, {} flushes acknowledged, {} reads checked, {} errors during faults, healed in {} ms",
        r.writes_acked, r.flushes_acked, r.reads_checked, r.errors_during_faults, r.heal_ms
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
            match cluster::run(Options::new(seed)) {
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
            let results = cluster::sweep(&exe, &Options::new(0), first, count, jobs);
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
