//! A Redis Cluster of a test's own: six `redis-server` processes on free
//! ports (three masters, three replicas), joined by `redis-cli --cluster
//! create`, with a short node timeout so a killed master's replica takes
//! over within a few seconds.

use crate::free_port;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a master may be silent before its replica is promoted.
const NODE_TIMEOUT_MS: u64 = 1_000;

struct Node {
    port: u16,
    child: Option<Child>,
}

pub struct OwnRedisCluster {
    nodes: Vec<Node>,
    /// Node configuration files (`nodes-<port>.conf`).
    _dir: tempfile::TempDir,
}

impl OwnRedisCluster {
    /// Starts six nodes and makes them one cluster; returns once every slot
    /// is served and every node says the cluster is ok.
    pub fn start() -> OwnRedisCluster {
        let dir = tempfile::tempdir().unwrap();
        let mut nodes = Vec::new();
        for _ in 0..6 {
            let (port, child) = crate::spawn_redis(|port| {
                let mut command = Command::new("redis-server");
                command
                    .args(["--port", &port.to_string(), "--cluster-port", &free_port().to_string()])
                    .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
                    .args(["--cluster-enabled", "yes", "--cluster-node-timeout", &NODE_TIMEOUT_MS.to_string()])
                    .args(["--cluster-config-file", &format!("nodes-{port}.conf")])
                    // A replica however stale may take over: the test measures what that loses.
                    .args(["--cluster-replica-validity-factor", "0"])
                    // Replicas sync at once (the default waits 5 s to batch them).
                    .args(["--repl-diskless-sync-delay", "0"])
                    .arg("--dir")
                    .arg(dir.path());
                command
            });
            nodes.push(Node { port, child: Some(child) });
        }
        let cluster = OwnRedisCluster { nodes, _dir: dir };
        let mut create = Command::new("redis-cli");
        create.arg("--cluster").arg("create");
        for node in &cluster.nodes {
            create.arg(format!("127.0.0.1:{}", node.port));
        }
        let out = create
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .expect("redis-cli must be installed");
        assert!(out.status.success(), "redis-cli --cluster create: {}", String::from_utf8_lossy(&out.stdout));
        cluster.wait_ok(Duration::from_secs(30));
        cluster.wait_replicated(Duration::from_secs(30));
        cluster
    }

    /// Waits until every replica has finished its first sync and follows its
    /// master (before that, a failover loses everything: a replica that never
    /// synced holds nothing).
    fn wait_replicated(&self, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let infos: Vec<String> = self.running().map(|port| self.text_on(port, &["INFO", "replication"])).collect();
            let synced = infos.iter().all(|info| {
                if info.contains("role:master") {
                    info.contains("connected_slaves:1")
                } else {
                    info.contains("master_link_status:up") && info.contains("master_sync_in_progress:0")
                }
            });
            if synced {
                return;
            }
            assert!(Instant::now() < deadline, "the replicas did not finish their first sync: {infos:?}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `redis+cluster://` with every node as a seed.
    pub fn url(&self) -> String {
        let hosts: Vec<String> = self.nodes.iter().map(|n| format!("127.0.0.1:{}", n.port)).collect();
        format!("redis+cluster://{}", hosts.join(","))
    }

    fn running(&self) -> impl Iterator<Item = u16> + '_ {
        self.nodes.iter().filter(|n| n.child.is_some()).map(|n| n.port)
    }

    /// One command to the node on `port`.
    pub fn command_on(&self, port: u16, args: &[&str]) -> redis::RedisResult<redis::Value> {
        let client = redis::Client::open(format!("redis://127.0.0.1:{port}"))?;
        let mut conn = client.get_connection_with_timeout(Duration::from_secs(2))?;
        let mut cmd = redis::cmd(args[0]);
        for a in &args[1..] {
            cmd.arg(*a);
        }
        cmd.query(&mut conn)
    }

    /// Waits until every running node reports `cluster_state:ok` with every
    /// slot served, and agrees on who serves them.
    pub fn wait_ok(&self, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let ok = self.running().all(|port| {
                let info = self.text_on(port, &["CLUSTER", "INFO"]);
                info.contains("cluster_state:ok") && info.contains("cluster_slots_ok:16384")
            });
            let masters: Vec<Vec<u16>> = self.running().map(|port| self.masters_seen_by(port)).collect();
            if ok && masters.windows(2).all(|w| w[0] == w[1]) && masters.first().is_some_and(|m| m.len() == 3) {
                return;
            }
            assert!(Instant::now() < deadline, "the Redis Cluster did not settle: masters seen {masters:?}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn text_on(&self, port: u16, args: &[&str]) -> String {
        match self.command_on(port, args) {
            Ok(v) => redis::from_redis_value::<String>(v).unwrap_or_default(),
            Err(_) => String::new(),
        }
    }

    /// Ports of the masters serving slots, as one node sees them, sorted.
    fn masters_seen_by(&self, port: u16) -> Vec<u16> {
        let mut masters: Vec<u16> = self
            .text_on(port, &["CLUSTER", "NODES"])
            .lines()
            .filter(|l| l.contains("master") && !l.contains("fail") && l.split(' ').count() > 8)
            .filter_map(|l| l.split(' ').nth(1)?.split([':', '@']).nth(1)?.parse().ok())
            .collect();
        masters.sort_unstable();
        masters
    }

    /// The port of the master serving `key`'s slot.
    pub fn master_of(&self, key: &str) -> u16 {
        self.find_master(key).unwrap_or_else(|| panic!("no master serves the slot of {key}"))
    }

    /// The master serving `key`'s slot as the first running node sees it.
    fn find_master(&self, key: &str) -> Option<u16> {
        let port = self.running().next()?;
        let slot: i64 = redis::from_redis_value(self.command_on(port, &["CLUSTER", "KEYSLOT", key]).ok()?).ok()?;
        for line in self.text_on(port, &["CLUSTER", "NODES"]).lines() {
            let fields: Vec<&str> = line.split(' ').collect();
            if fields.len() < 9 || !fields[2].contains("master") || fields[2].contains("fail") {
                continue;
            }
            let serves = fields[8..].iter().any(|range| match range.split_once('-') {
                Some((a, b)) => a.parse::<i64>().is_ok_and(|a| a <= slot) && b.parse::<i64>().is_ok_and(|b| slot <= b),
                None => range.parse::<i64>() == Ok(slot),
            });
            if serves {
                return fields[1].split([':', '@']).nth(1)?.parse().ok();
            }
        }
        None
    }

    /// Kills (SIGKILL) the node on `port`, as a crashed host would go.
    pub fn kill(&mut self, port: u16) {
        let node = self.nodes.iter_mut().find(|n| n.port == port).expect("a node of this cluster");
        if let Some(mut child) = node.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// After `kill`: waits until another node serves the dead master's
    /// slots (its replica promoted) and the cluster is ok again; returns how
    /// long that took.
    pub fn wait_failover(&self, dead: u16, key: &str, within: Duration) -> Duration {
        let started = Instant::now();
        loop {
            let moved = self.find_master(key).is_some_and(|p| p != dead);
            if moved {
                self.wait_ok(within.saturating_sub(started.elapsed()).max(Duration::from_secs(1)));
                return started.elapsed();
            }
            assert!(started.elapsed() < within, "no replica took over from {dead} within {within:?}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for OwnRedisCluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            if let Some(mut child) = node.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}
