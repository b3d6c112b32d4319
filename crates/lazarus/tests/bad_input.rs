//! Guards: malformed or hostile NBD traffic gets an NBD error reply or a closed
//! connection, never a crash; the server keeps serving other clients meanwhile.
//! Error codes as proto.md's "Error values" section says.

mod common;
use common::*;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
const REQ_MAGIC: u32 = 0x2560_9513;

fn connect(node: &Node) -> TcpStream {
    let s = TcpStream::connect(node.nbd).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

fn greet(s: &mut TcpStream) {
    let mut g = [0u8; 18];
    s.read_exact(&mut g).unwrap();
    assert_eq!(&g[0..8], b"NBDMAGIC");
    s.write_all(&3u32.to_be_bytes()).unwrap(); // FIXED_NEWSTYLE | NO_ZEROES
}

fn send_opt(s: &mut TcpStream, opt: u32, data: &[u8]) {
    let mut b = IHAVEOPT.to_be_bytes().to_vec();
    b.extend_from_slice(&opt.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    s.write_all(&b).unwrap();
}

/// Reads one option reply: (option, type, data).
fn opt_reply(s: &mut TcpStream) -> (u32, u32, Vec<u8>) {
    let mut h = [0u8; 20];
    s.read_exact(&mut h).unwrap();
    let len = u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize;
    let mut d = vec![0u8; len];
    s.read_exact(&mut d).unwrap();
    (
        u32::from_be_bytes(h[8..12].try_into().unwrap()),
        u32::from_be_bytes(h[12..16].try_into().unwrap()),
        d,
    )
}

/// Handshake to transmission on `vol` with NBD_OPT_GO, simple replies.
fn open(node: &Node, vol: &str) -> TcpStream {
    let mut s = connect(node);
    greet(&mut s);
    let mut d = (vol.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(vol.as_bytes());
    d.extend_from_slice(&0u16.to_be_bytes());
    send_opt(&mut s, 7, &d);
    loop {
        let (_, ty, _) = opt_reply(&mut s);
        if ty == 1 {
            return s;
        }
        assert_eq!(ty, 3, "expected NBD_REP_INFO or ACK, got {ty:#x}");
    }
}

fn request(
    s: &mut TcpStream,
    flags: u16,
    ty: u16,
    cookie: u64,
    offset: u64,
    len: u32,
    payload: &[u8],
) {
    let mut b = REQ_MAGIC.to_be_bytes().to_vec();
    b.extend_from_slice(&flags.to_be_bytes());
    b.extend_from_slice(&ty.to_be_bytes());
    b.extend_from_slice(&cookie.to_be_bytes());
    b.extend_from_slice(&offset.to_be_bytes());
    b.extend_from_slice(&len.to_be_bytes());
    b.extend_from_slice(payload);
    s.write_all(&b).unwrap();
}

/// Reads a simple reply: (error, cookie).
fn simple(s: &mut TcpStream) -> (u32, u64) {
    let mut h = [0u8; 16];
    s.read_exact(&mut h).unwrap();
    assert_eq!(u32::from_be_bytes(h[0..4].try_into().unwrap()), 0x6744_6698);
    (
        u32::from_be_bytes(h[4..8].try_into().unwrap()),
        u64::from_be_bytes(h[8..16].try_into().unwrap()),
    )
}

fn closed(s: &mut TcpStream) -> bool {
    let mut b = [0u8; 1];
    matches!(s.read(&mut b), Ok(0) | Err(_))
}

fn assert_serving(node: &Node) {
    let mut s = open(node, "vol0");
    request(&mut s, 0, 0, 99, 0, 4096, &[]);
    let (err, cookie) = simple(&mut s);
    assert_eq!((err, cookie), (0, 99));
    let mut d = vec![0u8; 4096];
    s.read_exact(&mut d).unwrap();
}

#[test]
fn handshake_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let node = Node::start(&tmp.path().join("n"), NodeOpts::default());
    node.create_volume("vol0", "1MiB");

    // Client flags without FIXED_NEWSTYLE: closed.
    let mut s = connect(&node);
    let mut g = [0u8; 18];
    s.read_exact(&mut g).unwrap();
    s.write_all(&0u32.to_be_bytes()).unwrap();
    assert!(closed(&mut s));

    // Bad option magic: closed.
    let mut s = connect(&node);
    greet(&mut s);
    s.write_all(&[0xde; 16]).unwrap();
    assert!(closed(&mut s));

    // Unknown option: NBD_REP_ERR_UNSUP, and the handshake goes on to GO.
    let mut s = connect(&node);
    greet(&mut s);
    send_opt(&mut s, 4242, b"junk");
    let (opt, ty, _) = opt_reply(&mut s);
    assert_eq!((opt, ty), (4242, (1 << 31) + 1));
    // Unknown export with GO: NBD_REP_ERR_UNKNOWN.
    let mut d = 4u32.to_be_bytes().to_vec();
    d.extend_from_slice(b"nope");
    d.extend_from_slice(&0u16.to_be_bytes());
    send_opt(&mut s, 7, &d);
    assert_eq!(opt_reply(&mut s).1, (1 << 31) + 6);
    // Malformed GO data: NBD_REP_ERR_INVALID.
    send_opt(&mut s, 7, &[0, 0, 0, 50, 1]);
    assert_eq!(opt_reply(&mut s).1, (1 << 31) + 3);
    // Oversized option data: NBD_REP_ERR_TOO_BIG after it is skipped.
    send_opt(&mut s, 7, &vec![0u8; 100_000]);
    assert_eq!(opt_reply(&mut s).1, (1 << 31) + 9);
    // ABORT: ACK and close.
    send_opt(&mut s, 2, &[]);
    assert_eq!(opt_reply(&mut s).1, 1);
    assert!(closed(&mut s));

    // EXPORT_NAME of an unknown export: closed without reply.
    let mut s = connect(&node);
    greet(&mut s);
    send_opt(&mut s, 1, b"missing");
    assert!(closed(&mut s));

    // A client that vanishes mid-handshake.
    let mut s = connect(&node);
    greet(&mut s);
    s.write_all(&IHAVEOPT.to_be_bytes()).unwrap();
    drop(s);

    assert_serving(&node);
}

#[test]
fn transmission_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let node = Node::start(&tmp.path().join("n"), NodeOpts::default());
    node.create_volume("vol0", "1MiB");
    let size = 1u64 << 20;
    let mut s = open(&node, "vol0");

    // Unknown command: EINVAL, connection stays usable.
    request(&mut s, 0, 77, 1, 0, 0, &[]);
    assert_eq!(simple(&mut s), (22, 1));
    // Unknown flag on a read: EINVAL.
    request(&mut s, 1 << 9, 0, 2, 0, 512, &[]);
    assert_eq!(simple(&mut s), (22, 2));
    // Read past the end: EINVAL.
    request(&mut s, 0, 0, 3, size - 512, 1024, &[]);
    assert_eq!(simple(&mut s), (22, 3));
    // Offset overflow: EINVAL.
    request(&mut s, 0, 0, 4, u64::MAX - 10, 100, &[]);
    assert_eq!(simple(&mut s), (22, 4));
    // Oversize read (over the 32 MiB maximum): EINVAL.
    request(&mut s, 0, 0, 5, 0, (32 << 20) + 1, &[]);
    assert_eq!(simple(&mut s), (22, 5));
    // Write past the end: ENOSPC (payload is consumed, stream stays in sync).
    request(&mut s, 0, 1, 6, size - 512, 1024, &[7u8; 1024]);
    assert_eq!(simple(&mut s), (28, 6));
    // Write-zeroes past the end: ENOSPC; trim past the end: EINVAL.
    request(&mut s, 0, 6, 7, size, 4096, &[]);
    assert_eq!(simple(&mut s), (28, 7));
    request(&mut s, 0, 4, 8, size, 4096, &[]);
    assert_eq!(simple(&mut s), (22, 8));
    // Flush with a length: EINVAL.
    request(&mut s, 0, 3, 9, 0, 10, &[]);
    assert_eq!(simple(&mut s), (22, 9));
    // Nothing was written by the rejected requests.
    request(&mut s, 0, 0, 10, size - 4096, 4096, &[]);
    assert_eq!(simple(&mut s), (0, 10));
    let mut d = vec![1u8; 4096];
    s.read_exact(&mut d).unwrap();
    assert!(d.iter().all(|b| *b == 0), "a rejected write changed data");
    // A valid write still works on the same connection.
    request(&mut s, 1, 1, 11, 100, 3, b"abc");
    assert_eq!(simple(&mut s), (0, 11));

    // Oversize write payload (over 32 MiB): hard disconnect.
    let mut s2 = open(&node, "vol0");
    request(&mut s2, 0, 1, 12, 0, (32 << 20) + 4096, &[]);
    assert!(closed(&mut s2));

    // Bad request magic: closed.
    let mut s3 = open(&node, "vol0");
    s3.write_all(&[0u8; 28]).unwrap();
    assert!(closed(&mut s3));

    // Disconnect in the middle of a write payload.
    let mut s4 = open(&node, "vol0");
    request(&mut s4, 0, 1, 13, 0, 4096, &[5u8; 100]);
    drop(s4);

    // Many requests in flight, then DISC: all answered before the close.
    let mut s5 = open(&node, "vol0");
    for i in 0..64u64 {
        request(&mut s5, 0, 1, 100 + i, i * 4096, 4096, &[i as u8 + 1; 4096]);
    }
    let mut seen: Vec<u64> = (0..64)
        .map(|_| {
            let (e, c) = simple(&mut s5);
            assert_eq!(e, 0);
            c
        })
        .collect();
    seen.sort();
    assert_eq!(seen, (100..164).collect::<Vec<_>>());
    request(&mut s5, 0, 2, 0, 0, 0, &[]);
    assert!(closed(&mut s5));

    assert_serving(&node);
    // The write that was cut off mid-payload changed nothing.
    let mut s = open(&node, "vol0");
    request(&mut s, 0, 0, 1, 0, 4096, &[]);
    assert_eq!(simple(&mut s), (0, 1));
    let mut d = vec![0u8; 4096];
    s.read_exact(&mut d).unwrap();
    assert!(
        d.iter().all(|b| *b == 1),
        "block 0 holds the DISC test's write, not the cut-off one"
    );
    assert!(node.log().contains("connection ended"));
}

#[test]
fn nbdsh_structured_reply_errors() {
    require("nbdsh");
    let tmp = tempfile::tempdir().unwrap();
    let node = Node::start(&tmp.path().join("n"), NodeOpts::default());
    node.create_volume("vol0", "1MiB");
    // libnbd negotiates structured replies; out-of-range requests come back as errors
    // that libnbd raises, and the handle keeps working afterwards.
    let script = format!(
        r#"
import nbd, errno
h = nbd.NBD()
h.set_strict_mode(0)
h.connect_uri("{uri}")
assert h.can_multi_conn()
try:
    h.pread(1024, (1 << 20) - 512)
    raise SystemExit("read past end succeeded")
except nbd.Error as e:
    assert "EINVAL" in str(e), e
try:
    h.pwrite(b"x" * 1024, (1 << 20) - 512)
    raise SystemExit("write past end succeeded")
except nbd.Error as e:
    assert "ENOSPC" in str(e), e
h.pwrite(b"hello", 4090)
h.flush()
assert h.pread(5, 4090) == b"hello"
h.zero(4096, 4096)
d = h.pread(8192, 0)
assert d[4090:4095] == b"hello", d[4090:4096]
assert d[4096:] == bytes(4096)
h.trim(1 << 20, 0)
h.shutdown()
print("ok")
"#,
        uri = node.uri("vol0")
    );
    // nbdsh runs whichever python3 is first on PATH; Debian's python3-libnbd lives
    // with /usr/bin/python3, so run it with that interpreter.
    let out = run("env", &["PATH=/usr/bin:/bin", "nbdsh", "-c", &script]);
    assert!(out.contains("ok"), "{out}");
}

/// The node's resident memory in bytes (Linux).
fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kb * 1024
}

/// A client that pipelines 40 reads of 32 MiB and reads no reply pins only its
/// connection's budget of memory (64 MiB), not the 1.25 GiB of every reply; the node
/// serves others meanwhile and after the client leaves.
#[test]
fn a_client_that_reads_no_reply_cannot_pin_the_nodes_memory() {
    let tmp = tempfile::tempdir().unwrap();
    let node = Node::start(&tmp.path().join("n"), NodeOpts::default());
    node.create_volume("vol0", "64MiB");
    let before = rss_bytes(node.pid());
    let mut s = open(&node, "vol0");
    // Written without waiting for replies (the headers fit in the node's read
    // buffer): the node executes no more once its budget is spent.
    let mut reqs = Vec::new();
    for i in 0..40u64 {
        let mut b = REQ_MAGIC.to_be_bytes().to_vec();
        b.extend_from_slice(&0u16.to_be_bytes());
        b.extend_from_slice(&0u16.to_be_bytes());
        b.extend_from_slice(&i.to_be_bytes());
        b.extend_from_slice(&((i % 2) * (32 << 20)).to_be_bytes());
        b.extend_from_slice(&(32u32 << 20).to_be_bytes());
        reqs.extend_from_slice(&b);
    }
    s.write_all(&reqs).unwrap();
    let mut peak = 0;
    for _ in 0..30 {
        std::thread::sleep(Duration::from_millis(200));
        peak = peak.max(rss_bytes(node.pid()));
    }
    assert!(
        peak < before + (256 << 20),
        "the node grew from {} MiB to {} MiB for one client reading no reply",
        before >> 20,
        peak >> 20
    );
    assert_serving(&node);
    drop(s);
    std::thread::sleep(Duration::from_millis(500));
    assert_serving(&node);
    assert!(rss_bytes(node.pid()) < before + (256 << 20));
}
