//! Real processes for the integration tests: the `cachet` binary on a loopback port,
//! and the real `nix` client, each "host" with its own client cache and settings.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

pub fn client() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(120))
        .build()
        .unwrap()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub struct Server {
    child: Option<Child>,
    pub port: u16,
    pub dir: tempfile::TempDir,
    extra_args: Vec<String>,
}

impl Server {
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    pub fn start_with(extra_args: &[&str]) -> Self {
        let mut s = Self {
            child: None,
            port: free_port(),
            dir: tempfile::tempdir().unwrap(),
            extra_args: extra_args.iter().map(|s| s.to_string()).collect(),
        };
        s.spawn();
        s
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("server.log"))
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_cachet"))
            .arg("--listen")
            .arg(format!("127.0.0.1:{}", self.port))
            .arg("--data-dir")
            .arg(self.data_dir())
            .args(&self.extra_args)
            .env("CACHET_LOG", "info")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("starting cachet");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(r) = client()
                .get(format!("{}/nix-cache-info", self.url()))
                .send()
            {
                if r.status().is_success() {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "cachet did not start:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    /// SIGKILL: no shutdown code runs.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    pub fn base(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The URL of the `main` cache.
    pub fn url(&self) -> String {
        format!("{}/main", self.base())
    }

    pub fn token(&self) -> String {
        std::fs::read_to_string(self.data_dir().join("admin-token"))
            .unwrap()
            .trim()
            .to_owned()
    }

    pub fn public_key(&self) -> String {
        let info: serde_json::Value = client()
            .get(format!("{}/_api/v1/caches/main", self.base()))
            .send()
            .unwrap()
            .json()
            .unwrap();
        info["public_key"].as_str().unwrap().to_owned()
    }

    /// The pack objects on disk: (count, total bytes).
    pub fn chunk_files(&self) -> (u64, u64) {
        fn walk(p: &Path, acc: &mut (u64, u64)) {
            for e in std::fs::read_dir(p).into_iter().flatten().flatten() {
                let m = e.metadata().unwrap();
                if m.is_dir() {
                    walk(&e.path(), acc);
                } else {
                    acc.0 += 1;
                    acc.1 += m.len();
                }
            }
        }
        let mut acc = (0, 0);
        walk(&self.data_dir().join("store/packs"), &mut acc);
        acc
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

/// One machine's `nix`: its own client cache (Nix caches narinfos it pushed, so a
/// pusher would never ask the server again), its own netrc and trusted key.
pub struct NixHost {
    pub dir: tempfile::TempDir,
    config: String,
}

impl NixHost {
    pub fn new(server: &Server) -> Self {
        Self::with_token(server, Some(&server.token()))
    }

    pub fn with_token(server: &Server, token: Option<&str>) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let netrc = dir.path().join("netrc");
        let line = token
            .map(|t| format!("machine 127.0.0.1 password {t}\n"))
            .unwrap_or_default();
        std::fs::write(&netrc, line).unwrap();
        let config = format!(
            "experimental-features = nix-command\nsandbox = false\nsubstituters =\n\
             build-users-group =\nnetrc-file = {}\nrequire-sigs = true\n\
             trusted-public-keys = {}\nconnect-timeout = 5\n",
            netrc.display(),
            server.public_key()
        );
        Self { dir, config }
    }

    pub fn cmd(&self, program: &str) -> Command {
        let mut c = Command::new(program);
        c.env("NIX_CONFIG", &self.config)
            .env("XDG_CACHE_HOME", self.dir.path().join("cache"))
            .stdin(Stdio::null());
        c
    }

    pub fn nix(&self, args: &[&str]) -> Output {
        self.cmd("nix").args(args).output().expect("running nix")
    }

    /// A fresh chroot store for this host.
    pub fn store(&self, name: &str) -> String {
        self.dir.path().join(name).display().to_string()
    }
}

pub fn ok(out: Output) -> String {
    assert!(
        out.status.success(),
        "command failed: {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

const BASE_NIX_CONFIG: &str =
    "experimental-features = nix-command\nsandbox = false\nsubstituters =\nbuild-users-group =\n";

pub fn local_nix(args: &[&str]) -> Output {
    Command::new("nix")
        .args(args)
        .env("NIX_CONFIG", BASE_NIX_CONFIG)
        .output()
        .expect("running nix (is nix-bin installed? the README's test command installs it)")
}

#[derive(Clone, Debug)]
pub struct Closure {
    pub top: String,
    /// Every path of the closure and its NarHash, from the local store.
    pub nar_hashes: BTreeMap<String, String>,
    pub nar_bytes: u64,
}

/// NarHash (as Nix prints it) of every path in the closure of `top`, in `store`.
pub fn nar_hashes(store: Option<&str>, top: &str) -> BTreeMap<String, String> {
    let mut args = vec!["path-info", "--json", "-r", top];
    if let Some(s) = store {
        args.extend(["--store", s]);
    }
    let json: serde_json::Value = serde_json::from_str(&ok(local_nix(&args))).unwrap();
    json.as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["path"].as_str().unwrap().to_owned(),
                p["narHash"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

/// Builds (once per test run) a closure from this machine's Debian packages with the
/// project's generator.
pub fn closure(budget_mib: u32, salt: &str) -> Closure {
    static BUILT: OnceLock<Mutex<BTreeMap<(u32, String), Closure>>> = OnceLock::new();
    let built = BUILT.get_or_init(Default::default);
    let mut built = built.lock().unwrap();
    let key = (budget_mib, salt.to_owned());
    if let Some(c) = built.get(&key) {
        return c.clone();
    }
    let link = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("closure-{budget_mib}-{salt}"));
    let out = Command::new("python3")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/workload/mkclosure.py"
        ))
        .args([
            "--budget-mib",
            &budget_mib.to_string(),
            "--salt",
            salt,
            "--out-link",
        ])
        .arg(&link)
        .output()
        .expect("running the closure generator");
    let top = ok(out).trim().to_owned();
    let nar_hashes = nar_hashes(None, &top);
    let json: serde_json::Value =
        serde_json::from_str(&ok(local_nix(&["path-info", "--json", "-r", &top]))).unwrap();
    let nar_bytes = json
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["narSize"].as_u64().unwrap())
        .sum();
    let c = Closure {
        top,
        nar_hashes,
        nar_bytes,
    };
    built.insert(key, c.clone());
    c
}

/// Pushes `path` with `nix copy --to`, as a CI runner does.
pub fn push(host: &NixHost, server: &Server, compression: &str, path: &str) -> Output {
    let to = format!("{}?compression={compression}", server.url());
    host.nix(&["copy", "--to", &to, path])
}

/// Copies `top` into a fresh chroot store of `host`, checking signatures, and returns
/// the NarHashes that arrived.
pub fn pull(
    host: &NixHost,
    server: &Server,
    store_name: &str,
    top: &str,
) -> BTreeMap<String, String> {
    let store = host.store(store_name);
    ok(host.nix(&["copy", "--from", &server.url(), "--to", &store, top]));
    nar_hashes(Some(&store), top)
}
