//! Secrets: passwords read from a URL, the environment or a file.
//!
//! Invariant: a [`Secret`] never prints its value. `Debug` and `Display` show
//! `<redacted>`, so a secret that ends up in a log line, an error message or a
//! `status` report by accident leaks nothing; the one way to read it is
//! [`Secret::expose`], called only where the value goes on the wire.

use std::path::Path;

/// A password or key that must never be logged.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The value, for the one place that sends it to a server.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Reads a secret from a file (a Kubernetes or Docker secret, a vault agent's
    /// output): the whole file, without its trailing line break.
    ///
    /// The error names the file, never its content.
    pub fn from_file(path: &Path) -> Result<Self, std::io::Error> {
        let text = std::fs::read_to_string(path)?;
        Ok(Self(text.trim_end_matches(['\n', '\r']).to_string()))
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

impl std::fmt::Display for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_and_display_never_show_the_value() {
        let secret = Secret::new("hunter2");
        assert_eq!(format!("{secret}"), "<redacted>");
        assert_eq!(format!("{secret:?}"), "<redacted>");
        assert_eq!(format!("{:?}", Some(secret.clone())), "Some(<redacted>)");
        assert_eq!(secret.expose(), "hunter2");
    }

    #[test]
    fn a_file_secret_loses_its_trailing_line_break_only() {
        let path = std::env::temp_dir().join(format!("outbox-relay-secret-{}", std::process::id()));
        std::fs::write(&path, " pa ss\n").unwrap();
        assert_eq!(Secret::from_file(&path).unwrap().expose(), " pa ss");
        std::fs::remove_file(&path).unwrap();
    }
}
