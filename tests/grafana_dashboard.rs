//! The Grafana dashboard (`packaging/grafana/gpu-feeder.json`) queries only
//! what gpu-feeder exports: every metric name in every panel's PromQL (and
//! in the template variables' `label_values`) is found in the `/metrics` of
//! a real daemon that has run jobs against a simulated server. A renamed or
//! misspelt metric, on either side, fails here instead of leaving an empty
//! panel on someone's wall.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;
use std::time::Duration;

use common::{external, free_port, promtool, wait_for, DaemonProcess, Scratch, SimProcess};

const LIMIT: Duration = Duration::from_secs(60);

fn dashboard() -> serde_json::Value {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/packaging/grafana/gpu-feeder.json"
    );
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path} is not JSON: {e}"))
}

/// Every panel, the rows' own nested panels (collapsed rows) included.
fn panels(dash: &serde_json::Value) -> Vec<&serde_json::Value> {
    fn walk<'a>(list: &'a serde_json::Value, out: &mut Vec<&'a serde_json::Value>) {
        for p in list.as_array().into_iter().flatten() {
            out.push(p);
            walk(&p["panels"], out);
        }
    }
    let mut out = Vec::new();
    walk(&dash["panels"], &mut out);
    out
}

/// Words of PromQL that are never metric names: keywords, aggregation
/// operators (which may be followed by `by (...)` rather than `(`), and the
/// literals.
const KEYWORDS: &[&str] = &[
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "and",
    "or",
    "unless",
    "offset",
    "atan2",
    "sum",
    "min",
    "max",
    "avg",
    "group",
    "stddev",
    "stdvar",
    "count",
    "count_values",
    "bottomk",
    "topk",
    "quantile",
    "limitk",
    "limit_ratio",
    "inf",
    "nan",
];

/// Words after which a parenthesised list holds label names, not an
/// expression.
const LABEL_LISTS: &[&str] = &[
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
];

/// The metric names a PromQL expression reads: identifiers not followed by
/// `(` (functions), outside label matchers `{...}`, ranges `[...]`, strings
/// and the label lists of `by`/`without`/`on`/`ignoring`/`group_*`, that are
/// not keywords. Grafana's variables (`$x`, `${x}`, `[[x]]`) are skipped.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let chars: Vec<char> = expr.chars().collect();
    let mut names = BTreeSet::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c == '{' {
            i = skip_brackets(&chars, i, '{', '}');
        } else if c == '[' {
            i = skip_brackets(&chars, i, '[', ']');
        } else if matches!(c, '"' | '\'' | '`') {
            i = skip_string(&chars, i);
        } else if c == '$' {
            // $name or ${name}
            i += 1;
            if chars.get(i) == Some(&'{') {
                i = skip_brackets(&chars, i, '{', '}');
            } else {
                while i < chars.len() && (chars[i].is_alphanumeric() || chars[i] == '_') {
                    i += 1;
                }
            }
        } else if c.is_ascii_digit() || c == '.' {
            // A number, or a duration such as 5m or 1h30m.
            while i < chars.len() && (chars[i].is_alphanumeric() || chars[i] == '.') {
                i += 1;
            }
        } else if c.is_alphabetic() || c == '_' || c == ':' {
            let start = i;
            while i < chars.len()
                && (chars[i].is_alphanumeric() || chars[i] == '_' || chars[i] == ':')
            {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            let mut next = i;
            while next < chars.len() && chars[next].is_whitespace() {
                next += 1;
            }
            let called = chars.get(next) == Some(&'(');
            if called && LABEL_LISTS.contains(&word.as_str()) {
                i = skip_brackets(&chars, next, '(', ')');
            } else if !called && !KEYWORDS.contains(&word.to_ascii_lowercase().as_str()) {
                names.insert(word);
            }
        } else {
            i += 1;
        }
    }
    names
}

/// The index just past the bracket that closes the one at `start`.
fn skip_brackets(chars: &[char], start: usize, open: char, close: char) -> usize {
    let mut depth = 0;
    let mut i = start;
    while i < chars.len() {
        match chars[i] {
            '"' | '\'' | '`' => {
                i = skip_string(chars, i);
                continue;
            }
            c if c == open => depth += 1,
            c if c == close => {
                depth -= 1;
                if depth == 0 {
                    return i + 1;
                }
            }
            _ => {}
        }
        i += 1;
    }
    i
}

/// The index just past the string literal opening at `start`.
fn skip_string(chars: &[char], start: usize) -> usize {
    let q = chars[start];
    let mut i = start + 1;
    while i < chars.len() && chars[i] != q {
        if chars[i] == '\\' && q != '`' {
            i += 1;
        }
        i += 1;
    }
    i + 1
}

/// What a `/metrics` text exports: each family's declared type (from its
/// `# TYPE` line) and the names that have a sample.
struct Exported {
    types: BTreeMap<String, String>,
    samples: BTreeSet<String>,
}

impl Exported {
    fn parse(text: &str) -> Exported {
        let mut types = BTreeMap::new();
        let mut samples = BTreeSet::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let mut parts = rest.split_whitespace();
                if let (Some(name), Some(kind)) = (parts.next(), parts.next()) {
                    types.insert(name.to_string(), kind.to_string());
                }
            } else if !line.starts_with('#') && !line.trim().is_empty() {
                let end = line.find(['{', ' ']).unwrap_or(line.len());
                samples.insert(line[..end].to_string());
            }
        }
        Exported { types, samples }
    }

    /// The family a queried name belongs to, if exported: the name itself,
    /// or for `_bucket`/`_sum`/`_count` its histogram (or summary).
    fn family(&self, name: &str) -> Option<String> {
        if self.types.contains_key(name) || self.samples.contains(name) {
            return Some(name.to_string());
        }
        for suffix in ["_bucket", "_sum", "_count"] {
            if let Some(base) = name.strip_suffix(suffix) {
                match self.types.get(base).map(String::as_str) {
                    Some("histogram") => return Some(base.to_string()),
                    Some("summary") if suffix != "_bucket" => return Some(base.to_string()),
                    _ => {}
                }
            }
        }
        None
    }
}

/// The `/metrics` text of gpu-feeder's own registry, refreshed with a
/// status in which every part is filled: a GPU reading, a dispatcher whose
/// auto window has read its server, an allocator with a GPU group. The
/// daemon in the test leaves those families empty (no GPU, no allocator on
/// an external server) and prometheus-client then writes no `# TYPE` line
/// for them; this is the same registry, so a misspelt name fails here too.
fn every_family_filled() -> String {
    use feeder_actors::allocator::{AllocatorStatus, GroupStatus, Strategy};
    use feeder_actors::dispatch::{DispatchMode, DispatchStatus};
    use feeder_actors::gpu::{GpuReading, GpuSnapshot};
    use feeder_actors::inference::EngineMetrics;
    use feeder_actors::supervisor::FeederStatus;
    use feeder_actors::window::WindowSignals;
    use std::time::SystemTime;

    let group = GroupStatus {
        name: "gpu 0".into(),
        gpu_ids: vec![0],
        instances: vec!["think".into()],
        strategy: Strategy::Think,
        since: SystemTime::now(),
        why: "backlog".into(),
        pinned: None,
        switching: false,
        switches: 1,
        problems: Vec::new(),
        recent: Vec::new(),
    };
    let status = FeederStatus {
        dispatch: vec![DispatchStatus {
            instance: "think".into(),
            model: feeder_actors::ModelType::Think,
            mode: DispatchMode::Sending,
            in_flight: 1,
            buffered: 0,
            window: 4,
            max_window: 64,
            auto_window: true,
            window_reason: "probing".into(),
            window_signals: WindowSignals {
                metrics: Some(EngineMetrics {
                    running: 1.0,
                    waiting: 0.0,
                    kv_usage: 0.1,
                    prefix_cache: Some((10.0, 20.0)),
                    ..EngineMetrics::default()
                }),
                tokens_per_s: Some(100.0),
                ..WindowSignals::default()
            },
            thermal_cap: None,
            sent: 1,
            completed: 1,
            failed: 0,
            overloaded: 0,
            crashed: 0,
            aborted: 0,
            warm_prefixes: 0,
            holds: 0,
            recalled: 0,
        }],
        gpus: Some(GpuSnapshot {
            gpus: vec![GpuReading {
                index: 0,
                name: "a GPU".into(),
                uuid: "GPU-0".into(),
                temperature_c: 60,
                utilization_pct: 90,
                memory_used_bytes: 1 << 30,
                memory_total_bytes: 1 << 34,
                power_w: Some(300.0),
                sm_clock_mhz: None,
                memory_clock_mhz: None,
                throttle_reasons: Vec::new(),
                processes: Vec::new(),
            }],
            hot: vec![0],
            alerts: 1,
            ..GpuSnapshot::unavailable("")
        }),
        allocator: Some(AllocatorStatus {
            strategy: group.strategy,
            since: group.since,
            why: group.why.clone(),
            pinned: None,
            switching: false,
            switches: 1,
            problems: Vec::new(),
            costs: Vec::new(),
            groups: vec![group],
        }),
        ..FeederStatus::default()
    };
    let metrics = gpu_feeder::metrics::Metrics::new();
    metrics.refresh(None, Some(&status));
    // A streamed chat completion of the OpenAI API.
    metrics.stream_first_chunk(feeder_actors::ModelType::Think, 0.05);
    metrics.stream_ended(feeder_actors::ModelType::Think, "relayed");
    metrics.encode()
}

/// Every PromQL expression in the dashboard, with where it is.
fn queries(dash: &serde_json::Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for p in panels(dash) {
        let title = p["title"].as_str().unwrap_or("?");
        for t in p["targets"].as_array().into_iter().flatten() {
            if let Some(expr) = t["expr"].as_str() {
                out.push((
                    format!("panel {title:?} target {}", t["refId"]),
                    expr.to_string(),
                ));
            }
        }
    }
    for v in dash["templating"]["list"].as_array().into_iter().flatten() {
        if v["type"] != "query" {
            continue;
        }
        let q = v["query"]["query"]
            .as_str()
            .or(v["query"].as_str())
            .unwrap_or_default();
        // label_values(metric, label): the metric is the first argument.
        let inner = q
            .strip_prefix("label_values(")
            .and_then(|r| r.strip_suffix(')'))
            .unwrap_or_else(|| {
                panic!(
                    "variable {}: {q:?} is not label_values(metric, label)",
                    v["name"]
                )
            });
        let metric = inner.split(',').next().unwrap().trim();
        out.push((format!("variable {}", v["name"]), metric.to_string()));
    }
    out
}

#[test]
fn the_tokenizer_finds_metric_names_and_nothing_else() {
    let names = |e: &str| metric_names(e).into_iter().collect::<Vec<_>>();
    assert_eq!(
        names(
            r#"histogram_quantile(0.9, sum by (le, instance) (rate(a_bucket{instance=~"$instance", x="b{c}"}[$__rate_interval])))"#
        ),
        ["a_bucket"]
    );
    assert_eq!(
        names("sum without(gpu) (b) / on (instance) group_left(model) c offset 5m > bool 1e3"),
        ["b", "c"]
    );
    assert_eq!(
        names("rate(x[1h30m]) / ignoring(kind) y or max(z) and count (w) unless ${v} == inf"),
        ["w", "x", "y", "z"]
    );
    assert_eq!(
        names(r#"label_replace(m, "dst", "$1", "src", "(.*)")"#),
        ["m"]
    );
    assert_eq!(
        names("ns:recorded_rule:rate5m * 2"),
        ["ns:recorded_rule:rate5m"]
    );
}

#[test]
fn every_panel_has_a_title_and_a_query_on_the_datasource_variable() {
    let dash = dashboard();
    assert!(
        dash["schemaVersion"].as_u64().unwrap_or(0) >= 36,
        "a schemaVersion this decade's Grafana reads"
    );
    let vars: BTreeSet<&str> = dash["templating"]["list"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|v| v["name"].as_str())
        .collect();
    for v in ["DS_PROMETHEUS", "instance", "model"] {
        assert!(vars.contains(v), "the dashboard has no ${v} variable");
    }
    let all = panels(&dash);
    assert!(all.len() >= 10, "only {} panels", all.len());
    let mut ids = BTreeSet::new();
    for p in all {
        let title = p["title"].as_str().unwrap_or_default();
        assert!(!title.trim().is_empty(), "a panel without a title: {p}");
        assert!(ids.insert(p["id"].as_u64()), "panel id {} twice", p["id"]);
        if p["type"] == "row" {
            continue;
        }
        let targets = p["targets"].as_array().map(Vec::as_slice).unwrap_or(&[]);
        assert!(!targets.is_empty(), "panel {title:?} has no query");
        assert_eq!(
            p["datasource"]["uid"], "${DS_PROMETHEUS}",
            "panel {title:?} does not read the chosen data source"
        );
        for t in targets {
            let expr = t["expr"].as_str().unwrap_or_default();
            assert!(!expr.trim().is_empty(), "panel {title:?}: an empty query");
            assert!(
                !metric_names(expr).is_empty(),
                "panel {title:?}: no metric in {expr:?}"
            );
        }
    }
}

/// Grafana's variables replaced by values of their kind, so that Prometheus
/// itself can parse the expression.
fn as_grafana_sends_it(expr: &str) -> String {
    expr.replace("$__rate_interval", "1m")
        .replace("$__interval", "1m")
        .replace("$instance", ".*")
        .replace("$model", ".*")
}

#[test]
fn every_query_parses_as_promql() {
    // promtool parses each expression as a recording rule's.
    let dash = dashboard();
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, (wher, expr)) in queries(&dash).iter().enumerate() {
        let sent = as_grafana_sends_it(expr);
        assert!(
            !sent.contains('$'),
            "{wher}: a variable the test does not know in {expr}"
        );
        rules.push_str(&format!(
            "      - record: dashboard:query_{i}\n        expr: {}\n",
            serde_json::to_string(&sent).unwrap()
        ));
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dashboard-rules.yml");
    std::fs::write(&path, &rules).unwrap();
    let out = Command::new("promtool")
        .args(["check", "rules"])
        .arg(&path)
        .output()
        .expect("promtool is installed (scripts/test.sh installs the Debian package prometheus)");
    assert!(
        out.status.success(),
        "promtool check rules on the dashboard's queries:\n{}{}\n{rules}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn every_metric_the_dashboard_queries_is_one_the_daemon_exports() {
    let dash = dashboard();
    let queried: Vec<(String, String, BTreeSet<String>)> = queries(&dash)
        .into_iter()
        .map(|(wher, expr)| {
            let names = metric_names(&expr);
            (wher, expr, names)
        })
        .collect();

    // A daemon with an auto window (so the server's signals are read) that
    // has done some jobs.
    // An engine behind the sim, so that its /metrics has what vLLM's has.
    let think = SimProcess::start(&["--kv-cache-tokens", "40000", "--max-num-seqs", "64"]);
    let port = free_port();
    let s = Scratch::new(&format!(
        "[admin]\nlisten = \"127.0.0.1:{port}\"\n\n[health]\ninterval_s = 1\n\n[dispatch]\nexternal_poll_ms = 100\n\n{}window = \"auto\"\n",
        external("think", "think", &think.url)
    ));
    let _d = DaemonProcess::start_ready(&s, "daemon", &["think"], LIMIT);
    s.submit_prompts("think", "grafana", 200);
    wait_for("200 jobs are done", LIMIT, || s.count("done") == 200);
    let scrape = || {
        let out = Command::new("curl")
            .args(["-sf", &format!("http://127.0.0.1:{port}/metrics")])
            .output()
            .expect("curl is installed");
        assert!(out.status.success(), "GET /metrics failed");
        String::from_utf8(out.stdout).unwrap()
    };
    // The auto window reads the server's /metrics on its own schedule.
    let mut text = String::new();
    wait_for("the daemon exports the server's signals", LIMIT, || {
        text = scrape();
        text.contains("\ngpu_feeder_server_running{")
            && text.contains("\ngpu_feeder_server_prefix_cache_query_tokens{")
    });
    let daemon = Exported::parse(&text);
    let filled = every_family_filled();
    assert!(
        daemon
            .samples
            .contains("gpu_feeder_request_duration_seconds_bucket"),
        "the daemon has not recorded a request yet:\n{text}"
    );
    // The families the dashboard added to the daemon pass promtool's lint too.
    for (what, text) in [("the daemon's", &text), ("the filled registry's", &filled)] {
        let (passed, said) = promtool(text);
        assert!(passed, "promtool check metrics on {what} /metrics:\n{said}");
    }
    let registry = Exported::parse(&filled);

    let mut missing = Vec::new();
    let mut from_registry = BTreeSet::new();
    for (wher, expr, names) in &queried {
        for name in names {
            if daemon.family(name).is_some() {
                continue;
            }
            match registry.family(name) {
                Some(_) => {
                    from_registry.insert(name.clone());
                }
                None => missing.push(format!("{wher}: {name} (in {expr})")),
            }
        }
    }
    eprintln!(
        "queried metrics the daemon here leaves empty (no GPU, no allocator), found in its registry filled: {from_registry:?}"
    );
    assert!(
        missing.is_empty(),
        "the dashboard queries metrics that gpu-feeder does not export:\n{}\n\nexported families: {:?}",
        missing.join("\n"),
        daemon
            .types
            .keys()
            .chain(registry.types.keys())
            .collect::<BTreeSet<_>>()
    );
    let all: BTreeSet<&String> = queried.iter().flat_map(|(_, _, n)| n).collect();
    assert!(
        all.len() >= 20,
        "the dashboard reads only {} metrics",
        all.len()
    );
}
