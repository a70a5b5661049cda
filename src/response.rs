//! The sync response, read in one pass with every event borrowed from the body.
//!
//! ruma's typed `sync_events::v3::Response` scans each room up to three times and copies every
//! event into its own box before normalization reads it yet again. On the hot path this module
//! reads the body once instead: the same shape and the same validation of what the machine relies
//! on (room ids, user ids in `device_lists`, key algorithms, `next_batch`), with each event kept
//! as a `&RawValue` slice of the body, copied once when its [`Event`](crate::Event) is built.
//! ruma's types still name the ids and the key algorithms, and ruma parses `/messages`.

use std::collections::BTreeMap;

use js_int::UInt;
use ruma_client_api::sync::sync_events::DeviceLists;
use ruma_common::{OneTimeKeyAlgorithm, OwnedRoomId};
use serde::Deserialize;
use serde_json::value::RawValue;

/// `GET /sync`'s body.
#[derive(Debug, Deserialize)]
pub(crate) struct SyncResponse<'a> {
    pub(crate) next_batch: String,
    #[serde(default, borrow)]
    pub(crate) rooms: Rooms<'a>,
    #[serde(default, borrow)]
    pub(crate) presence: Events<'a>,
    #[serde(default, borrow)]
    pub(crate) account_data: Events<'a>,
    #[serde(default, borrow)]
    pub(crate) to_device: Events<'a>,
    #[serde(default)]
    pub(crate) device_lists: DeviceLists,
    #[serde(default)]
    pub(crate) device_one_time_keys_count: BTreeMap<OneTimeKeyAlgorithm, UInt>,
    #[serde(default)]
    pub(crate) device_unused_fallback_key_types: Option<Vec<OneTimeKeyAlgorithm>>,
}

impl SyncResponse<'_> {
    /// Parses a body; any deviation from the shape is an error (and the batch is not applied).
    pub(crate) fn parse(body: &[u8]) -> Result<SyncResponse<'_>, serde_json::Error> {
        // Checking the UTF-8 of the whole body at once is cheaper than serde_json checking each
        // borrowed string and event on its own. Invalid UTF-8 is only an error where serde_json
        // reads it, so such a body takes the byte path and gets the same verdict.
        match simdutf8::basic::from_utf8(body) {
            Ok(text) => serde_json::from_str(text),
            Err(_) => serde_json::from_slice(body),
        }
    }

    /// Nothing to deliver (key counts aside, which every response repeats).
    pub(crate) fn is_empty(&self) -> bool {
        let Rooms {
            join,
            invite,
            leave,
            knock,
        } = &self.rooms;
        join.is_empty()
            && invite.is_empty()
            && leave.is_empty()
            && knock.is_empty()
            && self.presence.events.is_empty()
            && self.account_data.events.is_empty()
            && self.to_device.events.is_empty()
            && self.device_lists.is_empty()
    }

    /// Every joined or left room whose timeline is `limited`, with its `prev_batch`.
    pub(crate) fn limited_timelines(&self) -> impl Iterator<Item = (&OwnedRoomId, &str)> {
        let joined = self.rooms.join.iter().map(|(id, r)| (id, &r.timeline));
        let left = self.rooms.leave.iter().map(|(id, r)| (id, &r.timeline));
        joined
            .chain(left)
            .filter(|(_, t)| t.limited)
            .filter_map(|(id, t)| Some((id, t.prev_batch.as_deref()?)))
    }
}

/// A list of events.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct Events<'a> {
    #[serde(default, borrow)]
    pub(crate) events: Vec<&'a RawValue>,
}

/// `rooms`, each map in room-id order.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct Rooms<'a> {
    #[serde(default, borrow)]
    pub(crate) join: BTreeMap<OwnedRoomId, JoinedRoom<'a>>,
    #[serde(default, borrow)]
    pub(crate) invite: BTreeMap<OwnedRoomId, InvitedRoom<'a>>,
    #[serde(default, borrow)]
    pub(crate) knock: BTreeMap<OwnedRoomId, KnockedRoom<'a>>,
    #[serde(default, borrow)]
    pub(crate) leave: BTreeMap<OwnedRoomId, JoinedRoom<'a>>,
}

/// A joined room, or a left one (which has no `ephemeral`).
#[derive(Debug, Default, Deserialize)]
pub(crate) struct JoinedRoom<'a> {
    #[serde(default, borrow)]
    pub(crate) timeline: Timeline<'a>,
    #[serde(default, borrow)]
    pub(crate) state: Events<'a>,
    /// MSC4222's `state_after`, in place of `state` when the client asked for it.
    #[serde(default, borrow)]
    pub(crate) state_after: Events<'a>,
    #[serde(default, borrow)]
    pub(crate) ephemeral: Events<'a>,
    #[serde(default, borrow)]
    pub(crate) account_data: Events<'a>,
}

/// A room's timeline.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct Timeline<'a> {
    #[serde(default)]
    pub(crate) limited: bool,
    #[serde(default)]
    pub(crate) prev_batch: Option<String>,
    #[serde(default, borrow)]
    pub(crate) events: Vec<&'a RawValue>,
}

/// An invited room.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct InvitedRoom<'a> {
    #[serde(default, borrow)]
    pub(crate) invite_state: Events<'a>,
}

/// A knocked room.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct KnockedRoom<'a> {
    #[serde(default, borrow)]
    pub(crate) knock_state: Events<'a>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_what_ruma_rejects_that_the_machine_relies_on() {
        assert!(
            SyncResponse::parse(b"{}").is_err(),
            "next_batch is required"
        );
        assert!(SyncResponse::parse(br#"{"next_batch":5}"#).is_err());
        assert!(
            SyncResponse::parse(br#"{"next_batch":"a","rooms":{"join":{"not-a-room":{}}}}"#)
                .is_err()
        );
        assert!(
            SyncResponse::parse(br#"{"next_batch":"a","device_lists":{"changed":["nope"]}}"#)
                .is_err()
        );
        assert!(SyncResponse::parse(br#"{"next_batch":"a","presence":{"events":{}}}"#).is_err());
        let ok =
            SyncResponse::parse(br#"{"next_batch":"a","rooms":{"join":{"!r:x":{}}}}"#).unwrap();
        assert!(!ok.is_empty());
        assert!(
            SyncResponse::parse(br#"{"next_batch":"a","unknown":[1,2]}"#)
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn events_are_borrowed_slices_of_the_body() {
        let body =
            br#"{"next_batch":"a","to_device":{"events":[{"type":"x","content":{"a":"\u00e9"}}]}}"#;
        let parsed = SyncResponse::parse(body).unwrap();
        assert_eq!(
            parsed.to_device.events[0].get(),
            r#"{"type":"x","content":{"a":"\u00e9"}}"#
        );
    }
}
