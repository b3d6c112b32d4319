//! The recovery server (the real `lazarus-recovery` code) on a simulated host with a
//! simulated disk, crashed at seeded instants while a holder appends changed blocks to
//! a volume's log and the log is compacted again and again (threshold 64 KiB): a
//! crash loses every write, creation, rename and deletion not yet synced. After each
//! restart, and at the end, a restore (the reads a rejoining copy makes) must find
//! every block at the last version the server acknowledged, or a later one it was
//! sent, never an older one and never damaged. Each seed replays exactly.

use lazarus_recovery::log::RecordKind;
use lazarus_recovery::server::{AppendReq, ClaimReply, ClaimReq, ReadReply, ReadReq, VolumeState};
use lazarus_rpc::{self as rpc, Refusal, RpcClient};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

const BLOCKS: u64 = 24;
const APPENDS: u64 = 600;
const CALL: Duration = Duration::from_secs(2);

fn block(lba: u64, version: u64) -> Vec<u8> {
    let mut b = vec![(version % 251) as u8; 4096];
    b[..8].copy_from_slice(&lba.to_le_bytes());
    b[8..16].copy_from_slice(&version.to_le_bytes());
    b
}

/// The version a restored block holds, or why it is not a block of ours.
fn version_of(lba: u64, data: &[u8]) -> Result<u64, String> {
    let l = u64::from_le_bytes(data[..8].try_into().unwrap());
    let v = u64::from_le_bytes(data[8..16].try_into().unwrap());
    if l != lba || data != block(lba, v).as_slice() {
        return Err(format!("block {lba}: damaged or misplaced data"));
    }
    Ok(v)
}

/// Reads the whole log as a restore does: block -> version.
async fn restore(c: &RpcClient) -> Result<BTreeMap<u64, u64>, String> {
    'again: loop {
        let (mut offset, mut generation) = (0, 0);
        let mut vol = BTreeMap::new();
        loop {
            let body = serde_json::to_vec(&ReadReq {
                volume: "vol0".into(),
                uid: 1,
                offset,
                max_bytes: 1 << 20,
                lbas: None,
                latest: true,
                generation,
            })
            .unwrap();
            let b = match c.call(rpc::KIND_RS_READ, &body, CALL).await {
                Ok(b) => b,
                Err(e) if e.code() == Some(Refusal::Restart) => continue 'again,
                Err(e) => return Err(e.to_string()),
            };
            let (json, raw) = rpc::unpack(&b)?;
            let rr: ReadReply = serde_json::from_slice(json).map_err(|e| e.to_string())?;
            if !rr.damaged.is_empty() {
                return Err(format!("damaged log: {:?}", rr.damaged));
            }
            let mut at = 0;
            for w in rr.records {
                let data = &raw[at..at + w.data_len as usize];
                vol.insert(w.lba, version_of(w.lba, data)?);
                at += w.data_len as usize;
            }
            if rr.done {
                return Ok(vol);
            }
            (offset, generation) = (rr.next, rr.generation);
        }
    }
}

#[derive(Default)]
struct Books {
    /// Highest version acknowledged (stored) per block.
    acked: BTreeMap<u64, u64>,
    /// Highest version sent per block.
    sent: BTreeMap<u64, u64>,
}

fn check(books: &Books, got: &BTreeMap<u64, u64>) -> Result<(), String> {
    for (lba, acked) in &books.acked {
        match got.get(lba) {
            None => return Err(format!("block {lba}: acknowledged version {acked} lost")),
            Some(v) if v < acked => {
                return Err(format!(
                    "block {lba}: version {v}, older than acknowledged {acked}"
                ))
            }
            Some(v) if v > &books.sent[lba] => {
                return Err(format!("block {lba}: version {v} was never sent"))
            }
            _ => {}
        }
    }
    Ok(())
}

fn run(seed: u64) -> Vec<String> {
    let trace = Arc::new(Mutex::new(Vec::<String>::new()));
    let mut sim = lazarus_sim::simulation(seed, Duration::from_secs(600));
    sim.host("rs", || lazarus_sim::serve_rs(Some(64 << 10)));
    let t = trace.clone();
    sim.client("holder", async move {
        let log = |s: String| t.lock().unwrap().push(format!("{:?} {s}", lazarus_sim::now()));
        let mut rng = fastrand::Rng::with_seed(seed);
        let c = RpcClient::new("rs:7000");
        let claim = serde_json::to_vec(&ClaimReq {
            base_index: None,
            volume: "vol0".into(),
            uid: 1,
            expect_fcid: 0,
            holder: 1,
            epoch: 1,
            jeopardy: true,
            config: None,
            base: vec![1, 2],
            takeover: false,
            survivor_of: None,
        })
        .unwrap();
        let r: ClaimReply = loop {
            if let Ok(b) = c.call(rpc::KIND_RS_CLAIM, &claim, CALL).await {
                break serde_json::from_slice(&b).unwrap();
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        assert!(r.granted, "{r:?}");
        let mut books = Books::default();
        let (mut errors, mut checks) = (0u64, 0u64);
        for _ in 0..APPENDS {
            let lba = rng.u64(0..BLOCKS);
            let version = books.sent.get(&lba).copied().unwrap_or(0) + 1;
            books.sent.insert(lba, version);
            let req = serde_json::to_vec(&AppendReq {
                volume: "vol0".into(),
                uid: 1,
                fcid: r.coord.fcid,
                holder: 1,
                epoch: 1,
                kind: RecordKind::Write,
                lba,
                count: 1,
            })
            .unwrap();
            let body = rpc::pack(&req, &block(lba, version));
            match c.call(rpc::KIND_RS_APPEND, &body, CALL).await {
                Ok(_) => {
                    books.acked.insert(lba, version);
                }
                Err(e) => {
                    // Down (crashed) or failed: not acknowledged. After a restart,
                    // a restore must still hold everything acknowledged before.
                    errors += 1;
                    log(format!("append failed: {e}"));
                    loop {
                        tokio::time::sleep(Duration::from_millis(300)).await;
                        let r = restore(&c).await;
                        if errors < 3 {
                            log(format!("restore: {:?}", r.as_ref().err()));
                        }
                        if let Ok(got) = r {
                            check(&books, &got).map_err(|e| format!("after a restart: {e}"))?;
                            checks += 1;
                            break;
                        }
                    }
                }
            }
            if rng.u8(..) < 16 {
                tokio::time::sleep(Duration::from_millis(rng.u64(1..200))).await;
            }
        }
        // The crashes go on meanwhile (up to ten of them): a final read cut by one is
        // made again once the server is back.
        let mut tries = 0;
        let got = loop {
            match restore(&c).await {
                Ok(got) => break got,
                Err(e) if tries < 20 => log(format!("final restore: {e}")),
                Err(e) => return Err(e.into()),
            }
            tries += 1;
            tokio::time::sleep(Duration::from_millis(300)).await;
        };
        check(&books, &got)?;
        // Compacted: the log holds about a record a block, not every append.
        let b = loop {
            match c.call(rpc::KIND_RS_STATE, b"", CALL).await {
                Ok(b) => break b,
                Err(e) if tries < 20 && e.is_unreachable() => log(format!("state: {e}")),
                Err(e) => return Err(e.into()),
            }
            tries += 1;
            tokio::time::sleep(Duration::from_millis(300)).await;
        };
        let st: std::collections::HashMap<String, VolumeState> = serde_json::from_slice(&b)?;
        let bytes = st["vol0"].log_bytes;
        assert!(
            bytes < 384 << 10,
            "log of {bytes} bytes after {APPENDS} appends of 4 KiB: not compacted"
        );
        log(format!(
            "{} acknowledged of {APPENDS}, {errors} failed, {checks} restores after restarts, final {got:?}",
            books.acked.values().count()
        ));
        Ok(())
    });
    let mut rng = fastrand::Rng::with_seed(seed ^ 0x5eed);
    let mut next_crash = Duration::from_millis(rng.u64(300..3000));
    let mut crashes = 0;
    loop {
        match sim.step() {
            Ok(true) => break,
            Ok(false) => {}
            Err(e) => {
                trace
                    .lock()
                    .unwrap()
                    .push(format!("simulation failed: {e}"));
                break;
            }
        }
        if crashes < 10 && sim.elapsed() >= next_crash {
            sim.crash("rs");
            sim.bounce("rs");
            crashes += 1;
            trace
                .lock()
                .unwrap()
                .push(format!("{:?} rs crashed and restarted", sim.elapsed()));
            next_crash = sim.elapsed() + Duration::from_millis(rng.u64(300..3000));
        }
    }
    let out = trace.lock().unwrap().clone();
    out
}

#[test]
fn recovery_server_crashed_at_random_keeps_every_acknowledged_block() {
    for seed in 1..=100u64 {
        let a = run(seed);
        assert!(a.iter().any(|l| l.contains("acknowledged of")), "{a:#?}");
        assert_eq!(a, run(seed), "seed {seed} did not replay exactly");
    }
}

/// The coordination point's compare-and-set under crashes: two copies claim the volume
/// in turn (each after reading the failure count ID) while the recovery server crashes
/// every 0.3 to 4 s. Every grant has its own failure count ID, the IDs granted only
/// grow, and no state read sent after a grant was answered shows an ID below it: a
/// grant, once answered, survives the crash.
fn run_claims(seed: u64) -> Vec<String> {
    let grants = Arc::new(Mutex::new(Vec::<(u64, u64)>::new()));
    let trace = Arc::new(Mutex::new(Vec::<String>::new()));
    let mut sim = lazarus_sim::simulation(seed, Duration::from_secs(600));
    sim.host("rs", || lazarus_sim::serve_rs(None));
    for holder in [1u64, 2] {
        let grants = grants.clone();
        let t = trace.clone();
        sim.client(format!("n{holder}"), async move {
            let mut rng = fastrand::Rng::with_seed(seed * 10 + holder);
            let c = RpcClient::new("rs:7000");
            let mut seen = 0u64;
            for _ in 0..40 {
                tokio::time::sleep(Duration::from_millis(rng.u64(50..1500))).await;
                let top = grants
                    .lock()
                    .unwrap()
                    .iter()
                    .map(|g| g.0)
                    .max()
                    .unwrap_or(0);
                let Ok(b) = c.call(rpc::KIND_RS_STATE, b"", CALL).await else {
                    continue;
                };
                let st: std::collections::HashMap<String, VolumeState> =
                    serde_json::from_slice(&b)?;
                let fcid = st.get("vol0").map_or(0, |s| s.coord.fcid);
                // Never below a grant answered (to anyone) before this read was sent.
                assert!(
                    fcid >= top,
                    "failure count ID {fcid} after a grant of {top}"
                );
                assert!(
                    fcid >= seen,
                    "failure count ID went back from {seen} to {fcid}"
                );
                seen = fcid;
                let claim = serde_json::to_vec(&ClaimReq {
                    base_index: None,
                    volume: "vol0".into(),
                    uid: 1,
                    expect_fcid: fcid,
                    holder,
                    epoch: 1,
                    jeopardy: false,
                    config: None,
                    base: vec![],
                    takeover: false,
                    survivor_of: None,
                })
                .unwrap();
                if let Ok(b) = c.call(rpc::KIND_RS_CLAIM, &claim, CALL).await {
                    let r: ClaimReply = serde_json::from_slice(&b)?;
                    if r.granted {
                        let mut g = grants.lock().unwrap();
                        assert!(
                            g.iter().all(|(f, _)| *f < r.coord.fcid),
                            "grant of {} after {g:?}",
                            r.coord.fcid
                        );
                        g.push((r.coord.fcid, holder));
                        t.lock().unwrap().push(format!(
                            "{:?} n{holder} granted {}",
                            lazarus_sim::now(),
                            r.coord.fcid
                        ));
                    }
                }
            }
            Ok(())
        });
    }
    let mut rng = fastrand::Rng::with_seed(seed ^ 0xc1a1);
    let mut next_crash = Duration::from_millis(rng.u64(300..4000));
    loop {
        match sim.step() {
            Ok(true) => break,
            Ok(false) => {}
            Err(e) => {
                trace
                    .lock()
                    .unwrap()
                    .push(format!("simulation failed: {e}"));
                break;
            }
        }
        if sim.elapsed() >= next_crash {
            sim.crash("rs");
            sim.bounce("rs");
            trace
                .lock()
                .unwrap()
                .push(format!("{:?} rs crashed and restarted", sim.elapsed()));
            next_crash = sim.elapsed() + Duration::from_millis(rng.u64(300..4000));
        }
    }
    let out = trace.lock().unwrap().clone();
    out
}

#[test]
fn grants_of_the_coordination_point_survive_crashes() {
    for seed in 1..=50u64 {
        let a = run_claims(seed);
        assert!(
            !a.iter().any(|l| l.starts_with("simulation failed")),
            "seed {seed}: {a:#?}"
        );
        assert!(
            a.iter().filter(|l| l.contains("granted")).count() >= 2,
            "seed {seed}: {a:#?}"
        );
        // Not compared with a second run: with the server crashing under two
        // clients, a run still depends on what ran before it in the process
        // (docs/simulator.md, "Open"); the safety checks hold on every run.
    }
}
