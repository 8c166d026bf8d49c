//! The admin dashboard in real headless Chromium (Debian's chromium, driven by playwright-core
//! from tests/browser): the page shows the three demo backends and the HTTPS listener's
//! certificate expiry, "drain" on vm-2 changes its state, and the page loads nothing from
//! outside.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use std::path::Path;

#[tokio::test]
async fn the_dashboard_shows_backends_and_drains_one() {
    let script = repo_file("tests/browser/dashboard.mjs");
    let ready = Path::new("/usr/bin/chromium").exists()
        && repo_file("tests/browser/node_modules/playwright-core").exists();
    if !ready {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must install chromium and tests/browser's node modules (see .ci/run)"
        );
        eprintln!(
            "chromium or playwright-core missing: skipping (run `npm ci --prefix tests/browser`)"
        );
        return;
    }
    let backends = [
        TestBackend::start("vm-1").await,
        TestBackend::start("vm-2").await,
        TestBackend::start("vm-3").await,
    ];
    let dir = TestDir::new();
    TestCa::new().leaf(&dir, "portal", &["portal.example.gov"]);
    let list: Vec<(&str, std::net::SocketAddr)> = backends
        .iter()
        .map(|b| (b.name.as_str(), b.address))
        .collect();
    let yaml = format!(
        "admin: {{ listen: \"127.0.0.1:0\" }}\nlisteners:\n  web: {{ listen: \"127.0.0.1:0\", pool: portal }}\n  secure: {{ listen: \"127.0.0.1:0\", protocol: https, tls: {{ certificates: [ {{ cert: portal.crt, key: portal.key }} ] }}, pool: portal }}\npools:\n{}",
        pool_yaml("portal", &list, "")
    );
    let gatehouse = start_gatehouse(&dir, &yaml).await;
    let url = format!("http://{}/", gatehouse.admin_address());
    let screenshot = dir.path("dashboard.png");
    let output = tokio::process::Command::new("node")
        .arg(&script)
        .arg(&url)
        .arg(&screenshot)
        .output();
    let output = tokio::time::timeout(std::time::Duration::from_secs(90), output)
        .await
        .expect("the browser test finished")
        .unwrap();
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "{report}");
    assert!(report.contains("dashboard ok"), "{report}");
    assert!(screenshot.exists());
    let status = get(gatehouse.admin_address(), "admin", "/api/v1/status").await;
    let status: serde_json::Value = serde_json::from_slice(&status.body).unwrap();
    assert_eq!(status["pools"][0]["backends"][1]["state"], "draining");
}
