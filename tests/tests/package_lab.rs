//! The Debian package `cargo xtask dist` builds, installed with dpkg on
//! this machine as an operator would: its files are where the README says,
//! `hvnet --version` runs from /usr/bin, `systemd-analyze verify` accepts the
//! unit, the config is a conffile, and removal takes it all away again.

use std::{path::PathBuf, process::Command};

use hvnet_lab::testkit::require_root;

fn output(cmd: &mut Command) -> anyhow::Result<(bool, String)> {
    let out = cmd.output()?;
    Ok((
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    ))
}

/// Removes the package however the test ends (it was not there before).
struct Installed;

impl Drop for Installed {
    fn drop(&mut self) {
        let _ = Command::new("dpkg").args(["--purge", "hvnet"]).output();
    }
}

#[test]
fn the_deb_installs_runs_and_its_unit_verifies() -> anyhow::Result<()> {
    require_root();
    let Some(deb) = std::env::var_os("HVNET_DEB").map(PathBuf::from) else {
        eprintln!(
            "skipped: HVNET_DEB is not set (`cargo xtask test` builds the package and sets it)"
        );
        return Ok(());
    };
    let (was_installed, _) = output(Command::new("dpkg").args(["-s", "hvnet"]))?;
    anyhow::ensure!(
        !was_installed,
        "a package named hvnet is already installed here: the test would replace it"
    );
    let (ok, text) = output(Command::new("dpkg-deb").arg("--info").arg(&deb))?;
    assert!(ok && text.contains("Package: hvnet"), "{text}");
    let (ok, text) = output(Command::new("dpkg").arg("-i").arg(&deb))?;
    let _installed = Installed;
    assert!(ok, "dpkg -i failed:\n{text}");

    for file in [
        "/usr/bin/hvnet",
        "/lib/systemd/system/hvnet.service",
        "/etc/hvnet/hvnet.toml",
        "/usr/share/doc/hvnet/examples/web-config.yml",
        "/usr/share/hvnet/grafana/hvnet-vm.json",
        "/usr/share/hvnet/grafana/hvnet-fleet.json",
        "/usr/share/hvnet/grafana/hvnet-incident.json",
        "/usr/share/hvnet/prometheus/alerts.yml",
    ] {
        assert!(
            std::path::Path::new(file).exists(),
            "{file} is not installed"
        );
    }
    let (ok, text) = output(Command::new("/usr/bin/hvnet").arg("--version"))?;
    assert!(
        ok && text.trim() == format!("hvnet {}", env!("CARGO_PKG_VERSION")),
        "{text}"
    );
    let (_, conffiles) =
        output(Command::new("dpkg-query").args(["-W", "-f=${Conffiles}", "hvnet"]))?;
    assert!(conffiles.contains("/etc/hvnet/hvnet.toml"), "{conffiles}");
    // The installed unit runs the installed binary, with its hardening.
    let unit = std::fs::read_to_string("/lib/systemd/system/hvnet.service")?;
    for line in [
        "ExecStart=/usr/bin/hvnet run --config /etc/hvnet/hvnet.toml",
        "LimitNOFILE=65536",
        "ProtectKernelTunables=yes",
        "SystemCallArchitectures=native",
        "RestrictNamespaces=yes",
    ] {
        assert!(unit.contains(line), "the unit lacks {line}");
    }
    assert!(
        !unit.lines().any(|l| l.starts_with("ProtectProc=")),
        "ProtectProc would hide the VMMs"
    );
    match output(
        Command::new("systemd-analyze").args(["verify", "/lib/systemd/system/hvnet.service"]),
    ) {
        Ok((ok, text)) => assert!(ok, "systemd-analyze verify:\n{text}"),
        Err(err) => eprintln!("systemd-analyze not available ({err}): unit not verified"),
    }
    // The installed example config parses as the agent reads it.
    let config = std::fs::read_to_string("/etc/hvnet/hvnet.toml")?;
    hvnet::config::FileConfig::parse(std::path::Path::new("/etc/hvnet/hvnet.toml"), &config)?;

    let (ok, text) = output(Command::new("dpkg").args(["--purge", "hvnet"]))?;
    assert!(ok, "dpkg --purge failed:\n{text}");
    assert!(!std::path::Path::new("/usr/bin/hvnet").exists());
    assert!(!std::path::Path::new("/lib/systemd/system/hvnet.service").exists());
    Ok(())
}
