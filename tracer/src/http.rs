//! The agent's HTTP endpoint: `/metrics`, `/healthz`, `/api/v1/vms`.

use std::sync::Arc;

use axum::{
    body::Body,
    extract::{Path, State},
    http::{header, StatusCode},
    response::{IntoResponse, Response},
    routing::get,
    Json, Router,
};
use tokio::{net::TcpListener, sync::watch};

use crate::{agent::AgentState, export};

const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

pub async fn serve(
    listener: TcpListener,
    state: Arc<AgentState>,
    mut shutdown: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/api/v1/vms", get(vms))
        .route("/api/v1/vms/{name}/explain", get(explain))
        .route("/api/v1/vms/{name}/timeline", get(timeline))
        .route("/api/v1/events", get(events))
        .with_state(state);
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            let _ = shutdown.wait_for(|stop| *stop).await;
        })
        .await
}

async fn metrics(State(state): State<Arc<AgentState>>) -> Response {
    let rendered = state
        .exposition()
        .map_err(|e| e.to_string())
        .and_then(|view| export::render(&view).map_err(|e| e.to_string()));
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

async fn healthz(State(state): State<Arc<AgentState>>) -> Response {
    match state.exposition() {
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

async fn vms(State(state): State<Arc<AgentState>>) -> Response {
    match state.exposition() {
        Ok(view) => Json(export::vms_json(&view)).into_response(),
        Err(err) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{err}\n")).into_response(),
    }
}

async fn explain(State(state): State<Arc<AgentState>>, Path(name): Path<String>) -> Response {
    match state.explain(&name) {
        Some(text) => ([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], text).into_response(),
        None => not_found(&name),
    }
}

async fn timeline(State(state): State<Arc<AgentState>>, Path(name): Path<String>) -> Response {
    match state.timeline(&name) {
        Some(entries) => Json(entries).into_response(),
        None => not_found(&name),
    }
}

fn not_found(name: &str) -> Response {
    (
        StatusCode::NOT_FOUND,
        format!("no monitored VM or interface named {name:?}: see /api/v1/vms\n"),
    )
        .into_response()
}

/// Live JSON lines: stall transitions, DHCP messages, verdicts. A reader
/// too slow to keep up skips ahead (and is told how much it missed).
async fn events(State(state): State<Arc<AgentState>>) -> Response {
    let receiver = state.subscribe();
    let stream = futures::stream::unfold(receiver, |mut receiver| async move {
        let line = match receiver.recv().await {
            Ok(line) => format!("{line}\n"),
            Err(tokio::sync::broadcast::error::RecvError::Lagged(missed)) => {
                format!("{{\"kind\":\"stream_lagged\",\"missed\":{missed}}}\n")
            }
            Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
        };
        Some((Ok::<_, std::io::Error>(line), receiver))
    });
    (
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        Body::from_stream(stream),
    )
        .into_response()
}
