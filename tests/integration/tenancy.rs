//! Many caches and scoped tokens over HTTP: every route against every kind of token,
//! NARs kept apart between caches, deleting paths without breaking closures, and
//! secrets kept out of logs and answers.

use reqwest::blocking::RequestBuilder;
use reqwest::Method;

use crate::golden::{nar_file, narinfo_text, LEAF, TOP};
use crate::harness::{client, Server};
use cachet::nix::NarInfo;

const DRV: &str = "4yncvzfm86cppqd91p6dvnpbbdx5d126-golden-top.drv";
const REALISATION: &str =
    "realisations/sha256:1b4i2y0k1mhhk6hmm4axrhv3gq3m9c8rnqbz7sr3gnhv2rlcdhx8!out.doi";
/// A store path no cache has.
const MISSING: &str = "/nix/store/0000000000000000000000000000000a";

/// A request with `token` as a Bearer token, or none.
fn with(req: RequestBuilder, token: Option<&str>) -> RequestBuilder {
    match token {
        Some(t) => req.bearer_auth(t),
        None => req,
    }
}

/// Uploads the golden closure, a build log and a realisation to `cache`, as `nix copy`
/// would.
pub fn upload_golden_to(server: &Server, cache: &str, token: &str) {
    let put = |path: &str, body: Vec<u8>| {
        let r = client()
            .put(format!("{}/{path}", server.cache_url(cache)))
            .bearer_auth(token)
            .body(body)
            .send()
            .unwrap();
        assert_eq!(r.status(), 200, "{path}: {}", r.text().unwrap());
    };
    for hash in [LEAF, TOP] {
        let text = narinfo_text(hash);
        let info = NarInfo::parse(text.as_bytes()).unwrap();
        put(&info.url, nar_file(&info));
        put(&format!("{hash}.narinfo"), text.into_bytes());
    }
    put(&format!("log/{DRV}"), b"building\n".to_vec());
    put(REALISATION, br#"{"id":"x"}"#.to_vec());
}

/// What a route needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Need {
    Pull,
    Push,
    Delete,
    Admin,
    /// Admin of every cache (`*`).
    ServerAdmin,
    /// Nothing.
    Anyone,
}

/// Who calls.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Holder {
    Nobody,
    /// A token that does not work: unknown, revoked or expired.
    Invalid,
    /// A token with one permission on cache `a`.
    OnA(Need),
    /// The first-start admin token.
    ServerAdmin,
}

fn includes(have: Need, need: Need) -> bool {
    match have {
        Need::Admin => need != Need::ServerAdmin,
        Need::Push => matches!(need, Need::Pull | Need::Push),
        Need::Delete => matches!(need, Need::Pull | Need::Delete),
        Need::Pull => need == Need::Pull,
        _ => unreachable!(),
    }
}

/// The specification: `a` is public, `b` private, `gone` does not exist.
fn expected(holder: Holder, cache: &str, need: Need, ok: u16) -> u16 {
    let valid = matches!(holder, Holder::OnA(_) | Holder::ServerAdmin);
    match need {
        Need::Anyone => return ok,
        Need::ServerAdmin => {
            return match holder {
                Holder::ServerAdmin => ok,
                Holder::OnA(_) => 403,
                _ => 401,
            }
        }
        _ => {}
    }
    let granted = match holder {
        Holder::ServerAdmin => true,
        Holder::OnA(p) => cache == "a" && includes(p, need),
        _ => false,
    };
    if granted {
        return if cache == "gone" { 404 } else { ok };
    }
    if need == Need::Pull && cache == "a" {
        return ok;
    }
    if valid {
        403
    } else {
        401
    }
}

struct Route {
    method: Method,
    /// `{c}` stands for the cache.
    path: String,
    body: Option<Vec<u8>>,
    need: Need,
    /// The status when allowed.
    ok: u16,
}

fn route(method: Method, path: &str, body: Option<Vec<u8>>, need: Need, ok: u16) -> Route {
    Route {
        method,
        path: path.to_owned(),
        body,
        need,
        ok,
    }
}

#[test]
fn every_route_answers_every_token_as_specified() {
    let server = Server::start();
    let admin = server.token();
    server.admin(&["cache", "create", "a"]);
    server.admin(&["cache", "create", "b", "--private"]);
    upload_golden_to(&server, "a", &admin);
    upload_golden_to(&server, "b", &admin);

    let leaf_text = narinfo_text(LEAF);
    let leaf = NarInfo::parse(leaf_text.as_bytes()).unwrap();
    let served = client()
        .get(format!("{}/{LEAF}.narinfo", server.cache_url("a")))
        .send()
        .unwrap()
        .text()
        .unwrap();
    let served_nar = NarInfo::parse(served.as_bytes()).unwrap().url;

    let mut tokens = vec![
        (Holder::Nobody, None),
        (Holder::ServerAdmin, Some(admin.clone())),
    ];
    for (perm, need) in [
        ("pull", Need::Pull),
        ("push", Need::Push),
        ("delete", Need::Delete),
        ("admin", Need::Admin),
    ] {
        let t = server.new_token(&format!("a-{perm}"), perm, &["a"]);
        tokens.push((Holder::OnA(need), Some(t)));
    }
    let revoked = server.new_token("revoked", "push", &["a"]);
    server.admin(&["token", "revoke", "revoked"]);
    let expiring = client()
        .post(format!("{}/_api/v1/tokens", server.base()))
        .bearer_auth(&admin)
        .json(&serde_json::json!({
            "name": "expired", "permissions": ["push"], "caches": ["*"], "expires_in_secs": 1
        }))
        .send()
        .unwrap();
    assert_eq!(expiring.status(), 201);
    let expired = expiring.json::<serde_json::Value>().unwrap()["secret"]
        .as_str()
        .unwrap()
        .to_owned();
    let unknown = format!("cachet_{}", "0".repeat(52));
    for t in [revoked, expired, unknown] {
        tokens.push((Holder::Invalid, Some(t)));
    }
    std::thread::sleep(std::time::Duration::from_millis(2100));

    let nothing_to_delete = br#"{"paths":["/nix/store/00000000000000000000000000000000-x"]}"#;
    let cache_routes = [
        route(Method::GET, "/{c}/nix-cache-info", None, Need::Pull, 200),
        route(Method::GET, "/{c}/", None, Need::Pull, 200),
        route(
            Method::GET,
            &format!("/{{c}}/{LEAF}.narinfo"),
            None,
            Need::Pull,
            200,
        ),
        route(
            Method::HEAD,
            &format!("/{{c}}/{LEAF}.narinfo"),
            None,
            Need::Pull,
            200,
        ),
        route(
            Method::GET,
            &format!("/{{c}}/{LEAF}.ls"),
            None,
            Need::Pull,
            200,
        ),
        route(
            Method::GET,
            &format!("/{{c}}/{served_nar}"),
            None,
            Need::Pull,
            200,
        ),
        route(
            Method::HEAD,
            &format!("/{{c}}/{served_nar}"),
            None,
            Need::Pull,
            200,
        ),
        route(
            Method::GET,
            &format!("/{{c}}/log/{DRV}"),
            None,
            Need::Pull,
            200,
        ),
        route(
            Method::GET,
            &format!("/{{c}}/{REALISATION}"),
            None,
            Need::Pull,
            200,
        ),
        route(Method::GET, "/_api/v1/caches/{c}", None, Need::Pull, 200),
        route(
            Method::PUT,
            &format!("/{{c}}/{}", leaf.url),
            Some(nar_file(&leaf)),
            Need::Push,
            200,
        ),
        route(
            Method::PUT,
            &format!("/{{c}}/{LEAF}.narinfo"),
            Some(leaf_text.clone().into_bytes()),
            Need::Push,
            200,
        ),
        route(
            Method::PUT,
            &format!("/{{c}}/log/{DRV}"),
            Some(b"building\n".to_vec()),
            Need::Push,
            200,
        ),
        route(
            Method::PUT,
            &format!("/{{c}}/{REALISATION}"),
            Some(br#"{"id":"x"}"#.to_vec()),
            Need::Push,
            200,
        ),
        route(
            Method::POST,
            "/_api/v1/caches/{c}/paths/delete",
            Some(nothing_to_delete.to_vec()),
            Need::Delete,
            200,
        ),
        route(
            Method::PATCH,
            "/_api/v1/caches/{c}",
            Some(b"{}".to_vec()),
            Need::Admin,
            200,
        ),
        route(
            Method::GET,
            "/_api/v1/caches/{c}/keys",
            None,
            Need::Admin,
            200,
        ),
        route(
            Method::GET,
            "/_api/v1/caches/{c}/pins",
            None,
            Need::Pull,
            200,
        ),
        // Allowed, but the path is not in the cache.
        route(
            Method::POST,
            "/_api/v1/caches/{c}/pins",
            Some(format!(r#"{{"name":"p","store_path":"{MISSING}-x"}}"#).into_bytes()),
            Need::Push,
            404,
        ),
        route(
            Method::DELETE,
            "/_api/v1/caches/{c}/pins/none",
            None,
            Need::Push,
            404,
        ),
        route(
            Method::GET,
            "/_api/v1/stats?cache={c}",
            None,
            Need::Admin,
            200,
        ),
        // Allowed, but refused for want of the confirmation.
        route(
            Method::DELETE,
            "/_api/v1/caches/{c}",
            None,
            Need::Admin,
            400,
        ),
    ];
    let mut checked = 0;
    let mut failures = Vec::new();
    let mut check = |holder: Holder,
                     token: Option<&str>,
                     method: &Method,
                     url: String,
                     body: Option<&Vec<u8>>,
                     want: u16| {
        let mut req = with(client().request(method.clone(), &url), token);
        if let Some(b) = body {
            req = req.body(b.clone());
        }
        let r = req.send().unwrap();
        let got = r.status().as_u16();
        if got == 401 {
            let challenge = r
                .headers()
                .get("www-authenticate")
                .map(|v| v.to_str().unwrap().to_owned());
            assert_eq!(
                challenge.as_deref(),
                Some("Basic realm=\"cachet\""),
                "{method} {url}"
            );
        }
        if got != want {
            failures.push(format!("{holder:?} {method} {url}: {got}, expected {want}"));
        }
        checked += 1;
    };
    for (holder, token) in &tokens {
        for cache in ["a", "b", "gone"] {
            for r in &cache_routes {
                let url = format!("{}{}", server.base(), r.path.replace("{c}", cache));
                let want = expected(*holder, cache, r.need, r.ok);
                check(
                    *holder,
                    token.as_deref(),
                    &r.method,
                    url,
                    r.body.as_ref(),
                    want,
                );
            }
            // Creating a cache needs admin of its name; these two exist.
            if cache != "gone" {
                let body = format!(r#"{{"name":"{cache}"}}"#).into_bytes();
                let want = expected(*holder, cache, Need::Admin, 409);
                check(
                    *holder,
                    token.as_deref(),
                    &Method::POST,
                    format!("{}/_api/v1/caches", server.base()),
                    Some(&body),
                    want,
                );
            }
        }
        for (method, path, body, need, ok) in [
            (Method::GET, "/_api/v1/caches", None, Need::Anyone, 200),
            (Method::GET, "/_api/v1/tokens", None, Need::ServerAdmin, 200),
            (Method::GET, "/_api/v1/stats", None, Need::ServerAdmin, 200),
            (
                Method::GET,
                "/_api/v1/jobs/999",
                None,
                Need::ServerAdmin,
                404,
            ),
            // Allowed, but no such cache: no job starts.
            (
                Method::POST,
                "/_api/v1/gc",
                Some(br#"{"cache":"nowhere","dry_run":true}"#.to_vec()),
                Need::ServerAdmin,
                404,
            ),
            (
                Method::POST,
                "/_api/v1/verify",
                Some(br#"{"cache":"nowhere"}"#.to_vec()),
                Need::ServerAdmin,
                404,
            ),
            (
                Method::DELETE,
                "/_api/v1/tokens/nobody",
                None,
                Need::ServerAdmin,
                404,
            ),
            (
                Method::POST,
                "/_api/v1/tokens",
                Some(br#"{"name":"dup-of-a-pull","permissions":["pull"],"caches":["a"]}"#.to_vec()),
                Need::ServerAdmin,
                201,
            ),
        ] {
            let want = expected(*holder, "", need, ok);
            check(
                *holder,
                token.as_deref(),
                &method,
                format!("{}{path}", server.base()),
                body.as_ref(),
                want,
            );
            if want == 201 {
                // Made once; revoked so the next holder's attempt is judged the same way.
                server.admin(&["token", "revoke", "dup-of-a-pull"]);
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {checked} answers differ:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert!(checked > 400, "{checked}");

    // Each caller lists the caches it may read, and a private one only with a token for it.
    let listed = |token: Option<&str>| -> Vec<String> {
        let r = with(
            client().get(format!("{}/_api/v1/caches", server.base())),
            token,
        )
        .send()
        .unwrap();
        let all: Vec<serde_json::Value> = r.json().unwrap();
        all.iter()
            .map(|c| c["name"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(listed(None), ["a", "main"]);
    assert_eq!(listed(Some(&admin)), ["a", "b", "main"]);
    let pull_b = server.new_token("pull-b", "pull", &["b"]);
    assert_eq!(listed(Some(&pull_b)), ["a", "b", "main"]);
    let status = with(
        client().get(format!("{}/b/{LEAF}.narinfo", server.base())),
        Some(&pull_b),
    )
    .send()
    .unwrap()
    .status();
    assert_eq!(status, 200);
    // Basic authentication, as a netrc makes Nix send it, is the same token.
    let basic = client()
        .get(format!("{}/b/nix-cache-info", server.base()))
        .basic_auth("", Some(&pull_b))
        .send()
        .unwrap();
    assert_eq!(basic.status(), 200);
}

#[test]
fn a_nar_of_a_private_cache_is_not_reachable_through_another_cache() {
    let server = Server::start();
    let admin = server.token();
    server.admin(&["cache", "create", "a"]);
    server.admin(&["cache", "create", "b", "--private"]);
    upload_golden_to(&server, "b", &admin);
    let push_a = server.new_token("ci-a", "push", &["a"]);
    let text = narinfo_text(LEAF);
    let leaf = NarInfo::parse(text.as_bytes()).unwrap();
    let served = client()
        .get(format!("{}/{LEAF}.narinfo", server.cache_url("b")))
        .bearer_auth(&admin)
        .send()
        .unwrap()
        .text()
        .unwrap();
    let served_nar = NarInfo::parse(served.as_bytes()).unwrap().url;
    let plain = format!("nar/{}.nar", leaf.nar_hash.to_nix32());
    for path in [
        served_nar.clone(),
        leaf.url.clone(),
        plain.clone(),
        format!("{LEAF}.narinfo"),
        format!("{LEAF}.ls"),
        format!("log/{DRV}"),
        REALISATION.to_owned(),
    ] {
        for token in [None, Some(push_a.as_str())] {
            let url = format!("{}/{path}", server.cache_url("a"));
            let r = with(client().get(&url), token).send().unwrap();
            assert_eq!(r.status(), 404, "{url} with {token:?}");
            let r = with(client().head(&url), token).send().unwrap();
            assert_eq!(r.status(), 404, "HEAD {url}");
        }
    }
    // Nor can a narinfo pushed to `a` claim the NAR uploaded to `b`, under either URL.
    for url in [&leaf.url, &plain] {
        let claim = text.replace(&leaf.url, url);
        let r = client()
            .put(format!("{}/{LEAF}.narinfo", server.cache_url("a")))
            .bearer_auth(&push_a)
            .body(claim)
            .send()
            .unwrap();
        assert_eq!(r.status(), 400, "{url}");
        assert!(r.text().unwrap().contains("names no NAR"));
    }
    let r = client()
        .get(format!("{}/{LEAF}.narinfo", server.cache_url("a")))
        .send()
        .unwrap();
    assert_eq!(r.status(), 404);
    // Through `b`, with a token for it, the NAR is there.
    let r = client()
        .get(format!("{}/{served_nar}", server.cache_url("b")))
        .bearer_auth(&admin)
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
}

#[test]
fn no_secret_reaches_the_log_or_an_answer() {
    let server = Server::start_with(&["--log", "debug"]);
    let admin = server.token();
    // An imported key, in the format Nix's own tool writes.
    let dir = tempfile::tempdir().unwrap();
    let (sk, pk) = (dir.path().join("sk"), dir.path().join("pk"));
    crate::harness::ok(
        std::process::Command::new("nix-store")
            .args(["--generate-binary-cache-key", "imported-1"])
            .arg(&sk)
            .arg(&pk)
            .output()
            .unwrap(),
    );
    let mut answers = String::new();
    answers += &server.admin(&[
        "cache",
        "create",
        "s",
        "--private",
        "--secret-key-file",
        sk.to_str().unwrap(),
    ]);
    upload_golden_to(&server, "s", &admin);
    answers += &server.admin(&["key", "rotate", "s"]);
    answers += &server.admin(&["--json", "key", "info", "s"]);
    answers += &server.admin(&["--json", "cache", "info", "s"]);
    answers += &server.admin(&["--json", "cache", "list"]);
    let ci = server.new_token("ci", "push", &["s"]);
    answers += &server.admin(&["--json", "token", "list"]);
    // Tokens used every way a client sends them, right and wrong.
    for token in [&ci, &admin] {
        let url = format!("{}/{LEAF}.narinfo", server.cache_url("s"));
        answers += &client()
            .get(&url)
            .bearer_auth(token)
            .send()
            .unwrap()
            .text()
            .unwrap();
        answers += &client()
            .get(&url)
            .basic_auth("", Some(token))
            .send()
            .unwrap()
            .text()
            .unwrap();
        answers += &client()
            .get(&url)
            .basic_auth(token, None::<&str>)
            .send()
            .unwrap()
            .text()
            .unwrap();
        let wrong = format!("{token}x");
        answers += &client()
            .get(&url)
            .bearer_auth(&wrong)
            .send()
            .unwrap()
            .text()
            .unwrap();
        answers += &client()
            .put(&url)
            .bearer_auth(&wrong)
            .body("x")
            .send()
            .unwrap()
            .text()
            .unwrap();
    }
    // A key that does not parse, sent as an import: the error must not quote it.
    let bad_key = format!("{}!!", std::fs::read_to_string(&sk).unwrap().trim());
    let r = client()
        .post(format!("{}/_api/v1/caches", server.base()))
        .bearer_auth(&admin)
        .json(&serde_json::json!({"name": "t", "secret_key": bad_key}))
        .send()
        .unwrap();
    assert_eq!(r.status(), 400);
    answers += &r.text().unwrap();
    std::fs::write(dir.path().join("bad"), &bad_key).unwrap();
    let failed = server.cache_admin(&[
        "cache",
        "create",
        "t",
        "--secret-key-file",
        dir.path().join("bad").to_str().unwrap(),
    ]);
    assert!(!failed.status.success());
    answers += &String::from_utf8_lossy(&failed.stderr);
    answers += &String::from_utf8_lossy(&failed.stdout);
    server.admin(&["token", "revoke", "ci"]);
    answers += &client()
        .get(format!("{}/nix-cache-info", server.cache_url("s")))
        .bearer_auth(&ci)
        .send()
        .unwrap()
        .text()
        .unwrap();

    let mut secrets = vec![admin.clone(), ci.clone()];
    for entry in std::fs::read_dir(server.data_dir().join("keys")).unwrap() {
        let text = std::fs::read_to_string(entry.unwrap().path()).unwrap();
        // The secret half of `name:base64(secret ‖ public)`: its first 40 characters.
        let b64 = text.trim().split_once(':').unwrap().1;
        secrets.push(b64[..40].to_owned());
    }
    let imported = std::fs::read_to_string(&sk).unwrap();
    secrets.push(imported.trim().split_once(':').unwrap().1[..40].to_owned());
    assert!(secrets.len() >= 5, "two tokens, three keys: {secrets:?}");
    let log = server.log();
    assert!(log.contains("DEBUG"), "the log is at debug level");
    for secret in &secrets {
        assert!(!log.contains(secret.as_str()), "the log holds a secret");
        assert!(
            !answers.contains(secret.as_str()),
            "an answer holds a secret:\n{answers}"
        );
    }
    // The imported key signs: its public half is listed.
    assert!(answers.contains(std::fs::read_to_string(&pk).unwrap().trim()));
}

#[test]
fn a_hangup_without_tls_changes_nothing() {
    let server = Server::start();
    let pid = server.pid().to_string();
    crate::harness::ok(
        std::process::Command::new("kill")
            .args(["-HUP", &pid])
            .output()
            .unwrap(),
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !server.log().contains("nothing to reload") {
        assert!(std::time::Instant::now() < deadline, "{}", server.log());
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert_eq!(server.get_status("nix-cache-info"), 200, "still serving");
}
