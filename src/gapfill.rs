//! Filling the limited timelines of one batch from `/rooms/{roomId}/messages`, within bounds.
//! The batch is either protocol's (`/v3/sync` or sliding sync): the filler holds it, whatever
//! it is, and fetches the gaps it was given.
//!
//! One room at a time, newest page first, until the range is exhausted, the room reaches
//! [`GapFill::max_events_per_room`](crate::GapFill::max_events_per_room), or the batch's
//! memory budget is spent; whatever was not fetched becomes a [`Gap`] item. What a failed
//! request means decides what happens ([`FillFailure`]): history the server will not give ends
//! that room; a transient failure is retried, at most [`MAX_ROOM_ATTEMPTS`] times per room and
//! [`MAX_BATCH_FAILURES`] times per batch, so one room (or many) can never stall the account.

use std::collections::VecDeque;

use ruma_client_api::message::get_message_events::v3 as messages;
use ruma_common::OwnedRoomId;
use serde_json::value::RawValue;

use crate::batch::{RoomFill, RoomFills};
use crate::config::{Config, GapFill};
use crate::error::Failure;
use crate::normalize::Gap;
use crate::token;

/// Consecutive empty pages (with an `end`) tolerated before the rest of a gap is reported.
const MAX_EMPTY_PAGES: u32 = 3;
/// Failed requests for one room before its rest is reported as a gap.
pub const MAX_ROOM_ATTEMPTS: u32 = 3;
/// Failed requests in one batch before every room left is reported as a gap.
pub const MAX_BATCH_FAILURES: u32 = 8;

/// A sync answer (`P`) waiting for its limited rooms to be filled.
#[derive(Debug)]
pub(crate) struct GapFiller<P> {
    parsed: P,
    jobs: VecDeque<Job>,
    fills: RoomFills,
    /// Bytes of fetched events held for this batch, and the most it may hold.
    held_bytes: u64,
    budget: u64,
    failures: u32,
}

#[derive(Debug)]
struct Job {
    room_id: OwnedRoomId,
    /// The next page starts here (the limited timeline's `prev_batch`, then each page's `end`).
    from: String,
    /// The sync token held before the gap.
    to: String,
    newest_first: Vec<Box<RawValue>>,
    empty_pages: u32,
    attempts: u32,
}

/// The next `/messages` request wanted.
pub(crate) struct PageRequest<'a> {
    pub(crate) room_id: &'a OwnedRoomId,
    pub(crate) from: &'a str,
    pub(crate) to: &'a str,
    pub(crate) limit: u32,
}

/// What a failed `/messages` request means for the batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum FillFailure {
    /// The token was refused: the batch cannot be completed now; treat it as a failed sync.
    Unauthorized,
    /// The server will not give this history (403, 404, other 4xx, a redirect): end the room.
    HistoryRefused,
    /// Worth retrying (network, 5xx, 429, a bad page), within the attempt bounds.
    Retry,
}

impl FillFailure {
    pub(crate) fn of(failure: &Failure) -> Self {
        match failure {
            Failure::UnknownToken { .. } | Failure::Refused { status: 401, .. } => {
                FillFailure::Unauthorized
            }
            Failure::Transport(_)
            | Failure::DeadlineExceeded(_)
            | Failure::Server { .. }
            | Failure::RateLimited { .. }
            | Failure::BadResponse { .. }
            | Failure::BodyTooLarge { .. } => FillFailure::Retry,
            _ => FillFailure::HistoryRefused,
        }
    }
}

/// Either a batch ready to deliver at once, or one that needs filling first.
pub(crate) enum Plan<P> {
    Deliver(P, RoomFills),
    Fill(GapFiller<P>),
}

/// Whether a backwards page that made no progress came oldest first (palpo 0.0.2 answers
/// every backwards page so, and with `end` = `from`): at least three events, their
/// `origin_server_ts` never going down and the last later than the first. Timestamps cannot
/// order a room (other servers' clocks, bridges importing history), so a page of a server
/// that pages as specified is never judged by them; a page of two is taken as it comes.
fn oldest_first(chunk: &[Box<RawValue>]) -> bool {
    if chunk.len() < 3 {
        return false;
    }
    let stamps: Option<Vec<u64>> = chunk
        .iter()
        .map(|raw| crate::scan::event_fields(raw.get()).origin_server_ts)
        .collect();
    let Some(stamps) = stamps else {
        return false;
    };
    stamps.windows(2).all(|w| w[0] <= w[1]) && stamps.first() < stamps.last()
}

impl<P> GapFiller<P> {
    /// Plans the filling of `gaps` in `parsed`: each from its `prev_batch` back to its
    /// `previous_since`.
    pub(crate) fn plan(parsed: P, gaps: Vec<(OwnedRoomId, Gap)>, config: &Config) -> Plan<P> {
        let mut jobs = VecDeque::new();
        let mut fills = RoomFills::new();
        let fill = config.gap_fill.enabled && config.gap_fill.max_events_per_room > 0;
        for (room_id, gap) in gaps {
            let (from, to) = (gap.prev_batch, gap.previous_since);
            if fill {
                jobs.push_back(Job {
                    room_id,
                    from,
                    to,
                    newest_first: Vec::new(),
                    empty_pages: 0,
                    attempts: 0,
                });
            } else {
                fills.insert(room_id, unfilled(from, to, Vec::new()));
            }
        }
        if jobs.is_empty() {
            return Plan::Deliver(parsed, fills);
        }
        Plan::Fill(GapFiller {
            parsed,
            jobs,
            fills,
            held_bytes: 0,
            budget: config.max_body_bytes,
            failures: 0,
        })
    }

    /// The request for the room being filled; `None` once every room is done.
    pub(crate) fn next_request(&self, config: &Config) -> Option<PageRequest<'_>> {
        let job = self.jobs.front()?;
        Some(PageRequest {
            room_id: &job.room_id,
            from: &job.from,
            to: &job.to,
            limit: page_limit(&config.gap_fill, job.newest_first.len()),
        })
    }

    /// Takes one page for the room being filled. An `end` that could not be sent back is a
    /// bad page: the failure is returned for the caller to report and retry.
    pub(crate) fn on_page(
        &mut self,
        page: messages::Response,
        gap_fill: &GapFill,
    ) -> Result<(), String> {
        let cap = gap_fill.max_events_per_room;
        if let Some(end) = &page.end {
            token::check(end).map_err(|problem| problem.describe("end"))?;
        }
        let Some(job) = self.jobs.front_mut() else {
            return Ok(());
        };
        job.attempts = 0;
        let page_bytes: u64 = page
            .chunk
            .iter()
            .map(|raw| raw.json().get().len() as u64)
            .sum();
        if self.held_bytes + page_bytes > self.budget {
            // The whole page is dropped, so `from` still marks exactly where delivery stops.
            log::warn!(
                "gap fill of {} stops at the memory budget of {} bytes",
                job.room_id,
                self.budget
            );
            self.end_room();
            return Ok(());
        }
        self.held_bytes += page_bytes;
        let got = page.chunk.len();
        let full = got >= page_limit(gap_fill, job.newest_first.len()) as usize;
        let mut chunk: Vec<Box<RawValue>> =
            page.chunk.into_iter().map(|raw| raw.into_json()).collect();
        // Only a page that made no progress (`end` = `from`) is looked at: a server that pages
        // as specified keeps its order, which is the room's, whatever the timestamps say.
        let stuck = page.end.as_deref() == Some(job.from.as_str());
        if stuck && oldest_first(&chunk) {
            log::warn!(
                "gap fill of {}: the server answered /messages oldest first; taken newest first",
                job.room_id
            );
            chunk.reverse();
        }
        job.newest_first.extend(chunk);
        let rest = match page.end {
            // No `end`: the range is exhausted.
            None => None,
            // No progress after a page that was not full: exhausted too. After a full page
            // the server may hold more it will not page to (palpo 0.0.2 answers every page
            // with `end` = `from`): the rest is a gap, never silently dropped.
            Some(end) if end == job.from && !full => None,
            Some(end) if end == job.from => Some(end),
            Some(end) if job.newest_first.len() >= cap => Some(end),
            // An empty page with `end` means a filter hid events and more may follow; a run
            // of them is reported as a gap rather than paged through forever.
            Some(end) if got == 0 && job.empty_pages >= MAX_EMPTY_PAGES => Some(end),
            Some(end) => {
                job.empty_pages = if got == 0 { job.empty_pages + 1 } else { 0 };
                job.from = end;
                return Ok(());
            }
        };
        if let Some(job) = self.jobs.pop_front() {
            let fill = match rest {
                Some(end) => unfilled(end, job.to, job.newest_first),
                None => RoomFill {
                    unfilled: None,
                    newest_first: job.newest_first,
                },
            };
            self.fills.insert(job.room_id, fill);
        }
        Ok(())
    }

    /// Counts a failure worth retrying; past the bounds, the room (or the batch's every room
    /// left) is reported as a gap. Returns whether the same room is retried.
    pub(crate) fn on_retryable_failure(&mut self) -> bool {
        self.failures += 1;
        if self.failures >= MAX_BATCH_FAILURES {
            log::warn!(
                "gap fill gives up on this batch after {} failures",
                self.failures
            );
            while !self.jobs.is_empty() {
                self.end_room();
            }
            return false;
        }
        let Some(job) = self.jobs.front_mut() else {
            return false;
        };
        job.attempts += 1;
        if job.attempts >= MAX_ROOM_ATTEMPTS {
            self.end_room();
            return false;
        }
        true
    }

    /// Ends filling the current room: what was fetched is kept, the rest becomes a gap.
    pub(crate) fn end_room(&mut self) {
        if let Some(job) = self.jobs.pop_front() {
            self.fills
                .insert(job.room_id, unfilled(job.from, job.to, job.newest_first));
        }
    }

    /// Whether every room is done.
    pub(crate) fn is_done(&self) -> bool {
        self.jobs.is_empty()
    }

    /// Bytes of fetched events held for this batch (never above the budget).
    pub(crate) fn held_bytes(&self) -> u64 {
        self.held_bytes
    }

    pub(crate) fn into_parts(self) -> (P, RoomFills) {
        (self.parsed, self.fills)
    }
}

/// How many events to ask for when `held` are already fetched for the room: a page, never
/// past the cap, at least one.
fn page_limit(gap_fill: &GapFill, held: usize) -> u32 {
    let remaining = gap_fill.max_events_per_room.saturating_sub(held);
    (gap_fill.page_size as usize).min(remaining).max(1) as u32
}

fn unfilled(
    prev_batch: String,
    previous_since: String,
    newest_first: Vec<Box<RawValue>>,
) -> RoomFill {
    RoomFill {
        unfilled: Some(Gap {
            prev_batch,
            previous_since,
        }),
        newest_first,
    }
}

#[cfg(test)]
mod tests {
    use ruma_common::serde::Raw;
    use serde_json::json;

    use super::*;
    use crate::batch::ParsedBody;

    fn config(max_events_per_room: usize, page_size: u32) -> Config {
        let mut config = Config::new("https://example.org", "token");
        config.gap_fill.max_events_per_room = max_events_per_room;
        config.gap_fill.page_size = page_size;
        config
    }

    fn room(n: u32) -> OwnedRoomId {
        format!("!r{n}:example.org").try_into().unwrap()
    }

    /// An incremental sync answer in which `rooms` rooms have a limited timeline.
    fn filler(rooms: u32, config: &Config) -> GapFiller<ParsedBody> {
        let join: serde_json::Map<String, serde_json::Value> = (0..rooms)
            .map(|n| {
                let timeline =
                    json!({ "limited": true, "prev_batch": format!("p{n}"), "events": [] });
                (room(n).to_string(), json!({ "timeline": timeline }))
            })
            .collect();
        let body = json!({ "next_batch": "n1", "rooms": { "join": join } });
        let parsed = ParsedBody::parse(serde_json::to_vec(&body).unwrap()).unwrap();
        let gaps = parsed.gaps(Some("s0"));
        match GapFiller::plan(parsed, gaps, config) {
            Plan::Fill(filler) => filler,
            Plan::Deliver(..) => panic!("limited timelines of an incremental sync are filled"),
        }
    }

    fn page(events: usize, end: Option<&str>) -> messages::Response {
        let mut page = messages::Response::new();
        page.end = end.map(str::to_owned);
        page.chunk = (0..events)
            .map(|i| {
                let event = json!({ "type": "m.room.message", "event_id": format!("$e{i}") });
                Raw::from_json(serde_json::value::to_raw_value(&event).unwrap())
            })
            .collect();
        page
    }

    #[test]
    fn failures_are_sorted_by_what_they_mean() {
        let refused = |status| Failure::Refused {
            status,
            errcode: None,
            message: None,
        };
        assert_eq!(FillFailure::of(&refused(401)), FillFailure::Unauthorized);
        assert_eq!(FillFailure::of(&refused(403)), FillFailure::HistoryRefused);
        let server = Failure::Server {
            status: 502,
            errcode: None,
            message: None,
        };
        assert_eq!(FillFailure::of(&server), FillFailure::Retry);
    }

    #[test]
    fn filling_is_planned_only_when_enabled_with_a_positive_cap() {
        let mut off = config(10, 5);
        off.gap_fill.enabled = false;
        let mut zero = config(0, 5);
        zero.gap_fill.enabled = true;
        for config in [off, zero] {
            let body = json!({ "next_batch": "n1", "rooms": { "join": {
                "!r0:example.org": { "timeline": { "limited": true, "prev_batch": "p0" } } } } });
            let parsed = ParsedBody::parse(serde_json::to_vec(&body).unwrap()).unwrap();
            let gaps = parsed.gaps(Some("s0"));
            let Plan::Deliver(_, fills) = GapFiller::plan(parsed, gaps, &config) else {
                panic!("nothing to fill");
            };
            let gap = fills[&room(0)].unfilled.as_ref().unwrap();
            assert_eq!(
                (gap.prev_batch.as_str(), gap.previous_since.as_str()),
                ("p0", "s0")
            );
        }
        // A cap of one still fills.
        let _ = filler(1, &config(1, 5));
    }

    #[test]
    fn the_limit_never_passes_the_cap_and_is_at_least_one() {
        let config = config(7, 5);
        let mut f = filler(1, &config);
        let r = f.next_request(&config).unwrap();
        assert_eq!((r.from, r.to, r.limit), ("p0", "s0", 5));
        f.on_page(page(5, Some("e1")), &config.gap_fill).unwrap();
        let r = f.next_request(&config).unwrap();
        assert_eq!((r.from, r.limit), ("e1", 2));
        assert!(!f.is_done());
        f.on_page(page(2, Some("e2")), &config.gap_fill).unwrap();
        assert!(f.is_done());
        assert!(f.next_request(&config).is_none());
        let (_, fills) = f.into_parts();
        let fill = &fills[&room(0)];
        assert_eq!(fill.newest_first.len(), 7);
        assert_eq!(fill.unfilled.as_ref().unwrap().prev_batch, "e2");
    }

    /// A page of events stamped `stamps` (in the order given), ids `$t<stamp>`.
    fn stamped(stamps: &[Option<u64>]) -> messages::Response {
        let mut page = messages::Response::new();
        page.chunk = stamps
            .iter()
            .enumerate()
            .map(|(i, ts)| {
                let mut event = json!({ "type": "m.room.message", "event_id": format!("$t{i}") });
                if let Some(ts) = ts {
                    event["origin_server_ts"] = json!(ts);
                }
                Raw::from_json(serde_json::value::to_raw_value(&event).unwrap())
            })
            .collect();
        page
    }

    #[test]
    fn a_stuck_page_that_came_oldest_first_is_taken_newest_first() {
        let config = config(100, 10);
        let order_of = |stamps: &[Option<u64>], end: &str| {
            let mut f = filler(1, &config);
            let mut page = stamped(stamps);
            page.end = Some(end.to_owned());
            f.on_page(page, &config.gap_fill).unwrap();
            if !f.is_done() {
                f.on_page(stamped(&[]), &config.gap_fill).unwrap();
            }
            let (_, fills) = f.into_parts();
            fills[&room(0)]
                .newest_first
                .iter()
                .map(|raw| {
                    let fields = crate::scan::event_fields(raw.get());
                    fields.event_id.unwrap().into_owned()
                })
                .collect::<Vec<_>>()
        };
        // A page that made no progress, as palpo's (`end` = `from`, "p0" here).
        let order = |stamps: &[Option<u64>]| order_of(stamps, "p0");
        let s = |v: &[u64]| v.iter().map(|&t| Some(t)).collect::<Vec<_>>();
        // A page that moved on is the server's order, whatever the timestamps.
        assert_eq!(order_of(&s(&[1, 2, 3]), "e1"), ["$t0", "$t1", "$t2"]);
        // Oldest first (palpo): reversed.
        assert_eq!(order(&s(&[1, 2, 2, 3])), ["$t3", "$t2", "$t1", "$t0"]);
        // Newest first, as specified, even with one clock ahead: as it came.
        assert_eq!(order(&s(&[5, 4, 3])), ["$t0", "$t1", "$t2"]);
        assert_eq!(order(&s(&[5, 9, 3])), ["$t0", "$t1", "$t2"]);
        // Too little to tell: two events, all stamps equal, a stamp missing.
        assert_eq!(order(&s(&[1, 2])), ["$t0", "$t1"]);
        assert_eq!(order(&s(&[7, 7, 7])), ["$t0", "$t1", "$t2"]);
        assert_eq!(order(&[Some(1), None, Some(3)]), ["$t0", "$t1", "$t2"]);
    }

    #[test]
    fn a_page_that_ends_where_it_started_or_without_end_exhausts_the_room() {
        let config = config(100, 10);
        let mut f = filler(2, &config);
        f.on_page(page(3, Some("p0")), &config.gap_fill).unwrap();
        f.on_page(page(1, None), &config.gap_fill).unwrap();
        assert!(f.is_done());
        let (_, fills) = f.into_parts();
        assert!(fills[&room(0)].unfilled.is_none());
        assert!(fills[&room(1)].unfilled.is_none());
        assert_eq!(fills[&room(0)].newest_first.len(), 3);
    }

    #[test]
    fn a_full_page_that_ends_where_it_started_leaves_the_rest_as_a_gap() {
        // palpo 0.0.2 answers every backward page with `end` = `from`: after a full page the
        // server may hold more, which must be reported, not dropped.
        let config = config(100, 10);
        let mut f = filler(1, &config);
        f.on_page(page(10, Some("p0")), &config.gap_fill).unwrap();
        assert!(f.is_done(), "no second request for the same page");
        let (_, fills) = f.into_parts();
        let fill = &fills[&room(0)];
        assert_eq!(fill.newest_first.len(), 10);
        let gap = fill.unfilled.as_ref().expect("the rest is a gap");
        assert_eq!(
            (gap.prev_batch.as_str(), gap.previous_since.as_str()),
            ("p0", "s0")
        );
    }

    #[test]
    fn a_bad_end_is_refused_before_anything_is_taken() {
        let config = config(100, 10);
        let mut f = filler(1, &config);
        assert!(f.on_page(page(2, Some("")), &config.gap_fill).is_err());
        assert_eq!(f.held_bytes(), 0);
        assert_eq!(f.next_request(&config).unwrap().from, "p0");
    }

    #[test]
    fn a_run_of_empty_pages_is_reported_as_a_gap() {
        let config = config(100, 10);
        let mut f = filler(1, &config);
        for n in 1..=MAX_EMPTY_PAGES {
            f.on_page(page(0, Some(&format!("x{n}"))), &config.gap_fill)
                .unwrap();
            assert!(!f.is_done(), "empty page {n}");
        }
        // A page with events restarts the count.
        f.on_page(page(1, Some("y")), &config.gap_fill).unwrap();
        for n in 1..=MAX_EMPTY_PAGES {
            f.on_page(page(0, Some(&format!("z{n}"))), &config.gap_fill)
                .unwrap();
            assert!(!f.is_done(), "empty page {n} after events");
        }
        f.on_page(page(0, Some("last")), &config.gap_fill).unwrap();
        assert!(f.is_done());
        let (_, fills) = f.into_parts();
        let fill = &fills[&room(0)];
        assert_eq!(fill.unfilled.as_ref().unwrap().prev_batch, "last");
        assert_eq!(fill.newest_first.len(), 1);
    }

    #[test]
    fn the_memory_budget_drops_the_page_that_would_pass_it() {
        let mut config = config(100, 10);
        let one = page(1, Some("a")).chunk[0].json().get().len() as u64;
        config.max_body_bytes = 3 * one;
        let mut f = filler(2, &config);
        f.on_page(page(2, Some("a")), &config.gap_fill).unwrap();
        assert_eq!(f.held_bytes(), 2 * one);
        // Exactly at the budget is allowed.
        f.on_page(page(1, Some("b")), &config.gap_fill).unwrap();
        assert_eq!(f.held_bytes(), 3 * one);
        f.on_page(page(1, Some("c")), &config.gap_fill).unwrap();
        assert_eq!(
            f.held_bytes(),
            3 * one,
            "the page past the budget is dropped"
        );
        assert!(!f.is_done(), "the next room is still filled");
        f.on_page(page(1, None), &config.gap_fill).unwrap();
        let (_, fills) = f.into_parts();
        assert_eq!(fills[&room(0)].unfilled.as_ref().unwrap().prev_batch, "b");
        assert_eq!(fills[&room(0)].newest_first.len(), 3);
        assert!(fills[&room(1)].newest_first.is_empty());
    }

    #[test]
    fn retries_are_bounded_per_room_and_per_batch() {
        let config = config(100, 10);
        let mut f = filler(4, &config);
        for _ in 1..MAX_ROOM_ATTEMPTS {
            assert!(f.on_retryable_failure());
        }
        assert!(!f.on_retryable_failure(), "room 0 ends");
        assert_eq!(f.next_request(&config).unwrap().room_id, &room(1));
        // A page restarts the room's count but not the batch's.
        assert!(f.on_retryable_failure());
        f.on_page(page(1, Some("m")), &config.gap_fill).unwrap();
        for _ in 1..MAX_ROOM_ATTEMPTS {
            assert!(f.on_retryable_failure());
        }
        assert!(!f.on_retryable_failure(), "room 1 ends");
        // Seven failures so far; the eighth gives up on every room left.
        assert!(!f.is_done());
        assert!(!f.on_retryable_failure(), "the batch gives up");
        assert!(f.is_done());
        assert!(!f.on_retryable_failure());
        let (_, fills) = f.into_parts();
        assert_eq!(fills.len(), 4);
        assert!(fills.values().all(|fill| fill.unfilled.is_some()));
        assert_eq!(fills[&room(1)].unfilled.as_ref().unwrap().prev_batch, "m");
    }
}
