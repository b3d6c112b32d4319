//! A small NBD client for simulated hosts: the fixed-newstyle handshake with
//! `NBD_OPT_GO`, then one request at a time with simple replies. What the simulated
//! workload needs of a real client (qemu, libnbd), written against the protocol
//! (`doc/proto.md` of NetworkBlockDevice/nbd), not against Lazarus's server code.

use lazarus_io::net::Stream;
use lazarus_nbd::consts::*;
use std::io;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// How a request ended: done, or refused with an NBD error number (EIO, ENOSPC...).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Ok(Vec<u8>),
    Err(u32),
}

pub struct Client {
    stream: Stream,
    /// The export's size in bytes, as the server announced it.
    pub size: u64,
    next_handle: u64,
}

fn bad(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

impl Client {
    /// Connects to `addr` and opens `export`.
    pub async fn connect(addr: &str, export: &str) -> io::Result<Client> {
        let mut s = lazarus_io::net::connect(addr).await?;
        if s.read_u64().await? != NBDMAGIC || s.read_u64().await? != IHAVEOPT {
            return Err(bad("not an NBD server"));
        }
        let flags = s.read_u16().await?;
        if flags & FLAG_FIXED_NEWSTYLE == 0 {
            return Err(bad("server is not fixed-newstyle"));
        }
        s.write_u32(FLAG_C_FIXED_NEWSTYLE | (FLAG_C_NO_ZEROES & flags as u32))
            .await?;
        let mut opt = Vec::new();
        opt.extend_from_slice(&(export.len() as u32).to_be_bytes());
        opt.extend_from_slice(export.as_bytes());
        opt.extend_from_slice(&0u16.to_be_bytes());
        s.write_u64(IHAVEOPT).await?;
        s.write_u32(OPT_GO).await?;
        s.write_u32(opt.len() as u32).await?;
        s.write_all(&opt).await?;
        s.flush().await?;
        let mut size = None;
        loop {
            if s.read_u64().await? != OPT_REPLY_MAGIC {
                return Err(bad("bad option reply magic"));
            }
            let _opt = s.read_u32().await?;
            let kind = s.read_u32().await?;
            let len = s.read_u32().await? as usize;
            if len > 1 << 20 {
                return Err(bad("option reply too long"));
            }
            let mut data = vec![0u8; len];
            s.read_exact(&mut data).await?;
            match kind {
                REP_ACK => break,
                REP_INFO if len >= 12 && data[..2] == INFO_EXPORT.to_be_bytes() => {
                    size = Some(u64::from_be_bytes(data[2..10].try_into().unwrap()));
                }
                REP_INFO => {}
                k if k & (1 << 31) != 0 => {
                    return Err(io::Error::other(format!(
                        "export {export:?} refused: {k:#x} {}",
                        String::from_utf8_lossy(&data)
                    )))
                }
                k => return Err(bad(format!("unexpected option reply {k}"))),
            }
        }
        Ok(Client {
            stream: s,
            size: size.ok_or_else(|| bad("no export size"))?,
            next_handle: 1,
        })
    }

    async fn request(&mut self, cmd: u16, offset: u64, len: u32, data: &[u8]) -> io::Result<Reply> {
        let handle = self.next_handle;
        self.next_handle += 1;
        let mut h = Vec::with_capacity(28 + data.len());
        h.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        h.extend_from_slice(&0u16.to_be_bytes());
        h.extend_from_slice(&cmd.to_be_bytes());
        h.extend_from_slice(&handle.to_be_bytes());
        h.extend_from_slice(&offset.to_be_bytes());
        h.extend_from_slice(&len.to_be_bytes());
        h.extend_from_slice(data);
        self.stream.write_all(&h).await?;
        self.stream.flush().await?;
        if self.stream.read_u32().await? != SIMPLE_REPLY_MAGIC {
            return Err(bad("bad reply magic"));
        }
        let err = self.stream.read_u32().await?;
        if self.stream.read_u64().await? != handle {
            return Err(bad("reply to another request"));
        }
        if err != 0 {
            return Ok(Reply::Err(err));
        }
        let mut out = Vec::new();
        if cmd == CMD_READ {
            out = vec![0u8; len as usize];
            self.stream.read_exact(&mut out).await?;
        }
        Ok(Reply::Ok(out))
    }

    pub async fn read(&mut self, offset: u64, len: u32) -> io::Result<Reply> {
        self.request(CMD_READ, offset, len, &[]).await
    }

    pub async fn write(&mut self, offset: u64, data: &[u8]) -> io::Result<Reply> {
        self.request(CMD_WRITE, offset, data.len() as u32, data)
            .await
    }

    pub async fn flush(&mut self) -> io::Result<Reply> {
        self.request(CMD_FLUSH, 0, 0, &[]).await
    }
}
