//! The throwaway Synapse and the test client against each other: extra settings reach the
//! server, refreshable tokens come back whole, and logging out everywhere ends every token.

use matrix_sync_testkit::client::Account;
use matrix_sync_testkit::synapse::{Synapse, SynapseOptions};

const WHOAMI: &str = "/_matrix/client/v3/account/whoami";

#[test]
fn extra_settings_give_refreshable_tokens_that_logout_all_ends() {
    let synapse = SynapseOptions::new()
        .refreshable_access_token_lifetime("10s")
        .start();
    let base = synapse.base_url();

    let alice = Account::register_refreshable(&base, "alice");
    let refresh = alice.refresh_token.as_deref().expect("a refresh token");
    assert!(!refresh.is_empty());
    let lifetime = alice.expires_in_ms.expect("expires_in_ms");
    assert!(
        (1..=10_000).contains(&lifetime),
        "the configured 10 s lifetime, not {lifetime} ms"
    );
    assert!(!alice.device_id.is_empty());
    let (status, me) = alice.get_json(WHOAMI);
    assert_eq!(
        (status, me["user_id"].as_str()),
        (200, Some(&*alice.user_id))
    );

    let second = Account::login_refreshable(&base, &alice.user_id, client_password());
    assert_ne!(second.device_id, alice.device_id);
    assert!(second.refresh_token.is_some() && second.expires_in_ms.is_some());

    let refreshed = alice.refresh();
    assert_ne!(refreshed.access_token, alice.access_token);
    assert_eq!(refreshed.device_id, alice.device_id);
    assert_eq!(refreshed.get_json(WHOAMI).0, 200);

    refreshed.logout_all();
    for account in [&refreshed, &second] {
        let (status, body) = account.get_json(WHOAMI);
        assert_eq!(status, 401, "{body}");
        assert_eq!(body["errcode"], "M_UNKNOWN_TOKEN");
    }
    let (status, body) = second.refresh_json();
    assert!(
        status == 401 || status == 403,
        "a refresh token outlives logout/all: {status} {body}"
    );
}

#[test]
fn without_the_setting_tokens_live_longer_and_plain_ones_never_expire() {
    let synapse = Synapse::start();
    let bob = Account::register_refreshable(&synapse.base_url(), "bob");
    assert!(bob.refresh_token.is_some());
    let lifetime = bob.expires_in_ms.expect("expires_in_ms");
    assert!(
        lifetime > 10_000,
        "Synapse's default lifetime, not {lifetime} ms"
    );
    let plain = Account::register(&synapse.base_url(), "carol");
    assert_eq!((plain.refresh_token, plain.expires_in_ms), (None, None));
}

fn client_password() -> &'static str {
    matrix_sync_testkit::client::PASSWORD
}
