//! The allocator end to end, with the real daemon and real `gpu-feeder sim`
//! processes: the strategy follows the backlog, instances are drained and
//! relaunched with the new GPU memory share (visible on their command
//! lines), and no job is lost or failed across the switches.

mod common;

use std::time::Duration;

use common::{bin, cmdline, start_think_and_vision, wait_for, Scratch};

const LIMIT: Duration = Duration::from_secs(90);

/// Quick decisions, a 2 s dwell, and a larger memory share for a model
/// running alone.
const ALLOCATOR: &str = "interval_s = 0.2\nmin_dwell_s = 2\nshared_memory_utilization = 0.4\nsolo_memory_utilization = 0.75\n";

fn instance(name: &str, model: &str, port: u16) -> String {
    format!(
        "[[instances]]\nname = \"{name}\"\nmodel_type = \"{model}\"\nbackend = \"process\"\n\
         port = {port}\nserved_model_name = \"sim-{name}\"\n\
         command = [\"{}\", \"sim\", \"--load-s\", \"0.5\", \"--latency-ms\", \"300\"]\n\
         gpu_ids = []\ngpu_memory_utilization = 0.4\nmax_tokens = 8\n\n",
        bin()
    )
}

fn strategy(s: &Scratch) -> Option<String> {
    s.instances()
        .and_then(|v| v["strategy"].as_str().map(String::from))
}

fn memory_share(s: &Scratch, name: &str) -> Option<String> {
    let pid = s.instance(name)?["container_id"].as_str()?.to_string();
    let cmd = cmdline(pid)?;
    cmd.split("--gpu-memory-utilization ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .map(String::from)
}

#[test]
fn the_strategy_follows_the_backlog_and_no_job_is_lost() {
    let (s, _servers, d) = start_think_and_vision(ALLOCATOR, instance, LIMIT);
    assert_eq!(strategy(&s).as_deref(), Some("static"));

    // Only vision work: after the dwell, vision runs alone with the solo share.
    let submitted = std::time::Instant::now();
    s.submit_prompts("vision", "v", 600);
    wait_for("strategy vision", LIMIT, || {
        strategy(&s).as_deref() == Some("vision")
    });
    let decided = submitted.elapsed();
    wait_for("think parked, vision relaunched at 0.75", LIMIT, || {
        s.instance_is("think", "stopped")
            && s.instance_is("vision", "ready")
            && memory_share(&s, "vision").as_deref() == Some("0.75")
    });
    eprintln!(
        "figure: vision-only backlog → strategy vision {} ms (min_dwell_s = 2), \
         → vision relaunched at 0.75 and ready {} ms (0.5 s load, 300 ms requests drained)",
        decided.as_millis(),
        submitted.elapsed().as_millis()
    );
    let why = s.instances().unwrap()["allocator"]["why"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(why.contains("vision:") && why.contains("pending"), "{why}");

    // Think work arrives: it comes first, without waiting for the dwell;
    // with vision work still waiting both share the GPU. More vision work
    // arrives with it, so that the vision backlog outlasts the switch and
    // the checks below however slowly this machine runs them.
    let submitted = std::time::Instant::now();
    s.submit_prompts("think", "t", 100);
    s.submit_prompts("vision", "v2", 600);
    wait_for("strategy shared", LIMIT, || {
        strategy(&s).as_deref() == Some("shared")
    });
    eprintln!(
        "figure: think work arrives → strategy shared {} ms (think first: no dwell)",
        submitted.elapsed().as_millis()
    );
    wait_for("both running at 0.4", LIMIT, || {
        s.instance_is("think", "ready")
            && s.instance_is("vision", "ready")
            && memory_share(&s, "think").as_deref() == Some("0.4")
            && memory_share(&s, "vision").as_deref() == Some("0.4")
    });

    wait_for("every job done", Duration::from_secs(180), || {
        s.count("done") == 1300
    });
    assert_eq!(s.count("failed"), 0, "no job failed across the switches");
    let log = d.log();
    assert!(log.contains("strategy static → vision"), "{log}");
    assert!(log.contains("strategy vision → shared"), "{log}");
    assert!(
        s.jobs().iter().all(|j| j["attempts"].as_u64() <= Some(1)),
        "no retries were needed"
    );

    // Pin and unpin through the CLI.
    let pinned = s.run(&["strategy", "pin", "think"]);
    assert_eq!(pinned.code(), 0, "{}", pinned.stderr());
    assert!(
        pinned.stdout().contains("pinned to think"),
        "{}",
        pinned.stdout()
    );
    wait_for("think alone", LIMIT, || {
        strategy(&s).as_deref() == Some("think") && s.instance_is("vision", "stopped")
    });
    let shown = s.json(&["strategy", "show", "--json"]);
    assert_eq!(shown["pinned"], "think");
    let bad = s.run(&["strategy", "pin", "everything"]);
    bad.fails_saying("choose one of");
    let unpinned = s.run(&["strategy", "unpin"]);
    assert_eq!(unpinned.code(), 0, "{}", unpinned.stderr());
    assert!(
        unpinned.stdout().contains("unpinned"),
        "{}",
        unpinned.stdout()
    );
}
