//! Runs the model checker from the command line (scripts/model.sh).
//!
//! `lazarus-model [--depth D] [--config NAME] [--bug FLAG]... [--threads T] [--survivor]`
//! Configurations: `normal`, `protected`, `rs`, `small`, `small-protected`, `survivor`,
//! `survivor-crash` (see `lazarus_model::configs`); `--survivor` adds the
//! surviving-replica protocol to any of them.

use lazarus_model::{check, check_healing, check_only, configs, Bugs, Run, SAFETY};
use std::process::ExitCode;

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let mut depth = 22usize;
    let mut names: Vec<String> = Vec::new();
    let mut bugs = Bugs::default();
    let mut threads = 1usize;
    let mut timeout = None;
    let mut per_property = false;
    let mut first = false;
    let mut heal: Option<usize> = None;
    let mut survivor = false;
    while let Some(a) = args.next() {
        let mut val = || args.next().unwrap_or_default();
        match a.as_str() {
            "--depth" => depth = val().parse().unwrap_or(depth),
            "--config" => names.push(val()),
            "--threads" => threads = val().parse().unwrap_or(1),
            "--timeout" => timeout = val().parse::<u64>().ok(),
            "--per-property" => per_property = true,
            "--first" => first = true,
            "--survivor" => survivor = true,
            "--heal" => heal = val().parse().ok(),
            "--bug" => match val().as_str() {
                "unchecked_fence" | "bug0" => bugs.unchecked_fence = true,
                "no_reconcile" | "bug2" => bugs.no_reconcile = true,
                "jeopardy_isolated_ack" | "bug3" => bugs.jeopardy_isolated_ack = true,
                "acts_before_caught_up" => bugs.acts_before_caught_up = true,
                other if bugs.set(other) => {}
                other => {
                    eprintln!("unknown bug flag {other:?}");
                    return ExitCode::from(2);
                }
            },
            d if d.parse::<usize>().is_ok() => depth = d.parse().unwrap_or(depth),
            other => {
                eprintln!("unknown argument {other:?}");
                return ExitCode::from(2);
            }
        }
    }
    if names.is_empty() {
        names = configs().iter().map(|(n, _)| n.to_string()).collect();
    }
    let mut failed = false;
    for name in &names {
        let Some((_, mut cfg)) = configs().into_iter().find(|(n, _)| n == name) else {
            eprintln!("unknown configuration {name:?}");
            return ExitCode::from(2);
        };
        cfg.bugs = bugs;
        cfg.survivor |= survivor;
        let run = Run {
            depth,
            first,
            threads,
            timeout: timeout.map(std::time::Duration::from_secs),
        };
        println!("== configuration {name}: {cfg:?}");
        if let Some(bound) = heal {
            let r = check_healing(cfg, depth, bound);
            print!("{r}");
            failed |= r.stuck.is_some();
            continue;
        }
        if per_property {
            for p in SAFETY {
                let key = p.split('.').next().unwrap_or(p);
                let report = check_only(cfg, run, Some(key));
                println!("-- property {p}");
                print!("{report}");
                failed |= !report.violations.is_empty();
            }
            continue;
        }
        let report = check(cfg, run);
        print!("{report}");
        failed |= !report.violations.is_empty();
    }
    if failed {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}
