//! The admin listener: Prometheus text on `/metrics` and a liveness answer on `/healthz`.
//! It is plain HTTP and belongs on a loopback or management address.

use async_trait::async_trait;
use http::{Response, StatusCode};
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;
use pingora::services::listening::Service;

use crate::metrics;

pub struct AdminApp;

fn reply(status: StatusCode, content_type: &str, body: Vec<u8>) -> Response<Vec<u8>> {
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    if let Ok(v) = http::HeaderValue::from_str(content_type) {
        resp.headers_mut().insert(http::header::CONTENT_TYPE, v);
    }
    let len = resp.body().len();
    resp.headers_mut().insert(http::header::CONTENT_LENGTH, len.into());
    resp
}

#[async_trait]
impl ServeHttp for AdminApp {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        match session.req_header().uri.path() {
            "/metrics" => reply(StatusCode::OK, "text/plain; version=0.0.4", metrics::render()),
            "/healthz" => reply(StatusCode::OK, "text/plain", b"ok\n".to_vec()),
            _ => reply(StatusCode::NOT_FOUND, "text/plain", b"not found\n".to_vec()),
        }
    }
}

/// The admin service listening on `address`.
pub fn service(address: &str) -> Service<AdminApp> {
    let mut svc = Service::new("admin".to_string(), AdminApp);
    svc.add_tcp(address);
    svc
}
