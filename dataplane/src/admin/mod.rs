//! The admin listener: `/` (a live status page), `/status`, `/metrics`, `/healthz` and
//! `/table`, served by Pingora's HTTP app on `--admin`. It reads the plane; it never changes
//! it. Loopback by default; it exposes the whole routing table, so binding it elsewhere needs a
//! bearer token (`--admin-token-file`), which then guards everything but `/healthz` (compared
//! in constant time), which stays open for liveness probes.

mod status;

use std::sync::Arc;

use async_trait::async_trait;
use http::{Method, Response, StatusCode};
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;

use crate::clock;
use crate::plane::Plane;

pub struct Admin {
    plane: Arc<Plane>,
    token: Option<Vec<u8>>,
}

impl Admin {
    pub fn new(plane: Arc<Plane>, token: Option<String>) -> Self {
        Admin {
            plane,
            token: token.map(String::into_bytes),
        }
    }

    fn admits(&self, authorization: Option<&[u8]>) -> bool {
        self.token
            .as_deref()
            .is_none_or(|token| rusty_shared::auth::bearer_matches(authorization, token))
    }

    /// The response for one admin request (method, path, Authorization header): pure apart from
    /// reading the store.
    pub fn answer(
        &self,
        method: &Method,
        path: &str,
        authorization: Option<&[u8]>,
    ) -> (StatusCode, &'static str, Vec<u8>) {
        const TEXT: &str = "text/plain; charset=utf-8";
        if method != Method::GET && method != Method::HEAD {
            return (StatusCode::METHOD_NOT_ALLOWED, TEXT, b"only GET\n".to_vec());
        }
        if path != "/healthz" && !self.admits(authorization) {
            return (
                StatusCode::UNAUTHORIZED,
                TEXT,
                b"missing or wrong bearer token\n".to_vec(),
            );
        }
        let plane = &*self.plane;
        let snap = plane.store.current();
        match path {
            "/metrics" => {
                let now = clock::now_ms();
                for svc in snap.iter().flat_map(|s| &s.services) {
                    for (i, b) in svc.backends.iter().enumerate() {
                        b.counters.set_ejected(svc.balancer.ejected(i as u32, now));
                    }
                }
                let mut body = String::new();
                plane
                    .metrics
                    .render(snap.as_ref().map(|s| s.version), &mut body);
                (
                    StatusCode::OK,
                    "text/plain; version=0.0.4",
                    body.into_bytes(),
                )
            }
            "/healthz" => match &snap {
                Some(s) => (
                    StatusCode::OK,
                    TEXT,
                    format!("ok: table version {}\n", s.version).into_bytes(),
                ),
                None => (
                    StatusCode::SERVICE_UNAVAILABLE,
                    TEXT,
                    b"no table installed yet\n".to_vec(),
                ),
            },
            "/" => (
                StatusCode::OK,
                "text/html; charset=utf-8",
                include_bytes!("page.html").to_vec(),
            ),
            "/status" => (
                StatusCode::OK,
                "application/json",
                status::status(plane, clock::now_ms())
                    .to_string()
                    .into_bytes(),
            ),
            "/table" => match &snap {
                Some(s) => (
                    StatusCode::OK,
                    "application/json",
                    s.table.to_json().into_bytes(),
                ),
                None => (
                    StatusCode::NOT_FOUND,
                    TEXT,
                    b"no table installed yet\n".to_vec(),
                ),
            },
            _ => (
                StatusCode::NOT_FOUND,
                TEXT,
                b"not found: try /, /status, /metrics, /healthz or /table\n".to_vec(),
            ),
        }
    }
}

#[async_trait]
impl ServeHttp for Admin {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let req = session.req_header();
        let auth = req
            .headers
            .get(http::header::AUTHORIZATION)
            .map(|v| v.as_bytes());
        let (status, content_type, body) = self.answer(&req.method, req.uri.path(), auth);
        let body = if req.method == Method::HEAD {
            Vec::new()
        } else {
            body
        };
        Response::builder()
            .status(status)
            .header(http::header::CONTENT_TYPE, content_type)
            .header(http::header::CONTENT_LENGTH, body.len())
            .body(body)
            .unwrap_or_default()
    }
}
