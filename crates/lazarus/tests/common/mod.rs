//! Test harness: starts the real `lazarus` binary as node processes and runs real NBD
//! clients (qemu-img, qemu-io, nbdcopy, nbdinfo, fio) against them.
#![allow(dead_code)]

use serde_json::Value;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_lazarus");

/// Fails loudly when a client tool is missing: a test that silently skips proves
/// nothing. `scripts/test.sh` installs them.
pub fn require(tool: &str) {
    let ok = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(
        ok,
        "{tool} is not installed; run scripts/test.sh, which installs the test clients"
    );
}

pub struct Node {
    pub dir: PathBuf,
    pub config: PathBuf,
    pub child: Option<Child>,
    pub nbd: SocketAddr,
    pub admin: SocketAddr,
}

pub struct NodeOpts {
    pub journal_bytes: u64,
    pub checkpoint_interval_secs: u64,
}

impl Default for NodeOpts {
    fn default() -> Self {
        NodeOpts {
            journal_bytes: 16 << 20,
            checkpoint_interval_secs: 30,
        }
    }
}

/// A free TCP port on 127.0.0.1 (bound and released; fine for tests on loopback).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Node {
    pub fn start(dir: &Path, opts: NodeOpts) -> Node {
        Node::start_with(dir, "t1", "", opts)
    }

    /// Starts a node named `id` with extra TOML appended to its config.
    pub fn start_with(dir: &Path, id: &str, extra: &str, opts: NodeOpts) -> Node {
        std::fs::create_dir_all(dir).unwrap();
        let config = dir.join("node.toml");
        // Tests inject faults: on, unless `extra` says otherwise.
        let faults = if extra.contains("faults =") {
            ""
        } else {
            "faults = true\n"
        };
        std::fs::write(
            &config,
            format!(
                "id = \"{id}\"\ndata_dir = \"{}\"\nnbd_listen = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\njournal_bytes = {}\ncheckpoint_interval_secs = {}\n{faults}{extra}",
                dir.display(),
                opts.journal_bytes,
                opts.checkpoint_interval_secs
            ),
        )
        .unwrap();
        let mut n = Node {
            dir: dir.to_path_buf(),
            config,
            child: None,
            nbd: "0.0.0.0:0".parse().unwrap(),
            admin: "0.0.0.0:0".parse().unwrap(),
        };
        n.spawn();
        n
    }

    pub fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("node.log"))
            .unwrap();
        self.spawn_logging_to(log);
    }

    /// `spawn` with the node's standard output and error going to `log`.
    pub fn spawn_logging_to(&mut self, log: std::fs::File) {
        let _ = std::fs::remove_file(self.dir.join("endpoints.json"));
        let child = Command::new(BIN)
            .args(["node", "--config"])
            .arg(&self.config)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start lazarus node");
        let pid = child.id();
        self.child = Some(child);
        let t0 = Instant::now();
        loop {
            if let Some(s) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("node exited during start ({s}); log:\n{}", self.log());
            }
            if let Ok(t) = std::fs::read(self.dir.join("endpoints.json")) {
                if let Ok(v) = serde_json::from_slice::<Value>(&t) {
                    if v["pid"].as_u64() == Some(pid as u64) {
                        self.nbd = v["nbd"].as_str().unwrap().parse().unwrap();
                        self.admin = v["admin"].as_str().unwrap().parse().unwrap();
                        return;
                    }
                }
            }
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "node did not start; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("node.log")).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait for the clean shutdown.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let t0 = Instant::now();
            loop {
                if let Some(s) = c.try_wait().unwrap() {
                    assert!(s.success(), "node exited with {s}; log:\n{}", self.log());
                    return;
                }
                assert!(t0.elapsed() < Duration::from_secs(60), "node did not stop");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    pub fn uri(&self, vol: &str) -> String {
        format!("nbd://{}/{vol}", self.nbd)
    }

    /// qemu's JSON filename for an NBD export, sized (`raw` driver with `size`).
    pub fn qemu_json(&self, vol: &str, size: u64) -> String {
        format!(
            "json:{{\"driver\":\"raw\",\"size\":{size},\"file\":{{\"driver\":\"nbd\",\"server\":{{\"type\":\"inet\",\"host\":\"{}\",\"port\":\"{}\"}},\"export\":\"{vol}\"}}}}",
            self.nbd.ip(),
            self.nbd.port()
        )
    }

    pub fn api_url(&self) -> String {
        format!("http://{}", self.admin)
    }

    /// Runs a `lazarus` client command against this node.
    pub fn cli(&self, args: &[&str]) -> Output {
        let mut a: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        a.push("--api".into());
        a.push(self.api_url());
        Command::new(BIN).args(&a).output().unwrap()
    }

    /// Runs a client command that must succeed; returns its stdout.
    pub fn cli_ok(&self, args: &[&str]) -> String {
        let o = self.cli(args);
        assert!(
            o.status.success(),
            "lazarus {args:?} failed: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    pub fn create_volume(&self, name: &str, size: &str) {
        let o = self.cli(&["volume", "create", name, "--size", size]);
        assert!(
            o.status.success(),
            "volume create failed: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }

    pub fn api_get(&self, path: &str) -> Value {
        http_get(&format!("{}{path}", self.api_url()))
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill9();
    }
}

pub fn http_get(url: &str) -> Value {
    let o = Command::new("curl")
        .args(["-sf", url])
        .output()
        .expect("curl");
    assert!(o.status.success(), "GET {url} failed");
    serde_json::from_slice(&o.stdout).expect("JSON answer")
}

/// Runs a command, asserting success; returns stdout.
pub fn run(cmd: &str, args: &[&str]) -> String {
    let o = Command::new(cmd)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(
        o.status.success(),
        "{cmd} {args:?} failed ({}):\nstdout: {}\nstderr: {}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn run_out(cmd: &str, args: &[&str]) -> Output {
    Command::new(cmd)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"))
}

pub fn random_file(path: &Path, len: usize, seed: u64) -> Vec<u8> {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut data = vec![0u8; len];
    rng.fill(&mut data);
    std::fs::write(path, &data).unwrap();
    data
}

/// Copies a whole export to a local file with nbdcopy and returns its bytes.
pub fn export_bytes(node: &Node, vol: &str, tmp: &Path) -> Vec<u8> {
    let out = tmp.join(format!("export-{}.img", fastrand::u64(..)));
    run("nbdcopy", &[&node.uri(vol), out.to_str().unwrap()]);
    let b = std::fs::read(&out).unwrap();
    let _ = std::fs::remove_file(&out);
    b
}

pub fn seed() -> u64 {
    let s = std::env::var("LAZARUS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| fastrand::u64(..));
    eprintln!("LAZARUS_SEED={s}");
    s
}

/// A local cluster started the way a user starts one: `lazarus up` (three node
/// processes under one supervisor), driven with the `lazarus` CLI.
pub struct Up {
    pub data: PathBuf,
    pub base: u16,
    child: Option<Child>,
    /// The port slot's lock, held for the life of the cluster (see `claim_ports`).
    _slot: Option<std::fs::File>,
}

/// A port base for a `lazarus up` cluster, unique among every test process running:
/// bases are 40 apart (a cluster uses base..base+30), and each is claimed by an
/// exclusive lock on a file, held while the cluster lives; only then are its ports
/// checked free. Below Linux's ephemeral range (32768-60999), so no test's outgoing
/// connection takes one meanwhile.
pub fn claim_ports() -> (u16, std::fs::File) {
    use std::os::fd::AsRawFd;
    loop {
        let base = 12000 + 40 * fastrand::u16(0..515);
        let f = std::fs::File::create(
            std::env::temp_dir().join(format!("lazarus-test-ports-{base}.lock")),
        )
        .expect("create a port-slot lock file");
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0
            && ports_free(base)
        {
            return (base, f);
        }
    }
}

fn ports_free(base: u16) -> bool {
    // Up to nine nodes: BASE+i, BASE+10+i, BASE+20+i.
    (0..9).all(|i| {
        [base + i, base + 10 + i, base + 20 + i, base + 30]
            .iter()
            .all(|p| std::net::TcpListener::bind(("127.0.0.1", *p)).is_ok())
    })
}

impl Up {
    pub fn start(data: &Path, volume_size: &str) -> Up {
        Up::start_with(data, volume_size, &[])
    }

    /// `start` with more `lazarus up` arguments.
    pub fn start_with(data: &Path, volume_size: &str, extra: &[&str]) -> Up {
        Up::start_full(data, volume_size, extra, None)
    }

    /// `start` on the given port base (a restart on the ports of a stopped cluster).
    pub fn start_on(data: &Path, volume_size: &str, base: u16) -> Up {
        Up::start_full(data, volume_size, &[], Some(base))
    }

    /// `start` with `lazarus up` run from another copy of the binary.
    pub fn start_from(bin: &Path, data: &Path, volume_size: &str) -> Up {
        Up::start_bin(bin, data, volume_size, &[], None, &[])
    }

    fn start_full(data: &Path, volume_size: &str, extra: &[&str], base: Option<u16>) -> Up {
        Up::start_bin(Path::new(BIN), data, volume_size, extra, base, &[])
    }

    /// `start` with more variables in the environment of `lazarus up` (and so of its
    /// nodes and recovery server).
    pub fn start_env(data: &Path, volume_size: &str, env: &[(&str, &str)]) -> Up {
        Up::start_bin(Path::new(BIN), data, volume_size, &[], None, env)
    }

    fn start_bin(
        bin: &Path,
        data: &Path,
        volume_size: &str,
        extra: &[&str],
        base: Option<u16>,
        env: &[(&str, &str)],
    ) -> Up {
        let (base, slot) = match base {
            Some(b) => (b, None),
            None => {
                let (b, f) = claim_ports();
                (b, Some(f))
            }
        };
        let log = std::fs::File::create(data.with_extension("up.log")).unwrap();
        let mut child = Command::new(bin)
            .args(["up", "--data"])
            .arg(data)
            .args([
                "--port-base",
                &base.to_string(),
                "--volume-size",
                volume_size,
            ])
            .args(extra)
            // NBD in the clear for the clients of most tests (`up` requires TLS by
            // default; nbd_tls.rs tests that).
            .args(if extra.contains(&"--nbd-tls") {
                &[][..]
            } else {
                &["--nbd-tls", "on"][..]
            })
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("start lazarus up");
        let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
        let t0 = Instant::now();
        let mut printed = String::new();
        loop {
            let mut line = String::new();
            use std::io::BufRead;
            let n = out.read_line(&mut line).unwrap();
            printed.push_str(&line);
            if line.contains("Press Ctrl-C") {
                break;
            }
            assert!(
                n > 0 && t0.elapsed() < Duration::from_secs(120),
                "lazarus up did not come up; it printed:\n{printed}\nlog:\n{}",
                std::fs::read_to_string(data.with_extension("up.log")).unwrap_or_default()
            );
        }
        // The URIs come first, n1's first.
        let at = |port: u16| printed.find(&format!("://127.0.0.1:{port}/vol0"));
        assert!(
            at(base).is_some() && at(base + 1).is_none_or(|n2| at(base) < Some(n2)),
            "{printed}"
        );
        // Keep draining stdout so the supervisor never blocks on a full pipe.
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut out, &mut std::io::sink());
        });
        Up {
            data: data.to_path_buf(),
            base,
            child: Some(child),
            _slot: slot,
        }
    }

    /// SIGKILL of the `lazarus up` supervisor itself: it cannot stop its children.
    pub fn kill9_supervisor(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// NBD URI of `vol` on node `n` (1-based).
    pub fn uri(&self, n: u16, vol: &str) -> String {
        format!("nbd://127.0.0.1:{}/{vol}", self.base + n - 1)
    }

    pub fn admin(&self, n: u16) -> String {
        format!("http://127.0.0.1:{}", self.base + 10 + n - 1)
    }

    pub fn cli(&self, args: &[&str]) -> Output {
        let mut full: Vec<&str> = args.to_vec();
        let d = self.data.to_str().unwrap().to_string();
        full.push("--data");
        full.push(&d);
        let mut cmd = Command::new(BIN);
        // An address named with --api gets no token from --data (it could be another
        // cluster's): pass it as a user would.
        if args.contains(&"--api") {
            cmd.env("LAZARUS_TOKEN", self.token());
        }
        cmd.args(&full).output().unwrap()
    }

    /// Runs a CLI command that must succeed; returns its stdout.
    pub fn cli_ok(&self, args: &[&str]) -> String {
        let o = self.cli(args);
        assert!(
            o.status.success(),
            "lazarus {args:?} failed: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// `GET` on node n's admin API; `None` when it does not answer.
    pub fn get(&self, n: u16, path: &str) -> Option<Value> {
        let o = Command::new("curl")
            .args(["-sf", "-m", "5", "-H", &self.auth_header()])
            .arg(format!("{}{path}", self.admin(n)))
            .output()
            .ok()?;
        serde_json::from_slice(&o.stdout).ok()
    }

    /// The admin token `lazarus up` made (every admin request but health needs it).
    pub fn token(&self) -> String {
        std::fs::read_to_string(self.data.join("admin.token"))
            .expect("lazarus up keeps its admin token in DATA/admin.token")
            .trim()
            .to_string()
    }

    /// The header carrying it, for curl's -H.
    pub fn auth_header(&self) -> String {
        format!("Authorization: Bearer {}", self.token())
    }

    /// The volume's entry in node n's applied metadata.
    pub fn volume_meta(&self, n: u16, vol: &str) -> Option<Value> {
        let v = self.get(n, "/api/v1/cluster")?;
        let m = v["metadata"]["volumes"][vol].clone();
        (!m.is_null()).then_some(m)
    }

    /// Waits until `pred` holds for the volume's metadata as node n sees it.
    pub fn wait_meta(
        &self,
        n: u16,
        vol: &str,
        within: Duration,
        what: &str,
        pred: impl Fn(&Value) -> bool,
    ) -> Value {
        let t0 = Instant::now();
        loop {
            if let Some(m) = self.volume_meta(n, vol) {
                if pred(&m) {
                    return m;
                }
            }
            assert!(
                t0.elapsed() < within,
                "{what}: not within {within:?}; metadata at n{n}: {:?}",
                self.volume_meta(n, vol)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until every copy of `vol` is live.
    pub fn wait_all_live(&self, n: u16, vol: &str, within: Duration) -> Value {
        self.wait_meta(n, vol, within, "every copy live", |m| {
            m["states"]
                .as_object()
                .is_some_and(|s| s.values().all(|v| v == "live"))
        })
    }

    /// The checksum root of node n's copy of `vol`.
    pub fn root(&self, n: u16, vol: &str) -> String {
        self.get(n, &format!("/api/v1/volumes/{vol}")).unwrap()["root"]
            .as_str()
            .unwrap()
            .to_string()
    }

    pub fn node_pid(&self, n: u16) -> u32 {
        let t = std::fs::read(self.data.join(format!("n{n}")).join("endpoints.json")).unwrap();
        let v: Value = serde_json::from_slice(&t).unwrap();
        v["pid"].as_u64().unwrap() as u32
    }

    /// PID of the recovery server.
    /// A member's cluster credentials (n2's, made by `lazarus up`): what a test acting
    /// as a member of the cluster connects with.
    pub fn member_credentials(&self) -> std::sync::Arc<lazarus_rpc::Credentials> {
        lazarus_rpc::Credentials::load(&self.data.join("certs").join("n2")).unwrap()
    }

    pub fn rs_pid(&self) -> u32 {
        let t = std::fs::read(self.data.join("rs").join("endpoints.json")).unwrap();
        let v: Value = serde_json::from_slice(&t).unwrap();
        v["pid"].as_u64().unwrap() as u32
    }

    pub fn node_log(&self, n: u16) -> String {
        std::fs::read_to_string(self.data.join(format!("n{n}")).join("node.log"))
            .unwrap_or_default()
    }

    /// Ctrl-C: every node stops cleanly.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            unsafe { libc::kill(c.id() as i32, libc::SIGINT) };
            let t0 = Instant::now();
            loop {
                if let Some(s) = c.try_wait().unwrap() {
                    assert!(s.success(), "lazarus up exited with {s}");
                    return;
                }
                if t0.elapsed() > Duration::from_secs(60) {
                    let _ = c.kill();
                    panic!("lazarus up did not stop within 60 s");
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

impl Up {
    /// A failed test's clue, on stderr (which CI keeps for a failed run): each node's
    /// last warnings and its last lines of any level, openraft's chatter left out.
    pub fn dump_warnings(&self) {
        let Ok(dirs) = std::fs::read_dir(&self.data) else {
            return;
        };
        let mut nodes: Vec<PathBuf> = dirs
            .flatten()
            .flat_map(|d| [d.path().join("node.log"), d.path().join("recovery.log")])
            .filter(|p| p.exists())
            .collect();
        nodes.sort();
        // Compact, so that every node's part fits in what CI keeps of a failed run:
        // no date, runs of one message (timestamps aside) shown once with their count.
        let show = |lines: &[&str], last: usize| {
            let mut runs: Vec<(String, usize)> = Vec::new();
            for l in lines {
                let l = l.split_once('T').map_or(*l, |(_, t)| t);
                let body = l.split_once(' ').map_or(l, |(_, b)| b);
                match runs.last_mut() {
                    Some((prev, n)) if prev.split_once(' ').map(|(_, b)| b) == Some(body) => {
                        *n += 1
                    }
                    _ => runs.push((l.chars().take(200).collect(), 1)),
                }
            }
            for (l, n) in &runs[runs.len().saturating_sub(last)..] {
                if *n > 1 {
                    eprintln!("{l} [x{n}]");
                } else {
                    eprintln!("{l}");
                }
            }
        };
        for log in nodes {
            let Ok(text) = std::fs::read_to_string(&log) else {
                continue;
            };
            let lines: Vec<&str> = text.lines().filter(|l| !l.contains("openraft::")).collect();
            let warnings: Vec<&str> = lines
                .iter()
                .copied()
                .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
                .collect();
            eprintln!(
                "--- {}: last warnings (of {}) ---",
                log.display(),
                warnings.len()
            );
            show(&warnings, 12);
            eprintln!("--- {}: last lines ---", log.display());
            show(&lines, 16);
        }
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.dump_warnings();
        }
        if let Some(mut c) = self.child.take() {
            unsafe { libc::kill(c.id() as i32, libc::SIGINT) };
            let t0 = Instant::now();
            while t0.elapsed() < Duration::from_secs(30) {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
