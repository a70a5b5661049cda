//! A deterministic generator of realistic `/v3/sync` response bodies, shared by the `normalize`
//! benchmark and the `memory` example.
//!
//! The shapes follow what Synapse sends (compare `tests/fixtures/synapse-initial.json`): compact
//! JSON, 43-character event ids, `unsigned` with `age`, member events with `prev_content`,
//! edits with `m.new_content`, reactions, replies with fallbacks, thread messages, redactions
//! (top-level and `content.redacts`, as room versions 11+ send both), redacted events with
//! `redacted_because`, megolm-encrypted events, images, typing and receipts, room account data,
//! summaries and unread counts, invites, knocks and leaves, and every global section (to-device,
//! presence, account data with the default push rules, device lists, one-time-key counts).
//!
//! Same [`Spec`], same bytes, on every run and platform.
#![allow(dead_code)]

use std::fmt::Write as _;

use crate::rng::SplitMix64;

/// What to generate.
#[derive(Clone, Debug)]
pub struct Spec {
    /// Seed of the generator.
    pub seed: u64,
    /// Joined rooms.
    pub joined: usize,
    /// Rooms the user is invited to.
    pub invited: usize,
    /// Rooms the user knocked on.
    pub knocked: usize,
    /// Rooms the user left in this batch.
    pub left: usize,
    /// Timeline events per joined room: uniform in this range.
    pub timeline: (usize, usize),
    /// Member events in the state section of each joined room: uniform in this range.
    pub members: (usize, usize),
    /// Users that appear as senders and members.
    pub users: usize,
}

impl Spec {
    /// The benchmark's large input: 100 joined rooms and a little over 5,000 events, about 3 MB.
    pub fn large() -> Self {
        Spec {
            seed: 0x5eed_0001,
            joined: 100,
            invited: 8,
            knocked: 3,
            left: 5,
            timeline: (24, 36),
            members: (8, 16),
            users: 400,
        }
    }

    /// The same shapes with as many joined rooms (and invites, knocks, leaves in proportion)
    /// as it takes to reach about `bytes`.
    pub fn scaled_to(bytes: usize) -> Self {
        let base = Spec::large();
        let base_len = generate(&base).len();
        let factor = bytes as f64 / base_len as f64;
        let scale = |n: usize| ((n as f64 * factor).round() as usize).max(1);
        Spec {
            joined: scale(base.joined),
            invited: scale(base.invited),
            knocked: scale(base.knocked),
            left: scale(base.left),
            users: scale(base.users).max(base.users),
            ..base
        }
    }
}

const B64URL: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
const B64: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

const WORDS: &[&str] = &[
    "the",
    "sync",
    "deploy",
    "is",
    "done",
    "can",
    "you",
    "review",
    "my",
    "patch",
    "please",
    "tomorrow",
    "meeting",
    "moved",
    "to",
    "3pm",
    "lunch",
    "anyone",
    "build",
    "broke",
    "again",
    "fixed",
    "in",
    "main",
    "thanks",
    "great",
    "idea",
    "let's",
    "ship",
    "it",
    "server",
    "load",
    "looks",
    "fine",
    "now",
    "see",
    "ticket",
    "release",
    "notes",
    "café",
    "naïve",
    "über",
    "日本語",
    "テスト",
    "ok",
    "👍",
    "🎉",
    "lgtm",
    "backport",
    "this",
    "weekend",
    "on-call",
    "rotation",
    "latency",
    "p99",
    "dashboard",
    "https://example.org/wiki/Runbook",
];

const REACTION_KEYS: &[&str] = &["👍", "❤️", "😂", "🎉", "👀", "🚀", "+1", "✅"];

/// A JSON string literal (quotes included) for `s`.
fn q(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

struct Gen {
    rng: SplitMix64,
    out: String,
    users: Vec<String>,
    ts: u64,
    me: String,
}

struct Room {
    id: String,
    members: Vec<usize>,
    /// Recent message event ids, targets of reactions, edits, replies and redactions.
    recent: Vec<String>,
    encrypted: bool,
}

/// Generates the body for `spec`.
pub fn generate(spec: &Spec) -> Vec<u8> {
    let mut g = Gen::new(spec);
    g.response(spec);
    // Exactly the body's bytes, as a client holds them after reading the response.
    g.out.shrink_to_fit();
    g.out.into_bytes()
}

impl Gen {
    fn new(spec: &Spec) -> Self {
        let mut rng = SplitMix64::new(spec.seed);
        let servers = ["example.org", "matrix.org", "chat.example.com", "tchncs.de"];
        let users = (0..spec.users.max(4))
            .map(|i| {
                let server = if rng.percent(70) {
                    servers[0]
                } else {
                    *rng.pick(&servers[1..])
                };
                format!(
                    "@{}{}:{}",
                    rng.pick(&[
                        "alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi", "ivan",
                        "judy"
                    ]),
                    i,
                    server
                )
            })
            .collect::<Vec<_>>();
        Gen {
            me: users[0].clone(),
            rng,
            out: String::new(),
            users,
            ts: 1_795_610_000_000,
        }
    }

    fn token(&mut self, alphabet: &[u8], len: usize) -> String {
        (0..len)
            .map(|_| alphabet[self.rng.below(alphabet.len())] as char)
            .collect()
    }

    fn event_id(&mut self) -> String {
        format!("${}", self.token(B64URL, 43))
    }

    fn room_id(&mut self) -> String {
        if self.rng.percent(50) {
            // Room version 12: no server name.
            format!("!{}", self.token(B64URL, 43))
        } else {
            format!(
                "!{}:example.org",
                self.token(B64, 18).replace(['+', '/'], "x")
            )
        }
    }

    fn tick(&mut self) -> u64 {
        self.ts += 1 + self.rng.below(40_000) as u64;
        self.ts
    }

    fn user(&mut self, room: &Room) -> String {
        let i = *self.rng.pick(&room.members);
        self.users[i].clone()
    }

    fn sentence(&mut self, words: usize) -> String {
        let mut s = String::new();
        for i in 0..words {
            if i > 0 {
                s.push(' ');
            }
            let word = WORDS[self.rng.below(WORDS.len())];
            s.push_str(word);
        }
        s
    }

    fn body(&mut self) -> String {
        let n = 2 + self.rng.below(18);
        let mut s = self.sentence(n);
        match self.rng.below(10) {
            0 => s.push_str("\nsecond line \"quoted\" and a \\ backslash"),
            1 => s = format!("{s}\n\n```\ncargo test --release\n```"),
            _ => {}
        }
        s
    }

    // ---- JSON pieces -----------------------------------------------------------------------

    fn key(&mut self, k: &str) {
        q(&mut self.out, k);
        self.out.push(':');
    }

    fn str_field(&mut self, k: &str, v: &str) {
        self.key(k);
        q(&mut self.out, v);
        self.out.push(',');
    }

    fn raw_field(&mut self, k: &str, v: &str) {
        self.key(k);
        self.out.push_str(v);
        self.out.push(',');
    }

    /// Replaces a trailing comma by `close`.
    fn close(&mut self, close: char) {
        if self.out.ends_with(',') {
            self.out.pop();
        }
        self.out.push(close);
    }

    /// Writes a room event: `content` is the raw JSON of the content object.
    #[allow(clippy::too_many_arguments)]
    fn room_event(
        &mut self,
        event_type: &str,
        sender: &str,
        state_key: Option<&str>,
        content: &str,
        event_id: &str,
        unsigned_extra: &str,
        top_level_redacts: Option<&str>,
    ) {
        let ts = self.tick();
        let age = self.rng.below(5_000_000);
        self.out.push('{');
        self.raw_field("content", content);
        self.str_field("event_id", event_id);
        self.raw_field("origin_server_ts", &ts.to_string());
        if let Some(target) = top_level_redacts {
            self.str_field("redacts", target);
        }
        self.str_field("sender", sender);
        if let Some(key) = state_key {
            self.str_field("state_key", key);
        }
        self.str_field("type", event_type);
        let mut unsigned = format!("{{\"age\":{age},\"membership\":\"join\"");
        if !unsigned_extra.is_empty() {
            unsigned.push(',');
            unsigned.push_str(unsigned_extra);
        }
        if sender == self.me && self.rng.percent(50) {
            let txn = self.token(B64URL, 12);
            let _ = write!(unsigned, ",\"transaction_id\":\"m{txn}\"");
        }
        unsigned.push('}');
        self.raw_field("unsigned", &unsigned);
        self.close('}');
        self.out.push(',');
    }

    /// A stripped state event (invites and knocks).
    fn stripped(&mut self, event_type: &str, sender: &str, state_key: &str, content: &str) {
        self.out.push('{');
        self.raw_field("content", content);
        self.str_field("sender", sender);
        self.str_field("state_key", state_key);
        self.str_field("type", event_type);
        self.close('}');
        self.out.push(',');
    }

    fn json(s: &str) -> String {
        let mut out = String::new();
        q(&mut out, s);
        out
    }

    fn member_content(&mut self, user: &str, membership: &str) -> String {
        let name = user
            .trim_start_matches('@')
            .split(':')
            .next()
            .unwrap_or("user");
        let mut c = format!(
            "{{\"displayname\":{},\"membership\":\"{membership}\"",
            Self::json(name)
        );
        if self.rng.percent(40) {
            let avatar = self.token(B64URL, 24);
            let _ = write!(c, ",\"avatar_url\":\"mxc://example.org/{avatar}\"");
        }
        c.push('}');
        c
    }

    // ---- the response ----------------------------------------------------------------------

    fn response(&mut self, spec: &Spec) {
        let next = self.rng.below(100_000);
        self.out.push('{');
        self.str_field(
            "next_batch",
            &format!("s{next}_7_0_135_14_1_2_17_0_1_1_1_1_1"),
        );
        self.account_data();
        self.presence();
        self.write_to_device();
        self.device_lists();
        self.raw_field("device_one_time_keys_count", "{\"signed_curve25519\":50}");
        self.raw_field(
            "device_unused_fallback_key_types",
            "[\"signed_curve25519\"]",
        );
        self.key("rooms");
        self.out.push('{');
        self.key("join");
        self.out.push('{');
        for _ in 0..spec.joined {
            self.joined_room(spec);
        }
        self.close('}');
        self.out.push(',');
        self.key("invite");
        self.out.push('{');
        for _ in 0..spec.invited {
            self.invited_room("invite_state", "invite");
        }
        self.close('}');
        self.out.push(',');
        self.key("knock");
        self.out.push('{');
        for _ in 0..spec.knocked {
            self.invited_room("knock_state", "knock");
        }
        self.close('}');
        self.out.push(',');
        self.key("leave");
        self.out.push('{');
        for _ in 0..spec.left {
            self.left_room();
        }
        self.close('}');
        self.close('}');
        self.close('}');
    }

    fn account_data(&mut self) {
        let me = self.me.clone();
        let mut direct = String::from("{");
        for _ in 0..6 {
            let user = self.users[1 + self.rng.below(self.users.len() - 1)].clone();
            let room = self.room_id();
            let _ = write!(direct, "{}:[{}],", Self::json(&user), Self::json(&room));
        }
        direct.pop();
        direct.push('}');
        let name = me
            .trim_start_matches('@')
            .split(':')
            .next()
            .unwrap_or("me")
            .to_owned();
        let push_rules = push_rules(&me, &name);
        let ignored = format!(
            "{{\"ignored_users\":{{{}:{{}}}}}}",
            Self::json(&self.users[self.users.len() - 1])
        );
        self.key("account_data");
        self.out.push_str("{\"events\":[");
        for (t, c) in [
            ("m.push_rules", push_rules.as_str()),
            ("m.direct", direct.as_str()),
            ("m.ignored_user_list", ignored.as_str()),
            (
                "im.vector.setting.breadcrumbs",
                "{\"recent_rooms\":[\"!a:example.org\",\"!b:example.org\"]}",
            ),
            (
                "org.example.settings",
                "{\"theme\":\"dark\",\"compact\":true}",
            ),
        ] {
            let _ = write!(self.out, "{{\"type\":\"{t}\",\"content\":{c}}},");
        }
        self.close(']');
        self.out.push_str("},");
    }

    fn presence(&mut self) {
        self.key("presence");
        self.out.push_str("{\"events\":[");
        for i in 0..20.min(self.users.len()) {
            let user = self.users[i].clone();
            let state = *self.rng.pick(&["online", "unavailable", "offline"]);
            let ago = self.rng.below(3_600_000);
            let active = state == "online";
            let mut content =
                format!("{{\"presence\":\"{state}\",\"last_active_ago\":{ago},\"currently_active\":{active}");
            if self.rng.percent(30) {
                let msg = self.sentence(3);
                let _ = write!(content, ",\"status_msg\":{}", Self::json(&msg));
            }
            if self.rng.percent(50) {
                let avatar = self.token(B64URL, 24);
                let _ = write!(content, ",\"avatar_url\":\"mxc://example.org/{avatar}\"");
            }
            content.push('}');
            let _ = write!(
                self.out,
                "{{\"type\":\"m.presence\",\"sender\":{},\"content\":{content}}},",
                Self::json(&user)
            );
        }
        self.close(']');
        self.out.push_str("},");
    }

    fn write_to_device(&mut self) {
        self.key("to_device");
        self.out.push_str("{\"events\":[");
        for i in 0..15 {
            let sender = self.users[1 + i % (self.users.len() - 1)].clone();
            let device = self.token(B64, 10).to_uppercase().replace(['+', '/'], "X");
            match i % 3 {
                0 => {
                    let len = 600 + self.rng.below(1200);
                    let ciphertext = self.token(B64, len);
                    let key = self.token(B64, 43);
                    let my_key = self.token(B64, 43);
                    let _ = write!(
                        self.out,
                        "{{\"type\":\"m.room.encrypted\",\"sender\":{},\"content\":{{\"algorithm\":\"m.olm.v1.curve25519-aes-sha2\",\"sender_key\":\"{key}\",\"ciphertext\":{{\"{my_key}\":{{\"type\":0,\"body\":\"{ciphertext}\"}}}}}}}},",
                        Self::json(&sender)
                    );
                }
                1 => {
                    let session = self.token(B64, 43);
                    let room = self.room_id();
                    let id = self.token(B64URL, 12);
                    let _ = write!(
                        self.out,
                        "{{\"type\":\"m.room_key_request\",\"sender\":{},\"content\":{{\"action\":\"request\",\"body\":{{\"algorithm\":\"m.megolm.v1.aes-sha2\",\"room_id\":{},\"session_id\":\"{session}\"}},\"request_id\":\"{id}\",\"requesting_device_id\":\"{device}\"}}}},",
                        Self::json(&sender),
                        Self::json(&room)
                    );
                }
                _ => {
                    let id = self.token(B64URL, 16);
                    let _ = write!(
                        self.out,
                        "{{\"type\":\"m.secret.request\",\"sender\":{},\"content\":{{\"action\":\"request\",\"name\":\"m.megolm_backup.v1\",\"request_id\":\"{id}\",\"requesting_device_id\":\"{device}\"}}}},",
                        Self::json(&sender)
                    );
                }
            }
        }
        self.close(']');
        self.out.push_str("},");
    }

    fn device_lists(&mut self) {
        let mut changed = String::from("[");
        for _ in 0..12 {
            let u = self.users[self.rng.below(self.users.len())].clone();
            let _ = write!(changed, "{},", Self::json(&u));
        }
        changed.pop();
        changed.push(']');
        let left = Self::json(&self.users[self.users.len() - 2]);
        self.raw_field(
            "device_lists",
            &format!("{{\"changed\":{changed},\"left\":[{left}]}}"),
        );
    }

    fn new_room(&mut self, spec: &Spec) -> Room {
        let id = self.room_id();
        let n = self.rng.between(spec.members).min(self.users.len() - 1);
        let mut members = vec![0];
        while members.len() < n + 1 {
            let u = 1 + self.rng.below(self.users.len() - 1);
            if !members.contains(&u) {
                members.push(u);
            }
        }
        let encrypted = self.rng.percent(50);
        Room {
            id,
            members,
            recent: Vec::new(),
            encrypted,
        }
    }

    fn joined_room(&mut self, spec: &Spec) {
        let mut room = self.new_room(spec);
        self.key(&room.id.clone());
        self.out.push('{');

        // State.
        self.key("state");
        self.out.push_str("{\"events\":[");
        self.room_state(&room);
        self.close(']');
        self.out.push_str("},");

        // Timeline.
        self.key("timeline");
        self.out.push_str("{\"events\":[");
        let n = self.rng.between(spec.timeline);
        for _ in 0..n {
            self.timeline_event(&mut room);
        }
        self.close(']');
        let prev = self.rng.below(100_000);
        let _ = write!(
            self.out,
            ",\"prev_batch\":\"t{prev}-{prev}_7_0_135_14_1_2_17_0_1_1_1_1_1\",\"limited\":true}},"
        );

        // Ephemeral: typing and receipts.
        self.key("ephemeral");
        self.out.push_str("{\"events\":[");
        let typing: Vec<String> = (0..self.rng.below(3)).map(|_| self.user(&room)).collect();
        let typing = typing
            .iter()
            .map(|u| Self::json(u))
            .collect::<Vec<_>>()
            .join(",");
        let _ = write!(
            self.out,
            "{{\"type\":\"m.typing\",\"content\":{{\"user_ids\":[{typing}]}}}},"
        );
        let mut receipts = String::from("{");
        let targets: Vec<String> = room.recent.iter().rev().take(3).cloned().collect();
        for target in &targets {
            let reader = self.user(&room);
            let ts = self.tick();
            let kind = if self.rng.percent(20) {
                "m.read.private"
            } else {
                "m.read"
            };
            let thread = if self.rng.percent(30) {
                ",\"thread_id\":\"main\""
            } else {
                ""
            };
            let _ = write!(
                receipts,
                "{}:{{\"{kind}\":{{{}:{{\"ts\":{ts}{thread}}}}}}},",
                Self::json(target),
                Self::json(&reader)
            );
        }
        if receipts.ends_with(',') {
            receipts.pop();
        }
        receipts.push('}');
        let _ = write!(
            self.out,
            "{{\"type\":\"m.receipt\",\"content\":{receipts}}},"
        );
        self.close(']');
        self.out.push_str("},");

        // Room account data.
        self.key("account_data");
        self.out.push_str("{\"events\":[");
        if let Some(last) = room.recent.last().cloned() {
            let _ = write!(
                self.out,
                "{{\"type\":\"m.fully_read\",\"content\":{{\"event_id\":{}}}}},",
                Self::json(&last)
            );
        }
        if self.rng.percent(30) {
            let tag = *self.rng.pick(&["m.favourite", "m.lowpriority", "u.work"]);
            let _ = write!(
                self.out,
                "{{\"type\":\"m.tag\",\"content\":{{\"tags\":{{\"{tag}\":{{\"order\":0.5}}}}}}}},"
            );
        }
        self.close(']');
        self.out.push_str("},");

        // Counts and summary (not events).
        let heroes = room
            .members
            .iter()
            .skip(1)
            .take(3)
            .map(|&u| Self::json(&self.users[u]))
            .collect::<Vec<_>>()
            .join(",");
        let notif = self.rng.below(50);
        let hl = self.rng.below(3);
        let _ = write!(
            self.out,
            "\"unread_notifications\":{{\"notification_count\":{notif},\"highlight_count\":{hl}}},\"summary\":{{\"m.heroes\":[{heroes}],\"m.joined_member_count\":{},\"m.invited_member_count\":0}}",
            room.members.len()
        );
        self.out.push_str("},");
    }

    fn room_state(&mut self, room: &Room) {
        let creator = self.users[room.members[1.min(room.members.len() - 1)]].clone();
        let ev = self.event_id();
        self.room_event(
            "m.room.create",
            &creator,
            Some(""),
            "{\"room_version\":\"11\"}",
            &ev,
            "",
            None,
        );
        let mut users = format!("{}:100", Self::json(&creator));
        for &m in room.members.iter().take(4) {
            if self.users[m] != creator {
                let _ = write!(users, ",{}:50", Self::json(&self.users[m]));
            }
        }
        let pl = format!(
            "{{\"ban\":50,\"events\":{{\"m.room.avatar\":50,\"m.room.canonical_alias\":50,\"m.room.encryption\":100,\"m.room.history_visibility\":100,\"m.room.name\":50,\"m.room.power_levels\":100,\"m.room.server_acl\":100,\"m.room.tombstone\":100}},\"events_default\":0,\"historical\":100,\"invite\":0,\"kick\":50,\"redact\":50,\"state_default\":50,\"users\":{{{users}}},\"users_default\":0}}"
        );
        let ev = self.event_id();
        self.room_event(
            "m.room.power_levels",
            &creator,
            Some(""),
            &pl,
            &ev,
            "",
            None,
        );
        for (t, c) in [
            ("m.room.join_rules", "{\"join_rule\":\"invite\"}"),
            (
                "m.room.history_visibility",
                "{\"history_visibility\":\"shared\"}",
            ),
            ("m.room.guest_access", "{\"guest_access\":\"can_join\"}"),
        ] {
            let ev = self.event_id();
            self.room_event(t, &creator, Some(""), c, &ev, "", None);
        }
        let name = self.sentence(3);
        let ev = self.event_id();
        let content = format!("{{\"name\":{}}}", Self::json(&name));
        self.room_event("m.room.name", &creator, Some(""), &content, &ev, "", None);
        let topic = self.sentence(10);
        let ev = self.event_id();
        let content = format!("{{\"topic\":{}}}", Self::json(&topic));
        self.room_event("m.room.topic", &creator, Some(""), &content, &ev, "", None);
        if room.encrypted {
            let ev = self.event_id();
            self.room_event(
                "m.room.encryption",
                &creator,
                Some(""),
                "{\"algorithm\":\"m.megolm.v1.aes-sha2\",\"rotation_period_ms\":604800000,\"rotation_period_msgs\":100}",
                &ev,
                "",
                None,
            );
        }
        for &m in &room.members {
            let user = self.users[m].clone();
            let content = self.member_content(&user, "join");
            let ev = self.event_id();
            self.room_event("m.room.member", &user, Some(&user), &content, &ev, "", None);
        }
    }

    fn timeline_event(&mut self, room: &mut Room) {
        let sender = self.user(room);
        let id = self.event_id();
        let roll = self.rng.below(100);
        let target = if room.recent.is_empty() {
            None
        } else {
            Some(
                room.recent[room.recent.len() - 1 - self.rng.below(room.recent.len().min(8))]
                    .clone(),
            )
        };
        match (roll, target) {
            (0..=11, _) if room.encrypted || roll < 4 => {
                let len = 200 + self.rng.below(900);
                let ciphertext = self.token(B64, len);
                let sender_key = self.token(B64, 43);
                let session = self.token(B64, 43);
                let device = self.token(B64, 10).to_uppercase().replace(['+', '/'], "X");
                let content = format!(
                    "{{\"algorithm\":\"m.megolm.v1.aes-sha2\",\"ciphertext\":\"{ciphertext}\",\"device_id\":\"{device}\",\"sender_key\":\"{sender_key}\",\"session_id\":\"{session}\"}}"
                );
                self.room_event("m.room.encrypted", &sender, None, &content, &id, "", None);
                room.recent.push(id);
            }
            (12..=19, Some(target)) => {
                // Reply with its fallback.
                let quoted = self.sentence(5);
                let reply = self.body();
                let target_sender = self.user(room);
                let body = format!("> <{target_sender}> {quoted}\n\n{reply}");
                let content = format!(
                    "{{\"body\":{},\"format\":\"org.matrix.custom.html\",\"formatted_body\":{},\"m.relates_to\":{{\"m.in_reply_to\":{{\"event_id\":{}}}}},\"msgtype\":\"m.text\"}}",
                    Self::json(&body),
                    Self::json(&format!("<mx-reply><blockquote><a href=\"https://matrix.to/#/{}\">In reply to</a> {quoted}</blockquote></mx-reply>{reply}", room.id)),
                    Self::json(&target)
                );
                self.room_event("m.room.message", &sender, None, &content, &id, "", None);
                room.recent.push(id);
            }
            (20..=25, Some(target)) => {
                // Edit.
                let new = self.body();
                let content = format!(
                    "{{\"body\":{},\"m.new_content\":{{\"body\":{},\"msgtype\":\"m.text\"}},\"m.relates_to\":{{\"event_id\":{},\"rel_type\":\"m.replace\"}},\"msgtype\":\"m.text\"}}",
                    Self::json(&format!("* {new}")),
                    Self::json(&new),
                    Self::json(&target)
                );
                self.room_event("m.room.message", &sender, None, &content, &id, "", None);
            }
            (26..=35, Some(target)) => {
                let key = *self.rng.pick(REACTION_KEYS);
                let content = format!(
                    "{{\"m.relates_to\":{{\"event_id\":{},\"key\":{},\"rel_type\":\"m.annotation\"}}}}",
                    Self::json(&target),
                    Self::json(key)
                );
                self.room_event("m.reaction", &sender, None, &content, &id, "", None);
            }
            (36..=38, Some(target)) => {
                let content = format!(
                    "{{\"reason\":\"spam\",\"redacts\":{}}}",
                    Self::json(&target)
                );
                self.room_event(
                    "m.room.redaction",
                    &sender,
                    None,
                    &content,
                    &id,
                    "",
                    Some(&target),
                );
            }
            (39, _) => {
                // An event redacted after the fact.
                let by = self.event_id();
                let ts = self.ts + 1000;
                let because = format!(
                    "\"redacted_by\":{},\"redacted_because\":{{\"content\":{{\"redacts\":{}}},\"event_id\":{},\"origin_server_ts\":{ts},\"redacts\":{},\"sender\":{},\"type\":\"m.room.redaction\",\"unsigned\":{{\"age\":10}}}}",
                    Self::json(&by),
                    Self::json(&id),
                    Self::json(&by),
                    Self::json(&id),
                    Self::json(&sender)
                );
                self.room_event("m.room.message", &sender, None, "{}", &id, &because, None);
            }
            (40..=43, _) => {
                let media = self.token(B64URL, 24);
                let w = 100 + self.rng.below(3000);
                let h = 100 + self.rng.below(3000);
                let size = 10_000 + self.rng.below(5_000_000);
                let content = format!(
                    "{{\"body\":\"IMG_{w}{h}.jpg\",\"info\":{{\"h\":{h},\"mimetype\":\"image/jpeg\",\"size\":{size},\"w\":{w},\"thumbnail_info\":{{\"h\":300,\"mimetype\":\"image/jpeg\",\"size\":24000,\"w\":400}},\"thumbnail_url\":\"mxc://example.org/t{media}\",\"xyz.amorgan.blurhash\":\"LKO2?U%2Tw=w]~RBVZRi}};RPxuwH\"}},\"msgtype\":\"m.image\",\"url\":\"mxc://example.org/{media}\"}}"
                );
                self.room_event("m.room.message", &sender, None, &content, &id, "", None);
                room.recent.push(id);
            }
            (44..=47, _) => {
                // Membership change of some user, with prev_content.
                let u = 1 + self.rng.below(self.users.len() - 1);
                let user = self.users[u].clone();
                let membership = *self.rng.pick(&["join", "leave", "join", "invite"]);
                let content = self.member_content(&user, membership);
                let prev = self.member_content(&user, "join");
                let replaces = self.event_id();
                let extra = format!(
                    "\"prev_content\":{prev},\"prev_sender\":{},\"replaces_state\":{}",
                    Self::json(&user),
                    Self::json(&replaces)
                );
                let actor = if membership == "invite" {
                    sender.clone()
                } else {
                    user.clone()
                };
                self.room_event(
                    "m.room.member",
                    &actor,
                    Some(&user),
                    &content,
                    &id,
                    &extra,
                    None,
                );
                if !room.members.contains(&u) {
                    room.members.push(u);
                }
            }
            (48..=49, _) => {
                let topic = self.sentence(8);
                let content = format!("{{\"topic\":{}}}", Self::json(&topic));
                let old = self.sentence(6);
                let replaces = self.event_id();
                let extra = format!(
                    "\"prev_content\":{{\"topic\":{}}},\"prev_sender\":{},\"replaces_state\":{}",
                    Self::json(&old),
                    Self::json(&sender),
                    Self::json(&replaces)
                );
                self.room_event(
                    "m.room.topic",
                    &sender,
                    Some(""),
                    &content,
                    &id,
                    &extra,
                    None,
                );
            }
            (50..=52, Some(target)) => {
                // Thread message.
                let body = self.body();
                let content = format!(
                    "{{\"body\":{},\"m.relates_to\":{{\"event_id\":{},\"is_falling_back\":true,\"m.in_reply_to\":{{\"event_id\":{}}},\"rel_type\":\"m.thread\"}},\"msgtype\":\"m.text\"}}",
                    Self::json(&body),
                    Self::json(&target),
                    Self::json(&target)
                );
                self.room_event("m.room.message", &sender, None, &content, &id, "", None);
            }
            (53..=55, _) => {
                let body = self.body();
                let msgtype = *self.rng.pick(&["m.notice", "m.emote"]);
                let content = format!(
                    "{{\"body\":{},\"msgtype\":\"{msgtype}\"}}",
                    Self::json(&body)
                );
                self.room_event("m.room.message", &sender, None, &content, &id, "", None);
                room.recent.push(id);
            }
            (56, _) => {
                let media = self.token(B64URL, 24);
                let content = format!(
                    "{{\"body\":\"sticker\",\"info\":{{\"h\":256,\"mimetype\":\"image/png\",\"size\":48000,\"w\":256}},\"url\":\"mxc://example.org/{media}\"}}"
                );
                self.room_event("m.sticker", &sender, None, &content, &id, "", None);
            }
            _ => {
                // Plain message; some with HTML.
                let body = self.body();
                let content = if self.rng.percent(25) {
                    format!(
                        "{{\"body\":{},\"format\":\"org.matrix.custom.html\",\"formatted_body\":{},\"msgtype\":\"m.text\"}}",
                        Self::json(&body),
                        Self::json(&format!("<p>{}</p>", body.replace('\n', "<br/>")))
                    )
                } else {
                    format!("{{\"body\":{},\"msgtype\":\"m.text\"}}", Self::json(&body))
                };
                self.room_event("m.room.message", &sender, None, &content, &id, "", None);
                room.recent.push(id);
            }
        }
    }

    fn invited_room(&mut self, section: &str, membership: &str) {
        let id = self.room_id();
        let inviter = self.users[1 + self.rng.below(self.users.len() - 1)].clone();
        let me = self.me.clone();
        self.key(&id);
        self.out.push('{');
        self.key(section);
        self.out.push_str("{\"events\":[");
        self.stripped("m.room.create", &inviter, "", "{\"room_version\":\"11\"}");
        let rule = if membership == "knock" {
            "knock"
        } else {
            "invite"
        };
        self.stripped(
            "m.room.join_rules",
            &inviter,
            "",
            &format!("{{\"join_rule\":\"{rule}\"}}"),
        );
        let name = self.sentence(3);
        self.stripped(
            "m.room.name",
            &inviter,
            "",
            &format!("{{\"name\":{}}}", Self::json(&name)),
        );
        let content = self.member_content(&inviter, "join");
        self.stripped("m.room.member", &inviter, &inviter, &content);
        let sender = if membership == "knock" { &me } else { &inviter };
        let content = self.member_content(&me, membership);
        self.stripped("m.room.member", sender, &me, &content);
        self.close(']');
        self.out.push_str("}},");
    }

    fn left_room(&mut self) {
        let spec_members = (3, 6);
        let mut room = self.new_room(&Spec {
            members: spec_members,
            ..Spec::large()
        });
        let me = self.me.clone();
        self.key(&room.id.clone());
        self.out.push('{');
        self.key("state");
        self.out.push_str("{\"events\":[");
        let name = self.sentence(2);
        let ev = self.event_id();
        let creator = self.user(&room);
        let content = format!("{{\"name\":{}}}", Self::json(&name));
        self.room_event("m.room.name", &creator, Some(""), &content, &ev, "", None);
        self.close(']');
        self.out.push_str("},");
        self.key("timeline");
        self.out.push_str("{\"events\":[");
        for _ in 0..3 {
            self.timeline_event(&mut room);
        }
        let content = "{\"membership\":\"leave\",\"reason\":\"bye\"}".to_owned();
        let prev = self.member_content(&me, "join");
        let replaces = self.event_id();
        let extra = format!(
            "\"prev_content\":{prev},\"prev_sender\":{},\"replaces_state\":{}",
            Self::json(&me),
            Self::json(&replaces)
        );
        let id = self.event_id();
        self.room_event("m.room.member", &me, Some(&me), &content, &id, &extra, None);
        self.close(']');
        let prev = self.rng.below(100_000);
        let _ = write!(
            self.out,
            ",\"prev_batch\":\"s{prev}_7_0_135_14_1_2_17_0_1_1_1_1_1\",\"limited\":false}},"
        );
        self.out.push_str("\"account_data\":{\"events\":[]}},");
    }
}

/// The default push rules of a user, as Synapse sends them in `m.push_rules` (abridged to the
/// rules every server has).
fn push_rules(me: &str, name: &str) -> String {
    let rule = |id: &str, conditions: &str, actions: &str| {
        format!(
            "{{\"conditions\":[{conditions}],\"actions\":[{actions}],\"rule_id\":\"{id}\",\"default\":true,\"enabled\":true}}"
        )
    };
    let notify = "\"notify\",{\"set_tweak\":\"highlight\",\"value\":false}";
    let sound = "\"notify\",{\"set_tweak\":\"sound\",\"value\":\"default\"},{\"set_tweak\":\"highlight\",\"value\":false}";
    let em = |k: &str, p: &str| {
        format!("{{\"kind\":\"event_match\",\"key\":\"{k}\",\"pattern\":\"{p}\"}}")
    };
    let override_rules = [
        "{\"conditions\":[],\"actions\":[],\"rule_id\":\".m.rule.master\",\"default\":true,\"enabled\":false}".to_owned(),
        rule(".m.rule.suppress_notices", &em("content.msgtype", "m.notice"), ""),
        rule(
            ".m.rule.invite_for_me",
            &format!("{},{},{}", em("type", "m.room.member"), em("content.membership", "invite"), em("state_key", me)),
            sound,
        ),
        rule(".m.rule.member_event", &em("type", "m.room.member"), ""),
        rule(
            ".m.rule.is_user_mention",
            &format!("{{\"kind\":\"event_property_contains\",\"key\":\"content.m\\\\.mentions.user_ids\",\"value\":\"{me}\"}}"),
            "\"notify\",{\"set_tweak\":\"highlight\"},{\"set_tweak\":\"sound\",\"value\":\"default\"}",
        ),
        rule(".m.rule.contains_display_name", "{\"kind\":\"contains_display_name\"}", "\"notify\",{\"set_tweak\":\"highlight\"},{\"set_tweak\":\"sound\",\"value\":\"default\"}"),
        rule(".m.rule.tombstone", &format!("{},{}", em("type", "m.room.tombstone"), em("state_key", "")), "\"notify\",{\"set_tweak\":\"highlight\"}"),
        rule(".m.rule.roomnotif", &format!("{},{{\"kind\":\"sender_notification_permission\",\"key\":\"room\"}}", em("content.body", "@room")), "\"notify\",{\"set_tweak\":\"highlight\"}"),
        rule(".m.rule.reaction", &em("type", "m.reaction"), ""),
        rule(".m.rule.room.server_acl", &format!("{},{}", em("type", "m.room.server_acl"), em("state_key", "")), ""),
    ];
    let underride_rules = [
        rule(".m.rule.call", &em("type", "m.call.invite"), "\"notify\",{\"set_tweak\":\"sound\",\"value\":\"ring\"},{\"set_tweak\":\"highlight\",\"value\":false}"),
        rule(".m.rule.room_one_to_one", &format!("{},{{\"kind\":\"room_member_count\",\"is\":\"2\"}}", em("type", "m.room.message")), sound),
        rule(".m.rule.encrypted_room_one_to_one", &format!("{},{{\"kind\":\"room_member_count\",\"is\":\"2\"}}", em("type", "m.room.encrypted")), sound),
        rule(".m.rule.message", &em("type", "m.room.message"), notify),
        rule(".m.rule.encrypted", &em("type", "m.room.encrypted"), notify),
    ];
    let content_rules = format!(
        "{{\"actions\":[\"notify\",{{\"set_tweak\":\"highlight\"}},{{\"set_tweak\":\"sound\",\"value\":\"default\"}}],\"rule_id\":\".m.rule.contains_user_name\",\"default\":true,\"pattern\":\"{name}\",\"enabled\":true}}"
    );
    format!(
        "{{\"global\":{{\"underride\":[{}],\"sender\":[],\"room\":[],\"content\":[{content_rules}],\"override\":[{}]}}}}",
        underride_rules.join(","),
        override_rules.join(",")
    )
}
