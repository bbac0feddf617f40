//! The worker threads that share the large products of a forward pass.
//!
//! One process-wide pool of `threads() - 1` workers; the calling thread takes a share too. A
//! forward pass runs dozens of products a few microseconds apart, so while a forward holds the
//! pool ([`hold`]) the workers poll for the next job instead of sleeping: the products of one
//! forward hand work over without a system call. Once no forward holds it, a worker polls for
//! only [`GRACE`] and then sleeps on a condition variable, so the cores go to whatever runs
//! between forwards (the service's network threads, another process on the same machine)
//! instead of a spinning thread. Taking a hold wakes sleeping workers, so they are awake by
//! the forward's first product.
//!
//! Parts are claimed from one atomic word, so the pool needs no per-job allocation. A call made
//! while the pool is busy (another thread's forward, or a nested call) runs its parts on the
//! calling thread: results never depend on who ran a part.

use std::cell::UnsafeCell;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// How long an idle worker polls for the next job when no forward holds the pool (the next
/// forward of a burst, e.g. the draft's next level, often follows within microseconds).
const GRACE: Duration = Duration::from_micros(20);

/// Keeps the pool's workers polling for jobs (instead of sleeping) until dropped: taken by a
/// forward pass around its products. Holds nest and may be taken by several threads.
#[must_use = "the workers poll only while the hold lives"]
pub struct Hold(());

/// Takes a [`Hold`] on the pool, waking its sleeping workers.
pub fn hold() -> Hold {
    let pool = pool();
    if pool.holds.fetch_add(1, Ordering::SeqCst) == 0 && pool.sleepers.load(Ordering::SeqCst) > 0 {
        let _guard = pool.sleep_lock.lock().unwrap_or_else(|e| e.into_inner());
        pool.wake.notify_all();
    }
    Hold(())
}

impl Drop for Hold {
    fn drop(&mut self) {
        pool().holds.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Threads the CPU products use: [`set_threads`]' count if given, else every available core.
pub fn threads() -> usize {
    pool().threads
}

/// Threads asked for by [`set_threads`] (0: not set).
static REQUESTED_THREADS: AtomicUsize = AtomicUsize::new(0);

/// Sets the number of threads the CPU products use (a service sharing its machine with
/// another takes fewer than every core; 0: every core). Only before the first product:
/// returns false, changing nothing, once the pool has started.
pub fn set_threads(n: usize) -> bool {
    if POOL.get().is_some() {
        return false;
    }
    REQUESTED_THREADS.store(n, Ordering::SeqCst);
    POOL.get().is_none()
}

static POOL: OnceLock<&'static Pool> = OnceLock::new();

/// Runs `f(0) .. f(parts - 1)`, spread over the pool; returns when every part has run. A
/// panic in a part is re-raised here.
pub fn parallel_for(parts: usize, f: &(dyn Fn(usize) + Sync)) {
    let pool = pool();
    if parts <= 1 || pool.threads <= 1 || parts > u16::MAX as usize {
        (0..parts).for_each(f);
        return;
    }
    if pool
        .busy
        .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
        .is_err()
    {
        (0..parts).for_each(f);
        return;
    }
    let _release = ReleaseOnDrop(&pool.busy);
    pool.run(parts, f);
}

/// A mutable `f32` slice that the parts of one [`parallel_for`] write in disjoint ranges. It
/// borrows the slice for `'a`, so the slice can be neither read nor outlived while parts may
/// write it.
#[derive(Clone, Copy)]
pub(crate) struct DisjointOut<'a> {
    ptr: *mut f32,
    len: usize,
    _slice: std::marker::PhantomData<&'a mut [f32]>,
}

// SAFETY: parts write disjoint ranges (see `range`) and the caller of `parallel_for` waits for
// all of them before the borrow ends.
unsafe impl Send for DisjointOut<'_> {}
unsafe impl Sync for DisjointOut<'_> {}

impl<'a> DisjointOut<'a> {
    /// A view of `out` for the parts of one `parallel_for` call.
    pub(crate) fn new(out: &'a mut [f32]) -> Self {
        Self {
            ptr: out.as_mut_ptr(),
            len: out.len(),
            _slice: std::marker::PhantomData,
        }
    }

    /// `out[start..start + len]`.
    ///
    /// # Safety
    /// No other live reference may overlap the range.
    #[allow(clippy::mut_from_ref)]
    pub(crate) unsafe fn range(&self, start: usize, len: usize) -> &'a mut [f32] {
        assert!(
            start.checked_add(len).is_some_and(|end| end <= self.len),
            "output range"
        );
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(start), len) }
    }
}

/// Frees the pool when its owner returns, even by a re-raised panic.
struct ReleaseOnDrop<'a>(&'a AtomicBool);

impl Drop for ReleaseOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

/// A job's closure with its lifetime erased; valid while its parts are outstanding.
#[derive(Clone, Copy)]
struct JobRef(*const (dyn Fn(usize) + Sync));

struct Pool {
    threads: usize,
    /// Held by the one caller that owns the workers for its job.
    busy: AtomicBool,
    /// `generation << 32 | next part << 16 | parts`.
    state: AtomicU64,
    /// Written by the owner before the job is published; read after a part is claimed.
    job: UnsafeCell<Option<JobRef>>,
    done: AtomicUsize,
    panicked: AtomicBool,
    sleepers: AtomicUsize,
    /// Live [`Hold`]s.
    holds: AtomicUsize,
    sleep_lock: Mutex<()>,
    wake: Condvar,
}

// SAFETY: `job` is only written by the owner of `busy` while no part can be claimed, and only
// read by a thread that has claimed a part of the job it describes (see `run`).
unsafe impl Sync for Pool {}
unsafe impl Send for JobRef {}

fn pool() -> &'static Pool {
    POOL.get_or_init(|| {
        let requested = REQUESTED_THREADS.load(Ordering::SeqCst);
        let threads = match requested {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        };
        let pool: &'static Pool = Box::leak(Box::new(Pool {
            threads,
            busy: AtomicBool::new(false),
            state: AtomicU64::new(0),
            job: UnsafeCell::new(None),
            done: AtomicUsize::new(0),
            panicked: AtomicBool::new(false),
            sleepers: AtomicUsize::new(0),
            holds: AtomicUsize::new(0),
            sleep_lock: Mutex::new(()),
            wake: Condvar::new(),
        }));
        for i in 1..threads {
            std::thread::Builder::new()
                .name(format!("specllava-cpu-{i}"))
                .spawn(move || pool.worker())
                .expect("spawn CPU worker thread");
        }
        pool
    })
}

fn unpack(s: u64) -> (usize, usize) {
    (((s >> 16) & 0xffff) as usize, (s & 0xffff) as usize)
}

impl Pool {
    fn run(&self, parts: usize, f: &(dyn Fn(usize) + Sync)) {
        // SAFETY: we own `busy`; every part of the previous job has completed, so no thread
        // can claim a part (next == parts) or read `job` until the store below publishes.
        unsafe {
            let erased: *const (dyn Fn(usize) + Sync + '_) = f;
            *self.job.get() = Some(JobRef(std::mem::transmute::<
                *const (dyn Fn(usize) + Sync + '_),
                *const (dyn Fn(usize) + Sync + 'static),
            >(erased)));
        }
        self.done.store(0, Ordering::Relaxed);
        let generation = (self.state.load(Ordering::Relaxed) >> 32) + 1;
        self.state
            .store(generation << 32 | parts as u64, Ordering::SeqCst);
        if self.sleepers.load(Ordering::SeqCst) > 0 {
            let _guard = self.sleep_lock.lock().unwrap_or_else(|e| e.into_inner());
            self.wake.notify_all();
        }
        while self.claim_and_run() {}
        while self.done.load(Ordering::Acquire) < parts {
            std::hint::spin_loop();
        }
        if self.panicked.swap(false, Ordering::Relaxed) {
            panic!("a CPU worker thread panicked while running a product");
        }
    }

    fn has_work(&self) -> bool {
        let (next, parts) = unpack(self.state.load(Ordering::SeqCst));
        next < parts
    }

    /// Claims one part of the current job and runs it; false when none is left.
    fn claim_and_run(&self) -> bool {
        let mut s = self.state.load(Ordering::Acquire);
        loop {
            let (next, parts) = unpack(s);
            if next >= parts {
                return false;
            }
            match self.state.compare_exchange_weak(
                s,
                s + (1 << 16),
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => {
                    // SAFETY: the part is claimed, so the owner is waiting for it and `job`
                    // holds this job's closure.
                    let job = unsafe { (*self.job.get()).expect("published job") };
                    let f = unsafe { &*job.0 };
                    if catch_unwind(AssertUnwindSafe(|| f(next))).is_err() {
                        self.panicked.store(true, Ordering::Relaxed);
                    }
                    self.done.fetch_add(1, Ordering::Release);
                    return true;
                }
                Err(now) => s = now,
            }
        }
    }

    fn worker(&self) {
        loop {
            if self.claim_and_run() {
                continue;
            }
            // The grace period runs from the last moment a forward held the pool.
            let mut idle_since = Instant::now();
            let mut polls = 0u32;
            while !self.has_work() {
                polls += 1;
                if polls.is_multiple_of(64) {
                    if self.holds.load(Ordering::Relaxed) > 0 {
                        idle_since = Instant::now();
                    } else if idle_since.elapsed() > GRACE {
                        self.sleep_until_work();
                        break;
                    }
                }
                std::hint::spin_loop();
            }
        }
    }

    fn sleep_until_work(&self) {
        self.sleepers.fetch_add(1, Ordering::SeqCst);
        let mut guard = self.sleep_lock.lock().unwrap_or_else(|e| e.into_inner());
        while !self.has_work() && self.holds.load(Ordering::SeqCst) == 0 {
            guard = self.wake.wait(guard).unwrap_or_else(|e| e.into_inner());
        }
        drop(guard);
        self.sleepers.fetch_sub(1, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_part_runs_once() {
        for parts in [1, 2, 3, 17, 200] {
            let hits: Vec<AtomicUsize> = (0..parts).map(|_| AtomicUsize::new(0)).collect();
            parallel_for(parts, &|i| {
                hits[i].fetch_add(1, Ordering::Relaxed);
            });
            assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1));
        }
    }

    #[test]
    fn concurrent_and_nested_callers_run_inline() {
        let total = AtomicUsize::new(0);
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..50 {
                        parallel_for(4, &|_| {
                            parallel_for(3, &|_| {
                                total.fetch_add(1, Ordering::Relaxed);
                            });
                        });
                    }
                });
            }
        });
        assert_eq!(total.load(Ordering::Relaxed), 4 * 50 * 4 * 3);
    }

    #[test]
    fn jobs_run_under_nested_and_concurrent_holds_and_after_them() {
        let n = AtomicUsize::new(0);
        std::thread::scope(|s| {
            for _ in 0..3 {
                s.spawn(|| {
                    let _outer = hold();
                    for _ in 0..20 {
                        let _inner = hold();
                        parallel_for(4, &|_| {
                            n.fetch_add(1, Ordering::Relaxed);
                        });
                    }
                });
            }
        });
        // Released (unless another test holds the pool): the workers may sleep, and the
        // next job wakes them.
        std::thread::sleep(GRACE * 5);
        parallel_for(4, &|_| {
            n.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(n.load(Ordering::Relaxed), 3 * 20 * 4 + 4);
    }

    #[test]
    fn a_panicking_part_is_reported_to_the_caller() {
        let r = catch_unwind(|| parallel_for(8, &|i| assert!(i != 5, "part five")));
        assert!(r.is_err());
        // The pool still works afterwards.
        let n = AtomicUsize::new(0);
        parallel_for(8, &|_| {
            n.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(n.load(Ordering::Relaxed), 8);
    }
}
