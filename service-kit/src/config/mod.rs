//! The configuration machinery of every service: read a TOML file (or the
//! built-in defaults), lay the environment and flags over it, and check the
//! result, reporting every problem at once with where its value came from.
//!
//! Each service writes its file's structs (`serde`, `deny_unknown_fields`,
//! values the checks look at as [`Spanned`] so their line is known) and one
//! check function that turns them into its typed `Config` through a
//! [`Checker`]. Precedence is defaults < file < environment < command line,
//! applied before checking, so an override is checked like a file value and a
//! problem with it names the variable or flag instead of a line.

mod duration;
mod redis;

pub use duration::{parse_duration, Legacy};
pub use redis::{RedisFile, RedisSettings};
pub use toml::Spanned;

use serde::de::DeserializeOwned;
use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::ops::{Range, RangeInclusive};
use std::path::Path;
use std::time::Duration;

/// Why a configuration could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read at all.
    #[error("{file}: cannot read: {source}")]
    Read {
        /// The file named on the command line.
        file: String,
        /// Why it could not be read.
        source: std::io::Error,
    },
    /// The file is not valid TOML, or has an unknown key or a value of the
    /// wrong type (toml's message carries the line and column).
    #[error("{file}: {message}")]
    Parse {
        /// The file.
        file: String,
        /// toml's message, with line, column and the offending key.
        message: String,
    },
    /// The file parsed but some values are unusable; every one is listed.
    #[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))]
    Invalid(Vec<Problem>),
}

/// One unusable value: where it came from, which key, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The file, or the environment variable / flag that set the value.
    pub origin: String,
    /// 1-based line of the value in the file, when known.
    pub line: Option<usize>,
    /// Dotted key path, e.g. `upstreams.backends.servers`.
    pub key: String,
    /// Lowercase reason carrying the bad value.
    pub reason: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(line) => write!(f, "{}:{}: {}: {}", self.origin, line, self.key, self.reason),
            None => write!(f, "{}: {}: {}", self.origin, self.key, self.reason),
        }
    }
}

/// The text a configuration was parsed from, kept to turn spans into lines.
#[derive(Debug, Clone)]
pub struct Source {
    /// The file's name as given, or `<defaults>`.
    pub name: String,
    /// Its text (empty for the defaults).
    pub text: String,
}

impl Source {
    /// Reads `path`; `None` stands for the built-in defaults (an empty file).
    pub fn read(path: Option<&Path>) -> Result<Source, ConfigError> {
        let Some(path) = path else { return Ok(Source::new("<defaults>", "")) };
        let name = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { file: name.clone(), source })?;
        Ok(Source { name, text })
    }

    /// A source from text in hand; `name` names it in errors.
    pub fn new(name: &str, text: &str) -> Source {
        Source { name: name.to_string(), text: text.to_string() }
    }

    /// The file's structs, or toml's error naming the file, line and key.
    pub fn parse<T: DeserializeOwned>(&self) -> Result<T, ConfigError> {
        toml::from_str(&self.text).map_err(|e| ConfigError::Parse {
            file: self.name.clone(),
            message: e.to_string().trim_end().replace('\n', "\n  "),
        })
    }
}

/// A value that comes from no line of the file (a default or an override).
pub fn unspanned<T>(value: T) -> Spanned<T> {
    Spanned::new(0..0, value)
}

/// Default-value functions for `#[serde(default = "...")]`, each a value from
/// no line of the file: `defaults! { listen -> String = "0.0.0.0:80".into(); }`.
#[macro_export]
macro_rules! defaults {
    ($($name:ident -> $t:ty = $v:expr;)*) => {$(
        fn $name() -> $crate::config::Spanned<$t> {
            let value: $t = $v;
            $crate::config::unspanned(value)
        }
    )*};
}

/// `Default` for file sections whose every field has a serde default: the
/// section as an empty table gives it.
#[macro_export]
macro_rules! default_sections {
    ($($t:ty),* $(,)?) => {$(
        impl Default for $t {
            fn default() -> Self {
                $crate::config::from_empty()
            }
        }
    )*};
}

/// A section parsed from an empty table (its serde defaults).
pub fn from_empty<T: DeserializeOwned>() -> T {
    toml::from_str("").expect("every field of a section has a default")
}

/// The environment as the services read it: a variable's value when set.
pub type Env<'a> = &'a dyn Fn(&str) -> Option<String>;

/// The process environment, for [`Env`].
pub fn process_env(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

/// Collects problems while a service turns its file structs into its
/// `Config`; [`Checker::finish`] hands back the config or every problem.
#[derive(Debug)]
pub struct Checker<'a> {
    source: &'a Source,
    /// Keys whose value an override set, with who set it.
    origins: BTreeMap<String, String>,
    problems: Vec<Problem>,
}

impl<'a> Checker<'a> {
    /// A checker of values parsed from `source`.
    pub fn new(source: &'a Source) -> Self {
        Checker { source, origins: BTreeMap::new(), problems: Vec::new() }
    }

    /// Records that `key`'s value came from `origin` (`environment REDIS_URL`,
    /// `flag --listen`): its problems name that instead of a line.
    pub fn set_by(&mut self, key: &str, origin: impl Into<String>) {
        self.origins.insert(key.to_string(), origin.into());
    }

    /// Lays the environment variable `var`, when set and not blank, over
    /// `slot` (the value of `key`). Returns whether it did.
    pub fn env_override(&mut self, env: Env<'_>, var: &str, key: &str, slot: &mut Spanned<String>) -> bool {
        match env(var).filter(|v| !v.trim().is_empty()) {
            Some(value) => {
                *slot = unspanned(value);
                self.set_by(key, format!("environment {var}"));
                true
            }
            None => false,
        }
    }

    fn line_of(&self, span: Range<usize>) -> Option<usize> {
        if span == (0..0) {
            return None;
        }
        let text = &self.source.text;
        Some(text[..span.start.min(text.len())].matches('\n').count() + 1)
    }

    /// Who set `key`, when an override did (`a.b[2]` counts as `a.b`).
    fn origin_of(&self, key: &str) -> Option<&String> {
        let base = key.split_once('[').map_or(key, |(base, _)| base);
        self.origins.get(key).or_else(|| self.origins.get(base))
    }

    fn push(&mut self, key: &str, span: Range<usize>, reason: String) {
        let (origin, line) = match self.origin_of(key) {
            Some(origin) => (origin.clone(), None),
            None => (self.source.name.clone(), self.line_of(span)),
        };
        self.problems.push(Problem { origin, line, key: key.to_string(), reason });
    }

    /// A problem with `key`, whose value is `at`.
    pub fn problem<T>(&mut self, key: &str, at: &Spanned<T>, reason: impl Into<String>) {
        self.push(key, at.span(), reason.into());
    }

    /// A problem with `key` that no one value carries (a missing section).
    pub fn problem_without_line(&mut self, key: &str, reason: impl Into<String>) {
        self.push(key, 0..0, reason.into());
    }

    /// A duration in the one format (`500ms`, `10s`, `5m`, `1h`, `0`).
    pub fn duration(&mut self, key: &str, value: &Spanned<String>) -> Duration {
        self.duration_in(key, value, None, Duration::ZERO..=Duration::MAX)
    }

    /// A duration that must be above zero.
    pub fn positive_duration(&mut self, key: &str, value: &Spanned<String>) -> Duration {
        self.duration_in(key, value, None, Duration::from_nanos(1)..=Duration::MAX)
    }

    /// A duration within `range`, written in the one format under `key` or,
    /// the old way, as an integer under `<key>_ms` / `<key>_secs` (`old`).
    /// A problem names the key the file used.
    pub fn duration_in(
        &mut self,
        key: &str,
        value: &Spanned<String>,
        old: Option<(Legacy, &Spanned<u64>)>,
        range: RangeInclusive<Duration>,
    ) -> Duration {
        let (d, key, span) = match old {
            None => match parse_duration(value.get_ref()) {
                Ok(d) => (d, key.to_string(), value.span()),
                Err(reason) => {
                    self.problem(key, value, reason);
                    return Duration::ZERO;
                }
            },
            Some((legacy, old)) => {
                let old_key = format!("{key}{}", legacy.suffix());
                if value.span() != (0..0) {
                    self.problem(key, value, format!("is set twice: here and as {old_key}; keep one"));
                }
                (legacy.duration(*old.get_ref()), old_key, old.span())
            }
        };
        if !range.contains(&d) {
            let reason = if d.is_zero() && range.start().as_nanos() == 1 {
                "must be greater than zero".to_string()
            } else if *range.end() == Duration::MAX {
                format!("{d:?} is below the minimum of {:?}", range.start())
            } else {
                format!("{d:?} is not between {:?} and {:?}", range.start(), range.end())
            };
            self.push(&key, span, reason);
        }
        d
    }

    /// [`Checker::duration_in`] above zero, with its old `_ms` spelling.
    pub fn positive_ms(&mut self, key: &str, value: &Spanned<String>, old: &Option<Spanned<u64>>) -> Duration {
        self.duration_in(key, value, Legacy::Millis.of(old), Duration::from_nanos(1)..=Duration::MAX)
    }

    /// An `ip:port` address.
    pub fn socket_addr(&mut self, key: &str, value: &Spanned<String>) -> SocketAddr {
        match value.get_ref().trim().parse::<SocketAddr>() {
            Ok(addr) => addr,
            Err(_) => {
                self.problem(key, value, format!("{:?} is not an ip:port address", value.get_ref()));
                SocketAddr::from(([0, 0, 0, 0], 0))
            }
        }
    }

    /// A value that `rule` accepts (`Err` carries the reason).
    pub fn valid<T>(&mut self, key: &str, value: &Spanned<T>, rule: impl FnOnce(&T) -> Result<(), String>) {
        if let Err(reason) = rule(value.get_ref()) {
            self.problem(key, value, reason);
        }
    }

    /// A URL with one of `schemes` (`redis://`, ...).
    pub fn url_with_scheme(&mut self, key: &str, value: &Spanned<String>, schemes: &[&str]) {
        if !schemes.iter().any(|s| value.get_ref().starts_with(s)) {
            self.problem(key, value, format!("{:?} must start with {}", value.get_ref(), schemes.join(", ")));
        }
    }

    /// A number at least `min`.
    pub fn at_least<T: PartialOrd + Copy + fmt::Display>(&mut self, key: &str, value: &Spanned<T>, min: T) -> T {
        let v = *value.get_ref();
        if v < min {
            self.problem(key, value, format!("{v} is below the minimum of {min}"));
        }
        v
    }

    /// A number within `min..=max`.
    pub fn within<T: PartialOrd + Copy + fmt::Display>(&mut self, key: &str, value: &Spanned<T>, min: T, max: T) -> T {
        let v = *value.get_ref();
        if !(v >= min && v <= max) {
            self.problem(key, value, format!("{v} is not between {min} and {max}"));
        }
        v
    }

    /// The built config when no problem was found, else every problem.
    pub fn finish<C>(self, config: C) -> Result<C, ConfigError> {
        if self.problems.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError::Invalid(self.problems))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct File {
        #[serde(default = "default_addr")]
        addr: Spanned<String>,
        #[serde(default = "default_wait")]
        wait: Spanned<String>,
        #[serde(default)]
        wait_ms: Option<Spanned<u64>>,
        #[serde(default = "default_count")]
        count: Spanned<usize>,
    }
    fn default_addr() -> Spanned<String> {
        unspanned("127.0.0.1:1".into())
    }
    fn default_wait() -> Spanned<String> {
        unspanned("1s".into())
    }
    fn default_count() -> Spanned<usize> {
        unspanned(1)
    }

    fn check(text: &str, env: Env<'_>) -> Result<(SocketAddr, Duration, usize), ConfigError> {
        let source = Source::new("f.toml", text);
        let mut f: File = source.parse()?;
        let mut c = Checker::new(&source);
        c.env_override(env, "ADDR", "addr", &mut f.addr);
        let addr = c.socket_addr("addr", &f.addr);
        let wait = c.positive_ms("wait", &f.wait, &f.wait_ms);
        let count = c.within("count", &f.count, 1, 10);
        c.finish((addr, wait, count))
    }

    fn problems(text: &str, env: Env<'_>) -> Vec<String> {
        match check(text, env) {
            Err(ConfigError::Invalid(p)) => p.iter().map(ToString::to_string).collect(),
            other => panic!("expected problems, got {other:?}"),
        }
    }

    fn no_env(_: &str) -> Option<String> {
        None
    }

    #[test]
    fn every_problem_is_named_with_file_line_and_key() {
        let p = problems("addr = \"x\"\nwait = \"3 days\"\ncount = 0\n", &no_env);
        assert_eq!(p.len(), 3, "{p:?}");
        assert!(p[0].starts_with("f.toml:1: addr: "), "{p:?}");
        assert!(p[1].starts_with("f.toml:2: wait: "), "{p:?}");
        assert_eq!(p[2], "f.toml:3: count: 0 is not between 1 and 10");
    }

    #[test]
    fn an_override_is_checked_and_named_by_its_origin() {
        let env = |k: &str| (k == "ADDR").then(|| "nope".to_string());
        assert_eq!(problems("", &env), ["environment ADDR: addr: \"nope\" is not an ip:port address"]);
        let env = |k: &str| (k == "ADDR").then(|| "127.0.0.1:9".to_string());
        assert_eq!(check("addr = \"x\"\n", &env).unwrap().0.port(), 9);
    }

    #[test]
    fn the_old_spelling_of_a_duration_still_works_but_not_both() {
        assert_eq!(check("wait_ms = 1500\n", &no_env).unwrap().1, Duration::from_millis(1500));
        assert_eq!(check("wait = \"2s\"\n", &no_env).unwrap().1, Duration::from_secs(2));
        assert_eq!(check("", &no_env).unwrap().1, Duration::from_secs(1));
        let p = problems("wait = \"2s\"\nwait_ms = 1500\n", &no_env);
        assert!(p[0].starts_with("f.toml:1: wait: is set twice"), "{p:?}");
        assert_eq!(problems("wait_ms = 0\n", &no_env), ["f.toml:1: wait_ms: must be greater than zero"]);
        // A bare number under the new key has no unit: refused, not guessed.
        let err = check("wait = 3\n", &no_env).unwrap_err().to_string();
        assert!(err.contains("f.toml") && err.contains("wait"), "{err}");
    }

    #[test]
    fn an_unknown_key_names_file_line_and_key() {
        let err = check("\nwaitt = \"1s\"\n", &no_env).unwrap_err().to_string();
        assert!(err.contains("f.toml") && err.contains("line 2") && err.contains("waitt"), "{err}");
    }
}
