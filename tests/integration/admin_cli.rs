//! Every `cache-admin` command against a real server: what it prints for people and
//! for scripts, where it finds the server and the token, and how it fails.

use std::process::Output;

use crate::golden::{narinfo_text, LEAF, TOP};
use crate::harness::{cache_admin, client, ok, Server};
use crate::tenancy::upload_golden_to;
use cachet::nix::NarInfo;

fn fails(out: Output, reason: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "should fail: {stderr}");
    assert!(stderr.contains(reason), "{stderr:?} should say {reason:?}");
}

/// The value of `name:` in `fields` output.
fn field(text: &str, name: &str) -> String {
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name}:")))
        .map(|v| v.trim().to_owned())
        .unwrap_or_else(|| panic!("no {name} in {text}"))
}

fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text}"))
}

#[test]
fn caches_are_created_listed_changed_and_deleted() {
    let server = Server::start();
    let created = server.admin(&[
        "cache",
        "create",
        "team-a",
        "--private",
        "--priority",
        "30",
        "--keep-age",
        "30d",
        "--keep-size",
        "500GiB",
    ]);
    assert_eq!(field(&created, "visibility"), "private");
    assert_eq!(field(&created, "priority"), "30");
    assert!(field(&created, "public key").starts_with("team-a-1:"));
    assert_eq!(field(&created, "keep size"), "500.0 GiB");

    // An imported key, as `nix-store --generate-binary-cache-key` writes it (and
    // sops-nix provides it).
    let dir = tempfile::tempdir().unwrap();
    let (sk, pk) = (dir.path().join("sk"), dir.path().join("pk"));
    ok(std::process::Command::new("nix-store")
        .args(["--generate-binary-cache-key", "cache.example.org-1"])
        .arg(&sk)
        .arg(&pk)
        .output()
        .unwrap());
    let imported = json(&server.admin(&[
        "--json",
        "cache",
        "create",
        "imported",
        "--secret-key-file",
        sk.to_str().unwrap(),
    ]));
    assert_eq!(
        imported["public_key"],
        std::fs::read_to_string(&pk).unwrap().trim()
    );
    assert_eq!(imported["public"], true);
    let key_file = std::fs::read_dir(server.data_dir().join("keys"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| {
            std::fs::read_to_string(p)
                .unwrap()
                .starts_with("cache.example.org-1:")
        })
        .expect("the imported key is kept in the data directory");
    use std::os::unix::fs::PermissionsExt as _;
    assert_eq!(
        std::fs::metadata(key_file).unwrap().permissions().mode() & 0o777,
        0o600
    );

    let table = server.admin(&["cache", "list"]);
    let lines: Vec<&str> = table.lines().collect();
    assert!(
        lines[0].starts_with("NAME ") && lines[0].contains("VISIBILITY"),
        "{table}"
    );
    assert_eq!(lines.len(), 4, "a header and three caches: {table}");
    let column = lines[0].find("VISIBILITY").unwrap();
    for line in &lines[1..] {
        assert!(
            line[column..].starts_with("public") || line[column..].starts_with("private"),
            "aligned: {table}"
        );
    }
    let listed = json(&server.admin(&["cache", "list", "--json"]));
    let names: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["imported", "main", "team-a"]);

    let updated = json(&server.admin(&[
        "--json",
        "cache",
        "update",
        "team-a",
        "--public",
        "--priority",
        "10",
        "--keep-size",
        "none",
        "--client-signatures",
        "drop",
    ]));
    assert_eq!(updated["public"], true);
    assert_eq!(updated["priority"], 10);
    assert_eq!(
        updated["retention"]["max_size_bytes"],
        serde_json::Value::Null
    );
    assert_eq!(updated["retention"]["max_age_secs"], 30 * 86400);
    assert_eq!(updated["keep_client_signatures"], false);
    let info = server.admin(&["cache", "info", "team-a"]);
    assert_eq!(field(&info, "visibility"), "public");
    assert_eq!(field(&info, "client signatures"), "dropped");
    let r = client()
        .get(format!("{}/nix-cache-info", server.cache_url("team-a")))
        .send()
        .unwrap();
    assert!(r.text().unwrap().contains("Priority: 10"));

    // Names are checked; deletion needs --yes; a deleted cache is gone, and its name
    // can be used again from nothing.
    fails(
        server.cache_admin(&["cache", "create", "metrics"]),
        "reserved",
    );
    fails(
        server.cache_admin(&["cache", "create", "Bad_Name"]),
        "cache name must be",
    );
    fails(server.cache_admin(&["cache", "create", "team-a"]), "exists");
    fails(
        server.cache_admin(&["cache", "update", "team-a"]),
        "nothing to change",
    );
    upload_golden_to(&server, "team-a", &server.token());
    fails(server.cache_admin(&["cache", "delete", "team-a"]), "--yes");
    assert!(server
        .admin(&["cache", "delete", "team-a", "--yes"])
        .contains("deleted cache team-a"));
    fails(server.cache_admin(&["cache", "info", "team-a"]), "404");
    server.admin(&["cache", "create", "team-a"]);
    let r = client()
        .get(format!("{}/{LEAF}.narinfo", server.cache_url("team-a")))
        .send()
        .unwrap();
    assert_eq!(r.status(), 404, "nothing of the deleted cache comes back");
    assert_eq!(
        json(&server.admin(&["--json", "cache", "info", "team-a"]))["paths"],
        0
    );
}

#[test]
fn tokens_are_created_listed_and_revoked() {
    let server = Server::start();
    let out = server.admin(&[
        "token",
        "create",
        "--name",
        "ci",
        "--perm",
        "pull,push",
        "--cache",
        "main",
        "--cache",
        "team-*",
        "--expires",
        "30d",
    ]);
    let secret = out.lines().last().unwrap();
    assert!(
        secret.starts_with("cachet_") && !secret.contains(' '),
        "{out}"
    );
    assert_eq!(field(&out, "permissions"), "pull,push");
    assert_eq!(field(&out, "caches"), "main,team-*");
    let made = json(&server.admin(&[
        "--json", "token", "create", "--name", "hosts", "--perm", "pull", "--cache", "main",
    ]));
    let hosts = made["secret"].as_str().unwrap().to_owned();
    assert_eq!(made["token"]["name"], "hosts");

    // The new token works, and the list never shows a secret.
    let log = format!(
        "{}/log/4yncvzfm86cppqd91p6dvnpbbdx5d126-golden-top.drv",
        server.url()
    );
    let r = client()
        .put(&log)
        .bearer_auth(secret)
        .body("x")
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    let table = server.admin(&["token", "list"]);
    assert!(table.starts_with("NAME "), "{table}");
    assert!(
        table.contains("ci ") && table.contains("hosts ") && table.contains("admin "),
        "{table}"
    );
    assert!(!table.contains(secret) && !table.contains(&hosts) && !table.contains(&server.token()));
    let listed = json(&server.admin(&["--json", "token", "list"]));
    let ci = listed
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "ci")
        .unwrap();
    assert!(ci["expires"].as_u64().unwrap() > ci["created"].as_u64().unwrap() + 29 * 86400);
    assert!(ci["last_used"].as_u64().is_some(), "its use is recorded");
    assert!(!listed.to_string().contains("cachet_"));

    assert!(server
        .admin(&["token", "revoke", "ci"])
        .contains("revoked token ci"));
    let r = client()
        .put(&log)
        .bearer_auth(secret)
        .body("x")
        .send()
        .unwrap();
    assert_eq!(r.status(), 401, "revoked from the next request on");
    assert!(server
        .admin(&["token", "list"])
        .lines()
        .any(|l| l.starts_with("ci ") && l.contains("revoked")));
    fails(server.cache_admin(&["token", "revoke", "ci"]), "404");
    fails(
        server.cache_admin(&[
            "token", "create", "--name", "x", "--perm", "fly", "--cache", "main",
        ]),
        "unknown permission",
    );
    fails(
        server.cache_admin(&[
            "token", "create", "--name", "hosts", "--perm", "pull", "--cache", "main",
        ]),
        "exists",
    );

    // The first admin token goes only once another admin token exists; its file goes
    // with it.
    fails(
        server.cache_admin(&["token", "revoke", "admin"]),
        "last server admin token",
    );
    let ops = server.new_token("ops", "admin", &["*"]);
    assert!(
        cache_admin(&server.base(), Some(&ops), &["token", "revoke", "admin"])
            .status
            .success()
    );
    assert!(!server.data_dir().join("admin-token").exists());
    let old = cache_admin(
        &server.base(),
        Some(&format!("{}x", ops)),
        &["token", "list"],
    );
    fails(old, "401");
    assert!(cache_admin(&server.base(), Some(&ops), &["token", "list"])
        .status
        .success());
    // Tokens are the server admin's: a cache admin may not make them.
    let cache_admin_token = cache_admin(
        &server.base(),
        Some(&ops),
        &[
            "token",
            "create",
            "--name",
            "main-admin",
            "--perm",
            "admin",
            "--cache",
            "main",
        ],
    );
    let main_admin = ok(cache_admin_token).lines().last().unwrap().to_owned();
    fails(
        cache_admin(&server.base(), Some(&main_admin), &["token", "list"]),
        "403",
    );
    fails(
        cache_admin(&server.base(), None, &["token", "list"]),
        "no token given",
    );
}

#[test]
fn keys_rotate_and_paths_are_deleted_without_breaking_closures() {
    let server = Server::start();
    upload_golden_to(&server, "main", &server.token());
    let before = server.public_key();
    let info = server.admin(&["key", "info", "main"]);
    assert!(
        info.lines()
            .any(|l| l.starts_with("main-1 ") && l.contains("signing") && l.contains("2 of 2")),
        "{info}"
    );

    let rotated = server.admin(&["key", "rotate", "main"]);
    assert_eq!(field(&rotated, "re-signed"), "2");
    let new_key = field(&rotated, "trust");
    assert!(new_key.starts_with("main-2:"), "{rotated}");
    // Run again during the rotation, it adds no key and finishes the walk (one cut
    // short, say); an imported key must wait for the resign.
    let again = server.admin(&["key", "rotate", "main"]);
    assert_eq!(field(&again, "re-signed"), "0");
    assert!(again.contains("a rotation was under way"), "{again}");
    let dir = tempfile::tempdir().unwrap();
    let sk = dir.path().join("sk");
    ok(std::process::Command::new("nix-store")
        .args(["--generate-binary-cache-key", "third-1"])
        .arg(&sk)
        .arg(dir.path().join("pk"))
        .output()
        .unwrap());
    fails(
        server.cache_admin(&[
            "key",
            "rotate",
            "main",
            "--secret-key-file",
            sk.to_str().unwrap(),
        ]),
        "rotation of main is under way",
    );
    let info = json(&server.admin(&["--json", "key", "info", "main"]));
    let keys = info["keys"].as_array().unwrap();
    assert_eq!(keys.len(), 2);
    assert!(
        keys.iter()
            .all(|k| k["signing"] == true && k["paths_signed"] == 2),
        "{info}"
    );
    let served = client()
        .get(format!("{}/{LEAF}.narinfo", server.url()))
        .send()
        .unwrap()
        .text()
        .unwrap();
    assert_eq!(
        served.matches("Sig: main-").count(),
        2,
        "both keys sign during the rotation"
    );
    assert_eq!(
        served.matches("Sig: ").count(),
        3,
        "and the client's signature is kept"
    );

    let resigned = json(&server.admin(&["--json", "key", "resign", "main"]));
    assert_eq!(resigned["retired"], serde_json::json!(["main-1"]));
    assert_eq!(resigned["public_key"], new_key.as_str());
    let info = server.admin(&["key", "info", "main"]);
    assert!(
        info.lines()
            .any(|l| l.starts_with("main-1 ") && l.contains("retired") && l.contains("0 of 2")),
        "{info}"
    );
    assert!(
        info.lines()
            .any(|l| l.starts_with("main-2 ") && l.contains("signing") && l.contains("2 of 2")),
        "{info}"
    );
    let served = client()
        .get(format!("{}/{LEAF}.narinfo", server.url()))
        .send()
        .unwrap()
        .text()
        .unwrap();
    let sigs: Vec<&str> = served
        .lines()
        .filter(|l| l.starts_with("Sig: main-"))
        .collect();
    assert_eq!(sigs.len(), 1);
    assert!(sigs[0].starts_with("Sig: main-2:"), "{served}");
    assert!(
        info.contains("client signature golden-1: 2 of 2 paths"),
        "{info}"
    );
    assert_ne!(before, new_key);
    // A restart serves with the new key, and the old key's file is gone.
    let mut server = server;
    server.restart();
    assert_eq!(server.public_key(), new_key);
    assert_eq!(
        std::fs::read_dir(server.data_dir().join("keys"))
            .unwrap()
            .count(),
        1
    );

    // TOP refers to LEAF: LEAF goes only with it.
    let top = NarInfo::parse(narinfo_text(TOP).as_bytes())
        .unwrap()
        .store_path
        .full();
    let leaf = NarInfo::parse(narinfo_text(LEAF).as_bytes())
        .unwrap()
        .store_path
        .full();
    let refused = server.cache_admin(&["path", "delete", "main", &leaf]);
    fails(refused, &top);
    assert_eq!(
        server.get_status(&format!("{LEAF}.narinfo")),
        200,
        "nothing was deleted"
    );
    let deleted = server.admin(&["path", "delete", "main", &leaf, "--with-referrers"]);
    assert_eq!(
        deleted,
        format!("deleted {top}\ndeleted {leaf}\n"),
        "referrers first"
    );
    assert_eq!(server.get_status(&format!("{LEAF}.narinfo")), 404);
    assert_eq!(server.get_status(&format!("{TOP}.narinfo")), 404);
    // A retry finds the paths gone and says so.
    let retried = server.admin(&["path", "delete", "main", &leaf]);
    assert_eq!(retried, format!("not in main: {LEAF}\n"));
    fails(
        server.cache_admin(&["path", "delete", "main", "not-a-path"]),
        "not a store path",
    );
    // Pushed again, the closure is whole again.
    upload_golden_to(&server, "main", &server.token());
    let json_out = json(&server.admin(&["--json", "path", "delete", "main", &top]));
    assert_eq!(json_out["deleted"], serde_json::json!([top]));
    assert_eq!(
        server.get_status(&format!("{LEAF}.narinfo")),
        200,
        "the leaf has no referrer left"
    );
}

#[test]
fn use_prints_what_a_host_needs_and_settings_come_from_a_config_file() {
    let server = Server::start();
    server.admin(&["cache", "create", "private", "--private"]);
    let public = server.admin(&["use", "main"]);
    assert!(
        public.contains(&format!("extra-substituters = {}\n", server.url())),
        "{public}"
    );
    assert!(public.contains(&format!(
        "extra-trusted-public-keys = {}\n",
        server.public_key()
    )));
    assert!(!public.contains("netrc"), "{public}");
    let read = server.new_token("hosts", "pull", &["private"]);
    let private = ok(cache_admin(
        &server.base(),
        None,
        &["use", "private", "--token", &read],
    ));
    assert!(private.contains(&format!(
        "extra-substituters = {}\n",
        server.cache_url("private")
    )));
    assert!(
        private.contains(&format!("machine 127.0.0.1 password {read}\n")),
        "{private}"
    );
    let as_json = json(&ok(cache_admin(
        &server.base(),
        None,
        &["--json", "use", "private", "--token", &read],
    )));
    assert_eq!(as_json["public_key"], server.public_key_of("private"));
    // A token from the environment is not written out for hosts.
    let from_env = server.admin(&["use", "private"]);
    assert!(
        !from_env.contains(&server.token()) && from_env.contains("<a pull token"),
        "{from_env}"
    );
    fails(
        cache_admin(&server.base(), None, &["use", "private"]),
        "401",
    );

    // The user's config file: server and a token file.
    let home = tempfile::tempdir().unwrap();
    let dir = home.path().join("cachet");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(home.path().join("token"), format!("{}\n", server.token())).unwrap();
    std::fs::write(
        dir.join("cache-admin.toml"),
        format!(
            "server = \"{}\"\ntoken_file = \"{}\"\n",
            server.base(),
            home.path().join("token").display()
        ),
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cache-admin"))
        .args(["token", "list"])
        .env("XDG_CONFIG_HOME", home.path())
        .env_remove("CACHET_SERVER")
        .env_remove("CACHET_TOKEN")
        .output()
        .unwrap();
    assert!(ok(out).contains("hosts "));
    // Flags win over the file.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cache-admin"))
        .args(["--server", "http://127.0.0.1:1", "token", "list"])
        .env("XDG_CONFIG_HOME", home.path())
        .env_remove("CACHET_SERVER")
        .output()
        .unwrap();
    fails(out, "could not reach http://127.0.0.1:1");
    fails(
        cache_admin("ftp://x", None, &["cache", "list"]),
        "http:// or https://",
    );
}
