//! What every binary's `Config` and `main` share: duration flags, listener checks, the
//! termination signal and the descriptor limit.

use std::net::SocketAddr;
use std::time::Duration;

/// `1h`, `30s`, `500ms`, `2m`; a bare number is seconds. For clap `value_parser`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a duration like 500ms, 5s, 2m or 1h"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "" | "s" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        "h" => Ok(Duration::from_secs(n * 3600)),
        _ => Err(format!("`{s}`: unknown unit `{unit}` (use ms, s, m or h)")),
    }
}

/// Serialize a `Duration` as `1500ms` (for `Config: Serialize` and `/config_dump`):
/// `#[serde(with = "registry::cli::duration_ms")]`.
pub mod duration_ms {
    use std::time::Duration;
    pub fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&format_args!("{}ms", d.as_millis()))
    }
}

/// An `Option<Duration>` as `1500ms` or null.
pub mod opt_duration_ms {
    use std::time::Duration;
    pub fn serialize<S: serde::Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => super::duration_ms::serialize(d, s),
            None => s.serialize_none(),
        }
    }
}

/// Report every pair of listener flags that share an address (port 0 excepted).
pub fn check_distinct_listeners(listeners: &[(&str, SocketAddr)], errors: &mut Vec<String>) {
    for (i, (a, x)) in listeners.iter().enumerate() {
        for (b, y) in &listeners[i + 1..] {
            if x == y && x.port() != 0 {
                errors.push(format!("{a} and {b} are both {x}"));
            }
        }
    }
}

/// SIGTERM (what Kubernetes sends) or Ctrl-C. Install it before starting anything: a SIGTERM
/// that arrives before the handler exists kills the process instead of draining it.
pub struct TerminationSignal {
    #[cfg(unix)]
    term: tokio::signal::unix::Signal,
}

impl TerminationSignal {
    pub fn install() -> std::io::Result<TerminationSignal> {
        Ok(TerminationSignal {
            #[cfg(unix)]
            term: tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?,
        })
    }

    /// Wait for the signal.
    pub async fn recv(&mut self) {
        #[cfg(unix)]
        tokio::select! {
            _ = self.term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("5"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert!(parse_duration("5 parsecs").is_err());
        assert!(parse_duration("ms").is_err());
    }

    #[test]
    fn listeners_must_differ() {
        let a: SocketAddr = "127.0.0.1:15000".parse().unwrap();
        let zero: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let mut errors = Vec::new();
        check_distinct_listeners(
            &[("--a", a), ("--b", zero), ("--c", zero), ("--d", a)],
            &mut errors,
        );
        assert_eq!(errors, ["--a and --d are both 127.0.0.1:15000"]);
    }
}
