//! Normalization: one [`Event`] type for every section of a sync response.
//!
//! Each event is read once, lazily: only the handful of fields below are pulled out of its raw
//! JSON (borrowing where the JSON has no escapes), never the whole event into ruma's typed enums.
//! Every field is read leniently: a field of an unexpected type reads as absent rather than
//! failing the event, so nothing the server sent is dropped for being odd.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt;
use std::hash::BuildHasher;

use ruma_common::{
    EventId, MilliSecondsSinceUnixEpoch, OwnedEventId, OwnedRoomId, OwnedUserId, UserId,
};
use serde_json::value::RawValue;

use crate::scan::{event_fields, EventFields};

/// What an [`Event`] is.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum EventKind {
    /// `m.room.message` in a timeline.
    Message,
    /// `m.room.encrypted` in a timeline; `body` is empty, the ciphertext is in `raw`.
    Encrypted,
    /// A state event other than membership (timeline or state section).
    State,
    /// `m.room.member` (timeline or state section).
    Member,
    /// `m.reaction`.
    Reaction,
    /// `m.room.redaction`; the target is in [`Event::redacts`].
    Redaction,
    /// Any other timeline event.
    OtherTimeline,
    /// `m.typing` (room ephemeral).
    Typing,
    /// `m.receipt` (room ephemeral).
    Receipt,
    /// Any other room ephemeral event.
    OtherEphemeral,
    /// `m.presence`.
    Presence,
    /// Global account data.
    GlobalAccountData,
    /// Room account data.
    RoomAccountData,
    /// A to-device event.
    ToDevice,
    /// A stripped state event of a room the user is invited to.
    Invite,
    /// The user left (or was removed from) the room. The room's events precede this marker;
    /// `raw`, `sender` and `state_key` are those of the last membership event when the
    /// response carried one (that event was delivered before as [`Member`](Self::Member), so
    /// the marker has no `event_id` of its own). With sliding sync, only when
    /// [`SlidingSyncConfig::user_id`](crate::sliding::SlidingSyncConfig::user_id) names the
    /// user.
    Leave,
    /// A stripped state event of a room the user knocked on.
    Knock,
    /// `device_lists` of the response (`raw` is that object).
    DeviceLists,
    /// `device_one_time_keys_count` and `device_unused_fallback_key_types`, when they changed.
    OneTimeKeyCounts,
    /// Events of the room that were not delivered.
    Gap(Gap),
    /// The end of a batch.
    Checkpoint(Checkpoint),
    /// Server discovery ([`Config::discover`](crate::Config::discover())) found the homeserver:
    /// its base URL, used for every request from now on. It comes once, before the first
    /// sync's events (`raw` is `{"homeserver": ...}`). Persist it to start next time with
    /// [`Config::new`](crate::Config::new) and skip discovery.
    Discovered {
        /// The homeserver's base URL, without a trailing slash.
        homeserver: String,
    },
    /// Sliding sync: the list's count or rooms changed (`raw` is `{"list", "count", "ops"}`).
    ListUpdate(crate::sliding::ListUpdate),
    /// Sliding sync: the server dropped the connection and a fresh one follows (`raw` is
    /// `{"reason", "to_device_since"}`). See [`ConnectionReset`](crate::sliding::ConnectionReset).
    ConnectionReset(crate::sliding::ConnectionReset),
}

impl EventKind {
    /// A stable lower-case name, for logs and the `tail` output.
    pub fn name(&self) -> &'static str {
        match self {
            EventKind::Message => "message",
            EventKind::Encrypted => "encrypted",
            EventKind::State => "state",
            EventKind::Member => "member",
            EventKind::Reaction => "reaction",
            EventKind::Redaction => "redaction",
            EventKind::OtherTimeline => "other_timeline",
            EventKind::Typing => "typing",
            EventKind::Receipt => "receipt",
            EventKind::OtherEphemeral => "other_ephemeral",
            EventKind::Presence => "presence",
            EventKind::GlobalAccountData => "global_account_data",
            EventKind::RoomAccountData => "room_account_data",
            EventKind::ToDevice => "to_device",
            EventKind::Invite => "invite",
            EventKind::Leave => "leave",
            EventKind::Knock => "knock",
            EventKind::DeviceLists => "device_lists",
            EventKind::OneTimeKeyCounts => "one_time_key_counts",
            EventKind::Gap(_) => "gap",
            EventKind::Discovered { .. } => "discovered",
            EventKind::Checkpoint(_) => "checkpoint",
            EventKind::ListUpdate(_) => "list_update",
            EventKind::ConnectionReset(_) => "connection_reset",
        }
    }
}

/// A run of a room's timeline that was not delivered: fetch it with
/// `GET /rooms/{room_id}/messages?dir=b&from={prev_batch}&to={previous_since}` if you need it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Gap {
    /// Where the undelivered run ends (newest side): paginate backwards from here.
    pub prev_batch: String,
    /// The sync token held before the gap (oldest side).
    pub previous_since: String,
}

/// The end of a batch: every event of it was handed on before this item.
///
/// Persist `next_batch` after handling everything before it, and resume from it with
/// [`Config::since`](crate::Config::since): nothing is lost (at-least-once delivery).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Checkpoint {
    /// The token to resume from.
    pub next_batch: String,
    /// False for history (the initial sync and each catch-up after a start or an error),
    /// true for batches received while live.
    pub live: bool,
}

impl Checkpoint {
    /// A sliding sync checkpoint's position (`pos` and the to-device cursor); `None` for a
    /// `/v3/sync` checkpoint.
    pub fn sliding_position(&self) -> Option<crate::sliding::SlidingPosition> {
        crate::sliding::SlidingPosition::from_token(&self.next_batch)
    }
}

/// A relation of an event to another (`m.relates_to`), such as an edit, a reaction or a reply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Relation {
    /// `rel_type`, such as `m.replace`, `m.annotation`, `m.thread`; `m.in_reply_to` for a
    /// plain reply.
    pub rel_type: String,
    /// The related event.
    pub event_id: OwnedEventId,
    /// The annotation key of a reaction.
    pub key: Option<String>,
}

/// An event's `type`: reads as a `&str` (`Deref`, `AsRef<str>`, `Display`, comparisons with
/// strings, serialized as a string). The types the specification defines are not allocated.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EventType(Cow<'static, str>);

impl EventType {
    /// The type as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Heap bytes this value holds: zero for the types the specification defines.
    pub fn heap_bytes(&self) -> usize {
        match &self.0 {
            Cow::Owned(owned) => owned.capacity(),
            Cow::Borrowed(_) => 0,
        }
    }
}

impl std::ops::Deref for EventType {
    type Target = str;

    fn deref(&self) -> &str {
        &self.0
    }
}

impl AsRef<str> for EventType {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for EventType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for EventType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl PartialEq<str> for EventType {
    fn eq(&self, other: &str) -> bool {
        *self.0 == *other
    }
}

impl PartialEq<&str> for EventType {
    fn eq(&self, other: &&str) -> bool {
        *self.0 == **other
    }
}

impl serde::Serialize for EventType {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

/// One normalized item of the event stream.
///
/// It serializes (`serde::Serialize`) as one flat JSON object of the fields that apply, a
/// stable shape for logs and pipes: see the [`Serialize` impl](#impl-Serialize-for-Event).
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct Event {
    /// What it is.
    pub kind: EventKind,
    /// The event's `type` (for synthetic items: `device_lists`, `gap`, `checkpoint`, ...).
    pub event_type: EventType,
    /// The room, for room events.
    pub room_id: Option<OwnedRoomId>,
    /// The event id, where the event has one.
    pub event_id: Option<OwnedEventId>,
    /// The sender.
    pub sender: Option<OwnedUserId>,
    /// `origin_server_ts`.
    pub origin_server_ts: Option<MilliSecondsSinceUnixEpoch>,
    /// `state_key`, for state events.
    pub state_key: Option<String>,
    /// `content.body` when it is a string; `None` when the event has none, and always for
    /// encrypted events (whose content is ciphertext).
    pub body: Option<String>,
    /// `content.m.relates_to`, where present.
    pub relation: Option<Relation>,
    /// The target of a redaction (`redacts`, top-level or in `content`).
    pub redacts: Option<OwnedEventId>,
    /// The event's own JSON, as the server sent it (for an event the E2EE stage decrypted:
    /// the decrypted event).
    pub raw: Box<RawValue>,
    /// What the E2EE stage (feature `e2ee`) found for an encrypted room event; `None` for
    /// every other event.
    pub encryption: Option<Box<crate::Encryption>>,
}

impl Event {
    /// The whole event as a typed value, parsed from [`raw`](Self::raw) on request (the
    /// machine itself never builds ruma's event types). For example a message:
    ///
    /// ```
    /// # use matrix_sync_service::Event;
    /// use matrix_sync_service::ruma_events::room::message::OriginalSyncRoomMessageEvent;
    /// # fn f(event: &Event) -> serde_json::Result<()> {
    /// let message: OriginalSyncRoomMessageEvent = event.deserialize_as()?;
    /// let line = format!("{}: {}", message.sender, message.content.body());
    /// # Ok(()) }
    /// ```
    pub fn deserialize_as<'a, T: serde::Deserialize<'a>>(&'a self) -> serde_json::Result<T> {
        serde_json::from_str(self.raw.get())
    }

    /// The event's `content` as a typed value. A reaction and a membership:
    ///
    /// ```
    /// # use matrix_sync_service::Event;
    /// use matrix_sync_service::ruma_events::reaction::ReactionEventContent;
    /// use matrix_sync_service::ruma_events::room::member::RoomMemberEventContent;
    /// # fn f(reaction: &Event, member: &Event) -> serde_json::Result<()> {
    /// let reaction: ReactionEventContent = reaction.deserialize_content()?;
    /// let line = format!("{} on {}", reaction.relates_to.key, reaction.relates_to.event_id);
    /// let member: RoomMemberEventContent = member.deserialize_content()?;
    /// let line = format!("{:?} is now {}", member.displayname, member.membership);
    /// # Ok(()) }
    /// ```
    pub fn deserialize_content<'a, T: serde::Deserialize<'a>>(&'a self) -> serde_json::Result<T> {
        #[derive(serde::Deserialize)]
        struct Content<'c> {
            #[serde(borrow)]
            content: &'c RawValue,
        }
        let Content { content } = serde_json::from_str(self.raw.get())?;
        serde_json::from_str(content.get())
    }

    /// Who is typing, for an [`EventKind::Typing`] event (`content.user_ids`); empty for
    /// any other event or an id that does not parse.
    pub fn typing_user_ids(&self) -> Vec<OwnedUserId> {
        #[derive(serde::Deserialize)]
        struct Typing {
            user_ids: Vec<String>,
        }
        match (&self.kind, self.deserialize_content::<Typing>()) {
            (EventKind::Typing, Ok(typing)) => typing
                .user_ids
                .iter()
                .filter_map(|id| UserId::parse(id.as_str()).ok())
                .collect(),
            _ => Vec::new(),
        }
    }

    /// Who read what, for an [`EventKind::Receipt`] event: `(event id, receipt type, user
    /// id)` for every receipt in its content, sorted by event id, type and user; empty for
    /// any other event.
    pub fn receipts(&self) -> Vec<(OwnedEventId, String, OwnedUserId)> {
        type Content = std::collections::BTreeMap<
            String,
            std::collections::BTreeMap<
                String,
                std::collections::BTreeMap<String, serde::de::IgnoredAny>,
            >,
        >;
        let Ok(content) = self.deserialize_content::<Content>() else {
            return Vec::new();
        };
        if self.kind != EventKind::Receipt {
            return Vec::new();
        }
        let mut receipts = Vec::new();
        for (event_id, by_type) in content {
            let Some(event_id) = parse_event_id(&event_id) else {
                continue;
            };
            for (receipt_type, users) in by_type {
                for user in users.keys() {
                    if let Ok(user) = UserId::parse(user.as_str()) {
                        receipts.push((event_id.clone(), receipt_type.clone(), user));
                    }
                }
            }
        }
        receipts
    }

    fn synthetic(
        kind: EventKind,
        event_type: &'static str,
        room_id: Option<OwnedRoomId>,
        raw: Box<RawValue>,
    ) -> Self {
        Event {
            kind,
            event_type: EventType(Cow::Borrowed(event_type)),
            room_id,
            event_id: None,
            sender: None,
            origin_server_ts: None,
            state_key: None,
            body: None,
            relation: None,
            redacts: None,
            raw,
            encryption: None,
        }
    }

    pub(crate) fn checkpoint(next_batch: String, live: bool) -> Self {
        // Serialized from a struct: `json!` builds a map first, and text written out would be
        // parsed once more by `RawValue::from_string`; costs every batch would pay.
        #[derive(serde::Serialize)]
        struct Json<'a> {
            live: bool,
            next_batch: &'a str,
        }
        let raw = to_raw(&Json {
            live,
            next_batch: &next_batch,
        });
        Self::synthetic(
            EventKind::Checkpoint(Checkpoint { next_batch, live }),
            "checkpoint",
            None,
            raw,
        )
    }

    pub(crate) fn discovered(homeserver: String) -> Self {
        let raw = to_raw(&serde_json::json!({ "homeserver": homeserver }));
        Self::synthetic(
            EventKind::Discovered { homeserver },
            "discovered",
            None,
            raw,
        )
    }

    /// The announcement of a sliding sync connection reset.
    pub(crate) fn connection_reset(reset: crate::sliding::ConnectionReset) -> Self {
        let raw = to_raw(&serde_json::json!({
            "reason": reset.reason.name(),
            "to_device_since": reset.to_device_since,
        }));
        Self::section(
            EventKind::ConnectionReset(reset),
            "connection_reset",
            None,
            raw,
        )
    }

    pub(crate) fn gap(room_id: OwnedRoomId, gap: Gap) -> Self {
        let raw = to_raw(&serde_json::json!({
            "room_id": room_id,
            "prev_batch": gap.prev_batch,
            "previous_since": gap.previous_since,
        }));
        Self::synthetic(EventKind::Gap(gap), "gap", Some(room_id), raw)
    }

    pub(crate) fn section(
        kind: EventKind,
        event_type: &'static str,
        room_id: Option<OwnedRoomId>,
        raw: Box<RawValue>,
    ) -> Self {
        Self::synthetic(kind, event_type, room_id, raw)
    }
}

/// The stable JSON shape of an event, one object per event, for logs and pipes: what the
/// `tail` example prints (and `many_accounts`, with `"account"` added).
///
/// The members, in this order; every one after `type` only where it applies (one that does
/// not apply is left out rather than `null`):
///
/// | member | value |
/// |---|---|
/// | `kind` | [`EventKind::name`] |
/// | `type` | [`Event::event_type`] |
/// | `room_id`, `event_id`, `sender` | strings |
/// | `origin_server_ts` | a number (milliseconds since the Unix epoch) |
/// | `body`, `state_key` | strings |
/// | `relation` | `{"rel_type": .., "event_id": .., "key": ..}`, `key` `null` unless a reaction's |
/// | `redacts` | the redacted event's id |
/// | `encrypted` | `true`, for an encrypted event (decrypted or not) |
/// | `sender_device`, `verification` | for a decrypted event: the device id (`null` when not known) and [`Verification::name`](crate::Verification::name) |
/// | `late` | `true`, for a decrypted event delivered before as undecryptable ([`Decrypted::late`](crate::Decrypted::late)) |
/// | `undecryptable` | why not ([`UndecryptableReason`](crate::UndecryptableReason)'s `Display`) |
/// | `next_batch`, `live` | for a checkpoint: a string and a boolean |
/// | `prev_batch`, `previous_since` | for a gap: strings |
/// | `homeserver` | for [`Discovered`](EventKind::Discovered): the base URL found |
/// | `list`, `count` | for a sliding sync [`ListUpdate`](EventKind::ListUpdate): a string and a number |
/// | `reason` | for a sliding sync [`ConnectionReset`](EventKind::ConnectionReset): [`ResetReason::name`](crate::sliding::ResetReason::name) |
///
/// [`raw`](Event::raw) is not part of it (add it yourself if you want it: tail's `--raw`
/// does). The shape is stable: members may be added, none renamed or removed.
///
/// ```
/// use std::time::Instant;
/// use matrix_sync_service::{Config, SyncMachine};
///
/// let now = Instant::now();
/// let mut machine = SyncMachine::new(Config::new("https://example.org", "token"), now)?;
/// let request = machine.poll_request().expect("the first sync is due");
/// let body = r#"{"next_batch": "s2", "rooms": {"join": {"!r:example.org": {"timeline": {
///     "events": [{"type": "m.room.message", "event_id": "$1:example.org",
///         "sender": "@a:example.org", "origin_server_ts": 1700000000000,
///         "content": {"msgtype": "m.text", "body": "hi"}}]}}}}}"#;
/// machine.handle_response(request.id, http::Response::new(body), now)?;
/// let lines = std::iter::from_fn(|| machine.poll_event())
///     .map(|event| serde_json::to_string(&event))
///     .collect::<Result<Vec<_>, _>>()?;
/// assert_eq!(
///     lines,
///     [
///         r#"{"kind":"message","type":"m.room.message","room_id":"!r:example.org","event_id":"$1:example.org","sender":"@a:example.org","origin_server_ts":1700000000000,"body":"hi"}"#,
///         r#"{"kind":"checkpoint","type":"checkpoint","next_batch":"s2","live":false}"#,
///     ]
/// );
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
///
/// To add members of your own, flatten it into a struct of yours:
/// `#[derive(Serialize)] struct Line<'a> { account: &'a str, #[serde(flatten)] event: &'a Event }`.
impl serde::Serialize for Event {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use crate::Encryption;
        use serde::ser::SerializeMap;

        let mut map = serializer.serialize_map(None)?;
        map.serialize_entry("kind", self.kind.name())?;
        map.serialize_entry("type", &self.event_type)?;
        if let Some(room_id) = &self.room_id {
            map.serialize_entry("room_id", room_id)?;
        }
        if let Some(event_id) = &self.event_id {
            map.serialize_entry("event_id", event_id)?;
        }
        if let Some(sender) = &self.sender {
            map.serialize_entry("sender", sender)?;
        }
        if let Some(ts) = &self.origin_server_ts {
            map.serialize_entry("origin_server_ts", ts)?;
        }
        if let Some(body) = &self.body {
            map.serialize_entry("body", body)?;
        }
        if let Some(state_key) = &self.state_key {
            map.serialize_entry("state_key", state_key)?;
        }
        if let Some(relation) = &self.relation {
            map.serialize_entry("relation", &RelationJson(relation))?;
        }
        if let Some(redacts) = &self.redacts {
            map.serialize_entry("redacts", redacts)?;
        }
        match self.encryption.as_deref() {
            Some(Encryption::Decrypted(decrypted)) => {
                map.serialize_entry("encrypted", &true)?;
                map.serialize_entry("sender_device", &decrypted.sender_device)?;
                map.serialize_entry("verification", decrypted.verification.name())?;
                if decrypted.late {
                    map.serialize_entry("late", &true)?;
                }
            }
            Some(Encryption::Undecryptable(undecryptable)) => {
                map.serialize_entry("encrypted", &true)?;
                map.serialize_entry("undecryptable", &format_args!("{}", undecryptable.reason))?;
            }
            None if self.kind == EventKind::Encrypted => map.serialize_entry("encrypted", &true)?,
            None => {}
        }
        match &self.kind {
            EventKind::Checkpoint(checkpoint) => {
                map.serialize_entry("next_batch", &checkpoint.next_batch)?;
                map.serialize_entry("live", &checkpoint.live)?;
            }
            EventKind::Gap(gap) => {
                map.serialize_entry("prev_batch", &gap.prev_batch)?;
                map.serialize_entry("previous_since", &gap.previous_since)?;
            }
            EventKind::Discovered { homeserver } => {
                map.serialize_entry("homeserver", homeserver)?;
            }
            EventKind::ListUpdate(update) => {
                map.serialize_entry("list", &update.list)?;
                map.serialize_entry("count", &update.count)?;
            }
            EventKind::ConnectionReset(reset) => {
                map.serialize_entry("reason", reset.reason.name())?;
            }
            _ => {}
        }
        map.end()
    }
}

/// A [`Relation`] in the JSON shape of [`Event`]: every member, `key` `null` when absent.
struct RelationJson<'a>(&'a Relation);

impl serde::Serialize for RelationJson<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;

        let mut map = serializer.serialize_map(Some(3))?;
        map.serialize_entry("rel_type", &self.0.rel_type)?;
        map.serialize_entry("event_id", &self.0.event_id)?;
        map.serialize_entry("key", &self.0.key)?;
        map.end()
    }
}

pub(crate) fn to_raw<T: serde::Serialize>(value: &T) -> Box<RawValue> {
    // Serializing plain maps and strings cannot fail; an empty object is the harmless fallback.
    serde_json::value::to_raw_value(value)
        .unwrap_or_else(|_| RawValue::from_string("{}".to_owned()).expect("valid JSON"))
}

/// Where in the response an event was found: decides its kind together with its type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Section {
    Timeline,
    State,
    Ephemeral,
    RoomAccountData,
    GlobalAccountData,
    Presence,
    ToDevice,
    Invite,
    Knock,
}

impl Section {
    /// Every section, for the fuzz targets.
    #[cfg(fuzzing)]
    pub(crate) const ALL: [Section; 9] = [
        Section::Timeline,
        Section::State,
        Section::Ephemeral,
        Section::RoomAccountData,
        Section::GlobalAccountData,
        Section::Presence,
        Section::ToDevice,
        Section::Invite,
        Section::Knock,
    ];
}

/// Normalizes one event from its raw JSON.
#[cfg(any(test, fuzzing, feature = "e2ee"))]
pub(crate) fn normalize(
    raw: Box<RawValue>,
    section: Section,
    room_id: Option<&OwnedRoomId>,
) -> Event {
    normalize_with(raw, section, room_id, &mut Senders::default())
}

/// The senders validated so far in a batch. A batch names each sender many times over, and
/// checking a user id costs several times more than finding it again here.
#[derive(Debug, Default)]
pub(crate) struct Senders {
    /// By a hash of the id; a hit is compared in full before it is used.
    ids: HashMap<u64, OwnedUserId, foldhash::fast::RandomState>,
    // Seeded per batch, so that senders cannot be chosen to collide.
    hasher: foldhash::fast::RandomState,
}

impl Senders {
    /// Bounds the memory of a batch with many senders: past this, the kept ids are dropped.
    const KEPT: usize = 4096;

    /// `UserId::parse(sender).ok()`: a parsed id is its input unchanged, so a kept id equal
    /// to `sender` is the answer.
    fn parse(&mut self, sender: &str) -> Option<OwnedUserId> {
        let hash = self.hasher.hash_one(sender);
        if let Some(id) = self.ids.get(&hash) {
            if id.as_str() == sender {
                return Some(id.clone());
            }
            // Another sender with the same hash: parsed without being kept.
            return UserId::parse(sender).ok();
        }
        let id = UserId::parse(sender).ok()?;
        if self.ids.len() >= Self::KEPT {
            self.ids.clear();
        }
        self.ids.insert(hash, id.clone());
        Some(id)
    }
}

/// Builds the [`Event`] of `$raw` from its `$fields`. A macro rather than a function so that the
/// fields may borrow from `$raw` itself, which moves into the event last.
macro_rules! normalized {
    ($raw:expr, $fields:ident, $section:expr, $room_id:expr, $senders:expr) => {{
        let event_id = $fields.event_id.as_deref().and_then(parse_event_id);
        normalized!($raw, $fields, event_id, $section, $room_id, $senders)
    }};
    ($raw:expr, $fields:ident, $event_id:expr, $section:expr, $room_id:expr, $senders:expr) => {{
        let event_type = $fields.event_type.as_deref().unwrap_or_default();
        let kind = kind_of($section, event_type, $fields.state_key.is_some());
        let body = match kind {
            EventKind::Encrypted => None,
            _ => $fields.body.map(Cow::into_owned),
        };
        let relation = match ($fields.rel_type, $fields.rel_event_id, $fields.in_reply_to) {
            (Some(rel_type), Some(id), _) => parse_event_id(&id).map(|event_id| Relation {
                rel_type: rel_type.into_owned(),
                event_id,
                key: $fields.rel_key.map(Cow::into_owned),
            }),
            (_, _, Some(id)) => parse_event_id(&id).map(|event_id| Relation {
                rel_type: "m.in_reply_to".to_owned(),
                event_id,
                key: None,
            }),
            _ => None,
        };
        let redacts = match kind {
            EventKind::Redaction => $fields
                .redacts
                .or($fields.content_redacts)
                .and_then(|r| parse_event_id(&r)),
            _ => None,
        };
        Event {
            event_type: EventType(
                known_type(event_type)
                    .map_or_else(|| Cow::Owned(event_type.to_owned()), Cow::Borrowed),
            ),
            event_id: $event_id,
            sender: $fields.sender.and_then(|s| $senders.parse(&s)),
            origin_server_ts: $fields
                .origin_server_ts
                .and_then(js_int_uint)
                .map(MilliSecondsSinceUnixEpoch),
            state_key: $fields.state_key.map(Cow::into_owned),
            kind,
            room_id: $room_id.cloned(),
            body,
            relation,
            redacts,
            raw: $raw,
            encryption: None,
        }
    }};
}

/// [`normalize`] with the senders met before.
// Inlined into the delivery loop, so that the 280-byte event is built where the caller takes
// it rather than copied out through each layer.
#[inline]
pub(crate) fn normalize_with(
    raw: Box<RawValue>,
    section: Section,
    room_id: Option<&OwnedRoomId>,
    senders: &mut Senders,
) -> Event {
    let fields = event_fields(raw.get());
    normalized!(raw, fields, section, room_id, senders)
}

/// [`normalize_with`] with the fields read already (by the strict pass over the body, or by
/// [`event_fields`]), borrowing from the body `raw` was copied from, and the event id parsed
/// (by [`parse_event_id`]): the delivery loop decides on duplicates before it builds anything.
#[inline]
pub(crate) fn normalize_identified(
    raw: Box<RawValue>,
    fields: EventFields<'_>,
    event_id: Option<OwnedEventId>,
    section: Section,
    room_id: Option<&OwnedRoomId>,
    senders: &mut Senders,
) -> Event {
    normalized!(raw, fields, event_id, section, room_id, senders)
}

fn js_int_uint(v: u64) -> Option<js_int::UInt> {
    js_int::UInt::new(v)
}

pub(crate) fn parse_event_id(s: &str) -> Option<OwnedEventId> {
    EventId::parse(s).ok()
}

/// The event types of the specification, shared rather than allocated for every event.
fn known_type(event_type: &str) -> Option<&'static str> {
    macro_rules! known {
        ($($name:literal),* $(,)?) => {
            match event_type {
                $($name => Some($name),)*
                _ => None,
            }
        };
    }
    known!(
        "m.room.message",
        "m.room.encrypted",
        "m.room.member",
        "m.reaction",
        "m.room.redaction",
        "m.sticker",
        "m.typing",
        "m.receipt",
        "m.presence",
        "m.fully_read",
        "m.tag",
        "m.push_rules",
        "m.direct",
        "m.ignored_user_list",
        "m.room.create",
        "m.room.power_levels",
        "m.room.join_rules",
        "m.room.history_visibility",
        "m.room.guest_access",
        "m.room.name",
        "m.room.topic",
        "m.room.avatar",
        "m.room.canonical_alias",
        "m.room.encryption",
        "m.room.pinned_events",
        "m.room.server_acl",
        "m.room.tombstone",
        "m.room.third_party_invite",
        "m.space.child",
        "m.space.parent",
        "m.room_key",
        "m.room_key_request",
        "m.forwarded_room_key",
        "m.secret.request",
        "m.secret.send",
        "m.dummy",
        "m.call.invite",
        "m.call.candidates",
        "m.call.answer",
        "m.call.hangup",
        "m.poll.start",
        "m.poll.response",
        "m.poll.end",
        "m.key.verification.request",
        "m.key.verification.ready",
        "m.key.verification.start",
        "m.key.verification.accept",
        "m.key.verification.key",
        "m.key.verification.mac",
        "m.key.verification.done",
        "m.key.verification.cancel",
    )
}

fn kind_of(section: Section, event_type: &str, has_state_key: bool) -> EventKind {
    match section {
        Section::Timeline | Section::State => match event_type {
            "m.room.member" if has_state_key => EventKind::Member,
            _ if has_state_key || section == Section::State => EventKind::State,
            "m.room.message" => EventKind::Message,
            "m.room.encrypted" => EventKind::Encrypted,
            "m.reaction" => EventKind::Reaction,
            "m.room.redaction" => EventKind::Redaction,
            _ => EventKind::OtherTimeline,
        },
        Section::Ephemeral => match event_type {
            "m.typing" => EventKind::Typing,
            "m.receipt" => EventKind::Receipt,
            _ => EventKind::OtherEphemeral,
        },
        Section::RoomAccountData => EventKind::RoomAccountData,
        Section::GlobalAccountData => EventKind::GlobalAccountData,
        Section::Presence => EventKind::Presence,
        Section::ToDevice => EventKind::ToDevice,
        Section::Invite => EventKind::Invite,
        Section::Knock => EventKind::Knock,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checkpoint_json_is_serde_json_s() {
        for token in ["s1", "a\"b\\c\u{1}é/", ""] {
            for live in [false, true] {
                let event = Event::checkpoint(token.to_owned(), live);
                let expected = serde_json::json!({ "next_batch": token, "live": live });
                // As a value: the member order of `json!` depends on serde_json's features.
                let written: serde_json::Value = serde_json::from_str(event.raw.get()).unwrap();
                assert_eq!(written, expected);
            }
        }
    }

    #[test]
    fn kept_senders_read_as_parsing_would() {
        let mut senders = Senders::default();
        let names: Vec<String> = (0..20)
            .map(|i| format!("@u{}:example.org", i % 11))
            .chain(["@a:b", "not an id", "@a:b ", "", "@A:b", "@a:b"].map(str::to_owned))
            .chain((0..20).map(|i| format!("@u{}:example.org", (i * 7) % 13)))
            .collect();
        for name in &names {
            let want = UserId::parse(name.as_str()).ok();
            assert_eq!(senders.parse(name), want, "{name:?}");
            assert!(senders.ids.len() <= Senders::KEPT);
        }
        // Past the bound, ids are forgotten and parsed again, with the same answers.
        for i in 0..Senders::KEPT + 10 {
            let name = format!("@u{}:x", i % (Senders::KEPT + 5));
            assert_eq!(senders.parse(&name), UserId::parse(name.as_str()).ok());
            assert!(senders.ids.len() <= Senders::KEPT);
        }
    }

    fn norm(json: &str, section: Section) -> Event {
        normalize(
            RawValue::from_string(json.to_owned()).unwrap(),
            section,
            None,
        )
    }

    fn json_line(event: &Event) -> String {
        serde_json::to_string(event).unwrap()
    }

    fn in_room(json: &str, section: Section) -> Event {
        let room = OwnedRoomId::try_from("!r:x").unwrap();
        normalize(
            RawValue::from_string(json.to_owned()).unwrap(),
            section,
            Some(&room),
        )
    }

    #[test]
    fn json_line_of_a_message_has_every_field_in_order_and_no_raw() {
        let e = in_room(
            r#"{"type":"m.room.message","event_id":"$m:x","sender":"@a:x","origin_server_ts":17,
               "content":{"msgtype":"m.text","body":"hi \"there\"\n"}}"#,
            Section::Timeline,
        );
        assert_eq!(
            json_line(&e),
            r#"{"kind":"message","type":"m.room.message","room_id":"!r:x","event_id":"$m:x","sender":"@a:x","origin_server_ts":17,"body":"hi \"there\"\n"}"#
        );
    }

    #[test]
    fn json_line_leaves_out_what_does_not_apply() {
        let e = norm(
            r#"{"type":"m.direct","content":{}}"#,
            Section::GlobalAccountData,
        );
        assert_eq!(
            json_line(&e),
            r#"{"kind":"global_account_data","type":"m.direct"}"#
        );
        // Fields of the wrong type read as absent, and are left out.
        let e = in_room(
            r#"{"type":"x.custom","event_id":7,"sender":[],"origin_server_ts":-1,"content":{"body":1}}"#,
            Section::Timeline,
        );
        assert_eq!(
            json_line(&e),
            r#"{"kind":"other_timeline","type":"x.custom","room_id":"!r:x"}"#
        );
        let e = norm(r#"[1]"#, Section::ToDevice);
        assert_eq!(json_line(&e), r#"{"kind":"to_device","type":""}"#);
        let e = Event::section(
            EventKind::DeviceLists,
            "device_lists",
            None,
            to_raw(&serde_json::json!({"changed": ["@a:x"]})),
        );
        assert_eq!(
            json_line(&e),
            r#"{"kind":"device_lists","type":"device_lists"}"#
        );
    }

    #[test]
    fn json_line_of_state_relations_and_redactions() {
        let e = in_room(
            r#"{"type":"m.room.member","state_key":"@b:x","event_id":"$j:x","sender":"@b:x",
               "origin_server_ts":1,"content":{"membership":"join"}}"#,
            Section::State,
        );
        assert_eq!(
            json_line(&e),
            r#"{"kind":"member","type":"m.room.member","room_id":"!r:x","event_id":"$j:x","sender":"@b:x","origin_server_ts":1,"state_key":"@b:x"}"#
        );
        let e = in_room(
            r#"{"type":"m.reaction","event_id":"$r:x","content":{"m.relates_to":
               {"rel_type":"m.annotation","event_id":"$m:x","key":"👍"}}}"#,
            Section::Timeline,
        );
        assert_eq!(
            json_line(&e),
            r#"{"kind":"reaction","type":"m.reaction","room_id":"!r:x","event_id":"$r:x","relation":{"rel_type":"m.annotation","event_id":"$m:x","key":"👍"}}"#
        );
        // A relation without a key keeps the member, as null.
        let e = in_room(
            r#"{"type":"m.room.message","content":{"body":"re",
               "m.relates_to":{"m.in_reply_to":{"event_id":"$m:x"}}}}"#,
            Section::Timeline,
        );
        assert_eq!(
            json_line(&e),
            r#"{"kind":"message","type":"m.room.message","room_id":"!r:x","body":"re","relation":{"rel_type":"m.in_reply_to","event_id":"$m:x","key":null}}"#
        );
        let e = in_room(
            r#"{"type":"m.room.redaction","sender":"@a:x","content":{"redacts":"$m:x"}}"#,
            Section::Timeline,
        );
        assert_eq!(
            json_line(&e),
            r#"{"kind":"redaction","type":"m.room.redaction","room_id":"!r:x","sender":"@a:x","redacts":"$m:x"}"#
        );
    }

    #[test]
    fn json_line_of_checkpoints_and_gaps() {
        let e = Event::checkpoint("s7".to_owned(), true);
        assert_eq!(
            json_line(&e),
            r#"{"kind":"checkpoint","type":"checkpoint","next_batch":"s7","live":true}"#
        );
        let e = Event::checkpoint("s1".to_owned(), false);
        assert!(json_line(&e).ends_with(r#""next_batch":"s1","live":false}"#));
        let room = OwnedRoomId::try_from("!r:x").unwrap();
        let gap = Gap {
            prev_batch: "p1".to_owned(),
            previous_since: "s0".to_owned(),
        };
        assert_eq!(
            json_line(&Event::gap(room, gap)),
            r#"{"kind":"gap","type":"gap","room_id":"!r:x","prev_batch":"p1","previous_since":"s0"}"#
        );
    }

    #[test]
    fn json_line_of_encrypted_decrypted_and_undecryptable_events() {
        use crate::{Decrypted, Encryption, Undecryptable, UndecryptableReason, Verification};
        let encrypted = || {
            in_room(
                r#"{"type":"m.room.encrypted","event_id":"$e:x","sender":"@a:x",
                   "origin_server_ts":3,"content":{"ciphertext":"c","body":"leak?"}}"#,
                Section::Timeline,
            )
        };
        // Without the E2EE stage.
        assert_eq!(
            json_line(&encrypted()),
            r#"{"kind":"encrypted","type":"m.room.encrypted","room_id":"!r:x","event_id":"$e:x","sender":"@a:x","origin_server_ts":3,"encrypted":true}"#
        );
        let mut e = encrypted();
        e.encryption = Some(Box::new(Encryption::Undecryptable(Undecryptable {
            reason: UndecryptableReason::MissingRoomKey {
                withheld: Some("m.unverified".to_owned()),
            },
            session_id: Some("sess".to_owned()),
        })));
        assert_eq!(
            json_line(&e),
            r#"{"kind":"encrypted","type":"m.room.encrypted","room_id":"!r:x","event_id":"$e:x","sender":"@a:x","origin_server_ts":3,"encrypted":true,"undecryptable":"room key withheld (m.unverified)"}"#
        );
        e.encryption = Some(Box::new(Encryption::Undecryptable(Undecryptable {
            reason: UndecryptableReason::SenderNotTrusted(Verification::UnsignedDevice),
            session_id: None,
        })));
        assert!(
            json_line(&e).ends_with(r#""undecryptable":"sender not trusted (unsigned_device)"}"#)
        );
        // Decrypted: the plaintext's kind and fields, then what the stage found.
        let decrypted = |sender_device: Option<&str>, late: bool| {
            let mut e = in_room(
                r#"{"type":"m.room.message","event_id":"$e:x","sender":"@a:x",
                   "origin_server_ts":3,"content":{"msgtype":"m.text","body":"secret"}}"#,
                Section::Timeline,
            );
            e.encryption = Some(Box::new(Encryption::Decrypted(Decrypted {
                sender_device: sender_device.map(Into::into),
                verification: Verification::UnverifiedIdentity,
                session_id: Some("sess".to_owned()),
                late,
            })));
            json_line(&e)
        };
        assert_eq!(
            decrypted(Some("DEV"), false),
            r#"{"kind":"message","type":"m.room.message","room_id":"!r:x","event_id":"$e:x","sender":"@a:x","origin_server_ts":3,"body":"secret","encrypted":true,"sender_device":"DEV","verification":"unverified_identity"}"#
        );
        assert!(decrypted(None, true).ends_with(
            r#""encrypted":true,"sender_device":null,"verification":"unverified_identity","late":true}"#
        ));
    }

    #[test]
    fn json_line_flattens_into_a_struct_of_the_application() {
        #[derive(serde::Serialize)]
        struct Line<'a> {
            account: &'a str,
            #[serde(flatten)]
            event: &'a Event,
        }
        let e = Event::checkpoint("s7".to_owned(), true);
        let line = serde_json::to_string(&Line {
            account: "@a:x",
            event: &e,
        })
        .unwrap();
        assert_eq!(
            line,
            r#"{"account":"@a:x","kind":"checkpoint","type":"checkpoint","next_batch":"s7","live":true}"#
        );
    }

    #[test]
    fn typed_views_of_messages_reactions_members_typing_and_receipts() {
        use ruma_events::reaction::ReactionEventContent;
        use ruma_events::room::member::{MembershipState, RoomMemberEventContent};
        use ruma_events::room::message::OriginalSyncRoomMessageEvent;
        let message = norm(
            r#"{"type":"m.room.message","event_id":"$m:x","sender":"@a:x","origin_server_ts":1,
               "content":{"msgtype":"m.text","body":"hi"}}"#,
            Section::Timeline,
        );
        let typed: OriginalSyncRoomMessageEvent = message.deserialize_as().unwrap();
        assert_eq!(typed.content.body(), "hi");
        let reaction = norm(
            r#"{"type":"m.reaction","event_id":"$r:x","sender":"@a:x","origin_server_ts":1,
               "content":{"m.relates_to":{"rel_type":"m.annotation","event_id":"$m:x","key":"👍"}}}"#,
            Section::Timeline,
        );
        let content: ReactionEventContent = reaction.deserialize_content().unwrap();
        assert_eq!(content.relates_to.key, "👍");
        let member = norm(
            r#"{"type":"m.room.member","state_key":"@b:x","event_id":"$j:x","sender":"@b:x",
               "origin_server_ts":1,"content":{"membership":"join","displayname":"B"}}"#,
            Section::State,
        );
        let content: RoomMemberEventContent = member.deserialize_content().unwrap();
        assert_eq!(content.membership, MembershipState::Join);
        let typing = norm(
            r#"{"type":"m.typing","content":{"user_ids":["@a:x","not an id","@b:x"]}}"#,
            Section::Ephemeral,
        );
        let ids: Vec<_> = typing
            .typing_user_ids()
            .iter()
            .map(|u| u.to_string())
            .collect();
        assert_eq!(ids, ["@a:x", "@b:x"]);
        assert!(message.typing_user_ids().is_empty());
        let receipt = norm(
            r#"{"type":"m.receipt","content":{"$m:x":{"m.read":{"@b:x":{"ts":1},"@a:x":{"ts":2}},
               "m.read.private":{"@c:x":{}}},"bad":{"m.read":{"@d:x":{}}}}}"#,
            Section::Ephemeral,
        );
        let read: Vec<_> = receipt
            .receipts()
            .into_iter()
            .map(|(e, t, u)| format!("{e} {t} {u}"))
            .collect();
        assert_eq!(
            read,
            [
                "$m:x m.read @a:x",
                "$m:x m.read @b:x",
                "$m:x m.read.private @c:x"
            ]
        );
        assert!(typing.receipts().is_empty());
    }

    #[test]
    fn reads_the_fields_of_a_reply_with_escapes() {
        let e = norm(
            r#"{"type":"m.room.message","event_id":"$a:x","sender":"@u:x","origin_server_ts":5,
               "content":{"body":"say \"hi\"","m.relates_to":{"m.in_reply_to":{"event_id":"$b:x"}}}}"#,
            Section::Timeline,
        );
        assert_eq!(e.kind, EventKind::Message);
        assert_eq!(e.body.as_deref(), Some("say \"hi\""));
        assert_eq!(e.relation.unwrap().rel_type, "m.in_reply_to");
        assert_eq!(e.origin_server_ts.unwrap().0, js_int::uint!(5));
    }

    #[test]
    fn odd_field_types_read_as_absent() {
        let e = norm(
            r#"{"type":"m.room.message","event_id":7,"sender":["@u:x"],"origin_server_ts":-1,
               "content":{"body":{"nested":true},"m.relates_to":"nope"}}"#,
            Section::Timeline,
        );
        assert_eq!(e.kind, EventKind::Message);
        assert!(e.event_id.is_none() && e.sender.is_none() && e.origin_server_ts.is_none());
        assert_eq!(e.body, None);
        assert!(e.relation.is_none());
        let e = norm(r#"[1,2,3]"#, Section::Timeline);
        assert_eq!(e.kind, EventKind::OtherTimeline);
        assert_eq!(e.raw.get(), "[1,2,3]");
        let e = norm(r#"{"type":"m.room.topic","content":5}"#, Section::State);
        assert_eq!(e.kind, EventKind::State);
    }

    #[test]
    fn redactions_carry_their_target_in_either_place() {
        let old = norm(
            r#"{"type":"m.room.redaction","redacts":"$t:x","content":{}}"#,
            Section::Timeline,
        );
        let new = norm(
            r#"{"type":"m.room.redaction","content":{"redacts":"$t:x"}}"#,
            Section::Timeline,
        );
        assert_eq!(old.kind, EventKind::Redaction);
        assert_eq!(old.redacts.as_deref().map(|e| e.as_str()), Some("$t:x"));
        assert_eq!(new.redacts, old.redacts);
    }

    #[test]
    fn encrypted_events_have_no_body() {
        let e = norm(
            r#"{"type":"m.room.encrypted","content":{"body":"leak?","ciphertext":"x"}}"#,
            Section::Timeline,
        );
        assert_eq!(e.kind, EventKind::Encrypted);
        assert_eq!(e.body, None);
    }
}
