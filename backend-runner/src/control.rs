//! The control API, for the gateway, operators and Prometheus.
//!
//! | Route                            | Answer                                                 |
//! |----------------------------------|--------------------------------------------------------|
//! | `GET /instances`                 | `{"instances":[{name,url,pid,state,restarts,uptime_secs,last_exit}]}` |
//! | `POST /instances/{name}/restart` | 202 and the instance; the drained restart runs in the background |
//! | `GET /health`                    | 200 `{"status":"ok","instances":N,"ready":R}`; 503 while shutting down |
//! | `GET /metrics`                   | Prometheus text                                        |
//!
//! The `GET /instances` shape is what the gateway follows; only `ready` instances take work.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::Serialize;
use serde_json::json;
use tokio::net::TcpListener;

use crate::instance::{InstanceView, State};
use crate::runner::RunnerState;

/// Serves the control API on `listener` until the task is dropped.
///
/// The listener is bound by the caller, so that the binary can print the real address (tests
/// use port 0) and a taken port is reported before anything starts.
pub async fn serve(listener: TcpListener, state: Arc<RunnerState>) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(conn) => conn,
            Err(err) => {
                // Usually EMFILE: back off briefly instead of spinning.
                tracing::warn!(error = %err, "control API accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let state = state.clone();
        let svc = service_fn(move |req| {
            let state = state.clone();
            async move { Ok::<_, Infallible>(handle(&state, req)) }
        });
        tokio::spawn(async move {
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                // A client that never finishes its headers must not hold a connection forever.
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), svc);
            if let Err(err) = conn.await {
                tracing::debug!(%peer, error = %err, "control connection ended with an error");
            }
        });
    }
}

fn handle(state: &RunnerState, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let path = req.uri().path().trim_end_matches('/');
    let segments: Vec<&str> = path.split('/').skip(1).collect();
    match (req.method(), segments.as_slice()) {
        (&Method::GET, ["health"]) => {
            let views = state.views();
            let ready = views.iter().filter(|v| v.state == State::Ready).count();
            let (status, word) = if state.is_stopping() {
                (StatusCode::SERVICE_UNAVAILABLE, "stopping")
            } else {
                (StatusCode::OK, "ok")
            };
            json_response(
                status,
                &Health {
                    status: word,
                    instances: views.len(),
                    ready,
                },
            )
        }
        (&Method::GET, ["instances"]) => json_response(
            StatusCode::OK,
            &InstanceList {
                instances: state.views(),
            },
        ),
        (&Method::POST, ["instances", name, "restart"]) => match state.instance(name) {
            None => error(
                StatusCode::NOT_FOUND,
                &format!("no instance named {name:?}"),
            ),
            Some(_) if state.is_stopping() => error(
                StatusCode::CONFLICT,
                "the runner is shutting down; nothing is restarted",
            ),
            Some(inst) => match inst.request_restart() {
                Ok(()) => {
                    tracing::info!(
                        instance = inst.name(),
                        "restart requested through the control API"
                    );
                    json_response(
                        StatusCode::ACCEPTED,
                        &Restarting {
                            instance: inst.view(),
                        },
                    )
                }
                Err(refused) => error(StatusCode::CONFLICT, &refused.to_string()),
            },
        },
        (&Method::GET, ["metrics"]) => Response::builder()
            .status(StatusCode::OK)
            .header(header::CONTENT_TYPE, "text/plain; version=0.0.4")
            .body(Full::new(Bytes::from(state.render_metrics())))
            .unwrap_or_default(),
        (_, ["health" | "instances" | "metrics"] | ["instances", _, "restart"]) => {
            error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed here")
        }
        _ => error(StatusCode::NOT_FOUND, "no such route; try GET /instances"),
    }
}

// The documents are serialized from structs, not through a `serde_json::Value` (whose map
// sorts its keys), so that fields keep their documented order.

/// The `GET /health` document.
#[derive(Serialize)]
struct Health {
    status: &'static str,
    instances: usize,
    ready: usize,
}

/// The `GET /instances` document.
#[derive(Serialize)]
struct InstanceList {
    instances: Vec<InstanceView>,
}

/// The `202` answer to `POST /instances/NAME/restart`.
#[derive(Serialize)]
struct Restarting {
    instance: InstanceView,
}

fn json_response(status: StatusCode, value: &impl Serialize) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(
            serde_json::to_vec(value).unwrap_or_default(),
        )))
        .unwrap_or_default()
}

fn error(status: StatusCode, message: &str) -> Response<Full<Bytes>> {
    json_response(
        status,
        &json!({"error": {"message": message, "code": status.as_u16()}}),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn health_keeps_its_documented_field_order() {
        let resp = json_response(
            StatusCode::OK,
            &Health {
                status: "ok",
                instances: 2,
                ready: 1,
            },
        );
        assert_eq!(resp.headers()[header::CONTENT_TYPE], "application/json");
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], br#"{"status":"ok","instances":2,"ready":1}"#);
    }
}
