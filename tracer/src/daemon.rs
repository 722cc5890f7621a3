//! `hvnet run`: wires config, loader, links, the agent's state and the
//! web server, then polls until SIGTERM/SIGINT and detaches.
//!
//! Start-up order matters for "bad input loses nothing": everything that
//! can fail without touching the kernel (config, capabilities, the listen
//! port, BTF) is checked before a single program is attached.

use std::{sync::atomic::Ordering, sync::Arc, time::Duration};

use anyhow::Context as _;
use tokio::{net::TcpListener, signal::unix::SignalKind, sync::watch};

use crate::{
    agent::AgentState,
    config::Config,
    interfaces::links::{self, LinkInfo, LinkWatcher},
    kernel::events::EventReader,
    kernel::loader::TcProbes,
    kernel::privileges,
    serve::{self, ActiveWebConfig, WebState},
};

/// Link events come in bursts (create, set master, set up): wait this long
/// after the first one and handle the burst once.
const EVENT_SETTLE: Duration = Duration::from_millis(20);

/// How many links match the interface globs now (attach_mode auto picks
/// the mechanism by it); 0 if the links cannot be listed (the agent's own
/// dump reports that error soon after).
fn taps_at_start(interfaces: &crate::interfaces::ifmatch::InterfaceMatcher) -> usize {
    match crate::interfaces::link_dump::dump() {
        Ok(links) => links
            .iter()
            .filter(|link| interfaces.matches(&link.name))
            .count(),
        Err(err) => {
            log::warn!("listing links to count the taps at start: {err}");
            0
        }
    }
}

pub async fn run(config: Config) -> anyhow::Result<()> {
    // A broken web config must stop the start before anything is attached.
    let web_config = ActiveWebConfig::load(config.web_config_file.as_deref())?;
    privileges::check()?;
    match crate::kernel::fd_limit::raise_to_hard_limit() {
        Ok((before, after)) if after > before => {
            log::info!("open-file limit raised from {before} to {after}")
        }
        Ok(_) => {}
        Err(err) => log::warn!("cannot raise the open-file limit: {err}"),
    }
    let listener = TcpListener::bind(config.listen).await.with_context(|| {
        format!(
            "cannot listen on {}: is another hvnet or exporter using it? choose another with --listen",
            config.listen
        )
    })?;
    let (mut probes, maps, events) = TcProbes::load(
        &config.btf,
        config.attach_mode,
        config.max_interfaces,
        taps_at_start(&config.interfaces),
    )?;
    match probes.take_logger() {
        Some(logger) => {
            tokio::spawn(crate::kernel::ebpf_log::forward(logger));
        }
        None => log::debug!("the eBPF object has no aya-log map: its programs do not log"),
    }
    let state = Arc::new(AgentState::new(probes, maps, &config));
    let mut reader = EventReader::new(events)?;
    let events_task = {
        let state = state.clone();
        tokio::spawn(async move {
            loop {
                match reader.next_batch().await {
                    Ok(batch) => state.handle_events(&batch),
                    Err(err) => {
                        log::error!("{err}; DHCP events stop, counters and stall detection go on");
                        return;
                    }
                }
            }
        })
    };

    if serve::exposed_without_protection(&config.listen, &web_config) {
        log::warn!(
            "serving {} on non-loopback {} with {}: anyone who reaches it reads VM names, UUIDs, MACs and lease addresses; set --web.config.file with tls_server_config and basic_auth_users",
            "/metrics and /api/v1",
            config.listen,
            web_config.describe()
        );
    }
    let scheme = if web_config.tls.is_some() {
        "https"
    } else {
        "http"
    };
    log::info!(
        "serving {scheme}://{}/ ({})",
        config.listen,
        web_config.describe()
    );
    let web = Arc::new(WebState::new(config.web_config_file.clone(), web_config));
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    // Serving before the first attach: on a dense node with TCX that takes
    // a while (an RCU grace period per hook, see README), and health checks
    // and scrapes meanwhile see hvnet_agent_interfaces grow.
    let server = tokio::spawn(serve::run(listener, state.clone(), web, shutdown_rx));

    let mut watcher = LinkWatcher::start()?;
    tokio::task::block_in_place(|| -> anyhow::Result<()> {
        let present =
            crate::interfaces::link_dump::dump().context("listing interfaces over rtnetlink")?;
        state.reconcile(&present, &config);
        state.evaluate();
        Ok(())
    })?;
    log::info!(
        "hvnet {} watching {} ({} attached, poll {:?}, stall after {:?}), listening on {}",
        env!("CARGO_PKG_VERSION"),
        config.interfaces.globs().join(","),
        state.interface_count(),
        config.poll_interval,
        config.stall_after,
        config.listen
    );

    let outcome = poll_loop(&state, &config, &mut watcher).await;

    events_task.abort();
    let detached = state.detach_everything();
    log::info!("detached from {detached} interface(s); exiting");
    let _ = shutdown_tx.send(true);
    if let Ok(Err(err)) = tokio::time::timeout(Duration::from_secs(2), server).await {
        log::warn!("http server task: {err}");
    }
    outcome
}

/// Polls between full link dumps (see `poll_loop`): a missed link event
/// (the event socket can overflow) heals within this many polls.
const FULL_DUMP_EVERY: u32 = 30;

/// The known links with fresh counters (RTM_GETSTATS); a link gone since
/// keeps its last counters until the next full dump or link event.
fn refresh_counters(mut links: Vec<LinkInfo>) -> std::io::Result<Vec<LinkInfo>> {
    let stats = crate::interfaces::link_dump::dump_stats()?;
    for link in &mut links {
        if let Some(fresh) = stats.get(&link.ifindex) {
            link.stats = Some(*fresh);
        }
    }
    Ok(links)
}

/// Reacts to link events at once, and every poll interval re-reads links
/// (with their stats) and evaluates every VM, until SIGTERM or SIGINT.
async fn poll_loop(
    state: &AgentState,
    config: &Config,
    watcher: &mut LinkWatcher,
) -> anyhow::Result<()> {
    let mut sigterm = tokio::signal::unix::signal(SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    let mut sigint = tokio::signal::unix::signal(SignalKind::interrupt())
        .context("installing the SIGINT handler")?;
    let mut poll = tokio::time::interval(config.poll_interval);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The links as last listed; between full dumps only their counters are
    // refreshed (a full dump builds every attribute of every link in the
    // kernel), and a link event fetches just the links it names. Every
    // FULL_DUMP_EVERY polls (or when an event cannot be read) everything is
    // listed again.
    let mut links: Option<Vec<LinkInfo>> = None;
    let mut polls_since_full = 0u32;
    loop {
        let evaluate = tokio::select! {
            _ = sigterm.recv() => { log::info!("SIGTERM: detaching"); return Ok(()); }
            _ = sigint.recv() => { log::info!("SIGINT: detaching"); return Ok(()); }
            change = watcher.changed() => {
                let Some(first) = change else {
                    anyhow::bail!("the rtnetlink event socket closed unexpectedly");
                };
                state.link_events.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(EVENT_SETTLE).await;
                let mut changes = vec![first];
                changes.extend(watcher.drain());
                // Only the links that changed are asked for; the rest keep
                // what the last listing said.
                if let Some(known) = links.take() {
                    links = tokio::task::block_in_place(|| {
                        links::apply_changes(known, &changes, crate::interfaces::link_dump::get)
                    });
                }
                false
            }
            _ = poll.tick() => true,
        };
        // Attaching (kernel syscalls, an RCU grace period per TCX hook) and
        // evaluating (map reads) block: off the async workers' hands, so
        // scrapes are answered meanwhile.
        let full = polls_since_full + 1 >= FULL_DUMP_EVERY;
        tokio::task::block_in_place(|| {
            let listed = match links.take().filter(|_| !full) {
                // After a link event the known links are current already.
                Some(known) if !evaluate => Ok(known),
                Some(known) => refresh_counters(known),
                None => crate::interfaces::link_dump::dump(),
            };
            match listed {
                Ok(present) => {
                    state.reconcile(&present, config);
                    links = Some(present);
                }
                Err(err) => log::warn!(
                    "listing interfaces over rtnetlink: {err}; keeping the current attachments"
                ),
            }
        });
        polls_since_full = if full { 0 } else { polls_since_full + 1 };
        if evaluate {
            tokio::task::block_in_place(|| state.evaluate());
        }
    }
}
