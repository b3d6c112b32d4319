//! Admin HTTP API (`/api/v1/...`): JSON in and out, errors as `{"error": "..."}` with
//! a fitting status code. Blocking store calls run on the blocking pool.

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use lazarus_engine::engine::Engine;
use lazarus_store::{StoreError, Volume};
use lazarus_types::{Lba, BLOCK_SIZE_U64};
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::sync::Arc;

/// Who may use the admin API.
///
/// - With a token (`admin_token` / `admin_token_file`; `lazarus up` makes one), every
///   request but the dashboard's empty page and the liveness probe
///   (`GET /api/v1/health`) must carry it (`Authorization: Bearer TOKEN`, compared in
///   constant time): reads as well as changes, so that a local user without the token
///   file learns and changes nothing.
/// - Without one, on loopback: anyone on the machine (a node run by hand to try things).
/// - Without one, beyond loopback: reads other than volume data only; changes and data
///   reads are refused.
#[derive(Clone)]
pub struct MutationGuard {
    open: bool,
    token: Option<Arc<String>>,
}

/// Requests anyone may make even when a token is set: they carry no data.
fn needs_no_token(method: &axum::http::Method, path: &str) -> bool {
    (method == axum::http::Method::GET || method == axum::http::Method::HEAD)
        && (path == "/" || path == "/api/v1/health")
}

impl MutationGuard {
    pub fn new(listen: std::net::SocketAddr, token: Option<String>) -> MutationGuard {
        MutationGuard {
            open: listen.ip().is_loopback(),
            token: token.filter(|t| !t.is_empty()).map(Arc::new),
        }
    }

    fn check(
        &self,
        method: &axum::http::Method,
        path: &str,
        headers: &axum::http::HeaderMap,
    ) -> Result<(), ApiError> {
        let read = method == axum::http::Method::GET || method == axum::http::Method::HEAD;
        // Reading a volume's bytes needs the same credential as changing anything.
        let data_read = path.starts_with("/api/v1/volumes/") && path.ends_with("/data");
        let Some(token) = &self.token else {
            if self.open || (read && !data_read) {
                return Ok(());
            }
            return Err(ApiError(
                StatusCode::FORBIDDEN,
                "this admin API listens beyond loopback and has no admin_token configured: mutating requests and data reads are refused".into(),
            ));
        };
        if needs_no_token(method, path) {
            return Ok(());
        }
        let given = headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        if constant_time_eq(given.as_bytes(), token.as_bytes()) {
            Ok(())
        } else {
            Err(ApiError(
                StatusCode::UNAUTHORIZED,
                "missing or wrong token (Authorization: Bearer TOKEN; the CLI sends $LAZARUS_TOKEN, or the admin.token of the --data directory of `lazarus up`)".into(),
            ))
        }
    }
}

/// The token file `lazarus up` keeps in its data directory.
pub const TOKEN_FILE: &str = "admin.token";

/// Reads an admin token file (its first line). A file others may read is refused: the
/// token would be theirs too.
pub fn read_token_file(path: &std::path::Path) -> Result<String, String> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path)
        .map_err(|e| format!("cannot read the admin token file {}: {e}", path.display()))?;
    if meta.permissions().mode() & 0o077 != 0 {
        return Err(format!(
            "the admin token file {} may be read by other users (mode {:o}): chmod 600 it",
            path.display(),
            meta.permissions().mode() & 0o777
        ));
    }
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read the admin token file {}: {e}", path.display()))?;
    let token = text.lines().next().unwrap_or("").trim().to_string();
    if token.is_empty() {
        return Err(format!("the admin token file {} is empty", path.display()));
    }
    Ok(token)
}

/// The token in `path`, made first (256 random bits in hex, mode 0600) when the file
/// does not exist.
pub fn ensure_token_file(path: &std::path::Path) -> Result<String, String> {
    if !path.exists() {
        let token = crate::nbd_tls::random_hex(32)?;
        lazarus_rpc::tls::write_new(path, format!("{token}\n"), true)?;
    }
    read_token_file(path)
}

/// Equality whose time does not depend on where the inputs differ (only on `b`'s
/// length, the secret's, which is not secret). Lengths that differ in any bit differ.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = a.len() ^ b.len();
    for (i, y) in b.iter().enumerate() {
        diff |= usize::from(a.get(i).copied().unwrap_or(0) ^ y);
    }
    diff == 0
}

async fn guard_mutations(
    State(s): State<AppState>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if let Err(e) = s.guard.check(req.method(), req.uri().path(), req.headers()) {
        return e.into_response();
    }
    if !s.faults
        && req.method() != axum::http::Method::GET
        && req.uri().path().starts_with("/api/v1/faults/")
    {
        return ApiError(
            StatusCode::FORBIDDEN,
            "fault injection is off on this node (`faults = true` in its configuration turns it on; `lazarus up` does)".into(),
        )
        .into_response();
    }
    next.run(req).await
}

#[derive(Clone)]
pub struct AppState {
    pub guard: MutationGuard,
    /// Whether fault injection is on (`NodeConfig::faults`).
    pub faults: bool,
    pub node_id: String,
    pub engine: Arc<Engine>,
    pub cluster: Option<Arc<lazarus_node::cluster::Cluster>>,
}

pub struct ApiError(pub StatusCode, pub String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "error": self.1 }))).into_response()
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> ApiError {
        let code = match &e {
            StoreError::NoSuchVolume(_) => StatusCode::NOT_FOUND,
            StoreError::VolumeExists(_) => StatusCode::CONFLICT,
            StoreError::Invalid(_) => StatusCode::BAD_REQUEST,
            StoreError::NoSpace => StatusCode::INSUFFICIENT_STORAGE,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError(code, e.to_string())
    }
}

fn join_err(e: tokio::task::JoinError) -> ApiError {
    ApiError(
        StatusCode::INTERNAL_SERVER_ERROR,
        format!("task failed: {e}"),
    )
}

#[derive(Serialize)]
pub struct DamagedRange {
    pub first_lba: u64,
    pub count: u64,
}

#[derive(Serialize)]
pub struct VolumeView {
    pub name: String,
    pub size_bytes: u64,
    pub uid: String,
    pub mapped_blocks: u64,
    pub mapped_pages: u64,
    pub root: String,
    pub unrecoverable: Vec<DamagedRange>,
    pub unrecoverable_lbas: u64,
    /// This copy's snapshots, oldest first.
    pub snapshots: Vec<String>,
    /// With snapshots: the bytes of the blocks only the volume references (none of
    /// its snapshots, nothing else); `Store::snapshot_space`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exclusive_bytes: Option<u64>,
    /// A clone: the snapshot (`VOLUME@NAME`) it still shares slice pages with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clone_of: Option<String>,
    /// A clone: the mapped blocks of the pages it still shares with that snapshot
    /// (not written since the clone).
    #[serde(default, skip_serializing_if = "is_zero_u64")]
    pub shared_blocks: u64,
    /// A clone still being made (not served yet): the snapshot it is made from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub being_made_from: Option<String>,
}

fn is_zero_u64(n: &u64) -> bool {
    *n == 0
}

pub fn volume_view(v: &Volume) -> VolumeView {
    let (mapped_blocks, mapped_pages) = v.usage();
    let ranges = v.damaged_ranges();
    VolumeView {
        name: v.meta.name.clone(),
        size_bytes: v.size_bytes(),
        uid: format!("{:016x}", v.meta.uid),
        mapped_blocks,
        mapped_pages,
        root: v.root().to_hex(),
        unrecoverable_lbas: ranges.iter().map(|r| r.1).sum(),
        unrecoverable: ranges
            .into_iter()
            .map(|(first_lba, count)| DamagedRange { first_lba, count })
            .collect(),
        snapshots: v.snapshots().iter().map(|s| s.name.clone()).collect(),
        exclusive_bytes: None,
        clone_of: None,
        shared_blocks: v.shared_usage().1,
        being_made_from: None,
    }
}

/// `volume_view` with the space only the volume holds (reads the pages where its
/// snapshots differ from it).
async fn volume_view_with_space(
    store: &Arc<lazarus_store::Store>,
    v: Arc<Volume>,
) -> Result<VolumeView, ApiError> {
    let store = store.clone();
    lazarus_rpc::rt::blocking(move || {
        let mut view = volume_view(&v);
        view.exclusive_bytes = store.snapshot_space(&v).volume_exclusive;
        view.clone_of = store.clone_base_of(&v);
        view
    })
    .await
    .map_err(join_err)
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/", get(dashboard_page))
        .route("/metrics", get(metrics))
        .route("/api/v1/dashboard", get(dashboard_data))
        .route("/api/v1/health", get(health))
        .route("/api/v1/status", get(status))
        .route("/api/v1/cluster", get(cluster_status))
        .route("/api/v1/volumes", get(list_volumes).post(create_volume))
        .route(
            "/api/v1/volumes/{name}",
            get(get_volume).delete(delete_volume),
        )
        .route("/api/v1/volumes/{name}/locate", get(locate))
        .route(
            "/api/v1/volumes/{name}/snapshots",
            get(list_snapshots).post(create_snapshot),
        )
        .route(
            "/api/v1/volumes/{name}/snapshots/{snap}",
            axum::routing::delete(delete_snapshot),
        )
        .route(
            "/api/v1/volumes/{name}/revert",
            axum::routing::post(revert_volume),
        )
        .route(
            "/api/v1/volumes/{name}/snapshots/{snap}/clone",
            axum::routing::post(clone_snapshot),
        )
        .route(
            "/api/v1/volumes/{name}/snapshots/{snap}/diff",
            get(snapshot_diff),
        )
        .route(
            "/api/v1/volumes/{name}/snapshots/{snap}/data",
            get(snapshot_data),
        )
        .route(
            "/api/v1/volumes/{name}/resize",
            axum::routing::post(resize_volume),
        )
        .route("/api/v1/faults", get(list_faults))
        .route("/api/v1/faults/drop", axum::routing::post(fault_drop))
        .route("/api/v1/faults/stall", axum::routing::post(fault_stall))
        .route("/api/v1/faults/heal", axum::routing::post(fault_heal))
        .route("/api/v1/faults/corrupt", axum::routing::post(fault_corrupt))
        .route("/api/v1/faults/eio", axum::routing::post(fault_eio))
        .route("/api/v1/faults/device", axum::routing::post(fault_device))
        .route(
            "/api/v1/faults/metadata",
            axum::routing::post(fault_metadata),
        )
        .route("/api/v1/faults/isolate", axum::routing::post(fault_isolate))
        .route(
            "/api/v1/volumes/{name}/protect",
            axum::routing::post(protect_volume),
        )
        .route(
            "/api/v1/volumes/{name}/primary",
            axum::routing::post(want_primary),
        )
        .route("/api/v1/nodes", axum::routing::post(add_node))
        .route("/api/v1/rebalance", axum::routing::post(rebalance))
        .route(
            "/api/v1/nodes/{name}/remove",
            axum::routing::post(remove_node),
        )
        .route(
            "/api/v1/nodes/{name}/replace",
            axum::routing::post(replace_node),
        )
        .route("/api/v1/events", get(events))
        .route("/api/v1/jeopardy", get(jeopardy))
        .route(
            "/api/v1/volumes/{name}/repair",
            axum::routing::post(repair_volume),
        )
        .route("/api/v1/repairs", get(repairs))
        .route("/api/v1/volumes/{name}/map", get(volume_map))
        .route(
            "/api/v1/volumes/{name}/data",
            get(read_data)
                .put(write_data)
                .layer(axum::extract::DefaultBodyLimit::max(
                    DATA_MAX_BYTES as usize + 4096,
                )),
        )
        .route(
            "/api/v1/volumes/{name}/zero",
            axum::routing::post(zero_data),
        )
        .route(
            "/api/v1/volumes/{name}/flush",
            axum::routing::post(flush_data),
        )
        .route("/api/v1/scrub", get(scrub_status).post(scrub))
        .route("/api/v1/openapi.json", get(openapi))
        .fallback(|| async { ApiError(StatusCode::NOT_FOUND, "no such endpoint".into()) })
        .method_not_allowed_fallback(|method: axum::http::Method| async move {
            ApiError(
                StatusCode::METHOD_NOT_ALLOWED,
                format!("this endpoint does not take {method} (see /api/v1/openapi.json)"),
            )
        })
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            guard_mutations,
        ))
        .layer(axum::middleware::map_response(json_errors))
        .with_state(state)
}

/// Every error answer as JSON `{"error": "..."}`, whoever made it: the handlers make
/// theirs so, and this gives the framework's own (a name that is not UTF-8, a query that
/// does not parse, a body over the limit) the same shape, with their headers kept.
async fn json_errors(resp: Response) -> Response {
    let status = resp.status();
    let is_json = resp
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if is_json || !(status.is_client_error() || status.is_server_error()) {
        return resp;
    }
    let (parts, body) = resp.into_parts();
    let text = axum::body::to_bytes(body, 64 << 10)
        .await
        .map(|b| String::from_utf8_lossy(&b).trim().to_string())
        .unwrap_or_default();
    let text = if text.is_empty() {
        status.canonical_reason().unwrap_or("error").to_string()
    } else {
        text
    };
    let mut out = ApiError(status, text).into_response();
    for (k, v) in parts.headers.iter() {
        if k != axum::http::header::CONTENT_TYPE && k != axum::http::header::CONTENT_LENGTH {
            out.headers_mut().insert(k.clone(), v.clone());
        }
    }
    out
}

async fn dashboard_page() -> axum::response::Html<&'static str> {
    axum::response::Html(crate::dashboard::INDEX_HTML)
}

async fn dashboard_data(State(s): State<AppState>) -> Json<serde_json::Value> {
    Json(crate::dashboard::overview(&s.engine, &s.node_id).await)
}

async fn health(State(s): State<AppState>) -> Json<serde_json::Value> {
    Json(json!({ "ok": true, "node": s.node_id }))
}

async fn status(State(s): State<AppState>) -> Json<serde_json::Value> {
    let store = s.engine.store.clone();
    let vols: Vec<VolumeView> = store
        .volumes()
        .iter()
        .map(|v| {
            let mut view = volume_view(v);
            view.being_made_from = being_made_from(&s, &view.name);
            view
        })
        .collect();
    let mut vols = serde_json::to_value(&vols).unwrap_or_default();
    // Per volume, its jeopardy state as this node sees it.
    if let Some(c) = &s.cluster {
        let j = c.jeopardy_status();
        for v in vols.as_array_mut().into_iter().flatten() {
            let name = v["name"].as_str().unwrap_or_default().to_string();
            let st = &j["volumes"][&name];
            for key in [
                "jeopardy",
                "failure_count_id",
                "recovery_lag",
                "recovery_log_bytes",
                "protected",
            ] {
                v[key] = st[key].clone();
            }
        }
    }
    Json(json!({
        "node": s.node_id,
        "pid": std::process::id(),
        "volumes": vols,
        "blocks": store.block_stats(),
        "page_cache": store.page_cache_stats(),
        "journal_used_bytes": store.journal_used_bytes(),
        "recovery": store.recovery,
        "repair": s.engine.repair.report(),
        // Snapshots this node's copies miss and cannot install yet, with why.
        "snapshot_sync": s.engine.snapshot_sync_errors(),
    }))
}

async fn cluster_status(State(s): State<AppState>) -> Result<Json<serde_json::Value>, ApiError> {
    match &s.cluster {
        Some(c) => Ok(Json(c.status())),
        None => Err(ApiError(
            StatusCode::NOT_FOUND,
            "this node runs alone (no rpc_listen in its config)".into(),
        )),
    }
}

async fn list_volumes(State(s): State<AppState>) -> Result<Json<Vec<VolumeView>>, ApiError> {
    let mut out = Vec::new();
    for v in s.engine.store.volumes() {
        let mut view = volume_view_with_space(&s.engine.store, v).await?;
        view.being_made_from = being_made_from(&s, &view.name);
        out.push(view);
    }
    Ok(Json(out))
}

#[derive(Deserialize)]
#[serde(untagged)]
pub enum SizeArg {
    Bytes(u64),
    Text(String),
}

impl SizeArg {
    /// The size in bytes: a number, or text such as "10GiB".
    fn bytes(self) -> Result<u64, ApiError> {
        match self {
            SizeArg::Bytes(n) => Ok(n),
            SizeArg::Text(t) => {
                lazarus_types::parse_size(&t).map_err(|m| ApiError(StatusCode::BAD_REQUEST, m))
            }
        }
    }
}

/// A JSON request body, or a 400 that says what is wrong with it.
fn request_body<T>(
    body: Result<Json<T>, axum::extract::rejection::JsonRejection>,
) -> Result<T, ApiError> {
    body.map(|Json(t)| t).map_err(|e| {
        ApiError(
            StatusCode::BAD_REQUEST,
            format!("bad request body: {}", e.body_text()),
        )
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateVolume {
    pub name: String,
    pub size: SizeArg,
    /// Copies to keep (cluster mode; default 3, at most the number of nodes).
    #[serde(default)]
    pub replication_factor: Option<usize>,
    /// The node to make its primary ("n2"; cluster mode). Default: the node that is
    /// primary of the fewest volumes, this one among equals.
    #[serde(default)]
    pub primary: Option<String>,
}

async fn create_volume(
    State(s): State<AppState>,
    body: Result<Json<CreateVolume>, axum::extract::rejection::JsonRejection>,
) -> Result<(StatusCode, Json<VolumeView>), ApiError> {
    let req = request_body(body)?;
    let size = req.size.bytes()?;
    if let Some(c) = s.cluster.clone() {
        return create_in_cluster(&s, &c, req.name, size, req.replication_factor, req.primary)
            .await;
    }
    let store = s.engine.store.clone();
    let v = lazarus_rpc::rt::blocking(move || store.create_volume(&req.name, size))
        .await
        .map_err(join_err)??;
    Ok((StatusCode::CREATED, Json(volume_view(&v))))
}

/// Creates a volume through the cluster metadata, placed by `lazarus_node::decide::
/// place_volume` (primaries spread over the nodes, copies on the nodes holding the
/// fewest). Returns once the copy on this node exists (if it holds one), else once the
/// primary's does.
async fn create_in_cluster(
    s: &AppState,
    c: &Arc<lazarus_node::cluster::Cluster>,
    name: String,
    size: u64,
    rf: Option<usize>,
    primary: Option<String>,
) -> Result<(StatusCode, Json<VolumeView>), ApiError> {
    lazarus_types::check_volume_name(&name).map_err(|m| ApiError(StatusCode::BAD_REQUEST, m))?;
    let bad = |m: String| ApiError(StatusCode::BAD_REQUEST, m);
    let primary = primary
        .map(|p| lazarus_node::cluster::raft_id(&p).map_err(|e| bad(format!("primary: {e}"))))
        .transpose()?;
    let meta = c.store.meta();
    let rf = rf.unwrap_or(lazarus_cluster::meta::REPLICATION_FACTOR_DEFAULT);
    let replicas = lazarus_node::decide::place_volume(&meta, rf, primary, c.id, |n| c.seems_up(n))
        .map_err(bad)?;
    let cmd = lazarus_cluster::MetaCommand::CreateVolume {
        name: name.clone(),
        size_bytes: size,
        replicas: replicas.clone(),
        primary: Some(replicas[0]),
        clone_of: None,
    };
    let placed_here = replicas.contains(&c.id);
    match c
        .propose(cmd)
        .await
        .map_err(|e| ApiError(StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?
    {
        lazarus_cluster::MetaResponse::Volume(_) => {}
        lazarus_cluster::MetaResponse::Exists(m) => return Err(ApiError(StatusCode::CONFLICT, m)),
        other => return Err(ApiError(StatusCode::BAD_REQUEST, format!("{other:?}"))),
    }
    if !placed_here {
        return created_elsewhere(c, &name, replicas[0]).await;
    }
    // The metadata loop creates this node's copy; should it fail (a full disk, say),
    // the client is told why, and the copy is created once it can be.
    let mut why = None;
    for i in 0..100 {
        if let Some(v) = s.engine.store.volume(&name) {
            return Ok((StatusCode::CREATED, Json(volume_view(&v))));
        }
        if i % 10 == 9 {
            why = c.local_copy_error(&name);
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let why = why.or_else(|| c.local_copy_error(&name));
    Err(match why {
        Some((no_space, msg)) => ApiError(
            if no_space {
                StatusCode::INSUFFICIENT_STORAGE
            } else {
                StatusCode::INTERNAL_SERVER_ERROR
            },
            format!("volume {name:?} is in the cluster metadata, but this node could not create its copy yet: {msg}"),
        ),
        None => ApiError(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("volume {name:?} committed but its local copy did not appear"),
        ),
    })
}

/// A volume this node holds no copy of: answered once its primary reports its copy
/// (its metadata loop creates it within a moment of the commit).
async fn created_elsewhere(
    c: &Arc<lazarus_node::cluster::Cluster>,
    name: &str,
    primary: u64,
) -> Result<(StatusCode, Json<VolumeView>), ApiError> {
    let uid = c.store.meta().volumes.get(name).map_or(0, |v| v.uid);
    let t0 = std::time::Instant::now();
    while t0.elapsed() < std::time::Duration::from_secs(10) {
        if let Ok(stats) = c
            .peer_stats(primary, std::time::Duration::from_millis(500))
            .await
        {
            if let Some(v) = stats["volumes"].get(name) {
                return Ok((
                    StatusCode::CREATED,
                    Json(VolumeView {
                        name: name.to_string(),
                        size_bytes: v["size_bytes"].as_u64().unwrap_or(0),
                        uid: format!("{:016x}", uid),
                        mapped_blocks: v["mapped_blocks"].as_u64().unwrap_or(0),
                        mapped_pages: v["mapped_pages"].as_u64().unwrap_or(0),
                        root: v["root"].as_str().unwrap_or_default().to_string(),
                        unrecoverable: Vec::new(),
                        unrecoverable_lbas: v["unrecoverable_lbas"].as_u64().unwrap_or(0),
                        snapshots: Vec::new(),
                        exclusive_bytes: None,
                        clone_of: None,
                        shared_blocks: 0,
                        being_made_from: None,
                    }),
                ));
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    Err(ApiError(
        StatusCode::INTERNAL_SERVER_ERROR,
        format!("volume {name:?} is in the cluster metadata, but its primary n{primary} has not reported its copy yet"),
    ))
}

/// Refuses what a clone still being made cannot do yet (be read, written, grown,
/// snapshotted or reverted): it is served once it is filled (`lazarus_node::clones`).
fn not_being_made(s: &AppState, name: &str) -> Result<(), ApiError> {
    match being_made_from(s, name) {
        Some(from) => Err(ApiError(
            StatusCode::CONFLICT,
            format!("volume {name:?} is a clone of {from} still being made; try again once it is"),
        )),
        None => Ok(()),
    }
}

/// For a clone still being made: the snapshot (`VOLUME@NAME`) it is made from.
fn being_made_from(s: &AppState, name: &str) -> Option<String> {
    let Some(c) = s.cluster.as_ref() else {
        return s.engine.store.volume(name)?.unfilled_from();
    };
    let meta = c.store.meta();
    let f = meta.volumes.get(name)?.cloning.as_ref()?;
    Some(format!("{}@{}", f.source, f.snapshot))
}

fn find(s: &AppState, name: &str) -> Result<Arc<Volume>, ApiError> {
    s.engine.store.volume(name).ok_or_else(|| {
        ApiError(
            StatusCode::NOT_FOUND,
            format!("volume {name:?} does not exist"),
        )
    })
}

async fn get_volume(
    State(s): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<VolumeView>, ApiError> {
    let v = find(&s, &name)?;
    let mut view = volume_view_with_space(&s.engine.store, v).await?;
    view.being_made_from = being_made_from(&s, &name);
    Ok(Json(view))
}

async fn delete_volume(
    State(s): State<AppState>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    if let Some(c) = s.cluster.clone() {
        // Through the metadata: every node removes its copy (reconcile).
        let cmd = lazarus_cluster::MetaCommand::DeleteVolume { name: name.clone() };
        match c
            .propose(cmd)
            .await
            .map_err(|e| ApiError(StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?
        {
            lazarus_cluster::MetaResponse::Ok => {}
            lazarus_cluster::MetaResponse::NotFound(m) => {
                return Err(ApiError(StatusCode::NOT_FOUND, m))
            }
            other => return Err(ApiError(StatusCode::BAD_REQUEST, format!("{other:?}"))),
        }
        for _ in 0..100 {
            if s.engine.store.volume(&name).is_none() {
                return Ok(StatusCode::NO_CONTENT);
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        return Err(ApiError(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("volume {name:?} deleted from the metadata but the local copy remains"),
        ));
    }
    let store = s.engine.store.clone();
    lazarus_rpc::rt::blocking(move || store.delete_volume(&name))
        .await
        .map_err(join_err)??;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResizeReq {
    pub size: SizeArg,
}

/// Grows a volume: through the metadata in a cluster (every node grows its copy;
/// this node's before the answer), else the local store. Connected NBD clients keep
/// the size they negotiated; a new connection sees the new one.
async fn resize_volume(
    State(s): State<AppState>,
    Path(name): Path<String>,
    body: Result<Json<ResizeReq>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<VolumeView>, ApiError> {
    let req = request_body(body)?;
    let size = req.size.bytes()?;
    lazarus_types::check_volume_size(size).map_err(|m| ApiError(StatusCode::BAD_REQUEST, m))?;
    not_being_made(&s, &name)?;
    if let Some(c) = s.cluster.clone() {
        let cmd = lazarus_cluster::MetaCommand::ResizeVolume {
            name: name.clone(),
            size_bytes: size,
        };
        match c
            .propose(cmd)
            .await
            .map_err(|e| ApiError(StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?
        {
            lazarus_cluster::MetaResponse::Volume(_) => {}
            lazarus_cluster::MetaResponse::NotFound(m) => {
                return Err(ApiError(StatusCode::NOT_FOUND, m))
            }
            lazarus_cluster::MetaResponse::Rejected(m) => {
                return Err(ApiError(StatusCode::BAD_REQUEST, m))
            }
            other => return Err(ApiError(StatusCode::BAD_REQUEST, format!("{other:?}"))),
        }
        // Every other copy that answers grows within a moment (reconcile); wait for
        // them, so that once this returns every node offers the new size. A copy that
        // does not answer grows when it comes back, before it resyncs.
        let hosts: Vec<u64> = c
            .store
            .meta()
            .volumes
            .get(&name)
            .map(|v| v.replicas.iter().copied().filter(|n| *n != c.id).collect())
            .unwrap_or_default();
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        for n in hosts {
            while tokio::time::Instant::now() < deadline {
                match c.peer_stats(n, crate::dashboard::PEER_STATS_TIMEOUT).await {
                    Ok(st) if st["volumes"][&name]["size_bytes"].as_u64() >= Some(size) => break,
                    Ok(_) => tokio::time::sleep(std::time::Duration::from_millis(50)).await,
                    Err(_) => break,
                }
            }
        }
        // This node's copy now (reconcile would within a moment), so the answer means
        // the node asked serves the new size.
        if let Some(local) = s.engine.store.volume(&name) {
            if local.size_bytes() < size {
                c.grow_local(&name, size).await;
            }
            if local.size_bytes() < size {
                return Err(ApiError(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("{name:?} resized in the metadata, but this node's copy could not grow (see its log)"),
                ));
            }
            return Ok(Json(volume_view(&local)));
        }
        let mut v = VolumeView {
            name: name.clone(),
            size_bytes: size,
            uid: String::new(),
            mapped_blocks: 0,
            mapped_pages: 0,
            root: String::new(),
            unrecoverable: Vec::new(),
            unrecoverable_lbas: 0,
            snapshots: Vec::new(),
            exclusive_bytes: None,
            clone_of: None,
            shared_blocks: 0,
            being_made_from: None,
        };
        if let Some(m) = c.store.meta().volumes.get(&name) {
            v.uid = format!("{:016x}", m.uid);
        }
        return Ok(Json(v));
    }
    let store = s.engine.store.clone();
    let v = lazarus_rpc::rt::blocking(move || store.resize_volume(&name, size))
        .await
        .map_err(join_err)??;
    Ok(Json(volume_view(&v)))
}

#[derive(Deserialize)]
struct LocateQuery {
    lba: u64,
}

async fn locate(
    State(s): State<AppState>,
    Path(name): Path<String>,
    q: Result<Query<LocateQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<lazarus_store::Locations>, ApiError> {
    let Query(q) = q.map_err(|e| ApiError(StatusCode::BAD_REQUEST, e.body_text()))?;
    let v = find(&s, &name)?;
    if q.lba >= v.size_bytes() / BLOCK_SIZE_U64 {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            format!("lba {} is past the end of volume {name:?}", q.lba),
        ));
    }
    Ok(Json(s.engine.store.locate(&v, Lba(q.lba))))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FaultTarget {
    /// A node name ("n2"); for heal, absent means every node.
    #[serde(default)]
    pub to: Option<String>,
}

fn cluster_of(s: &AppState) -> Result<Arc<lazarus_node::cluster::Cluster>, ApiError> {
    s.cluster.clone().ok_or_else(|| {
        ApiError(
            StatusCode::BAD_REQUEST,
            "this node runs alone: there is no replication to fault".into(),
        )
    })
}

fn node_arg(c: &lazarus_node::cluster::Cluster, to: Option<&str>) -> Result<Option<u64>, ApiError> {
    let Some(name) = to else { return Ok(None) };
    let id =
        lazarus_node::cluster::raft_id(name).map_err(|m| ApiError(StatusCode::BAD_REQUEST, m))?;
    if !c.store.meta().nodes.contains_key(&id) {
        return Err(ApiError(
            StatusCode::NOT_FOUND,
            format!("no node {name:?} in the cluster"),
        ));
    }
    if id == c.id {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            "a node does not replicate to itself".into(),
        ));
    }
    Ok(Some(id))
}

async fn list_faults(State(s): State<AppState>) -> Result<Json<serde_json::Value>, ApiError> {
    let c = cluster_of(&s)?;
    let drops: Vec<String> = c.drops.lock().iter().map(|n| format!("n{n}")).collect();
    Ok(Json(json!({
        "node": s.node_id,
        "drop_to": drops,
        "stall_to": c.stalls.lock().iter().map(|n| format!("n{n}")).collect::<Vec<_>>(),
        "isolated": c.is_isolated(),
        "cut_from_recovery_server": c.recovery.as_ref().is_some_and(|r| r.cut.load(std::sync::atomic::Ordering::Relaxed)),
        "device_failed": s.engine.store.device_failed(),
        "metadata_writes_failed": c.store.writes_failed(),
    })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DeviceReq {
    failed: bool,
}

async fn fault_device(
    State(s): State<AppState>,
    body: Result<Json<DeviceReq>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let Json(r) = body.map_err(|e| ApiError(StatusCode::BAD_REQUEST, e.body_text()))?;
    s.engine.store.set_device_failed(r.failed);
    tracing::warn!(node = %s.node_id, failed = r.failed, "fault injected: device {}", if r.failed { "failed" } else { "healed" });
    lazarus_observe::events::record(
        "fault",
        "",
        format!(
            "{}: device {}",
            s.node_id,
            if r.failed { "failed" } else { "healed" }
        ),
    );
    list_faults(State(s)).await
}

/// Fails (or heals) every write of this node's cluster-metadata store (its Raft log
/// and state machine), as a device refusing writes would. Raft stops at the next write,
/// and the node exits for `lazarus up` (or the service manager) to restart it.
async fn fault_metadata(
    State(s): State<AppState>,
    body: Result<Json<DeviceReq>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let Json(r) = body.map_err(|e| ApiError(StatusCode::BAD_REQUEST, e.body_text()))?;
    let c = cluster_of(&s)?;
    c.store.set_writes_failed(r.failed);
    let what = if r.failed {
        "metadata store refuses writes"
    } else {
        "metadata store healed"
    };
    tracing::warn!(node = %s.node_id, failed = r.failed, "fault injected: {what}");
    lazarus_observe::events::record("fault", "", format!("{}: {what}", s.node_id));
    list_faults(State(s)).await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct IsolateReq {
    isolated: bool,
    /// Cut the link to the recovery server instead of the links to the other nodes.
    #[serde(default)]
    recovery_server: bool,
}

async fn fault_isolate(
    State(s): State<AppState>,
    body: Result<Json<IsolateReq>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let Json(r) = body.map_err(|e| ApiError(StatusCode::BAD_REQUEST, e.body_text()))?;
    let c = cluster_of(&s)?;
    let (flag, what) = if r.recovery_server {
        let rec = c.recovery.as_ref().ok_or_else(|| {
            ApiError(
                StatusCode::CONFLICT,
                "this cluster runs without a recovery server".into(),
            )
        })?;
        let what = if r.isolated {
            "cut from the recovery server"
        } else {
            "link to the recovery server healed"
        };
        (rec.cut.as_ref(), what)
    } else {
        let what = if r.isolated {
            "isolated from the other nodes"
        } else {
            "isolation healed"
        };
        (c.isolation_switch(), what)
    };
    flag.store(r.isolated, std::sync::atomic::Ordering::SeqCst);
    tracing::warn!(node = %s.node_id, "fault injected: {what}");
    lazarus_observe::events::record("fault", "", format!("{}: {what}", s.node_id));
    list_faults(State(s)).await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ProtectReq {
    protected: bool,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RemoveNodeReq {
    #[serde(default)]
    pub cancel: bool,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct WantPrimaryReq {
    /// The node to be the primary ("n2"); none with `cancel`.
    #[serde(default)]
    pub node: Option<String>,
    #[serde(default)]
    pub cancel: bool,
}

/// `lazarus volume primary VOLUME nX`: the leader hands the volume's primary role to
/// nX once its copy is live and current (`lazarus_node::membership`); clients connected
/// to the old primary follow the role. `cancel` withdraws a request not yet met.
async fn want_primary(
    State(s): State<AppState>,
    Path(name): Path<String>,
    body: Result<Json<WantPrimaryReq>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let r = request_body(body)?;
    let c = cluster_of(&s)?;
    not_being_made(&s, &name)?;
    let Some(v) = c.store.meta().volumes.get(&name).cloned() else {
        return Err(ApiError(
            StatusCode::NOT_FOUND,
            format!("volume {name:?} does not exist"),
        ));
    };
    let (node, message) = match (&r.node, r.cancel) {
        (_, true) => (
            None,
            format!("the request for a new primary of {name} is withdrawn"),
        ),
        (Some(n), false) => {
            let (id, _) = member_named(&c, n)?;
            if v.recovery_flag && id != v.primary {
                return Err(ApiError(
                    StatusCode::CONFLICT,
                    format!("{name} is in jeopardy: its primary holds it at the recovery server, and only a failover moves the role (lazarus volume unprotect, or its copies live again, first)"),
                ));
            }
            let message = if id == v.primary {
                format!("{n} is already the primary of {name}")
            } else {
                format!(
                    "the primary role of {name} goes from n{} to {n} once its copy is live; clients of n{} follow it",
                    v.primary, v.primary
                )
            };
            (Some(id), message)
        }
        (None, false) => {
            return Err(ApiError(
                StatusCode::BAD_REQUEST,
                "give the node to be the primary (\"node\": \"n2\"), or \"cancel\": true".into(),
            ))
        }
    };
    let cmd = lazarus_cluster::MetaCommand::WantPrimary {
        volume: name.clone(),
        node,
    };
    let message = propose_node_change(&c, cmd, message).await?;
    Ok(Json(serde_json::json!({
        "volume": name,
        "primary": v.primary,
        "wanted": node,
        "message": message,
    })))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RebalanceReq {
    #[serde(default)]
    pub cancel: bool,
}

/// `lazarus rebalance`: the leader moves copies one at a time until the nodes hold
/// similar shares, then primary roles (`lazarus_node::membership`); `cancel` stops it
/// after the move under way.
async fn rebalance(
    State(s): State<AppState>,
    body: Result<Json<RebalanceReq>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let r = request_body(body)?;
    let c = cluster_of(&s)?;
    let meta = c.store.meta();
    let held = lazarus_node::decide::copies_held(&meta);
    let message = if r.cancel {
        "rebalance cancelled: a move not yet at its retire is cancelled (its new copy then leaves again)".to_string()
    } else {
        format!(
            "rebalancing: copies move one at a time, from the nodes holding most to those holding fewest (now {}), then primary roles; watch with lazarus status",
            {
meta.nodes
                    .keys()
                    .filter(|n| !meta.out.contains(n))
                    .map(|n| format!("n{n}: {}", held.get(n).copied().unwrap_or(0)))
                    .collect::<Vec<_>>()
                    .join(", ")
            }
        )
    };
    let cmd = lazarus_cluster::MetaCommand::SetRebalance { on: !r.cancel };
    let message = propose_node_change(&c, cmd, message).await?;
    Ok(Json(
        serde_json::json!({ "rebalancing": !r.cancel, "message": message }),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AddNodeReq {
    /// The new node's id ("n4").
    pub name: String,
    /// Its RPC address, where the cluster's members reach it.
    pub rpc: String,
}

/// The new node's Raft id and a checked RPC address.
fn new_node(name: &str, rpc: &str) -> Result<lazarus_cluster::raft_store::NodeId, ApiError> {
    let id = lazarus_node::cluster::raft_id(name)
        .map_err(|e| ApiError(StatusCode::BAD_REQUEST, format!("name: {e}")))?;
    if name.len() > 64 || rpc.len() > 255 {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            "name is at most 64 characters, rpc at most 255".into(),
        ));
    }
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            format!("name {name:?} must be letters, digits, '-' or '_'"),
        ));
    }
    let host_port = rpc
        .rsplit_once(':')
        .filter(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p > 0));
    if host_port.is_none() {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            format!("rpc {rpc:?} must be HOST:PORT (the new node's rpc_listen)"),
        ));
    }
    Ok(id)
}

/// The Raft id of member `name`, and the metadata it is a member of (404 if not).
fn member_named(
    c: &lazarus_node::cluster::Cluster,
    name: &str,
) -> Result<
    (
        lazarus_cluster::raft_store::NodeId,
        std::sync::Arc<lazarus_cluster::ClusterMeta>,
    ),
    ApiError,
> {
    let node = lazarus_node::cluster::raft_id(name)
        .map_err(|e| ApiError(StatusCode::BAD_REQUEST, format!("node: {e}")))?;
    let meta = c.store.meta();
    if !meta.nodes.contains_key(&node) {
        return Err(ApiError(
            StatusCode::NOT_FOUND,
            format!("{name} is not a cluster member"),
        ));
    }
    Ok((node, meta))
}

/// Proposes a node change; `Ok` as `message`, a refusal as 409.
async fn propose_node_change(
    c: &lazarus_node::cluster::Cluster,
    cmd: lazarus_cluster::MetaCommand,
    message: String,
) -> Result<String, ApiError> {
    match c
        .propose(cmd)
        .await
        .map_err(|e| ApiError(StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?
    {
        lazarus_cluster::MetaResponse::Ok => {
            lazarus_observe::events::record("membership", "", message.clone());
            Ok(message)
        }
        lazarus_cluster::MetaResponse::Rejected(m) => Err(ApiError(StatusCode::CONFLICT, m)),
        other => Err(ApiError(StatusCode::BAD_REQUEST, format!("{other:?}"))),
    }
}

/// `lazarus node add`: records the node as joining; the leader makes it a Raft learner
/// and, once it has registered and caught up, a voter if the cluster wants one
/// (`lazarus_node::membership`). New volumes and re-replicated copies use it from its
/// registration on.
async fn add_node(
    State(s): State<AppState>,
    body: Result<Json<AddNodeReq>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let r = request_body(body)?;
    let c = cluster_of(&s)?;
    let id = new_node(&r.name, &r.rpc)?;
    let cmd = lazarus_cluster::MetaCommand::AddNode {
        id,
        name: r.name.clone(),
        rpc: r.rpc.clone(),
    };
    let message = format!(
        "{} is being added at {}: it joins the Raft group once it answers there (a node started with `join = true`)",
        r.name, r.rpc
    );
    let message = propose_node_change(&c, cmd, message).await?;
    Ok(Json(
        serde_json::json!({ "node": r.name, "id": id, "message": message }),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplaceNodeReq {
    /// The node taking over the copies ("n6").
    pub with: String,
    /// Its RPC address, if it is not a member yet: it is added first.
    #[serde(default)]
    pub rpc: Option<String>,
}

/// `lazarus node replace nX --with nY`: removes nX, and its copies are rebuilt on nY
/// (added first if `rpc` is given and it is not a member yet).
async fn replace_node(
    State(s): State<AppState>,
    Path(name): Path<String>,
    body: Result<Json<ReplaceNodeReq>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let r = request_body(body)?;
    let c = cluster_of(&s)?;
    let (node, meta) = member_named(&c, &name)?;
    let with = match &r.rpc {
        Some(rpc) => new_node(&r.with, rpc)?,
        None => lazarus_node::cluster::raft_id(&r.with)
            .map_err(|e| ApiError(StatusCode::BAD_REQUEST, format!("with: {e}")))?,
    };
    if let Some(rpc) = &r.rpc {
        if !meta.nodes.contains_key(&with) && !meta.joining.contains_key(&with) {
            let cmd = lazarus_cluster::MetaCommand::AddNode {
                id: with,
                name: r.with.clone(),
                rpc: rpc.clone(),
            };
            propose_node_change(&c, cmd, format!("{} is being added at {rpc}", r.with)).await?;
        }
    }
    let cmd = lazarus_cluster::MetaCommand::ReplaceNode { node, with };
    let message = format!(
        "{name} is out: its copies are being rebuilt on {} (once it answers), then dropped (lazarus status)",
        r.with
    );
    let message = propose_node_change(&c, cmd, message).await?;
    Ok(Json(
        serde_json::json!({ "node": name, "with": r.with, "message": message }),
    ))
}

/// `lazarus node remove`: marks the node out for good (or back in with `cancel`); the
/// leader then moves its copies and primary roles (`lazarus_node::membership`).
async fn remove_node(
    State(s): State<AppState>,
    Path(name): Path<String>,
    body: Result<Json<RemoveNodeReq>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let Json(r) = body.map_err(|e| ApiError(StatusCode::BAD_REQUEST, e.body_text()))?;
    let c = cluster_of(&s)?;
    // A node being added that has not registered yet: its join is cancelled.
    if let Ok(id) = lazarus_node::cluster::raft_id(&name) {
        let meta = c.store.meta();
        if !r.cancel && !meta.nodes.contains_key(&id) && meta.joining.contains_key(&id) {
            let cmd = lazarus_cluster::MetaCommand::ForgetNode { id };
            let message = format!(
                "{name}'s join is cancelled: it leaves the Raft group (its id is not used again)"
            );
            let message = propose_node_change(&c, cmd, message).await?;
            return Ok(Json(
                serde_json::json!({ "node": name, "out": true, "message": message }),
            ));
        }
    }
    let (node, meta) = member_named(&c, &name)?;
    let mut note = String::new();
    if !r.cancel {
        // Where its copies can go: the nodes that are neither out nor this one.
        let others = meta
            .nodes
            .keys()
            .filter(|n| **n != node && !meta.out.contains(n))
            .count();
        let short: Vec<&str> = meta
            .volumes
            .values()
            .filter(|v| v.replicas.contains(&node) && v.replication_factor() > others)
            .map(|v| v.name.as_str())
            .collect();
        if !short.is_empty() {
            note = format!(
                "; {} cannot be moved yet: each needs more nodes than the {others} that are not out (they move once a node is added or back in)",
                short.join(", ")
            );
        }
    }
    let cmd = lazarus_cluster::MetaCommand::SetOut {
        node,
        out: !r.cancel,
        removed: !r.cancel,
    };
    match c
        .propose(cmd)
        .await
        .map_err(|e| ApiError(StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?
    {
        lazarus_cluster::MetaResponse::Ok => {
            let message = if r.cancel {
                format!("{name} is back in: it resyncs the copies it still holds")
            } else {
                format!("{name} is out: its copies are being rebuilt on other nodes, then dropped (lazarus status){note}")
            };
            lazarus_observe::events::record("membership", "", message.clone());
            Ok(Json(
                serde_json::json!({ "node": name, "out": !r.cancel, "message": message }),
            ))
        }
        other => Err(ApiError(StatusCode::BAD_REQUEST, format!("{other:?}"))),
    }
}

async fn protect_volume(
    State(s): State<AppState>,
    Path(name): Path<String>,
    body: Result<Json<ProtectReq>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let Json(r) = body.map_err(|e| ApiError(StatusCode::BAD_REQUEST, e.body_text()))?;
    let c = cluster_of(&s)?;
    if !c.store.meta().volumes.contains_key(&name) {
        return Err(ApiError(
            StatusCode::NOT_FOUND,
            format!("volume {name:?} does not exist"),
        ));
    }
    if r.protected && c.recovery.is_none() {
        return Err(ApiError(
            StatusCode::CONFLICT,
            "no recovery server is configured on this cluster: a volume cannot be protected".into(),
        ));
    }
    let cmd = lazarus_cluster::MetaCommand::SetProtected {
        volume: name.clone(),
        protected: r.protected,
    };
    match c
        .propose(cmd)
        .await
        .map_err(|e| ApiError(StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?
    {
        lazarus_cluster::MetaResponse::Volume(v) => {
            lazarus_observe::events::record(
                "protect",
                &name,
                if r.protected {
                    "protection requested"
                } else {
                    "protection withdrawn"
                },
            );
            Ok(Json(serde_json::to_value(&v).unwrap_or_default()))
        }
        lazarus_cluster::MetaResponse::Rejected(m) => Err(ApiError(StatusCode::BAD_REQUEST, m)),
        lazarus_cluster::MetaResponse::NotFound(m) => Err(ApiError(StatusCode::NOT_FOUND, m)),
        other => Err(ApiError(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("{other:?}"),
        )),
    }
}

#[derive(Deserialize)]
struct EventsQuery {
    #[serde(default)]
    after: u64,
}

async fn events(Query(q): Query<EventsQuery>) -> Json<serde_json::Value> {
    Json(json!({ "events": lazarus_observe::events::since(q.after) }))
}

async fn jeopardy(State(s): State<AppState>) -> Result<Json<serde_json::Value>, ApiError> {
    let c = cluster_of(&s)?;
    Ok(Json(c.jeopardy_status()))
}

/// The cluster and the node named by a link fault's required `to`.
fn link_target(
    s: &AppState,
    body: Result<Json<FaultTarget>, axum::extract::rejection::JsonRejection>,
) -> Result<(Arc<lazarus_node::cluster::Cluster>, u64), ApiError> {
    let Json(t) = body.map_err(|e| ApiError(StatusCode::BAD_REQUEST, e.body_text()))?;
    let c = cluster_of(s)?;
    let id = node_arg(&c, t.to.as_deref())?
        .ok_or_else(|| ApiError(StatusCode::BAD_REQUEST, "\"to\" is required".into()))?;
    Ok((c, id))
}

async fn fault_drop(
    State(s): State<AppState>,
    body: Result<Json<FaultTarget>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let (c, id) = link_target(&s, body)?;
    c.drops.lock().insert(id);
    tracing::warn!(from = %s.node_id, to = id, "fault injected: replication traffic to this node now fails");
    list_faults(State(s)).await
}

async fn fault_stall(
    State(s): State<AppState>,
    body: Result<Json<FaultTarget>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let (c, id) = link_target(&s, body)?;
    c.stalls.lock().insert(id);
    tracing::warn!(from = %s.node_id, to = id, "fault injected: replication updates to this node are held");
    lazarus_observe::events::record(
        "fault",
        "",
        format!("{}: replication to n{id} stalled", s.node_id),
    );
    list_faults(State(s)).await
}

async fn fault_heal(
    State(s): State<AppState>,
    body: Result<Json<FaultTarget>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let Json(t) = body.map_err(|e| ApiError(StatusCode::BAD_REQUEST, e.body_text()))?;
    let c = cluster_of(&s)?;
    match node_arg(&c, t.to.as_deref())? {
        Some(id) => {
            c.drops.lock().remove(&id);
            c.stalls.lock().remove(&id);
        }
        None => {
            c.drops.lock().clear();
            c.stalls.lock().clear();
            c.isolation_switch()
                .store(false, std::sync::atomic::Ordering::SeqCst);
            if let Some(r) = &c.recovery {
                r.cut.store(false, std::sync::atomic::Ordering::SeqCst);
            }
            s.engine.store.set_device_failed(false);
            c.store.set_writes_failed(false);
            // Healing everything also ends injected device errors on this node.
            for v in s.engine.store.volumes() {
                v.clear_read_errors();
            }
        }
    }
    tracing::warn!(node = %s.node_id, to = ?t.to, "fault healed");
    list_faults(State(s)).await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CorruptReq {
    pub volume: String,
    pub lba: u64,
    /// "slice" (the slice page holding the LBA).
    #[serde(default = "default_target")]
    pub target: String,
}

fn default_target() -> String {
    "slice".into()
}

/// Damages on disk the slice page holding an LBA (the journal is checkpointed first, so
/// the disk held the current page), then drops the node's cached copy: the node sees
/// what a device error would leave.
async fn fault_corrupt(
    State(s): State<AppState>,
    body: Result<Json<CorruptReq>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let Json(req) = body.map_err(|e| ApiError(StatusCode::BAD_REQUEST, e.body_text()))?;
    if let Some((volume, snap)) = req.volume.split_once('@') {
        return corrupt_snapshot(&s, volume, snap, req.lba, &req.target)
            .await
            .map(Json);
    }
    let v = find(&s, &req.volume)?;
    if req.lba >= v.size_bytes() / BLOCK_SIZE_U64 {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            format!("lba {} is past the end of volume {:?}", req.lba, req.volume),
        ));
    }
    if !["slice", "checksum", "block"].contains(&req.target.as_str()) {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            format!("target {:?}: use slice, checksum or block", req.target),
        ));
    }
    let store = s.engine.store.clone();
    let r = lazarus_rpc::rt::blocking(move || {
        corrupt_on_disk(&store, &v, &req.volume, req.lba, &req.target)
    })
    .await
    .map_err(join_err)??;
    Ok(Json(r))
}

/// Flips bytes of the 4 KiB at `offset` of `path` on disk, synced: fault injection.
fn damage_4k(path: &std::path::Path, offset: u64) -> Result<(), ApiError> {
    let internal = |e: std::io::Error| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string());
    let f = lazarus_io::fs::open_rw(path, false, false).map_err(internal)?;
    let mut b = vec![0u8; 4096];
    f.read_exact_at(&mut b, offset).map_err(internal)?;
    for x in b.iter_mut().step_by(97) {
        *x ^= 0x5a;
    }
    f.write_all_at(&b, offset)
        .and_then(|_| f.sync_data())
        .map_err(internal)
}

/// `lazarus fault corrupt --volume V@S`: damages on disk, on this node, the page block
/// keeping snapshot S's page that holds `lba` (`page`) or the block S maps at `lba`
/// (`block`).
async fn corrupt_snapshot(
    s: &AppState,
    volume: &str,
    snap: &str,
    lba: u64,
    target: &str,
) -> Result<serde_json::Value, ApiError> {
    let v = find(s, volume)?;
    let sn = v.snapshot(snap).ok_or_else(|| {
        ApiError(
            StatusCode::NOT_FOUND,
            format!("no snapshot {volume}@{snap} here"),
        )
    })?;
    if lba >= sn.block_count() {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            format!("lba {lba} is past the end of {volume}@{snap}"),
        ));
    }
    if !["page", "block"].contains(&target) {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            format!("target {target:?}: a snapshot's page or block"),
        ));
    }
    let store = s.engine.store.clone();
    let (volume, snap, target) = (volume.to_string(), snap.to_string(), target.to_string());
    lazarus_rpc::rt::blocking(move || {
        store.checkpoint()?;
        let (page_block, block) = store.snapshot_locate(&v, &sn, Lba(lba));
        let offset = if target == "page" { page_block } else { block }.ok_or_else(|| {
            ApiError(
                StatusCode::BAD_REQUEST,
                format!("{volume}@{snap} keeps no {target} of its own for lba {lba} (a hole, or a page it shares with the volume)"),
            )
        })?;
        let path = store.blocks_path();
        damage_4k(&path, offset)?;
        tracing::warn!(volume, snapshot = snap, target, lba, "fault injected: a snapshot's {target} corrupted on disk");
        Ok(json!({ "volume": format!("{volume}@{snap}"), "target": target, "page": lba / lazarus_types::FANOUT_U64, "file": path, "offset": offset, "damaged": true }))
    })
    .await
    .map_err(join_err)?
}

/// Damages on disk the 4 KiB of `target` (slice, checksum or block) that holds `lba`
/// of volume `v` (the journal is checkpointed first, so the disk holds the current
/// page), then drops the node's cached copy: the node sees what a device error would
/// leave. The `lazarus fault corrupt` command, and the simulator's bit rot.
pub fn corrupt_on_disk(
    store: &lazarus_store::Store,
    v: &Arc<Volume>,
    volume: &str,
    lba: u64,
    target: &str,
) -> Result<serde_json::Value, ApiError> {
    store.checkpoint()?;
    let page = lba / lazarus_types::FANOUT_U64;
    let (path, offset) = match target {
        "slice" => v.locate_page(Lba(lba)),
        "checksum" => v.locate_checksum_page(Lba(lba)),
        _ => (
            store.blocks_path(),
            store.block_offset(v, Lba(lba)).ok_or_else(|| {
                ApiError(
                    StatusCode::BAD_REQUEST,
                    format!("lba {lba} maps no stored block"),
                )
            })?,
        ),
    };
    damage_4k(&path, offset)?;
    // Drop what the node holds of it: the next access sees the device's bytes.
    let damaged = match target {
        "slice" => v.reload_page(page)?,
        "checksum" => v.scrub_checksum_page(0, page / lazarus_types::FANOUT_U64)?,
        _ => true, // blocks are read from disk on every access
    };
    tracing::warn!(
        volume,
        target,
        page,
        damaged,
        "fault injected: corrupted on disk"
    );
    Ok(
        json!({ "volume": volume, "target": target, "page": page, "file": path, "offset": offset, "damaged": damaged }),
    )
}

/// Repairs every known-damaged page of the volume now (this node must be its primary).
#[derive(Deserialize)]
struct RepairQuery {
    /// Repair only this page (the CLI goes page by page to show progress).
    page: Option<u64>,
}

async fn repair_volume(
    State(s): State<AppState>,
    Path(name): Path<String>,
    q: Result<Query<RepairQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let Query(q) = q.map_err(|e| ApiError(StatusCode::BAD_REQUEST, e.body_text()))?;
    let v = find(&s, &name)?;
    if s.engine.primary_epoch(&name).is_none() {
        return Err(ApiError(
            StatusCode::CONFLICT,
            format!("this node is not the primary of {name:?}; ask the primary"),
        ));
    }
    let t0 = tokio::time::Instant::now();
    let results = match q.page {
        Some(p) if p >= v.page_count() => {
            return Err(ApiError(
                StatusCode::BAD_REQUEST,
                format!("page {p} is past the end of {name:?}"),
            ))
        }
        Some(p) => vec![(p, s.engine.repair_page(&v, p).await)],
        None => s.engine.repair_volume(&v).await,
    };
    let pages: Vec<serde_json::Value> = results
        .iter()
        .map(|(p, o)| {
            let source = match o {
                lazarus_engine::repair::Outcome::AlreadyWhole => "whole".to_string(),
                lazarus_engine::repair::Outcome::Repaired(src) => src.clone(),
                lazarus_engine::repair::Outcome::Unrecoverable => "unrecoverable".to_string(),
            };
            json!({ "page": p, "first_lba": p * lazarus_types::FANOUT_U64, "source": source })
        })
        .collect();
    let elapsed_us = t0.elapsed().as_micros() as u64;
    let unrecoverable: Vec<DamagedRange> = v
        .damaged_ranges()
        .into_iter()
        .map(|(first_lba, count)| DamagedRange { first_lba, count })
        .collect();
    Ok(Json(json!({
        "volume": name,
        "elapsed_us": elapsed_us,
        "pages": pages,
        "unrecoverable": unrecoverable,
    })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotReq {
    pub name: String,
}

/// A snapshot as the API shows it.
fn snapshot_view(
    store: &lazarus_store::Store,
    v: &Volume,
    sn: &lazarus_store::Snapshot,
    space: &lazarus_store::store::SnapshotSpace,
) -> serde_json::Value {
    let (mapped_blocks, mapped_pages) = store.snapshot_usage(v, sn);
    json!({
        "name": sn.name,
        "export": format!("{}@{}", v.meta.name, sn.name),
        "seq": sn.seq,
        "created_unix": sn.created_unix,
        "size_bytes": sn.size_bytes,
        "mapped_blocks": mapped_blocks,
        "mapped_pages": mapped_pages,
        // What deleting it would free: the blocks and page blocks only it references.
        // (null: not counted, too many pages differ.)
        "exclusive_bytes": space.exclusive.get(&sn.name).copied(),
        "root": sn.root.to_hex(),
    })
}

/// This node's copy's snapshots (the CLI asks the primary).
async fn list_snapshots(
    State(s): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let v = find(&s, &name)?;
    let store = s.engine.store.clone();
    let engine = s.engine.clone();
    let out = lazarus_rpc::rt::blocking(move || {
        // Only those the cluster knows by their name: a copy may still hold one whose
        // deletion it missed.
        let space = store.snapshot_space(&v);
        let snaps: Vec<serde_json::Value> = v
            .snapshots()
            .iter()
            .filter(|sn| engine.snapshot_current(&v.meta.name, sn))
            .map(|sn| snapshot_view(&store, &v, sn, &space))
            .collect();
        let failed: Vec<serde_json::Value> = v
            .failed_snapshots()
            .into_iter()
            .map(|(n, e)| json!({ "name": n, "error": e }))
            .collect();
        json!({ "volume": v.meta.name, "snapshots": snaps, "unreadable": failed })
    })
    .await
    .map_err(join_err)?;
    Ok(Json(out))
}

fn snapshot_error(e: lazarus_engine::engine::IoError) -> ApiError {
    if e.message.contains("not the primary") || e.message.contains("already has a snapshot") {
        return ApiError(StatusCode::CONFLICT, e.message);
    }
    if e.message.starts_with("no snapshot") {
        return ApiError(StatusCode::NOT_FOUND, e.message);
    }
    io_error(e)
}

/// Takes a snapshot on every live copy (on the volume's primary).
async fn create_snapshot(
    State(s): State<AppState>,
    Path(name): Path<String>,
    body: Result<Json<SnapshotReq>, axum::extract::rejection::JsonRejection>,
) -> Result<(StatusCode, Json<serde_json::Value>), ApiError> {
    let req = request_body(body)?;
    let v = find(&s, &name)?;
    not_being_made(&s, &name)?;
    let (sn, outcome) = s
        .engine
        .create_snapshot(&name, &req.name)
        .await
        .map_err(snapshot_error)?;
    let store = s.engine.store.clone();
    let view = lazarus_rpc::rt::blocking(move || {
        snapshot_view(&store, &v, &sn, &store.snapshot_space(&v))
    })
    .await
    .map_err(join_err)?;
    Ok((
        StatusCode::CREATED,
        Json(json!({ "snapshot": view, "copies": outcome })),
    ))
}

/// This node's copy of `name` and its snapshot `snap`, if the cluster knows it by
/// that name.
fn find_snapshot(
    s: &AppState,
    name: &str,
    snap: &str,
) -> Result<(Arc<Volume>, Arc<lazarus_store::Snapshot>), ApiError> {
    snapshot_here(&s.engine, name, snap)
}

/// This node's copy of snapshot `name@snap`, if the cluster knows it by that name.
fn snapshot_here(
    engine: &Engine,
    name: &str,
    snap: &str,
) -> Result<(Arc<Volume>, Arc<lazarus_store::Snapshot>), ApiError> {
    let v = engine.store.volume(name).ok_or_else(|| {
        ApiError(
            StatusCode::NOT_FOUND,
            format!("volume {name:?} does not exist"),
        )
    })?;
    v.snapshot(snap)
        .filter(|sn| engine.snapshot_current(name, sn))
        .map(|sn| (v, sn))
        .ok_or_else(|| {
            ApiError(
                StatusCode::NOT_FOUND,
                format!("no snapshot {name}@{snap} on this node"),
            )
        })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DiffQuery {
    #[serde(default)]
    since: Option<String>,
}

/// The block runs `[first_lba, count]` where snapshot `snap` differs from snapshot
/// `since` (every mapped run of `snap` without it), found through their checksum
/// trees: only slice pages whose checksums differ are read.
async fn snapshot_diff(
    State(s): State<AppState>,
    Path((name, snap)): Path<(String, String)>,
    q: Result<Query<DiffQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let Query(q) = q.map_err(|e| ApiError(StatusCode::BAD_REQUEST, e.body_text()))?;
    let (v, b) = find_snapshot(&s, &name, &snap)?;
    let a = match &q.since {
        Some(a) => Some(find_snapshot(&s, &name, a)?.1),
        None => None,
    };
    if a.as_ref().is_some_and(|a| a.seq > b.seq) {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            format!(
                "snapshot {} was taken after {snap}: export the newer one --since the older",
                q.since.clone().unwrap_or_default()
            ),
        ));
    }
    let store = s.engine.store.clone();
    let t0 = std::time::Instant::now();
    let (a2, b2) = (a.clone(), b.clone());
    let runs = lazarus_rpc::rt::blocking(move || store.snapshot_diff(&v, a2.as_deref(), &b2))
        .await
        .map_err(join_err)?
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    Ok(Json(json!({
        "volume": name,
        "snapshot": snap,
        "since": q.since,
        "size_bytes": b.size_bytes,
        "root": b.root.to_hex(),
        "since_root": a.map(|a| a.root.to_hex()),
        "block_size": BLOCK_SIZE_U64,
        // Ranges B maps (read them), and ranges it leaves unmapped (zero records).
        "extents": runs.iter().filter(|r| !r.2).map(|r| (r.0, r.1)).collect::<Vec<_>>(),
        "holes": runs.iter().filter(|r| r.2).map(|r| (r.0, r.1)).collect::<Vec<_>>(),
        "elapsed_us": t0.elapsed().as_micros() as u64,
    })))
}

/// Bytes of a snapshot (whole blocks are read and verified).
async fn snapshot_data(
    State(s): State<AppState>,
    Path((name, snap)): Path<(String, String)>,
    q: Result<Query<RangeQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = q.map_err(|e| ApiError(StatusCode::BAD_REQUEST, e.body_text()))?;
    let length = q
        .length
        .ok_or_else(|| ApiError(StatusCode::BAD_REQUEST, "length is required".into()))?;
    let (v, sn) = find_snapshot(&s, &name, &snap)?;
    if length > DATA_MAX_BYTES {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            format!("at most {DATA_MAX_BYTES} bytes per request"),
        ));
    }
    if q.offset
        .checked_add(length)
        .is_none_or(|end| end > sn.size_bytes)
    {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            format!(
                "range past the end of the snapshot ({} bytes)",
                sn.size_bytes
            ),
        ));
    }
    let store = s.engine.store.clone();
    let data =
        lazarus_rpc::rt::blocking(move || store.read_snapshot_range(&v, &sn, q.offset, length))
            .await
            .map_err(join_err)?
            .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    Ok(octet_stream(data))
}

/// Raw bytes as a response (the data endpoints).
fn octet_stream(data: Vec<u8>) -> axum::response::Response {
    (
        [(axum::http::header::CONTENT_TYPE, "application/octet-stream")],
        data,
    )
        .into_response()
}

/// Makes the volume read as one of its snapshots again (on the volume's primary).
async fn revert_volume(
    State(s): State<AppState>,
    Path(name): Path<String>,
    body: Result<Json<SnapshotReq>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let req = request_body(body)?;
    find(&s, &name)?;
    not_being_made(&s, &name)?;
    let outcome = s
        .engine
        .reset_to_snapshot(&name, &name, &req.name, None)
        .await
        .map_err(snapshot_error)?;
    Ok(Json(json!(outcome)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CloneReq {
    /// The new volume's name.
    pub name: String,
}

/// Creates a volume reading as a snapshot (on the snapshot's volume's primary):
/// `clone_volume`.
async fn clone_snapshot(
    State(s): State<AppState>,
    Path((name, snap)): Path<(String, String)>,
    body: Result<Json<CloneReq>, axum::extract::rejection::JsonRejection>,
) -> Result<(StatusCode, Json<serde_json::Value>), ApiError> {
    let req = request_body(body)?;
    let out = clone_volume(&s.engine, s.cluster.as_ref(), &name, &snap, &req.name).await?;
    Ok((StatusCode::CREATED, Json(json!(out))))
}

/// `lazarus volume clone NAME@SNAP NEW`, on NAME's primary (the simulator calls it
/// too). In a cluster NEW's copies go on the nodes of NAME's copies, this node its
/// primary: each live one maps the snapshot's blocks from its own copy, no data moves
/// (`Engine::reset_to_snapshot`). A name in use is refused. In a cluster NEW is
/// created *being made* (served by no node) and committed made once every copy is
/// reset; a clone that fails removes it again, and one cut off by a crash of this node
/// is removed once the node is back (`lazarus_node::clones`).
pub async fn clone_volume(
    engine: &Arc<Engine>,
    cluster: Option<&Arc<lazarus_node::cluster::Cluster>>,
    name: &str,
    snap: &str,
    new: &str,
) -> Result<lazarus_engine::snapshots::ResetSummary, ApiError> {
    let new = new.to_string();
    let bad = |m: String| ApiError(StatusCode::BAD_REQUEST, m);
    lazarus_types::check_volume_name(&new).map_err(bad)?;
    let (_, sn) = snapshot_here(engine, name, snap)?;
    let size = sn.size_bytes;
    let conflict = |m: String| ApiError(StatusCode::CONFLICT, m);
    let named = || cluster.is_some_and(|c| c.store.meta().volumes.contains_key(&new));
    if named() || (cluster.is_none() && engine.store.volume(&new).is_some()) {
        return Err(conflict(format!("volume {new:?} already exists")));
    }
    // A copy here under the name that the metadata no longer names is a deleted
    // volume's, which this node is removing (a deletion answered by another node
    // returns once that node's copy is gone): the clone waits for it.
    let t0 = tokio::time::Instant::now();
    while engine.store.volume(&new).is_some() {
        if t0.elapsed() > std::time::Duration::from_secs(10) {
            return Err(conflict(format!(
                "a deleted volume {new:?} still has its copy on this node: try again in a moment"
            )));
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    if named() {
        return Err(conflict(format!("volume {new:?} already exists")));
    }
    // The uid of the volume this call created (it alone is removed if the clone
    // fails), and, in a cluster, this process's claim on filling it: a clone still
    // being filled when the claim goes (this process with it) is removed.
    let mut claim = None;
    let created: u64 = match cluster {
        None => {
            let (store, n, from) = (engine.store.clone(), new.clone(), format!("{name}@{snap}"));
            lazarus_rpc::rt::blocking(move || store.create_clone_volume(&n, size, &from))
                .await
                .map_err(join_err)??
                .meta
                .uid
        }
        Some(c) => {
            if engine.primary_epoch(name).is_none() {
                return Err(conflict(format!(
                    "this node is not the primary of {name:?}; ask the primary"
                )));
            }
            let v = c.effective(name).ok_or_else(|| {
                ApiError(
                    StatusCode::NOT_FOUND,
                    format!("volume {name:?} does not exist"),
                )
            })?;
            if v.cloning.is_some() {
                return Err(conflict(format!(
                    "volume {name:?} is a clone still being made; try again once it is"
                )));
            }
            // As many copies as the volume is to have, on its copies' nodes: the live
            // ones first, then the others (a copy down now fails to reset, is
            // committed dead and resyncs once back), never an out node's or one
            // moving away (a move or rebuild under way holds one copy more).
            let meta = c.store.meta();
            let leaving = meta.moving.get(name).copied();
            let mut replicas = vec![c.id];
            let live = v.live();
            let others = v
                .replicas
                .iter()
                .copied()
                .filter(|n| !live.contains(n) && !meta.out.contains(n) && Some(*n) != leaving);
            for n in live.iter().copied().chain(others) {
                if !replicas.contains(&n) {
                    replicas.push(n);
                }
            }
            replicas.truncate(v.replication_factor());
            claim =
                Some(c.filling_clone(&new).ok_or_else(|| {
                    conflict(format!("a clone {new:?} is already being made here"))
                })?);
            let cmd = lazarus_cluster::MetaCommand::CreateVolume {
                name: new.clone(),
                size_bytes: size,
                replicas,
                primary: Some(c.id),
                clone_of: Some(lazarus_cluster::CloneFill {
                    source: name.to_string(),
                    snapshot: snap.to_string(),
                    by: c.id,
                }),
            };
            match c
                .propose(cmd)
                .await
                .map_err(|e| ApiError(StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?
            {
                lazarus_cluster::MetaResponse::Volume(nv) => nv.uid,
                lazarus_cluster::MetaResponse::Exists(m) => return Err(conflict(m)),
                other => return Err(bad(format!("{other:?}"))),
            }
        }
    };
    let e: ApiError = match fill_clone(engine, cluster, name, snap, &new, created).await {
        Ok(out) => match cluster {
            None => return Ok(out),
            // Served from now on.
            Some(c) => match c
                .propose(lazarus_cluster::MetaCommand::CloneDone {
                    name: new.clone(),
                    uid: created,
                    filled: true,
                })
                .await
            {
                Ok(lazarus_cluster::MetaResponse::Ok) => {
                    await_served(c, &new).await;
                    return Ok(out);
                }
                Ok(other) => ApiError(
                    StatusCode::CONFLICT,
                    format!("volume {new:?} was filled but is no longer the clone being made: {other:?}"),
                ),
                Err(e) => {
                    // Committed or not: if not, the clone is removed once this call
                    // lets go of it.
                    drop(claim);
                    return Err(ApiError(
                        StatusCode::SERVICE_UNAVAILABLE,
                        format!(
                            "volume {new:?} was filled but its end could not be confirmed ({e}): `volume list` shows it if it was made; if not, it is removed and can be asked for again"
                        ),
                    ));
                }
            },
        },
        Err(e) => e,
    };
    // Not left behind empty (or reset on some copies only): the same clone can be
    // asked for again at once.
    let removed = remove_failed_clone(engine, cluster, &new, created).await;
    drop(claim);
    Err(ApiError(
        e.0,
        match removed {
            Ok(()) => format!("{} (volume {new:?} removed again)", e.1),
            Err(why) => format!(
                "{} (volume {new:?} was created and could not be removed yet ({why}); it is removed once this node gets through)",
                e.1
            ),
        },
    ))
}

/// Waits (at most a few seconds) until every node that answers serves the clone
/// `new` just made: each applies its end a moment after the leader, and a client
/// that connects to one before would be told there is no such export.
async fn await_served(c: &Arc<lazarus_node::cluster::Cluster>, new: &str) {
    let t0 = tokio::time::Instant::now();
    let mut left: Vec<u64> = c.store.meta().nodes.keys().copied().collect();
    while !left.is_empty() && t0.elapsed() < std::time::Duration::from_secs(5) {
        let mut still = Vec::new();
        for n in left {
            let serves = if n == c.id {
                c.store
                    .meta()
                    .volumes
                    .get(new)
                    .is_some_and(|v| v.cloning.is_none())
            } else {
                match c.peer_stats(n, std::time::Duration::from_millis(500)).await {
                    Ok(s) => s["serves"]
                        .as_array()
                        .is_some_and(|a| a.iter().any(|x| x.as_str() == Some(new))),
                    // Down or slow: it learns of the clone when it catches up.
                    Err(_) => true,
                }
            };
            if !serves {
                still.push(n);
            }
        }
        left = still;
        if !left.is_empty() {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }
}

/// Removes the volume a failed clone created (uid `created`), unless the name is
/// another volume's by now (in a cluster: unless it is no longer that clone being
/// filled).
async fn remove_failed_clone(
    engine: &Arc<Engine>,
    cluster: Option<&Arc<lazarus_node::cluster::Cluster>>,
    new: &str,
    created: u64,
) -> Result<(), String> {
    match cluster {
        None => {
            if engine.store.volume(new).map(|v| v.meta.uid) != Some(created) {
                return Ok(());
            }
            let (store, n) = (engine.store.clone(), new.to_string());
            lazarus_rpc::rt::blocking(move || store.delete_volume(&n))
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())
        }
        Some(c) => {
            let cmd = lazarus_cluster::MetaCommand::CloneDone {
                name: new.to_string(),
                uid: created,
                filled: false,
            };
            match c.propose(cmd).await.map_err(|e| e.to_string())? {
                lazarus_cluster::MetaResponse::Ok | lazarus_cluster::MetaResponse::NotFound(_) => {
                    Ok(())
                }
                other => Err(format!("{other:?}")),
            }
        }
    }
}

/// Makes the new volume `new` read as `name@snap` (`clone_volume`), once its copy
/// here and this node's lease on it are there.
async fn fill_clone(
    engine: &Arc<Engine>,
    cluster: Option<&Arc<lazarus_node::cluster::Cluster>>,
    name: &str,
    snap: &str,
    new: &str,
    created: u64,
) -> Result<lazarus_engine::snapshots::ResetSummary, ApiError> {
    // The new volume's copy here, and this node's lease on it, come a moment after
    // the metadata names it. Only the volume this clone created (`created`): given
    // up meanwhile (its maker silent to the leader), its name may be another's.
    let t0 = tokio::time::Instant::now();
    let uid = || cluster.and_then(|c| c.store.meta().volumes.get(new).map(|v| v.uid));
    loop {
        if cluster.is_some() && uid().is_some_and(|u| u != created) {
            return Err(ApiError(
                StatusCode::CONFLICT,
                format!("the clone {new:?} was given up while it was being made, and the name is another volume's now"),
            ));
        }
        let here = engine
            .store
            .volume(new)
            .filter(|l| l.meta.uid == created && (cluster.is_none() || uid() == Some(created)));
        let why: String = match here {
            None => format!("volume {new:?} committed but its copy here did not appear"),
            Some(_) => match engine
                .reset_to_snapshot(new, name, snap, Some(created))
                .await
            {
                Ok(out) => return Ok(out),
                Err(e) if e.message.contains("not the primary") || e.message.contains("lease") => {
                    e.message
                }
                Err(e) => return Err(snapshot_error(e)),
            },
        };
        // Room for the new volume's first comparison of its copies to commit a
        // copy on a down node dead.
        if t0.elapsed() > std::time::Duration::from_secs(30) {
            return Err(ApiError(StatusCode::SERVICE_UNAVAILABLE, why));
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// Deletes a snapshot on every copy that answers (on the volume's primary).
async fn delete_snapshot(
    State(s): State<AppState>,
    Path((name, snap)): Path<(String, String)>,
) -> Result<Json<serde_json::Value>, ApiError> {
    find(&s, &name)?;
    let outcome = s
        .engine
        .delete_snapshot(&name, &snap)
        .await
        .map_err(snapshot_error)?;
    Ok(Json(json!({ "copies": outcome })))
}

async fn repairs(State(s): State<AppState>) -> Json<serde_json::Value> {
    Json(s.engine.repair.report())
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct ScrubReq {
    #[serde(default)]
    pub volume: Option<String>,
}

async fn scrub_status(State(s): State<AppState>) -> Json<serde_json::Value> {
    let mut v = json!(s.engine.repair.scrub_progress());
    v["node"] = json!(s.node_id);
    Json(v)
}

async fn scrub(
    State(s): State<AppState>,
    body: Result<Json<ScrubReq>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let Json(req) = body.map_err(|e| ApiError(StatusCode::BAD_REQUEST, e.body_text()))?;
    if let Some(v) = &req.volume {
        find(&s, v)?;
    }
    let mut r = s.engine.scrub(req.volume.as_deref()).await;
    r["node"] = json!(s.node_id);
    Ok(Json(r))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EioReq {
    pub volume: String,
    pub lba: u64,
}

/// Makes reads of the on-disk slice page holding an LBA fail with EIO until healed
/// (`lazarus fault heal`), and drops the node's cached copy of it.
async fn fault_eio(
    State(s): State<AppState>,
    body: Result<Json<EioReq>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let Json(req) = body.map_err(|e| ApiError(StatusCode::BAD_REQUEST, e.body_text()))?;
    let v = find(&s, &req.volume)?;
    if req.lba >= v.size_bytes() / BLOCK_SIZE_U64 {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            format!("lba {} is past the end of volume {:?}", req.lba, req.volume),
        ));
    }
    let store = s.engine.store.clone();
    let r = lazarus_rpc::rt::blocking(move || -> Result<serde_json::Value, ApiError> {
        store.checkpoint()?;
        let page = req.lba / lazarus_types::FANOUT_U64;
        let damaged = v.inject_page_read_error(page)?;
        tracing::warn!(volume = %req.volume, page, "fault injected: reads of the slice page's location fail with EIO");
        Ok(json!({ "volume": req.volume, "page": page, "damaged": damaged }))
    })
    .await
    .map_err(join_err)??;
    Ok(Json(r))
}

async fn metrics(State(s): State<AppState>) -> Response {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        render_metrics(&s.engine),
    )
        .into_response()
}

/// The API's OpenAPI 3 description.
async fn openapi() -> Json<serde_json::Value> {
    fn op(summary: &str) -> serde_json::Value {
        json!({ "summary": summary, "responses": {
            "200": { "description": "OK (JSON)" },
            "4XX": { "description": "Bad request, unknown volume or node, missing token: {\"error\": message}" },
            "5XX": { "description": "Server or cluster error: {\"error\": message}" } } })
    }
    let vol =
        json!([{ "name": "name", "in": "path", "required": true, "schema": { "type": "string" } }]);
    let mut p = serde_json::Map::new();
    p.insert(
        "/metrics".into(),
        json!({ "get": op("Prometheus metrics (text exposition)") }),
    );
    p.insert(
        "/".into(),
        json!({ "get": op("The web dashboard (HTML; polls /api/v1/dashboard)") }),
    );
    p.insert("/api/v1/dashboard".into(), json!({ "get": op("The cluster as this node sees it, with every node's own summary (request totals, resync, repairs, faults, recent events); a node that does not answer is up: false") }));
    p.insert(
        "/api/v1/health".into(),
        json!({ "get": op("Liveness: {ok, node}") }),
    );
    p.insert(
        "/api/v1/status".into(),
        json!({ "get": op("This node: volumes, block store, recovery report, repairs") }),
    );
    p.insert("/api/v1/cluster".into(), json!({ "get": op("Raft state, cluster metadata (nodes, volumes, placement, primaries, epochs, copy states), leases, faults, resync progress") }));
    p.insert("/api/v1/volumes".into(), json!({
        "get": op("Volumes held by this node"),
        "post": { "summary": "Create a volume: {name, size (bytes or \"10GiB\"), replication_factor?}",
                  "requestBody": { "required": true, "content": { "application/json": { "schema": {
                      "type": "object", "required": ["name", "size"],
                      "properties": { "name": { "type": "string" }, "size": { "oneOf": [{ "type": "integer" }, { "type": "string" }] },
                                      "replication_factor": { "type": "integer", "minimum": 1, "maximum": 5 } } } } } },
                  "responses": { "201": { "description": "Created" }, "400": { "description": "Bad name or size" }, "409": { "description": "Exists" } } } }));
    p.insert("/api/v1/volumes/{name}".into(), json!({ "parameters": vol, "get": op("One volume: size, mapping, root, unrecoverable ranges"), "delete": op("Delete the volume (every copy, through the metadata)") }));
    p.insert("/api/v1/volumes/{name}/resize".into(), json!({ "parameters": vol, "post": op("Grow the volume: {size: bytes or \"20GiB\"}; shrinking is refused (400); new NBD connections see the new size") }));
    p.insert("/api/v1/volumes/{name}/locate".into(), json!({ "parameters": vol, "get": op("Where an LBA's slice entry, checksum page and block are on disk (?lba=)") }));
    p.insert("/api/v1/volumes/{name}/repair".into(), json!({ "parameters": vol, "post": op("Repair the volume's damaged pages now, or one (?page=); primary only") }));
    p.insert("/api/v1/volumes/{name}/snapshots".into(), json!({ "parameters": vol,
        "get": op("This node's copy's snapshots: name, export (VOLUME@NAME), creation time, size, mapped blocks, root"),
        "post": op("Take snapshot {name} on every live copy (primary only: 409 elsewhere); answers with the copies that took it") }));
    p.insert("/api/v1/volumes/{name}/snapshots/{snap}/clone".into(), json!({ "parameters": [
        { "name": "name", "in": "path", "required": true, "schema": { "type": "string" } },
        { "name": "snap", "in": "path", "required": true, "schema": { "type": "string" } }],
        "post": { "summary": "Create a volume reading as the snapshot: on the volume's nodes, mapping its blocks, no data copied (on the volume's primary)",
            "requestBody": { "content": { "application/json": { "schema": { "type": "object", "required": ["name"],
                "properties": { "name": { "type": "string" } } } } } },
            "responses": { "201": { "description": "the clone, as each copy reset it" } } } }));
    p.insert("/api/v1/volumes/{name}/revert".into(), json!({ "parameters": vol,
        "post": op("Make the volume read as its snapshot {name} again, atomically on each live copy: where they differ the snapshot's block ids are mapped, no data copied; writes are held off meanwhile (primary only)") }));
    p.insert("/api/v1/volumes/{name}/snapshots/{snap}/diff".into(), json!({ "parameters": [vol[0], { "name": "snap", "in": "path", "required": true, "schema": { "type": "string" } }],
        "get": op("Block runs [first_lba, count] where the snapshot differs from ?since=EARLIER (every mapped run without it), found through the checksum trees") }));
    p.insert("/api/v1/volumes/{name}/snapshots/{snap}/data".into(), json!({ "parameters": [vol[0], { "name": "snap", "in": "path", "required": true, "schema": { "type": "string" } }],
        "get": op("Bytes of the snapshot (?offset=&length=, at most 32 MiB)") }));
    p.insert("/api/v1/volumes/{name}/snapshots/{snap}".into(), json!({ "parameters": [vol[0], { "name": "snap", "in": "path", "required": true, "schema": { "type": "string" } }],
        "delete": op("Delete the snapshot on every copy that answers (primary only); what only it referenced is freed") }));
    p.insert("/api/v1/repairs".into(), json!({ "get": op("Repairs: counters per volume, recent events with their sources, bytes moved") }));
    p.insert(
        "/api/v1/scrub".into(),
        json!({ "get": op("The running or last scrub on this node: phase, pages checked of total, elapsed"),
                "post": op("Scrub this node's pages and blocks now ({volume?}); answers when done") }),
    );
    p.insert(
        "/api/v1/faults".into(),
        json!({ "get": op("Faults injected on this node") }),
    );
    p.insert(
        "/api/v1/faults/drop".into(),
        json!({ "post": op("Fail replication traffic from this node to {to}") }),
    );
    p.insert(
        "/api/v1/faults/stall".into(),
        json!({ "post": op("Hold replication updates from this node to {to} (never sent while the fault lasts): a write applied on the other replicas waits, as when a primary dies mid fan-out") }),
    );
    p.insert(
        "/api/v1/faults/heal".into(),
        json!({ "post": op("Heal {to?}: drops, and (without to) injected device errors") }),
    );
    p.insert("/api/v1/faults/corrupt".into(), json!({ "post": op("Corrupt on disk {volume, lba, target: slice|checksum|block} and drop the cached copy") }));
    p.insert(
        "/api/v1/faults/eio".into(),
        json!({ "post": op("Make reads of the slice page holding {volume, lba} fail with EIO") }),
    );
    p.insert(
        "/api/v1/faults/device".into(),
        json!({ "post": op("{failed: bool}: fail (or heal) this node's device: every block-store I/O errors") }),
    );
    p.insert(
        "/api/v1/faults/metadata".into(),
        json!({ "post": op("{failed: bool}: fail (or heal) every write of this node's cluster-metadata store; Raft stops and the node exits to be restarted") }),
    );
    p.insert(
        "/api/v1/faults/isolate".into(),
        json!({ "post": op("{isolated: bool, recovery_server?: bool}: cut all traffic between this node and the other nodes (not the recovery server); with recovery_server: true, cut only its link to the recovery server") }),
    );
    p.insert(
        "/api/v1/volumes/{name}/protect".into(),
        json!({ "post": op("{protected: bool}: an administrator's jeopardy protection request") }),
    );
    p.insert(
        "/api/v1/nodes".into(),
        json!({ "post": op("{name, rpc}: add a node (lazarus node add): the leader makes it a Raft learner at rpc, a voter once caught up if the cluster wants one (three or five voters); 409 if it is a member") }),
    );
    p.insert(
        "/api/v1/rebalance".into(),
        json!({ "post": op("{cancel?: bool}: move copies, one at a time, from the nodes holding most to those holding fewest until shares differ by at most one, then hand primary roles over until those differ by at most one (a primary's copy moves last, its role handed to a staying copy first); cancel stops after the move under way") }),
    );
    p.insert(
        "/api/v1/volumes/{name}/primary".into(),
        json!({ "post": op("{node: \"nX\"} or {cancel: true}: hand the volume's primary role to nX's copy once it is live and current (lazarus volume primary); connections to the old primary follow the role; 409 if nX holds no copy or is out") }),
    );
    p.insert(
        "/api/v1/nodes/{name}/remove".into(),
        json!({ "post": op("{cancel?: bool}: remove a node (lazarus node remove): its copies are rebuilt elsewhere, its primary roles handed over, then it leaves the Raft group and is forgotten; cancel takes it back in before that") }),
    );
    p.insert(
        "/api/v1/nodes/{name}/replace".into(),
        json!({ "post": op("{with, rpc?}: replace a node (lazarus node replace): removed as by remove, its copies rebuilt on `with` (added first at rpc if given)") }),
    );
    p.insert(
        "/api/v1/jeopardy".into(),
        json!({ "get": op("Per volume: jeopardy, failure count ID, recovery lag, recovery log size, the recovery server's view") }),
    );
    p.insert(
        "/api/v1/events".into(),
        json!({ "get": op("The event timeline (?after=SEQ): faults, state changes, failovers, jeopardy, restores") }),
    );
    p.insert(
        "/api/v1/openapi.json".into(),
        json!({ "get": op("This document") }),
    );
    Json(json!({
        "openapi": "3.0.3",
        "info": { "title": "Lazarus admin API", "version": env!("CARGO_PKG_VERSION"),
                  "description": "Mutating requests (POST, DELETE) need `Authorization: Bearer TOKEN` when the API listens beyond loopback." },
        "paths": p,
    }))
}

/// Largest data transfer of one `data` request (import/export go in pieces).
const DATA_MAX_BYTES: u64 = 32 << 20;

#[derive(Deserialize)]
struct RangeQuery {
    offset: u64,
    #[serde(default)]
    length: Option<u64>,
    /// For `zero`: store the zeroes as blocks rather than leave the range unmapped
    /// (NBD_CMD_FLAG_NO_HOLE).
    #[serde(default)]
    no_hole: bool,
}

fn io_error(e: lazarus_engine::engine::IoError) -> ApiError {
    let code = match e.errno {
        lazarus_nbd::consts::EINVAL => StatusCode::BAD_REQUEST,
        lazarus_nbd::consts::ENOSPC => StatusCode::INSUFFICIENT_STORAGE,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    ApiError(code, e.message)
}

/// Runs an I/O request wherever the volume's primary is (here, or forwarded).
async fn do_io(
    s: &AppState,
    name: &str,
    op: lazarus_engine::forward::Op,
    offset: u64,
    length: u64,
    payload: &[u8],
    no_hole: bool,
) -> Result<Vec<u8>, ApiError> {
    not_being_made(s, name)?;
    let size = match s.engine.store.volume(name) {
        Some(v) => v.size_bytes(),
        None => s
            .cluster
            .as_ref()
            .and_then(|c| c.store.meta().volumes.get(name).map(|v| v.size_bytes))
            .ok_or_else(|| {
                ApiError(
                    StatusCode::NOT_FOUND,
                    format!("volume {name:?} does not exist"),
                )
            })?,
    };
    if offset.checked_add(length).is_none_or(|e| e > size) {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            format!("range {offset}+{length} is past the end of {name:?} ({size} bytes)"),
        ));
    }
    if length > DATA_MAX_BYTES
        && matches!(
            op,
            lazarus_engine::forward::Op::Read | lazarus_engine::forward::Op::Write
        )
    {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            format!("at most {DATA_MAX_BYTES} bytes per request"),
        ));
    }
    // The API has no connection to tie a later flush to the process that acknowledged
    // a write (see nbd_server.rs, `Unflushed`): its writes are durable when answered.
    let req = lazarus_engine::forward::ForwardReq {
        volume: name.to_string(),
        op,
        offset,
        length,
        fua: matches!(
            op,
            lazarus_engine::forward::Op::Write
                | lazarus_engine::forward::Op::Zero
                | lazarus_engine::forward::Op::Trim
        ),
        no_hole,
        fence: None,
        uid: 0,
    };
    match s.engine.route_name(name).await.map_err(io_error)? {
        lazarus_engine::engine::Route::Local => s.engine.execute_local(&req, payload).await,
        lazarus_engine::engine::Route::Forward(_) => {
            s.engine.forward(&req, payload, None, None).await
        }
    }
    .map(|done| done.data)
    .map_err(io_error)
}

/// Mapped extents `[first_lba, count]` (4 KiB blocks): everything else reads as zeroes.
async fn volume_map(
    State(s): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let v = find(&s, &name)?;
    not_being_made(&s, &name)?;
    let ext = lazarus_rpc::rt::blocking(move || v.mapped_extents())
        .await
        .map_err(join_err)?;
    Ok(Json(
        json!({ "volume": name, "block_size": BLOCK_SIZE_U64, "extents": ext }),
    ))
}

async fn read_data(
    State(s): State<AppState>,
    Path(name): Path<String>,
    q: Result<Query<RangeQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = q.map_err(|e| ApiError(StatusCode::BAD_REQUEST, e.body_text()))?;
    let length = q
        .length
        .ok_or_else(|| ApiError(StatusCode::BAD_REQUEST, "length is required".into()))?;
    let data = do_io(
        &s,
        &name,
        lazarus_engine::forward::Op::Read,
        q.offset,
        length,
        &[],
        false,
    )
    .await?;
    Ok(octet_stream(data))
}

async fn write_data(
    State(s): State<AppState>,
    Path(name): Path<String>,
    q: Result<Query<RangeQuery>, axum::extract::rejection::QueryRejection>,
    body: axum::body::Bytes,
) -> Result<StatusCode, ApiError> {
    let Query(q) = q.map_err(|e| ApiError(StatusCode::BAD_REQUEST, e.body_text()))?;
    do_io(
        &s,
        &name,
        lazarus_engine::forward::Op::Write,
        q.offset,
        body.len() as u64,
        &body,
        false,
    )
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn zero_data(
    State(s): State<AppState>,
    Path(name): Path<String>,
    q: Result<Query<RangeQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<StatusCode, ApiError> {
    let Query(q) = q.map_err(|e| ApiError(StatusCode::BAD_REQUEST, e.body_text()))?;
    let length = q
        .length
        .ok_or_else(|| ApiError(StatusCode::BAD_REQUEST, "length is required".into()))?;
    do_io(
        &s,
        &name,
        lazarus_engine::forward::Op::Zero,
        q.offset,
        length,
        &[],
        q.no_hole,
    )
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn flush_data(
    State(s): State<AppState>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    do_io(
        &s,
        &name,
        lazarus_engine::forward::Op::Flush,
        0,
        0,
        &[],
        false,
    )
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Samples the node's state into the gauges (damaged pages, unrecoverable LBAs, leases,
/// jeopardy), then encodes every metric.
/// The exposition text, after sampling the node's current state.
fn render_metrics(engine: &lazarus_engine::engine::Engine) -> String {
    use lazarus_observe::metrics::{vol, METRICS};
    let m = &*METRICS;
    for v in engine.store.volumes() {
        let l = vol(&v.meta.name);
        m.damaged_pages
            .get_or_create(&l)
            .set(v.damaged_pages().len() as i64);
        m.unrecoverable_lbas
            .get_or_create(&l)
            .set(v.damaged_ranges().iter().map(|r| r.1).sum::<u64>() as i64);
        m.volume_size.get_or_create(&l).set(v.size_bytes() as i64);
    }
    if let Some(c) = engine.cluster.get() {
        m.primary_leases.set(c.held_leases().len() as i64);
        let meta = c.store.meta();
        let mut jeopardy = 0;
        for v in meta.volumes.values() {
            let e = c.effective(&v.name).unwrap_or_else(|| v.clone());
            jeopardy += e.recovery_flag as i64;
            if let Some(s) = c.recovery.as_ref().and_then(|r| r.state(&v.name)) {
                m.recovery_log_bytes
                    .get_or_create(&vol(&v.name))
                    .set(s.log_bytes as i64);
            }
        }
        m.jeopardy_volumes.set(jeopardy);
    }
    lazarus_observe::metrics::encode()
}

#[cfg(test)]
mod tests {
    use super::constant_time_eq;

    /// Equal only when equal: whatever the lengths (a longer input that starts with
    /// the secret, lengths 256 or 65,536 apart, an empty one).
    #[test]
    fn token_comparison_for_every_length() {
        let t = b"s3cret-token";
        assert!(constant_time_eq(t, t));
        assert!(!constant_time_eq(b"s3cret-tokeN", t));
        assert!(!constant_time_eq(b"s3cret-token-and-more", t));
        assert!(!constant_time_eq(b"s3cret", t));
        assert!(!constant_time_eq(b"", t));
        for extra in [256usize, 65_536, 1 << 20] {
            let mut long = t.to_vec();
            long.resize(t.len() + extra, 0);
            assert!(!constant_time_eq(&long, t), "{extra} zero bytes more");
            assert!(!constant_time_eq(t, &long), "{extra} zero bytes fewer");
        }
        assert!(constant_time_eq(b"", b""));
    }
}
