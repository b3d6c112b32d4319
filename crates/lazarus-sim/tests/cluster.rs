//! Three real storage nodes, the recovery server and an NBD client on simulated hosts
//! (`lazarus_sim::cluster`): seeded crashes, partitions and recovery-server crashes
//! under a writing, flushing, reading client; the chaos campaign's rule on every read;
//! a heal phase; every node serving every block after it. Each seed runs in a process
//! of its own (the `lazarus-sim` binary), as replay requires.

use lazarus_sim::cluster::{run_in_process, sweep, Options};
use std::path::Path;
use std::time::Duration;

fn exe() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_lazarus-sim"))
}

#[test]
fn a_cluster_without_faults_serves_and_heals() {
    let mut o = Options::new(1);
    o.faults = 0;
    o.load = Duration::from_secs(5);
    let r = run_in_process(exe(), &o).unwrap_or_else(|e| panic!("{e}"));
    assert!(
        r.writes_acked > 0 && r.flushes_acked > 0 && r.reads_checked > 48,
        "{r:?}"
    );
    assert_eq!(r.errors_during_faults, 0, "{r:?}");
}

#[test]
fn seeds_replay_exactly() {
    for seed in [5, 11, 23] {
        let a = run_in_process(exe(), &Options::new(seed)).unwrap_or_else(|e| panic!("{e}"));
        let b = run_in_process(exe(), &Options::new(seed)).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(a, b, "seed {seed} ran differently the second time");
    }
}

/// Runs `LAZARUS_SIM_SEEDS` seeds (200 unless set) of `o`'s kind; every one must pass.
fn seeds_must_pass(o: &Options) {
    seeds_must_pass_n(o, 200);
}

fn seeds_must_pass_n(o: &Options, default: u64) -> Vec<lazarus_sim::cluster::Report> {
    let n: u64 = std::env::var("LAZARUS_SIM_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default);
    let t = std::time::Instant::now();
    let results = sweep(exe(), o, 1, n, 2);
    let failed: Vec<String> = results
        .iter()
        .filter_map(|(_, r)| r.as_ref().err().cloned())
        .collect();
    let (writes, flushes): (u64, u64) = results
        .iter()
        .filter_map(|(_, r)| r.as_ref().ok())
        .fold((0, 0), |a, r| (a.0 + r.writes_acked, a.1 + r.flushes_acked));
    eprintln!(
        "{n} seeds in {:?}: {writes} writes and {flushes} flushes acknowledged, {} failed",
        t.elapsed(),
        failed.len()
    );
    assert!(
        failed.is_empty(),
        "{} of {n} seeds failed:\n{}",
        failed.len(),
        failed.join("\n\n")
    );
    results.into_iter().filter_map(|(_, r)| r.ok()).collect()
}

/// Five nodes, the volume's copies on the first three, an out-time of 4 s: a node
/// down longer (crashed, or cut off from the leader) is marked out and its copy
/// rebuilt on n4 or n5 while the faults go on, with disk faults and connections cut
/// too; a node that comes back before its replacement is dropped makes a copy too
/// many, and one leaves. Every seed must keep the rule and heal to three live copies
/// with equal roots and no copy left elsewhere; some must end with a copy rebuilt
/// elsewhere (`LAZARUS_SIM_NODES=5 LAZARUS_SIM_OUT_AFTER=4 lazarus-sim sweep` runs
/// more).
#[test]
fn five_nodes_with_copies_rebuilt_elsewhere_break_no_rule() {
    let mut o = options(0, 6, Mix::Cut);
    o.nodes = 5;
    o.out_after_secs = 4;
    let reports = seeds_must_pass_n(&o, 100);
    let moved = reports.iter().filter(|r| r.replicas != [1, 2, 3]).count();
    eprintln!(
        "{moved} of {} seeds ended with a copy rebuilt on n4 or n5",
        reports.len()
    );
    assert!(
        reports.iter().all(|r| r.replicas.len() == 3),
        "{:?}",
        reports.iter().map(|r| &r.replicas).collect::<Vec<_>>()
    );
    assert!(moved * 10 >= reports.len(), "{moved} of {}", reports.len());
}

/// Primary roles handed over on request (`lazarus volume primary`) among every other
/// fault kind, on three nodes: the client writes and reads through whichever node it
/// is connected to while the role moves, the old primary's connections follow it,
/// and no acknowledged write is lost or read stale. Some seeds must see a requested
/// node become the primary (`LAZARUS_SIM_HANDOVERS=1 lazarus-sim sweep` runs more).
#[test]
fn primaries_handed_over_among_faults_break_no_rule() {
    let mut o = options(0, 6, Mix::Cut);
    o.handovers = true;
    let reports = seeds_must_pass_n(&o, 100);
    let met = reports
        .iter()
        .filter(|r| {
            r.events.iter().enumerate().any(|(i, e)| {
                let Some(n) = e
                    .split(" n")
                    .nth(1)
                    .and_then(|t| t.strip_suffix(" asked to be the primary"))
                else {
                    return false;
                };
                let became = format!("primary n{n} at epoch");
                r.events[i..].iter().any(|l| l.contains(&became))
            })
        })
        .count();
    eprintln!(
        "{met} of {} seeds handed the role to a requested node",
        reports.len()
    );
    assert!(met * 4 >= reports.len(), "{met} of {}", reports.len());
}

/// Snapshots taken and deleted by the primary among every other fault kind (handovers
/// too): a copy down, dead or cut off when one is taken installs it from another copy
/// once live, and healed means every copy holds every snapshot the metadata names with
/// one root. The primary also reverts the volume to one of them (once a revert is
/// acknowledged, each block reads as the snapshot held it or as a write sent since,
/// on every copy and after any crash) and clones one into a new volume (whose copies
/// must heal too, every block reading as the snapshot held it through every node)
/// (`LAZARUS_SIM_SNAPSHOTS=1 LAZARUS_SIM_REVERTS=1 LAZARUS_SIM_CLONES=1 lazarus-sim
/// sweep` runs more).
#[test]
fn snapshots_reverts_and_clones_among_faults_reach_every_copy_and_break_no_rule() {
    let mut o = options(0, 6, Mix::Cut);
    o.handovers = true;
    o.snapshots = true;
    o.reverts = true;
    o.clones = true;
    let reports = seeds_must_pass_n(&o, 100);
    let taken = reports
        .iter()
        .filter(|r| r.events.iter().any(|e| e.contains("a snapshot taken")))
        .count();
    assert!(taken * 4 >= reports.len(), "{taken} of {}", reports.len());
    let reverted = reports.iter().filter(|r| r.reverts_done > 0).count();
    assert!(
        reverted * 20 >= reports.len(),
        "{reverted} of {}",
        reports.len()
    );
}

/// Which faults a run draws from besides crashes, holds and recovery-server crashes.
#[derive(Clone, Copy)]
enum Mix {
    Plain,
    /// Bit rot and read errors.
    Disk,
    /// Those and failed devices.
    Device,
    /// Those and full disks.
    Full,
    /// Those and connections cut without a crash.
    Cut,
    /// Those, primaries handed over on request, and snapshots taken and deleted.
    All,
    /// Those, reverts and clones.
    Resets,
}

fn options(seed: u64, faults: usize, mix: Mix) -> Options {
    let mut o = Options::new(seed);
    o.faults = faults;
    o.disk_faults = !matches!(mix, Mix::Plain);
    o.device_faults = matches!(
        mix,
        Mix::Device | Mix::Full | Mix::Cut | Mix::All | Mix::Resets
    );
    o.full_disk = matches!(mix, Mix::Full | Mix::Cut | Mix::All | Mix::Resets);
    o.conn_cuts = matches!(mix, Mix::Cut | Mix::All | Mix::Resets);
    o.handovers = matches!(mix, Mix::All | Mix::Resets);
    o.snapshots = matches!(mix, Mix::All | Mix::Resets);
    o.reverts = matches!(mix, Mix::Resets);
    o.clones = matches!(mix, Mix::Resets);
    o
}

/// The fixed set of seeds of the test command (`scripts/sim.sh` runs thousands).
#[test]
fn two_hundred_seeds_of_faults_break_no_rule() {
    seeds_must_pass(&options(0, 3, Mix::Plain));
}

/// The same with disk faults too: bit rot of slice pages, checksum pages and blocks,
/// and read errors (`LAZARUS_SIM_DISK_FAULTS=1 lazarus-sim sweep` runs more). A page no
/// copy can prove current may answer EIO after the heal, if the primary lists it.
#[test]
fn two_hundred_seeds_with_disk_faults_break_no_rule() {
    seeds_must_pass(&options(0, 3, Mix::Disk));
}

/// Six faults a seed, failed devices among them (one node's block store answering
/// EIO to everything until the fault ends, the node restarting itself once it is
/// usable again) and full disks (one node's disk filled by a ballast file until the
/// fault ends), with disk faults too (`LAZARUS_SIM_FULL_DISK=1
/// LAZARUS_SIM_DEVICE_FAULTS=1 LAZARUS_SIM_DISK_FAULTS=1 lazarus-sim sweep 1 1000 2 6`
/// runs more).
#[test]
fn two_hundred_seeds_with_failed_devices_and_full_disks_break_no_rule() {
    seeds_must_pass(&options(0, 6, Mix::Full));
}

/// Six faults a seed with every kind above and connections cut without a crash: all
/// open connections of one host (a node, the recovery server or the client) fail at
/// once while the processes run on, as a real network's reset does
/// (`LAZARUS_SIM_CUTS=1` with the variables above runs more).
#[test]
fn two_hundred_seeds_with_connections_cut_break_no_rule() {
    seeds_must_pass(&options(0, 6, Mix::Cut));
}

/// Seeds that found bugs, kept as regression tests (RELIABILITY.md, "The whole
/// cluster under the simulator").
#[test]
fn seeds_that_found_bugs_pass() {
    let cases = [
        // A copy left live without the writes its primary acknowledged while it held
        // the volume at the recovery server beyond the metadata (SetRecovery `alone`).
        (7, 6, Mix::Disk),
        // A replica's corrupted slice page was never repaired: the copy stayed live
        // with a page it could not read.
        (175, 3, Mix::Disk),
        // A copy marked dead while its resync ran (a jeopardy holder's late entry) was
        // turned live by that resync's end, without the writes acknowledged meanwhile.
        (2678, 3, Mix::Plain),
        // A replica took a page's damage from its primary in a resync; the primary
        // then repaired the page, and the replica's copy of it differed for ever.
        (8, 6, Mix::Disk),
        // A primary's unrecoverable page kept the other copies resyncing for ever.
        (115, 3, Mix::Disk),
        // A write forwarded before the forwarder crashed landed over a flushed one.
        (222, 6, Mix::Disk),
        // A survivor's copy, holding writes the metadata did not know of when it
        // crashed with the recovery server down, resynced from the old primary; the
        // cluster then adopted it and read zeroes for a flushed block (claims.rs).
        (2421, 3, Mix::Disk),
        // Zeroes read for a flushed block: a copy lacking a damaged page's unknown
        // slots passed for current on it (resync turned it live, repair took its
        // page). The page is unrecoverable here: its blocks answer EIO, listed, and the
        // other copies take its damage from the primary (`Volume::adopt_damage`).
        (14, 6, Mix::Disk),
        // A take-over whose restore failed (its device had failed) was adopted with
        // its stale copy: a read older than a flush.
        (158, 6, Mix::Device),
        // A block lost on its last copy kept every other copy resyncing for ever.
        (909, 6, Mix::Device),
        // A survivor's claim granted but not served was never adopted once adoption
        // waited for take-overs to serve.
        (77, 6, Mix::Device),
        // A resync took damage its primary repaired a moment later; promoted, the copy
        // read zeroes for a flushed block after a restart.
        (2105, 6, Mix::Device),
        // A write made while the primary entering jeopardy was still putting its
        // replicas' unflushed writes on the recovery server was logged before them:
        // the take-over restored an older write of the same block over it.
        (171, 6, Mix::Full),
        // A resync compared its copy with the primary's process just before it
        // restarted without writes its failed device had kept it from syncing: the
        // copy turned live with blocks the primary no longer held (`source`, meta.rs).
        (980, 6, Mix::Cut),
        // A primary holding the volume at the recovery server beyond its metadata
        // (no majority) answered a copy's resync start from its metadata alone; it
        // sent that copy no updates, and the copy turned live without them
        // (`KIND_RESYNC_BEGIN`, resync.rs).
        (3254, 6, Mix::All),
        // A write its connection's node forwarded to a primary that then died waited
        // in the call until the connection broke; the node had become the primary
        // meanwhile and ran it without checking that its client's connection was
        // still open: it landed over a newer write flushed through another node
        // (`Engine::forward`, `Route::Local`).
        (3602, 6, Mix::All),
        // A copy whose store still located a block that bit rot had damaged resynced
        // for ever: the page naming it was never fetched whole (`copy_page`).
        (6468, 10, Mix::All),
        // Two copies had each lost a different page of a snapshot the third missed;
        // it asked each for all of it and never installed it (`install_from`).
        (6491, 10, Mix::All),
        // A snapshot block lost on its only holder was reported as "not fetched"
        // because a copy without the snapshot counted as one that failed to answer
        // (after the change for 6491): the heal check could not tell it from a cluster
        // that had not healed (`fetch_blocks`).
        (13368, 12, Mix::All),
        // A node primary again after another (a hand-over, two crashes, a promotion)
        // put the writes it had noted in its earlier tenure on the recovery server
        // when the volume went into jeopardy; its takeover restored them over newer,
        // flushed ones (`Unflushed::forget_other_tenures`).
        (14193, 6, Mix::All),
        // The leader's view from before a replica was marked dead named it a base of
        // the log at jeopardy entry; with the primary and the other copy down it took
        // over from the log, without the writes acknowledged between its death and the
        // log's start (the leader now names the copies live in the metadata as it is
        // when it claims).
        (27103, 6, Mix::All),
        // A clone made with a copy down and that copy's device failed: the creation
        // torn on it left (in the simulator, where volumes are made in place) a
        // directory that never loaded, and the clone had two copies for good.
        (41801, 8, Mix::Resets),
        // The same torn creation: the simulated disk read the copy made again empty
        // (`lazarus_io::fs::remove_dir_all`).
        (41194, 8, Mix::Resets),
        // A revert while a copy's resync ended: the copy turned live between the
        // primary listing the live copies and sending the resyncing ones back, and
        // kept the blocks the revert undid (`Engine::reset_to_snapshot`).
        (42575, 8, Mix::Resets),
        // A new primary put the volume in jeopardy before comparing its copies: a
        // base copy whose device had lost a write a flush through the primary then
        // vouched for took over from the log and read zeroes (a replica now flushes
        // before it answers the root comparison; jeopardy waits for the comparison).
        (50554, 8, Mix::Resets),
        // Writes from before a revert, not yet flushed on the replicas, were put on
        // the recovery server when the volume entered jeopardy just after it; a base
        // copy's take-over restored them over the revert (a reset flushes first).
        (54872, 8, Mix::Resets),
    ];
    for (seed, faults, mix) in cases {
        run_in_process(exe(), &options(seed, faults, mix))
            .unwrap_or_else(|e| panic!("seed {seed}: {e}"));
    }
    // Five nodes, copies rebuilt elsewhere after 6 s: a copy's snapshot page was
    // damaged before the copy kept it, and the only other copy holding it was rebuilt
    // on another node and deleted, leaving the page on no node (a copy now fetches a
    // snapshot page it lost from the others at once: `heal_snapshot_pages`).
    let mut o = options(33358, 8, Mix::All);
    o.nodes = 5;
    o.out_after_secs = 6;
    run_in_process(exe(), &o).unwrap_or_else(|e| panic!("seed 33358 (five nodes): {e}"));
}

/// A scripted run (forward.rs, `FenceToken`): a write forwarded by a replica is held up
/// in the network while the replica crashes; the client reconnects to the primary,
/// writes the same block again and flushes; the old write then reaches the primary
/// and must not be applied over the flushed one. Several seeds: several timings.
#[test]
fn a_stale_forwarded_write_never_lands_over_a_flushed_one() {
    for seed in 1..=4 {
        match lazarus_sim::cluster::stale_forwarded_write(seed) {
            Ok(m) => eprintln!("seed {seed}: {m}"),
            Err(e) => panic!("seed {seed}: {e}"),
        }
    }
}
