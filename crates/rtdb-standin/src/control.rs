//! The `/_fake/*` control API, so tests in another process can drive the stand-in.

use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::{Method, Request, StatusCode};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::faults::FaultRule;
use crate::fixture::firebase_key_b64;
use crate::http::{error_response, json_response, read_body, HttpResponse};
use crate::options::Knobs;
use crate::path::DbPath;
use crate::sse::StreamAction;
use crate::state::Shared;

/// Why a control request failed.
#[derive(Debug, thiserror::Error)]
enum ControlError {
    #[error("{0}")]
    BadRequest(String),
    #[error("no such control endpoint")]
    NotFound,
}

impl ControlError {
    fn status(&self) -> StatusCode {
        match self {
            ControlError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ControlError::NotFound => StatusCode::NOT_FOUND,
        }
    }
}

fn bad(e: impl std::fmt::Display) -> ControlError {
    ControlError::BadRequest(e.to_string())
}

type ControlResult = Result<Value, ControlError>;

/// A control request, body read.
struct Ctl<'a> {
    shared: &'a Arc<Shared>,
    method: Method,
    query: Option<String>,
    body: Vec<u8>,
}

impl Ctl<'_> {
    fn param(&self, name: &str) -> Option<String> {
        let raw = self.query.as_deref()?;
        form_urlencoded::parse(raw.as_bytes())
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.into_owned())
    }

    fn json<T: for<'de> Deserialize<'de> + Default>(&self) -> Result<T, ControlError> {
        if self.body.iter().all(u8::is_ascii_whitespace) {
            return Ok(T::default());
        }
        serde_json::from_slice(&self.body).map_err(bad)
    }

    fn value(&self) -> ControlResult {
        serde_json::from_slice(&self.body).map_err(|e| bad(format!("body is not JSON: {e}")))
    }

    fn notify(&self) -> bool {
        self.param("notify").as_deref() != Some("false")
    }

    fn path_param(&self) -> Result<Option<DbPath>, ControlError> {
        self.param("path")
            .map(|p| DbPath::parse(&p).map_err(bad))
            .transpose()
    }
}

/// Handles a request under `/_fake`.
pub async fn handle(shared: &Arc<Shared>, req: Request<Incoming>) -> HttpResponse {
    let (parts, body) = req.into_parts();
    let body = match read_body(body, shared.options.max_body_bytes).await {
        Ok(body) => body.to_vec(),
        Err(_) => return error_response(StatusCode::BAD_REQUEST, "could not read the body"),
    };
    let route = parts
        .uri
        .path()
        .trim_start_matches("/_fake")
        .trim_matches('/')
        .to_owned();
    let ctl = Ctl {
        shared,
        method: parts.method,
        query: parts.uri.query().map(str::to_owned),
        body,
    };
    match dispatch(&ctl, &route) {
        Ok(value) => json_response(StatusCode::OK, &value, false),
        Err(e) => error_response(e.status(), &e.to_string()),
    }
}

fn dispatch(ctl: &Ctl<'_>, route: &str) -> ControlResult {
    let (head, rest) = route.split_once('/').unwrap_or((route, ""));
    match (ctl.method.as_str(), head) {
        ("GET", "info") => Ok(info(ctl.shared)),
        (_, "tree") => tree(ctl, rest),
        (_, "requests") => requests(ctl),
        ("GET", "counters") => serde_json::to_value(ctl.shared.counters()).map_err(bad),
        (_, "streams") => streams(ctl, rest),
        ("POST", "auth") => auth(ctl, rest),
        (_, "config") => config(ctl),
        (_, "faults") => faults(ctl, rest),
        (_, "outage") => outage(ctl),
        (_, "clock") => clock(ctl),
        ("POST", "reset") => {
            ctl.shared.reset();
            Ok(json!({"ok": true}))
        }
        _ => Err(ControlError::NotFound),
    }
}

fn info(shared: &Shared) -> Value {
    let account: Value = serde_json::from_str(&shared.service_account_json).unwrap_or(Value::Null);
    json!({
        "db_url": shared.urls.db,
        "token_uri": shared.urls.token,
        "secondary_url": shared.urls.secondary,
        "namespace": shared.namespace,
        "project_id": shared.options.project_id,
        "client_email": shared.client_email,
        "service_account": account,
        "firebase_key": firebase_key_b64(&shared.service_account_json),
    })
}

fn tree(ctl: &Ctl<'_>, rest: &str) -> ControlResult {
    let path = DbPath::from_url_path(rest.trim_end_matches(".json")).map_err(bad)?;
    let shared = ctl.shared;
    match ctl.method.as_str() {
        "GET" => Ok(shared.db().tree.get(&path)),
        "PUT" => shared
            .set_value(&path, ctl.value()?, ctl.notify())
            .map_err(bad),
        "PATCH" => shared
            .update_values(&path, ctl.value()?, ctl.notify())
            .map_err(bad),
        "DELETE" => shared
            .set_value(&path, Value::Null, ctl.notify())
            .map_err(bad),
        _ => Err(ControlError::NotFound),
    }
}

fn requests(ctl: &Ctl<'_>) -> ControlResult {
    match ctl.method.as_str() {
        "GET" => {
            let since = match ctl.param("since") {
                Some(s) => s.parse().map_err(bad)?,
                None => 0,
            };
            serde_json::to_value(ctl.shared.log().since(since)).map_err(bad)
        }
        "DELETE" => {
            ctl.shared.log().clear();
            Ok(json!({"ok": true}))
        }
        _ => Err(ControlError::NotFound),
    }
}

fn streams(ctl: &Ctl<'_>, action: &str) -> ControlResult {
    match (ctl.method.as_str(), action) {
        ("GET", "") => {
            let infos = ctl.shared.db().streams.infos();
            Ok(json!({"open": infos.len(), "streams": infos}))
        }
        ("POST", action) => {
            let action: StreamAction =
                serde_json::from_value(Value::String(action.to_owned())).map_err(bad)?;
            let path = ctl.path_param()?;
            let affected = ctl.shared.stream_action(action, path.as_ref());
            Ok(json!({"affected": affected}))
        }
        _ => Err(ControlError::NotFound),
    }
}

fn auth(ctl: &Ctl<'_>, what: &str) -> ControlResult {
    let shared = ctl.shared;
    match what {
        "revoke" => Ok(json!({"streams_revoked": shared.revoke_tokens()})),
        "expire" => Ok(json!({"streams_revoked": shared.expire_tokens()})),
        "token" => {
            let (token, expires_in) = shared.issue_token();
            Ok(json!({"access_token": token, "expires_in": expires_in, "token_type": "Bearer"}))
        }
        _ => Err(ControlError::NotFound),
    }
}

fn config(ctl: &Ctl<'_>) -> ControlResult {
    let shared = ctl.shared;
    match ctl.method.as_str() {
        "GET" => serde_json::to_value(shared.knobs()).map_err(bad),
        "PATCH" => {
            let Value::Object(changes) = ctl.value()? else {
                return Err(bad("body must be a JSON object of knobs"));
            };
            let mut merged = serde_json::to_value(shared.knobs()).map_err(bad)?;
            if let Value::Object(current) = &mut merged {
                current.extend(changes);
            }
            let knobs: Knobs = serde_json::from_value(merged).map_err(bad)?;
            shared.update_knobs(|k| *k = knobs.clone());
            serde_json::to_value(knobs).map_err(bad)
        }
        _ => Err(ControlError::NotFound),
    }
}

fn faults(ctl: &Ctl<'_>, id: &str) -> ControlResult {
    let shared = ctl.shared;
    match (ctl.method.as_str(), id) {
        ("GET", "") => serde_json::to_value(shared.faults().list()).map_err(bad),
        ("POST", "") => {
            let rule: FaultRule = serde_json::from_slice(&ctl.body).map_err(bad)?;
            Ok(json!({"id": shared.faults().add(rule)}))
        }
        ("DELETE", "") => {
            shared.faults().clear();
            Ok(json!({"ok": true}))
        }
        ("DELETE", id) => {
            let id: u64 = id.parse().map_err(bad)?;
            Ok(json!({"removed": shared.faults().remove(id)}))
        }
        _ => Err(ControlError::NotFound),
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct OutageRequest {
    duration_ms: Option<u64>,
}

fn outage(ctl: &Ctl<'_>) -> ControlResult {
    match ctl.method.as_str() {
        "POST" => {
            let req: OutageRequest = ctl.json()?;
            ctl.shared
                .begin_outage(req.duration_ms.map(Duration::from_millis));
            Ok(json!({"ok": true}))
        }
        "DELETE" => {
            ctl.shared.end_outage();
            Ok(json!({"ok": true}))
        }
        _ => Err(ControlError::NotFound),
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ClockRequest {
    advance_ms: Option<i64>,
    set_ms: Option<i64>,
    #[serde(default)]
    real: bool,
}

fn clock(ctl: &Ctl<'_>) -> ControlResult {
    let shared = ctl.shared;
    if ctl.method == Method::POST {
        let req: ClockRequest = ctl.json()?;
        let mut clock = shared.clock();
        if req.real {
            clock.reset();
        }
        if let Some(ms) = req.set_ms {
            clock.freeze_at(ms);
        }
        if let Some(ms) = req.advance_ms {
            clock.advance(ms);
        }
        drop(clock);
        shared.revoke_invalid_streams();
    } else if ctl.method != Method::GET {
        return Err(ControlError::NotFound);
    }
    Ok(json!({"now_ms": shared.now_ms()}))
}
