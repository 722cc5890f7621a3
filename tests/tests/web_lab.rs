//! The agent's endpoint as an operator secures it and as the Internet
//! treats it: the exporter-toolkit web config (client certificates, basic
//! auth, headers, reload on change / SIGHUP, a broken file keeps the old
//! one), JSON API errors, the event-stream cap, the landing page in a real
//! browser, and malformed HTTP that must never starve an authenticated
//! scrape.

use std::{
    io::Write as _,
    net::{SocketAddr, TcpStream},
    path::PathBuf,
    process::Stdio,
    time::{Duration, Instant},
};

use hvnet_lab::{
    agent::Agent,
    http::{raw_here, status_of},
    metrics,
    netns::NetNs,
    node::ComputeNode,
    pki::{htpasswd_hash, write_web_config, Curl, Pki},
    testkit::{poll_until, require_root, Background},
    unique_prefix,
    vmm::VmmMode,
};

const ADDR: &str = "127.0.0.1:9478";

fn fake_vmm() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_fake-vmm"))
}

fn log_count(agent: &Agent, needle: &str) -> usize {
    agent.log_text().matches(needle).count()
}

#[test]
fn a_secured_agent_checks_certificates_and_passwords_and_reloads_its_web_config(
) -> anyhow::Result<()> {
    require_root();
    let node = ComputeNode::create(&unique_prefix("w"))?;
    let pki = Pki::create(&node.dir.join("pki"))?;
    let server = pki.issue("agent", &["IP:127.0.0.1", "DNS:localhost"], false)?;
    let client = pki.issue("prometheus", &["DNS:prometheus"], true)?;
    let web = node.dir.join("web.yml");
    write_web_config(
        &web,
        &server,
        Some(&pki.ca_cert),
        &[("prom", &htpasswd_hash("prom", "first")?)],
    )?;
    let full = Curl {
        ca: Some(pki.ca_cert.clone()),
        user: Some(("prom".into(), "first".into())),
        client: Some((client.cert.clone(), client.key.clone())),
    };
    let url = |path: &str| format!("https://{ADDR}{path}");
    let addr: SocketAddr = ADDR.parse()?;
    let agent = Agent::start_checked(
        &node.ns,
        addr,
        &[
            "--interfaces",
            "tapw*",
            "--web.config.file",
            &web.display().to_string(),
        ],
        &node.dir.join("hvnet.log"),
        || {
            full.get(&node.ns, &url("/healthz"))
                .is_ok_and(|r| r.status == 200)
        },
    )?;

    // RequireAndVerifyClientCert: no certificate, no HTTP at all.
    let no_cert = Curl {
        client: None,
        ..full.clone()
    };
    assert_eq!(no_cert.get(&node.ns, &url("/metrics"))?.status, 0);
    // A certificate from another CA is refused too.
    let rogue_pki = Pki::create(&node.dir.join("rogue"))?;
    let rogue = rogue_pki.issue("rogue", &["DNS:rogue"], true)?;
    let rogue_curl = Curl {
        client: Some((rogue.cert, rogue.key)),
        ..full.clone()
    };
    assert_eq!(rogue_curl.get(&node.ns, &url("/metrics"))?.status, 0);
    // Certificate but no or wrong password: 401, JSON on the API.
    let anonymous = Curl {
        user: None,
        ..full.clone()
    };
    let reply = anonymous.get(&node.ns, &url("/api/v1/vms"))?;
    assert_eq!(reply.status, 401);
    assert!(
        reply
            .headers
            .to_lowercase()
            .contains("www-authenticate: basic"),
        "{}",
        reply.headers
    );
    let error: hvnet::api::ApiError = serde_json::from_str(&reply.body)?;
    assert_eq!(error.status, 401);
    let wrong = Curl {
        user: Some(("prom".into(), "guess".into())),
        ..full.clone()
    };
    assert_eq!(wrong.get(&node.ns, &url("/metrics"))?.status, 401);
    // All of it: the page, with the configured header.
    let reply = full.get(&node.ns, &url("/metrics"))?;
    assert_eq!(reply.status, 200);
    assert!(reply.body.contains("hvnet_build_info"));
    assert!(
        reply
            .headers
            .to_lowercase()
            .contains("x-content-type-options: nosniff"),
        "{}",
        reply.headers
    );
    // API errors are JSON; a name with a space is one escaped segment.
    let reply = full.get(&node.ns, &url("/api/v1/vms/web%201/explain"))?;
    assert_eq!(reply.status, 404);
    let error: hvnet::api::ApiError = serde_json::from_str(&reply.body)?;
    assert!(error.error.contains("\"web 1\""), "{}", error.error);
    let reply = full.get(&node.ns, &url("/api/v1/nothing"))?;
    assert_eq!(reply.status, 404);
    serde_json::from_str::<hvnet::api::ApiError>(&reply.body)?;

    // Reload on change: a new user, no client certificate required.
    write_web_config(
        &web,
        &server,
        None,
        &[("second", &htpasswd_hash("second", "two")?)],
    )?;
    let second = Curl {
        ca: Some(pki.ca_cert.clone()),
        user: Some(("second".into(), "two".into())),
        client: None,
    };
    let took = poll_until(
        "the changed web config",
        Duration::from_secs(10),
        Duration::from_millis(200),
        || Ok(second.get(&node.ns, &url("/metrics"))?.status == 200),
    )?;
    eprintln!("web config change picked up after {took:?}");
    assert_eq!(
        full.get(&node.ns, &url("/metrics"))?.status,
        401,
        "the old user is gone"
    );

    // A broken file keeps what works, and says why.
    std::fs::write(&web, "basic_auth_users: [\n")?;
    poll_until(
        "the broken file to be noticed",
        Duration::from_secs(10),
        Duration::from_millis(200),
        || {
            Ok(agent
                .log_text()
                .contains("keeping the previous web configuration"))
        },
    )?;
    assert_eq!(second.get(&node.ns, &url("/metrics"))?.status, 200);

    // SIGHUP re-reads at once, changed or not.
    write_web_config(
        &web,
        &server,
        None,
        &[("second", &htpasswd_hash("second", "two")?)],
    )?;
    poll_until(
        "the repaired file",
        Duration::from_secs(10),
        Duration::from_millis(200),
        || Ok(log_count(&agent, "reloaded") >= 2),
    )?;
    let before = log_count(&agent, "reloaded");
    agent.signal(libc::SIGHUP);
    poll_until(
        "the SIGHUP reload",
        Duration::from_secs(5),
        Duration::from_millis(100),
        || Ok(log_count(&agent, "reloaded") > before),
    )?;
    assert_eq!(
        second.get(&node.ns, &url("/healthz"))?.status,
        200,
        "alive after SIGHUP"
    );

    // The event streams are capped: beyond the cap, 503 with a JSON body.
    // Open the cap's worth of streams and wait until each has its 200, so
    // the probe below is really the one beyond the cap.
    let mut streams = Background(Vec::new());
    let mut header_files = Vec::new();
    for n in 0..hvnet::serve::MAX_EVENT_STREAMS {
        let headers = node.dir.join(format!("stream-{n}.headers"));
        streams.0.push(
            node.ns
                .command("curl")
                .args([
                    "-sN",
                    "--cacert",
                    &pki.ca_cert.display().to_string(),
                    "-u",
                    "second:two",
                    "-D",
                    &headers.display().to_string(),
                ])
                .arg(url("/api/v1/events"))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()?,
        );
        header_files.push(headers);
    }
    poll_until(
        "every stream open",
        Duration::from_secs(20),
        Duration::from_millis(100),
        || {
            Ok(header_files
                .iter()
                .all(|f| std::fs::read_to_string(f).is_ok_and(|h| h.starts_with("HTTP/1.1 200"))))
        },
    )?;
    let quick = |curl: &Curl| -> anyhow::Result<u16> {
        let out = node
            .ns
            .command("curl")
            .args([
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "--max-time",
                "2",
            ])
            .args(["--cacert", &pki.ca_cert.display().to_string()])
            .args([
                "-u",
                &curl
                    .user
                    .as_ref()
                    .map(|(u, p)| format!("{u}:{p}"))
                    .unwrap_or_default(),
            ])
            .arg(url("/api/v1/events"))
            .output()?;
        Ok(String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .unwrap_or(0))
    };
    poll_until(
        "a 503 beyond the stream cap",
        Duration::from_secs(30),
        Duration::from_millis(100),
        || Ok(quick(&second)? == 503),
    )?;
    drop(streams);
    poll_until(
        "a stream slot freed",
        Duration::from_secs(10),
        Duration::from_millis(100),
        || Ok(quick(&second)? == 200),
    )?;

    // exporter-toolkit's rate_limit: one token bucket for the endpoint.
    write_web_config(
        &web,
        &server,
        None,
        &[("second", &htpasswd_hash("second", "two")?)],
    )?;
    let mut text = std::fs::read_to_string(&web)?;
    text.push_str("rate_limit:\n  interval: 1m\n  burst: 3\n");
    std::fs::write(&web, text)?;
    poll_until(
        "429 once the burst is spent",
        Duration::from_secs(10),
        Duration::from_millis(100),
        || {
            let reply = second.get(&node.ns, &url("/api/v1/vms"))?;
            if reply.status == 429 {
                let error: hvnet::api::ApiError = serde_json::from_str(&reply.body)?;
                assert_eq!(error.status, 429);
            }
            Ok(reply.status == 429)
        },
    )?;
    assert!(
        !agent.log_text().contains("panicked"),
        "{}",
        agent.log_text()
    );
    Ok(())
}

/// Counts pixels of one colour in a PNG (RGB or RGBA).
fn pixels_of(png_path: &std::path::Path, rgb: [u8; 3]) -> anyhow::Result<usize> {
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(png_path)?));
    let mut reader = decoder.read_info()?;
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf)?;
    let channels = info.color_type.samples();
    anyhow::ensure!(
        info.bit_depth == png::BitDepth::Eight && channels >= 3,
        "unexpected PNG {info:?}"
    );
    Ok(buf[..info.buffer_size()]
        .chunks(channels)
        .filter(|p| p[..3] == rgb)
        .count())
}

fn chromium(
    ns: &NetNs,
    profile: &std::path::Path,
    args: &[&str],
) -> anyhow::Result<std::process::Output> {
    Ok(ns
        .command("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
            "--window-size=1400,500",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .output()?)
}

#[test]
fn the_landing_page_shows_the_labs_vms_in_a_browser() -> anyhow::Result<()> {
    require_root();
    let mut node = ComputeNode::create(&unique_prefix("p"))?;
    node.start_dhcp_server("2m")?;
    let calm = node.add_vm("tapp0", 0, &fake_vmm())?;
    let stuck = node.add_vm("tapp1", 1, &fake_vmm())?;
    let agent = Agent::start(
        &node.ns,
        9478,
        &["--interfaces", "tapp*"],
        &node.dir.join("hvnet.log"),
    )?;
    calm.dhcp(&node.udhcpc_script())?;
    let stuck_ip = stuck.dhcp(&node.udhcpc_script())?;
    stuck.set_mode(VmmMode::RxStall)?;
    // The stuck guest keeps sending (as the incident's VMs did); a guest
    // silent both ways would be a paused VM, not an RX stall.
    let _load = Background(vec![
        hvnet_lab::testkit::udp_load(
            &node.ns,
            env!("CARGO_BIN_EXE_hvnet-lab"),
            &stuck_ip,
            100,
            120,
        )?,
        stuck.keep_pinging(hvnet_lab::BRIDGE_ADDR)?,
    ]);
    hvnet_lab::expect::eventually(
        &agent,
        &node.ns,
        Duration::from_secs(10),
        "tapp1 rx_stalled",
        |s| metrics::value(s, "hvnet_vm_rx_stalled", &[("iface", "tapp1")]) == Some(1.0),
    )?;

    let profile = node.dir.join("chromium-profile");
    let page = format!("http://{ADDR}/");
    let dom = chromium(&node.ns, &profile, &["--dump-dom", &page])?;
    let dom = String::from_utf8_lossy(&dom.stdout).into_owned();
    assert!(dom.contains("<h1>hvnet on"), "{dom}");
    for (tap, state) in [("tapp0", "state-"), ("tapp1", "state-rx_stalled")] {
        let row = dom
            .lines()
            .find(|l| l.contains(&format!(">{tap}</a>")))
            .unwrap_or_else(|| panic!("no row for {tap} in the browser's DOM:\n{dom}"));
        assert!(row.contains(state), "{row}");
        assert!(row.contains(&format!("/api/v1/vms/{tap}/explain")), "{row}");
    }
    let shot = node.dir.join("landing.png");
    let out = chromium(
        &node.ns,
        &profile,
        &[&format!("--screenshot={}", shot.display()), &page],
    )?;
    anyhow::ensure!(
        shot.exists(),
        "no screenshot: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The table header (#dde) and the stalled VM's row (#f8c8c8) are drawn.
    let header = pixels_of(&shot, [0xdd, 0xdd, 0xee])?;
    let stalled_row = pixels_of(&shot, [0xf8, 0xc8, 0xc8])?;
    eprintln!(
        "screenshot {}: {header} header pixels, {stalled_row} stalled-row pixels",
        shot.display()
    );
    assert!(
        header > 2_000,
        "the VM table header is not on screen ({header} pixels)"
    );
    assert!(
        stalled_row > 2_000,
        "the stalled VM's row is not on screen ({stalled_row} pixels)"
    );
    // The explain link answers in a browser too.
    let explain = chromium(
        &node.ns,
        &profile,
        &[
            "--dump-dom",
            &format!("http://{ADDR}/api/v1/vms/tapp1/explain"),
        ],
    )?;
    assert!(String::from_utf8_lossy(&explain.stdout).contains("rx_stalled since"));
    Ok(())
}

/// One authenticated scrape over HTTP/1.1 from inside the namespace; its duration.
fn timed_scrape(ns: &NetNs, auth: &str) -> anyhow::Result<Duration> {
    let request = format!(
        "GET /metrics HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\nConnection: close\r\n\r\n"
    );
    ns.enter(move || {
        let started = Instant::now();
        let reply = raw_here(ADDR.parse()?, request.as_bytes(), Duration::from_secs(5))?;
        anyhow::ensure!(
            status_of(&reply) == Some(200),
            "scrape: {}",
            String::from_utf8_lossy(&reply)
        );
        Ok(started.elapsed())
    })
}

#[test]
fn malformed_http_never_starves_an_authenticated_scrape() -> anyhow::Result<()> {
    require_root();
    let node = ComputeNode::create(&unique_prefix("z"))?;
    let web = node.dir.join("web.yml");
    std::fs::write(
        &web,
        format!(
            "basic_auth_users:\n  prom: {}\n",
            htpasswd_hash("prom", "s3cret")?
        ),
    )?;
    let agent = Agent::start_checked(
        &node.ns,
        ADDR.parse()?,
        &[
            "--interfaces",
            "tapz*",
            "--web.config.file",
            &web.display().to_string(),
        ],
        &node.dir.join("hvnet.log"),
        || {
            node.ns
                .enter(|| {
                    raw_here(
                        ADDR.parse()?,
                        b"GET /healthz HTTP/1.0\r\n\r\n",
                        Duration::from_secs(2),
                    )
                })
                .is_ok_and(|r| status_of(&r) == Some(401))
        },
    )?;
    let pid = agent.pid().ok_or_else(|| anyhow::anyhow!("no pid"))?;
    let auth = "Basic cHJvbTpzM2NyZXQ="; // prom:s3cret
    let mut baseline: Vec<Duration> = (0..20)
        .map(|_| timed_scrape(&node.ns, auth))
        .collect::<Result<_, _>>()?;
    baseline.sort();
    let rss_before = hvnet_lab::testkit::rss_kib(pid)?;

    // Hundreds of idle connections (no request ever sent).
    let idle: Vec<TcpStream> = node.ns.enter(|| {
        (0..300)
            .map(|_| Ok(TcpStream::connect(ADDR)?))
            .collect::<anyhow::Result<Vec<_>>>()
    })?;
    // A slow client: the request head dribbles in, one byte a second.
    let slow = node.ns.enter(|| {
        let mut s = TcpStream::connect(ADDR)?;
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")?;
        Ok(s)
    })?;
    let slow_started = Instant::now();
    let slow_thread = std::thread::spawn(move || {
        let mut slow = slow;
        let mut sent = 0;
        while slow.write_all(b"X").is_ok() && sent < 40 {
            sent += 1;
            std::thread::sleep(Duration::from_secs(1));
        }
        slow_started.elapsed()
    });

    let big_header = format!(
        "GET /metrics HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(100_000)
    );
    let cases: Vec<(&str, Vec<u8>, &[u16])> = vec![
        ("huge header", big_header.into_bytes(), &[431, 400]),
        ("bad method", b"FROB /metrics HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(), &[405, 400, 401]),
        ("DELETE", format!("DELETE /metrics HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\n\r\n").into_bytes(), &[405]),
        ("POST body", format!("POST /api/v1/vms HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\nContent-Length: 10000000\r\n\r\nxxxx").into_bytes(), &[413, 405]),
        ("traversal", format!("GET /../../etc/passwd HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\n\r\n").into_bytes(), &[404, 400]),
        ("encoded traversal", format!("GET /api/v1/vms/..%2F..%2Fetc%2Fpasswd/explain HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\n\r\n").into_bytes(), &[404, 400]),
        ("bad escape", format!("GET /api/v1/vms/%zz%/explain HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\n\r\n").into_bytes(), &[404, 400]),
        ("bad version", b"GET / HTTP/9.9\r\n\r\n".to_vec(), &[505, 400]),
        ("NUL in path", b"GET /\0metrics HTTP/1.1\r\n\r\n".to_vec(), &[400]),
        ("garbage", (0..4096u32).map(|i| (i * 7919 % 251) as u8).collect(), &[400]),
        ("HTTP/2 preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec(), &[400, 505, 405]),
        ("bad auth header", b"GET /metrics HTTP/1.1\r\nAuthorization: Basic %%%\r\n\r\n".to_vec(), &[401]),
        ("header without colon", b"GET /metrics HTTP/1.1\r\nHost x\r\n\r\n".to_vec(), &[400]),
    ];
    let mut worst = Duration::ZERO;
    for (what, request, expected) in cases {
        let reply = node
            .ns
            .enter(move || raw_here(ADDR.parse()?, &request, Duration::from_secs(3)))?;
        let status = status_of(&reply);
        // No answer at all (connection closed) is also a refusal.
        assert!(
            status.is_none_or(|s| expected.contains(&s)),
            "{what}: got {status:?}, expected one of {expected:?}:\n{}",
            String::from_utf8_lossy(&reply[..reply.len().min(300)])
        );
        assert!(
            !String::from_utf8_lossy(&reply).contains("root:"),
            "{what} leaked a file"
        );
        worst = worst.max(timed_scrape(&node.ns, auth)?);
    }
    // Password guessing: each new guess costs a bcrypt check, a few at a time.
    let guesses: Vec<_> = (0..40)
        .map(|i| {
            let request = format!(
                "GET /metrics HTTP/1.1\r\nHost: x\r\nAuthorization: Basic {}\r\n\r\n",
                base64_of(&format!("prom:guess{i}"))
            );
            let path = agent.ns_path().to_owned();
            std::thread::spawn(move || -> anyhow::Result<Option<u16>> {
                hvnet_lab::netns::enter_netns(&path)?;
                Ok(status_of(&raw_here(
                    ADDR.parse()?,
                    request.as_bytes(),
                    Duration::from_secs(30),
                )?))
            })
        })
        .collect();
    for _ in 0..10 {
        worst = worst.max(timed_scrape(&node.ns, auth)?);
    }
    for guess in guesses {
        let status = guess
            .join()
            .map_err(|_| anyhow::anyhow!("guess thread panicked"))??;
        assert_eq!(status, Some(401));
    }
    let slow_lasted = slow_thread
        .join()
        .map_err(|_| anyhow::anyhow!("slow thread panicked"))?;
    eprintln!(
        "scrape baseline median {:?} max {:?}; worst under abuse {worst:?}; slow client cut after {slow_lasted:?}",
        baseline[baseline.len() / 2],
        baseline[baseline.len() - 1]
    );
    assert!(
        worst < Duration::from_secs(1),
        "an authenticated scrape took {worst:?} under abuse"
    );
    assert!(
        slow_lasted < Duration::from_secs(20),
        "a slow client held its connection {slow_lasted:?}"
    );
    drop(idle);
    let rss_after = hvnet_lab::testkit::rss_kib(pid)?;
    eprintln!("agent RSS {rss_before} KiB before, {rss_after} KiB after");
    assert!(
        rss_after < rss_before + 32 * 1024,
        "RSS grew from {rss_before} to {rss_after} KiB"
    );
    let log = agent.log_text();
    assert!(!log.contains("panicked"), "{log}");
    timed_scrape(&node.ns, auth)?;
    Ok(())
}

fn base64_of(text: &str) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let bytes = text.as_bytes();
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}
