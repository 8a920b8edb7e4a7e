//! What the operator commands print in: shared by the CLI and the demo, so that neither
//! imports the other for it.

/// `--format` of the commands that report (`plan`, `verify`, `status`, `cutover`, `demo`, …).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Text,
    Json,
}
