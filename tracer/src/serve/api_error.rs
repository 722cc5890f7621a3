//! `/api/v1` error responses: a status and an [`ApiError`] JSON body.

use axum::{
    http::StatusCode,
    response::{IntoResponse, Response},
    Json,
};

use crate::api::ApiError;

pub fn api_error(status: StatusCode, error: impl Into<String>) -> Response {
    api_error_with(status, error.into(), Vec::new())
}

pub fn api_error_with(status: StatusCode, error: String, candidates: Vec<String>) -> Response {
    (
        status,
        Json(ApiError {
            error,
            status: status.as_u16(),
            candidates,
        }),
    )
        .into_response()
}
