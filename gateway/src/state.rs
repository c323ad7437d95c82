//! The gateway's shared state: models, their pools, and the upstream client.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use dashmap::DashMap;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::backend::Backend;
use crate::config::Config;
use crate::fasthash::FastHash;
use crate::forward::{upstream_client, UpstreamClient};
use crate::metrics::Metrics;
use crate::pool::{ModelPool, QueueLimits};
use crate::tls::{TlsError, TlsReloader};

/// Everything a request needs, shared by all connections.
#[derive(Debug)]
pub struct Gateway {
    /// The configuration in force; replaced whole by a reload.
    config: RwLock<Arc<Config>>,
    /// One pool per model, in config order; replaced whole by a reload.
    pools: RwLock<Arc<Vec<Arc<ModelPool>>>>,
    /// Model ids and aliases to their pool. Read on every request, so a concurrent map.
    pub(crate) names: DashMap<String, Arc<ModelPool>, FastHash>,
    /// Client connections allowed at once (resized by a reload).
    pub(crate) connections: Arc<Semaphore>,
    /// Request body bytes that may be held in memory at once, one permit per byte
    /// (resized by a reload).
    pub(crate) body_budget: Arc<Semaphore>,
    /// Pooled keep-alive connections to every backend.
    pub client: UpstreamClient,
    /// Prometheus metrics.
    pub metrics: Arc<Metrics>,
    shutting_down: AtomicBool,
    /// Probes and discovery loops; aborted when serving ends.
    background: Mutex<JoinSet<()>>,
    /// The HTTPS certificate in force, when serving HTTPS.
    pub tls: Option<TlsReloader>,
}

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A certificate, key or CA file is unusable.
    #[error(transparent)]
    Tls(#[from] TlsError),
}

impl Gateway {
    /// Build the pools, the client and the TLS acceptor from a validated config.
    pub fn new(config: Config) -> Result<Arc<Gateway>, StartError> {
        let names = DashMap::with_hasher(FastHash::default());
        let limits = QueueLimits {
            max: config.queue_max,
            per_slot: config.queue_per_slot,
            timeout: config.queue_timeout,
            aging: config.queue_aging,
        };
        let mut pools = Vec::with_capacity(config.models.len());
        for m in &config.models {
            let backends = m
                .backends
                .iter()
                .map(|b| {
                    Arc::new(Backend::with_dialect(
                        b.name.clone(),
                        b.url.clone(),
                        b.slots,
                        b.dialect,
                    ))
                })
                .collect();
            let pool = Arc::new(ModelPool::new(
                m.id.clone(),
                backends,
                config.policy.build(config.routing),
                limits,
            ));
            for name in std::iter::once(&m.id).chain(&m.aliases) {
                names.insert(name.clone(), pool.clone());
            }
            pools.push(pool);
        }
        let connections = Arc::new(Semaphore::new(config.max_connections));
        let body_budget = Arc::new(Semaphore::new(config.max_buffered_body_bytes));
        let client = upstream_client(&config)?;
        let tls = match &config.tls {
            Some((cert, key)) => Some(TlsReloader::load(cert, key)?),
            None => None,
        };
        Ok(Arc::new(Gateway {
            config: RwLock::new(Arc::new(config)),
            pools: RwLock::new(Arc::new(pools)),
            names,
            connections,
            body_budget,
            client,
            metrics: Arc::new(Metrics::new()),
            shutting_down: AtomicBool::new(false),
            background: Mutex::new(JoinSet::new()),
            tls,
        }))
    }

    /// The configuration in force.
    pub fn config(&self) -> Arc<Config> {
        self.config
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The model pools, in config order.
    pub fn pools(&self) -> Arc<Vec<Arc<ModelPool>>> {
        self.pools.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Swap in a reloaded configuration and pool list.
    pub(crate) fn install(&self, config: Config, pools: Vec<Arc<ModelPool>>) {
        *self.config.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(config);
        *self.pools.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(pools);
    }

    /// The pool for a request's `model` field.
    ///
    /// A named model is looked up by id or alias; a missing one goes to the default model,
    /// or to the only model when there is just one (there is nothing to choose between).
    /// `Err` carries the unknown name, or `None` when the request named no model and there
    /// are several to choose from.
    pub fn resolve(&self, model: Option<&str>) -> Result<Arc<ModelPool>, Option<String>> {
        if let Some(name) = model {
            if let Some(p) = self.names.get(name) {
                return Ok(p.clone());
            }
        }
        if let Some(d) = &self.config().default_model {
            if let Some(p) = self.names.get(d) {
                return Ok(p.clone());
            }
        }
        match (model, self.pools().as_slice()) {
            (None, [only]) => Ok(only.clone()),
            (None, _) => Err(None),
            (Some(name), _) => Err(Some(name.to_string())),
        }
    }

    /// Stop taking new work (SIGTERM): queued and new requests get 503.
    pub fn begin_shutdown(&self) {
        self.shutting_down.store(true, Ordering::Release);
    }

    /// Run a background task until [`Gateway::stop_background`].
    pub fn spawn_background(&self, task: impl std::future::Future<Output = ()> + Send + 'static) {
        let mut set = self.background.lock().unwrap_or_else(|e| e.into_inner());
        // Reap finished tasks so the set does not grow with retired backends' probers.
        while set.try_join_next().is_some() {}
        set.spawn(task);
    }

    /// Abort every background task.
    pub fn stop_background(&self) {
        self.background
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .abort_all();
    }

    /// Whether shutdown has begun.
    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::Acquire)
    }
}
