//! A replica as an OS process, for the process tests: spawned from one of
//! this crate's binaries with its settings in the environment, its
//! standard output in a log file, signalled (`SIGSTOP`, `SIGCONT`),
//! SIGKILLed, and killed when dropped.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// A replica process.
pub struct Replica {
    /// Its instance id (`CATGA_INSTANCE_ID`).
    pub name: String,
    log: PathBuf,
    child: Option<Child>,
}

impl Replica {
    /// Starts `bin` (a path, e.g. `env!("CARGO_BIN_EXE_job_replica")`) as
    /// instance `name` with `env`, logging to `<dir>/<name>.log`.
    pub fn spawn(bin: &str, env: &[(&str, &str)], name: &str, dir: &Path) -> Replica {
        let log = dir.join(format!("{name}.log"));
        let out = std::fs::File::create(&log).expect("log file");
        let child = Command::new(bin)
            .envs(env.iter().copied())
            .env("CATGA_INSTANCE_ID", name)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {bin}: {e}"));
        Replica {
            name: name.to_owned(),
            log,
            child: Some(child),
        }
    }

    /// What it wrote so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Whether it was not killed.
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Sends `kill -<sig>`.
    pub fn signal(&self, sig: &str) {
        let child = self.child.as_ref().expect("running");
        let status = Command::new("kill")
            .args([format!("-{sig}"), child.id().to_string()])
            .status()
            .expect("send signal");
        assert!(status.success(), "kill -{sig}");
    }

    /// SIGTERMs it and waits up to `within` for it to exit (after its
    /// graceful shutdown); its exit status.
    pub fn terminate(&mut self, within: std::time::Duration) -> std::process::ExitStatus {
        self.signal("TERM");
        let mut child = self.child.take().expect("running");
        let started = std::time::Instant::now();
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                return status;
            }
            if started.elapsed() > within {
                let _ = child.kill();
                let _ = child.wait();
                panic!("{} did not exit within {within:?} of SIGTERM", self.name);
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    /// SIGKILLs it and reaps it.
    pub fn sigkill(&mut self) {
        let mut child = self.child.take().expect("running");
        child.kill().expect("SIGKILL");
        child.wait().expect("reaped");
    }
}

/// What every one of `replicas` wrote, each under its name.
pub fn logs(replicas: &[Replica]) -> String {
    replicas
        .iter()
        .map(|r| format!("--- {}\n{}", r.name, r.log()))
        .collect::<Vec<_>>()
        .join("\n")
}

impl Drop for Replica {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A script of `deploy/` run for real (`local-cluster`, `two-regions`):
/// its state in a temporary directory, its ports from a free range, the
/// example's binary and the test's nats-server; stopped when dropped.
pub struct DeployScript {
    script: PathBuf,
    /// The script's state directory (logs, pid files).
    pub dir: tempfile::TempDir,
    /// The first port of its range.
    pub base: u16,
    /// The variables naming the directory and the base port.
    vars: (&'static str, &'static str),
    binary: String,
}

impl DeployScript {
    /// `script` (a path) with its directory and base-port variables
    /// (`vars`) and the example binary `binary`.
    pub fn new(script: PathBuf, vars: (&'static str, &'static str), binary: &str) -> DeployScript {
        DeployScript {
            script,
            dir: tempfile::tempdir().expect("temp dir"),
            base: crate::servers::free_port_range(50),
            vars,
            binary: binary.to_owned(),
        }
    }

    /// The script with `args`, not started.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new("bash");
        c.arg(&self.script)
            .args(args)
            .env(self.vars.0, self.dir.path())
            .env(self.vars.1, self.base.to_string())
            .env("ORDER_SYSTEM_BIN", &self.binary);
        if std::env::var_os("CATGA_NATS_SERVER").is_none() {
            c.env("CATGA_NATS_SERVER", "nats-server");
        }
        c
    }

    /// Runs it with `args`; panics with its output if it fails.
    pub fn run(&self, args: &[&str]) -> std::process::Output {
        let out = self.command(args).output().expect("run the script");
        assert!(
            out.status.success(),
            "{} {args:?} failed:\n{}\n{}",
            self.script.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    /// The pid the script recorded for `name`, if any.
    pub fn pid(&self, name: &str) -> Option<u32> {
        std::fs::read_to_string(self.dir.path().join(format!("{name}.pid")))
            .ok()
            .and_then(|p| p.trim().parse().ok())
    }
}

impl Drop for DeployScript {
    fn drop(&mut self) {
        let _ = self.command(&["stop"]).output();
    }
}
