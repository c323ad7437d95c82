//! Reload: apply a new configuration to a running gateway without dropping in-flight work.
//!
//! The new config is validated before anything changes (an invalid one is refused whole and
//! the old one stays). Then, model by model: a kept model keeps its pool, and so its queue
//! and running requests, and gets the new limits, policy and backends; a backend that stays
//! (same name, URL, slots and dialect) keeps its state and probes; a removed backend or model
//! is retired, while requests already on it run to their end. Keys, limits and timeouts
//! apply to the next request or connection. Changing the listen address, or turning TLS on
//! or off, needs a restart and is reported as such.

use std::sync::Arc;

use crate::backend::Backend;
use crate::config::{BackendConfig, Config};
use crate::discovery;
use crate::health::spawn_prober;
use crate::pool::{ModelPool, QueueLimits};
use crate::state::Gateway;
use crate::tls::TlsError;

/// Why a reload was refused.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The new certificate or key is unusable.
    #[error(transparent)]
    Tls(#[from] TlsError),
}

/// What a reload changed, for the log.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Reloaded {
    /// Models added.
    pub models_added: Vec<String>,
    /// Models removed.
    pub models_removed: Vec<String>,
    /// Backends added, over all models.
    pub backends_added: usize,
    /// Backends retired, over all models.
    pub backends_removed: usize,
    /// Settings that changed but need a restart to take effect.
    pub need_restart: Vec<&'static str>,
}

fn same_backend(b: &Backend, c: &BackendConfig) -> bool {
    b.name == c.name
        && b.base == c.url
        && b.configured_slots == c.slots
        && b.dialect_setting() == c.dialect
}

impl Gateway {
    /// Apply `new` (already validated). In-flight requests are untouched.
    pub fn reload(self: &Arc<Self>, new: Config) -> Result<Reloaded, ReloadError> {
        let old = self.config();
        let mut out = Reloaded::default();
        // Everything that can fail comes first, so a refusal changes nothing.
        match (&self.tls, &new.tls) {
            (Some(tls), Some((cert, key))) => tls.reload_from(cert, key)?,
            (None, None) => {}
            _ => out
                .need_restart
                .push("tls_cert/tls_key (turning TLS on or off)"),
        }
        if new.listen != old.listen {
            out.need_restart.push("listen");
        }
        if new.workers != old.workers {
            out.need_restart.push("workers");
        }
        if new.upstream_ca_file != old.upstream_ca_file
            || new.connect_timeout != old.connect_timeout
        {
            out.need_restart
                .push("upstream.ca_file/connect_timeout_secs");
        }
        let limits = QueueLimits {
            max: new.queue_max,
            per_slot: new.queue_per_slot,
            timeout: new.queue_timeout,
            aging: new.queue_aging,
        };
        let old_pools = self.pools();
        let mut pools = Vec::with_capacity(new.models.len());
        let mut fresh_backends = Vec::new();
        for m in &new.models {
            let existing = old_pools.iter().find(|p| p.id == m.id).cloned();
            let kept = existing
                .as_ref()
                .map(|p| p.configured())
                .unwrap_or_default();
            let backends: Vec<Arc<Backend>> = m
                .backends
                .iter()
                .map(|c| match kept.iter().find(|b| same_backend(b, c)) {
                    Some(b) => b.clone(),
                    None => {
                        let b = Arc::new(Backend::with_dialect(
                            c.name.clone(),
                            c.url.clone(),
                            c.slots,
                            c.dialect,
                        ));
                        fresh_backends.push(b.clone());
                        b
                    }
                })
                .collect();
            for b in &kept {
                if !backends.iter().any(|n| Arc::ptr_eq(n, b)) {
                    b.retire();
                    out.backends_removed += 1;
                }
            }
            let pool = match existing {
                Some(pool) => {
                    pool.reconfigure(limits, new.policy.build(new.routing));
                    pool
                }
                None => {
                    out.models_added.push(m.id.clone());
                    Arc::new(ModelPool::new(
                        m.id.clone(),
                        Vec::new(),
                        new.policy.build(new.routing),
                        limits,
                    ))
                }
            };
            // Keep what discovery found; it refreshes on its next round.
            let discovered: Vec<Arc<Backend>> = pool
                .backends()
                .iter()
                .filter(|b| !kept.iter().any(|k| Arc::ptr_eq(k, b)) && !b.is_retired())
                .cloned()
                .collect();
            pool.set_configured(backends.clone());
            pool.set_backends(backends.into_iter().chain(discovered).collect());
            pools.push(pool);
        }
        for p in old_pools.iter() {
            if !pools.iter().any(|n| Arc::ptr_eq(n, p)) {
                out.models_removed.push(p.id.clone());
                p.remove();
                for b in p.backends().iter() {
                    b.retire();
                    out.backends_removed += 1;
                }
            }
        }
        // Names: add the new, then drop those no longer configured.
        for (m, pool) in new.models.iter().zip(&pools) {
            for name in std::iter::once(&m.id).chain(&m.aliases) {
                self.names.insert(name.clone(), pool.clone());
            }
        }
        self.names.retain(|name, _| {
            new.models
                .iter()
                .any(|m| &m.id == name || m.aliases.contains(name))
        });
        resize(&self.connections, old.max_connections, new.max_connections);
        resize(
            &self.body_budget,
            old.max_buffered_body_bytes,
            new.max_buffered_body_bytes,
        );
        out.backends_added = fresh_backends.len();
        self.install(new, pools.clone());
        for b in fresh_backends {
            if let Some(pool) = pools
                .iter()
                .find(|p| p.configured().iter().any(|c| Arc::ptr_eq(c, &b)))
            {
                spawn_prober(self, pool.clone(), b);
            }
        }
        discovery::spawn(self);
        Ok(out)
    }
}

/// Grow or shrink a limit counted by a semaphore. Shrinking takes effect as the permits
/// held now are returned.
fn resize(sem: &tokio::sync::Semaphore, old: usize, new: usize) {
    if new > old {
        sem.add_permits(new - old);
    } else if new < old {
        sem.forget_permits(old - new);
    }
}
