//! Prometheus metrics, read at scrape time from the live counters. Every metric name is
//! declared here, once; the registry adds the `ferry_` prefix, and counters get `_total`.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

use crate::observe::Outcome;
use crate::runtime::Shared;
use crate::upstream::ServerState;

use super::Stats;

/// The two text formats `/metrics` speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// The Prometheus text format 0.0.4: what a browser, `curl` and every
    /// Prometheus-compatible scraper read.
    Prometheus,
    /// OpenMetrics 1.0, for scrapers that ask for it.
    OpenMetrics,
}

impl Format {
    /// OpenMetrics when `accept` (a request's `Accept`) lists it, else Prometheus text.
    pub fn negotiate(accept: Option<&str>) -> Format {
        let wants_om = accept.is_some_and(|a| {
            a.split(',').any(|item| {
                let mut parts = item.split(';');
                let media = parts.next().unwrap_or("").trim();
                // `q=0` means "not this one".
                let refused = parts.any(|p| {
                    p.trim()
                        .strip_prefix("q=")
                        .and_then(|q| q.trim().parse::<f32>().ok())
                        .is_some_and(|q| q <= 0.0)
                });
                media.eq_ignore_ascii_case("application/openmetrics-text") && !refused
            })
        });
        if wants_om {
            Format::OpenMetrics
        } else {
            Format::Prometheus
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Format::Prometheus => "text/plain; version=0.0.4; charset=utf-8",
            Format::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
        }
    }
}

/// The metrics, in `format`; `admin`: the admin server's connection counters.
pub fn render(shared: &Arc<Shared>, admin: &Arc<Stats>, format: Format) -> String {
    let om = render_openmetrics(shared, admin, shared.access_log_dropped());
    match format {
        Format::OpenMetrics => om,
        Format::Prometheus => openmetrics_to_prometheus(&om),
    }
}

/// Rewrites OpenMetrics text (as `prometheus_client` writes it) as Prometheus text 0.0.4:
/// a counter's family takes its samples' `_total` name, `# UNIT` and `# EOF` go, and the
/// rest (gauges, histograms, labels, escapes) is the same in both.
fn openmetrics_to_prometheus(om: &str) -> String {
    let mut out = String::with_capacity(om.len());
    let mut counters: Vec<&str> = Vec::new();
    for line in om.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ")
            && let Some(name) = rest.strip_suffix(" counter")
        {
            counters.push(name);
        }
    }
    for line in om.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let meta = line
            .strip_prefix("# HELP ")
            .map(|r| ("# HELP ", r))
            .or_else(|| line.strip_prefix("# TYPE ").map(|r| ("# TYPE ", r)));
        if let Some((kind, rest)) = meta {
            let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
            if counters.contains(&name) && !name.ends_with("_total") {
                out.push_str(kind);
                out.push_str(name);
                out.push_str("_total ");
                out.push_str(tail);
                out.push('\n');
                continue;
            }
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// The metrics, in the OpenMetrics text format.
fn render_openmetrics(shared: &Arc<Shared>, admin: &Arc<Stats>, access_log_dropped: u64) -> String {
    let mut registry = Registry::with_prefix("ferry");
    registry.register_collector(Box::new(Snapshot {
        shared: shared.clone(),
        admin: admin.clone(),
        access_log_dropped,
    }));
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
    out
}

#[derive(Debug)]
struct Snapshot {
    shared: Arc<Shared>,
    /// The admin server's connections.
    admin: Arc<Stats>,
    access_log_dropped: u64,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Shared")
    }
}

fn counter(v: u64) -> ConstCounter<u64> {
    ConstCounter::new(v)
}

impl Collector for Snapshot {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), fmt::Error> {
        let view = self.shared.view.load();
        let listeners: Vec<_> = view.listeners.iter().map(|l| l.slot.load_full()).collect();

        {
            let mut m = enc.encode_descriptor(
                "connections",
                "Finished client connections, by how they ended",
                None,
                MetricType::Counter,
            )?;
            for l in &listeners {
                for o in Outcome::FINAL {
                    let labels = [("listener", l.name.as_str()), ("result", o.as_str())];
                    counter(l.stats.finished(o)).encode(m.encode_family(&labels)?)?;
                }
            }
        }
        {
            let mut m = enc.encode_descriptor(
                "connections_active",
                "Client connections open now",
                None,
                MetricType::Gauge,
            )?;
            for l in &listeners {
                let labels = [("listener", l.name.as_str())];
                ConstGauge::new(l.stats.active.load(Relaxed) as i64)
                    .encode(m.encode_family(&labels)?)?;
            }
        }
        {
            let mut m = enc.encode_descriptor(
                "worker_connections",
                "Client connections each worker thread serves now",
                None,
                MetricType::Gauge,
            )?;
            for (i, n) in self.shared.workers().loads().into_iter().enumerate() {
                let worker = i.to_string();
                let labels = [("worker", worker.as_str())];
                ConstGauge::new(n as i64).encode(m.encode_family(&labels)?)?;
            }
        }
        {
            let mut m = enc.encode_descriptor(
                "bytes",
                "Payload bytes relayed (up: client to server, down: server to client)",
                None,
                MetricType::Counter,
            )?;
            for l in &listeners {
                let (up, down) = l.stats.bytes();
                for (dir, v) in [("up", up), ("down", down)] {
                    let labels = [("listener", l.name.as_str()), ("direction", dir)];
                    counter(v).encode(m.encode_family(&labels)?)?;
                }
            }
        }

        {
            let mut m = enc.encode_descriptor(
                "route_matches",
                "Connections routed, by the route that matched (1, 2, … in config order, or default)",
                None,
                MetricType::Counter,
            )?;
            for l in &listeners {
                for (route, upstream, n) in l.router.counts() {
                    let labels = [
                        ("listener", l.name.as_str()),
                        ("route", route.as_str()),
                        ("upstream", upstream),
                    ];
                    counter(n).encode(m.encode_family(&labels)?)?;
                }
            }
        }
        {
            let mut m = enc.encode_descriptor(
                "server_changes",
                "Servers added, removed and re-weighted through the admin API",
                None,
                MetricType::Counter,
            )?;
            for p in &view.pools {
                for (action, n) in p.runtime_counts() {
                    let labels = [("upstream", p.name.as_str()), ("action", action)];
                    counter(n).encode(m.encode_family(&labels)?)?;
                }
            }
        }
        let udp_listeners: Vec<_> = listeners
            .iter()
            .filter(|l| matches!(l.front, crate::frontend::FrontEnd::Udp(_)))
            .collect();
        {
            let mut m = enc.encode_descriptor(
                "udp_sessions_active",
                "UDP sessions open now (one per client address)",
                None,
                MetricType::Gauge,
            )?;
            for l in &udp_listeners {
                let labels = [("listener", l.name.as_str())];
                ConstGauge::new(l.stats.active.load(Relaxed) as i64)
                    .encode(m.encode_family(&labels)?)?;
            }
        }
        {
            let mut m = enc.encode_descriptor(
                "udp_datagrams",
                "UDP datagrams relayed (up: client to server, down: server to client)",
                None,
                MetricType::Counter,
            )?;
            for l in &udp_listeners {
                let (up, down, _) = l.stats.datagrams();
                for (dir, v) in [("up", up), ("down", down)] {
                    let labels = [("listener", l.name.as_str()), ("direction", dir)];
                    counter(v).encode(m.encode_family(&labels)?)?;
                }
            }
        }
        {
            let mut m = enc.encode_descriptor(
                "udp_kernel_datagrams",
                "Of the UDP datagrams relayed, those the kernel relayed (established sessions)",
                None,
                MetricType::Counter,
            )?;
            for l in &udp_listeners {
                let labels = [("listener", l.name.as_str())];
                counter(l.stats.datagrams().2).encode(m.encode_family(&labels)?)?;
            }
        }
        {
            let mut m = enc.encode_descriptor(
                "udp_dropped",
                "UDP datagrams dropped, by reason",
                None,
                MetricType::Counter,
            )?;
            for l in &udp_listeners {
                for why in crate::observe::Dropped::ALL {
                    let labels = [("listener", l.name.as_str()), ("reason", why.as_str())];
                    counter(l.stats.dropped(why)).encode(m.encode_family(&labels)?)?;
                }
            }
        }
        let tls_listeners: Vec<_> = listeners
            .iter()
            .filter_map(|l| match &l.front {
                crate::frontend::FrontEnd::Tls(t) => Some((l, t.clone())),
                _ => None,
            })
            .collect();
        {
            let mut m = enc.encode_descriptor(
                "tls_handshakes",
                "TLS handshakes with clients, by result (ok: full, resumed, failed)",
                None,
                MetricType::Counter,
            )?;
            for (l, _) in &tls_listeners {
                for (result, v) in [
                    ("ok", &l.stats.tls_full),
                    ("resumed", &l.stats.tls_resumed),
                    ("failed", &l.stats.tls_failed),
                ] {
                    let labels = [("listener", l.name.as_str()), ("result", result)];
                    counter(v.load(Relaxed)).encode(m.encode_family(&labels)?)?;
                }
            }
        }
        {
            let mut m = enc.encode_descriptor(
                "tls_handshake_duration_seconds",
                "Time from the first byte of a ClientHello to a completed TLS handshake",
                None,
                MetricType::Histogram,
            )?;
            for (l, _) in &tls_listeners {
                let (sum, count, buckets) = l.stats.tls_handshake.snapshot();
                let labels = [("listener", l.name.as_str())];
                m.encode_family(&labels)?
                    .encode_histogram::<NoLabelSet>(sum, count, &buckets, None)?;
            }
        }
        {
            let mut m = enc.encode_descriptor(
                "tls_certificate_expiry_seconds",
                "When each served certificate expires, in seconds since the Unix epoch (name: the SNI it is served for, or default)",
                None,
                MetricType::Gauge,
            )?;
            for (l, t) in &tls_listeners {
                for c in &t.certs {
                    let labels = [("listener", l.name.as_str()), ("name", c.name.as_str())];
                    ConstGauge::new(c.info.not_after).encode(m.encode_family(&labels)?)?;
                }
            }
        }

        // Per server.
        let servers: Vec<_> = view
            .pools
            .iter()
            .flat_map(|p| {
                p.servers()
                    .servers
                    .iter()
                    .map(|s| (p.clone(), s.clone()))
                    .collect::<Vec<_>>()
            })
            .collect();
        let server_family =
            |enc: &mut DescriptorEncoder,
             name: &str,
             help: &str,
             ty: MetricType,
             value: &dyn Fn(&crate::upstream::Pool, &crate::upstream::Server) -> u64|
             -> Result<(), fmt::Error> {
                let mut m = enc.encode_descriptor(name, help, None, ty)?;
                for (p, s) in &servers {
                    let addr = s.addr.to_string();
                    let labels = [
                        ("upstream", p.name.as_str()),
                        ("server", &*s.configured),
                        ("address", addr.as_str()),
                    ];
                    let v = value(p, s);
                    match ty {
                        MetricType::Counter => counter(v).encode(m.encode_family(&labels)?)?,
                        _ => ConstGauge::new(v as i64).encode(m.encode_family(&labels)?)?,
                    }
                }
                Ok(())
            };
        server_family(
            &mut enc,
            "server_up",
            "1 if the server takes new connections (up by health, not ejected, enabled)",
            MetricType::Gauge,
            &|p, s| u64::from(s.state(p) == ServerState::Up),
        )?;
        server_family(
            &mut enc,
            "server_connections_active",
            "Connections assigned to the server now",
            MetricType::Gauge,
            &|_, s| s.stats.active.load(Relaxed),
        )?;
        server_family(
            &mut enc,
            "server_connections",
            "Connections ever assigned to the server",
            MetricType::Counter,
            &|_, s| s.stats.total.load(Relaxed),
        )?;
        server_family(
            &mut enc,
            "server_connect_failures",
            "Connect attempts to the server that failed or timed out",
            MetricType::Counter,
            &|_, s| s.stats.connect_failures.load(Relaxed),
        )?;
        {
            let mut m = enc.encode_descriptor(
                "server_bytes",
                "Payload bytes relayed through the server",
                None,
                MetricType::Counter,
            )?;
            for (p, s) in &servers {
                let addr = s.addr.to_string();
                for (dir, v) in [("up", &s.stats.bytes_up), ("down", &s.stats.bytes_down)] {
                    let labels = [
                        ("upstream", p.name.as_str()),
                        ("server", &*s.configured),
                        ("address", addr.as_str()),
                        ("direction", dir),
                    ];
                    counter(v.get()).encode(m.encode_family(&labels)?)?;
                }
            }
        }
        {
            let mut m = enc.encode_descriptor(
                "health_checks",
                "Active health checks, by result",
                None,
                MetricType::Counter,
            )?;
            for (p, s) in &servers {
                if p.health.is_none() {
                    continue;
                }
                let addr = s.addr.to_string();
                for (result, v) in [
                    ("ok", &s.stats.checks_ok),
                    ("failed", &s.stats.checks_failed),
                ] {
                    let labels = [
                        ("upstream", p.name.as_str()),
                        ("server", &*s.configured),
                        ("address", addr.as_str()),
                        ("result", result),
                    ];
                    counter(v.load(Relaxed)).encode(m.encode_family(&labels)?)?;
                }
            }
        }
        {
            let mut m = enc.encode_descriptor(
                "connect_duration_seconds",
                "Time to establish server connections",
                None,
                MetricType::Histogram,
            )?;
            for p in &view.pools {
                let (sum, count, buckets) = p.connect_hist.snapshot();
                let labels = [("upstream", p.name.as_str())];
                m.encode_family(&labels)?
                    .encode_histogram::<NoLabelSet>(sum, count, &buckets, None)?;
            }
        }
        {
            let mut m = enc.encode_descriptor(
                "upstream_queue_length",
                "Connections waiting for a free server",
                None,
                MetricType::Gauge,
            )?;
            for p in &view.pools {
                let labels = [("upstream", p.name.as_str())];
                ConstGauge::new(p.queued() as i64).encode(m.encode_family(&labels)?)?;
            }
        }
        {
            let mut m = enc.encode_descriptor(
                "config_reloads",
                "Config reloads, by result",
                None,
                MetricType::Counter,
            )?;
            for (result, v) in [
                ("ok", &self.shared.reloads_ok),
                ("failed", &self.shared.reloads_failed),
            ] {
                counter(v.load(Relaxed)).encode(m.encode_family(&[("result", result)])?)?;
            }
        }
        {
            let m = enc.encode_descriptor(
                "access_log_dropped",
                "Access-log records dropped because the writer fell behind",
                None,
                MetricType::Counter,
            )?;
            counter(self.access_log_dropped).encode(m)?;
        }
        {
            let stats = &self.admin;
            let m = enc.encode_descriptor(
                "admin_connections_active",
                "Connections open to the admin server",
                None,
                MetricType::Gauge,
            )?;
            ConstGauge::new(stats.open.load(Relaxed) as i64).encode(m)?;
            let mut m = enc.encode_descriptor(
                "admin_connections_closed",
                "Admin connections closed by ferry, by reason (evicted: the idlest, to make room; timeout: no request head in time, idle or slow; failed: bad request, or response not read; refused: every connection busy)",
                None,
                MetricType::Counter,
            )?;
            for (reason, n) in stats.closed() {
                counter(n).encode(m.encode_family(&[("reason", reason)])?)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn negotiation() {
        use Format::*;
        assert_eq!(Format::negotiate(None), Prometheus);
        assert_eq!(Format::negotiate(Some("*/*")), Prometheus);
        assert_eq!(
            Format::negotiate(Some("text/html,application/xhtml+xml")),
            Prometheus
        );
        // What Prometheus itself sends.
        assert_eq!(
            Format::negotiate(Some(
                "application/openmetrics-text;version=1.0.0;q=0.5,text/plain;version=0.0.4;q=0.4,*/*;q=0.1"
            )),
            OpenMetrics
        );
        assert_eq!(
            Format::negotiate(Some("Application/OpenMetrics-Text")),
            OpenMetrics
        );
        assert_eq!(
            Format::negotiate(Some("application/openmetrics-text;q=0")),
            Prometheus
        );
    }

    #[test]
    fn prometheus_text_from_openmetrics() {
        let om = "# HELP ferry_connections Connections ended.\n\
                  # TYPE ferry_connections counter\n\
                  ferry_connections_total{listener=\"a\"} 3\n\
                  # HELP ferry_up Up.\n\
                  # TYPE ferry_up gauge\n\
                  # UNIT ferry_up seconds\n\
                  ferry_up 1\n\
                  # EOF\n";
        assert_eq!(
            openmetrics_to_prometheus(om),
            "# HELP ferry_connections_total Connections ended.\n\
             # TYPE ferry_connections_total counter\n\
             ferry_connections_total{listener=\"a\"} 3\n\
             # HELP ferry_up Up.\n\
             # TYPE ferry_up gauge\n\
             ferry_up 1\n"
        );
    }
}
