//! `hafen-tenant rotate-master-key`: a new master-key version, every tenant key re-wrapped
//! under it while the services keep running, and old versions retired once no key needs
//! them (BX1, DESIGN "Keys").
//!
//! The services read the master key file at start and read it again when they meet a tenant
//! key wrapped under a version they lack ([`hafen_store::keyring`]); the tenant service reads
//! it for each new tenant. So where every service reads the same file, one run does it all.
//! Where each has its own copy (a Kubernetes Secret, say), run it in steps: `--new-version-only`,
//! then give every service the new file, then `--rewrap-only`, then `--retire` the old version.
//!
//! Purpose keys (the chat-code pepper and the others, and the backup key) come from the
//! file's derivation secret, which no rotation changes: what was made with them (chat-code
//! hashes, backups) stays valid.

use std::path::PathBuf;

use hafen_crypto::MasterKey;
use hafen_store::{Databases, DatabasesArgs};

use crate::error::Error;

/// Tenant keys re-wrapped per transaction.
const BATCH: i64 = 100;

/// Options of `hafen-tenant rotate-master-key`.
#[derive(clap::Args, Debug, Clone)]
pub struct RotateArgs {
    #[command(flatten)]
    pub databases: DatabasesArgs,

    /// The master key file: a new version is added to it (written anew, mode 0600) and made
    /// current; the older ones stay until retired.
    #[arg(long, env = "HAFEN_MASTER_KEY_FILE")]
    pub master_key_file: PathBuf,

    /// Only add a new current version to the file; re-wrap nothing (give every service the new
    /// file, then run again with --rewrap-only).
    #[arg(long, env = "HAFEN_ROTATE_NEW_VERSION_ONLY", conflicts_with_all = ["rewrap_only", "retire"])]
    pub new_version_only: bool,

    /// Add no version: re-wrap the keys not yet under the file's current version (after
    /// --new-version-only, or to finish a run that stopped).
    #[arg(long, env = "HAFEN_ROTATE_REWRAP_ONLY", conflicts_with = "retire")]
    pub rewrap_only: bool,

    /// Remove this version from the file once no tenant key is wrapped under it (keys still
    /// under it are re-wrapped first). Never the current version.
    #[arg(long, env = "HAFEN_ROTATE_RETIRE", value_name = "VERSION")]
    pub retire: Option<u32>,

    #[command(flatten)]
    pub telemetry: hafen_platform::TelemetryArgs,
}

/// What a run did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    /// The version new keys are wrapped under now.
    pub current: u32,
    /// The versions the file holds now.
    pub versions: Vec<u32>,
    /// Tenant keys re-wrapped by this run.
    pub rewrapped: usize,
    /// Tenant keys per version, after the run.
    pub in_use: Vec<(u32, i64)>,
    /// The version retired by this run.
    pub retired: Option<u32>,
}

/// Runs `hafen-tenant rotate-master-key` as `args` say.
pub async fn run(args: &RotateArgs) -> Result<Report, Error> {
    let mut master = MasterKey::load(&args.master_key_file)?;
    if !args.rewrap_only && args.retire.is_none() {
        master = master.rotated()?;
        master.write(&args.master_key_file)?;
        tracing::info!(
            version = master.current_version(),
            "master key version added and made current"
        );
    }
    let databases = Databases::new(&args.databases)?;
    let mut conn = databases.keystore_connection().await?;
    let mut rewrapped = 0;
    if !args.new_version_only {
        loop {
            let done = hafen_store::keystore::rewrap(&mut conn, &master, BATCH)
                .await
                .map_err(|err| match err {
                    hafen_store::keystore::RewrapError::Database(err) => {
                        Error::Store(hafen_store::Error::from(err))
                    }
                    hafen_store::keystore::RewrapError::Key { tenant, source } => {
                        Error::Config(format!("tenant {tenant}'s key: {source}"))
                    }
                })?;
            if done == 0 {
                break;
            }
            rewrapped += done;
        }
        tracing::info!(
            rewrapped,
            version = master.current_version(),
            "tenant keys re-wrapped"
        );
    }
    let in_use = hafen_store::keystore::versions_in_use(&mut conn).await?;
    let mut retired = None;
    if let Some(version) = args.retire {
        if version == master.current_version() {
            return Err(Error::Config(format!(
                "version {version} is the current one: rotate to a new version first"
            )));
        }
        if let Some((_, keys)) = in_use.iter().find(|(v, _)| *v == version) {
            return Err(Error::Config(format!(
                "{keys} tenant keys are still wrapped under version {version}: not retired"
            )));
        }
        master = master.retired(version)?;
        master.write(&args.master_key_file)?;
        retired = Some(version);
        tracing::info!(version, "master key version retired");
    }
    Ok(Report {
        current: master.current_version(),
        versions: master.versions(),
        rewrapped,
        in_use,
        retired,
    })
}
