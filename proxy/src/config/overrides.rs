//! Values from the environment and the command line that replace the file's.

/// Values that replace the file's; each remembers who set it, for errors.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// Replaces `listen.public`.
    pub listen: Option<(String, String)>,
    /// Replaces `listen.status`.
    pub status_listen: Option<(String, String)>,
    /// Replaces `upstreams.backends.servers` (comma-separated `host:port`).
    pub backends: Option<(String, String)>,
}

impl Overrides {
    /// Reads `PROXY_LISTEN`, `PROXY_STATUS_LISTEN` and `PROXY_BACKENDS`.
    pub fn from_env() -> Self {
        let var = |name: &str| {
            std::env::var(name).ok().filter(|v| !v.trim().is_empty()).map(|v| (v, format!("environment {name}")))
        };
        Self { listen: var("PROXY_LISTEN"), status_listen: var("PROXY_STATUS_LISTEN"), backends: var("PROXY_BACKENDS") }
    }

    /// Layers `other` on top of `self` (other wins where set).
    pub fn then(self, other: Overrides) -> Overrides {
        Overrides {
            listen: other.listen.or(self.listen),
            status_listen: other.status_listen.or(self.status_listen),
            backends: other.backends.or(self.backends),
        }
    }
}
