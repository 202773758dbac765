//! Fetching one secret from its source: a file, an environment variable, a command's stdout, an
//! OAuth2 token endpoint (whose client id and secret are read first, each from its own source),
//! or a token minted with a GitHub App or Google service-account key (read first, unaltered).

use std::io::ErrorKind;
use std::process::Stdio;

use crate::config::{AwsBase, CommandSpec, SourceSpec};
use crate::credentials::local::{read_key_material, read_plain, with_jwt_expiry};
use crate::credentials::value::{parse_value, Fetched, SourceError};
use crate::credentials::{aws, github_app, google, oauth};
use crate::secret::Secret;
use crate::upstream::Upstream;

/// Fetches the current value of `source`. `upstream` reaches token endpoints over the same
/// verified TLS (and `resolve:` pins) as upstream APIs.
pub async fn fetch(source: &SourceSpec, upstream: &Upstream) -> Result<Fetched, SourceError> {
    let fetched = match source {
        SourceSpec::File { .. } | SourceSpec::Env { .. } => {
            return read_local(source).unwrap_or(Err(SourceError::Empty))
        }
        SourceSpec::Command(spec) => run_command(spec).await?,
        SourceSpec::OAuth2(spec) => {
            // Boxed: the client id and secret are sources too, and may in principle be anything.
            let client_id = Box::pin(fetch(&spec.client_id, upstream)).await?;
            let client_secret = Box::pin(fetch(&spec.client_secret, upstream)).await?;
            let client = oauth::Client {
                id: &client_id.secret,
                secret: &client_secret.secret,
            };
            let mut fetched = oauth::fetch_token(spec, client, upstream).await?;
            fetched.inputs = Some(client_fingerprint(&client_id.secret, &client_secret.secret));
            fetched
        }
        SourceSpec::GithubApp(spec) => {
            let key = read_key_material(&spec.private_key)?;
            let mut fetched = github_app::mint(spec, &key, upstream).await?.fetched;
            fetched.inputs = Some(key.fingerprint());
            fetched
        }
        SourceSpec::GoogleServiceAccount(spec) => {
            let key = read_key_material(&spec.key)?;
            let mut fetched = google::fetch_token(spec, &key, upstream).await?;
            fetched.inputs = Some(key.fingerprint());
            fetched
        }
        // Read through the credential's watch (`credentials::fetch_for`), which keeps its
        // session; a bare fetch has none to offer.
        SourceSpec::Vault(_) | SourceSpec::SecretsManager(_) => {
            return Err(SourceError::StoreResponse)
        }
        SourceSpec::Aws(spec) => {
            let caller = aws::Caller {
                agent: "",
                task: "",
            };
            // STS keys say when they expire; the JWT rule below must not read a session token.
            return aws::fetch(spec, caller, upstream).await;
        }
    };
    Ok(with_jwt_expiry(fetched))
}

/// The fingerprint of the local inputs a token source obtains its token with, as read now; `None`
/// for other sources or when an input cannot be read (the caller then fetches anyway).
pub fn inputs_fingerprint(source: &SourceSpec) -> Option<String> {
    match source {
        SourceSpec::OAuth2(spec) => {
            let id = read_local(&spec.client_id)?.ok()?;
            let secret = read_local(&spec.client_secret)?.ok()?;
            Some(client_fingerprint(&id.secret, &secret.secret))
        }
        SourceSpec::GithubApp(spec) => {
            Some(read_key_material(&spec.private_key).ok()?.fingerprint())
        }
        SourceSpec::GoogleServiceAccount(spec) => {
            Some(read_key_material(&spec.key).ok()?.fingerprint())
        }
        SourceSpec::Aws(spec) => match &spec.base {
            AwsBase::Static { .. } => Some(aws::static_keys(spec)?.ok()?.secret.fingerprint()),
            AwsBase::WebIdentity { token, .. } => {
                Some(read_local(token)?.ok()?.secret.fingerprint())
            }
        },
        _ => None,
    }
}

/// One fingerprint of an OAuth2 client's id and secret together.
fn client_fingerprint(id: &Secret, secret: &Secret) -> String {
    Secret::new(format!("{}\0{}", id.expose(), secret.expose())).fingerprint()
}

/// Reads a source that needs no network or process without waiting on anything: a file, an
/// environment variable, static AWS keys (`None` for the others).
pub fn read_local(source: &SourceSpec) -> Option<Result<Fetched, SourceError>> {
    match source {
        SourceSpec::Aws(spec) if !source.is_remote() => aws::static_keys(spec),
        _ => read_plain(source),
    }
}

/// Runs the command (no shell) and reads its stdout. Its stderr is counted, never logged: a
/// failing credential helper may print the secret it was handling.
async fn run_command(spec: &CommandSpec) -> Result<Fetched, SourceError> {
    let (program, args) = spec
        .argv
        .split_first()
        .ok_or(SourceError::CommandSpawn(ErrorKind::InvalidInput))?;
    let child = tokio::process::Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| SourceError::CommandSpawn(e.kind()))?;
    let output = tokio::time::timeout(spec.timeout, child.wait_with_output())
        .await
        .map_err(|_| SourceError::CommandTimeout)?
        .map_err(|e| SourceError::CommandSpawn(e.kind()))?;
    if !output.status.success() {
        return Err(SourceError::CommandFailed {
            status: output.status.to_string(),
            stderr_bytes: output.stderr.len(),
        });
    }
    let stdout = String::from_utf8(output.stdout).map_err(|_| SourceError::NotUtf8)?;
    parse_value(&stdout, spec.format)
}
