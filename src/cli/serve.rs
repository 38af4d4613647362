//! `longlink serve`, `dispatcher`, `echo-backend`: running a node and its
//! side programs.

use crate::*;

pub(crate) fn echo_backend(listen: SocketAddr) -> anyhow::Result<ExitCode> {
    let backend = longlink::echo::EchoBackend::start(listen).with_context(|| format!("listening on {listen}"))?;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(sig, stop.clone()).context("installing signal handlers")?;
    }
    println!("listening {}", backend.addr());
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(100));
    }
    let stats = backend.stats();
    emit(json!({
        "requests": stats.requests,
        "events": stats.events.len(),
        "event_batches": stats.event_batches,
        "connections": stats.connections,
    }));
    Ok(ExitCode::SUCCESS)
}

pub(crate) fn serve(
    config: Option<PathBuf>,
    shards: Option<u16>,
    listen: Option<SocketAddr>,
    redis: Option<String>,
) -> anyhow::Result<ExitCode> {
    let mut cfg = Config::load(config.as_deref())?;
    // The command line's settings win over the file, on every reload too.
    let overrides = move |cfg: &mut Config| {
        if let Some(n) = shards {
            cfg.server.shards = n;
        }
        if let Some(addr) = listen {
            cfg.server.client_listen = addr;
        }
        if let Some(url) = &redis {
            cfg.delivery.redis_url = url.clone();
            cfg.cluster.enabled = true;
        }
    };
    overrides(&mut cfg);
    cfg.validate()?;
    if !cfg.server.log_level.is_empty() {
        crate::set_log_level(&cfg.server.log_level).map_err(|e| anyhow::anyhow!("server.log_level: {e}"))?;
    }
    match cfg.keyring()?.1 {
        KeySource::Configured => {}
        KeySource::DevKey { path, created } => tracing::warn!(
            path = %path.display(),
            created,
            "no auth keys configured: using the dev signing key (fine for trying longlink, not for production)"
        ),
    }
    // Hook: a process started by an in-place upgrade takes over its
    // predecessor's listeners and sessions, and confirms once it serves.
    let mut inherited = longlink::upgrade::receive(&cfg).context("taking over from the old process")?;
    let server = match Server::start_with(&cfg, inherited.as_mut()) {
        Ok(server) => server,
        Err(err) => {
            if let Some(inherited) = inherited {
                inherited.fail(&err.to_string());
            }
            return Err(err.into());
        }
    };
    if let Some(inherited) = inherited {
        inherited.confirm();
    }
    let reloader = server.reloader();
    if let Some(path) = config {
        reloader.set_source(longlink::reload::file_source(path, overrides));
    }
    reloader.set_log(Box::new(crate::set_log_level));
    // SIGHUP re-reads the config (as POST /reload); the signal thread runs it.
    let hup = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGHUP, hup.clone()).context("installing signal handlers")?;
    let stop = server.stop_flag();
    let lease = server.cluster().map(|c| c.router.state().clone());
    // SIGTERM drains (a cluster node sends clients to the other nodes, a
    // single node lets them reconnect through its load balancer); a second
    // SIGTERM, or SIGINT, stops at once.
    signal_hook::flag::register(signal_hook::consts::SIGINT, stop.clone()).context("installing signal handlers")?;
    let term = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = term.clone();
    // SAFETY: the handler only does an atomic add (async-signal-safe).
    unsafe {
        signal_hook::low_level::register(signal_hook::consts::SIGTERM, move || {
            counter.fetch_add(1, Ordering::Relaxed);
        })
    }
    .context("installing signal handlers")?;
    // SIGUSR2: in-place upgrade (the nginx convention).
    let usr2 = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGUSR2, usr2.clone()).context("installing signal handlers")?;
    {
        let (drain, stop, upgrade) = (server.drainer(), stop.clone(), server.upgrader());
        std::thread::Builder::new().name("longlink-signals".into()).spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                if usr2.swap(false, Ordering::Relaxed) {
                    upgrade();
                }
                if hup.swap(false, Ordering::Relaxed) {
                    // The outcome is logged by the reloader.
                    let _ = reloader.reload();
                }
                match term.load(Ordering::Relaxed) {
                    0 => {}
                    1 => drain(),
                    _ => {
                        tracing::warn!("second SIGTERM: stopping now");
                        stop.store(true, Ordering::Relaxed);
                    }
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        })?;
    }
    // Print the address on stdout so scripts (and tests) can read it. (A
    // process started by an upgrade inherits a stdout whose reader may be
    // gone: a failed write is no reason to stop serving.)
    let say = |line: String| {
        use std::io::Write;
        let _ = writeln!(std::io::stdout(), "{line}");
    };
    say(format!("listening {}", server.client_addr()));
    say(format!("push {}", server.push_addr()));
    say(format!("admin {}", server.admin_addr()));
    if let Some(node) = server.node_addr() {
        say(format!("node {node}"));
    }
    notify_systemd(&format!("READY=1\nMAINPID={}", std::process::id()));
    server.join();
    if lease.is_some_and(|l| l.is_fenced()) {
        // Not a clean exit: the node gave up its place in the cluster.
        tracing::error!("longlink stopped: lease lost (fenced); exit status {FENCED_EXIT}");
        return Ok(ExitCode::from(FENCED_EXIT));
    }
    tracing::info!(stopped = stop.load(Ordering::Relaxed), "longlink stopped");
    Ok(ExitCode::SUCCESS)
}

/// Tells systemd (`Type=notify`, deploy/systemd/longlink.service) that the
/// node serves and which process is the main one: after an in-place
/// upgrade the new process says so itself. Does nothing outside systemd.
fn notify_systemd(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else { return };
    let sent = std::os::unix::net::UnixDatagram::unbound().and_then(|socket| {
        use std::os::unix::ffi::OsStrExt;
        match path.as_bytes().strip_prefix(b"@") {
            Some(name) => {
                use std::os::linux::net::SocketAddrExt;
                let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
                socket.send_to_addr(state.as_bytes(), &addr)
            }
            None => socket.send_to(state.as_bytes(), &path),
        }
    });
    if let Err(e) = sent {
        tracing::warn!(error = %e, "cannot notify systemd (NOTIFY_SOCKET)");
    }
}

/// Exit status of a cluster node that stopped because it lost its lease.
pub(crate) const FENCED_EXIT: u8 = 3;

pub(crate) fn dispatcher(redis: String, listen: SocketAddr, config: Option<PathBuf>) -> anyhow::Result<ExitCode> {
    use longlink::http::dispatch_auth::{DispatchAuth, ReplayStore};
    use longlink::http::dispatcher::{CachedNodes, DispatchConfig, Dispatcher};
    let mut cfg = Config::load(config.as_deref())?;
    cfg.delivery.redis_url = redis;
    cfg.validate()?;
    // Its tokens must verify on the nodes: a dev key of its own would mint
    // tokens every node refuses (with a terminal code).
    if cfg.auth.keys.is_empty() && !cfg.data_dir.join(token::DEV_KEY_FILE).exists() {
        bail!(
            "the dispatcher needs the token keys the nodes use: give --config with the nodes' [auth] keys \
             (or run it where the nodes' data_dir holds their dev key); it never makes a key of its own"
        );
    }
    let (keyring, _) = cfg.keyring()?;
    let timeout = Duration::from_millis(cfg.delivery.redis_timeout_ms);
    let mut link =
        longlink::sidecar::redis_link::RedisLink::new("dispatcher", &cfg.delivery.redis_url, timeout, timeout, vec![]);
    let prefix = cfg.delivery.redis_prefix.clone();
    let nodes =
        CachedNodes::start(Duration::from_millis(250), move || longlink::router::read_nodes(&mut link, &prefix).ok())?;
    let replay = ReplayStore::redis(&cfg.delivery.redis_url, &cfg.delivery.redis_prefix, timeout);
    let auth = DispatchAuth::new(&cfg.dispatch, replay)?;
    if !auth.required() {
        tracing::warn!("no [dispatch] hook_url or ticket_keys: answering endpoints only, never a token");
    }
    let dispatcher =
        std::sync::Arc::new(Dispatcher::new(DispatchConfig::from_config(&cfg), keyring, nodes).with_auth(auth));
    let handler = move |req: &longlink::http::Request| -> longlink::http::Reply {
        match req.path.as_str() {
            "/v1/dispatch" => dispatcher.dispatch(req, token::now_unix_secs()),
            "/healthz" => longlink::http::Response::json(200, &json!({"status": "ok"})).into(),
            _ => longlink::http::Response::json(404, &json!({"error": "not found"})).into(),
        }
    };
    let listener = std::net::TcpListener::bind(listen).with_context(|| format!("listening on {listen}"))?;
    let server = longlink::http::HttpServer::serve_with(listener, cfg.http.limits(), std::sync::Arc::new(handler))
        .with_context(|| format!("serving on {listen}"))?;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(sig, stop.clone()).context("installing signal handlers")?;
    }
    println!("dispatcher {}", server.addr());
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(100));
    }
    server.stop();
    Ok(ExitCode::SUCCESS)
}
