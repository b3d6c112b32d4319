//! openraft's async runtime for the cluster metadata: tokio, as openraft's own
//! `TokioRuntime`, except for the random numbers behind election timeouts, which come
//! from fastrand's thread-local generator. The simulator seeds that generator, so a
//! simulated run's elections replay with its seed; elsewhere it is seeded from the
//! operating system like `rand::thread_rng`.

use openraft::{AsyncRuntime, OptionalSend, TokioRuntime};
use std::future::Future;
use std::time::Duration;

#[derive(Debug, Default, PartialEq, Eq)]
pub struct Runtime;

type T = TokioRuntime;

impl AsyncRuntime for Runtime {
    type JoinError = <T as AsyncRuntime>::JoinError;
    type JoinHandle<O: OptionalSend + 'static> = <T as AsyncRuntime>::JoinHandle<O>;
    type Sleep = <T as AsyncRuntime>::Sleep;
    type Instant = <T as AsyncRuntime>::Instant;
    type TimeoutError = <T as AsyncRuntime>::TimeoutError;
    type Timeout<R, F: Future<Output = R> + OptionalSend> = <T as AsyncRuntime>::Timeout<R, F>;
    type ThreadLocalRng = Rng;
    type OneshotSender<O: OptionalSend> = <T as AsyncRuntime>::OneshotSender<O>;
    type OneshotReceiverError = <T as AsyncRuntime>::OneshotReceiverError;
    type OneshotReceiver<O: OptionalSend> = <T as AsyncRuntime>::OneshotReceiver<O>;

    fn spawn<F>(future: F) -> Self::JoinHandle<F::Output>
    where
        F: Future + OptionalSend + 'static,
        F::Output: OptionalSend + 'static,
    {
        T::spawn(future)
    }

    fn sleep(duration: Duration) -> Self::Sleep {
        T::sleep(duration)
    }

    fn sleep_until(deadline: Self::Instant) -> Self::Sleep {
        T::sleep_until(deadline)
    }

    fn timeout<R, F: Future<Output = R> + OptionalSend>(
        duration: Duration,
        future: F,
    ) -> Self::Timeout<R, F> {
        T::timeout(duration, future)
    }

    fn timeout_at<R, F: Future<Output = R> + OptionalSend>(
        deadline: Self::Instant,
        future: F,
    ) -> Self::Timeout<R, F> {
        T::timeout_at(deadline, future)
    }

    fn is_panic(join_error: &Self::JoinError) -> bool {
        T::is_panic(join_error)
    }

    fn thread_rng() -> Self::ThreadLocalRng {
        Rng
    }

    fn oneshot<O>() -> (Self::OneshotSender<O>, Self::OneshotReceiver<O>)
    where
        O: OptionalSend,
    {
        T::oneshot()
    }
}

/// fastrand's thread-local generator as a `rand` generator.
pub struct Rng;

impl rand::RngCore for Rng {
    fn next_u32(&mut self) -> u32 {
        fastrand::u32(..)
    }

    fn next_u64(&mut self) -> u64 {
        fastrand::u64(..)
    }

    fn fill_bytes(&mut self, dest: &mut [u8]) {
        fastrand::fill(dest)
    }

    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), rand::Error> {
        fastrand::fill(dest);
        Ok(())
    }
}
