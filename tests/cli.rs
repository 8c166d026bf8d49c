//! The real `gatehouse` binary: `check`, graceful shutdown on SIGTERM with a request in
//! flight, SIGHUP reload, and `demo` answering from its three backends.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::zombie_processes)]

mod common;

use common::*;
use http::StatusCode;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tokio::net::TcpStream;

const BINARY: &str = env!("CARGO_BIN_EXE_gatehouse");

fn check(path: &std::path::Path) -> (bool, String, String) {
    let output = Command::new(BINARY)
        .args(["check", "--config"])
        .arg(path)
        .output()
        .unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn check_accepts_the_shipped_configuration() {
    let (ok, stdout, _) = check(&repo_file("config/gatehouse.yaml"));
    assert!(ok);
    assert_eq!(stdout.lines().count(), 1, "one-line summary: {stdout}");
    assert!(
        stdout.contains("ok: 2 listener(s), 1 pool(s), 3 backend(s)"),
        "{stdout}"
    );
}

#[test]
fn check_reports_every_problem_with_its_key_path_and_line() {
    let dir = TestDir::new();
    let ca = TestCa::new();
    let (cert, _) = ca.leaf(&dir, "a", &["a.example.gov"]);
    let (_, other_key) = ca.leaf(&dir, "b", &["b.example.gov"]);
    let path = dir.write(
        "broken.yaml",
        &format!(
            "listeners:
  web:
    listen: \"0.0.0.0:8080\"
    pool: nowhere
  secure:
    listen: \"0.0.0.0:8443\"
    protocol: https
    pool: portal
  mismatched:
    listen: \"0.0.0.0:9443\"
    protocol: https
    tls:
      certificates:
        - {{ cert: {}, key: {} }}
    routes:
      - {{ host: \"*.example.gov\", pool: ghost }}
pools:
  portal:
    algorithm: fastest
    timeouts: {{ connect: 2 parsecs }}
    backends:
      - {{ name: vm-1, address: \"10.0.0.1:9001\" }}
      - {{ name: vm-1, address: \"10.0.0.2:9001\" }}
      - name: vm-3
        address: \"10.0.0.1:99999\"
",
            cert.display(),
            other_key.display()
        ),
    );
    let (ok, stdout, stderr) = check(&path);
    assert!(!ok);
    assert!(stdout.is_empty(), "problems go to stderr: {stdout}");
    let expected = [
        ":4:5: listeners.web.pool: unknown pool \"nowhere\"",
        "listeners.secure.tls: protocol https requires a tls block",
        "listeners.mismatched.tls.certificates[0]: private key",
        "does not match certificate",
        "listeners.mismatched.routes[0].pool: unknown pool \"ghost\"",
        ":19:5: pools.portal.algorithm: unknown algorithm \"fastest\"",
        "pools.portal.timeouts.connect: invalid duration",
        "pools.portal.backends[1].name: duplicate backend name \"vm-1\"",
        ":25:9: pools.portal.backends[2].address: invalid socket address \"10.0.0.1:99999\"",
        "8 problem(s) found",
    ];
    for needle in expected {
        assert!(stderr.contains(needle), "missing {needle:?} in:\n{stderr}");
    }
    assert!(stderr
        .lines()
        .all(|line| line.starts_with(&path.display().to_string())));
}

#[test]
fn check_refuses_unknown_keys_and_bad_yaml() {
    let dir = TestDir::new();
    // serde stops at the first unknown key; check goes on to report every one of them and
    // the problems validation finds in the rest of the file, all in one run.
    let unknown = dir.write(
        "unknown.yaml",
        "listeners:\n  web:\n    listen: \"127.0.0.1:1\"\n    pool: p\n    timeout: 5s\npools:\n  p:\n    backends:\n      - name: a\n        address: \"127.0.0.1:99999\"\n        wieght: 2\n",
    );
    let (ok, _, stderr) = check(&unknown);
    assert!(!ok);
    for needle in [
        ":5:5: listeners.web.timeout: unknown field `timeout`",
        ":10:9: pools.p.backends[0].address: invalid socket address \"127.0.0.1:99999\"",
        ":11:9: pools.p.backends[0].wieght: unknown field `wieght`, expected one of `name`",
        "3 problem(s) found",
    ] {
        assert!(stderr.contains(needle), "missing {needle:?} in:\n{stderr}");
    }

    let syntax = dir.write("syntax.yaml", "listeners:\n  web: {listen: \"x\"\n");
    let (ok, _, stderr) = check(&syntax);
    assert!(!ok);
    assert!(stderr.contains("syntax.yaml:"), "{stderr}");

    let (ok, _, stderr) = check(&dir.path("missing.yaml"));
    assert!(!ok);
    assert!(
        stderr.contains("cannot read the configuration file"),
        "{stderr}"
    );
}

/// `check`'s lines for `text`, written as `file` in `dir`, which it must refuse: each
/// problem (and the count) without the file's path.
fn refused_problems(dir: &TestDir, file: &str, text: &str) -> Vec<String> {
    let (ok, _, stderr) = check(&dir.write(file, text));
    assert!(!ok, "{stderr}");
    let prefix = format!("{file}:");
    stderr
        .lines()
        .filter_map(|line| line.split_once(&prefix).map(|(_, rest)| rest.to_string()))
        .collect()
}

/// A missing key is reported with the rest of the file's problems, not alone: a listener
/// without `listen`, backends without `name` or `address`, a capacity without `cpu` — and
/// nothing about the values gatehouse stood in for them to read on.
#[test]
fn check_reports_missing_keys_beside_every_other_problem() {
    let problems = refused_problems(
        &TestDir::new(),
        "missing.yaml",
        "listeners:\n  web:\n    listen: \"127.0.0.1:1\"\n    pool: p\n  api:\n    pool: p\npools:\n  p:\n    algorithm: fastest\n    backends:\n      - name: a\n      - address: \"127.0.0.1:99999\"\n      - { name: c, address: \"127.0.0.1:2\", capacity: { memory_gib: 2 } }\n",
    );
    assert_eq!(
        problems,
        [
            "5:3: listeners.api: missing field `listen`",
            "9:5: pools.p.algorithm: unknown algorithm \"fastest\" (expected one of round_robin, weighted_round_robin, least_connections, power_of_two, least_latency, consistent_hash, random)",
            "11:7: pools.p.backends[0]: missing field `address`",
            "12:7: pools.p.backends[1]: missing field `name`",
            "12:9: pools.p.backends[1].address: invalid socket address \"127.0.0.1:99999\"",
            "13:44: pools.p.backends[2].capacity: missing field `cpu`",
            " 6 problem(s) found",
        ]
    );
}

/// A listener or pool name given twice is reported where it repeats, beside the file's
/// other problems (serde stopped at it before); the first of the two is checked as usual.
#[test]
fn check_reports_duplicate_names_beside_every_other_problem() {
    let problems = refused_problems(
        &TestDir::new(),
        "twice.yaml",
        "listeners:\n  web:\n    listen: \"127.0.0.1:1\"\n    pool: p\n  web:\n    listen: \"127.0.0.1:1\"\n    pool: p\npools:\n  p:\n    backends:\n      - { name: a, address: \"127.0.0.1:99999\" }\n  p:\n    backends: []\n",
    );
    assert_eq!(
        problems,
        [
            "5:3: listeners.web: duplicate name \"web\" (names must be unique)",
            "11:20: pools.p.backends[0].address: invalid socket address \"127.0.0.1:99999\"",
            "12:3: pools.p: duplicate name \"p\" (names must be unique)",
            " 3 problem(s) found",
        ]
    );
}

/// A key given twice in one block (two `limits:`, two `address:` in a backend) is reported
/// where it repeats, with every other problem of the file — also beside a name given twice
/// and an unknown key, which serde would have stopped at together. What the repetition holds
/// is left out (its `6x` is not reported); the first occurrence is read.
#[test]
fn check_reports_keys_given_twice_beside_every_other_problem() {
    let problems = refused_problems(
        &TestDir::new(),
        "repeated.yaml",
        "listeners:\n  web:\n    listen: \"127.0.0.1:1\"\n    pool: p\n    limits:\n      header_timeout: 5s\n    limits:\n      header_timeout: 6x\n    bogus: 1\n  web:\n    listen: \"127.0.0.1:2\"\n    pool: p\npools:\n  p:\n    backends:\n      - name: a\n        address: \"127.0.0.1:3\"\n        address: \"127.0.0.1:4\"\n      - { name: b, address: \"127.0.0.1:99999\", name: c }\n    timeouts: { connect: 2q, idle: 1s, connect: 1s }\n",
    );
    assert_eq!(
        problems,
        [
            "7:5: listeners.web.limits: duplicate key \"limits\" (first on line 5)",
            "9:5: listeners.web.bogus: unknown field `bogus`, expected one of `listen`, `protocol`, `tls`, `proxy_protocol`, `reuse_port`, `trusted_proxies`, `allow`, `deny`, `rate_limit`, `hsts`, `limits`, `routes`, `pool`",
            "10:3: listeners.web: duplicate name \"web\" (names must be unique)",
            "18:9: pools.p.backends[0].address: duplicate key \"address\" (first on line 17)",
            "19:20: pools.p.backends[1].address: invalid socket address \"127.0.0.1:99999\"",
            "19:48: pools.p.backends[1].name: duplicate key \"name\" (first on line 19)",
            "20:17: pools.p.timeouts.connect: invalid duration unit \"q\" in \"2q\" (use ms, s, m, h or d)",
            "20:40: pools.p.timeouts.connect: duplicate key \"connect\" (first on line 20)",
            " 8 problem(s) found",
        ]
    );
}

/// A certificate pair's problem is placed at the file it is about — its `cert:` or `key:`
/// line — and a pair that lacks its key still says its certificate cannot be read: the
/// operator fixes both at once. A pair that does not match stays at the pair.
#[test]
fn check_places_certificate_problems_at_the_file_they_are_about() {
    let dir = TestDir::new();
    let ca = TestCa::new();
    let (cert, key) = ca.leaf(&dir, "a", &["a.example.gov"]);
    let (_, other_key) = ca.leaf(&dir, "b", &["b.example.gov"]);
    let problems = refused_problems(
        &dir,
        "certificates.yaml",
        &format!(
            "listeners:\n  web:\n    listen: \"127.0.0.1:1\"\n    protocol: https\n    pool: p\n    tls:\n      certificates:\n        - cert: missing.crt\n        - cert: {cert}\n          key: missing.key\n        - cert: {cert}\n          key: {other_key}\n        - cert: {cert}\n          key: {key}\npools:\n  p:\n    backends: []\n",
            cert = cert.display(),
            key = key.display(),
            other_key = other_key.display(),
        ),
    );
    let missing = dir.path("missing.crt");
    let missing_key = dir.path("missing.key");
    assert_eq!(
        problems,
        [
            "8:9: listeners.web.tls.certificates[0]: missing field `key`".to_string(),
            format!(
                "8:11: listeners.web.tls.certificates[0].cert: cannot read certificate \"{}\": I/O error: No such file or directory (os error 2)",
                missing.display()
            ),
            format!(
                "10:11: listeners.web.tls.certificates[1].key: cannot read private key \"{}\": I/O error: No such file or directory (os error 2)",
                missing_key.display()
            ),
            format!(
                "11:9: listeners.web.tls.certificates[2]: private key \"{}\" does not match certificate \"{}\"",
                other_key.display(),
                cert.display()
            ),
            " 4 problem(s) found".to_string(),
        ]
    );
}

/// A log or last-known-good path gatehouse could not write is a problem `check` (and a
/// reload) reports, not something found once requests go unlogged; checking writes nothing.
#[test]
fn check_refuses_files_it_could_not_write() {
    let dir = TestDir::new();
    let text = "access_log: { target: logs/access.log }\naudit_log: audit/audit.jsonl\nlast_good: keep/last.yaml\nlisteners:\n  web: { listen: \"127.0.0.1:1\", pool: p }\npools:\n  p: { backends: [] }\n";
    let path = dir.write("logs.yaml", text);
    let (ok, _, stderr) = check(&path);
    assert!(!ok);
    for needle in [
        ":1:15: access_log.target: cannot write ",
        "logs/access.log: no directory ",
        ":2:1: audit_log: cannot write ",
        ":3:1: last_good: cannot write ",
        "3 problem(s) found",
    ] {
        assert!(stderr.contains(needle), "missing {needle:?} in:\n{stderr}");
    }
    for directory in ["logs", "audit", "keep"] {
        std::fs::create_dir(dir.path(directory)).unwrap();
    }
    let (ok, _, stderr) = check(&path);
    assert!(ok, "{stderr}");
    assert!(
        !dir.path("logs/access.log").exists(),
        "check creates no file"
    );
}

/// A gatehouse child process; killed on drop.
struct Running {
    child: Child,
    admin: SocketAddr,
    listeners: Vec<(String, SocketAddr)>,
    log: std::sync::mpsc::Receiver<String>,
    /// Lines read while waiting for readiness.
    history: Vec<String>,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Running {
    fn start(args: &[&str]) -> Running {
        Running::start_watching(args, |_, _| {})
    }

    /// Starts gatehouse with `args`, handing each line it logs before it is ready to
    /// `on_line` with its process id (to act while it starts).
    fn start_watching(args: &[&str], on_line: impl FnMut(&str, u32)) -> Running {
        let mut command = Command::new(BINARY);
        command.args(args);
        Running::start_command_watching(command, on_line)
    }

    /// Starts gatehouse as `command` says (a shell that sets limits first, say).
    fn start_command(command: Command) -> Running {
        Running::start_command_watching(command, |_, _| {})
    }

    fn start_command_watching(command: Command, mut on_line: impl FnMut(&str, u32)) -> Running {
        let (child, log) = launch(command);
        let start = Instant::now();
        let mut history = Vec::new();
        loop {
            let remaining = DEADLINE.saturating_sub(start.elapsed());
            let line = log
                .recv_timeout(remaining)
                .expect("gatehouse did not report ready");
            on_line(&line, child.id());
            history.push(line.clone());
            if line.contains("gatehouse ready") {
                let field = |name: &str| {
                    line.split_whitespace()
                        .find_map(|part| part.strip_prefix(&format!("{name}=")))
                        .unwrap_or("")
                        .to_string()
                };
                let admin = field("admin").parse().unwrap();
                let listeners = field("listeners")
                    .split(',')
                    .filter_map(|pair| {
                        let (name, address) = pair.split_once('=')?;
                        Some((name.to_string(), address.parse().ok()?))
                    })
                    .collect();
                return Running {
                    child,
                    admin,
                    listeners,
                    log,
                    history,
                };
            }
        }
    }

    fn listener(&self, name: &str) -> SocketAddr {
        self.listeners
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, a)| *a)
            .unwrap()
    }

    fn signal(&self, signal: &str) {
        send_signal(self.child.id(), signal);
    }

    fn wait_for_log(&self, needle: &str) {
        if self.history.iter().any(|line| line.contains(needle)) {
            return;
        }
        let start = Instant::now();
        while start.elapsed() < DEADLINE {
            if let Ok(line) = self.log.recv_timeout(Duration::from_millis(100)) {
                if line.contains(needle) {
                    return;
                }
            }
        }
        panic!("log line containing {needle:?} never came");
    }

    fn wait_exit(&mut self) -> std::process::ExitStatus {
        wait_exit(&mut self.child)
    }
}

/// Spawns gatehouse as `command` says (logging at `info` unless it sets `RUST_LOG`), with
/// every line of its stderr and stdout sent to the receiver as it comes.
fn launch(mut command: Command) -> (Child, std::sync::mpsc::Receiver<String>) {
    if !command.get_envs().any(|(name, _)| name == "RUST_LOG") {
        command.env("RUST_LOG", "info");
    }
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let stdout = child.stdout.take().unwrap();
    let (lines, log) = std::sync::mpsc::channel();
    let stdout_lines = lines.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = lines.send(line);
        }
    });
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = stdout_lines.send(line);
        }
    });
    (child, log)
}

/// Sends `signal` (`HUP`, `TERM`, ...) to process `pid`.
fn send_signal(pid: u32, signal: &str) {
    let status = Command::new("kill")
        .args([&format!("-{signal}"), &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

/// How `child` exited, within the deadline.
fn wait_exit(child: &mut Child) -> std::process::ExitStatus {
    let start = Instant::now();
    while start.elapsed() < DEADLINE {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("gatehouse did not exit");
}

fn simple_config(dir: &TestDir, backend: SocketAddr, shutdown_timeout: &str) -> std::path::PathBuf {
    dir.write(
        "gatehouse.yaml",
        &format!(
            "admin: {{ listen: \"127.0.0.1:0\" }}
shutdown_timeout: {shutdown_timeout}
listeners:
  web: {{ listen: \"127.0.0.1:0\", pool: p }}
pools:
{}",
            pool_yaml("p", &[("b", backend)], "")
        ),
    )
}

#[tokio::test]
async fn sigterm_drains_in_flight_requests_then_exits_zero() {
    let backend = TestBackend::start("b").await;
    let dir = TestDir::new();
    let config = simple_config(&dir, backend.address, "10s");
    let mut running = Running::start(&["run", "--config", config.to_str().unwrap()]);
    let web = running.listener("web");

    let in_flight = tokio::spawn(async move { get(web, "x", "/slow?ms=1500").await });
    eventually("the slow request reached the backend", async || {
        !backend.requests().is_empty()
    })
    .await;
    running.signal("TERM");
    running.wait_for_log("shutting down");
    eventually("the listener stopped accepting", async || {
        tokio::net::TcpStream::connect(web).await.is_err()
    })
    .await;
    let answer = in_flight.await.unwrap();
    assert_eq!(
        answer.status,
        StatusCode::OK,
        "the in-flight request finished"
    );
    assert_eq!(answer.text(), "backend=b");
    assert_eq!(
        answer.headers.get("connection").map(|v| v.as_bytes()),
        Some(&b"close"[..]),
        "the client is told the connection ends"
    );
    let status = tokio::task::spawn_blocking(move || running.wait_exit())
        .await
        .unwrap();
    assert!(status.success(), "{status:?}");
}

/// A second SIGTERM (or Ctrl-C) during the drain exits at once, exit status 0, without
/// waiting out `shutdown_timeout` for a request still in flight.
#[tokio::test]
async fn a_second_signal_during_the_drain_exits_at_once() {
    let backend = TestBackend::start("b").await;
    let dir = TestDir::new();
    let config = simple_config(&dir, backend.address, "60s");
    let mut running = Running::start(&["run", "--config", config.to_str().unwrap()]);
    let web = running.listener("web");
    let _in_flight = tokio::spawn(async move { get(web, "x", "/slow?ms=30000").await });
    eventually("the slow request reached the backend", async || {
        !backend.requests().is_empty()
    })
    .await;
    running.signal("TERM");
    running.wait_for_log("shutting down");
    running.signal("INT");
    let status = tokio::task::spawn_blocking(move || running.wait_exit())
        .await
        .unwrap();
    assert!(status.success(), "{status:?}");
}

#[tokio::test]
async fn sighup_reloads_the_configuration() {
    let first = TestBackend::start("first").await;
    let second = TestBackend::start("second").await;
    let dir = TestDir::new();
    let config = simple_config(&dir, first.address, "1s");
    let running = Running::start(&["run", "--config", config.to_str().unwrap()]);
    let web = running.listener("web");
    assert_eq!(get(web, "x", "/").await.backend().as_deref(), Some("first"));

    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace(&first.address.to_string(), &second.address.to_string());
    std::fs::write(&config, text).unwrap();
    running.signal("HUP");
    eventually("the reload took effect", async || {
        get(web, "x", "/").await.backend().as_deref() == Some("second")
    })
    .await;
    let metrics = get(running.admin, "admin", "/metrics").await.text();
    assert!(
        metric(
            &metrics,
            "gatehouse_config_reloads_total",
            &[("result", "success")]
        )
        .unwrap_or(0.0)
            >= 1.0
    );
}

/// A self-signed certificate for `name`, valid from `from` to `until` (seconds from now).
fn dated_certificate(dir: &TestDir, name: &str, from: i64, until: i64) {
    let at = |offset: i64| {
        let now = std::time::SystemTime::now();
        let shift = Duration::from_secs(offset.unsigned_abs());
        if offset < 0 {
            now - shift
        } else {
            now + shift
        }
    };
    let mut params = rcgen::CertificateParams::new(vec![name.to_string()]).unwrap();
    params.not_before = at(from).into();
    params.not_after = at(until).into();
    let key = rcgen::KeyPair::generate().unwrap();
    let certificate = params.self_signed(&key).unwrap();
    dir.write(&format!("{name}.crt"), &certificate.pem());
    dir.write(&format!("{name}.key"), &key.serialize_pem());
}

/// A served certificate that has expired, or expires within two weeks, is warned of at
/// start and again on each reload; one further away is not.
#[tokio::test]
async fn certificates_near_or_past_expiry_are_warned_of_at_start_and_reload() {
    const DAY: i64 = 86_400;
    let backend = TestBackend::start("b").await;
    let dir = TestDir::new();
    dated_certificate(&dir, "expired", -10 * DAY, -2 * DAY);
    dated_certificate(&dir, "soon", -DAY, 3 * DAY - 60);
    dated_certificate(&dir, "fine", -DAY, 60 * DAY);
    let config = dir.write(
        "gatehouse.yaml",
        &format!(
            "admin: {{ listen: \"127.0.0.1:0\" }}\nlisteners:\n  secure:\n    listen: \"127.0.0.1:0\"\n    protocol: https\n    tls:\n      certificates:\n        - {{ cert: fine.crt, key: fine.key }}\n        - {{ cert: soon.crt, key: soon.key }}\n        - {{ cert: expired.crt, key: expired.key }}\n    pool: p\npools:\n{}",
            pool_yaml("p", &[("b", backend.address)], "")
        ),
    );
    let mut running = Running::start(&["run", "--config", config.to_str().unwrap()]);
    let warnings = |lines: &[String]| -> Vec<String> {
        lines
            .iter()
            .filter(|line| line.contains("WARN") && line.contains("certificate"))
            .cloned()
            .collect()
    };
    let at_start = warnings(&running.history);
    assert_eq!(at_start.len(), 2, "{at_start:#?}");
    assert!(at_start[0].contains("soon.crt"), "{at_start:#?}");
    assert!(
        at_start[0].contains("in 3 day(s): renew it"),
        "{at_start:#?}"
    );
    assert!(at_start[1].contains("expired.crt"), "{at_start:#?}");
    assert!(
        at_start[1].contains("2 day(s) ago: clients refuse it"),
        "{at_start:#?}"
    );
    running.history.clear();
    running.signal("HUP");
    running.wait_for_log("configuration reloaded");
    running.wait_for_log("expired.crt");
}

/// A configuration whose first health check waits out `timeout` on `silent`, a backend that
/// accepts and never answers: gatehouse takes that long to start.
fn slow_to_start(
    dir: &TestDir,
    silent: &std::net::TcpListener,
    timeout: &str,
) -> std::path::PathBuf {
    dir.write(
        "gatehouse.yaml",
        &format!(
            "admin: {{ listen: \"127.0.0.1:0\" }}\nlisteners:\n  web: {{ listen: \"127.0.0.1:0\", pool: p }}\npools:\n  p:\n    health_check: {{ type: http, path: /, timeout: {timeout}, interval: 60s }}\n    backends:\n      - {{ name: silent, address: \"{}\" }}\n",
            silent.local_addr().unwrap()
        ),
    )
}

/// A SIGHUP that arrives while gatehouse starts — here while its first health check waits
/// out its timeout on a backend that never answers — reloads once it has started; it does
/// not end the process, as the signal's default action would.
#[test]
fn a_sighup_while_starting_reloads_once_started() {
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dir = TestDir::new();
    let config = slow_to_start(&dir, &silent, "2s");
    let mut signalled = false;
    let mut running = Running::start_watching(
        &["run", "--config", config.to_str().unwrap()],
        |line, pid| {
            if line.contains("config hash") && !signalled {
                send_signal(pid, "HUP");
                signalled = true;
            }
        },
    );
    assert!(
        signalled,
        "no summary line before ready: {:#?}",
        running.history
    );
    assert!(
        running
            .history
            .iter()
            .any(|line| line.contains("backend down at start-up")),
        "the first health check did not wait out its timeout: {:#?}",
        running.history
    );
    running.wait_for_log("SIGHUP: reloading the configuration");
    running.wait_for_log("configuration reloaded");
    assert!(
        running.child.try_wait().unwrap().is_none(),
        "gatehouse exited"
    );
}

/// A SIGTERM while gatehouse starts ends it at once with exit 0 (nothing is served yet to
/// drain), not once its first health check has waited out its 50-s timeout (longer than
/// the deadline `wait_exit` gives).
#[test]
fn a_sigterm_while_starting_exits_at_once() {
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dir = TestDir::new();
    let config = slow_to_start(&dir, &silent, "50s");
    let mut command = Command::new(BINARY);
    command.args(["run", "--config", config.to_str().unwrap()]);
    let (mut child, log) = launch(command);
    let start = Instant::now();
    loop {
        let line = log
            .recv_timeout(DEADLINE.saturating_sub(start.elapsed()))
            .expect("no summary line");
        if line.contains("config hash") {
            break;
        }
    }
    send_signal(child.id(), "TERM");
    let exit = wait_exit(&mut child);
    assert!(exit.success(), "{exit:?}");
}

/// A client that sends an IP address as SNI, as OpenSSL-based clients connecting by address
/// do on every handshake, costs no log line (rustls warns of it) unless `RUST_LOG` asks for
/// rustls's warnings.
#[tokio::test]
async fn per_connection_tls_warnings_stay_out_of_the_log_unless_asked_for() {
    let backend = TestBackend::start("b").await;
    let dir = TestDir::new();
    TestCa::new().leaf(&dir, "portal", &["portal.example.gov"]);
    let config = dir.write(
        "gatehouse.yaml",
        &format!(
            "admin: {{ listen: \"127.0.0.1:0\" }}\nlisteners:\n  secure: {{ listen: \"127.0.0.1:0\", protocol: https, tls: {{ certificates: [ {{ cert: portal.crt, key: portal.key }} ] }}, pool: p }}\npools:\n{}",
            pool_yaml("p", &[("b", backend.address)], "")
        ),
    );
    let logged_for_ip_sni = |rust_log: &str| -> Vec<String> {
        let mut command = Command::new(BINARY);
        command
            .args(["run", "--config", config.to_str().unwrap()])
            .env("RUST_LOG", rust_log);
        let running = Running::start_command(command);
        let secure = running.listener("secure");
        let handshake = Command::new("openssl")
            .args(["s_client", "-brief", "-connect"])
            .arg(secure.to_string())
            .args(["-servername", "127.0.0.1"])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(
            String::from_utf8_lossy(&handshake.stderr).contains("CONNECTION ESTABLISHED"),
            "{handshake:?}"
        );
        // A reload's line comes after any line the handshake caused.
        running.signal("HUP");
        let start = Instant::now();
        let mut lines = Vec::new();
        loop {
            let remaining = DEADLINE.saturating_sub(start.elapsed());
            let line = running.log.recv_timeout(remaining).expect("no reload line");
            if line.contains("configuration reloaded") {
                return lines;
            }
            if line.contains("SNI") {
                lines.push(line);
            }
        }
    };
    let quiet = logged_for_ip_sni("info");
    assert!(quiet.is_empty(), "{quiet:#?}");
    let asked = logged_for_ip_sni("info,rustls=warn");
    assert_eq!(asked.len(), 1, "{asked:#?}");
    assert!(
        asked[0].contains("IP address presented as hostname"),
        "{asked:#?}"
    );
}

#[tokio::test]
async fn demo_answers_from_all_three_backends() {
    let dir = TestDir::new();
    let yaml = std::fs::read_to_string(repo_file("config/gatehouse.yaml"))
        .unwrap()
        .replace("127.0.0.1:8080", "127.0.0.1:0")
        .replace("127.0.0.1:8443", "127.0.0.1:0")
        .replace("127.0.0.1:9901", "127.0.0.1:0")
        .replace("../certs/", &format!("{}/", repo_file("certs").display()));
    let config = dir.write("gatehouse.yaml", &yaml);
    let running = Running::start(&["demo", "--config", config.to_str().unwrap()]);
    let web = running.listener("web");
    let mut seen = std::collections::BTreeSet::new();
    eventually("all three demo backends answered", async || {
        let answer = get(web, "localhost", "/").await;
        if answer.status == StatusCode::OK {
            seen.insert(answer.text());
        }
        seen.len() == 3
    })
    .await;
    let names: Vec<String> = seen.into_iter().collect();
    assert!(names[0].contains("vm-1") && names[1].contains("vm-2") && names[2].contains("vm-3"));
    let status = get(running.admin, "admin", "/api/v1/status").await;
    let status: serde_json::Value = serde_json::from_slice(&status.body).unwrap();
    assert_eq!(status["pools"][0]["backends"].as_array().unwrap().len(), 3);
}

#[tokio::test]
async fn fallback_last_good_starts_from_the_kept_copy_when_the_file_is_broken() {
    let backend = TestBackend::start("b").await;
    let dir = TestDir::new();
    let config = simple_config(&dir, backend.address, "1s");
    {
        let running = Running::start(&["run", "--config", config.to_str().unwrap()]);
        assert_eq!(
            get(running.listener("web"), "x", "/").await.status,
            StatusCode::OK
        );
    }
    assert!(dir.path("gatehouse.yaml.last-good").exists());
    std::fs::write(&config, "listeners: [broken\n").unwrap();

    let refused = Command::new(BINARY)
        .args(["run", "--config", config.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        !refused.status.success(),
        "a broken file alone refuses to start"
    );

    let running = Running::start(&[
        "run",
        "--config",
        config.to_str().unwrap(),
        "--fallback-last-good",
    ]);
    running.wait_for_log("last-known-good");
    assert_eq!(
        get(running.listener("web"), "x", "/")
            .await
            .backend()
            .as_deref(),
        Some("b")
    );
}

#[tokio::test]
async fn check_diff_against_a_file_and_the_running_instance() {
    let first = TestBackend::start("first").await;
    let second = TestBackend::start("second").await;
    let dir = TestDir::new();
    let config = simple_config(&dir, first.address, "1s");
    let running = Running::start(&["run", "--config", config.to_str().unwrap()]);

    let changed = dir.write(
        "next.yaml",
        &std::fs::read_to_string(&config).unwrap().replace(
            "{ name: b,",
            &format!(
                "{{ name: extra, address: \"{}\" }}\n      - {{ name: b,",
                second.address
            ),
        ),
    );
    let against_file = Command::new(BINARY)
        .args([
            "check",
            "--config",
            changed.to_str().unwrap(),
            "--against",
            config.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&against_file.stdout);
    assert!(against_file.status.success(), "{stdout}");
    assert!(stdout.contains("pool p: backend extra added"), "{stdout}");

    let admin = running.admin.to_string();
    let against_running = check_against_running(&changed, &admin);
    let stdout = String::from_utf8_lossy(&against_running.stdout);
    assert!(against_running.status.success(), "{stdout}");
    assert!(stdout.contains("pool p: backend extra added"), "{stdout}");

    let unchanged = check_against_running(&config, &admin);
    assert!(String::from_utf8_lossy(&unchanged.stdout).contains("no changes"));
}

/// `gatehouse check --config CONFIG --diff --admin ADMIN`: CONFIG against the instance
/// running with that admin address.
fn check_against_running(config: &std::path::Path, admin: &str) -> std::process::Output {
    Command::new(BINARY)
        .args([
            "check",
            "--config",
            config.to_str().unwrap(),
            "--diff",
            "--admin",
            admin,
        ])
        .output()
        .unwrap()
}

/// A gatehouse started from its configuration's directory with a relative `--config`, whose
/// file names a relative path: `check --diff` from elsewhere still reads the running
/// configuration (the admin API gives its absolute path).
#[tokio::test]
async fn check_diff_from_another_directory_reads_the_running_configuration() {
    let backend = TestBackend::start("b").await;
    let dir = TestDir::new();
    std::fs::create_dir(dir.path("logs")).unwrap();
    let config = simple_config(&dir, backend.address, "1s");
    let text = std::fs::read_to_string(&config).unwrap().replacen(
        "shutdown_timeout",
        "audit_log: logs/audit.jsonl\nshutdown_timeout",
        1,
    );
    std::fs::write(&config, &text).unwrap();
    let mut command = Command::new(BINARY);
    command
        .current_dir(dir.path(""))
        .args(["run", "--config", "gatehouse.yaml"]);
    let running = Running::start_command(command);
    let unchanged = check_against_running(&config, &running.admin.to_string());
    let stdout = String::from_utf8_lossy(&unchanged.stdout);
    let stderr = String::from_utf8_lossy(&unchanged.stderr);
    assert!(unchanged.status.success(), "{stdout}{stderr}");
    assert!(stdout.contains("no changes"), "{stdout}");
}

#[tokio::test]
async fn two_processes_with_the_same_config_choose_the_same_backend_per_key() {
    let backends = [
        TestBackend::start("vm-1").await,
        TestBackend::start("vm-2").await,
        TestBackend::start("vm-3").await,
    ];
    let dir = TestDir::new();
    let list: Vec<(&str, SocketAddr)> = backends
        .iter()
        .map(|b| (b.name.as_str(), b.address))
        .collect();
    let config = dir.write(
        "gatehouse.yaml",
        &format!(
            "admin: {{ listen: \"127.0.0.1:0\" }}\nlisteners:\n  web: {{ listen: \"127.0.0.1:0\", pool: p }}\npools:\n{}",
            pool_yaml("p", &list, "    algorithm: consistent_hash\n    hash_key: header:x-citizen\n")
        ),
    );
    let one = Running::start(&["run", "--config", config.to_str().unwrap()]);
    let two = Running::start(&["run", "--config", config.to_str().unwrap()]);
    let mut used = std::collections::BTreeSet::new();
    for citizen in 0..40 {
        let ask = |address: SocketAddr| async move {
            send(
                http::Request::get(format!("http://{address}/"))
                    .header("host", "x")
                    .header("x-citizen", format!("citizen-{citizen}"))
                    .body(http_body_util::Full::new(bytes::Bytes::new()))
                    .unwrap(),
            )
            .await
            .backend()
            .unwrap()
        };
        let first = ask(one.listener("web")).await;
        let second = ask(two.listener("web")).await;
        assert_eq!(first, second, "citizen-{citizen}");
        used.insert(first);
    }
    assert_eq!(used.len(), 3, "keys spread over all backends");
}

#[tokio::test]
async fn reuse_port_lets_two_processes_share_a_listener() {
    let backend = TestBackend::start("b").await;
    let port = closed_port().port();
    let dir = TestDir::new();
    let config = dir.write(
        "gatehouse.yaml",
        &format!(
            "admin: {{ listen: \"127.0.0.1:0\" }}\nlisteners:\n  web: {{ listen: \"127.0.0.1:{port}\", pool: p, reuse_port: true }}\npools:\n{}",
            pool_yaml("p", &[("b", backend.address)], "")
        ),
    );
    let one = Running::start(&["run", "--config", config.to_str().unwrap()]);
    let two = Running::start(&["run", "--config", config.to_str().unwrap()]);
    assert_eq!(
        one.listener("web"),
        two.listener("web"),
        "both bound the same address"
    );
    let shared = one.listener("web");
    let served = |admin: SocketAddr| async move {
        let text = get(admin, "admin", "/metrics").await.text();
        metric(&text, "gatehouse_connections_total", &[("listener", "web")]).unwrap_or(0.0)
    };
    eventually("both processes accepted connections", async || {
        for _ in 0..10 {
            assert_eq!(get(shared, "x", "/").await.status, StatusCode::OK);
        }
        served(one.admin).await > 0.0 && served(two.admin).await > 0.0
    })
    .await;
}

#[tokio::test]
async fn sigusr1_reopens_the_access_log_file_for_logrotate() {
    let backend = TestBackend::start("b").await;
    let dir = TestDir::new();
    let config = dir.write(
        "gatehouse.yaml",
        &format!(
            "admin: {{ listen: \"127.0.0.1:0\" }}\naccess_log: {{ target: access.log, format: json }}\nlisteners:\n  web: {{ listen: \"127.0.0.1:0\", pool: p }}\npools:\n{}",
            pool_yaml("p", &[("b", backend.address)], "")
        ),
    );
    let running = Running::start(&["run", "--config", config.to_str().unwrap()]);
    let web = running.listener("web");
    let log = dir.path("access.log");
    get(web, "x", "/before-rotation").await;
    eventually("the first line", async || {
        std::fs::read_to_string(&log).is_ok_and(|t| t.contains("/before-rotation"))
    })
    .await;
    std::fs::rename(&log, dir.path("access.log.1")).unwrap();
    running.signal("USR1");
    eventually("the reopened file gets new lines", async || {
        get(web, "x", "/after-rotation").await;
        std::fs::read_to_string(&log).is_ok_and(|t| t.contains("/after-rotation"))
    })
    .await;
    let rotated = std::fs::read_to_string(dir.path("access.log.1")).unwrap();
    assert!(rotated.contains("/before-rotation"));
}

#[tokio::test]
async fn the_open_files_limit_is_raised_to_the_hard_limit_and_a_short_one_named() {
    let backend = TestBackend::start("b").await;
    let dir = TestDir::new();
    let config = simple_config(&dir, backend.address, "5s");
    // A hard limit below what the default max_connections (10,000) may take, and a soft one
    // below that, as a shell's default 1,024 would be.
    let mut command = Command::new("sh");
    command
        .arg("-c")
        .arg("ulimit -Sn 256 && ulimit -Hn 4096 && exec \"$0\" \"$@\"")
        .args([BINARY, "run", "--config", config.to_str().unwrap()]);
    let running = Running::start_command(command);
    running.wait_for_log("raised the open-files limit to its hard limit");
    running
        .wait_for_log("the open-files limit is below what the listeners' max_connections may take");
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", running.child.id())).unwrap();
    let open_files = limits
        .lines()
        .find(|line| line.starts_with("Max open files"))
        .unwrap();
    let values: Vec<&str> = open_files.split_whitespace().skip(3).take(2).collect();
    assert_eq!(values, ["4096", "4096"], "{open_files}");
    // More connections than the old soft limit, all served.
    let web = running.listener("web");
    let mut held = Vec::new();
    for _ in 0..300 {
        held.push(TcpStream::connect(web).await.unwrap());
    }
    let answer = raw_exchange(
        web,
        b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
}
