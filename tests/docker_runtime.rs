//! The Docker adapter of the `ContainerRuntime` port against the real Docker
//! engine, launching the simulated server's image (`gpu-feeder-sim:test`,
//! built by `scripts/sim-image.sh` when missing). Without a reachable engine
//! these tests fail: they are not skipped.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::docker::{docker, docker_ok, prepared, IMAGE};
use common::free_port;

use gpu_feeder::actors::runtime::{ContainerRuntime, Exit, LaunchPlan};
use gpu_feeder::config::InstanceConfig;
use gpu_feeder::runtime::docker::{ping, DockerRuntime};
use gpu_feeder::runtime::{
    container_name, LABEL_CONFIG_HASH, LABEL_INSTANCE, LABEL_MANAGED_BY, MANAGED_BY,
};
use serde_json::Value;

const ENTRYPOINT: [&str; 4] = ["/gpu-feeder", "sim", "--host", "0.0.0.0"];
/// Time a container gets to answer `/health`.
const READY_WITHIN: Duration = Duration::from_secs(60);

/// A client of the local engine, after the checks of [`prepared`].
async fn engine() -> bollard::Docker {
    prepared();
    let docker = DockerRuntime::connect("").unwrap_or_else(|e| panic!("{e}"));
    if let Err(e) = ping(&docker).await {
        panic!("{e}");
    }
    docker
}

/// A name no other test (nor another run at the same time) uses.
fn unique(tag: &str) -> String {
    format!("t{}-{tag}", std::process::id())
}

/// An instance of the simulated server on the host's network, without GPUs.
fn instance(name: &str, port: u16, extra: &str) -> InstanceConfig {
    let text = format!(
        r#"
name = "{name}"
model_type = "vision"
backend = "docker"
port = {port}
served_model_name = "sim-{name}"
model = "org/sim-model"
image = "{IMAGE}"
args = ["--max-num-seqs", "8"]
env = {{ FEEDER_TEST = "yes" }}
gpu_ids = []
shm_size = "64m"
docker_network = "host"
{extra}
"#
    );
    toml::from_str(&text).unwrap_or_else(|e| panic!("test instance: {e}\n{text}"))
}

fn plan() -> LaunchPlan {
    LaunchPlan {
        gpu_memory_utilization: 0.5,
    }
}

/// Removes the instance's container however the test ends.
struct Cleanup(String);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = docker(&["rm", "-f", &self.0]);
    }
}

/// An instance of a fresh name (made from a tag) on a free port, and the
/// name of its container, which is removed when the test ends.
struct Fresh {
    name: String,
    port: u16,
    inst: InstanceConfig,
    container: String,
    _cleanup: Cleanup,
}

fn fresh(tag: &str) -> Fresh {
    let name = unique(tag);
    let port = free_port();
    let container = container_name(&name);
    Fresh {
        inst: instance(&name, port, ""),
        _cleanup: Cleanup(container.clone()),
        name,
        port,
        container,
    }
}

/// `docker inspect` of a container, or `None` when there is none.
fn inspect(id: &str) -> Option<Value> {
    let out = docker(&["inspect", "--type", "container", id]);
    if !out.status.success() {
        return None;
    }
    let all: Value = serde_json::from_slice(&out.stdout).expect("docker inspect prints JSON");
    Some(all[0].clone())
}

/// Waits until the server answers `GET /health` with 200, failing with the
/// container's output if it stops or does not answer in time.
/// Stops container `id` through `rt`, and checks that it is gone.
async fn stop_and_removed(rt: &DockerRuntime, id: &str) {
    rt.stop(id, Duration::from_secs(1)).await.expect("stop");
    assert!(inspect(id).is_none());
}

async fn wait_healthy(rt: &DockerRuntime, id: &str, port: u16) {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
        .expect("http client");
    let url = format!("http://127.0.0.1:{port}/health");
    let deadline = Instant::now() + READY_WITHIN;
    loop {
        if let Ok(resp) = client.get(&url).send().await {
            if resp.status().is_success() {
                return;
            }
        }
        let running = inspect(id).is_some_and(|c| c["State"]["Running"] == Value::Bool(true));
        if !running || Instant::now() > deadline {
            let why = if running {
                format!("does not answer {url} within {READY_WITHIN:?}")
            } else {
                format!(
                    "stopped before answering (an image {IMAGE} older than the simulator's \
                     flags? rebuild it with scripts/sim-image.sh)"
                )
            };
            panic!(
                "the container {id} {why}; its output:\n{}",
                rt.logs(id, 50).await
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn start_runs_a_labelled_container_that_answers_and_is_found_again() {
    let docker = engine().await;
    let name = unique("start");
    let port = free_port();
    let dir = tempfile::tempdir().expect("temp dir");
    let bind = format!("{}:/data:ro", dir.path().display());
    let inst = instance(&name, port, &format!("volumes = [\"{bind}\"]"));
    let _cleanup = Cleanup(container_name(&name));
    let rt = DockerRuntime::new(docker, &inst);
    assert_eq!(rt.backend(), "docker");
    assert_eq!(rt.container_name(), container_name(&name));
    assert_eq!(rt.find().await, Ok(None), "no container before the start");

    let plan = plan();
    let hash = rt.config_hash(&plan);
    let id = rt.start(&plan).await.expect("start");

    let c = inspect(&id).expect("the started container exists");
    assert_eq!(c["Name"], format!("/{}", container_name(&name)));
    assert_eq!(c["State"]["Running"], true, "{c:#}");
    let labels: BTreeMap<String, String> =
        serde_json::from_value(c["Config"]["Labels"].clone()).expect("labels");
    assert_eq!(
        labels.get(LABEL_MANAGED_BY).map(String::as_str),
        Some(MANAGED_BY)
    );
    assert_eq!(labels.get(LABEL_INSTANCE), Some(&name));
    assert_eq!(labels.get(LABEL_CONFIG_HASH), Some(&hash));
    let cmd: Vec<String> = serde_json::from_value(c["Config"]["Cmd"].clone()).expect("cmd");
    // vLLM's command line, as the contract gives it: the model, the served
    // name, the port and the memory share from the plan, the scheduling
    // policy (priority, the default of a launched server), then `args`.
    assert_eq!(
        cmd,
        [
            "--model",
            "org/sim-model",
            "--served-model-name",
            &format!("sim-{name}"),
            "--port",
            &port.to_string(),
            "--gpu-memory-utilization",
            "0.5",
            "--scheduling-policy",
            "priority",
            "--max-num-seqs",
            "8",
        ]
    );
    let entrypoint: Vec<String> =
        serde_json::from_value(c["Config"]["Entrypoint"].clone()).expect("entrypoint");
    assert_eq!(entrypoint, ENTRYPOINT, "the image's entrypoint is kept");
    let env: Vec<String> = serde_json::from_value(c["Config"]["Env"].clone()).expect("env");
    assert!(env.contains(&"FEEDER_TEST=yes".to_string()), "{env:?}");
    assert_eq!(c["HostConfig"]["NetworkMode"], "host");
    assert_eq!(c["HostConfig"]["ShmSize"], 64 * 1024 * 1024);
    assert_eq!(c["HostConfig"]["Binds"], serde_json::json!([bind]));
    assert_eq!(
        c["HostConfig"]["DeviceRequests"],
        Value::Null,
        "no GPUs asked for"
    );
    let restart = c["HostConfig"]["RestartPolicy"]["Name"]
        .as_str()
        .unwrap_or("");
    assert!(
        restart.is_empty() || restart == "no",
        "the feeder restarts servers, not Docker: {restart}"
    );

    wait_healthy(&rt, &id, port).await;
    let models: Value = reqwest::get(format!("http://127.0.0.1:{port}/v1/models"))
        .await
        .expect("GET /v1/models")
        .json()
        .await
        .expect("models JSON");
    assert!(
        models.to_string().contains(&format!("sim-{name}")),
        "the server answers to its served name: {models}"
    );

    let found = rt.find().await.expect("find").expect("found");
    assert_eq!(found.id, id);
    assert!(found.running);
    assert_eq!(found.config_hash, Some(hash));

    let logs = rt.logs(&id, 20).await;
    assert!(logs.contains("listening on"), "logs: {logs}");

    rt.stop(&id, Duration::from_secs(2)).await.expect("stop");
    assert!(inspect(&id).is_none(), "stop removes the container");
    assert_eq!(rt.find().await, Ok(None));
    rt.stop(&id, Duration::from_secs(2))
        .await
        .expect("stopping a container that is gone succeeds");
    assert_eq!(
        rt.wait_exit(&id).await,
        Exit {
            code: None,
            detail: "the container is gone".into()
        }
    );
}

#[tokio::test]
async fn a_killed_container_is_reported_by_wait_exit() {
    let docker = engine().await;
    let f = fresh("kill");
    let rt = std::sync::Arc::new(DockerRuntime::new(docker, &f.inst));
    let id = rt.start(&plan()).await.expect("start");
    wait_healthy(&rt, &id, f.port).await;

    let waiting = tokio::spawn({
        let rt = rt.clone();
        let id = id.clone();
        async move { rt.wait_exit(&id).await }
    });
    docker_ok(&["kill", &id]);
    let exit = tokio::time::timeout(Duration::from_secs(30), waiting)
        .await
        .expect("wait_exit resolves after the kill")
        .expect("wait_exit task");
    assert_eq!(exit.code, Some(137), "{exit:?}");
    assert!(exit.detail.contains("exited with code 137"), "{exit:?}");

    // Waiting on a container that has already exited answers at once.
    let again = tokio::time::timeout(Duration::from_secs(10), rt.wait_exit(&id))
        .await
        .expect("wait_exit on an exited container");
    assert_eq!(again.code, Some(137));

    let found = rt.find().await.expect("find").expect("found");
    assert_eq!(found.id, id);
    assert!(!found.running, "{found:?}");
    assert!(rt.logs(&id, 5).await.contains("listening on"));

    stop_and_removed(&rt, &id).await;
}

#[tokio::test]
async fn start_replaces_a_stale_stopped_container_of_the_instance() {
    let docker = engine().await;
    let f = fresh("stale");
    let rt = DockerRuntime::new(docker, &f.inst);

    // What an earlier run with another configuration left behind.
    let managed = format!("{LABEL_MANAGED_BY}={MANAGED_BY}");
    let instance_label = format!("{LABEL_INSTANCE}={}", f.name);
    let old_hash = format!("{LABEL_CONFIG_HASH}=0ld");
    let stale = docker_ok(&[
        "create",
        "--name",
        &f.container,
        "--label",
        &managed,
        "--label",
        &instance_label,
        "--label",
        &old_hash,
        IMAGE,
    ])
    .trim()
    .to_string();
    let found = rt.find().await.expect("find").expect("the stale container");
    assert_eq!(found.id, stale);
    assert!(!found.running);
    assert_eq!(found.config_hash.as_deref(), Some("0ld"));

    let id = rt
        .start(&plan())
        .await
        .expect("start replaces the stale container");
    assert_ne!(id, stale);
    assert!(inspect(&stale).is_none(), "the stale container is removed");
    wait_healthy(&rt, &id, f.port).await;
    let found = rt.find().await.expect("find").expect("found");
    assert_eq!(found.id, id);
    assert!(found.running);
    assert_eq!(found.config_hash, Some(rt.config_hash(&plan())));

    // A second start replaces the running one as well.
    let id2 = rt.start(&plan()).await.expect("second start");
    assert_ne!(id2, id);
    assert!(inspect(&id).is_none());
    wait_healthy(&rt, &id2, f.port).await;

    stop_and_removed(&rt, &id2).await;
}

#[tokio::test]
async fn a_container_of_someone_else_holding_the_name_is_refused() {
    let docker = engine().await;
    let f = fresh("foreign");
    let foreign = docker_ok(&["create", "--name", &f.container, IMAGE])
        .trim()
        .to_string();
    let rt = DockerRuntime::new(docker, &f.inst);

    let err = rt
        .find()
        .await
        .expect_err("find refuses a foreign container");
    assert!(err.contains("did not create it"), "{err}");
    assert!(
        err.contains(&format!("docker rm -f {}", f.container)),
        "{err}"
    );
    assert!(err.contains("rename"), "{err}");

    let err = rt.start(&plan()).await.expect_err("start refuses too");
    assert!(err.contains("did not create it"), "{err}");
    assert!(
        inspect(&foreign).is_some(),
        "the foreign container is left alone"
    );
}

#[tokio::test]
async fn a_missing_image_says_how_to_get_it() {
    let docker = engine().await;
    let name = unique("noimage");
    let inst = instance(&name, free_port(), "");
    let inst = InstanceConfig {
        image: "gpu-feeder-sim:no-such-tag".into(),
        ..inst
    };
    let _cleanup = Cleanup(container_name(&name));
    let rt = DockerRuntime::new(docker, &inst);
    let err = rt.start(&plan()).await.expect_err("no image");
    assert!(err.contains("not present locally"), "{err}");
    assert!(
        err.contains("docker pull gpu-feeder-sim:no-such-tag"),
        "{err}"
    );
    assert!(err.contains("scripts/sim-image.sh"), "{err}");
    assert_eq!(rt.find().await, Ok(None), "nothing is left behind");
}

#[tokio::test]
async fn a_bad_shm_size_is_named() {
    let docker = engine().await;
    let name = unique("shm");
    let inst = InstanceConfig {
        shm_size: "lots".into(),
        ..instance(&name, free_port(), "")
    };
    let _cleanup = Cleanup(container_name(&name));
    let rt = DockerRuntime::new(docker, &inst);
    let err = rt.start(&plan()).await.expect_err("bad shm_size");
    assert!(err.contains("shm_size `lots`"), "{err}");
    assert_eq!(rt.find().await, Ok(None));
}

#[tokio::test]
async fn an_engine_that_does_not_answer_is_explained() {
    let err =
        DockerRuntime::connect("unix:///nonexistent/docker.sock").expect_err("no socket there");
    assert!(
        err.contains("/nonexistent/docker.sock does not exist"),
        "{err}"
    );
    assert!(err.contains("dockerd"), "{err}");

    // A socket nobody serves any more.
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("docker.sock");
    drop(std::os::unix::net::UnixListener::bind(&path).expect("bind a unix socket"));
    let docker =
        DockerRuntime::connect(&format!("unix://{}", path.display())).expect("the socket exists");
    let err = ping(&docker).await.expect_err("nobody answers there");
    assert!(err.contains("does not answer"), "{err}");
    assert!(err.contains("dockerd"), "{err}");

    let err = DockerRuntime::connect("ssh://someone@somewhere").expect_err("unsupported scheme");
    assert!(err.contains("not supported"), "{err}");
}

/// A Unix socket in front of the engine's that passes everything through
/// and keeps what clients sent: the Engine API requests exactly as the
/// engine received them, whatever it made of them.
struct RecordingProxy {
    path: std::path::PathBuf,
    sent: std::sync::Arc<std::sync::Mutex<Vec<Vec<u8>>>>,
    _dir: tempfile::TempDir,
    task: tokio::task::JoinHandle<()>,
}

impl RecordingProxy {
    /// Listens in a fresh folder, forwarding to the engine's Unix socket
    /// (`$DOCKER_HOST`'s, else `/var/run/docker.sock`).
    fn start() -> RecordingProxy {
        let engine = match std::env::var("DOCKER_HOST") {
            Ok(h) if !h.trim().is_empty() => h
                .trim()
                .strip_prefix("unix://")
                .unwrap_or_else(|| {
                    panic!("the recording proxy needs the engine on a unix:// socket, not {h}")
                })
                .to_string(),
            _ => "/var/run/docker.sock".to_string(),
        };
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("engine.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let sent = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let record = sent.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let engine = engine.clone();
                let record = record.clone();
                tokio::spawn(async move {
                    use tokio::io::{AsyncReadExt, AsyncWriteExt};
                    let upstream = tokio::net::UnixStream::connect(&engine)
                        .await
                        .unwrap_or_else(|e| panic!("the engine's socket {engine}: {e}"));
                    let (mut from_client, mut to_client) = client.into_split();
                    let (mut from_engine, mut to_engine) = upstream.into_split();
                    let slot = {
                        let mut r = record.lock().unwrap();
                        r.push(Vec::new());
                        r.len() - 1
                    };
                    let up = async move {
                        let mut buf = vec![0u8; 64 * 1024];
                        loop {
                            let n = match from_client.read(&mut buf).await {
                                Ok(0) | Err(_) => break,
                                Ok(n) => n,
                            };
                            record.lock().unwrap()[slot].extend_from_slice(&buf[..n]);
                            if to_engine.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                        let _ = to_engine.shutdown().await;
                    };
                    let down = async move {
                        let _ = tokio::io::copy(&mut from_engine, &mut to_client).await;
                        let _ = to_client.shutdown().await;
                    };
                    tokio::join!(up, down);
                });
            }
        });
        RecordingProxy {
            path,
            sent,
            _dir: dir,
            task,
        }
    }

    /// `servers.docker_host` for a client of the proxy.
    fn host(&self) -> String {
        format!("unix://{}", self.path.display())
    }

    /// The JSON bodies of the requests whose first line starts with
    /// `method` and contains `path`, in the order sent.
    fn bodies(&self, method: &str, path: &str) -> Vec<Value> {
        let sent = self.sent.lock().unwrap();
        let mut out = Vec::new();
        for stream in sent.iter() {
            let mut rest = &stream[..];
            while let Some(end) = rest.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&rest[..end]).into_owned();
                let length: usize = head
                    .lines()
                    .filter_map(|l| l.split_once(':'))
                    .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
                    .map_or(0, |(_, v)| v.trim().parse().unwrap());
                assert!(
                    !head
                        .to_ascii_lowercase()
                        .contains("transfer-encoding: chunked"),
                    "a chunked request body: {head}"
                );
                let body = &rest[end + 4..(end + 4 + length).min(rest.len())];
                let first = head.lines().next().unwrap_or_default();
                if first.starts_with(method) && first.contains(path) {
                    out.push(
                        serde_json::from_slice(body)
                            .unwrap_or_else(|e| panic!("{first}: the body is not JSON ({e})")),
                    );
                }
                rest = &rest[(end + 4 + length).min(rest.len())..];
            }
        }
        out
    }
}

impl Drop for RecordingProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[tokio::test]
async fn gpu_ids_become_an_nvidia_device_request_for_exactly_those_gpus() {
    engine().await;
    // Through a proxy that keeps what the engine was asked: on a host
    // without the NVIDIA toolkit the engine refuses to start the container
    // and it is removed, so its own record is gone.
    let proxy = RecordingProxy::start();
    let docker = DockerRuntime::connect(&proxy.host()).unwrap_or_else(|e| panic!("{e}"));
    let name = unique("gpus");
    let mut inst = instance(&name, free_port(), "");
    inst.gpu_ids = vec![0, 2];
    let _cleanup = Cleanup(container_name(&name));
    let rt = DockerRuntime::new(docker, &inst);
    let started = rt.start(&plan()).await;
    let created = proxy.bodies("POST", "/containers/create");
    assert_eq!(created.len(), 1, "one container was created: {created:#?}");
    assert_eq!(
        created[0]["HostConfig"]["DeviceRequests"],
        serde_json::json!([{
            "Driver": "nvidia",
            "DeviceIDs": ["0", "2"],
            "Capabilities": [["gpu"]],
        }]),
        "the engine was asked for GPUs 0 and 2, by id, and nothing else: {:#}",
        created[0]["HostConfig"]
    );
    match started {
        // A host with the NVIDIA Container Toolkit runs it: the request is
        // on the container.
        Ok(id) => {
            let c = inspect(&id).expect("the started container exists");
            assert_eq!(
                c["HostConfig"]["DeviceRequests"],
                serde_json::json!([{
                    "Driver": "nvidia",
                    "Count": 0,
                    "DeviceIDs": ["0", "2"],
                    "Capabilities": [["gpu"]],
                    "Options": null,
                }]),
                "{c:#}"
            );
        }
        // Without it, the engine refuses the request in its own words (which
        // name the driver and the capability asked for), the error says what
        // to do, and no container is left behind.
        Err(e) => {
            assert!(
                e.contains(r#"could not select device driver "nvidia" with capabilities: [[gpu]]"#),
                "{e}"
            );
            assert!(e.contains("install nvidia-container-toolkit"), "{e}");
            assert!(e.contains("gpu_ids = []"), "{e}");
            assert_eq!(
                rt.find().await,
                Ok(None),
                "the failed container was removed"
            );
        }
    }
}
