//! The engine model's unit tests: each drives [`Engine`] through steps and
//! checks a rule of vLLM's scheduler it follows.

use super::*;

fn cfg() -> EngineConfig {
    EngineConfig {
        kv_cache_tokens: 1_000_000,
        max_num_seqs: 1024,
        ..EngineConfig::default()
    }
}

/// A prompt of `n` tokens unique to `tag`.
fn prompt(tag: u64, n: usize) -> Vec<u64> {
    (0..n as u64).map(|i| tag << 32 | i).collect()
}

fn req(id: u64, prompt: Vec<u64>, max_tokens: u32) -> EngineRequest {
    EngineRequest {
        id,
        prompt,
        max_tokens,
        priority: 0,
    }
}

/// The ids of `steps`' finished requests, in the order they finished.
fn finish_order(steps: &[Step]) -> Vec<u64> {
    steps
        .iter()
        .flat_map(|s| s.finished.iter().map(|f| f.id))
        .collect()
}

/// Keeps `concurrency` requests in the engine until `total` have run;
/// generated tokens per engine second, and the engine.
fn run_closed_loop(
    cfg: EngineConfig,
    concurrency: usize,
    total: u64,
    prompt_len: usize,
    out_len: u32,
) -> (f64, Engine) {
    let mut e = Engine::new(cfg);
    let mut next = 0u64;
    let mut done = 0u64;
    let submit = |e: &mut Engine, next: &mut u64| {
        e.add(req(*next, prompt(*next, prompt_len), out_len))
            .unwrap();
        *next += 1;
    };
    for _ in 0..concurrency.min(total as usize) {
        submit(&mut e, &mut next);
    }
    while done < total {
        let step = e.step().expect("work is left");
        for _ in &step.finished {
            done += 1;
            if next < total {
                submit(&mut e, &mut next);
            }
        }
    }
    (e.stats().generation_tokens as f64 / e.now(), e)
}

/// Steps until the engine is idle; every step.
fn drain(e: &mut Engine) -> Vec<Step> {
    std::iter::from_fn(|| e.step()).collect()
}

#[test]
fn throughput_rises_with_concurrency_then_flattens() {
    let rates: Vec<f64> = [1, 4, 16, 64, 256, 1024]
        .iter()
        .map(|&c| run_closed_loop(cfg(), c, (c as u64 * 4).max(64), 200, 64).0)
        .collect();
    for pair in rates.windows(2) {
        assert!(pair[1] > pair[0], "throughput falls: {rates:?}");
    }
    // One request decodes at about 1 / 6.55 ms (plus its prefill).
    assert!(rates[0] > 120.0 && rates[0] < 160.0, "{rates:?}");
    // Quadrupling the batch gains less and less: the curve flattens.
    let gains: Vec<f64> = rates.windows(2).map(|p| p[1] / p[0]).collect();
    assert!(gains[0] > 3.0, "{gains:?}");
    assert!(gains[4] < 1.6, "{gains:?}");
    assert!(gains.windows(2).all(|g| g[1] < g[0]), "{gains:?}");
}

#[test]
fn requests_beyond_the_kv_cache_are_preempted_and_counted() {
    // 64 requests of 100 + 400 tokens need 32,000 tokens at the end;
    // the cache holds 8,000: they cannot all run to the end together.
    let small = EngineConfig {
        kv_cache_tokens: 8_000,
        ..cfg()
    };
    let (_, e) = run_closed_loop(small, 64, 64, 100, 400);
    assert!(e.stats().preemptions > 0, "no preemption");
    assert_eq!(e.stats().successes, 64, "every request still finishes");
    assert_eq!(e.stats().generation_tokens, 64 * 400);
    assert_eq!(e.kv_usage(), 0.0, "every block is freed at the end");
    // With room for all of them, none is preempted.
    let (_, e) = run_closed_loop(cfg(), 64, 64, 100, 400);
    assert_eq!(e.stats().preemptions, 0);
}

#[test]
fn a_request_waits_until_blocks_for_its_whole_prompt_are_free() {
    // Ten blocks of 16 tokens (and the null block); chunks of 32 tokens.
    // A holds six blocks and grows; B's 80-token prompt needs five, its
    // first chunk two.
    let mut e = Engine::new(EngineConfig {
        kv_cache_tokens: 176,
        max_num_batched_tokens: 32,
        ..cfg()
    });
    e.add(req(1, prompt(1, 96), 60)).unwrap();
    for _ in 0..3 {
        e.step(); // A's prompt, 32 tokens a step
    }
    e.add(req(2, prompt(2, 80), 1)).unwrap();
    for _ in 0..10 {
        let s = e.step().unwrap();
        assert_eq!(s.admitted, 0, "B was admitted with 3 or 4 blocks free");
        assert_eq!((e.running(), e.waiting()), (1, 1));
    }
    assert!(
        e.kv_usage() < 0.8,
        "room for B's first chunk: {}",
        e.kv_usage()
    );
    // Once A is done, B runs.
    let steps = drain(&mut e);
    assert_eq!(steps.iter().map(|s| s.admitted).sum::<u32>(), 1);
    assert_eq!(e.stats().successes, 2);
    assert_eq!(e.stats().preemptions, 0);
}

#[test]
fn a_step_that_preempts_admits_nobody() {
    // Six blocks of 16 (and the null block). A and B share a 64-token
    // prompt: B holds A's
    // first three blocks and one of its own. When A needs a fifth block
    // B preempts itself; it could come back at once (its prompt is
    // cached, held by A, and one block is free) but vLLM admits nobody
    // in a step that preempted: it comes back in the next.
    let mut e = Engine::new(EngineConfig {
        kv_cache_tokens: 112,
        ..cfg()
    });
    let shared = prompt(1, 64);
    e.add(req(1, shared.clone(), 10)).unwrap();
    e.add(req(2, shared, 10)).unwrap();
    let s = e.step().unwrap();
    assert_eq!(s.admitted, 2);
    assert_eq!(s.prefill_tokens, 64 + 16, "B reuses three of A's blocks");
    let s = e.step().unwrap();
    assert_eq!((s.preempted, s.admitted), (1, 0));
    assert_eq!((e.running(), e.waiting()), (1, 1));
    let s = e.step().unwrap();
    assert_eq!((s.preempted, s.admitted), (0, 1));
    // A decodes; B computes only its last token again: the rest of its
    // 65 tokens is cached.
    assert_eq!(s.batch, 2);
    assert_eq!(s.prefill_tokens, 1);
    drain(&mut e);
    assert_eq!(e.stats().successes, 2);
    assert_eq!(e.stats().preemptions, 1);
}

#[test]
fn a_preempted_request_computes_again_only_what_the_cache_lost() {
    for caching in [true, false] {
        // Eight blocks of 16 (and the null block). A and B (16-token
        // prompts, 50 tokens out)
        // fill four blocks each; A's 65th token needs a fifth: B is
        // preempted, A takes one of B's freed blocks (its last: freed
        // blocks are evicted last block first) and finishes.
        let mut e = Engine::new(EngineConfig {
            kv_cache_tokens: 144,
            prefix_caching: caching,
            ..cfg()
        });
        e.add(req(1, prompt(1, 16), 50)).unwrap();
        e.add(req(2, prompt(2, 16), 50)).unwrap();
        let steps = drain(&mut e);
        assert_eq!(e.stats().preemptions, 1);
        let back = steps
            .iter()
            .find(|s| s.admitted == 1)
            .expect("B comes back");
        // B's 65 tokens (16 of prompt, 49 generated): its first three
        // blocks are still cached, its fourth was taken.
        let expected = if caching { 65 - 48 } else { 65 };
        assert_eq!(back.prefill_tokens, expected, "caching {caching}");
        let b = steps
            .iter()
            .flat_map(|s| &s.finished)
            .find(|f| f.id == 2)
            .unwrap();
        assert_eq!((b.generated, b.preemptions), (50, 1));
        // A preempted request's second lookup is not a prefix query.
        assert_eq!(e.stats().prefix_queries, 32);
    }
}

#[test]
fn a_repeated_prefix_hits_the_cache_and_skips_its_prefill() {
    for caching in [true, false] {
        let mut e = Engine::new(EngineConfig {
            prefix_caching: caching,
            ..cfg()
        });
        let shared = prompt(7, 2_000);
        e.add(req(1, shared.clone(), 4)).unwrap();
        let first: Vec<Finished> = drain(&mut e).into_iter().flat_map(|s| s.finished).collect();
        let mut again = shared.clone();
        again.extend(prompt(8, 40));
        e.add(req(2, again, 4)).unwrap();
        let steps = drain(&mut e);
        let prefill: u32 = steps.iter().map(|s| s.prefill_tokens).sum();
        let second: Vec<&Finished> = steps.iter().flat_map(|s| &s.finished).collect();
        let hit = second[0].cached_tokens;
        if caching {
            assert_eq!(hit, 2_000, "the whole shared prefix is cached");
            assert_eq!(prefill, 40, "only the new tokens are computed");
            assert!(second[0].ttft < first[0].ttft / 5.0);
            assert_eq!(e.stats().prefix_hits, 2_000);
            assert_eq!(e.stats().prefix_queries, 4_040);
        } else {
            assert_eq!(hit, 0);
            assert_eq!(prefill, 2_040);
        }
    }
}

#[test]
fn cached_blocks_are_evicted_least_recently_freed_and_last_block_first() {
    // 212 blocks of 16 (and the null block): room for two 1,600-token
    // prompts (100 blocks each) and a few blocks more.
    let mut e = Engine::new(EngineConfig {
        kv_cache_tokens: 3_416,
        ..cfg()
    });
    let mut run = |id: u64, p: Vec<u64>| -> u32 {
        e.add(req(id, p, 1)).unwrap();
        drain(&mut e)
            .iter()
            .flat_map(|s| &s.finished)
            .map(|f| f.cached_tokens)
            .sum()
    };
    assert_eq!(run(1, prompt(1, 1_600)), 0);
    assert_eq!(run(2, prompt(2, 1_600)), 0);
    assert_eq!(run(3, prompt(2, 1_600)), 1_584, "2 is still cached");
    // 3 takes the 12 blocks never used, then 88 of 1's, from its end.
    assert_eq!(run(4, prompt(3, 1_600)), 0);
    assert_eq!(
        run(5, prompt(1, 1_600)),
        11 * 16,
        "1's first 11 blocks remain"
    );
    // 1 took 89 blocks: the next least recently freed, 2's, from its end.
    assert_eq!(run(6, prompt(2, 1_600)), 12 * 16);
}

#[test]
fn a_request_arriving_mid_step_waits_for_it_but_not_in_the_queue() {
    let mut e = Engine::new(cfg());
    e.add(req(1, prompt(1, 100), 10)).unwrap();
    let s = e.step().unwrap();
    // 2 came in halfway through that step, 3 at its end.
    e.add_at(req(2, prompt(2, 100), 1), e.now() - s.duration / 2.0)
        .unwrap();
    e.add(req(3, prompt(3, 100), 1)).unwrap();
    let next = e.step().unwrap();
    let done: Vec<Finished> = next
        .finished
        .into_iter()
        .chain(drain(&mut e).into_iter().flat_map(|s| s.finished))
        .collect();
    let f = |id| done.iter().find(|f| f.id == id).unwrap().clone();
    // Both ran in the next step; 2 waited half a step more for it.
    assert_eq!((f(2).queued, f(3).queued), (0.0, 0.0));
    assert!((f(3).ttft - next.duration).abs() < 1e-12);
    assert!((f(2).ttft - next.duration - s.duration / 2.0).abs() < 1e-12);
    assert_eq!(e.stats().queue_time.count, 3);
}

#[test]
fn a_request_larger_than_the_kv_cache_is_refused() {
    // 64 blocks of 16, less the null block.
    let mut e = Engine::new(EngineConfig {
        kv_cache_tokens: 1_024,
        ..cfg()
    });
    let (_, why) = e.add(req(1, prompt(1, 1_000), 100)).unwrap_err();
    assert_eq!(
        why,
        Rejected::TooLong {
            tokens: 1_100,
            capacity: 1_008
        }
    );
    assert!(e.add(req(2, prompt(2, 1_000), 8)).is_ok());
}

#[test]
fn a_full_queue_refuses_new_requests() {
    let mut e = Engine::new(EngineConfig {
        max_num_queued_reqs: Some(2),
        ..cfg()
    });
    let r = |id| req(id, prompt(id, 10), 1);
    assert!(e.add(r(1)).is_ok());
    assert!(e.add(r(2)).is_ok());
    assert_eq!(e.add(r(3)).unwrap_err().1, Rejected::QueueFull);
    e.step();
    assert!(e.add(r(3)).is_ok(), "room again once they run");
}

#[test]
fn the_prefix_cache_can_be_reset_when_idle() {
    let mut e = Engine::new(cfg());
    e.add(req(1, prompt(1, 100), 1_000)).unwrap();
    e.step();
    assert!(!e.reset_prefix_cache(), "a request holds blocks");
    drain(&mut e);
    assert!(e.reset_prefix_cache());
    e.add(req(2, prompt(1, 100), 1)).unwrap();
    let f: Vec<Finished> = drain(&mut e).into_iter().flat_map(|s| s.finished).collect();
    assert_eq!(f[0].cached_tokens, 0);
}

#[test]
fn a_step_reads_the_context_of_each_of_its_requests() {
    let mut e = Engine::new(EngineConfig {
        step_ms_per_1k_context: 2.0,
        ..cfg()
    });
    e.add(req(1, prompt(1, 1_000), 10)).unwrap();
    e.add(req(2, prompt(2, 3_000), 10)).unwrap();
    e.step();
    let s = e.step().unwrap();
    // Two decodes over 1,001 and 3,001 tokens.
    assert_eq!(s.context_tokens, 4_002);
    let expected = (6.5 + 0.05 * 2.0 + 2.0 * 4.002) / 1000.0;
    assert!((s.duration - expected).abs() < 1e-9, "{}", s.duration);
}

#[test]
fn chunked_prefill_shares_the_step_budget_with_decodes() {
    let mut e = Engine::new(cfg());
    e.add(req(1, prompt(1, 100), 1_000)).unwrap();
    e.step();
    e.add(req(2, prompt(2, 20_000), 1)).unwrap();
    let s = e.step().unwrap();
    // One decode, then as much of the long prompt as the budget allows.
    assert_eq!(s.batch, 2);
    assert_eq!(s.prefill_tokens, 8_191);
    let expected = (6.5 + 0.05 * 2.0 + 32.0 * 8.191) / 1000.0;
    assert!((s.duration - expected).abs() < 1e-9, "{}", s.duration);
}

#[test]
fn under_the_priority_policy_a_later_urgent_request_is_admitted_first() {
    // One running slot: A runs; B (bulk) and U (urgent, priority -10,
    // arrived after B) wait. First come first served B runs next; under
    // the priority policy U does, then B.
    for (priority_policy, want) in [(false, vec![1, 2, 3]), (true, vec![1, 3, 2])] {
        let mut e = Engine::new(EngineConfig {
            max_num_seqs: 1,
            priority_policy,
            ..cfg()
        });
        e.add(req(1, prompt(1, 32), 4)).unwrap();
        e.step();
        e.add(req(2, prompt(2, 32), 4)).unwrap();
        e.add(EngineRequest {
            priority: -10,
            ..req(3, prompt(3, 32), 4)
        })
        .unwrap();
        assert_eq!(
            finish_order(&drain(&mut e)),
            want,
            "priority policy {priority_policy}"
        );
    }
}

#[test]
fn under_the_priority_policy_the_lowest_priority_is_preempted_for_blocks() {
    // Ten blocks of 16 tokens. B (bulk) is admitted, then U (urgent); each
    // grows to 6 blocks, so blocks run out while U, the later admitted,
    // asks for one. First come first served U preempts itself; under the
    // priority policy it preempts B, which ran before it in the same step
    // (its tokens go back to the step's budget), and finishes first.
    for (priority_policy, urgent_first) in [(false, false), (true, true)] {
        let mut e = Engine::new(EngineConfig {
            kv_cache_tokens: 176,
            max_num_batched_tokens: 256,
            priority_policy,
            ..cfg()
        });
        e.add(req(1, prompt(1, 16), 80)).unwrap();
        e.step();
        e.add(EngineRequest {
            priority: -10,
            ..req(2, prompt(2, 16), 80)
        })
        .unwrap();
        let steps = drain(&mut e);
        assert!(steps.iter().any(|s| s.preempted > 0), "blocks ran out");
        let order = finish_order(&steps);
        assert_eq!(
            order.first() == Some(&2),
            urgent_first,
            "priority policy {priority_policy}: finished {order:?}"
        );
        assert_eq!(e.stats().successes, 2);
        assert_eq!(e.kv_usage(), 0.0, "every block is freed at the end");
    }
}
