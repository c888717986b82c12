//! A PostgreSQL server of its own for a test: Debian's binaries
//! (`/usr/lib/postgresql/<version>/bin`, the newest; `CACHET_PG_BIN` to choose), a
//! cluster in a temporary directory, on a loopback port, stopped when dropped. Run as
//! root, the cluster belongs to the `postgres` user (PostgreSQL refuses root). The
//! first server makes a template cluster (`<tmp>/cachet-pg-template`, made again when
//! the binaries' version changes), which the next ones copy instead of running
//! `initdb` again.

use std::path::{Path, PathBuf};
use std::process::Command;

/// A running PostgreSQL server.
pub struct PgServer {
    bin: PathBuf,
    dir: TempDir,
    /// Its port on 127.0.0.1.
    pub port: u16,
    run_as: Option<&'static str>,
}

/// The settings of a test's pool of `pool_size` connections to the database at `url`.
pub fn settings(url: String, pool_size: usize) -> crate::index::PgSettings {
    crate::index::PgSettings {
        url,
        password: None,
        pool_size,
        connect_timeout: std::time::Duration::from_secs(5),
        cache_bytes: 8 << 20,
    }
}

/// The user tests connect as (the cluster's superuser).
pub const USER: &str = "cachet";

fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("CACHET_PG_BIN") {
        return dir.into();
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL is not installed (apt-get install -y postgresql; scripts/test.sh does)")
        .filter_map(|e| {
            let e = e.ok()?;
            let v: u32 = e.file_name().to_str()?.parse().ok()?;
            Some((v, e.path().join("bin")))
        })
        .collect();
    versions.sort();
    versions
        .pop()
        .expect("no PostgreSQL under /usr/lib/postgresql")
        .1
}

/// A directory under the system's temporary one, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        let mut raw = [0u8; 8];
        getrandom::fill(&mut raw).expect("the operating system's random source failed");
        let name: String = raw.iter().map(|b| format!("{b:02x}")).collect();
        let path = std::env::temp_dir().join(format!("cachet-pg-{name}"));
        std::fs::create_dir(&path).unwrap();
        Self(path)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn is_root() -> bool {
    rustix::process::getuid().is_root()
}

/// `program` of the PostgreSQL binaries, to run as the cluster's owner.
fn command(bin: &Path, run_as: Option<&str>, program: &str) -> Command {
    let path = bin.join(program);
    match run_as {
        Some(user) => {
            let mut c = Command::new("runuser");
            c.arg("-u").arg(user).arg("--").arg(&path);
            c
        }
        None => Command::new(&path),
    }
}

/// Runs `program` (of the PostgreSQL binaries) as the cluster's owner.
fn run(bin: &Path, run_as: Option<&str>, program: &str, args: &[&str]) -> std::process::Output {
    let path = bin.join(program);
    let out = command(bin, run_as, program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", path.display()));
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn chown_to(user: &str, path: &Path) {
    let status = Command::new("chown")
        .arg("-R")
        .arg(format!("{user}:"))
        .arg(path)
        .status()
        .unwrap();
    assert!(status.success(), "chown {}", path.display());
}

/// The template cluster of this build, made once.
fn template(bin: &Path, run_as: Option<&'static str>) -> PathBuf {
    static TEMPLATE: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    TEMPLATE
        .get_or_init(|| {
            // Under the temporary directory, which the postgres user can reach (a
            // checkout under /root, say, it cannot).
            let root = std::env::temp_dir().join("cachet-pg-template");
            let version = run(bin, run_as, "postgres", &["--version"]).stdout;
            let done = root.join("VERSION.made");
            if std::fs::read(&done).ok().as_deref() == Some(&version[..]) {
                return root.join("data");
            }
            let _ = std::fs::remove_dir_all(&root);
            std::fs::create_dir_all(&root).unwrap();
            let data = root.join("data");
            if let Some(user) = run_as {
                chown_to(user, &root);
            }
            run(
                bin,
                run_as,
                "initdb",
                &[
                    "-D",
                    data.to_str().unwrap(),
                    "-U",
                    USER,
                    "-A",
                    "trust",
                    "-E",
                    "UTF8",
                    "--locale=C",
                    "-N",
                ],
            );
            std::fs::write(&done, &version).unwrap();
            data
        })
        .clone()
}

impl PgServer {
    /// A new cluster, started.
    pub fn start() -> Self {
        let bin = bin_dir();
        let run_as = is_root().then_some("postgres");
        let template = template(&bin, run_as);
        let dir = TempDir::new();
        let data = dir.path().join("data");
        let status = Command::new("cp")
            .arg("-a")
            .arg(&template)
            .arg(&data)
            .status()
            .unwrap();
        assert!(status.success(), "copying the template cluster");
        if let Some(user) = run_as {
            chown_to(user, dir.path());
        }
        let mut server = Self {
            bin,
            dir,
            port: 0,
            run_as,
        };
        // A port taken between the choice and the start is tried again.
        for _ in 0..5 {
            server.port = super::free_port();
            if server.pg_ctl_start() {
                return server;
            }
        }
        panic!("PostgreSQL did not start: {}", server.log());
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("log")).unwrap_or_default()
    }

    fn pg_ctl_start(&self) -> bool {
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c full_page_writes=off \
             -c max_connections=200 -c shared_preload_libraries=pg_stat_statements \
             -c pg_stat_statements.track=all",
            self.port,
            self.dir.path().display()
        );
        command(&self.bin, self.run_as, "pg_ctl")
            .arg("-D")
            .arg(self.data())
            .arg("-o")
            .arg(options)
            .arg("-l")
            .arg(self.dir.path().join("log"))
            .args(["-w", "-t", "30", "start"])
            .output()
            .is_ok_and(|o| o.status.success())
    }

    /// Stops the server (`fast`: what a restart of the database looks like to its
    /// clients) and starts it again on the same port.
    pub fn restart(&self) {
        self.stop("fast");
        self.start_again();
    }

    /// Starts a stopped server again, on the same port.
    pub fn start_again(&self) {
        assert!(
            self.pg_ctl_start(),
            "PostgreSQL did not start again: {}",
            self.log()
        );
    }

    /// Stops the server.
    pub fn stop(&self, mode: &str) {
        run(
            &self.bin,
            self.run_as,
            "pg_ctl",
            &[
                "-D",
                self.data().to_str().unwrap(),
                "-m",
                mode,
                "-w",
                "stop",
            ],
        );
    }

    /// A new, empty database; its URL.
    pub fn database(&self, name: &str) -> String {
        run(
            &self.bin,
            self.run_as,
            "createdb",
            &[
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                USER,
                name,
            ],
        );
        self.url(name)
    }

    /// What `sql` prints in database `name` (`psql`, unaligned, tuples only).
    pub fn sql(&self, name: &str, sql: &str) -> String {
        let port = self.port.to_string();
        let out = run(
            &self.bin,
            self.run_as,
            "psql",
            &[
                "-h",
                "127.0.0.1",
                "-p",
                &port,
                "-U",
                USER,
                "-d",
                name,
                "-At",
                "-c",
                sql,
            ],
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The URL of database `name`.
    pub fn url(&self, name: &str) -> String {
        format!("postgres://{USER}@127.0.0.1:{}/{name}", self.port)
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        let _ = command(&self.bin, self.run_as, "pg_ctl")
            .arg("-D")
            .arg(self.data())
            .args(["-m", "immediate", "-w", "stop"])
            .output();
    }
}
