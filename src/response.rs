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
use serde::de::value::BorrowedStrDeserializer;
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::scan::{EventFields, Rare, Scanned, Strict};

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
    /// How many events the strict pass found in the body's lists (0 when serde_json read it):
    /// room for them is made in dedup's table at once rather than by growing it.
    #[serde(skip)]
    pub(crate) events_found: usize,
}

impl SyncResponse<'_> {
    /// Parses a body; any deviation from the shape is an error (and the batch is not applied).
    pub(crate) fn parse(body: &[u8]) -> Result<SyncResponse<'_>, serde_json::Error> {
        // Checking the UTF-8 of the whole body at once is cheaper than serde_json checking each
        // borrowed string and event on its own. Invalid UTF-8 is only an error where serde_json
        // reads it, so such a body takes the byte path and gets the same verdict.
        //
        // The strict pass below reads the common shape of a body in one go: it checks every
        // event as serde_json would and notes where its fields are, so that an event is read
        // once rather than by serde_json and then again by the field scanner. Whatever it does
        // not take (a duplicate member, a key with escapes, a value of another type, an error)
        // goes to serde_json, whose verdict and error stand.
        match simdutf8::basic::from_utf8(body) {
            Ok(text) => match strict::response(text) {
                Some(response) => Ok(response),
                None => serde_json::from_str(text),
            },
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
    pub(crate) events: EventList<'a>,
}

/// The events of one list, as serde_json's pass keeps them (each a `&RawValue` slice of the
/// body), or as the strict pass does (where each is in the body and where its fields are).
#[derive(Debug)]
pub(crate) enum EventList<'a> {
    Raw(Vec<&'a RawValue>),
    Scanned {
        body: &'a str,
        events: Box<[Scanned]>,
        rare: Box<[Rare]>,
    },
}

impl Default for EventList<'_> {
    fn default() -> Self {
        EventList::Raw(Vec::new())
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for EventList<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Vec::<&'a RawValue>::deserialize(deserializer).map(EventList::Raw)
    }
}

impl<'a> EventList<'a> {
    pub(crate) fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub(crate) fn len(&self) -> usize {
        match self {
            EventList::Raw(events) => events.len(),
            EventList::Scanned { events, .. } => events.len(),
        }
    }

    /// The `index`th event: its JSON, and its fields when the strict pass noted them.
    #[cfg(any(test, fuzzing))]
    pub(crate) fn get(&self, index: usize) -> Option<(&RawValue, Option<EventFields<'_>>)> {
        let entry = self.entry(index)?;
        Some((
            entry.raw,
            entry
                .scanned
                .map(|(s, rare)| s.fields(entry.raw.get(), rare)),
        ))
    }

    /// The `index`th event, its fields not read yet.
    #[inline]
    pub(crate) fn entry(&self, index: usize) -> Option<Entry<'_>> {
        match self {
            EventList::Raw(events) => events.get(index).map(|raw| Entry { raw, scanned: None }),
            EventList::Scanned { body, events, rare } => {
                let scanned = events.get(index)?;
                Some(Entry {
                    raw: raw_value(scanned.json(body))?,
                    scanned: Some((scanned, rare)),
                })
            }
        }
    }
}

/// One event of a list: its JSON, and where its fields are when the strict pass noted them.
pub(crate) struct Entry<'a> {
    pub(crate) raw: &'a RawValue,
    scanned: Option<(&'a Scanned, &'a [Rare])>,
}

impl<'a> Entry<'a> {
    /// The fields normalization reads: noted by the strict pass, or read now.
    // Inlined, so that the fields (12 strings) are built where they are used, not copied.
    #[inline]
    pub(crate) fn fields(&self) -> EventFields<'a> {
        match self.scanned {
            Some((scanned, rare)) => scanned.fields(self.raw.get(), rare),
            None => crate::scan::event_fields(self.raw.get()),
        }
    }
}

/// `json`, which the strict pass checked, as a `&RawValue` without a second check.
///
/// serde_json builds a `RawValue` without checking it again from what its deserializer hands
/// to `RawValue`'s visitor: a map with one entry, keyed by serde_json's token for raw values,
/// whose value is the JSON text. Handing it that entry here takes no copy and no pass over
/// the text. Should a later serde_json change that protocol, the text is checked again
/// instead (`from_str`): slower, never wrong; a test keeps the fast way honest.
#[inline]
pub(crate) fn raw_value(json: &str) -> Option<&RawValue> {
    <&RawValue>::deserialize(RawText(json))
        .ok()
        .or_else(|| serde_json::from_str(json).ok())
}

const RAW_VALUE_TOKEN: &str = "$serde_json::private::RawValue";

/// A deserializer that offers `RawValue`'s visitor its text.
struct RawText<'a>(&'a str);

impl<'de> serde::Deserializer<'de> for RawText<'de> {
    type Error = serde_json::Error;

    fn deserialize_any<V: serde::de::Visitor<'de>>(self, _: V) -> Result<V::Value, Self::Error> {
        Err(serde::de::Error::custom("only a raw value"))
    }

    fn deserialize_newtype_struct<V: serde::de::Visitor<'de>>(
        self,
        name: &'static str,
        visitor: V,
    ) -> Result<V::Value, Self::Error> {
        if name != RAW_VALUE_TOKEN {
            return Err(serde::de::Error::custom("only a raw value"));
        }
        visitor.visit_map(RawTextEntry(Some(self.0)))
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
        bytes byte_buf option unit unit_struct seq tuple
        tuple_struct map struct enum identifier ignored_any
    }
}

struct RawTextEntry<'a>(Option<&'a str>);

impl<'de> serde::de::MapAccess<'de> for RawTextEntry<'de> {
    type Error = serde_json::Error;

    fn next_key_seed<K: serde::de::DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, Self::Error> {
        if self.0.is_none() {
            return Ok(None);
        }
        seed.deserialize(BorrowedStrDeserializer::new(RAW_VALUE_TOKEN))
            .map(Some)
    }

    fn next_value_seed<V: serde::de::DeserializeSeed<'de>>(
        &mut self,
        seed: V,
    ) -> Result<V::Value, Self::Error> {
        let text = self
            .0
            .take()
            .ok_or_else(|| <serde_json::Error as serde::de::Error>::custom("no value"))?;
        seed.deserialize(BorrowedStrDeserializer::new(text))
    }
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
    pub(crate) events: EventList<'a>,
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

/// The strict pass over a body: [`SyncResponse::parse`]'s fast way for the shapes servers
/// send. `None` for anything else (then serde_json decides): a member given twice, a key with
/// escapes, a value of another type than expected, any JSON error.
mod strict {
    use super::*;

    pub(super) fn response(text: &str) -> Option<SyncResponse<'_>> {
        // Events are noted by 32-bit offsets.
        u32::try_from(text.len()).ok()?;
        let mut w = Walker {
            s: Strict { src: text, i: 0 },
            events: Vec::new(),
            rare: Vec::new(),
            events_found: 0,
        };
        let (mut next_batch, mut rooms, mut presence, mut account_data, mut to_device) =
            (None, None, None, None, None);
        let (mut device_lists, mut counts, mut fallback) = (None, None, None);
        w.members(|w, key| match key {
            b"next_batch" => once(&mut next_batch, w.string()?),
            b"rooms" => once(&mut rooms, w.rooms()?),
            b"presence" => once(&mut presence, w.events()?),
            b"account_data" => once(&mut account_data, w.events()?),
            b"to_device" => once(&mut to_device, w.events()?),
            b"device_lists" => once(&mut device_lists, w.typed()?),
            b"device_one_time_keys_count" => once(&mut counts, w.typed()?),
            b"device_unused_fallback_key_types" => once(&mut fallback, w.typed()?),
            _ => w.s.skip_value(),
        })?;
        w.s.ws();
        if w.s.i != text.len() {
            return None;
        }
        Some(SyncResponse {
            next_batch: next_batch?,
            rooms: rooms.unwrap_or_default(),
            presence: presence.unwrap_or_default(),
            account_data: account_data.unwrap_or_default(),
            to_device: to_device.unwrap_or_default(),
            device_lists: device_lists.unwrap_or_default(),
            device_one_time_keys_count: counts.unwrap_or_default(),
            device_unused_fallback_key_types: fallback.unwrap_or_default(),
            events_found: w.events_found,
        })
    }

    /// A member seen for the first time (serde refuses a second one).
    fn once<T>(slot: &mut Option<T>, value: T) -> Option<()> {
        if slot.replace(value).is_some() {
            return None;
        }
        Some(())
    }

    struct Walker<'a> {
        s: Strict<'a>,
        /// Reused for each list, copied out at its exact length.
        events: Vec<Scanned>,
        rare: Vec<Rare>,
        events_found: usize,
    }

    impl<'a> Walker<'a> {
        /// The members of the object at `i`, each handed to `f` with `i` at its value.
        fn members(&mut self, mut f: impl FnMut(&mut Self, &'a [u8]) -> Option<()>) -> Option<()> {
            self.s.expect(b'{')?;
            self.s.ws();
            if self.s.peek() == Some(b'}') {
                self.s.i += 1;
                return Some(());
            }
            loop {
                let (key, escaped) = self.s.key()?;
                if escaped {
                    return None;
                }
                f(self, key)?;
                self.s.ws();
                match self.s.peek()? {
                    b',' => {
                        self.s.i += 1;
                        self.s.ws();
                    }
                    b'}' => {
                        self.s.i += 1;
                        return Some(());
                    }
                    _ => return None,
                }
            }
        }

        /// A string (the batch tokens), read without serde_json's machinery.
        fn string(&mut self) -> Option<String> {
            let (text, escaped) = self.s.string()?;
            let text = std::str::from_utf8(text).ok()?;
            if escaped {
                crate::scan::unescape(text)
            } else {
                Some(text.to_owned())
            }
        }

        /// A string or `null`.
        fn optional_string(&mut self) -> Option<Option<String>> {
            if self.s.peek() == Some(b'n') {
                return self.typed::<()>().map(|()| None);
            }
            self.string().map(Some)
        }

        /// `true` or `false`.
        fn boolean(&mut self) -> Option<bool> {
            let value = self.s.peek()? == b't';
            self.s.literal(if value { b"true" } else { b"false" })?;
            Some(value)
        }

        /// A small value read by serde_json from its text (after the strict pass over it).
        fn typed<T: Deserialize<'a>>(&mut self) -> Option<T> {
            let start = self.s.i;
            self.s.skip_value()?;
            serde_json::from_str(self.s.src.get(start..self.s.i)?).ok()
        }

        fn map<T>(
            &mut self,
            mut value: impl FnMut(&mut Self) -> Option<T>,
        ) -> Option<BTreeMap<OwnedRoomId, T>> {
            let mut map = BTreeMap::new();
            self.members(|w, key| {
                let key = std::str::from_utf8(key).ok()?;
                let id = OwnedRoomId::deserialize(
                    BorrowedStrDeserializer::<serde_json::Error>::new(key),
                )
                .ok()?;
                let value = value(w)?;
                match map.insert(id, value) {
                    None => Some(()),
                    Some(_) => None,
                }
            })?;
            Some(map)
        }

        fn rooms(&mut self) -> Option<Rooms<'a>> {
            let (mut join, mut invite, mut knock, mut leave) = (None, None, None, None);
            self.members(|w, key| match key {
                b"join" => once(&mut join, w.map(Self::joined)?),
                b"invite" => once(
                    &mut invite,
                    w.map(|w| {
                        let mut invite_state = None;
                        w.members(|w, key| match key {
                            b"invite_state" => once(&mut invite_state, w.events()?),
                            _ => w.s.skip_value(),
                        })?;
                        Some(InvitedRoom {
                            invite_state: invite_state.unwrap_or_default(),
                        })
                    })?,
                ),
                b"knock" => once(
                    &mut knock,
                    w.map(|w| {
                        let mut knock_state = None;
                        w.members(|w, key| match key {
                            b"knock_state" => once(&mut knock_state, w.events()?),
                            _ => w.s.skip_value(),
                        })?;
                        Some(KnockedRoom {
                            knock_state: knock_state.unwrap_or_default(),
                        })
                    })?,
                ),
                b"leave" => once(&mut leave, w.map(Self::joined)?),
                _ => w.s.skip_value(),
            })?;
            Some(Rooms {
                join: join.unwrap_or_default(),
                invite: invite.unwrap_or_default(),
                knock: knock.unwrap_or_default(),
                leave: leave.unwrap_or_default(),
            })
        }

        fn joined(&mut self) -> Option<JoinedRoom<'a>> {
            let (mut timeline, mut state, mut state_after, mut ephemeral, mut account_data) =
                (None, None, None, None, None);
            self.members(|w, key| match key {
                b"timeline" => once(&mut timeline, w.timeline()?),
                b"state" => once(&mut state, w.events()?),
                b"state_after" => once(&mut state_after, w.events()?),
                b"ephemeral" => once(&mut ephemeral, w.events()?),
                b"account_data" => once(&mut account_data, w.events()?),
                _ => w.s.skip_value(),
            })?;
            Some(JoinedRoom {
                timeline: timeline.unwrap_or_default(),
                state: state.unwrap_or_default(),
                state_after: state_after.unwrap_or_default(),
                ephemeral: ephemeral.unwrap_or_default(),
                account_data: account_data.unwrap_or_default(),
            })
        }

        fn timeline(&mut self) -> Option<Timeline<'a>> {
            let (mut limited, mut prev_batch, mut events) = (None, None, None);
            self.members(|w, key| match key {
                b"limited" => once(&mut limited, w.boolean()?),
                b"prev_batch" => once(&mut prev_batch, w.optional_string()?),
                b"events" => once(&mut events, w.list()?),
                _ => w.s.skip_value(),
            })?;
            Some(Timeline {
                limited: limited.unwrap_or_default(),
                prev_batch: prev_batch.unwrap_or_default(),
                events: events.unwrap_or_default(),
            })
        }

        fn events(&mut self) -> Option<Events<'a>> {
            let mut events = None;
            self.members(|w, key| match key {
                b"events" => once(&mut events, w.list()?),
                _ => w.s.skip_value(),
            })?;
            Some(Events {
                events: events.unwrap_or_default(),
            })
        }

        /// A list of events, each checked and its fields noted.
        fn list(&mut self) -> Option<EventList<'a>> {
            self.s.expect(b'[')?;
            self.events.clear();
            self.rare.clear();
            self.s.ws();
            if self.s.peek() == Some(b']') {
                self.s.i += 1;
                return Some(EventList::default());
            }
            loop {
                let event = self.s.event(&mut self.rare)?;
                self.events.push(event);
                self.s.ws();
                match self.s.peek()? {
                    b',' => {
                        self.s.i += 1;
                        self.s.ws();
                    }
                    b']' => {
                        self.s.i += 1;
                        break;
                    }
                    _ => return None,
                }
            }
            self.events_found += self.events.len();
            Some(EventList::Scanned {
                body: self.s.src,
                events: self.events.as_slice().into(),
                rare: self.rare.as_slice().into(),
            })
        }
    }
}

/// The strict pass's reading of `body` against serde_json's: the same verdict, and when
/// both accept, the same response, event for event, with the fields the scanner reads.
#[cfg(any(test, fuzzing))]
pub fn check_against_serde(body: &str) {
    let by_serde = serde_json::from_str::<SyncResponse<'_>>(body);
    let by_strict = strict::response(body);
    if let Some(strict) = &by_strict {
        let serde = by_serde.as_ref().unwrap_or_else(|e| {
            panic!("the strict pass accepts what serde_json refuses ({e}): {body}")
        });
        assert_eq!(strict.next_batch, serde.next_batch);
        assert_eq!(
            format!("{:?}", strict.device_lists),
            format!("{:?}", serde.device_lists)
        );
        assert_eq!(
            strict.device_one_time_keys_count,
            serde.device_one_time_keys_count
        );
        assert_eq!(
            strict.device_unused_fallback_key_types,
            serde.device_unused_fallback_key_types
        );
        let lists = |r: &'_ SyncResponse<'_>| {
            let mut lists: Vec<(String, Vec<(String, String)>)> = Vec::new();
            let mut add = |name: String, list: &EventList<'_>| {
                let events = (0..list.len())
                    .map(|i| {
                        let (raw, fields) = list.get(i).unwrap();
                        let fields = fields.unwrap_or_else(|| crate::scan::event_fields(raw.get()));
                        (raw.get().to_owned(), format!("{fields:?}"))
                    })
                    .collect();
                lists.push((name, events));
            };
            add("presence".into(), &r.presence.events);
            add("account_data".into(), &r.account_data.events);
            add("to_device".into(), &r.to_device.events);
            for (kind, rooms) in [("join", &r.rooms.join), ("leave", &r.rooms.leave)] {
                for (id, room) in rooms {
                    let name = format!(
                        "{kind} {id} {} {:?}",
                        room.timeline.limited, room.timeline.prev_batch
                    );
                    add(format!("{name} timeline"), &room.timeline.events);
                    add(format!("{name} state"), &room.state.events);
                    add(format!("{name} state_after"), &room.state_after.events);
                    add(format!("{name} ephemeral"), &room.ephemeral.events);
                    add(format!("{name} account_data"), &room.account_data.events);
                }
            }
            for (id, room) in &r.rooms.invite {
                add(format!("invite {id}"), &room.invite_state.events);
            }
            for (id, room) in &r.rooms.knock {
                add(format!("knock {id}"), &room.knock_state.events);
            }
            lists
        };
        assert_eq!(lists(strict), lists(serde), "{body}");
    }
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
        let (raw, fields) = parsed.to_device.events.get(0).unwrap();
        assert_eq!(raw.get(), r#"{"type":"x","content":{"a":"\u00e9"}}"#);
        assert!(std::ptr::eq(
            raw.get().as_ptr(),
            body[body.iter().position(|&b| b == b'[').unwrap() + 1..].as_ptr()
        ));
        assert_eq!(fields.unwrap().event_type.as_deref(), Some("x"));
    }

    #[test]
    fn raw_values_are_made_without_a_second_pass() {
        // The fast way must hold with this serde_json: a text that is not JSON comes back as
        // it is (the slow way would refuse it).
        assert_eq!(
            raw_value("{not json").map(RawValue::get),
            None::<&str>.or(Some("{not json"))
        );
        assert_eq!(
            raw_value(r#"{"a":[1,"b"]}"#).unwrap().get(),
            r#"{"a":[1,"b"]}"#
        );
    }

    #[test]
    fn strict_pass_reads_the_fixtures_as_serde_does() {
        for text in [
            include_str!("../tests/fixtures/synapse-initial.json"),
            include_str!("../tests/fixtures/synapse-incremental.json"),
            include_str!("../tests/fixtures/synapse-leave.json"),
        ] {
            assert!(strict::response(text).is_some());
            check_against_serde(text);
            let compact =
                serde_json::to_string(&serde_json::from_str::<serde_json::Value>(text).unwrap())
                    .unwrap();
            assert!(strict::response(&compact).is_some());
            check_against_serde(&compact);
        }
    }

    #[test]
    fn strict_pass_leaves_odd_bodies_to_serde() {
        let cases = [
            r#"{"next_batch":"a","next_batch":"b"}"#,
            r#"{"next_batch":"a","rooms":null}"#,
            r#"{"next_b\u0061tch":"a"}"#,
            r#"{"next_batch":"a","rooms":{"join":{"!r:x":{},"!r:x":{}}}}"#,
            r#"{"next_batch":"a","rooms":{"join":{"!r\u003ax":{}}}}"#,
            r#"{"next_batch":"a","presence":{"events":[1,]}}"#,
            r#"{"next_batch":"a","presence":{"events":[01]}}"#,
            r#"{"next_batch":"a","presence":{"events":[{"a":"\x"}]}}"#,
            r#"{"next_batch":"a","presence":{"events":[{"a":"\u12g4"}]}}"#,
            "{\"next_batch\":\"a\",\"presence\":{\"events\":[{\"a\":\"\u{1}\"}]}}",
            r#"{"next_batch":"a","presence":{"events":[{"a":1.}]}}"#,
            r#"{"next_batch":"a","presence":{"events":[{"a":1e}]}}"#,
            r#"{"next_batch":"a","presence":{"events":[{"a":-}]}}"#,
            r#"{"next_batch":"a","presence":{"events":[{"a":tru}]}}"#,
            r#"{"next_batch":"a","presence":{"events":[{"a" 1}]}}"#,
            r#"{"next_batch":"a","presence":{"events":[{"a":1,}]}}"#,
            r#"{"next_batch":"a","presence":{"events":[{"a":[1 2]}]}}"#,
            r#"{"next_batch":"a","presence":{"events":[{"a":{"b":1]}]}}"#,
            r#"{"next_batch":"a","presence":{"events":[]}} x"#,
            r#"{"next_batch":"a","presence":{"events":[]},}"#,
            r#"{"next_batch":"a","presence":[[]]}"#,
            r#"{"next_batch":"a","rooms":{"join":{"!r:x":{"timeline":{"limited":null}}}}}"#,
            r#"{"next_batch":"a","rooms":{"join":{"!r:x":{"timeline":{"prev_batch":null}}}}}"#,
        ];
        for body in cases {
            check_against_serde(body);
        }
        // Long strings (searched past their first 32 bytes differently), with what they may
        // and may not hold at every offset.
        for at in 0..80 {
            for (insert, valid) in [
                ("\u{1}", false),
                ("\u{1f}", false),
                ("\n", false),
                ("\\n", true),
                ("\\u00e9", true),
                ("\\u00g9", false),
                ("\\x", false),
                ("\\\"", true),
                ("é😀", true),
                ("\u{7f}", true),
            ] {
                let text = format!("{}{insert}{}", "a".repeat(at), "b".repeat(80 - at));
                let body = format!(
                    r#"{{"next_batch":"a","presence":{{"events":[{{"type":"{text}","k":"{text}"}}]}}}}"#
                );
                assert_eq!(strict::response(&body).is_some(), valid, "{body}");
                check_against_serde(&body);
            }
        }
        // What does not fit in the 28 bytes kept per event: read again when delivered.
        assert_eq!(std::mem::size_of::<Scanned>(), 28);
        let long = "x".repeat(70_000);
        for event in [
            format!(r#"{{"type":"t","sender":"@a:x","unsigned":{{"pad":"{long}"}}}}"#),
            format!(
                r#"{{"type":"t","content":{{"body":"{}"}}}}"#,
                &long[..32_767]
            ),
            format!(
                r#"{{"type":"t","content":{{"body":"{}"}}}}"#,
                &long[..32_768]
            ),
            format!(r#"{{"type":"t","sender":"@{}:x"}}"#, &long[..124]),
            format!(r#"{{"type":"t","sender":"@{}:x"}}"#, &long[..125]),
            format!(
                r#"{{"pad":"{}","type":"t","sender":"@a:x"}}"#,
                &long[..65_530]
            ),
        ] {
            let body =
                format!(r#"{{"next_batch":"a","to_device":{{"events":[{event},{event}]}}}}"#);
            let response = strict::response(&body).expect("taken");
            let (raw, fields) = response.to_device.events.get(1).unwrap();
            assert_eq!(raw.get(), event);
            assert_eq!(fields.unwrap(), crate::scan::event_fields(&event));
            check_against_serde(&body);
        }
        let deep = format!(
            r#"{{"next_batch":"a","presence":{{"events":[{{"a":{}{}}}]}}}}"#,
            "[".repeat(100),
            "]".repeat(100)
        );
        assert!(strict::response(&deep).is_none());
        assert!(
            SyncResponse::parse(deep.as_bytes()).is_ok(),
            "serde_json takes it"
        );
    }

    #[test]
    fn strict_pass_notes_the_fields_the_scanner_reads() {
        let events = [
            r#"{"type":"m.room.message","event_id":"$e:x","sender":"@a:x","origin_server_ts":17,"content":{"body":"a \"q\"\n","m.relates_to":{"rel_type":"m.thread","event_id":"$t:x","m.in_reply_to":{"event_id":"$r:x"}}}}"#,
            r#"{"type":"m.room.redaction","redacts":"$a:x","content":{"redacts":"$b:x","reason":"x"}}"#,
            r#"{"type":"m.reaction","content":{"m.relates_to":{"rel_type":"m.annotation","event_id":"$m:x","key":"\ud83d\udc4d"}}}"#,
            r#"{"type":"t","origin_server_ts":-1}"#,
            r#"{"type":"t","origin_server_ts":1.5}"#,
            r#"{"type":"t","origin_server_ts":99999999999999999999999}"#,
            r#"{"type":"t","origin_server_ts":"5","state_key":""}"#,
            r#"{"type":"a","type":"b"}"#,
            r#"{"content":{"body":"a"},"content":{"redacts":"$r"}}"#,
            r#"{"ty\u0070e":"x"}"#,
            r#"{"type":5,"sender":null,"content":[],"unsigned":{"type":"no"}}"#,
            r#"{"content":{},"type":"x","content2":{"body":"no"}}"#,
            r#"{"type":"\ud800"}"#,
            r#"[1,2]"#,
            r#""type""#,
            "{}",
        ];
        for event in events {
            let body =
                format!(r#"{{"next_batch":"a","to_device":{{"events":[{event}, {event}]}}}}"#);
            assert!(strict::response(&body).is_some(), "{event}");
            check_against_serde(&body);
            let got = crate::scan::strict_event_fields(event).unwrap();
            assert_eq!(got, crate::scan::event_fields(event), "{event}");
        }
    }
}
