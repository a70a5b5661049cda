//! A channel that never blocks its sender: when full, the oldest item is dropped. The
//! driver's and the reactor's `errors` and `states` channels, which must never slow a sync.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crossbeam_channel::{Receiver, Sender};

/// The sending side, with a receiver of its own to drop the oldest item; `dropped` counts
/// what was dropped, when given.
pub(crate) struct Lossy<T> {
    tx: Sender<T>,
    rx: Receiver<T>,
    dropped: Option<Arc<AtomicU64>>,
}

impl<T> Lossy<T> {
    pub(crate) fn new(tx: Sender<T>, rx: &Receiver<T>, dropped: Option<Arc<AtomicU64>>) -> Self {
        Self {
            tx,
            rx: rx.clone(),
            dropped,
        }
    }

    pub(crate) fn push(&self, mut item: T) {
        loop {
            match self.tx.try_send(item) {
                Ok(()) => return,
                Err(crossbeam_channel::TrySendError::Disconnected(_)) => return,
                Err(crossbeam_channel::TrySendError::Full(back)) => {
                    item = back;
                    if self.rx.try_recv().is_ok() {
                        if let Some(dropped) = &self.dropped {
                            dropped.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            }
        }
    }
}
