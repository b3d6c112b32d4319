//! Files: the operating system's, or, with the `sim` feature and on a simulated host,
//! turmoil's simulated file system, whose unsynced writes, creations, renames and
//! deletions a host crash loses (docs/simulator.md). Chosen at run time like `net`.
//! The block store, the Raft database (on a simulated host) and the recovery server
//! keep their files through here.

use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

#[cfg(feature = "sim")]
use turmoil::fs::shim::std::fs as simfs;

#[cfg(feature = "sim")]
use crate::net::in_simulation;

/// An open file, read and written at offsets.
pub enum File {
    Std(std::fs::File),
    #[cfg(feature = "sim")]
    Sim(simfs::File),
}

/// Opens `path` for reading and writing.
pub fn open_rw(path: &Path, create: bool, truncate: bool) -> io::Result<File> {
    #[cfg(feature = "sim")]
    if in_simulation() {
        return Ok(File::Sim(
            simfs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(create)
                .truncate(truncate)
                .open(path)?,
        ));
    }
    Ok(File::Std(
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(create)
            .truncate(truncate)
            .open(path)?,
    ))
}

impl std::fmt::Debug for File {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            File::Std(_) => "File(os)",
            #[cfg(feature = "sim")]
            File::Sim(_) => "File(simulated)",
        })
    }
}

macro_rules! each {
    ($self:expr, $f:ident => $e:expr) => {
        match $self {
            File::Std($f) => $e,
            #[cfg(feature = "sim")]
            File::Sim($f) => $e,
        }
    };
}

impl File {
    pub fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        each!(self, f => f.read_exact_at(buf, offset))
    }

    pub fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        each!(self, f => f.write_all_at(buf, offset))
    }

    pub fn set_len(&self, len: u64) -> io::Result<()> {
        each!(self, f => f.set_len(len))
    }

    pub fn len(&self) -> io::Result<u64> {
        each!(self, f => Ok(f.metadata()?.len()))
    }

    pub fn is_empty(&self) -> io::Result<bool> {
        Ok(self.len()? == 0)
    }

    pub fn sync_data(&self) -> io::Result<()> {
        each!(self, f => f.sync_data())
    }

    pub fn sync_all(&self) -> io::Result<()> {
        each!(self, f => f.sync_all())
    }

    /// Reads up to `buf.len()` bytes at `offset`; 0 at the end of the file.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        each!(self, f => f.read_at(buf, offset))
    }

    /// fallocate(2) with `mode` on an operating-system file: `Ok(true)` done,
    /// `Ok(false)` where there is no such thing (no fallocate on this file system, or
    /// the simulated disk).
    #[allow(irrefutable_let_patterns)] // one variant without the `sim` feature
    fn fallocate(&self, mode: libc::c_int, offset: u64, len: u64) -> io::Result<bool> {
        let File::Std(f) = self else { return Ok(false) };
        let r = unsafe {
            libc::fallocate(
                f.as_raw_fd(),
                mode,
                offset as libc::off_t,
                len as libc::off_t,
            )
        };
        if r == 0 {
            return Ok(true);
        }
        let err = io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::EOPNOTSUPP) {
            return Ok(false);
        }
        Err(err)
    }

    /// Reserves `[offset, offset + len)` so that writes there cannot fail with ENOSPC,
    /// extending the file if needed (fallocate). Where the file system has no
    /// fallocate, and on the simulated disk, the file is extended instead and space
    /// is only checked when written.
    pub fn allocate(&self, offset: u64, len: u64) -> io::Result<()> {
        if !self.fallocate(0, offset, len)? && self.len()? < offset + len {
            self.set_len(offset + len)?;
        }
        Ok(())
    }

    /// Returns `[offset, offset + len)` to the file system (reads there give zeroes;
    /// the file's length stays). Where hole punching is not supported, and on the
    /// simulated disk, the range is overwritten with zeroes.
    pub fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        if self.fallocate(mode, offset, len)? {
            return Ok(());
        }
        let end = (offset + len).min(self.len()?);
        if end > offset {
            self.write_all_at(&vec![0u8; (end - offset) as usize], offset)?;
        }
        Ok(())
    }

    pub fn try_clone(&self) -> io::Result<File> {
        match self {
            File::Std(f) => Ok(File::Std(f.try_clone()?)),
            #[cfg(feature = "sim")]
            File::Sim(f) => Ok(File::Sim(f.try_clone()?)),
        }
    }
}

/// Makes the directory's entries (creations, renames, deletions) durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    #[cfg(feature = "sim")]
    if in_simulation() {
        return simfs::sync_dir(dir);
    }
    std::fs::File::open(dir)?.sync_all()
}

pub fn rename(from: &Path, to: &Path) -> io::Result<()> {
    #[cfg(feature = "sim")]
    if in_simulation() {
        return simfs::rename(from, to);
    }
    std::fs::rename(from, to)
}

pub fn remove_file(path: &Path) -> io::Result<()> {
    #[cfg(feature = "sim")]
    if in_simulation() {
        return simfs::remove_file(path);
    }
    std::fs::remove_file(path)
}

pub fn exists(path: &Path) -> bool {
    #[cfg(feature = "sim")]
    if in_simulation() {
        return simfs::exists(path);
    }
    path.exists()
}

/// The size of the file at `path`.
pub fn file_len(path: &Path) -> io::Result<u64> {
    #[cfg(feature = "sim")]
    if in_simulation() {
        return Ok(simfs::metadata(path)?.len());
    }
    Ok(std::fs::metadata(path)?.len())
}

pub fn create_dir_all(path: &Path) -> io::Result<()> {
    #[cfg(feature = "sim")]
    if in_simulation() {
        return simfs::create_dir_all(path);
    }
    std::fs::create_dir_all(path)
}

pub fn read(path: &Path) -> io::Result<Vec<u8>> {
    #[cfg(feature = "sim")]
    if in_simulation() {
        return simfs::read(path);
    }
    std::fs::read(path)
}

/// Writes a whole file (not synced).
pub fn write(path: &Path, data: &[u8]) -> io::Result<()> {
    #[cfg(feature = "sim")]
    if in_simulation() {
        return simfs::write(path, data);
    }
    std::fs::write(path, data)
}

/// The paths in a directory.
pub fn list_dir(dir: &Path) -> io::Result<Vec<PathBuf>> {
    #[cfg(feature = "sim")]
    if in_simulation() {
        return Ok(simfs::read_dir(dir)?
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .collect());
    }
    Ok(std::fs::read_dir(dir)?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .collect())
}

/// Removes a directory and everything in it.
pub fn remove_dir_all(path: &Path) -> io::Result<()> {
    #[cfg(feature = "sim")]
    if in_simulation() {
        return sim_remove_dir_all(path);
    }
    std::fs::remove_dir_all(path)
}

/// The simulator's disk orders a directory's operations only by syncing that
/// directory, and a removed directory can no longer be synced: the removals of the
/// files in it would stay pending, and a file made again at one of their paths and
/// synced would read back as the removal left it (empty). So each directory's
/// entries are removed and the directory synced before it goes, as a real file system
/// would keep them in order. (The removal of `path` itself is synced, or not, by the
/// caller, as on a real disk.)
#[cfg(feature = "sim")]
fn sim_remove_dir_all(path: &Path) -> io::Result<()> {
    for entry in simfs::read_dir(path)? {
        let p = entry?.path();
        if simfs::metadata(&p)?.is_dir() {
            sim_remove_dir_all(&p)?;
        } else {
            simfs::remove_file(&p)?;
        }
    }
    simfs::sync_dir(path)?;
    simfs::remove_dir(path)
}

/// Writes `data` to `path` atomically: a temporary file, synced, renamed over `path`,
/// and the directory synced.
pub fn write_atomic(path: &Path, data: &[u8]) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = path.with_extension("tmp");
    {
        let f = open_rw(&tmp, true, true)?;
        f.write_all_at(data, 0)?;
        f.sync_all()?;
    }
    rename(&tmp, path)?;
    sync_dir(dir)
}

/// Bytes free (for an unprivileged writer) and in total on the file system holding
/// `dir`; the simulated disk reports no limit (its capacity, when a scenario sets
/// one, shows as ENOSPC on the write itself).
pub fn space(dir: &Path) -> io::Result<(u64, u64)> {
    #[cfg(feature = "sim")]
    if in_simulation() {
        return Ok((u64::MAX / 4, u64::MAX / 4));
    }
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).map_err(io::Error::other)?;
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let frsize = st.f_frsize as u64;
    Ok((st.f_bavail as u64 * frsize, st.f_blocks as u64 * frsize))
}

/// Free space kept on a node's file system for what must not fail for lack of space:
/// the cluster metadata (Raft log and state machine), journal resets, coordination and
/// status files. Growth driven by client data (new block slots, newly mapped slice
/// pages, the recovery server's change logs) is refused with ENOSPC once less than this would be left: 5% of the file
/// system, at least 1 MiB and at most 64 MiB. A full disk then fails writes, and the
/// node's metadata goes on working.
pub fn headroom_bytes(total: u64) -> u64 {
    (total / 20).clamp(1 << 20, 64 << 20)
}

/// ENOSPC when growing a file under `path` by `bytes` would leave less than the
/// headroom free on its file system.
pub fn check_headroom(path: &Path, bytes: u64) -> io::Result<()> {
    let dir = path.parent().unwrap_or(path);
    let (avail, total) = space(dir)?;
    if avail < bytes.saturating_add(headroom_bytes(total)) {
        return Err(io::Error::from_raw_os_error(libc::ENOSPC));
    }
    Ok(())
}

pub fn is_dir(path: &Path) -> bool {
    #[cfg(feature = "sim")]
    if in_simulation() {
        return simfs::metadata(path).map(|m| m.is_dir()).unwrap_or(false);
    }
    path.is_dir()
}
