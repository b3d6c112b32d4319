//! The RPC layer (the real `lazarus-rpc` client and server) between simulated hosts:
//! calls and typed refusals, a partition (calls fail with a typed error, and go
//! through again once it heals), a server crash and restart (its clients reconnect),
//! and a request held in the network past its caller's deadline and then delivered — the receiver handles a
//! request whose caller has given up (RELIABILITY.md, the late forwarded write). Every
//! seed replays exactly: two runs of a seed give the same trace.

use lazarus_rpc::{self as rpc, net::Listener, Refusal, Remote, RpcClient, RpcError};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const ECHO: u8 = 1;
const REFUSE: u8 = 2;

fn server(
    handled: Arc<AtomicU64>,
) -> impl Fn() -> std::pin::Pin<Box<dyn std::future::Future<Output = turmoil::Result> + 'static>> {
    move || {
        let handled = handled.clone();
        Box::pin(async move {
            let l = Listener::bind("0.0.0.0:7000").await?;
            let h: rpc::Handler = Arc::new(move |kind, body| {
                handled.fetch_add(1, Ordering::SeqCst);
                Box::pin(async move {
                    match kind {
                        ECHO => Ok(body),
                        _ => Err(Remote::new(
                            Refusal::Fenced,
                            "fenced: an older failure count ID",
                        )),
                    }
                })
            });
            rpc::serve(l, None, h).await;
            Ok(())
        })
    }
}

/// Calls until one succeeds (the client reconnects on the call after a failure).
async fn call_until_ok(c: &RpcClient, body: &[u8], within: Duration) -> Vec<u8> {
    let t0 = tokio::time::Instant::now();
    loop {
        match c.call(ECHO, body, Duration::from_millis(500)).await {
            Ok(b) => return b,
            Err(e) => {
                assert!(e.is_unreachable(), "{e:?}");
                assert!(t0.elapsed() < within, "no answer within {within:?}: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

fn run(seed: u64) -> Vec<String> {
    let trace = Arc::new(Mutex::new(Vec::new()));
    let handled = Arc::new(AtomicU64::new(0));
    let mut sim = lazarus_sim::simulation(seed, Duration::from_secs(120));
    sim.host("server", server(handled.clone()));
    let t = trace.clone();
    let h = handled.clone();
    sim.client("client", async move {
        let log = |s: String| {
            t.lock()
                .unwrap()
                .push(format!("{:?} {s}", lazarus_sim::now()))
        };
        let c = RpcClient::new("server:7000");
        for i in 0..20u8 {
            let body = vec![i; 1 + i as usize * 100];
            assert_eq!(call_until_ok(&c, &body, Duration::from_secs(5)).await, body);
        }
        log("20 echoes".into());
        let e = c
            .call(REFUSE, b"x", Duration::from_secs(2))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Some(Refusal::Fenced), "{e:?}");
        log(format!("refused: {e}"));

        // A partition (turmoil holds the link's messages: TCP retransmits them once
        // it heals; a dropped segment would leave a gap that real TCP never shows):
        // the call fails with a typed transport error, never a reply.
        turmoil::hold("client", "server");
        let e = c
            .call(ECHO, b"p", Duration::from_secs(1))
            .await
            .unwrap_err();
        assert!(matches!(e, RpcError::Timeout { .. }), "{e:?}");
        log(format!("partitioned: {e}"));
        turmoil::release("client", "server");
        assert_eq!(call_until_ok(&c, b"r", Duration::from_secs(10)).await, b"r");
        log("healed".into());

        // A request held in the network past its caller's deadline still arrives.
        let before = h.load(Ordering::SeqCst);
        turmoil::hold("client", "server");
        let e = c
            .call(ECHO, b"late", Duration::from_millis(300))
            .await
            .unwrap_err();
        assert!(matches!(e, RpcError::Timeout { .. }), "{e:?}");
        turmoil::release("client", "server");
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(
            h.load(Ordering::SeqCst),
            before + 1,
            "the held request was handled after its caller gave up"
        );
        log("held request handled late".into());
        assert_eq!(
            call_until_ok(&c, b"after", Duration::from_secs(5)).await,
            b"after"
        );
        log("done".into());
        Ok(())
    });
    // A server that crashes and restarts: its clients reconnect.
    let t = trace.clone();
    sim.client("other", async move {
        let c = RpcClient::new("server:7000");
        assert_eq!(call_until_ok(&c, b"1", Duration::from_secs(5)).await, b"1");
        t.lock()
            .unwrap()
            .push(format!("{:?} other: first", lazarus_sim::now()));
        tokio::time::sleep(Duration::from_secs(30)).await;
        assert_eq!(call_until_ok(&c, b"2", Duration::from_secs(10)).await, b"2");
        t.lock()
            .unwrap()
            .push(format!("{:?} other: after the restart", lazarus_sim::now()));
        Ok(())
    });
    let mut crashed = false;
    loop {
        let done = sim.step().unwrap();
        if done {
            break;
        }
        if !crashed && sim.elapsed() > Duration::from_secs(20) {
            sim.crash("server");
            sim.bounce("server");
            trace
                .lock()
                .unwrap()
                .push(format!("{:?} server restarted", sim.elapsed()));
            crashed = true;
        }
    }
    let out = trace.lock().unwrap().clone();
    out
}

#[test]
fn rpc_under_partitions_holds_and_a_restart_replays_exactly() {
    for seed in [1u64, 2, 3, 42] {
        let a = run(seed);
        let b = run(seed);
        assert_eq!(a, b, "seed {seed} did not replay exactly");
        eprintln!("seed {seed}: {a:#?}");
        assert!(a.iter().any(|l| l.ends_with("done")), "{a:?}");
        assert!(a.iter().any(|l| l.ends_with("after the restart")), "{a:?}");
    }
}
