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
        std::fs::write(
            &config,
            format!(
                "id = \"{id}\"\ndata_dir = \"{}\"\nnbd_listen = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\njournal_bytes = {}\ncheckpoint_interval_secs = {}\n{extra}",
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
        let _ = std::fs::remove_file(self.dir.join("endpoints.json"));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("node.log"))
            .unwrap();
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
