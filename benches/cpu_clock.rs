//! CPU-time clocks from `clock_gettime`, shared by the benchmark and the idle-CPU example.
#![allow(dead_code)] // each includer uses one of the clocks

use std::time::Duration;

/// `CLOCK_PROCESS_CPUTIME_ID`: every thread of the process, exited ones included.
pub const PROCESS: i32 = 2;
/// `CLOCK_THREAD_CPUTIME_ID`: the calling thread only.
pub const THREAD: i32 = 3;

/// The CPU time of `clock` (nanosecond resolution), or `None` where it cannot be read.
#[cfg(all(target_os = "linux", target_pointer_width = "64"))]
pub fn cpu_time(clock: i32) -> Option<Duration> {
    #[repr(C)]
    struct Timespec {
        tv_sec: i64,
        tv_nsec: i64,
    }
    extern "C" {
        fn clock_gettime(clock: i32, tp: *mut Timespec) -> i32;
    }
    let mut ts = Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid `struct timespec` for this target; the call only writes it.
    let rc = unsafe { clock_gettime(clock, &mut ts) };
    (rc == 0).then(|| Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32))
}

/// The CPU time of `clock`: not available on this platform.
#[cfg(not(all(target_os = "linux", target_pointer_width = "64")))]
pub fn cpu_time(_clock: i32) -> Option<Duration> {
    None
}
