//! The agent's HTTP routes: `/` (landing page), `/metrics`, `/healthz`,
//! `/api/v1/...`. Authentication and response headers are applied by
//! [`super::guard`] around all of them; TLS and connection limits by
//! [`super::listener`].

use std::sync::Arc;

use axum::{
    body::Body,
    extract::{Path, State},
    http::{header, StatusCode},
    response::{IntoResponse, Response},
    routing::get,
    Json, Router,
};
use tokio::sync::Semaphore;

use crate::{
    agent::{AgentState, LookupError},
    export,
    serve::{
        api_error::{api_error, api_error_with},
        guard, landing, WebState,
    },
};

const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// What every route handler can reach.
#[derive(Clone)]
pub struct RouteState {
    pub agent: Arc<AgentState>,
    pub web: Arc<WebState>,
    /// Permits for concurrent `/api/v1/events` streams.
    pub event_streams: Arc<Semaphore>,
}

pub fn router(state: RouteState) -> Router {
    Router::new()
        .route("/", get(landing_page))
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/api/v1/vms", get(vms))
        .route("/api/v1/vms/{name}/explain", get(explain))
        .route("/api/v1/vms/{name}/timeline", get(timeline))
        .route("/api/v1/events", get(events))
        .fallback(not_found)
        .layer(axum::middleware::from_fn_with_state(
            state.web.clone(),
            guard::authenticate_and_decorate,
        ))
        .with_state(state)
}

/// Runs `read` on the blocking pool: kernel map reads and waits for a lock
/// the poll loop holds while it attaches stay off the async workers, so
/// one slow read never stalls every connection.
async fn read_agent<T: Send + 'static>(
    agent: &Arc<AgentState>,
    read: impl FnOnce(&AgentState) -> T + Send + 'static,
) -> Result<T, Response> {
    let agent = agent.clone();
    tokio::task::spawn_blocking(move || read(&agent))
        .await
        .map_err(|err| {
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("reading the agent's state: {err}\n"),
            )
                .into_response()
        })
}

async fn landing_page(State(state): State<RouteState>) -> Response {
    let exposition = match read_agent(&state.agent, |a| a.exposition()).await {
        Ok(exposition) => exposition,
        Err(response) => return response,
    };
    match exposition {
        Ok(view) => (
            [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
            landing::render(&view, &landing::node_name()),
        )
            .into_response(),
        Err(err) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("reading the agent's state: {err}\n"),
        )
            .into_response(),
    }
}

async fn metrics(State(state): State<RouteState>) -> Response {
    let rendered = read_agent(&state.agent, |a| {
        a.exposition()
            .map_err(|e| e.to_string())
            .map(|view| export::render(&view))
    })
    .await;
    let rendered = match rendered {
        Ok(rendered) => rendered,
        Err(response) => return response,
    };
    match rendered {
        Ok(text) => ([(header::CONTENT_TYPE, PROMETHEUS_TEXT)], text).into_response(),
        Err(err) => {
            log::warn!("scrape failed: {err}");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("scrape failed: {err}\n"),
            )
                .into_response()
        }
    }
}

async fn healthz(State(state): State<RouteState>) -> Response {
    let exposition = match read_agent(&state.agent, |a| a.exposition()).await {
        Ok(exposition) => exposition,
        Err(response) => return response,
    };
    match exposition {
        Ok(view) => {
            format!("ok: {} interface(s) attached\n", view.attached_count()).into_response()
        }
        Err(err) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("unhealthy: {err}\n"),
        )
            .into_response(),
    }
}

async fn vms(State(state): State<RouteState>) -> Response {
    let exposition = match read_agent(&state.agent, |a| a.exposition()).await {
        Ok(exposition) => exposition,
        Err(response) => return response,
    };
    match exposition {
        Ok(view) => Json(export::vms_json(&view)).into_response(),
        Err(err) => api_error(StatusCode::INTERNAL_SERVER_ERROR, err.to_string()),
    }
}

async fn explain(State(state): State<RouteState>, Path(name): Path<String>) -> Response {
    let explained = match read_agent(&state.agent, move |a| a.explain(&name)).await {
        Ok(explained) => explained,
        Err(response) => return response,
    };
    match explained {
        Ok(text) => ([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], text).into_response(),
        Err(err) => lookup_error(err),
    }
}

async fn timeline(State(state): State<RouteState>, Path(name): Path<String>) -> Response {
    let entries = match read_agent(&state.agent, move |a| a.timeline(&name)).await {
        Ok(entries) => entries,
        Err(response) => return response,
    };
    match entries {
        Ok(entries) => Json(entries).into_response(),
        Err(err) => lookup_error(err),
    }
}

fn lookup_error(err: LookupError) -> Response {
    match err {
        LookupError::NotFound(name) => api_error(
            StatusCode::NOT_FOUND,
            format!("no monitored VM or interface named {name:?}: see /api/v1/vms"),
        ),
        LookupError::Ambiguous { name, candidates } => api_error_with(
            StatusCode::CONFLICT,
            format!(
                "{name:?} names more than one monitored interface ({}): ask for one of them by its interface",
                candidates.join(", ")
            ),
            candidates,
        ),
    }
}

async fn not_found(uri: axum::http::Uri) -> Response {
    if uri.path().starts_with("/api/") {
        api_error(
            StatusCode::NOT_FOUND,
            format!("no such API endpoint {:?}", uri.path()),
        )
    } else {
        (
            StatusCode::NOT_FOUND,
            "not found: see / for what this agent serves\n",
        )
            .into_response()
    }
}

/// Live JSON lines: stall transitions, DHCP messages, verdicts. A reader
/// too slow to keep up skips ahead (and is told how much it missed).
/// Streams are capped: each holds a connection open indefinitely.
async fn events(State(state): State<RouteState>) -> Response {
    let Ok(permit) = state.event_streams.clone().try_acquire_owned() else {
        return api_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "too many concurrent event streams; try again later",
        );
    };
    let receiver = state.agent.subscribe();
    let stream = futures::stream::unfold((receiver, permit), |(mut receiver, permit)| async move {
        let line = match receiver.recv().await {
            Ok(line) => format!("{line}\n"),
            Err(tokio::sync::broadcast::error::RecvError::Lagged(missed)) => {
                format!("{{\"kind\":\"stream_lagged\",\"missed\":{missed}}}\n")
            }
            Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
        };
        Some((Ok::<_, std::io::Error>(line), (receiver, permit)))
    });
    (
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        Body::from_stream(stream),
    )
        .into_response()
}
