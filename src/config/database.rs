//! `queue.database_url`: a PostgreSQL connection string, checked when the
//! configuration is read and never shown with its password.

use std::str::FromStr;

/// A checked PostgreSQL connection string (`queue.database_url`).
#[derive(Clone, Debug)]
pub struct DatabaseUrl {
    config: tokio_postgres::Config,
}

impl DatabaseUrl {
    /// Whether `s` is meant as a PostgreSQL URL rather than a file.
    pub fn is_url(s: &str) -> bool {
        s.starts_with("postgresql://") || s.starts_with("postgres://")
    }

    /// Checks a connection string; the error says what is wrong with it,
    /// without its password.
    pub fn parse(url: &str) -> Result<Self, String> {
        if !Self::is_url(url) {
            return Err(format!(
                "`{}` is not a PostgreSQL URL: write postgresql://USER[:PASSWORD]@HOST[:PORT]/DATABASE",
                Self::redact(url)
            ));
        }
        let config = tokio_postgres::Config::from_str(url)
            .map_err(|e| format!("`{}` is not a valid PostgreSQL URL: {e}", Self::redact(url)))?;
        if config.get_hosts().is_empty() {
            return Err(format!(
                "`{}` names no host: write postgresql://USER@HOST:PORT/DATABASE",
                Self::redact(url)
            ));
        }
        if config.get_ssl_mode() == tokio_postgres::config::SslMode::Require {
            return Err(format!(
                "`{}` asks for TLS (sslmode=require), which this build does not speak: reach the server over a private network or a local TLS tunnel, and use sslmode=disable or prefer",
                Self::redact(url)
            ));
        }
        Ok(DatabaseUrl { config })
    }

    /// The URL with its password (if any) replaced by `***`, for messages.
    pub fn redact(url: &str) -> String {
        let Some((scheme, rest)) = url.split_once("://") else {
            return url.to_string();
        };
        let (auth, tail) = match rest.find('@') {
            Some(at) if !rest[..at].contains('/') => (&rest[..at], &rest[at..]),
            _ => return url.to_string(),
        };
        match auth.split_once(':') {
            Some((user, _)) => format!("{scheme}://{user}:***{tail}"),
            None => url.to_string(),
        }
    }

    /// The client's configuration it makes.
    pub fn into_config(self) -> tokio_postgres::Config {
        self.config
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_checked_and_passwords_never_shown() {
        assert!(DatabaseUrl::parse("postgresql://u@h:5432/db").is_ok());
        assert!(DatabaseUrl::parse("postgres://u:secret@h/db").is_ok());
        let e = DatabaseUrl::parse("mysql://u@h/db").unwrap_err();
        assert!(e.contains("not a PostgreSQL URL"), "{e}");
        let e = DatabaseUrl::parse("postgresql://u:secret@h:notaport/db").unwrap_err();
        assert!(!e.contains("secret"), "{e}");
        let e = DatabaseUrl::parse("postgresql://u@h/db?sslmode=require").unwrap_err();
        assert!(e.contains("TLS"), "{e}");
        assert_eq!(
            DatabaseUrl::redact("postgresql://u:secret@h:5432/db"),
            "postgresql://u:***@h:5432/db"
        );
        assert_eq!(
            DatabaseUrl::redact("postgresql://u@h/db"),
            "postgresql://u@h/db"
        );
    }
}
