//! `cargo xtask dist`: a release tarball and a Debian package (built with
//! dpkg-deb from a staged tree: the binary, the systemd unit, the example
//! configs, the dashboards and rules under /usr/share), and a static musl
//! binary where the musl target is installed.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::Context as _;

use crate::run;

const MUSL_TARGET: &str = "x86_64-unknown-linux-musl";

/// What `dist` produced.
pub struct Artifacts {
    pub deb: PathBuf,
    pub tarball: PathBuf,
    pub musl: Option<PathBuf>,
}

pub fn build(root: &Path, version: &str) -> anyhow::Result<Artifacts> {
    let out = root.join("target/dist");
    std::fs::create_dir_all(&out)?;
    let binary = root.join("target/release/hvnet");
    anyhow::ensure!(
        binary.exists(),
        "{} is missing: build first",
        binary.display()
    );

    let stage = out.join(format!("hvnet_{version}_amd64"));
    let _ = std::fs::remove_dir_all(&stage);
    stage_tree(root, &stage, &binary)?;
    write_debian_control(&stage, version)?;
    let deb = out.join(format!("hvnet_{version}_amd64.deb"));
    run(Command::new("dpkg-deb")
        .args(["--root-owner-group", "-Zxz", "--build"])
        .arg(&stage)
        .arg(&deb))
    .context("dpkg-deb (Debian package dpkg)")?;

    let tarball = out.join(format!("hvnet-{version}-x86_64-linux-gnu.tar.gz"));
    run(Command::new("tar")
        .arg("-czf")
        .arg(&tarball)
        .arg("--owner=0")
        .arg("--group=0")
        .arg("--exclude=DEBIAN")
        .arg("-C")
        .arg(&stage)
        .args(["usr", "etc", "lib"]))?;

    let musl = static_musl(root)?;
    Ok(Artifacts { deb, tarball, musl })
}

fn copy(from: &Path, to: &Path, mode: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    if let Some(parent) = to.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::copy(from, to).with_context(|| format!("copying {}", from.display()))?;
    std::fs::set_permissions(to, std::fs::Permissions::from_mode(mode))?;
    Ok(())
}

fn stage_tree(root: &Path, stage: &Path, binary: &Path) -> anyhow::Result<()> {
    let deploy = root.join("tracer/deploy");
    copy(binary, &stage.join("usr/bin/hvnet"), 0o755)?;
    // The unit as shipped points at /usr/local/bin (a manual install); the
    // package installs to /usr/bin.
    let unit = std::fs::read_to_string(deploy.join("hvnet.service"))?
        .replace("/usr/local/bin/hvnet", "/usr/bin/hvnet");
    let unit_path = stage.join("lib/systemd/system/hvnet.service");
    std::fs::create_dir_all(unit_path.parent().context("unit path")?)?;
    std::fs::write(&unit_path, unit)?;
    copy(
        &deploy.join("hvnet.toml"),
        &stage.join("etc/hvnet/hvnet.toml"),
        0o644,
    )?;
    let examples = stage.join("usr/share/doc/hvnet/examples");
    for name in [
        "web-config.yml",
        "hvnet-daemonset.yaml",
        "hvnet-podmonitor.yaml",
    ] {
        copy(&deploy.join(name), &examples.join(name), 0o644)?;
    }
    copy(
        &root.join("README.md"),
        &stage.join("usr/share/doc/hvnet/README.md"),
        0o644,
    )?;
    let share = stage.join("usr/share/hvnet");
    for entry in std::fs::read_dir(root.join("dashboards"))? {
        let path = entry?.path();
        let Some(name) = path.file_name() else {
            continue;
        };
        let target = match path.extension().and_then(|e| e.to_str()) {
            Some("json") => share.join("grafana").join(name),
            Some("yml") => share.join("prometheus").join(name),
            _ => continue,
        };
        copy(&path, &target, 0o644)?;
    }
    Ok(())
}

fn write_debian_control(stage: &Path, version: &str) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    let debian = stage.join("DEBIAN");
    std::fs::create_dir_all(&debian)?;
    let installed_kib = du_kib(stage)?;
    std::fs::write(
        debian.join("control"),
        format!(
            "Package: hvnet\n\
             Version: {version}\n\
             Architecture: amd64\n\
             Maintainer: hvnet developers <hvnet@users.noreply.github.com>\n\
             Depends: libc6 (>= 2.34)\n\
             Section: net\n\
             Priority: optional\n\
             Installed-Size: {installed_kib}\n\
             Homepage: https://github.com/hvnet/hvnet\n\
             Description: per-VM packet counters and RX-stall detection for KVM taps (eBPF)\n \
             hvnet attaches eBPF programs to a compute node's VM taps, notices when\n \
             a VM stops draining its receive queue, ties that to the VM's DHCP\n \
             retries, and exports Prometheus metrics; dashboards and alert rules\n \
             are under /usr/share/hvnet.\n"
        ),
    )?;
    // The operator edits hvnet.toml (listen address, web config): keep it.
    std::fs::write(debian.join("conffiles"), "/etc/hvnet/hvnet.toml\n")?;
    // Not enabled on install: the operator sets the listen address and the
    // web config first (README, "Install").
    let scripts = [
        (
            "postinst",
            "#!/bin/sh\nset -e\nif [ -d /run/systemd/system ]; then systemctl daemon-reload || true; fi\n",
        ),
        (
            "prerm",
            "#!/bin/sh\nset -e\nif [ -d /run/systemd/system ] && [ \"$1\" = remove ]; then systemctl stop hvnet.service || true; fi\n",
        ),
        (
            "postrm",
            "#!/bin/sh\nset -e\nif [ -d /run/systemd/system ]; then systemctl daemon-reload || true; fi\n",
        ),
    ];
    for (name, text) in scripts {
        let path = debian.join(name);
        std::fs::write(&path, text)?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))?;
    }
    Ok(())
}

fn du_kib(dir: &Path) -> anyhow::Result<u64> {
    let mut total = 0;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let meta = entry.metadata()?;
        total += if meta.is_dir() {
            du_kib(&entry.path())? * 1024
        } else {
            meta.len()
        };
    }
    Ok(total.div_ceil(1024))
}

/// A static binary, where the musl target is installed (rustup cannot
/// fetch it on a machine without access to static.rust-lang.org).
fn static_musl(root: &Path) -> anyhow::Result<Option<PathBuf>> {
    let installed = Command::new("rustup")
        .args(["target", "list", "--installed"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains(MUSL_TARGET))
        .unwrap_or(false);
    if !installed {
        eprintln!(
            "dist: no static musl binary: the Rust target {MUSL_TARGET} is not installed (`rustup target add {MUSL_TARGET}` where rustup can download; then `cargo xtask dist` builds it)"
        );
        return Ok(None);
    }
    run(crate::cargo(root).args([
        "build",
        "--release",
        "-p",
        "tracer",
        "--bin",
        "hvnet",
        "--target",
        MUSL_TARGET,
    ]))?;
    Ok(Some(
        root.join(format!("target/{MUSL_TARGET}/release/hvnet")),
    ))
}
