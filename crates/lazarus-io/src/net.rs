//! The network the RPC layer runs on: the operating system's TCP (tokio), or, with the
//! `sim` feature and inside a simulation, turmoil's simulated TCP (docs/simulator.md).
//!
//! The choice is made at run time, per call, by whether the caller runs inside a
//! turmoil simulation (`in_simulation`): a build with the feature still talks real TCP
//! everywhere else, so the workspace's tests and the shipped binary behave the same
//! with the feature on or off.

use std::io;
use std::pin::Pin;
#[cfg(feature = "sim")]
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Whether the caller runs on a simulated host: its connections and listeners are
/// simulated.
pub fn in_simulation() -> bool {
    #[cfg(feature = "sim")]
    {
        turmoil::in_simulation()
    }
    #[cfg(not(feature = "sim"))]
    {
        false
    }
}

/// A listening socket.
pub enum Listener {
    Tcp(tokio::net::TcpListener),
    #[cfg(feature = "sim")]
    Sim(turmoil::net::TcpListener),
}

impl From<tokio::net::TcpListener> for Listener {
    fn from(l: tokio::net::TcpListener) -> Listener {
        Listener::Tcp(l)
    }
}

#[cfg(feature = "sim")]
impl From<turmoil::net::TcpListener> for Listener {
    fn from(l: turmoil::net::TcpListener) -> Listener {
        Listener::Sim(l)
    }
}

impl Listener {
    /// Binds `addr` (a simulated one inside a simulation, where a host has a single
    /// address: a listener on the host's own address binds all of them, as turmoil
    /// wants).
    pub async fn bind(addr: &str) -> io::Result<Listener> {
        #[cfg(feature = "sim")]
        if in_simulation() {
            let any = match addr.parse::<std::net::SocketAddr>() {
                Ok(a) if !a.ip().is_loopback() => format!("0.0.0.0:{}", a.port()),
                _ => addr.to_string(),
            };
            return Ok(Listener::Sim(turmoil::net::TcpListener::bind(any).await?));
        }
        Ok(Listener::Tcp(tokio::net::TcpListener::bind(addr).await?))
    }

    pub async fn accept(&self) -> io::Result<(Stream, std::net::SocketAddr)> {
        match self {
            Listener::Tcp(l) => {
                let (s, a) = l.accept().await?;
                let _ = s.set_nodelay(true);
                Ok((Stream::Tcp(s), a))
            }
            #[cfg(feature = "sim")]
            Listener::Sim(l) => {
                let (s, a) = l.accept().await?;
                let cut = cuts::register(&s);
                Ok((Stream::Sim(s, cut), a))
            }
        }
    }

    pub fn local_addr(&self) -> io::Result<std::net::SocketAddr> {
        match self {
            Listener::Tcp(l) => l.local_addr(),
            #[cfg(feature = "sim")]
            Listener::Sim(l) => l.local_addr(),
        }
    }
}

/// A connection.
pub enum Stream {
    Tcp(tokio::net::TcpStream),
    #[cfg(feature = "sim")]
    Sim(turmoil::net::TcpStream, Arc<cuts::Slot>),
}

/// Connects to `addr` (a simulated host inside a simulation), Nagle off.
pub async fn connect(addr: &str) -> io::Result<Stream> {
    #[cfg(feature = "sim")]
    if in_simulation() {
        let s = turmoil::net::TcpStream::connect(addr).await?;
        let cut = cuts::register(&s);
        return Ok(Stream::Sim(s, cut));
    }
    let s = tokio::net::TcpStream::connect(addr).await?;
    let _ = s.set_nodelay(true);
    Ok(Stream::Tcp(s))
}

impl Stream {
    pub fn into_split(self) -> (ReadHalf, WriteHalf) {
        match self {
            Stream::Tcp(s) => {
                let (r, w) = s.into_split();
                (ReadHalf::Tcp(r), WriteHalf::Tcp(w))
            }
            #[cfg(feature = "sim")]
            Stream::Sim(s, cut) => {
                let (r, w) = s.into_split();
                (ReadHalf::Sim(r, cut.clone()), WriteHalf::Sim(w, cut))
            }
        }
    }
}

pub enum ReadHalf {
    Tcp(tokio::net::tcp::OwnedReadHalf),
    #[cfg(feature = "sim")]
    Sim(turmoil::net::tcp::OwnedReadHalf, Arc<cuts::Slot>),
}

pub enum WriteHalf {
    Tcp(tokio::net::tcp::OwnedWriteHalf),
    #[cfg(feature = "sim")]
    Sim(turmoil::net::tcp::OwnedWriteHalf, Arc<cuts::Slot>),
}

/// `AsyncRead` for an enum of a real and a simulated reader: each call goes to the one
/// it holds.
macro_rules! async_read {
    ($t:ident) => {
        impl AsyncRead for $t {
            fn poll_read(
                self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                buf: &mut ReadBuf<'_>,
            ) -> Poll<io::Result<()>> {
                match self.get_mut() {
                    $t::Tcp(r) => Pin::new(r).poll_read(cx, buf),
                    #[cfg(feature = "sim")]
                    $t::Sim(r, cut) => {
                        if cut.is_cut(cuts::Half::Read, cx) {
                            return Poll::Ready(Err(io::ErrorKind::ConnectionReset.into()));
                        }
                        Pin::new(r).poll_read(cx, buf)
                    }
                }
            }
        }
    };
}

/// `AsyncWrite` likewise.
macro_rules! async_write {
    ($t:ident) => {
        impl AsyncWrite for $t {
            fn poll_write(
                self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                buf: &[u8],
            ) -> Poll<io::Result<usize>> {
                match self.get_mut() {
                    $t::Tcp(w) => Pin::new(w).poll_write(cx, buf),
                    #[cfg(feature = "sim")]
                    $t::Sim(w, cut) => {
                        if cut.is_cut(cuts::Half::Write, cx) {
                            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
                        }
                        Pin::new(w).poll_write(cx, buf)
                    }
                }
            }

            fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                match self.get_mut() {
                    $t::Tcp(w) => Pin::new(w).poll_flush(cx),
                    #[cfg(feature = "sim")]
                    $t::Sim(w, _) => Pin::new(w).poll_flush(cx),
                }
            }

            fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                match self.get_mut() {
                    $t::Tcp(w) => Pin::new(w).poll_shutdown(cx),
                    #[cfg(feature = "sim")]
                    $t::Sim(w, _) => Pin::new(w).poll_shutdown(cx),
                }
            }

            fn poll_write_vectored(
                self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                bufs: &[io::IoSlice<'_>],
            ) -> Poll<io::Result<usize>> {
                match self.get_mut() {
                    $t::Tcp(w) => Pin::new(w).poll_write_vectored(cx, bufs),
                    #[cfg(feature = "sim")]
                    $t::Sim(w, cut) => {
                        if cut.is_cut(cuts::Half::Write, cx) {
                            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
                        }
                        Pin::new(w).poll_write_vectored(cx, bufs)
                    }
                }
            }

            fn is_write_vectored(&self) -> bool {
                match self {
                    $t::Tcp(w) => w.is_write_vectored(),
                    #[cfg(feature = "sim")]
                    $t::Sim(w, _) => w.is_write_vectored(),
                }
            }
        }
    };
}

async_read!(Stream);
async_write!(Stream);
async_read!(ReadHalf);
async_write!(WriteHalf);

/// Connections cut without a crash, in a simulation (`cut`): as a real network drops a
/// TCP connection (a reset, a NAT or firewall forgetting it, a peer's socket closed)
/// while both processes run on. turmoil's own faults either hold messages (a partition)
/// or crash a host; neither shows a live process its connection failing.
#[cfg(feature = "sim")]
pub mod cuts {
    use std::collections::HashMap;
    use std::net::IpAddr;
    use std::sync::{Arc, Mutex, Weak};
    use std::task::{Context, Waker};

    /// One connection's ends and the cut generation of each when it opened, and the
    /// tasks waiting on it: its reader's and its writer's.
    pub struct Slot {
        ends: [(IpAddr, u64); 2],
        wakers: Mutex<[Option<Waker>; 2]>,
    }

    /// Which half of a connection a task polls.
    #[derive(Clone, Copy)]
    pub(crate) enum Half {
        Read = 0,
        Write = 1,
    }

    /// Per address: how many times its connections were cut.
    static GENERATIONS: Mutex<Option<HashMap<IpAddr, u64>>> = Mutex::new(None);
    /// Every open connection, to wake the ones a cut ends.
    static OPEN: Mutex<Vec<Weak<Slot>>> = Mutex::new(Vec::new());

    fn generation(ip: IpAddr) -> u64 {
        GENERATIONS
            .lock()
            .unwrap()
            .as_ref()
            .and_then(|g| g.get(&ip).copied())
            .unwrap_or(0)
    }

    pub(crate) fn register(s: &turmoil::net::TcpStream) -> Arc<Slot> {
        let ip = |a: std::io::Result<std::net::SocketAddr>| {
            a.map(|a| a.ip())
                .unwrap_or(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED))
        };
        let (local, peer) = (ip(s.local_addr()), ip(s.peer_addr()));
        let slot = Arc::new(Slot {
            ends: [(local, generation(local)), (peer, generation(peer))],
            wakers: Mutex::new([None, None]),
        });
        let mut open = OPEN.lock().unwrap();
        open.retain(|w| w.strong_count() > 0);
        open.push(Arc::downgrade(&slot));
        slot
    }

    impl Slot {
        /// Whether a cut ended this connection; if not, `cx` is woken by the next cut.
        pub(crate) fn is_cut(&self, half: Half, cx: &Context<'_>) -> bool {
            if self.ends.iter().any(|(ip, g)| generation(*ip) > *g) {
                return true;
            }
            self.wakers.lock().unwrap()[half as usize] = Some(cx.waker().clone());
            false
        }
    }

    /// Cuts every open connection of the host at `ip` (both ends see it fail: reads
    /// answer a reset, writes a broken pipe); connections opened afterwards work. A
    /// connection whose connecting end has not run since the handshake is cut at its
    /// accepting end only: the other end then reads the close, as after a reset.
    pub fn cut(ip: IpAddr) {
        *GENERATIONS
            .lock()
            .unwrap()
            .get_or_insert_with(HashMap::new)
            .entry(ip)
            .or_default() += 1;
        let open: Vec<Arc<Slot>> = OPEN
            .lock()
            .unwrap()
            .iter()
            .filter_map(Weak::upgrade)
            .collect();
        for slot in open {
            if slot.ends.iter().any(|(a, _)| *a == ip) {
                for w in std::mem::take(&mut *slot.wakers.lock().unwrap())
                    .into_iter()
                    .flatten()
                {
                    w.wake();
                }
            }
        }
    }

    /// Forgets every cut (a new simulation in the same process).
    pub fn reset() {
        *GENERATIONS.lock().unwrap() = None;
        OPEN.lock().unwrap().clear();
    }
}
