//! Chunking end to end: a long text in token windows and a large image in
//! tiles, each completed by fan-in through the real daemon and simulated
//! servers; a next stage after a parent; a fragment failing for good; and
//! `kill -9` while parents fan in.

mod common;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::served::{RequestLog, Served};
use common::{wait_for, words, DaemonProcess, Scratch, SimProcess};

const LIMIT: Duration = Duration::from_secs(120);

fn tokenizer(dir: &Path, n: usize) -> PathBuf {
    common::word_tokenizer(dir, n)
}

fn instance(name: &str, model: &str, url: &str, extra: &str) -> String {
    format!(
        "[[instances]]\nname = \"{name}\"\nmodel_type = \"{model}\"\nbackend = \"external\"\nurl = \"{url}\"\nserved_model_name = \"sim\"\nmax_tokens = 32\n{extra}\n\n"
    )
}

const SETTINGS: &str = "[admin]\nlisten = \"127.0.0.1:0\"\n\n[dispatch]\nwindow = 4\nexternal_poll_ms = 100\nretry_base_s = 0.05\nretry_max_s = 0.2\n\n[health]\ninterval_s = 1\n\n";

/// A scratch folder whose think instance at `think` has a word-level
/// tokenizer (in the scratch folder), and a 1,200-word text file in it.
fn long_text_scratch(think: &SimProcess) -> (Scratch, PathBuf) {
    let s = Scratch::new(SETTINGS);
    let tk = tokenizer(s.path(), 2000);
    let extra = instance(
        "think",
        "think",
        &think.url,
        &format!("tokenizer = \"{}\"", tk.display()),
    );
    std::fs::write(
        s.config(),
        std::fs::read_to_string(s.config()).unwrap() + &extra,
    )
    .unwrap();
    let text = s.path().join("long.txt");
    std::fs::write(&text, words(0, 1200)).unwrap();
    (s, text)
}

fn result_doc(job: &serde_json::Value) -> serde_json::Value {
    let path = job["result_path"].as_str().expect("a result file");
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

#[test]
fn a_long_text_completes_by_fan_in_in_token_windows() {
    let think = SimProcess::start(&[]);
    let (s, text) = long_text_scratch(&think);
    let out = s.submit_file("think", "--text-file", &text, &["--chunk"]);
    assert_eq!(
        out["fragments"], 3,
        "1200 tokens make windows at 0, 392 and 688"
    );
    let parent = out["id"].as_str().unwrap().to_string();
    // A text that fits in one window is one ordinary job.
    let short = s.path().join("short.txt");
    std::fs::write(&short, words(0, 300)).unwrap();
    let single = s.submit_file("think", "--text-file", &short, &["--chunk"]);
    assert!(single["fragments"].is_null());

    let _d = DaemonProcess::start(&s, "daemon");
    wait_for("the parent is done", LIMIT, || {
        s.json(&["status", &parent, "--json"])["status"] == "done"
    });
    let p = s.json(&["status", &parent, "--json"]);
    assert_eq!(p["total_fragments"], 3);
    let doc = result_doc(&p);
    let frags = doc["fragments"].as_array().unwrap();
    let ranges: Vec<(u64, u64)> = frags
        .iter()
        .map(|f| {
            (
                f["tokens"][0].as_u64().unwrap(),
                f["tokens"][1].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(ranges, vec![(0, 512), (392, 904), (688, 1200)]);
    // Each window's answer, in order, in the merged text.
    let merged = doc["content"].as_str().unwrap();
    let mut at = 0;
    for start in [0, 392, 688] {
        let needle = format!("echo: w{start} w{}", start + 1);
        let found = merged[at..]
            .find(&needle)
            .unwrap_or_else(|| panic!("{needle} missing or out of order in {merged}"));
        at += found + needle.len();
    }
    // The fragments ran as ordinary jobs of the parent.
    let fragments: Vec<_> = s
        .jobs()
        .into_iter()
        .filter(|j| j["parent_id"] == parent.as_str())
        .collect();
    assert_eq!(fragments.len(), 3);
    assert!(fragments
        .iter()
        .all(|f| f["status"] == "done" && f["total_fragments"] == 3));
}

/// A PNG of random pixels (so it does not compress) of `w × h`.
fn noisy_png(path: &Path, w: u32, h: u32) {
    let img = image::RgbImage::from_fn(w, h, |_, _| image::Rgb(rand::random::<[u8; 3]>()));
    img.save(path).unwrap();
}

#[test]
fn a_large_image_is_tiled_completes_by_fan_in_and_starts_a_think_job() {
    let vision = SimProcess::start(&[]);
    let think = SimProcess::start(&[]);
    let s = Scratch::new(
        &(SETTINGS.to_string()
            + &instance("vision", "vision", &vision.url, "")
            + &instance("think", "think", &think.url, "")),
    );
    let big = s.stage().join("scan.png");
    noisy_png(&big, 1200, 1200);
    assert!(
        std::fs::metadata(&big).unwrap().len() > 4 * 1024 * 1024,
        "the test image is over 4 MB"
    );
    let small = s.stage().join("small.png");
    noisy_png(&small, 300, 200);

    let out = s.submit_file("vision", "--image", &big, &["--then", "think"]);
    assert_eq!(out["fragments"], 9, "1200 px gives 3 tiles a side");
    let parent = out["id"].as_str().unwrap().to_string();
    let plain = s.submit_file("vision", "--image", &small, &[]);
    assert!(plain["fragments"].is_null(), "a small image is not tiled");

    let _d = DaemonProcess::start(&s, "daemon");
    wait_for("the parent and its follow-up are done", LIMIT, || {
        s.jobs()
            .iter()
            .any(|j| j["follows"] == parent.as_str() && j["status"] == "done")
    });
    let p = s.json(&["status", &parent, "--json"]);
    assert_eq!(p["status"], "done");
    assert_eq!(p["then_model"], "think");
    let doc = result_doc(&p);
    let tiles: Vec<(u64, u64, u64, u64)> = doc["fragments"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            let t = &f["tile"];
            (
                t["row"].as_u64().unwrap(),
                t["col"].as_u64().unwrap(),
                t["x"].as_u64().unwrap(),
                t["y"].as_u64().unwrap(),
            )
        })
        .collect();
    let expected: Vec<(u64, u64, u64, u64)> = [0u64, 392, 688]
        .iter()
        .enumerate()
        .flat_map(|(r, &y)| {
            [0u64, 392, 688]
                .iter()
                .enumerate()
                .map(move |(c, &x)| (r as u64, c as u64, x, y))
        })
        .collect();
    assert_eq!(
        tiles, expected,
        "tiles by row, then column; the last aligned to the border"
    );
    assert_eq!(doc["content"].as_str().unwrap().lines().count(), 9);
    // The next stage: a think job whose input is the merged result.
    let follow = s
        .jobs()
        .into_iter()
        .find(|j| j["follows"] == parent.as_str())
        .unwrap();
    assert_eq!(follow["model_type"], "think");
    assert!(follow["parent_id"].is_null());
    assert!(result_doc(&follow)["content"]
        .as_str()
        .unwrap()
        .starts_with("echo: ocr: image of about"));
    // Tile files are PNGs of at most 512 × 512 under the stage folder.
    for f in doc["fragments"].as_array().unwrap() {
        let frag = s.json(&["status", f["id"].as_str().unwrap(), "--json"]);
        let payload: serde_json::Value =
            serde_json::from_str(frag["payload_inline"].as_str().unwrap()).unwrap();
        let tile = PathBuf::from(payload["image_path"].as_str().unwrap());
        assert!(tile.starts_with(s.stage().canonicalize().unwrap()) || tile.starts_with(s.stage()));
        let (w, h) = image::image_dimensions(&tile).unwrap();
        assert!(w <= 512 && h <= 512);
    }
}

#[test]
fn a_corrupt_image_is_a_clear_error() {
    let s = Scratch::new("");
    let bad = s.stage().join("broken.png");
    std::fs::write(&bad, vec![0u8; 5 * 1024 * 1024]).unwrap();
    let r = s.submit_run("vision", "--image", &bad, &[]);
    assert_eq!(r.code(), 1);
    assert!(
        r.stderr().contains("broken.png") && r.stderr().contains("not a readable image"),
        "{}",
        r.stderr()
    );
    assert!(s.jobs().is_empty());
}

#[test]
fn chunking_without_a_tokenizer_says_where_to_set_it() {
    let s = Scratch::new(&instance("think", "think", "http://127.0.0.1:9", ""));
    let text = s.path().join("t.txt");
    std::fs::write(&text, "some text").unwrap();
    let r = s.submit_run("think", "--text-file", &text, &["--chunk"]);
    r.refused(1, "set `tokenizer");
}

#[test]
fn a_fragment_failing_for_good_fails_its_parent_and_names_it() {
    // Only the last window holds w1000.
    let think = SimProcess::start(&["--fail-matching", "w1000"]);
    let (s, text) = long_text_scratch(&think);
    let parent = s.submit_file("think", "--text-file", &text, &["--chunk"])["id"]
        .as_str()
        .unwrap()
        .to_string();
    let _d = DaemonProcess::start(&s, "daemon");
    wait_for("the parent failed", LIMIT, || {
        s.json(&["status", &parent, "--json"])["status"] == "failed"
    });
    let err = s.json(&["status", &parent, "--json"])["error"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        err.starts_with("1 of 3 fragments did not succeed: #2 ("),
        "{err}"
    );
    assert!(err.contains("HTTP 400") && err.contains("w1000"), "{err}");
}

#[test]
fn kill_9_during_fan_in_completes_each_parent_once_with_one_follow_up() {
    let dir = tempfile::tempdir().unwrap();
    let think_log = RequestLog::new(dir.path(), "think");
    let vision_log = RequestLog::new(dir.path(), "vision");
    let think = think_log.sim(&["--latency-ms", "200"]);
    let vision = vision_log.sim(&["--latency-ms", "5"]);
    let tk = tokenizer(dir.path(), 20_000);
    let s = Scratch::with_queue(
        "lease_s = 3600",
        &(SETTINGS.to_string()
            + &instance(
                "think",
                "think",
                &think.url,
                &format!("tokenizer = \"{}\"", tk.display()),
            )
            + &instance("vision", "vision", &vision.url, "")),
    );
    let mut parents = Vec::new();
    for i in 0..20 {
        let text = s.path().join(format!("t{i}.txt"));
        std::fs::write(&text, words(i * 1000, i * 1000 + 1000)).unwrap();
        let out = s.submit_file(
            "think",
            "--text-file",
            &text,
            &["--chunk", "--then", "vision"],
        );
        assert_eq!(out["fragments"], 3);
        parents.push(out["id"].as_str().unwrap().to_string());
    }
    // Kill once a parent is done and another part-way through fan-in (some
    // of its fragments done, not all merged); until a kill lands so (read
    // back from the database after it), start again and kill again.
    let mut served = Served::default();
    for tries in 1.. {
        let mut first = DaemonProcess::start(&s, &format!("first-{tries}"));
        wait_for("a parent done and another part-way", LIMIT, || {
            let (done, part_way) = fan_in(&s.jobs());
            assert!(
                done < 20,
                "{tries} kills missed the fan-in before the work ran out"
            );
            done > 0 && part_way > 0
        });
        first.kill9();
        served.kill_found(s.claimed());
        let (done, part_way) = fan_in(&s.jobs());
        println!("kill {tries}: {done} parents done, {part_way} part-way through fan-in");
        if part_way > 0 {
            break;
        }
    }
    let _second = DaemonProcess::start(&s, "second");
    wait_for("every parent and its follow-up are done", LIMIT, || {
        let jobs = s.jobs();
        jobs.len() == 100 && jobs.iter().all(|j| j["status"] == "done")
    });
    let jobs = s.jobs();
    let mut followed = HashSet::new();
    for j in &jobs {
        if let Some(f) = j["follows"].as_str() {
            assert!(followed.insert(f.to_string()), "two follow-ups of {f}");
            assert_eq!(j["model_type"], "vision");
        }
    }
    assert_eq!(followed, parents.iter().cloned().collect::<HashSet<_>>());
    // Each parent's result is its own fragments' answers in order, and its
    // follow-up was asked about exactly that text.
    for p in &parents {
        let parent = jobs.iter().find(|j| j["id"] == p.as_str()).unwrap();
        let mut frags: Vec<_> = jobs
            .iter()
            .filter(|j| j["parent_id"] == p.as_str())
            .collect();
        frags.sort_by_key(|j| j["fragment_index"].as_u64());
        // Token windows are merged word by word, dropping a repeated
        // overlap; each answer here starts with `echo:`, so none repeats
        // the end of the one before and every word is kept, in order.
        let words: Vec<String> = frags
            .iter()
            .flat_map(|f| {
                let doc = result_doc(f);
                let text = doc["content"].as_str().unwrap().to_string();
                text.split_whitespace()
                    .map(String::from)
                    .collect::<Vec<_>>()
            })
            .collect();
        let merged = result_doc(parent);
        assert_eq!(merged["content"], words.join(" "), "parent {p}");
        let follow = jobs.iter().find(|j| j["follows"] == p.as_str()).unwrap();
        let payload: serde_json::Value =
            serde_json::from_str(follow["payload_inline"].as_str().unwrap()).unwrap();
        assert_eq!(payload["prompt"], merged["content"], "the follow-up of {p}");
    }
    served.read(&[&think_log, &vision_log]);
    let (sends, duplicates) = served.assert_exactly_once(&jobs);
    println!("the servers received {sends} requests for 80 jobs, {duplicates} of them sent again after the kill");
}

/// Parents done, and parents part-way through fan-in: not done, with some
/// of their fragments done.
fn fan_in(jobs: &[serde_json::Value]) -> (usize, usize) {
    let parents = jobs
        .iter()
        .filter(|j| j["total_fragments"] == 3 && j["parent_id"].is_null());
    let (mut done, mut part_way) = (0, 0);
    for p in parents {
        if p["status"] == "done" {
            done += 1;
            continue;
        }
        let fragments_done = jobs
            .iter()
            .filter(|f| f["parent_id"] == p["id"] && f["status"] == "done")
            .count();
        if fragments_done > 0 {
            part_way += 1;
        }
    }
    (done, part_way)
}
