//! The claim buffer: jobs claimed and waiting for a free slot (about a
//! quarter of a window, highest priority first), and where the background
//! claim that tops it up stands.

use std::collections::VecDeque;

use crate::job::ClaimedJob;

/// Claimed jobs kept ready beside a window of `window` in flight.
pub(crate) fn buffer_target(window: usize) -> usize {
    (window / 4).max(2)
}

/// Where a dispatcher's claim cycle stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ClaimCycle {
    /// No claim under way; one may be made.
    Idle,
    /// A background claim is under way. `woken`: a Wake came meanwhile, so
    /// its answer may predate the new work and a short one does not mean
    /// the queue is dry.
    Asking {
        /// A Wake came while it was under way.
        woken: bool,
    },
    /// The last claim found fewer jobs than asked: wait for a Wake.
    Dry,
}

/// The claimed jobs not yet sent, and the claim cycle.
#[derive(Debug)]
pub(crate) struct ClaimBuffer {
    /// Highest priority first.
    jobs: VecDeque<ClaimedJob>,
    /// Where the claim cycle stands.
    cycle: ClaimCycle,
    /// Work came in since the last claim began: the next claim is made
    /// even with the buffer full enough, so that a job that outranks the
    /// buffered ones is claimed at once, not after half the buffer is sent.
    news: bool,
}

impl Default for ClaimBuffer {
    fn default() -> Self {
        ClaimBuffer {
            jobs: VecDeque::new(),
            cycle: ClaimCycle::Idle,
            news: false,
        }
    }
}

impl ClaimBuffer {
    /// Jobs buffered.
    pub(crate) fn len(&self) -> usize {
        self.jobs.len()
    }

    /// The next job to send.
    pub(crate) fn front(&self) -> Option<&ClaimedJob> {
        self.jobs.front()
    }

    /// Takes the next job to send.
    pub(crate) fn pop(&mut self) -> Option<ClaimedJob> {
        self.jobs.pop_front()
    }

    /// Takes every buffered job (to give them back).
    pub(crate) fn take_all(&mut self) -> VecDeque<ClaimedJob> {
        std::mem::take(&mut self.jobs)
    }

    /// Work may be available: a dry queue is worth asking again, and a
    /// claim under way may predate the work.
    pub(crate) fn woken(&mut self) {
        self.news = true;
        self.cycle = match self.cycle {
            ClaimCycle::Asking { .. } => ClaimCycle::Asking { woken: true },
            ClaimCycle::Idle | ClaimCycle::Dry => ClaimCycle::Idle,
        };
    }

    /// The instance became Ready: a queue found dry is worth asking again.
    pub(crate) fn retry_dry(&mut self) {
        if self.cycle == ClaimCycle::Dry {
            self.cycle = ClaimCycle::Idle;
        }
    }

    /// How many jobs to claim now, with `in_flight` requests under a window
    /// of `window`; a claim is then under way. Keeps a window in flight and
    /// a quarter of one buffered (enough to refill slots while a claim is
    /// under way, few enough that a job submitted with a higher priority is
    /// claimed soon); claims when half the buffer (or anything, if slots
    /// are idle) is missing, or when work came in since the last claim
    /// began (at least one job then: the queue hands out the highest
    /// priority first, so an urgent job is claimed at once).
    pub(crate) fn next_claim(&mut self, window: usize, in_flight: usize) -> Option<usize> {
        let spare = buffer_target(window);
        let held = in_flight + self.jobs.len();
        let want = (window + spare).saturating_sub(held);
        let slots_idle = in_flight < window;
        if self.cycle != ClaimCycle::Idle {
            return None;
        }
        let want = if self.news {
            want.max(1)
        } else if want == 0 || (want < spare.div_ceil(2) && !slots_idle) {
            return None;
        } else {
            want
        };
        self.news = false;
        self.cycle = ClaimCycle::Asking { woken: false };
        Some(want)
    }

    /// A claim for `asked` jobs brought `got`: fewer means the queue is dry,
    /// unless a Wake came meanwhile.
    pub(crate) fn answered(&mut self, asked: usize, got: usize) {
        let woken = matches!(self.cycle, ClaimCycle::Asking { woken: true });
        self.cycle = if got < asked && !woken {
            ClaimCycle::Dry
        } else {
            ClaimCycle::Idle
        };
    }

    /// A claim failed: wait for a Wake (the caller schedules one).
    pub(crate) fn failed(&mut self) {
        self.cycle = ClaimCycle::Dry;
    }

    /// Buffers claimed jobs, highest priority first (the queue hands each
    /// claim out in that order; a later claim may bring higher).
    pub(crate) fn keep(&mut self, jobs: Vec<ClaimedJob>) {
        self.jobs.extend(jobs);
        self.jobs
            .make_contiguous()
            .sort_by_key(|c| std::cmp::Reverse(c.job.priority));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_buffer_is_a_quarter_of_a_window_and_at_least_two() {
        assert_eq!(buffer_target(1), 2);
        assert_eq!(buffer_target(16), 4);
        assert_eq!(buffer_target(64), 16);
    }

    #[test]
    fn idle_slots_claim_at_once_busy_ones_when_half_the_buffer_is_missing() {
        let mut b = ClaimBuffer::default();
        assert_eq!(b.next_claim(16, 0), Some(20));
        assert_eq!(b.next_claim(16, 0), None, "one claim at a time");
        b.answered(20, 20);
        assert_eq!(b.next_claim(16, 16 + 3), None, "one of four spare missing");
        assert_eq!(b.next_claim(16, 16 + 2), Some(2), "half of them missing");
        b.answered(2, 2);
        assert_eq!(b.next_claim(16, 15), Some(5), "a slot is idle");
    }

    #[test]
    fn news_of_work_claims_at_once_even_with_the_buffer_full() {
        let mut b = ClaimBuffer::default();
        b.next_claim(16, 0);
        b.answered(20, 20);
        assert_eq!(b.next_claim(16, 20), None, "full: no claim");
        b.woken();
        assert_eq!(b.next_claim(16, 20), Some(1), "new work: one job at least");
        b.answered(1, 1);
        assert_eq!(b.next_claim(16, 21), None, "the news was claimed");
        b.woken();
        assert_eq!(
            b.next_claim(16, 16 + 1),
            Some(3),
            "what is missing, if more"
        );
    }

    #[test]
    fn a_short_answer_means_dry_unless_woken_meanwhile() {
        let mut b = ClaimBuffer::default();
        b.next_claim(4, 0);
        b.answered(6, 1);
        assert_eq!(b.next_claim(4, 0), None, "dry: wait for a Wake");
        b.woken();
        let n = b.next_claim(4, 0).unwrap();
        b.woken();
        b.answered(n, 0);
        assert!(b.next_claim(4, 0).is_some(), "woken while asking");
        b.failed();
        assert_eq!(b.next_claim(4, 0), None);
        b.retry_dry();
        assert!(b.next_claim(4, 0).is_some());
    }
}
