//! Threads that wait for work by spinning, for the ~200 small products of one decoding step.
//!
//! Handing a product of 0.1 ms to a rayon pool costs a wake-up of a sleeping thread (and, from
//! outside the pool, a sleep of the caller): on this project's 2-core machines that measured
//! 5 to 10 ms a token, more than the arithmetic. Like llama.cpp's thread pool, the workers here
//! spin between jobs and only park after [`SPIN`] of idleness, and the calling thread takes
//! the first share of every job itself.

use std::cell::UnsafeCell;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// How long an idle worker spins before it parks.
const SPIN: Duration = Duration::from_millis(2);

type Job = *const (dyn Fn(usize) + Sync);

struct Shared {
    /// Bumped for every job; a worker runs a job when it sees a new value.
    epoch: AtomicUsize,
    /// Workers that have not finished the current job.
    pending: AtomicUsize,
    job: UnsafeCell<Option<Job>>,
    /// Parked workers wait here for a new epoch.
    park: Mutex<()>,
    wake: Condvar,
    parked: AtomicUsize,
    /// A worker's share of the current job panicked (re-raised on the calling thread).
    panicked: std::sync::atomic::AtomicBool,
    /// Park right after the current job instead of spinning: no other job follows soon.
    rest: std::sync::atomic::AtomicBool,
}

// SAFETY: every field but `job` is `Sync` already. `job` is written only by the thread holding
// `SpinPool::caller` while no worker reads it (every worker has finished the previous job:
// `pending == 0`, observed with acquire after each worker's release decrement), and read by
// workers only after they observe the epoch that published it (release/acquire on `epoch`), so
// the `UnsafeCell` never sees a write concurrent with another access. The pointer it holds is to
// a `dyn Fn + Sync`, which any thread may call.
unsafe impl Sync for Shared {}
// SAFETY: `Shared` is `!Send` only for the raw pointer in `job`; the closure it points to is
// `Sync` (callable from any thread) and outlives every use (see `SpinPool::run_job`), and the
// rest of `Shared` is `Send`.
unsafe impl Send for Shared {}

pub(crate) struct SpinPool {
    shared: Arc<Shared>,
    threads: usize,
    /// One job at a time; a second caller runs its job on its own thread.
    caller: Mutex<()>,
}

impl SpinPool {
    /// The process's pool: as many threads as rayon's (the calling thread counts as one).
    pub(crate) fn global() -> &'static SpinPool {
        static POOL: OnceLock<SpinPool> = OnceLock::new();
        POOL.get_or_init(|| SpinPool::new(rayon::current_num_threads().max(1)))
    }

    fn new(threads: usize) -> Self {
        let shared = Arc::new(Shared {
            epoch: AtomicUsize::new(0),
            pending: AtomicUsize::new(0),
            job: UnsafeCell::new(None),
            park: Mutex::new(()),
            wake: Condvar::new(),
            parked: AtomicUsize::new(0),
            panicked: std::sync::atomic::AtomicBool::new(false),
            rest: std::sync::atomic::AtomicBool::new(false),
        });
        for t in 1..threads {
            let sh = shared.clone();
            std::thread::Builder::new()
                .name(format!("reviewer2-spin-{t}"))
                .spawn(move || worker(sh, t))
                .expect("spawning a decode thread");
        }
        SpinPool {
            shared,
            threads,
            caller: Mutex::new(()),
        }
    }

    pub(crate) fn threads(&self) -> usize {
        self.threads
    }

    /// Run `f(t)` for every `t` in `0..threads()`, `f(0)` on this thread; returns when all
    /// have returned. A panic in any share is raised here, after every share has stopped.
    pub(crate) fn run(&self, f: &(dyn Fn(usize) + Sync)) {
        self.run_job(f, false)
    }

    /// [`SpinPool::run`] for a job after which the caller does other work for a while (a
    /// prefill's product, followed by candle ops that use rayon's threads): the workers park
    /// as soon as they finish instead of spinning on cores those threads want.
    pub(crate) fn run_then_rest(&self, f: &(dyn Fn(usize) + Sync)) {
        self.run_job(f, true)
    }

    fn run_job(&self, f: &(dyn Fn(usize) + Sync), rest: bool) {
        let _guard = match self.caller.try_lock() {
            Ok(g) => g,
            // A share panicked on the calling thread before: the pool itself is sound.
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => {
                (0..self.threads).for_each(f);
                return;
            }
        };
        if self.threads == 1 {
            f(0);
            return;
        }
        let sh = &*self.shared;
        // SAFETY: the transmute only widens the trait object's lifetime bound to the `'static`
        // of `Job` (same layout: a fat pointer). The pointer outlives its use: this function
        // does not return, nor unwind, before every worker has finished running it
        // (`WaitForWorkers` waits for `pending` back to 0 below).
        let job: Job = unsafe { std::mem::transmute::<&(dyn Fn(usize) + Sync), Job>(f) };
        // SAFETY: this thread holds `caller`, so no other caller writes `job`; every worker has
        // finished the previous job (the previous call waited for `pending == 0`, with acquire)
        // and reads `job` again only after the epoch bump below publishes this write.
        unsafe { *sh.job.get() = Some(job) };
        sh.rest.store(rest, Ordering::Relaxed);
        sh.pending.store(self.threads - 1, Ordering::Relaxed);
        // SeqCst here and in the worker's park: a worker either sees the new epoch or is seen
        // as parked (and woken).
        sh.epoch.fetch_add(1, Ordering::SeqCst);
        if sh.parked.load(Ordering::SeqCst) > 0 {
            let _g = sh.park.lock().unwrap_or_else(|e| e.into_inner());
            sh.wake.notify_all();
        }
        // Waits for the workers however this function is left, unwinding included: they
        // hold a pointer to `f`.
        struct WaitForWorkers<'a>(&'a Shared);
        impl Drop for WaitForWorkers<'_> {
            fn drop(&mut self) {
                let mut spins = 0u32;
                while self.0.pending.load(Ordering::Acquire) != 0 {
                    std::hint::spin_loop();
                    spins = spins.wrapping_add(1);
                    // A worker this late (~0.1 ms of spinning) has lost its core to another
                    // process: give ours up, or spinning here keeps it off for a whole time
                    // slice (a 150-token answer took 29 s on a machine busy with a build).
                    if spins.is_multiple_of(1024) {
                        std::thread::yield_now();
                    }
                }
            }
        }
        let wait = WaitForWorkers(sh);
        f(0);
        drop(wait);
        if sh.panicked.swap(false, Ordering::AcqRel) {
            panic!("a decoding thread panicked (its message is above)");
        }
    }
}

fn worker(sh: Arc<Shared>, t: usize) {
    let mut seen = 0usize;
    let mut rest = false;
    loop {
        // After a job marked `rest`, park at the first check.
        let mut idle = if rest {
            Instant::now()
                .checked_sub(SPIN * 2)
                .unwrap_or_else(Instant::now)
        } else {
            Instant::now()
        };
        let mut spins = 0u32;
        loop {
            let e = sh.epoch.load(Ordering::Acquire);
            if e != seen {
                seen = e;
                break;
            }
            std::hint::spin_loop();
            spins += 1;
            if spins.is_multiple_of(1024) && idle.elapsed() > SPIN {
                let g = sh.park.lock().unwrap_or_else(|e| e.into_inner());
                sh.parked.fetch_add(1, Ordering::SeqCst);
                let g = sh
                    .wake
                    .wait_while(g, |_| sh.epoch.load(Ordering::SeqCst) == seen)
                    .unwrap_or_else(|e| e.into_inner());
                sh.parked.fetch_sub(1, Ordering::AcqRel);
                drop(g);
                idle = Instant::now();
            }
        }
        rest = sh.rest.load(Ordering::Relaxed);
        // SAFETY: `job` was written before the epoch this thread just saw (acquire load, paired
        // with the caller's release bump), and the caller writes it again only after this
        // thread's `pending` decrement below, so the read races with no write.
        if let Some(job) = unsafe { *sh.job.get() } {
            // SAFETY: the caller's `f`, which lives until `run_job` returns, and `run_job` waits
            // for this thread's `pending` decrement, after the call; `f` is `Sync`.
            let f = unsafe { &*job };
            // A panic must not kill the thread: the caller is waiting for `pending`.
            if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(t))).is_err() {
                sh.panicked.store(true, Ordering::Release);
            }
        }
        sh.pending.fetch_sub(1, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_share_runs_once_per_job() {
        let pool = SpinPool::new(3);
        let hits: Vec<AtomicUsize> = (0..3).map(|_| AtomicUsize::new(0)).collect();
        for _ in 0..1000 {
            pool.run(&|t| {
                hits[t].fetch_add(1, Ordering::Relaxed);
            });
        }
        // After parking too.
        std::thread::sleep(SPIN * 3);
        pool.run(&|t| {
            hits[t].fetch_add(1, Ordering::Relaxed);
        });
        for h in &hits {
            assert_eq!(h.load(Ordering::Relaxed), 1001);
        }
    }

    /// A share that panics, on a worker or on the calling thread, reaches the caller as a
    /// panic once every share has stopped, and the pool keeps working.
    #[test]
    fn a_panicking_share_reaches_the_caller_and_the_pool_survives() {
        let pool = SpinPool::new(2);
        for bad in [0, 1] {
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                pool.run(&|t| {
                    if t == bad {
                        panic!("share {t} fails");
                    }
                })
            }));
            assert!(r.is_err(), "share {bad}'s panic was lost");
        }
        // Still two threads, not one running every share.
        let ids = Mutex::new(Vec::new());
        pool.run(&|_| ids.lock().unwrap().push(std::thread::current().id()));
        let ids = ids.into_inner().unwrap();
        assert_eq!(ids.len(), 2);
        assert_ne!(ids[0], ids[1], "the workers are no longer used");
    }
}
