//! The `keystamp` command: `run` serves, `check` validates a config. Sets up logging and maps
//! failures to exit codes; everything else lives in the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use keystamp::App;
use keystamp::Config;
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(
    name = "keystamp",
    version,
    about = "A sidecar proxy that stamps fresh credentials onto agents' API calls"
)]
struct Cli {
    /// Log format on standard error.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Json,
    Text,
}

#[derive(Subcommand)]
enum Command {
    /// Serve as the agents' HTTPS_PROXY / HTTP_PROXY.
    Run {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Validate a config and print what it defines (never a secret value).
    Check {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// The pod's netfilter rules that send every outbound connection through keystamp.
    Netfilter {
        #[command(subcommand)]
        action: NetfilterAction,
    },
}

#[derive(Subcommand)]
enum NetfilterAction {
    /// Install the rules for the config's `transparent:` section, then exit (an init container).
    Apply {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Print keystamp's rules as installed.
    Show,
    /// Remove keystamp's rules.
    Remove,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    match cli.command {
        Command::Check { config } => check(&config),
        Command::Run { config } => run(&config),
        Command::Netfilter { action } => netfilter(action),
    }
}

fn netfilter(action: NetfilterAction) -> ExitCode {
    let done = match action {
        NetfilterAction::Apply { config } => {
            let config = match load(&config) {
                Ok(config) => config,
                Err(code) => return code,
            };
            keystamp::apply_netfilter(config.transparent.as_ref()).map(|rules| print!("{rules}"))
        }
        NetfilterAction::Show => keystamp::show_netfilter().map(|rules| print!("{rules}")),
        NetfilterAction::Remove => keystamp::remove_netfilter(),
    };
    match done {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("keystamp netfilter: {error}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(format: LogFormat) {
    let mut filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // notify traces every inotify event; when the log file sits in a watched directory (a pod's
    // config dir), each line written would be another event: cap it unless asked for by name.
    let notify_named = std::env::var("RUST_LOG").is_ok_and(|v| v.contains("notify"));
    if !notify_named {
        if let Ok(directive) = "notify=info".parse() {
            filter = filter.add_directive(directive);
        }
    }
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

fn load(path: &std::path::Path) -> Result<Config, ExitCode> {
    Config::load(path).map_err(|error| {
        for line in error.errors() {
            eprintln!("{line}");
        }
        ExitCode::from(1)
    })
}

fn check(path: &std::path::Path) -> ExitCode {
    let config = match load(path) {
        Ok(config) => config,
        Err(code) => return code,
    };
    // Written at once, and a reader that stops early (`keystamp check | head`) is no error.
    let report = check_report(path, &config).unwrap_or_default();
    let _ = std::io::Write::write_all(&mut std::io::stdout().lock(), report.as_bytes());
    ExitCode::SUCCESS
}

/// What `keystamp check` prints for a valid config: listeners, routes with each agent's
/// credential, credential kinds and identities.
fn check_report(path: &std::path::Path, config: &Config) -> Result<String, std::fmt::Error> {
    use std::fmt::Write as _;
    let mut out = String::new();
    writeln!(out, "{}: ok", path.display())?;
    writeln!(
        out,
        "listen {}  admin {}  unmatched {}",
        config.listen,
        config.admin.map_or("off".to_string(), |a| a.to_string()),
        config.unmatched
    )?;
    writeln!(out, "routes ({}):", config.routes.len())?;
    for route in &config.routes {
        let methods = route.methods.as_ref().map_or("*".to_string(), |m| {
            m.iter().map(|m| m.as_str()).collect::<Vec<_>>().join(",")
        });
        writeln!(
            out,
            "  {:<32} {:<16} {:<10} -> {} ({})",
            route.host.to_string(),
            route.path_prefix.as_deref().unwrap_or("/"),
            methods,
            route.credential.as_deref().unwrap_or("(agents' own)"),
            route.inject.kind()
        )?;
        // Which credential each agent uses on this route.
        for (agent, scope) in route.agents.iter().flatten() {
            let credential = scope.credential.as_ref().or(route.credential.as_ref());
            let inject = scope.inject.as_ref().unwrap_or(&route.inject).kind();
            writeln!(
                out,
                "      agent {agent:<24} -> {} ({inject})",
                credential.map_or("-", String::as_str)
            )?;
        }
    }
    writeln!(out, "credentials ({}):", config.credentials.len())?;
    for (name, spec) in &config.credentials {
        writeln!(out, "  {name:<24} {}", spec.source.kind())?;
    }
    if !config.identities.is_empty() {
        let required = if config.require_identity {
            ", required"
        } else {
            ""
        };
        writeln!(out, "identities ({}{required}):", config.identities.len())?;
        for (name, identity) in &config.identities {
            writeln!(out, "  {name:<24} {}", identity.source.kind())?;
        }
    }
    Ok(out)
}

fn run(path: &std::path::Path) -> ExitCode {
    let config = match load(path) {
        Ok(config) => config,
        Err(code) => return code,
    };
    let runtime = match App::runtime(&config) {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("keystamp: cannot start the runtime: {error}");
            return ExitCode::from(1);
        }
    };
    runtime.block_on(async move {
        let app = match App::start(config).await {
            Ok(app) => app,
            Err(error) => {
                tracing::error!("start-up failed: {error:#}");
                return ExitCode::from(1);
            }
        };
        wait_for_stop_signal(&app).await;
        tracing::info!("stop signal received; draining");
        app.shutdown().await;
        ExitCode::SUCCESS
    })
}

/// Waits for SIGTERM or SIGINT; SIGHUP reloads the config and every credential meanwhile.
async fn wait_for_stop_signal(app: &keystamp::RunningApp) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut terminate), Ok(mut interrupt), Ok(mut hangup)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::hangup()),
    ) else {
        tracing::error!("cannot install signal handlers; stopping");
        return;
    };
    loop {
        tokio::select! {
            _ = terminate.recv() => return,
            _ = interrupt.recv() => return,
            _ = hangup.recv() => {
                tracing::info!("SIGHUP: reloading");
                app.reload();
            }
        }
    }
}
