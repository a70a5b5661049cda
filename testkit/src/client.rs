//! A minimal blocking Matrix client used by the tests to drive a homeserver
//! (register users, create rooms, send events) independently of the code
//! under test.
//!
//! The typed helpers panic with the method, path, status and body when the
//! homeserver answers anything but 2xx; the generic `*_json` helpers return
//! the status and body as values.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use serde_json::{json, Value};

/// Password of every account made by [`Account::register`].
pub const PASSWORD: &str = "correct horse battery staple";

/// An HTTP agent that returns every status as a value, ignores proxy
/// settings from the environment, and gives up after two minutes.
pub fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .proxy(None)
        .timeout_global(Some(Duration::from_secs(120)))
        .build()
        .into()
}

/// Everything but RFC 3986's unreserved characters is percent-encoded in a path segment.
const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// Percent-encodes one path segment (room ids, event ids, user ids, types).
pub fn encode(segment: &str) -> String {
    utf8_percent_encode(segment, SEGMENT).to_string()
}

/// `<prefix>-<unique suffix>`, lowercased: a user name no other test takes.
fn unique_name(prefix: &str) -> String {
    format!("{}-{}", prefix.to_lowercase(), unique())
}

/// A value unique within this process and, with the pid and clock, across
/// runs: for transaction ids and user names.
fn unique() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let micros = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() % 1_000_000_000)
        .unwrap_or(0);
    format!("{n}-{}-{micros}", std::process::id())
}

/// Sends one request; `body` is JSON for POST/PUT.  Returns the status and
/// the body parsed as JSON (or as a JSON string when it is not JSON, and
/// `null` when empty).  Panics only on transport errors.
fn request(
    agent: &ureq::Agent,
    method: &str,
    url: &str,
    token: Option<&str>,
    body: Option<&Value>,
) -> (u16, Value) {
    let auth = token.map(|t| format!("Bearer {t}"));
    let result = match method {
        "GET" | "DELETE" => {
            let mut req = if method == "GET" {
                agent.get(url)
            } else {
                agent.delete(url)
            };
            if let Some(auth) = &auth {
                req = req.header("Authorization", auth);
            }
            req.call()
        }
        "POST" | "PUT" => {
            let mut req = if method == "POST" {
                agent.post(url)
            } else {
                agent.put(url)
            };
            if let Some(auth) = &auth {
                req = req.header("Authorization", auth);
            }
            let text = body.unwrap_or(&json!({})).to_string();
            req.content_type("application/json").send(text)
        }
        other => panic!("unsupported method {other}"),
    };
    let mut resp = result.unwrap_or_else(|e| panic!("{method} {url} failed: {e}"));
    let status = resp.status().as_u16();
    let text = resp
        .body_mut()
        .read_to_string()
        .unwrap_or_else(|e| panic!("{method} {url}: cannot read body: {e}"));
    let value = if text.trim().is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text).unwrap_or(Value::String(text))
    };
    (status, value)
}

/// Two new users in a private room: the first (`receiver_prefix`) invited by the second
/// (`sender_prefix`), who created it, and joined. Returns both accounts and the room id.
pub fn room_of_two(
    base_url: &str,
    receiver_prefix: &str,
    sender_prefix: &str,
) -> (Account, Account, String) {
    let receiver = Account::register(base_url, receiver_prefix);
    let sender = Account::register(base_url, sender_prefix);
    let room = sender.create_room(&[&receiver.user_id]);
    receiver.join(&room);
    (receiver, sender, room)
}

/// A registered user with one device, logged in.
#[derive(Clone)]
pub struct Account {
    pub user_id: String,
    pub access_token: String,
    pub device_id: String,
    /// The refresh token, when one was asked for ([`Account::register_refreshable`],
    /// [`Account::login_refreshable`]) and the homeserver gave one.
    pub refresh_token: Option<String>,
    /// How long the access token is valid, when the homeserver says (it does for
    /// refreshable tokens).
    pub expires_in_ms: Option<u64>,
    base: String,
    agent: ureq::Agent,
}

impl std::fmt::Debug for Account {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Account")
            .field("user_id", &self.user_id)
            .field("device_id", &self.device_id)
            .field("expires_in_ms", &self.expires_in_ms)
            .field("base", &self.base)
            .finish_non_exhaustive()
    }
}

impl Account {
    /// Registers a new user named `<prefix>-<unique suffix>` (lowercased)
    /// with password [`PASSWORD`].
    pub fn register(base_url: &str, username_prefix: &str) -> Account {
        Account::register_as(base_url, &unique_name(username_prefix), PASSWORD)
    }

    /// Like [`Account::register`], asking for a refresh token (`"refresh_token": true`):
    /// the account has [`refresh_token`](Account::refresh_token) and
    /// [`expires_in_ms`](Account::expires_in_ms) when the homeserver issues refreshable
    /// tokens (Synapse: `refreshable_access_token_lifetime`, see
    /// [`SynapseOptions`](crate::synapse::SynapseOptions)).
    pub fn register_refreshable(base_url: &str, username_prefix: &str) -> Account {
        let username = unique_name(username_prefix);
        Account::register_request(base_url, &username, PASSWORD, true)
    }

    /// Registers the user `username` exactly (no suffix) with `password`.
    pub fn register_as(base_url: &str, username: &str, password: &str) -> Account {
        Account::register_request(base_url, username, password, false)
    }

    fn register_request(
        base_url: &str,
        username: &str,
        password: &str,
        refresh_token: bool,
    ) -> Account {
        let base = base_url.trim_end_matches('/').to_string();
        let agent = agent();
        let url = format!("{base}/_matrix/client/v3/register");
        let mut body = json!({
            "username": username,
            "password": password,
            "auth": {"type": "m.login.dummy"},
        });
        if refresh_token {
            body["refresh_token"] = json!(true);
        }
        let (status, resp) = request(&agent, "POST", &url, None, Some(&body));
        if status != 200 {
            panic!("registering {username} failed: {status} {resp}");
        }
        Account::from_login_response(base, agent, &resp)
    }

    /// Logs in as `user` (localpart or full user id) with `password`,
    /// creating a new device.
    pub fn login(base_url: &str, user: &str, password: &str) -> Account {
        Account::login_request(base_url, user, password, false)
    }

    /// Like [`Account::login`], asking for a refresh token (`"refresh_token": true`).
    pub fn login_refreshable(base_url: &str, user: &str, password: &str) -> Account {
        Account::login_request(base_url, user, password, true)
    }

    fn login_request(base_url: &str, user: &str, password: &str, refresh_token: bool) -> Account {
        let base = base_url.trim_end_matches('/').to_string();
        let agent = agent();
        let url = format!("{base}/_matrix/client/v3/login");
        let mut body = json!({
            "type": "m.login.password",
            "identifier": {"type": "m.id.user", "user": user},
            "password": password,
        });
        if refresh_token {
            body["refresh_token"] = json!(true);
        }
        let (status, resp) = request(&agent, "POST", &url, None, Some(&body));
        if status != 200 {
            panic!("logging in as {user} failed: {status} {resp}");
        }
        Account::from_login_response(base, agent, &resp)
    }

    /// A second, independent device of this account (new access token).
    pub fn new_device(&self) -> Account {
        Account::login(&self.base, &self.user_id, PASSWORD)
    }

    /// A second device of this account with a refresh token.
    pub fn new_refreshable_device(&self) -> Account {
        Account::login_refreshable(&self.base, &self.user_id, PASSWORD)
    }

    /// `POST /refresh` with this account's refresh token: the same device with the new
    /// tokens. Panics unless the account has a refresh token and the homeserver answers 200;
    /// [`Account::refresh_json`] returns the answer as a value instead.
    pub fn refresh(&self) -> Account {
        let (status, resp) = self.refresh_json();
        if status != 200 {
            panic!(
                "refreshing {}'s token failed: {status} {resp}",
                self.user_id
            );
        }
        let field = |name: &str| resp[name].as_str().map(str::to_string);
        Account {
            access_token: field("access_token")
                .unwrap_or_else(|| panic!("refresh response without access_token: {resp}")),
            refresh_token: field("refresh_token").or_else(|| self.refresh_token.clone()),
            expires_in_ms: resp["expires_in_ms"].as_u64(),
            ..self.clone()
        }
    }

    /// `POST /refresh` with this account's refresh token: the status and the body.
    pub fn refresh_json(&self) -> (u16, Value) {
        let token = self
            .refresh_token
            .as_deref()
            .unwrap_or_else(|| panic!("{} has no refresh token", self.user_id));
        let url = format!("{}/_matrix/client/v3/refresh", self.base);
        let body = json!({"refresh_token": token});
        request(&self.agent, "POST", &url, None, Some(&body))
    }

    fn from_login_response(base: String, agent: ureq::Agent, resp: &Value) -> Account {
        let field = |name: &str| {
            resp[name]
                .as_str()
                .unwrap_or_else(|| panic!("login response without {name}: {resp}"))
                .to_string()
        };
        Account {
            user_id: field("user_id"),
            access_token: field("access_token"),
            device_id: field("device_id"),
            refresh_token: resp["refresh_token"].as_str().map(str::to_string),
            expires_in_ms: resp["expires_in_ms"].as_u64(),
            base,
            agent,
        }
    }

    /// The homeserver base URL this account talks to.
    pub fn base_url(&self) -> &str {
        &self.base
    }

    // ----- generic requests -------------------------------------------------

    /// `GET base + path` with this account's token.
    pub fn get_json(&self, path: &str) -> (u16, Value) {
        self.send("GET", path, None)
    }

    /// `POST base + path` with a JSON body and this account's token.
    pub fn post_json(&self, path: &str, body: &Value) -> (u16, Value) {
        self.send("POST", path, Some(body))
    }

    /// `PUT base + path` with a JSON body and this account's token.
    pub fn put_json(&self, path: &str, body: &Value) -> (u16, Value) {
        self.send("PUT", path, Some(body))
    }

    fn send(&self, method: &str, path: &str, body: Option<&Value>) -> (u16, Value) {
        let url = format!("{}{}", self.base, path);
        request(&self.agent, method, &url, Some(&self.access_token), body)
    }

    /// Like [`Self::send`] but panics unless the status is 2xx.
    fn expect_ok(&self, method: &str, path: &str, body: Option<&Value>) -> Value {
        let (status, resp) = self.send(method, path, body);
        if !(200..300).contains(&status) {
            panic!(
                "{} {method} {path} failed: {status} {resp}\nrequest body: {}",
                self.user_id,
                body.map(|b| b.to_string()).unwrap_or_default()
            );
        }
        resp
    }

    fn expect_event_id(&self, method: &str, path: &str, body: &Value) -> String {
        let resp = self.expect_ok(method, path, Some(body));
        resp["event_id"]
            .as_str()
            .unwrap_or_else(|| panic!("{method} {path}: no event_id in {resp}"))
            .to_string()
    }

    // ----- rooms ------------------------------------------------------------

    /// Creates a private room (preset `private_chat`) inviting `invite`;
    /// returns its id.
    pub fn create_room(&self, invite: &[&str]) -> String {
        let body = json!({"preset": "private_chat", "invite": invite});
        let resp = self.expect_ok("POST", "/_matrix/client/v3/createRoom", Some(&body));
        resp["room_id"]
            .as_str()
            .unwrap_or_else(|| panic!("createRoom: no room_id in {resp}"))
            .to_string()
    }

    pub fn invite(&self, room: &str, user: &str) {
        let path = format!("/_matrix/client/v3/rooms/{}/invite", encode(room));
        self.expect_ok("POST", &path, Some(&json!({"user_id": user})));
    }

    pub fn join(&self, room: &str) {
        let path = format!("/_matrix/client/v3/join/{}", encode(room));
        self.expect_ok("POST", &path, Some(&json!({})));
    }

    pub fn leave(&self, room: &str) {
        let path = format!("/_matrix/client/v3/rooms/{}/leave", encode(room));
        self.expect_ok("POST", &path, Some(&json!({})));
    }

    pub fn kick(&self, room: &str, user: &str) {
        let path = format!("/_matrix/client/v3/rooms/{}/kick", encode(room));
        self.expect_ok("POST", &path, Some(&json!({"user_id": user})));
    }

    /// Sets `m.room.name`; returns the state event id.
    pub fn set_room_name(&self, room: &str, name: &str) -> String {
        self.send_state(room, "m.room.name", "", &json!({"name": name}))
    }

    /// Sends a state event; returns its id.
    pub fn send_state(
        &self,
        room: &str,
        event_type: &str,
        state_key: &str,
        content: &Value,
    ) -> String {
        let path = format!(
            "/_matrix/client/v3/rooms/{}/state/{}/{}",
            encode(room),
            encode(event_type),
            encode(state_key)
        );
        self.expect_event_id("PUT", &path, content)
    }

    /// Sends a message-like event with a fresh transaction id; returns its id.
    pub fn send_event(&self, room: &str, event_type: &str, content: &Value) -> String {
        let path = format!(
            "/_matrix/client/v3/rooms/{}/send/{}/{}",
            encode(room),
            encode(event_type),
            encode(&unique())
        );
        self.expect_event_id("PUT", &path, content)
    }

    /// Sends an `m.text` message; returns its event id.
    pub fn send_text(&self, room: &str, body: &str) -> String {
        self.send_event(
            room,
            "m.room.message",
            &json!({"msgtype": "m.text", "body": body}),
        )
    }

    /// Edits `target_event_id` (`m.replace` with `m.new_content`); returns
    /// the edit's event id.
    pub fn send_edit(&self, room: &str, target_event_id: &str, new_body: &str) -> String {
        let content = json!({
            "msgtype": "m.text",
            "body": format!("* {new_body}"),
            "m.new_content": {"msgtype": "m.text", "body": new_body},
            "m.relates_to": {"rel_type": "m.replace", "event_id": target_event_id},
        });
        self.send_event(room, "m.room.message", &content)
    }

    /// Reacts to `target` with `key` (`m.annotation`); returns the reaction's
    /// event id.
    pub fn send_reaction(&self, room: &str, target: &str, key: &str) -> String {
        let content = json!({
            "m.relates_to": {"rel_type": "m.annotation", "event_id": target, "key": key},
        });
        self.send_event(room, "m.reaction", &content)
    }

    /// Redacts `event`; returns the redaction's event id.
    pub fn redact(&self, room: &str, event: &str) -> String {
        let path = format!(
            "/_matrix/client/v3/rooms/{}/redact/{}/{}",
            encode(room),
            encode(event),
            encode(&unique())
        );
        self.expect_event_id("PUT", &path, &json!({}))
    }

    /// Starts (30 s timeout) or stops typing in `room`.
    pub fn typing(&self, room: &str, typing: bool) {
        let path = format!(
            "/_matrix/client/v3/rooms/{}/typing/{}",
            encode(room),
            encode(&self.user_id)
        );
        let body = if typing {
            json!({"typing": true, "timeout": 30000})
        } else {
            json!({"typing": false})
        };
        self.expect_ok("PUT", &path, Some(&body));
    }

    /// Sends an `m.read` receipt for `event_id`.
    pub fn receipt(&self, room: &str, event_id: &str) {
        let path = format!(
            "/_matrix/client/v3/rooms/{}/receipt/m.read/{}",
            encode(room),
            encode(event_id)
        );
        self.expect_ok("POST", &path, Some(&json!({})));
    }

    /// `GET /rooms/{room}/messages?dir=b&limit=N`: the newest events first.
    pub fn messages(&self, room: &str, limit: u32) -> Value {
        let path = format!(
            "/_matrix/client/v3/rooms/{}/messages?dir=b&limit={limit}",
            encode(room)
        );
        self.expect_ok("GET", &path, None)
    }

    // ----- to-device and account data ---------------------------------------

    /// Sends one to-device event of `event_type` to `user_id`'s `device_id`
    /// (`*` for all devices).
    pub fn send_to_device(
        &self,
        event_type: &str,
        user_id: &str,
        device_id: &str,
        content: &Value,
    ) {
        let path = format!(
            "/_matrix/client/v3/sendToDevice/{}/{}",
            encode(event_type),
            encode(&unique())
        );
        let body = json!({"messages": {user_id: {device_id: content}}});
        self.expect_ok("PUT", &path, Some(&body));
    }

    /// Sets global account data of `event_type`.
    pub fn set_account_data(&self, event_type: &str, content: &Value) {
        let path = format!(
            "/_matrix/client/v3/user/{}/account_data/{}",
            encode(&self.user_id),
            encode(event_type)
        );
        self.expect_ok("PUT", &path, Some(content));
    }

    /// Sets room account data of `event_type` in `room`.
    pub fn set_room_account_data(&self, room: &str, event_type: &str, content: &Value) {
        let path = format!(
            "/_matrix/client/v3/user/{}/rooms/{}/account_data/{}",
            encode(&self.user_id),
            encode(room),
            encode(event_type)
        );
        self.expect_ok("PUT", &path, Some(content));
    }

    /// Invalidates this account's access token.
    pub fn logout(&self) {
        self.expect_ok("POST", "/_matrix/client/v3/logout", Some(&json!({})));
    }

    /// Logs out every device of this user (`POST /logout/all`): every access and refresh
    /// token of the user is invalid afterwards.
    pub fn logout_all(&self) {
        self.expect_ok("POST", "/_matrix/client/v3/logout/all", Some(&json!({})));
    }
}
