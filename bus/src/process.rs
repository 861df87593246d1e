//! A `justizbus serve` child process on a free loopback port: used by `justizbus bench` and by
//! the end-to-end tests, which exercise the real binary rather than an in-process server.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::{Error, Result};

/// What the server logs once it serves.
pub const READY_LINE: &str = "justizbus listening";

/// A running server process.
pub struct ServerProcess {
    /// The binary.
    pub binary: PathBuf,
    /// Its data directory.
    pub data_dir: PathBuf,
    /// Its listen address.
    pub addr: String,
    /// Extra arguments given to `serve`.
    pub extra_args: Vec<String>,
    /// File that receives its stderr (the log).
    pub log_file: PathBuf,
    child: Option<Child>,
}

/// Lowest port [`free_port`] picks.
const LOWEST_PORT: u16 = 10_000;

/// A free loopback port for a server to listen on (bound and released). It lies below the
/// kernel's range of ephemeral ports when there is room: a port taken from that range and
/// released can go to some outgoing connection before the server binds it, which then fails
/// with "address in use".
pub fn free_port() -> Result<u16> {
    use std::hash::BuildHasher;
    let ephemeral_start = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32_768);
    if ephemeral_start > LOWEST_PORT + 1000 {
        let span = u64::from(ephemeral_start - LOWEST_PORT);
        for attempt in 0..100u32 {
            // A fresh `RandomState` is randomly keyed: a random port without a random crate.
            let port = LOWEST_PORT + (std::collections::hash_map::RandomState::new().hash_one((std::process::id(), attempt)) % span) as u16;
            if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
                return Ok(port);
            }
        }
    }
    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| Error::io("finding a free port", e))?;
    Ok(l.local_addr().map_err(|e| Error::io("finding a free port", e))?.port())
}

/// Starts of a new server that find their port taken before another port is tried.
const PORT_ATTEMPTS: u32 = 5;

impl ServerProcess {
    /// Starts `binary serve --data-dir DIR --listen 127.0.0.1:PORT EXTRA...` and waits until it
    /// accepts connections.
    pub fn start(binary: &Path, data_dir: &Path, extra_args: &[String]) -> Result<Self> {
        std::fs::create_dir_all(data_dir).map_err(|e| Error::io(format!("creating {}", data_dir.display()), e))?;
        let mut p = ServerProcess {
            binary: binary.to_path_buf(),
            data_dir: data_dir.to_path_buf(),
            log_file: data_dir.with_extension("server.log"),
            addr: String::new(),
            extra_args: extra_args.to_vec(),
            child: None,
        };
        // Another process may take the port between `free_port` and the server's bind.
        let mut attempt = 1;
        loop {
            p.addr = format!("127.0.0.1:{}", free_port()?);
            match p.restart() {
                Ok(_) => return Ok(p),
                Err(Error::Serve(log)) if attempt < PORT_ATTEMPTS && log.contains("Address already in use") => attempt += 1,
                Err(e) => return Err(e),
            }
        }
    }

    /// The server URL.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Process id, while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Starts the process again (same directory and port) and waits until it is ready.
    /// Returns how long it took until it accepted connections.
    pub fn restart(&mut self) -> Result<Duration> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_file)
            .map_err(|e| Error::io("opening the server log", e))?;
        // Ready means: this start logged that it listens (after recovery), not merely that the
        // port accepts (it is bound before the log is opened).
        let ready_before = self.log().matches(READY_LINE).count();
        let started = Instant::now();
        let child = Command::new(&self.binary)
            .arg("serve")
            .arg("--data-dir")
            .arg(&self.data_dir)
            .arg("--listen")
            .arg(&self.addr)
            .args(&self.extra_args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| Error::io(format!("starting {}", self.binary.display()), e))?;
        self.child = Some(child);
        let deadline = started + Duration::from_secs(60);
        while Instant::now() < deadline {
            if self.log().matches(READY_LINE).count() > ready_before && std::net::TcpStream::connect(&self.addr).is_ok() {
                return Ok(started.elapsed());
            }
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                return Err(Error::Serve(format!("server exited with {status}; log:\n{}", self.log())));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Err(Error::Serve(format!("server did not accept connections within 60 s; log:\n{}", self.log())))
    }

    /// Kills the process with SIGKILL (no chance to flush anything) and reaps it.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Stops the process with SIGTERM and waits for a clean exit.
    pub fn stop(&mut self) -> Result<()> {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill").arg("-TERM").arg(c.id().to_string()).status();
            let deadline = Instant::now() + Duration::from_secs(30);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return Ok(());
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
            return Err(Error::Serve("server did not stop within 30 s of SIGTERM".into()));
        }
        Ok(())
    }

    /// What the server logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_file).unwrap_or_default()
    }

    /// Peak and current resident memory in bytes (from /proc), while running.
    pub fn memory(&self) -> Option<(u64, u64)> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()?)).ok()?;
        let field = |name: &str| {
            status
                .lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
                .map(|kb| kb * 1024)
        };
        Some((field("VmHWM:")?, field("VmRSS:")?))
    }

    /// CPU time (user and system, all threads) the server has used so far, while running.
    pub fn cpu_time(&self) -> Option<Duration> {
        cpu_time_of(&self.pid()?.to_string())
    }

    /// Page faults the server has taken so far, while running.
    pub fn page_faults(&self) -> Option<u64> {
        page_faults_of(&self.pid()?.to_string())
    }
}

/// The numeric fields of `/proc/<pid>/stat` from field 3 (state) on, `"self"` for this process.
fn stat_fields(pid: &str) -> Option<Vec<u64>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: it ends at the last ')'.
    let after_name = &stat[stat.rfind(')')? + 2..];
    // What is not an unsigned number (the state letter, a negative nice value) reads as 0;
    // none of those fields is used.
    Some(after_name.split_whitespace().map(|f| f.parse().unwrap_or(0)).collect())
}

/// CPU time (user and system, all threads) of process `pid` (`"self"` for this one), from
/// `/proc/<pid>/stat`, which counts in USER_HZ (100 per second on Linux).
pub fn cpu_time_of(pid: &str) -> Option<Duration> {
    let fields = stat_fields(pid)?;
    // utime and stime: fields 14 and 15.
    let ticks = fields.get(11)? + fields.get(12)?;
    Some(Duration::from_millis(ticks * 10))
}

/// Page faults (minor and major, all threads) process `pid` has taken: memory it touched for
/// the first time, or again after the allocator gave it back to the system.
pub fn page_faults_of(pid: &str) -> Option<u64> {
    let fields = stat_fields(pid)?;
    // minflt and majflt: fields 10 and 12.
    Some(fields.get(7)? + fields.get(9)?)
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        self.kill9();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_ports_lie_below_the_ephemeral_range_and_are_free() {
        let ephemeral_start: u16 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
            .expect("port range")
            .split_whitespace()
            .next()
            .and_then(|s| s.parse().ok())
            .expect("a number");
        for _ in 0..20 {
            let port = free_port().expect("port");
            assert!((LOWEST_PORT..ephemeral_start).contains(&port), "port {port}");
            std::net::TcpListener::bind(("127.0.0.1", port)).expect("the port is free");
        }
    }

    #[test]
    fn cpu_time_grows_with_work() {
        let before = cpu_time_of("self").expect("cpu time");
        // Spin until 50 ms of CPU are counted (a loaded machine gives less CPU per wall second).
        let started = Instant::now();
        let mut x = 0u64;
        while cpu_time_of("self").expect("cpu time") < before + Duration::from_millis(50) {
            assert!(started.elapsed() < Duration::from_secs(30), "spinning is not counted as CPU time");
            for _ in 0..100_000 {
                x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
            }
        }
        assert!(cpu_time_of("999999999").is_none(), "no such process");
    }

    #[test]
    fn page_faults_grow_with_fresh_memory() {
        let before = page_faults_of("self").expect("page faults");
        // 32 MiB written: 8,192 pages touched for the first time, or 16 where transparent huge
        // pages back all of it.
        let touched = std::hint::black_box(vec![1u8; 32 << 20]);
        let after = page_faults_of("self").expect("page faults");
        assert!(after >= before + 16, "{before} -> {after} faults for {} bytes", touched.len());
        assert!(page_faults_of("999999999").is_none(), "no such process");
    }
}
