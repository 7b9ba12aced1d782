//! The Docker adapter of the `ContainerRuntime` port, through the Engine API
//! (bollard).
//!
//! Each instance runs as one container named `gpu-feeder-<name>`, created
//! from the instance's image with the image's entrypoint kept and the vLLM
//! flags as its command. The container carries labels saying who manages it,
//! which instance it is, and the hash of the configuration it was created
//! with, so that a restarted daemon can adopt it. A container holding that
//! name without our label belongs to someone else and is never touched.
//!
//! The feeder supervises restarts itself, so containers get no restart
//! policy; they are removed when stopped.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::time::Duration;

use async_trait::async_trait;
use bollard::errors::Error as DockerError;
use bollard::models::{ContainerCreateBody, DeviceRequest, HostConfig, PortBinding};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, InspectContainerOptions, LogsOptionsBuilder,
    RemoveContainerOptionsBuilder, StartContainerOptions, StopContainerOptionsBuilder,
    WaitContainerOptionsBuilder,
};
use bollard::{ClientVersion, Docker, API_DEFAULT_VERSION};
use feeder_actors::runtime::{ContainerRuntime, Exit, Found, LaunchPlan};
use futures_util::StreamExt;

use super::{
    container_name, vllm_args, LABEL_CONFIG_HASH, LABEL_INSTANCE, LABEL_MANAGED_BY, MANAGED_BY,
};
use crate::config::InstanceConfig;

/// The engine's socket when neither the configuration nor `$DOCKER_HOST` names one.
const DEFAULT_SOCKET: &str = "unix:///var/run/docker.sock";
/// Time allowed for one Engine API request (streams excepted).
const REQUEST_TIMEOUT_S: u64 = 120;
/// How often `wait_exit` looks at a container when the engine cannot wait for it.
const POLL_INTERVAL: Duration = Duration::from_millis(500);
/// Time allowed for reading a container's output.
const LOGS_TIMEOUT: Duration = Duration::from_secs(15);

/// Runs one instance's server as a Docker container.
pub struct DockerRuntime {
    docker: Docker,
    inst: InstanceConfig,
    name: String,
}

impl DockerRuntime {
    /// A client of the Docker engine at `docker_host` (`unix:///path`,
    /// `tcp://host:port`, or empty for `$DOCKER_HOST`, else the local
    /// socket). A local socket must exist. Nothing is sent but one cheap
    /// request for the engine's API version, so that older engines are
    /// spoken to in their version (it waits two seconds at most for the
    /// answer); whether the engine answers requests is [`ping`]'s business.
    pub fn connect(docker_host: &str) -> Result<Docker, String> {
        let configured = docker_host.trim();
        let host = if configured.is_empty() {
            match std::env::var("DOCKER_HOST") {
                Ok(h) if !h.trim().is_empty() => h.trim().to_string(),
                _ => DEFAULT_SOCKET.to_string(),
            }
        } else {
            configured.to_string()
        };
        let endpoint = Endpoint::parse(&host)?;
        let version = match endpoint.api_version() {
            Some(v) if v < *API_DEFAULT_VERSION => v,
            _ => *API_DEFAULT_VERSION,
        };
        let docker = match &endpoint {
            Endpoint::Unix(path) => Docker::connect_with_unix(path, REQUEST_TIMEOUT_S, &version),
            Endpoint::Tcp(addr) => {
                Docker::connect_with_http(&format!("tcp://{addr}"), REQUEST_TIMEOUT_S, &version)
            }
        };
        docker.map_err(|e| match e {
            DockerError::SocketNotFoundError(path) => format!(
                "the Docker engine's socket {path} does not exist: start the engine (systemctl \
                 start docker, or run dockerd), or point servers.docker_host / $DOCKER_HOST at \
                 its socket"
            ),
            other => format!("cannot use the Docker engine at {host}: {other}"),
        })
    }

    /// The runtime of the instance `inst`, talking to `docker`.
    pub fn new(docker: Docker, inst: &InstanceConfig) -> DockerRuntime {
        DockerRuntime {
            docker,
            inst: inst.clone(),
            name: container_name(&inst.name),
        }
    }

    /// The name of the instance's container.
    pub fn container_name(&self) -> &str {
        &self.name
    }

    /// The container holding our name, if any, refusing one we did not create.
    async fn inspect_ours(
        &self,
    ) -> Result<Option<bollard::models::ContainerInspectResponse>, String> {
        match self
            .docker
            .inspect_container(&self.name, None::<InspectContainerOptions>)
            .await
        {
            Ok(info) => {
                let labels = info.config.as_ref().and_then(|c| c.labels.as_ref());
                let managed = labels
                    .and_then(|l| l.get(LABEL_MANAGED_BY))
                    .is_some_and(|v| v == MANAGED_BY);
                if managed {
                    Ok(Some(info))
                } else {
                    Err(format!(
                        "a container named {name} exists but gpu-feeder did not create it (it lacks \
                         the label {LABEL_MANAGED_BY}={MANAGED_BY}): someone else's container holds \
                         the name of instance {inst}; remove it (docker rm -f {name}) or rename it \
                         (docker rename {name} OTHER_NAME), and gpu-feeder will create its own",
                        name = self.name,
                        inst = self.inst.name,
                    ))
                }
            }
            Err(e) if is_not_found(&e) => Ok(None),
            Err(e) => Err(format!(
                "cannot inspect the container {}: {}",
                self.name,
                describe(&e)
            )),
        }
    }

    /// Everything the container is created with.
    fn create_body(&self, plan: &LaunchPlan) -> Result<ContainerCreateBody, String> {
        let inst = &self.inst;
        let shm_size = parse_size(&inst.shm_size).map_err(|why| {
            format!(
                "instance {}: shm_size `{}` {why}: use a number of bytes, or a number with k, m, g \
                 or t (e.g. \"16g\", \"512m\")",
                inst.name, inst.shm_size
            )
        })?;
        let labels = HashMap::from([
            (LABEL_MANAGED_BY.to_string(), MANAGED_BY.to_string()),
            (LABEL_INSTANCE.to_string(), inst.name.clone()),
            (LABEL_CONFIG_HASH.to_string(), self.config_hash(plan)),
        ]);
        let env: Vec<String> = super::server_env(inst)
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();

        let mut host = HostConfig {
            binds: (!inst.volumes.is_empty()).then(|| inst.volumes.clone()),
            shm_size: Some(shm_size),
            network_mode: Some(inst.docker_network.clone()),
            ..HostConfig::default()
        };
        let mut exposed_ports = None;
        if inst.docker_network != "host" {
            if let Some(port) = inst.port {
                let key = format!("{port}/tcp");
                host.port_bindings = Some(HashMap::from([(
                    key.clone(),
                    Some(vec![PortBinding {
                        host_ip: None,
                        host_port: Some(port.to_string()),
                    }]),
                )]));
                exposed_ports = Some(HashMap::from([(key, HashMap::new())]));
            }
        }
        if !inst.gpu_ids.is_empty() {
            host.device_requests = Some(vec![DeviceRequest {
                driver: Some("nvidia".into()),
                device_ids: Some(inst.gpu_ids.iter().map(|id| id.to_string()).collect()),
                capabilities: Some(vec![vec!["gpu".into()]]),
                ..DeviceRequest::default()
            }]);
        }

        Ok(ContainerCreateBody {
            image: Some(inst.image.clone()),
            cmd: Some(vllm_args(inst, plan)),
            labels: Some(labels),
            env: Some(env),
            exposed_ports,
            host_config: Some(host),
            ..ContainerCreateBody::default()
        })
    }

    /// Removes the container `id` (running or not); gone already is fine.
    async fn remove(&self, id: &str) -> Result<(), String> {
        let opts = RemoveContainerOptionsBuilder::new().force(true).build();
        match self.docker.remove_container(id, Some(opts)).await {
            Ok(()) => Ok(()),
            Err(e) if is_not_found(&e) => Ok(()),
            // Another removal is under way: the container goes either way.
            Err(e)
                if status_of(&e) == Some(409) && describe(&e).contains("already in progress") =>
            {
                Ok(())
            }
            Err(e) => Err(format!(
                "cannot remove the container {}: {}",
                self.name,
                describe(&e)
            )),
        }
    }

    /// Looks at the container every [`POLL_INTERVAL`] until it is not
    /// running, for when the engine cannot wait for it (restarted, or the
    /// connection broke).
    async fn poll_exit(&self, id: &str) -> Exit {
        loop {
            match self
                .docker
                .inspect_container(id, None::<InspectContainerOptions>)
                .await
            {
                Ok(info) => {
                    let state = info.state.unwrap_or_default();
                    if !state.running.unwrap_or(false) {
                        let code = state.exit_code.unwrap_or(0);
                        let mut exit = exit_of(code, state.error.as_deref().unwrap_or(""));
                        if state.oom_killed.unwrap_or(false) {
                            exit.detail
                                .push_str("; the kernel killed it for lack of memory (OOM)");
                        }
                        return exit;
                    }
                }
                Err(e) if is_not_found(&e) => return gone(),
                Err(e) => {
                    tracing::debug!(container = %self.name, error = %describe(&e),
                        "cannot inspect the container; trying again");
                }
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }
}

/// Checks that the Docker engine answers, with a sentence saying what to do
/// when it does not.
pub async fn ping(docker: &Docker) -> Result<(), String> {
    match docker.ping().await {
        Ok(_) => Ok(()),
        Err(e) => Err(format!(
            "the Docker engine does not answer ({}): start it (systemctl start docker, or run \
             dockerd), or check servers.docker_host / $DOCKER_HOST and that this user may use \
             the socket (member of the docker group)",
            describe(&e)
        )),
    }
}

#[async_trait]
impl ContainerRuntime for DockerRuntime {
    fn backend(&self) -> &'static str {
        "docker"
    }

    fn config_hash(&self, plan: &LaunchPlan) -> String {
        super::config_hash(&self.inst, plan)
    }

    async fn find(&self) -> Result<Option<Found>, String> {
        Ok(self.inspect_ours().await?.map(|info| {
            let config_hash = info
                .config
                .as_ref()
                .and_then(|c| c.labels.as_ref())
                .and_then(|l| l.get(LABEL_CONFIG_HASH))
                .cloned();
            Found {
                id: info.id.unwrap_or_else(|| self.name.clone()),
                running: info.state.and_then(|s| s.running).unwrap_or(false),
                config_hash,
            }
        }))
    }

    async fn start(&self, plan: &LaunchPlan) -> Result<String, String> {
        let body = self.create_body(plan)?;
        if let Some(old) = self.inspect_ours().await? {
            self.remove(old.id.as_deref().unwrap_or(&self.name)).await?;
        }

        let opts = CreateContainerOptionsBuilder::new()
            .name(&self.name)
            .build();
        let created = match self.docker.create_container(Some(opts), body).await {
            Ok(c) => c,
            Err(e) if is_not_found(&e) && describe(&e).to_lowercase().contains("image") => {
                let image = &self.inst.image;
                let mut msg = format!(
                    "instance {}: the image {image} is not present locally: get it with \
                     `docker pull {image}`",
                    self.inst.name
                );
                if image.starts_with("gpu-feeder-sim") {
                    msg.push_str(
                        ", or build the simulated server's image with scripts/sim-image.sh",
                    );
                }
                return Err(msg);
            }
            Err(e) => {
                return Err(format!(
                    "cannot create the container {}: {}",
                    self.name,
                    describe(&e)
                ))
            }
        };

        if let Err(e) = self
            .docker
            .start_container(&created.id, None::<StartContainerOptions>)
            .await
        {
            let mut msg = format!("cannot start the container {}: {}", self.name, describe(&e));
            if msg.contains("could not select device driver") {
                msg.push_str(
                    " (the NVIDIA Container Toolkit is missing: install nvidia-container-toolkit \
                     and restart dockerd, or set gpu_ids = [] for a server without GPUs)",
                );
            }
            if let Err(cleanup) = self.remove(&created.id).await {
                tracing::warn!(container = %self.name, error = %cleanup,
                    "cannot remove the container that failed to start");
            }
            return Err(msg);
        }
        Ok(created.id)
    }

    async fn stop(&self, id: &str, grace: Duration) -> Result<(), String> {
        let secs = grace.as_secs_f64().ceil().min(i32::MAX as f64) as i32;
        // The engine answers once the container is down: after the grace
        // period at worst, so the request may take that long.
        let docker = self
            .docker
            .clone()
            .with_timeout(Duration::from_secs(REQUEST_TIMEOUT_S) + grace);
        let opts = StopContainerOptionsBuilder::new().t(secs).build();
        match docker.stop_container(id, Some(opts)).await {
            Ok(()) => {}
            Err(e) if is_not_found(&e) => return Ok(()),
            Err(e) => {
                // Removal with force kills it; report only when that fails too.
                tracing::warn!(container = %self.name, error = %describe(&e),
                    "cannot stop the container politely; removing it by force");
            }
        }
        self.remove(id).await
    }

    async fn wait_exit(&self, id: &str) -> Exit {
        let opts = WaitContainerOptionsBuilder::new()
            .condition("not-running")
            .build();
        let mut waits = self.docker.wait_container(id, Some(opts));
        match waits.next().await {
            Some(Ok(resp)) => {
                let error = resp.error.and_then(|e| e.message).unwrap_or_default();
                exit_of(resp.status_code, &error)
            }
            Some(Err(DockerError::DockerContainerWaitError { error, code })) => {
                exit_of(code, &error)
            }
            Some(Err(e)) if is_not_found(&e) => gone(),
            Some(Err(e)) => {
                tracing::debug!(container = %self.name, error = %describe(&e),
                    "waiting on the container failed; polling it instead");
                self.poll_exit(id).await
            }
            None => self.poll_exit(id).await,
        }
    }

    async fn logs(&self, id: &str, lines: usize) -> String {
        let opts = LogsOptionsBuilder::new()
            .stdout(true)
            .stderr(true)
            .tail(&lines.to_string())
            .build();
        let mut stream = self.docker.logs(id, Some(opts));
        let mut out = Vec::new();
        let read = tokio::time::timeout(LOGS_TIMEOUT, async {
            while let Some(chunk) = stream.next().await {
                out.extend_from_slice(&chunk?.into_bytes());
            }
            Ok::<(), DockerError>(())
        })
        .await;
        match read {
            Ok(Ok(())) => String::from_utf8_lossy(&out).into_owned(),
            Ok(Err(e)) if is_not_found(&e) => {
                format!("(no output: the container {} is gone)", self.name)
            }
            Ok(Err(e)) => format!(
                "(cannot read the output of the container {}: {})",
                self.name,
                describe(&e)
            ),
            Err(_) => format!(
                "(reading the output of the container {} took more than {} s)",
                self.name,
                LOGS_TIMEOUT.as_secs()
            ),
        }
    }
}

/// How a container ended, from its exit code and the engine's error text.
fn exit_of(code: i64, error: &str) -> Exit {
    let mut detail = format!("exited with code {code}");
    if (129..=128 + 64).contains(&code) {
        let signal = code - 128;
        detail.push_str(&format!(" (killed by signal {signal})"));
    }
    if !error.trim().is_empty() {
        detail.push_str(&format!(": {}", error.trim()));
    }
    Exit {
        code: Some(code),
        detail,
    }
}

fn gone() -> Exit {
    Exit {
        code: None,
        detail: "the container is gone".into(),
    }
}

/// The HTTP status of an engine error, if it is one.
fn status_of(e: &DockerError) -> Option<u16> {
    match e {
        DockerError::DockerResponseServerError { status_code, .. } => Some(*status_code),
        _ => None,
    }
}

fn is_not_found(e: &DockerError) -> bool {
    status_of(e) == Some(404)
}

/// An engine error as a short phrase: the engine's own message when it gave
/// one, the connection failure otherwise.
fn describe(e: &DockerError) -> String {
    match e {
        DockerError::DockerResponseServerError { message, .. } => message.trim().to_string(),
        DockerError::RequestTimeoutError => "the Docker engine did not answer in time".into(),
        DockerError::HyperLegacyError { .. }
        | DockerError::IOError { .. }
        | DockerError::SocketNotFoundError(_) => format!(
            "cannot reach the Docker engine ({e}): is dockerd running, and may this user use its socket?"
        ),
        other => other.to_string(),
    }
}

/// Bytes in a Docker size: `1073741824`, `512m`, `16g`, `1.5G`, `16gb`, `16GiB`
/// (binary units, as `docker run --shm-size` takes them).
fn parse_size(s: &str) -> Result<i64, String> {
    let t = s.trim().to_ascii_lowercase();
    let digits_end = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(digits_end);
    let value: f64 = number.parse().map_err(|_| "is not a size".to_string())?;
    let unit = unit.trim_start();
    let unit = unit
        .strip_suffix("ib")
        .or_else(|| unit.strip_suffix('b'))
        .unwrap_or(unit);
    let scale: f64 = match unit {
        "" => 1.0,
        "k" => 1024.0,
        "m" => 1024.0 * 1024.0,
        "g" => 1024.0 * 1024.0 * 1024.0,
        "t" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
        _ => return Err("has an unknown unit".into()),
    };
    let bytes = (value * scale).round();
    if !(bytes >= 1.0 && bytes < i64::MAX as f64) {
        return Err("is out of range".into());
    }
    Ok(bytes as i64)
}

/// Where the engine listens.
enum Endpoint {
    Unix(String),
    Tcp(String),
}

impl Endpoint {
    fn parse(host: &str) -> Result<Endpoint, String> {
        if let Some(path) = host.strip_prefix("unix://") {
            return Ok(Endpoint::Unix(path.to_string()));
        }
        if host.starts_with('/') {
            return Ok(Endpoint::Unix(host.to_string()));
        }
        if let Some(addr) = host
            .strip_prefix("tcp://")
            .or_else(|| host.strip_prefix("http://"))
        {
            if std::env::var_os("DOCKER_TLS_VERIFY").is_some_and(|v| !v.is_empty()) {
                return Err(format!(
                    "the Docker engine at {host} asks for TLS ($DOCKER_TLS_VERIFY is set), which \
                     gpu-feeder does not speak: use the local socket (unix:///var/run/docker.sock) \
                     or a plain tcp:// endpoint"
                ));
            }
            return Ok(Endpoint::Tcp(addr.trim_end_matches('/').to_string()));
        }
        Err(format!(
            "the Docker engine address `{host}` is not supported: use unix:///path/to/docker.sock \
             or tcp://host:port in servers.docker_host (or $DOCKER_HOST)"
        ))
    }

    /// The engine's API version, from an unversioned `/_ping` (which every
    /// engine answers whatever version it speaks); `None` when it does not
    /// answer within a moment.
    fn api_version(&self) -> Option<ClientVersion> {
        const WAIT: Duration = Duration::from_secs(2);
        let request = b"GET /_ping HTTP/1.1\r\nHost: docker\r\nConnection: close\r\n\r\n";
        let mut reply = Vec::new();
        match self {
            Endpoint::Unix(path) => {
                let mut s = std::os::unix::net::UnixStream::connect(path).ok()?;
                s.set_read_timeout(Some(WAIT)).ok()?;
                s.set_write_timeout(Some(WAIT)).ok()?;
                s.write_all(request).ok()?;
                s.take(16 * 1024).read_to_end(&mut reply).ok()?;
            }
            Endpoint::Tcp(addr) => {
                use std::net::ToSocketAddrs;
                let sock = addr.to_socket_addrs().ok()?.next()?;
                let mut s = std::net::TcpStream::connect_timeout(&sock, WAIT).ok()?;
                s.set_read_timeout(Some(WAIT)).ok()?;
                s.set_write_timeout(Some(WAIT)).ok()?;
                s.write_all(request).ok()?;
                s.take(16 * 1024).read_to_end(&mut reply).ok()?;
            }
        }
        let text = String::from_utf8_lossy(&reply);
        let value = text
            .lines()
            .take_while(|l| !l.trim().is_empty())
            .find_map(|l| {
                let (name, value) = l.split_once(':')?;
                name.trim()
                    .eq_ignore_ascii_case("api-version")
                    .then(|| value.trim().to_string())
            })?;
        let (major, minor) = value.split_once('.')?;
        Some(ClientVersion {
            major_version: major.parse().ok()?,
            minor_version: minor.parse().ok()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_like_docker_run() {
        assert_eq!(parse_size("1073741824"), Ok(1 << 30));
        assert_eq!(parse_size("16g"), Ok(16 << 30));
        assert_eq!(parse_size("16G"), Ok(16 << 30));
        assert_eq!(parse_size("16gb"), Ok(16 << 30));
        assert_eq!(parse_size("16GiB"), Ok(16 << 30));
        assert_eq!(parse_size("512m"), Ok(512 << 20));
        assert_eq!(parse_size("64k"), Ok(64 << 10));
        assert_eq!(parse_size("1.5g"), Ok(3 << 29));
        assert_eq!(parse_size(" 2 g "), Ok(2 << 30));
        assert!(parse_size("").is_err());
        assert!(parse_size("g").is_err());
        assert!(parse_size("16x").is_err());
        assert!(parse_size("0").is_err());
        assert!(parse_size("-1g").is_err());
        assert!(parse_size("99999999999t").is_err());
    }

    #[test]
    fn exits_name_their_code_and_signal() {
        assert_eq!(exit_of(0, "").detail, "exited with code 0");
        assert_eq!(exit_of(3, "").detail, "exited with code 3");
        let killed = exit_of(137, "");
        assert_eq!(killed.code, Some(137));
        assert_eq!(killed.detail, "exited with code 137 (killed by signal 9)");
        assert_eq!(exit_of(1, " boom ").detail, "exited with code 1: boom");
    }

    #[test]
    fn endpoints_parse() {
        assert!(matches!(
            Endpoint::parse("unix:///run/docker.sock"),
            Ok(Endpoint::Unix(p)) if p == "/run/docker.sock"
        ));
        assert!(matches!(
            Endpoint::parse("/run/docker.sock"),
            Ok(Endpoint::Unix(p)) if p == "/run/docker.sock"
        ));
        assert!(matches!(
            Endpoint::parse("ssh://me@box"),
            Err(e) if e.contains("not supported")
        ));
    }
}
