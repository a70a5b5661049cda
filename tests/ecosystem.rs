//! Where users run it, against a real homeserver (Synapse and palpo): the proxy of the
//! environment (and `NO_PROXY`), the application's own agent, and typed views of real events.

mod support;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use matrix_sync_service::ruma_common::OwnedUserId;
use matrix_sync_service::ruma_events::reaction::ReactionEventContent;
use matrix_sync_service::{start_with, DriverConfig, EventKind, Failure, ServiceError};
use matrix_sync_testkit::homeserver::Server;
use support::client::Account;
use support::connect_proxy::ConnectProxy;
use support::palpo_stream::Stream;
use support::service::{collect_until, config_for, drain_until_live, tail_binary};

/// Runs `tail` with `env`, sends a message with `send` and returns whether `tail` printed it.
///
/// On palpo, up to three messages, each once the previous one has not come within 10 s: what
/// this checks is the way `tail` goes, and palpo 0.0.2 can skip a message for a client whose
/// `/sync` runs while the message is being written (it hands out a `next_batch` past it; see
/// `support::palpo_stream`), which `tail`'s one-second long-polls make likely. Whether the
/// library hands on every message palpo's stream has is checked on the wire by the palpo
/// variants of `many_accounts` and `reactor_fairness`.
fn tail_prints(
    server: Server,
    account: &Account,
    env: &[(&str, &str)],
    mut send: impl FnMut() -> String,
) -> bool {
    let mut child = Command::new(tail_binary())
        .args(["--homeserver", account.base_url(), "--timeout-ms", "1000"])
        .env("MATRIX_ACCESS_TOKEN", &account.access_token)
        .env_remove("ALL_PROXY")
        .env_remove("HTTPS_PROXY")
        .env_remove("HTTP_PROXY")
        .env_remove("NO_PROXY")
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let live = lines.find(|l| l.as_ref().is_ok_and(|l| l.contains("\"checkpoint\"")));
    assert!(live.is_some(), "tail printed its first batch");
    let (tx, rx) = crossbeam_channel::unbounded();
    std::thread::spawn(move || {
        for line in lines.map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let attempts = match server {
        Server::Palpo => 3,
        _ => 1,
    };
    let printed = (0..attempts).any(|attempt| {
        let needle = format!("\"{}\"", send());
        let deadline = Instant::now() + Duration::from_secs(10);
        let printed = std::iter::from_fn(|| rx.recv_deadline(deadline).ok())
            .any(|line| line.contains(&needle));
        if !printed && attempt + 1 < attempts {
            eprintln!("palpo: message {attempt} not printed within 10 s; another");
        }
        printed
    });
    let _ = child.kill();
    let _ = child.wait();
    printed
}

fn tail_goes_through_the_proxy_of_its_environment_and_around_it_for_no_proxy(server: Server) {
    let homeserver = server.shared();
    let alice = Account::register(&homeserver.base_url(), "alice");
    let bob = Account::register(&homeserver.base_url(), "bob");
    let room = bob.create_room(&[&alice.user_id]);
    alice.join(&room);
    let target = format!("127.0.0.1:{}", homeserver.port());
    for var in ["HTTPS_PROXY", "HTTP_PROXY", "ALL_PROXY"] {
        let proxy = ConnectProxy::start();
        let url = proxy.url();
        assert!(
            tail_prints(server, &alice, &[(var, &url)], || bob.send_text(&room, var)),
            "{var}: the message came through"
        );
        assert!(
            proxy.tunnels_to(&target) >= 1,
            "{var}: {:?}",
            proxy.tunnels()
        );
    }
    let proxy = ConnectProxy::start();
    let url = proxy.url();
    let env = [("HTTPS_PROXY", url.as_str()), ("NO_PROXY", "127.0.0.1")];
    assert!(tail_prints(server, &alice, &env, || bob.send_text(&room, "direct")));
    assert_eq!(proxy.tunnels(), Default::default(), "NO_PROXY: no tunnel");
}

fn the_applications_own_agent_is_used_and_keeps_statuses_as_values(server: Server) {
    let homeserver = server.shared();
    let alice = Account::register(&homeserver.base_url(), "alice");
    let bob = Account::register(&homeserver.base_url(), "bob");
    let room = bob.create_room(&[&alice.user_id]);
    alice.join(&room);
    let proxy = ConnectProxy::start();
    // An agent with ureq's defaults (statuses as errors, redirects followed) and a proxy.
    let agent_for = || {
        let config = ureq::Agent::config_builder()
            .proxy(Some(ureq::Proxy::new(&proxy.url()).unwrap()))
            .build();
        ureq::Agent::new_with_config(config)
    };
    let mut driver = DriverConfig::default();
    driver.agent = Some(agent_for());
    // On palpo through a recording proxy: a message palpo's own `/sync` stream skipped for
    // alice (see `support::palpo_stream`), shown by replay, is followed by another, up to three.
    let mut config = config_for(&alice);
    let stream = Stream::route(server, homeserver.port(), &mut config);
    let service = start_with(config, driver).expect("valid config");
    drain_until_live(&service);
    let mut attempt = 0;
    let mut sent = bob.send_text(&room, "through the application's agent 0");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match service.events().recv_timeout(Duration::from_millis(250)) {
            Ok(e) if e.event_id.as_ref().is_some_and(|id| id.as_str() == sent) => break,
            Ok(_) => {}
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
                assert!(
                    Instant::now() < deadline,
                    "{sent} (attempt {attempt}) never came"
                );
                if let Some(stream) = &stream {
                    if attempt < 2 && stream.skipped(&alice, &room, &sent).is_some() {
                        eprintln!("palpo's stream skipped message {attempt} for alice; another");
                        attempt += 1;
                        sent = bob.send_text(
                            &room,
                            &format!("through the application's agent {attempt}"),
                        );
                    }
                }
            }
            Err(e) => panic!("events ended: {e}"),
        }
    }
    let target = match &stream {
        Some(stream) => format!("127.0.0.1:{}", stream.port()),
        None => format!("127.0.0.1:{}", homeserver.port()),
    };
    assert!(proxy.tunnels_to(&target) >= 1, "{:?}", proxy.tunnels());
    service.stop();

    // A refused token still comes back as a status the machine classifies.
    let mut config = config_for(&alice);
    config.access_token = matrix_sync_service::AccessToken::new("syt_not_a_token");
    let mut driver = DriverConfig::default();
    driver.agent = Some(agent_for());
    let service = start_with(config, driver).expect("valid config");
    let error = service
        .errors()
        .recv_timeout(Duration::from_secs(10))
        .unwrap();
    let ServiceError::Sync(error) = error else {
        panic!("{error}")
    };
    assert!(
        matches!(error.failure, Failure::UnknownToken { .. }),
        "{error}"
    );
}

/// Bob's message, reaction, typing and read receipt as alice's typed values; returns the
/// kinds of bob's receipts alice was sent.
///
/// On palpo alice goes through a recording proxy: a reaction palpo's own `/sync` stream
/// skipped for her (see `support::palpo_stream`) is followed by another with the next key,
/// up to three; and after 5 s without them, bob's typing and receipt are sent again (palpo
/// numbers them, too, before they can be read).
fn real_reactions_typing_and_receipts_read_as_typed_values(server: Server) -> Vec<String> {
    const KEYS: [&str; 3] = ["👍", "👀", "🎉"];
    let homeserver = server.shared();
    let alice = Account::register(&homeserver.base_url(), "alice");
    let bob = Account::register(&homeserver.base_url(), "bob");
    let room = bob.create_room(&[&alice.user_id]);
    alice.join(&room);
    let mut config = config_for(&alice);
    let stream = Stream::route(server, homeserver.port(), &mut config);
    let service = start_with(config, DriverConfig::default()).expect("valid config");
    drain_until_live(&service);
    let message = bob.send_text(&room, "typed");
    let mut key = 0;
    let mut reaction = bob.send_reaction(&room, &message, KEYS[key]);
    bob.typing(&room, true);
    bob.receipt(&room, &message);
    let mut typing = Vec::new();
    let mut receipts = Vec::new();
    let mut reacted = None;
    let read_by_bob = |receipts: &[(_, String, _)]| {
        receipts
            .iter()
            .any(|(_, kind, u): &(_, String, OwnedUserId)| {
                u.as_str() == bob.user_id && kind.as_str() == "m.read"
            })
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut resend_at = Instant::now() + Duration::from_secs(5);
    loop {
        let has_read = read_by_bob(&receipts);
        if !typing.is_empty() && reacted.is_some() && has_read {
            break;
        }
        let now = Instant::now();
        assert!(
            now < deadline,
            "typing {typing:?}, reaction {reacted:?}, receipts {receipts:?}"
        );
        let e = match service.events().recv_timeout(Duration::from_millis(250)) {
            Ok(e) => e,
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
                let Some(stream) = &stream else { continue };
                if reacted.is_none()
                    && key + 1 < KEYS.len()
                    && stream.skipped(&alice, &room, &reaction).is_some()
                {
                    eprintln!("palpo's stream skipped reaction {key} for alice; another");
                    key += 1;
                    reaction = bob.send_reaction(&room, &message, KEYS[key]);
                }
                if now >= resend_at {
                    resend_at = now + Duration::from_secs(5);
                    if typing.is_empty() {
                        eprintln!("palpo: no typing within 5 s; again");
                        bob.typing(&room, true);
                    }
                    if !has_read {
                        eprintln!("palpo: no m.read within 5 s; again");
                        bob.receipt(&room, &message);
                    }
                }
                continue;
            }
            Err(e) => panic!("events ended: {e}"),
        };
        match e.kind {
            EventKind::Typing if typing.is_empty() => typing = e.typing_user_ids(),
            EventKind::Receipt => receipts.extend(e.receipts()),
            EventKind::Reaction if e.event_id.as_ref().unwrap().as_str() == reaction => {
                reacted = Some(e.deserialize_content::<ReactionEventContent>().unwrap())
            }
            _ => {}
        }
    }
    assert_eq!(typing[0].as_str(), bob.user_id);
    let reacted = reacted.unwrap();
    assert_eq!(reacted.relates_to.key, KEYS[key]);
    assert_eq!(reacted.relates_to.event_id.as_str(), message);
    let (read, kind, _) = receipts
        .iter()
        .find(|(_, kind, u)| u.as_str() == bob.user_id && kind.as_str() == "m.read")
        .unwrap();
    assert_eq!((read.as_str(), kind.as_str()), (message.as_str(), "m.read"));
    service.stop();
    let kinds: Vec<String> = receipts
        .iter()
        .filter(|(_, _, u)| u.as_str() == bob.user_id)
        .map(|(_, kind, _)| kind.to_string())
        .collect();
    eprintln!("{server}: bob's receipts sent to alice: {kinds:?}");
    kinds
}

fn the_default_filter_lazy_loads_members_and_the_server_sends_fewer(server: Server) {
    let homeserver = server.shared();
    let alice = Account::register(&homeserver.base_url(), "alice");
    let bob = Account::register(&homeserver.base_url(), "bob");
    let silent: Vec<_> = (0..5)
        .map(|_| Account::register(&homeserver.base_url(), "silent"))
        .collect();
    let mut invited: Vec<&str> = vec![&alice.user_id];
    invited.extend(silent.iter().map(|a| a.user_id.as_str()));
    let room = bob.create_room(&invited);
    alice.join(&room);
    for member in &silent {
        member.join(&room);
    }
    // More messages than Synapse's default timeline of 10: the joins fall out of it, so the
    // members come only through the state section, which the filter decides.
    for i in 0..12 {
        bob.send_text(&room, &format!("only bob speaks {i}"));
    }
    let members_seen = |filter: Option<matrix_sync_service::SyncFilter>| {
        let mut config = config_for(&alice);
        let sends_filter = filter.is_some();
        config.filter = filter;
        let service = start_with(config, DriverConfig::default()).expect("valid config");
        let events = collect_until(&service, Duration::from_secs(20), |events| {
            events
                .iter()
                .any(|e| matches!(e.kind, EventKind::Checkpoint(_)))
        });
        service.stop();
        let mut members: Vec<_> = events
            .iter()
            .filter(|e| e.kind == EventKind::Member)
            .filter(|e| e.room_id.as_ref().is_some_and(|r| r.as_str() == room))
            .filter_map(|e| e.state_key.clone())
            .collect();
        members.sort();
        members.dedup();
        eprintln!("filter sent: {sends_filter}: {} members", members.len());
        members
    };
    use matrix_sync_service::SyncFilter;
    let default = matrix_sync_service::Config::new("https://x.org", "t").filter;
    assert!(
        matches!(&default, Some(SyncFilter::Definition(d)) if !d.room.state.lazy_load_options.is_disabled()),
        "the default filter lazy-loads members"
    );
    // A timeline of one event (bob's last message), so the members come only through the
    // state section, which lazy-loading decides.
    let lazy = members_seen(Some(SyncFilter::timeline_limit(1)));
    let all = members_seen(Some(
        SyncFilter::from_json(r#"{"room":{"timeline":{"limit":1}}}"#).unwrap(),
    ));
    assert_eq!(all.len(), 7, "{all:?}");
    assert!(
        lazy.contains(&bob.user_id),
        "the sender's member event comes along"
    );
    // Synapse leaves out members it judges the client does not need; how many it keeps
    // is its choice, that it keeps fewer is the filter's effect.
    assert!(lazy.len() < all.len(), "lazy {lazy:?} against all {all:?}");
}

#[test]
fn tail_goes_through_the_proxy_of_its_environment_and_around_it_for_no_proxy_on_synapse() {
    tail_goes_through_the_proxy_of_its_environment_and_around_it_for_no_proxy(Server::Synapse);
}

#[test]
fn tail_goes_through_the_proxy_of_its_environment_and_around_it_for_no_proxy_on_palpo() {
    tail_goes_through_the_proxy_of_its_environment_and_around_it_for_no_proxy(Server::Palpo);
}

#[test]
fn the_applications_own_agent_is_used_and_keeps_statuses_as_values_on_synapse() {
    the_applications_own_agent_is_used_and_keeps_statuses_as_values(Server::Synapse);
}

#[test]
fn the_applications_own_agent_is_used_and_keeps_statuses_as_values_on_palpo() {
    the_applications_own_agent_is_used_and_keeps_statuses_as_values(Server::Palpo);
}

#[test]
fn real_reactions_typing_and_receipts_read_as_typed_values_on_synapse() {
    let kinds = real_reactions_typing_and_receipts_read_as_typed_values(Server::Synapse);
    assert!(
        kinds.iter().all(|k| k != "m.read.private"),
        "a private receipt is for its user alone: {kinds:?}"
    );
}

/// palpo may also send alice bob's private read receipt of his own event (see the README's
/// table); the typed values are the same.
#[test]
fn real_reactions_typing_and_receipts_read_as_typed_values_on_palpo() {
    real_reactions_typing_and_receipts_read_as_typed_values(Server::Palpo);
}

#[test]
fn the_default_filter_lazy_loads_members_and_the_server_sends_fewer_on_synapse() {
    the_default_filter_lazy_loads_members_and_the_server_sends_fewer(Server::Synapse);
}

#[test]
fn the_default_filter_lazy_loads_members_and_the_server_sends_fewer_on_palpo() {
    the_default_filter_lazy_loads_members_and_the_server_sends_fewer(Server::Palpo);
}
