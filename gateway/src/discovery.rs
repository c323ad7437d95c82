//! Discovery: keep a model's backend set in step with a bitnet-runner and with DNS.
//!
//! One loop per model that has a `runner` or `dns` source. Each round it asks every source
//! what exists, unions that with the backends listed in the config, and swaps the pool's
//! set if it changed. Backends are matched by name (`host:port`), so one that stays keeps
//! its state and probes; a new one gets a prober; a vanished one is retired (its prober
//! stops, its running requests finish). A source that fails keeps its last answer: a
//! runner restart must not empty the pool.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode, Uri};
use http_body_util::BodyExt;
use serde::Deserialize;

use crate::backend::Backend;
use crate::health::spawn_prober;
use crate::pool::ModelPool;
use crate::state::Gateway;

/// One backend a source knows about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    /// `host:port`, the backend's name.
    pub name: String,
    /// Base URL.
    pub url: Uri,
    /// Whether the source says it may take new work.
    pub ready: bool,
}

/// Start a discovery loop for every model with a runner or DNS source that has none yet.
/// Called at start and after a reload.
pub fn spawn(gw: &Arc<Gateway>) {
    let config = gw.config();
    for pool in gw.pools().iter() {
        let has_source = config
            .models
            .iter()
            .any(|m| m.id == pool.id && (m.runner.is_some() || m.dns.is_some()));
        if has_source && !pool.discovering.swap(true, Ordering::AcqRel) {
            gw.spawn_background(discovery_loop(gw.clone(), pool.clone()));
        }
    }
}

async fn discovery_loop(gw: Arc<Gateway>, pool: Arc<ModelPool>) {
    let mut from_runner: Option<Vec<Found>> = None;
    let mut from_dns: Option<Vec<Found>> = None;
    let mut runner_failing = false;
    let mut dns_failing = false;
    while !pool.is_removed() {
        // Read the sources afresh each round: a reload may change or remove them.
        let config = gw.config();
        let Some(model) = config.models.iter().find(|m| m.id == pool.id) else {
            break;
        };
        if model.runner.is_none() && model.dns.is_none() {
            apply(&gw, &pool, &pool.configured(), &[]);
            break;
        }
        match &model.runner {
            Some(runner) => match runner_instances(&gw, runner).await {
                Ok(found) => {
                    if runner_failing {
                        tracing::info!(runner = %runner, "runner reachable again");
                    }
                    runner_failing = false;
                    from_runner = Some(found);
                }
                Err(e) => {
                    if !runner_failing {
                        tracing::warn!(runner = %runner, error = %e, "cannot read the runner's instances; keeping the last known set");
                    }
                    runner_failing = true;
                }
            },
            None => from_runner = None,
        }
        match &model.dns {
            Some(name) => match resolve(name).await {
                Ok(found) => {
                    if dns_failing {
                        tracing::info!(dns = %name, "DNS lookups succeed again");
                    }
                    dns_failing = false;
                    from_dns = Some(found);
                }
                // Once per outage, as for the runner: a line every interval says nothing new.
                Err(e) => {
                    if !dns_failing {
                        tracing::warn!(dns = %name, error = %e, "DNS lookup failed; keeping the last known set");
                    }
                    dns_failing = true;
                }
            },
            None => from_dns = None,
        }
        let found: Vec<Found> = from_runner
            .iter()
            .chain(from_dns.iter())
            .flatten()
            .cloned()
            .collect();
        apply(&gw, &pool, &pool.configured(), &found);
        tokio::time::sleep(config.discovery_interval).await;
    }
    pool.discovering.store(false, Ordering::Release);
}

/// Make the pool's set the statics plus `found`, reusing backends by name.
pub fn apply(gw: &Arc<Gateway>, pool: &Arc<ModelPool>, statics: &[Arc<Backend>], found: &[Found]) {
    let current = pool.backends();
    let by_name: HashMap<&str, &Arc<Backend>> =
        current.iter().map(|b| (b.name.as_str(), b)).collect();
    let mut next: Vec<Arc<Backend>> = statics.to_vec();
    let mut released = false;
    for f in found {
        if next.iter().any(|b| b.name == f.name) {
            continue;
        }
        let b = match by_name.get(f.name.as_str()) {
            Some(b) => Arc::clone(b),
            None => {
                let b = Arc::new(Backend::new(f.name.clone(), f.url.clone(), None));
                tracing::info!(model = %pool.id, backend = %b.name, ready = f.ready, "backend discovered");
                spawn_prober(gw, pool.clone(), b.clone());
                b
            }
        };
        let was_held = b.set_held(!f.ready);
        // Held means "not ready": it changed when the old hold equals the new readiness.
        if was_held == f.ready {
            tracing::info!(model = %pool.id, backend = %b.name, taking_work = f.ready, "supervisor changed the backend's rotation");
        }
        released |= was_held && f.ready;
        next.push(b);
    }
    let changed = next.len() != current.len()
        || next
            .iter()
            .zip(current.iter())
            .any(|(a, b)| !Arc::ptr_eq(a, b));
    if changed {
        for old in current.iter() {
            if !next.iter().any(|b| Arc::ptr_eq(b, old)) {
                tracing::info!(model = %pool.id, backend = %old.name, "backend gone; retired");
                old.retire();
            }
        }
        pool.set_backends(next);
    } else if released {
        pool.dispatch_waiting();
    }
}

#[derive(Deserialize)]
struct Instances {
    instances: Vec<Instance>,
}

#[derive(Deserialize)]
struct Instance {
    url: Option<String>,
    state: String,
}

/// Errors reading the runner.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The request failed.
    #[error("{0}")]
    Http(String),
    /// The answer was not the expected JSON.
    #[error("unexpected answer: {0}")]
    Body(String),
}

/// The runner's instances: `ready` ones take work; `starting`, `draining` and
/// `restarting` ones are kept but held out of rotation; `stopped` and `failed` ones are gone.
async fn runner_instances(gw: &Gateway, runner: &Uri) -> Result<Vec<Found>, SourceError> {
    let base = runner.to_string();
    let uri: Uri = format!("{}/instances", base.trim_end_matches('/'))
        .parse()
        .map_err(|e: http::uri::InvalidUri| SourceError::Http(e.to_string()))?;
    let req = Request::get(uri)
        .body(Bytes::new())
        .expect("static request is valid");
    let fut = async {
        let resp = gw
            .client
            .request(req)
            .await
            .map_err(|e| SourceError::Http(e.to_string()))?;
        if resp.status() != StatusCode::OK {
            return Err(SourceError::Http(format!("status {}", resp.status())));
        }
        resp.into_body()
            .collect()
            .await
            .map(|c| c.to_bytes())
            .map_err(|e| SourceError::Http(e.to_string()))
    };
    let body = tokio::time::timeout(gw.config().health_timeout, fut)
        .await
        .map_err(|_| SourceError::Http("timed out".into()))??;
    let list: Instances =
        serde_json::from_slice(&body).map_err(|e| SourceError::Body(e.to_string()))?;
    Ok(list
        .instances
        .into_iter()
        .filter(|i| {
            matches!(
                i.state.as_str(),
                "ready" | "starting" | "draining" | "restarting"
            )
        })
        .filter_map(|i| {
            let url: Uri = i.url?.parse().ok()?;
            let name = url.authority()?.to_string();
            Some(Found {
                name,
                url,
                ready: i.state == "ready",
            })
        })
        .collect())
}

/// Every address `host:port` resolves to, as a backend.
async fn resolve(name: &str) -> std::io::Result<Vec<Found>> {
    let mut addrs: Vec<std::net::SocketAddr> =
        tokio::time::timeout(Duration::from_secs(5), tokio::net::lookup_host(name))
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "lookup timed out"))??
            .collect();
    addrs.sort();
    addrs.dedup();
    Ok(addrs
        .into_iter()
        .filter_map(|a| {
            let url: Uri = format!("http://{a}").parse().ok()?;
            Some(Found {
                name: a.to_string(),
                url,
                ready: true,
            })
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn localhost_resolves_to_its_addresses_as_backends() {
        let found = resolve("localhost:8101").await.unwrap();
        assert!(!found.is_empty());
        assert!(found.iter().all(|f| f.ready && f.name.ends_with(":8101")));
        assert!(found.iter().any(|f| f.url == "http://127.0.0.1:8101/"));
    }
}
