//! `deploy/` and the docs agree with what keyshift really is: every metric that the Grafana
//! dashboard and the alert rules name is exported by a running proxy's `/metrics` (and every
//! exported metric is in docs/metrics.md); promtool accepts the rules and the Prometheus
//! config, and the rules' unit tests pass; docker-compose and the Kubernetes manifests are
//! wired together (probes, replicas, selectors, secrets, grace periods); every configuration
//! key is documented in deploy/keyshift.toml and docs/configuration.md.
mod common;
mod migrate_support;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::proxy::{TestProxy, http, test_config};
use keyshift::config::{FileConfig, ProxyArgs, ProxyConfig};
use migrate_support::{SEED_004, ks_expect, seed_004_rows};
use serde_norway::Value;

fn repo(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(rel)
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(repo(rel)).unwrap_or_else(|e| panic!("read {rel}: {e}"))
}

fn yaml(rel: &str) -> Value {
    serde_norway::from_str(&read(rel)).unwrap_or_else(|e| panic!("{rel} is not valid YAML: {e}"))
}

/// The YAML documents of a file (`---`-separated).
fn yaml_docs(rel: &str) -> Vec<Value> {
    serde_norway::Deserializer::from_str(&read(rel))
        .map(|d| {
            serde::Deserialize::deserialize(d)
                .unwrap_or_else(|e| panic!("{rel} is not valid YAML: {e}"))
        })
        .collect()
}

/// `keyshift_*` metric names in a PromQL expression (or any text), histogram series
/// suffixes removed: `_bucket`, `_sum` and `_count` are series of the family.
fn metric_names(text: &str, into: &mut BTreeSet<String>) {
    let bytes = text.as_bytes();
    let word = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    let mut i = 0;
    while let Some(pos) = text[i..].find("keyshift_") {
        let start = i + pos;
        let mut end = start;
        while end < bytes.len() && word(bytes[end]) {
            end += 1;
        }
        if start == 0 || !word(bytes[start - 1]) {
            let name = &text[start..end];
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .unwrap_or(name);
            into.insert(base.to_string());
        }
        i = end.max(start + 1);
    }
}

/// Every string in the dashboard: queries, variables, annotations and panel descriptions
/// (a description naming a metric that does not exist misleads as much as a query).
fn json_strings(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::String(s) => out.push(s.clone()),
        serde_json::Value::Array(a) => a.iter().for_each(|x| json_strings(x, out)),
        serde_json::Value::Object(o) => o.values().for_each(|x| json_strings(x, out)),
        _ => {}
    }
}

fn dashboard_metrics() -> BTreeSet<String> {
    let d: serde_json::Value =
        serde_json::from_str(&read("deploy/grafana/keyshift-dashboard.json"))
            .expect("the dashboard is valid JSON");
    let mut strings = Vec::new();
    json_strings(&d, &mut strings);
    let mut names = BTreeSet::new();
    for s in &strings {
        metric_names(s, &mut names);
    }
    names
}

fn alert_rules() -> Vec<Value> {
    let doc = yaml("deploy/prometheus/alerts.yml");
    let groups = doc["groups"].as_sequence().expect("alerts.yml: groups");
    groups
        .iter()
        .flat_map(|g| g["rules"].as_sequence().expect("rules").clone())
        .collect()
}

fn alert_metrics() -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for r in alert_rules() {
        metric_names(r["expr"].as_str().expect("expr"), &mut names);
    }
    names
}

/// Families present in a Prometheus text exposition: a family with no series prints nothing,
/// not even its `# TYPE` line.
fn exported(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect()
}

async fn scrape(admin: std::net::SocketAddr) -> String {
    tokio::task::spawn_blocking(move || http(admin, "GET", "/metrics", None))
        .await
        .unwrap()
        .1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_and_alerts_name_only_exported_metrics() {
    let mut wanted = dashboard_metrics();
    let from_alerts = alert_metrics();
    // The extraction itself works: a few names each file must use.
    for n in [
        "keyshift_map_lookups_total",
        "keyshift_backfill_rows_remaining",
    ] {
        assert!(wanted.contains(n), "dashboard does not use {n}: {wanted:?}");
    }
    for n in [
        "keyshift_rewrite_skipped_total",
        "keyshift_cutover_attempts",
        "keyshift_map_lookups_total",
        "keyshift_backfill_rows_done",
    ] {
        assert!(
            from_alerts.contains(n),
            "alerts do not use {n}: {from_alerts:?}"
        );
    }
    wanted.extend(from_alerts);

    // A real migration (expanded and backfilled) and a proxy linked to it, so that the
    // migration's metrics are registered and observed.
    let db = common::TestDb::new().await;
    db.client()
        .await
        .batch_execute(&format!("{SEED_004}{}", seed_004_rows(20)))
        .await
        .unwrap();
    ks_expect(&db.url(), &["expand"], 0);
    ks_expect(&db.url(), &["backfill"], 0);
    let mut cfg = test_config();
    cfg.database_url = Some(db.url());
    let p = TestProxy::start_with(cfg);

    // Wait for the rules to be in force, then write through the proxy: the rewrite counter
    // gets its (table, kind) series only from real traffic.
    let start = Instant::now();
    loop {
        let m = scrape(p.admin).await;
        if m.lines().any(|l| {
            l.strip_prefix("keyshift_rules_version ")
                .is_some_and(|v| v.trim() != "0")
        }) {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the proxy never put the migration's rules in force:\n{m}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let app = common::connect(&p.url("postgres", &db.name)).await;
    app.execute(
        "INSERT INTO connector_access (connector_id, user_id) VALUES ($1, 'deploy')",
        &[&1i32],
    )
    .await
    .unwrap();
    app.batch_execute("UPDATE mcp_servers SET connector_id = 2 WHERE id = 1")
        .await
        .unwrap();

    // Progress is observed at the control link's refresh (every 2 s): poll.
    let start = Instant::now();
    let (missing, text) = loop {
        let text = scrape(p.admin).await;
        let have = exported(&text);
        let missing: Vec<&String> = wanted.iter().filter(|n| !have.contains(*n)).collect();
        if missing.is_empty() || start.elapsed() > Duration::from_secs(15) {
            break (
                missing.into_iter().cloned().collect::<Vec<_>>(),
                text.clone(),
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(
        missing.is_empty(),
        "deploy/grafana/keyshift-dashboard.json or deploy/prometheus/alerts.yml name metrics \
         that /metrics does not export: {missing:?}\n--- /metrics\n{text}"
    );

    // And docs/metrics.md describes every metric that is exported.
    let docs = read("docs/metrics.md");
    let undocumented: Vec<String> = exported(&text)
        .into_iter()
        .filter(|n| !docs.contains(&format!("`{n}`")))
        .collect();
    assert!(
        undocumented.is_empty(),
        "docs/metrics.md does not describe {undocumented:?}"
    );
}

/// promtool, from Debian's `prometheus` package; a missing tool fails the test.
fn promtool() -> PathBuf {
    let found = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|d| d.join("promtool"))
            .find(|p| p.is_file())
    });
    found.unwrap_or_else(|| {
        panic!(
            "this test needs `promtool`; install Debian's prometheus package: \
             `apt-get install --no-install-recommends prometheus` (.ci/run does it)"
        )
    })
}

fn promtool_ok(args: &[&str]) {
    let o = Command::new(promtool())
        .args(args)
        .current_dir(repo("."))
        .output()
        .expect("run promtool");
    assert!(
        o.status.success(),
        "promtool {args:?} failed:\n{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn promtool_accepts_rules_and_config() {
    promtool_ok(&["check", "rules", "deploy/prometheus/alerts.yml"]);
    // rule_files are resolved relative to the config file: this checks alerts.yml again,
    // as Prometheus will load it.
    promtool_ok(&["check", "config", "deploy/prometheus/prometheus.yml"]);
    // The alerts fire (and stay quiet) on the series they are meant for.
    promtool_ok(&["test", "rules", "deploy/prometheus/alerts_test.yml"]);
    // Every alert tells the operator what to do, with a runbook section.
    for r in alert_rules() {
        let name = r["alert"].as_str().expect("alert name");
        for key in ["summary", "description"] {
            assert!(
                r["annotations"][key]
                    .as_str()
                    .is_some_and(|s| !s.is_empty()),
                "alert {name} has no {key}"
            );
        }
        assert!(
            r["annotations"]["description"]
                .as_str()
                .is_some_and(|d| d.contains("docs/runbook.md#")),
            "alert {name} does not point to a docs/runbook.md section"
        );
        assert!(
            r["labels"]["severity"].is_string(),
            "alert {name}: severity"
        );
    }
}

/// Seconds of a Kubernetes/compose/systemd duration such as `45`, `40s`, `2m`.
fn seconds(v: &str) -> u64 {
    keyshift::config::parse_duration(v)
        .or_else(|_| keyshift::config::parse_duration(&format!("{v}s")))
        .unwrap_or_else(|e| panic!("{e}"))
        .as_secs()
}

/// The proxy's resolved configuration for a config file's text and environment variables,
/// as `keyshift proxy` would resolve it.
fn resolve(toml: &str, env: &[(&str, &str)]) -> ProxyConfig {
    let file = FileConfig::parse(toml).unwrap_or_else(|e| panic!("not a keyshift.toml: {e}"));
    let get = |k: &str| {
        env.iter()
            .find(|(n, _)| *n == k)
            .map(|(_, v)| v.to_string())
    };
    let args = ProxyArgs {
        listen: get("KEYSHIFT_LISTEN"),
        admin_listen: get("KEYSHIFT_ADMIN_LISTEN"),
        upstream: get("KEYSHIFT_UPSTREAM"),
        database_url: get("KEYSHIFT_DATABASE_URL"),
        admin_token: get("KEYSHIFT_ADMIN_TOKEN"),
        map_token: get("KEYSHIFT_MAP_TOKEN"),
        ..Default::default()
    };
    ProxyConfig::resolve(file, &args).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn compose_is_wired() {
    let c = yaml("deploy/docker-compose.yml");
    let services = &c["services"];
    for s in ["postgres", "keyshift", "prometheus", "grafana"] {
        assert!(services[s].is_mapping(), "service {s} missing");
    }
    assert!(
        services["postgres"]["healthcheck"]["test"].is_sequence(),
        "postgres has no healthcheck"
    );
    assert_eq!(
        services["keyshift"]["depends_on"]["postgres"]["condition"].as_str(),
        Some("service_healthy")
    );
    let ks = &services["keyshift"];
    let dockerfile = Path::new("deploy")
        .join(ks["build"]["context"].as_str().expect("build context"))
        .join(ks["build"]["dockerfile"].as_str().expect("dockerfile"));
    assert!(
        repo(dockerfile.to_str().unwrap()).is_file(),
        "{dockerfile:?}"
    );

    // The environment resolves to a valid configuration with the image's config file.
    let env: Vec<(String, String)> = ks["environment"]
        .as_mapping()
        .expect("keyshift environment as a mapping")
        .iter()
        .map(|(k, v)| {
            let v = match v {
                Value::String(s) => s.clone(),
                other => serde_norway::to_string(other).unwrap().trim().to_string(),
            };
            // ${VAR:-default} as compose substitutes it when VAR is unset.
            let mut out = String::new();
            let mut rest = v.as_str();
            while let Some(i) = rest.find("${") {
                out.push_str(&rest[..i]);
                let end = rest[i..].find('}').expect("closing }") + i;
                let inner = &rest[i + 2..end];
                out.push_str(inner.split_once(":-").map(|(_, d)| d).unwrap_or(""));
                rest = &rest[end + 1..];
            }
            out.push_str(rest);
            (k.as_str().unwrap().to_string(), out)
        })
        .collect();
    for k in [
        "KEYSHIFT_UPSTREAM",
        "KEYSHIFT_DATABASE_URL",
        "KEYSHIFT_LISTEN",
        "KEYSHIFT_ADMIN_LISTEN",
        "KEYSHIFT_ADMIN_TOKEN",
        "KEYSHIFT_MAP_TOKEN",
    ] {
        assert!(
            env.iter().any(|(n, _)| n == k),
            "keyshift service lacks {k}"
        );
    }
    let env_ref: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let cfg = resolve(&image_config(), &env_ref);
    assert_eq!(cfg.admin_listen.port(), 9187);
    assert_eq!(cfg.listen.port(), 6432);
    assert!(cfg.upstream.starts_with("postgres:"), "{}", cfg.upstream);
    let grace = seconds(ks["stop_grace_period"].as_str().expect("stop_grace_period"));
    assert!(
        grace > cfg.shutdown_grace.as_secs(),
        "stop_grace_period {grace}s must exceed shutdown_grace"
    );

    // Prometheus scrapes the keyshift service on its admin port, with the rules beside it.
    let prom = yaml("deploy/prometheus/prometheus.yml");
    let job = prom["scrape_configs"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|j| j["job_name"].as_str() == Some("keyshift"))
        .expect("a scrape job named keyshift (the alerts select job=\"keyshift\")");
    let targets = job["static_configs"][0]["targets"].as_sequence().unwrap();
    assert_eq!(targets[0].as_str(), Some("keyshift:9187"));

    // Every bind mount's source exists, and the provisioning points at the dashboard.
    for s in ["prometheus", "grafana"] {
        for v in services[s]["volumes"].as_sequence().unwrap() {
            let v = v.as_str().unwrap();
            if let Some(src) = v.strip_prefix("./") {
                let src = src.split(':').next().unwrap();
                assert!(repo(&format!("deploy/{src}")).exists(), "{s}: {v}");
            }
        }
    }
    let providers = yaml("deploy/grafana/provisioning/dashboards/keyshift.yml");
    let path = providers["providers"][0]["options"]["path"]
        .as_str()
        .unwrap();
    assert!(
        services["grafana"]["volumes"]
            .as_sequence()
            .unwrap()
            .iter()
            .any(|v| v.as_str().unwrap().contains(&format!(":{path}/"))),
        "no dashboard mounted under {path}"
    );
    let ds = yaml("deploy/grafana/provisioning/datasources/prometheus.yml");
    assert_eq!(
        ds["datasources"][0]["url"].as_str(),
        Some("http://prometheus:9090")
    );
}

/// /etc/keyshift/keyshift.toml in the image: deploy/keyshift.toml plus the lines the
/// Dockerfile appends.
fn image_config() -> String {
    let dockerfile = read("deploy/Dockerfile");
    let printf = dockerfile
        .lines()
        .find(|l| l.contains("printf") && l.contains("listen"))
        .expect("the Dockerfile appends listen addresses");
    let appended = printf
        .split('\'')
        .nth(1)
        .expect("printf '...'")
        .replace("\\n", "\n");
    format!("{}{appended}", read("deploy/keyshift.toml"))
}

#[test]
fn dockerfile_runs_keyshift_unprivileged() {
    let d = read("deploy/Dockerfile");
    for needle in [
        "FROM rust:1.95-bookworm AS builder",
        "FROM debian:bookworm-slim",
        "EXPOSE 6432 9187",
        "ENTRYPOINT [\"keyshift\"]",
        "CMD [\"proxy\", \"--config\", \"/etc/keyshift/keyshift.toml\"]",
    ] {
        assert!(d.contains(needle), "deploy/Dockerfile lacks {needle}");
    }
    let user = d
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("USER "))
        .expect("a USER line");
    assert!(
        user.split(':')
            .next()
            .unwrap()
            .parse::<u32>()
            .is_ok_and(|u| u > 0),
        "USER {user}: a numeric non-root uid (Kubernetes' runAsNonRoot checks it)"
    );
    let cfg = resolve(&image_config(), &[]);
    assert_eq!(cfg.listen.to_string(), "0.0.0.0:6432");
    assert_eq!(cfg.admin_listen.to_string(), "0.0.0.0:9187");
    let ignore = read(".dockerignore");
    assert!(ignore.lines().any(|l| l.trim_end_matches('/') == "target"));
}

fn k8s(kind: &str) -> Value {
    let dir = repo("deploy/k8s");
    let mut found = Vec::new();
    for e in std::fs::read_dir(&dir).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_name().unwrap().to_str().unwrap().to_string();
        if name.ends_with(".yaml") && name != "kustomization.yaml" {
            for d in yaml_docs(&format!("deploy/k8s/{name}")) {
                if d["kind"].as_str() == Some(kind) {
                    found.push(d);
                }
            }
        }
    }
    assert_eq!(found.len(), 1, "one {kind} in deploy/k8s");
    found.remove(0)
}

/// `selector` (matchLabels or a Service's plain map) selects `labels`.
fn selects(selector: &Value, labels: &Value) -> bool {
    let sel = selector.as_mapping().expect("selector");
    !sel.is_empty() && sel.iter().all(|(k, v)| labels[k.as_str().unwrap()] == *v)
}

#[test]
fn kubernetes_manifests_are_wired() {
    let dep = k8s("Deployment");
    let spec = &dep["spec"];
    assert_eq!(spec["replicas"].as_u64(), Some(2));
    let pod_labels = &spec["template"]["metadata"]["labels"];
    assert!(selects(&spec["selector"]["matchLabels"], pod_labels));
    let pod = &spec["template"]["spec"];
    let c = &pod["containers"][0];
    let port = |name: &str| {
        c["ports"]
            .as_sequence()
            .unwrap()
            .iter()
            .find(|p| p["name"].as_str() == Some(name))
            .and_then(|p| p["containerPort"].as_u64())
            .unwrap_or_else(|| panic!("container port {name}"))
    };
    assert_eq!(port("postgres"), 6432);
    assert_eq!(port("admin"), 9187);
    for (probe, path) in [("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")] {
        assert_eq!(c[probe]["httpGet"]["path"].as_str(), Some(path), "{probe}");
        let p = &c[probe]["httpGet"]["port"];
        assert!(
            p.as_str() == Some("admin") || p.as_u64() == Some(9187),
            "{probe} port {p:?}"
        );
    }
    assert_eq!(pod["securityContext"]["runAsNonRoot"].as_bool(), Some(true));
    assert_eq!(
        c["securityContext"]["allowPrivilegeEscalation"].as_bool(),
        Some(false)
    );
    assert!(c["resources"]["requests"]["memory"].is_string());
    assert!(c["resources"]["limits"]["memory"].is_string());

    // Each replica's proxy_id is its pod name.
    let env = c["env"].as_sequence().unwrap();
    let id = env
        .iter()
        .find(|e| e["name"].as_str() == Some("KEYSHIFT_PROXY_ID"))
        .expect("KEYSHIFT_PROXY_ID");
    assert_eq!(
        id["valueFrom"]["fieldRef"]["fieldPath"].as_str(),
        Some("metadata.name")
    );

    // Tokens and the database URL come from the Secret.
    let secret = k8s("Secret");
    let secret_name = secret["metadata"]["name"].as_str().unwrap();
    assert!(
        c["envFrom"]
            .as_sequence()
            .unwrap()
            .iter()
            .any(|e| e["secretRef"]["name"].as_str() == Some(secret_name)),
        "the container does not take its environment from Secret {secret_name}"
    );
    let keys: BTreeSet<&str> = secret["stringData"]
        .as_mapping()
        .unwrap()
        .keys()
        .map(|k| k.as_str().unwrap())
        .collect();
    assert_eq!(
        keys,
        BTreeSet::from([
            "KEYSHIFT_ADMIN_TOKEN",
            "KEYSHIFT_DATABASE_URL",
            "KEYSHIFT_MAP_TOKEN"
        ])
    );

    // The ConfigMap is mounted where the container reads its config, and is a valid one.
    let cm = k8s("ConfigMap");
    let args: Vec<&str> = c["args"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    let config_path = args[args.iter().position(|a| *a == "--config").unwrap() + 1];
    let (dir, file) = config_path.rsplit_once('/').unwrap();
    let mount = c["volumeMounts"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|m| m["mountPath"].as_str() == Some(dir))
        .expect("a volume mounted at the config's directory");
    let volume = pod["volumes"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|v| v["name"] == mount["name"])
        .expect("the mounted volume");
    assert_eq!(volume["configMap"]["name"], cm["metadata"]["name"]);
    let toml = cm["data"][file]
        .as_str()
        .expect("the config file in the ConfigMap");
    let cfg = resolve(
        toml,
        &[(
            "KEYSHIFT_DATABASE_URL",
            secret["stringData"]["KEYSHIFT_DATABASE_URL"]
                .as_str()
                .unwrap(),
        )],
    );
    assert_eq!(cfg.admin_listen.port(), 9187);
    assert_eq!(cfg.listen.port(), 6432);
    let grace = pod["terminationGracePeriodSeconds"]
        .as_u64()
        .expect("terminationGracePeriodSeconds");
    assert!(
        grace > cfg.shutdown_grace.as_secs(),
        "terminationGracePeriodSeconds {grace} must exceed shutdown_grace {:?}",
        cfg.shutdown_grace
    );

    // The Service and the PodDisruptionBudget select the Deployment's pods.
    let svc = k8s("Service");
    assert!(selects(&svc["spec"]["selector"], pod_labels));
    let ports: BTreeSet<(u64, &str)> = svc["spec"]["ports"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["port"].as_u64().unwrap(),
                p["targetPort"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(ports, BTreeSet::from([(6432, "postgres"), (9187, "admin")]));
    let pdb = k8s("PodDisruptionBudget");
    assert_eq!(pdb["spec"]["minAvailable"].as_u64(), Some(1));
    assert!(
        selects(&pdb["spec"]["selector"]["matchLabels"], pod_labels),
        "the PodDisruptionBudget does not select the Deployment's pods"
    );

    // kustomization.yaml lists every manifest.
    let kust = yaml("deploy/k8s/kustomization.yaml");
    let listed: BTreeSet<&str> = kust["resources"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|r| r.as_str().unwrap())
        .collect();
    for e in std::fs::read_dir(repo("deploy/k8s")).unwrap() {
        let name = e.unwrap().file_name().into_string().unwrap();
        if name != "kustomization.yaml" {
            assert!(
                listed.contains(name.as_str()),
                "kustomization.yaml lacks {name}"
            );
        }
    }
}

#[test]
fn systemd_unit_outlasts_the_grace() {
    let unit = read("deploy/systemd/keyshift.service");
    let value = |key: &str| {
        unit.lines()
            .find_map(|l| l.strip_prefix(&format!("{key}=")))
            .unwrap_or_else(|| panic!("keyshift.service has no {key}="))
    };
    assert_eq!(value("Type"), "simple");
    assert_eq!(value("User"), "keyshift");
    assert_eq!(value("KillSignal"), "SIGTERM");
    assert_eq!(value("Restart"), "on-failure");
    assert_eq!(value("EnvironmentFile"), "-/etc/keyshift/keyshift.env");
    assert_eq!(value("NoNewPrivileges"), "yes");
    assert_eq!(value("ProtectSystem"), "strict");
    let default_grace = ProxyConfig::default().shutdown_grace.as_secs();
    assert!(seconds(value("TimeoutStopSec")) > default_grace);
    assert!(value("ExecStart").contains("keyshift proxy --config /etc/keyshift/keyshift.toml"));
}

/// FileConfig's keys, as serde lists them when it rejects an unknown one.
fn file_config_keys() -> Vec<String> {
    let e = FileConfig::parse("no_such_key_at_all = 1").expect_err("unknown keys are refused");
    let list = e
        .split_once("expected one of ")
        .unwrap_or_else(|| panic!("unexpected error: {e}"))
        .1;
    let keys: Vec<String> = list
        .split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_string)
        .collect();
    assert!(
        keys.len() > 20 && keys.iter().any(|k| k == "listen"),
        "{keys:?}"
    );
    keys
}

#[test]
fn every_config_key_is_documented() {
    let keys = file_config_keys();
    let sample = read("deploy/keyshift.toml");
    let documented: Vec<&str> = sample
        .lines()
        .filter_map(|l| l.strip_prefix("# "))
        .filter_map(|l| l.split_once(" = "))
        .map(|(k, _)| k)
        .filter(|k| k.chars().all(|c| c.is_ascii_lowercase() || c == '_'))
        .collect();
    let missing: Vec<&String> = keys
        .iter()
        .filter(|k| !documented.contains(&k.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "deploy/keyshift.toml has no `# key = default` line for {missing:?}"
    );
    // Uncommented, the sample is a valid config file (each value of the right type).
    let uncommented: String = sample
        .lines()
        .filter_map(|l| l.strip_prefix("# "))
        .filter(|l| {
            l.split_once(" = ")
                .is_some_and(|(k, _)| keys.iter().any(|key| key == k))
        })
        .map(|l| format!("{l}\n"))
        .collect();
    FileConfig::parse(&uncommented)
        .unwrap_or_else(|e| panic!("deploy/keyshift.toml, uncommented: {e}\n{uncommented}"));

    let docs = read("docs/configuration.md");
    let missing: Vec<&String> = keys
        .iter()
        .filter(|k| !docs.contains(&format!("`{k}`")))
        .collect();
    assert!(
        missing.is_empty(),
        "docs/configuration.md does not describe {missing:?}"
    );
}
