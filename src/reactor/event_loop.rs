//! The loop on the reactor's thread: one `mio::Poll` over every account's socket, one timer
//! heap over every machine's instant and every transfer's deadline, the commands of the
//! handle, and each machine pumped after each input.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{select, Receiver, Sender};
use mio::{Events, Interest, Poll, Token};
use rustls::ClientConfig;

use super::conn::{tls_failure, Conn};
use super::dns::{Lookup, Resolver};
use super::proxy::{HttpProxy, Origin, Tunnel};
use super::transfer::Transfer;
use super::{AccountError, AccountEvent, AccountKey, AccountState, StoreAccountCredentials};
use crate::lossy::Lossy;
use crate::{Credentials, OutgoingRequest, SyncMachine, TransportErrorKind, TransportFailure};

/// The waker's token; the account in slot `i` uses `Token(i)`.
pub(super) const WAKER: Token = Token(usize::MAX);
/// Socket reads go through a buffer of this size.
const READ_CHUNK: usize = 64 * 1024;
/// At most this many reads (of up to [`READ_CHUNK`]) for one account per turn of the loop: an
/// account whose server sends as fast as it can is put back in line behind the others, never
/// served to the end.
const READ_BUDGET: usize = 4;

/// What the handle asks of the loop, in the order asked.
pub(super) enum Command<K> {
    Add(K, Box<SyncMachine>),
    Remove(K),
    SetCredentials(K, Credentials, bool),
    /// The application stored the oldest checkpoint of the account it had not acknowledged.
    CheckpointStored(K),
}

/// A slot and the generation of the account in it (a slot is reused after a removal).
type Slot = (usize, u64);

/// Why the loop ends.
pub(super) struct Stopped;

struct Account<K> {
    key: K,
    generation: u64,
    machine: SyncMachine,
    conn: Option<Conn>,
    transfer: Option<Transfer>,
    /// Where the transfer's connection goes (the origin, and whether through the proxy).
    route: Option<Route>,
    /// Waiting for a name look-up before connecting.
    resolving: bool,
    /// The instant of this account's live entry in the timer heap (older entries are stale).
    scheduled: Option<Instant>,
    /// Checkpoints handed to the application and not acknowledged yet (counted only with
    /// `acknowledge_checkpoints`): no request goes out while there is one.
    unacknowledged: usize,
}

#[derive(Clone)]
struct Route {
    origin: Origin,
    proxied: bool,
}

/// The outputs of every account, and where refreshed credentials are stored.
pub(super) struct Outputs<K> {
    pub(super) events: Sender<AccountEvent<K>>,
    pub(super) errors: Lossy<AccountError<K>>,
    pub(super) states: Lossy<AccountState<K>>,
    pub(super) store: Option<Arc<StoreAccountCredentials<K>>>,
    pub(super) connections_opened: Arc<AtomicU64>,
    /// The keys of accounts that ended (unbounded: one item per account).
    pub(super) ended: Sender<K>,
}

pub(super) struct Loop<K> {
    pub(super) poll: Poll,
    pub(super) commands: Receiver<Command<K>>,
    pub(super) stop: Receiver<()>,
    pub(super) out: Outputs<K>,
    pub(super) tls: Option<Arc<ClientConfig>>,
    pub(super) proxy: Option<HttpProxy>,
    pub(super) resolver: Resolver<Slot>,
    pub(super) max_connecting: usize,
    /// Hold each account after its checkpoint until the application acknowledges it.
    acknowledge_checkpoints: bool,
    slots: Vec<Option<Account<K>>>,
    free: Vec<usize>,
    by_key: HashMap<K, usize>,
    timers: BinaryHeap<Reverse<(Instant, usize, u64)>>,
    /// Accounts with bytes left to read (their budget ran out) or a request to write on a
    /// connection already open: served in the next turn, in order.
    ready: VecDeque<Slot>,
    /// Accounts waiting for a connection to be opened, in turn.
    connect_queue: VecDeque<Slot>,
    /// Connections being opened (connect sent, not yet established).
    connecting: usize,
    next_generation: u64,
    scratch: Vec<u8>,
}

/// What a turn of I/O on a transfer came to.
enum Outcome {
    Pending,
    /// The read budget ran out with bytes perhaps left: again next turn.
    More,
    Done {
        response: http::Response<Vec<u8>>,
        close: bool,
    },
    Failed(TransportFailure),
}

impl<K: AccountKey> Loop<K> {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(
        poll: Poll,
        commands: Receiver<Command<K>>,
        stop: Receiver<()>,
        out: Outputs<K>,
        tls: Option<Arc<ClientConfig>>,
        proxy: Option<HttpProxy>,
        resolver: Resolver<Slot>,
        max_connecting: usize,
        acknowledge_checkpoints: bool,
    ) -> Self {
        Self {
            poll,
            commands,
            stop,
            out,
            tls,
            proxy,
            resolver,
            max_connecting,
            acknowledge_checkpoints,
            slots: Vec::new(),
            free: Vec::new(),
            by_key: HashMap::new(),
            timers: BinaryHeap::new(),
            ready: VecDeque::new(),
            connect_queue: VecDeque::new(),
            connecting: 0,
            next_generation: 0,
            scratch: vec![0; READ_CHUNK],
        }
    }

    /// Runs until stopped (or a poll failure, logged), then stops every machine.
    pub(super) fn run(&mut self) {
        if let Err(Stopped) = self.turns() {
            log::debug!("reactor stopping");
        }
        self.shut_down();
    }

    fn turns(&mut self) -> Result<(), Stopped> {
        let mut events = Events::with_capacity(1024);
        loop {
            self.check_stop()?;
            self.commands()?;
            let timeout = if self.ready.is_empty() {
                self.timers
                    .peek()
                    .map(|Reverse((at, _, _))| at.saturating_duration_since(Instant::now()))
            } else {
                Some(Duration::ZERO)
            };
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() != io::ErrorKind::Interrupted {
                    log::error!("reactor: poll failed, stopping every account: {e}");
                    return Err(Stopped);
                }
            }
            let now = Instant::now();
            let ready: Vec<(usize, bool)> = events
                .iter()
                .filter(|e| e.token() != WAKER)
                .map(|e| {
                    (
                        e.token().0,
                        e.is_readable() || e.is_read_closed() || e.is_error(),
                    )
                })
                .collect();
            for (index, readable) in ready {
                if let Some(generation) = self.generation(index) {
                    self.on_socket((index, generation), readable, now)?;
                }
            }
            for (waiters, resolved) in self.resolver.finished(now) {
                for slot in waiters {
                    self.resolved(slot, &resolved, now)?;
                }
            }
            for _ in 0..self.ready.len() {
                if let Some(slot) = self.ready.pop_front() {
                    self.on_socket(slot, false, now)?;
                }
            }
            self.on_timers(now)?;
            self.open_queued(now)?;
        }
    }

    fn check_stop(&self) -> Result<(), Stopped> {
        match self.stop.try_recv() {
            Err(crossbeam_channel::TryRecvError::Empty) => Ok(()),
            _ => Err(Stopped),
        }
    }

    fn generation(&self, index: usize) -> Option<u64> {
        self.slots.get(index)?.as_ref().map(|a| a.generation)
    }

    fn account(&mut self, (index, generation): Slot) -> Option<&mut Account<K>> {
        self.slots
            .get_mut(index)?
            .as_mut()
            .filter(|a| a.generation == generation)
    }

    // ---- commands -----------------------------------------------------------------------

    fn commands(&mut self) -> Result<(), Stopped> {
        while let Ok(command) = self.commands.try_recv() {
            let now = Instant::now();
            match command {
                Command::Add(key, machine) => self.add(key, *machine, now)?,
                Command::Remove(key) => self.remove(&key),
                Command::SetCredentials(key, mut credentials, keep_refresh_token) => {
                    let Some(&index) = self.by_key.get(&key) else {
                        continue;
                    };
                    let Some(generation) = self.generation(index) else {
                        continue;
                    };
                    let slot = (index, generation);
                    if let Some(account) = self.account(slot) {
                        if keep_refresh_token {
                            credentials.refresh_token =
                                account.machine.config().refresh_token.clone();
                        }
                        if let Err(e) = account.machine.set_credentials(credentials, now) {
                            log::warn!("{:?}: new credentials refused: {e}", account.key);
                        }
                    }
                    self.pump(slot, now)?;
                }
                Command::CheckpointStored(key) => self.checkpoint_stored(&key, now)?,
            }
        }
        Ok(())
    }

    /// The application stored the account's oldest unacknowledged checkpoint: once none is
    /// left, the account goes on (its machine told the time, since it waited).
    fn checkpoint_stored(&mut self, key: &K, now: Instant) -> Result<(), Stopped> {
        let Some(&index) = self.by_key.get(key) else {
            return Ok(());
        };
        let Some(generation) = self.generation(index) else {
            return Ok(());
        };
        let slot = (index, generation);
        let acknowledging = self.acknowledge_checkpoints;
        let Some(account) = self.account(slot) else {
            return Ok(());
        };
        if !acknowledging {
            log::debug!(
                "{:?}: checkpoint acknowledged, but acknowledge_checkpoints is off; ignored",
                account.key
            );
            return Ok(());
        }
        if account.unacknowledged == 0 {
            log::warn!(
                "{:?}: checkpoint acknowledged with none waiting for it; ignored",
                account.key
            );
            return Ok(());
        }
        account.unacknowledged -= 1;
        if account.unacknowledged > 0 {
            return Ok(());
        }
        if let Err(e) = account.machine.handle_timeout(now) {
            log::warn!("{:?}: timeout refused by the machine: {e}", account.key);
        }
        self.pump(slot, now)
    }

    fn add(&mut self, key: K, machine: SyncMachine, now: Instant) -> Result<(), Stopped> {
        if self.by_key.contains_key(&key) {
            // The handle refuses duplicates; a second add can only follow a remove of the
            // same key that the loop has not seen, and commands come in order.
            log::warn!("{key:?}: added twice, the second ignored");
            return Ok(());
        }
        self.next_generation += 1;
        let account = Account {
            key: key.clone(),
            generation: self.next_generation,
            machine,
            conn: None,
            transfer: None,
            route: None,
            resolving: false,
            scheduled: None,
            unacknowledged: 0,
        };
        let index = match self.free.pop() {
            Some(index) => {
                self.slots[index] = Some(account);
                index
            }
            None => {
                self.slots.push(Some(account));
                self.slots.len() - 1
            }
        };
        self.by_key.insert(key, index);
        self.pump((index, self.next_generation), now)
    }

    /// Ends an account: its transfer aborted, its socket closed, its machine stopped (its
    /// `Stopped` state published).
    fn remove(&mut self, key: &K) {
        let Some(index) = self.by_key.remove(key) else {
            return;
        };
        let Some(mut account) = self.slots.get_mut(index).and_then(Option::take) else {
            return;
        };
        self.free.push(index);
        if let Some(conn) = account.conn.take() {
            self.close(conn);
        }
        account.transfer = None;
        account.machine.stop();
        self.out.publish(&mut account);
        let _ = self.out.ended.send(account.key);
        log::debug!("{key:?}: removed");
    }

    /// Stops every machine and closes every socket; each account ends (`ended`, `Stopped`).
    pub(super) fn shut_down(&mut self) {
        // Commands the loop did not get to: every key accepted by `add` ends once.
        while let Ok(command) = self.commands.try_recv() {
            match command {
                Command::Add(key, _) if !self.by_key.contains_key(&key) => {
                    let _ = self.out.ended.send(key);
                }
                Command::Remove(key) => self.remove(&key),
                _ => {}
            }
        }
        for index in 0..self.slots.len() {
            if let Some(mut account) = self.slots[index].take() {
                if let Some(conn) = account.conn.take() {
                    self.close(conn);
                }
                account.machine.stop();
                self.out.publish(&mut account);
                let _ = self.out.ended.send(account.key);
            }
        }
        self.by_key.clear();
    }

    // ---- the machine's contract ---------------------------------------------------------

    /// Drains every output of one machine, then asks for its next request, and schedules its
    /// next instant. Events wait for room in the channel (or a stop).
    fn pump(&mut self, slot: Slot, now: Instant) -> Result<(), Stopped> {
        loop {
            let Some(account) = self.slots[slot.0].as_mut() else {
                return Ok(());
            };
            if account.generation != slot.1 {
                return Ok(());
            }
            self.out.publish(account);
            while let Some(event) = account.machine.poll_event() {
                if self.acknowledge_checkpoints
                    && matches!(event.kind, crate::EventKind::Checkpoint(_))
                {
                    // Counted before it is sent: its acknowledgement can only come after.
                    account.unacknowledged += 1;
                }
                let event = AccountEvent {
                    account: account.key.clone(),
                    event,
                };
                select! {
                    send(self.out.events, event) -> sent => if sent.is_err() { return Err(Stopped) },
                    recv(self.stop) -> _ => return Err(Stopped),
                }
            }
            let mut answered = false;
            while let Some(credentials) = account.machine.poll_credentials() {
                answered = true;
                let stored = match &self.out.store {
                    Some(store) => store(&account.key, &credentials).map_err(|e| e.to_string()),
                    None => Ok(()),
                };
                let result = match stored {
                    Ok(()) => account.machine.handle_credentials_stored(now),
                    Err(reason) => account.machine.handle_credentials_not_stored(reason, now),
                };
                if let Err(e) = result {
                    log::warn!("{:?}: credentials answer refused: {e}", account.key);
                }
            }
            if answered {
                continue;
            }
            // Held while a checkpoint it handed out is not stored: the next request would let
            // the server delete that batch's to-device messages.
            if account.transfer.is_none() && account.unacknowledged == 0 {
                if let Some(request) = account.machine.poll_request() {
                    let id = request.id;
                    if let Err(failure) = self.start(slot, request) {
                        // Nothing of it stays in flight: the machine's retry is not held up.
                        if let Some(account) = self.account(slot) {
                            account.transfer = None;
                            account.resolving = false;
                            if let Some(conn) = account.conn.take() {
                                self.close(conn);
                            }
                        }
                        self.fail_with(slot, id, failure, now);
                        continue;
                    }
                }
            }
            break;
        }
        self.schedule(slot);
        Ok(())
    }

    /// Feeds a failure for request `id` to the account's machine (no transfer left).
    fn fail_with(
        &mut self,
        slot: Slot,
        id: crate::RequestId,
        failure: TransportFailure,
        now: Instant,
    ) {
        if let Some(account) = self.account(slot) {
            if let Err(e) = account.machine.handle_failure(id, failure, now) {
                log::warn!("{:?}: failure refused by the machine: {e}", account.key);
            }
        }
    }

    /// Puts the account's next instant (its machine's, or its transfer's deadline) on the
    /// timer heap.
    fn schedule(&mut self, slot: Slot) {
        let Some(account) = self.account(slot) else {
            return;
        };
        // A held account has nothing to do before its acknowledgement (its machine's instant
        // is when its next request may go out), which comes as a command.
        let machine = if account.unacknowledged > 0 {
            None
        } else {
            account.machine.poll_timeout()
        };
        let transfer = account.transfer.as_ref().map(|t| t.deadline);
        let next = match (machine, transfer) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        if next != account.scheduled {
            account.scheduled = next;
            if let Some(at) = next {
                self.timers.push(Reverse((at, slot.0, slot.1)));
            }
        }
    }

    /// Every due timer: transfer deadlines, then the machines' own instants. Those due now
    /// are taken first: an account rescheduled at once waits for the next turn, behind the
    /// others.
    fn on_timers(&mut self, now: Instant) -> Result<(), Stopped> {
        let mut due = Vec::new();
        while let Some(Reverse((at, index, generation))) = self.timers.peek().copied() {
            if at > now {
                break;
            }
            self.timers.pop();
            due.push((at, index, generation));
        }
        for (at, index, generation) in due {
            let slot = (index, generation);
            let Some(account) = self.account(slot) else {
                continue;
            };
            if account.scheduled != Some(at) {
                continue; // stale: the account was rescheduled since
            }
            account.scheduled = None;
            let overdue = account.transfer.as_ref().is_some_and(|t| now >= t.deadline);
            if overdue {
                let failure = TransportFailure::new(
                    TransportErrorKind::TimedOut,
                    "the request's deadline passed",
                );
                self.abort(slot, failure, now);
            }
            if let Some(account) = self.account(slot) {
                if let Err(e) = account.machine.handle_timeout(now) {
                    log::warn!("{:?}: timeout refused by the machine: {e}", account.key);
                }
            }
            self.pump(slot, now)?;
        }
        Ok(())
    }

    // ---- transfers ----------------------------------------------------------------------

    /// Starts the transfer of `request`: on the account's open connection to its origin, or
    /// on a new one.
    fn start(&mut self, slot: Slot, request: OutgoingRequest) -> Result<(), TransportFailure> {
        let origin = Origin::of(request.http.uri())?;
        let proxy = self
            .proxy
            .as_ref()
            .filter(|p| !p.bypassed_for(request.http.uri()));
        let proxied = proxy.is_some();
        // Plain http through a proxy: absolute-form requests to the proxy itself.
        let forward = proxied && !origin.https;
        let authorization = proxy
            .filter(|_| forward)
            .and_then(HttpProxy::authorization)
            .map(http::HeaderValue::from_str)
            .transpose()
            .map_err(|e| TransportFailure::new(TransportErrorKind::Other, e.to_string()))?;
        let mut http = request.http;
        if let Some(value) = authorization {
            http.headers_mut()
                .insert(http::header::PROXY_AUTHORIZATION, value);
        }
        let Some(account) = self.account(slot) else {
            return Ok(());
        };
        let max_body = account.machine.config().max_body_bytes;
        let transfer = Transfer::new(request.id, &http, request.deadline, max_body, forward)?;
        let route = Route { origin, proxied };
        let reusable = account
            .route
            .as_ref()
            .is_some_and(|r| r.origin == route.origin && r.proxied == route.proxied);
        account.transfer = Some(transfer);
        account.route = Some(route);
        if !reusable {
            if let Some(conn) = account.conn.take() {
                self.close(conn);
            }
        }
        let has_conn = self.account(slot).is_some_and(|a| a.conn.is_some());
        if has_conn {
            self.ready.push_back(slot);
        } else {
            self.open(slot, Instant::now())?;
        }
        Ok(())
    }

    /// Opens a connection for the account's transfer, or queues it while
    /// `max_connecting` are being opened.
    fn open(&mut self, slot: Slot, now: Instant) -> Result<(), TransportFailure> {
        if self.connecting >= self.max_connecting {
            self.connect_queue.push_back(slot);
            return Ok(());
        }
        let Some(route) = self.account(slot).and_then(|a| a.route.clone()) else {
            return Ok(());
        };
        let dial = match (&self.proxy, route.proxied) {
            (Some(proxy), true) => proxy.origin(),
            _ => route.origin.clone(),
        };
        match self.resolver.lookup(&dial.host, dial.port, slot, now) {
            Lookup::Ready(addr) => self.connect(slot, addr),
            Lookup::Waiting => {
                if let Some(account) = self.account(slot) {
                    account.resolving = true;
                }
                Ok(())
            }
            Lookup::Failed(reason) => Err(TransportFailure::new(TransportErrorKind::Dns, reason)),
        }
    }

    /// A name look-up an account waited for ended.
    fn resolved(
        &mut self,
        slot: Slot,
        resolved: &Result<SocketAddr, String>,
        now: Instant,
    ) -> Result<(), Stopped> {
        let Some(account) = self.account(slot) else {
            return Ok(());
        };
        if !account.resolving || account.transfer.is_none() {
            return Ok(());
        }
        account.resolving = false;
        let connected = match resolved {
            Ok(addr) => self.connect(slot, *addr),
            Err(reason) => Err(TransportFailure::new(
                TransportErrorKind::Dns,
                reason.clone(),
            )),
        };
        if let Err(failure) = connected {
            self.abort(slot, failure, now);
            self.pump(slot, now)?;
        }
        Ok(())
    }

    fn connect(&mut self, slot: Slot, addr: SocketAddr) -> Result<(), TransportFailure> {
        let Some(route) = self.account(slot).and_then(|a| a.route.clone()) else {
            return Ok(());
        };
        let tunnel = match (&self.proxy, route.proxied && route.origin.https) {
            (Some(proxy), true) => Some(Tunnel::new(&route.origin, proxy.authorization())),
            _ => None,
        };
        let mut conn = Conn::open(addr, &route.origin, self.tls.as_ref(), tunnel)?;
        self.poll
            .registry()
            .register(
                &mut conn.stream,
                Token(slot.0),
                Interest::READABLE | Interest::WRITABLE,
            )
            .map_err(|e| TransportFailure::new(TransportErrorKind::Other, e.to_string()))?;
        self.connecting += 1;
        self.out.connections_opened.fetch_add(1, Ordering::Relaxed);
        if let Some(account) = self.account(slot) {
            account.conn = Some(conn);
        }
        Ok(())
    }

    /// Opens the connections of waiting accounts, while fewer than `max_connecting` are
    /// being opened.
    fn open_queued(&mut self, now: Instant) -> Result<(), Stopped> {
        while self.connecting < self.max_connecting {
            let Some(slot) = self.connect_queue.pop_front() else {
                return Ok(());
            };
            let Some(account) = self.account(slot) else {
                continue;
            };
            if account.conn.is_some() || account.transfer.is_none() || account.resolving {
                continue; // its transfer ended (deadline), or it is on its way already
            }
            if let Err(failure) = self.open(slot, now) {
                self.abort(slot, failure, now);
                self.pump(slot, now)?;
            }
        }
        Ok(())
    }

    fn close(&mut self, mut conn: Conn) {
        if !conn.connected {
            self.connecting -= 1;
        }
        let _ = self.poll.registry().deregister(&mut conn.stream);
    }

    /// Ends the account's transfer with `failure`, closing its connection (the machine is
    /// told; the caller pumps).
    fn abort(&mut self, slot: Slot, failure: TransportFailure, now: Instant) {
        let Some(account) = self.account(slot) else {
            return;
        };
        let conn = account.conn.take();
        account.resolving = false;
        let transfer = account.transfer.take();
        if let Some(conn) = conn {
            self.close(conn);
        }
        if let Some(transfer) = transfer {
            self.fail_with(slot, transfer.id, failure, now);
        }
    }

    /// Readiness of the account's socket (`readable`: a readiness event said so), or its
    /// turn in the ready queue.
    fn on_socket(&mut self, slot: Slot, readable: bool, now: Instant) -> Result<(), Stopped> {
        let Some(account) = self.account(slot) else {
            return Ok(());
        };
        if account.transfer.is_none() {
            // An idle keep-alive connection became readable: the server closed it (or sent
            // something unasked). Either way it is not reused. (A turn in the ready queue
            // that outlived its transfer is nothing.)
            if readable {
                if let Some(conn) = account.conn.take() {
                    self.close(conn);
                }
            }
            return Ok(());
        }
        match self.io(slot) {
            Outcome::Pending => Ok(()),
            Outcome::More => {
                self.ready.push_back(slot);
                Ok(())
            }
            Outcome::Done { response, close } => {
                let Some(account) = self.account(slot) else {
                    return Ok(());
                };
                let conn = account.conn.take();
                let transfer = account.transfer.take();
                match conn {
                    Some(conn) if close => self.close(conn),
                    Some(mut conn) => {
                        conn.reused = true;
                        if let Some(account) = self.account(slot) {
                            account.conn = Some(conn);
                        }
                    }
                    None => {}
                }
                if let (Some(transfer), Some(account)) = (transfer, self.account(slot)) {
                    if let Err(e) = account.machine.handle_response(transfer.id, response, now) {
                        log::warn!("{:?}: response refused by the machine: {e}", account.key);
                    }
                }
                self.pump(slot, now)
            }
            Outcome::Failed(failure) => {
                self.abort(slot, failure, now);
                self.pump(slot, now)
            }
        }
    }

    /// Moves the bytes of the account's transfer: connect, tunnel, write, read, parse.
    /// Sockets are edge-triggered, so each direction goes on until it would block (or the
    /// read budget is spent).
    fn io(&mut self, slot: Slot) -> Outcome {
        let Some(account) = self.slots[slot.0].as_mut() else {
            return Outcome::Pending;
        };
        let (Some(conn), Some(transfer)) = (account.conn.as_mut(), account.transfer.as_mut())
        else {
            return Outcome::Pending;
        };
        if !conn.connected {
            match conn.check_connected() {
                Ok(true) => self.connecting -= 1,
                Ok(false) => return Outcome::Pending,
                Err(failure) => return Outcome::Failed(failure),
            }
        }
        if let Some(mut tunnel) = conn.tunnel.take() {
            match open_tunnel(conn, &mut tunnel, &mut self.scratch) {
                Ok(true) => {}
                Ok(false) => {
                    conn.tunnel = Some(tunnel);
                    return Outcome::Pending;
                }
                Err(failure) => return Outcome::Failed(failure),
            }
        }
        while transfer.written < transfer.bytes.len() {
            match conn.write(&transfer.bytes[transfer.written..]) {
                Ok(n) => transfer.written += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Outcome::Pending,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => match tls_failure(&e) {
                    Some(failure) => return Outcome::Failed(failure),
                    None => return self.lost(slot, e.to_string()),
                },
            }
        }
        // TLS records still queued go out as the socket takes them (a writable event later).
        match conn.flush() {
            Err(e)
                if !matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) =>
            {
                return self.lost(slot, e.to_string())
            }
            _ => {}
        }
        for _ in 0..READ_BUDGET {
            match conn.read(&mut self.scratch) {
                Ok(0) => return self.eof(slot),
                Ok(n) => match transfer.feed(&self.scratch[..n]) {
                    Ok(Some((response, close))) => return Outcome::Done { response, close },
                    Ok(None) => {}
                    Err(failure) => return Outcome::Failed(failure),
                },
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Outcome::Pending,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => match tls_failure(&e) {
                    Some(failure) => return Outcome::Failed(failure),
                    None => return self.lost(slot, e.to_string()),
                },
            }
        }
        Outcome::More
    }

    /// The server closed the connection during a transfer.
    fn eof(&mut self, slot: Slot) -> Outcome {
        let Some(transfer) = self.account(slot).and_then(|a| a.transfer.as_mut()) else {
            return Outcome::Pending;
        };
        if transfer.close_delimited() {
            return match transfer.finish() {
                Ok(response) => Outcome::Done {
                    response,
                    close: true,
                },
                Err(failure) => Outcome::Failed(failure),
            };
        }
        if transfer.in_body() {
            return Outcome::Failed(TransportFailure::new(
                TransportErrorKind::Truncated,
                "the connection closed inside the body",
            ));
        }
        self.lost(slot, "the connection closed before the answer".to_owned())
    }

    /// The connection broke: a keep-alive connection the server closed before answering gets
    /// the request once more on a fresh connection; anything else is a reset.
    fn lost(&mut self, slot: Slot, detail: String) -> Outcome {
        let Some(account) = self.account(slot) else {
            return Outcome::Pending;
        };
        let reused = account.conn.as_ref().is_some_and(|c| c.reused);
        let Some(transfer) = account.transfer.as_mut() else {
            return Outcome::Pending;
        };
        if reused && !transfer.answered && !transfer.retried {
            transfer.rewind();
            if let Some(conn) = account.conn.take() {
                self.close(conn);
            }
            return match self.open(slot, Instant::now()) {
                Ok(()) => Outcome::Pending,
                Err(failure) => Outcome::Failed(failure),
            };
        }
        Outcome::Failed(TransportFailure::new(TransportErrorKind::Reset, detail))
    }
}

/// Sends the tunnel's `CONNECT` and reads the proxy's answer: `Ok(true)` once open,
/// `Ok(false)` while waiting for the socket.
fn open_tunnel(
    conn: &mut Conn,
    tunnel: &mut Tunnel,
    scratch: &mut [u8],
) -> Result<bool, TransportFailure> {
    let lost = |detail: &str| {
        TransportFailure::new(
            TransportErrorKind::Connect,
            format!("the proxy connection failed: {detail}"),
        )
    };
    while tunnel.written < tunnel.request.len() {
        match conn.write_raw(&tunnel.request[tunnel.written..]) {
            Ok(n) => tunnel.written += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(lost(&e.to_string())),
        }
    }
    // Small reads: nothing past the proxy's answer may be taken from the socket.
    let buffer = &mut scratch[..1024];
    loop {
        match conn.read_raw(buffer) {
            Ok(0) => return Err(lost("the proxy closed the connection")),
            Ok(n) => {
                if tunnel.answered(&buffer[..n])? {
                    return Ok(true);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(lost(&e.to_string())),
        }
    }
}

impl<K: AccountKey> Outputs<K> {
    /// Publishes an account's states and errors (never blocks).
    fn publish(&self, account: &mut Account<K>) {
        while let Some(state) = account.machine.poll_state() {
            self.states.push(AccountState {
                account: account.key.clone(),
                state,
            });
        }
        while let Some(error) = account.machine.poll_error() {
            self.errors.push(AccountError {
                account: account.key.clone(),
                error,
            });
        }
    }
}
