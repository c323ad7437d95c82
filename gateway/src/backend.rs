//! One llama-server backend as the gateway sees it.
//!
//! The request path only reads this state (and bumps `inflight` under its pool's lock);
//! the health prober and the relay bodies write it. Everything is an atomic so that a
//! routing decision never waits on I/O.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::Instant;

use http::uri::PathAndQuery;
use http::{HeaderValue, Uri};

use crate::dialect::{DialectCell, DialectSetting};
use crate::ledger::Ledger;

/// How long a backend's self-reported load is trusted: a few probe periods.
const REPORT_TTL_MS: u64 = 5_000;

/// Health of a backend, as a small state machine driven by probes and by proxying.
///
/// `Unknown → Up | Loading | Down`, `Up ⇄ Down`, `Loading → Up`. Only `Up` is routed to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Health {
    /// Not probed yet. Requests queue rather than fail, because it may come up any moment.
    Unknown = 0,
    /// `/health` answered 200.
    Up = 1,
    /// `/health` answered 503 "Loading model": alive but not ready.
    Loading = 2,
    /// Connection refused or reset, or repeated probe failures.
    Down = 3,
}

impl Health {
    fn from_u8(v: u8) -> Health {
        match v {
            1 => Health::Up,
            2 => Health::Loading,
            3 => Health::Down,
            _ => Health::Unknown,
        }
    }

    /// Lower-case name for JSON and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Unknown => "unknown",
            Health::Up => "up",
            Health::Loading => "loading",
            Health::Down => "down",
        }
    }
}

/// A backend: its address, capacity and live state.
#[derive(Debug)]
pub struct Backend {
    /// Stable name used in logs, headers and metrics labels.
    pub name: String,
    /// `name` as the value of the `X-Backend` response header, made once (`None` if the
    /// name is not a valid header value).
    pub name_header: Option<HeaderValue>,
    /// Base URL, e.g. `http://127.0.0.1:8101`. Request paths are appended to it.
    pub base: Uri,
    /// Slot count fixed by configuration; `None` means "discover from `/props`".
    pub configured_slots: Option<u32>,
    /// The API dialect it speaks (configured, or detected when it comes up).
    pub dialect: DialectCell,
    /// Whether the dialect is detected rather than configured.
    pub detect_dialect: bool,
    dialect_setting: DialectSetting,
    /// Context size per slot in tokens, from `/props`; 0 while unknown.
    n_ctx: AtomicU32,
    slots: AtomicU32,
    /// Slot count the backend itself reported in `/props`; 0 while unknown. Only slot ids
    /// below it are ever sent: the older BitNet server defers a request for a slot it does
    /// not have forever.
    props_slots: AtomicU32,
    /// What predicted-TTFT routing knows of its slots and speed.
    ledger: Mutex<Ledger>,
    inflight: AtomicU32,
    health: AtomicU8,
    /// Taken out of its pool (discovery lost it, or a reload removed it): its prober stops.
    retired: AtomicBool,
    /// Held out of rotation by its supervisor (the runner says it is starting, draining
    /// before a planned restart, or restarting): takes no new work, keeps its running work.
    held: AtomicBool,
    /// Requests the backend itself reports as processing or deferred (its own count,
    /// which includes other gateways' requests), this gateway's in-flight count when that
    /// was read, and when.
    reported_busy: AtomicU32,
    own_at_report: AtomicU32,
    reported_at_ms: AtomicU64,
    /// What `reported_at_ms` counts from.
    epoch: Instant,
}

impl Backend {
    /// A backend in state `Unknown`, with `slots` from config or 1 until discovered.
    pub fn new(name: String, base: Uri, configured_slots: Option<u32>) -> Backend {
        Backend::with_dialect(name, base, configured_slots, DialectSetting::Auto)
    }

    /// As [`Backend::new`], with a dialect setting.
    pub fn with_dialect(
        name: String,
        base: Uri,
        configured_slots: Option<u32>,
        dialect: DialectSetting,
    ) -> Backend {
        Backend {
            name_header: HeaderValue::from_str(&name).ok(),
            name,
            base,
            configured_slots,
            dialect: DialectCell::new(dialect),
            detect_dialect: dialect == DialectSetting::Auto,
            dialect_setting: dialect,
            n_ctx: AtomicU32::new(0),
            slots: AtomicU32::new(configured_slots.unwrap_or(1)),
            props_slots: AtomicU32::new(0),
            ledger: Mutex::new(Ledger::default()),
            inflight: AtomicU32::new(0),
            health: AtomicU8::new(Health::Unknown as u8),
            retired: AtomicBool::new(false),
            held: AtomicBool::new(false),
            reported_busy: AtomicU32::new(0),
            own_at_report: AtomicU32::new(0),
            reported_at_ms: AtomicU64::new(0),
            epoch: Instant::now(),
        }
    }

    /// Current health.
    pub fn health(&self) -> Health {
        Health::from_u8(self.health.load(Ordering::Acquire))
    }

    /// Set the health; returns the previous value so callers can log transitions.
    pub fn set_health(&self, h: Health) -> Health {
        Health::from_u8(self.health.swap(h as u8, Ordering::AcqRel))
    }

    /// Slot count in force (configured or discovered).
    pub fn slots(&self) -> u32 {
        self.slots.load(Ordering::Acquire)
    }

    /// Record a discovered slot count; ignored when the count is fixed by config.
    pub fn set_discovered_slots(&self, n: u32) {
        self.props_slots.store(n, Ordering::Release);
        if self.configured_slots.is_none() {
            self.slots.store(n.max(1), Ordering::Release);
        }
    }

    /// Whether `id_slot = slot` names a slot the backend said it has.
    pub fn has_slot(&self, slot: u32) -> bool {
        slot < self.props_slots.load(Ordering::Acquire)
    }

    /// The routing ledger. Held only for short, non-blocking bookkeeping.
    pub fn ledger(&self) -> MutexGuard<'_, Ledger> {
        self.ledger.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether it may be given new work at all, full or not: up, not held, not retired.
    pub fn is_available(&self) -> bool {
        self.health() == Health::Up && !self.is_held() && !self.is_retired()
    }

    /// The dialect as configured (`Auto` when detected).
    pub fn dialect_setting(&self) -> DialectSetting {
        self.dialect_setting
    }

    /// Context per slot in tokens, if known.
    pub fn n_ctx(&self) -> Option<u32> {
        match self.n_ctx.load(Ordering::Acquire) {
            0 => None,
            n => Some(n),
        }
    }

    /// Record the context per slot read from `/props`.
    pub fn set_n_ctx(&self, n: u32) {
        self.n_ctx.store(n, Ordering::Release);
    }

    /// Requests currently holding a slot on this backend.
    pub fn inflight(&self) -> u32 {
        self.inflight.load(Ordering::Acquire)
    }

    /// Busy slots: our own in-flight requests, live, plus the others' share of what the
    /// backend last reported (its count minus ours at that moment), while recent enough to
    /// trust. Our own part is never taken from the stale report: a request of ours that
    /// ends frees its slot at once instead of at the next poll.
    pub fn busy(&self) -> u32 {
        let own = self.inflight();
        let at = self.reported_at_ms.load(Ordering::Acquire);
        if at == 0 || self.now_ms().saturating_sub(at) > REPORT_TTL_MS {
            return own;
        }
        let others = self
            .reported_busy
            .load(Ordering::Acquire)
            .saturating_sub(self.own_at_report.load(Ordering::Acquire));
        own + others
    }

    /// Free slots, never negative: slots can shrink under requests already running.
    pub fn free_slots(&self) -> u32 {
        self.slots().saturating_sub(self.busy())
    }

    /// Whether a policy may send a new request here.
    pub fn is_routable(&self) -> bool {
        self.is_available() && self.free_slots() > 0
    }

    /// Record the load the backend reports about itself (`/metrics` or `/slots`), read by
    /// a probe sent when `own_when_asked` of our requests were in flight.
    ///
    /// The backend counted at some moment between the probe's start and now. Of the two
    /// counts of our own requests, the larger is taken as what it saw of ours: when ours end
    /// meanwhile (a thousand streams finishing at once; on a one-slot backend, the one
    /// request ending just after the probe went out), the smaller count would leave them in
    /// the report as other gateways' requests, slots that look taken until the next report
    /// although they are free.
    pub fn set_reported_busy(&self, n: u32, own_when_asked: u32) {
        self.own_at_report
            .store(own_when_asked.max(self.inflight()), Ordering::Release);
        self.reported_busy.store(n, Ordering::Release);
        self.reported_at_ms
            .store(self.now_ms().max(1), Ordering::Release);
    }

    /// Hold out of rotation (or release); returns the previous value.
    pub fn set_held(&self, on: bool) -> bool {
        self.held.swap(on, Ordering::AcqRel)
    }

    /// Whether it is held out of rotation.
    pub fn is_held(&self) -> bool {
        self.held.load(Ordering::Acquire)
    }

    /// Take it out of service for good.
    pub fn retire(&self) {
        self.retired.store(true, Ordering::Release);
    }

    /// Whether it was taken out of its pool.
    pub fn is_retired(&self) -> bool {
        self.retired.load(Ordering::Acquire)
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Only called by the pool, under its lock, when a slot guard is created or dropped.
    pub(crate) fn add_inflight(&self) {
        self.inflight.fetch_add(1, Ordering::AcqRel);
    }

    pub(crate) fn sub_inflight(&self) {
        self.inflight.fetch_sub(1, Ordering::AcqRel);
    }

    /// The upstream URI for `path_and_query` on this backend.
    pub fn uri_for(&self, path_and_query: &str) -> Uri {
        let mut parts = self.base.clone().into_parts();
        let base_path = parts
            .path_and_query
            .as_ref()
            .map(|p| p.path().trim_end_matches('/'))
            .unwrap_or("");
        let joined = format!("{base_path}{path_and_query}");
        parts.path_and_query = Some(joined.parse().unwrap_or_else(|_| "/".parse().unwrap()));
        Uri::from_parts(parts).unwrap_or_else(|_| self.base.clone())
    }

    /// [`uri_for`](Self::uri_for) for a path and query hyper has already parsed: when the
    /// base URL has no path of its own, as usual, it is used as it is instead of being
    /// formatted and parsed again on every request.
    pub fn uri_for_parsed(&self, path_and_query: &PathAndQuery) -> Uri {
        if !matches!(self.base.path(), "" | "/") {
            return self.uri_for(path_and_query.as_str());
        }
        let mut parts = self.base.clone().into_parts();
        parts.path_and_query = Some(path_and_query.clone());
        Uri::from_parts(parts).unwrap_or_else(|_| self.uri_for(path_and_query.as_str()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uri_for_joins_base_path_and_request_path() {
        let b = Backend::new("b".into(), "http://10.0.0.1:8101/".parse().unwrap(), None);
        assert_eq!(
            b.uri_for("/v1/chat/completions?x=1").to_string(),
            "http://10.0.0.1:8101/v1/chat/completions?x=1"
        );
        let b = Backend::new("b".into(), "http://h:1/prefix".parse().unwrap(), None);
        assert_eq!(b.uri_for("/health").to_string(), "http://h:1/prefix/health");
    }

    #[test]
    fn a_parsed_path_gives_the_same_uri() {
        for base in [
            "http://10.0.0.1:8101",
            "http://10.0.0.1:8101/",
            "https://h/prefix/",
        ] {
            let b = Backend::new("b".into(), base.parse().unwrap(), None);
            for pq in ["/v1/chat/completions?x=1", "/health", "/"] {
                let parsed: PathAndQuery = pq.parse().unwrap();
                assert_eq!(b.uri_for_parsed(&parsed), b.uri_for(pq), "{base} {pq}");
            }
        }
    }

    #[test]
    fn configured_slots_are_not_overridden_by_discovery() {
        let b = Backend::new("b".into(), "http://h:1".parse().unwrap(), Some(3));
        b.set_discovered_slots(8);
        assert_eq!(b.slots(), 3);
        let d = Backend::new("d".into(), "http://h:1".parse().unwrap(), None);
        d.set_discovered_slots(8);
        assert_eq!(d.slots(), 8);
    }

    #[test]
    fn reported_load_adds_only_other_gateways_requests() {
        let b = Backend::new("b".into(), "http://h:1".parse().unwrap(), Some(2));
        b.set_health(Health::Up);
        // One request of ours is running; the backend reports two: one is someone else's.
        b.add_inflight();
        b.set_reported_busy(2, 1);
        assert_eq!(b.busy(), 2);
        assert!(!b.is_routable());
        // Ours ends: its slot is free now, not at the next poll.
        b.sub_inflight();
        assert_eq!(b.busy(), 1);
        assert!(b.is_routable());
        // Nothing of ours, one reported: the other gateway's request still counts.
        let c = Backend::new("c".into(), "http://h:1".parse().unwrap(), Some(1));
        c.set_health(Health::Up);
        c.set_reported_busy(1, 0);
        assert!(!c.is_routable());
    }

    #[test]
    fn requests_of_ours_that_end_while_the_load_is_read_are_not_taken_for_others() {
        // A one-slot backend, its one request ours: the probe goes out, the backend
        // counts it, and it ends before the answer is read.
        let b = Backend::new("b".into(), "http://h:1".parse().unwrap(), Some(1));
        b.set_health(Health::Up);
        b.add_inflight();
        let own_when_asked = b.inflight();
        b.sub_inflight();
        b.set_reported_busy(1, own_when_asked);
        assert_eq!(b.busy(), 0, "the slot is free, not held by a phantom");
        assert!(b.is_routable());
        // One that starts meanwhile, which the backend may not have counted yet, is ours
        // too: the report leaves nothing to others.
        let c = Backend::new("c".into(), "http://h:1".parse().unwrap(), Some(2));
        c.set_health(Health::Up);
        c.add_inflight();
        c.set_reported_busy(0, 0);
        assert_eq!(c.busy(), 1);
    }

    #[test]
    fn only_up_backends_with_free_slots_are_routable() {
        let b = Backend::new("b".into(), "http://h:1".parse().unwrap(), Some(1));
        assert!(!b.is_routable(), "unknown is not routable");
        b.set_health(Health::Up);
        assert!(b.is_routable());
        b.add_inflight();
        assert!(!b.is_routable(), "full is not routable");
        b.sub_inflight();
        b.set_health(Health::Loading);
        assert!(!b.is_routable());
    }
}
