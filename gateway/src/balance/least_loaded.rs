//! Least-loaded, slot-aware selection.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use super::{Pick, Policy};
use crate::backend::Backend;
use crate::job::Job;

/// Picks the routable backend with the most free slots.
///
/// Ties are broken by rotating the scan's starting point, so equally idle backends share
/// work instead of the first one in the list taking every request (which would also keep
/// the others' prompt caches and page caches cold).
#[derive(Debug, Default)]
pub struct LeastLoaded {
    next: AtomicUsize,
}

impl Policy for LeastLoaded {
    fn pick(&self, backends: &[Arc<Backend>], _job: &Job) -> Option<Pick> {
        let n = backends.len();
        if n == 0 {
            return None;
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed) % n;
        let mut best: Option<(usize, u32)> = None;
        for k in 0..n {
            let i = (start + k) % n;
            let b = &backends[i];
            if !b.is_routable() {
                continue;
            }
            let free = b.free_slots();
            // Strictly greater: among equals, the first one after `start` wins.
            if best.is_none_or(|(_, f)| free > f) {
                best = Some((i, free));
            }
        }
        best.map(|(i, _)| Pick::backend(i))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::Health;

    fn backend(name: &str, slots: u32, inflight: u32) -> Arc<Backend> {
        let b = Backend::new(name.into(), "http://h:1".parse().unwrap(), Some(slots));
        b.set_health(Health::Up);
        for _ in 0..inflight {
            b.add_inflight();
        }
        Arc::new(b)
    }

    fn pick(p: &dyn Policy, bs: &[Arc<Backend>]) -> Option<usize> {
        p.pick(bs, &Job::default()).map(|p| p.index)
    }

    #[test]
    fn picks_the_backend_with_most_free_slots() {
        let p = LeastLoaded::default();
        let bs = vec![backend("a", 4, 3), backend("b", 4, 1), backend("c", 2, 0)];
        for _ in 0..5 {
            assert_eq!(pick(&p, &bs), Some(1), "b has 3 free, c 2, a 1");
        }
    }

    #[test]
    fn ties_rotate_between_equally_free_backends() {
        let p = LeastLoaded::default();
        let bs = vec![backend("a", 2, 0), backend("b", 2, 0), backend("c", 2, 0)];
        let picks: Vec<_> = (0..6).map(|_| pick(&p, &bs).unwrap()).collect();
        for i in 0..3 {
            assert_eq!(picks.iter().filter(|&&x| x == i).count(), 2, "{picks:?}");
        }
    }

    #[test]
    fn skips_full_and_unhealthy_backends() {
        let p = LeastLoaded::default();
        let down = backend("down", 8, 0);
        down.set_health(Health::Down);
        let bs = vec![down, backend("full", 1, 1), backend("ok", 1, 0)];
        assert_eq!(pick(&p, &bs), Some(2));
        let bs = vec![backend("full", 1, 1)];
        assert_eq!(pick(&p, &bs), None);
        assert_eq!(pick(&p, &[]), None);
    }
}
