//! A worker: the reactor for the accounts it holds, the actors of their leases, and the loop
//! on the calling thread that ties them together.

use std::collections::hash_map::DefaultHasher;
use std::collections::{HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crossbeam_channel::{select, tick, Receiver};
use futures_util::StreamExt;
use tokio::sync::mpsc;

use super::actor::{self, Command, Ctx, Report};
use super::store::Nats;
use super::{valid_name, AccountEntry, FleetConfig, FleetError, LeaseChange, LeaseChangeKind};
use crate::reactor::{self, AccountEvent, Reactor};
use crate::{Config, Credentials};

/// Capacity of each actor's command channel: the worker's thread waits when it is full.
const ACTOR_CAPACITY: usize = 1024;

/// The accounts bucket as this worker knows it: entry and revision per account name.
type Accounts = Arc<Mutex<HashMap<String, (AccountEntry, u64)>>>;

/// Where a held account is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// In the reactor; its events go to the actor.
    Syncing,
    /// Removed from the reactor after a failure; on `ended`, the actor reloads the checkpoint.
    Restarting,
    /// The actor is reading the checkpoint; [`Report::Resumed`] adds it again.
    Reloading,
    /// Removed from the reactor to give the lease back; on `ended`, the actor releases it.
    Releasing,
    /// The actor was told to release; waiting for [`Report::Released`].
    Leaving,
    /// The lease is lost; on `ended`, it is forgotten.
    Losing,
}

/// The leases bucket's keys as last listed. A worker under its fair share tries only accounts
/// whose lease no one holds: trying every account in turn, one or two at a time, took minutes
/// to come upon the last free one among hundreds held elsewhere.
#[derive(Default)]
struct LeaseListing {
    /// The last listing that arrived: when it was asked for, and the accounts it named.
    last: Option<(Instant, HashSet<String>)>,
    /// When the latest listing was asked for (perhaps still under way).
    asked: Option<Instant>,
}

impl LeaseListing {
    /// Whether a listing is due: none was asked for within `every`.
    fn due(&self, now: Instant, every: Duration) -> bool {
        self.asked
            .is_none_or(|asked| now.duration_since(asked) >= every)
    }

    /// Whether the last listing showed `name`'s lease free (`false` before any listing).
    fn free(&self, name: &str) -> bool {
        self.last
            .as_ref()
            .is_some_and(|(_, names)| !names.contains(name))
    }

    /// Keeps a listing unless a later-asked one arrived first.
    fn listed(&mut self, asked: Instant, names: HashSet<String>) {
        if self.last.as_ref().is_none_or(|(listed, _)| *listed < asked) {
            self.last = Some((asked, names));
        }
    }
}

struct Held {
    actor: mpsc::Sender<Command>,
    epoch: u64,
    phase: Phase,
    /// When its sync ended for good (the lease is given back after).
    stopped: Option<SystemTime>,
}

/// Runs a worker on this thread until `stop` receives a message or is disconnected: connects
/// to NATS (creating the stream and the buckets if absent), then takes leases and syncs the
/// accounts it holds, publishing their events (see the [module docs](super)).
///
/// On stop, the accounts' sync ends, the events already received are published and their
/// checkpoints stored, and the leases are given back, so that other workers take the
/// accounts at once. Returns an error only when it could not start (see [`FleetError`]) or
/// its reactor panicked; failures of NATS or of a homeserver while running are logged (`log`)
/// and retried.
pub fn run(config: FleetConfig, stop: &Receiver<()>) -> Result<(), FleetError> {
    let nats = Nats::connect(&config, true)?;
    let (reports_tx, reports) = crossbeam_channel::unbounded();
    let ctx = Arc::new(Ctx {
        js: nats.js.clone(),
        leases: nats.leases.clone(),
        checkpoints: nats.checkpoints.clone(),
        config: config.clone(),
        reports: reports_tx.clone(),
    });
    let accounts: Accounts = Arc::default();

    // Refreshed credentials: written to the account's entry (with its revision) before use.
    let store = {
        let accounts = accounts.clone();
        let kv = nats.accounts.clone();
        let handle = nats.rt.handle().clone();
        let limit = config.nats_timeout;
        move |name: &String, credentials: &Credentials| {
            let (mut entry, revision) = lock(&accounts)
                .get(name)
                .cloned()
                .ok_or("the account is no longer in the accounts bucket")?;
            entry.access_token = credentials.access_token.clone();
            entry.refresh_token = credentials.refresh_token.clone();
            let json = bytes::Bytes::from(entry.to_json());
            let revision = handle
                .block_on(async {
                    tokio::time::timeout(limit, kv.update(name, json, revision)).await
                })
                .map_err(|_| "storing the refreshed credentials timed out".to_owned())?
                .map_err(|e| format!("storing the refreshed credentials: {e}"))?;
            lock(&accounts).insert(name.clone(), (entry, revision));
            Ok::<(), Box<dyn std::error::Error + Send + Sync>>(())
        }
    };
    // Each account's next sync waits until its checkpoint is in the bucket: the sync after a
    // checkpoint lets the homeserver delete that batch's to-device messages.
    let reactor_config = config
        .reactor
        .clone()
        .on_credentials(store)
        .acknowledge_checkpoints(true);
    let reactor = reactor::start(reactor_config).map_err(|e| FleetError::Reactor(e.to_string()))?;

    let watcher = nats
        .rt
        .spawn(watch_accounts(nats.accounts.clone(), reports_tx.clone()));
    let presence = nats.rt.spawn(presence(
        nats.js.clone(),
        nats.workers.clone(),
        config.clone(),
        reports_tx.clone(),
    ));
    drop(reports_tx);

    let mut worker = Worker {
        started: Instant::now(),
        nonce: format!(
            "{}-{}",
            std::process::id(),
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_nanos()
        ),
        leases_taken: 0,
        config,
        nats,
        ctx,
        reactor,
        accounts,
        held: HashMap::new(),
        acquiring: HashSet::new(),
        cooldown: HashMap::new(),
        bad: HashSet::new(),
        leased: LeaseListing::default(),
        live_workers: 1,
        workers_changed: Instant::now(),
        last_status: Instant::now(),
        cursor: 0,
    };
    let ticks = tick((worker.config.renew_every / 2).max(Duration::from_millis(50)));
    loop {
        select! {
            recv(stop) -> _ => break,
            recv(worker.reactor.events()) -> event => match event {
                Ok(event) => worker.on_event(event),
                Err(_) => break,
            },
            recv(worker.reactor.ended()) -> name => if let Ok(name) = name {
                worker.on_ended(name);
            },
            recv(worker.reactor.errors()) -> error => if let Ok(error) = error {
                log::warn!("account {}: {}", error.account, error.error);
            },
            recv(reports) -> report => if let Ok(report) = report {
                worker.on_report(report);
            },
            recv(ticks) -> _ => worker.balance(),
        }
    }
    worker.shut_down(&reports);
    watcher.abort();
    presence.abort();
    // This worker's key out of the workers bucket without a marker (a purge of its subject),
    // so that the others count one worker less at once and take its accounts.
    let js = worker.nats.js.clone();
    let bucket = worker.config.workers_bucket.clone();
    let id = worker.config.worker_id.clone();
    let _ = worker
        .nats
        .block_on(worker.config.nats_timeout, async move {
            let stream = js.get_stream(format!("KV_{bucket}")).await.ok()?;
            stream
                .purge()
                .filter(format!("$KV.{bucket}.{id}"))
                .await
                .ok()
        });
    let joined = worker.reactor.join();
    let Worker { nats, .. } = worker;
    nats.rt.shutdown_timeout(Duration::from_secs(1));
    joined.map_err(|e| FleetError::Reactor(e.to_string()))
}

struct Worker {
    config: FleetConfig,
    nats: Nats,
    ctx: Arc<Ctx>,
    reactor: Reactor<String>,
    accounts: Accounts,
    held: HashMap<String, Held>,
    /// Lease attempts in flight.
    acquiring: HashSet<String>,
    /// Not to be tried before then (held elsewhere, or just given back).
    cooldown: HashMap<String, Instant>,
    /// Accounts whose configuration the reactor refused, until their entry changes.
    bad: HashSet<String>,
    /// What this worker knows of the leases held anywhere: only accounts outside it are tried.
    leased: LeaseListing,
    live_workers: usize,
    /// When `live_workers` last changed: leases are shed only once it is stable.
    workers_changed: Instant,
    /// When the status line was last logged.
    last_status: Instant,
    /// Where the next round of lease attempts starts in the sorted accounts.
    cursor: usize,
    started: Instant,
    /// Unique per worker run; with a counter, unique per lease taken.
    nonce: String,
    leases_taken: u64,
}

impl Worker {
    /// Reports a lease change that happened `at`: for `Acquired`, just before the account was
    /// added to the reactor; for `Released` and `Lost`, once its sync had ended (the reactor's
    /// `ended`), so that the span between them covers every moment it was synced here.
    fn lease_change(&self, account: &str, kind: LeaseChangeKind, lease: u64, at: SystemTime) {
        match kind {
            LeaseChangeKind::Acquired => log::info!("account {account}: lease {lease} taken"),
            LeaseChangeKind::Released => log::info!("account {account}: lease {lease} given back"),
            LeaseChangeKind::Lost => log::warn!("account {account}: lease {lease} lost"),
        }
        if let Some(f) = &self.config.on_lease {
            f(&LeaseChange {
                account: account.to_owned(),
                kind,
                lease,
                at,
            });
        }
    }

    fn on_event(&mut self, AccountEvent { account, event }: AccountEvent<String>) {
        if let Some(held) = self.held.get(&account) {
            if held.phase == Phase::Syncing
                && held
                    .actor
                    .blocking_send(Command::Event(Box::new(event)))
                    .is_err()
            {
                log::debug!("account {account}: its actor ended; event dropped");
            }
        }
    }

    fn on_ended(&mut self, name: String) {
        let Some(held) = self.held.get_mut(&name) else {
            return;
        };
        match held.phase {
            Phase::Syncing | Phase::Restarting => {
                held.phase = Phase::Reloading;
                if held.actor.blocking_send(Command::Reload).is_err() {
                    let epoch = held.epoch;
                    self.held.remove(&name);
                    self.lease_change(&name, LeaseChangeKind::Lost, epoch, SystemTime::now());
                }
            }
            Phase::Releasing => {
                held.phase = Phase::Leaving;
                held.stopped = Some(SystemTime::now());
                if held.actor.blocking_send(Command::Release).is_err() {
                    let epoch = held.epoch;
                    self.held.remove(&name);
                    self.lease_change(&name, LeaseChangeKind::Released, epoch, SystemTime::now());
                }
            }
            Phase::Losing => {
                let epoch = held.epoch;
                self.held.remove(&name);
                self.lease_change(&name, LeaseChangeKind::Lost, epoch, SystemTime::now());
            }
            Phase::Reloading | Phase::Leaving => {}
        }
    }

    /// Stops the account's sync; `then` is the phase until its `ended`.
    fn stop_account(&mut self, name: &str, then: Phase) {
        let Some(held) = self.held.get_mut(name) else {
            return;
        };
        match held.phase {
            Phase::Syncing => {
                held.phase = then;
                if self.reactor.remove(&name.to_owned()).is_err() {
                    // Not in the reactor (it ended): nothing to wait for.
                    self.on_ended(name.to_owned());
                }
            }
            // Its `ended` is still to come: only what follows it changes.
            Phase::Restarting | Phase::Releasing => {
                if then != Phase::Restarting {
                    held.phase = then;
                }
            }
            Phase::Reloading => match then {
                Phase::Losing => {
                    let epoch = held.epoch;
                    self.held.remove(name);
                    self.lease_change(name, LeaseChangeKind::Lost, epoch, SystemTime::now());
                }
                Phase::Releasing => {
                    held.phase = Phase::Leaving;
                    let _ = held.actor.blocking_send(Command::Release);
                }
                _ => {}
            },
            Phase::Leaving | Phase::Losing => {}
        }
    }

    fn on_report(&mut self, report: Report) {
        match report {
            Report::Account {
                name,
                entry,
                revision,
            } => self.on_account(name, entry.map(|e| *e), revision),
            Report::Workers(n) => {
                let n = n.max(1);
                if n != self.live_workers {
                    self.live_workers = n;
                    self.workers_changed = Instant::now();
                }
            }
            Report::Acquired { name, lease } => {
                self.acquiring.remove(&name);
                let entry = lock(&self.accounts).get(&name).map(|(e, _)| e.clone());
                let (tx, rx) = mpsc::channel(ACTOR_CAPACITY);
                let (epoch, since) = (lease.epoch, lease.since.clone());
                self.nats
                    .rt
                    .spawn(actor::run(self.ctx.clone(), name.clone(), lease, rx));
                let mut held = Held {
                    actor: tx,
                    epoch,
                    phase: Phase::Leaving,
                    stopped: None,
                };
                let at = SystemTime::now();
                let added = entry.map(|entry| {
                    self.reactor.add(
                        name.clone(),
                        account_config(&self.config.template, &name, &entry, since),
                    )
                });
                match added {
                    Some(Ok(())) => {
                        held.phase = Phase::Syncing;
                        self.held.insert(name.clone(), held);
                        self.lease_change(&name, LeaseChangeKind::Acquired, epoch, at);
                    }
                    other => {
                        if let Some(Err(e)) = other {
                            log::error!("account {name}: not synced: {e}");
                            self.bad.insert(name.clone());
                        }
                        // Given back at once (the lease change is never reported: no sync).
                        let _ = held.actor.blocking_send(Command::Release);
                    }
                }
            }
            Report::NotAcquired {
                name,
                held_elsewhere,
            } => {
                self.acquiring.remove(&name);
                // Held elsewhere: free again at the earliest when its holder dies and a TTL
                // passes.
                let pause = if held_elsewhere {
                    self.config.lease_ttl / 2
                } else {
                    self.config.renew_every * 2
                };
                self.cooldown.insert(name, Instant::now() + pause);
            }
            Report::Lost { name, why } => {
                log::warn!("account {name}: stopped: {why}");
                self.stop_account(&name, Phase::Losing);
                if let Some(held) = self.held.get_mut(&name) {
                    if held.phase == Phase::Leaving {
                        let epoch = held.epoch;
                        self.held.remove(&name);
                        self.lease_change(&name, LeaseChangeKind::Lost, epoch, SystemTime::now());
                    }
                }
            }
            Report::Failed { name, why } => {
                log::warn!("account {name}: restarting from its checkpoint: {why}");
                self.stop_account(&name, Phase::Restarting);
            }
            Report::Resumed { name, since } => {
                if self.held.get(&name).map(|h| h.phase) != Some(Phase::Reloading) {
                    return;
                }
                let entry = lock(&self.accounts).get(&name).map(|(e, _)| e.clone());
                let config =
                    entry.map(|entry| account_config(&self.config.template, &name, &entry, since));
                let Some(held) = self.held.get_mut(&name) else {
                    return;
                };
                match config {
                    Some(config) => match self.reactor.add(name.clone(), config) {
                        Ok(()) => held.phase = Phase::Syncing,
                        Err(e) => {
                            log::error!("account {name}: not synced: {e}");
                            held.phase = Phase::Leaving;
                            let _ = held.actor.blocking_send(Command::Release);
                        }
                    },
                    None => {
                        held.phase = Phase::Leaving;
                        let _ = held.actor.blocking_send(Command::Release);
                    }
                }
            }
            Report::CheckpointStored { name, epoch } => self.checkpoint_stored(&name, epoch),
            Report::Leased { asked, names } => {
                self.leased.listed(asked, names);
                self.balance();
            }
            Report::Released { name } => {
                if let Some(held) = self.held.remove(&name) {
                    let at = held.stopped.unwrap_or_else(SystemTime::now);
                    self.lease_change(&name, LeaseChangeKind::Released, held.epoch, at);
                }
                self.cooldown
                    .insert(name, Instant::now() + self.config.lease_ttl);
            }
        }
    }

    /// The actor stored the account's oldest checkpoint not yet acknowledged: the reactor may
    /// send its next sync. Only while it syncs under the same lease: an account stopped since
    /// (restarting, given back, lost) was removed from the reactor, waiting or not, and comes
    /// back (if it does) as a new account owing nothing. Its actor's reports come in order, so
    /// one of a stopped run always arrives before the account is added again.
    fn checkpoint_stored(&mut self, name: &str, epoch: u64) {
        let Some(held) = self.held.get(name) else {
            return;
        };
        if held.phase != Phase::Syncing || held.epoch != epoch {
            return;
        }
        if let Err(e) = self.reactor.checkpoint_stored(&name.to_owned()) {
            log::debug!("account {name}: checkpoint acknowledgement not delivered: {e}");
        }
    }

    fn on_account(&mut self, name: String, entry: Option<AccountEntry>, revision: u64) {
        if !valid_name(&name) {
            log::warn!("accounts bucket: key {name:?} is not an account name; left alone");
            return;
        }
        let mut accounts = lock(&self.accounts);
        let known = accounts.get(&name).map(|(e, r)| (e.clone(), *r));
        match entry {
            Some(entry) => {
                if known.as_ref().is_some_and(|(_, r)| *r >= revision) {
                    return;
                }
                accounts.insert(name.clone(), (entry.clone(), revision));
                drop(accounts);
                self.bad.remove(&name);
                let Some(held) = self.held.get(&name) else {
                    return;
                };
                let Some((old, _)) = known else { return };
                if held.phase != Phase::Syncing || old == entry {
                    return;
                }
                if old.homeserver != entry.homeserver {
                    self.stop_account(&name, Phase::Restarting);
                } else {
                    let mut credentials = Credentials::new(entry.access_token.expose());
                    credentials.refresh_token = entry.refresh_token.clone();
                    if let Err(e) = self.reactor.set_credentials(&name, credentials) {
                        log::warn!("account {name}: new credentials not applied: {e}");
                    }
                }
            }
            None => {
                if accounts.remove(&name).is_some() {
                    drop(accounts);
                    log::info!("account {name}: removed from the accounts bucket");
                    self.stop_account(&name, Phase::Releasing);
                }
            }
        }
    }

    /// Takes free leases up to the fair share, gives back those above it.
    fn balance(&mut self) {
        if self.started.elapsed() < self.config.settle {
            return;
        }
        let now = Instant::now();
        self.cooldown.retain(|_, until| *until > now);
        let total = lock(&self.accounts).len();
        let fair = total.div_ceil(self.live_workers);
        let holding = self
            .held
            .values()
            .filter(|h| !matches!(h.phase, Phase::Leaving | Phase::Losing | Phase::Releasing))
            .count();
        let count = holding + self.acquiring.len();
        if self.last_status.elapsed() >= Duration::from_secs(5) {
            self.last_status = Instant::now();
            log::info!(
                "worker {}: holding {holding} leases, taking {}, {} accounts, {} live workers",
                self.config.worker_id,
                self.acquiring.len(),
                total,
                self.live_workers
            );
        }
        if count < fair {
            if self.leased.due(now, self.config.renew_every) {
                self.leased.asked = Some(now);
                self.nats
                    .rt
                    .spawn(actor::list_leases(self.ctx.clone(), now));
            }
            let want = fair - count;
            // Round the accounts from where the last round stopped, so that every free
            // lease is tried in turn. (Named only here: most ticks of a worker at its share
            // need the count alone.)
            let mut accounts: Vec<String> = lock(&self.accounts).keys().cloned().collect();
            accounts.sort_unstable();
            let start = self.cursor % accounts.len().max(1);
            let mut candidates = Vec::new();
            let mut examined = 0;
            for a in accounts.iter().cycle().skip(start).take(accounts.len()) {
                examined += 1;
                if self.leased.free(a)
                    && !self.held.contains_key(a)
                    && !self.acquiring.contains(a)
                    && !self.cooldown.contains_key(a)
                    && !self.bad.contains(a)
                {
                    candidates.push(a.clone());
                    if candidates.len() == want {
                        break;
                    }
                }
            }
            self.cursor = start + examined;
            for name in candidates {
                self.leases_taken += 1;
                let nonce = format!("{}-{}", self.nonce, self.leases_taken);
                self.acquiring.insert(name.clone());
                self.nats
                    .rt
                    .spawn(actor::acquire(self.ctx.clone(), name, nonce));
            }
        } else if holding > fair
            && self.acquiring.is_empty()
            && self.workers_changed.elapsed() >= self.config.settle
        {
            let shed: Vec<String> = self
                .held
                .iter()
                .filter(|(_, h)| h.phase == Phase::Syncing)
                .map(|(name, _)| name.clone())
                .take(holding - fair)
                .collect();
            for name in shed {
                log::info!("account {name}: given back ({holding} held, fair share {fair})");
                self.stop_account(&name, Phase::Releasing);
            }
        }
    }

    /// Stops every account, publishes what was received, stores the checkpoints and gives
    /// the leases back.
    fn shut_down(&mut self, reports: &Receiver<Report>) {
        self.reactor.stop();
        let deadline = Instant::now() + self.config.nats_timeout * 2;
        // Every event still in the channel, then every account's end.
        let mut ended = Vec::new();
        while Instant::now() < deadline {
            select! {
                recv(self.reactor.events()) -> event => match event {
                    Ok(event) => self.on_event(event),
                    Err(_) => break,
                },
                recv(self.reactor.ended()) -> name => if let Ok(name) = name {
                    ended.push(name);
                },
                default(Duration::from_millis(100)) => {
                    if self.reactor.is_finished() {
                        break;
                    }
                }
            }
        }
        ended.extend(self.reactor.ended().try_iter());
        let stopped = SystemTime::now();
        for held in self.held.values_mut() {
            held.stopped.get_or_insert(stopped);
            if held.phase != Phase::Leaving {
                held.phase = Phase::Leaving;
                let _ = held.actor.blocking_send(Command::Release);
            }
        }
        while !self.held.is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            match reports.recv_timeout(left) {
                Ok(Report::Released { name }) | Ok(Report::Lost { name, .. }) => {
                    if let Some(held) = self.held.remove(&name) {
                        let at = held.stopped.unwrap_or_else(SystemTime::now);
                        self.lease_change(&name, LeaseChangeKind::Released, held.epoch, at);
                    }
                }
                Ok(Report::Acquired { name, lease }) => {
                    // Taken while stopping: given back at once.
                    let leases = self.nats.leases.clone();
                    let revision = lease.epoch;
                    self.nats.rt.spawn(async move {
                        leases.delete_expect_revision(&name, Some(revision)).await
                    });
                }
                Ok(_) => {}
                Err(_) => {
                    log::warn!(
                        "{} leases not given back in time; they expire by themselves",
                        self.held.len()
                    );
                    break;
                }
            }
        }
    }
}

/// Reports every entry of the accounts bucket, then every change, for as long as it runs.
async fn watch_accounts(
    accounts: async_nats::jetstream::kv::Store,
    reports: crossbeam_channel::Sender<Report>,
) {
    use async_nats::jetstream::kv::Operation;
    loop {
        match accounts.watch_with_history(">").await {
            Ok(mut watch) => {
                while let Some(entry) = watch.next().await {
                    match entry {
                        Ok(entry) => {
                            let parsed = match entry.operation {
                                Operation::Put => match AccountEntry::from_json(&entry.value) {
                                    Ok(parsed) => Some(Box::new(parsed)),
                                    Err(e) => {
                                        log::warn!(
                                            "accounts bucket: entry {:?} is not an account \
                                             (a JSON object with homeserver and access_token): \
                                             {e}; left alone",
                                            entry.key
                                        );
                                        continue;
                                    }
                                },
                                Operation::Delete | Operation::Purge => None,
                            };
                            let report = Report::Account {
                                name: entry.key,
                                entry: parsed,
                                revision: entry.revision,
                            };
                            if reports.send(report).is_err() {
                                return;
                            }
                        }
                        Err(e) => {
                            log::warn!("watching the accounts bucket: {e}");
                            break;
                        }
                    }
                }
            }
            Err(e) => log::warn!("watching the accounts bucket: {e}"),
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Keeps this worker's key in the workers bucket and counts the live workers.
async fn presence(
    js: async_nats::jetstream::Context,
    workers: async_nats::jetstream::kv::Store,
    config: FleetConfig,
    reports: crossbeam_channel::Sender<Report>,
) {
    let limit = config.nats_timeout;
    loop {
        let put = workers.put(&config.worker_id, bytes::Bytes::new());
        if let Err(e) = tokio::time::timeout(limit, put)
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r.map_err(|e| e.to_string()))
        {
            log::warn!("workers bucket: {e}");
        }
        // One message per live worker: the bucket keeps one per key, a key expires with its
        // worker (a stopping worker purges its subject: no delete marker), so the bucket's
        // stream holds as many messages as there are live workers. (Listing the keys can miss one
        // replaced while it is listed.)
        let count = tokio::time::timeout(limit, async {
            let stream = js
                .get_stream(format!("KV_{}", config.workers_bucket))
                .await
                .map_err(|e| e.to_string())?;
            Ok::<_, String>(stream.cached_info().state.messages as usize)
        })
        .await;
        match count {
            Ok(Ok(n)) => {
                if reports.send(Report::Workers(n)).is_err() {
                    return;
                }
            }
            Ok(Err(e)) => log::warn!("counting workers: {e}"),
            Err(_) => log::warn!("counting workers timed out"),
        }
        tokio::time::sleep(config.renew_every).await;
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The configuration of account `name`: the template with the account's homeserver,
/// credentials, user and checkpoint, and a jitter seed of its own.
fn account_config(
    template: &Config,
    name: &str,
    entry: &AccountEntry,
    since: Option<String>,
) -> Config {
    let mut config = template.clone();
    config.homeserver.clone_from(&entry.homeserver);
    config.access_token = entry.access_token.clone();
    config.refresh_token = entry.refresh_token.clone();
    // The template's user, if any, is not this account's.
    config.sliding_sync.user_id.clone_from(&entry.user_id);
    config.since = since;
    let mut hasher = DefaultHasher::new();
    name.hash(&mut hasher);
    config.jitter_seed = hasher.finish() | 1;
    config
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Protocol;

    #[test]
    fn each_account_syncs_as_its_own_user_whatever_the_template_names() {
        let mut template = Config::new("https://template.invalid", "template");
        template.protocol = Protocol::SlidingSync;
        template.sliding_sync.user_id = Some("@template:example.org".try_into().unwrap());
        let alice = AccountEntry::new("https://a.example.org", "token-a")
            .with_user_id("@alice:example.org".try_into().unwrap());
        let config = account_config(&template, "alice", &alice, Some("s1".into()));
        assert_eq!(config.homeserver, "https://a.example.org");
        assert_eq!(config.protocol, Protocol::SlidingSync);
        assert_eq!(
            config.sliding_sync.user_id.as_deref().map(|u| u.as_str()),
            Some("@alice:example.org")
        );
        assert_eq!(config.since.as_deref(), Some("s1"));
        let anonymous = AccountEntry::new("https://b.example.org", "token-b");
        let config = account_config(&template, "bob", &anonymous, None);
        assert_eq!(config.sliding_sync.user_id, None, "not the template's user");
        assert_ne!(
            config.jitter_seed,
            account_config(&template, "alice", &alice, None).jitter_seed
        );
    }
}
