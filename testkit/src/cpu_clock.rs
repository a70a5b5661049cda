//! CPU-time clocks from `clock_gettime` (through `libc`), for the benchmark and the idle-CPU
//! example.

use std::time::Duration;

/// Every thread of the process, exited ones included.
pub const PROCESS: libc::clockid_t = libc::CLOCK_PROCESS_CPUTIME_ID;
/// The calling thread only.
pub const THREAD: libc::clockid_t = libc::CLOCK_THREAD_CPUTIME_ID;

/// The CPU time of `clock` (nanosecond resolution), or `None` where it cannot be read.
pub fn cpu_time(clock: libc::clockid_t) -> Option<Duration> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid `struct timespec`; the call only writes it.
    let rc = unsafe { libc::clock_gettime(clock, &mut ts) };
    (rc == 0).then(|| Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_thread_clock_moves_with_work() {
        let before = cpu_time(THREAD).expect("a thread CPU clock");
        let mut x = 0u64;
        while cpu_time(THREAD).unwrap() <= before {
            x = std::hint::black_box(x.wrapping_add(1));
        }
        assert!(cpu_time(PROCESS).unwrap() >= cpu_time(THREAD).unwrap());
    }
}
