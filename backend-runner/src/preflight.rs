//! Checks made once, before anything is started, so that bad input fails at once with a
//! message naming the problem and leaves nothing running: the binary, the model files, the
//! CPU layout, the ports and the log directory.

use std::net::{SocketAddr, TcpListener};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::config::Config;
use crate::placement::{allowed_cpus, place, Demand, PlacementError};

/// What the checks established.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// The llama-server binary, found.
    pub llama_server: PathBuf,
    /// Cores per instance, in order; `None` where the instance is not pinned.
    pub cpus: Vec<Option<Vec<usize>>>,
}

/// A problem found before start.
#[derive(Debug, thiserror::Error)]
pub enum PreflightError {
    /// No such binary (path or `PATH` lookup).
    #[error(
        "llama-server binary {0} not found (set --llama-server or `llama_server` in the config)"
    )]
    BinaryNotFound(PathBuf),
    /// The binary exists but cannot be run.
    #[error("llama-server binary {0} is not an executable file")]
    BinaryNotExecutable(PathBuf),
    /// A model file cannot be opened.
    #[error("model file {path} of instance {instance} cannot be opened: {source}")]
    Model {
        /// Instance.
        instance: String,
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A model path is a directory or device.
    #[error("model file {path} of instance {instance} is not a regular file")]
    ModelNotFile {
        /// Instance.
        instance: String,
        /// The path.
        path: PathBuf,
    },
    /// Pinning is impossible.
    #[error("cannot pin instances to cores: {0}")]
    Placement(#[from] PlacementError),
    /// The affinity mask could not be read.
    #[error("cannot read this process's CPU affinity: {0}")]
    Affinity(nix::Error),
    /// Another process listens on an instance's port (or, for `--check-config`, the
    /// control API's).
    #[error("port {} on {} for {owner} is already in use by another process", addr.port(), addr.ip())]
    PortInUse {
        /// `instance NAME`, or `the control API`.
        owner: String,
        /// Host and port.
        addr: SocketAddr,
    },
    /// The port cannot be bound for another reason (address not on this host, privileged).
    #[error("{owner} cannot listen on {addr}: {source}")]
    PortUnusable {
        /// `instance NAME`, or `the control API`.
        owner: String,
        /// Host and port.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The log directory cannot be created.
    #[error("cannot create log directory {dir}: {source}")]
    LogDir {
        /// The directory.
        dir: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// Runs every check, in the order a user would fix things.
pub fn check(config: &Config) -> Result<Plan, PreflightError> {
    let (plan, busy) = check_with(config, false)?;
    debug_assert!(busy.is_empty());
    Ok(plan)
}

/// The checks for `--check-config`, which may run while the ports are still held: by the
/// old llama-server units a new install replaces, or by this runner itself before a
/// restart with an edited file. A port in use now is returned as a warning (the control
/// API's included, which a start checks by binding it); everything else fails as in
/// [`check`].
pub fn check_config(config: &Config) -> Result<(Plan, Vec<PreflightError>), PreflightError> {
    let (plan, mut busy) = check_with(config, true)?;
    match check_port("the control API", config.control) {
        Err(e @ PreflightError::PortInUse { .. }) => busy.push(e),
        other => other?,
    }
    Ok((plan, busy))
}

/// Runs the checks; with `busy_is_warning`, ports in use are collected instead of failing.
fn check_with(
    config: &Config,
    busy_is_warning: bool,
) -> Result<(Plan, Vec<PreflightError>), PreflightError> {
    let mut busy = Vec::new();
    let llama_server = find_binary(&config.llama_server)?;
    for inst in &config.instances {
        check_model(&inst.name, &inst.model)?;
    }
    let cpus = plan_cpus(config)?;
    for warning in crowded_cores(config) {
        tracing::warn!("{warning}");
    }
    for inst in &config.instances {
        // A port is only borrowed here and released at once, so llama-server can bind it. If
        // something takes it in between, the instance's first start fails with llama-server's
        // own bind error, which the runner reports just as clearly.
        if inst.port != 0 {
            let owner = format!("instance {}", inst.name);
            match check_port(&owner, SocketAddr::new(inst.host, inst.port)) {
                Err(e @ PreflightError::PortInUse { .. }) if busy_is_warning => busy.push(e),
                other => other?,
            }
        }
    }
    if let Some(files) = &config.log_files {
        std::fs::create_dir_all(&files.dir).map_err(|source| PreflightError::LogDir {
            dir: files.dir.clone(),
            source,
        })?;
    }
    Ok((Plan { llama_server, cpus }, busy))
}

/// Resolves `binary` as a path if it has a `/`, else on `PATH`, and checks it can be run.
pub fn find_binary(binary: &Path) -> Result<PathBuf, PreflightError> {
    let candidate = if binary.components().count() > 1 || binary.is_absolute() {
        Some(binary.to_owned())
    } else {
        std::env::var_os("PATH").and_then(|path| {
            std::env::split_paths(&path)
                .map(|dir| dir.join(binary))
                .find(|p| p.is_file())
        })
    };
    let Some(path) = candidate.filter(|p| p.exists()) else {
        return Err(PreflightError::BinaryNotFound(binary.to_owned()));
    };
    let executable =
        std::fs::metadata(&path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0);
    if !executable {
        return Err(PreflightError::BinaryNotExecutable(path));
    }
    Ok(path)
}

fn check_model(instance: &str, path: &Path) -> Result<(), PreflightError> {
    // Opening, not just stat: an unreadable file fails here rather than minutes into a load.
    let file = std::fs::File::open(path).map_err(|source| PreflightError::Model {
        instance: instance.to_owned(),
        path: path.to_owned(),
        source,
    })?;
    if !file.metadata().is_ok_and(|m| m.is_file()) {
        return Err(PreflightError::ModelNotFile {
            instance: instance.to_owned(),
            path: path.to_owned(),
        });
    }
    Ok(())
}

/// Instances given fewer cores (`cpus`) than threads: not wrong, but their threads take
/// turns on those cores, which costs most of the speed the threads were meant to add.
fn crowded_cores(config: &Config) -> Vec<String> {
    config
        .instances
        .iter()
        .filter_map(|inst| {
            let cores = inst.cpus.as_ref()?.len();
            (cores < inst.threads as usize).then(|| {
                let noun = if cores == 1 { "core" } else { "cores" };
                format!(
                    "instance {} runs {} threads on {cores} {noun} (cpus); they will take turns \
                     on them: set threads = {cores} unless that is meant",
                    inst.name, inst.threads
                )
            })
        })
        .collect()
}

fn plan_cpus(config: &Config) -> Result<Vec<Option<Vec<usize>>>, PreflightError> {
    let explicit = config.instances.iter().any(|i| i.cpus.is_some());
    if !config.pin && !explicit {
        return Ok(vec![None; config.instances.len()]);
    }
    let allowed = allowed_cpus().map_err(PreflightError::Affinity)?;
    // Without `pin`, only instances with explicit cores are placed; the rest run anywhere.
    let placed: Vec<usize> = (0..config.instances.len())
        .filter(|&i| config.pin || config.instances[i].cpus.is_some())
        .collect();
    let demands: Vec<Demand<'_>> = placed
        .iter()
        .map(|&i| {
            let inst = &config.instances[i];
            Demand {
                name: &inst.name,
                threads: inst.threads as usize,
                cpus: inst.cpus.as_deref(),
            }
        })
        .collect();
    let sets = place(&allowed, &demands)?;
    let mut cpus = vec![None; config.instances.len()];
    for (i, set) in placed.into_iter().zip(sets) {
        cpus[i] = Some(set);
    }
    Ok(cpus)
}

fn check_port(owner: &str, addr: SocketAddr) -> Result<(), PreflightError> {
    match TcpListener::bind(addr) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => Err(PreflightError::PortInUse {
            owner: owner.to_owned(),
            addr,
        }),
        Err(source) => Err(PreflightError::PortUnusable {
            owner: owner.to_owned(),
            addr,
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RawConfig;

    fn config(text: &str) -> Config {
        RawConfig::from_toml(text).unwrap().validate().unwrap()
    }

    #[test]
    fn binaries_are_found_by_path_or_on_path() {
        assert_eq!(
            find_binary(Path::new("sh")).unwrap().file_name().unwrap(),
            "sh"
        );
        assert!(matches!(
            find_binary(Path::new("/nonexistent/llama-server")),
            Err(PreflightError::BinaryNotFound(_))
        ));
        assert!(matches!(
            find_binary(Path::new("no-such-llama-server-binary")),
            Err(PreflightError::BinaryNotFound(_))
        ));
        let plain =
            std::env::temp_dir().join(format!("bitnet-runner-plain-{}", std::process::id()));
        std::fs::write(&plain, "not a program").unwrap();
        std::fs::set_permissions(&plain, std::fs::Permissions::from_mode(0o644)).unwrap();
        let found = find_binary(&plain);
        let _ = std::fs::remove_file(&plain);
        assert!(matches!(found, Err(PreflightError::BinaryNotExecutable(_))));
    }

    #[test]
    fn a_listening_port_is_reported_as_in_use() {
        let taken = TcpListener::bind("127.0.0.1:0").unwrap();
        let err = check_port("instance i0", taken.local_addr().unwrap()).unwrap_err();
        let port = taken.local_addr().unwrap().port();
        assert!(matches!(err, PreflightError::PortInUse { .. }));
        assert!(err.to_string().contains(&port.to_string()), "{err}");
    }

    #[test]
    fn check_config_warns_of_busy_ports_where_a_start_refuses() {
        let taken = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = taken.local_addr().unwrap().port();
        let model =
            std::env::temp_dir().join(format!("bitnet-runner-model-{}", std::process::id()));
        std::fs::write(&model, "GGUF").unwrap();
        let model = model.to_str().unwrap().to_owned();
        let instance_busy = config(&format!(
            "llama_server = \"sh\"\nmodel = {model:?}\nbase_port = {port}\ncontrol = \"127.0.0.1:0\""
        ));
        let control_busy = config(&format!(
            "llama_server = \"sh\"\nmodel = {model:?}\nbase_port = 0\ncontrol = \"127.0.0.1:{port}\""
        ));
        let outcomes = (
            check(&instance_busy),
            check_config(&instance_busy),
            check_config(&control_busy),
        );
        let _ = std::fs::remove_file(&model);
        let (start, checked, control) = outcomes;
        assert!(matches!(start, Err(PreflightError::PortInUse { .. })));
        let (_, busy) = checked.unwrap();
        assert_eq!(busy.len(), 1, "{busy:?}");
        assert!(busy[0].to_string().contains("instance i0"), "{}", busy[0]);
        let (_, busy) = control.unwrap();
        assert_eq!(busy.len(), 1, "{busy:?}");
        assert!(
            busy[0].to_string().contains("the control API"),
            "{}",
            busy[0]
        );
    }

    #[test]
    fn fewer_cores_than_threads_is_named() {
        let c = config(
            "model = \"/m\"\nthreads = 8\n[[instance]]\ncpus = [0]\n[[instance]]\ncpus = [1]\nthreads = 1",
        );
        let warnings = crowded_cores(&c);
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(
            warnings[0].contains("instance i0 runs 8 threads on 1 core (cpus)"),
            "{}",
            warnings[0]
        );
    }

    #[test]
    fn unpinned_instances_get_no_cores() {
        let c = config("model = \"/m\"\ninstances = 2");
        assert_eq!(plan_cpus(&c).unwrap(), vec![None, None]);
    }

    #[test]
    fn pinning_more_threads_than_cores_is_refused() {
        let c = config("model = \"/m\"\ninstances = 2\npin = true\nthreads = 100000");
        let err = plan_cpus(&c).unwrap_err().to_string();
        assert!(err.contains("200000 cores"), "{err}");
    }

    #[test]
    fn pinned_instances_get_disjoint_allowed_cores() {
        let allowed = allowed_cpus().unwrap();
        let c = config(&format!(
            "model = \"/m\"\ninstances = {}\npin = true\nthreads = 1",
            allowed.len()
        ));
        let sets: Vec<Vec<usize>> = plan_cpus(&c).unwrap().into_iter().flatten().collect();
        let mut all: Vec<usize> = sets.concat();
        all.sort_unstable();
        assert_eq!(all, allowed);
    }
}
