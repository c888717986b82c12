//! A real S3-compatible store for the tests: a single-node Garage on loopback ports,
//! its data in a temporary directory, with one bucket and one key; or a cluster of
//! three such nodes that keep every object on all three. The `garage` binary must be
//! on PATH (`scripts/test.sh` installs it when missing).

use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use cachet::testing::free_port;

/// A running Garage node, stopped (killed) when dropped.
pub struct Garage {
    dir: tempfile::TempDir,
    config: PathBuf,
    child: Option<Child>,
    rpc_port: u16,
    pub s3_port: u16,
    pub bucket: String,
    pub key_id: String,
    pub secret: String,
}

/// Random hex digits, from the process's random source.
fn hex(bytes: usize) -> String {
    let mut b = vec![0u8; bytes];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b))
        .unwrap();
    b.iter().map(|x| format!("{x:02x}")).collect()
}

impl Garage {
    /// Starts a node and makes its layout, bucket `cachet` and a key with every right
    /// on it.
    pub fn start() -> Self {
        let mut g = Self::node(1, &hex(32));
        let id = g.node_id();
        g.setup(&[id]);
        g
    }

    /// Starts three nodes that replicate every object three times (a write or a read
    /// needs two of them), with the bucket and key of `start` on the first; every
    /// node serves S3.
    pub fn cluster() -> [Self; 3] {
        let secret = hex(32);
        let mut nodes = [(); 3].map(|()| Self::node(3, &secret));
        let ids: Vec<String> = nodes.iter().map(Self::node_id).collect();
        for (n, id) in nodes.iter().zip(&ids).skip(1) {
            nodes[0].cli(&["node", "connect", &format!("{id}@127.0.0.1:{}", n.rpc_port)]);
        }
        nodes[0].setup(&ids);
        let (key_id, key_secret) = (nodes[0].key_id.clone(), nodes[0].secret.clone());
        for n in &mut nodes[1..] {
            n.key_id = key_id.clone();
            n.secret = key_secret.clone();
            n.wait(|n| n.cli_quiet(&["bucket", "info", "cachet"]));
        }
        nodes
    }

    /// A node started with its config: `replication` copies of each object, joined by
    /// the nodes that share `rpc_secret`.
    fn node(replication: u8, rpc_secret: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let (rpc_port, s3_port) = (free_port(), free_port());
        let root = dir.path();
        let config = root.join("garage.toml");
        std::fs::write(
            &config,
            format!(
                "metadata_dir = \"{meta}\"\n\
                 data_dir = \"{data}\"\n\
                 db_engine = \"sqlite\"\n\
                 replication_factor = {replication}\n\
                 rpc_bind_addr = \"127.0.0.1:{rpc_port}\"\n\
                 rpc_public_addr = \"127.0.0.1:{rpc_port}\"\n\
                 rpc_secret = \"{rpc_secret}\"\n\
                 [s3_api]\n\
                 s3_region = \"garage\"\n\
                 api_bind_addr = \"127.0.0.1:{s3_port}\"\n\
                 root_domain = \".s3.garage.localhost\"\n",
                meta = root.join("meta").display(),
                data = root.join("data").display(),
            ),
        )
        .unwrap();
        let mut g = Self {
            dir,
            config,
            child: None,
            rpc_port,
            s3_port,
            bucket: "cachet".into(),
            key_id: format!("GK{}", hex(12)),
            secret: hex(32),
        };
        g.spawn();
        g.wait(|g| g.cli_quiet(&["status"]));
        g
    }

    fn node_id(&self) -> String {
        let node = self.cli(&["node", "id", "-q"]);
        node.trim().split('@').next().unwrap().to_owned()
    }

    /// The layout of `nodes` (one zone each), the bucket and the key.
    fn setup(&mut self, nodes: &[String]) {
        for (zone, node) in nodes.iter().enumerate() {
            let zone = format!("dc{zone}");
            self.cli(&["layout", "assign", "-z", &zone, "-c", "1G", node]);
        }
        self.cli(&["layout", "apply", "--version", "1"]);
        self.cli(&["bucket", "create", "cachet"]);
        let (id, secret) = (self.key_id.clone(), self.secret.clone());
        self.cli(&["key", "import", "--yes", "-n", "cachet", &id, &secret]);
        self.cli(&[
            "bucket", "allow", "--read", "--write", "--owner", "cachet", "--key", &id,
        ]);
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("garage.log"))
            .unwrap();
        let child = Command::new("garage")
            .arg("-c")
            .arg(&self.config)
            .arg("server")
            .env("RUST_LOG", "garage=warn")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("starting garage (scripts/test.sh installs it)");
        self.child = Some(child);
    }

    fn wait(&self, ready: impl Fn(&Self) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !ready(self) {
            assert!(
                Instant::now() < deadline,
                "garage did not start:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn run(&self, args: &[&str]) -> Output {
        Command::new("garage")
            .arg("-c")
            .arg(&self.config)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    fn cli_quiet(&self, args: &[&str]) -> bool {
        self.run(args).status.success()
    }

    /// Runs a `garage` command against this node; its output.
    pub fn cli(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "garage {args:?}: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
        String::from_utf8(out.stdout).unwrap()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("garage.log")).unwrap_or_default()
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.s3_port)
    }

    /// The `[storage]` section of a cachet config that keeps its packs here, under
    /// `prefix`.
    pub fn storage_toml(&self, prefix: &str) -> String {
        format!(
            "[storage]\ntype = \"s3\"\nbucket = \"{}\"\nendpoint = \"{}\"\nregion = \"garage\"\n\
             prefix = \"{prefix}\"\nallow_http = true\naccess_key_id = \"{}\"\n\
             secret_access_key = \"{}\"\nrequest_timeout_secs = 3\nretry_timeout_secs = 6\n",
            self.bucket,
            self.endpoint(),
            self.key_id,
            self.secret
        )
    }

    /// The objects in the bucket under `prefix`: names and sizes.
    pub fn objects(&self, prefix: &str) -> Vec<(String, u64)> {
        // Listed through the S3 API with the test's own client, not cachet's.
        let store = object_store::aws::AmazonS3Builder::new()
            .with_bucket_name(&self.bucket)
            .with_endpoint(self.endpoint())
            .with_region("garage")
            .with_allow_http(true)
            .with_access_key_id(&self.key_id)
            .with_secret_access_key(&self.secret)
            .build()
            .unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            use futures::TryStreamExt as _;
            let prefix = object_store::path::Path::from(prefix);
            let listed: Vec<_> = object_store::ObjectStore::list(&store, Some(&prefix))
                .try_collect()
                .await
                .unwrap();
            listed
                .into_iter()
                .map(|m| (m.location.to_string(), m.size))
                .collect()
        })
    }

    /// SIGKILL: the store is gone, connections are refused.
    pub fn stop(&mut self) {
        crate::harness::kill_child(&mut self.child);
    }

    /// Starts it again on the same ports and data, and waits until the bucket answers.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
        self.wait(|g| g.cli_quiet(&["bucket", "info", "cachet"]));
    }

    /// SIGSTOP / SIGCONT: a store that accepts connections and never answers.
    pub fn freeze(&self, frozen: bool) {
        let pid = self.child.as_ref().expect("running").id();
        let sig = if frozen { "-STOP" } else { "-CONT" };
        assert!(Command::new("kill")
            .args([sig, &pid.to_string()])
            .status()
            .unwrap()
            .success());
    }
}

impl Drop for Garage {
    fn drop(&mut self) {
        if let Some(c) = &self.child {
            let _ = Command::new("kill")
                .args(["-CONT", &c.id().to_string()])
                .status();
        }
        self.stop();
    }
}
