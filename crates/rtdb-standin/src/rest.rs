//! The database REST API: `GET/PUT/PATCH/POST/DELETE <path>.json`, streaming GETs and
//! redirect mode.

use std::sync::Arc;

use hyper::header::{HeaderValue, ACCEPT, CACHE_CONTROL, CONNECTION, CONTENT_TYPE, LOCATION};
use hyper::{Method, Response, StatusCode};
use serde_json::{json, Value};
use tokio::sync::mpsc;

use crate::database::WriteError;
use crate::http::{
    empty_response, error_response, json_response, with_etag, ChannelBody, ConnCtx, HttpResponse,
    Req,
};
use crate::options::RedirectScope;
use crate::path::{DbPath, MAX_DEPTH};
use crate::query::{filter_by_key, Print, Query, QueryError};
use crate::sse::{Auth, Listener, StreamTask};
use crate::state::{Credentials, Shared};
use crate::tree::{etag, render, shallow};
use http_body_util::BodyExt as _;

/// Why a database request was refused.
#[derive(Debug, thiserror::Error)]
pub enum RestError {
    /// A path segment broke the key rules.
    #[error("Invalid path: Invalid token in path")]
    BadPath,
    /// A bad or unknown query parameter.
    #[error(transparent)]
    Query(#[from] QueryError),
    /// No valid credentials, and rules are not public.
    #[error("Permission denied")]
    PermissionDenied,
    /// The body was not JSON.
    #[error("Invalid data; couldn't parse JSON object, array, or value.")]
    BadJson,
    /// The write was refused.
    #[error(transparent)]
    Write(#[from] WriteError),
    /// `print=silent` together with `if-match`.
    #[error("print=silent cannot be used with conditional requests (if-match)")]
    SilentWithIfMatch,
    /// `if-match` on PATCH or POST.
    #[error("if-match is not supported on PATCH or POST")]
    IfMatchOnMerge,
    /// `shallow=true` together with `X-Firebase-ETag`.
    #[error("shallow cannot be used with ETag requests")]
    ShallowWithEtag,
    /// Body larger than the configured write cap.
    #[error("Data to write exceeds the maximum size that can be modified with a single request.")]
    WriteTooLarge,
    /// A query parameter the stand-in does not support on streams.
    #[error(
        "rtdb-standin does not support shallow, orderBy or print=silent on streaming requests"
    )]
    StreamQuery,
    /// A method other than GET, PUT, PATCH, POST or DELETE.
    #[error("Method not allowed")]
    MethodNotAllowed,
}

impl RestError {
    fn status(&self) -> StatusCode {
        match self {
            RestError::PermissionDenied => StatusCode::UNAUTHORIZED,
            RestError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            _ => StatusCode::BAD_REQUEST,
        }
    }
}

type RestResult = Result<HttpResponse, RestError>;

/// Everything a handler needs about one request.
struct Call<'a> {
    shared: &'a Arc<Shared>,
    req: &'a Req,
    path: DbPath,
    query: Query,
}

impl Call<'_> {
    fn wants_etag(&self) -> bool {
        self.req
            .header("x-firebase-etag")
            .is_some_and(|v| v.eq_ignore_ascii_case("true"))
    }

    fn if_match(&self) -> Option<&str> {
        self.req.header("if-match")
    }

    fn silent(&self) -> bool {
        self.query.print == Print::Silent
    }

    fn body_json(&self) -> Result<Value, RestError> {
        let cap = self.shared.knobs().max_write_bytes;
        if cap.is_some_and(|cap| self.req.body.len() > cap) {
            return Err(RestError::WriteTooLarge);
        }
        serde_json::from_slice(&self.req.body).map_err(|_| RestError::BadJson)
    }

    fn reply(&self, status: StatusCode, value: &Value) -> HttpResponse {
        if self.silent() {
            empty_response(StatusCode::NO_CONTENT)
        } else {
            json_response(status, value, self.query.print == Print::Pretty)
        }
    }
}

/// Handles a request for a `.json` path.
pub async fn handle(shared: &Arc<Shared>, ctx: &ConnCtx, req: &Req) -> HttpResponse {
    match dispatch(shared, ctx, req) {
        Ok(response) => response,
        Err(e) => {
            if matches!(e, RestError::PermissionDenied) {
                shared.count(|c| c.permission_denied += 1);
            }
            error_response(e.status(), &e.to_string())
        }
    }
}

fn dispatch(shared: &Arc<Shared>, ctx: &ConnCtx, req: &Req) -> RestResult {
    let raw_path = req.path.strip_suffix(".json").unwrap_or(&req.path);
    let path = DbPath::from_url_path(raw_path).map_err(|_| RestError::BadPath)?;
    let query = Query::parse(req.query.as_deref())?;
    let method = effective_method(req);
    let streaming = method == Method::GET && is_event_stream(req);
    if let Some(redirect) = redirect(shared, ctx, req, streaming) {
        return Ok(redirect);
    }
    let creds = Credentials {
        authorization: req.header("authorization"),
        access_token: query.access_token.as_deref(),
        auth: query.auth.as_deref(),
    };
    let auth = shared
        .authorize(&creds)
        .ok_or(RestError::PermissionDenied)?;
    let call = Call {
        shared,
        req,
        path,
        query,
    };
    match method {
        Method::GET if streaming => open_stream(&call, ctx, auth),
        Method::GET => get(&call),
        Method::PUT => put(&call),
        Method::PATCH => patch(&call),
        Method::POST => post(&call),
        Method::DELETE => delete(&call),
        _ => Err(RestError::MethodNotAllowed),
    }
}

/// `X-HTTP-Method-Override: PUT|PATCH|DELETE` on a POST.
fn effective_method(req: &Req) -> Method {
    if req.method != Method::POST {
        return req.method.clone();
    }
    match req
        .header("x-http-method-override")
        .map(str::to_ascii_uppercase)
        .as_deref()
    {
        Some("PUT") => Method::PUT,
        Some("PATCH") => Method::PATCH,
        Some("DELETE") => Method::DELETE,
        _ => Method::POST,
    }
}

fn is_event_stream(req: &Req) -> bool {
    req.headers
        .get_all(ACCEPT)
        .iter()
        .any(|v| v.to_str().is_ok_and(|s| s.contains("text/event-stream")))
}

fn get(call: &Call<'_>) -> RestResult {
    call.query.check_supported(&call.path)?;
    if call.query.shallow && call.wants_etag() {
        return Err(RestError::ShallowWithEtag);
    }
    let mut value = call.shared.db().tree.get(&call.path);
    if call.query.order_by.is_some() {
        value = render(&filter_by_key(value, &call.query.range));
    }
    if call.query.shallow {
        value = shallow(&value);
    }
    call.shared.count(|c| c.reads += 1);
    let tag = etag(&value);
    if call.req.header("if-none-match") == Some(tag.as_str()) {
        return Ok(with_etag(empty_response(StatusCode::NOT_MODIFIED), &tag));
    }
    let response = call.reply(StatusCode::OK, &value);
    Ok(if call.wants_etag() {
        with_etag(response, &tag)
    } else {
        response
    })
}

fn check_conditional(call: &Call<'_>) -> Result<(), RestError> {
    let knobs = call.shared.knobs();
    if call.if_match().is_some() && call.silent() && knobs.reject_silent_with_if_match {
        return Err(RestError::SilentWithIfMatch);
    }
    Ok(())
}

fn put(call: &Call<'_>) -> RestResult {
    check_conditional(call)?;
    let raw = call.body_json()?;
    write_at(call, &call.path, raw)
}

fn delete(call: &Call<'_>) -> RestResult {
    check_conditional(call)?;
    write_at(call, &call.path, Value::Null)
}

/// PUT or DELETE, conditional on `if-match` when given.
fn write_at(call: &Call<'_>, path: &DbPath, raw: Value) -> RestResult {
    let ctx = call.shared.write_ctx();
    let style = call.shared.knobs().patch_event_keys;
    let stored = {
        let mut db = call.shared.db();
        if let Some(expected) = call.if_match() {
            let current = db.tree.get(path);
            let current_tag = etag(&current);
            if current_tag != expected {
                let response = json_response(StatusCode::PRECONDITION_FAILED, &current, false);
                return Ok(with_etag(response, &current_tag));
            }
        }
        db.set(path, raw, ctx, Some(style))?
    };
    call.shared.count(|c| c.writes += 1);
    let response = call.reply(StatusCode::OK, &stored);
    let tagged = call.if_match().is_some() || call.wants_etag();
    Ok(if tagged {
        with_etag(response, &etag(&stored))
    } else {
        response
    })
}

fn reject_if_match_on_merge(call: &Call<'_>) -> Result<(), RestError> {
    if call.if_match().is_some() && call.shared.knobs().reject_if_match_on_patch {
        return Err(RestError::IfMatchOnMerge);
    }
    Ok(())
}

fn patch(call: &Call<'_>) -> RestResult {
    reject_if_match_on_merge(call)?;
    let raw = call.body_json().map_err(|e| match e {
        RestError::BadJson => RestError::Write(WriteError::NotAnObject),
        other => other,
    })?;
    let echo = call.shared.update_values(&call.path, raw, true)?;
    call.shared.count(|c| c.writes += 1);
    Ok(call.reply(StatusCode::OK, &echo))
}

fn post(call: &Call<'_>) -> RestResult {
    reject_if_match_on_merge(call)?;
    let raw = call.body_json()?;
    if call.path.depth() + 1 > MAX_DEPTH {
        return Err(RestError::BadPath);
    }
    let ctx = call.shared.write_ctx();
    let style = call.shared.knobs().patch_event_keys;
    let name = {
        let mut db = call.shared.db();
        let name = db.next_push_id(ctx.now_ms);
        db.set(&call.path.child(&name), raw, ctx, Some(style))?;
        name
    };
    call.shared.count(|c| c.writes += 1);
    Ok(call.reply(StatusCode::OK, &json!({ "name": name })))
}

fn open_stream(call: &Call<'_>, ctx: &ConnCtx, auth: Auth) -> RestResult {
    let q = &call.query;
    if q.shallow || q.order_by.is_some() || q.print == Print::Silent {
        return Err(RestError::StreamQuery);
    }
    let shared = call.shared.clone();
    let auth_deadline = shared.auth_deadline(&auth);
    let (id, cmds) = shared.db().open_stream(&call.path, ctx.listener, auth);
    shared.count(|c| c.streams_opened += 1);
    let (out, body) = mpsc::channel(16);
    let task = StreamTask::new(shared, id, cmds, out, ctx.reset.clone(), auth_deadline);
    tokio::spawn(task.run());
    let mut response = Response::new(ChannelBody::new(body).boxed());
    let headers = response.headers_mut();
    headers.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream; charset=utf-8"),
    );
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert(CONNECTION, HeaderValue::from_static("close"));
    headers.insert("access-control-allow-origin", HeaderValue::from_static("*"));
    Ok(response)
}

/// In redirect mode, a 307 from the primary listener to the same path on the secondary one
/// (`?ns=<db>`, plus `&sse=true` for streams, after the original query).
fn redirect(shared: &Shared, ctx: &ConnCtx, req: &Req, streaming: bool) -> Option<HttpResponse> {
    if ctx.listener != Listener::Primary {
        return None;
    }
    let target = shared.urls.secondary.as_ref()?;
    let take = shared.update_knobs(|k| {
        let applies = match k.redirect {
            RedirectScope::Off => false,
            RedirectScope::Streams => streaming,
            RedirectScope::All => true,
        };
        match (applies, &mut k.redirect_remaining) {
            (false, _) | (true, Some(0)) => false,
            (true, Some(n)) => {
                *n -= 1;
                true
            }
            (true, None) => true,
        }
    });
    if !take {
        return None;
    }
    shared.count(|c| c.redirects += 1);
    let mut query: Vec<String> = req
        .query
        .iter()
        .filter(|q| !q.is_empty())
        .cloned()
        .collect();
    query.push(format!("ns={}", shared.namespace));
    if streaming {
        query.push("sse=true".to_owned());
    }
    let location = format!("{target}{}?{}", req.path, query.join("&"));
    let mut response = empty_response(StatusCode::TEMPORARY_REDIRECT);
    if let Ok(value) = HeaderValue::from_str(&location) {
        response.headers_mut().insert(LOCATION, value);
    }
    Some(response)
}
