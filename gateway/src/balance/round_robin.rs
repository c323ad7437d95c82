//! Round-robin selection, the baseline that ignores load.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use super::{Pick, Policy};
use crate::backend::Backend;
use crate::job::Job;

/// Takes routable backends in turn. It still honours slots (a full backend is skipped),
/// so it differs from least-loaded only in ignoring *how* free each backend is.
#[derive(Debug, Default)]
pub struct RoundRobin {
    next: AtomicUsize,
}

impl Policy for RoundRobin {
    fn pick(&self, backends: &[Arc<Backend>], _job: &Job) -> Option<Pick> {
        let n = backends.len();
        if n == 0 {
            return None;
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed) % n;
        (0..n)
            .map(|k| (start + k) % n)
            .find(|&i| backends[i].is_routable())
            .map(Pick::backend)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::Health;

    fn pick(p: &dyn Policy, bs: &[Arc<Backend>]) -> Option<usize> {
        p.pick(bs, &Job::default()).map(|p| p.index)
    }

    #[test]
    fn cycles_through_routable_backends_regardless_of_load() {
        let p = RoundRobin::default();
        let bs: Vec<_> = (0..3)
            .map(|i| {
                let b = Backend::new(format!("b{i}"), "http://h:1".parse().unwrap(), Some(4));
                b.set_health(Health::Up);
                Arc::new(b)
            })
            .collect();
        bs[0].add_inflight();
        bs[0].add_inflight();
        let picks: Vec<_> = (0..3).map(|_| pick(&p, &bs).unwrap()).collect();
        assert_eq!(picks, vec![0, 1, 2]);
    }
}
