//! `fnx token create|list|revoke`: tokens in the daemon's store, written directly (run it on
//! the daemon's host as the service account; SQLite serialises it with a running daemon).

use crate::client::OutputMode;
use crate::daemon_cmd::load;
use crate::{EXIT_OK, EXIT_TASK_FAILED, EXIT_USAGE};
use clap::{Args, Subcommand};
use fnx_daemon::config::UsersMode;
use std::path::PathBuf;

/// `fnx token ...`.
#[derive(Subcommand, Debug)]
pub enum TokenCommand {
    /// Create a user (if new) and a token for it; prints the token once (only its hash is kept).
    /// With `[users] mode = "unix"` the user must be a Unix account that may run tasks (not
    /// root, not the service account, uid ≥ users.min_uid), unless --admin.
    Create(CreateArgs),
    /// List tokens: id, user, admin, created, expiry and whether revoked (never the tokens).
    List(ListArgs),
    /// Revoke a token by its id (see `list`); a running daemon refuses it within a second,
    /// long-polls already open included.
    Revoke(RevokeArgs),
}

/// Where the store is.
#[derive(Args, Debug)]
pub struct StoreArgs {
    /// The daemon's site configuration (for its data directory and users mode).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// The daemon's data directory (default: from --config, else $FNX_HOME).
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Output format.
    #[arg(long, value_enum, default_value = "text")]
    pub output: OutputMode,
}

/// `fnx token create`.
#[derive(Args, Debug)]
pub struct CreateArgs {
    /// The user.
    #[arg(long)]
    pub user: String,
    /// Make the user an admin (sees everyone's tasks, manages tokens and blocks).
    #[arg(long)]
    pub admin: bool,
    /// The token stops working after this long: seconds, or a number with s, m, h or d
    /// (e.g. 30d). Default: until revoked.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub expires: Option<f64>,
    #[command(flatten)]
    pub store: StoreArgs,
}

/// `fnx token list`.
#[derive(Args, Debug)]
pub struct ListArgs {
    /// Only this user's tokens.
    #[arg(long)]
    pub user: Option<String>,
    #[command(flatten)]
    pub store: StoreArgs,
}

/// `fnx token revoke`.
#[derive(Args, Debug)]
pub struct RevokeArgs {
    /// The token's id (from `fnx token list`).
    pub id: i64,
    #[command(flatten)]
    pub store: StoreArgs,
}

/// `30d`, `12h`, `90m`, `3600s` or `3600` → seconds.
fn parse_duration(text: &str) -> Result<f64, String> {
    let t = text.trim();
    let (num, unit) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => (&t[..i], c),
        _ => (t, 's'),
    };
    let scale = match unit {
        's' => 1.0,
        'm' => 60.0,
        'h' => 3600.0,
        'd' => 86400.0,
        _ => return Err(format!("{text:?}: the unit must be s, m, h or d")),
    };
    match num.parse::<f64>() {
        Ok(n) if n.is_finite() && n > 0.0 && n * scale <= 100.0 * 365.0 * 86400.0 => Ok(n * scale),
        _ => Err(format!(
            "{text:?} is not a duration above 0 of at most 100 years (e.g. 3600, 90m, 12h, 30d)"
        )),
    }
}

/// The data directory, and the site config when one was named.
fn store_dir(a: &StoreArgs, what: &str) -> Result<(PathBuf, fnx_daemon::config::SiteConfig), u8> {
    match load(a.config.as_ref()) {
        Ok(c) => Ok((a.data_dir.clone().unwrap_or_else(|| c.data_dir.clone()), c)),
        Err(e) => {
            eprintln!("fnx token {what}: {e}");
            Err(EXIT_USAGE)
        }
    }
}

/// `fnx token`.
pub fn token(cmd: TokenCommand) -> u8 {
    match cmd {
        TokenCommand::Create(a) => create(a),
        TokenCommand::List(a) => list(a),
        TokenCommand::Revoke(a) => revoke(a),
    }
}

fn create(a: CreateArgs) -> u8 {
    let (dir, cfg) = match store_dir(&a.store, "create") {
        Ok(x) => x,
        Err(code) => return code,
    };
    if a.user.is_empty() || a.user.chars().any(|c| c.is_whitespace() || c.is_control()) {
        eprintln!("fnx token create: --user must be a name without spaces");
        return EXIT_USAGE;
    }
    if cfg.users.mode == UsersMode::Unix && !a.admin {
        let ids = fnx_daemon::identity::Identities::new(&cfg.users);
        if let Err(r) = ids.account(&a.user) {
            eprintln!("fnx token create: users.mode is \"unix\" and {r}");
            return EXIT_USAGE;
        }
    }
    let expires = a.expires.map(|s| fnx_daemon::store::now() + s);
    match fnx_daemon::service::create_token(&dir, &a.user, a.admin, expires) {
        Ok((id, t)) => {
            match a.store.output {
                OutputMode::Json => println!(
                    "{}",
                    serde_json::json!({"id": id, "user": a.user, "admin": a.admin,
                                       "expires": expires, "token": t})
                ),
                OutputMode::Text => println!("{t}"),
            }
            EXIT_OK
        }
        Err(e) => {
            eprintln!("fnx token create: {e}");
            EXIT_TASK_FAILED
        }
    }
}

fn list(a: ListArgs) -> u8 {
    let (dir, _) = match store_dir(&a.store, "list") {
        Ok(x) => x,
        Err(code) => return code,
    };
    let tokens = match fnx_daemon::service::list_tokens(&dir, a.user.as_deref()) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("fnx token list: {e}");
            return EXIT_TASK_FAILED;
        }
    };
    match a.store.output {
        OutputMode::Json => println!("{}", serde_json::json!({ "tokens": tokens })),
        OutputMode::Text => {
            println!(
                "{:>5}  {:<16} {:<5}  {:<8}  EXPIRES",
                "ID", "USER", "ADMIN", "STATE"
            );
            let now = fnx_daemon::store::now();
            for t in tokens {
                let state = match (t.revoked, t.live) {
                    (Some(_), _) => "revoked",
                    (None, true) => "live",
                    (None, false) => "expired",
                };
                let expires = match t.expires {
                    None => "never".to_string(),
                    Some(e) if e > now => format!("in {:.1} h", (e - now) / 3600.0),
                    Some(e) => format!("{:.1} h ago", (now - e) / 3600.0),
                };
                println!(
                    "{:>5}  {:<16} {:<5}  {:<8}  {expires}",
                    t.id,
                    t.user,
                    if t.admin { "yes" } else { "no" },
                    state
                );
            }
        }
    }
    EXIT_OK
}

fn revoke(a: RevokeArgs) -> u8 {
    let (dir, _) = match store_dir(&a.store, "revoke") {
        Ok(x) => x,
        Err(code) => return code,
    };
    match fnx_daemon::service::revoke_token(&dir, a.id) {
        Ok(Some(user)) => {
            match a.store.output {
                OutputMode::Json => {
                    println!(
                        "{}",
                        serde_json::json!({"id": a.id, "user": user, "revoked": true})
                    )
                }
                OutputMode::Text => println!("revoked token {} of {user}", a.id),
            }
            EXIT_OK
        }
        Ok(None) => {
            eprintln!("fnx token revoke: no token {} (see fnx token list)", a.id);
            EXIT_TASK_FAILED
        }
        Err(e) => {
            eprintln!("fnx token revoke: {e}");
            EXIT_TASK_FAILED
        }
    }
}

#[cfg(test)]
mod tests {
    use super::parse_duration;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30d"), Ok(30.0 * 86400.0));
        assert_eq!(parse_duration("90m"), Ok(5400.0));
        assert_eq!(parse_duration("3600"), Ok(3600.0));
        assert_eq!(parse_duration("1.5h"), Ok(5400.0));
        for bad in ["", "0", "-1d", "1y", "inf", "nan", "1e300", "d"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }
}
