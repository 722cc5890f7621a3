//! Certificates, web configs and an HTTPS client for the lab's secured
//! agents: a CA, server and client certificates made with openssl, bcrypt
//! hashes, the exporter-toolkit web config file, and curl run inside a
//! namespace.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _};

use crate::netns::{run, NetNs};

/// A throw-away certificate authority in `dir`.
pub struct Pki {
    pub dir: PathBuf,
    pub ca_cert: PathBuf,
    ca_key: PathBuf,
}

/// A certificate and its key.
pub struct Issued {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl Pki {
    pub fn create(dir: &Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let ca_cert = dir.join("ca.crt");
        let ca_key = dir.join("ca.key");
        run(Command::new("openssl")
            .args([
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
            ])
            .arg("-keyout")
            .arg(&ca_key)
            .arg("-out")
            .arg(&ca_cert)
            .args(["-days", "2", "-subj", "/CN=hvnet lab CA"]))
        .context("openssl (Debian package openssl)")?;
        Ok(Self {
            dir: dir.to_owned(),
            ca_cert,
            ca_key,
        })
    }

    /// A certificate for `name` with subject alternative names `sans`
    /// (e.g. "IP:10.250.201.2", "DNS:node1"), for servers or clients.
    pub fn issue(&self, name: &str, sans: &[&str], client: bool) -> anyhow::Result<Issued> {
        let key = self.dir.join(format!("{name}.key"));
        let csr = self.dir.join(format!("{name}.csr"));
        let cert = self.dir.join(format!("{name}.crt"));
        let ext = self.dir.join(format!("{name}.ext"));
        run(Command::new("openssl")
            .args([
                "req",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
            ])
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&csr)
            .args(["-subj", &format!("/CN={name}")]))?;
        std::fs::write(
            &ext,
            format!(
                "subjectAltName={}\nextendedKeyUsage={}\n",
                sans.join(","),
                if client { "clientAuth" } else { "serverAuth" }
            ),
        )?;
        run(Command::new("openssl")
            .args(["x509", "-req", "-days", "2", "-CAcreateserial"])
            .arg("-in")
            .arg(&csr)
            .arg("-CA")
            .arg(&self.ca_cert)
            .arg("-CAkey")
            .arg(&self.ca_key)
            .arg("-out")
            .arg(&cert)
            .arg("-extfile")
            .arg(&ext))?;
        Ok(Issued { cert, key })
    }
}

/// A bcrypt hash as `htpasswd -nbBC 10` makes it (exporter-toolkit's
/// documented way).
pub fn htpasswd_hash(user: &str, password: &str) -> anyhow::Result<String> {
    let out = run(Command::new("htpasswd").args(["-nbBC", "10", user, password]))
        .context("htpasswd (Debian package apache2-utils)")?;
    out.trim()
        .split_once(':')
        .map(|(_, hash)| hash.to_owned())
        .context("htpasswd printed no hash")
}

/// An exporter-toolkit web config, written as an operator would.
pub fn write_web_config(
    path: &Path,
    server: &Issued,
    client_ca: Option<&Path>,
    users: &[(&str, &str)],
) -> anyhow::Result<()> {
    let mut text = format!(
        "tls_server_config:\n  cert_file: {}\n  key_file: {}\n",
        server.cert.display(),
        server.key.display()
    );
    if let Some(ca) = client_ca {
        text.push_str(&format!(
            "  client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: {}\n",
            ca.display()
        ));
    }
    text.push_str("http_server_config:\n  headers:\n    X-Content-Type-Options: nosniff\n");
    if !users.is_empty() {
        text.push_str("basic_auth_users:\n");
        for (user, hash) in users {
            text.push_str(&format!("  {user}: {hash}\n"));
        }
    }
    std::fs::write(path, text)?;
    Ok(())
}

/// curl inside a namespace, with whatever credentials a test gives.
#[derive(Debug, Clone, Default)]
pub struct Curl {
    pub ca: Option<PathBuf>,
    pub user: Option<(String, String)>,
    pub client: Option<(PathBuf, PathBuf)>,
}

/// What curl saw: status 0 means no HTTP answer (TLS refused, closed).
#[derive(Debug)]
pub struct CurlReply {
    pub status: u16,
    pub headers: String,
    pub body: String,
}

impl Curl {
    pub fn get(&self, ns: &NetNs, url: &str) -> anyhow::Result<CurlReply> {
        let mut cmd = ns.command("curl");
        cmd.args(["-sS", "--max-time", "10", "-D", "-", "-w", "\n%{http_code}"]);
        if let Some(ca) = &self.ca {
            cmd.arg("--cacert").arg(ca);
        }
        if let Some((user, password)) = &self.user {
            cmd.args(["-u", &format!("{user}:{password}")]);
        }
        if let Some((cert, key)) = &self.client {
            cmd.arg("--cert").arg(cert).arg("--key").arg(key);
        }
        let out = cmd.arg(url).output().context("curl")?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (rest, code) = text.rsplit_once('\n').unwrap_or(("", text.as_str()));
        let status: u16 = code.trim().parse().unwrap_or(0);
        let (headers, body) = rest.split_once("\r\n\r\n").unwrap_or(("", rest));
        if status == 0 && out.status.success() {
            bail!("curl printed no status for {url}");
        }
        Ok(CurlReply {
            status,
            headers: headers.to_owned(),
            body: body.to_owned(),
        })
    }
}
