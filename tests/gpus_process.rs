//! Several GPUs end to end, with the real daemon and real `gpu-feeder sim`
//! processes: vision on GPU 0, two think replicas on GPUs 1 and 2, and a
//! think-only backlog. Each GPU is a group of its own, so vision stays
//! ready throughout; each process sees exactly its GPU in
//! `CUDA_VISIBLE_DEVICES`; both think replicas take work from the one
//! think queue.

mod common;

use std::time::Duration;

use common::{
    bin, environ, free_port, process_servers_config, strings, wait_for, DaemonProcess,
    ProcessServers, Scratch,
};

const LIMIT: Duration = Duration::from_secs(90);

fn instance(name: &str, model: &str, port: u16, gpus: &str) -> String {
    format!(
        "[[instances]]\nname = \"{name}\"\nmodel_type = \"{model}\"\nbackend = \"process\"\n\
         port = {port}\nserved_model_name = \"sim-{model}\"\n\
         command = [\"{}\", \"sim\", \"--load-s\", \"0.3\", \"--latency-ms\", \"150\"]\n\
         gpu_ids = [{gpus}]\ngpu_memory_utilization = 0.4\nmax_tokens = 8\n\n",
        bin()
    )
}

fn pid(s: &Scratch, name: &str) -> String {
    s.instance(name).unwrap()["container_id"]
        .as_str()
        .unwrap()
        .to_string()
}

#[test]
fn each_gpu_is_its_own_group_and_replicas_share_the_queue() {
    let admin_port = free_port();
    let s = Scratch::new(&format!(
        "{}[allocator]\ninterval_s = 0.2\nmin_dwell_s = 1\n\n{}{}{}",
        process_servers_config(admin_port),
        instance("vision", "vision", free_port(), "0"),
        instance("think-a", "think", free_port(), "1"),
        instance("think-b", "think", free_port(), "2"),
    ));
    let _servers = ProcessServers(s.path().join("servers"));
    let d = DaemonProcess::start_ready(&s, "daemon", &["vision", "think-a", "think-b"], LIMIT);
    for (name, gpus) in [("vision", "0"), ("think-a", "1"), ("think-b", "2")] {
        assert_eq!(
            environ(pid(&s, name), "CUDA_VISIBLE_DEVICES").as_deref(),
            Some(gpus),
            "{name} sees exactly its GPU"
        );
    }
    let groups = s.instances().unwrap()["allocator"]["groups"].clone();
    let names: Vec<&str> = strings(&groups, "group");
    assert_eq!(names, ["gpu 0", "gpu 1", "gpu 2"], "{groups}");

    // Think work only, for many times the dwell: vision is never stopped.
    let vision_pid = pid(&s, "vision");
    s.submit_prompts("think", "t", 300);
    wait_for("every think job done", Duration::from_secs(180), || {
        let doc = s.instances().unwrap();
        let vision = doc["instances"]
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i["name"] == "vision")
            .unwrap()
            .clone();
        assert_eq!(vision["state"], "ready", "vision stays ready: {doc}");
        assert_eq!(
            vision["container_id"],
            vision_pid.as_str(),
            "never relaunched"
        );
        s.count("done") == 300
    });
    assert_eq!(s.count("failed"), 0);
    let doc = s.instances().unwrap();
    for g in doc["allocator"]["groups"].as_array().unwrap() {
        assert_eq!(g["strategy"], "static", "{g}");
        assert_eq!(g["switches"], 0, "{g}");
    }
    let completed = |name: &str| {
        doc["instances"]
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i["name"] == name)
            .unwrap()["completed"]
            .as_u64()
            .unwrap()
    };
    let (a, b) = (completed("think-a"), completed("think-b"));
    assert_eq!(a + b, 300, "every think job answered once");
    assert!(a >= 30 && b >= 30, "both replicas took work: {a} and {b}");
    eprintln!("figure: 300 think jobs over two replicas: think-a {a}, think-b {b}");

    // The table and `strategy show` speak per group.
    let table = s.run(&["instances"]);
    assert!(
        table.stdout().contains("strategy per GPU group:") && table.stdout().contains("gpu 2"),
        "{}",
        table.stdout()
    );
    let shown = s.run(&["strategy", "show"]);
    assert!(
        shown.stdout().contains("gpu 1") && shown.stdout().contains("think-a"),
        "{}",
        shown.stdout()
    );
    // Metrics: a strategy per group.
    let (_, metrics) = common::http::get(admin_port, "/metrics");
    for g in ["gpu 0", "gpu 1", "gpu 2"] {
        let line = format!("gpu_feeder_group_strategy{{group=\"{g}\",strategy=\"static\"}} 1");
        assert!(metrics.contains(&line), "no `{line}` in:\n{metrics}");
    }
    // A pin applies where it fits: think holds in the think groups (a
    // group of one model runs it as configured) and leaves vision alone.
    let pinned = s.run(&["strategy", "pin", "think"]);
    assert_eq!(pinned.code(), 0, "{}", pinned.stderr());
    assert!(
        pinned
            .stdout()
            .contains("pinned in the GPU groups it applies to"),
        "{}",
        pinned.stdout()
    );
    let shown = s.json(&["strategy", "show", "--json"]);
    let pins: Vec<(String, serde_json::Value)> = shown["groups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| {
            (
                g["group"].as_str().unwrap().to_string(),
                g["pinned"].clone(),
            )
        })
        .collect();
    assert_eq!(
        pins,
        [
            ("gpu 0".to_string(), serde_json::Value::Null),
            ("gpu 1".to_string(), "static".into()),
            ("gpu 2".to_string(), "static".into()),
        ],
        "{shown}"
    );
    assert!(s.instance_is("vision", "ready"));
    assert_eq!(s.run(&["strategy", "unpin"]).code(), 0);
    let log = d.log();
    assert!(log.contains("the allocator decides 3 GPU groups"), "{log}");
    assert!(!log.contains("strategy static →"), "no switch: {log}");
}
