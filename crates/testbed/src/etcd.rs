//! A real etcd cluster on loopback: `n` members of Debian's etcd 3.4, each with its data
//! directory in a private temporary directory, killed and removed when dropped.

use crate::process::{run, KillOnDrop};
use crate::{require_tool, Error, Result};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

const HINT: &str = "run `cargo xtask deps` (installs Debian's etcd-server and etcd-client)";

/// One member.
#[derive(Debug)]
struct Member {
    name: String,
    client: u16,
    args: Vec<String>,
    proc: Option<KillOnDrop>,
}

/// A running etcd cluster on 127.0.0.1.
#[derive(Debug)]
pub struct EtcdCluster {
    dir: tempfile::TempDir,
    members: Vec<Member>,
}

/// Free TCP ports on 127.0.0.1 (bound and let go: another process could take one meanwhile,
/// which a start then reports).
fn free_ports(n: usize) -> Result<Vec<u16>> {
    let socks: Vec<std::net::TcpListener> = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
        .collect::<std::io::Result<_>>()?;
    socks.iter().map(|s| Ok(s.local_addr()?.port())).collect()
}

impl EtcdCluster {
    /// Start `n` members (1, 3 or 5) and wait until every one is healthy. Fails saying how to
    /// install etcd when it is missing.
    pub fn start(n: usize) -> Result<EtcdCluster> {
        require_tool("etcd", HINT)?;
        require_tool("etcdctl", HINT)?;
        let dir = tempfile::Builder::new().prefix("vs-etcd-").tempdir()?;
        let ports = free_ports(2 * n)?;
        let token = format!("vs-{}-{}", std::process::id(), ports[0]);
        let initial: Vec<String> = (0..n)
            .map(|i| format!("m{i}=http://127.0.0.1:{}", ports[n + i]))
            .collect();
        let mut members = Vec::new();
        for i in 0..n {
            let (client, peer) = (ports[i], ports[n + i]);
            let data = dir.path().join(format!("m{i}"));
            let log = dir.path().join(format!("m{i}.log"));
            let args = vec![
                format!("--name=m{i}"),
                format!("--data-dir={}", data.display()),
                format!("--listen-client-urls=http://127.0.0.1:{client}"),
                format!("--advertise-client-urls=http://127.0.0.1:{client}"),
                format!("--listen-peer-urls=http://127.0.0.1:{peer}"),
                format!("--initial-advertise-peer-urls=http://127.0.0.1:{peer}"),
                format!("--initial-cluster={}", initial.join(",")),
                "--initial-cluster-state=new".into(),
                format!("--initial-cluster-token={token}"),
                "--heartbeat-interval=100".into(),
                "--election-timeout=1000".into(),
                "--logger=zap".into(),
                "--log-level=warn".into(),
                format!("--log-outputs={}", log.display()),
            ];
            members.push(Member {
                name: format!("m{i}"),
                client,
                args,
                proc: None,
            });
        }
        let mut c = EtcdCluster { dir, members };
        for i in 0..n {
            c.spawn(i)?;
        }
        c.wait_healthy(&(0..n).collect::<Vec<_>>(), Duration::from_secs(30))?;
        Ok(c)
    }

    fn spawn(&mut self, i: usize) -> Result<()> {
        let m = &mut self.members[i];
        let mut cmd = Command::new("etcd");
        cmd.args(&m.args)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        m.proc = Some(KillOnDrop::spawn(cmd)?);
        Ok(())
    }

    /// `127.0.0.1:PORT` of every member.
    pub fn endpoints(&self) -> Vec<String> {
        self.members
            .iter()
            .map(|m| format!("127.0.0.1:{}", m.client))
            .collect()
    }

    /// The lockspace URL for virt-snap: `etcd://EP,EP,EP/PREFIX?ttl=TTL`.
    pub fn url(&self, prefix: &str, ttl_secs: u64) -> String {
        format!(
            "etcd://{}/{}?ttl={ttl_secs}",
            self.endpoints().join(","),
            prefix.trim_start_matches('/')
        )
    }

    /// The members' pids (0 for one that is not running).
    pub fn pids(&self) -> Vec<u32> {
        self.members
            .iter()
            .map(|m| m.proc.as_ref().map_or(0, |p| p.id()))
            .collect()
    }

    /// The member's directory (its data directory and log).
    pub fn dir(&self) -> PathBuf {
        self.dir.path().to_path_buf()
    }

    fn etcdctl(&self, endpoints: &[String], args: &[&str]) -> Result<String> {
        let out = run(Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={}", endpoints.join(",")))
            .arg("--dial-timeout=1s")
            .arg("--command-timeout=2s")
            .args(args))?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Run etcdctl against the running members.
    pub fn ctl(&self, args: &[&str]) -> Result<String> {
        let eps: Vec<String> = self
            .members
            .iter()
            .filter(|m| m.proc.is_some())
            .map(|m| format!("127.0.0.1:{}", m.client))
            .collect();
        self.etcdctl(&eps, args)
    }

    fn wait_healthy(&self, which: &[usize], within: Duration) -> Result<()> {
        let end = Instant::now() + within;
        let eps: Vec<String> = which
            .iter()
            .map(|&i| format!("127.0.0.1:{}", self.members[i].client))
            .collect();
        loop {
            let r = self.etcdctl(&eps, &["endpoint", "health"]);
            if r.is_ok() {
                return Ok(());
            }
            if Instant::now() >= end {
                let logs: Vec<String> = which
                    .iter()
                    .map(|i| {
                        let p = self.dir.path().join(format!("m{i}.log"));
                        let s = std::fs::read_to_string(&p).unwrap_or_default();
                        let tail: Vec<&str> = s.lines().rev().take(5).collect();
                        format!("m{i}: {}", tail.join(" | "))
                    })
                    .collect();
                return Err(Error(format!(
                    "etcd members {eps:?} not healthy within {within:?}: {}; logs: {}",
                    r.unwrap_err(),
                    logs.join("; ")
                )));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The index of the current leader, as the running members report it.
    pub fn leader(&self) -> Result<usize> {
        let out = self.ctl(&["endpoint", "status", "-w", "json"])?;
        let v: serde_json::Value = serde_json::from_str(&out)
            .map_err(|e| Error(format!("etcdctl endpoint status: {e}: {out}")))?;
        for s in v.as_array().into_iter().flatten() {
            let st = &s["Status"];
            if st["leader"] == st["header"]["member_id"] && !st["leader"].is_null() {
                let ep = s["Endpoint"].as_str().unwrap_or_default();
                if let Some(i) = self
                    .members
                    .iter()
                    .position(|m| ep.ends_with(&format!(":{}", m.client)))
                {
                    return Ok(i);
                }
            }
        }
        Err(Error(format!("no leader among the running members: {out}")))
    }

    /// Kill member `i` (SIGKILL).
    pub fn kill(&mut self, i: usize) {
        if let Some(mut p) = self.members[i].proc.take() {
            p.kill();
        }
    }

    /// Start member `i` again (after [`EtcdCluster::kill`]) and wait until it is healthy.
    pub fn restart(&mut self, i: usize) -> Result<()> {
        self.kill(i);
        self.spawn(i)?;
        self.wait_healthy(&[i], Duration::from_secs(30))
    }

    fn signal_all(&self, sig: rustix::process::Signal) {
        for p in self.pids().into_iter().filter(|&p| p != 0) {
            if let Some(pid) = rustix::process::Pid::from_raw(p as i32) {
                let _ = rustix::process::kill_process(pid, sig);
            }
        }
    }

    /// Stop every member (SIGSTOP): the cluster stops answering, its members keep their
    /// connections open.
    pub fn stop_all(&self) {
        self.signal_all(rustix::process::Signal::STOP);
    }

    /// Let every member go on (SIGCONT).
    pub fn cont_all(&self) {
        self.signal_all(rustix::process::Signal::CONT);
    }

    /// The member names, `m0`...
    pub fn names(&self) -> Vec<String> {
        self.members.iter().map(|m| m.name.clone()).collect()
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        // Stopped members do not die of SIGKILL any later than running ones, but let them go
        // on first so that nothing waits on them.
        self.cont_all();
        for m in &mut self.members {
            if let Some(mut p) = m.proc.take() {
                p.kill();
            }
        }
    }
}
