//! What `/proc` says about an instance's process: resident memory, CPU time used, and
//! whether the port it should serve on is really its own.

use std::sync::OnceLock;
use std::time::Duration;

use nix::unistd::{sysconf, SysconfVar};

/// Resident set size in bytes, from `VmRSS` in `/proc/PID/status`.
pub fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    parse_rss(&status)
}

fn parse_rss(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line["VmRSS:".len()..]
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib * 1024)
}

/// User plus system CPU time the process has used, from `/proc/PID/stat`.
pub fn cpu_time(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let ticks = parse_cpu_ticks(&stat)?;
    Some(Duration::from_secs_f64(
        ticks as f64 / clock_ticks_per_sec(),
    ))
}

fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    // The command name (field 2) is in parentheses and may hold spaces or ')', so fields are
    // counted from the last ')': state is field 3, utime 14, stime 15.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// Whether the socket listening on TCP `port` belongs to process `pid` or to a process of
/// process group `pgid` (an instance runs in a group of its own, so this covers anything it
/// forked).
///
/// A `/health` answer only says that *something* serves the port. If another process took
/// the port, the instance fails to bind and exits, and the answer came from a stranger:
/// `Some(false)`. `None` when `/proc` cannot tell (no listener found, or the file
/// descriptors unreadable); the caller then goes by the answer alone.
pub fn port_held_by(port: u16, pgid: u32, pid: u32) -> Option<bool> {
    let mut inodes = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        if let Ok(text) = std::fs::read_to_string(table) {
            inodes.extend(listening_inodes(&text, port));
        }
    }
    if inodes.is_empty() {
        return None;
    }
    // The leader and `pid` first: the leader is nearly always the one listening, and is
    // found without reading every process's `stat`.
    let mut readable = false;
    for first in [pgid, pid] {
        match holds_one_of(first, &inodes) {
            Some(true) => return Some(true),
            Some(false) => readable = true,
            None => {}
        }
    }
    for pid in other_members(pgid).into_iter().filter(|&p| p != pid) {
        match holds_one_of(pid, &inodes) {
            Some(true) => return Some(true),
            Some(false) => readable = true,
            None => {}
        }
    }
    readable.then_some(false)
}

/// Whether process `pid` has one of the sockets `inodes` open; `None` if its descriptors
/// cannot be read.
fn holds_one_of(pid: u32, inodes: &[u64]) -> Option<bool> {
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?;
    Some(fds.flatten().any(|fd| {
        std::fs::read_link(fd.path())
            .ok()
            .and_then(|target| socket_inode(target.to_str()?))
            .is_some_and(|inode| inodes.contains(&inode))
    }))
}

/// The inodes of the sockets in a `/proc/net/tcp` table listening on `port`.
fn listening_inodes(table: &str, port: u16) -> Vec<u64> {
    const LISTEN: &str = "0A";
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            // sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode
            let mut fields = line.split_whitespace();
            let local = fields.nth(1)?;
            let state = fields.nth(1)?;
            let inode = fields.nth(5)?;
            let (_, hex_port) = local.rsplit_once(':')?;
            let matches = u16::from_str_radix(hex_port, 16).ok()? == port && state == LISTEN;
            matches.then(|| inode.parse().ok()).flatten()
        })
        .collect()
}

/// The socket inode a `/proc/PID/fd` link points to (`socket:[12345]`).
fn socket_inode(link: &str) -> Option<u64> {
    link.strip_prefix("socket:[")?
        .strip_suffix(']')?
        .parse()
        .ok()
}

/// The processes of group `pgid` other than its leader.
fn other_members(pgid: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| pid != pgid)
        .filter(|&pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|stat| parse_pgrp(&stat))
                == Some(pgid)
        })
        .collect()
}

fn parse_pgrp(stat: &str) -> Option<u32> {
    // Fields after the command name: state, ppid, pgrp.
    stat[stat.rfind(')')? + 1..]
        .split_whitespace()
        .nth(2)?
        .parse()
        .ok()
}

fn clock_ticks_per_sec() -> f64 {
    static TICKS: OnceLock<f64> = OnceLock::new();
    *TICKS.get_or_init(|| match sysconf(SysconfVar::CLK_TCK) {
        Ok(Some(t)) if t > 0 => t as f64,
        // USER_HZ has been 100 on every Linux architecture for decades.
        _ => 100.0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rss_is_read_in_bytes() {
        let status = "Name:\tllama-server\nVmPeak:\t  999 kB\nVmRSS:\t 4718592 kB\nThreads:\t9\n";
        assert_eq!(parse_rss(status), Some(4718592 * 1024));
        assert_eq!(parse_rss("Name:\tx\n"), None);
    }

    #[test]
    fn cpu_ticks_survive_odd_process_names() {
        let stat = "42 (llama server) x) S 1 42 42 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 9 0";
        assert_eq!(parse_cpu_ticks(stat), Some(300));
    }

    #[test]
    fn this_process_has_memory_and_cpu_time() {
        let pid = std::process::id();
        assert!(rss_bytes(pid).is_some_and(|b| b > 0));
        assert!(cpu_time(pid).is_some());
        assert_eq!(rss_bytes(u32::MAX), None);
    }

    #[test]
    fn listening_sockets_are_found_by_port_in_either_table() {
        let v4 = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
   0: 0100007F:1FA5 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4242 1 0 0 10 0\n\
   1: 0100007F:1FA5 0100007F:D431 01 00000000:00000000 00:00000000 00000000     0        0 4343 1 0 0 10 0\n\
   2: 00000000:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4444 1 0 0 10 0\n";
        // Port 0x1FA5 = 8101: the listener, not the connection to it.
        assert_eq!(listening_inodes(v4, 8101), vec![4242]);
        assert_eq!(listening_inodes(v4, 8080), vec![4444]);
        assert!(listening_inodes(v4, 9000).is_empty());
        let v6 = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
   0: 00000000000000000000000001000000:1FA5 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 5151 1 0 0 10 0\n";
        assert_eq!(listening_inodes(v6, 8101), vec![5151]);
        assert!(listening_inodes("garbage\nmore garbage", 8101).is_empty());
    }

    #[test]
    fn socket_links_and_groups_are_parsed() {
        assert_eq!(socket_inode("socket:[4242]"), Some(4242));
        assert_eq!(socket_inode("pipe:[4242]"), None);
        assert_eq!(socket_inode("/dev/null"), None);
        let stat = "42 (llama server) x) S 1 40 41 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 9 0";
        assert_eq!(parse_pgrp(stat), Some(40));
    }

    #[test]
    fn a_port_is_told_apart_by_the_group_holding_it() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let own_group = nix::unistd::getpgrp().as_raw() as u32;
        let own = std::process::id();
        // Found through the group (this test need not lead it).
        assert_eq!(port_held_by(port, own_group, own_group), Some(true));
        // A process in a group of its own, holding no socket: the port is not its.
        let mut other = std::process::Command::new("sleep");
        std::os::unix::process::CommandExt::process_group(&mut other, 0);
        let mut other = other.arg("30").spawn().unwrap();
        let verdict = port_held_by(port, other.id(), other.id());
        // ...unless the process named beside the group holds it.
        let with_own = port_held_by(port, other.id(), own);
        let _ = other.kill();
        let _ = other.wait();
        assert_eq!(verdict, Some(false));
        assert_eq!(with_own, Some(true));
        drop(listener);
        assert_eq!(port_held_by(port, own_group, own), None);
    }
}
