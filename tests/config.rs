//! `gpu-feeder config check` on the shipped file and on broken ones: each
//! error names the file, line and key, and the exit status is 78.

mod common;

use common::{bin, gpu_feeder, Scratch};

fn check(s: &Scratch) -> common::Run {
    s.run(&["config", "check"])
}

#[test]
fn the_shipped_feeder_toml_passes() {
    let shipped = concat!(env!("CARGO_MANIFEST_DIR"), "/feeder.toml");
    let stdout = gpu_feeder(&["config", "check", shipped]).succeeded();
    assert!(stdout.starts_with("OK "), "{stdout}");
    for instance in [
        "instance   vision (vision, docker)",
        "instance   think (think, docker)",
    ] {
        assert!(stdout.contains(instance), "{stdout}");
    }
}

#[test]
fn the_shipped_feeder_toml_is_the_production_default() {
    let text =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/feeder.toml")).unwrap();
    let c = gpu_feeder::config::Config::parse(&text, std::path::Path::new("feeder.toml")).unwrap();
    let vision = &c.instances[0];
    assert_eq!((vision.name.as_str(), vision.port), ("vision", Some(8001)));
    assert_eq!(vision.image, "vllm/vllm-openai:latest");
    assert!(vision.served_model_name.contains("qwen2-vl-7b"));
    assert_eq!(vision.gpu_memory_utilization, 0.40);
    let args = vision.args.join(" ");
    for flag in [
        "--dtype bfloat16",
        "--max-model-len 16384",
        "--max-num-seqs 8",
        "--enable-chunked-prefill",
        "--max-num-batched-tokens 2048",
        "--disable-log-requests",
    ] {
        assert!(args.contains(flag), "vision args lack {flag}");
    }
    assert_eq!(
        (c.instances[1].name.as_str(), c.instances[1].port),
        ("think", Some(8002))
    );
    // Every key the configuration knows is written out (and so commented).
    assert_eq!(c, {
        let mut d = gpu_feeder::config::Config::default();
        d.queue.payload_roots = Some(vec!["/var/lib/gpu-feeder/stage".into()]);
        d.instances = c.instances.clone();
        d
    });
}

#[test]
fn a_queue_table_alone_is_valid() {
    let s = Scratch::new("");
    let r = check(&s);
    assert_eq!(r.code(), 0, "{}", r.stderr());
    assert!(r.stdout().contains("instances  none"), "{}", r.stdout());
    // The state folders are created.
    assert!(s.path().join("results").is_dir());
}

#[test]
fn a_misspelt_key_a_wrong_type_and_a_duplicate_port_are_named_with_their_line() {
    for (toml, said) in [
        // The misspelt key, and the keys allowed.
        (
            "[dispatch]\nwindow = 8\nmax_attempt = 3\n",
            &["feeder.toml:8: dispatch.max_attempt: unknown key `max_attempt`", "`max_attempts`"][..],
        ),
        (
            "[health]\ninterval_s = \"5s\"\n",
            &["feeder.toml:7: health.interval_s: invalid type: string \"5s\", expected a number"],
        ),
        (
            "[[instances]]\nname = \"a\"\nmodel_type = \"vision\"\nport = 8001\nserved_model_name = \"m\"\n\n\
             [[instances]]\nname = \"b\"\nmodel_type = \"think\"\nport = 8001\nserved_model_name = \"m\"\n",
            &["feeder.toml:15: instances[1].port: port 8001 is also used by instances[0]"],
        ),
    ] {
        let r = check(&Scratch::new(toml));
        for said in said {
            r.refused(78, said);
        }
    }
}

#[test]
fn the_priority_hold_is_on_by_default_and_a_boolean_turns_it_off() {
    let parse = |text: &str| {
        gpu_feeder::config::Config::parse(text, std::path::Path::new("feeder.toml"))
            .unwrap()
            .dispatch
            .priority_hold
    };
    assert!(parse(""), "on by default");
    assert!(!parse("[dispatch]\npriority_hold = false\n"));
    assert!(parse("[dispatch]\npriority_hold = true\n"));
    check(&Scratch::new("[dispatch]\npriority_hold = \"off\"\n")).refused(
        78,
        "feeder.toml:7: dispatch.priority_hold: invalid type: string \"off\", expected a boolean",
    );
}

#[test]
fn every_cross_check_problem_is_reported_at_once() {
    let s = Scratch::new(
        "[gpu]\ntemp_alert_c = 70\n\n[chunk]\noverlap = 600\n\n[dispatch]\nprefix_max_wait_s = 0\n\n\
         [[instances]]\nname = \"a\"\nmodel_type = \"vision\"\nbackend = \"process\"\nport = 8001\n\
         served_model_name = \"m\"\ngpu_memory_utilization = 0\nargs = [\"--gpu-memory-utilization\", \"0.9\"]\n\n\
         [[instances]]\nname = \"a\"\nmodel_type = \"think\"\nbackend = \"external\"\nserved_model_name = \"m\"\n",
    );
    let r = check(&s);
    assert_eq!(r.code(), 78);
    let err = r.stderr();
    for expected in [
        "gpu.temp_clear_c: 75 °C must be below gpu.temp_alert_c (70 °C)",
        "chunk.overlap: 600 must be less than chunk.tokens (512)",
        "instances[0].command: backend = \"process\" needs a command",
        "instances[0].gpu_memory_utilization: 0 is out of range",
        "instances[0].args: contains --gpu-memory-utilization",
        "instances[1].name: `a` is also the name of instances[0]",
        "instances[1].url: backend = \"external\" needs url",
        "dispatch.prefix_max_wait_s: must be more than 0",
        "8 problems in",
    ] {
        assert!(err.contains(expected), "missing `{expected}` in:\n{err}");
    }
}

#[test]
fn a_missing_file_is_an_error_naming_it() {
    gpu_feeder(&["config", "check", "/nonexistent/feeder.toml"])
        .refused(78, "/nonexistent/feeder.toml: no such file");
}

#[test]
fn a_bad_configuration_stops_other_commands_with_78() {
    let s = Scratch::new("[dispatch]\nwindow = 0\n");
    let r = s.run(&["list"]);
    r.refused(78, "dispatch.window: 0 is out of range");
}

#[test]
fn feeder_config_env_names_the_file() {
    let s = Scratch::new("");
    let out = std::process::Command::new(bin())
        .args(["config", "check"])
        .env("FEEDER_CONFIG", s.config())
        .current_dir("/")
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn impossible_gpu_layouts_are_errors_naming_the_instances() {
    let s = Scratch::new("");
    let model = s.path().join("qwen");
    std::fs::create_dir_all(&model).unwrap();
    std::fs::write(
        model.join("config.json"),
        r#"{"architectures": ["Qwen2ForCausalLM"], "num_attention_heads": 28}"#,
    )
    .unwrap();
    let inst = |name: &str, model_type: &str, port: u16, gpus: &str, extra: &str| {
        format!(
            "[[instances]]\nname = \"{name}\"\nmodel_type = \"{model_type}\"\nbackend = \"process\"\n\
             port = {port}\nserved_model_name = \"{name}\"\ncommand = [\"vllm\", \"serve\"]\n\
             gpu_ids = [{gpus}]\n{extra}\n"
        )
    };
    s.rewrite(
        &[
            inst(
                "tp4",
                "vision",
                9001,
                "0, 1",
                "args = [\"--tensor-parallel-size\", \"4\"]",
            ),
            inst("twice", "think", 9002, "2, 2", ""),
            inst("big-v", "vision", 9003, "3", "gpu_memory_utilization = 0.7"),
            inst("big-t", "think", 9004, "3", "gpu_memory_utilization = 0.5"),
            inst("v1", "vision", 9005, "4", "gpu_memory_utilization = 0.4"),
            inst("v2", "vision", 9006, "4", "gpu_memory_utilization = 0.4"),
            inst("t1", "think", 9007, "4", "gpu_memory_utilization = 0.1"),
            inst(
                "heads",
                "think",
                9008,
                "5, 6, 7",
                &format!("model = \"{}\"", model.display()),
            ),
            inst("bad-tp", "think", 9009, "8", "args = [\"-tp=two\"]"),
            // Fine: tensor parallel on two GPUs of its own, and a pipeline
            // split over four.
            inst("tp2", "think", 9010, "9, 10", ""),
            inst(
                "pp",
                "think",
                9011,
                "11, 12, 13, 14",
                "args = [\"-pp\", \"2\"]",
            ),
        ]
        .concat(),
    );
    let r = check(&s);
    assert_eq!(r.code(), 78, "{}", r.stdout());
    let err = r.stderr();
    for expected in [
        "instances[0].gpu_ids: lists 2 GPUs but the server would use 4 × 1 = 4",
        "instances[1].gpu_ids: GPU 2 is listed twice",
        "instances[3].gpu_ids: GPU 3 is shared by `big-v` and `big-t` as configured (strategy static, at the start): \
         instances[2] `big-v` 0.7 + instances[3] `big-t` 0.5 = 1.20",
        "instances[5].gpu_ids: GPU 4 is shared by `v1` and `v2` under strategy shared (allocator.shared_memory_utilization = 0.4)",
        "instances[7].gpu_ids: tensor-parallel size 3 does not divide the model's 28 attention heads",
        "instances[8].args: --tensor-parallel-size `two` is not a size",
        "6 problems in",
    ] {
        assert!(err.contains(expected), "missing `{expected}` in:\n{err}");
    }
    assert!(!err.contains("`tp2`") && !err.contains("`pp`"), "{err}");
    // Without the allocator nothing is shared out by strategies: only the
    // configured shares count.
    let text = std::fs::read_to_string(s.config()).unwrap();
    std::fs::write(
        s.config(),
        format!("[allocator]\nenabled = false\n\n{text}"),
    )
    .unwrap();
    let err = check(&s).stderr();
    assert!(!err.contains("strategy shared"), "{err}");
    assert!(err.contains("5 problems in"), "{err}");
}

#[test]
fn the_readmes_four_gpu_example_passes() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let section = &readme[readme.find("### Several GPUs").expect("the section")..];
    let start = section.find("```toml\n").expect("its example") + 8;
    let example = &section[start..start + section[start..].find("```").unwrap()];
    let s = Scratch::new(example);
    let r = check(&s);
    assert_eq!(r.code(), 0, "{}{}", r.stdout(), r.stderr());
    let out = r.stdout();
    for expected in [
        "GPU [2, 3] at 0.90 · --tensor-parallel-size 2",
        "groups     gpu 0: vision-0 (one model: as configured, or idle) · gpu 1: vision-1 (one model",
        "gpus 2,3: think (one model",
    ] {
        assert!(out.contains(expected), "missing `{expected}` in:\n{out}");
    }
}

#[test]
fn shared_queue_settings_are_checked() {
    let s = Scratch::with_queue(
        "database_url = \"mysql://u:secret@db/q\"\ndaemon_id = \"a/b\"\nheartbeat_s = 10\nheartbeat_timeout_s = 15\n",
        "[results]\nstore = \"s3\"\n",
    );
    let r = check(&s);
    assert_eq!(r.code(), 78, "{}", r.stdout());
    let err = r.stderr();
    assert!(err.contains("results.store"), "{err}");
    // Fix the type error to see the others (a bad value stops parsing).
    let s = Scratch::with_queue(
        "database_url = \"mysql://u:secret@db/q\"\ndaemon_id = \"a/b\"\nheartbeat_s = 10\nheartbeat_timeout_s = 15\n",
        "[results]\nstore = \"database\"\n",
    );
    let r = check(&s);
    assert_eq!(r.code(), 78);
    let err = r.stderr();
    assert!(
        err.contains("queue.database_url") && err.contains("not a PostgreSQL URL"),
        "{err}"
    );
    assert!(
        !err.contains("secret"),
        "the password is never shown: {err}"
    );
    assert!(
        err.contains("queue.daemon_id") && err.contains("without `/`"),
        "{err}"
    );
    assert!(
        err.contains("queue.heartbeat_timeout_s") && err.contains("two heartbeats"),
        "{err}"
    );
    let s = Scratch::with_queue(
        "database_url = \"postgresql://feeder@db:5432/q\"\ndaemon_id = \"gpu-07\"\n",
        "",
    );
    let r = check(&s);
    assert_eq!(r.code(), 0, "{}", r.stderr());
    // The OpenAI API on a shared queue: accepted, with the folder its
    // daemons must share named.
    let s = Scratch::with_queue(
        "database_url = \"postgresql://feeder@db:5432/q\"\ndaemon_id = \"gpu-07\"\n",
        "[api]\nlisten = \"127.0.0.1:8000\"\nfiles_dir = \"/srv/shared/files\"\n",
    );
    let r = check(&s);
    assert_eq!(r.code(), 0, "{}", r.stderr());
    assert!(
        r.stdout()
            .contains("api.files_dir (/srv/shared/files) must be one folder they all mount"),
        "{}",
        r.stdout()
    );
}

#[test]
fn sleepers_that_do_not_fit_at_once_are_launched_in_turn_and_said_so() {
    let inst = |name: &str, model_type: &str, port: u16, extra: &str| {
        format!(
            "[[instances]]\nname = \"{name}\"\nmodel_type = \"{model_type}\"\nbackend = \"process\"\n\
             port = {port}\nserved_model_name = \"{name}\"\ncommand = [\"vllm\", \"serve\"]\n\
             gpu_ids = [0]\ngpu_memory_utilization = 0.9\n{extra}\n"
        )
    };
    let both = |vision_extra: &str| {
        [
            inst("vision", "vision", 9001, vision_extra),
            inst("think", "think", 9002, "sleep_mode = true"),
        ]
        .concat()
    };
    let allocator = "[allocator]\nsolo_memory_utilization = 0.9\n\n";
    let s = Scratch::new(&format!("{allocator}{}", both("sleep_mode = true")));
    let r = check(&s);
    assert_eq!(r.code(), 0, "{}{}", r.stdout(), r.stderr());
    let out = r.stdout();
    assert!(
        out.contains(
            "start      think and vision share GPU 0 (0.9 + 0.9 > 1): they launch one after the other; \
             think loads, sleeps, then vision loads, and every switch after is a sleep and a wake"
        ),
        "{out}"
    );
    // With the allocator's solo share below theirs, the first switch to
    // each is a relaunch: said too.
    s.rewrite(&both("sleep_mode = true"));
    let out = check(&s).succeeded();
    assert!(
        out.contains(
            "allocator.solo_memory_utilization = 0.75 differs from the share of think and vision"
        ),
        "{out}"
    );
    // Without sleep mode nothing can take turns: refused as before.
    s.rewrite(&format!("{allocator}{}", both("")));
    let r = check(&s);
    assert_eq!(r.code(), 78, "{}", r.stdout());
    let err = r.stderr();
    assert!(
        err.contains(
            "GPU 0 is shared by `vision` and `think` as configured (strategy static, at the start)"
        ) && err.contains("more than it has"),
        "{err}"
    );
    // Without the allocator nothing would wake the one asleep.
    s.rewrite(&format!(
        "[allocator]\nenabled = false\n\n{}",
        both("sleep_mode = true")
    ));
    let r = check(&s);
    assert_eq!(r.code(), 78, "{}", r.stdout());
    let err = r.stderr();
    assert!(
        err.contains("allocator.enabled: is false, but `vision` and `think` on GPU 0")
            && err.contains("enable the allocator"),
        "{err}"
    );
}
