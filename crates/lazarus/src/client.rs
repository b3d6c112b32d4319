//! The admin API client used by every CLI command other than `up` and `node`.

use anyhow::Context;
use serde_json::Value;
use std::path::Path;
use std::time::Duration;

#[derive(Clone)]
pub struct Api {
    base: String,
    agent: ureq::Agent,
}

impl Api {
    pub fn new(base: &str) -> Api {
        Api::with_timeout(base, Duration::from_secs(60))
    }

    pub fn with_timeout(base: &str, timeout: Duration) -> Api {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(timeout))
            .build()
            .into();
        Api {
            base: base.trim_end_matches('/').to_string(),
            agent,
        }
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    /// Finds the API of a cluster started by `lazarus up --data DIR` (and its admin
    /// token, `DIR/admin.token`, unless $LAZARUS_TOKEN gives one). An address given
    /// with `--api` gets $LAZARUS_TOKEN only: a local cluster's token never goes to
    /// another address.
    pub fn discover(api: Option<&str>, data: &Path) -> anyhow::Result<Api> {
        if let Some(a) = api {
            return Ok(Api::new(a));
        }
        use_token_of(data);
        let p = data.join("cluster.json");
        let text = std::fs::read_to_string(&p).with_context(|| {
            format!("no running cluster found under {} (start one with `lazarus up`, or pass --api URL)", data.display())
        })?;
        let v: Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not valid JSON", p.display()))?;
        let admins: Vec<&str> = v["nodes"]
            .as_array()
            .into_iter()
            .flatten()
            // A removed node's view of the cluster stops when it leaves it.
            .filter(|n| n["removed"] != true)
            .filter_map(|n| n["admin"].as_str())
            .collect();
        anyhow::ensure!(!admins.is_empty(), "{} lists no nodes", p.display());
        // The first node that answers: any node serves the whole cluster's view.
        for admin in &admins {
            let probe = Api::with_timeout(&format!("http://{admin}"), Duration::from_secs(2));
            if let Ok((200, _)) = probe.get("/api/v1/health") {
                return Ok(Api::new(&format!("http://{admin}")));
            }
        }
        anyhow::bail!(
            "no node of the cluster under {} answers (tried {})",
            data.display(),
            admins.join(", ")
        )
    }

    fn handle(
        &self,
        what: &str,
        r: Result<ureq::http::Response<ureq::Body>, ureq::Error>,
    ) -> anyhow::Result<(u16, Value)> {
        let mut resp = r.map_err(|e| {
            anyhow::anyhow!("cannot reach the admin API at {} ({what}): {e}", self.base)
        })?;
        let code = resp.status().as_u16();
        let text = resp.body_mut().read_to_string().unwrap_or_default();
        let v = if text.trim().is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        Ok((code, v))
    }

    pub fn get(&self, path: &str) -> anyhow::Result<(u16, Value)> {
        let r = authorized(self.agent.get(&format!("{}{path}", self.base))).call();
        self.handle(path, r)
    }

    pub fn post(&self, path: &str, body: &Value) -> anyhow::Result<(u16, Value)> {
        let r = authorized(self.agent.post(&format!("{}{path}", self.base))).send_json(body);
        self.handle(path, r)
    }

    pub fn delete(&self, path: &str) -> anyhow::Result<(u16, Value)> {
        let r = authorized(self.agent.delete(&format!("{}{path}", self.base))).call();
        self.handle(path, r)
    }
}

impl Api {
    /// PUT raw bytes.
    pub fn put_bytes(&self, path: &str, data: &[u8]) -> anyhow::Result<(u16, Value)> {
        let r = authorized(self.agent.put(&format!("{}{path}", self.base))).send(data);
        self.handle(path, r)
    }

    /// GET raw bytes (an error answer is returned as its JSON message).
    pub fn get_bytes(&self, path: &str) -> anyhow::Result<Vec<u8>> {
        let mut resp = authorized(self.agent.get(&format!("{}{path}", self.base)))
            .call()
            .map_err(|e| anyhow::anyhow!("cannot reach the admin API at {}: {e}", self.base))?;
        let code = resp.status().as_u16();
        let body = resp
            .body_mut()
            .with_config()
            .limit(64 << 20)
            .read_to_vec()?;
        if code != 200 {
            let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
            anyhow::bail!(
                "{} (HTTP {code})",
                v["error"].as_str().unwrap_or("request failed")
            );
        }
        Ok(body)
    }
}

/// The admin API of `volume`'s primary (which holds a copy and executes its I/O
/// locally); `api` itself for a node running alone.
pub fn primary_api(api: Api, volume: &str) -> anyhow::Result<Api> {
    let (code, c) = api.get("/api/v1/cluster")?;
    if code != 200 {
        return Ok(api);
    }
    let p = c["metadata"]["volumes"][volume]["primary"]
        .as_u64()
        .ok_or_else(|| anyhow::anyhow!("no volume {volume:?} in the cluster"))?;
    let admin = c["metadata"]["nodes"][p.to_string()]["admin"]
        .as_str()
        .ok_or_else(|| anyhow::anyhow!("primary n{p} has no admin address"))?;
    Ok(Api::new(&format!("http://{admin}")))
}

/// Adds `Authorization: Bearer $LAZARUS_TOKEN` when the variable is set.
fn authorized<B>(req: ureq::RequestBuilder<B>) -> ureq::RequestBuilder<B> {
    match token() {
        Some(t) => req.header("Authorization", &format!("Bearer {t}")),
        None => req,
    }
}

/// The token file consulted when `$LAZARUS_TOKEN` is not set (`use_token_of`).
static TOKEN_FILE: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();

/// Requests carry the token of the cluster `lazarus up --data DATA` started, unless
/// `$LAZARUS_TOKEN` names one.
pub fn use_token_of(data: &Path) {
    let _ = TOKEN_FILE.set(data.join(lazarus_server::admin::TOKEN_FILE));
}

/// The admin token: `$LAZARUS_TOKEN`, else the first line of the token file of
/// `use_token_of`, when this user may read it.
fn token() -> Option<String> {
    if let Some(t) = std::env::var("LAZARUS_TOKEN")
        .ok()
        .filter(|t| !t.is_empty())
    {
        return Some(t);
    }
    let text = std::fs::read_to_string(TOKEN_FILE.get()?).ok()?;
    Some(text.lines().next()?.trim().to_string()).filter(|t| !t.is_empty())
}

/// Turns a non-2xx answer into an error carrying the API's message.
pub fn ok(r: (u16, Value)) -> anyhow::Result<Value> {
    let (code, v) = r;
    if (200..300).contains(&code) {
        return Ok(v);
    }
    let msg = v["error"]
        .as_str()
        .map(str::to_string)
        .unwrap_or_else(|| v.to_string());
    anyhow::bail!("{msg} (HTTP {code})")
}
