//! Guards the Cluster issue's metadata layer (openraft, every node a voter): three real
//! node processes elect a leader, register in the replicated metadata, replace a
//! leader killed with SIGKILL, take a revived node back, and keep the metadata across
//! SIGKILL of all three.

mod common;
use common::*;
use serde_json::Value;
use std::time::{Duration, Instant};

struct Trio {
    nodes: Vec<Node>,
    /// The claimed port slot (held while the trio lives): its RPC ports are below the
    /// ephemeral range, so no other test's port-0 listener or outgoing connection
    /// takes one between the claim and the node's bind.
    _ports: std::fs::File,
}

impl Trio {
    fn start(root: &std::path::Path) -> Trio {
        let (base, ports) = claim_ports();
        let rpc: Vec<u16> = (0..3).map(|i| base + i).collect();
        let nodes = (0..3)
            .map(|i| {
                let mut extra = format!("rpc_listen = \"127.0.0.1:{}\"\n", rpc[i]);
                for (j, port) in rpc.iter().enumerate().filter(|(j, _)| *j != i) {
                    extra.push_str(&format!(
                        "[[peers]]\nid = \"n{}\"\nrpc = \"127.0.0.1:{port}\"\n",
                        j + 1
                    ));
                }
                Node::start_with(
                    &root.join(format!("n{}", i + 1)),
                    &format!("n{}", i + 1),
                    &extra,
                    NodeOpts::default(),
                )
            })
            .collect();
        Trio {
            nodes,
            _ports: ports,
        }
    }

    /// Waits until every running node has finished its start-up check (it takes
    /// replicated updates only from then on).
    fn wait_ready(&self, within: Duration) {
        let t0 = Instant::now();
        while !(0..3)
            .filter(|i| self.nodes[*i].child.is_some())
            .all(|i| self.cluster(i).is_some_and(|v| v["ready"] == true))
        {
            assert!(t0.elapsed() < within, "nodes not ready within {within:?}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn cluster(&self, i: usize) -> Option<Value> {
        self.nodes[i].child.as_ref()?;
        let o = std::process::Command::new("curl")
            .args([
                "-sf",
                &format!("{}/api/v1/cluster", self.nodes[i].api_url()),
            ])
            .output()
            .ok()?;
        serde_json::from_slice(&o.stdout).ok()
    }

    /// Waits until every running node reports the same leader and `registered` nodes
    /// in the metadata; returns the leader's id.
    fn agreed_leader(&self, registered: usize, within: Duration) -> u64 {
        self.agreed_leader_other_than(None, registered, within)
    }

    fn agreed_leader_other_than(
        &self,
        old: Option<u64>,
        registered: usize,
        within: Duration,
    ) -> u64 {
        let t0 = Instant::now();
        loop {
            let views: Vec<Value> = (0..3).filter_map(|i| self.cluster(i)).collect();
            let running = self.nodes.iter().filter(|n| n.child.is_some()).count();
            if views.len() == running {
                let leaders: Vec<Option<u64>> =
                    views.iter().map(|v| v["leader"].as_u64()).collect();
                let regs: Vec<usize> = views
                    .iter()
                    .map(|v| v["metadata"]["nodes"].as_object().map_or(0, |m| m.len()))
                    .collect();
                if let Some(Some(l)) = leaders.first() {
                    if Some(*l) != old
                        && leaders.iter().all(|x| *x == Some(*l))
                        && regs.iter().all(|r| *r >= registered)
                    {
                        return *l;
                    }
                }
            }
            assert!(
                t0.elapsed() < within,
                "no agreed leader within {within:?}: {views:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

#[test]
fn leader_election_failover_rejoin_and_durable_metadata() {
    let tmp = tempfile::tempdir().unwrap();
    let mut t = Trio::start(tmp.path());
    let leader = t.agreed_leader(3, Duration::from_secs(30));
    let v = t.cluster(0).unwrap();
    assert_eq!(
        v["members"].as_array().unwrap().len(),
        3,
        "every node is a voter: {v}"
    );
    let nodes = v["metadata"]["nodes"].as_object().unwrap();
    assert_eq!(nodes["2"]["name"], "n2");
    assert!(nodes["3"]["nbd"]
        .as_str()
        .unwrap()
        .starts_with("127.0.0.1:"));

    // The leader dies: the survivors elect another within the failover budget.
    let idx = (leader - 1) as usize;
    let t0 = Instant::now();
    t.nodes[idx].kill9();
    let new_leader = t.agreed_leader_other_than(Some(leader), 3, Duration::from_secs(10));
    let took = t0.elapsed();
    assert_ne!(new_leader, leader);
    eprintln!("new leader {new_leader} elected {took:?} after SIGKILL of leader {leader}");
    assert!(
        took < Duration::from_secs(5),
        "leader replaced after {took:?}"
    );

    // The killed node comes back and follows the new leader.
    t.nodes[idx].spawn();
    assert_eq!(t.agreed_leader(3, Duration::from_secs(20)), new_leader);

    // All three killed at once: the metadata (log, vote, applied state) survives.
    for n in t.nodes.iter_mut() {
        n.kill9();
    }
    for n in t.nodes.iter_mut() {
        n.spawn();
    }
    t.agreed_leader(3, Duration::from_secs(30));
    let v = t.cluster(1).unwrap();
    assert_eq!(v["metadata"]["nodes"].as_object().unwrap().len(), 3, "{v}");
    assert!(
        v["term"].as_u64().unwrap() >= 2,
        "a new term after the restarts: {v}"
    );
}

fn root(n: &Node, vol: &str) -> String {
    n.api_get(&format!("/api/v1/volumes/{vol}"))["root"]
        .as_str()
        .unwrap()
        .to_string()
}

/// Guards the write path (DESIGN.md steps 1-4, 6): a write acknowledged by the primary
/// is on every live copy (equal checksum roots); a replica that cannot take an update
/// is marked dead in committed metadata *before* the write is acknowledged — with no
/// Raft majority left to commit that, the write fails instead of being acknowledged.
#[test]
fn synchronous_replication_and_dead_replica_before_ack() {
    require("nbdcopy");
    require("qemu-io");
    let tmp = tempfile::tempdir().unwrap();
    let mut t = Trio::start(tmp.path());
    t.agreed_leader(3, Duration::from_secs(30));
    t.wait_ready(Duration::from_secs(30));
    let o = t.nodes[0].cli(&["volume", "create", "rv", "--size", "64MiB"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // Every hosting node materializes its copy from the metadata.
    for n in &t.nodes {
        let t0 = Instant::now();
        while n
            .api_get("/api/v1/volumes")
            .as_array()
            .unwrap()
            .iter()
            .all(|v| v["name"] != "rv")
        {
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "copy of rv not created"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    let img = tmp.path().join("in.img");
    let data = random_file(&img, 16 << 20, 42);
    run("nbdcopy", &[img.to_str().unwrap(), &t.nodes[0].uri("rv")]);
    let out = export_bytes(&t.nodes[0], "rv", tmp.path());
    assert!(out[..data.len()] == data[..]);
    let roots: Vec<String> = t.nodes.iter().map(|n| root(n, "rv")).collect();
    assert_ne!(roots[0], "0".repeat(32));
    assert!(
        roots.iter().all(|r| *r == roots[0]),
        "checksum roots differ across copies: {roots:?}"
    );
    // A non-primary serves the volume too, by forwarding to the primary.
    let via_n2 = export_bytes(&t.nodes[1], "rv", tmp.path());
    assert!(via_n2[..data.len()] == data[..], "read through n2 differs");

    // Replica n3 dies: the next write is acknowledged only once n3 is committed dead.
    t.nodes[2].kill9();
    run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x5a 0 64k",
            "-c",
            "flush",
            &t.nodes[0].uri("rv"),
        ],
    );
    let meta = t.cluster(0).unwrap()["metadata"]["volumes"]["rv"].clone();
    assert_eq!(meta["states"]["3"], "dead", "{meta}");
    // `lazarus status` shows it, as a table and in --json.
    let o = t.nodes[0].cli(&["status"]);
    let table = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        o.status.success() && table.contains("n3:dead") && table.contains("primary n1"),
        "{table}"
    );
    let o = t.nodes[0].cli(&["status", "--json"]);
    let j: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        j["cluster"]["metadata"]["volumes"]["rv"]["states"]["3"],
        "dead"
    );
    assert_eq!(meta["states"]["2"], "live", "{meta}");
    assert_eq!(
        root(&t.nodes[0], "rv"),
        root(&t.nodes[1], "rv"),
        "live copies must stay identical"
    );
    run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "read -P 0x5a 0 64k",
            &t.nodes[0].uri("rv"),
        ],
    );

    // Replica n2 dies too: no majority can commit n2's death, so the write must fail.
    t.nodes[1].kill9();
    let o = run_out(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x77 0 4k",
            &t.nodes[0].uri("rv"),
        ],
    );
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        !o.status.success() && text.contains("Input/output error"),
        "a write was acknowledged without its replica state committed: {text}"
    );
}

/// Guards failover (Cluster issue, item 5): the primary killed with SIGKILL is replaced
/// by a live replica within 5 s, the epoch is bumped, and a client reconnecting to the
/// new primary reads every write flushed before the kill.
#[test]
fn primary_killed_failover_within_5s_keeps_flushed_writes() {
    require("nbdcopy");
    require("qemu-io");
    let tmp = tempfile::tempdir().unwrap();
    let mut t = Trio::start(tmp.path());
    t.agreed_leader(3, Duration::from_secs(30));
    t.wait_ready(Duration::from_secs(30));
    let o = t.nodes[0].cli(&["volume", "create", "fv", "--size", "32MiB"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let img = tmp.path().join("in.img");
    let data = random_file(&img, 8 << 20, 7);
    // nbdcopy flushes before it exits.
    let t_copy = Instant::now();
    loop {
        let o = run_out("nbdcopy", &[img.to_str().unwrap(), &t.nodes[0].uri("fv")]);
        if o.status.success() {
            break;
        }
        // The replicas' copies may still be materializing right after the create.
        assert!(
            t_copy.elapsed() < Duration::from_secs(10),
            "nbdcopy failed: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // Every copy live (one that missed an update while its copy was being created
    // resyncs first): only a live replica may be promoted.
    let t_live = Instant::now();
    while !t.cluster(0).is_some_and(|v| {
        v["metadata"]["volumes"]["fv"]["states"]
            .as_object()
            .is_some_and(|s| s.values().all(|x| x == "live"))
    }) {
        assert!(
            t_live.elapsed() < Duration::from_secs(20),
            "copies not live"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let t0 = Instant::now();
    t.nodes[0].kill9();
    let (primary, epoch) = loop {
        if let Some(v) = t.cluster(1) {
            let fv = &v["metadata"]["volumes"]["fv"];
            if fv["primary"].as_u64().is_some_and(|p| p != 1) {
                break (
                    fv["primary"].as_u64().unwrap(),
                    fv["epoch"].as_u64().unwrap(),
                );
            }
        }
        assert!(t0.elapsed() < Duration::from_secs(15), "no failover");
        std::thread::sleep(Duration::from_millis(50));
    };
    let took = t0.elapsed();
    eprintln!("primary failed over to node {primary} (epoch {epoch}) {took:?} after SIGKILL");
    assert!(took < Duration::from_secs(5), "failover took {took:?}");
    assert_eq!(epoch, 2);
    let out = export_bytes(&t.nodes[(primary - 1) as usize], "fv", tmp.path());
    assert!(
        out[..data.len()] == data[..],
        "the new primary lost flushed data"
    );
    // The new primary takes writes (replicated to the remaining live copy).
    run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x33 0 4k",
            "-c",
            "read -P 0x33 0 4k",
            &t.nodes[(primary - 1) as usize].uri("fv"),
        ],
    );
}
