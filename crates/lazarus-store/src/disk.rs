//! Positional file I/O with the few Linux calls the store needs (fallocate, hole
//! punching, fdatasync). Every on-disk structure goes through `DiskFile`, so device
//! faults are injected here without touching the formats. The file itself is
//! `lazarus_io::fs::File`: the operating system's, or the simulator's disk on a
//! simulated host.

use lazarus_io::fs::File;
use std::io;
use std::path::{Path, PathBuf};

/// Failed devices (`lazarus fault device fail`): the directories whose files' every
/// read, write, sync and allocation fails with EIO while they are listed. By directory,
/// so that the simulator's nodes, sharing one process, fail one at a time; `ANY_FAILED`
/// keeps the check one atomic load while no device is failed.
static ANY_FAILED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
static FAILED_DIRS: std::sync::Mutex<Vec<PathBuf>> = std::sync::Mutex::new(Vec::new());

/// Fails (or heals) the device under `dir`.
pub fn set_device_failed(dir: &Path, failed: bool) {
    let mut dirs = FAILED_DIRS.lock().unwrap_or_else(|e| e.into_inner());
    dirs.retain(|d| d != dir);
    if failed {
        dirs.push(dir.to_path_buf());
    }
    ANY_FAILED.store(!dirs.is_empty(), std::sync::atomic::Ordering::SeqCst);
}

/// Whether the device holding `path` (a file or a directory) is failed.
pub fn device_failed(path: &Path) -> bool {
    ANY_FAILED.load(std::sync::atomic::Ordering::Acquire)
        && FAILED_DIRS
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .any(|d| path.starts_with(d))
}

fn device_check(path: &Path) -> io::Result<()> {
    if device_failed(path) {
        return Err(io::Error::from_raw_os_error(libc::EIO));
    }
    Ok(())
}

#[derive(Debug)]
pub struct DiskFile {
    file: File,
    path: PathBuf,
    /// Injected device errors (`lazarus fault eio`): reads overlapping these byte
    /// ranges fail with EIO until cleared.
    read_errors: std::sync::Mutex<Vec<(u64, u64)>>,
}

impl DiskFile {
    pub fn open(path: &Path, create: bool) -> io::Result<DiskFile> {
        let file = lazarus_io::fs::open_rw(path, create, false)?;
        powerloss::on_open(path);
        Ok(DiskFile {
            file,
            path: path.to_path_buf(),
            read_errors: std::sync::Mutex::new(Vec::new()),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn size_bytes(&self) -> io::Result<u64> {
        self.file.len()
    }

    /// Reads exactly `buf.len()` bytes; bytes past the end of the file read as zero
    /// (a sparse or not-yet-extended region is all zeroes by definition).
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        device_check(&self.path)?;
        {
            let faults = self.read_errors.lock().expect("fault list");
            let end = offset + buf.len() as u64;
            if faults.iter().any(|(a, n)| *a < end && offset < a + n) {
                return Err(io::Error::from_raw_os_error(libc::EIO));
            }
        }
        let mut done = 0;
        while done < buf.len() {
            match self.file.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => {
                    buf[done..].fill(0);
                    return Ok(());
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Makes reads of `[offset, offset + len)` fail with EIO (fault injection).
    pub fn inject_read_error(&self, offset: u64, len: u64) {
        self.read_errors
            .lock()
            .expect("fault list")
            .push((offset, len));
    }

    /// Clears every injected read error; returns how many there were.
    pub fn clear_read_errors(&self) -> usize {
        std::mem::take(&mut *self.read_errors.lock().expect("fault list")).len()
    }

    pub fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        device_check(&self.path)?;
        self.file.write_all_at(buf, offset)?;
        powerloss::on_write(&self.path, offset, buf);
        Ok(())
    }

    /// `write_at` in pieces of at most `piece` bytes, each ending on a multiple of
    /// `piece` in the file: the page cache then holds this range in folios no larger
    /// than `piece`. Linux sizes a buffered write's folios by the write's length, and a
    /// later 4 KiB write into a large folio walks every block of it
    /// (`ext4_block_write_begin`): 9.4 µs per 4 KiB write into ranges written 1 MiB at
    /// a time against 2.8 µs into ranges written 16 KiB at a time
    /// (`bench/folio_cost.py`). A store whose slots are written in runs and later
    /// rewritten one block at a time wants small folios.
    pub fn write_at_in_pieces(&self, buf: &[u8], offset: u64, piece: u64) -> io::Result<()> {
        debug_assert!(piece.is_power_of_two());
        let mut done = 0usize;
        while done < buf.len() {
            let at = offset + done as u64;
            let room = (piece - at % piece) as usize;
            let n = room.min(buf.len() - done);
            self.write_at(&buf[done..done + n], at)?;
            done += n;
        }
        Ok(())
    }

    pub fn sync_data(&self) -> io::Result<()> {
        device_check(&self.path)?;
        self.file.sync_data()?;
        powerloss::on_sync(&self.path);
        Ok(())
    }

    /// Reserves space so that later writes to `[offset, offset+len)` cannot fail with
    /// ENOSPC. Extends the file if needed.
    pub fn allocate(&self, offset: u64, len: u64) -> io::Result<()> {
        device_check(&self.path)?;
        self.file.allocate(offset, len)?;
        powerloss::on_extend(&self.path, offset + len);
        Ok(())
    }

    /// Returns `[offset, offset+len)` to the file system; reads there give zeroes.
    pub fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        device_check(&self.path)?;
        self.file.punch_hole(offset, len)?;
        powerloss::on_write(&self.path, offset, &vec![0u8; len as usize]);
        Ok(())
    }
}

/// fsyncs a directory so that file creations, renames and removals in it are durable.
pub fn sync_dir(path: &Path) -> io::Result<()> {
    lazarus_io::fs::sync_dir(path)
}

/// Writes `data` to `path` atomically: temp file, fsync, rename, fsync directory.
pub fn write_file_atomic(path: &Path, data: &[u8]) -> io::Result<()> {
    if !powerloss::powered_fs_op() {
        return Ok(()); // the power is off (simulated): it never happened
    }
    lazarus_io::fs::write_atomic(path, data)
}

/// Renames a file or directory; `sync_dir` makes it durable. `Ok(false)`: the power
/// is off (simulated), and it never happened.
pub fn rename(from: &Path, to: &Path) -> io::Result<bool> {
    if !powerloss::powered_fs_op() {
        return Ok(false);
    }
    lazarus_io::fs::rename(from, to).map(|()| true)
}

/// Removes a file; `sync_dir` makes the removal durable.
pub fn remove_file(path: &Path) -> io::Result<()> {
    if !powerloss::powered_fs_op() {
        return Ok(());
    }
    lazarus_io::fs::remove_file(path)
}

pub use lazarus_io::fs::{check_headroom, headroom_bytes};

pub fn is_enospc(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ENOSPC) | Some(libc::EDQUOT) | Some(libc::EFBIG)
    )
}

/// Power-loss simulation for crash tests (STYLE.md point 8: a durable image kept apart
/// from the live one). When enabled, every write through a `DiskFile` is recorded; a
/// file's `sync_data` makes its recorded writes durable. `crash` then rewrites every
/// tracked file to what a disk could hold after losing power: the durable image plus
/// any subset of the unsynced writes, each whole, torn at a 512-byte sector boundary,
/// or lost. Off unless a test calls `enable`; one test per process (it is global).
pub mod powerloss {
    use std::collections::HashMap;
    use std::path::{Path, PathBuf};
    use std::sync::Mutex;

    enum Op {
        Write { offset: u64, data: Vec<u8> },
        Extend(u64),
    }

    struct Tracked {
        durable: Vec<u8>,
        pending: Vec<Op>,
    }

    static STATE: Mutex<Option<HashMap<PathBuf, Tracked>>> = Mutex::new(None);
    /// I/O operations left before the power goes off (u64::MAX: not scheduled).
    static COUNTDOWN: Mutex<u64> = Mutex::new(u64::MAX);

    /// Cuts the power after `ops` more recorded operations: everything after that is
    /// lost, wherever it happens (in a flush, in a checkpoint's in-place writes...).
    pub fn power_off_after(ops: u64) {
        *COUNTDOWN.lock().expect("powerloss lock") = ops;
    }

    /// Whether the power is still on (everything so far really happened).
    pub fn is_on() -> bool {
        *COUNTDOWN.lock().expect("powerloss lock") != 0
    }

    /// False once the power is off: the operation is not recorded at all.
    fn powered() -> bool {
        let mut c = COUNTDOWN.lock().expect("powerloss lock");
        match *c {
            0 => false,
            u64::MAX => true,
            n => {
                *c = n - 1;
                true
            }
        }
    }
    const SECTOR: usize = 512;

    /// Whether a whole-file operation (an atomic replace, a removal) happens: not once
    /// the simulated power is off. Such operations are durable when they return.
    pub(crate) fn powered_fs_op() -> bool {
        powered()
    }

    pub fn enable() {
        *STATE.lock().expect("powerloss lock") = Some(HashMap::new());
    }

    pub fn disable() {
        *STATE.lock().expect("powerloss lock") = None;
    }

    pub(super) fn on_open(path: &Path) {
        if let Some(m) = STATE.lock().expect("powerloss lock").as_mut() {
            m.entry(path.to_path_buf()).or_insert_with(|| Tracked {
                durable: std::fs::read(path).unwrap_or_default(),
                pending: Vec::new(),
            });
        }
    }

    /// Runs `f` on the tracked file at `path`, if the simulator is on and the power is.
    fn with_tracked(path: &Path, f: impl FnOnce(&mut Tracked)) {
        if !powered() {
            return;
        }
        if let Some(t) = STATE
            .lock()
            .expect("powerloss lock")
            .as_mut()
            .and_then(|m| m.get_mut(path))
        {
            f(t);
        }
    }

    pub(super) fn on_write(path: &Path, offset: u64, data: &[u8]) {
        with_tracked(path, |t| {
            t.pending.push(Op::Write {
                offset,
                data: data.to_vec(),
            })
        });
    }

    pub(super) fn on_extend(path: &Path, len: u64) {
        with_tracked(path, |t| t.pending.push(Op::Extend(len)));
    }

    pub(super) fn on_sync(path: &Path) {
        with_tracked(path, |t| {
            for op in std::mem::take(&mut t.pending) {
                apply(&mut t.durable, &op, usize::MAX);
            }
        });
    }

    fn apply(img: &mut Vec<u8>, op: &Op, sectors: usize) {
        match op {
            Op::Write { offset, data } => {
                let n = data.len().min(sectors.saturating_mul(SECTOR));
                let end = *offset as usize + n;
                if img.len() < end {
                    img.resize(end, 0);
                }
                img[*offset as usize..end].copy_from_slice(&data[..n]);
            }
            Op::Extend(len) => {
                if img.len() < *len as usize {
                    img.resize(*len as usize, 0);
                }
            }
        }
    }

    /// Simulates a power loss: every tracked file becomes its durable image plus a
    /// random selection of its unsynced writes (`rng(n)` returns 0..n). Returns how
    /// many unsynced writes were dropped or torn.
    pub fn crash(rng: &mut dyn FnMut(u64) -> u64) -> usize {
        *COUNTDOWN.lock().expect("powerloss lock") = u64::MAX;
        let mut guard = STATE.lock().expect("powerloss lock");
        let Some(m) = guard.as_mut() else { return 0 };
        let mut lost = 0;
        // In path order: a seed replays the same crash.
        let mut files: Vec<_> = m.iter_mut().collect();
        files.sort_by(|a, b| a.0.cmp(b.0));
        for (path, t) in files {
            let mut img = t.durable.clone();
            for op in std::mem::take(&mut t.pending) {
                match rng(4) {
                    0 => lost += 1, // never reached the disk
                    1 => {
                        // torn: only the first k sectors made it
                        lost += 1;
                        let sectors = match &op {
                            Op::Write { data, .. } => data.len().div_ceil(SECTOR),
                            Op::Extend(_) => 1,
                        };
                        apply(&mut img, &op, rng(sectors as u64) as usize);
                    }
                    _ => apply(&mut img, &op, usize::MAX),
                }
            }
            if path.exists() {
                std::fs::write(path, &img).expect("write crash image");
            }
            t.durable = img;
        }
        lost
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_write_in_pieces_lands_whole_whatever_its_alignment() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = DiskFile::open(&dir.path().join("f"), true).expect("open");
        let data: Vec<u8> = (0..100_000u32).map(|i| (i * 7 + 3) as u8).collect();
        for (offset, piece) in [
            (0u64, 16384u64),
            (4096, 16384),
            (12_345, 4096),
            (0, 1 << 20),
        ] {
            f.write_at_in_pieces(&data, offset, piece).expect("write");
            let mut back = vec![0u8; data.len()];
            f.read_at(&mut back, offset).expect("read");
            assert_eq!(back, data, "offset {offset}, pieces of {piece}");
        }
        // Nothing written past the end of the last write.
        assert_eq!(f.size_bytes().expect("len"), 12_345 + data.len() as u64);
    }
}
