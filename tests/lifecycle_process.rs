//! The instance lifecycle with the `process` backend, end to end: the real
//! daemon launches real `gpu-feeder sim` processes (given vLLM's command
//! line), and the tests kill them with SIGKILL, restart the daemon, change
//! the configuration, feed a poison job, and watch a crash loop.

mod common;

use std::time::{Duration, Instant};

use common::{alive, bin, free_port, strings, wait_for, DaemonProcess, ProcessServers, Scratch};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

const LIMIT: Duration = Duration::from_secs(60);

fn settings(admin: u16, extra: &str) -> String {
    format!(
        "[admin]\nlisten = \"127.0.0.1:{admin}\"\n\n\
         [dispatch]\nexternal_poll_ms = 50\n\n\
         [health]\ninterval_s = 0.2\ntimeout_s = 2\nfailure_threshold = 2\n\
         restart_backoff_s = 0.2\nrestart_backoff_max_s = 1\n{extra}\n\n\
         [servers]\nstate_dir = \"servers\"\nstop_grace_s = 2\n\n"
    )
}

fn process(name: &str, model: &str, port: u16, sim_args: &str, extra: &str) -> String {
    let mut command = vec![format!("\"{}\"", bin()), "\"sim\"".into()];
    command.extend(sim_args.split_whitespace().map(|a| format!("\"{a}\"")));
    format!(
        "[[instances]]\nname = \"{name}\"\nmodel_type = \"{model}\"\nbackend = \"process\"\n\
         port = {port}\nserved_model_name = \"sim-{name}\"\nmodel = \"/models/{name}\"\n\
         command = [{}]\nargs = [\"--dtype\", \"bfloat16\", \"--max-num-seqs\", \"8\"]\n\
         max_tokens = 16\n{extra}\n\n",
        command.join(", ")
    )
}

fn kill9(pid: u32) {
    kill(Pid::from_raw(pid as i32), Signal::SIGKILL).expect("kill -9 the server");
}

#[test]
fn process_servers_launch_restart_after_kill9_and_are_adopted() {
    let admin = free_port();
    let (vp, tp) = (free_port(), free_port());
    let config = |think_mem: &str| {
        settings(admin, "")
            + &process(
                "vision",
                "vision",
                vp,
                "--load-s 2",
                "gpu_memory_utilization = 0.4",
            )
            + &process(
                "think",
                "think",
                tp,
                "--load-s 2 --latency-ms 300",
                &format!("gpu_memory_utilization = {think_mem}"),
            )
    };
    let s = Scratch::new(&config("0.4"));
    let _servers = ProcessServers(s.path().join("servers"));
    let started = Instant::now();
    let mut d = DaemonProcess::start_ready(&s, "daemon-1", &["vision", "think"], LIMIT);
    eprintln!(
        "figure: daemon start → both process servers ready (2 s load): {} ms",
        started.elapsed().as_millis()
    );
    // The server got vLLM's command line.
    let think = s.instance("think").unwrap();
    let states: Vec<&str> = strings(&think["history"], "to");
    assert_eq!(states, ["starting", "loading", "ready"], "{think}");
    let pid = s.pid_of("think");
    let cmdline = common::cmdline(pid).unwrap();
    for part in [
        "--model /models/think",
        "--served-model-name sim-think",
        &format!("--port {tp}"),
        "--gpu-memory-utilization 0.4",
        "--dtype bfloat16",
    ] {
        assert!(cmdline.contains(part), "{part} missing from {cmdline}");
    }

    // Jobs complete through both servers.
    s.submit_prompts("vision", "a", 20);
    s.submit_prompts("think", "a", 20);
    wait_for("40 done", LIMIT, || s.count("done") == 40);

    // kill -9 of the think server while jobs are in flight.
    s.submit_prompts("think", "b", 40);
    s.kill_in_flight_and_time_recovery("think", LIMIT, "process backend, kill -9", || kill9(pid));
    let think = s.instance("think").unwrap();
    assert!(
        think["last_error"].as_str().unwrap().contains("signal 9"),
        "{think}"
    );
    wait_for("every job done", LIMIT, || s.count("done") == 80);
    assert_eq!(s.count("failed"), 0);
    assert!(
        s.jobs().iter().any(|j| j["crashes"] == 1),
        "the jobs in flight at the kill were given back with the crash counted"
    );

    // SIGTERM: the servers stay up (keep_servers_on_exit) and the next
    // daemon adopts them without a restart.
    let (vpid, tpid) = (s.pid_of("vision"), s.pid_of("think"));
    d.term();
    assert_eq!(d.wait_exit(LIMIT), Some(0), "{}", d.log());
    assert!(alive(vpid) && alive(tpid), "the servers outlive the daemon");
    let restarted = Instant::now();
    let d2 = DaemonProcess::start_ready(&s, "daemon-2", &["vision", "think"], LIMIT);
    eprintln!(
        "figure: daemon restart → both adopted servers ready: {} ms",
        restarted.elapsed().as_millis()
    );
    for (name, pid) in [("vision", vpid), ("think", tpid)] {
        let i = s.instance(name).unwrap();
        assert_eq!(s.pid_of(name), pid, "{name} was adopted, not relaunched");
        assert_eq!(i["adopted"], true);
        assert_eq!(i["restarts"], 0);
    }
    s.submit_prompts("vision", "c", 10);
    wait_for("90 done", LIMIT, || s.count("done") == 90);
    drop(d2);

    // Another memory share for think: its server is recreated, vision's adopted.
    std::fs::write(s.config(), format!("[queue]\ndb_path = \"jobs.db\"\nresults_dir = \"results\"\nstage_dir = \"stage\"\n\n{}", config("0.5"))).unwrap();
    let _d3 = DaemonProcess::start_ready(&s, "daemon-3", &["vision", "think"], LIMIT);
    assert_eq!(s.pid_of("vision"), vpid);
    let new_think = s.pid_of("think");
    assert_ne!(new_think, tpid, "think was recreated");
    assert!(!alive(tpid), "the old think server was stopped");
    assert_eq!(s.instance("think").unwrap()["adopted"], false);
    let cmdline = common::cmdline(new_think).unwrap();
    assert!(
        cmdline.contains("--gpu-memory-utilization 0.5"),
        "{cmdline}"
    );
}

#[test]
fn a_poison_job_is_quarantined_and_the_server_recovers() {
    let admin = free_port();
    let s = Scratch::new(
        &(settings(admin, "")
            + &process(
                "think",
                "think",
                free_port(),
                "--load-s 0.5 --latency-ms 100 --crash-matching POISON",
                "",
            )),
    );
    let _servers = ProcessServers(s.path().join("servers"));
    let d = DaemonProcess::start_ready(&s, "daemon", &["think"], LIMIT);
    let r = s.run(&[
        "submit",
        "--model",
        "think",
        "--prompt",
        "POISON pill",
        "--json",
    ]);
    assert_eq!(r.code(), 0, "{}", r.stderr());
    let poison: serde_json::Value = serde_json::from_str(&r.stdout()).unwrap();
    let id = poison["id"].as_str().unwrap().to_string();
    s.submit_prompts("think", "fine", 10);
    let start = std::time::Instant::now();
    while s.json(&["status", &id, "--json"])["status"] != "failed" {
        assert!(
            start.elapsed() < LIMIT,
            "the poison job is not quarantined: {}\njobs: {:?}\n{}",
            s.json(&["status", &id, "--json"]),
            s.counts(),
            d.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let job = s.json(&["status", &id, "--json"]);
    let error = job["error"].as_str().unwrap();
    assert!(error.starts_with("poison job"), "{error}");
    assert_eq!(job["crashes"], 3);
    assert_eq!(job["attempts"], 0);
    wait_for("the others done", LIMIT, || s.count("done") == 10);
    wait_for("the server recovers", LIMIT, || {
        s.instance_is("think", "ready")
    });
    assert_eq!(s.instance("think").unwrap()["restarts"], 3);
}

#[test]
fn a_crash_looping_server_is_failed_and_its_jobs_wait() {
    let admin = free_port();
    let s = Scratch::new(&format!(
        "{}[[instances]]\nname = \"think\"\nmodel_type = \"think\"\nbackend = \"process\"\n\
         port = {}\nserved_model_name = \"m\"\n\
         command = [\"/bin/sh\", \"-c\", \"echo 'torch.OutOfMemoryError: CUDA out of memory' >&2; exit 1\", \"sh\"]\n\n",
        settings(admin, "crash_loop_restarts = 2\ncrash_loop_window_s = 600"),
        free_port()
    ));
    let _servers = ProcessServers(s.path().join("servers"));
    let d = DaemonProcess::start(&s, "daemon");
    s.submit_prompts("think", "waits", 3);
    wait_for("failed", LIMIT, || s.instance_is("think", "failed"));
    let i = s.instance("think").unwrap();
    assert_eq!(i["restarts"], 2);
    assert!(
        i["last_error"]
            .as_str()
            .unwrap()
            .contains("CUDA out of memory"),
        "the server's last output is shown: {i}"
    );
    assert!(i["reason"].as_str().unwrap().contains("crash loop"), "{i}");
    assert_eq!(
        s.count("pending"),
        3,
        "a job never fails because its server is down"
    );
    let table = s.run(&["instances"]).stdout();
    assert!(
        table.contains("failed") && table.contains("CUDA out of memory"),
        "{table}"
    );
    assert!(d.log().contains("crash loop"), "{}", d.log());

    // An operator launches it again: the crash-loop count starts over (it
    // fails again here, after two more restarts, as its cause is unfixed).
    let r = s.run(&["instances", "restart", "think"]);
    assert_eq!(r.code(), 0, "{}", r.stderr());
    assert!(r.stdout().contains("think: restarting"), "{}", r.stdout());
    wait_for("failed again after two more restarts", LIMIT, || {
        s.instance("think")
            .is_some_and(|i| i["state"] == "failed" && i["restarts"] == 4)
    });
    let unknown = s.run(&["instances", "restart", "nope"]);
    unknown.fails_saying("no instance named `nope`");
    assert_eq!(s.count("pending"), 3);
}

#[test]
fn a_killed_servers_own_children_do_not_outlive_it() {
    // vLLM's API server runs its engine in child processes that a `kill -9`
    // of the server leaves behind; here a shell starts such a child in the
    // server's process group, then becomes the simulated server.
    let admin = free_port();
    let s = Scratch::new(&settings(admin, ""));
    let child_pid = s.path().join("engine.pid");
    let script = format!(
        "sleep 600 & echo $! > '{}'; exec \"$0\" sim \"$@\"",
        child_pid.display()
    );
    let config = std::fs::read_to_string(s.config()).unwrap()
        + &format!(
            "[[instances]]\nname = \"think\"\nmodel_type = \"think\"\nbackend = \"process\"\n\
             port = {}\nserved_model_name = \"sim-think\"\n\
             command = [\"/bin/sh\", \"-c\", {script:?}, \"{}\"]\nmax_tokens = 16\n\n",
            free_port(),
            bin()
        );
    std::fs::write(s.config(), config).unwrap();
    let _servers = ProcessServers(s.path().join("servers"));
    let _d = DaemonProcess::start_ready(&s, "daemon", &["think"], LIMIT);
    let engine: u32 = std::fs::read_to_string(&child_pid)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(alive(engine));
    kill9(s.pid_of("think"));
    wait_for("relaunched", LIMIT, || {
        s.instance("think")
            .is_some_and(|i| i["state"] == "ready" && i["restarts"] == 1)
    });
    assert!(
        !alive(engine),
        "the dead server's child was killed before the relaunch"
    );
}
