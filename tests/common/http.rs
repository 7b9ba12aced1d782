//! HTTP from the tests, through `curl`: the status and the body, so that a
//! test can assert on either and a refused connection reads as status 0.

use std::process::Command;

/// `METHOD url`, with a bearer `token` and a JSON `body` when given: the
/// status (0 when nothing answered) and the body.
pub fn http(method: &str, url: &str, token: Option<&str>, body: Option<&str>) -> (u16, String) {
    let mut cmd = Command::new("curl");
    cmd.args(["-s", "-o", "-", "-w", "\n%{http_code}", "-X", method, url]);
    if let Some(t) = token {
        cmd.args(["-H", &format!("Authorization: Bearer {t}")]);
    }
    if let Some(b) = body {
        cmd.args(["-H", "Content-Type: application/json", "-d", b]);
    }
    let out = cmd.output().expect("curl is installed");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

/// `GET path` on a loopback port (an admin endpoint): the status and the body.
pub fn get(port: u16, path: &str) -> (u16, String) {
    http("GET", &format!("http://127.0.0.1:{port}{path}"), None, None)
}
