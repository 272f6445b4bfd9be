//! A real OpenID Connect provider for the tests (tools/oidc-provider: panva's
//! oidc-provider on Node.js, on loopback), and a client that signs a member of staff in
//! through it (authorization code with PKCE, as crew software would) to get ID tokens.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use base64::Engine as _;
use sha2::{Digest, Sha256};

/// The crew-software client registered at the provider (ID tokens ES256).
pub(crate) const CREW_APP: &str = "crew-app";
/// The device viewer's client (ID tokens RS256).
pub(crate) const VIEWER: &str = "carecache-viewer";
/// The test password of every synthetic member of staff.
pub(crate) const PASSWORD: &str = "test-password";

pub(crate) struct Provider {
    child: Child,
    pub(crate) issuer: String,
    port: u16,
}

fn server_js() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/oidc-provider/server.mjs")
}

impl Provider {
    /// Starts a provider on a free loopback port.
    pub(crate) fn start() -> Self {
        Self::on_port(0)
    }

    fn on_port(port: u16) -> Self {
        let child = Command::new("node")
            .arg(server_js())
            .env("PORT", port.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("node runs tools/oidc-provider (npm ci --prefix tools/oidc-provider)");
        // Owned at once, so the process is killed and reaped whatever happens next.
        let mut p = Self {
            child,
            issuer: String::new(),
            port: 0,
        };
        let stdout = p.child.stdout.take().unwrap();
        let mut line = String::new();
        let mut reader = BufReader::new(stdout);
        loop {
            line.clear();
            let n = reader.read_line(&mut line).unwrap();
            assert!(n > 0, "the OIDC provider exited before listening");
            if let Some(url) = line.trim().strip_prefix("listening ") {
                p.issuer = url.to_owned();
                p.port = p.issuer.rsplit(':').next().unwrap().parse().unwrap();
                // Keep draining stdout so the provider never blocks on a full pipe.
                std::thread::spawn(move || {
                    let mut sink = String::new();
                    while reader.read_line(&mut sink).unwrap_or(0) > 0 {
                        sink.clear();
                    }
                });
                return p;
            }
        }
    }

    /// Stops the provider (the device is then offline from its point of view).
    pub(crate) fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Stops and starts the provider on the same address: the same issuer with fresh
    /// signing keys (a key rotation).
    pub(crate) fn rotate_keys(&mut self) {
        self.stop();
        let mut last = None;
        for _ in 0..50 {
            match std::panic::catch_unwind(|| Self::on_port(self.port)) {
                Ok(p) => {
                    *self = p;
                    return;
                }
                Err(e) => {
                    last = Some(e);
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
        std::panic::resume_unwind(last.unwrap());
    }

    /// Signs `login` in as `client_id` and returns the ID token.
    pub(crate) fn id_token(&self, client_id: &str, login: &str) -> String {
        let redirect = match client_id {
            VIEWER => "http://127.0.0.1:9/viewer/oidc/callback",
            _ => "http://127.0.0.1:9/crew/callback",
        };
        let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
        let verifier = b64(&rand::random::<[u8; 32]>());
        let challenge = b64(&Sha256::digest(verifier.as_bytes()));
        let query = serde_urlencoded::to_string([
            ("client_id", client_id),
            ("response_type", "code"),
            ("scope", "openid"),
            ("redirect_uri", redirect),
            ("code_challenge", challenge.as_str()),
            ("code_challenge_method", "S256"),
            ("state", "test-state"),
            ("nonce", "test-nonce"),
        ])
        .unwrap();
        let back = self.authorize(&format!("{}/auth?{query}", self.issuer), login);
        let code = url_param(&back, "code").unwrap_or_else(|| panic!("no code in {back}"));
        let mut res = agent()
            .post(format!("{}/token", self.issuer))
            .send_form([
                ("grant_type", "authorization_code"),
                ("code", code.as_str()),
                ("redirect_uri", redirect),
                ("client_id", client_id),
                ("code_verifier", verifier.as_str()),
            ])
            .unwrap();
        let body: serde_json::Value =
            serde_json::from_str(&res.body_mut().read_to_string().unwrap()).unwrap();
        body["id_token"]
            .as_str()
            .unwrap_or_else(|| panic!("no id_token: {body}"))
            .to_owned()
    }

    /// Follows an authorization request `url` through the provider's sign-in page as
    /// `login`, as a browser would, and returns where the provider sends the browser back
    /// (the client's redirect URI with the code and state).
    pub(crate) fn authorize(&self, url: &str, login: &str) -> String {
        let agent = agent();
        let mut jar: BTreeMap<String, String> = BTreeMap::new();
        let mut step = |url: &str, form: Option<&[(&str, &str)]>| -> String {
            let cookie = jar
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join("; ");
            let res = match form {
                None => agent.get(url).header("cookie", &cookie).call(),
                Some(f) => agent
                    .post(url)
                    .header("cookie", &cookie)
                    .send_form(f.iter().copied()),
            }
            .unwrap();
            for v in res.headers().get_all("set-cookie") {
                let kv = v.to_str().unwrap().split(';').next().unwrap();
                if let Some((k, v)) = kv.split_once('=') {
                    jar.insert(k.trim().to_owned(), v.trim().to_owned());
                }
            }
            let location = res
                .headers()
                .get("location")
                .unwrap_or_else(|| panic!("{url}: no redirect (HTTP {})", res.status()))
                .to_str()
                .unwrap()
                .to_owned();
            if location.starts_with('/') {
                format!("{}{location}", self.issuer)
            } else {
                location
            }
        };
        let interaction = step(url, None);
        let resume = step(
            &format!("{interaction}/login"),
            Some(&[("login", login), ("password", PASSWORD)]),
        );
        step(&resume, None)
    }
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .max_redirects(0)
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(20)))
        .build()
        .into()
}

pub(crate) fn url_param(url: &str, name: &str) -> Option<String> {
    let q = url.split_once('?')?.1;
    serde_urlencoded::from_str::<Vec<(String, String)>>(q)
        .ok()?
        .into_iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v)
}

impl Drop for Provider {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The `[identity]` section for a device trusting `p` (both test clients as audiences,
/// the staff id from `uid`, roles from `selected_roleid`, the social-care role limited to
/// the social-care view), with `extra` lines.
pub(crate) fn oidc_section(p: &Provider, extra: &str) -> String {
    format!(
        "[identity]\nmode = \"oidc\"\nissuer = \"{}\"\nclient_ids = [\"{VIEWER}\", \"{CREW_APP}\"]\nstaff_claim = \"uid\"\nrole_claim = \"selected_roleid\"\n{extra}\n[identity.role_views]\n\"R-SOCIAL-CARE\" = \"social-care\"\n",
        p.issuer
    )
}
