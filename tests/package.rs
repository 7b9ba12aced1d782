//! The Debian package, built by `scripts/deb.sh` from the binary under test:
//! lintian finds nothing to warn about, it holds what an installation needs
//! (feeder.toml as a conffile), and dpkg installs it for real into a scratch
//! root: its postinst creates the gpu-feeder user and state directory there,
//! the installed binary passes `config check` as that user against the
//! installed configuration, and a purge takes the state away again.
//!
//! Needs root (dpkg, useradd, a private mount namespace) and Debian's
//! lintian (which brings dpkg-dev and binutils).

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::bin;

const REPO: &str = env!("CARGO_MANIFEST_DIR");

/// Panics naming the Debian package to install when a tool is missing.
fn require_tools() {
    for (tool, package) in [
        ("dpkg-deb", "dpkg"),
        ("dpkg-shlibdeps", "dpkg-dev (lintian brings it)"),
        ("strip", "binutils (lintian brings it)"),
        ("lintian", "lintian"),
        ("unshare", "util-linux"),
        ("setpriv", "util-linux"),
    ] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .is_ok_and(|o| o.status.success());
        assert!(
            found,
            "{tool} is missing: install Debian's {package} (apt-get install lintian, or run scripts/test.sh as root)"
        );
    }
    let uid = Command::new("id").arg("-u").output().expect("id runs");
    assert!(
        String::from_utf8_lossy(&uid.stdout).trim() == "0",
        "installing the package into a scratch root needs root (dpkg writes root-owned files, postinst runs useradd)"
    );
}

fn run(cmd: &mut Command, what: &str) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot start: {e}"));
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn text(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Builds the package from the binary under test into `out`; its path.
fn build(out: &Path) -> PathBuf {
    let built = run(
        Command::new(format!("{REPO}/scripts/deb.sh"))
            .arg("--binary")
            .arg(bin())
            .arg("--out")
            .arg(out),
        "scripts/deb.sh",
    );
    let deb = PathBuf::from(text(&built).lines().last().unwrap_or_default().trim());
    assert!(deb.is_file(), "deb.sh printed no package path: {deb:?}");
    deb
}

/// A directory dpkg can install into: its database folders, and the
/// passwd/group/shadow files a base system starts with.
fn scratch_root(root: &Path) {
    for dir in [
        "var/lib/dpkg/info",
        "var/lib/dpkg/updates",
        "var/lib/dpkg/triggers",
        "var/log",
        "etc",
    ] {
        std::fs::create_dir_all(root.join(dir)).unwrap();
    }
    for (file, content, mode) in [
        ("var/lib/dpkg/status", "", 0o644),
        ("var/lib/dpkg/available", "", 0o644),
        ("etc/passwd", "root:x:0:0:root:/root:/bin/sh\n", 0o644),
        // A host with Docker: its group, which the daemon's user joins.
        ("etc/group", "root:x:0:\ndocker:x:998:alice\n", 0o644),
        ("etc/shadow", "root:*:20000:0:99999:7:::\n", 0o640),
        ("etc/gshadow", "root:*::\ndocker:!::alice\n", 0o640),
    ] {
        let path = root.join(file);
        std::fs::write(&path, content).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
    }
}

/// `dpkg --root=ROOT` with the maintainer scripts run from the host (they
/// honour $DPKG_ROOT); ARGS follow.
fn dpkg(root: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new("dpkg");
    cmd.arg(format!("--root={}", root.display()))
        .arg(format!("--log={}", root.join("var/log/dpkg.log").display()))
        .arg("--force-script-chrootless")
        // libc6, libgcc-s1 and passwd are the host's: the scratch root's
        // database does not list them.
        .arg("--force-depends")
        .args(args);
    cmd
}

/// The line of `name` in the root's passwd or group file, split.
fn entry(root: &Path, file: &str, name: &str) -> Option<Vec<String>> {
    std::fs::read_to_string(root.join("etc").join(file))
        .unwrap()
        .lines()
        .map(|l| l.split(':').map(String::from).collect::<Vec<_>>())
        .find(|f| f[0] == name)
}

#[test]
fn the_package_is_lintian_clean_and_installs_into_a_scratch_root() {
    require_tools();
    let dir = tempfile::tempdir().unwrap();
    let deb = build(&dir.path().join("out"));
    let version = text(&run(
        Command::new("dpkg-parsechangelog")
            .args(["-S", "Version", "-l"])
            .arg(format!("{REPO}/packaging/debian/changelog")),
        "dpkg-parsechangelog",
    ));
    let arch = text(&run(
        Command::new("dpkg").arg("--print-architecture"),
        "dpkg",
    ));
    assert_eq!(
        deb.file_name().unwrap().to_string_lossy(),
        format!("gpu-feeder_{}_{}.deb", version.trim(), arch.trim())
    );

    // lintian: no error, no warning; every override says why.
    let lint = Command::new("lintian")
        .args(["--fail-on", "error,warning", "--tag-display-limit", "0"])
        .arg(&deb)
        .output()
        .expect("lintian runs");
    let said = text(&lint);
    let bad: Vec<&str> = said
        .lines()
        .filter(|l| l.starts_with("E:") || l.starts_with("W:"))
        .collect();
    assert!(
        lint.status.success() && bad.is_empty(),
        "lintian ({}):\n{said}{}",
        lint.status,
        String::from_utf8_lossy(&lint.stderr)
    );
    let overrides = std::fs::read_to_string(format!("{REPO}/packaging/debian/lintian-overrides"))
        .unwrap_or_default();
    let mut reason = false;
    for line in overrides.lines() {
        if line.starts_with('#') {
            reason = true;
        } else if !line.trim().is_empty() {
            assert!(
                reason,
                "a lintian override without a reason above it: {line}"
            );
            reason = false;
        }
    }

    // Its contents, and feeder.toml as a conffile.
    let listing = text(&run(
        Command::new("dpkg-deb").arg("-c").arg(&deb),
        "dpkg-deb -c",
    ));
    for path in [
        "./usr/bin/gpu-feeder",
        "./lib/systemd/system/gpu-feeder.service",
        "./etc/gpu-feeder/feeder.toml",
        "./usr/share/doc/gpu-feeder/copyright",
        "./usr/share/doc/gpu-feeder/changelog.Debian.gz",
        "./usr/share/man/man1/gpu-feeder.1.gz",
    ] {
        assert!(
            listing.lines().any(|l| l.ends_with(&format!(" {path}"))),
            "the package lacks {path}:\n{listing}"
        );
    }
    assert!(
        listing
            .lines()
            .any(|l| l.starts_with("-rwxr-xr-x root/root") && l.ends_with(" ./usr/bin/gpu-feeder")),
        "the binary is not root-owned 0755:\n{listing}"
    );
    eprintln!("package contents:\n{listing}");
    let conffiles = text(&run(
        Command::new("dpkg-deb")
            .arg("-I")
            .arg(&deb)
            .arg("conffiles"),
        "dpkg-deb -I conffiles",
    ));
    assert_eq!(conffiles.trim(), "/etc/gpu-feeder/feeder.toml");

    // Installed for real.
    let root = dir.path().join("root");
    scratch_root(&root);
    run(
        dpkg(&root, &["--install"]).arg(&deb),
        "dpkg --install into the scratch root",
    );
    let status = text(&run(
        &mut dpkg(&root, &["--status", "gpu-feeder"]),
        "dpkg --status",
    ));
    assert!(status.contains("Status: install ok installed"), "{status}");
    assert!(
        status.contains(" /etc/gpu-feeder/feeder.toml "),
        "dpkg does not record feeder.toml as a conffile:\n{status}"
    );
    let installed = root.join("usr/bin/gpu-feeder");
    let sections = text(&run(
        Command::new("readelf").arg("-S").arg(&installed),
        "readelf -S",
    ));
    for section in [".symtab", ".debug_info"] {
        assert!(
            !sections.contains(section),
            "the installed binary is not stripped: it has {section}"
        );
    }
    let unit = std::fs::read_to_string(root.join("lib/systemd/system/gpu-feeder.service")).unwrap();
    assert!(
        unit.contains("\nExecStart=/usr/bin/gpu-feeder --config /etc/gpu-feeder/feeder.toml run\n"),
        "{unit}"
    );

    // postinst: the user, its group and the state directory.
    let user = entry(&root, "passwd", "gpu-feeder").expect("postinst created the gpu-feeder user");
    let group = entry(&root, "group", "gpu-feeder").expect("postinst created the gpu-feeder group");
    assert_eq!(user[3], group[2], "the user's primary group is gpu-feeder");
    assert_eq!(user[5], "/var/lib/gpu-feeder");
    assert_eq!(user[6], "/usr/sbin/nologin");
    let uid: u32 = user[2].parse().unwrap();
    let gid: u32 = group[2].parse().unwrap();
    assert!(uid < 1000, "a system user, uid {uid}");
    let docker = entry(&root, "group", "docker").unwrap();
    assert_eq!(
        docker[3], "alice,gpu-feeder",
        "postinst adds the user to the docker group, keeping its members"
    );
    assert!(
        !unit.contains("SupplementaryGroups=docker"),
        "the unit must start on a host without a docker group"
    );
    // The configuration may hold secrets: the daemon's group reads it, the
    // world does not.
    let conf = std::fs::metadata(root.join("etc/gpu-feeder/feeder.toml")).unwrap();
    assert_eq!(
        (conf.uid(), conf.gid(), conf.mode() & 0o7777),
        (0, gid, 0o640),
        "feeder.toml's owner, group and mode"
    );
    let state = root.join("var/lib/gpu-feeder");
    let meta = std::fs::metadata(&state).expect("postinst created /var/lib/gpu-feeder");
    assert!(meta.is_dir());
    assert_eq!(
        (meta.uid(), meta.gid(), meta.mode() & 0o7777),
        (uid, gid, 0o750),
        "/var/lib/gpu-feeder's owner, group and mode"
    );

    // The installed binary checks the installed configuration as the
    // daemon's user. The configuration's paths are absolute
    // (/var/lib/gpu-feeder/...): a private mount namespace shows the
    // scratch root's /var/lib in the host's place, so nothing outside the
    // scratch root is written.
    let check = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg(r#"mount --bind "$1/var/lib" /var/lib && exec setpriv --reuid "$2" --regid "$3" --clear-groups "$1/usr/bin/gpu-feeder" config check --config "$1/etc/gpu-feeder/feeder.toml""#)
        .arg("sh")
        .arg(&root)
        .arg(uid.to_string())
        .arg(gid.to_string())
        .env_remove("FEEDER_CONFIG")
        .output()
        .expect("unshare runs");
    let said = format!("{}{}", text(&check), String::from_utf8_lossy(&check.stderr));
    assert!(
        check.status.success() && said.starts_with("OK "),
        "config check of the installed configuration ({}):\n{said}",
        check.status
    );
    for sub in ["results", "stage"] {
        let m = std::fs::metadata(state.join(sub))
            .unwrap_or_else(|e| panic!("config check did not create {sub} as the user: {e}"));
        assert_eq!(m.uid(), uid, "{sub} belongs to the daemon's user");
    }

    // Purge: the package's files and the state go; the user stays.
    run(&mut dpkg(&root, &["--purge", "gpu-feeder"]), "dpkg --purge");
    assert!(!installed.exists(), "the binary is still there after purge");
    assert!(!root.join("etc/gpu-feeder/feeder.toml").exists());
    assert!(!state.exists(), "purge left /var/lib/gpu-feeder");
    assert!(entry(&root, "passwd", "gpu-feeder").is_some());
}
