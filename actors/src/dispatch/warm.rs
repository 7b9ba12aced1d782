//! Warm keys: the prefix keys a dispatcher sent lately, which its server's
//! prefix cache most likely still holds, so that its claims take jobs of
//! those keys first.

use std::collections::VecDeque;
use std::time::Duration;

use crate::prefix::{ClaimOrder, Grouping};

/// Prefix keys remembered as warm when the server does not say how much
/// its KV cache holds.
pub(crate) const WARM_KEYS_DEFAULT: usize = 32;

/// Prefix keys remembered as warm at most.
pub(crate) const WARM_KEYS_MAX: usize = 256;

/// After this many grouped claims in a row found no job to group (none of
/// a warm key, no two of one key), claims are plain, which costs the store
/// less…
const PLAIN_AFTER_MISSES: u32 = 8;
/// …but every this many claims one is grouped again, to notice when
/// shared prefixes come back (a plain claim that takes a job of a warm
/// key notices it too).
const GROUPED_PROBE_EVERY: u64 = 16;

/// The prefix keys sent lately, most recent first, as many as the server's
/// KV cache can hold.
#[derive(Debug, Default)]
pub(crate) struct WarmKeys {
    /// Most recent first.
    keys: VecDeque<String>,
    /// Prompt tokens per request lately (moving average), to size `keys`.
    prompt_tokens: Option<f64>,
    /// Claims in a row that found nothing to group.
    misses: u32,
    /// Claims made.
    claims: u64,
}

impl WarmKeys {
    /// How many prompt prefixes the server's KV cache holds: its capacity
    /// (`kv_cache_tokens`, from `vllm:cache_config_info`) over the prompt
    /// tokens of a request lately, or [`WARM_KEYS_DEFAULT`] when either is
    /// unknown.
    pub(crate) fn slots(&self, kv_cache_tokens: Option<f64>) -> usize {
        match (kv_cache_tokens, self.prompt_tokens) {
            (Some(kv), Some(p)) if p >= 1.0 => ((kv / p) as usize).clamp(1, WARM_KEYS_MAX),
            _ => WARM_KEYS_DEFAULT,
        }
    }

    /// Remembers that a job of `key` was just sent.
    pub(crate) fn warmed(&mut self, key: &str, kv_cache_tokens: Option<f64>) {
        if self.keys.front().map(String::as_str) != Some(key) {
            self.keys.retain(|k| k != key);
            self.keys.push_front(key.to_string());
        }
        self.keys.truncate(self.slots(kv_cache_tokens));
    }

    /// A request that used `tokens` prompt tokens finished.
    pub(crate) fn prompt_used(&mut self, tokens: u64) {
        let p = tokens as f64;
        self.prompt_tokens = Some(self.prompt_tokens.map_or(p, |m| 0.9 * m + 0.1 * p));
    }

    /// How many keys are held as warm.
    pub(crate) fn len(&self) -> usize {
        self.keys.len()
    }

    /// A claim took `keys` (its jobs' prefix keys): whether any was worth
    /// grouping (a warm key, or one two jobs share) decides whether the
    /// next claims are grouped.
    pub(crate) fn claimed<'a>(&mut self, keys: impl Iterator<Item = Option<&'a str>>) {
        self.claims += 1;
        let mut seen: Vec<&str> = Vec::new();
        let mut grouped = false;
        for k in keys.flatten() {
            if seen.contains(&k) || self.keys.iter().any(|w| w == k) {
                grouped = true;
                break;
            }
            seen.push(k);
        }
        self.misses = if grouped {
            0
        } else {
            self.misses.saturating_add(1)
        };
    }

    /// The order of the next claim: grouped by prefix key, warm keys first
    /// and no group held back longer than `grouping`; `None`: plain order.
    /// Plain too while grouping finds nothing to group (the jobs' prefixes
    /// are all different), but for a grouped claim now and then.
    pub(crate) fn claim_order(&self, grouping: Option<Duration>) -> ClaimOrder {
        let idle =
            self.misses >= PLAIN_AFTER_MISSES && !self.claims.is_multiple_of(GROUPED_PROBE_EVERY);
        match grouping {
            Some(_) if idle => ClaimOrder::Plain,
            Some(max_wait) => ClaimOrder::Grouped(Grouping {
                warm: self.keys.iter().cloned().collect(),
                max_wait,
            }),
            None => ClaimOrder::Plain,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claims_turn_plain_while_nothing_groups_and_grouped_again_when_something_does() {
        let grouped = |w: &WarmKeys| {
            matches!(
                w.claim_order(Some(Duration::from_secs(60))),
                ClaimOrder::Grouped(_)
            )
        };
        let mut w = WarmKeys::default();
        w.warmed("a", None);
        for i in 0..PLAIN_AFTER_MISSES {
            assert!(grouped(&w), "claim {i}");
            let k = format!("unique-{i}");
            w.claimed([Some(k.as_str()), Some("other")].into_iter());
        }
        assert!(!grouped(&w), "nothing grouped in 8 claims: plain");
        // A plain claim that takes a job of a warm key: grouped again.
        w.claimed([Some("x"), Some("a")].into_iter());
        assert!(grouped(&w));
        // Two jobs of one key in a claim count too.
        for i in 0..PLAIN_AFTER_MISSES {
            let k = format!("u2-{i}");
            w.claimed([Some(k.as_str())].into_iter());
        }
        assert!(!grouped(&w));
        w.claimed([Some("y"), Some("y")].into_iter());
        assert!(grouped(&w));
        // While plain, one claim in GROUPED_PROBE_EVERY is grouped.
        for i in 0..PLAIN_AFTER_MISSES {
            let k = format!("u3-{i}");
            w.claimed([Some(k.as_str())].into_iter());
        }
        let probes = (0..GROUPED_PROBE_EVERY)
            .filter(|i| {
                let g = grouped(&w);
                let k = format!("u4-{i}");
                w.claimed([Some(k.as_str())].into_iter());
                g
            })
            .count();
        assert_eq!(probes, 1);
    }

    #[test]
    fn a_key_sent_again_moves_to_the_front_once() {
        let mut w = WarmKeys::default();
        for k in ["a", "b", "a", "a"] {
            w.warmed(k, None);
        }
        assert_eq!(w.keys, ["a", "b"]);
    }

    #[test]
    fn the_kv_cache_over_the_prompt_size_bounds_the_keys() {
        let mut w = WarmKeys::default();
        assert_eq!(
            w.slots(Some(10_000.0)),
            WARM_KEYS_DEFAULT,
            "prompt size unknown"
        );
        w.prompt_used(1_000);
        assert_eq!(w.slots(None), WARM_KEYS_DEFAULT, "cache size unknown");
        assert_eq!(w.slots(Some(3_000.0)), 3);
        assert_eq!(w.slots(Some(10.0)), 1);
        assert_eq!(w.slots(Some(1e9)), WARM_KEYS_MAX);
        for k in ["a", "b", "c", "d"] {
            w.warmed(k, Some(3_000.0));
        }
        assert_eq!(w.keys, ["d", "c", "b"]);
    }

    #[test]
    fn the_prompt_size_is_a_moving_average() {
        let mut w = WarmKeys::default();
        w.prompt_used(100);
        w.prompt_used(200);
        assert_eq!(w.prompt_tokens, Some(110.0));
    }

    #[test]
    fn claims_take_warm_keys_first_only_when_grouping() {
        let mut w = WarmKeys::default();
        w.warmed("a", None);
        assert_eq!(w.claim_order(None), ClaimOrder::Plain);
        let max_wait = Duration::from_secs(5);
        assert_eq!(
            w.claim_order(Some(max_wait)),
            ClaimOrder::Grouped(Grouping {
                warm: vec!["a".to_string()],
                max_wait,
            })
        );
    }
}
