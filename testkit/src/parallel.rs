//! Set-up work (registering accounts, joining rooms) spread over a few threads.

use std::thread;

/// `f(0..n)` on `threads` threads, each taking every `threads`-th index (so that neighbours,
/// such as joins of the same room, run on different threads); results in index order.
pub fn parallel<T: Send>(n: usize, threads: usize, f: impl Fn(usize) -> T + Sync) -> Vec<T> {
    let f = &f;
    let threads = threads.max(1);
    let mut results: Vec<(usize, T)> = thread::scope(|scope| {
        let handles: Vec<_> = (0..threads.min(n))
            .map(|first| {
                scope.spawn(move || {
                    (first..n)
                        .step_by(threads)
                        .map(|i| (i, f(i)))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("worker thread"))
            .collect()
    });
    results.sort_by_key(|(i, _)| *i);
    results.into_iter().map(|(_, t)| t).collect()
}

#[cfg(test)]
mod tests {
    use super::parallel;

    #[test]
    fn every_index_once_in_order_whatever_the_thread_count() {
        for threads in [0, 1, 3, 8, 20] {
            assert_eq!(
                parallel(10, threads, |i| i * i),
                (0..10).map(|i| i * i).collect::<Vec<_>>()
            );
        }
        assert!(parallel(0, 4, |i| i).is_empty());
    }
}
