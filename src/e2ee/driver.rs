//! The driver thread with the E2EE stage: the machine's events go through the stage, the
//! stage's requests go first, and no sync goes out while the stage holds it.
//!
//! A child module of the driver, so that it reuses the driver's channels, transport and
//! stop handling without widening their visibility.

use std::time::{Duration, Instant};

use crossbeam_channel::select;

use super::{lock, spawn, wire, Driver, ServiceError, StartError, Stopped, SyncService};
use crate::{Config, DriverConfig, E2ee, E2eeConfig, SyncMachine};

/// How long the loop waits when nothing has a timer (a safety net: the stage always has one
/// while it holds the sync).
const IDLE_TICK: Duration = Duration::from_secs(1);

/// [`start_with`](crate::start_with), with the end-to-end encryption stage on the driver
/// thread: events reach [`SyncService::events`] decrypted where the stage can (see
/// [`crate::e2ee`]); the stage's failures reach `errors` as [`ServiceError::Sync`] (for its
/// requests) or [`ServiceError::E2ee`].
///
/// The crypto store is opened here when both ids are configured (an unusable store is a
/// [`StartError::E2ee`]); otherwise after `GET /account/whoami`.
///
/// Server discovery ([`Config::discover`](crate::Config::discover())) is refused with
/// [`StartError::Config`]: the stage's requests (whoami, the first keys upload) go out before
/// the first sync, to the homeserver it was created with.
pub fn start_encrypted(
    config: Config,
    driver: DriverConfig,
    e2ee: E2eeConfig,
) -> Result<SyncService, StartError> {
    driver.validate()?;
    if config.discover {
        // The stage's requests go first, to the homeserver it was created with.
        return Err(StartError::Config(crate::ConfigError::Invalid {
            field: "discover",
            reason: "server discovery is not supported with the E2EE stage: \
                     start with the homeserver URL (Config::new)",
        }));
    }
    let now = Instant::now();
    let machine = SyncMachine::new(config, now)?;
    let stage = E2ee::new(machine.config(), e2ee, now).map_err(StartError::E2ee)?;
    let (driver, service) = wire(machine, &driver);
    let mut stage = Some(stage);
    let thread = spawn(driver, move |driver: &mut Driver| {
        if let Some(mut stage) = stage.take() {
            while step(driver, &mut stage).is_ok() {}
            log::debug!("sync driver (e2ee) stopping");
        }
    })
    .map_err(StartError::Spawn)?;
    *lock(&service.thread) = Some(thread);
    Ok(service)
}

/// One turn: drain the machine into the stage and the stage to the consumer, then send the
/// stage's request, else the machine's (unless the stage holds the sync), else wait.
fn step(driver: &mut Driver, stage: &mut E2ee) -> Result<(), Stopped> {
    drain(driver, stage)?;
    stage.set_access_token(driver.machine.config().access_token.clone());
    if let Some(request) = stage.poll_request() {
        let (id, outcome, now) = driver.exchange(request)?;
        let input = match outcome {
            Ok(response) => stage.handle_response(id, response, now),
            Err(failure) => stage.handle_failure(id, failure, now),
        };
        if let Err(err) = input {
            log::warn!("input refused by the e2ee stage: {err}");
        }
        let _ = driver.machine.handle_timeout(Instant::now());
        return Ok(());
    }
    let holds = stage.holds_sync();
    if !holds {
        if let Some(request) = driver.machine.poll_request() {
            let (id, outcome, now) = driver.exchange(request)?;
            let input = match outcome {
                Ok(response) => driver.machine.handle_response(id, response, now),
                Err(failure) => driver.machine.handle_failure(id, failure, now),
            };
            if let Err(err) = input {
                log::warn!("input refused by the machine: {err}");
            }
            let _ = stage.handle_timeout(Instant::now());
            return Ok(());
        }
    }
    let machine_wake = if holds {
        None
    } else {
        match driver.machine.poll_timeout() {
            Some(wake) => Some(wake),
            // Stopped, with nothing of the stage's left to do.
            None if stage.poll_timeout().is_none() => return Err(Stopped),
            None => None,
        }
    };
    let now = Instant::now();
    let wake = [machine_wake, stage.poll_timeout()]
        .into_iter()
        .flatten()
        .min()
        .unwrap_or(now + IDLE_TICK);
    let wait = wake.saturating_duration_since(now);
    if !wait.is_zero() {
        select! {
            recv(driver.stop) -> _ => return Err(Stopped),
            recv(driver.credentials) -> set => if let Ok(set) = set { driver.put_in_force(set) },
            default(wait) => {}
        }
    }
    let now = Instant::now();
    let _ = stage.handle_timeout(now);
    let _ = driver.machine.handle_timeout(now);
    Ok(())
}

fn drain(driver: &mut Driver, stage: &mut E2ee) -> Result<(), Stopped> {
    driver.publish_states();
    while let Some(error) = driver.machine.poll_error() {
        driver.errors.push(ServiceError::Sync(error));
    }
    while let Some(event) = driver.machine.poll_event() {
        stage.handle_event(event);
    }
    driver.settle_credentials();
    while let Some(error) = stage.poll_error() {
        driver.errors.push(match error {
            crate::E2eeError::Request(error) => ServiceError::Sync(error),
            other => ServiceError::E2ee(other),
        });
    }
    while let Some(event) = stage.poll_event() {
        select! {
            send(driver.events, event) -> sent => if sent.is_err() { return Err(Stopped) },
            recv(driver.stop) -> _ => return Err(Stopped),
        }
    }
    driver.publish_states();
    driver.check_stop()
}
