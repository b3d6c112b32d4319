//! `lazarus bench-rpc` (hidden): measures how fast the node-to-node RPC carries 4 KiB
//! blocks, against HTTP/1.1 (axum server, ureq clients, keep-alive) on the same
//! loopback, in one process: the comparison the Cluster issue asks for when choosing
//! the replication transport; and the same framing under the cluster's mutual TLS.

use lazarus_rpc::{self as rpc, RpcClient};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const BLOCK: usize = 4096;

/// Blocks per second through our framing, plain or with the cluster's mutual TLS.
async fn framing(
    dur: Duration,
    inflight: usize,
    tls: Option<Arc<rpc::Credentials>>,
) -> anyhow::Result<f64> {
    // A handler that takes the block and answers empty, like a replica.
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?.to_string();
    tokio::spawn(rpc::serve(
        l,
        tls.clone(),
        Arc::new(|_kind, body: Vec<u8>| {
            Box::pin(async move {
                std::hint::black_box(&body);
                Ok(Vec::new())
            })
        }),
    ));
    let client = Arc::new(RpcClient::new(&addr).with_credentials(tls));
    let done = Arc::new(AtomicU64::new(0));
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..inflight {
        let (client, done) = (client.clone(), done.clone());
        tasks.push(tokio::spawn(async move {
            let body = rpc::pack(b"{}", &[7u8; BLOCK]);
            while t0.elapsed() < dur {
                if client
                    .call(rpc::KIND_REPLICATE, &body, Duration::from_secs(5))
                    .await
                    .is_ok()
                {
                    done.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    for t in tasks {
        t.await?;
    }
    Ok(done.load(Ordering::Relaxed) as f64 / t0.elapsed().as_secs_f64())
}

pub async fn run(seconds: u64, inflight: usize) -> anyhow::Result<()> {
    let dur = Duration::from_secs(seconds.max(1));
    let ours = framing(dur, inflight, None).await?;
    // The same with the cluster's mutual TLS, on throw-away credentials.
    let dir = std::env::temp_dir().join(format!("lazarus-bench-rpc-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    rpc::tls::generate(&dir, &["bench".to_string()]).map_err(anyhow::Error::msg)?;
    let creds = rpc::Credentials::load(&dir.join("bench")).map_err(anyhow::Error::msg);
    let _ = std::fs::remove_dir_all(&dir);
    let tls = framing(dur, inflight, Some(creds?)).await?;

    // HTTP/1.1: POST the block, empty 200 answer; one keep-alive connection per client.
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let haddr = l.local_addr()?;
    let app = axum::Router::new().route(
        "/block",
        axum::routing::post(|body: axum::body::Bytes| async move {
            std::hint::black_box(&body);
            ""
        }),
    );
    tokio::spawn(async move { axum::serve(l, app).await });
    let done = Arc::new(AtomicU64::new(0));
    let t0 = Instant::now();
    let mut threads = Vec::new();
    for _ in 0..inflight {
        let done = done.clone();
        let url = format!("http://{haddr}/block");
        threads.push(std::thread::spawn(move || {
            let agent: ureq::Agent = ureq::Agent::config_builder().build().into();
            let block = vec![7u8; BLOCK];
            while t0.elapsed() < dur {
                if agent.post(&url).send(&block[..]).is_ok() {
                    done.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    tokio::task::spawn_blocking(move || {
        for t in threads {
            let _ = t.join();
        }
    })
    .await?;
    let http = done.load(Ordering::Relaxed) as f64 / t0.elapsed().as_secs_f64();
    let mib = |ops: f64| ops * BLOCK as f64 / (1 << 20) as f64;
    println!("4 KiB blocks, {inflight} in flight, {seconds} s each, loopback:");
    println!(
        "  lazarus RPC framing : {:>9.0} blocks/s ({:.0} MiB/s)",
        ours,
        mib(ours)
    );
    println!(
        "  ... with mutual TLS : {:>9.0} blocks/s ({:.0} MiB/s)",
        tls,
        mib(tls)
    );
    println!(
        "  HTTP/1.1 (axum+ureq): {:>9.0} blocks/s ({:.0} MiB/s)",
        http,
        mib(http)
    );
    Ok(())
}
