//! The error shapes of the backend's faces: the contract's `ApiError`
//! (`{"error": {code, message}}`, from `service-kit`) and OpenAI's, which the
//! `/v1` face and the key check in front of it answer with.

use axum::extract::rejection::JsonRejection;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

pub use service_kit::http::ApiError;

/// An [`ApiError`] in OpenAI's shape: `{"error": {message, type, param, code}}`.
pub struct OpenAiError(pub ApiError);

impl From<ApiError> for OpenAiError {
    fn from(e: ApiError) -> Self {
        OpenAiError(e)
    }
}

impl From<JsonRejection> for OpenAiError {
    fn from(e: JsonRejection) -> Self {
        OpenAiError(e.into())
    }
}

impl IntoResponse for OpenAiError {
    fn into_response(self) -> Response {
        let e = self.0;
        (e.status, Json(error_body(e.status, e.code, &e.message, None))).into_response()
    }
}

pub fn error_body(status: StatusCode, code: &str, message: &str, param: Option<&str>) -> Value {
    let kind = match status.as_u16() {
        400 | 404 | 409 | 413 | 415 => "invalid_request_error",
        401 => "authentication_error",
        403 => "permission_error",
        429 => "rate_limit_error",
        _ => "server_error",
    };
    json!({"error": {"message": message, "type": kind, "param": param, "code": code}})
}
