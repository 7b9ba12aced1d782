//! `gpu-feeder config check` on the shipped file and on broken ones: each
//! error names the file, line and key, and the exit status is 78.

mod common;

use common::{bin, Scratch};

fn check(s: &Scratch) -> common::Run {
    s.run(&["config", "check"])
}

#[test]
fn the_shipped_feeder_toml_passes() {
    let shipped = concat!(env!("CARGO_MANIFEST_DIR"), "/feeder.toml");
    let out = std::process::Command::new(bin())
        .args(["config", "check", shipped])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.starts_with("OK "), "{stdout}");
    assert!(
        stdout.contains("instance   vision (vision, docker)"),
        "{stdout}"
    );
    assert!(
        stdout.contains("instance   think (think, docker)"),
        "{stdout}"
    );
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
fn a_misspelt_key_is_named_with_its_line() {
    let s = Scratch::new("[dispatch]\nwindow = 8\nmax_attempt = 3\n");
    let r = check(&s);
    assert_eq!(r.code(), 78);
    let err = r.stderr();
    assert!(
        err.contains("feeder.toml:8: dispatch.max_attempt: unknown key `max_attempt`"),
        "{err}"
    );
    assert!(
        err.contains("`max_attempts`"),
        "the error lists what is allowed: {err}"
    );
}

#[test]
fn a_wrong_type_is_named_with_its_line() {
    let s = Scratch::new("[health]\ninterval_s = \"5s\"\n");
    let r = check(&s);
    assert_eq!(r.code(), 78);
    assert!(
        r.stderr().contains(
            "feeder.toml:7: health.interval_s: invalid type: string \"5s\", expected a number"
        ),
        "{}",
        r.stderr()
    );
}

#[test]
fn a_duplicate_port_is_named_with_its_line() {
    let s = Scratch::new(
        "[[instances]]\nname = \"a\"\nmodel_type = \"vision\"\nport = 8001\nserved_model_name = \"m\"\n\n\
         [[instances]]\nname = \"b\"\nmodel_type = \"think\"\nport = 8001\nserved_model_name = \"m\"\n",
    );
    let r = check(&s);
    assert_eq!(r.code(), 78);
    assert!(
        r.stderr()
            .contains("feeder.toml:15: instances[1].port: port 8001 is also used by instances[0]"),
        "{}",
        r.stderr()
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
    let out = std::process::Command::new(bin())
        .args(["config", "check", "/nonexistent/feeder.toml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("/nonexistent/feeder.toml: no such file"),
        "{err}"
    );
}

#[test]
fn a_bad_configuration_stops_other_commands_with_78() {
    let s = Scratch::new("[dispatch]\nwindow = 0\n");
    let r = s.run(&["list"]);
    assert_eq!(r.code(), 78);
    assert!(
        r.stderr().contains("dispatch.window: 0 is out of range"),
        "{}",
        r.stderr()
    );
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
