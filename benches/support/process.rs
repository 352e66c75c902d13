//! What the benches that measure the gateway example as a separate process share: the child
//! process guard, finding (or building) the release gateway binary and starting it, reading
//! `/proc`, and describing the machine for the report.
//!
//! Included by each such bench with `#[path = "support/process.rs"] mod process;`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use tokio::net::TcpStream;

/// Longest wait for a started gateway to accept connections.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// A child process, killed and reaped when dropped (also while unwinding from a panic).
pub(crate) struct ChildGuard {
    /// What the process is, for error messages ("gateway", "backend").
    pub(crate) name: &'static str,
    /// The process.
    pub(crate) child: Child,
}

impl ChildGuard {
    /// Guards `child`, called `name` in error messages.
    pub(crate) fn new(name: &'static str, child: Child) -> Self {
        Self { name, child }
    }

    /// The child's process id.
    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// An error if the child has exited.
    pub(crate) fn check_alive(&mut self) -> Result<(), String> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => Err(format!("the {} process exited: {status}", self.name)),
            Err(e) => Err(format!("cannot check the {} process: {e}", self.name)),
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The gateway to measure: the file named by the environment variable `env_var` when set, else
/// `target/release/examples/gateway` (next to this bench's `target/release/deps/`), built with
/// cargo when missing (for at most `build_timeout`), with a warning when older than a source.
/// `bench` names the bench in progress messages.
pub(crate) fn gateway_binary(
    bench: &str,
    env_var: &str,
    build_timeout: Duration,
) -> Result<PathBuf, String> {
    if let Some(path) = std::env::var_os(env_var) {
        let path = PathBuf::from(path);
        if !path.is_file() {
            return Err(format!("{env_var}={} is not a file", path.display()));
        }
        return Ok(path);
    }
    let exe = std::env::current_exe().map_err(|e| format!("cannot find the bench binary: {e}"))?;
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .ok_or("the bench binary is not in target/<profile>/deps")?;
    let path = profile_dir
        .join("examples")
        .join(format!("gateway{}", std::env::consts::EXE_SUFFIX));
    let missing = || {
        format!(
            "{} is missing: run `cargo build --release --example gateway` first",
            path.display()
        )
    };
    if path.exists() {
        if let Some(source) = newer_source(&path) {
            eprintln!(
                "warning: {} is older than {}: run `cargo build --release --example gateway` \
                 to measure the current sources",
                path.display(),
                source.display()
            );
        }
        return Ok(path);
    }
    eprintln!("{bench} bench: building the gateway: cargo build --release --example gateway");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut build = Command::new(cargo)
        .args(["build", "--release", "--example", "gateway"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stdin(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot run cargo ({e}); {}", missing()))?;
    let deadline = Instant::now() + build_timeout;
    loop {
        match build.try_wait() {
            Ok(Some(status)) if status.success() && path.exists() => return Ok(path),
            Ok(Some(_)) | Err(_) => return Err(missing()),
            Ok(None) if Instant::now() > deadline => {
                let _ = build.kill();
                let _ = build.wait();
                return Err(missing());
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

/// A source file of the gateway modified after `binary` was built, if any.
fn newer_source(binary: &Path) -> Option<PathBuf> {
    fn walk(dir: &Path, built: SystemTime, found: &mut Option<PathBuf>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                if path.file_name().is_some_and(|n| n != "target") {
                    walk(&path, built, found);
                }
            } else if path
                .extension()
                .is_some_and(|e| e == "rs" || e == "toml" || e == "lock")
                && entry
                    .metadata()
                    .and_then(|m| m.modified())
                    .is_ok_and(|m| m > built)
            {
                *found = Some(path);
            }
        }
    }
    let built = std::fs::metadata(binary).and_then(|m| m.modified()).ok()?;
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut found = None;
    let mut dirs = vec![root.join("src"), root.join("examples/gateway")];
    if let Ok(crates) = std::fs::read_dir(root.join("crates")) {
        dirs.extend(crates.flatten().map(|c| c.path().join("src")));
    }
    for dir in dirs {
        walk(&dir, built, &mut found);
    }
    found
}

/// Starts the gateway `binary` in front of the one backend at `backend` (deployment `bench`, no
/// caller authentication) and waits until it accepts connections; returns it and its address.
pub(crate) async fn spawn_gateway(
    binary: &Path,
    backend: SocketAddr,
) -> Result<(ChildGuard, SocketAddr), String> {
    let listen = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| format!("cannot find a free port: {e}"))?;
    let child = Command::new(binary)
        .arg("--listen")
        .arg(listen.to_string())
        .arg("--backend")
        .arg(format!("bench=http://{backend}"))
        .args(["--auth", "none"])
        // One info line per request would only cost the gateway time and memory here.
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", binary.display()))?;
    let mut gateway = ChildGuard::new("gateway", child);
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        gateway.check_alive()?;
        if TcpStream::connect(listen).await.is_ok() {
            return Ok((gateway, listen));
        }
        if Instant::now() > deadline {
            return Err(format!(
                "the gateway did not listen on {listen} within {START_TIMEOUT:?}"
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A field of `/proc/PID/status`, in KiB (`VmRSS`, `VmHWM`).
pub(crate) fn proc_status_kib(pid: u32, field: &str) -> Result<u64, String> {
    proc_kib(pid, "status", field)
}

/// A `Field: N kB` line of `/proc/PID/FILE`, in KiB.
pub(crate) fn proc_kib(pid: u32, file: &str, field: &str) -> Result<u64, String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/{file}"))
        .map_err(|e| format!("cannot read /proc/{pid}/{file}: {e}"))?;
    text.lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| format!("no {field} in /proc/{pid}/{file}"))
}

/// The file descriptors process `pid` has open; 0 when unknown.
pub(crate) fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, Iterator::count)
}

/// The machine, for the report: `nproc N, <CPU model>`.
pub(crate) fn machine() -> String {
    let cpus = std::thread::available_parallelism().map_or(0, usize::from);
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find_map(|l| l.strip_prefix("model name")?.split_once(':'))
                .map(|(_, model)| model.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".to_owned());
    format!("nproc {cpus}, {model}")
}

/// The 1-minute load average, for the report: other work on the machine shows up in the
/// figures.
pub(crate) fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_owned))
        .unwrap_or_else(|| "unknown".to_owned())
}
