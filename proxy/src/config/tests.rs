use super::*;

fn problems(text: &str) -> Vec<Problem> {
    match parse("t.toml", text, &Overrides::default()) {
        Err(ConfigError::Invalid(p)) => p,
        other => panic!("expected problems, got {other:?}"),
    }
}

/// The least a file must say: where to send requests.
const SERVERS: &str = "[upstreams.backends]\nservers = [\"127.0.0.1:3000\"]\n";

#[test]
fn an_empty_or_cut_off_file_is_an_error() {
    for text in ["", "\n# nothing\n", "[server]\nthreads = 2\n", "[upstreams.backends]\nservers = [\"127.0.0.1:30"] {
        assert!(parse("t.toml", text, &Overrides::default()).is_err(), "{text:?}");
    }
    assert_eq!(problems("")[0].key, "upstreams");
    // The servers may come from the environment or a flag instead.
    let overrides =
        Overrides { backends: Some(("127.0.0.1:3000".into(), "flag --backends".into())), ..Default::default() };
    assert!(parse("t.toml", "", &overrides).is_ok());
}

#[test]
fn a_file_naming_only_its_servers_gets_defaults() {
    let c = parse("t.toml", SERVERS, &Overrides::default()).unwrap();
    assert_eq!(c.listen.public, "0.0.0.0:8080".parse().unwrap());
    assert_eq!(c.listen.status, "127.0.0.1:8090".parse().unwrap());
    assert_eq!(c.route("/api/chat"), Some("backends"));
    assert_eq!(c.route("/ws/chat"), Some("backends"));
    assert_eq!(c.route("/"), Some("backends"));
    assert_eq!(c.sticky, StickyKey::Ip);
}

#[test]
fn unknown_key_is_rejected_with_line() {
    let err = parse("t.toml", "[listen]\npublik = \"1.2.3.4:5\"\n", &Overrides::default()).unwrap_err().to_string();
    assert!(err.contains("t.toml"), "{err}");
    assert!(err.contains("line 2"), "{err}");
    assert!(err.contains("publik"), "{err}");
}

#[test]
fn every_bad_value_is_reported_with_key_and_line() {
    let p = problems(
        "[listen]\npublic = \"nope\"\n[upstreams.backends]\nservers = []\n[websocket]\nidle_timeout = \"3 days\"\n",
    );
    let keys: Vec<_> = p.iter().map(|p| (p.key.as_str(), p.line)).collect();
    assert!(keys.contains(&("listen.public", Some(2))), "{keys:?}");
    assert!(keys.contains(&("upstreams.backends.servers", Some(4))), "{keys:?}");
    assert!(keys.contains(&("websocket.idle_timeout", Some(6))), "{keys:?}");
}

#[test]
fn runtime_and_buffer_settings_are_read_and_bounded() {
    let c = parse("t.toml", SERVERS, &Overrides::default()).unwrap();
    assert!(c.server.work_stealing && c.server.fast_path);
    assert_eq!((c.client.read_buffer, c.client.write_buffer), (65536, 16384));

    let text = format!(
        "[server]\nwork_stealing = false\nfast_path = false\n[client]\nread_buffer = 0\nwrite_buffer = 1024\n{SERVERS}"
    );
    let c = parse("t.toml", &text, &Overrides::default()).unwrap();
    assert!(!c.server.work_stealing && !c.server.fast_path);
    assert_eq!((c.client.read_buffer, c.client.write_buffer), (0, 1024));

    let p = problems(&format!("[client]\nread_buffer = 1048577\nwrite_buffer = 99999999999\n{SERVERS}"));
    let keys: Vec<_> = p.iter().map(|p| (p.key.as_str(), p.line)).collect();
    assert_eq!(keys, [("client.read_buffer", Some(2)), ("client.write_buffer", Some(3))], "{p:?}");
}

#[test]
fn bad_server_address_is_rejected() {
    let p = problems("[upstreams.backends]\nservers = [\"a:1\", \"300.1.1.1:80\", \"b\"]\n");
    assert_eq!(p.len(), 2, "{p:?}");
    assert_eq!(p[0].key, "upstreams.backends.servers[1]");
    assert_eq!(p[1].key, "upstreams.backends.servers[2]");
}

#[test]
fn route_to_unknown_group_is_rejected() {
    let p = problems(&format!("{SERVERS}[[routes]]\nprefix = \"/x/\"\nupstream = \"nobody\"\n"));
    assert_eq!(p[0].key, "routes[0].upstream");
    assert_eq!(p[0].line, Some(5));
}

#[test]
fn overrides_win_over_the_file_and_name_their_origin() {
    let o = Overrides {
        listen: Some(("127.0.0.1:9999".into(), "environment PROXY_LISTEN".into())),
        backends: Some(("10.0.0.1:1, 10.0.0.2:2".into(), "environment PROXY_BACKENDS".into())),
        ..Default::default()
    };
    let c = parse("t.toml", "[listen]\npublic = \"0.0.0.0:1\"\n", &o).unwrap();
    assert_eq!(c.listen.public.port(), 9999);
    assert_eq!(c.upstreams[0].servers, vec!["10.0.0.1:1", "10.0.0.2:2"]);
    let bad =
        Overrides { status_listen: Some(("x".into(), "environment PROXY_STATUS_LISTEN".into())), ..Default::default() };
    match parse("t.toml", "", &bad) {
        Err(ConfigError::Invalid(p)) => assert_eq!(p[0].origin, "environment PROXY_STATUS_LISTEN"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn longest_prefix_wins() {
    let c = parse(
        "t.toml",
        "[upstreams.a]\nservers=[\"h:1\"]\n[upstreams.b]\nservers=[\"h:2\"]\n[[routes]]\nprefix=\"/\"\nupstream=\"a\"\n[[routes]]\nprefix=\"/api/\"\nupstream=\"b\"\n",
        &Overrides::default(),
    )
    .unwrap();
    assert_eq!(c.route("/api/x"), Some("b"));
    assert_eq!(c.route("/other"), Some("a"));
}

#[test]
fn unrouted_path_has_no_group() {
    let c = parse(
        "t.toml",
        &format!("{SERVERS}[[routes]]\nprefix=\"/api/\"\nupstream=\"backends\"\n"),
        &Overrides::default(),
    )
    .unwrap();
    assert_eq!(c.route("/elsewhere"), None);
}

#[test]
fn shipped_config_file_is_valid() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../conf/proxy.toml");
    load(&path, &Overrides::default()).unwrap();
}

#[test]
fn worker_processes_default_to_one_and_are_bounded() {
    let c = parse("t.toml", SERVERS, &Overrides::default()).unwrap();
    assert_eq!((c.server.processes, c.server.threads), (1, 2));
    let c =
        parse("t.toml", &format!("[server]\nprocesses = 4\nthreads = 1\n{SERVERS}"), &Overrides::default()).unwrap();
    assert_eq!((c.server.processes, c.server.threads), (4, 1));
    for bad in ["0", "65"] {
        let p = problems(&format!("[server]\nprocesses = {bad}\n{SERVERS}"));
        let keys: Vec<_> = p.iter().map(|p| (p.key.as_str(), p.line)).collect();
        assert_eq!(keys, [("server.processes", Some(2))], "{p:?}");
    }
}
