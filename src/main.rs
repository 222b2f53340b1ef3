//! The `ferry` command line.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use std::io::Write as _;

use clap::{CommandFactory, Parser, Subcommand};

use ferry::admin;
use ferry::config::{Balance, Config, ConfigErrors};
use ferry::runtime::{Proxy, effective_workers};
use ferry::workers::Workers;

/// The examples at the end of `ferry --help`, and the man page's EXAMPLES.
macro_rules! examples {
    () => {
        "Examples:\n  \
         ferry run --config ferry.toml\n  \
         ferry run --listen :7000 --upstream localhost:6379 --admin 127.0.0.1:9900\n  \
         ferry check --config ferry.toml\n  \
         ferry completions bash > /etc/bash_completion.d/ferry\n  \
         ferry demo"
    };
}
/// The end of `ferry --help` (not `-h`), and the man page's EXIT STATUS.
macro_rules! exit_status {
    () => {
        "Exit status: 0 clean exit, 1 bad config or arguments, 2 runtime failure (e.g. cannot bind)."
    };
}

#[derive(Parser)]
#[command(
    name = "ferry",
    version,
    about = "A layer-4 proxy, reverse proxy and load balancer",
    long_about = "A layer-4 proxy, reverse proxy and load balancer.\n\n\
        ferry serves the listeners and pools of a TOML config file (`ferry run --config \
        FILE`), or one listener and one pool given on the command line (quick mode: `ferry \
        run --listen ADDR --upstream ADDR`). SIGHUP reloads the config; SIGTERM and SIGINT \
        drain: listening sockets close at once and open connections get up to \
        drain_timeout; a second SIGINT exits at once.",
    after_help = examples!(),
    after_long_help = concat!(examples!(), "\n\n", exit_status!())
)]
struct Cli {
    /// Serve this config file (same as `ferry run --config FILE`).
    #[arg(short = 'c', long = "config", value_name = "FILE", global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Serve a config file, or one listener and one pool given on the command line.
    Run {
        /// Quick mode: listen here (repeatable). `:PORT` is every IPv4 address.
        ///
        /// IP:PORT, [IPv6]:PORT, HOST:PORT (every address HOST resolves to at start, e.g.
        /// localhost:7000), or :PORT for every IPv4 address (0.0.0.0:PORT; add
        /// `--listen [::]:PORT` for IPv6 too).
        #[arg(long, value_name = "ADDR", conflicts_with = "config")]
        listen: Vec<String>,
        /// Quick mode: a server of the pool (repeatable), by address or by name.
        ///
        /// IP:PORT, [IPv6]:PORT or NAME:PORT (e.g. db.internal:5432). A name is resolved to
        /// every A/AAAA record and re-resolved every 30s, as a server in a config file is.
        #[arg(long, value_name = "ADDR", requires = "listen")]
        upstream: Vec<String>,
        /// Quick mode: balancing algorithm.
        #[arg(
            long,
            value_name = "ALGO",
            default_value = Balance::NAMES[0],
            value_parser = clap::builder::PossibleValuesParser::new(Balance::NAMES),
            requires = "listen"
        )]
        balance: String,
        /// Quick mode: serve the admin API, stats page and /metrics here.
        ///
        /// IP:PORT, [IPv6]:PORT or HOST:PORT (its first address), e.g. 127.0.0.1:9900. Quick
        /// mode sets no admin token, so keep it on loopback or a trusted network.
        #[arg(long, value_name = "ADDR", requires = "listen")]
        admin: Option<String>,
    },
    /// Validate a config file: a summary and exit 0, or every error and exit 1.
    Check,
    /// Take over from the ferry serving the config file, without refusing a connection.
    ///
    /// Starts a new ferry (this binary, which may be a new version) on the config file,
    /// with the listening sockets of the ferry already serving that file (found through
    /// its control socket); once this one accepts on every listener, the old one stops
    /// accepting and drains its open connections. This one stays in the foreground. If it
    /// fails to start, the old one goes on serving. Under systemd, send SIGUSR2 to the
    /// service instead (`systemctl kill -s USR2 --kill-whom=main ferry`): the running ferry starts its
    /// binary again itself, in the service.
    Upgrade,
    /// Start echo servers on loopback and a proxy in front of them, and say how to try it.
    Demo,
    /// Print the nftables rules the config's transparent listeners need (`nft -f` loads them).
    NftRules,
    /// Print a shell completion script, e.g. `ferry completions bash > /etc/bash_completion.d/ferry`.
    Completions {
        /// The shell the script is for.
        #[arg(value_enum, value_name = "SHELL")]
        shell: clap_complete::Shell,
    },
    /// Print the man page, ferry(1), as roff (`ferry man | man -l -` shows it).
    Man,
}

fn main() -> ExitCode {
    // Sockets systemd passes are taken (and its variables removed from the environment)
    // while the process has one thread.
    ferry::systemd::take_inherited();
    // As is the channel of an upgrade started by SIGUSR2.
    ferry::upgrade::take_env();
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { 1 } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    match cli.command {
        Some(Command::Check) => check(cli.config),
        Some(Command::Upgrade) => upgrade(cli.config),
        Some(Command::Demo) => demo(),
        Some(Command::NftRules) => nft_rules(cli.config),
        Some(Command::Completions { shell }) => {
            let mut out = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "ferry", &mut out);
            print_out(&out)
        }
        Some(Command::Man) => match man_page() {
            Ok(page) => print_out(&page),
            Err(e) => {
                eprintln!("ferry man: {e}");
                ExitCode::from(2)
            }
        },
        Some(Command::Run {
            listen,
            upstream,
            balance,
            admin,
        }) if !listen.is_empty() => quick(&listen, &upstream, &balance, admin.as_deref()),
        Some(Command::Run { .. }) | None => match cli.config {
            Some(path) => match load(&path) {
                Ok(cfg) => serve(cfg, Some(path)),
                Err(code) => code,
            },
            None => {
                eprintln!(
                    "ferry: give a config (`ferry run --config FILE`), quick mode (`ferry run --listen ADDR --upstream ADDR`), or try `ferry demo`; see `ferry --help`"
                );
                ExitCode::from(1)
            }
        },
    }
}

/// Writes `bytes` to stdout; a reader that went away (`ferry man | head`) is no error.
fn print_out(bytes: &[u8]) -> ExitCode {
    let mut out = std::io::stdout().lock();
    match out.write_all(bytes).and_then(|()| out.flush()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ferry: cannot write to stdout: {e}");
            ExitCode::from(2)
        }
    }
}

/// `ferry man`: one page, ferry(1), made from the command-line definitions (so it always
/// matches the binary): the name, synopsis, description and global options, then every
/// command with its own synopsis, description and options, the examples and exit status.
fn man_page() -> std::io::Result<Vec<u8>> {
    use clap_mangen::Man;
    use clap_mangen::roff::{Roff, bold, roman};

    let mut cmd = Cli::command();
    cmd.build();
    let top = Man::new(cmd.clone());
    let mut page = Vec::new();
    top.render_title(&mut page)?;
    let mut body = Vec::new();
    top.render_name_section(&mut body)?;
    top.render_synopsis_section(&mut body)?;
    top.render_description_section(&mut body)?;
    top.render_options_section(&mut body)?;

    let mut commands = Roff::new();
    commands.control("SH", ["COMMANDS"]);
    commands.to_writer(&mut body)?;
    for sub in cmd
        .get_subcommands()
        .filter(|s| !s.is_hide_set() && s.get_name() != "help")
    {
        let name = sub.get_bin_name().unwrap_or(sub.get_name()).to_string();
        let mut heading = Roff::new();
        heading.control("SS", [name.as_str()]);
        heading.to_writer(&mut body)?;
        // `--help` is on every command: the page lists it once, at the top.
        let man = Man::new(sub.clone().mut_arg("help", |a| a.hide(true)));
        // Each part without its own `.SH` heading: they are this command's subsection.
        let mut part = Vec::new();
        man.render_synopsis_section(&mut part)?;
        let mut p = Roff::new();
        p.control("PP", []);
        p.to_writer(&mut part)?;
        man.render_description_section(&mut part)?;
        if sub.get_arguments().any(|a| !a.is_hide_set()) {
            let mut p = Roff::new();
            p.control("PP", []).text([bold("Options:")]);
            p.to_writer(&mut part)?;
            man.render_options_section(&mut part)?;
        }
        let part = String::from_utf8_lossy(&part).into_owned();
        for line in part.lines().filter(|l| !l.starts_with(".SH ")) {
            body.extend_from_slice(line.as_bytes());
            body.push(b'\n');
        }
    }

    let mut end = Roff::new();
    end.control("SH", ["EXAMPLES"]);
    for ex in examples!().lines().skip(1) {
        end.control("PP", []).text([roman(ex.trim())]);
    }
    end.control("SH", ["EXIT STATUS"]);
    end.text([roman(
        exit_status!()
            .strip_prefix("Exit status: ")
            .unwrap_or(exit_status!()),
    )]);
    end.to_writer(&mut body)?;

    // Every part began with roff's apostrophe preamble; the page needs it once, at the top.
    let body = String::from_utf8_lossy(&body).into_owned();
    for line in body
        .lines()
        .filter(|l| !l.starts_with(".ie \\n(.g .ds Aq") && !l.starts_with(".el .ds Aq"))
    {
        page.extend_from_slice(line.as_bytes());
        page.push(b'\n');
    }
    Ok(page)
}

/// Quick mode: each value checked on its own (a bad one is named in a one-line error, exit
/// 1), then the config they stand for (`Config::quick`) served.
fn quick(listen: &[String], upstream: &[String], balance: &str, admin: Option<&str>) -> ExitCode {
    let bad = |flag: &str, e: String| {
        eprintln!("ferry: {flag}: {e}");
        ExitCode::from(1)
    };
    if upstream.is_empty() {
        eprintln!("ferry: quick mode needs at least one --upstream ADDR");
        return ExitCode::from(1);
    }
    let mut addrs = Vec::new();
    for l in listen {
        match ferry::config::quick::listen_addrs(l) {
            Ok(a) => addrs.extend(a),
            Err(e) => return bad("--listen", e),
        }
    }
    for u in upstream {
        if let Err(e) = ferry::config::quick::server(u) {
            return bad("--upstream", e);
        }
    }
    let admin = match admin.map(ferry::config::quick::admin_addr).transpose() {
        Ok(a) => a,
        Err(e) => return bad("--admin", e),
    };
    let balance: Balance = match balance.parse() {
        Ok(b) => b,
        Err(e) => return bad("--balance", format!("{e}")),
    };
    let mut cfg = match Config::quick(&addrs, upstream, admin) {
        Ok(cfg) => cfg,
        Err(ConfigErrors(errs)) => {
            for e in &errs {
                eprintln!("ferry: {e}");
            }
            return ExitCode::from(1);
        }
    };
    cfg.upstreams[0].balance = balance;
    serve(cfg, None)
}

fn load(path: &std::path::Path) -> Result<Config, ExitCode> {
    Config::load(path).map_err(|ConfigErrors(errs)| {
        for e in &errs {
            eprintln!("{e}");
        }
        eprintln!("ferry: {} error(s) in {}", errs.len(), path.display());
        ExitCode::from(1)
    })
}

fn check(path: Option<PathBuf>) -> ExitCode {
    let Some(path) = path else {
        eprintln!("ferry check: --config FILE is required");
        return ExitCode::from(1);
    };
    match load(&path) {
        Ok(cfg) => {
            for w in &cfg.warnings {
                eprintln!("warning: {w}");
            }
            print!("{}", cfg.summary());
            println!("{}: ok", path.display());
            ExitCode::SUCCESS
        }
        Err(code) => code,
    }
}

/// `ferry upgrade`: the config checked, then the sockets of the ferry serving it taken
/// over (unless this process was started by SIGUSR2, which passed them already).
fn upgrade(path: Option<PathBuf>) -> ExitCode {
    let Some(path) = path else {
        eprintln!("ferry upgrade: --config FILE is required");
        return ExitCode::from(1);
    };
    let cfg = match load(&path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    if !ferry::upgrade::pending()
        && let Err(e) = ferry::upgrade::connect(&path)
    {
        eprintln!("ferry upgrade: {e}");
        return ExitCode::from(2);
    }
    serve(cfg, Some(path))
}

fn nft_rules(path: Option<PathBuf>) -> ExitCode {
    let Some(path) = path else {
        eprintln!("ferry nft-rules: --config FILE is required");
        return ExitCode::from(1);
    };
    let cfg = match load(&path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    match ferry::nft::rules(&cfg) {
        Ok(r) => {
            print!("{r}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("ferry nft-rules: {}: {e}", path.display());
            ExitCode::from(1)
        }
    }
}

fn init_logging(level: tracing::Level) {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_max_level(level)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

/// The control plane's runtime (admin server, health checks, DNS, reload, signals), on the
/// main thread; connections run on the worker threads (`ferry::workers`).
fn build_runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
}

/// Runs `cfg` on a new runtime until a signal.
fn serve(cfg: Config, config_path: Option<PathBuf>) -> ExitCode {
    match build_runtime() {
        Ok(rt) => serve_on(rt, cfg, config_path, |_| {}),
        Err(e) => {
            eprintln!("ferry: cannot start the runtime: {e}");
            ExitCode::from(2)
        }
    }
}

/// Runs `cfg` on `rt` until a signal; `banner` is called once the listeners are bound.
fn serve_on(
    rt: tokio::runtime::Runtime,
    cfg: Config,
    config_path: Option<PathBuf>,
    banner: impl FnOnce(&Proxy),
) -> ExitCode {
    init_logging(cfg.log.level);
    match ferry::upgrade::receive() {
        Ok(Some(pid)) => tracing::info!("taking over from pid {pid}"),
        Ok(None) => {}
        Err(e) => {
            tracing::error!("cannot take over: {e}");
            return ExitCode::from(2);
        }
    }
    let workers = match Workers::start(effective_workers(cfg.global.workers)) {
        Ok(w) => Arc::new(w),
        Err(e) => {
            tracing::error!("cannot start the worker threads: {e}");
            return ExitCode::from(2);
        }
    };
    let code = rt.block_on(async {
        let signals = match ferry::runtime::Signals::new() {
            Ok(s) => s,
            Err(e) => {
                tracing::error!("cannot handle signals: {e}");
                return ExitCode::from(2);
            }
        };
        let mut proxy = match Proxy::start(
            &cfg,
            config_path,
            workers.clone(),
            &admin::Server,
            Arc::new(ferry::listener::SystemBinder),
        )
        .await
        {
            Ok(p) => p,
            Err(e) => {
                tracing::error!("{e}");
                return ExitCode::from(2);
            }
        };
        if let Err(e) = proxy.complete_upgrade().await {
            tracing::warn!(
                "the old process did not confirm the hand-over ({e}); serving anyway (it may be serving too)"
            );
        }
        banner(&proxy);
        match proxy.run_until(signals).await {
            Ok(_) => ExitCode::SUCCESS,
            Err(e) => {
                tracing::error!("{e}");
                ExitCode::from(2)
            }
        }
    });
    // Every connection has ended; don't wait for anything else.
    rt.shutdown_background();
    workers.shutdown();
    code
}

fn demo() -> ExitCode {
    let rt = match build_runtime() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("ferry demo: cannot start the runtime: {e}");
            return ExitCode::from(2);
        }
    };
    let servers = match rt.block_on(ferry::demo::start_echo_servers(3)) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("ferry demo: cannot start echo servers: {e}");
            return ExitCode::from(2);
        }
    };
    for (i, s) in servers.iter().enumerate() {
        println!("started echo server echo-{} on {s}", i + 1);
    }
    // Take the well-known demo ports if they are free, else any port.
    let listen = ferry::demo::free_or_ephemeral(ferry::demo::DEMO_ADDR);
    let admin = ferry::demo::free_or_ephemeral(ferry::demo::DEMO_ADMIN_ADDR);
    let cfg = match ferry::demo::config(listen, admin, &servers) {
        Ok(cfg) => cfg,
        Err(e) => {
            eprintln!("ferry demo: {e}");
            return ExitCode::from(2);
        }
    };
    serve_on(rt, cfg, None, |proxy| {
        let addr = proxy.bound[0].1;
        println!("started ferry listener \"demo\" on {addr}, round robin over the echo servers");
        println!();
        println!("Try it (each new connection goes to the next echo server):");
        println!("    nc {} {}", addr.ip(), addr.port());
        println!("Type a line and see which server answers; Ctrl-D closes; run nc again.");
        if let Some(a) = proxy.admin {
            println!("Live stats page: http://{a}/   (metrics: http://{a}/metrics)");
        }
        println!("An access-log line follows for each finished connection. Ctrl-C stops.");
    })
}
