//! Turning one parsed sync response (plus any gap fills) into the ordered event stream.
//!
//! Order within a batch: to-device, device lists and key counts, global account data,
//! presence, then rooms (joined, invited, knocked, left; each in room-id order). Within a
//! joined or left room: gap item, gap-fill events (oldest first), state, timeline, ephemeral,
//! room account data. The checkpoint comes last.
//!
//! Events are normalized one at a time, as they are polled, straight from the body they were
//! parsed out of: a batch costs its body plus a cursor, not a queue of every event built in
//! advance, and each event is built just before the consumer takes it.

use std::collections::{BTreeMap, VecDeque};
use std::fmt;

use js_int::UInt;
use ruma_common::{OneTimeKeyAlgorithm, OwnedRoomId};
use self_cell::self_cell;
use serde_json::value::RawValue;

use crate::dedup::Dedup;
use crate::normalize::{
    normalize_identified, normalize_with, parse_event_id, to_raw, Event, EventKind, Gap, Section,
    Senders,
};
use crate::response::{EventList, JoinedRoom, SyncResponse};

/// What gap filling produced for one room.
#[derive(Debug, Default)]
pub(crate) struct RoomFill {
    /// The part of the gap not fetched (past the cap, or filling off).
    pub(crate) unfilled: Option<Gap>,
    /// Fetched events, newest first (as `/messages?dir=b` returns them).
    pub(crate) newest_first: Vec<Box<RawValue>>,
}

pub(crate) type RoomFills = BTreeMap<OwnedRoomId, RoomFill>;

impl RoomFill {
    /// What a room's delivery starts with: the gap item of what was not fetched, then the
    /// fetched events.
    pub(crate) fn into_steps(self, room: &OwnedRoomId) -> (Option<Event>, Option<Fetched>) {
        let gap = self.unfilled.map(|gap| Event::gap(room.clone(), gap));
        let fetched = (!self.newest_first.is_empty()).then(|| Fetched {
            events: self.newest_first.into_iter().rev(),
            room: room.clone(),
        });
        (gap, fetched)
    }
}

/// Events fetched to fill a room's gap, handed on oldest first.
pub(crate) struct Fetched {
    events: std::iter::Rev<std::vec::IntoIter<Box<RawValue>>>,
    room: OwnedRoomId,
}

impl Fetched {
    /// The next of them as a timeline event; `None` once all were taken.
    pub(crate) fn next_event(&mut self, senders: &mut Senders) -> Option<Event> {
        let raw = self.events.next()?;
        Some(normalize_with(
            raw,
            Section::Timeline,
            Some(&self.room),
            senders,
        ))
    }
}

/// The one-time-key counts and fallback key types last reported: every response repeats them,
/// and they are handed on only when they change.
pub(crate) type KeyCounts = (
    BTreeMap<OneTimeKeyAlgorithm, UInt>,
    Option<Vec<OneTimeKeyAlgorithm>>,
);

self_cell!(
    /// A sync body and its parse, which borrows every event from it.
    pub(crate) struct ParsedBody {
        owner: Vec<u8>,
        #[covariant]
        dependent: SyncResponse,
    }
);

impl ParsedBody {
    /// Parses `body`; on failure the body comes back with the error (for its excerpt).
    pub(crate) fn parse(body: Vec<u8>) -> Result<Self, (Vec<u8>, serde_json::Error)> {
        Self::try_new_or_recover(body, |body| SyncResponse::parse(body))
    }

    /// The gaps of this answer to a sync from `since` (the twin of the sliding answer's
    /// `gaps`). Only an incremental sync has gaps: an initial sync's limited timelines are
    /// simply where history starts.
    pub(crate) fn gaps(&self, since: Option<&str>) -> Vec<(OwnedRoomId, Gap)> {
        let Some(since) = since else {
            return Vec::new();
        };
        self.response()
            .limited_timelines()
            .map(|(room_id, prev_batch)| {
                let gap = Gap {
                    prev_batch: prev_batch.to_owned(),
                    previous_since: since.to_owned(),
                };
                (room_id.clone(), gap)
            })
            .collect()
    }

    pub(crate) fn response(&self) -> &SyncResponse<'_> {
        self.borrow_dependent()
    }
}

impl fmt::Debug for ParsedBody {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ParsedBody")
            .field("bytes", &self.borrow_owner().len())
            .field("next_batch", &self.response().next_batch)
            .finish()
    }
}

self_cell!(
    /// A batch being handed on: its parsed body and what is left to deliver of it.
    pub(crate) struct Delivery {
        owner: ParsedBody,
        #[covariant]
        dependent: V3Steps,
    }
);

/// What is left of a `/v3/sync` batch.
type V3Steps<'a> = Steps<Listed<'a>>;

impl Delivery {
    /// Plans the delivery of `parsed` with its gap `fills`, ending with a checkpoint.
    pub(crate) fn plan(
        parsed: ParsedBody,
        fills: RoomFills,
        last_key_counts: &mut Option<KeyCounts>,
        live: bool,
    ) -> Self {
        Self::new(parsed, |parsed| {
            let mut planner = Planner {
                steps: Steps::new(),
                last_key_counts,
            };
            let response = parsed.response();
            planner.batch(response, fills);
            let checkpoint = Event::checkpoint(response.next_batch.clone(), live);
            planner.steps.ready(checkpoint);
            planner.steps
        })
    }

    /// The next event not delivered before (within the memory of `dedup`), normalized now;
    /// `None` once the checkpoint was handed on.
    // Inlined down to `normalize`, so that the 280-byte event is built where the caller takes
    // it rather than copied out through each layer.
    #[inline]
    pub(crate) fn next_event(&mut self, dedup: &mut Dedup) -> Option<Event> {
        self.with_dependent_mut(|_, steps| steps.next_event(dedup))
    }

    /// How many of the server's events reached the consumer so far: gap items, leave markers
    /// and the checkpoint are the machine's own and do not count.
    pub(crate) fn delivered(&self) -> usize {
        self.borrow_dependent().delivered()
    }
}

impl fmt::Debug for Delivery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Delivery")
            .field("body", self.borrow_owner())
            .field("steps_left", &self.borrow_dependent().steps_left())
            .finish()
    }
}

/// What is left of a batch, in delivery order, for either protocol: its lists of the body's
/// events (`L`, each protocol's own), and the items both build the same way.
pub(crate) struct Steps<L> {
    queue: VecDeque<Step<L>>,
    delivered: usize,
    senders: Senders,
    /// The membership event that ends the left room being delivered, as normalized for its
    /// list: the leave marker is a copy of it, not a second reading of the same JSON.
    membership: Option<Event>,
}

enum Step<L> {
    /// A list of events in the body, for one section of one room (or of the account).
    Listed(L),
    /// Events fetched to fill a gap.
    Fetched(Fetched),
    /// An item built in advance (gap, device lists, key counts, list update, checkpoint);
    /// `None` once taken.
    Ready(Option<Box<Event>>),
    /// The leave marker of a room, from the membership event kept from its lists; `None`
    /// once taken.
    Leave(Option<OwnedRoomId>),
}

/// The first step of a batch, as [`Steps::front`] finds it.
// Not boxed: it lives between `front` and the loop that returns its item, and a box would be
// one more allocation per item.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Front<'s, L> {
    /// Nothing left.
    Done,
    /// An item new to dedup (gap, fetched event, leave marker, checkpoint, ...), counted.
    Item(Event),
    /// A list of the body's events, which its protocol's loop hands on.
    List(ListTurn<'s, L>),
}

/// A list's turn, with what handing on its events changes.
pub(crate) struct ListTurn<'s, L> {
    pub(crate) list: &'s mut L,
    pub(crate) senders: &'s mut Senders,
    /// Where to keep the event a leave marker is to copy.
    pub(crate) membership: &'s mut Option<Event>,
    /// To count each event handed on.
    pub(crate) delivered: &'s mut usize,
}

impl<L> Steps<L> {
    pub(crate) fn new() -> Self {
        Self {
            queue: VecDeque::new(),
            delivered: 0,
            senders: Senders::default(),
            membership: None,
        }
    }

    /// Server events handed on so far: gap items, list updates, leave markers and the
    /// checkpoint are the machine's own and do not count.
    pub(crate) fn delivered(&self) -> usize {
        self.delivered
    }

    pub(crate) fn steps_left(&self) -> usize {
        self.queue.len()
    }

    /// Hands on `event` when its turn comes.
    pub(crate) fn ready(&mut self, event: Event) {
        self.queue.push_back(Step::Ready(Some(Box::new(event))));
    }

    pub(crate) fn list(&mut self, list: L) {
        self.queue.push_back(Step::Listed(list));
    }

    /// A room's gap: the events fetched, after the gap item for what was not.
    pub(crate) fn fill(&mut self, room_id: &OwnedRoomId, fill: Option<RoomFill>) {
        let (gap, fetched) = fill.map_or((None, None), |fill| fill.into_steps(room_id));
        if let Some(gap) = gap {
            self.ready(gap);
        }
        self.queue.extend(fetched.map(Step::Fetched));
    }

    /// The leave marker of `room`, after everything queued before it.
    pub(crate) fn leave(&mut self, room: OwnedRoomId) {
        self.queue.push_back(Step::Leave(Some(room)));
    }

    /// The one-time-key counts and fallback key types, when they changed since `last`.
    pub(crate) fn key_counts(
        &mut self,
        counts: &BTreeMap<OneTimeKeyAlgorithm, UInt>,
        fallback: &Option<Vec<OneTimeKeyAlgorithm>>,
        last: &mut Option<KeyCounts>,
    ) {
        if counts.is_empty() && fallback.is_none() {
            return;
        }
        if let Some((last_counts, last_fallback)) = &*last {
            if last_counts == counts && last_fallback == fallback {
                return;
            }
        }
        let raw = to_raw(&serde_json::json!({
            "device_one_time_keys_count": counts,
            "device_unused_fallback_key_types": fallback,
        }));
        *last = Some((counts.clone(), fallback.clone()));
        self.ready(Event::section(
            EventKind::OneTimeKeyCounts,
            "device_one_time_keys_count",
            None,
            raw,
        ));
    }

    /// Hands on the items queued before the next list: the first new one, the list when
    /// one comes first, or `Done`. Each protocol's `next_event` loops over this, handing on
    /// its lists' events itself (a list's events are most of a batch: each is built straight
    /// into the value its loop returns).
    #[inline]
    pub(crate) fn front(&mut self, dedup: &mut Dedup) -> Front<'_, L> {
        loop {
            let Some(step) = self.queue.front_mut() else {
                return Front::Done;
            };
            let item = match step {
                // Returned below: a borrow returned from inside the loop would hold the queue
                // for all of it.
                Step::Listed(_) => break,
                Step::Fetched(fetched) => fetched.next_event(&mut self.senders),
                Step::Ready(event) => event.take().map(|event| *event),
                Step::Leave(room) => room
                    .take()
                    .map(|room| leave_marker(self.membership.take(), room)),
            };
            match item {
                Some(event) if first_delivery(dedup, &event) => {
                    if !matches!(
                        event.kind,
                        EventKind::Gap(_)
                            | EventKind::Checkpoint(_)
                            | EventKind::ListUpdate(_)
                            | EventKind::Leave
                    ) {
                        self.delivered += 1;
                    }
                    return Front::Item(event);
                }
                Some(event) => log::debug!("skipping already delivered event {:?}", event.event_id),
                None => {
                    self.queue.pop_front();
                }
            }
        }
        match self.queue.front_mut() {
            Some(Step::Listed(list)) => Front::List(ListTurn {
                list,
                senders: &mut self.senders,
                membership: &mut self.membership,
                delivered: &mut self.delivered,
            }),
            _ => unreachable!("the loop stops only at a list"),
        }
    }

    /// Ends the list that [`front`](Self::front) returned: it has no event left.
    pub(crate) fn end_list(&mut self) {
        self.queue.pop_front();
    }
}

/// A list of the events of a `/v3/sync` body, for one section of one room (or of the account):
/// each event's fields were read by the pass over the body, so dedup decides before the event
/// is built.
pub(crate) struct Listed<'a> {
    events: &'a EventList<'a>,
    /// The next one to deliver.
    next: usize,
    section: Section,
    room: Option<OwnedRoomId>,
    /// A left room's timeline: its last membership event is kept for the leave marker.
    keep_membership: bool,
}

impl V3Steps<'_> {
    /// The next event not delivered before (within the memory of `dedup`), normalized now;
    /// `None` once the checkpoint was handed on.
    // The events of the body's lists are checked against dedup from their fields and then
    // built straight into the value returned: building first and deciding after moved each
    // 280-byte event through three more places.
    #[inline]
    fn next_event(&mut self, dedup: &mut Dedup) -> Option<Event> {
        loop {
            let turn = match self.front(dedup) {
                Front::Done => return None,
                Front::Item(event) => return Some(event),
                Front::List(turn) => turn,
            };
            let list = turn.list;
            let Some(entry) = list.events.entry(list.next) else {
                self.end_list();
                continue;
            };
            list.next += 1;
            let fields = entry.fields();
            let event_id = fields.event_id.as_deref().and_then(parse_event_id);
            let fresh = match &event_id {
                Some(id) if deduplicated(list.section) => dedup.first_time(id),
                _ => true,
            };
            if list.keep_membership && fields.event_type.as_deref() == Some("m.room.member") {
                // Kept whether or not dedup lets it through: the marker does not depend on it.
                let event = normalize_identified(
                    entry.raw.to_owned(),
                    fields,
                    event_id,
                    list.section,
                    list.room.as_ref(),
                    turn.senders,
                );
                *turn.membership = Some(event.clone());
                if fresh {
                    *turn.delivered += 1;
                    return Some(event);
                }
                log::debug!("skipping already delivered event {:?}", event.event_id);
                continue;
            }
            if !fresh {
                log::debug!("skipping already delivered event {event_id:?}");
                continue;
            }
            *turn.delivered += 1;
            return Some(normalize_identified(
                entry.raw.to_owned(),
                fields,
                event_id,
                list.section,
                list.room.as_ref(),
                turn.senders,
            ));
        }
    }
}

/// Whether the events of `section` are deduplicated by id: stripped state and to-device
/// events are not room timeline (the sections of the kinds [`first_delivery`] lets through).
fn deduplicated(section: Section) -> bool {
    !matches!(
        section,
        Section::Invite | Section::Knock | Section::ToDevice
    )
}

/// Whether `event` is new: room events seen before (by event id) are not delivered again
/// (the rule of both protocols' batches).
pub(crate) fn first_delivery(dedup: &mut Dedup, event: &Event) -> bool {
    match &event.event_id {
        // Stripped state and to-device events are not room timeline: never deduplicated.
        Some(_)
            if matches!(
                event.kind,
                EventKind::Invite | EventKind::Knock | EventKind::ToDevice
            ) =>
        {
            true
        }
        Some(id) => dedup.first_time(id),
        None => true,
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Membership {
    Joined,
    Left,
}

/// Lays out the steps of one batch.
struct Planner<'a, 'k> {
    steps: V3Steps<'a>,
    last_key_counts: &'k mut Option<KeyCounts>,
}

impl<'a> Planner<'a, '_> {
    fn list(&mut self, events: &'a EventList<'a>, section: Section, room: Option<&OwnedRoomId>) {
        self.list_keeping(events, section, room, false);
    }

    fn list_keeping(
        &mut self,
        events: &'a EventList<'a>,
        section: Section,
        room: Option<&OwnedRoomId>,
        keep_membership: bool,
    ) {
        if !events.is_empty() {
            self.steps.list(Listed {
                events,
                next: 0,
                section,
                room: room.cloned(),
                keep_membership,
            });
        }
    }

    fn batch(&mut self, response: &'a SyncResponse<'a>, mut fills: RoomFills) {
        let rooms = &response.rooms;
        self.list(&response.to_device.events, Section::ToDevice, None);
        if !response.device_lists.is_empty() {
            let raw = to_raw(&response.device_lists);
            self.steps.ready(Event::section(
                EventKind::DeviceLists,
                "device_lists",
                None,
                raw,
            ));
        }
        self.steps.key_counts(
            &response.device_one_time_keys_count,
            &response.device_unused_fallback_key_types,
            self.last_key_counts,
        );
        self.list(
            &response.account_data.events,
            Section::GlobalAccountData,
            None,
        );
        self.list(&response.presence.events, Section::Presence, None);

        for (room_id, room) in &rooms.join {
            self.room(room_id, room, fills.remove(room_id), Membership::Joined);
        }
        for (room_id, room) in &rooms.invite {
            self.list(&room.invite_state.events, Section::Invite, Some(room_id));
        }
        for (room_id, room) in &rooms.knock {
            self.list(&room.knock_state.events, Section::Knock, Some(room_id));
        }
        for (room_id, room) in &rooms.leave {
            self.room(room_id, room, fills.remove(room_id), Membership::Left);
            self.steps.leave(room_id.clone());
        }
    }

    /// A joined or left room: gap item and fills, state, timeline, ephemeral (joined rooms
    /// only), room account data.
    fn room(
        &mut self,
        room_id: &OwnedRoomId,
        room: &'a JoinedRoom<'a>,
        fill: Option<RoomFill>,
        membership: Membership,
    ) {
        self.steps.fill(room_id, fill);
        let id = Some(room_id);
        self.list(&room.state.events, Section::State, id);
        self.list(&room.state_after.events, Section::State, id);
        let left = membership == Membership::Left;
        self.list_keeping(&room.timeline.events, Section::Timeline, id, left);
        if membership == Membership::Joined {
            self.list(&room.ephemeral.events, Section::Ephemeral, id);
        }
        self.list(&room.account_data.events, Section::RoomAccountData, id);
    }
}

/// The leave marker of `room`, from the membership event that took the user out when there
/// was one: for `/v3/sync`, the last membership event of its timeline (normally the user's own
/// leave or kick); for sliding sync, the user's own last.
pub(crate) fn leave_marker(membership: Option<Event>, room: OwnedRoomId) -> Event {
    match membership {
        Some(mut event) => {
            event.kind = EventKind::Leave;
            // The membership event itself was delivered just before, with its id.
            event.event_id = None;
            event
        }
        None => Event::section(
            EventKind::Leave,
            "m.room.member",
            Some(room),
            to_raw(&serde_json::json!({})),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn emit(body: &str, dedup: &mut Dedup, last: &mut Option<KeyCounts>) -> Vec<Event> {
        let parsed = ParsedBody::parse(body.as_bytes().to_vec()).unwrap();
        let mut delivery = Delivery::plan(parsed, RoomFills::new(), last, false);
        let mut out: Vec<Event> = std::iter::from_fn(|| delivery.next_event(dedup)).collect();
        assert!(matches!(
            out.pop().map(|e| e.kind),
            Some(EventKind::Checkpoint(_))
        ));
        out
    }

    #[test]
    fn key_counts_are_reported_when_either_part_is_present_and_only_when_changed() {
        let (mut dedup, mut last) = (Dedup::new(8), None);
        let fallback =
            r#"{"next_batch":"a","device_unused_fallback_key_types":["signed_curve25519"]}"#;
        let counts = r#"{"next_batch":"b","device_one_time_keys_count":{"signed_curve25519":5}}"#;
        for body in [fallback, counts] {
            let events = emit(body, &mut dedup, &mut last);
            assert_eq!(events.len(), 1, "{body}");
            assert_eq!(events[0].kind, EventKind::OneTimeKeyCounts);
            assert!(
                emit(body, &mut dedup, &mut last).is_empty(),
                "unchanged: not repeated"
            );
        }
        assert!(emit(r#"{"next_batch":"c"}"#, &mut dedup, &mut last).is_empty());
        // A change in either part alone is reported.
        let both = |count: u32, fallback: &str| {
            format!(
                r#"{{"next_batch":"d","device_one_time_keys_count":{{"signed_curve25519":{count}}},
                "device_unused_fallback_key_types":[{fallback}]}}"#
            )
        };
        for (count, fallback, reported) in [
            (1, r#""signed_curve25519""#, true),
            (1, "", true),
            (2, "", true),
            (2, "", false),
        ] {
            let events = emit(&both(count, fallback), &mut dedup, &mut last);
            assert_eq!(events.len(), usize::from(reported), "{count} {fallback}");
        }
    }

    #[test]
    fn leave_marker_is_the_last_membership_event_even_when_that_was_delivered_before() {
        let (mut dedup, mut last) = (Dedup::new(8), None);
        let member = |id: &str, m: &str| {
            format!(
                r#"{{"type":"m.room.member","event_id":"{id}","sender":"@a:x","state_key":"@a:x","content":{{"membership":"{m}"}}}}"#
            )
        };
        let body = format!(
            r#"{{"next_batch":"a","rooms":{{"leave":{{
                "!l:x":{{"timeline":{{"events":[{},{{"type":"m.room.message","event_id":"$m:x"}},{},{{"type":"m.room.message","event_id":"$n:x"}}]}}}},
                "!m:x":{{"timeline":{{"events":[{{"type":"m.room.message","event_id":"$o:x"}}]}}}}}}}}}}"#,
            member("$j:x", "join"),
            member("$l:x", "leave"),
        );
        for round in 0..2 {
            let events = emit(&body, &mut dedup, &mut last);
            let markers: Vec<&Event> = events
                .iter()
                .filter(|e| e.kind == EventKind::Leave)
                .collect();
            assert_eq!(markers.len(), 2, "round {round}");
            let (l, m) = (markers[0], markers[1]);
            assert_eq!(l.raw.get(), member("$l:x", "leave"));
            assert_eq!(
                (l.event_id.as_ref(), l.event_type.as_str()),
                (None, "m.room.member")
            );
            assert_eq!(l.sender.as_ref().map(|s| s.as_str()), Some("@a:x"));
            assert_eq!(l.state_key.as_deref(), Some("@a:x"));
            assert_eq!(l.room_id.as_ref().map(|r| r.as_str()), Some("!l:x"));
            // A left room with no membership event in its timeline: an empty marker.
            assert_eq!((m.raw.get(), m.sender.as_ref()), ("{}", None));
            assert_eq!(m.room_id.as_ref().map(|r| r.as_str()), Some("!m:x"));
        }
    }

    #[test]
    fn events_seen_before_are_skipped_but_stripped_state_and_to_device_are_not() {
        let (mut dedup, mut last) = (Dedup::new(8), None);
        let body = r#"{"next_batch":"a","to_device":{"events":[{"type":"t","event_id":"$d:x"}]},
            "rooms":{"join":{"!r:x":{"timeline":{"events":[
                {"type":"m.room.message","event_id":"$m:x"},{"type":"m.room.message","event_id":"$m:x"}]}}},
            "invite":{"!i:x":{"invite_state":{"events":[{"type":"m.room.name","event_id":"$n:x"}]}}}}}"#;
        let kinds = |events: Vec<Event>| events.into_iter().map(|e| e.kind).collect::<Vec<_>>();
        assert_eq!(
            kinds(emit(body, &mut dedup, &mut last)),
            [EventKind::ToDevice, EventKind::Message, EventKind::Invite]
        );
        assert_eq!(
            kinds(emit(body, &mut dedup, &mut last)),
            [EventKind::ToDevice, EventKind::Invite]
        );
    }
}
