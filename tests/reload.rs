//! Hot reload over real sockets: no request lost while backends change, long streams and
//! WebSockets surviving many reloads, broken configs refused with the old one serving,
//! listeners opened and closed, certificates replaced, file watching (in-place write, rename,
//! Kubernetes symlink swap), the audit log and the last-known-good copy.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use bytes::Bytes;
use common::*;
use gatehouse::server::Gatehouse;
use http::{Request, StatusCode};
use http_body_util::Full;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn yaml(backends: &[(&str, SocketAddr, u32)], extra_listeners: &str) -> String {
    let mut text = format!(
        "admin: {{ listen: \"127.0.0.1:0\" }}
audit_log: audit.jsonl
listeners:
  web: {{ listen: \"127.0.0.1:0\", pool: p }}
{extra_listeners}pools:
  p:
    algorithm: weighted_round_robin
    health_check: {{ type: none }}
    backends:
"
    );
    for (name, address, weight) in backends {
        text.push_str(&format!(
            "      - {{ name: {name}, address: \"{address}\", weight: {weight} }}\n"
        ));
    }
    text
}

async fn reload_api(gatehouse: &Gatehouse) -> (StatusCode, serde_json::Value) {
    let admin = gatehouse.admin_address();
    let answer = send(
        Request::post(format!("http://{admin}/api/v1/reload"))
            .body(Full::new(Bytes::new()))
            .unwrap(),
    )
    .await;
    (answer.status, serde_json::from_slice(&answer.body).unwrap())
}

#[tokio::test]
async fn changing_backends_under_load_loses_no_request() {
    let backends = [
        TestBackend::start("a").await,
        TestBackend::start("b").await,
        TestBackend::start("c").await,
    ];
    let dir = TestDir::new();
    let gatehouse = start_gatehouse(&dir, &yaml(&[("a", backends[0].address, 1)], "")).await;
    let web = gatehouse.listener_address("web").unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    let mut workers = Vec::new();
    for worker in 0..4 {
        let (stop, sent, failed) = (stop.clone(), sent.clone(), failed.clone());
        workers.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let answer = if worker % 2 == 0 {
                    get(web, "x", "/").await
                } else {
                    send(
                        Request::post(format!("http://{web}/form"))
                            .header("host", "x")
                            .body(Full::new(Bytes::from_static(b"field=value")))
                            .unwrap(),
                    )
                    .await
                };
                sent.fetch_add(1, Ordering::Relaxed);
                if answer.status != StatusCode::OK {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    let steps: [&[(&str, usize, u32)]; 6] = [
        &[("a", 0, 1), ("b", 1, 1)],
        &[("a", 0, 1), ("b", 1, 5), ("c", 2, 1)],
        &[("b", 1, 5), ("c", 2, 2)],
        &[("c", 2, 1)],
        &[("a", 0, 3), ("c", 2, 1)],
        &[("a", 0, 1), ("b", 1, 1), ("c", 2, 1)],
    ];
    for step in steps {
        let list: Vec<(&str, SocketAddr, u32)> = step
            .iter()
            .map(|(name, index, weight)| (*name, backends[*index].address, *weight))
            .collect();
        dir.write("gatehouse.yaml", &yaml(&list, ""));
        let (status, body) = reload_api(&gatehouse).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let before = sent.load(Ordering::Relaxed);
        eventually("traffic flows after the reload", async || {
            sent.load(Ordering::Relaxed) > before + 20
        })
        .await;
    }
    stop.store(true, Ordering::Relaxed);
    for worker in workers {
        worker.await.unwrap();
    }
    assert!(sent.load(Ordering::Relaxed) > 100);
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "no request failed across the reloads"
    );
}

#[tokio::test]
async fn streams_and_websockets_survive_twenty_reloads() {
    let a = TestBackend::start("a").await;
    let dir = TestDir::new();
    let gatehouse = start_gatehouse(&dir, &yaml(&[("a", a.address, 1)], "")).await;
    let web = gatehouse.listener_address("web").unwrap();

    let download = tokio::spawn(async move { get(web, "x", "/stream?chunks=40&ms=50").await });
    let mut socket = tokio::net::TcpStream::connect(web).await.unwrap();
    socket
        .write_all(
            b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
        )
        .await
        .unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        socket.read_exact(&mut byte).await.unwrap();
        head.push(byte[0]);
    }
    assert!(head.starts_with(b"HTTP/1.1 101"));

    for round in 0..20u32 {
        dir.write("gatehouse.yaml", &yaml(&[("a", a.address, 1 + round)], ""));
        let (status, body) = reload_api(&gatehouse).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let message = format!("round {round}");
        socket.write_all(message.as_bytes()).await.unwrap();
        let mut echoed = vec![0u8; message.len()];
        socket.read_exact(&mut echoed).await.unwrap();
        assert_eq!(
            echoed,
            message.as_bytes(),
            "the WebSocket still echoes after reload {round}"
        );
    }
    let download = download.await.unwrap();
    assert_eq!(download.status, StatusCode::OK);
    let expected: String = (0..40).map(|i| format!("chunk {i}\n")).collect();
    assert_eq!(
        download.text(),
        expected,
        "the streaming download completed intact"
    );
}

#[tokio::test]
async fn broken_configs_are_refused_and_the_old_one_keeps_serving() {
    let a = TestBackend::start("a").await;
    let dir = TestDir::new();
    let good = yaml(&[("a", a.address, 1)], "");
    let gatehouse = start_gatehouse(&dir, &good).await;
    let web = gatehouse.listener_address("web").unwrap();

    let broken = [
        ("syntax", "listeners: [\n", "listeners"),
        (
            "unknown key",
            &*good.replace("    algorithm:", "    algoritm:"),
            "pools.p.algoritm",
        ),
        (
            "dangling pool",
            &*good.replace("pool: p }", "pool: nowhere }"),
            "listeners.web.pool",
        ),
    ];
    for (what, text, path) in broken {
        dir.write("gatehouse.yaml", text);
        let (status, body) = reload_api(&gatehouse).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{what}: {body}");
        assert_eq!(body["result"], "failure");
        let error = &body["errors"][0];
        assert!(
            error["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{what}: {body}"
        );
        assert!(
            error["line"].as_u64().is_some(),
            "{what}: a line number: {body}"
        );
        assert_eq!(error["path"].as_str().unwrap(), path, "{what}: {body}");
        let answer = get(web, "x", "/").await;
        assert_eq!(
            answer.status,
            StatusCode::OK,
            "{what}: the old configuration serves"
        );
        assert_eq!(answer.backend().as_deref(), Some("a"));
    }
    let text = metrics_text(&gatehouse).await;
    assert_eq!(
        metric(
            &text,
            "gatehouse_config_reloads_total",
            &[("result", "failure")]
        ),
        Some(3.0)
    );

    let audit = std::fs::read_to_string(dir.path("audit.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = audit
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3);
    for line in &lines {
        assert_eq!(line["event"], "reload");
        assert_eq!(line["source"], "api");
        assert_eq!(line["result"], "failure");
        assert!(line["time"].as_str().unwrap().ends_with('Z'));
        assert!(line["actor"].as_str().unwrap().starts_with("127.0.0.1:"));
        assert!(line["errors"].as_array().is_some_and(|e| !e.is_empty()));
    }
}

#[tokio::test]
async fn listeners_open_and_close_on_reload() {
    let a = TestBackend::start("a").await;
    let dir = TestDir::new();
    let base = yaml(&[("a", a.address, 1)], "");
    let gatehouse = start_gatehouse(&dir, &base).await;
    let web = gatehouse.listener_address("web").unwrap();

    let with_extra = yaml(
        &[("a", a.address, 1)],
        "  extra: { listen: \"127.0.0.1:0\", pool: p }\n",
    );
    dir.write("gatehouse.yaml", &with_extra);
    let (status, body) = reload_api(&gatehouse).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(
        body["changes"].to_string().contains("listener extra added"),
        "{body}"
    );
    let extra = gatehouse.listener_address("extra").unwrap();
    assert_eq!(get(extra, "x", "/").await.status, StatusCode::OK);
    assert_eq!(
        gatehouse.listener_address("web"),
        Some(web),
        "web was not rebound"
    );

    dir.write("gatehouse.yaml", &base);
    let (status, body) = reload_api(&gatehouse).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(
        body["changes"]
            .to_string()
            .contains("listener extra removed"),
        "{body}"
    );
    eventually("the removed listener stopped accepting", async || {
        tokio::net::TcpStream::connect(extra).await.is_err()
    })
    .await;
    assert_eq!(get(web, "x", "/").await.status, StatusCode::OK);

    let (status, body) = reload_api(&gatehouse).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        body["changes"].as_array().unwrap().len(),
        0,
        "unchanged file: no changes"
    );

    // An address another socket holds: refused, placed in the file, the old one serving.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = taken.local_addr().unwrap();
    dir.write(
        "gatehouse.yaml",
        &yaml(
            &[("a", a.address, 1)],
            &format!("  taken:\n    listen: \"{address}\"\n    pool: p\n"),
        ),
    );
    let (status, body) = reload_api(&gatehouse).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let error = &body["errors"][0];
    assert_eq!(error["path"], "listeners.taken.listen", "{body}");
    assert!(
        error["message"]
            .as_str()
            .is_some_and(|message| message.starts_with(&format!("cannot bind {address}"))),
        "{body}"
    );
    assert!(error["line"].is_u64() && error["column"].is_u64(), "{body}");
    assert_eq!(get(web, "x", "/").await.status, StatusCode::OK);
}

#[tokio::test]
async fn a_new_worker_count_is_reported_as_taking_effect_at_the_next_start() {
    let a = TestBackend::start("a").await;
    let dir = TestDir::new();
    let base = yaml(&[("a", a.address, 1)], "");
    let three = format!("runtime: {{ worker_threads: 3 }}\n{base}");
    let gatehouse = start_gatehouse(&dir, &three).await;
    let web = gatehouse.listener_address("web").unwrap();
    for _ in 0..6 {
        assert_eq!(get(web, "x", "/").await.status, StatusCode::OK);
    }
    dir.write("gatehouse.yaml", &base);
    let (status, body) = reload_api(&gatehouse).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let changes = body["changes"].to_string();
    assert!(
        changes.contains("runtime.worker_threads 3 -> 0: takes effect at the next start"),
        "{body}"
    );
    assert_eq!(get(web, "x", "/").await.status, StatusCode::OK);
}

#[tokio::test]
async fn a_replaced_certificate_is_served_on_new_connections() {
    let a = TestBackend::start("a").await;
    let dir = TestDir::new();
    let ca = TestCa::new();
    ca.leaf(&dir, "site", &["old.example.gov"]);
    let tls_listener = "  secure:\n    listen: \"127.0.0.1:0\"\n    protocol: https\n    tls:\n      certificates:\n        - { cert: site.crt, key: site.key }\n    pool: p\n";
    let config = yaml(&[("a", a.address, 1)], tls_listener);
    let gatehouse = start_gatehouse(&dir, &config).await;
    let secure = gatehouse.listener_address("secure").unwrap();
    let h1: &[&[u8]] = &[b"http/1.1"];
    let (_, names, _) = tls_get(&ca, secure, "old.example.gov", h1, "/").await;
    assert_eq!(names, vec!["old.example.gov"]);

    ca.leaf(&dir, "site", &["new.example.gov"]);
    let (status, body) = reload_api(&gatehouse).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(
        body["changes"].to_string().contains("certificates changed"),
        "{body}"
    );
    let (_, names, answer) = tls_get(&ca, secure, "new.example.gov", h1, "/").await;
    assert_eq!(names, vec!["new.example.gov"]);
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(
        gatehouse.listener_address("secure"),
        Some(secure),
        "not rebound"
    );
}

/// The expiry series follows what is served: a certificate served from another file, or a
/// listener removed, leaves no series behind (an expiry alert on it would page someone for
/// a certificate no client is shown). The status API lists what each listener serves.
#[tokio::test]
async fn certificate_expiry_series_follow_the_served_certificates() {
    let a = TestBackend::start("a").await;
    let dir = TestDir::new();
    let ca = TestCa::new();
    ca.leaf(&dir, "site-2025", &["portal.example.gov"]);
    ca.leaf(&dir, "site-2026", &["portal.example.gov"]);
    let listener = |file: &str| {
        format!("  secure:\n    listen: \"127.0.0.1:0\"\n    protocol: https\n    tls:\n      certificates:\n        - {{ cert: {file}.crt, key: {file}.key }}\n    pool: p\n")
    };
    let config = yaml(&[("a", a.address, 1)], &listener("site-2025"));
    let gatehouse = start_gatehouse(&dir, &config).await;
    let series = async || {
        let text = metrics_text(&gatehouse).await;
        text.lines()
            .filter(|line| line.starts_with("gatehouse_tls_certificate_expiry_timestamp_seconds{"))
            .map(|line| {
                line.split_once('}')
                    .map_or("", |(labels, _)| labels)
                    .to_string()
            })
            .collect::<Vec<_>>()
    };
    let before = series().await;
    assert_eq!(before.len(), 1, "{before:?}");
    assert!(before[0].contains("site-2025.crt"), "{before:?}");
    let status = get(gatehouse.admin_address(), "admin", "/api/v1/status").await;
    let status: serde_json::Value = serde_json::from_slice(&status.body).unwrap();
    let served = &status["listeners"][1]["certificates"];
    assert_eq!(served.as_array().map(Vec::len), Some(1), "{status}");
    assert!(served[0]["file"]
        .as_str()
        .unwrap()
        .ends_with("site-2025.crt"));
    assert_eq!(
        served[0]["names"],
        serde_json::json!(["portal.example.gov"])
    );
    let expiry = metric(
        &metrics_text(&gatehouse).await,
        "gatehouse_tls_certificate_expiry_timestamp_seconds",
        &[("listener", "secure")],
    );
    assert_eq!(served[0]["not_after"].as_f64(), expiry);
    assert_eq!(
        status["listeners"][0]["certificates"],
        serde_json::json!([])
    );

    dir.write(
        "gatehouse.yaml",
        &yaml(&[("a", a.address, 1)], &listener("site-2026")),
    );
    let (status, body) = reload_api(&gatehouse).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let after = series().await;
    assert_eq!(after.len(), 1, "{after:?}");
    assert!(after[0].contains("site-2026.crt"), "{after:?}");

    dir.write("gatehouse.yaml", &yaml(&[("a", a.address, 1)], ""));
    let (status, body) = reload_api(&gatehouse).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(series().await, Vec::<String>::new());
}

#[tokio::test]
async fn a_renewed_certificate_is_picked_up_without_a_reload() {
    let a = TestBackend::start("a").await;
    let dir = TestDir::new();
    let ca = TestCa::new();
    let listener = |directory: &str| {
        format!("  secure:\n    listen: \"127.0.0.1:0\"\n    protocol: https\n    tls:\n      certificates:\n        - {{ cert: {directory}/site.crt, key: {directory}/site.key }}\n    pool: p\n")
    };
    for directory in ["tls", "renewed"] {
        std::fs::create_dir(dir.path(directory)).unwrap();
    }
    ca.leaf(&dir, "tls/site", &["first.example.gov"]);
    let gatehouse = start_gatehouse(&dir, &yaml(&[("a", a.address, 1)], &listener("tls"))).await;
    gatehouse::watch::spawn(gatehouse.clone());
    let secure = gatehouse.listener_address("secure").unwrap();
    // Whether the certificate served verifies for `name` (there is one: the listener's).
    let connector = tokio_rustls::TlsConnector::from(ca.client_config(&[b"http/1.1"]));
    let serves = async |name: &'static str| {
        let tcp = tokio::net::TcpStream::connect(secure).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from(name).unwrap();
        matches!(
            tokio::time::timeout(DEADLINE, connector.connect(name, tcp)).await,
            Ok(Ok(_))
        )
    };
    assert!(serves("first.example.gov").await);

    // Renewed in place (a certificate directory of its own, as certbot's).
    ca.leaf(&dir, "tls/site", &["second.example.gov"]);
    eventually("the renewed certificate served", async || {
        serves("second.example.gov").await
    })
    .await;

    // The configuration moves the certificate elsewhere: the watcher follows it there.
    ca.leaf(&dir, "renewed/site", &["third.example.gov"]);
    dir.write(
        "gatehouse.yaml",
        &yaml(&[("a", a.address, 1)], &listener("renewed")),
    );
    eventually("the moved certificate served", async || {
        serves("third.example.gov").await
    })
    .await;
    ca.leaf(&dir, "renewed/site", &["fourth.example.gov"]);
    eventually(
        "the certificate renewed in its new place served",
        async || serves("fourth.example.gov").await,
    )
    .await;
}

/// A rotated admin token is required as soon as its file changes (the watcher follows the
/// token file the configuration names): the old token is refused, the new one accepted, and
/// the audit log says the token changed without saying what it is. Probed with a backend
/// state call, which needs the token but reloads nothing.
#[tokio::test]
async fn a_rotated_admin_token_is_required_without_a_reload() {
    let a = TestBackend::start("a").await;
    let dir = TestDir::new();
    dir.write("token", "first-token\n");
    let text = yaml(&[("a", a.address, 1)], "").replacen(
        "admin: { listen: \"127.0.0.1:0\" }",
        "admin: { listen: \"127.0.0.1:0\", token_file: token }",
        1,
    );
    let gatehouse = start_gatehouse(&dir, &text).await;
    gatehouse::watch::spawn(gatehouse.clone());
    let admin = gatehouse.admin_address();
    let activate_with = async |token: &str| {
        send(
            Request::put(format!("http://{admin}/api/v1/pools/p/backends/a/state"))
                .header("authorization", format!("Bearer {token}"))
                .body(Full::new(Bytes::from_static(br#"{"state":"active"}"#)))
                .unwrap(),
        )
        .await
        .status
    };
    assert_eq!(activate_with("first-token").await, StatusCode::OK);

    dir.write("token", "second-token\n");
    eventually("the old token refused", async || {
        activate_with("first-token").await == StatusCode::UNAUTHORIZED
    })
    .await;
    assert_eq!(activate_with("second-token").await, StatusCode::OK);
    // Written by the watcher's reload just after it put the new token in force.
    let audit = || std::fs::read_to_string(dir.path("audit.jsonl")).unwrap_or_default();
    let rotation = serde_json::json!(["admin token changed"]);
    eventually("the watcher's reload audited", async || {
        audit().lines().any(|line| {
            let entry: serde_json::Value = serde_json::from_str(line).unwrap();
            entry["source"] == "file" && entry["changes"] == rotation
        })
    })
    .await;
    assert!(
        !audit().contains("second-token"),
        "the token is never written out"
    );
}

/// Starts the file watcher and waits until a change of `dir/gatehouse.yaml` made by
/// `change` switches traffic to `expected`.
async fn watch_case(change: impl FnOnce(&TestDir, &str), what: &str) {
    let a = TestBackend::start("a").await;
    let b = TestBackend::start("b").await;
    let dir = TestDir::new();
    let gatehouse = start_gatehouse(&dir, &yaml(&[("a", a.address, 1)], "")).await;
    gatehouse::watch::spawn(gatehouse.clone());
    let web = gatehouse.listener_address("web").unwrap();
    assert_eq!(get(web, "x", "/").await.backend().as_deref(), Some("a"));
    change(&dir, &yaml(&[("b", b.address, 1)], ""));
    eventually(what, async || {
        get(web, "x", "/").await.backend().as_deref() == Some("b")
    })
    .await;
    assert_reloads_settle(&gatehouse, what).await;
}

/// Reload attempts made so far, whatever their result.
async fn reload_attempts(gatehouse: &Gatehouse) -> f64 {
    let text = metrics_text(gatehouse).await;
    ["success", "failure"]
        .iter()
        .filter_map(|result| {
            metric(
                &text,
                "gatehouse_config_reloads_total",
                &[("result", result)],
            )
        })
        .sum()
}

/// The watcher's reloads stop once the change is in force: a reload reads the files it
/// watches, and must not take its own reading for a change (which reloaded every 200 ms,
/// for ever). One trailing reload is allowed for a change whose events straddled the
/// debounce window; after it, two seconds without any.
async fn assert_reloads_settle(gatehouse: &Gatehouse, what: &str) {
    let quiet = Duration::from_secs(1);
    tokio::time::sleep(quiet).await;
    let before = reload_attempts(gatehouse).await;
    tokio::time::sleep(quiet * 2).await;
    let after = reload_attempts(gatehouse).await;
    assert_eq!(
        before, after,
        "{what}: the watcher kept reloading an unchanged file"
    );
}

#[tokio::test]
async fn file_watching_reloads_on_in_place_writes() {
    watch_case(
        |dir, text| {
            use std::io::Write;
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .truncate(true)
                .open(dir.path("gatehouse.yaml"))
                .unwrap();
            file.write_all(text.as_bytes()).unwrap();
        },
        "in-place write picked up",
    )
    .await;
}

#[tokio::test]
async fn file_watching_reloads_on_write_then_rename() {
    watch_case(
        |dir, text| {
            let temporary = dir.write(".gatehouse.yaml.swp", text);
            std::fs::rename(temporary, dir.path("gatehouse.yaml")).unwrap();
        },
        "rename picked up",
    )
    .await;
}

#[tokio::test]
async fn file_watching_follows_a_kubernetes_configmap_symlink_swap() {
    let a = TestBackend::start("a").await;
    let b = TestBackend::start("b").await;
    let dir = TestDir::new();
    // The ConfigMap layout: gatehouse.yaml -> ..data/gatehouse.yaml, ..data -> ..<version>.
    std::fs::create_dir(dir.path("..v1")).unwrap();
    std::fs::write(
        dir.path("..v1/gatehouse.yaml"),
        yaml(&[("a", a.address, 1)], ""),
    )
    .unwrap();
    std::os::unix::fs::symlink("..v1", dir.path("..data")).unwrap();
    std::os::unix::fs::symlink("..data/gatehouse.yaml", dir.path("gatehouse.yaml")).unwrap();
    gatehouse::tls::install_crypto_provider();
    let config = gatehouse::config::load(&dir.path("gatehouse.yaml")).unwrap();
    let gatehouse = Gatehouse::start(config, gatehouse::metrics::Metrics::new().unwrap())
        .await
        .unwrap();
    gatehouse::watch::spawn(gatehouse.clone());
    let web = gatehouse.listener_address("web").unwrap();
    assert_eq!(get(web, "x", "/").await.backend().as_deref(), Some("a"));

    std::fs::create_dir(dir.path("..v2")).unwrap();
    std::fs::write(
        dir.path("..v2/gatehouse.yaml"),
        yaml(&[("b", b.address, 1)], ""),
    )
    .unwrap();
    std::os::unix::fs::symlink("..v2", dir.path("..data_tmp")).unwrap();
    std::fs::rename(dir.path("..data_tmp"), dir.path("..data")).unwrap();
    eventually("symlink swap picked up", async || {
        get(web, "x", "/").await.backend().as_deref() == Some("b")
    })
    .await;
    assert_reloads_settle(&gatehouse, "symlink swap picked up").await;
}

#[tokio::test]
async fn successful_reloads_are_audited_and_kept_as_last_good() {
    let a = TestBackend::start("a").await;
    let b = TestBackend::start("b").await;
    let dir = TestDir::new();
    let gatehouse = start_gatehouse(&dir, &yaml(&[("a", a.address, 1)], "")).await;
    let admin = gatehouse.admin_address();
    let first = std::fs::read_to_string(dir.path("gatehouse.yaml.last-good")).unwrap();
    assert!(
        first.contains(&a.address.to_string()),
        "the start-up config is last-good"
    );

    let next = yaml(&[("a", a.address, 1), ("b", b.address, 2)], "");
    dir.write("gatehouse.yaml", &next);
    let (status, _) = reload_api(&gatehouse).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        std::fs::read_to_string(dir.path("gatehouse.yaml.last-good")).unwrap(),
        next
    );

    let drained = send(
        Request::put(format!("http://{admin}/api/v1/pools/p/backends/b/state"))
            .body(Full::new(Bytes::from_static(b"{\"state\":\"draining\"}")))
            .unwrap(),
    )
    .await;
    assert_eq!(drained.status, StatusCode::OK);
    let audit = std::fs::read_to_string(dir.path("audit.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = audit
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines[0]["event"], "reload");
    assert_eq!(lines[0]["result"], "success");
    assert!(
        lines[0]["changes"].to_string().contains("backend b added"),
        "{}",
        lines[0]
    );
    assert_eq!(lines[1]["event"], "admin_state");
    assert_eq!(lines[1]["backend"], "b");
    assert_eq!(lines[1]["state"], "draining");

    let config = get(admin, "admin", "/api/v1/config").await;
    let config: serde_json::Value = serde_json::from_slice(&config.body).unwrap();
    assert_eq!(config["text"].as_str().unwrap(), next);
}
