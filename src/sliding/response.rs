//! The sliding sync answer, read once with every event borrowed from the body, and handed on
//! as the same normalized events as a `/v3/sync` batch.
//!
//! Order within a batch, as for `/v3/sync`: to-device, device lists and key counts, global
//! account data, then the list update (when the list changed), then rooms in room-id order.
//! Within a room: its gap (a `limited` timeline of a room the connection had sent before, or
//! of any room after a connection reset) filled from `/messages` as a `/v3/sync` gap is (the
//! fetched events, and a gap item for what was not fetched), `required_state`, timeline,
//! receipts and typing, room account data, and the leave marker of a room the user left (with
//! [`SlidingSyncConfig::user_id`](super::SlidingSyncConfig::user_id)); an invited or knocked
//! room's stripped state. The checkpoint (the new [`SlidingPosition`] as a token) comes last.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;

use js_int::UInt;
use ruma_client_api::sync::sync_events::DeviceLists;
use ruma_common::{OneTimeKeyAlgorithm, OwnedRoomId, UserId};
use self_cell::self_cell;
use serde::Deserialize;
use serde_json::value::RawValue;

use super::{ListOp, ListUpdate, SlidingPosition};
use crate::batch::{first_delivery, Front, KeyCounts, RoomFills, Steps};
use crate::dedup::Dedup;
use crate::normalize::{normalize_with, to_raw, Event, EventKind, Gap, Section};

/// The body of a sliding sync answer (Synapse's shape; unknown members are ignored).
#[derive(Debug, Deserialize)]
pub(crate) struct SlidingResponse<'a> {
    pub(crate) pos: String,
    #[serde(default)]
    pub(crate) lists: BTreeMap<String, ListResult>,
    #[serde(default, borrow)]
    pub(crate) rooms: BTreeMap<OwnedRoomId, Room<'a>>,
    #[serde(default, borrow)]
    pub(crate) extensions: ExtensionsResult<'a>,
}

/// One list's result.
#[derive(Debug, Deserialize)]
pub(crate) struct ListResult {
    pub(crate) count: UInt,
    #[serde(default)]
    pub(crate) ops: Vec<Op>,
}

/// A list operation (Synapse: `SYNC` with the range and its rooms).
#[derive(Debug, Deserialize)]
pub(crate) struct Op {
    pub(crate) op: String,
    #[serde(default)]
    pub(crate) range: Option<(UInt, UInt)>,
    #[serde(default)]
    pub(crate) room_ids: Vec<OwnedRoomId>,
}

/// A room of the answer.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct Room<'a> {
    #[serde(default)]
    pub(crate) initial: bool,
    #[serde(default)]
    pub(crate) limited: bool,
    #[serde(default)]
    pub(crate) prev_batch: Option<String>,
    #[serde(default, borrow)]
    pub(crate) required_state: Vec<&'a RawValue>,
    #[serde(default, borrow)]
    pub(crate) timeline: Vec<&'a RawValue>,
    /// Invited or knocked rooms: stripped state, no timeline.
    #[serde(default, borrow)]
    pub(crate) invite_state: Option<Vec<&'a RawValue>>,
}

/// `extensions` of the answer: a member only for an extension asked for.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct ExtensionsResult<'a> {
    #[serde(default, borrow)]
    pub(crate) to_device: Option<ToDevice<'a>>,
    #[serde(default)]
    pub(crate) e2ee: Option<E2ee>,
    #[serde(default, borrow)]
    pub(crate) account_data: AccountData<'a>,
    #[serde(default, borrow)]
    pub(crate) receipts: PerRoom<'a>,
    #[serde(default, borrow)]
    pub(crate) typing: PerRoom<'a>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct ToDevice<'a> {
    pub(crate) next_batch: String,
    #[serde(default, borrow)]
    pub(crate) events: Vec<&'a RawValue>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct E2ee {
    #[serde(default)]
    pub(crate) device_lists: DeviceLists,
    #[serde(default)]
    pub(crate) device_one_time_keys_count: BTreeMap<OneTimeKeyAlgorithm, UInt>,
    #[serde(default)]
    pub(crate) device_unused_fallback_key_types: Option<Vec<OneTimeKeyAlgorithm>>,
}

#[derive(Debug, Default, Deserialize)]
pub(crate) struct AccountData<'a> {
    #[serde(default, borrow)]
    pub(crate) global: Vec<&'a RawValue>,
    #[serde(default, borrow)]
    pub(crate) rooms: BTreeMap<OwnedRoomId, Vec<&'a RawValue>>,
}

/// `receipts` or `typing`: one ephemeral event per room.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct PerRoom<'a> {
    #[serde(default, borrow)]
    pub(crate) rooms: BTreeMap<OwnedRoomId, &'a RawValue>,
}

impl<'a> Room<'a> {
    /// The user's own last membership event when it says the user is out of the room (`leave`,
    /// or `ban`): the room's `required_state` (its state after the timeline) first, else the
    /// timeline's last. `None` when the user is in the room, or neither says.
    fn left_by(&self, user: &UserId) -> Option<&'a RawValue> {
        #[derive(Deserialize)]
        struct Member<'b> {
            #[serde(rename = "type", borrow)]
            event_type: Cow<'b, str>,
            #[serde(borrow)]
            state_key: Option<Cow<'b, str>>,
            #[serde(borrow)]
            content: Content<'b>,
        }
        #[derive(Deserialize)]
        struct Content<'b> {
            #[serde(borrow)]
            membership: Option<Cow<'b, str>>,
        }
        let own = |raw: &&'a RawValue| -> Option<(&'a RawValue, bool)> {
            // Most events are not membership events: a byte search before any parse.
            memchr::memmem::find(raw.get().as_bytes(), b"m.room.member")?;
            let member: Member<'_> = serde_json::from_str(raw.get()).ok()?;
            let mine = member.event_type == "m.room.member"
                && member.state_key.as_deref() == Some(user.as_str());
            let out = matches!(member.content.membership.as_deref(), Some("leave" | "ban"));
            mine.then_some((*raw, out))
        };
        let last = self
            .required_state
            .iter()
            .rev()
            .find_map(own)
            .or_else(|| self.timeline.iter().rev().find_map(own))?;
        last.1.then_some(last.0)
    }
}

impl<'a> SlidingResponse<'a> {
    pub(crate) fn parse(body: &'a [u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(body)
    }

    /// Nothing for the consumer besides the position and the list (key counts aside, which
    /// every answer repeats).
    pub(crate) fn is_empty(&self) -> bool {
        let ext = &self.extensions;
        self.rooms.is_empty()
            && ext.to_device.as_ref().is_none_or(|t| t.events.is_empty())
            && ext.e2ee.as_ref().is_none_or(|e| e.device_lists.is_empty())
            && ext.account_data.global.is_empty()
            && ext.account_data.rooms.values().all(Vec::is_empty)
            && ext.receipts.rooms.is_empty()
            && ext.typing.rooms.is_empty()
    }

    /// The position the answer moves to: its `pos`, and the to-device cursor it returned (or
    /// the one sent, when the extension is off).
    pub(crate) fn next_position(&self, sent: &SlidingPosition) -> SlidingPosition {
        SlidingPosition {
            pos: Some(self.pos.clone()),
            to_device_since: match &self.extensions.to_device {
                Some(to_device) => Some(to_device.next_batch.clone()),
                None => sent.to_device_since.clone(),
            },
        }
    }

    /// The count of list `name`, if the answer has it.
    pub(crate) fn count(&self, name: &str) -> Option<u64> {
        self.lists.get(name).map(|l| l.count.into())
    }

    /// The rooms with missed events, each with its gap: a `limited` timeline of a room the
    /// connection had sent before misses events back to the position sent, and after a
    /// connection reset (`reset_floor`, the last checkpoint's stream part) every `limited`
    /// room misses events back to that; a room's first appearance is where its history starts.
    pub(crate) fn gaps(
        &self,
        sent: &SlidingPosition,
        reset_floor: Option<&str>,
    ) -> Vec<(OwnedRoomId, Gap)> {
        let previous = sent.pos.as_deref().map(SlidingPosition::stream_part);
        self.rooms
            .iter()
            .filter(|(_, room)| room.limited && room.invite_state.is_none())
            .filter_map(|(room_id, room)| {
                let floor = if room.initial { reset_floor } else { previous };
                let gap = Gap {
                    prev_batch: room.prev_batch.clone()?,
                    previous_since: floor?.to_owned(),
                };
                Some((room_id.clone(), gap))
            })
            .collect()
    }

    /// Every token the machine would store or send back must survive the trip.
    pub(crate) fn check_tokens(&self, sent: &SlidingPosition) -> Result<(), String> {
        let next = self.next_position(sent);
        next.check()?;
        crate::token::check(&next.to_token()).map_err(|p| p.describe("the checkpoint"))?;
        for room in self.rooms.values().filter(|r| r.limited) {
            if let Some(prev_batch) = &room.prev_batch {
                crate::token::check(prev_batch).map_err(|p| p.describe("prev_batch"))?;
            }
        }
        Ok(())
    }
}

self_cell!(
    /// A sliding sync body and its parse, which borrows every event from it.
    pub(crate) struct SlidingBody {
        owner: Vec<u8>,
        #[covariant]
        dependent: SlidingResponse,
    }
);

impl SlidingBody {
    /// Parses `body`; on failure the body comes back with the error (for its excerpt).
    pub(crate) fn parse(body: Vec<u8>) -> Result<Self, (Vec<u8>, serde_json::Error)> {
        Self::try_new_or_recover(body, |body| SlidingResponse::parse(body))
    }

    pub(crate) fn response(&self) -> &SlidingResponse<'_> {
        self.borrow_dependent()
    }
}

impl fmt::Debug for SlidingBody {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SlidingBody")
            .field("bytes", &self.borrow_owner().len())
            .field("pos", &self.response().pos)
            .finish()
    }
}

/// The list as last reported: a [`ListUpdate`] comes only when it changed.
pub(crate) type ListMemory = BTreeMap<String, ListUpdate>;

/// What planning a batch needs from the machine.
pub(crate) struct Context<'m> {
    /// The position the request was sent from.
    pub(crate) sent: &'m SlidingPosition,
    /// What was fetched for the gaps of [`SlidingResponse::gaps`], and what was not.
    pub(crate) fills: RoomFills,
    pub(crate) live: bool,
    pub(crate) last_key_counts: &'m mut Option<KeyCounts>,
    pub(crate) lists: &'m mut ListMemory,
    /// The account's user, for the leave markers (none without it).
    pub(crate) user_id: Option<&'m UserId>,
}

self_cell!(
    /// A sliding sync batch being handed on.
    pub(crate) struct SlidingDelivery {
        owner: SlidingBody,
        #[covariant]
        dependent: SlidingSteps,
    }
);

/// What is left of a sliding sync batch.
type SlidingSteps<'a> = Steps<Listed<'a>>;

impl SlidingDelivery {
    /// Plans the delivery of `body`, ending with its checkpoint.
    pub(crate) fn plan(body: SlidingBody, context: Context<'_>) -> Self {
        Self::new(body, |body| {
            let mut planner = Planner {
                steps: Steps::new(),
            };
            planner.batch(body.response(), context);
            planner.steps
        })
    }

    /// The next event not delivered before; `None` once the checkpoint was handed on.
    pub(crate) fn next_event(&mut self, dedup: &mut Dedup) -> Option<Event> {
        self.with_dependent_mut(|_, steps| steps.next_event(dedup))
    }

    /// Server events handed on so far (list updates, gaps, leave markers and the checkpoint do
    /// not count).
    pub(crate) fn delivered(&self) -> usize {
        self.borrow_dependent().delivered()
    }
}

impl fmt::Debug for SlidingDelivery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SlidingDelivery")
            .field("body", self.borrow_owner())
            .field("steps_left", &self.borrow_dependent().steps_left())
            .finish()
    }
}

/// A list of the events of a sliding sync body, for one section of one room (or of the
/// account): each event is normalized, then checked against dedup.
pub(crate) struct Listed<'a> {
    events: std::slice::Iter<'a, &'a RawValue>,
    section: Section,
    room: Option<OwnedRoomId>,
    /// The event of this list to keep for the room's leave marker.
    keep: Option<&'a RawValue>,
}

impl SlidingSteps<'_> {
    /// The next event not delivered before; `None` once the checkpoint was handed on.
    fn next_event(&mut self, dedup: &mut Dedup) -> Option<Event> {
        loop {
            let turn = match self.front(dedup) {
                Front::Done => return None,
                Front::Item(event) => return Some(event),
                Front::List(turn) => turn,
            };
            let list = turn.list;
            let Some(raw) = list.events.next() else {
                self.end_list();
                continue;
            };
            let event = normalize_with(
                (*raw).to_owned(),
                list.section,
                list.room.as_ref(),
                turn.senders,
            );
            if list.keep.is_some_and(|keep| std::ptr::eq(keep, *raw)) {
                // Kept whether or not dedup lets it through: the marker does not depend on it.
                *turn.membership = Some(event.clone());
            }
            if first_delivery(dedup, &event) {
                *turn.delivered += 1;
                return Some(event);
            }
            log::debug!("skipping already delivered event {:?}", event.event_id);
        }
    }
}

/// Lays out the steps of one batch.
struct Planner<'a> {
    steps: SlidingSteps<'a>,
}

impl<'a> Planner<'a> {
    fn list(&mut self, events: &'a [&'a RawValue], section: Section, room: Option<&OwnedRoomId>) {
        self.list_keeping(events, section, room, None);
    }

    /// [`list`](Self::list), keeping the event `keep` (if it is one of `events`) for the
    /// room's leave marker.
    fn list_keeping(
        &mut self,
        events: &'a [&'a RawValue],
        section: Section,
        room: Option<&OwnedRoomId>,
        keep: Option<&'a RawValue>,
    ) {
        if !events.is_empty() {
            self.steps.list(Listed {
                events: events.iter(),
                section,
                room: room.cloned(),
                keep,
            });
        }
    }

    fn batch(&mut self, response: &'a SlidingResponse<'a>, mut context: Context<'_>) {
        let ext = &response.extensions;
        if let Some(to_device) = &ext.to_device {
            self.list(&to_device.events, Section::ToDevice, None);
        }
        if let Some(e2ee) = &ext.e2ee {
            if !e2ee.device_lists.is_empty() {
                let raw = to_raw(&e2ee.device_lists);
                self.steps.ready(Event::section(
                    EventKind::DeviceLists,
                    "device_lists",
                    None,
                    raw,
                ));
            }
            self.steps.key_counts(
                &e2ee.device_one_time_keys_count,
                &e2ee.device_unused_fallback_key_types,
                context.last_key_counts,
            );
        }
        self.list(&ext.account_data.global, Section::GlobalAccountData, None);
        for (name, list) in &response.lists {
            self.list_update(name, list, context.lists);
        }
        for (room_id, room) in &response.rooms {
            let id = Some(room_id);
            if let Some(stripped) = &room.invite_state {
                self.list(stripped, stripped_section(stripped), id);
                continue;
            }
            self.steps.fill(room_id, context.fills.remove(room_id));
            let left = context.user_id.and_then(|user| room.left_by(user));
            self.list_keeping(&room.required_state, Section::State, id, left);
            self.list_keeping(&room.timeline, Section::Timeline, id, left);
            self.ephemeral(response, room_id);
            self.room_account_data(response, room_id);
            if left.is_some() {
                self.steps.leave(room_id.clone());
            }
        }
        // Extension data of rooms that did not come in `rooms` themselves.
        let ephemeral_only = ext
            .receipts
            .rooms
            .keys()
            .chain(ext.typing.rooms.keys())
            .chain(ext.account_data.rooms.keys())
            .filter(|id| !response.rooms.contains_key(*id))
            .collect::<std::collections::BTreeSet<_>>();
        for room_id in ephemeral_only {
            self.ephemeral(response, room_id);
            self.room_account_data(response, room_id);
        }
        let next = response.next_position(context.sent);
        self.steps
            .ready(Event::checkpoint(next.to_token(), context.live));
    }

    fn ephemeral(&mut self, response: &'a SlidingResponse<'a>, room_id: &OwnedRoomId) {
        let ext = &response.extensions;
        for map in [&ext.receipts.rooms, &ext.typing.rooms] {
            if let Some(raw) = map.get(room_id) {
                self.list(std::slice::from_ref(raw), Section::Ephemeral, Some(room_id));
            }
        }
    }

    fn room_account_data(&mut self, response: &'a SlidingResponse<'a>, room_id: &OwnedRoomId) {
        if let Some(events) = response.extensions.account_data.rooms.get(room_id) {
            self.list(events, Section::RoomAccountData, Some(room_id));
        }
    }

    fn list_update(&mut self, name: &str, list: &ListResult, memory: &mut ListMemory) {
        let update = ListUpdate {
            list: name.to_owned(),
            count: list.count.into(),
            ops: list
                .ops
                .iter()
                .map(|op| ListOp {
                    op: op.op.clone(),
                    range: op.range.map(|(a, b)| (a.into(), b.into())),
                    room_ids: op.room_ids.clone(),
                })
                .collect(),
        };
        if memory.get(name) == Some(&update) {
            return;
        }
        let raw = to_raw(&serde_json::json!({
            "list": name,
            "count": update.count,
            "ops": update.ops.iter().map(|op| serde_json::json!({
                "op": op.op,
                "range": op.range.map(|(a, b)| [a, b]),
                "room_ids": op.room_ids,
            })).collect::<Vec<_>>(),
        }));
        memory.insert(name.to_owned(), update.clone());
        self.steps.ready(Event::section(
            EventKind::ListUpdate(update),
            "list_update",
            None,
            raw,
        ));
    }
}

/// Synapse sends invited and knocked rooms alike, as `invite_state`: a knock carries the
/// user's own `knock` membership event among it.
fn stripped_section(events: &[&RawValue]) -> Section {
    #[derive(Deserialize)]
    struct Stripped<'a> {
        #[serde(rename = "type", borrow, default)]
        event_type: Option<std::borrow::Cow<'a, str>>,
        #[serde(default)]
        content: Membership,
    }
    #[derive(Default, Deserialize)]
    struct Membership {
        #[serde(default)]
        membership: Option<String>,
    }
    let knock = events.iter().any(|raw| {
        serde_json::from_str::<Stripped<'_>>(raw.get()).is_ok_and(|s| {
            s.event_type.as_deref() == Some("m.room.member")
                && s.content.membership.as_deref() == Some("knock")
        })
    });
    if knock {
        Section::Knock
    } else {
        Section::Invite
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::RoomFill;

    /// The events of `body`, answered to `sent`, with its gaps unfilled.
    fn emit(
        body: &str,
        sent: &SlidingPosition,
        dedup: &mut Dedup,
        lists: &mut ListMemory,
    ) -> Vec<Event> {
        let parsed = SlidingBody::parse(body.as_bytes().to_vec()).unwrap();
        let fills = parsed
            .response()
            .gaps(sent, None)
            .into_iter()
            .map(|(room_id, gap)| {
                let fill = RoomFill {
                    unfilled: Some(gap),
                    newest_first: Vec::new(),
                };
                (room_id, fill)
            })
            .collect();
        emit_with(parsed, sent, fills, dedup, lists, None)
    }

    fn emit_with(
        parsed: SlidingBody,
        sent: &SlidingPosition,
        fills: RoomFills,
        dedup: &mut Dedup,
        lists: &mut ListMemory,
        user_id: Option<&UserId>,
    ) -> Vec<Event> {
        let mut counts = None;
        let context = Context {
            sent,
            fills,
            live: false,
            last_key_counts: &mut counts,
            lists,
            user_id,
        };
        let mut delivery = SlidingDelivery::plan(parsed, context);
        std::iter::from_fn(|| delivery.next_event(dedup)).collect()
    }

    const BODY: &str = r#"{"pos":"7/s9_1","lists":{"all":{"count":2,"ops":[{"op":"SYNC","range":[0,9],"room_ids":["!b:x","!a:x"]}]}},
        "rooms":{
          "!b:x":{"limited":true,"prev_batch":"t1","timeline":[{"type":"m.room.message","event_id":"$m:x","sender":"@u:x","origin_server_ts":1,"content":{"body":"hi"}}],
                  "required_state":[{"type":"m.room.name","event_id":"$n:x","sender":"@u:x","state_key":"","content":{"name":"N"}}]},
          "!a:x":{"initial":true,"limited":true,"prev_batch":"t0","timeline":[]},
          "!i:x":{"invite_state":[{"type":"m.room.member","sender":"@u:x","state_key":"@me:x","content":{"membership":"invite"}}]},
          "!k:x":{"invite_state":[{"type":"m.room.member","sender":"@me:x","state_key":"@me:x","content":{"membership":"knock"}}]}},
        "extensions":{"to_device":{"next_batch":"12","events":[{"type":"m.dummy","sender":"@u:x","content":{}}]},
          "e2ee":{"device_one_time_keys_count":{"signed_curve25519":3},"device_lists":{"changed":["@u:x"],"left":[]}},
          "account_data":{"global":[{"type":"m.push_rules","content":{}}],"rooms":{"!b:x":[{"type":"m.tag","content":{}}]}},
          "receipts":{"rooms":{"!b:x":{"type":"m.receipt","content":{}}}},
          "typing":{"rooms":{"!z:x":{"type":"m.typing","content":{"user_ids":[]}}}}}}"#;

    #[test]
    fn a_batch_comes_in_the_order_of_v3_batches_and_ends_with_the_pair() {
        let sent = SlidingPosition {
            pos: Some("6/s8_1".to_owned()),
            to_device_since: Some("10".to_owned()),
        };
        let (mut dedup, mut lists) = (Dedup::new(64), ListMemory::new());
        let events = emit(BODY, &sent, &mut dedup, &mut lists);
        let kinds: Vec<&str> = events.iter().map(|e| e.kind.name()).collect();
        assert_eq!(
            kinds,
            [
                "to_device",
                "device_lists",
                "one_time_key_counts",
                "global_account_data",
                "list_update",
                "gap",
                "state",
                "message",
                "receipt",
                "room_account_data",
                "invite",
                "knock",
                "typing",
                "checkpoint"
            ]
        );
        let gap = events.iter().find_map(|e| match &e.kind {
            EventKind::Gap(gap) => Some(gap.clone()),
            _ => None,
        });
        assert_eq!(
            gap,
            Some(Gap {
                prev_batch: "t1".to_owned(),
                previous_since: "s8_1".to_owned()
            }),
            "only the limited room the connection had sent before has a gap"
        );
        let message = &events[7];
        assert_eq!(message.room_id.as_ref().unwrap().as_str(), "!b:x");
        assert_eq!(message.body.as_deref(), Some("hi"));
        let EventKind::Checkpoint(checkpoint) = &events.last().unwrap().kind else {
            panic!("no checkpoint");
        };
        assert_eq!(
            SlidingPosition::from_token(&checkpoint.next_batch),
            Some(SlidingPosition {
                pos: Some("7/s9_1".to_owned()),
                to_device_since: Some("12".to_owned())
            })
        );
        // The same answer again: room events and an unchanged list are not repeated.
        let again = emit(BODY, &sent, &mut dedup, &mut lists);
        let kinds: Vec<&str> = again.iter().map(|e| e.kind.name()).collect();
        assert!(
            !kinds.contains(&"list_update") && !kinds.contains(&"message"),
            "{kinds:?}"
        );
    }

    #[test]
    fn gaps_are_of_limited_rooms_sent_before_or_of_every_limited_room_after_a_reset() {
        let sent = SlidingPosition {
            pos: Some("6/s8_1".to_owned()),
            to_device_since: None,
        };
        let parsed = SlidingBody::parse(BODY.as_bytes().to_vec()).unwrap();
        let gaps = |floor| {
            let gaps = parsed.response().gaps(&sent, floor);
            gaps.into_iter()
                .map(|(room, gap)| (room.to_string(), gap.prev_batch, gap.previous_since))
                .collect::<Vec<_>>()
        };
        let b = ("!b:x".to_owned(), "t1".to_owned(), "s8_1".to_owned());
        assert_eq!(gaps(None), std::slice::from_ref(&b));
        let a = ("!a:x".to_owned(), "t0".to_owned(), "s5".to_owned());
        assert_eq!(gaps(Some("s5")), [a, b]);
        let first = SlidingPosition::default();
        assert!(
            parsed.response().gaps(&first, None).is_empty(),
            "a first answer has none"
        );
    }

    #[test]
    fn fetched_events_come_oldest_first_after_the_gap_item_and_before_the_room_s_own() {
        let sent = SlidingPosition {
            pos: Some("6/s8_1".to_owned()),
            to_device_since: Some("10".to_owned()),
        };
        let parsed = SlidingBody::parse(BODY.as_bytes().to_vec()).unwrap();
        let fetched = |id: &str| {
            let event = serde_json::json!({"type":"m.room.message","event_id":id,"sender":"@u:x",
                "origin_server_ts":0,"content":{"body":id}});
            serde_json::value::to_raw_value(&event).unwrap()
        };
        let fill = RoomFill {
            unfilled: Some(Gap {
                prev_batch: "t-1".to_owned(),
                previous_since: "s8_1".to_owned(),
            }),
            newest_first: vec![fetched("$m:x"), fetched("$f2:x"), fetched("$f1:x")],
        };
        let fills = RoomFills::from([("!b:x".try_into().unwrap(), fill)]);
        let (mut dedup, mut lists) = (Dedup::new(64), ListMemory::new());
        let events = emit_with(parsed, &sent, fills, &mut dedup, &mut lists, None);
        let in_b: Vec<String> = events
            .iter()
            .filter(|e| e.room_id.as_ref().is_some_and(|r| r.as_str() == "!b:x"))
            .map(|e| match &e.kind {
                EventKind::Gap(gap) => format!("gap {}", gap.prev_batch),
                _ => e
                    .event_id
                    .as_ref()
                    .map_or(e.kind.name().to_owned(), |id| id.to_string()),
            })
            .collect();
        // `$m:x` fetched and in the timeline too: handed on once.
        assert_eq!(
            in_b,
            [
                "gap t-1",
                "$f1:x",
                "$f2:x",
                "$m:x",
                "$n:x",
                "receipt",
                "room_account_data"
            ]
        );
    }

    #[test]
    fn empty_answers_and_token_rules() {
        let sent = SlidingPosition::default();
        let idle = SlidingResponse::parse(
            br#"{"pos":"1/s1","lists":{"all":{"count":0}},"rooms":{},"extensions":{"to_device":{"next_batch":"3","events":[]},"e2ee":{"device_one_time_keys_count":{}}}}"#,
        )
        .unwrap();
        assert!(idle.is_empty());
        assert!(idle.check_tokens(&sent).is_ok());
        assert_eq!(
            idle.next_position(&sent).to_device_since.as_deref(),
            Some("3")
        );
        for bad in [
            &br#"{"pos":""}"#[..],
            br#"{"pos":"a\u0000"}"#,
            br#"{"pos":"a","extensions":{"to_device":{"next_batch":"","events":[]}}}"#,
            br#"{"pos":"a","rooms":{"!r:x":{"limited":true,"prev_batch":"a\nb"}}}"#,
        ] {
            let parsed = SlidingResponse::parse(bad).unwrap();
            assert!(
                parsed.check_tokens(&sent).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        for unreadable in [
            &b"{}"[..],
            br#"{"pos":1}"#,
            br#"{"pos":"a","rooms":{"nope":{}}}"#,
        ] {
            assert!(SlidingResponse::parse(unreadable).is_err());
        }
        let long = format!(
            r#"{{"pos":"{}"}}"#,
            "x".repeat(crate::token::MAX_TOKEN_BYTES - 5)
        );
        let parsed = SlidingResponse::parse(long.as_bytes()).unwrap();
        assert!(
            parsed.check_tokens(&sent).is_err(),
            "the pair must fit one token"
        );
    }
    /// A room whose own last membership of the user is `leave` or `ban` (in `required_state`,
    /// else the timeline) ends with a leave marker after its events; one the user is still in
    /// (or came back to) has none, nor any room without the user's id in the configuration.
    #[test]
    fn a_room_the_user_left_or_was_removed_from_ends_with_a_leave_marker() {
        const LEFT: &str = r#"{"pos":"8/s10_1","rooms":{
          "!left:x":{"timeline":[
            {"type":"m.room.message","event_id":"$1:x","sender":"@me:x","origin_server_ts":1,"content":{"body":"bye"}},
            {"type":"m.room.member","event_id":"$2:x","sender":"@me:x","state_key":"@me:x","origin_server_ts":2,"content":{"membership":"leave"}}]},
          "!kicked:x":{"required_state":[
            {"type":"m.room.member","event_id":"$3:x","sender":"@mod:x","state_key":"@me:x","origin_server_ts":3,"content":{"membership":"ban","reason":"spam"}}],
            "timeline":[{"type":"m.room.member","event_id":"$4:x","sender":"@me:x","state_key":"@me:x","origin_server_ts":1,"content":{"membership":"join"}}]},
          "!other:x":{"timeline":[
            {"type":"m.room.member","event_id":"$5:x","sender":"@them:x","state_key":"@them:x","origin_server_ts":4,"content":{"membership":"leave"}}]},
          "!back:x":{"timeline":[
            {"type":"m.room.member","event_id":"$6:x","sender":"@me:x","state_key":"@me:x","origin_server_ts":5,"content":{"membership":"leave"}},
            {"type":"m.room.member","event_id":"$7:x","sender":"@me:x","state_key":"@me:x","origin_server_ts":6,"content":{"membership":"join"}}]},
          "!text:x":{"timeline":[
            {"type":"m.room.message","event_id":"$8:x","sender":"@me:x","origin_server_ts":7,"content":{"body":"m.room.member"}}]}}}"#;
        let sent = SlidingPosition {
            pos: Some("7/s9_1".to_owned()),
            to_device_since: None,
        };
        let me = UserId::parse("@me:x").unwrap();
        let run = |user: Option<&UserId>| {
            let parsed = SlidingBody::parse(LEFT.as_bytes().to_vec()).unwrap();
            let (mut dedup, mut lists) = (Dedup::new(64), ListMemory::new());
            emit_with(
                parsed,
                &sent,
                RoomFills::new(),
                &mut dedup,
                &mut lists,
                user,
            )
            .into_iter()
            .map(|e| {
                let room = e
                    .room_id
                    .as_ref()
                    .map(|r| r.to_string())
                    .unwrap_or_default();
                let id = e
                    .event_id
                    .as_ref()
                    .map(|i| i.to_string())
                    .unwrap_or_default();
                (e.kind.name(), room, id, e.sender.map(|s| s.to_string()))
            })
            .collect::<Vec<_>>()
        };
        let with = run(Some(&me));
        let leaves: Vec<_> = with.iter().filter(|e| e.0 == "leave").collect();
        assert_eq!(
            leaves,
            [
                &(
                    "leave",
                    "!kicked:x".to_owned(),
                    String::new(),
                    Some("@mod:x".to_owned())
                ),
                &(
                    "leave",
                    "!left:x".to_owned(),
                    String::new(),
                    Some("@me:x".to_owned())
                ),
            ]
        );
        // Each marker right after its room's events.
        let at = |id: &str| with.iter().position(|e| e.2 == id).unwrap();
        assert_eq!(with[at("$4:x") + 1].0, "leave");
        assert_eq!(with[at("$2:x") + 1].0, "leave");
        assert!(
            run(None).iter().all(|e| e.0 != "leave"),
            "no marker without the user's id"
        );
    }
}
