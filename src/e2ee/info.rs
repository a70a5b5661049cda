//! What the end-to-end encryption stage says about an event: plain data, compiled in every
//! build (the pure machine sets none of it), so that [`Event`](crate::Event) has one shape
//! whatever the features.

use std::fmt;

use ruma_common::OwnedDeviceId;

/// What the E2EE stage (feature `e2ee`) found out about an `m.room.encrypted` room event.
///
/// [`Event::encryption`](crate::Event::encryption) is `None` for every event the stage did not
/// decrypt or try to (plaintext events, and every event without the stage).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Encryption {
    /// Decrypted: the event's kind, type, body, relation and state key are those of the
    /// plaintext, and `raw` is the decrypted event.
    Decrypted(Decrypted),
    /// Not decrypted: the event stays [`EventKind::Encrypted`](crate::EventKind::Encrypted)
    /// with the ciphertext in `raw`. If the missing key arrives later in the run, the event is
    /// delivered again, decrypted, with [`Decrypted::late`] set.
    Undecryptable(Undecryptable),
}

/// The facts of a decryption that an application needs.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Decrypted {
    /// The device that sent the event, as the crypto library knows it (trust it only as far as
    /// [`verification`](Self::verification) says).
    pub sender_device: Option<OwnedDeviceId>,
    /// How far the sender is verified, at the time of decryption.
    pub verification: Verification,
    /// The Megolm session the event was encrypted with.
    pub session_id: Option<String>,
    /// True when this event id was already delivered undecryptable earlier in the run and its
    /// room key arrived since: the one exception to the rule that an event id is delivered once.
    pub late: bool,
}

/// How far the sender of a decrypted event is verified (the crypto library's
/// `VerificationState`, flattened).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Verification {
    /// The sending device belongs to a user identity we verified.
    Verified,
    /// The sender's user identity is not verified by us.
    UnverifiedIdentity,
    /// The sender's identity was verified before and has changed since.
    VerificationViolation,
    /// The sending device is not signed by its owner's cross-signing identity.
    UnsignedDevice,
    /// The sending device is not known (deleted, or its keys were not fetched).
    MissingDevice,
    /// The room key came from an insecure source (an import, a legacy backup, a forward).
    InsecureSource,
    /// The event's `sender` is not the owner of the device that made the room key.
    MismatchedSender,
}

impl Verification {
    /// A stable snake-case name, for logs and the `tail` output.
    pub fn name(self) -> &'static str {
        match self {
            Verification::Verified => "verified",
            Verification::UnverifiedIdentity => "unverified_identity",
            Verification::VerificationViolation => "verification_violation",
            Verification::UnsignedDevice => "unsigned_device",
            Verification::MissingDevice => "missing_device",
            Verification::InsecureSource => "insecure_source",
            Verification::MismatchedSender => "mismatched_sender",
        }
    }
}

impl fmt::Display for Verification {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Why an event was not decrypted.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Undecryptable {
    /// The reason.
    pub reason: UndecryptableReason,
    /// The Megolm session the event names, if it names one.
    pub session_id: Option<String>,
}

/// Why an event was not decrypted.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum UndecryptableReason {
    /// We have no room key for its session (yet); `withheld` is the sender's code when it
    /// said it will not send one (`m.unverified`, `m.blacklisted`, ...).
    MissingRoomKey {
        /// The `m.room_key.withheld` code, if one arrived.
        withheld: Option<String>,
    },
    /// We have the session, but only from a later message index on.
    UnknownMessageIndex,
    /// The event is not a well-formed `m.room.encrypted` event (or uses an unknown algorithm).
    Malformed,
    /// The ciphertext did not decrypt with the session (bad MAC, corrupt message).
    DecryptionFailed,
    /// The plaintext is not a valid event.
    BadPlaintext,
    /// The keys of the device that sent the room key do not match the room key's claims.
    MismatchedIdentityKeys,
    /// The sender is not trusted enough for the configured trust requirement.
    SenderNotTrusted(Verification),
    /// Anything else the crypto library reported.
    Other,
}

impl UndecryptableReason {
    /// A stable snake-case name, for logs and the `tail` output.
    pub fn name(&self) -> &'static str {
        match self {
            UndecryptableReason::MissingRoomKey { withheld: None } => "missing_room_key",
            UndecryptableReason::MissingRoomKey { withheld: Some(_) } => "room_key_withheld",
            UndecryptableReason::UnknownMessageIndex => "unknown_message_index",
            UndecryptableReason::Malformed => "malformed",
            UndecryptableReason::DecryptionFailed => "decryption_failed",
            UndecryptableReason::BadPlaintext => "bad_plaintext",
            UndecryptableReason::MismatchedIdentityKeys => "mismatched_identity_keys",
            UndecryptableReason::SenderNotTrusted(_) => "sender_not_trusted",
            UndecryptableReason::Other => "other",
        }
    }

    /// Whether a room key arriving later can cure it (the stage keeps such events and delivers
    /// them again when it does).
    pub fn may_resolve(&self) -> bool {
        matches!(
            self,
            UndecryptableReason::MissingRoomKey { withheld: None }
                | UndecryptableReason::UnknownMessageIndex
        )
    }
}

impl fmt::Display for UndecryptableReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UndecryptableReason::MissingRoomKey {
                withheld: Some(code),
            } => {
                write!(f, "room key withheld ({})", crate::text::Escaped(code))
            }
            UndecryptableReason::SenderNotTrusted(level) => {
                write!(f, "sender not trusted ({level})")
            }
            other => f.write_str(other.name()),
        }
    }
}
