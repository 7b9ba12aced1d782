//! Headless Chromium (Debian's `chromium`) for the browser tests: a page's
//! DOM after its scripts ran (`--dump-dom`), a screenshot, and a browser
//! driven over the DevTools protocol to fill forms, with small readers of
//! the serialized DOM.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// How long a page may take to show what a test waits for.
const LIMIT: Duration = Duration::from_secs(60);

/// Debian's Chromium, or a failure saying what to install.
pub fn chromium() -> &'static str {
    let found = Command::new("chromium")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        found,
        "these tests need headless Chromium: install Debian's `chromium` package \
         (and `fonts-dejavu-core` for readable screenshots); scripts/test.sh installs both"
    );
    "chromium"
}

/// Headless Chromium with a profile of its own (so that tests running at
/// once do not share one), run on `url` with `extra` flags; its stdout.
pub fn headless(url: &str, extra: &[&str]) -> String {
    let profile = tempfile::tempdir().unwrap();
    let out = Command::new(chromium())
        .args([
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--hide-scrollbars",
            // Long enough for the page's first fetch; the page polls every 3 s.
            "--virtual-time-budget=2500",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(extra)
        .arg(url)
        .stderr(Stdio::null())
        .output()
        .expect("start chromium");
    assert!(out.status.success(), "chromium failed on {url}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The page as Chromium renders it (its DOM after the scripts ran).
/// The rendered DOM of `url`, without its scripts: `--dump-dom` writes a
/// script's text too, and the page's templates must not pass for what it
/// shows.
pub fn dom(url: &str) -> String {
    without_scripts(&headless(url, &["--dump-dom"]))
}

/// `html` with every `<script …>…</script>` element taken out.
pub fn without_scripts(html: &str) -> String {
    let mut out = String::with_capacity(html.len());
    let mut rest = html;
    while let Some(at) = rest.find("<script") {
        out.push_str(&rest[..at]);
        match rest[at..].find("</script>") {
            Some(end) => rest = &rest[at + end + "</script>".len()..],
            None => return out,
        }
    }
    out.push_str(rest);
    out
}

/// Renders `url` until `cond` holds on its DOM; panics naming `what`, with
/// the last DOM, after `LIMIT`.
pub fn dom_until(url: &str, what: &str, mut cond: impl FnMut(&str) -> bool) -> String {
    let start = Instant::now();
    loop {
        let d = dom(url);
        if cond(&d) {
            return d;
        }
        if start.elapsed() > LIMIT {
            panic!("the page never showed {what}; its last DOM:\n{d}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The element opening with `<tag attr="value"` up to its closing tag
/// (none of the page's rows nest their own tag).
pub fn element<'a>(dom: &'a str, tag: &str, attr: &str, value: &str) -> Option<&'a str> {
    let open = format!("<{tag} {attr}=\"{value}\"");
    let at = dom.find(&open)?;
    let rest = &dom[at..];
    let end = rest.find(&format!("</{tag}>"))?;
    Some(&rest[..end])
}

/// The value of attribute `attr` inside `html`'s first tag that has it.
pub fn attr<'a>(html: &'a str, attr: &str) -> Option<&'a str> {
    let key = format!("{attr}=\"");
    let at = html.find(&key)? + key.len();
    html[at..].split('"').next()
}

/// Text as the DOM serializes it.
pub fn escaped(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('\u{a0}', "&nbsp;")
}

/// A headless Chromium driven over the DevTools protocol through
/// `--remote-debugging-pipe` (NUL-separated JSON messages; named pipes
/// stand for its descriptors 3 and 4), with one page attached.
pub struct Browser {
    child: Child,
    to: std::fs::File,
    from: BufReader<std::fs::File>,
    next: u64,
    session: String,
    _dir: tempfile::TempDir,
}

impl Browser {
    pub fn open(url: &str) -> Browser {
        let dir = tempfile::tempdir().unwrap();
        let (input, output) = (dir.path().join("in"), dir.path().join("out"));
        let made = Command::new("mkfifo").arg(&input).arg(&output).status();
        assert!(made.is_ok_and(|s| s.success()), "mkfifo (coreutils) failed");
        let child = Command::new("sh")
            .arg("-c")
            .arg(
                "exec \"$0\" --headless=new --no-sandbox --disable-gpu --no-first-run \
                 --remote-debugging-pipe --user-data-dir=\"$1\" about:blank 3<\"$2\" 4>\"$3\"",
            )
            .arg(chromium())
            .arg(dir.path().join("profile"))
            .arg(&input)
            .arg(&output)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromium");
        // The same order as the shell opens them, so neither waits forever.
        let to = std::fs::OpenOptions::new()
            .write(true)
            .open(&input)
            .unwrap();
        let from = BufReader::new(std::fs::File::open(&output).unwrap());
        let mut b = Browser {
            child,
            to,
            from,
            next: 0,
            session: String::new(),
            _dir: dir,
        };
        let target = b.call("Target.createTarget", json!({"url": url}))["targetId"].clone();
        b.session = b.call(
            "Target.attachToTarget",
            json!({"targetId": target, "flatten": true}),
        )["sessionId"]
            .as_str()
            .unwrap()
            .to_string();
        b
    }

    /// Sends one command and returns its result (events in between are
    /// skipped).
    pub fn call(&mut self, method: &str, params: Value) -> Value {
        self.next += 1;
        let mut msg = json!({"id": self.next, "method": method, "params": params});
        if !self.session.is_empty() {
            msg["sessionId"] = json!(self.session);
        }
        self.to.write_all(msg.to_string().as_bytes()).unwrap();
        self.to.write_all(b"\0").unwrap();
        self.to.flush().unwrap();
        loop {
            let mut buf = Vec::new();
            let n = self.from.read_until(0, &mut buf).unwrap();
            assert!(n > 0, "chromium closed its DevTools pipe during {method}");
            buf.pop();
            let answer: Value = serde_json::from_slice(&buf).unwrap();
            if answer["id"] == json!(self.next) {
                assert!(answer["error"].is_null(), "{method}: {answer}");
                return answer["result"].clone();
            }
        }
    }

    /// The value of a JavaScript expression in the page.
    pub fn eval(&mut self, expression: &str) -> Value {
        let r = self.call(
            "Runtime.evaluate",
            json!({"expression": expression, "returnByValue": true, "awaitPromise": true}),
        );
        r["result"]["value"].clone()
    }

    /// Evaluates `expression` until it is `true`; panics naming `what`,
    /// with the page's text, after `LIMIT`.
    pub fn until(&mut self, what: &str, expression: &str) {
        let start = Instant::now();
        while self.eval(expression) != json!(true) {
            if start.elapsed() > LIMIT {
                let text = self.eval("document.body.innerText");
                panic!("the page never showed {what}; it shows:\n{text}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Types `token` into the page's form and submits it.
    pub fn give_token(&mut self, token: &str) {
        let js = format!(
            "document.getElementById('token').value = {}; \
             document.getElementById('login-form').requestSubmit(); true",
            json!(token)
        );
        assert_eq!(self.eval(&js), json!(true));
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
