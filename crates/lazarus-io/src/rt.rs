//! Blocking work (store writes, flushes, file syncs) kept off the async threads: on a
//! thread of tokio's blocking pool, or inline on a simulated host (docs/simulator.md:
//! the simulated disk does not block, and a thread would make a simulated run depend
//! on the operating system's scheduling). Outside a simulation these are exactly
//! `tokio::task::spawn_blocking` and `block_in_place`.

use crate::net::in_simulation;

/// Runs `f` where it may block, and waits for it.
pub async fn blocking<T, F>(f: F) -> Result<T, tokio::task::JoinError>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    if in_simulation() {
        return Ok(f());
    }
    tokio::task::spawn_blocking(f).await
}

/// Starts `f` where it may block, without waiting for it.
pub fn detach_blocking<F>(f: F)
where
    F: FnOnce() + Send + 'static,
{
    if in_simulation() {
        f();
        return;
    }
    drop(tokio::task::spawn_blocking(f));
}

/// Runs `f`, which may block, on this task's thread (tokio moves the other tasks off
/// it first).
pub fn block_in_place<T>(f: impl FnOnce() -> T) -> T {
    if in_simulation() {
        return f();
    }
    tokio::task::block_in_place(f)
}

thread_local! {
    /// Per thread: a simulation runs on one thread, and tests run simulations on
    /// several threads at once.
    static EXITS: std::cell::RefCell<Vec<(String, i32)>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Ends the process at once (`_exit`): nothing is left to flush, and no exit handler,
/// buffered stream or other thread can hold the exit up. On a simulated host the
/// simulation cannot end: the request is recorded for the simulator, which crashes and
/// restarts the host `who` (`take_exit_requests`), and the calling task waits for that
/// without running anything more. (Not a panic: a panicking task shuts the host's
/// runtime down from inside a poll, and a task dropped then that wakes another one
/// panics again in tokio's scheduler, which aborts the process.)
pub async fn exit(code: i32, who: &str) -> ! {
    if in_simulation() {
        EXITS.with(|e| e.borrow_mut().push((who.to_string(), code)));
        let never: std::convert::Infallible = std::future::pending().await;
        match never {}
    }
    unsafe { libc::_exit(code) }
}

/// The hosts that asked to exit since the last call, with their exit codes.
pub fn take_exit_requests() -> Vec<(String, i32)> {
    EXITS.with(|e| std::mem::take(&mut *e.borrow_mut()))
}

/// Nanoseconds since the Unix epoch: the system clock, or the simulation's clock on a
/// simulated host (so that a seed replays).
pub fn wall_clock_nanos() -> u64 {
    #[cfg(feature = "sim")]
    if in_simulation() {
        if let Some(d) = turmoil::since_epoch() {
            return d.as_nanos() as u64;
        }
    }
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64)
}

/// Milliseconds since the Unix epoch, by `wall_clock_nanos`.
pub fn unix_ms() -> u64 {
    wall_clock_nanos() / 1_000_000
}
