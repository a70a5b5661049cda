//! Simplified sliding sync (MSC4186), the second protocol of [`SyncMachine`](crate::SyncMachine).
//!
//! The wire format is Synapse's (`POST
//! /_matrix/client/unstable/org.matrix.simplified_msc3575/sync`), which differs from the MSC
//! text: `pos` and `timeout` go in the query string, `conn_id` in the body, a list has
//! `ranges` (one range per list: Synapse's extensions assume exactly one), `required_state`
//! is a list of `[type, state_key]` pairs, and list results carry `ops` besides `count`.
//!
//! What this module holds:
//! * the configuration ([`Protocol`], [`SlidingSyncConfig`], [`RoomSubscription`]);
//! * the position the machine resumes from ([`SlidingPosition`]): `pos` and the to-device
//!   extension's own cursor, stored together as one checkpoint token;
//! * the request body (module `request`) and the response, parsed once with every event borrowed
//!   from the body and handed on as the same normalized [`Event`](crate::Event)s as `/v3/sync`
//!   (module `response`), plus list updates ([`ListUpdate`]) and connection resets
//!   ([`ConnectionReset`]) as their own event kinds.

pub(crate) mod request;
pub(crate) mod response;

use ruma_common::{OwnedRoomId, OwnedUserId};
use serde::{Deserialize, Serialize};

use crate::token;

/// Which sync protocol the machine speaks ([`Config::protocol`](crate::Config::protocol)).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Protocol {
    /// `GET /_matrix/client/v3/sync` (the default).
    #[default]
    V3,
    /// Simplified sliding sync (MSC4186), as Synapse serves it.
    SlidingSync,
    /// Sliding sync when the server offers it, else `/v3/sync`. The choice, in order:
    /// * a stored checkpoint ([`Config::since`](crate::Config::since)) decides: a sliding
    ///   sync position ([`SlidingPosition::from_token`]) resumes sliding sync, any other token
    ///   resumes `/v3/sync` (switching would lose the position);
    /// * without one, an authenticated `GET /_matrix/client/versions`
    ///   ([`RequestKind::ProtocolCheck`](crate::RequestKind::ProtocolCheck)) decides: sliding
    ///   sync when `unstable_features["org.matrix.simplified_msc3575"]` is `true`;
    /// * a 404 `M_UNRECOGNIZED` from the sliding sync endpoint before any checkpoint falls
    ///   back to `/v3/sync` for the rest of the run.
    Auto,
}

/// The protocol actually spoken, as [`SyncMachine::protocol`](crate::SyncMachine::protocol)
/// reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ActiveProtocol {
    /// [`Protocol::Auto`] is asking the server which one it offers.
    Deciding,
    /// `/v3/sync`.
    V3,
    /// Simplified sliding sync.
    SlidingSync,
}

/// The settings of sliding sync ([`Config::sliding_sync`](crate::Config::sliding_sync)).
///
/// The machine asks for one list, `"all"`, over every room of the account, with one range
/// that grows by [`window`](Self::window) rooms per catch-up request until it covers the
/// list's `count` (Synapse answers each with the rooms it newly covers); the machine is
/// [`Live`](crate::SyncState::Live) once the window covers every room. Rooms outside the
/// window are not lost: the server sends what happened in them once they come into it.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct SlidingSyncConfig {
    /// The connection id, sent in the body. Synapse keys a connection by user, device and
    /// `conn_id`, and a request without `pos` replaces any connection with the same key: two
    /// programs on one device must not share it. At most 64 bytes.
    pub conn_id: String,
    /// Events per room in a timeline, 1 to 1000. A limited timeline (more happened) of a room
    /// sent before is filled from `/messages` as [`Config::gap_fill`](crate::Config::gap_fill)
    /// says, what is not fetched reported as an [`EventKind::Gap`](crate::EventKind::Gap)
    /// item; 50 keeps fills rare.
    pub timeline_limit: u32,
    /// The state asked for, as `[event type, state key]` pairs (`"*"`, `"$LAZY"` and `"$ME"`
    /// are special). The default, `[["*", "*"]]`, is all state on a room's first appearance
    /// and every state change after.
    pub required_state: Vec<(String, String)>,
    /// How many rooms the list's range grows by, per catch-up request. At least 1.
    pub window: u32,
    /// The extensions asked for.
    pub extensions: Extensions,
    /// The account's user. With it, a room the user left or was removed from (its own last
    /// membership `leave` or `ban`, in the room's `required_state` or timeline) ends with an
    /// [`EventKind::Leave`](crate::EventKind::Leave) marker after its events, as `/v3/sync`'s
    /// `leave` section gives one. Without it there is no marker: a sliding sync answer does not
    /// say whose membership events are the user's own.
    pub user_id: Option<OwnedUserId>,
}

impl Default for SlidingSyncConfig {
    fn default() -> Self {
        Self {
            conn_id: "matrix-sync-service".to_owned(),
            timeline_limit: 50,
            required_state: vec![("*".to_owned(), "*".to_owned())],
            window: 100,
            extensions: Extensions::default(),
            user_id: None,
        }
    }
}

/// The sliding sync extensions asked for; all on by default.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Extensions {
    /// To-device messages, with their own cursor (part of the checkpoint).
    pub to_device: bool,
    /// One-time key counts, fallback key types and device list changes.
    pub e2ee: bool,
    /// Global and room account data.
    pub account_data: bool,
    /// Read receipts of the rooms in the window and subscriptions.
    pub receipts: bool,
    /// Typing notifications of the rooms in the window and subscriptions.
    pub typing: bool,
}

impl Default for Extensions {
    fn default() -> Self {
        Self {
            to_device: true,
            e2ee: true,
            account_data: true,
            receipts: true,
            typing: true,
        }
    }
}

/// A room subscription: a room synced whether or not it is in the list's window, with its
/// own timeline limit and state. Added and removed at run time with
/// [`SyncMachine::subscribe_room`](crate::SyncMachine::subscribe_room) and
/// [`unsubscribe_room`](crate::SyncMachine::unsubscribe_room).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct RoomSubscription {
    /// Events of its timeline, 1 to 1000.
    pub timeline_limit: u32,
    /// Its state asked for, as `[event type, state key]` pairs.
    pub required_state: Vec<(String, String)>,
}

impl RoomSubscription {
    /// A subscription with `timeline_limit` events and all state.
    pub fn new(timeline_limit: u32) -> Self {
        Self {
            timeline_limit,
            required_state: vec![("*".to_owned(), "*".to_owned())],
        }
    }
}

/// Where sliding sync resumes: the connection position `pos` and the to-device extension's
/// cursor, which the server keeps apart (to-device messages are deleted only once a request
/// carries a cursor past them).
///
/// A sliding sync [`Checkpoint`](crate::Checkpoint)'s `next_batch` is this pair as one token
/// ([`to_token`](Self::to_token)): a small JSON object, `{"pos":"…","to_device_since":"…"}`,
/// stored and restored like a `/v3/sync` token (in [`Config::since`](crate::Config::since),
/// the file store, the `tail` example's since file). [`Checkpoint::sliding_position`](crate::Checkpoint::sliding_position)
/// reads it back.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SlidingPosition {
    /// The connection position, sent as `pos`; `None` for a fresh connection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pos: Option<String>,
    /// The to-device cursor, sent as `extensions.to_device.since`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to_device_since: Option<String>,
}

impl SlidingPosition {
    /// The checkpoint token of this position.
    pub fn to_token(&self) -> String {
        // Serializing two optional strings cannot fail.
        serde_json::to_string(self).unwrap_or_else(|_| "{}".to_owned())
    }

    /// Reads a checkpoint token written by [`to_token`](Self::to_token); `None` for anything
    /// else (such as a `/v3/sync` `next_batch`, which is never a JSON object), or when a part
    /// breaks the token rules (empty, control characters, too long).
    pub fn from_token(token: &str) -> Option<Self> {
        if !token.starts_with('{') {
            return None;
        }
        let position: Self = serde_json::from_str(token).ok()?;
        position.check().ok()?;
        Some(position)
    }

    /// Both parts follow the token rules of `next_batch`.
    pub(crate) fn check(&self) -> Result<(), String> {
        if let Some(pos) = &self.pos {
            token::check(pos).map_err(|p| p.describe("pos"))?;
        }
        if let Some(since) = &self.to_device_since {
            token::check(since).map_err(|p| p.describe("extensions.to_device.next_batch"))?;
        }
        Ok(())
    }

    /// The `/v3`-style stream token inside Synapse's `pos` (`"<connection>/<stream token>"`),
    /// the lower bound of a gap; the whole `pos` for a server that does not use that form.
    pub(crate) fn stream_part(pos: &str) -> &str {
        pos.split_once('/').map_or(pos, |(_, stream)| stream)
    }
}

/// The subscription rules (those of the settings' `timeline_limit`, for a room).
pub(crate) fn valid_subscription(subscription: &RoomSubscription) -> bool {
    (1..=1000).contains(&subscription.timeline_limit)
}

/// A change of the sliding sync list, as an [`EventKind::ListUpdate`](crate::EventKind::ListUpdate):
/// reported when its `count` or its rooms changed since the last one.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct ListUpdate {
    /// The list's name (the machine's one list is `"all"`).
    pub list: String,
    /// Rooms in the list, whatever the range.
    pub count: u64,
    /// The `SYNC` operations: each range and the rooms in it, most recent activity first.
    pub ops: Vec<ListOp>,
}

/// One `SYNC` operation of a [`ListUpdate`].
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct ListOp {
    /// The operation (Synapse sends `SYNC` only).
    pub op: String,
    /// The inclusive range, if the server sent one.
    pub range: Option<(u64, u64)>,
    /// The rooms in the range, in order.
    pub room_ids: Vec<OwnedRoomId>,
}

/// Why a sliding sync connection was reset.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ResetReason {
    /// 400 `M_UNKNOWN_POS`: the server no longer knows the position (expired after days
    /// unused, too much to send after an idle hour, or deleted).
    UnknownPos,
    /// 400 `M_UNKNOWN` "Invalid stream token": the server cannot read the position (a
    /// corrupt or foreign checkpoint).
    InvalidPos,
}

impl ResetReason {
    /// A stable name: `unknown_pos` or `invalid_pos`.
    pub fn name(self) -> &'static str {
        match self {
            ResetReason::UnknownPos => "unknown_pos",
            ResetReason::InvalidPos => "invalid_pos",
        }
    }
}

/// A sliding sync connection was dropped and a fresh one follows, as an
/// [`EventKind::ConnectionReset`](crate::EventKind::ConnectionReset).
///
/// What was reset: the connection position. The next request carries no `pos`, so the server
/// sends every room of the window again as new (`initial`), with its latest events and its
/// state; events already delivered in this run are not delivered again (within the dedup
/// memory), older ones may be. What was kept: the to-device cursor (messages are neither lost
/// nor repeated), the room subscriptions, and the checkpoint last handed on (its `pos` is
/// dead: the next checkpoint replaces it). Device list changes since the lost position are not
/// known: an E2EE consumer should treat every tracked user's devices as outdated.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct ConnectionReset {
    /// Why.
    pub reason: ResetReason,
    /// The to-device cursor kept for the fresh connection.
    pub to_device_since: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_position_round_trips_through_its_token_and_nothing_else_reads_as_one() {
        let position = SlidingPosition {
            pos: Some("5/s2633508_17_338_6 ~x".to_owned()),
            to_device_since: Some("42".to_owned()),
        };
        let token = position.to_token();
        assert!(token::check(&token).is_ok());
        assert_eq!(SlidingPosition::from_token(&token), Some(position));
        let fresh = SlidingPosition {
            pos: None,
            to_device_since: Some("7".to_owned()),
        };
        assert_eq!(fresh.to_token(), r#"{"to_device_since":"7"}"#);
        assert_eq!(SlidingPosition::from_token(&fresh.to_token()), Some(fresh));
        for other in [
            "s72594_4483_1934",
            "{",
            r#"{"pos":5}"#,
            r#"{"pos":"a","other":"b"}"#,
            r#"{"pos":""}"#,
            r#"{"pos":"a\nb"}"#,
        ] {
            assert_eq!(SlidingPosition::from_token(other), None, "{other}");
        }
    }

    #[test]
    fn the_stream_part_follows_the_first_slash() {
        assert_eq!(SlidingPosition::stream_part("5/s1_2/3"), "s1_2/3");
        assert_eq!(SlidingPosition::stream_part("s1_2"), "s1_2");
    }

    #[test]
    fn a_subscription_takes_the_settings_timeline_limits() {
        assert!(!valid_subscription(&RoomSubscription::new(0)));
        assert!(valid_subscription(&RoomSubscription::new(20)));
    }
}
