//! The web dashboard in a real browser (Operability issue): headless Chromium loads the
//! page a node serves at `/`, runs its script against the live cluster, and the DOM it
//! renders is checked — three nodes up, the volume's copies live, client I/O counted —
//! then a node is SIGKILLed with `lazarus fault kill` and the page must show it down,
//! in red (the colour Chromium actually computed), and its copy dead. A screenshot of
//! each state is saved.

mod common;
use common::*;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

fn chromium() -> &'static str {
    for c in ["chromium", "chromium-browser", "google-chrome"] {
        if Command::new("sh")
            .arg("-c")
            .arg(format!("command -v {c}"))
            .output()
            .is_ok_and(|o| o.status.success())
        {
            return c;
        }
    }
    panic!("chromium is not installed; run scripts/test.sh, which installs it");
}

/// Chromium, headless, without any outside network (this machine has none).
fn browser(profile: &Path, extra: &[&str], url: &str) -> std::process::Output {
    let mut args = vec![
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--hide-scrollbars",
        // Lets the page's fetches complete and its timers run before the DOM is taken.
        "--virtual-time-budget=4000",
        "--window-size=1400,1100",
    ];
    let dir = format!("--user-data-dir={}", profile.display());
    args.push(&dir);
    args.extend_from_slice(extra);
    args.push(url);
    let o = Command::new(chromium())
        .args(&args)
        .output()
        .expect("run chromium");
    assert!(
        o.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

/// The page's DOM after its script ran.
fn dom(profile: &Path, url: &str) -> String {
    String::from_utf8_lossy(&browser(profile, &["--dump-dom"], url).stdout).into_owned()
}

fn screenshot(profile: &Path, url: &str, out: &Path) {
    let arg = format!("--screenshot={}", out.display());
    browser(profile, &[&arg], url);
    let png = std::fs::read(out).expect("screenshot written");
    assert!(
        png.starts_with(b"\x89PNG\r\n\x1a\n") && png.len() > 20_000,
        "not a real screenshot ({} bytes)",
        png.len()
    );
}

/// The opening tag of the element with this id.
fn tag<'a>(dom: &'a str, id: &str) -> &'a str {
    let at = dom
        .find(&format!("id=\"{id}\""))
        .unwrap_or_else(|| panic!("no element #{id} in the page:\n{dom}"));
    let start = dom[..at].rfind('<').unwrap();
    let end = at + dom[at..].find('>').unwrap();
    &dom[start..=end]
}

fn attr<'a>(tag: &'a str, name: &str) -> &'a str {
    let k = format!("{name}=\"");
    let at = tag.find(&k).unwrap_or_else(|| panic!("no {name} in {tag}")) + k.len();
    &tag[at..at + tag[at..].find('"').unwrap()]
}

#[test]
fn dashboard_shows_the_cluster_and_a_killed_node_in_red() {
    require("qemu-io");
    let tmp = tempfile::tempdir().unwrap();
    let up = Up::start(&tmp.path().join("c"), "64MiB");
    up.wait_all_live(1, "vol0", Duration::from_secs(30));
    let profile = tmp.path().join("chromium");
    // The link `lazarus up` prints: the admin token rides in the fragment.
    let url = format!("{}/#token={}", up.admin(1), up.token());
    let shots = Path::new(env!("CARGO_TARGET_TMPDIR"));

    // Some client I/O for the charts and counters.
    let o = Command::new("qemu-io")
        .args([
            "-f",
            "raw",
            "-c",
            "write -P 0x5a 0 4M",
            "-c",
            "read -P 0x5a 0 4M",
        ])
        .arg(up.uri(1, "vol0"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    up.cli_ok(&["snapshot", "create", "vol0", "monday"]);

    let page = dom(&profile, &url);
    assert!(
        page.contains("data-loaded=\"1\""),
        "the script never rendered:\n{page}"
    );
    for n in ["n1", "n2", "n3"] {
        let t = tag(&page, &format!("node-{n}"));
        assert_eq!(attr(t, "data-state"), "up", "{t}");
        assert_eq!(
            attr(t, "data-border"),
            "rgb(47, 191, 113)",
            "{n} not green: {t}"
        );
        let c = tag(&page, &format!("copy-vol0-{n}"));
        assert!(c.contains("s-live"), "{c}");
    }
    assert!(
        tag(&page, "copy-vol0-n1").contains("primary"),
        "n1 is vol0's primary"
    );
    let snaps = page
        .split("id=\"snaps-vol0\">")
        .nth(1)
        .and_then(|r| r.split('<').next())
        .unwrap_or_default();
    assert_eq!(snaps, "monday", "the volume's snapshots on the page");
    // The page's own totals: the 4 MiB write above went through n1.
    let t = tag(&page, "io-totals");
    let writes: u64 = attr(t, "data-writes").parse().unwrap();
    assert!(writes > 0, "{t}");
    screenshot(&profile, &url, &shots.join("dashboard-healthy.png"));

    up.cli_ok(&["fault", "kill", "--node", "n3"]);
    // The replica is committed dead once a write finds it gone.
    let o = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 0x5b 4M 1M"])
        .arg(up.uri(1, "vol0"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let t0 = Instant::now();
    let page = loop {
        let page = dom(&profile, &url);
        let t = tag(&page, "node-n3");
        // The timeline too: n3 stopped answering (each node pings its peers once a
        // second), its copy marked dead.
        if attr(t, "data-state") == "down"
            && tag(&page, "copy-vol0-n3").contains("s-dead")
            && page.contains("n3 stopped answering")
            && page.contains("n3 marked dead")
        {
            break page;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "n3 never shown down, its copy dead and its loss on the timeline:\n{page}"
        );
        std::thread::sleep(Duration::from_millis(300));
    };
    let t = tag(&page, "node-n3");
    assert_eq!(
        attr(t, "data-border"),
        "rgb(229, 72, 77)",
        "n3 not red: {t}"
    );
    assert!(t.contains("down"), "{t}");
    for n in ["n1", "n2"] {
        assert_eq!(attr(tag(&page, &format!("node-{n}")), "data-state"), "up");
    }
    screenshot(&profile, &url, &shots.join("dashboard-n3-killed.png"));
    eprintln!("screenshots in {}", shots.display());
}
