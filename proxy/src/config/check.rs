//! Turns the file's structs, with the overrides laid over them, into the
//! checked [`Config`], collecting every problem on the way.

use std::net::SocketAddr;
use std::path::PathBuf;

use service_kit::config::{unspanned, Checker, ConfigError, Source, Spanned};

use super::file::{default_upstreams, FileConfig, FileUpstream, DEFAULT_GROUP};
use super::{
    ClientSettings, Config, HealthConfig, Listeners, Overrides, Route, ServerSettings, TlsListener, UpstreamConfig,
};
use crate::sticky::{Cidr, StickyKey};

/// Largest connection buffer accepted.
const MAX_BUFFER: usize = 1 << 20;

/// The lean path reads heads of up to 16 KiB itself: a smaller limit would
/// have to be checked there too.
const MIN_HEADER_BYTES: usize = 16 * 1024;

/// Parses `source`, lays `overrides` over it and checks every value.
pub(super) fn check(source: &Source, overrides: &Overrides) -> Result<Config, ConfigError> {
    let mut raw: FileConfig = source.parse()?;
    let mut c = Checker::new(source);
    // Overrides replace file values before checking, so they are checked alike.
    if let Some((v, origin)) = &overrides.listen {
        raw.listen.public = unspanned(v.clone());
        c.set_by("listen.public", origin);
    }
    if let Some((v, origin)) = &overrides.status_listen {
        raw.listen.status = unspanned(v.clone());
        c.set_by("listen.status", origin);
    }
    if let Some((v, origin)) = &overrides.backends {
        let servers: Vec<_> =
            v.split(',').map(str::trim).filter(|s| !s.is_empty()).map(|x| unspanned(x.to_string())).collect();
        match raw.upstreams.get_mut(DEFAULT_GROUP) {
            Some(group) => group.servers = unspanned(servers),
            None => {
                let mut group = default_upstreams().remove(DEFAULT_GROUP).expect("default group");
                group.servers = unspanned(servers);
                raw.upstreams.insert(DEFAULT_GROUP.to_string(), group);
            }
        }
        c.set_by(&format!("upstreams.{DEFAULT_GROUP}.servers"), origin);
    }

    let server = ServerSettings {
        processes: c.within("server.processes", &raw.server.processes, 1, 64),
        threads: c.at_least("server.threads", &raw.server.threads, 1),
        work_stealing: raw.server.work_stealing,
        fast_path: raw.server.fast_path,
        max_retries: raw.server.max_retries,
        grace_period: c.duration("server.grace_period", &raw.server.grace_period),
        shutdown_timeout: c.duration("server.shutdown_timeout", &raw.server.shutdown_timeout),
        upstream_keepalive_pool: raw.server.upstream_keepalive_pool,
        pid_file: raw.server.pid_file,
        upgrade_sock: raw.server.upgrade_sock,
    };

    let tls = raw.listen.tls.as_ref().map(|tls| TlsListener {
        addr: c.socket_addr("listen.tls.addr", &tls.addr),
        cert: existing_file(&mut c, "listen.tls.cert", &tls.cert),
        key: existing_file(&mut c, "listen.tls.key", &tls.key),
    });
    let listen = Listeners {
        public: c.socket_addr("listen.public", &raw.listen.public),
        status: c.socket_addr("listen.status", &raw.listen.status),
        tls,
    };

    let mut cidrs = |key: &str, list: &[Spanned<String>]| {
        let mut nets = Vec::new();
        for (i, cidr) in list.iter().enumerate() {
            match cidr.get_ref().parse::<Cidr>() {
                Ok(net) => nets.push(net),
                Err(reason) => c.problem(&format!("{key}[{i}]"), cidr, reason),
            }
        }
        nets
    };
    let trusted_proxies = cidrs("client.trusted_proxies", &raw.client.trusted_proxies);
    let proxy_protocol_from = cidrs("client.proxy_protocol_from", &raw.client.proxy_protocol_from);
    let header_bytes = &raw.client.max_header_bytes;
    if !(MIN_HEADER_BYTES..=1 << 20).contains(header_bytes.get_ref()) {
        let why = format!("must be between {MIN_HEADER_BYTES} and {} bytes", 1 << 20);
        c.problem("client.max_header_bytes", header_bytes, why);
    }
    for (key, value) in
        [("client.read_buffer", &raw.client.read_buffer), ("client.write_buffer", &raw.client.write_buffer)]
    {
        if *value.get_ref() > MAX_BUFFER {
            c.problem(key, value, format!("must be at most {MAX_BUFFER} bytes"));
        }
    }
    let client = ClientSettings {
        trusted_proxies,
        proxy_protocol_from,
        header_timeout: c.positive_duration("client.header_timeout", &raw.client.header_timeout),
        body_timeout: c.positive_duration("client.body_timeout", &raw.client.body_timeout),
        keepalive_timeout: c.duration("client.keepalive_timeout", &raw.client.keepalive_timeout),
        max_body_bytes: raw.client.max_body_bytes,
        max_header_bytes: *raw.client.max_header_bytes.get_ref(),
        max_connections: c.at_least("client.max_connections", &raw.client.max_connections, 1),
        requests_per_second: raw.client.requests_per_second,
        read_buffer: *raw.client.read_buffer.get_ref(),
        write_buffer: *raw.client.write_buffer.get_ref(),
    };

    let sticky = match raw.sticky.key.get_ref().parse::<StickyKey>() {
        Ok(k) => k,
        Err(reason) => {
            c.problem("sticky.key", &raw.sticky.key, reason);
            StickyKey::Ip
        }
    };
    let websocket_idle_timeout = c.positive_duration("websocket.idle_timeout", &raw.websocket.idle_timeout);
    let websocket_relays = c.within("websocket.relays", &raw.websocket.relays, 0, 64);

    let mut upstreams = Vec::new();
    for (name, group) in &raw.upstreams {
        upstreams.push(upstream(&mut c, name, group));
    }
    if raw.upstreams.is_empty() {
        c.problem_without_line(
            "upstreams",
            "no upstream servers: the file defines no [upstreams] group (is it empty or cut off?) \
             and neither PROXY_BACKENDS nor --backends names any",
        );
    }

    let mut routes = Vec::new();
    for (i, route) in raw.routes.iter().enumerate() {
        let prefix = route.prefix.get_ref();
        if !prefix.starts_with('/') {
            c.problem(&format!("routes[{i}].prefix"), &route.prefix, format!("{prefix:?} must start with '/'"));
        }
        if !raw.upstreams.contains_key(route.upstream.get_ref()) {
            c.problem(
                &format!("routes[{i}].upstream"),
                &route.upstream,
                format!("{:?} is not a group under [upstreams]", route.upstream.get_ref()),
            );
        }
        routes.push(Route { prefix: prefix.clone(), upstream: route.upstream.get_ref().clone() });
    }
    // Longest prefix first, so the first match is the most specific.
    routes.sort_by_key(|r| std::cmp::Reverse(r.prefix.len()));

    c.finish(Config { server, listen, client, sticky, websocket_idle_timeout, websocket_relays, upstreams, routes })
}

fn existing_file(c: &mut Checker<'_>, key: &str, value: &Spanned<String>) -> PathBuf {
    let path = PathBuf::from(value.get_ref());
    if !path.is_file() {
        c.problem(key, value, format!("{:?} is not a readable file", value.get_ref()));
    }
    path
}

fn upstream(c: &mut Checker<'_>, name: &str, raw: &FileUpstream) -> UpstreamConfig {
    let key = |k: &str| format!("upstreams.{name}.{k}");
    let mut servers = Vec::new();
    if raw.servers.get_ref().is_empty() {
        c.problem(&key("servers"), &raw.servers, "is empty: a group needs at least one server");
    }
    for (i, server) in raw.servers.get_ref().iter().enumerate() {
        match check_server(server.get_ref()) {
            Ok(()) => servers.push(server.get_ref().trim().to_string()),
            Err(reason) => c.problem(&format!("{}[{i}]", key("servers")), server, reason),
        }
    }
    let health = &raw.health;
    if !health.path.get_ref().starts_with('/') {
        c.problem(&key("health.path"), &health.path, format!("{:?} must start with '/'", health.path.get_ref()));
    }
    UpstreamConfig {
        name: name.to_string(),
        servers,
        connect_timeout: c.positive_duration(&key("connect_timeout"), &raw.connect_timeout),
        read_timeout: c.positive_duration(&key("read_timeout"), &raw.read_timeout),
        max_fails: raw.max_fails,
        fail_timeout: c.positive_duration(&key("fail_timeout"), &raw.fail_timeout),
        resolve_interval: c.positive_duration(&key("resolve_interval"), &raw.resolve_interval),
        health: HealthConfig {
            path: health.path.get_ref().clone(),
            interval: c.positive_duration(&key("health.interval"), &health.interval),
            timeout: c.positive_duration(&key("health.timeout"), &health.timeout),
            rise: c.at_least(&key("health.rise"), &health.rise, 1),
            fall: c.at_least(&key("health.fall"), &health.fall, 1),
        },
    }
}

/// Checks `host:port` syntax; names are resolved later, at discovery.
fn check_server(server: &str) -> Result<(), String> {
    let server = server.trim();
    if server.parse::<SocketAddr>().is_ok() {
        return Ok(());
    }
    let Some((host, port)) = server.rsplit_once(':') else {
        return Err(format!("{server:?} is not a host:port address"));
    };
    match port.parse::<u16>() {
        Ok(p) if p > 0 => {}
        _ => return Err(format!("{server:?} has a bad port {port:?}")),
    }
    let valid_host = !host.is_empty()
        && host.len() <= 253
        && host.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.' || c == '_')
        && !host.starts_with(['-', '.']);
    // A host of digits and dots that did not parse as an address is a bad IP.
    let looks_numeric = host.chars().all(|c| c.is_ascii_digit() || c == '.');
    if !valid_host || looks_numeric {
        return Err(format!("{server:?} has a bad host {host:?}"));
    }
    Ok(())
}
