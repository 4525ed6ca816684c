//! `/v1/functions`: list, show, deploy and remove functions.
//!
//! A deploy is `PUT /v1/functions/{name}` with either
//! - `Content-Type: multipart/form-data`, a `module` part (the `.wasm`
//!   bytes) and an optional `settings` part (a settings file, TOML), or
//! - any other content type: the body is the module, with default settings.
//!
//! It is validated completely (name, settings, guest kind, compile,
//! linking) before anything changes; a rejected deploy answers 400 and
//! changes nothing on disk or in memory.
//!
//! `PATCH /v1/functions/{name}` takes a TOML document of settings to
//! change (the others are kept) and redeploys the same bytes.
//! `POST /v1/functions/{name}/reset` resets the function's pool.
//!
//! A deploy whose SlotHashId is unchanged (same bytes, only pool settings
//! changed: `max_jobs`, `min_warm`, `max_concurrency`, `idle_timeout_ms`,
//! `memory_high_water_mb`, supervision) reconfigures the running pool in
//! place, keeping its warm instances; any other change makes a new slot.
//! The answer's `slot_changed` says which happened.

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use serde::Serialize;

use super::errors::error_response;
use super::{App, json, method_not_allowed};
use crate::function::{FunctionDef, Settings};
use crate::guest::GuestBody;

/// A function as the API shows it.
#[derive(Serialize)]
pub struct FunctionInfo {
    pub name: String,
    pub kind: &'static str,
    pub digest: String,
    pub slot_hash: String,
    pub size: usize,
    pub settings: serde_json::Value,
    /// On a (re)deploy: whether it made a new slot (`false`: the running
    /// pool was reconfigured in place).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub slot_changed: Option<bool>,
}

impl FunctionInfo {
    pub fn of(def: &FunctionDef) -> Self {
        let settings = def
            .settings
            .to_table()
            .ok()
            .and_then(|table| serde_json::to_value(table).ok())
            .unwrap_or(serde_json::Value::Null);
        Self {
            name: def.name.to_string(),
            kind: def.kind.as_str(),
            digest: def.digest.to_hex(),
            slot_hash: def.slot_hash.to_string(),
            size: def.bytes.len(),
            settings,
            slot_changed: None,
        }
    }
}

pub async fn handle(app: &App, request: Request<Incoming>) -> Response<GuestBody> {
    let path = request.uri().path().to_owned();
    let rest = path.strip_prefix("/v1/functions").unwrap_or("");
    let name = rest.strip_prefix('/').filter(|n| !n.is_empty());
    if let Some(name) = name.and_then(|n| n.strip_suffix("/reset")) {
        if request.method() != Method::POST {
            return method_not_allowed();
        }
        return match app.runner.reset(name).await {
            Some(retired) => json(
                StatusCode::OK,
                &serde_json::json!({ "name": name, "reset": true, "retired": retired }),
            ),
            None => unknown(name),
        };
    }
    match (request.method().clone(), name) {
        (Method::GET, None) => {
            let list: Vec<FunctionInfo> = app.runner.functions().iter().map(FunctionInfo::of).collect();
            json(StatusCode::OK, &list)
        }
        (Method::GET, Some(name)) => match app.runner.get_function(name) {
            Some(def) => json(StatusCode::OK, &FunctionInfo::of(&def)),
            None => unknown(name),
        },
        (Method::PUT, Some(name)) => deploy(app, name.to_owned(), request).await,
        (Method::PATCH, Some(name)) => patch(app, name.to_owned(), request).await,
        (Method::DELETE, Some(name)) => match app.runner.remove(name).await {
            Ok(Some(def)) => json(StatusCode::OK, &FunctionInfo::of(&def)),
            Ok(None) => unknown(name),
            Err(error) => error_response(
                StatusCode::INTERNAL_SERVER_ERROR,
                "persist_failed",
                &error.to_string(),
                None,
            ),
        },
        _ => method_not_allowed(),
    }
}

fn unknown(name: &str) -> Response<GuestBody> {
    error_response(
        StatusCode::NOT_FOUND,
        "unknown_function",
        &format!("no function named `{name}`"),
        None,
    )
}

fn invalid(message: impl std::fmt::Display) -> Response<GuestBody> {
    error_response(
        StatusCode::BAD_REQUEST,
        "invalid_function",
        &message.to_string(),
        None,
    )
}

async fn deploy(app: &App, name: String, request: Request<Incoming>) -> Response<GuestBody> {
    let limit = app.limits.max_module_bytes;
    let (module, settings_text) = match read_deploy(request, limit).await {
        Ok(parts) => parts,
        Err(response) => return response,
    };
    let base_dir = app
        .runner
        .functions_dir()
        .unwrap_or_else(|| std::path::PathBuf::from("."));
    let settings = match Settings::parse(&settings_text, "deploy settings", &base_dir) {
        Ok(settings) => settings,
        Err(error) => return invalid(error),
    };
    let def = match FunctionDef::new(&name, module, settings, &format!("function `{name}`")) {
        Ok(def) => def,
        Err(error) => return invalid(error),
    };
    apply(app, def, &settings_text).await
}

async fn apply(app: &App, def: FunctionDef, settings_text: &str) -> Response<GuestBody> {
    let name = def.name.clone();
    match app.runner.deploy(def, settings_text).await {
        Ok(outcome) => {
            let status = if outcome.replaced.is_some() {
                StatusCode::OK
            } else {
                StatusCode::CREATED
            };
            let slot_changed = outcome
                .replaced
                .as_ref()
                .is_none_or(|old| old.slot_hash != outcome.def.slot_hash);
            tracing::info!(function = %name, slot = outcome.def.slot_hash.short(), slot_changed, "deployed");
            let mut info = FunctionInfo::of(&outcome.def);
            info.slot_changed = Some(slot_changed);
            json(status, &info)
        }
        Err(crate::runner::DeployError::Invalid(message)) => invalid(message),
        Err(error) => error_response(
            StatusCode::INTERNAL_SERVER_ERROR,
            "persist_failed",
            &error.to_string(),
            None,
        ),
    }
}

/// `PATCH`: the given settings over the current ones, same module bytes.
async fn patch(app: &App, name: String, request: Request<Incoming>) -> Response<GuestBody> {
    let Some(current) = app.runner.get_function(&name) else {
        return unknown(&name);
    };
    let body = match http_body_util::Limited::new(request.into_body(), 1 << 20)
        .collect()
        .await
    {
        Ok(body) => body.to_bytes(),
        Err(error) => return invalid(format!("cannot read the settings: {error}")),
    };
    let Ok(text) = std::str::from_utf8(&body) else {
        return invalid("the settings are not UTF-8");
    };
    let changes: toml::Table = match toml::from_str(text) {
        Ok(changes) => changes,
        Err(error) => return invalid(format!("PATCH settings: {}", error.message())),
    };
    // NB: never merge onto defaults: a PATCH that cannot see the current
    // settings would silently drop them.
    let mut merged = match current.settings.to_table() {
        Ok(merged) => merged,
        Err(error) => {
            tracing::error!(function = %name, %error, "the current settings do not read back");
            return error_response(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "internal error",
                None,
            );
        }
    };
    for (key, value) in changes {
        merged.insert(key, value);
    }
    let merged_text = match toml::to_string(&merged) {
        Ok(text) => text,
        Err(error) => return invalid(format!("PATCH settings: {error}")),
    };
    let base_dir = app
        .runner
        .functions_dir()
        .unwrap_or_else(|| std::path::PathBuf::from("."));
    let settings = match Settings::parse(&merged_text, "PATCH settings", &base_dir) {
        Ok(settings) => settings,
        Err(error) => return invalid(error),
    };
    let def = match FunctionDef::new(
        &name,
        current.bytes.clone(),
        settings,
        &format!("function `{name}`"),
    ) {
        Ok(def) => def,
        Err(error) => return invalid(error),
    };
    apply(app, def, &merged_text).await
}

/// The module bytes and settings text of a deploy request.
async fn read_deploy(
    request: Request<Incoming>,
    limit: usize,
) -> Result<(Bytes, String), Response<GuestBody>> {
    let content_type = request
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let too_large = || {
        error_response(
            StatusCode::PAYLOAD_TOO_LARGE,
            "request_too_large",
            &format!("deploys are limited to {limit} bytes"),
            None,
        )
    };
    if content_type.starts_with("multipart/form-data") {
        let boundary = multer::parse_boundary(&content_type)
            .map_err(|e| invalid(format!("bad multipart request: {e}")))?;
        let constraints = multer::Constraints::new()
            .allowed_fields(vec!["module", "settings"])
            .size_limit(multer::SizeLimit::new().whole_stream(limit as u64));
        let stream = request.into_body().into_data_stream();
        let mut multipart = multer::Multipart::with_constraints(stream, boundary, constraints);
        let mut module = None;
        let mut settings = String::new();
        loop {
            let field = match multipart.next_field().await {
                Ok(Some(field)) => field,
                Ok(None) => break,
                Err(multer::Error::StreamSizeExceeded { .. }) => return Err(too_large()),
                Err(error) => return Err(invalid(format!("bad multipart request: {error}"))),
            };
            let field_name = field.name().unwrap_or("").to_owned();
            let bytes = match field.bytes().await {
                Ok(bytes) => bytes,
                Err(multer::Error::StreamSizeExceeded { .. }) => return Err(too_large()),
                Err(error) => return Err(invalid(format!("bad multipart field `{field_name}`: {error}"))),
            };
            match field_name.as_str() {
                "module" => module = Some(bytes),
                "settings" => {
                    settings = String::from_utf8(bytes.to_vec())
                        .map_err(|_| invalid("the settings part is not UTF-8"))?;
                }
                _ => {}
            }
        }
        let module = module.ok_or_else(|| invalid("the multipart request has no `module` part"))?;
        Ok((module, settings))
    } else {
        let body = http_body_util::Limited::new(request.into_body(), limit)
            .collect()
            .await
            .map_err(|error| {
                if error.is::<http_body_util::LengthLimitError>() {
                    too_large()
                } else {
                    invalid(format!("cannot read the module: {error}"))
                }
            })?
            .to_bytes();
        Ok((body, String::new()))
    }
}
