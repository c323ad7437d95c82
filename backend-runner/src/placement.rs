//! CPU placement: which cores each instance may run on.
//!
//! llama-server's generation speed on CPU depends on its threads not fighting another
//! instance's threads for the same cores, so with `pin = true` every instance gets a disjoint
//! set of as many cores as it has threads. The sets are carved from the cores this process may
//! use (its own affinity mask, which respects taskset, cgroups' cpusets and systemd's
//! `CPUAffinity=`), in ascending order. On common x86 servers the kernel numbers every physical
//! core before its hyperthread siblings, so consecutive blocks land on distinct physical cores
//! until the physical cores run out.
//!
//! [`place`] is a pure function; [`allowed_cpus`] reads the mask and the launcher applies a set
//! with `sched_setaffinity` in the child before it execs llama-server.

use std::collections::BTreeMap;

use nix::sched::{sched_getaffinity, CpuSet};
use nix::unistd::Pid;

/// What one instance asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Demand<'a> {
    /// Instance name, for error messages.
    pub name: &'a str,
    /// Number of cores wanted when none are given explicitly.
    pub threads: usize,
    /// Exact cores, when configured.
    pub cpus: Option<&'a [usize]>,
}

/// Why a layout is impossible.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlacementError {
    /// More cores asked for than remain.
    #[error(
        "pinning needs {needed} cores ({detail}) but this process may only use {available}: {allowed}; \
         lower `instances` or `threads`, or turn `pin` off"
    )]
    NotEnoughCores {
        /// Cores asked for in total.
        needed: usize,
        /// Cores allowed.
        available: usize,
        /// Per-instance breakdown.
        detail: String,
        /// The allowed cores as a list like `0-15`.
        allowed: String,
    },
    /// An explicit core is outside this process's mask.
    #[error("instance {name}: core {cpu} is not one this process may use ({allowed})")]
    NotAllowed {
        /// Instance.
        name: String,
        /// The core.
        cpu: usize,
        /// The allowed cores.
        allowed: String,
    },
    /// Two instances claim the same core explicitly.
    #[error("core {cpu} is given to both {first} and {second}")]
    Shared {
        /// The core.
        cpu: usize,
        /// First claimant.
        first: String,
        /// Second claimant.
        second: String,
    },
}

/// Assigns every instance its cores: explicit sets first (checked against `allowed` and each
/// other), then the rest in order, each taking the lowest `threads` cores still free.
pub fn place(allowed: &[usize], demands: &[Demand<'_>]) -> Result<Vec<Vec<usize>>, PlacementError> {
    let mut allowed: Vec<usize> = allowed.to_vec();
    allowed.sort_unstable();
    allowed.dedup();
    let allowed_text = format_cpu_list(&allowed);

    let mut owner: BTreeMap<usize, &str> = BTreeMap::new();
    for d in demands {
        for &cpu in d.cpus.unwrap_or_default() {
            if allowed.binary_search(&cpu).is_err() {
                return Err(PlacementError::NotAllowed {
                    name: d.name.to_owned(),
                    cpu,
                    allowed: allowed_text,
                });
            }
            if let Some(first) = owner.insert(cpu, d.name) {
                if first != d.name {
                    return Err(PlacementError::Shared {
                        cpu,
                        first: first.to_owned(),
                        second: d.name.to_owned(),
                    });
                }
            }
        }
    }

    let mut free = allowed.iter().copied().filter(|c| !owner.contains_key(c));
    let needed: usize = demands
        .iter()
        .map(|d| d.cpus.map_or(d.threads, <[usize]>::len))
        .sum();
    if needed > allowed.len() {
        return Err(PlacementError::NotEnoughCores {
            needed,
            available: allowed.len(),
            detail: breakdown(demands),
            allowed: allowed_text,
        });
    }
    // Explicit sets are within `allowed` and disjoint, so the free cores are exactly enough.
    Ok(demands
        .iter()
        .map(|d| match d.cpus {
            Some(cpus) => {
                let mut cpus = cpus.to_vec();
                cpus.sort_unstable();
                cpus.dedup();
                cpus
            }
            None => free.by_ref().take(d.threads).collect(),
        })
        .collect())
}

fn breakdown(demands: &[Demand<'_>]) -> String {
    // "7 instances x 8 threads" reads better than seven equal terms.
    let uniform = demands.iter().all(|d| d.cpus.is_none())
        && demands.windows(2).all(|w| w[0].threads == w[1].threads);
    if uniform {
        let threads = demands.first().map_or(0, |d| d.threads);
        return format!("{} instances x {threads} threads", demands.len());
    }
    demands
        .iter()
        .map(|d| match d.cpus {
            Some(c) => format!("{}: {} listed", d.name, c.len()),
            None => format!("{}: {}", d.name, d.threads),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// The cores this process may run on, ascending.
pub fn allowed_cpus() -> nix::Result<Vec<usize>> {
    let set = sched_getaffinity(Pid::from_raw(0))?;
    Ok((0..CpuSet::count())
        .filter(|&c| set.is_set(c).unwrap_or(false))
        .collect())
}

/// Restricts the calling process (and what it execs) to `cpus`.
pub fn pin_self(cpus: &[usize]) -> nix::Result<()> {
    let mut set = CpuSet::new();
    for &c in cpus {
        set.set(c)?;
    }
    nix::sched::sched_setaffinity(Pid::from_raw(0), &set)
}

/// Formats cores the way the kernel does in `/proc/*/status`: `0-3,8,10-11`.
pub fn format_cpu_list(cpus: &[usize]) -> String {
    let mut out = Vec::new();
    let mut i = 0;
    while i < cpus.len() {
        let start = cpus[i];
        let mut end = start;
        while i + 1 < cpus.len() && cpus[i + 1] == end + 1 {
            i += 1;
            end = cpus[i];
        }
        out.push(if start == end {
            start.to_string()
        } else {
            format!("{start}-{end}")
        });
        i += 1;
    }
    out.join(",")
}

/// Parses a list in the [`format_cpu_list`] form; `None` if it is malformed or empty.
pub fn parse_cpu_list(text: &str) -> Option<Vec<usize>> {
    let mut cpus = Vec::new();
    for part in text.split(',') {
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (usize, usize) = (a.trim().parse().ok()?, b.trim().parse().ok()?);
                if a > b {
                    return None;
                }
                cpus.extend(a..=b);
            }
            None => cpus.push(part.trim().parse().ok()?),
        }
    }
    (!cpus.is_empty()).then_some(cpus)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn even(name: &str, threads: usize) -> Demand<'_> {
        Demand {
            name,
            threads,
            cpus: None,
        }
    }

    #[test]
    fn instances_get_consecutive_disjoint_blocks() {
        let allowed: Vec<usize> = (0..16).collect();
        let sets = place(&allowed, &[even("a", 8), even("b", 4), even("c", 4)]).unwrap();
        assert_eq!(
            sets,
            [
                (0..8).collect::<Vec<_>>(),
                (8..12).collect(),
                (12..16).collect()
            ]
        );
    }

    #[test]
    fn only_allowed_cores_are_handed_out() {
        // As under `taskset -c 2,3,6-9`.
        let sets = place(&[9, 2, 3, 6, 7, 8], &[even("a", 3), even("b", 3)]).unwrap();
        assert_eq!(sets, [vec![2, 3, 6], vec![7, 8, 9]]);
    }

    #[test]
    fn too_many_threads_are_refused_with_the_arithmetic() {
        let allowed: Vec<usize> = (0..16).collect();
        let demands: Vec<Demand<'_>> = ["a", "b", "c"].iter().map(|n| even(n, 8)).collect();
        let err = place(&allowed, &demands).unwrap_err();
        assert!(matches!(
            err,
            PlacementError::NotEnoughCores {
                needed: 24,
                available: 16,
                ..
            }
        ));
        let text = err.to_string();
        assert!(
            text.contains("3 instances x 8 threads") && text.contains("0-15"),
            "{text}"
        );
    }

    #[test]
    fn explicit_cores_are_kept_and_skipped_by_the_others() {
        let allowed: Vec<usize> = (0..8).collect();
        let demands = [
            even("a", 2),
            Demand {
                name: "b",
                threads: 2,
                cpus: Some(&[0, 1]),
            },
            even("c", 2),
        ];
        let sets = place(&allowed, &demands).unwrap();
        assert_eq!(sets, [vec![2, 3], vec![0, 1], vec![4, 5]]);
    }

    #[test]
    fn explicit_cores_outside_the_mask_or_shared_are_refused() {
        let allowed = [0, 1, 2, 3];
        let err = place(
            &allowed,
            &[Demand {
                name: "a",
                threads: 1,
                cpus: Some(&[7]),
            }],
        )
        .unwrap_err();
        assert!(
            matches!(err, PlacementError::NotAllowed { cpu: 7, .. }),
            "{err}"
        );

        let err = place(
            &allowed,
            &[
                Demand {
                    name: "a",
                    threads: 2,
                    cpus: Some(&[0, 1]),
                },
                Demand {
                    name: "b",
                    threads: 2,
                    cpus: Some(&[1, 2]),
                },
            ],
        )
        .unwrap_err();
        assert_eq!(
            err,
            PlacementError::Shared {
                cpu: 1,
                first: "a".into(),
                second: "b".into()
            }
        );
    }

    #[test]
    fn cpu_lists_round_trip_in_kernel_notation() {
        let cpus = vec![0, 1, 2, 3, 8, 10, 11];
        assert_eq!(format_cpu_list(&cpus), "0-3,8,10-11");
        assert_eq!(parse_cpu_list("0-3,8,10-11"), Some(cpus));
        assert_eq!(parse_cpu_list(""), None);
        assert_eq!(parse_cpu_list("3-1"), None);
        assert_eq!(parse_cpu_list("x"), None);
    }

    #[test]
    fn this_process_may_use_at_least_one_core() {
        let cpus = allowed_cpus().unwrap();
        assert!(!cpus.is_empty());
        assert!(cpus.windows(2).all(|w| w[0] < w[1]));
    }
}
