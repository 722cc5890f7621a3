//! Around every route: basic authentication (when `basic_auth_users` is
//! set), a request body limit, and the configured response headers. The
//! configuration is read per request, so a reload applies at once.

use std::sync::Arc;

use axum::{
    extract::{Request, State},
    http::{header, HeaderName, HeaderValue, Method, StatusCode},
    middleware::Next,
    response::{IntoResponse, Response},
};

use super::{api_error::api_error, basic_auth, WebState};

/// The agent's endpoints take no request bodies; anything bigger than
/// this is refused before a handler runs.
pub const MAX_BODY_BYTES: u64 = 64 * 1024;

pub async fn authenticate_and_decorate(
    State(web): State<Arc<WebState>>,
    request: Request,
    next: Next,
) -> Response {
    let config = web.current();
    let api = request.uri().path().starts_with("/api/");
    let limited = config
        .limiter
        .as_ref()
        .is_some_and(|bucket| !bucket.allow(std::time::Instant::now()));
    let mut response = if limited {
        too_many(api)
    } else if let Some(refusal) = refuse(&request, api) {
        refusal
    } else if config.web.requires_auth() && !authorized(&web, &config.web, &request).await {
        unauthorized(api)
    } else {
        next.run(request).await
    };
    let headers = response.headers_mut();
    for (name, value) in &config.web.headers {
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(value),
        ) {
            headers.insert(name, value);
        }
    }
    response
}

/// Requests no endpoint of the agent could want.
fn refuse(request: &Request, api: bool) -> Option<Response> {
    let too_big = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .is_some_and(|len| len > MAX_BODY_BYTES)
        || request.headers().contains_key(header::TRANSFER_ENCODING);
    if too_big {
        let message = format!("request bodies over {MAX_BODY_BYTES} bytes are refused");
        return Some(if api {
            api_error(StatusCode::PAYLOAD_TOO_LARGE, message)
        } else {
            (StatusCode::PAYLOAD_TOO_LARGE, message).into_response()
        });
    }
    if request.method() != Method::GET && request.method() != Method::HEAD {
        let message = format!("method {} not allowed: only GET", request.method());
        let mut response = if api {
            api_error(StatusCode::METHOD_NOT_ALLOWED, message)
        } else {
            (StatusCode::METHOD_NOT_ALLOWED, message).into_response()
        };
        response
            .headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return Some(response);
    }
    None
}

fn authorized(
    web: &Arc<WebState>,
    config: &super::web_config::WebConfig,
    request: &Request,
) -> impl std::future::Future<Output = bool> + Send + 'static {
    // Take what is needed before awaiting: a request is not Sync.
    let credentials = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(basic_auth::parse_header);
    let users = config.users.clone();
    let web = web.clone();
    async move {
        let Some(credentials) = credentials else {
            return false;
        };
        // A client already checked (Prometheus, every scrape) is answered
        // from the cache; only new credentials cost a bcrypt check.
        if let Some(ok) = web.authenticator.cached(&users, &credentials) {
            return ok;
        }
        // bcrypt takes tens of milliseconds: never on the async workers,
        // and only a few at a time, so a client guessing passwords cannot
        // take the node's CPUs.
        let Ok(_permit) = web.bcrypt_slots.acquire().await else {
            return false;
        };
        let checker = web.clone();
        tokio::task::spawn_blocking(move || checker.authenticator.check(&users, &credentials))
            .await
            .unwrap_or(false)
    }
}

/// exporter-toolkit's `rate_limit` answer.
fn too_many(api: bool) -> Response {
    if api {
        api_error(
            StatusCode::TOO_MANY_REQUESTS,
            "too many requests (rate_limit)",
        )
    } else {
        (StatusCode::TOO_MANY_REQUESTS, "Too many requests\n").into_response()
    }
}

fn unauthorized(api: bool) -> Response {
    let mut response = if api {
        api_error(StatusCode::UNAUTHORIZED, "authentication required")
    } else {
        (StatusCode::UNAUTHORIZED, "Unauthorized\n").into_response()
    };
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Basic realm=\"hvnet\""),
    );
    response
}
