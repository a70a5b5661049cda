//! One held account on the runtime: its lease (renewed, fenced), its publishes (one at a time,
//! each acknowledged before the next) and its checkpoint writes.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::kv::{self, CreateErrorKind, Operation, UpdateErrorKind};
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::Context;
use crossbeam_channel::Sender;
use futures_util::TryStreamExt;
use tokio::sync::mpsc;

use super::{headers, FleetConfig};
use crate::{Event, EventKind};

/// Retry pause for a renewal or a checkpoint read that failed for want of NATS.
const RETRY: Duration = Duration::from_millis(250);

/// What the runtime's tasks tell the worker's thread.
pub(crate) enum Report {
    /// The account entry `name` is now `entry` (at `revision`); `None`: it was deleted.
    Account {
        name: String,
        entry: Option<Box<super::AccountEntry>>,
        revision: u64,
    },
    /// Live workers seen in the workers bucket.
    Workers(usize),
    /// A lease was taken.
    Acquired { name: String, lease: Lease },
    /// A lease could not be taken (held by another worker, or NATS failed).
    NotAcquired { name: String, held_elsewhere: bool },
    /// The lease is gone: stop syncing the account at once. The actor has ended.
    Lost { name: String, why: String },
    /// A publish or checkpoint write failed: stop the account and restart it from its
    /// checkpoint (the actor keeps the lease meanwhile).
    Failed { name: String, why: String },
    /// After a reload: the stored checkpoint to restart from.
    Resumed { name: String, since: Option<String> },
    /// The oldest checkpoint of the account not yet reported stored is in the checkpoints
    /// bucket (every event of its batch acknowledged before it): the reactor may send the
    /// account's next sync. `epoch`: the lease it was stored under.
    CheckpointStored { name: String, epoch: u64 },
    /// The lease was given back. The actor has ended.
    Released { name: String },
    /// The accounts whose lease someone holds (the leases bucket's keys), as listed from
    /// `asked` on.
    Leased {
        asked: Instant,
        names: HashSet<String>,
    },
}

/// Commands of the worker's thread to an account's actor.
pub(crate) enum Command {
    /// The account's next event, in the machine's order.
    Event(Box<Event>),
    /// The account's sync stopped after a failure: read the checkpoint again, report
    /// [`Report::Resumed`].
    Reload,
    /// The account's sync stopped: give the lease back and end.
    Release,
}

/// A lease this worker holds.
pub(crate) struct Lease {
    /// The revision at which it was taken.
    pub epoch: u64,
    /// The revision of its last write.
    revision: u64,
    /// The lease's value: this worker and a nonce, unique per lease taken.
    value: bytes::Bytes,
    /// Until when it may be counted on.
    valid_until: Instant,
    /// The stored checkpoint when it was taken, and that key's revision (0: none).
    pub since: Option<String>,
    checkpoint_revision: u64,
}

/// What every actor shares.
pub(crate) struct Ctx {
    pub js: Context,
    pub leases: kv::Store,
    pub checkpoints: kv::Store,
    pub config: FleetConfig,
    pub reports: Sender<Report>,
}

impl Ctx {
    fn report(&self, report: Report) {
        let _ = self.reports.send(report);
    }

    fn valid_until(&self, sent: Instant) -> Instant {
        sent + self.config.lease_ttl - self.config.lease_margin()
    }
}

/// The account's stored checkpoint and its key's revision.
async fn read_checkpoint(ctx: &Ctx, name: &str) -> Result<(Option<String>, u64), String> {
    let entry = tokio::time::timeout(ctx.config.nats_timeout, ctx.checkpoints.entry(name))
        .await
        .map_err(|_| "timed out".to_owned())?
        .map_err(|e| e.to_string())?;
    Ok(match entry {
        None => (None, 0),
        Some(e) if e.operation == Operation::Put => (
            Some(String::from_utf8_lossy(&e.value).into_owned()).filter(|s| !s.is_empty()),
            e.revision,
        ),
        Some(e) => (None, e.revision),
    })
}

/// Tries to take the lease of `name` (create if absent) and reads its checkpoint.
pub(crate) async fn acquire(ctx: Arc<Ctx>, name: String, nonce: String) {
    let value = serde_json::to_vec(&serde_json::json!({
        "worker": ctx.config.worker_id,
        "nonce": nonce,
    }))
    .unwrap_or_default();
    let value = bytes::Bytes::from(value);
    let sent = Instant::now();
    let created = tokio::time::timeout(
        ctx.config.nats_timeout,
        ctx.leases.create(&name, value.clone()),
    )
    .await;
    let revision = match created {
        Ok(Ok(revision)) => revision,
        Ok(Err(e)) if e.kind() == CreateErrorKind::AlreadyExists => {
            return ctx.report(Report::NotAcquired {
                name,
                held_elsewhere: true,
            });
        }
        Ok(Err(e)) => {
            log::warn!("account {name}: could not take its lease: {e}");
            return ctx.report(Report::NotAcquired {
                name,
                held_elsewhere: false,
            });
        }
        Err(_) => {
            log::warn!("account {name}: taking its lease timed out");
            return ctx.report(Report::NotAcquired {
                name,
                held_elsewhere: false,
            });
        }
    };
    match read_checkpoint(&ctx, &name).await {
        Ok((since, checkpoint_revision)) => {
            let lease = Lease {
                epoch: revision,
                revision,
                value,
                valid_until: ctx.valid_until(sent),
                since,
                checkpoint_revision,
            };
            ctx.report(Report::Acquired { name, lease });
        }
        Err(why) => {
            log::warn!("account {name}: could not read its checkpoint: {why}");
            let _ = tokio::time::timeout(
                ctx.config.nats_timeout,
                ctx.leases.delete_expect_revision(&name, Some(revision)),
            )
            .await;
            ctx.report(Report::NotAcquired {
                name,
                held_elsewhere: false,
            });
        }
    }
}

/// Lists the leases bucket's keys (the accounts whose lease someone holds) and reports them
/// as [`Report::Leased`]; on failure, logs and reports nothing (the worker asks again later).
pub(crate) async fn list_leases(ctx: Arc<Ctx>, asked: Instant) {
    let listed = tokio::time::timeout(ctx.config.nats_timeout, async {
        let keys = ctx.leases.keys().await.map_err(|e| e.to_string())?;
        keys.try_collect::<HashSet<String>>()
            .await
            .map_err(|e| e.to_string())
    })
    .await;
    match listed {
        Ok(Ok(names)) => ctx.report(Report::Leased { asked, names }),
        Ok(Err(e)) => log::warn!("listing the leases: {e}"),
        Err(_) => log::warn!("listing the leases timed out"),
    }
}

/// Why a step failed.
enum Step {
    /// The lease is not ours (any more): stop at once.
    Lost(String),
    /// NATS failed; the lease may still be ours.
    Failed(String),
}

/// One account's actor: runs until its lease is lost or released, or the worker drops it.
pub(crate) async fn run(
    ctx: Arc<Ctx>,
    name: String,
    mut lease: Lease,
    mut commands: mpsc::Receiver<Command>,
) {
    let subject = ctx.config.subject(&name);
    let mut failed = false;
    let mut batch_from = lease.since.clone().unwrap_or_default();
    let mut position = 0u64;
    let mut next_renew = Instant::now() + ctx.config.renew_every;
    loop {
        let command = tokio::select! {
            command = commands.recv() => command,
            () = tokio::time::sleep_until(next_renew.into()) => {
                match renew(&ctx, &name, &mut lease).await {
                    Ok(()) => next_renew = Instant::now() + ctx.config.renew_every,
                    Err(Step::Lost(why)) => return ctx.report(Report::Lost { name, why }),
                    Err(Step::Failed(why)) => {
                        log::warn!("account {name}: lease renewal failed, retrying: {why}");
                        next_renew = Instant::now() + RETRY;
                    }
                }
                continue;
            }
        };
        let event = match command {
            Some(Command::Event(event)) => event,
            Some(Command::Reload) => {
                loop {
                    if Instant::now() >= next_renew {
                        match renew(&ctx, &name, &mut lease).await {
                            Ok(()) => next_renew = Instant::now() + ctx.config.renew_every,
                            Err(Step::Lost(why)) => {
                                return ctx.report(Report::Lost { name, why });
                            }
                            Err(Step::Failed(_)) => next_renew = Instant::now() + RETRY,
                        }
                    }
                    match read_checkpoint(&ctx, &name).await {
                        Ok((since, revision)) => {
                            lease.checkpoint_revision = revision;
                            batch_from = since.clone().unwrap_or_default();
                            position = 0;
                            failed = false;
                            ctx.report(Report::Resumed {
                                name: name.clone(),
                                since,
                            });
                            break;
                        }
                        Err(why) => {
                            log::warn!("account {name}: reading its checkpoint: {why}");
                            tokio::time::sleep(RETRY).await;
                        }
                    }
                }
                continue;
            }
            Some(Command::Release) | None => {
                let _ = tokio::time::timeout(
                    ctx.config.nats_timeout,
                    ctx.leases
                        .delete_expect_revision(&name, Some(lease.revision)),
                )
                .await;
                return ctx.report(Report::Released { name });
            }
        };
        if failed {
            continue;
        }
        let left = lease.valid_until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            let why = "the lease could not be renewed in time".to_owned();
            return ctx.report(Report::Lost { name, why });
        }
        let step = if let EventKind::Checkpoint(checkpoint) = &event.kind {
            let token = &checkpoint.next_batch;
            let committed = commit(&ctx, &name, &mut lease, token, token == &batch_from).await;
            if committed.is_ok() {
                next_renew = Instant::now() + ctx.config.renew_every;
                batch_from.clone_from(token);
                position = 0;
                ctx.report(Report::CheckpointStored {
                    name: name.clone(),
                    epoch: lease.epoch,
                });
            }
            committed
        } else {
            let id = match &event.event_id {
                Some(id) => format!("{name}:{id}"),
                None => format!("{name}:{batch_from}:{position}"),
            };
            position += 1;
            publish(&ctx, &name, &subject, lease.epoch, &event, id, left).await
        };
        match step {
            Ok(()) => {}
            Err(Step::Lost(why)) => return ctx.report(Report::Lost { name, why }),
            Err(Step::Failed(why)) => {
                failed = true;
                ctx.report(Report::Failed {
                    name: name.clone(),
                    why,
                });
            }
        }
    }
}

/// One event into the stream, waiting for its acknowledgement (at most `left`, the lease's
/// remaining validity).
async fn publish(
    ctx: &Ctx,
    name: &str,
    subject: &str,
    epoch: u64,
    event: &Event,
    id: String,
    left: Duration,
) -> Result<(), Step> {
    #[derive(serde::Serialize)]
    struct Line<'a> {
        account: &'a str,
        #[serde(flatten)]
        event: &'a Event,
    }
    let payload = serde_json::to_vec(&Line {
        account: name,
        event,
    })
    .map_err(|e| Step::Failed(format!("serialize an event: {e}")))?;
    let message = PublishMessage::build()
        .payload(payload.into())
        .message_id(id)
        .header(headers::WORKER, ctx.config.worker_id.as_str())
        .header(headers::LEASE, epoch.to_string());
    let acked = tokio::time::timeout(left.min(ctx.config.nats_timeout), async {
        ctx.js
            .send_publish(subject.to_owned(), message)
            .await?
            .await
    })
    .await;
    match acked {
        Ok(Ok(ack)) => {
            if ack.duplicate {
                log::debug!("account {name}: a duplicate, dropped by the stream");
            }
            Ok(())
        }
        Ok(Err(e)) => Err(Step::Failed(format!("publish: {e}"))),
        Err(_) => Err(Step::Failed(
            "publish: no acknowledgement in time".to_owned(),
        )),
    }
}

/// Renews the lease with its revision.
async fn renew(ctx: &Ctx, name: &str, lease: &mut Lease) -> Result<(), Step> {
    let sent = Instant::now();
    let left = lease.valid_until.saturating_duration_since(sent);
    if left.is_zero() {
        return Err(Step::Lost(
            "the lease could not be renewed in time".to_owned(),
        ));
    }
    let updated = tokio::time::timeout(
        left.min(ctx.config.nats_timeout),
        ctx.leases.update(name, lease.value.clone(), lease.revision),
    )
    .await;
    match updated {
        Ok(Ok(revision)) => {
            lease.revision = revision;
            lease.valid_until = ctx.valid_until(sent);
            Ok(())
        }
        Ok(Err(e)) if e.kind() == UpdateErrorKind::WrongLastRevision => {
            // Ours still if an earlier renewal was stored but its answer was lost.
            match tokio::time::timeout(ctx.config.nats_timeout, ctx.leases.entry(name)).await {
                Ok(Ok(Some(entry)))
                    if entry.operation == Operation::Put && entry.value == lease.value =>
                {
                    lease.revision = entry.revision;
                    Err(Step::Failed(
                        "renewal raced a lost answer; retrying".to_owned(),
                    ))
                }
                Ok(Ok(_)) => Err(Step::Lost("another worker holds the lease".to_owned())),
                Ok(Err(e)) => Err(Step::Failed(format!("lease renewal: {e}"))),
                Err(_) => Err(Step::Failed("lease renewal timed out".to_owned())),
            }
        }
        Ok(Err(e)) => Err(Step::Failed(format!("lease renewal: {e}"))),
        Err(_) => Err(Step::Failed("lease renewal timed out".to_owned())),
    }
}

/// Stores a batch's checkpoint after every event of it was acknowledged: renews the lease
/// with its revision first, then writes the checkpoint with the revision last read or
/// written (the fence). `unchanged`: the token is the stored one; only the renewal is done.
async fn commit(
    ctx: &Ctx,
    name: &str,
    lease: &mut Lease,
    token: &str,
    unchanged: bool,
) -> Result<(), Step> {
    renew(ctx, name, lease).await?;
    if unchanged {
        return Ok(());
    }
    let value = bytes::Bytes::copy_from_slice(token.as_bytes());
    let limit = ctx.config.nats_timeout;
    let written = if lease.checkpoint_revision == 0 {
        match tokio::time::timeout(limit, ctx.checkpoints.create(name, value.clone())).await {
            Ok(Ok(revision)) => Ok(revision),
            Ok(Err(e)) if e.kind() == CreateErrorKind::AlreadyExists => Err(None),
            Ok(Err(e)) => Err(Some(e.to_string())),
            Err(_) => Err(Some("timed out".to_owned())),
        }
    } else {
        let update = ctx
            .checkpoints
            .update(name, value.clone(), lease.checkpoint_revision);
        match tokio::time::timeout(limit, update).await {
            Ok(Ok(revision)) => Ok(revision),
            Ok(Err(e)) if e.kind() == UpdateErrorKind::WrongLastRevision => Err(None),
            Ok(Err(e)) => Err(Some(e.to_string())),
            Err(_) => Err(Some("timed out".to_owned())),
        }
    };
    match written {
        Ok(revision) => {
            lease.checkpoint_revision = revision;
            Ok(())
        }
        Err(Some(why)) => Err(Step::Failed(format!("checkpoint write: {why}"))),
        Err(None) => {
            // Another revision: ours if an earlier write was stored and its answer lost (we
            // hold the lease, just renewed); otherwise another worker wrote it.
            match tokio::time::timeout(limit, ctx.checkpoints.entry(name)).await {
                Ok(Ok(Some(entry)))
                    if entry.operation == Operation::Put && entry.value == value =>
                {
                    lease.checkpoint_revision = entry.revision;
                    Ok(())
                }
                Ok(Ok(_)) => Err(Step::Lost(
                    "the checkpoint was written by another worker (fenced)".to_owned(),
                )),
                Ok(Err(e)) => Err(Step::Failed(format!("checkpoint read: {e}"))),
                Err(_) => Err(Step::Failed("checkpoint read timed out".to_owned())),
            }
        }
    }
}
