//! `memory`: peak memory of the machine handling a large initial sync.
//!
//! ```text
//! cargo run --release --example memory [-- --mb 100] [--keep-body]
//! ```
//!
//! Generates an initial sync response of about `--mb` MB in memory (the generator of
//! `benches/gen`, scaled up), then hands it to a fresh `SyncMachine` as the driver does (the
//! body `Vec<u8>` moved into `handle_response`; with `--keep-body` a borrowed `&[u8]` instead,
//! which the machine copies, so the caller's body and the machine's copy are both alive until
//! the end) and drains every event, dropping each one as a consumer would.
//!
//! Two measures, printed at each step:
//!
//! * RSS from `/proc/self/status`: `VmRSS` (now) and `VmHWM` (peak). The peak is reset by
//!   writing `5` to `/proc/self/clear_refs` just before the body is handed over; where that is
//!   refused, the peak since the start of the process is shown and said so.
//! * The heap as counted by a wrapping global allocator: bytes live now and their peak since
//!   the last reset. This is exact and needs no `/proc`.
//!
//! The body itself must be in memory (that is 1x): the ratio that matters is the peak while
//! handling over the body size.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use matrix_sync_service::{Config, SyncMachine};
use matrix_sync_testkit::gen as generator;

// ---- a counting allocator ------------------------------------------------------------------------

struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            if new_size >= layout.size() {
                grew(new_size - layout.size());
            } else {
                LIVE.fetch_sub(layout.size() - new_size, Ordering::Relaxed);
            }
        }
        p
    }
}

fn grew(by: usize) {
    let live = LIVE.fetch_add(by, Ordering::Relaxed) + by;
    PEAK.fetch_max(live, Ordering::Relaxed);
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn heap_live() -> usize {
    LIVE.load(Ordering::Relaxed)
}

fn heap_peak() -> usize {
    PEAK.load(Ordering::Relaxed)
}

fn reset_heap_peak() {
    PEAK.store(heap_live(), Ordering::Relaxed);
}

// ---- /proc -------------------------------------------------------------------------------------

/// `VmRSS` and `VmHWM` in bytes.
fn rss() -> (usize, usize) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<usize>().ok())
            .map_or(0, |kb| kb * 1024)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// Resets `VmHWM` to the current RSS; false where the kernel refuses.
fn reset_rss_peak() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// Heap bytes held by an event's fields other than `raw` (string capacities and ids).
fn owned_heap_bytes(e: &matrix_sync_service::Event) -> usize {
    let id = |s: Option<&str>| s.map_or(0, str::len);
    e.event_type.heap_bytes()
        + e.body.as_ref().map_or(0, String::capacity)
        + e.state_key.as_ref().map_or(0, String::capacity)
        + id(e.room_id.as_ref().map(|r| r.as_str()))
        + id(e.event_id.as_ref().map(|r| r.as_str()))
        + id(e.sender.as_ref().map(|r| r.as_str()))
        + id(e.redacts.as_ref().map(|r| r.as_str()))
        + e.relation.as_ref().map_or(0, |r| {
            r.rel_type.capacity()
                + r.event_id.as_str().len()
                + r.key.as_ref().map_or(0, String::capacity)
        })
}

fn response<B>(body: B) -> http::Response<B> {
    http::Response::builder()
        .status(200)
        .header("content-type", "application/json")
        .body(body)
        .expect("valid response")
}

fn mb(bytes: usize) -> String {
    format!("{:.1} MB", bytes as f64 / 1e6)
}

fn report(step: &str) {
    let (now, peak) = rss();
    println!(
        "{step:<38} RSS {:>9}  peak RSS {:>9}  heap {:>9}  peak heap {:>9}",
        mb(now),
        mb(peak),
        mb(heap_live()),
        mb(heap_peak())
    );
}

fn main() {
    let mut target_mb = 100.0_f64;
    let mut keep_body = false;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--mb" => {
                target_mb = args
                    .next()
                    .and_then(|v| v.parse().ok())
                    .expect("--mb needs a number")
            }
            "--keep-body" => keep_body = true,
            other => {
                eprintln!("usage: memory [--mb N] [--keep-body] (unknown argument {other:?})");
                std::process::exit(2);
            }
        }
    }

    report("start");

    // An idle machine, no driver: what a long-lived, idle client costs.
    let before = (rss().0, heap_live());
    let now = Instant::now();
    let mut machine =
        SyncMachine::new(Config::new("https://example.org", "t"), now).expect("valid config");
    let request = machine.poll_request().expect("the first request is due");
    let idle = (rss().0, heap_live());
    println!(
        "idle machine (no driver, first request out): process RSS {}, machine's heap {} bytes \
         (RSS +{} kB)",
        mb(idle.0),
        idle.1 - before.1,
        (idle.0.saturating_sub(before.0)) / 1024
    );

    let start = Instant::now();
    let spec = generator::Spec::scaled_to((target_mb * 1e6) as usize);
    let body = generator::generate(&spec);
    let size = body.len();
    let body_capacity = body.capacity();
    println!(
        "generated body: {} ({} bytes; {} joined rooms, {} invited, {} knocked, {} left) in {:.1} s",
        mb(size),
        size,
        spec.joined,
        spec.invited,
        spec.knocked,
        spec.left,
        start.elapsed().as_secs_f64()
    );
    report("body in memory");
    let (rss_with_body, _) = rss();
    let heap_with_body = heap_live();

    let reset = reset_rss_peak();
    reset_heap_peak();
    if reset {
        report("peaks reset (clear_refs 5)");
    } else {
        println!("(writing /proc/self/clear_refs refused: VmHWM counts from process start)");
    }

    let start = Instant::now();
    let handled = if keep_body {
        machine.handle_response(request.id, response(body.as_slice()), Instant::now())
    } else {
        machine.handle_response(request.id, response(body), Instant::now())
    };
    handled.expect("the machine awaits this response");
    if let Some(error) = machine.poll_error() {
        panic!("the machine refused the body: {error}");
    }
    let handle_time = start.elapsed();
    report("after handle_response");
    let (_, peak_handle) = rss();

    let start = Instant::now();
    let mut events = 0usize;
    let (mut raw_bytes, mut owned_bytes) = (0usize, 0usize);
    while let Some(event) = machine.poll_event() {
        raw_bytes += event.raw.get().len();
        owned_bytes += owned_heap_bytes(&event);
        std::hint::black_box(&event);
        drop(event);
        events += 1;
    }
    let drain_time = start.elapsed();
    report("after draining (each event dropped)");
    let (rss_end, peak) = rss();
    let heap_peak_all = heap_peak();
    let heap_after = heap_live() - if keep_body { body_capacity } else { 0 };
    println!(
        "{events} events; handle_response {:.2} s, drain {:.2} s",
        handle_time.as_secs_f64(),
        drain_time.as_secs_f64()
    );
    println!(
        "the events handed on: {} of raw JSON (Event::raw), {} in their other heap fields, \
         {} of Event structs ({} bytes each), before allocator overhead (what a consumer \
         keeping every event would hold)",
        mb(raw_bytes),
        mb(owned_bytes),
        mb(events * std::mem::size_of::<matrix_sync_service::Event>()),
        std::mem::size_of::<matrix_sync_service::Event>()
    );
    println!();
    println!(
        "body {} | RSS with body, before handing it over {} ({:.2}x body)",
        mb(size),
        mb(rss_with_body),
        rss_with_body as f64 / size as f64
    );
    println!(
        "peak RSS while handling and draining {} = {:.2}x body{}",
        mb(peak),
        peak as f64 / size as f64,
        if reset {
            ""
        } else {
            " (peak since process start)"
        }
    );
    println!(
        "  of which at the end of handle_response {} = {:.2}x body",
        mb(peak_handle),
        peak_handle as f64 / size as f64
    );
    println!(
        "peak heap while handling {} = {:.2}x body (heap with body before: {}, after draining: {}{})",
        mb(heap_peak_all),
        heap_peak_all as f64 / size as f64,
        mb(heap_with_body),
        mb(heap_after),
        if keep_body { ", body not counted" } else { "" }
    );
    println!(
        "  heap above the body's own bytes at the peak: {} = {:.2}x body",
        mb(heap_peak_all.saturating_sub(heap_with_body)),
        heap_peak_all.saturating_sub(heap_with_body) as f64 / size as f64
    );
    println!(
        "after the batch, events drained: RSS {} (freed memory is not necessarily returned to \
         the OS); the machine still holds {} of heap (everything it kept: the dedup memory of \
         recent event ids)",
        mb(rss_end),
        mb(heap_after.saturating_sub(before.1))
    );
}
