//! Turning one parsed sync response (plus any gap fills) into the ordered event stream.
//!
//! Order within a batch: to-device, device lists and key counts, global account data,
//! presence, then rooms (joined, invited, knocked, left; each in room-id order). Within a
//! joined or left room: gap item, gap-fill events (oldest first), state, timeline, ephemeral,
//! room account data. The checkpoint comes last.

use std::collections::{BTreeMap, VecDeque};

use ruma_common::OwnedRoomId;
use serde_json::value::RawValue;

use crate::dedup::Dedup;
use crate::normalize::{normalize, to_raw, Event, EventKind, Gap, Section};
use crate::response::{SyncResponse, Timeline};

/// What gap filling produced for one room.
#[derive(Debug, Default)]
pub(crate) struct RoomFill {
    /// The part of the gap not fetched (past the cap, or filling off).
    pub(crate) unfilled: Option<Gap>,
    /// Fetched events, newest first (as `/messages?dir=b` returns them).
    pub(crate) newest_first: Vec<Box<RawValue>>,
}

pub(crate) type RoomFills = BTreeMap<OwnedRoomId, RoomFill>;

/// Appends the events of a batch to `out`.
pub(crate) struct Emitter<'a> {
    pub(crate) out: &'a mut VecDeque<Event>,
    pub(crate) dedup: &'a mut Dedup,
    pub(crate) last_key_counts: &'a mut Option<String>,
}

impl Emitter<'_> {
    fn push(&mut self, event: Event) {
        if let Some(id) = &event.event_id {
            if matches!(
                event.kind,
                EventKind::Invite | EventKind::Knock | EventKind::ToDevice
            ) {
                // Stripped state and to-device events are not room timeline: never deduplicated.
            } else if !self.dedup.first_time(id) {
                log::debug!("skipping already delivered event {id}");
                return;
            }
        }
        self.out.push_back(event);
    }

    fn all(&mut self, events: &[&RawValue], section: Section, room: Option<&OwnedRoomId>) {
        for raw in events {
            self.push(normalize((*raw).to_owned(), section, room));
        }
    }

    pub(crate) fn batch(&mut self, response: SyncResponse<'_>, mut fills: RoomFills) {
        // One allocation for the whole batch rather than a doubling series of copies.
        // Beyond the events: gap items, leave markers, key counts and the checkpoint.
        let synthetic = fills.len() + response.rooms.leave.len() + 3;
        self.out.reserve(response.event_count() + synthetic);
        let SyncResponse {
            next_batch: _,
            rooms,
            presence,
            account_data,
            to_device,
            device_lists,
            device_one_time_keys_count,
            device_unused_fallback_key_types,
        } = response;
        self.all(&to_device.events, Section::ToDevice, None);
        if !device_lists.is_empty() {
            let raw = to_raw(&device_lists);
            self.push(Event::section(
                EventKind::DeviceLists,
                "device_lists",
                None,
                raw,
            ));
        }
        self.key_counts(device_one_time_keys_count, device_unused_fallback_key_types);
        self.all(&account_data.events, Section::GlobalAccountData, None);
        self.all(&presence.events, Section::Presence, None);

        for (room_id, room) in &rooms.join {
            self.fill(room_id, fills.remove(room_id));
            self.all(&room.state.events, Section::State, Some(room_id));
            self.all(&room.state_after.events, Section::State, Some(room_id));
            self.all(&room.timeline.events, Section::Timeline, Some(room_id));
            self.all(&room.ephemeral.events, Section::Ephemeral, Some(room_id));
            self.all(
                &room.account_data.events,
                Section::RoomAccountData,
                Some(room_id),
            );
        }
        for (room_id, room) in &rooms.invite {
            self.all(&room.invite_state.events, Section::Invite, Some(room_id));
        }
        for (room_id, room) in &rooms.knock {
            self.all(&room.knock_state.events, Section::Knock, Some(room_id));
        }
        for (room_id, room) in rooms.leave {
            self.fill(&room_id, fills.remove(&room_id));
            self.all(&room.state.events, Section::State, Some(&room_id));
            self.all(&room.state_after.events, Section::State, Some(&room_id));
            self.all(&room.timeline.events, Section::Timeline, Some(&room_id));
            self.all(
                &room.account_data.events,
                Section::RoomAccountData,
                Some(&room_id),
            );
            let marker = match last_membership(&room.timeline) {
                Some(raw) => {
                    let mut event = normalize(raw.to_owned(), Section::Timeline, Some(&room_id));
                    event.kind = EventKind::Leave;
                    // The membership event itself was delivered just before, with its id.
                    event.event_id = None;
                    event
                }
                None => Event::section(
                    EventKind::Leave,
                    "m.room.member",
                    Some(room_id),
                    to_raw(&serde_json::json!({})),
                ),
            };
            self.out.push_back(marker);
        }
    }

    fn fill(&mut self, room_id: &OwnedRoomId, fill: Option<RoomFill>) {
        let Some(fill) = fill else { return };
        if let Some(gap) = fill.unfilled {
            self.out.push_back(Event::gap(room_id.clone(), gap));
        }
        for raw in fill.newest_first.into_iter().rev() {
            self.push(normalize(raw, Section::Timeline, Some(room_id)));
        }
    }

    fn key_counts(
        &mut self,
        counts: BTreeMap<ruma_common::OneTimeKeyAlgorithm, js_int::UInt>,
        fallback: Option<Vec<ruma_common::OneTimeKeyAlgorithm>>,
    ) {
        if counts.is_empty() && fallback.is_none() {
            return;
        }
        let value = serde_json::json!({
            "device_one_time_keys_count": counts,
            "device_unused_fallback_key_types": fallback,
        });
        let text = value.to_string();
        if self.last_key_counts.as_deref() == Some(text.as_str()) {
            return;
        }
        let raw = to_raw(&value);
        *self.last_key_counts = Some(text);
        self.push(Event::section(
            EventKind::OneTimeKeyCounts,
            "device_one_time_keys_count",
            None,
            raw,
        ));
    }
}

/// The raw JSON of the last membership event in a left room's timeline (normally the user's own
/// leave or kick), for the leave marker.
fn last_membership<'a>(timeline: &Timeline<'a>) -> Option<&'a RawValue> {
    #[derive(serde::Deserialize)]
    struct Type<'t> {
        #[serde(rename = "type", borrow)]
        event_type: Option<std::borrow::Cow<'t, str>>,
    }
    timeline.events.iter().rev().copied().find(|raw| {
        serde_json::from_str::<Type<'_>>(raw.get())
            .is_ok_and(|t| t.event_type.as_deref() == Some("m.room.member"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn emit(body: &str, dedup: &mut Dedup, last: &mut Option<String>) -> Vec<Event> {
        let response = SyncResponse::parse(body.as_bytes()).unwrap();
        let mut out = VecDeque::new();
        Emitter {
            out: &mut out,
            dedup,
            last_key_counts: last,
        }
        .batch(response, RoomFills::new());
        out.into()
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
    }
}
