//! Prefix-aware claiming: which jobs share a prompt prefix, and the order in
//! which a claim hands them out so that the server's prefix cache is hit.
//!
//! A server reuses the KV blocks of a prompt prefix it has just computed
//! (vLLM's automatic prefix caching) only while they are still cached, that
//! is, only if the requests sharing it run close together. Arrival order
//! interleaves them with everything else. So each job carries a *prefix
//! key*, set at submission ([`prefix_key`]): the hash of its system prompt
//! and of the leading part of its first user message (the image, for an
//! image question; the leading text otherwise), or its parent's id for a
//! fragment. A claim then takes jobs a key at a time ([`pick`]):
//!
//! 1. priority first, as in plain order;
//! 2. a group whose oldest job has waited longer than
//!    [`Grouping::max_wait`] next, oldest first: grouping never starves a job;
//! 3. then the keys the claiming instance was sent last
//!    ([`Grouping::warm`]: those its cache most likely still holds, as many
//!    as it can hold), most recent first;
//! 4. then the other groups, each whole, in order of their oldest job.
//!
//! Jobs without a key (rows inserted by other programs) are groups of one.
//! Adapters run [`pick`] over the candidates they read: the oldest
//! [`lookahead`]`(n)` due jobs and every due job of a warm key, so a group
//! spread over a long backlog is completed by the claims that follow.

use std::collections::HashMap;
use std::time::Duration;

use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::time::Timestamp;

/// Bytes of the first user message that make up its prefix key: about 128
/// tokens, eight of vLLM's 16-token blocks.
pub(crate) const LEAD_BYTES: usize = 512;

/// How a claim orders the jobs it may take, beyond priority.
#[derive(Clone, Debug, Default, PartialEq)]
pub enum ClaimOrder {
    /// Priority, then age (the order of `gpu_jobs_claim`).
    #[default]
    Plain,
    /// Priority, then groups of one prefix key (see the module docs).
    Grouped(Grouping),
}

/// What a grouped claim knows of the claiming instance.
#[derive(Clone, Debug, PartialEq)]
pub struct Grouping {
    /// Prefix keys recently sent to the instance, most recent first.
    pub warm: Vec<String>,
    /// A group whose oldest job is older than this goes first (within its
    /// priority), whatever the warm keys.
    pub max_wait: Duration,
}

/// One job a grouped claim may take, as an adapter reads it.
#[derive(Clone, Debug, PartialEq)]
pub struct Candidate {
    /// The adapter's order of insertion (rowid): the last tie-break.
    pub seq: i64,
    /// Higher first.
    pub priority: i64,
    /// Submission time.
    pub created_at: Timestamp,
    /// The job's prefix key, if it has one.
    pub key: Option<String>,
}

/// How many of the oldest due jobs a grouped claim of `n` considers, beside
/// those of warm keys: enough to find whole groups, few enough that a claim
/// stays cheap over a backlog of millions. It grows with `n`, so that each
/// job claimed costs the same few rows read: a dispatcher tops its buffer
/// up with claims of a few jobs, and a floor of a thousand rows per claim
/// made reading candidates the larger part of its CPU time. A group not
/// wholly within the lookahead is completed by the claims that follow, as
/// its key is warm by then.
pub fn lookahead(n: usize) -> usize {
    n.saturating_mul(8).clamp(64, 8_192)
}

/// The candidates a claim of `n` takes, as indices into `cands`, in the
/// order they are to be sent.
pub fn pick(cands: &[Candidate], n: usize, grouping: &Grouping, now: Timestamp) -> Vec<usize> {
    struct Group {
        priority: i64,
        first: (Timestamp, i64),
        members: Vec<usize>,
        warm: usize,
    }
    let warm: HashMap<&str, usize> = grouping
        .warm
        .iter()
        .enumerate()
        .rev()
        .map(|(i, k)| (k.as_str(), i))
        .collect();
    let mut groups: Vec<Group> = Vec::new();
    let mut index: HashMap<(i64, &str), usize> = HashMap::new();
    for (i, c) in cands.iter().enumerate() {
        let at = (c.created_at, c.seq);
        let slot = match c.key.as_deref() {
            Some(k) => *index.entry((c.priority, k)).or_insert_with(|| {
                groups.push(Group {
                    priority: c.priority,
                    first: at,
                    members: Vec::new(),
                    warm: warm.get(k).copied().unwrap_or(usize::MAX),
                });
                groups.len() - 1
            }),
            None => {
                groups.push(Group {
                    priority: c.priority,
                    first: at,
                    members: Vec::new(),
                    warm: usize::MAX,
                });
                groups.len() - 1
            }
        };
        let g = &mut groups[slot];
        g.first = g.first.min(at);
        g.members.push(i);
    }
    let overdue = now - grouping.max_wait;
    groups.sort_by_key(|g| {
        let late = g.first.0 <= overdue;
        // Overdue groups by age alone; the others warm first.
        let rank = if late { 0 } else { g.warm };
        (std::cmp::Reverse(g.priority), !late, rank, g.first)
    });
    let mut out = Vec::with_capacity(n.min(cands.len()));
    for mut g in groups {
        g.members
            .sort_by_key(|&i| (cands[i].created_at, cands[i].seq));
        for i in g.members {
            if out.len() == n {
                return out;
            }
            out.push(i);
        }
    }
    out
}

/// The prefix key of a payload (the JSON a job carries): the hash of its
/// system prompt and of the head of its first user message (the first image
/// part, or the first [`LEAD_BYTES`] of its text), so that a `prompt` and
/// the `messages` it stands for get the same key. `None` when the payload
/// has neither (it is then grouped with nothing). An `image_path` payload
/// is keyed by its path here; the submitter keys it by the image's bytes.
pub fn prefix_key(payload: &Value) -> Option<String> {
    let mut system = String::new();
    let mut head: Option<(&str, String)> = None;
    if let Some(messages) = payload.get("messages").and_then(Value::as_array) {
        for m in messages {
            match m.get("role").and_then(Value::as_str) {
                Some("system") => system.push_str(&text_of(m.get("content"))),
                Some("user") => {
                    head = user_head(m.get("content"));
                    break;
                }
                _ => {}
            }
        }
    } else if let Some(prompt) = payload.get("prompt").and_then(Value::as_str) {
        head = Some(("text", lead(prompt).to_string()));
    } else if let Some(path) = payload.get("image_path").and_then(Value::as_str) {
        head = Some(("image-path", path.to_string()));
    }
    let (kind, head) = head?;
    Some(key_of(&system, kind, head.as_bytes()))
}

/// The prefix key of an image job, from the image's bytes.
pub fn image_key(bytes: &[u8]) -> String {
    key_of("", "image", bytes)
}

fn key_of(system: &str, kind: &str, head: &[u8]) -> String {
    let mut h = Sha256::new();
    h.update(system.as_bytes());
    h.update([0]);
    h.update(kind.as_bytes());
    h.update([0]);
    h.update(head);
    hex::encode(&h.finalize()[..16])
}

/// The first [`LEAD_BYTES`] of `text`, cut at a character boundary.
fn lead(text: &str) -> &str {
    let mut end = text.len().min(LEAD_BYTES);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// The text of a message's content: a string, or its text parts joined.
fn text_of(content: Option<&Value>) -> String {
    match content {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(parts)) => parts
            .iter()
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect(),
        _ => String::new(),
    }
}

/// The head of a user message: its first image part (by URL, which for
/// inline images holds the bytes), else the lead of its text.
fn user_head(content: Option<&Value>) -> Option<(&'static str, String)> {
    if let Some(Value::Array(parts)) = content {
        let image = parts.iter().find_map(|p| {
            p.get("image_url")
                .and_then(|u| u.get("url").or(Some(u)))
                .and_then(Value::as_str)
        });
        if let Some(url) = image {
            return Some(("image-url", url.to_string()));
        }
    }
    let text = text_of(content);
    (!text.is_empty()).then(|| ("text", lead(&text).to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// Candidates in claim order (`seq` 1, 2, …), one per
    /// `(priority, created_at in seconds, prefix key)`; the key `-` is none.
    fn cands(rows: &[(i64, i64, &str)]) -> Vec<Candidate> {
        (1..)
            .zip(rows)
            .map(|(seq, &(priority, at, key))| Candidate {
                seq,
                priority,
                created_at: Timestamp::from_secs_f64(at as f64),
                key: (key != "-").then(|| key.to_string()),
            })
            .collect()
    }

    fn grouping(warm: &[&str], max_wait_s: u64) -> Grouping {
        Grouping {
            warm: warm.iter().map(|s| s.to_string()).collect(),
            max_wait: Duration::from_secs(max_wait_s),
        }
    }

    fn keys(cands: &[Candidate], picked: &[usize]) -> Vec<String> {
        picked
            .iter()
            .map(|&i| cands[i].key.clone().unwrap_or_else(|| "-".into()))
            .collect()
    }

    /// The keys `pick` takes from `cands` (`-` for none), with `warm` keys
    /// and groups that wait at most `max_wait_s`, at `now_s`.
    fn picked(
        cands: &[Candidate],
        n: usize,
        warm: &[&str],
        max_wait_s: u64,
        now_s: f64,
    ) -> Vec<String> {
        let now = Timestamp::from_secs_f64(now_s);
        keys(cands, &pick(cands, n, &grouping(warm, max_wait_s), now))
    }

    #[test]
    fn groups_come_whole_in_order_of_their_oldest_job() {
        let cands = cands(&[
            (0, 10, "a"),
            (0, 11, "b"),
            (0, 12, "a"),
            (0, 13, "-"),
            (0, 14, "b"),
            (0, 15, "a"),
        ]);
        let now = Timestamp::from_secs_f64(20.0);
        let p = pick(&cands, 10, &grouping(&[], 600), now);
        assert_eq!(keys(&cands, &p), ["a", "a", "a", "b", "b", "-"]);
        assert_eq!(p[..3], [0, 2, 5], "a group in age order");
    }

    #[test]
    fn warm_keys_first_then_overdue_groups_before_them() {
        let cands = cands(&[(0, 10, "old"), (0, 50, "hot"), (0, 60, "new")]);
        assert_eq!(
            picked(&cands, 3, &["hot"], 600, 70.0),
            ["hot", "old", "new"]
        );
        // Once `old` has waited past max_wait, it goes before the warm key.
        assert_eq!(picked(&cands, 3, &["hot"], 30, 70.0), ["old", "hot", "new"]);
    }

    #[test]
    fn priority_wins_over_grouping_and_warmth() {
        let cands = cands(&[(0, 10, "hot"), (5, 50, "cold"), (0, 11, "hot")]);
        assert_eq!(picked(&cands, 2, &["hot"], 1, 99.0), ["cold", "hot"]);
    }

    #[test]
    fn the_most_recent_warm_key_comes_first_and_n_is_respected() {
        let cands = cands(&[(0, 1, "x"), (0, 2, "y"), (0, 3, "y")]);
        assert_eq!(picked(&cands, 2, &["y", "x"], 600, 4.0), ["y", "y"]);
        assert!(picked(&cands, 0, &[], 1, 4.0).is_empty());
    }

    #[test]
    fn a_prompt_and_the_messages_it_stands_for_share_a_key() {
        let doc = "d".repeat(3 * LEAD_BYTES);
        let a = prefix_key(&json!({"prompt": format!("{doc} first question")}));
        let b = prefix_key(&json!({"messages": [
            {"role": "user", "content": [{"type": "text", "text": format!("{doc} second")}]}
        ]}));
        assert!(a.is_some());
        assert_eq!(a, b, "the same leading text is the same prefix");
        let other = prefix_key(&json!({"prompt": format!("e{doc}")}));
        assert_ne!(a, other);
        let with_system = prefix_key(&json!({"messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": format!("{doc} first question")}
        ]}));
        assert_ne!(a, with_system, "the system prompt is part of the prefix");
    }

    #[test]
    fn image_questions_are_keyed_by_the_image() {
        let q = |url: &str, text: &str| {
            prefix_key(&json!({"messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": url}},
                {"type": "text", "text": text},
            ]}]}))
        };
        assert_eq!(
            q("data:image/png;base64,AAAA", "what?"),
            q("data:image/png;base64,AAAA", "why?")
        );
        assert_ne!(
            q("data:image/png;base64,AAAA", "what?"),
            q("data:image/png;base64,BBBB", "what?")
        );
        assert_eq!(prefix_key(&json!({"max_tokens": 3})), None);
        assert_ne!(image_key(b"png"), image_key(b"jpg"));
    }

    #[test]
    fn the_lead_is_cut_at_a_character_boundary() {
        let text = "é".repeat(LEAD_BYTES);
        assert!(lead(&text).len() <= LEAD_BYTES);
        assert!(prefix_key(&json!({ "prompt": text })).is_some());
    }
}
