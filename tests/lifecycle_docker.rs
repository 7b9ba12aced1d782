//! The instance lifecycle with the `docker` backend, end to end, on the real
//! Docker engine: the real daemon launches two containers of the simulated
//! server's image (`gpu-feeder-sim:test`, given vLLM's command line),
//! completes jobs through them, notices a `docker kill` and restarts the
//! container, adopts both containers after a daemon restart, and replaces a
//! stale stopped container of the same name.
//!
//! These tests need a running Docker engine; they fail, naming what to do,
//! when there is none (`.ci/run` starts one).

mod common;

use std::time::{Duration, Instant};

use common::docker::{docker, docker_ok, prepared, IMAGE};
use common::{free_port, wait_for, DaemonProcess, Scratch};

const LIMIT: Duration = Duration::from_secs(90);

/// Removes the test's containers, whatever happens.
struct Containers(Vec<String>);

impl Drop for Containers {
    fn drop(&mut self) {
        for name in &self.0 {
            let _ = docker(&["rm", "-f", name]);
        }
    }
}

fn config(admin: u16, instances: &[(&str, &str, u16)]) -> String {
    let mut out = format!(
        "[admin]\nlisten = \"127.0.0.1:{admin}\"\n\n\
         [dispatch]\nexternal_poll_ms = 50\n\n\
         [health]\ninterval_s = 0.25\ntimeout_s = 2\nfailure_threshold = 2\n\
         restart_backoff_s = 0.25\nrestart_backoff_max_s = 1\n\n\
         [servers]\nstop_grace_s = 2\n\n"
    );
    for (name, model, port) in instances {
        out.push_str(&format!(
            "[[instances]]\nname = \"{name}\"\nmodel_type = \"{model}\"\nbackend = \"docker\"\n\
             image = \"{IMAGE}\"\nport = {port}\nserved_model_name = \"sim-{model}\"\n\
             model = \"/models/{model}\"\nargs = [\"--load-s\", \"2\", \"--latency-ms\", \"200\", \"--dtype\", \"bfloat16\"]\n\
             gpu_ids = []\ngpu_memory_utilization = 0.35\ndocker_network = \"host\"\nshm_size = \"64m\"\nmax_tokens = 16\n\n"
        ));
    }
    out
}

fn container_id(s: &Scratch, name: &str) -> String {
    let i = s.instance(name).expect("the daemon answers");
    i["container_id"]
        .as_str()
        .unwrap_or_else(|| panic!("no container id for {name}: {i}"))
        .to_string()
}

#[test]
fn docker_servers_run_jobs_survive_a_kill_and_are_adopted_after_a_daemon_restart() {
    prepared();
    let tag = std::process::id();
    let (vision, think) = (format!("v{tag}"), format!("t{tag}"));
    let _cleanup = Containers(vec![
        format!("gpu-feeder-{vision}"),
        format!("gpu-feeder-{think}"),
    ]);
    let think_port = free_port();
    let s = Scratch::new(&config(
        free_port(),
        &[
            (&vision, "vision", free_port()),
            (&think, "think", think_port),
        ],
    ));
    let started = Instant::now();
    let mut d = DaemonProcess::start(&s, "daemon-1");
    wait_for("both containers ready", LIMIT, || {
        s.instance_is(&vision, "ready") && s.instance_is(&think, "ready")
    });
    eprintln!(
        "figure: daemon start → both Docker servers ready (2 s load): {} ms",
        started.elapsed().as_millis()
    );
    // The containers carry our labels and vLLM's command line.
    let think_id = container_id(&s, &think);
    let labels = docker_ok(&["inspect", "-f", "{{json .Config.Labels}}", &think_id]);
    assert!(
        labels.contains("io.gpu-feeder.managed-by") && labels.contains(&think),
        "{labels}"
    );
    let cmd: Vec<String> = serde_json::from_str(&docker_ok(&[
        "inspect",
        "-f",
        "{{json .Config.Cmd}}",
        &think_id,
    ]))
    .unwrap();
    let port = think_port.to_string();
    assert_eq!(
        cmd,
        [
            "--model",
            "/models/think",
            "--served-model-name",
            "sim-think",
            "--port",
            port.as_str(),
            "--gpu-memory-utilization",
            "0.35",
            "--scheduling-policy",
            "priority",
            "--load-s",
            "2",
            "--latency-ms",
            "200",
            "--dtype",
            "bfloat16",
        ]
    );

    s.submit_prompts("vision", "a", 20);
    s.submit_prompts("think", "a", 20);
    wait_for("40 done", LIMIT, || s.count("done") == 40);

    // `docker kill` of the think container while its jobs are in flight.
    s.submit_prompts("think", "b", 40);
    s.kill_in_flight_and_time_recovery(&think, LIMIT, "Docker backend, docker kill", || {
        docker_ok(&["kill", &think_id]);
    });
    let i = s.instance(&think).unwrap();
    assert!(
        i["last_error"].as_str().unwrap().contains("137"),
        "the exit code is reported: {i}"
    );
    assert_ne!(container_id(&s, &think), think_id, "a new container");
    wait_for("every job done", LIMIT, || s.count("done") == 80);
    assert_eq!(s.count("failed"), 0);

    // A daemon restart adopts both containers: same ids, no restart.
    let ids = (container_id(&s, &vision), container_id(&s, &think));
    d.term();
    assert_eq!(d.wait_exit(LIMIT), Some(0), "{}", d.log());
    for id in [&ids.0, &ids.1] {
        let running = docker_ok(&["inspect", "-f", "{{.State.Running}}", id]);
        assert_eq!(running.trim(), "true", "the containers outlive the daemon");
    }
    let restarted = Instant::now();
    let d2 = DaemonProcess::start(&s, "daemon-2");
    wait_for("both ready after the daemon restart", LIMIT, || {
        s.instance_is(&vision, "ready") && s.instance_is(&think, "ready")
    });
    eprintln!(
        "figure: daemon restart → both adopted containers ready: {} ms",
        restarted.elapsed().as_millis()
    );
    assert_eq!((container_id(&s, &vision), container_id(&s, &think)), ids);
    for name in [&vision, &think] {
        let i = s.instance(name).unwrap();
        assert_eq!(i["adopted"], true, "{i}");
        assert_eq!(i["restarts"], 0, "{i}");
    }
    s.submit_prompts("vision", "c", 10);
    wait_for("90 done", LIMIT, || s.count("done") == 90);
    drop(d2);
}

#[test]
fn a_stale_stopped_container_with_the_name_is_replaced() {
    prepared();
    let name = format!("s{}", std::process::id());
    let container = format!("gpu-feeder-{name}");
    let _cleanup = Containers(vec![container.clone()]);
    // A container of that name, left stopped (as after a host reboot).
    let _ = docker(&["rm", "-f", &container]);
    docker_ok(&[
        "create",
        "--name",
        &container,
        "--network",
        "host",
        "--label",
        "io.gpu-feeder.managed-by=gpu-feeder",
        "--label",
        &format!("io.gpu-feeder.instance={name}"),
        IMAGE,
        "--port",
        "1",
    ]);
    let stale = docker_ok(&["inspect", "-f", "{{.Id}}", &container]);
    let s = Scratch::new(&config(free_port(), &[(&name, "think", free_port())]));
    let d = DaemonProcess::start(&s, "daemon");
    wait_for("ready", LIMIT, || s.instance_is(&name, "ready"));
    let id = container_id(&s, &name);
    assert_ne!(id, stale.trim(), "the stale container was replaced");
    assert_eq!(s.instance(&name).unwrap()["restarts"], 0);
    s.submit_prompts("think", "x", 5);
    wait_for("5 done", LIMIT, || s.count("done") == 5);
    assert!(!d.log().contains("already in use"), "{}", d.log());
}
