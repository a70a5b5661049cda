//! The defaults, and why they are what they are.
//!
//! * **Long-poll timeout, 30 s** ([`LONG_POLL_TIMEOUT`]): what Element and most SDKs use. Longer
//!   polls save little and run into idle timeouts of proxies in front of homeservers (often 60 s).
//! * **Deadline margin, 30 s** ([`DEADLINE_MARGIN`]): a loaded server can take many seconds to
//!   assemble a response after the long-poll ends; a tighter deadline would abandon answers that
//!   were on their way and make the server redo the work.
//! * **Long-poll timeout at least 100 ms** ([`MIN_LONG_POLL_TIMEOUT`]): shorter is polling, and
//!   zero would make a server that answers at once indistinguishable from one that held the
//!   request, which is what the pacing rule tells apart.
//! * **Initial sync deadline, 10 min** ([`INITIAL_SYNC_DEADLINE`]): an account in thousands of
//!   rooms takes minutes to answer a sync without `since`; giving up earlier means never starting.
//! * **Catch-up deadline, 10 min** ([`CATCH_UP_DEADLINE`]): a `timeout=0` sync from a `since`
//!   days old carries everything since, and takes a server as long as an initial sync; with the
//!   long-poll deadline it would fail, and the same heavy request be retried, forever.
//! * **Backoff 500 ms × 2 up to 60 s, jitter 50 %** ([`BACKOFF_INITIAL`], [`BACKOFF_FACTOR`],
//!   [`BACKOFF_MAX`], [`BACKOFF_JITTER`]): the first retry is quick enough to hide a blip; a minute
//!   keeps a fleet of clients from hammering a server that is down; jitter spreads the fleet so it
//!   does not come back in one wave.
//! * **Server-requested wait ceiling, 5 min** ([`MAX_SERVER_WAIT`]): longer than any honest
//!   rate limit, short enough that a hostile or broken server cannot park the client for days.
//! * **Body cap, 256 MiB** ([`MAX_BODY_BYTES`]): an initial sync of a very large account is tens
//!   of MB; a body far beyond that is a broken or hostile server, and loading it would take the
//!   process down.
//! * **Gap fill up to 1,000 events per room and batch, pages of 100** ([`GAP_FILL_MAX_EVENTS`],
//!   [`GAP_FILL_PAGE_SIZE`]): covers a client that was offline for hours in a busy room, in a few
//!   requests; past it, history is better fetched on demand than before live events.
//! * **Gap-fill memory budget: the body cap** ([`MAX_BODY_BYTES`]): the events fetched for one
//!   batch never exceed what one response may weigh, so a pending batch costs at most about
//!   three bodies (its own, the fills, the page being read) however many rooms are limited.
//! * **Gap-fill retries: 3 per room, 8 per batch**: a blip is ridden out (three attempts span
//!   about 1.5 s of backoff), while a room whose history keeps failing cannot hold the batch,
//!   and a server failing every page cannot hold it past 8 backoff steps and deadlines.
//! * **Pacing: the backoff schedule** (see the crate docs): an answer that delivered nothing and
//!   was not held counts as a backoff step, so with these defaults a server gets at most 256
//!   requests that deliver nothing in an hour, plus 16 for each answer that delivers.
//! * **Dedup memory of 16,384 event ids** ([`DEDUP_CAPACITY`]): the overlaps it catches (gap fill
//!   against timeline, state repeated in a limited sync) are within one or two batches. Ids are
//!   kept as 64-bit fingerprints under a key drawn at random for each machine (foldhash; 16
//!   bytes each with the eviction order, about 0.3 MB in all): the chance that two of 16,384
//!   ids collide, which would skip one event, is about 10⁻¹¹, and no server can aim for it.
//! * **Members lazy-loaded** ([`SyncFilter::lazy_loading`](crate::SyncFilter::lazy_loading),
//!   the default `Config::filter`): what Element and matrix-rust-sdk send. Without it a
//!   server sends every member of every room in the initial sync and in each limited
//!   timeline's state, which in large rooms is most of the body; with it, the members who
//!   sent the delivered events come along (the spec's lazy-loading), so a consumer still
//!   knows every sender. Redundant members stay off (the server would repeat members the
//!   client already has). Nothing else is filtered: presence, account data, ephemeral
//!   events and to-device messages are what an application of this crate asks for. Measured
//!   (BENCHMARKS.md, section 8): an account in 30 rooms of 50 to 200 members gets an initial
//!   sync of 236 kB instead of 1.3 MB, answered in 23 ms instead of 96.
//! * **Refresh a minute before expiry, or at four fifths of a short lifetime**
//!   ([`REFRESH_LEAD`]): a minute covers a refresh that needs a few retries or a slow token
//!   endpoint, so a steady sync never meets an expired token; a token living seconds (tests,
//!   strict deployments) would be refreshed in a loop with a fixed minute, so its lead is a
//!   fifth of its lifetime. The lifetime is counted from when the refresh request was sent,
//!   so a slow answer only makes the refresh earlier.
//! * **A refreshed token lives at least 5 s** ([`MIN_TOKEN_LIFETIME`]): a refresh answer's
//!   `expires_in_ms` (or OAuth 2.0 `expires_in`) below it is raised to it. Refreshing at four
//!   fifths of the lifetime, a lifetime of 0 or 1 ms would make the machine refresh again
//!   as soon as the new tokens are stored, a loop against the token endpoint that rewrites
//!   the application's token store each turn. With the floor it refreshes at most once
//!   every 4 s, and a server whose tokens really die sooner gets the 401 path, which
//!   refreshes once and then backs off. 5 s stays below the shortest lifetime met in
//!   practice, 10 s (Synapse configured for tests, as in this crate's Synapse tests), so a
//!   real server's lifetime is never changed; production lifetimes are minutes to an hour.
//! * **Discovery follows at most 5 redirects** ([`MAX_DISCOVERY_REDIRECTS`]): the
//!   specification asks clients to follow a well-known's redirects and to avoid loops; real
//!   chains are one or two hops (`example.org` to `www.example.org`, http to https), and a
//!   bound keeps a loop from costing more than a handful of requests per backoff step.
//! * **Driver channels: 1,024 events, 64 errors** (`DriverConfig`): enough to absorb a batch without stalling the driver;
//!   errors are reports, so keeping the newest 64 is plenty.
//! * **TLS: the bundled web roots, no extra CA** (`DriverConfig::trust_roots`,
//!   `TrustRoots::Bundled`): Mozilla's root program compiled in verifies a public
//!   homeserver the same way on every machine, in a minimal container without a CA store
//!   as on a desktop, and an interception proxy installed in the system store cannot read
//!   the access token. A private deployment adds its CA (`DriverConfig::add_ca_pem`, checked
//!   when added); a site whose policy is the system store chooses `TrustRoots::Platform`.
//!   Bundled roots with an extra CA come as certificates (`webpki-root-certs`, the same
//!   Mozilla set), where the one root Mozilla limits to `.tr` names is not so limited.
//! * **Name resolution: none for an IP address** (the driver's agent): ureq resolves before
//!   every request and, with a timeout, on a new thread; an address needs no look-up, so it
//!   is parsed on the driver thread, and only names take ureq's thread, which keeps a hung
//!   look-up abandonable at the resolve timeout (10 s).

use std::time::Duration;

/// Server-side long-poll timeout.
pub const LONG_POLL_TIMEOUT: Duration = Duration::from_secs(30);
/// Client-side margin on top of the long-poll timeout.
pub const DEADLINE_MARGIN: Duration = Duration::from_secs(30);
/// Shortest accepted long-poll timeout.
pub const MIN_LONG_POLL_TIMEOUT: Duration = Duration::from_millis(100);
/// Client-side deadline of an initial sync.
pub const INITIAL_SYNC_DEADLINE: Duration = Duration::from_secs(600);
/// Client-side deadline of a catch-up sync from a `since`.
pub const CATCH_UP_DEADLINE: Duration = Duration::from_secs(600);
/// First backoff delay.
pub const BACKOFF_INITIAL: Duration = Duration::from_millis(500);
/// Backoff growth factor.
pub const BACKOFF_FACTOR: f64 = 2.0;
/// Backoff cap.
pub const BACKOFF_MAX: Duration = Duration::from_secs(60);
/// Fraction of each delay that jitter may take away.
pub const BACKOFF_JITTER: f64 = 0.5;
/// Ceiling on a server-requested wait.
pub const MAX_SERVER_WAIT: Duration = Duration::from_secs(300);
/// Response body cap.
pub const MAX_BODY_BYTES: u64 = 256 * 1024 * 1024;
/// Events fetched per room and batch when filling a gap.
pub const GAP_FILL_MAX_EVENTS: usize = 1000;
/// `limit` of each gap-filling `/messages` request.
pub const GAP_FILL_PAGE_SIZE: u32 = 100;
/// Event ids remembered for dedup.
pub const DEDUP_CAPACITY: usize = 16_384;
/// How long before a known expiry the access token is refreshed, at most (at most a fifth of
/// the token's lifetime).
pub const REFRESH_LEAD: Duration = Duration::from_secs(60);
/// The shortest lifetime taken from a refresh answer: shorter ones are raised to it.
pub const MIN_TOKEN_LIFETIME: Duration = Duration::from_secs(5);
/// Capacity of the driver's events channel.
pub const EVENT_CHANNEL_CAPACITY: usize = 1024;
/// Capacity of the driver's errors channel.
pub const ERROR_CHANNEL_CAPACITY: usize = 64;
/// The most redirects of the well-known followed in a row by one server discovery attempt.
pub const MAX_DISCOVERY_REDIRECTS: u8 = 5;
