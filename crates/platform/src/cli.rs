//! The command line every service binary shares: a listen address, the service's own
//! configuration, and telemetry.

use std::net::SocketAddr;

use clap::{Args, CommandFactory, FromArgMatches, Parser};

/// What tells one service binary from another on the command line.
#[derive(Clone, Copy, Debug)]
pub struct ServiceSpec {
    /// The binary's name, e.g. `hafen-auth`.
    pub binary: &'static str,
    /// One line for `--help`.
    pub about: &'static str,
    /// The default listen address.
    pub default_listen: &'static str,
}

/// Command line of a service binary whose own configuration is `C`.
#[derive(Parser, Debug)]
pub struct ServiceCli<C: Args> {
    /// Address to serve gRPC (TLS) on. Use 0.0.0.0 to accept connections from other hosts.
    #[arg(long, env = "HAFEN_LISTEN")]
    pub listen: SocketAddr,

    #[command(flatten)]
    pub config: C,

    #[command(flatten)]
    pub telemetry: crate::TelemetryArgs,
}

impl<C: Args> ServiceCli<C> {
    /// The clap command for `spec`: its name, about text and default listen address.
    pub fn command_for(spec: &ServiceSpec) -> clap::Command {
        Self::command()
            .name(spec.binary)
            .bin_name(spec.binary)
            .about(spec.about)
            .version(env!("CARGO_PKG_VERSION"))
            .mut_arg("listen", |arg| arg.default_value(spec.default_listen))
    }

    /// Parses the process arguments for `spec`; exits with clap's message on bad input.
    pub fn parse_for(spec: &ServiceSpec) -> Self {
        let matches = Self::command_for(spec).get_matches();
        Self::from_arg_matches(&matches).unwrap_or_else(|err| err.exit())
    }
}
