//! Real processes for the integration tests: the `cachet` binary on a loopback port,
//! and the real `nix` client, each "host" with its own client cache and settings. Two
//! clients: Debian 12's Nix 2.8 on this machine, and a current one (Debian 13's Nix
//! 2.26) in a chroot that `scripts/test.sh` prepares (`scripts/nix-current.sh`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use cachet::nix::Sha256;
use reqwest::blocking::Response;

/// An HTTP client with a generous timeout.
pub fn client() -> reqwest::blocking::Client {
    // The one crypto provider built in (ring), for whatever TLS the client sets up.
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(120))
        .build()
        .unwrap()
}

/// An HTTP client that trusts only the CA certificates of `ca_file`.
pub fn client_trusting(ca_file: &Path) -> reqwest::blocking::Client {
    use rustls_pki_types::pem::PemObject as _;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pki_types::CertificateDer::pem_file_iter(ca_file).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    reqwest::blocking::Client::builder()
        .tls_backend_preconfigured(config)
        .timeout(Duration::from_secs(120))
        .build()
        .unwrap()
}

/// A new CA and a certificate it signed for 127.0.0.1 and localhost, written to `dir`
/// as `<name>-ca.pem`, `<name>-cert.pem` and `<name>-key.pem`.
pub struct TestCertificate {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TestCertificate {
    pub fn new(dir: &Path, name: &str) -> Self {
        use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, format!("cachet test CA {name}"));
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
        let key = KeyPair::generate().unwrap();
        let params = CertificateParams::new(vec!["127.0.0.1".into(), "localhost".into()]).unwrap();
        let cert = params.signed_by(&key, &ca).unwrap();
        let out = Self {
            ca: dir.join(format!("{name}-ca.pem")),
            cert: dir.join(format!("{name}-cert.pem")),
            key: dir.join(format!("{name}-key.pem")),
        };
        std::fs::write(&out.ca, ca.pem()).unwrap();
        std::fs::write(&out.cert, cert.pem()).unwrap();
        std::fs::write(&out.key, key.serialize_pem()).unwrap();
        out
    }
}

pub use cachet::testing::free_port;

/// A `cachet` process on a loopback port, with its data in a temporary directory.
pub struct Server {
    child: Option<Child>,
    pub port: u16,
    pub dir: tempfile::TempDir,
    data_dir: PathBuf,
    extra_args: Vec<String>,
    /// The open-file limit to start it under, if any.
    open_files: Option<u64>,
    /// The CA of its certificate, when it serves HTTPS.
    pub ca_file: Option<PathBuf>,
}

/// How to start a server.
#[derive(Default)]
pub struct Start<'a> {
    /// The TOML config, if any.
    pub config: Option<&'a str>,
    /// Another data directory (a small filesystem, say).
    pub data_dir: Option<PathBuf>,
    /// A limit on open files to start it under (soft and hard: it cannot raise it).
    pub open_files: Option<u64>,
    /// The CA that signed the server's certificate, when the config makes it serve
    /// HTTPS.
    pub ca_file: Option<PathBuf>,
}

impl Server {
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    pub fn start_with(extra_args: &[&str]) -> Self {
        Self::launch(Start::default(), extra_args)
    }

    /// A server with `config` as its configuration file.
    pub fn with_config(config: &str) -> Self {
        Self::launch(
            Start {
                config: Some(config),
                ..Start::default()
            },
            &[],
        )
    }

    pub fn launch(start: Start, extra_args: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut args: Vec<String> = extra_args.iter().map(|s| s.to_string()).collect();
        if let Some(config) = start.config {
            let path = dir.path().join("cachet.toml");
            std::fs::write(&path, config).unwrap();
            args.extend(["--config".into(), path.display().to_string()]);
        }
        let mut s = Self {
            child: None,
            port: free_port(),
            data_dir: start.data_dir.unwrap_or_else(|| dir.path().join("data")),
            dir,
            extra_args: args,
            open_files: start.open_files,
            ca_file: start.ca_file,
        };
        s.spawn();
        s.wait_ready();
        s
    }

    pub fn data_dir(&self) -> PathBuf {
        self.data_dir.clone()
    }

    /// Starts the process; it may exit at once (see `exited`).
    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("server.log"))
            .unwrap();
        let bin = env!("CARGO_BIN_EXE_cachet");
        let mut cmd = match self.open_files {
            // prlimit execs the server, so the child's pid is the server's.
            Some(n) => {
                let mut c = Command::new("prlimit");
                c.arg(format!("--nofile={n}:{n}")).arg("--").arg(bin);
                c
            }
            None => Command::new(bin),
        };
        let child = cmd
            .arg("--listen")
            .arg(format!("127.0.0.1:{}", self.port))
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args(&self.extra_args)
            .env("CACHET_LOG", "info")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("starting cachet");
        self.child = Some(child);
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut port_retries = 0;
        loop {
            if let Ok(r) = self.http().get(format!("{}/health", self.base())).send() {
                if r.status().is_success() {
                    return;
                }
            }
            if let Some(status) = self.exited() {
                // The port chosen was free a moment ago; another process may have
                // taken it since (the tests start servers, clusters and clients at
                // once): another port, a few times.
                let taken = self.log().contains("Address already in use");
                if taken && port_retries < 3 {
                    port_retries += 1;
                    self.port = free_port();
                    self.spawn();
                    continue;
                }
                panic!("cachet exited ({status}):\n{}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "cachet did not start:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The exit status, if the process has exited.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.as_mut().and_then(|c| c.try_wait().unwrap())
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// The process's peak resident memory so far, in KiB.
    pub fn peak_rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmHWM in /proc/<pid>/status")
    }

    /// SIGKILL: no shutdown code runs.
    pub fn kill(&mut self) {
        kill_child(&mut self.child);
    }

    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
        self.wait_ready();
    }

    /// Restarts the process without waiting for it to serve.
    pub fn restart_unchecked(&mut self) {
        self.kill();
        self.spawn();
    }

    pub fn base(&self) -> String {
        let scheme = if self.ca_file.is_some() {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    /// A client for this server: trusting its CA when it serves HTTPS.
    pub fn http(&self) -> reqwest::blocking::Client {
        match &self.ca_file {
            Some(ca) => client_trusting(ca),
            None => client(),
        }
    }

    /// The URL of the `main` cache.
    pub fn url(&self) -> String {
        self.cache_url("main")
    }

    /// The URL of a cache.
    pub fn cache_url(&self, cache: &str) -> String {
        format!("{}/{cache}", self.base())
    }

    /// `cache-admin` with this server and the admin token in its environment.
    pub fn cache_admin(&self, args: &[&str]) -> Output {
        let mut with_ca = Vec::new();
        if let Some(ca) = &self.ca_file {
            with_ca.extend(["--ca-file".to_owned(), ca.display().to_string()]);
        }
        with_ca.extend(args.iter().map(|a| a.to_string()));
        let args: Vec<&str> = with_ca.iter().map(String::as_str).collect();
        cache_admin(&self.base(), Some(&self.token()), &args)
    }

    /// `cache-admin`, which must succeed; its standard output.
    pub fn admin(&self, args: &[&str]) -> String {
        ok(self.cache_admin(args))
    }

    /// A new token made with `cache-admin token create`; its secret.
    pub fn new_token(&self, name: &str, perms: &str, caches: &[&str]) -> String {
        let mut args = vec!["token", "create", "--name", name, "--perm", perms];
        for c in caches {
            args.extend(["--cache", c]);
        }
        let out = self.admin(&args);
        out.lines()
            .last()
            .expect("the secret on the last line")
            .to_owned()
    }

    /// The public key of a cache's newest signing key.
    pub fn public_key_of(&self, cache: &str) -> String {
        let r = self.admin_get(&format!("/_api/v1/caches/{cache}"));
        assert_eq!(r.status(), 200, "cache {cache}");
        let info: serde_json::Value = r.json().unwrap();
        info["public_key"].as_str().unwrap().to_owned()
    }

    pub fn token(&self) -> String {
        std::fs::read_to_string(self.data_dir().join("admin-token"))
            .unwrap()
            .trim()
            .to_owned()
    }

    /// `GET` of a path under the `main` cache, without credentials.
    pub fn get(&self, path: &str) -> Response {
        client()
            .get(format!("{}/{path}", self.url()))
            .send()
            .unwrap()
    }

    /// The status of `get`.
    pub fn get_status(&self, path: &str) -> u16 {
        self.get(path).status().as_u16()
    }

    /// The status of a `HEAD` of a path under the `main` cache.
    pub fn head_status(&self, path: &str) -> u16 {
        client()
            .head(format!("{}/{path}", self.url()))
            .send()
            .unwrap()
            .status()
            .as_u16()
    }

    /// `PUT` of a path under the `main` cache with the admin token.
    pub fn put(&self, path: &str, body: impl Into<reqwest::blocking::Body>) -> Response {
        client()
            .put(format!("{}/{path}", self.url()))
            .bearer_auth(self.token())
            .body(body)
            .send()
            .unwrap()
    }

    /// `GET` of a path of the server (not of a cache) with the admin token.
    pub fn admin_get(&self, path: &str) -> Response {
        self.http()
            .get(format!("{}{path}", self.base()))
            .bearer_auth(self.token())
            .send()
            .unwrap()
    }

    pub fn public_key(&self) -> String {
        self.public_key_of("main")
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

/// Runs `cache-admin` against `server` with `token`, with no config file of the user's.
pub fn cache_admin(server: &str, token: Option<&str>, args: &[&str]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_cache-admin"));
    c.args(args)
        .env("CACHET_SERVER", server)
        .env("XDG_CONFIG_HOME", "/nonexistent")
        .env_remove("CACHET_TOKEN");
    if let Some(t) = token {
        c.env("CACHET_TOKEN", t);
    }
    c.output().expect("running cache-admin")
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Which real Nix client a host runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Nix {
    /// Debian 12's nix-bin, on this machine.
    V2_8,
    /// Debian 13's nix-bin, in the chroot `CACHET_NIX_CURRENT` names.
    Current,
}

/// The root of the current client's chroot.
fn current_root() -> PathBuf {
    let root = std::env::var_os("CACHET_NIX_CURRENT").expect(
        "CACHET_NIX_CURRENT names the chroot of the current Nix client; \
         scripts/test.sh prepares it (scripts/nix-current.sh)",
    );
    PathBuf::from(root)
}

/// One machine's `nix`: its own client cache (Nix caches narinfos it pushed, so a
/// pusher would never ask the server again), its own netrc and trusted key, and for
/// the current client its own store (the chroot's /nix is this host's).
pub struct NixHost {
    pub dir: tempfile::TempDir,
    pub nix: Nix,
    config: String,
    /// A CA file to trust for HTTPS, as this host's `nix` sees it.
    ca_file: Option<String>,
}

const BASE_NIX_CONFIG: &str =
    "experimental-features = nix-command\nsandbox = false\nsubstituters =\nbuild-users-group =\n";

impl NixHost {
    pub fn new(server: &Server, nix: Nix) -> Self {
        Self::with_token(server, Some(&server.token()), nix)
    }

    pub fn with_token(server: &Server, token: Option<&str>, nix: Nix) -> Self {
        Self::trusting(token, &[&server.public_key()], nix)
    }

    /// A host with `token` in its netrc, trusting `keys`.
    pub fn trusting(token: Option<&str>, keys: &[&str], nix: Nix) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let line = token
            .map(|t| format!("machine 127.0.0.1 password {t}\n"))
            .unwrap_or_default();
        std::fs::write(dir.path().join("netrc"), line).unwrap();
        let mut host = Self {
            dir,
            nix,
            config: String::new(),
            ca_file: None,
        };
        host.config = format!(
            "{BASE_NIX_CONFIG}netrc-file = {}\nrequire-sigs = true\n\
             trusted-public-keys = {}\nconnect-timeout = 5\n",
            host.path("netrc"),
            keys.join(" ")
        );
        host
    }

    /// This host with a line more in its nix.conf.
    pub fn with_setting(mut self, line: &str) -> Self {
        self.config.push_str(line);
        self.config.push('\n');
        self
    }

    /// This host trusting the CA certificates of `ca` for HTTPS: through the
    /// `ssl-cert-file` setting, or for Nix 2.8, which has no such setting, its
    /// `NIX_SSL_CERT_FILE` variable.
    pub fn trusting_ca(mut self, ca: &Path) -> Self {
        std::fs::copy(ca, self.dir.path().join("ca.pem")).unwrap();
        let path = self.path("ca.pem");
        match self.nix {
            Nix::V2_8 => self.ca_file = Some(path),
            Nix::Current => self.config.push_str(&format!("ssl-cert-file = {path}\n")),
        }
        self
    }

    /// A path of this host's directory as its `nix` sees it.
    pub fn path(&self, name: &str) -> String {
        match self.nix {
            Nix::V2_8 => self.dir.path().join(name).display().to_string(),
            Nix::Current => format!("/mnt/{name}"),
        }
    }

    /// A command of this host's Nix: on this machine, or in the chroot with this host's
    /// directory at /mnt and its store at /nix, in a mount namespace of its own so
    /// that nothing stays mounted.
    pub fn cmd(&self, program: &str) -> Command {
        let mut c = match self.nix {
            Nix::V2_8 => {
                let mut c = Command::new(program);
                c.env("NIX_CONFIG", &self.config)
                    .env("XDG_CACHE_HOME", self.dir.path().join("cache"));
                if let Some(ca) = &self.ca_file {
                    c.env("NIX_SSL_CERT_FILE", ca);
                }
                c
            }
            Nix::Current => {
                let mut c = Command::new("unshare");
                c.args(["--mount", "--propagation", "private", "sh", "-ec"])
                    .arg(
                        "root=$1 host=$2; shift 2; mkdir -p \"$host/nix\"; \
                         mount -t proc proc \"$root/proc\"; \
                         mount --bind \"$host/nix\" \"$root/nix\"; \
                         mount --bind \"$host\" \"$root/mnt\"; \
                         exec chroot \"$root\" \"$@\"",
                    )
                    .arg("sh")
                    .arg(current_root())
                    .arg(self.dir.path())
                    .args(["env", "-i", "PATH=/usr/bin:/bin", "HOME=/mnt/home"])
                    .arg("XDG_CACHE_HOME=/mnt/cache")
                    .arg(format!("NIX_CONFIG={}", self.config))
                    .arg(program);
                c
            }
        };
        c.stdin(Stdio::null());
        c
    }

    pub fn nix(&self, args: &[&str]) -> Output {
        self.cmd("nix").args(args).output().expect("running nix")
    }

    /// A fresh chroot store of this host, as its `nix` names it.
    pub fn store(&self, name: &str) -> String {
        self.path(name)
    }

    /// Makes the closure available to this host's Nix: the current client's store is
    /// its own, so the closure built on this machine is exported into it.
    pub fn import(&self, closure: &Closure) {
        if self.nix == Nix::V2_8 {
            return;
        }
        let paths: Vec<&str> = closure.nar_hashes.keys().map(String::as_str).collect();
        let export = Command::new("nix-store")
            .arg("--export")
            .args(&paths)
            .env("NIX_CONFIG", BASE_NIX_CONFIG)
            .output()
            .expect("nix-store --export");
        assert!(
            export.status.success(),
            "nix-store --export: {}",
            String::from_utf8_lossy(&export.stderr)
        );
        let mut import = self
            .cmd("nix-store")
            .arg("--import")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        std::io::Write::write_all(import.stdin.as_mut().unwrap(), &export.stdout).unwrap();
        drop(import.stdin.take());
        ok(import.wait_with_output().unwrap());
    }

    /// NarHash of every path in the closure of `top`, in `store` (this host's own when
    /// `None`), from this host's Nix.
    pub fn nar_hashes(&self, store: Option<&str>, top: &str) -> BTreeMap<String, Sha256> {
        let mut args = vec!["path-info", "--json", "-r", top];
        if let Some(s) = store {
            args.extend(["--store", s]);
        }
        parse_path_info(&ok(self.nix(&args)))
            .into_iter()
            .map(|(p, info)| (p, info.0))
            .collect()
    }

    /// Pushes `top` with `nix copy --to`, as a CI runner does.
    pub fn push(&self, server: &Server, compression: &str, closure: &Closure) -> Output {
        self.push_to(&server.url(), compression, closure)
    }

    /// Pushes `top` to the cache at `url`.
    pub fn push_to(&self, url: &str, compression: &str, closure: &Closure) -> Output {
        self.import(closure);
        let to = format!("{url}?compression={compression}");
        self.nix(&["copy", "--to", &to, &closure.top])
    }

    /// Copies `top` from the cache at `url` into a fresh store of this host.
    pub fn copy_from(&self, url: &str, store_name: &str, top: &str) -> Output {
        let store = self.store(store_name);
        self.nix(&["copy", "--from", url, "--to", &store, top])
    }

    /// Copies `top` into a fresh chroot store of this host, checking signatures, and
    /// returns the NarHashes that arrived.
    pub fn pull(&self, server: &Server, store_name: &str, top: &str) -> BTreeMap<String, Sha256> {
        let store = self.store(store_name);
        ok(self.nix(&["copy", "--from", &server.url(), "--to", &store, top]));
        self.nar_hashes(Some(&store), top)
    }
}

/// `nix path-info --json`'s paths with their (NarHash, NarSize): an array of objects
/// with `path` in Nix 2.8, an object keyed by path in current Nix (null for a path
/// that is not valid).
pub fn parse_path_info(json: &str) -> BTreeMap<String, (Sha256, u64)> {
    let value: serde_json::Value = serde_json::from_str(json).unwrap();
    let entries: Vec<(String, serde_json::Value)> = match value {
        serde_json::Value::Array(items) => items
            .into_iter()
            .map(|i| (i["path"].as_str().unwrap().to_owned(), i))
            .collect(),
        serde_json::Value::Object(map) => map.into_iter().collect(),
        other => panic!("unexpected path-info output {other}"),
    };
    entries
        .into_iter()
        .filter_map(|(path, info)| {
            let hash = info.get("narHash")?.as_str()?.parse().ok()?;
            Some((path, (hash, info["narSize"].as_u64()?)))
        })
        .collect()
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
    pub nar_hashes: BTreeMap<String, Sha256>,
    pub nar_bytes: u64,
}

/// Builds (once per test run) a closure from this machine's Debian packages with the
/// project's generator.
pub fn closure(budget_mib: u32, salt: &str) -> Closure {
    static BUILT: OnceLock<Mutex<BTreeMap<(u32, String), Closure>>> = OnceLock::new();
    let built = BUILT.get_or_init(Default::default);
    let mut built = built.lock().unwrap_or_else(|e| e.into_inner());
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
    let info = parse_path_info(&ok(local_nix(&["path-info", "--json", "-r", &top])));
    let c = Closure {
        top,
        nar_bytes: info.values().map(|(_, size)| size).sum(),
        nar_hashes: info.into_iter().map(|(p, (h, _))| (p, h)).collect(),
    };
    built.insert(key, c.clone());
    c
}

/// Runs each named test function (`fn(Nix)`) once with each real client, as
/// `nix_2_8::<name>` and `nix_current::<name>`.
macro_rules! with_each_client {
    ($($name:ident),* $(,)?) => {
        mod nix_2_8 {
            $(#[test] fn $name() { super::$name(crate::harness::Nix::V2_8) })*
        }
        mod nix_current {
            $(#[test] fn $name() { super::$name(crate::harness::Nix::Current) })*
        }
    };
}
pub(crate) use with_each_client;

/// Held by the tests that load the machine most (floods, hundreds of thousands of
/// requests), so that two of them never run at once on its few cores and starve each
/// other's timings.
pub fn heavy() -> std::sync::MutexGuard<'static, ()> {
    static HEAVY: Mutex<()> = Mutex::new(());
    HEAVY.lock().unwrap_or_else(|e| e.into_inner())
}

/// SIGKILLs the process, if there is one, and reaps it.
pub fn kill_child(child: &mut Option<std::process::Child>) {
    if let Some(mut c) = child.take() {
        let _ = c.kill();
        c.wait().unwrap();
    }
}
