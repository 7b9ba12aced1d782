//! The running slots of the simulator without its engine model
//! (`--max-num-seqs` requests run at once, each for its fixed latency):
//! the rest wait in arrival order, or under `--scheduling-policy priority`
//! by their `priority` (lower first), then arrival, as vLLM's queue.

use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::sync::Mutex;

use tokio::sync::oneshot;

/// `n` slots handed out by arrival, or by priority then arrival.
pub struct Slots {
    by_priority: bool,
    state: Mutex<State>,
}

struct State {
    free: usize,
    waiting: BinaryHeap<Waiter>,
    arrivals: u64,
}

/// A request waiting for a slot; the heap's top is the smallest key.
struct Waiter {
    key: (i64, u64),
    grant: oneshot::Sender<()>,
}

impl PartialEq for Waiter {
    fn eq(&self, other: &Self) -> bool {
        self.key == other.key
    }
}
impl Eq for Waiter {}
impl PartialOrd for Waiter {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Waiter {
    fn cmp(&self, other: &Self) -> Ordering {
        other.key.cmp(&self.key)
    }
}

/// A slot held; given to the next waiter when dropped.
pub struct Slot<'a>(&'a Slots);

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.0.release();
    }
}

/// A wait for a slot; a slot granted to a wait given up is passed on.
struct Wait<'a> {
    slots: &'a Slots,
    granted: Option<oneshot::Receiver<()>>,
}

impl Drop for Wait<'_> {
    fn drop(&mut self) {
        if let Some(mut rx) = self.granted.take() {
            if rx.try_recv().is_ok() {
                self.slots.release();
            }
        }
    }
}

impl Slots {
    /// `n` slots (at least one).
    pub fn new(n: usize, by_priority: bool) -> Self {
        Slots {
            by_priority,
            state: Mutex::new(State {
                free: n.max(1),
                waiting: BinaryHeap::new(),
                arrivals: 0,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A slot, once one is free and no waiter comes before this request.
    pub async fn acquire(&self, priority: i64) -> Slot<'_> {
        let rx = {
            let mut s = self.lock();
            if s.free > 0 && s.waiting.is_empty() {
                s.free -= 1;
                return Slot(self);
            }
            s.arrivals += 1;
            let key = (if self.by_priority { priority } else { 0 }, s.arrivals);
            let (grant, rx) = oneshot::channel();
            s.waiting.push(Waiter { key, grant });
            rx
        };
        let mut wait = Wait {
            slots: self,
            granted: Some(rx),
        };
        let rx = wait.granted.as_mut().expect("set above");
        // The sender lives until it grants: an error cannot happen.
        let _ = rx.await;
        wait.granted = None;
        Slot(self)
    }

    /// A slot is free: to the first waiter still waiting, else kept.
    fn release(&self) {
        let mut s = self.lock();
        while let Some(w) = s.waiting.pop() {
            if w.grant.send(()).is_ok() {
                return;
            }
        }
        s.free += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    /// The order in which requests of `priorities`, queued in that order
    /// behind one running request, get the one slot.
    async fn order(by_priority: bool, priorities: &[i64]) -> Vec<usize> {
        let slots = Arc::new(Slots::new(1, by_priority));
        let first = slots.acquire(0).await;
        let got = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for (i, &p) in priorities.iter().enumerate() {
            let (mine, got) = (slots.clone(), got.clone());
            tasks.push(tokio::spawn(async move {
                let _slot = mine.acquire(p).await;
                got.lock().unwrap().push(i);
            }));
            // Each is queued before the next arrives.
            while slots.lock().waiting.len() < i + 1 {
                tokio::task::yield_now().await;
            }
        }
        drop(first);
        for t in tasks {
            t.await.unwrap();
        }
        Arc::try_unwrap(got).unwrap().into_inner().unwrap()
    }

    #[tokio::test]
    async fn waiters_get_slots_by_arrival_or_by_priority() {
        assert_eq!(order(false, &[0, 0, -10, 5]).await, [0, 1, 2, 3]);
        assert_eq!(order(true, &[0, 0, -10, 5]).await, [2, 0, 1, 3]);
    }

    #[tokio::test]
    async fn a_wait_given_up_passes_its_slot_on() {
        let slots = Slots::new(1, true);
        let held = slots.acquire(0).await;
        let gone = tokio::time::timeout(std::time::Duration::from_millis(1), slots.acquire(0));
        assert!(gone.await.is_err(), "no slot while one is held");
        drop(held);
        // The slot is free again, not lost to the abandoned wait.
        let _again = slots.acquire(0).await;
        assert_eq!(slots.lock().free, 0);
    }
}
