//! The files the recovery server keeps: the operating system's, or, with the `sim`
//! feature and on a simulated host, turmoil's simulated file system, whose unsynced
//! writes, creations, renames and deletions a host crash loses (docs/simulator.md).
//! Chosen at run time like `net`.

use std::io;
use std::os::unix::fs::FileExt;
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
