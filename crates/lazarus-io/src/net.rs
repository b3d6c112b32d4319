//! The network the RPC layer runs on: the operating system's TCP (tokio), or, with the
//! `sim` feature and inside a simulation, turmoil's simulated TCP (docs/simulator.md).
//!
//! The choice is made at run time, per call, by whether the caller runs inside a
//! turmoil simulation (`in_simulation`): a build with the feature still talks real TCP
//! everywhere else, so the workspace's tests and the shipped binary behave the same
//! with the feature on or off.

use std::io;
use std::pin::Pin;
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
                Ok((Stream::Sim(s), a))
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
    Sim(turmoil::net::TcpStream),
}

/// Connects to `addr` (a simulated host inside a simulation), Nagle off.
pub async fn connect(addr: &str) -> io::Result<Stream> {
    #[cfg(feature = "sim")]
    if in_simulation() {
        return Ok(Stream::Sim(turmoil::net::TcpStream::connect(addr).await?));
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
            Stream::Sim(s) => {
                let (r, w) = s.into_split();
                (ReadHalf::Sim(r), WriteHalf::Sim(w))
            }
        }
    }
}

pub enum ReadHalf {
    Tcp(tokio::net::tcp::OwnedReadHalf),
    #[cfg(feature = "sim")]
    Sim(turmoil::net::tcp::OwnedReadHalf),
}

pub enum WriteHalf {
    Tcp(tokio::net::tcp::OwnedWriteHalf),
    #[cfg(feature = "sim")]
    Sim(turmoil::net::tcp::OwnedWriteHalf),
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
                    $t::Sim(r) => Pin::new(r).poll_read(cx, buf),
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
                    $t::Sim(w) => Pin::new(w).poll_write(cx, buf),
                }
            }

            fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                match self.get_mut() {
                    $t::Tcp(w) => Pin::new(w).poll_flush(cx),
                    #[cfg(feature = "sim")]
                    $t::Sim(w) => Pin::new(w).poll_flush(cx),
                }
            }

            fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                match self.get_mut() {
                    $t::Tcp(w) => Pin::new(w).poll_shutdown(cx),
                    #[cfg(feature = "sim")]
                    $t::Sim(w) => Pin::new(w).poll_shutdown(cx),
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
                    $t::Sim(w) => Pin::new(w).poll_write_vectored(cx, bufs),
                }
            }

            fn is_write_vectored(&self) -> bool {
                match self {
                    $t::Tcp(w) => w.is_write_vectored(),
                    #[cfg(feature = "sim")]
                    $t::Sim(w) => w.is_write_vectored(),
                }
            }
        }
    };
}

async_read!(Stream);
async_write!(Stream);
async_read!(ReadHalf);
async_write!(WriteHalf);
