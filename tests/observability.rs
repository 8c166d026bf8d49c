//! Metrics and access logs over real sockets: counters move by exactly the requests sent,
//! histograms observe, the access-log line carries every field, dropped lines are counted,
//! and the exposition passes `promtool check metrics`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use gatehouse::access_log::{AccessLog, AccessRecord};
use gatehouse::config::{AccessLogConfig, AccessLogFormat, AccessLogTarget};
use http::StatusCode;
use std::time::Duration;

fn config(backends: &[(&str, std::net::SocketAddr)], extra: &str) -> String {
    format!(
        "admin: {{ listen: \"127.0.0.1:0\" }}
access_log: {{ target: access.log, format: json }}
listeners:
  web:
    listen: \"127.0.0.1:0\"
    routes:
      - {{ name: empty-route, path_prefix: \"/empty/\", pool: empty }}
    pool: p
pools:
{}  empty:
    health_check: {{ type: none }}
    backends: []
{extra}",
        pool_yaml("p", backends, "")
    )
}

#[tokio::test]
async fn counters_move_by_exactly_the_requests_sent() {
    let a = TestBackend::start("a").await;
    let b = TestBackend::start("b").await;
    let dir = TestDir::new();
    let gatehouse = start_gatehouse(&dir, &config(&[("a", a.address), ("b", b.address)], "")).await;
    let web = gatehouse.listener_address("web").unwrap();
    for _ in 0..6 {
        assert_eq!(get(web, "x", "/").await.status, StatusCode::OK);
    }
    for _ in 0..2 {
        assert_eq!(
            get(web, "x", "/status/404").await.status,
            StatusCode::NOT_FOUND
        );
    }
    for _ in 0..3 {
        assert_eq!(
            get(web, "x", "/empty/").await.status,
            StatusCode::SERVICE_UNAVAILABLE
        );
    }
    let text = metrics_text(&gatehouse).await;
    let count = |backend: &str, code: &str, pool: &str| {
        metric(
            &text,
            "gatehouse_requests_total",
            &[
                ("listener", "web"),
                ("pool", pool),
                ("backend", backend),
                ("code", code),
            ],
        )
        .unwrap_or(0.0)
    };
    assert_eq!(count("a", "200", "p") + count("b", "200", "p"), 6.0);
    assert_eq!(count("a", "200", "p"), 3.0, "round robin: 3 each");
    assert_eq!(count("a", "404", "p") + count("b", "404", "p"), 2.0);
    assert_eq!(
        count("", "503", "empty"),
        3.0,
        "local answers have an empty backend label"
    );
    assert_eq!(
        metric(
            &text,
            "gatehouse_request_duration_seconds_count",
            &[("listener", "web"), ("pool", "p")]
        ),
        Some(8.0)
    );
    assert_eq!(
        metric(
            &text,
            "gatehouse_route_requests_total",
            &[("route", "empty-route")]
        ),
        Some(3.0)
    );
    assert_eq!(
        metric(
            &text,
            "gatehouse_route_requests_total",
            &[("route", "default")]
        ),
        Some(8.0)
    );
    assert!(metric(&text, "gatehouse_connections_total", &[("listener", "web")]).unwrap() >= 11.0);
    assert!(
        metric(
            &text,
            "gatehouse_bytes_received_total",
            &[("listener", "web")]
        )
        .unwrap()
            > 0.0
    );
    assert!(metric(&text, "gatehouse_bytes_sent_total", &[("listener", "web")]).unwrap() > 0.0);
    assert!(
        metric(
            &text,
            "gatehouse_upstream_connect_duration_seconds_count",
            &[("pool", "p")]
        )
        .unwrap()
            >= 1.0
    );
    assert_eq!(
        metric(&text, "gatehouse_backend_up", &[("backend", "a")]),
        Some(1.0)
    );
    assert!(metric(&text, "process_resident_memory_bytes", &[]).unwrap() > 0.0);
    assert!(
        metric(
            &text,
            "gatehouse_config_last_reload_success_timestamp_seconds",
            &[]
        )
        .unwrap()
            > 1.7e9
    );
}

#[tokio::test]
async fn series_of_removed_backends_disappear_after_a_reload() {
    let a = TestBackend::start("a").await;
    let b = TestBackend::start("b").await;
    let dir = TestDir::new();
    let gatehouse = start_gatehouse(&dir, &config(&[("a", a.address), ("b", b.address)], "")).await;
    let web = gatehouse.listener_address("web").unwrap();
    for _ in 0..4 {
        get(web, "x", "/").await;
    }
    assert!(metrics_text(&gatehouse).await.contains("backend=\"b\""));
    dir.write("gatehouse.yaml", &config(&[("a", a.address)], ""));
    let reload =
        gatehouse::reload::reload(&gatehouse, gatehouse::reload::Source::Api, "test").await;
    assert!(reload.is_ok());
    let text = metrics_text(&gatehouse).await;
    assert!(!text.contains("backend=\"b\""), "{text}");
    assert!(text.contains("backend=\"a\""));
}

#[tokio::test]
async fn the_access_log_line_carries_every_field() {
    let a = TestBackend::start("a").await;
    let dir = TestDir::new();
    let gatehouse = start_gatehouse(&dir, &config(&[("a", a.address)], "")).await;
    let web = gatehouse.listener_address("web").unwrap();
    let answer = send(
        http::Request::post(format!("http://{web}/echo?secret=1"))
            .header("host", "portal.example.gov")
            .header("x-request-id", "req-77")
            .body(http_body_util::Full::new(bytes::Bytes::from_static(
                b"twelve bytes",
            )))
            .unwrap(),
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.headers["x-request-id"], "req-77");
    let path = dir.path("access.log");
    let mut line = String::new();
    eventually("the access log line was written", async || {
        line = std::fs::read_to_string(&path).unwrap_or_default();
        line.ends_with('\n')
    })
    .await;
    let record: serde_json::Value = serde_json::from_str(line.lines().next().unwrap()).unwrap();
    let expected = [
        ("kind", serde_json::json!("http")),
        ("listener", serde_json::json!("web")),
        ("method", serde_json::json!("POST")),
        ("host", serde_json::json!("portal.example.gov")),
        ("path", serde_json::json!("/echo")),
        ("status", serde_json::json!(200)),
        ("bytes_in", serde_json::json!(12)),
        ("bytes_out", serde_json::json!(12)),
        ("backend", serde_json::json!("a")),
        ("request_id", serde_json::json!("req-77")),
        ("route", serde_json::json!("default")),
        ("tls_version", serde_json::Value::Null),
        ("sni", serde_json::Value::Null),
        ("ended", serde_json::json!("complete")),
    ];
    for (field, value) in expected {
        assert_eq!(record[field], value, "{field} in {record}");
    }
    assert!(record["client"].as_str().unwrap().starts_with("127.0.0.1:"));
    assert!(record["time"].as_str().unwrap().ends_with('Z'));
    assert!(record["duration_ms"].as_f64().unwrap() >= 0.0);
    assert!(record["upstream_duration_ms"].as_f64().unwrap() >= 0.0);
}

/// A backend that answers every request head with 120 headers (gatehouse takes 100).
async fn too_many_headers_backend() -> std::net::SocketAddr {
    use tokio::io::AsyncWriteExt;
    let socket = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = socket.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = socket.accept().await {
            tokio::spawn(async move {
                if read_request_head(&mut stream).await.is_none() {
                    return;
                }
                let mut answer = String::from("HTTP/1.1 200 OK\r\ncontent-length: 2\r\n");
                for index in 0..120 {
                    answer.push_str(&format!("x-h{index}: v\r\n"));
                }
                answer.push_str("\r\nok");
                let _ = stream.write_all(answer.as_bytes()).await;
            });
        }
    });
    address
}

#[tokio::test]
async fn the_access_log_says_why_gatehouse_answered_itself() {
    let a = TestBackend::start("a").await;
    let (resetting, _) = resetting_backend().await;
    let crowded = too_many_headers_backend().await;
    let refused = closed_port();
    let dir = TestDir::new();
    let yaml = format!(
        "admin: {{ listen: \"127.0.0.1:0\" }}
access_log: {{ target: access.log, format: json }}
listeners:
  web:
    listen: \"127.0.0.1:0\"
    routes:
      - {{ path_prefix: \"/resetting/\", pool: resetting }}
      - {{ path_prefix: \"/crowded/\", pool: crowded }}
      - {{ path_prefix: \"/refused/\", pool: refused }}
      - {{ path_prefix: \"/empty/\", pool: empty }}
    pool: p
  l4: {{ listen: \"127.0.0.1:0\", protocol: tcp, pool: refused }}
pools:
{}{}{}{}  empty:
    health_check: {{ type: none }}
    backends: []
",
        pool_yaml("p", &[("a", a.address)], ""),
        pool_yaml(
            "resetting",
            &[("r", resetting)],
            "    retries: { attempts: 1 }\n"
        ),
        pool_yaml(
            "crowded",
            &[("c", crowded)],
            "    retries: { attempts: 1 }\n"
        ),
        pool_yaml(
            "refused",
            &[("x", refused)],
            "    retries: { attempts: 1 }\n"
        ),
    );
    let gatehouse = start_gatehouse(&dir, &yaml).await;
    let web = gatehouse.listener_address("web").unwrap();
    let expected = [
        ("/fine", 200, None),
        ("/resetting/", 502, Some("backend failed: backend request: ")),
        ("/crowded/", 502, Some("backend failed: backend request: malformed response from backend: too many headers")),
        ("/refused/", 502, Some("backend failed: connect: ")),
        ("/empty/", 503, Some("no backend available")),
    ];
    for (path, status, _) in expected {
        assert_eq!(
            get(web, "portal", path).await.status.as_u16(),
            status,
            "{path}"
        );
    }
    let two_hosts = raw_exchange(
        web,
        b"GET /twice HTTP/1.1\r\nhost: a\r\nhost: b\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert!(two_hosts.starts_with("HTTP/1.1 400"), "{two_hosts}");
    // Heads hyper refuses before any handler sees them: logged all the same.
    let crowded_head = format!(
        "GET /crowded-head HTTP/1.1\r\nhost: a\r\n{}\r\n",
        (0..150)
            .map(|i| format!("x-{i}: v\r\n"))
            .collect::<String>()
    );
    let answer = raw_exchange(web, crowded_head.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");
    let answer = raw_exchange(web, b"GET /bad HTTP/1.1\r\nhost: a\r\nbad header\r\n\r\n").await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    let l4 = gatehouse.listener_address("l4").unwrap();
    let mut stream = tokio::net::TcpStream::connect(l4).await.unwrap();
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(
        DEADLINE,
        tokio::io::AsyncReadExt::read_to_end(&mut stream, &mut rest),
    )
    .await;

    let mut records: Vec<serde_json::Value> = Vec::new();
    eventually("nine access log lines", async || {
        records = access_log_lines(&dir);
        records.len() == 9
    })
    .await;
    let record_of = |path: &str| {
        records
            .iter()
            .find(|record| record["path"] == path)
            .unwrap_or_else(|| panic!("no line for {path} in {records:?}"))
    };
    for (path, status, error) in expected {
        let record = record_of(path);
        assert_eq!(record["status"], status, "{record}");
        match error {
            None => assert_eq!(record["error"], serde_json::Value::Null, "{record}"),
            Some(error) => assert!(
                record["error"].as_str().unwrap().starts_with(error),
                "{path}: {record}"
            ),
        }
    }
    assert_eq!(record_of("/twice")["error"], "more than one Host header");
    let unread = |status: u16| {
        records
            .iter()
            .find(|record| record["status"] == status && record["path"] == "")
            .unwrap_or_else(|| panic!("no line for the unread {status} in {records:?}"))
    };
    assert_eq!(unread(431)["error"], "request header block too large");
    assert!(unread(431)["client"]
        .as_str()
        .unwrap()
        .starts_with("127.0.0.1:"));
    let malformed = unread(400)["error"].as_str().unwrap();
    assert!(malformed.starts_with("malformed request: "), "{malformed}");
    let tcp = records
        .iter()
        .find(|record| record["kind"] == "tcp")
        .unwrap();
    assert_eq!(tcp["backend"], "x", "{tcp}");
    assert!(
        tcp["error"].as_str().unwrap().starts_with("connect: "),
        "{tcp}"
    );
}

#[tokio::test]
async fn dropped_lines_are_counted_instead_of_blocking() {
    let dir = TestDir::new();
    let fifo = dir.path("stuck-disk");
    let status = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(status.success());
    let metrics = gatehouse::metrics::Metrics::new().unwrap();
    let log = AccessLog::start(
        &AccessLogConfig {
            target: AccessLogTarget::File(fifo.clone()),
            format: AccessLogFormat::Json,
        },
        metrics.access_log_dropped.clone(),
    );
    let started = std::time::Instant::now();
    for _ in 0..20_000 {
        log.log(AccessRecord::default());
    }
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "logging never blocks"
    );
    assert!(
        metrics.access_log_dropped.get() >= 20_000 - 16 * 1024,
        "dropped {}",
        metrics.access_log_dropped.get()
    );
    // Let the writer thread finish: open the FIFO for reading and drain it.
    let reader = std::thread::spawn(move || std::fs::read(fifo).map(|b| b.len()));
    drop(log);
    let drained = reader.join().unwrap().unwrap();
    assert!(drained > 0);
}

#[tokio::test]
async fn the_exposition_passes_promtool() {
    let Ok(promtool) = which("promtool") else {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must install promtool (Debian's prometheus)"
        );
        eprintln!("promtool not installed: skipping (CI installs it)");
        return;
    };
    let a = TestBackend::start("a").await;
    let dir = TestDir::new();
    let ca = TestCa::new();
    ca.leaf(&dir, "site", &["localhost"]);
    let extra_listener = "";
    let mut yaml = config(&[("a", a.address)], extra_listener);
    yaml = yaml.replace(
        "listeners:\n",
        "listeners:\n  secure: { listen: \"127.0.0.1:0\", protocol: https, tls: { certificates: [ { cert: site.crt, key: site.key } ] }, pool: p }\n",
    );
    let gatehouse = start_gatehouse(&dir, &yaml).await;
    let web = gatehouse.listener_address("web").unwrap();
    for path in ["/", "/status/500", "/empty/"] {
        get(web, "x", path).await;
    }
    let text = metrics_text(&gatehouse).await;
    assert!(text.contains("gatehouse_tls_certificate_expiry_timestamp_seconds{"));
    let file = dir.write("metrics.txt", &text);
    let output = std::process::Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(std::fs::File::open(file).unwrap())
        .output()
        .unwrap();
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "promtool: {report}");
    assert!(
        !report.to_lowercase().contains("error"),
        "promtool: {report}"
    );
}

fn which(tool: &str) -> Result<std::path::PathBuf, ()> {
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join(tool))
        .find(|path| path.is_file())
        .ok_or(())
}
