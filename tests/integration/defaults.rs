//! The defaults in docs/config.md are the parser's: for every key whose documented default
//! is a value (not "none", "required", …), a config that sets the key to that value
//! parses to exactly the config that leaves it out. And quick mode (`ferry run --listen
//! … --upstream …`) is the config file's defaults.

use std::path::Path;

use ferry::config::{Config, parse_str};

const DOC: &str = include_str!("../../docs/config.md");

/// The minimal config each section's key is added to; `@` marks where the key goes.
fn template(section: &str) -> Option<&'static str> {
    Some(match section {
        "## `[global]`" => {
            "[global]\n@\n\n[[listener]]\nname = \"l\"\nlisten = \"127.0.0.1:1\"\nupstream = \"u\"\n\n[[upstream]]\nname = \"u\"\nservers = [\"127.0.0.1:2\"]\n"
        }
        "## `[log]`" => {
            "[log]\n@\n\n[[listener]]\nname = \"l\"\nlisten = \"127.0.0.1:1\"\nupstream = \"u\"\n\n[[upstream]]\nname = \"u\"\nservers = [\"127.0.0.1:2\"]\n"
        }
        "## `[[listener]]`" => {
            "[[listener]]\nname = \"l\"\nlisten = \"127.0.0.1:1\"\nupstream = \"u\"\n@\n\n[[upstream]]\nname = \"u\"\nservers = [\"127.0.0.1:2\"]\n"
        }
        "### UDP listeners (`protocol = \"udp\"`)" => {
            "[[listener]]\nname = \"l\"\nprotocol = \"udp\"\nlisten = \"127.0.0.1:1\"\nupstream = \"u\"\n@\n\n[[upstream]]\nname = \"u\"\nservers = [\"127.0.0.1:2\"]\n"
        }
        "## `[[upstream]]`" => {
            "[[listener]]\nname = \"l\"\nlisten = \"127.0.0.1:1\"\nupstream = \"u\"\n\n[[upstream]]\nname = \"u\"\nservers = [\"127.0.0.1:2\"]\n@\n"
        }
        "### `[upstream.health]`" => {
            "[[listener]]\nname = \"l\"\nlisten = \"127.0.0.1:1\"\nupstream = \"u\"\n\n[[upstream]]\nname = \"u\"\nservers = [\"127.0.0.1:2\"]\n\n[upstream.health]\n@\n"
        }
        _ => return None,
    })
}

/// A documented default that is a TOML value: `"…"`, a number, a boolean, or an inline
/// table. Anything else ("none", "required", "see …") is not.
fn value(cell: &str) -> Option<&str> {
    let v = cell.trim().trim_matches('`');
    let literal = (v.starts_with('"') && v.ends_with('"'))
        || (v.starts_with('{') && v.ends_with('}'))
        || v == "true"
        || v == "false"
        || (!v.is_empty() && v.chars().all(|c| c.is_ascii_digit()));
    literal.then_some(v)
}

fn parse(text: &str) -> Config {
    parse_str(text, "defaults.toml", Path::new("."))
        .unwrap_or_else(|e| panic!("{e}\n--- config:\n{text}"))
}

#[test]
fn documented_defaults_are_the_parsers() {
    let mut section = "";
    let mut checked = Vec::new();
    for line in DOC.lines() {
        if line.starts_with('#') {
            section = line;
            continue;
        }
        let Some(tpl) = template(section) else {
            continue;
        };
        let cells: Vec<&str> = line.split(" | ").collect();
        if !line.starts_with("| `") || cells.len() < 3 {
            continue;
        }
        let key = cells[0].trim_start_matches("| ").trim_matches('`');
        let Some(default) = value(cells[1]) else {
            continue;
        };
        let without = parse(&tpl.replace("@\n", ""));
        let with = parse(&tpl.replace('@', &format!("{key} = {default}")));
        assert_eq!(
            format!("{without:?}"),
            format!("{with:?}"),
            "{section}: `{key}` is documented to default to {default}"
        );
        checked.push(format!("{section} {key}"));
    }
    // The tables were found: a reworded heading must not turn this test into a no-op.
    for section in [
        "[global]",
        "[log]",
        "[[listener]]",
        "[[upstream]]",
        "[upstream.health]",
        "UDP listeners",
    ] {
        assert!(
            checked.iter().any(|c| c.contains(section)),
            "no documented default checked in {section}: {checked:?}"
        );
    }
    assert!(checked.len() >= 20, "{checked:?}");
}

#[test]
fn quick_mode_is_the_config_files_defaults() {
    let listen: Vec<std::net::SocketAddr> = vec!["127.0.0.1:7000".parse().unwrap()];
    let servers: Vec<String> = vec!["127.0.0.1:6379".into(), "[::1]:6380".into()];
    let quick = Config::quick(&listen, &servers, None).unwrap();
    let file = parse(
        "[[listener]]\nname = \"quick\"\nlisten = \"127.0.0.1:7000\"\nupstream = \"quick\"\n\n\
         [[upstream]]\nname = \"quick\"\nservers = [\"127.0.0.1:6379\", \"[::1]:6380\"]\n",
    );
    assert_eq!(format!("{quick:?}"), format!("{file:?}"));
}
