//! An independent encrypting client for the E2EE tests: a second matrix-sdk-crypto
//! `OlmMachine` (memory store) driving its own HTTP through the blocking test client.
//!
//! It shares nothing with the crate's E2EE stage but the crypto library, which is what the
//! clients people use are built on (Element X, Element Web through its wasm build,
//! matrix-bot-sdk). It uploads its keys, queries the recipient's devices, claims one-time
//! keys, shares a Megolm room key as Olm-encrypted to-device messages, and sends
//! `m.room.encrypted` events.
#![allow(dead_code)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use matrix_sdk_crypto::types::requests::{AnyOutgoingRequest, ToDeviceRequest};
use matrix_sdk_crypto::{EncryptionSettings, OlmMachine};
use ruma16::api::IncomingResponse;
use ruma_crypto as ruma16;
use serde_json::{json, Value};

use crate::support::client::{encode, Account};

static TXN: AtomicU64 = AtomicU64::new(0);

fn txn() -> String {
    format!(
        "sender-{}-{}",
        std::process::id(),
        TXN.fetch_add(1, Ordering::Relaxed)
    )
}

/// One sending device with its own crypto machine.
pub struct Sender {
    pub account: Account,
    olm: OlmMachine,
    runtime: tokio::runtime::Runtime,
    /// How many of the one-time keys this device claimed were fallback keys.
    pub fallback_keys_claimed: usize,
}

impl Sender {
    /// A crypto machine for `account`'s device; its device and one-time keys are uploaded.
    pub fn new(account: Account) -> Sender {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("a tokio runtime");
        let user = ruma16::UserId::parse(account.user_id.as_str()).expect("user id");
        let device: ruma16::OwnedDeviceId = account.device_id.as_str().into();
        let olm = runtime.block_on(OlmMachine::new(&user, &device));
        let mut sender = Sender {
            account,
            olm,
            runtime,
            fallback_keys_claimed: 0,
        };
        sender.flush();
        sender
    }

    /// Sends whatever the crypto machine asks for (keys upload, keys query, ...) until it
    /// asks for nothing more.
    pub fn flush(&mut self) {
        for _ in 0..10 {
            let requests = self
                .runtime
                .block_on(self.olm.outgoing_requests())
                .expect("outgoing requests");
            if requests.is_empty() {
                return;
            }
            for request in requests {
                self.send_one(request.request_id(), request.request());
            }
        }
        panic!("the sender's crypto machine keeps asking for requests");
    }

    fn send_one(&mut self, id: &ruma16::TransactionId, request: &AnyOutgoingRequest) {
        use ruma16::api::client::{keys, to_device};
        match request {
            AnyOutgoingRequest::KeysUpload(r) => {
                let mut body = json!({
                    "one_time_keys": r.one_time_keys,
                    "fallback_keys": r.fallback_keys,
                });
                if let Some(keys) = &r.device_keys {
                    body["device_keys"] = serde_json::to_value(keys).unwrap();
                }
                let value = self.ok("POST", "/_matrix/client/v3/keys/upload", &body);
                let response = parse::<keys::upload_keys::v3::Response>(&value);
                self.mark(id, &response);
            }
            AnyOutgoingRequest::KeysQuery(r) => {
                let body = json!({ "device_keys": r.device_keys });
                let value = self.ok("POST", "/_matrix/client/v3/keys/query", &body);
                let response = parse::<keys::get_keys::v3::Response>(&value);
                self.mark(id, &response);
            }
            AnyOutgoingRequest::KeysClaim(r) => {
                let body = json!({ "one_time_keys": r.one_time_keys });
                let value = self.ok("POST", "/_matrix/client/v3/keys/claim", &body);
                self.count_fallbacks(&value);
                let response = parse::<keys::claim_keys::v3::Response>(&value);
                self.mark(id, &response);
            }
            AnyOutgoingRequest::ToDeviceRequest(r) => {
                self.send_to_device(r);
                let response = parse::<to_device::send_event_to_device::v3::Response>(&json!({}));
                self.mark(id, &response);
            }
            other => panic!("the sender does not send {other:?}"),
        }
    }

    fn count_fallbacks(&mut self, claimed: &Value) {
        let keys = claimed["one_time_keys"].as_object().into_iter().flatten();
        for (_, devices) in keys {
            for (_, device_keys) in devices.as_object().into_iter().flatten() {
                for (_, key) in device_keys.as_object().into_iter().flatten() {
                    if key["fallback"] == json!(true) {
                        self.fallback_keys_claimed += 1;
                    }
                }
            }
        }
    }

    fn mark<'a>(
        &self,
        id: &ruma16::TransactionId,
        response: impl Into<matrix_sdk_crypto::types::requests::AnyIncomingResponse<'a>>,
    ) {
        self.runtime
            .block_on(self.olm.mark_request_as_sent(id, response))
            .expect("mark request as sent");
    }

    fn ok(&self, method: &str, path: &str, body: &Value) -> Value {
        let (status, value) = match method {
            "POST" => self.account.post_json(path, body),
            "PUT" => self.account.put_json(path, body),
            _ => unreachable!("only POST and PUT"),
        };
        assert!(
            (200..300).contains(&status),
            "sender {method} {path}: {status} {value}"
        );
        value
    }

    fn send_to_device(&self, request: &ToDeviceRequest) {
        let path = format!(
            "/_matrix/client/v3/sendToDevice/{}/{}",
            encode(&request.event_type.to_string()),
            encode(request.txn_id.as_str())
        );
        self.ok("PUT", &path, &json!({ "messages": request.messages }));
    }

    /// A new room of ours with encryption on, `member` invited and joined; its id.
    pub fn encrypted_room_with(&self, member: &Account) -> String {
        let room = self.account.create_room(&[]);
        self.enable_encryption(&room);
        self.account.invite(&room, &member.user_id);
        member.join(&room);
        room
    }

    /// Turns encryption on in `room` (Megolm).
    pub fn enable_encryption(&self, room: &str) {
        self.account.send_state(
            room,
            "m.room.encryption",
            "",
            &json!({"algorithm": "m.megolm.v1.aes-sha2"}),
        );
    }

    /// Opens Olm sessions with every device of `users` that has none yet: queries their
    /// devices and claims one-time keys (a fallback key once they run out).
    pub fn open_sessions(&mut self, users: &[&str]) {
        let users = user_ids(users);
        self.runtime
            .block_on(self.olm.update_tracked_users(users.iter().map(|u| &**u)))
            .expect("track users");
        self.flush();
        let claim = self
            .runtime
            .block_on(self.olm.get_missing_sessions(users.iter().map(|u| &**u)))
            .expect("missing sessions");
        if let Some((id, request)) = claim {
            self.send_one(&id, &AnyOutgoingRequest::KeysClaim(request));
        }
    }

    /// Shares the room key of `room` with every device of `users` (over the Olm sessions
    /// [`open_sessions`](Self::open_sessions) made). Returns the to-device requests instead
    /// of sending them when `defer` is set (for a key that should arrive late).
    pub fn share(&mut self, room: &str, users: &[&str], defer: bool) -> Vec<Arc<ToDeviceRequest>> {
        let users = user_ids(users);
        let room_id = ruma16::RoomId::parse(room).expect("room id");
        let shares = self
            .runtime
            .block_on(self.olm.share_room_key(
                &room_id,
                users.iter().map(|u| &**u),
                EncryptionSettings::default(),
            ))
            .expect("share room key");
        if defer {
            return shares;
        }
        self.deliver(&shares);
        Vec::new()
    }

    /// What a client does before each send: [`open_sessions`](Self::open_sessions), then
    /// [`share`](Self::share).
    pub fn prepare(
        &mut self,
        room: &str,
        users: &[&str],
        defer: bool,
    ) -> Vec<Arc<ToDeviceRequest>> {
        self.open_sessions(users);
        self.share(room, users, defer)
    }

    /// Drops the outbound room key of `room`: the next share makes a new one.
    pub fn discard_room_key(&self, room: &str) {
        let room_id = ruma16::RoomId::parse(room).expect("room id");
        self.runtime
            .block_on(self.olm.discard_room_key(&room_id))
            .expect("discard room key");
    }

    /// Sends to-device requests that [`prepare`](Self::prepare) deferred.
    pub fn deliver(&self, shares: &[Arc<ToDeviceRequest>]) {
        for share in shares {
            self.send_to_device(share);
            let response = parse::<
                ruma16::api::client::to_device::send_event_to_device::v3::Response,
            >(&json!({}));
            self.mark(&share.txn_id, &response);
        }
    }

    /// Encrypts `content` of `event_type` for `room` with the current room key and sends it
    /// as `m.room.encrypted`; returns the event id.
    pub fn send_encrypted(&self, room: &str, event_type: &str, content: &Value) -> String {
        let room_id = ruma16::RoomId::parse(room).expect("room id");
        let raw = ruma16::serde::Raw::from_json(serde_json::value::to_raw_value(content).unwrap());
        let encrypted = self
            .runtime
            .block_on(self.olm.encrypt_room_event_raw(&room_id, event_type, &raw))
            .expect("encrypt");
        let body: Value = serde_json::from_str(encrypted.content.json().get()).unwrap();
        let path = format!(
            "/_matrix/client/v3/rooms/{}/send/m.room.encrypted/{}",
            encode(room),
            encode(&txn())
        );
        let value = self.ok("PUT", &path, &body);
        value["event_id"].as_str().expect("event id").to_owned()
    }

    /// [`prepare`](Self::prepare) then [`send_encrypted`](Self::send_encrypted) of a text
    /// message, optionally replying to `reply_to`.
    pub fn send_text(
        &mut self,
        room: &str,
        to: &[&str],
        body: &str,
        reply_to: Option<&str>,
    ) -> String {
        self.prepare(room, to, false);
        let mut content = json!({"msgtype": "m.text", "body": body});
        if let Some(target) = reply_to {
            content["m.relates_to"] = json!({"m.in_reply_to": {"event_id": target}});
        }
        self.send_encrypted(room, "m.room.message", &content)
    }
}

fn user_ids(users: &[&str]) -> Vec<ruma16::OwnedUserId> {
    users
        .iter()
        .map(|u| ruma16::UserId::parse(*u).expect("user id"))
        .collect()
}

fn parse<R: IncomingResponse>(value: &Value) -> R {
    let response = http::Response::builder()
        .status(200)
        .body(serde_json::to_vec(value).unwrap())
        .unwrap();
    R::try_from_http_response(response)
        .unwrap_or_else(|e| panic!("unparsable response {value}: {e}"))
}
